"""A user's install, checked end to end (``make check-install``, part of ``make test``).

1. Build the sdist of this checkout (``setup.py sdist``).
2. Make a fresh virtual environment (no system site-packages) and install torch into it
   (``--torch``, default ``torch==2.13.0``), as a user's environment would already have it.
3. ``pip install`` the sdist into it: a non-editable install through pip's isolated build.
4. Check that torch is the same version as before, that the ``eeruntime`` script answers, that the
   compiled ops load (built against that torch) and agree with the torch references, and that
   ``pip install --dry-run`` of every extra would not replace torch.

Exit status 0 when all hold; the first failure is printed with what was expected.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS = "vision,transformers,serve,ray,triton,torchserve,dev"

CHECK = r"""
import json, torch, eeruntime as ee
from eeruntime import _ext
from eeruntime.ops.exit_decision import confidence_ref
logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
conf, mask = ee.ops.exit_decision(logits, 0.5, criterion="entropy")
ref = confidence_ref(logits.double(), "entropy")
print(json.dumps({"torch": torch.__version__, "ext": _ext.available(), "why": _ext.why_unavailable(),
                  "built": (_ext.build_info() or {}).get("torch"),
                  "max_err": float((conf.double() - ref).abs().max()),
                  "same_exits": bool((mask == (ref < 0.5)).all())}))
"""


def sh(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    done = subprocess.run(cmd, text=True, capture_output=True, **kw)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if done.returncode != 0:
        sys.exit(
            f"check-install: failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout


def fail(msg):
    sys.exit(f"check-install: {msg}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", default="torch==2.13.0", help="the torch the user's environment has")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the fresh venv is made from")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="eeruntime-install-")
    print(f"check-install: working in {tmp}")
    dist = os.path.join(tmp, "dist")
    # the sdist is built from the checkout by the developer's interpreter (setuptools is there)
    sh([sys.executable, "setup.py", "-q", "sdist", "-d", dist], cwd=ROOT)
    (sdist,) = glob.glob(os.path.join(dist, "eeruntime-*.tar.gz"))
    venv = os.path.join(tmp, "venv")
    # --without-pip + ensurepip would be slower; the stdlib venv brings its bundled pip
    sh([a.python, "-m", "venv", venv])
    py = os.path.join(venv, "bin", "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    sh(pip + ["install", "-q", a.torch], cwd=tmp)
    version = lambda: sh([py, "-c", "import torch; print(torch.__version__)"], cwd=tmp).strip()  # noqa: E731
    before = version()
    sh(pip + ["install", sdist], cwd=tmp)  # non-editable, pip's build isolation on
    after = version()
    if after != before:
        fail(f"installing eeruntime changed torch from {before} to {after}")
    out = sh([os.path.join(venv, "bin", "eeruntime"), "--version"], cwd=tmp)
    if not out.startswith("eeruntime ") or "extension loaded" not in out:
        fail(f"`eeruntime --version` says: {out.strip()!r} (expected the extension loaded)")
    import json

    got = json.loads(sh([py, "-c", CHECK], cwd=tmp).strip().splitlines()[-1])
    if not got["ext"] or got["built"] != before:
        fail(f"the compiled ops are not loaded or not built against torch {before}: {got}")
    if got["max_err"] > 1e-5 or not got["same_exits"]:
        fail(f"the installed exit_decision disagrees with the float64 reference: {got}")
    plan = sh(pip + ["install", "--dry-run", f"{sdist}[{EXTRAS}]"], cwd=tmp)
    would = [line for line in plan.splitlines() if line.startswith("Would install")]
    if would and any(p.startswith("torch-") for p in would[0].split()):
        fail(f"installing the extras [{EXTRAS}] would replace torch {before}: {would[0]}")
    print(
        f"check-install: ok: torch {before} kept; extension built against it and loaded; "
        f"extras [{EXTRAS}] keep it; `eeruntime --version`: {out.strip()}"
    )
    if not a.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

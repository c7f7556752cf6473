"""Run every benchmark suite (runtime, exit-decision kernel, compaction, graphs) in one pytest
session and write the pytest-benchmark JSON to ``bench/results/<device>-<date>.json``, then the
markdown tables and plots next to it (``bench/report.py``).

    python bench/run_all.py [-k EXPR] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def device_slug() -> str:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        import platform

        name = "cpu-" + (platform.machine() or "unknown")
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default=None, help="pytest -k expression to select cases")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    stem = f"{device_slug()}-{datetime.date.today().isoformat()}"
    json_path = os.path.join(args.out, stem + ".json")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        HERE,
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "-p",
        "no:cacheprovider",
    ]
    if args.k:
        cmd += ["-k", args.k]
    rc = subprocess.call(cmd, cwd=os.path.dirname(HERE))
    if rc not in (0, 5) or not os.path.exists(json_path):
        return rc or 1
    from report import write_report  # noqa: E402  (bench/ is on sys.path when run as a script)

    md = write_report(json_path, os.path.join(args.out, stem))
    print(f"wrote {json_path} and {md}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())

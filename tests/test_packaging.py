"""The packaging promises a user's `pip install` relies on, checked in seconds.

`make check-install` (tools/check_install.py) proves them end to end in minutes; these tests catch
the cheap-to-break parts first: a merge once put back the plain setuptools backend with a static
``torch`` build requirement, and the install then replaced the user's torch 2.13 with 2.14.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_system_uses_the_in_tree_backend_without_a_static_torch():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        build = tomllib.load(f)["build-system"]
    assert build["build-backend"] == "build_backend"
    assert build["backend-path"] == ["tools"]
    assert os.path.isfile(os.path.join(ROOT, "tools", "build_backend.py"))
    names = [r.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in build["requires"]]
    assert "torch" not in names, build["requires"]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=60)


def test_no_build_output_is_tracked_by_git():
    """A file the build writes must not be tracked: ``eeruntime/_C_build.json`` was (ignored, but
    committed), so every checkout carried a CPU build's record, ``make setup`` dirtied the tree, and
    a working tree copied onto a GPU machine after the extension was built there overwrote the
    machine's record, so ``eeruntime._C`` was refused as built against another torch (session 18:
    bench/results/serve-nvidia-h200-2026-11-27-session18-defer.md). A tracked file that matches
    .gitignore is such a file."""
    try:
        inside = _git("rev-parse", "--is-inside-work-tree")
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"git is not usable here: {e}")
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        pytest.skip("not a git checkout (an sdist or an installed copy): nothing is tracked")
    tracked_but_ignored = _git("ls-files", "--cached", "--ignored", "--exclude-standard").stdout.split()
    assert tracked_but_ignored == [], (
        f"tracked files that .gitignore ignores (git rm --cached them): {tracked_but_ignored}"
    )


def test_sdist_manifest_carries_the_backend():
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        lines = [line.strip() for line in f if not line.startswith("#")]
    assert "include tools/build_backend.py" in lines


def test_backend_finds_the_running_torch_even_with_isolation_variables(monkeypatch):
    backend = _load("_eeruntime_build_backend", os.path.join(ROOT, "tools", "build_backend.py"))
    # pip's isolated build sets PYTHONPATH/PYTHONNOUSERSITE; the probe must see past them.
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-isolated-env")
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    found = backend.installed_torch()
    assert found is not None
    version, folder = found
    assert version == torch.__version__
    assert os.path.samefile(folder, os.path.dirname(os.path.dirname(torch.__file__)))


def test_backend_asks_for_torch_only_where_none_is_installed(tmp_path):
    # A Python with no torch at all (a fresh venv without site packages): torch becomes a requirement.
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a venv here: {made.stderr.decode()[-300:]}")
    py = venv / "bin" / "python"
    tools = os.path.join(ROOT, "tools")
    code = (
        f"import sys; sys.path.insert(0, {tools!r}); import build_backend as b;"
        "print(b.installed_torch()); print(b._requires(lambda c: ['setuptools'], None))"
    )
    # setuptools is needed to import the backend: link this interpreter's setuptools (and only it,
    # not the site-packages that also holds torch) into a folder of its own.
    import setuptools

    site = tmp_path / "site"
    site.mkdir()
    parent = os.path.dirname(os.path.dirname(setuptools.__file__))
    for name in ("setuptools", "pkg_resources", "_distutils_hack"):
        if os.path.exists(os.path.join(parent, name)):
            os.symlink(os.path.join(parent, name), site / name)
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if "No module named" in out.stderr:
        pytest.skip(f"the bare venv cannot import the backend: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "None"
    assert lines[1] == "['setuptools', 'torch']"


def test_a_wheel_built_against_a_torch_requires_that_torch():
    setup = _load("_eeruntime_setup", os.path.join(ROOT, "setup.py"))
    reqs, extras = setup.dependencies("2.13.0")
    assert "torch==2.13.0" in reqs
    assert "torchvision==0.28.*" in extras["vision"]
    reqs, _ = setup.dependencies(None)
    assert "torch>=2.3" in reqs

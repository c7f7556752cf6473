"""`make lint` catches what it is there to catch: the project's own ruff and mypy settings
(pyproject.toml) fail on a deliberately bad file, and pass on the same file fixed."""

import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _tool(name):
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed (make setup installs it from requirements-dev.txt)")
        path = pathlib.Path(found)
    return str(path)


def _run(args, cwd):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_ruff_fails_on_an_unused_import_and_passes_without_it(tmp_path):
    ruff = _tool("ruff")
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f(x):\n    return x\n")
    res = _run([ruff, "check", "--config", str(REPO / "pyproject.toml"), str(bad)], tmp_path)
    assert res.returncode != 0 and "F401" in res.stdout, res.stdout + res.stderr
    bad.write_text("def f(x):\n    return x\n")
    res = _run([ruff, "check", "--config", str(REPO / "pyproject.toml"), str(bad)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format_check_fails_on_unformatted_code(tmp_path):
    ruff = _tool("ruff")
    bad = tmp_path / "bad.py"
    bad.write_text("x = {  'a':1 }\n")
    res = _run([ruff, "format", "--check", "--config", str(REPO / "pyproject.toml"), str(bad)], tmp_path)
    assert res.returncode != 0, res.stdout + res.stderr


def test_mypy_fails_on_a_wrong_type_in_a_public_function(tmp_path):
    mypy = _tool("mypy")
    bad = tmp_path / "api.py"
    bad.write_text('def exit_count(counts: list[int]) -> int:\n    return "many"\n')
    res = _run([mypy, "--config-file", str(REPO / "pyproject.toml"), str(bad)], tmp_path)
    assert res.returncode != 0 and "return-value" in res.stdout, res.stdout + res.stderr
    bad.write_text("def exit_count(counts: list[int]) -> int:\n    return sum(counts)\n")
    res = _run([mypy, "--config-file", str(REPO / "pyproject.toml"), str(bad)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr

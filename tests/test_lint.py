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


def _strict_modules():
    """The modules pyproject.toml's mypy overrides hold to annotated defs (the public API)."""
    import tomllib

    overrides = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["overrides"]
    return [m for o in overrides if o.get("disallow_untyped_defs") for m in o["module"]]


def _write_package(root, modules, source):
    """A throwaway ``eeruntime`` package under ``root`` whose ``modules`` hold ``source``, so mypy
    applies the project's per-module settings to them by name. Returns its files."""
    names = {"eeruntime", *modules}
    for name in names:  # every parent is a package
        parts = name.split(".")
        for i in range(1, len(parts)):
            root.joinpath(*parts[:i]).mkdir(parents=True, exist_ok=True)
            root.joinpath(*parts[:i], "__init__.py").touch()
    for name in modules:
        parts = name.split(".")
        if any(other.startswith(name + ".") for other in names):
            path = root.joinpath(*parts, "__init__.py")
        else:
            path = root.joinpath(*parts[:-1], parts[-1] + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return sorted(str(p) for p in root.rglob("*.py"))


def test_mypy_fails_on_an_unannotated_def_in_every_strict_module_only(tmp_path):
    mypy = _tool("mypy")
    strict = _strict_modules()
    # the public API of issue 18: EERuntime, ee.ops, ee.calibrate, attach_exits
    for public in ("eeruntime.runtime.api", "eeruntime.ops", "eeruntime.ops.compact", "eeruntime.calibrate"):
        assert public in strict, strict
    assert "eeruntime.attach" in strict, strict
    untyped = "def exit_count(counts):\n    return sum(counts)\n"
    files = _write_package(tmp_path, strict, untyped)
    res = _run([mypy, "--config-file", str(REPO / "pyproject.toml"), *files], tmp_path)
    assert res.returncode != 0, res.stdout + res.stderr
    flagged = {line.split(":")[0] for line in res.stdout.splitlines() if "[no-untyped-def]" in line}
    for m in strict:
        rel = m.replace(".", "/")
        assert any(f.endswith((f"{rel}.py", f"{rel}/__init__.py")) for f in flagged), (m, res.stdout)
    # the same def outside the strict list passes (those modules are checked, but not held to annotations)
    loose = tmp_path / "loose"
    res = _run(
        [mypy, "--config-file", str(REPO / "pyproject.toml"), *_write_package(loose, ["eeruntime.plot"], untyped)],
        loose,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # and annotated, the strict modules pass
    typed = tmp_path / "typed"
    annotated = "def exit_count(counts: list[int]) -> int:\n    return sum(counts)\n"
    res = _run([mypy, "--config-file", str(REPO / "pyproject.toml"), *_write_package(typed, strict, annotated)], typed)
    assert res.returncode == 0, res.stdout + res.stderr

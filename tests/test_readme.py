"""Every ```python block of README.md runs as written: in order, in one fresh namespace (later
blocks continue from earlier ones, as a reader would), in an empty working folder. A block can
opt out only with a first line `# readme-test: skip (<reason>)`, visible to the reader."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = "# readme-test: skip"


def python_blocks(text: str):
    """(line number, code) of each fenced python block."""
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
        blocks.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return blocks


def test_extractor_finds_every_fenced_block():
    text = "a\n```python\nx = 1\n```\nb\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = x\n")]  # first code line of each
    blocks = python_blocks(README.read_text())
    # the quick start and the training section always run; a skipped block says why on its first line
    assert len(blocks) >= 2 and not any(code.startswith(SKIP) for _, code in blocks[:2])
    for line, code in blocks:
        if code.startswith(SKIP):
            assert re.match(r"# readme-test: skip \(.{10,}\)\n", code), f"README.md:{line}: say why it is skipped"


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EERUNTIME_PROGRESS", "0")
    namespace = {"__name__": "__readme__"}
    ran = 0
    for line, code in python_blocks(README.read_text()):
        if code.startswith(SKIP):
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"README.md block at line {line} failed: {type(e).__name__}: {e}")
        ran += 1
    assert ran >= 2
    # what the blocks say they wrote is there
    assert (tmp_path / "my_runtime" / "runtime.json").is_file()
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "bundle" / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["bundle", "frontier.png", "my_runtime"]

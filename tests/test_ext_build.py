"""The compiled extension records the torch it was built against, and an import under another
torch warns with the fix and runs on the torch references instead of loading it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import eeruntime
from eeruntime import _ext


def test_mismatch_rules():
    info = {"torch": "2.13.0+cpu", "torch_git": "abc123"}
    assert _ext.torch_mismatch(None, "2.13.0+cpu") is None  # no record: nothing to compare
    assert _ext.torch_mismatch(info, "2.13.0+cpu", "abc123") is None
    assert _ext.torch_mismatch(info, "2.13.0+cpu", None) is None
    msg = _ext.torch_mismatch(info, "2.14.1", "abc123")
    assert msg == "eeruntime._C was built against torch 2.13.0+cpu but torch 2.14.1 is running"
    # the same release built for CUDA is another ABI (its local label differs)
    assert "2.13.0+cu128 is running" in _ext.torch_mismatch(info, "2.13.0+cu128", "abc123")
    assert "another build" in _ext.torch_mismatch(info, "2.13.0+cpu", "def456")


def test_this_build_recorded_this_torch():
    info = _ext.build_info()
    if _ext.available():  # make test fails earlier (check-ext) when the extension did not build
        assert info is not None and info["torch"] == torch.__version__
        assert "built against torch " + torch.__version__ in _ext.describe()


def test_import_under_another_torch_warns_and_falls_back(tmp_path):
    pkg = Path(eeruntime.__file__).parent
    shutil.copytree(pkg, tmp_path / "eeruntime", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "eeruntime" / "_C_build.json").write_text(json.dumps({"torch": "2.0.0+cpu", "torch_git": None}))
    code = (
        "import torch, eeruntime as ee\n"
        "from eeruntime import _ext\n"
        "from eeruntime.ops.exit_decision import confidence_ref\n"
        "x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))\n"
        "conf, mask = ee.ops.exit_decision(x, 0.5)\n"
        "assert not _ext.available() and 'eeruntime' not in str(torch.ops.loaded_libraries)\n"
        "assert torch.allclose(conf.double(), confidence_ref(x.double(), 'entropy').double(), atol=1e-6)\n"
        "print(_ext.why_unavailable())\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    expected = f"eeruntime._C was built against torch 2.0.0+cpu but torch {torch.__version__} is running"
    assert expected in done.stderr and "RuntimeWarning" in done.stderr
    assert "pip install --no-deps --force-reinstall ." in done.stderr  # the fix
    assert "torch reference ops run" in done.stderr
    assert expected in done.stdout

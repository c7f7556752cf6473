"""setup.py's choice of building the CUDA ops: the nvcc version it reads and the reasons it gives
(an nvcc whose major version differs from torch's CUDA must not silently give a CPU-only build)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("eeruntime_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no setup()
    return module


def test_parse_nvcc_version(setup_py):
    out = (
        "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\nBuild cuda_12.4.r12.4"
    )
    assert setup_py.parse_nvcc_version(out) == (12, 4)
    assert setup_py.parse_nvcc_version("Cuda compilation tools, release 11.8, V11.8.89") == (11, 8)
    assert setup_py.parse_nvcc_version("") is None and setup_py.parse_nvcc_version("garbage") is None


def test_nvcc_version_runs_the_toolkits_nvcc(setup_py, tmp_path):
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    fake.chmod(0o755)
    assert setup_py.nvcc_version(str(tmp_path)) == (13, 0)
    assert setup_py.nvcc_version(str(tmp_path / "missing")) is None


def test_why_no_cuda(setup_py):
    why = setup_py.why_no_cuda
    assert why("12.8", "/usr/local/cuda", (12, 4)) is None  # minor versions may differ
    assert why("12.8", "/usr/local/cuda", (12, 9)) is None
    mismatch = why("12.8", "/usr/local/cuda-11.8", (11, 8))
    assert "nvcc 11.8" in mismatch and "12.8" in mismatch and "different major" in mismatch
    assert "CUDA 12.x toolkit" in mismatch and "/usr/local/cuda-11.8" in mismatch
    assert "13.0" in why("12.6", "/opt/cuda", (13, 0))
    assert "without CUDA" in why(None, None, None)
    assert "nvcc was not found" in why("12.8", None, None)
    assert "nvcc --version failed" in why("12.8", "/opt/cuda", None)


def test_build_cuda_1_fails_with_the_reason_on_a_cpu_torch():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here: the failure path needs a CPU build of torch")
    env = dict(os.environ, EERUNTIME_BUILD_CUDA="1")
    r = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode != 0
    assert "EERUNTIME_BUILD_CUDA=1 but the CUDA ops cannot be built: this torch was built without CUDA" in r.stderr

import os

import torch

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is
# imported. On a CUDA machine the real kernels run instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _import_this_checkouts_kernels() -> None:
    """setup.py packages kernels/ as eeruntime.kernels. When this checkout's eeruntime comes from
    PYTHONPATH while another checkout is installed in editable mode (a git worktree beside the
    main one), the editable finder would still map eeruntime.kernels to the installed checkout's
    kernels/, and the kernel tests would test other code: load this checkout's kernels/ instead."""
    import eeruntime

    if pathlib.Path(eeruntime.__file__).resolve().parent != _REPO / "eeruntime" or "eeruntime.kernels" in sys.modules:
        return
    kernels = _REPO / "kernels"
    spec = importlib.util.spec_from_file_location(
        "eeruntime.kernels", kernels / "__init__.py", submodule_search_locations=[str(kernels)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    eeruntime.kernels = module


_import_this_checkouts_kernels()

import torchvision_compat  # noqa: E402

# Before anything imports torchvision (transformers and timm do): see torchvision_compat.
torchvision_compat.prepare()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# A test that skips without a GPU (its skipif reason names the missing CUDA device, GPU or CUDA
# build) is marked `gpu` (registered in pyproject.toml), so `pytest -m gpu tests` runs every GPU
# test (make gpu-check).
_GPU_SKIP_REASON = re.compile(r"needs a CUDA device|CUDA devices|GPU|built without CUDA|no CUDA")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(_GPU_SKIP_REASON.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)

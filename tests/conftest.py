import os

import torch

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is
# imported. On a CUDA machine the real kernels run instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import torchvision_compat  # noqa: E402

# Before anything imports torchvision (transformers and timm do): see torchvision_compat.
torchvision_compat.prepare()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

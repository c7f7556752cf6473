"""Guarded access to the compiled extension ``eeruntime._C``."""
from __future__ import annotations

import importlib.util
from typing import Optional

_C = None
_IMPORT_ERROR: Optional[str] = None
try:
    from . import _C  # type: ignore  # noqa: F811  registers torch.ops.eeruntime.*
except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
    # No compiled file at all reads better as "not built" than Python's partial-import message.
    _IMPORT_ERROR = None if importlib.util.find_spec(f"{__name__.rpartition('.')[0]}._C") is None else (
        f"{type(e).__name__}: {e}"
    )

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler; "
    "EERUNTIME_BUILD_CUDA=1 and nvcc for the CUDA ops)"
)
CUDA_BUILD_HINT = (
    "rebuild with `EERUNTIME_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
    "(needs a CUDA build of torch and nvcc on PATH or under CUDA_HOME)"
)


def available() -> bool:
    return _C is not None


def with_cuda() -> bool:
    """True when the extension loaded and was compiled with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def why_unavailable() -> Optional[str]:
    """None when the extension loaded, else why it did not."""
    if _C is not None:
        return None
    if _IMPORT_ERROR is None:
        return "the C++ extension eeruntime._C is not built"
    return f"the C++ extension eeruntime._C failed to load ({_IMPORT_ERROR}); rebuild it against this torch"

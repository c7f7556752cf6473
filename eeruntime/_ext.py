"""Guarded access to the compiled extension ``eeruntime._C``."""
from __future__ import annotations

from typing import Optional

_C = None
_IMPORT_ERROR: Optional[str] = None
try:
    from . import _C  # type: ignore  # noqa: F811  registers torch.ops.eeruntime.*
except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler; "
    "EERUNTIME_BUILD_CUDA=1 and nvcc for the CUDA ops)"
)


def available() -> bool:
    return _C is not None


def why_unavailable() -> Optional[str]:
    """None when the extension loaded, else why it did not."""
    if _C is not None:
        return None
    return f"the C++ extension eeruntime._C is not built or failed to load ({_IMPORT_ERROR})"

"""Guarded access to the compiled extension ``eeruntime._C``."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from typing import Optional

import torch

# setup.py writes this file beside the compiled extension: the torch it was built against.
BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build.json")
REBUILD_HINT = (
    "rebuild it against this torch: in the eeruntime source folder run "
    "`pip install --no-deps --force-reinstall .` (`pip install --no-deps -e .` for an editable "
    "install, `make setup` in a checkout made with make)"
)


def build_info() -> Optional[dict]:
    """What the build recorded (``torch``, ``torch_git``, ``cuda``), or None without a record."""
    try:
        with open(BUILD_INFO) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "torch" in info else None


def torch_mismatch(
    info: Optional[dict],
    version: str = torch.__version__,
    git_version: Optional[str] = getattr(torch.version, "git_version", None),
) -> Optional[str]:
    """Why a build described by ``info`` does not fit the running torch, or None when it does.
    C++ extensions have no stable ABI across torch releases (nor between a CPU and a CUDA build
    of one release), so the exact version, local label included, must match."""
    if info is None:
        return None
    built = info.get("torch")
    if built != version:
        return f"eeruntime._C was built against torch {built} but torch {version} is running"
    built_git = info.get("torch_git")
    if built_git and git_version and built_git != git_version:
        return (
            f"eeruntime._C was built against torch {built} ({built_git[:12]}) but this torch {version} "
            f"is another build ({git_version[:12]})"
        )
    return None


_C = None
_IMPORT_ERROR: Optional[str] = None
_MISMATCH = torch_mismatch(build_info())
if _MISMATCH is not None:
    # Loading a library built for another torch fails on a missing symbol at best; at worst it
    # loads and misbehaves. Do not load it: warn once and run on the torch references.
    _IMPORT_ERROR = f"{_MISMATCH}; {REBUILD_HINT}"
    warnings.warn(
        f"{_IMPORT_ERROR}. Until then the torch reference ops run (correct, slower).", RuntimeWarning, stacklevel=2
    )
else:
    try:
        from . import _C  # type: ignore  # noqa: F811  registers torch.ops.eeruntime.*
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        # No compiled file at all reads better as "not built" than Python's partial-import message.
        _IMPORT_ERROR = (
            None
            if importlib.util.find_spec(f"{__name__.rpartition('.')[0]}._C") is None
            else (f"{type(e).__name__}: {e}")
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
    if _MISMATCH is not None:
        return f"the C++ extension is not used: {_IMPORT_ERROR}"
    return f"the C++ extension eeruntime._C failed to load ({_IMPORT_ERROR}); {REBUILD_HINT}"


def describe() -> str:
    """One line for ``eeruntime --version``: is the extension loaded, with CUDA, built for which torch."""
    info = build_info()
    built = f", built against torch {info['torch']}" if info else ""
    if _C is not None:
        return f"extension loaded ({'CPU and CUDA' if with_cuda() else 'CPU'} ops{built})"
    return f"extension not loaded: {why_unavailable()}"

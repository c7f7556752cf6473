"""The Triton exit-decision kernel (``kernels/exit_decision.py``) as a row of ``exit_decision``'s backend table.

The kernel module is imported on first use, not here: ``triton.jit`` decides at that import
whether the kernels are compiled for the GPU or run by the interpreter (``TRITON_INTERPRET=1``),
so importing eeruntime must not freeze that choice, and must not pay Triton's import time.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Optional

import torch

from . import dispatch

KERNEL_MODULE = "eeruntime.kernels.exit_decision"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

FIX = (
    "Use backend='torch' or 'auto'; to run the Triton kernel on CPU tensors set the environment "
    "variable TRITON_INTERPRET=1 before eeruntime's Triton kernels are first used (safest: before "
    "importing triton or torch); "
    "for CUDA tensors install triton (pip install triton)"
)


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (found and loadable; importing it does not fix the interpreter choice,
    which triton.jit makes when the kernel module is imported)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001  a broken install (e.g. a missing shared library) counts as absent
        return False
    return True


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _kernels_interpreted() -> Optional[bool]:
    """Whether the already-imported kernel module runs in the interpreter; None when not imported yet."""
    mod = sys.modules.get(KERNEL_MODULE)
    return None if mod is None else bool(mod.INTERPRETED)


def triton_why_not(logits, threshold, criterion, return_argmax=False, *, forced: bool) -> Optional[str]:
    """None when the Triton kernel can run these inputs, else the reason.

    ``auto`` (``forced=False``) takes it only for CUDA tensors with compiled (not interpreted)
    kernels; forced, it also runs CPU tensors when ``TRITON_INTERPRET=1``.
    """
    # Cheap rejections first: auto on CPU tensors never pays triton's import.
    if not isinstance(logits, torch.Tensor):
        return "logits is not a tensor"
    if logits.dtype not in _DTYPES:
        return f"the kernel takes float32, float16 or bfloat16 logits, got {logits.dtype}"
    if logits.device.type not in ("cuda", "cpu"):
        return f"the kernel runs on CUDA tensors (or CPU ones in the interpreter), got {logits.device.type}"
    if not logits.is_cuda and not forced:
        return "CPU tensor: auto picks the Triton kernel only for CUDA tensors"
    if isinstance(threshold, torch.Tensor) and threshold.is_complex():
        # the launcher's .to(float32) would drop the imaginary part; the torch backend refuses it
        return f"the threshold is a {threshold.dtype} tensor; a threshold is a real number"
    # The reasons below are the backend's absence (FIX says what to do); those above refuse the inputs.
    if not triton_available():
        return dispatch.missing("triton is not installed (it could not be imported)")
    interpreted = _kernels_interpreted()
    if logits.is_cuda:
        # Forced, the interpreter also runs CUDA tensors (through host copies); auto does not
        # choose that slow path.
        if not forced and (interpreted or (interpreted is None and _interpret_env())):
            return dispatch.missing("TRITON_INTERPRET=1 is set, so the kernel would run in the slow interpreter")
        return None
    if interpreted is False:
        return dispatch.missing(
            "CPU tensor, but the Triton kernels were already imported without TRITON_INTERPRET=1 "
            "(compiled for the GPU); set TRITON_INTERPRET=1 at the start of the process, before they are imported"
        )
    if interpreted is None and not _interpret_env():
        return dispatch.missing(
            "CPU tensor and TRITON_INTERPRET=1 is not set; set it before triton is imported (at the "
            "latest before eeruntime's Triton kernels are first used)"
        )
    return None


def exit_decision_triton(logits, threshold, criterion="entropy", return_argmax=False):
    from eeruntime.kernels.exit_decision import exit_decision_triton as launch

    return launch(logits, threshold, criterion, return_argmax)


# Sync-free: the threshold is read on the device, so it may run inside a captured graph.
EXIT_DECISION_TRITON = dispatch.Backend("triton", exit_decision_triton, triton_why_not, fix=FIX, capturable=True)

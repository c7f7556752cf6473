"""The compiled ops of ``eeruntime._C`` as rows of the ops' backend tables (the tables
themselves are declared beside each ``*_ref``): for ``compact``, ``compact_into`` and
``scatter_rows`` one extension backend whose CUDA kernels (stable select: one fused kernel for
``compact_into`` up to ``_C.FUSED_COMPACT_MAX_ROWS`` rows, CUB above and for ``compact``; vectorized
row gather/scatter) and CPU kernels are the same ``torch.ops.eeruntime`` op, routed by torch's
dispatcher; it shows in a table as ``cuda`` and ``cpp`` (:func:`extension_rows`), so that
``explain`` says per device why it cannot run and a device can be forced by name. For
``exit_decision`` and ``exit_scatter``: ``cpp``, the fused CPU kernels of
csrc/exit_decision_cpu.cpp (one read of each row; formulas in that file). Also registers the
ops' fake kernels, so ``torch.compile`` can trace ``torch.ops.eeruntime.*``.

The ops copy whole rows as bytes (any dtype, any trailing shape). They are not differentiable:
with grad enabled and an input that requires grad, ``auto`` leaves them to the ``torch`` backend.
``compact`` on CUDA syncs once (its output size is the kept count); ``compact_into`` and
``scatter_rows`` never sync and can be captured in a CUDA graph. ``scatter_rows`` converts a source
whose dtype differs from its output first (as the reference's ``.to(out.dtype)``); a masked row
whose destination is out of range raises IndexError on CPU and is skipped on CUDA (checking it
there would need a host sync). Outputs must not overlap their inputs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from .. import _ext
from ..criteria import CRITERIA, CRITERION_CODE
from . import dispatch

_INT32_MAX = 2**31 - 1


_compiled_ops = {}  # name -> torch.ops.eeruntime.<name>.default, looked up on first use


def _compiled(name: str):
    """The compiled op ``torch.ops.eeruntime.<name>``, or None when the extension is missing or
    this build of it predates the op."""
    op = _compiled_ops.get(name)
    if op is None and _ext.available() and hasattr(torch.ops.eeruntime, name):
        op = _compiled_ops[name] = getattr(torch.ops.eeruntime, name).default
    return op


def _rows_dense(t: torch.Tensor) -> bool:
    """Each row (all dims but 0) is one dense block, so it can be written with one copy."""
    expected = 1
    for d in range(t.dim() - 1, 0, -1):
        size = t.shape[d]
        if size == 0:
            return True
        if size != 1 and t.stride(d) != expected:
            return False
        expected *= size
    return True


def _rows_distinct(t: torch.Tensor) -> bool:
    """No two rows of a tensor with dense rows share memory (so each can be written on its own)."""
    return t.shape[0] <= 1 or t.stride(0) >= math.prod(t.shape[1:])


def rows_writable(t: torch.Tensor) -> bool:
    """The compiled ops can write every row of ``t`` in place: dense rows that do not overlap."""
    return t.is_contiguous() or (_rows_dense(t) and _rows_distinct(t))


def _why_not(
    device_type: str,
    mask: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor] = (),
    index_out: Optional[torch.Tensor] = None,
) -> Optional[str]:
    if not _ext.available():
        return dispatch.missing(_ext.why_unavailable())
    if device_type == "cuda" and not _ext.with_cuda():
        return dispatch.missing("the extension eeruntime._C was built without CUDA")
    if mask.device.type != device_type:
        return f"tensors are on {mask.device.type}; the {device_type} backend runs {device_type} tensors"
    for what, ts in (("tensors", inputs), ("outs", outs)):
        for i, t in enumerate(ts):
            if t.layout != torch.strided:
                return f"{what}[{i}] has layout {t.layout}; only dense tensors are supported"
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return "an input requires grad and the extension ops are not differentiable (the torch backend is)"
    for i, o in enumerate(outs):
        if not _rows_dense(o):
            return f"outs[{i}] is not dense within a row (its dims after 0 must be contiguous)"
        if not _rows_distinct(o):
            return f"outs[{i}] has overlapping rows (stride {o.stride(0)} in dim 0)"
    if index_out is not None and index_out.shape[0] > 1 and index_out.stride(0) != 1:
        return "index_out is not contiguous"
    if device_type == "cuda" and mask.shape[0] > _INT32_MAX:
        return f"the CUDA select handles up to {_INT32_MAX} rows, got {mask.shape[0]}"
    return None


def _compact_why_not(device_type):
    def why_not(keep, tensors, *, forced):
        return _why_not(device_type, keep, tensors)

    return why_not


def _compact_into_why_not(device_type):
    def why_not(keep, tensors, outs, index_out, count_out, *, forced):
        return _why_not(device_type, keep, tensors, outs, index_out)

    return why_not


def _compact_inplace_why_not(keep, tensors, *, forced):
    # In place, the tensors are outputs: their rows must be dense and distinct, like compact_into's outs.
    why = _why_not("cpu", keep, tensors, tensors)
    if why is None and _compiled("compact_") is None:
        return dispatch.missing("the extension eeruntime._C was built before compact_ was added; rebuild it")
    if why is None or isinstance(why, dispatch.Missing):
        return why
    return why.replace("outs[", "tensors[")


def _scatter_why_not(device_type):
    def why_not(mask, rows, srcs, outs, *, forced):
        return _why_not(device_type, mask, srcs, outs)

    return why_not


def _compact(keep, tensors):
    index, packed = torch.ops.eeruntime.compact(keep, tensors)
    return index, list(packed)


def _compact_into(keep, tensors, outs, index_out, count_out):
    torch.ops.eeruntime.compact_into(keep, tensors, outs, index_out, count_out)


def _compact_inplace(keep, tensors):
    torch.ops.eeruntime.compact_.default(keep, tensors)


def _scatter_rows(mask, rows, srcs, outs):
    torch.ops.eeruntime.scatter_rows(mask, rows, srcs, outs)


# compact_into's two CUDA paths: "fused" (one kernel: select, index, count and the first tensor's
# copy) up to _C.FUSED_COMPACT_MAX_ROWS rows, "cub" (CUB's select, then a gather per tensor) above.
# The choice is a named constant in C++ (csrc/compact_common.h says why 1 << 16); the override
# below is for tests and the benchmark only, so both paths run on the same batch (the op's schema
# has no path argument, and no environment variable changes it).
_COMPACT_INTO_PATH_LIMITS = {"auto": -1, "fused": _INT32_MAX, "cub": 0}


@contextlib.contextmanager
def _compact_into_path(path: str) -> Iterator[None]:
    """Inside the block, the CUDA ``compact_into`` takes ``path`` ("fused", "cub" or "auto", the
    built-in limit) at every batch size the op accepts; the previous choice comes back after it,
    also on error. Process-wide and read at each call on the host, so a CUDA graph captured inside
    the block replays the path it was captured with. Tests and benchmarks only."""
    if path not in _COMPACT_INTO_PATH_LIMITS:
        raise ValueError(f"unknown compact_into path {path!r}; expected one of {sorted(_COMPACT_INTO_PATH_LIMITS)}")
    setter = getattr(_ext._C, "_set_fused_compact_max_rows", None) if _ext.available() else None
    if setter is None:
        why = _ext.why_unavailable() or "eeruntime._C was built before the fused compact_into path; rebuild it"
        raise RuntimeError(f"cannot choose compact_into's CUDA path: {why}")
    previous = setter(_COMPACT_INTO_PATH_LIMITS[path])
    try:
        yield
    finally:
        setter(previous)


_FIX = {
    "cuda": f"To get the CUDA ops, {_ext.CUDA_BUILD_HINT}",
    "cpp": f"To get the C++ ops, {_ext.BUILD_HINT}",
}

# op -> (the compiled op's caller, its why-not for a device, whether it never syncs with the host)
_ROW_OPS = {
    "compact": (_compact, _compact_why_not, False),  # its output size is the kept count: one sync on CUDA
    "compact_into": (_compact_into, _compact_into_why_not, True),
    "scatter_rows": (_scatter_rows, _scatter_why_not, True),
}


def extension_rows(op: str) -> List[dispatch.Backend]:
    """The extension backend of ``op`` as table rows: its CUDA face ``cuda`` then its CPU face ``cpp``."""
    fn, why_not, sync_free = _ROW_OPS[op]
    return [
        dispatch.Backend("cuda", fn, why_not("cuda"), _FIX["cuda"], capturable=sync_free),
        dispatch.Backend("cpp", fn, why_not("cpu"), _FIX["cpp"]),
    ]


# In-place compaction has a CPU kernel only: on CUDA the runtime packs into the static buffers of
# its captured graphs (compact_into) instead.
COMPACT_INPLACE_CPP = dispatch.Backend("cpp", _compact_inplace, _compact_inplace_why_not, _FIX["cpp"])


if _ext.available():

    @torch.library.register_fake("eeruntime::compact")
    def _compact_fake(keep, tensors):
        B = keep.shape[0]
        # How many rows are kept depends on the mask's values: a fresh data-dependent size.
        n = torch.library.get_ctx().new_dynamic_size(max=B if isinstance(B, int) else None)
        index = keep.new_empty((n,), dtype=torch.int64)
        return index, [t.new_empty((n, *t.shape[1:])) for t in tensors]

    @torch.library.register_fake("eeruntime::compact_into")
    def _compact_into_fake(keep, tensors, outs, index_out, count_out):
        return None

    if _compiled("compact_") is not None:

        @torch.library.register_fake("eeruntime::compact_")
        def _compact_inplace_fake(keep, tensors):
            return None

    @torch.library.register_fake("eeruntime::scatter_rows")
    def _scatter_rows_fake(mask, rows, srcs, outs):
        return None


# ------------------------------------------------------------------------------- exit_decision
# Logits dtypes of the fused CPU kernels (exit_decision, exit_scatter); fp64 logits are rounded
# to fp32 first, as the torch reference's logits.float().
FUSED_LOGITS_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))


# Threshold dtypes the kernels read on the host (csrc/exit_decision_cpu.cpp's read_threshold;
# exit_scatter's threshold_at takes the float ones): others (float8, complex) go to the torch
# backend, which converts a real one and refuses a complex one with a clear error.
_THRESHOLD_DTYPES = frozenset(
    (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16)
    + (torch.int32, torch.int64, torch.bool)
)


def _exit_decision_op():
    return _compiled("exit_decision")


def _logits_kernel_why_not(name: str, lookup, logits) -> Optional[str]:
    """What the fused CPU kernels that read logits (exit_decision, exit_scatter) all need."""
    if not _ext.available():
        return dispatch.missing(_ext.why_unavailable())
    if lookup() is None:
        return dispatch.missing(f"the extension eeruntime._C was built before {name} was added; rebuild it")
    if not logits.is_cpu:
        return f"logits are on {logits.device.type}; the cpp backend runs CPU tensors"
    if logits.dtype not in FUSED_LOGITS_DTYPES:
        return f"the kernel takes float32, float16, bfloat16 or float64 logits, got {logits.dtype}"
    if logits.requires_grad and torch.is_grad_enabled():
        return "logits require grad and the C++ op is not differentiable (the torch backend is)"
    return None


def _exit_decision_why_not(logits, threshold, criterion, return_argmax=False, *, forced):
    why = _logits_kernel_why_not("exit_decision", _exit_decision_op, logits)
    if why is not None:
        return why
    if isinstance(threshold, torch.Tensor):
        if not threshold.is_cpu:
            return f"the threshold tensor is on {threshold.device.type}; the cpp backend reads it on the host"
        if threshold.dtype not in _THRESHOLD_DTYPES:
            return f"the kernel reads a real threshold of a standard dtype, got a {threshold.dtype} tensor"
    return None


def _exit_decision_cpp(logits, threshold, criterion="entropy", return_argmax=False):
    """(conf, exit) or (conf, exit, argmax) from one call of the compiled op.

    A tensor threshold is read inside the op (no ``.item()`` here); a Python number travels by
    value in the op's ``threshold_value`` argument, so no tensor is made for it."""
    op = _exit_decision_op()
    code = CRITERION_CODE.get(criterion)
    if code is None:
        raise ValueError(f"unknown criterion {criterion!r}; accepted: {', '.join(map(repr, CRITERIA))}")
    if isinstance(threshold, torch.Tensor):
        conf, exits, argmax = op(logits, threshold, 0.0, code, return_argmax)
    elif isinstance(threshold, (float, int)) and not isinstance(threshold, bool):
        conf, exits, argmax = op(logits, None, float(threshold), code, return_argmax)
    else:
        raise TypeError(f"threshold must be a float or a one-element tensor, got {type(threshold).__name__}")
    return (conf, exits, argmax) if return_argmax else (conf, exits)


EXIT_DECISION_CPP = dispatch.Backend("cpp", _exit_decision_cpp, _exit_decision_why_not, _FIX["cpp"])

if _exit_decision_op() is not None:

    @torch.library.register_fake("eeruntime::exit_decision")
    def _exit_decision_fake(logits, threshold, threshold_value, criterion, return_argmax):
        B = logits.shape[0]
        return (
            logits.new_empty((B,), dtype=torch.float32),
            logits.new_empty((B,), dtype=torch.bool),
            logits.new_empty((B if return_argmax else 0,), dtype=torch.int64),
        )


# ------------------------------------------------------------------------------- exit_scatter
def exit_scatter_op():
    return _compiled("exit_scatter")


@dataclass(frozen=True)
class CpuLoopOps:
    """The compiled ops of EERuntime's CPU loop, called directly (no dispatch) once per exit:
    ``exit_scatter(logits, thresholds, code, exit, final, rows, out, confidence, exit_index)``,
    ``compact(keep, tensors) -> packed`` and ``compact_(keep, tensors)`` (in place), and for the
    stage step (``rt.run_stage``) ``decide(logits, threshold, code) -> (score, exited)``, the
    ``exit_decision`` op with the threshold by value (a Python float, rounded to float32 in the op
    as the thresholds tensor's entries are)."""

    exit_scatter: Callable
    compact: Callable
    compact_: Callable
    decide: Callable


_loop_ops: Optional[CpuLoopOps] = None


def cpu_loop_ops() -> Optional[CpuLoopOps]:
    """The ops of the runtime's CPU loop, or None when the extension is missing or predates them."""
    global _loop_ops
    if (
        _loop_ops is None
        and exit_scatter_op() is not None
        and _compiled("compact_") is not None
        and _exit_decision_op() is not None
    ):
        compact_op, decide_op = _compiled("compact"), _exit_decision_op()
        _loop_ops = CpuLoopOps(
            exit_scatter_op(),
            lambda keep, ts: compact_op(keep, ts)[1],
            _compiled("compact_"),
            lambda logits, thr, code: decide_op(logits, None, thr, code, False)[:2],
        )
    return _loop_ops


def _exit_scatter_why_not(logits, thresholds, criterion, exit, final, rows, out, confidence, exit_index, *, forced):
    why = _logits_kernel_why_not("exit_scatter", exit_scatter_op, logits)
    if why is not None:
        return why
    for name, t in (
        ("thresholds", thresholds),
        ("rows", rows),
        ("out", out),
        ("confidence", confidence),
        ("exit_index", exit_index),
    ):
        if not t.is_cpu:
            return f"{name} is on {t.device.type}; the cpp backend runs CPU tensors"
    if thresholds.dtype not in FUSED_LOGITS_DTYPES:
        return f"the kernel reads float32, float16, bfloat16 or float64 thresholds, got {thresholds.dtype}"
    if not rows_writable(out):
        return "out must have distinct rows with unit stride along a row"
    return None


def _exit_scatter_cpp(logits, thresholds, criterion, exit, final, rows, out, confidence, exit_index):
    return exit_scatter_op()(
        logits, thresholds, CRITERION_CODE[criterion], exit, final, rows, out, confidence, exit_index
    )


EXIT_SCATTER_CPP = dispatch.Backend("cpp", _exit_scatter_cpp, _exit_scatter_why_not, _FIX["cpp"])

if exit_scatter_op() is not None:

    @torch.library.register_fake("eeruntime::exit_scatter")
    def _exit_scatter_fake(logits, thresholds, criterion, exit, final, rows, out, confidence, exit_index):
        return logits.new_empty((logits.shape[0],), dtype=torch.bool), logits.new_empty((), dtype=torch.int64)

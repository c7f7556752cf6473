"""The compiled ops of ``eeruntime._C`` as backends of ``compact``, ``compact_into`` and
``scatter_rows``: ``cuda`` (CUB stable select + vectorized row gather/scatter) first, then ``cpp``
(CPU), ahead of the ``torch`` references. Also registers the ops' fake kernels, so
``torch.compile`` can trace ``torch.ops.eeruntime.*``.

The ops copy whole rows as bytes (any dtype, any trailing shape). They are not differentiable:
with grad enabled and an input that requires grad, ``auto`` leaves them to the ``torch`` backend.
``compact`` on CUDA syncs once (its output size is the kept count); ``compact_into`` and
``scatter_rows`` never sync and can be captured in a CUDA graph. ``scatter_rows`` converts a source
whose dtype differs from its output first (as the reference's ``.to(out.dtype)``); a masked row
whose destination is out of range raises IndexError on CPU and is skipped on CUDA (checking it
there would need a host sync). Outputs must not overlap their inputs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import _ext
from . import dispatch

_INT32_MAX = 2**31 - 1


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


def _why_not(device_type: str, mask: torch.Tensor, inputs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor] = (),
             index_out: Optional[torch.Tensor] = None) -> Optional[str]:
    if not _ext.available():
        return _ext.why_unavailable()
    if device_type == "cuda" and not _ext.with_cuda():
        return "the extension eeruntime._C was built without CUDA"
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
        if o.shape[0] > 1 and o.stride(0) < math.prod(o.shape[1:]):
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


def _scatter_why_not(device_type):
    def why_not(mask, rows, srcs, outs, *, forced):
        return _why_not(device_type, mask, srcs, outs)

    return why_not


def _compact(keep, tensors):
    index, packed = torch.ops.eeruntime.compact(keep, tensors)
    return index, list(packed)


def _compact_into(keep, tensors, outs, index_out, count_out):
    torch.ops.eeruntime.compact_into(keep, tensors, outs, index_out, count_out)


def _scatter_rows(mask, rows, srcs, outs):
    torch.ops.eeruntime.scatter_rows(mask, rows, srcs, outs)


_FIX = {
    "cuda": f"To get the CUDA ops, {_ext.CUDA_BUILD_HINT}",
    "cpp": f"To get the C++ ops, {_ext.BUILD_HINT}",
}

for _device_type, _priority in (("cuda", 0), ("cpp", 1)):
    _dev = "cuda" if _device_type == "cuda" else "cpu"
    dispatch.register("compact", dispatch.Backend(_device_type, _compact, _compact_why_not(_dev), _FIX[_device_type]),
                      priority=_priority)
    dispatch.register(
        "compact_into",
        dispatch.Backend(_device_type, _compact_into, _compact_into_why_not(_dev), _FIX[_device_type]),
        priority=_priority,
    )
    dispatch.register(
        "scatter_rows", dispatch.Backend(_device_type, _scatter_rows, _scatter_why_not(_dev), _FIX[_device_type]),
        priority=_priority,
    )


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

    @torch.library.register_fake("eeruntime::scatter_rows")
    def _scatter_rows_fake(mask, rows, srcs, outs):
        return None

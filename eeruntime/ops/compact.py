"""Row compaction between stages, and the scatter of exited rows into the output.

``compact`` keeps the rows of ``keep`` (stable order) of several tensors that share dim 0;
``compact_into`` does the same into caller-owned buffers and writes the count into a device
tensor (no host sync: capturable in a CUDA graph); ``compact_`` packs them in place; ``scatter_rows`` writes the rows of ``mask``
of each source tensor to their original rows ``rows[i]`` of the matching output.

Backends in priority order: ``cuda`` and ``cpp`` (the ``eeruntime._C`` extension, when built),
``torch`` (the references below).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..rows_layout import from_rows, row_order, to_rows
from . import dispatch
from ._ext_backend import COMPACT_INPLACE_CPP, extension_rows
from .aliasing import inputs_apart, refuse_overlapping_outputs


def _check_mask(mask: torch.Tensor, name: str) -> int:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(f"{name} must be a 1-D bool tensor, got dtype {mask.dtype} and shape {tuple(mask.shape)}")
    return mask.shape[0]


def _check_rows(tensors: Sequence[torch.Tensor], B: int, device: torch.device, what: str) -> None:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{what} must be a list or tuple of tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] != B:
            raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}; every tensor must have batch size {B} in dim 0")
        if t.device != device:
            raise ValueError(f"{what}[{i}] is on {t.device} but the mask is on {device}")


def _shared_order(t: torch.Tensor, out: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """``row_order(t)`` when ``out``'s rows are dense in that order too (the same layout; a size-1
    dim's stride, which says nothing, may differ), else None."""
    order = row_order(t)
    return order if order is not None and to_rows(out, order).is_contiguous() else None


def compact_ref(keep: torch.Tensor, tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    index = keep.nonzero().squeeze(1)
    return index, [t.index_select(0, index) for t in tensors]


def compact_into_ref(
    keep: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    index_out: torch.Tensor,
    count_out: torch.Tensor,
) -> None:
    index = keep.nonzero().squeeze(1)
    n = index.numel()
    for t, o in zip(tensors, outs):
        o[:n].copy_(t.index_select(0, index))
    index_out[:n].copy_(index)
    count_out.fill_(n)


def compact_inplace_ref(keep: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    index = keep.nonzero().squeeze(1)
    n = index.numel()
    for t in tensors:
        t[:n] = t.index_select(0, index)  # index_select copies first: no row is read after it is overwritten


def scatter_rows_ref(
    mask: torch.Tensor, rows: torch.Tensor, srcs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]
) -> None:
    index = mask.nonzero().squeeze(1)
    dst = rows.index_select(0, index)
    for s, o in zip(srcs, outs):
        o.index_copy_(0, dst, s.index_select(0, index).to(o.dtype))


def _always(*args: Any, forced: bool) -> Optional[str]:
    return None


# The backend tables, tried in this order by ``auto``: the extension (its CUDA face, then its CPU
# face), then the reference. The references call ``nonzero`` (a host sync): not capturable.
dispatch.table("compact", [*extension_rows("compact"), dispatch.Backend("torch", compact_ref, _always)])
dispatch.table("compact_into", [*extension_rows("compact_into"), dispatch.Backend("torch", compact_into_ref, _always)])
dispatch.table("compact_", [COMPACT_INPLACE_CPP, dispatch.Backend("torch", compact_inplace_ref, _always)])
dispatch.table("scatter_rows", [*extension_rows("scatter_rows"), dispatch.Backend("torch", scatter_rows_ref, _always)])


def compact(
    keep: torch.Tensor, tensors: Sequence[torch.Tensor], *, backend: str = "auto"
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Keep the rows where ``keep`` is True, in order.

    Returns ``(index, packed)``: ``index`` int64 [n] the original rows kept, ascending; ``packed``
    the list of ``t[index]`` for each tensor (any trailing shape and dtype; batch in dim 0), each in
    its tensor's memory layout (``channels_last`` stays so: eeruntime/rows_layout.py).
    """
    B = _check_mask(keep, "keep")
    _check_rows(tensors, B, keep.device, "tensors")
    orders = [row_order(t) for t in tensors]
    if not any(orders):  # (all row-major: the common case, with no more Python than it needs)
        return dispatch.select("compact", backend, keep, tensors).fn(keep, list(tensors))
    views = [to_rows(t, o) for t, o in zip(tensors, orders)]
    index, packed = dispatch.select("compact", backend, keep, views).fn(keep, views)
    return index, [from_rows(t, o) for t, o in zip(packed, orders)]


def compact_into(
    keep: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    index_out: torch.Tensor,
    count_out: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """``compact`` into caller-owned buffers: rows ``[:n]`` of each ``outs[i]`` and of ``index_out``
    receive the kept rows and their original indices, and ``count_out`` (int64, one element) gets n.
    Buffers need capacity >= B rows and the same trailing shape and dtype as their source."""
    B = _check_mask(keep, "keep")
    _check_rows(tensors, B, keep.device, "tensors")
    if len(outs) != len(tensors):
        raise ValueError(f"got {len(tensors)} tensors but {len(outs)} output buffers")
    for i, (t, o) in enumerate(zip(tensors, outs)):
        if o.shape[0] < B or o.shape[1:] != t.shape[1:] or o.dtype != t.dtype or o.device != t.device:
            raise ValueError(
                f"outs[{i}] is {tuple(o.shape)} {o.dtype} on {o.device}; it must hold >= {B} rows of "
                f"{tuple(t.shape[1:])} {t.dtype} on {t.device}"
            )
    if index_out.dtype != torch.int64 or index_out.dim() != 1 or index_out.shape[0] < B:
        raise ValueError(f"index_out must be int64 [>= {B}], got {index_out.dtype} {tuple(index_out.shape)}")
    if count_out.dtype != torch.int64 or count_out.numel() != 1:
        raise ValueError(
            f"count_out must be a one-element int64 tensor, got {count_out.dtype} {tuple(count_out.shape)}"
        )
    written = [*outs, index_out, count_out]
    refuse_overlapping_outputs(
        "compact_into",
        [*((f"outs[{i}]", o) for i, o in enumerate(outs)), ("index_out", index_out), ("count_out", count_out)],
    )
    keep, *tensors = inputs_apart([("keep", keep), *(("tensors", t) for t in tensors)], written)
    # a source and its buffer in the same non-contiguous layout (channels_last) are both passed as
    # their contiguous views (eeruntime/rows_layout.py); mixed layouts as they are
    orders = [_shared_order(t, o) for t, o in zip(tensors, outs)]
    tensors = [to_rows(t, o) for t, o in zip(tensors, orders)]
    outs = [to_rows(t, o) for t, o in zip(outs, orders)]
    b = dispatch.select("compact_into", backend, keep, tensors, outs, index_out, count_out)
    b.fn(keep, list(tensors), list(outs), index_out, count_out)


def compact_(keep: torch.Tensor, tensors: Sequence[torch.Tensor], *, backend: str = "auto") -> int:
    """``compact`` in place: rows ``[:n]`` of each tensor become its rows where ``keep`` is True, in
    order; rows from n on are left unspecified. Returns n. The tensors must not share memory
    (with each other, or an element with another: ``ValueError``); no new memory is taken, so the
    runtime uses it for stage outputs that only it holds (see ``eeruntime.ownership``)."""
    B = _check_mask(keep, "keep")
    _check_rows(tensors, B, keep.device, "tensors")
    # Every tensor is written: the same checks as outputs (no element twice, no memory shared with
    # another tensor, whatever storage it came through); the mask is read throughout, so a mask on
    # their memory is copied first (eeruntime/ops/aliasing.py).
    refuse_overlapping_outputs("compact_", [(f"tensors[{i}]", t) for i, t in enumerate(tensors)])
    (keep,) = inputs_apart([("keep", keep)], tensors)
    views = [to_rows(t, row_order(t)) for t in tensors]  # (the same memory, row-major: rows_layout.py)
    dispatch.select("compact_", backend, keep, views).fn(keep, views)
    return int(keep.sum())


def scatter_rows(
    mask: torch.Tensor,
    rows: torch.Tensor,
    srcs: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    *,
    backend: str = "auto",
) -> None:
    """For every i with ``mask[i]``: ``outs[j][rows[i]] = srcs[j][i]`` for each j (in place)."""
    B = _check_mask(mask, "mask")
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.shape != (B,):
        raise ValueError(
            f"rows must be int64 [{B}], got {getattr(rows, 'dtype', type(rows))} {tuple(getattr(rows, 'shape', ()))}"
        )
    _check_rows(srcs, B, mask.device, "srcs")
    if len(outs) != len(srcs):
        raise ValueError(f"got {len(srcs)} sources but {len(outs)} outputs")
    for i, (s, o) in enumerate(zip(srcs, outs)):
        if o.shape[1:] != s.shape[1:] or o.device != s.device:
            raise ValueError(
                f"outs[{i}] {tuple(o.shape)} on {o.device} does not match srcs[{i}] {tuple(s.shape)} on {s.device}"
            )
    refuse_overlapping_outputs("scatter_rows", [(f"outs[{i}]", o) for i, o in enumerate(outs)])
    mask, rows, *srcs = inputs_apart([("mask", mask), ("rows", rows), *(("srcs", s) for s in srcs)], outs)
    b = dispatch.select("scatter_rows", backend, mask, rows, srcs, outs)
    b.fn(mask, rows, list(srcs), list(outs))

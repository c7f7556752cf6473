"""Keeping a batch's memory layout (``torch.channels_last`` and the like) through row operations.

A stage's output may hold each sample's values densely but not in the order of its dims: a
``channels_last`` feature map [N, C, H, W] has strides (H*W*C, 1, W*C, C). Row operations written
for contiguous tensors (``index_select``, the compaction kernels, a new buffer of ``n`` rows) give
back a contiguous, NCHW tensor, so every stage after the first would get its input in the layout
its convolutions do not want: on a GPU cuDNN then converts each input to NHWC and back (a third
of a ResNet-18's time on the H200 in session 15, bench/results/graphs-overhead-*.md), and on a CPU
oneDNN does likewise. So the runtime runs row operations on ``t.permute(0, *order)``, the
contiguous view of the same memory, and permutes the result back: same values, the caller's
layout.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

Order = Optional[Tuple[int, ...]]


def row_order(t: torch.Tensor) -> Order:
    """The order of ``t``'s trailing dims in memory when each row (dim-0 slice) is dense but not
    in dim order, so that ``t.permute(0, *order)`` is contiguous (``channels_last``: (2, 3, 1));
    None when ``t`` is contiguous, or its rows are not dense in any order (then row operations
    treat it as they always did)."""
    if t.dim() < 3 or t.layout != torch.strided or t.is_contiguous():
        return None
    strides = t.stride()
    order = tuple(sorted(range(1, t.dim()), key=lambda d: -strides[d]))  # stable: ties keep dim order
    return order if t.permute(0, *order).is_contiguous() else None


def _inverse(order: Tuple[int, ...]) -> Tuple[int, ...]:
    full = (0, *order)
    inv = [0] * len(full)
    for i, d in enumerate(full):
        inv[d] = i
    return tuple(inv)


def to_rows(t: torch.Tensor, order: Order) -> torch.Tensor:
    """``t`` as its contiguous view (rows row-major), for ``order = row_order(t)``."""
    return t if order is None else t.permute(0, *order)


def from_rows(t: torch.Tensor, order: Order) -> torch.Tensor:
    """A tensor made in ``to_rows`` order, viewed back in the original dim order (and layout)."""
    return t if order is None else t.permute(*_inverse(order))


def keep_layouts(fn: Callable[[List[torch.Tensor]], Sequence[torch.Tensor]], tensors: Sequence[torch.Tensor]):
    """``fn`` (new tensors from row-major tensors, one per input) on ``tensors``, each result in its
    input's layout."""
    orders = [row_order(t) for t in tensors]
    if not any(orders):
        return list(fn(list(tensors)))
    out = fn([to_rows(t, o) for t, o in zip(tensors, orders)])
    return [from_rows(r, o) for r, o in zip(out, orders)]


def new_rows(like: torch.Tensor, n: int) -> torch.Tensor:
    """Zeros for ``n`` rows of ``like``'s per-row shape, dtype, device and layout."""
    order = row_order(like)
    shape = like.shape[1:] if order is None else [like.shape[d] for d in order]
    return from_rows(torch.zeros((n, *shape), dtype=like.dtype, device=like.device), order)

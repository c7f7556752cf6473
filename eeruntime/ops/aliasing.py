"""Which tensors may share memory: the checks the ops run before they write anything.

An op that writes outputs while it reads inputs gives wrong rows when an output lies on an
input's memory (a row is overwritten before it is read), and an output written twice through two
tensors (or twice through one tensor whose rows overlap) has no defined value. The rule the ops
follow (docs: README "Guarantees"):

- an input that overlaps an output is copied first, so the op reads the values the input had
  when it was called (the result is the one of the ``*_ref`` on separate memory);
- outputs that overlap each other, or an output whose elements overlap, are refused with a
  ``ValueError`` naming them: there is no right answer to give.

Overlap is judged on the memory a tensor spans, whatever storage object it came through: two
``torch.from_numpy`` of one array, ``from_dlpack`` and ``frombuffer`` have distinct storages over
the same bytes. Spans are conservative: two tensors interleaved in one buffer (``buf[:, :4]`` and
``buf[:, 4:]``) count as overlapping.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch

Named = Tuple[str, torch.Tensor]


def span(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(first byte, one past the last byte)`` that ``t`` reads or writes; None when it has no
    element (or no plain memory: sparse, meta)."""
    if t.numel() == 0 or t.layout != torch.strided or t.device.type == "meta":
        return None
    # torch strides are never negative (as_strided refuses them), so the first element is the lowest.
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size()


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` (same device) span common bytes."""
    if a.device != b.device:
        return False
    sa, sb = span(a), span(b)
    return sa is not None and sb is not None and max(sa[0], sb[0]) < min(sa[1], sb[1])


def self_overlapping(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` may be one memory location (a stride of 0, ``expand``,
    ``as_strided`` with rows that overlap). Exact for every layout torch's views make; a layout
    it cannot prove disjoint counts as overlapping."""
    dims = sorted((st, size) for size, st in zip(t.shape, t.stride()) if size > 1)
    if t.numel() <= 1:
        return False
    reach = 0  # the largest offset the dims seen so far reach
    for stride, size in dims:
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def refuse_overlapping_outputs(op: str, outputs: Sequence[Named]) -> None:
    """Raise ``ValueError`` when an output overlaps itself or another output."""
    for i, (name, t) in enumerate(outputs):
        if self_overlapping(t):
            raise ValueError(
                f"{op}: {name} has elements that share memory (strides {tuple(t.stride())} for shape "
                f"{tuple(t.shape)}); an output must have one memory location per element, e.g. a fresh "
                f"torch.empty or a .contiguous() copy"
            )
        for other, u in outputs[:i]:
            if overlap(t, u):
                raise ValueError(
                    f"{op}: {name} and {other} share memory; outputs must not overlap each other (give each "
                    "its own tensor)"
                )


def inputs_apart(inputs: Sequence[Named], outputs: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """The inputs, each one that overlaps an output replaced by a copy: the op then reads what the
    input held when it was called, as the reference on separate memory does."""
    outs = [o for o in outputs if span(o) is not None]
    return [t.clone() if any(overlap(t, o) for o in outs) else t for _, t in inputs]

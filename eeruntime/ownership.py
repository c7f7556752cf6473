"""When may the runtime overwrite a stage's output in place?

Only when nothing but the runtime can see it: the tensor is not a view, its storage belongs to it
alone (no view of it, no other tensor on the same memory: not the input, not a weight), and the
only Python references to it are the runtime's own. A module that keeps its output (a cache, a
forward hook that stores it) or returns its input, a weight, or a view of either fails the test,
and the runtime packs such a state into new memory instead.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _refcounts(parts: Sequence[torch.Tensor]):
    return [sys.getrefcount(t) for t in parts]


def _storage_refs(t: torch.Tensor) -> int:
    storage = t.untyped_storage()  # this Python object holds one reference of its own
    return _storage_use_count(storage._cdata) - 1


# What _refcounts reports for a tensor held by nothing but one tuple: measured, not assumed, since
# the count a frame adds differs between Python versions.
_ONLY_IN_TUPLE = _refcounts((torch.empty(1),))[0]


def sole_owner(parts: Sequence[torch.Tensor], named: int = 0) -> bool:
    """True when each tensor of the tuple ``parts`` is held by that tuple and by ``named`` other
    references the caller knows of (a local variable bound to the same tensor), and by nothing else."""
    if _storage_use_count is None or not isinstance(parts, tuple):
        return False
    for t, refs in zip(parts, _refcounts(parts)):
        # Cheapest first: the loop runs between every two stages.
        if refs != _ONLY_IN_TUPLE + named or type(t) is not torch.Tensor or t._base is not None:
            return False
        if t._use_count() != 1 or _storage_refs(t) != 1 or t.layout != torch.strided:
            return False
    return True

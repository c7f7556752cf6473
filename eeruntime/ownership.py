"""When may the runtime overwrite a stage's output in place?

The rule (README "Guarantees"): the runtime writes in place only memory that nothing but the
runtime can reach; anything else is packed into new memory. A stage's output qualifies only when
every way to reach its bytes is accounted for:

- the state tuple itself: held by the runtime's own names only (a forward hook or a stage that
  keeps ``self.last = (h, m)`` and returns it holds the very same tuple);
- each tensor: a plain ``torch.Tensor`` (not a Parameter or a subclass), not a view, held by the
  tuple and the runtime's names only, no weak reference to it, no other C++ owner of its
  TensorImpl (``from_dlpack`` of it keeps one);
- its storage: used by this tensor alone (no view, no second tensor on it), no Python object of it
  kept anywhere (``y.untyped_storage()`` stored by a stage), allocated by torch's allocator
  (``resizable``: ``from_numpy``, ``from_dlpack``, ``frombuffer`` and ``from_file`` wrap memory
  torch does not own and are not resizable) and not shared with other processes;
- the tensors of the tuple do not overlap each other.

A stage's fresh output (``torch.relu(x)``, a matmul, a ``Sequential``'s last result) passes; any
doubt fails and the runtime copies, which is always correct.
"""

from __future__ import annotations

import sys
import weakref
from typing import Callable, Optional, Sequence, cast

import torch

from .ops.aliasing import overlap

_storage_use_count = cast(Optional[Callable[[int], int]], getattr(torch._C, "_storage_Use_Count", None))


def _tuple_refs(parts) -> int:
    return sys.getrefcount(parts)


def _tensor_refs(parts: Sequence[torch.Tensor]):
    return [sys.getrefcount(t) for t in parts]


def _storage_counts(t: torch.Tensor):
    """(C++ owners of the storage, Python references to its Python object), each counting the one
    this call makes: the storage's Python object is cached on the storage, so a kept
    ``y.untyped_storage()`` shows in the second count, not the first."""
    storage = t.untyped_storage()
    use_count = cast(Callable[[int], int], _storage_use_count)  # callers return before when it is None
    return use_count(storage._cdata), sys.getrefcount(storage)


def _baseline():
    """The counts of a tensor that nothing but one tuple holds, bound to one local name: measured,
    not assumed, since what a frame adds differs between Python and torch versions."""
    parts = (torch.empty(2),)
    return _measure(parts)


def _measure(parts):
    # The same call depth as sole_owner -> its helpers, so both count the same frame references.
    return _tuple_refs(parts), _tensor_refs(parts)[0], _storage_counts(parts[0])


_ONE_NAME_TUPLE, _ONLY_IN_TUPLE, _ALONE_STORAGE = _baseline() if _storage_use_count is not None else (0, 0, (0, 0))


def sole_owner(parts: Sequence[torch.Tensor], named: int = 0, tuple_names: int = 1) -> bool:
    """True when nothing but the runtime can reach the memory of the tensors in the tuple ``parts``.

    ``named``: how many local names of the caller are bound to each tensor besides the tuple;
    ``tuple_names``: how many local names of the caller are bound to the tuple itself."""
    if _storage_use_count is None or not isinstance(parts, tuple):
        return False
    # Cheapest first: the loop runs between every two stages.
    if _tuple_refs(parts) != _ONE_NAME_TUPLE + tuple_names - 1:
        return False
    for t, refs in zip(parts, _tensor_refs(parts)):
        if refs != _ONLY_IN_TUPLE + named or type(t) is not torch.Tensor or t._base is not None:
            return False
        owners = t._use_count()  # type: ignore[attr-defined]  # private: owners of the TensorImpl
        if t.layout != torch.strided or owners != 1 or weakref.getweakrefcount(t):
            return False
        if _storage_counts(t) != _ALONE_STORAGE:
            return False
        storage = t.untyped_storage()
        if not storage.resizable() or storage.is_shared():
            return False
    if len(parts) > 1:
        for i, t in enumerate(parts):
            if any(overlap(t, u) for u in parts[:i]):
                return False
    return True

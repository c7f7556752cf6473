"""A stage's state: one tensor, or a tuple of tensors sharing batch dimension 0 (e.g. hidden
states and an attention mask). Stages and exits are called with the state unpacked."""
from __future__ import annotations

from typing import Tuple, Union

import torch

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def as_tuple(state: State) -> Tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def from_tuple(parts, like: State) -> State:
    return tuple(parts) if isinstance(like, tuple) else parts[0]


def call(module, state: State):
    """Run ``module`` on a state: ``module(*state)`` for a tuple, ``module(state)`` for a tensor."""
    return module(*state) if isinstance(state, tuple) else module(state)


def check_state(state, where: str) -> int:
    """Validate a state and return its batch size."""
    if isinstance(state, list):
        state = tuple(state)
    parts = as_tuple(state)
    if len(parts) == 0:
        raise TypeError(f"{where}: a state must be a tensor or a non-empty tuple of tensors, got an empty tuple")
    for i, t in enumerate(parts):
        if not isinstance(t, torch.Tensor):
            kind = type(t).__name__
            raise TypeError(
                f"{where}: a state must be a torch.Tensor or a tuple of tensors sharing batch dim 0; "
                f"got {kind}" + (f" at position {i}" if isinstance(state, tuple) else "")
            )
        if t.dim() == 0:
            raise ValueError(f"{where}: tensors need a batch dimension (dim 0); got a 0-dim tensor")
    B = parts[0].shape[0]
    for i, t in enumerate(parts[1:], 1):
        if t.shape[0] != B:
            raise ValueError(f"{where}: tuple members must share batch dim 0; member 0 has {B} rows, member {i} has {t.shape[0]}")
    return B


def cat_rows(states):
    """Concatenate states (or carries) along dim 0, member-wise: tensors into a tensor, tuples of
    tensors into a tuple (every one with the same number of members, possibly none)."""
    states = list(states)
    if not states:
        raise ValueError("cat_rows needs at least one state")
    first = states[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(s, torch.Tensor) for s in states):
            raise TypeError("cat_rows: mix of tensors and tuples; give states of one kind")
        return torch.cat(states, 0)
    if not all(isinstance(s, (tuple, list)) and len(s) == len(first) for s in states):
        raise TypeError(f"cat_rows: every state must be a tensor, or a tuple of {len(first)} tensors like the first")
    return tuple(torch.cat([s[i] for s in states], 0) for i in range(len(first)))


def take_rows(state, index: torch.Tensor):
    """Rows ``index`` (int64 [m]) of a state (or carry), member-wise (``index_select`` on dim 0)."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index.to(state.device))
    return tuple(t.index_select(0, index.to(t.device)) for t in state)

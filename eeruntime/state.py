"""A stage's state: one tensor, or a tuple of tensors sharing batch dimension 0 (e.g. hidden
states and an attention mask). Stages and exits are called with the state unpacked."""

from __future__ import annotations

from typing import Tuple, Union

import torch

from .rows_layout import from_rows, row_order, to_rows

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's short name, as messages, bundles and the Ray wire spell it: "float32" for
    ``torch.float32`` (torch's own ``str`` is "torch.float32")."""
    return str(dtype).replace("torch.", "")


def as_tuple(state: State) -> Tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def from_tuple(parts, like: State) -> State:
    return tuple(parts) if isinstance(like, tuple) else parts[0]


def call(module, state: State):
    """Run ``module`` on a state: ``module(*state)`` for a tuple, ``module(state)`` for a tensor."""
    return module(*state) if isinstance(state, tuple) else module(state)


def stage_forward(stage, state) -> State:
    """Run one stage on a state; its output as a state (a list becomes a tuple). Every walk over
    a model's stages goes through here (runtime, graphs, oracle, cost, training, calibration,
    attach, the model's own forward), so they all agree on what a stage returns."""
    out = call(stage, state)
    return tuple(out) if isinstance(out, list) else out


ACCEPTED_STATE = (
    "a torch.Tensor with the batch in dim 0, or a tuple (or list) of tensors sharing batch dim 0 "
    "(e.g. hidden states and an attention mask)"
)


def _member_error(where: str, t, i, in_tuple: bool) -> str:
    kind = "None" if t is None else f"a {type(t).__name__}"
    at = f" at position {i} of the tuple" if in_tuple else ""
    return f"{where}: got {kind}{at}; a state must be {ACCEPTED_STATE}"


def check_state(state, where: str) -> int:
    """Validate a state and return its batch size; the error says what was wrong, where, and what
    a state may be."""
    if isinstance(state, list):
        state = tuple(state)
    if isinstance(state, dict):
        raise TypeError(
            f"{where}: got a dict (keys {sorted(map(str, state))[:6]}); a state must be {ACCEPTED_STATE}. For a "
            "model that takes keyword inputs, pass them as a tuple in the order of the first stage's forward"
        )
    parts = as_tuple(state)
    if len(parts) == 0:
        raise TypeError(f"{where}: got an empty tuple; a state must be {ACCEPTED_STATE}")
    for i, t in enumerate(parts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(_member_error(where, t, i, isinstance(state, tuple)))
        if t.dim() == 0:
            raise ValueError(f"{where}: member {i} is a 0-dim tensor; tensors need a batch dimension (dim 0)")
        if t.device.type == "meta":
            raise ValueError(
                f"{where}: member {i} is a meta tensor (a shape without data); the runtime computes on real "
                "tensors: create the input on the model's device (cpu or cuda)"
            )
    B = parts[0].shape[0]
    for i, t in enumerate(parts[1:], 1):
        if t.shape[0] != B:
            raise ValueError(
                f"{where}: tuple members must share batch dim 0; member 0 has {B} rows, member {i} has {t.shape[0]}"
            )
    return B


def check_stage_output(state, k: int, n: int) -> None:
    """Refuse what stage ``k`` returned for ``n`` rows unless it is a state of ``n`` rows (the
    runtime packs every member row-wise, so each must be a tensor with the batch in dim 0)."""
    if type(state) is torch.Tensor and state.dim() > 0 and state.shape[0] == n and state.device.type != "meta":
        return  # the common case, checked at the cost of a few attribute reads
    got = check_state(state, f"stage {k} returned a state the runtime cannot pack")
    if got != n:
        raise ValueError(f"stage {k} returned {got} rows for a batch of {n}; a stage must keep one row per sample")


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
    """Rows ``index`` (int64 [m]) of a state (or carry), member-wise (``index_select`` on dim 0),
    each in its member's memory layout (eeruntime/rows_layout.py)."""
    if isinstance(state, torch.Tensor):
        return _take(state, index)
    return tuple(_take(t, index) for t in state)


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    order = row_order(t)
    return from_rows(to_rows(t, order).index_select(0, index.to(t.device)), order)

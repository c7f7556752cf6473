"""The stage step, the public seam (``EERuntime.run_stage``): run stage k on given rows and say
who leaves, with the survivors packed for stage k + 1 (see docs/design.md, "The executor seam").

The carry is what a row needs across stages besides its state: the running float32 sum of its
exits' logits (``final="average"``, from stage 1 on), then the logits of its earlier exits (a
criterion with ``uses_history``). It is row-aligned with the rows, so callers select and join it
like the state (:func:`eeruntime.state.take_rows`, :func:`eeruntime.state.cat_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .. import ops
from ..state import State, as_tuple, from_tuple
from ..thresholds import ThresholdSnapshot
from .spec import RunSpec


@dataclass
class StageResult:
    """What one stage step gives back.

    ``exit_rows`` int64 [E]: the ids (from the step's ``rows``) of the rows that left at exit
    ``k``, in order; ``logits`` [E, C] and ``confidence`` float32 [E]: theirs. ``rows`` int64
    [n - E]: the survivors' ids, in order; ``state``: their packed state for stage k + 1 (None
    at the final stage or when none survive); ``carry``: their carry (a tuple row-aligned with
    ``rows``) for the next step."""

    k: int
    exit_rows: torch.Tensor
    logits: torch.Tensor
    confidence: torch.Tensor
    rows: torch.Tensor
    state: Optional[State]
    carry: Tuple[torch.Tensor, ...]


def carry_size(spec: RunSpec, k: int) -> int:
    """How many tensors the carry into stage ``k`` holds."""
    return int(spec.average and k > 0) + (k if spec.scorer.uses_history else 0)


def check_carry(spec: RunSpec, k: int, carry: Optional[Sequence[torch.Tensor]], n: int) -> Tuple[torch.Tensor, ...]:
    want = carry_size(spec, k)
    carry = () if carry is None else tuple(carry) if isinstance(carry, (tuple, list)) else carry
    if (
        not isinstance(carry, tuple)
        or len(carry) != want
        or not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == n for t in carry)
    ):
        got = (
            [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in carry]
            if isinstance(carry, tuple)
            else type(carry).__name__
        )
        raise ValueError(
            f"carry for stage {k} must be a tuple of {want} [{n}, C] tensors (the carry the step of stage "
            f"{k - 1} returned, rows selected like the state), got {got}"
        )
    return carry


def stage_step(
    spec: RunSpec,
    k: int,
    state: State,
    rows: torch.Tensor,
    carry: Tuple[torch.Tensor, ...],
    thresholds: ThresholdSnapshot,
) -> StageResult:
    """One step on checked inputs (see ``EERuntime.run_stage``); ``thresholds`` a snapshot."""
    K = spec.num_exits
    n = rows.shape[0]
    state, logits, _ = spec.forward(k, state, n)
    final = k == K - 1
    acc = carry[0] if spec.average and k > 0 else None
    history = list(carry[1 if acc is not None else 0 :])
    if spec.average:
        acc = logits.float() if acc is None else acc + logits.float()
        if final:
            logits = (acc / K).to(logits.dtype)
    if final:
        return StageResult(k, rows, logits, spec.scorer.score(logits, state, k, history), rows[:0], None, ())
    score, exited = spec.scorer.decide(logits, state, k, history, thresholds.tensor(logits.device))
    index, (exit_logits, exit_score) = ops.compact(exited, [logits, score], backend=spec.compact_backend)
    exit_rows = rows.index_select(0, index.to(rows.device))
    n_exit = exit_rows.shape[0]
    if n_exit == n:
        return StageResult(k, exit_rows, exit_logits, exit_score, rows[:0], None, ())
    parts = as_tuple(state)
    carried = [*parts, *([acc] if acc is not None else []), *history]
    if spec.scorer.uses_history:
        carried.append(logits)
    if n_exit:
        index, carried = ops.compact(~exited, carried, backend=spec.compact_backend)
        rows = rows.index_select(0, index.to(rows.device))
    return StageResult(
        k,
        exit_rows,
        exit_logits,
        exit_score,
        rows,
        from_tuple(carried[: len(parts)], state),
        tuple(carried[len(parts) :]),
    )

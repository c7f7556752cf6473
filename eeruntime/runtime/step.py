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
from ..ops._ext_backend import FUSED_LOGITS_DTYPES, CpuLoopOps
from ..rows_layout import keep_layouts
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
    loop_ops: Optional[CpuLoopOps] = None,
) -> StageResult:
    """One step on checked inputs (see ``EERuntime.run_stage``); ``thresholds`` a snapshot.

    ``loop_ops`` (on the CPU, from :func:`~eeruntime.runtime.executors.cpu_loop_ops_for`): decide
    and pack with the compiled ops called directly, as the fused CPU pass does, instead of through
    the ops' dispatch (``ops.exit_decision`` and two ``ops.compact``, each choosing its backend
    and checking its inputs in Python, and two ``index_select`` for the ids). The same kernels
    decide, so the answer is the same; on the 2-core VM this cut a step's cost beyond its stage's
    forward by about half (docs/serving.md, "Session 19"). None: the dispatched ops, any device."""
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
    # the compiled ops, called directly, when they take these logits and ids (else the dispatched
    # ops); the same kernels the fused pass decides with, so a step answers as rt.infer does
    fast = (
        loop_ops
        if loop_ops is not None and logits.dtype in FUSED_LOGITS_DTYPES and logits.is_cpu and rows.is_cpu and n
        else None
    )
    if final:
        # every row leaves, scored (the threshold is not read)
        if fast is not None:
            score = fast.decide(logits, 0.0, spec.scorer.code)[0]
        else:
            score = spec.scorer.score(logits, state, k, history)
        return StageResult(k, rows, logits, score, rows[:0], None, ())
    if fast is not None:
        score, exited = fast.decide(logits, thresholds[k], spec.scorer.code)
        # the leavers' ids travel with their outputs: one call, no index_select
        exit_logits, exit_score, exit_rows = fast.compact(exited, [logits, score, rows])
    else:
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
        if fast is not None and all(t.layout == torch.strided for t in carried):
            keep, pack = ~exited, fast.compact
            # each part packed in its own memory layout (channels_last stays so), ids alongside
            carried = keep_layouts(lambda ts: pack(keep, ts), [*carried, rows])
            rows = carried.pop()
        else:
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

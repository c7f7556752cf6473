"""PABEE's patience rule (Zhou et al., NeurIPS 2020), decided per row.

The score of a row at exit k is its *patience counter*: how many times in a row its prediction
(the argmax of the exit's logits) stayed unchanged up to exit k,

    cnt_0 = 0,   cnt_k = cnt_{k-1} + 1 if argmax z_k == argmax z_{k-1} else 0,

and the row leaves at the first early exit where cnt_k >= P (the threshold): its prediction held
for P consecutive exits after the first one that made it. With K exits the useful thresholds are
1 .. K-1; threshold 0 takes every row at exit 0.

Per row is the point. HF's PABEE (``examples/research_projects/bert-loses-patience``) keeps one
counter for the whole batch, incremented only when *every* row keeps its prediction, so one
undecided row holds the whole batch to the last layer; :func:`whole_batch_patience` reproduces
that rule for comparison. Here each row carries its own history: the runtime packs the earlier
exits' logits with the survivors (``uses_history``), so a row's counter survives compaction.

A row whose logits at exit k hold a NaN has no prediction there: its score is NaN (never exits
early, like a NaN score of any criterion) and it breaks the streak of the later exits.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from ..criteria import register_model_criterion

__all__ = ["Patience", "patience", "patience_scores_ref", "whole_batch_patience"]


def _predictions(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row, -1 where the row holds a NaN (no prediction)."""
    pred = logits.argmax(dim=1)
    return pred.masked_fill(torch.isnan(logits).any(dim=1), -1)


class Patience:
    """Per-exit scorer ``f(logits, state, k, history) -> [B]`` giving each row's PABEE patience
    counter at exit ``k`` (float32); use the patience P as the threshold (one float for every
    early exit, or one per exit). ``history`` holds the same rows' logits at exits 0..k-1."""

    per_exit = True
    uses_history = True

    def __init__(self):
        self.__qualname__ = "patience"

    def __call__(self, logits: torch.Tensor, state, k: int, history: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        if len(history) != k:
            raise ValueError(f"patience at exit {k} needs the logits of the {k} earlier exits, got {len(history)}")
        pred = _predictions(logits)
        count = torch.zeros(pred.shape, dtype=torch.float32, device=logits.device)
        streak = pred >= 0
        # Walk back from exit k-1: the streak holds while each earlier prediction equals this one
        # (all members of a streak are equal, so comparing with pred_k is comparing neighbours).
        for h in reversed(list(history)):
            streak = streak & (_predictions(h) == pred)
            count += streak
        return count.masked_fill(pred < 0, float("nan"))

    def __repr__(self) -> str:
        return "Patience()"


@register_model_criterion
def patience(model=None) -> Patience:
    """The criterion ``ee.load`` rebuilds for a runtime saved with ``Patience()`` (by its name,
    ``"patience"``); it reads nothing from the model."""
    return Patience()


def patience_scores_ref(exit_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reference: the [N, K] counters of every row at every exit, by the recurrence of the module
    docstring, one row and one exit at a time in plain Python (the test oracle)."""
    K = len(exit_logits)
    N = exit_logits[0].shape[0]
    out = torch.empty(N, K, dtype=torch.float32)
    for i in range(N):
        cnt, prev = 0, None
        for k in range(K):
            row = exit_logits[k][i].double()
            if bool(torch.isnan(row).any()):
                out[i, k], prev, cnt = float("nan"), None, 0
                continue
            p = int(row.argmax())
            cnt = cnt + 1 if prev is not None and p == prev else 0
            out[i, k], prev = cnt, p
    return out


@torch.inference_mode()
def whole_batch_patience(model, x, patience: int) -> Tuple[torch.Tensor, int]:
    """HF's PABEE inference rule, for comparison: one counter for the whole batch, incremented
    when every row keeps its prediction and reset otherwise; the batch stops at the first exit
    where it reaches ``patience`` (or at the last exit) and every row gets that exit's logits.
    Returns ``(logits [B, C], exit index)``."""
    from ..state import call, stage_forward

    state, prev, count = x, None, 0
    K = len(model.stages)
    for k in range(K):
        state = stage_forward(model.stages[k], state)
        logits = call(model.exits[k], state)
        pred = logits.argmax(dim=1)
        count = count + 1 if prev is not None and bool((pred == prev).all()) else 0
        prev = pred
        if count >= patience or k == K - 1:
            return logits, k
    raise AssertionError("unreachable")

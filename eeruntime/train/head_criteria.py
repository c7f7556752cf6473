"""Learned exit criteria as the runtime's *per-exit scorers* (see :mod:`eeruntime.criteria`).

A per-exit scorer is called as ``f(logits, state, k, history) -> [B]`` and a sample leaves early
exit k when the score >= threshold. Both scorers here read a one-unit head of exit k on the same
state the exit head got; the head reuses the features it just computed (see
:class:`~eeruntime.heads.ExitHead`). At the final exit there is no gate or confidence head: the
score is 1 (the final exit always takes the sample, h_{B+1} = 1 in the differentiable-branching
paper). The scorers hold references to the model's modules, not copies, so they run on the
model's device and see its current weights; the weights themselves are saved with the model.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Union

import torch
from torch import nn

from ..criteria import register_model_criterion
from ..heads import ExitHead
from ..state import as_tuple


class HeadScorer:
    """Per-exit scorer: ``fns[k](*state)`` -> [B] in (0, 1) for early exit k, 1 at the final exit."""

    per_exit = True
    uses_history = False

    def __init__(self, fns: Sequence[Callable], name: str):
        self.fns: List[Callable] = list(fns)
        self.__qualname__ = name
        # An ExitHead's confidence / gate reuse the features behind the logits forward returned.
        self._takes_logits = [
            isinstance(getattr(f, "__self__", None), ExitHead) and getattr(f, "__name__", "") in ("confidence", "gate")
            for f in self.fns
        ]

    def __call__(self, logits: torch.Tensor, state, k: int, history=()) -> torch.Tensor:
        if k >= len(self.fns):
            return torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
        if self._takes_logits[k]:
            s = self.fns[k](*as_tuple(state), logits=logits)
        else:
            s = self.fns[k](*as_tuple(state))
        return s.reshape(logits.shape[0]).float()

    def __repr__(self) -> str:
        return f"{self.__qualname__}({len(self.fns)} early exits)"


def _early_heads(model, what: str) -> List[ExitHead]:
    if not (hasattr(model, "stages") and hasattr(model, "exits")):
        raise TypeError(f"expected a MultiExitModel, got {type(model).__name__}")
    heads = list(model.exits)[:-1]
    attr = "confidence_head" if what == "confidence" else "gate_head"
    lacking = [k for k, h in enumerate(heads) if not isinstance(h, ExitHead) or getattr(h, attr) is None]
    if lacking:
        how = (
            "train them with ee.train.post_train(..., confidence=True) or build with attach_exits(..., confidence=True)"
            if what == "confidence"
            else "train them with ee.train.differentiable(...) or build with attach_exits(..., gates=True)"
        )
        raise ValueError(f"early exit(s) {lacking} have no {what} head; {how}")
    return heads


@register_model_criterion
def confidence_criterion(model) -> HeadScorer:
    """PTEE: score at early exit k = the sigmoid confidence of exit k's confidence head."""
    return HeadScorer([h.confidence for h in _early_heads(model, "confidence")], "confidence_criterion")


@register_model_criterion
def gate_criterion(model_or_gates: Union[nn.Module, Sequence[Callable]]) -> HeadScorer:
    """Differentiable branching: score at early exit k = g_k(state); exit when g_k >= T (use
    threshold 0.5 for the paper's hard decision). Give the model (gates in its exit heads) or a
    sequence of K-1 gate callables ``g(*state) -> [B]`` (or [B, 1]) in (0, 1)."""
    if hasattr(model_or_gates, "stages") and hasattr(model_or_gates, "exits"):
        return HeadScorer([h.gate for h in _early_heads(model_or_gates, "gate")], "gate_criterion")
    try:
        gates = list(model_or_gates)
    except TypeError:
        raise TypeError(
            f"gate_criterion needs a MultiExitModel or a sequence of gate modules, got {type(model_or_gates).__name__}"
        ) from None
    if not gates or not all(callable(g) for g in gates):
        raise TypeError("gate_criterion needs a non-empty sequence of callables g(*state) -> [B]")
    return HeadScorer(gates, "gate_criterion")

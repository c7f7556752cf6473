"""Scoring: a criterion's score per row and the exit decision, written once for the runtime,
the stage step, the graph executor and calibration (see docs/design.md, "Exit semantics").

A :class:`Scorer` binds a criterion (a name of ``CRITERIA`` or a callable) to the op backend
that computes named criteria. ``score`` is the per-row float32 score; ``decide`` also compares it
with the threshold of an early exit, read from a float32 [K-1] tensor on the logits' device.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import ops
from .criteria import CRITERION_CODE, Criterion, check_criterion, criterion_name, is_per_exit, uses_history
from .ops.exit_decision import confidence_ref, exits_from_scores


class Scorer:
    """``criterion`` with its decision backend (``"auto"`` or a backend of ``ee.ops.exit_decision``)."""

    __slots__ = ("criterion", "backend", "code", "uses_history")

    def __init__(self, criterion: Criterion, backend: str = "auto"):
        self.criterion = check_criterion(criterion)
        self.backend = backend
        # The integer the compiled kernels take for a named criterion; None for a callable.
        self.code: Optional[int] = CRITERION_CODE.get(self.criterion) if isinstance(self.criterion, str) else None
        self.uses_history = uses_history(self.criterion)

    def score(self, logits: torch.Tensor, state, k: int, history: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The criterion's float32 score per row of ``logits`` at exit ``k``."""
        crit = self.criterion
        if callable(crit):
            s = crit(logits, state, k, list(history)) if is_per_exit(crit) else crit(logits, state)
            if isinstance(s, torch.Tensor) and s.device.type == "meta":
                raise ValueError(
                    f"criterion {criterion_name(crit)} returned a meta tensor (no values) at exit {k}; "
                    f"it must return a [B] tensor of scores on the logits' device ({logits.device})"
                )
            if not isinstance(s, torch.Tensor) or s.shape != (logits.shape[0],):
                raise ValueError(
                    f"criterion {criterion_name(crit)} must return a [B] tensor, got "
                    f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}"
                )
            return s.float()
        if logits.shape[0] == 0:
            return confidence_ref(logits, crit)
        return ops.exit_decision(logits, 0.0, crit, backend=self.backend)[0]

    def score_at(self, logits: torch.Tensor, state, k: int, zero: torch.Tensor) -> torch.Tensor:
        """:meth:`score` with a device threshold tensor ``zero`` for the named criteria: the float
        form makes a new device tensor (a host copy), which a captured graph cannot hold."""
        if callable(self.criterion):
            return self.score(logits, state, k, ())
        return ops.exit_decision(logits, zero, self.criterion, backend=self.backend)[0]

    def decide(self, logits: torch.Tensor, state, k: int, history: Sequence[torch.Tensor], thresholds: torch.Tensor):
        """``(score, exited)`` at early exit ``k``: exited when the score passes ``thresholds[k]``."""
        thr = thresholds[k]
        if callable(self.criterion):
            s = self.score(logits, state, k, history)
            return s, exits_from_scores(s, thr, self.criterion)
        return ops.exit_decision(logits, thr, self.criterion, backend=self.backend)

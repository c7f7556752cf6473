"""What an executor needs to run a model with early exits, and nothing more of ``EERuntime``:
the model, the scorer (criterion and decision backend), the final mode and the pack backend."""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..compiled import CompiledModel
from ..criteria import FINAL_MODES
from ..model import StagedModel
from ..scoring import Scorer
from ..state import State, call, check_stage_output, stage_forward


class RunSpec:
    """``model`` (stages and exits), ``scorer``, ``final`` (``"last"`` / ``"average"``),
    ``compact_backend`` (the ops backend that packs and scatters rows; ``"auto"`` by default) and
    ``compile`` (``torch.compile`` options for each stage and head, None: run them as they are)."""

    def __init__(
        self,
        model: StagedModel,
        scorer: Scorer,
        final: str = "last",
        compact_backend: str = "auto",
        compile: Optional[Dict[str, Any]] = None,
    ) -> None:
        if final not in FINAL_MODES:
            raise ValueError(f"unknown final mode {final!r}; accepted: {', '.join(map(repr, FINAL_MODES))}")
        self.model = model
        self.scorer = scorer
        self.final = final
        self.average = final == "average"
        self.compact_backend = compact_backend
        self.num_exits = len(model.stages)
        self.compile = compile
        self._compiled: Optional[CompiledModel] = None
        self._num_classes: Optional[int] = None
        self._lock = threading.Lock()

    def walked_model(self) -> Union[StagedModel, CompiledModel]:
        """The model the loop walks: the user's, or its compiled parts with ``compile``."""
        if self.compile is None:
            return self.model
        with self._lock:
            if self._compiled is None or not self._compiled.matches(self.model):
                self._compiled = CompiledModel(self.model, self.compile)
            return self._compiled

    def forward(self, k: int, state: State, n: int) -> Tuple[State, torch.Tensor, int]:
        """Stage ``k`` then exit ``k`` on a state of ``n`` rows: ``(state, logits, C)``."""
        model = self.walked_model()
        state = stage_forward(model.stages[k], state)
        check_stage_output(state, k, n)
        logits = call(model.exits[k], state)
        return state, logits, self.check_logits(logits, n, k)

    def check_logits(self, logits: Any, n: int, k: int) -> int:
        """The number of classes of exit ``k``'s logits, after checking they are [n, C] with the
        same C as every other exit."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"exit {k} must return 2-D logits [B, C], got {shape}")
        if logits.shape[0] != n:
            raise ValueError(f"exit {k} returned {logits.shape[0]} rows for a batch of {n}")
        C = logits.shape[1]
        # Exit 0 of each call sets the class count the later exits must match, so exits replaced
        # between calls are judged against each other, not against an earlier call's.
        if k == 0 or self._num_classes is None:
            self._num_classes = C
        elif C != self._num_classes:
            raise ValueError(
                f"exit {k} returns {C} classes but exit 0 returns {self._num_classes}; "
                "every exit must predict the same classes"
            )
        return C

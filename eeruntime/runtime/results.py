"""What a call of the runtime returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InferenceResult:
    """``logits`` [B, C] in input order; ``exit_index`` int64 [B] (0-based exit taken);
    ``confidence`` float32 [B], the criterion's score at the exit taken."""

    logits: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor

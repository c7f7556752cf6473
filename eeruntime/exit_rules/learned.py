"""BERxiT's learning-to-exit (LTE) module (Xin et al., EACL 2021) as a runtime criterion.

A small head reads the hidden state that exit k's classifier reads and predicts whether that
exit's prediction is right: ``u_k = sigmoid(w . h_k + b)`` in (0, 1). A row leaves early exit k
when ``u_k >= T``. BERxiT shares one LTE head across layers (a transformer's layers all have the
same width); ``LearnedExit([d_0, d_1, ...])`` gives each early exit its own head instead, for
backbones whose stages differ in width (CNNs). Train it with :func:`eeruntime.train.learned_exit`
(the backbone and the exits stay frozen; target ``t_k = 1[argmax z_k == y]``, BERxiT's loss
``sum_k (u_k - t_k)^2``), then calibrate its threshold with ``ee.calibrate`` like any criterion.

``h_k`` is pooled from the stage's state by :func:`pool_features`: the state's first member
[B, D] as it is, [B, S, H] tokens by the CLS token (``pool="cls"``, position 0) or the masked mean
(``pool="mean"``, mask = the state's second member when it is [B, S]) or each row's last real
token by that mask (``pool="last"``, a decoder's; the last column without a mask),
[B, C, *spatial] maps by the spatial mean.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union, cast

import torch
from torch import nn

from ..criteria import register_criterion
from ..state import as_tuple

__all__ = ["LearnedExit", "check_pool_for", "pool_features"]

POOLS = ("cls", "mean", "last")


def pool_features(state, pool: str = "cls") -> torch.Tensor:
    """[B, D] features of a stage's state (see the module docstring)."""
    parts = as_tuple(state)
    h = parts[0]
    if h.dim() == 2:
        return h
    if h.dim() == 3:
        if pool == "cls":
            return h[:, 0]
        mask = parts[1] if len(parts) > 1 and parts[1].dim() == 2 and parts[1].shape == h.shape[:2] else None
        if pool == "last":
            if mask is None:
                return h[:, -1]
            last = ((mask != 0) * torch.arange(h.shape[1], device=h.device)).amax(dim=1)
            return h[torch.arange(h.shape[0], device=h.device), last]
        if mask is None:
            return h.mean(dim=1)
        w = (mask != 0).to(h.dtype).unsqueeze(-1)
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)
    if h.dim() > 3:
        return h.mean(dim=tuple(range(2, h.dim())))
    raise ValueError(
        f"LearnedExit cannot pool a state of shape {tuple(h.shape)}: it needs [B, D], [B, S, H] or [B, C, *spatial]"
    )


def check_pool_for(lte, model) -> None:
    """Refuse a ``LearnedExit`` pooling token 0 (``"cls"``, its default) on a decoder attached by
    ``attach_exits`` (its token layout pools the last real token): under causal attention token
    0 has seen only itself, so the scores would read none of the text."""
    if isinstance(lte, LearnedExit) and lte.pool == "cls":
        if getattr(getattr(model, "token_layout", None), "pool", None) == "last":
            raise ValueError(
                "LearnedExit(pool='cls') reads token 0, and this model is a decoder: under its causal attention "
                "token 0 has seen only itself (with left padding, a pad token), none of the text; use "
                "LearnedExit(..., pool='last') (each row's last real token, as the model's classifier reads) or 'mean'"
            )


@register_criterion("learned_exit", legacy_path="eeruntime.exit_rules.learned.LearnedExit")
class LearnedExit(nn.Module):
    """Per-exit scorer ``f(logits, state, k, history) -> [B]``: the LTE head's certainty u_k.

    Args:
        in_features: the width of the pooled hidden state, one int for a head shared by every
            exit (BERxiT), or a sequence with one width per early exit (a head each).
        pool: ``"cls"``, ``"mean"`` or ``"last"`` for token states (see :func:`pool_features`);
            on a decoder attached by ``attach_exits``, ``"last"`` or ``"mean"`` (``"cls"`` is
            refused by the runtime and the trainer: token 0 has seen none of the text).

    With per-exit heads the final exit scores 1 (it takes every row that reaches it). Saved by
    ``rt.save`` (its config in ``runtime.json``, its weights in ``weights.safetensors``).
    """

    per_exit = True
    uses_history = False

    def __init__(self, in_features: Union[int, Sequence[int]], pool: str = "cls"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; accepted: {', '.join(map(repr, POOLS))}")
        shared = isinstance(in_features, int) and not isinstance(in_features, bool)
        widths: List[object] = [in_features] if shared else list(cast(Sequence[int], in_features))
        if not widths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in widths):
            raise ValueError(f"in_features must be a positive int or a non-empty sequence of them, got {in_features!r}")
        self.shared = shared
        self.pool = pool
        self.widths = [cast(int, d) for d in widths]
        self.units = nn.ModuleList(nn.Linear(d, 1) for d in self.widths)

    def unit_logit(self, state, k: int) -> Optional[torch.Tensor]:
        """The pre-sigmoid output [B] at exit k; None for an exit without a head of its own."""
        if not self.shared and k >= len(self.units):
            return None
        unit = cast(nn.Linear, self.units[0 if self.shared else k])
        f = pool_features(state, self.pool)
        if f.shape[-1] != unit.in_features:
            raise ValueError(
                f"LearnedExit's head for exit {k} takes {unit.in_features} features but the state there "
                f"pools to {f.shape[-1]}; give in_features one width per early exit for stages of different widths"
            )
        return unit(f.to(unit.weight.dtype)).squeeze(-1)

    def forward(self, logits: torch.Tensor, state, k: int, history=()) -> torch.Tensor:
        a = self.unit_logit(state, k)
        if a is None:
            return torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
        return torch.sigmoid(a).float()

    def to_config(self) -> dict:
        return {"in_features": self.widths[0] if self.shared else list(self.widths), "pool": self.pool}

    @classmethod
    def from_config(cls, config: dict) -> LearnedExit:
        if not isinstance(config, dict) or set(config) != {"in_features", "pool"}:
            raise ValueError(f"a LearnedExit config holds in_features and pool, got {config!r}")
        return cls(config["in_features"], pool=config["pool"])

    def extra_repr(self) -> str:
        return f"in_features={self.to_config()['in_features']}, pool={self.pool!r}"

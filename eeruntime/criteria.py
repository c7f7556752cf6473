"""Confidence criteria: their names, their score direction, and validation.

A criterion turns a row of logits into one score. ``entropy`` exits when the score is *below* the
threshold; every other criterion (and a user callable) exits when the score is *at or above* it.
"""
from __future__ import annotations

from typing import Callable, Union

CRITERIA = ("entropy", "max_prob", "margin", "norm_entropy")
# Integer codes shared with the Triton kernel (a tl.constexpr) so both agree on the meaning.
CRITERION_CODE = {name: i for i, name in enumerate(CRITERIA)}

Criterion = Union[str, Callable]


def check_criterion(criterion: Criterion) -> Criterion:
    if callable(criterion):
        return criterion
    if isinstance(criterion, str) and criterion in CRITERIA:
        return criterion
    raise ValueError(
        f"unknown criterion {criterion!r}; accepted: {', '.join(map(repr, CRITERIA))} "
        "or a callable f(logits, state) -> [B] score (exits when score >= threshold)"
    )


def lower_is_confident(criterion: Criterion) -> bool:
    """True when a sample exits on ``score < threshold`` (entropy), False for ``score >= threshold``."""
    return criterion == "entropy"


def criterion_name(criterion: Criterion) -> str:
    if isinstance(criterion, str):
        return criterion
    return getattr(criterion, "__qualname__", None) or type(criterion).__name__

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
    """Validate a criterion.

    Accepted: a name of ``CRITERIA``; a callable ``f(logits, state) -> [B]`` score; or a
    *per-exit scorer*, a callable with attribute ``per_exit = True`` called as
    ``f(logits, state, k, history) -> [B]`` where ``k`` is the 0-based exit and ``history`` the
    list of the earlier exits' logits for the same rows (carried through compaction only when
    the scorer sets ``uses_history = True``; otherwise an empty list). Confidence heads, gates and
    EENet scorers are per-exit scorers. Callables exit when score >= threshold.
    """
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


def is_per_exit(criterion: Criterion) -> bool:
    return callable(criterion) and bool(getattr(criterion, "per_exit", False))


def uses_history(criterion: Criterion) -> bool:
    return is_per_exit(criterion) and bool(getattr(criterion, "uses_history", False))

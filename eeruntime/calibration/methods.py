"""The calibration methods, one table: each takes the cache and the settings and returns one
:class:`MethodResult` (``ee.calibrate`` looks the method up by name)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from . import accuracy as acc_mod
from .budget import within_budget
from .cache import ScoreCache
from .greedy import greedy
from .sweep import sweep


@dataclass
class MethodArgs:
    """What a method may read: the cache and ``ee.calibrate``'s settings (``budget_abs``: the
    budget as an absolute average cost, method ``"budget"`` only)."""

    cache: ScoreCache
    max_drop: float
    grid: int
    max_combos: int
    max_candidates: int
    seed: int
    progress: bool
    scorer_epochs: int
    scorer_hidden: int
    budget_abs: Optional[float] = None
    budget_tol: float = 0.02


@dataclass
class MethodResult:
    """``thresholds`` one per early exit; ``grids`` the candidate thresholds per exit searched;
    ``candidates`` (thresholds, accuracy, cost) points weighed, for plots; ``frontier`` the
    Pareto points (sweep); ``criterion`` and ``scores`` a learned criterion and its scores on the
    cache (budget; None: the cache's); ``settings`` what the method adds to the saved settings."""

    thresholds: List[float]
    grids: list
    candidates: list
    frontier: Optional[list] = None
    criterion: Any = None
    scores: Optional[np.ndarray] = None
    settings: dict = field(default_factory=dict)


def _sampled(a: MethodArgs, grids, acc, cost, weighed) -> list:
    return acc_mod.sample_points(grids, acc, cost, max(1, a.max_candidates - len(weighed)), a.seed) + weighed


def run_greedy(a: MethodArgs) -> MethodResult:
    thresholds, grids, candidates = greedy(a.cache)
    return MethodResult(thresholds, grids, candidates)


def run_accuracy(a: MethodArgs) -> MethodResult:
    thresholds, grids, acc, cost, weighed = acc_mod.cheapest_within(a.cache, a.max_drop, a.grid, a.max_combos)
    return MethodResult(thresholds, grids, _sampled(a, grids, acc, cost, weighed), settings={"max_drop": a.max_drop})


def run_sweep(a: MethodArgs) -> MethodResult:
    frontier, grids, acc, cost, thresholds = sweep(a.cache, a.grid, a.max_combos, a.max_drop)
    candidates = acc_mod.sample_points(grids, acc, cost, a.max_candidates, a.seed)
    return MethodResult(thresholds, grids, candidates, frontier=frontier, settings={"max_drop": a.max_drop})


def run_budget(a: MethodArgs) -> MethodResult:
    plain = float(a.cache.cost.plain)
    if a.budget_abs is None:  # ee.calibrate sets it for method="budget"
        raise ValueError("method 'budget' needs a budget")
    scorer, scores, thresholds, grids, acc, cost, weighed, losses = within_budget(
        a.cache,
        a.budget_abs,
        a.budget_tol,
        a.grid,
        a.max_combos,
        epochs=a.scorer_epochs,
        hidden=a.scorer_hidden,
        seed=a.seed,
        progress=a.progress,
    )
    settings = {
        "budget": a.budget_abs / plain,
        "budget_cost": a.budget_abs,
        "budget_tol": a.budget_tol,
        "scorer_losses": losses,
    }
    return MethodResult(
        thresholds, grids, _sampled(a, grids, acc, cost, weighed), criterion=scorer, scores=scores, settings=settings
    )


METHODS: Dict[str, Callable[[MethodArgs], MethodResult]] = {
    "greedy": run_greedy,
    "accuracy": run_accuracy,
    "budget": run_budget,
    "sweep": run_sweep,
}

"""EENet under an average-cost budget (``003_581877c910efdcfa.txt``).

1. Per-exit scorers (``eeruntime.eenet``) are trained on the cached features with EENet's
   correctness, exit-assignment and budget losses, costs relative to the full model.
2. Their utility scores on the cache are thresholded so the average cost lands in
   [budget (1 - tol), budget]: the most accurate grid combination in that window (same grid
   search as ``accuracy``), polished by coordinate descent over every distinct score, which
   moves one sample at a time when the grid is too coarse to hit the window.
The scorers are the runtime's criterion: a sample leaves exit k when its utility u_k >= T_k.
"""

from __future__ import annotations

import warnings

from ..eenet import train_eenet_scorer
from .accuracy import search_grid
from .cache import ScoreCache
from .search import budget_key


def within_budget(
    cache: ScoreCache,
    budget_abs: float,
    tol: float,
    grid: int,
    max_combos: int,
    *,
    epochs: int,
    hidden: int,
    seed: int,
    progress: bool,
):
    cum = cache.cumulative
    plain = float(cache.cost.plain)
    if budget_abs < cum[0]:
        raise ValueError(
            f"budget {budget_abs:.6g} ({budget_abs / plain:.4f} of the full model) is below the cheapest "
            f"possible average cost, every sample at exit 0: {cum[0]:.6g} ({cum[0] / plain:.4f})"
        )
    losses = []
    scorer = train_eenet_scorer(
        cache.features,
        cache.preds,
        cache.correct,
        cum / plain,
        budget_abs / plain,
        top_k=cache.top_k,
        hidden=hidden,
        epochs=epochs,
        seed=seed,
        progress=progress,
        history=losses,
    )
    scores = scorer.scores(cache.features, cache.preds)
    key = budget_key(budget_abs, tol, float(cum[-1]))
    t, grids, acc, cost, weighed = search_grid(scores, cache, False, key, grid, max_combos)
    return scorer, scores, t, grids, acc, cost, weighed, losses[0]


def warn_if_off(expected: float, budget_abs: float, tol: float, max_cost: float, N: int) -> None:
    if expected > budget_abs * (1 + 1e-9) or (expected < budget_abs * (1 - tol) and budget_abs * (1 - tol) <= max_cost):
        warnings.warn(
            f"the budget method could not land within {tol:.0%} of the budget on these {N} calibration "
            f"samples (average cost {expected:.6g} for a budget of {budget_abs:.6g}); more calibration "
            "data gives finer steps",
            RuntimeWarning,
            stacklevel=3,
        )

"""BranchyNet's sweep: accuracy and expected cost of every combination of a per-exit threshold
grid, and the Pareto-optimal points among them (no other point is at least as accurate and at
most as costly, one of them strictly)."""

from __future__ import annotations

from typing import List, Tuple

from .cache import ScoreCache
from .search import (
    accuracy_key,
    best_index,
    combo_thresholds,
    grid_candidates,
    grid_evaluate,
    pareto,
    per_exit_grid_size,
)


def sweep(cache: ScoreCache, grid: int, max_combos: int, max_drop: float):
    """(frontier, grids, acc, cost, chosen) with the frontier as (thresholds, accuracy, cost)
    sorted by cost, and ``chosen`` the frontier point a user asking for ``max_drop`` would take:
    the cheapest one at most ``max_drop`` below the final exit's accuracy."""
    scores, lower, N = cache.scores, cache.lower_is_confident, cache.num_samples
    m = cache.num_exits - 1
    g = per_exit_grid_size(grid, m, max_combos)
    grids = [grid_candidates(scores[:, k], g) for k in range(m)]
    n_correct, total = grid_evaluate(scores, cache.correct, cache.cumulative, grids, lower)
    acc, cost = (n_correct / N).ravel(), (total / N).ravel()
    idx = pareto(acc, cost)
    frontier: List[Tuple[List[float], float, float]] = [
        (combo_thresholds(grids, int(i)), float(acc[i]), float(cost[i])) for i in idx
    ]
    key = accuracy_key(cache.final_accuracy - max_drop)
    chosen = frontier[best_index(key(acc[idx], cost[idx]))][0]
    return frontier, grids, acc.reshape(n_correct.shape), cost.reshape(n_correct.shape), chosen

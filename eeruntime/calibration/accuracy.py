"""The cheapest thresholds whose accuracy is at most ``max_drop`` below the final exit's.

Search: every combination of a per-exit candidate grid (``grid`` thresholds per exit at sample
quantiles, fewer when the early exits are so many that the grid would pass ``max_combos``
points), evaluated exactly and all at once (``search.grid_evaluate``); the grid optimum is then
polished by coordinate descent over every distinct cached score of each exit. The result meets
the constraint on the calibration data and costs no more than any grid point that meets it.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from .cache import ScoreCache
from .search import (
    Key,
    accuracy_key,
    best_index,
    combo_thresholds,
    coordinate_refine,
    full_candidates,
    grid_candidates,
    grid_evaluate,
    per_exit_grid_size,
)


def search_grid(scores: np.ndarray, cache: ScoreCache, lower: bool, key: Key, grid: int, max_combos: int):
    """Exhaustive grid search then coordinate polish. Returns (thresholds, grids, accuracy and
    cost arrays over the grid, refinement candidates weighed)."""
    correct, cum, N = cache.correct, cache.cumulative, cache.num_samples
    m = cache.num_exits - 1
    g = per_exit_grid_size(grid, m, max_combos)
    grids = [grid_candidates(scores[:, k], g) for k in range(m)]
    n_correct, total = grid_evaluate(scores, correct, cum, grids, lower)
    acc, cost = n_correct / N, total / N
    start = combo_thresholds(grids, best_index(key(acc, cost)))
    full = [full_candidates(scores[:, k]) for k in range(m)]
    t, weighed = coordinate_refine(scores, correct, cum, lower, start, full, key)
    return [float(v) for v in t], grids, acc, cost, weighed


def cheapest_within(cache: ScoreCache, max_drop: float, grid: int, max_combos: int):
    target = cache.final_accuracy - max_drop
    return search_grid(cache.scores, cache, cache.lower_is_confident, accuracy_key(target), grid, max_combos)


def sample_points(
    grids: Sequence[np.ndarray], acc: np.ndarray, cost: np.ndarray, limit: int, seed: int = 0
) -> List[Tuple[List[float], float, float]]:
    """At most ``limit`` grid points (a fixed random sample when there are more)."""
    total = acc.size
    flat = (
        np.arange(total) if total <= limit else np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
    )
    a, c = acc.ravel(), cost.ravel()
    return [(combo_thresholds(grids, int(i)), float(a[i]), float(c[i])) for i in flat]

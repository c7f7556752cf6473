"""Threshold search on a calibration cache: candidates, exact evaluation, grid and coordinate search.

Thresholds are float32, like the runtime's device tensor, and every comparison below is the
runtime's own float32 comparison (``score < T`` for entropy, ``score >= T`` otherwise, NaN never
exits), so a result evaluated here is what the runtime does on the same scores.

Candidates at exit k are the midpoints between consecutive distinct cached scores plus -inf and
+inf: every way of splitting that exit's samples by score, each threshold as far as possible from
the scores on both sides (robust to last-bit differences between backends).
"""

from __future__ import annotations

from math import prod
from typing import Callable, List, Sequence, Tuple

import numpy as np

Key = Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, ...]]

INF = np.float32(np.inf)


def passes(scores: np.ndarray, thresholds: np.ndarray, lower: bool) -> np.ndarray:
    """Exit flags, broadcasting ``scores`` against ``thresholds``; NaN never exits."""
    with np.errstate(invalid="ignore"):
        return scores < thresholds if lower else scores >= thresholds


def full_candidates(scores_k: np.ndarray) -> np.ndarray:
    """Every distinct split of one exit's scores: sorted float32 thresholds, -inf and +inf included."""
    v = np.unique(scores_k[~np.isnan(scores_k)]).astype(np.float64)
    mids = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    return np.unique(np.concatenate([[-INF], mids, [INF]]).astype(np.float32))


def grid_candidates(scores_k: np.ndarray, size: int) -> np.ndarray:
    """At most ``size`` of :func:`full_candidates`, spread over sample quantiles (the fraction of
    samples below the threshold evenly spaced from 0 to 1); both infinite ends always kept."""
    full = full_candidates(scores_k)
    if len(full) <= size:
        return full
    s = np.sort(scores_k[~np.isnan(scores_k)])
    below = np.searchsorted(s, full, side="left")  # samples with score < t, non-decreasing in t
    targets = np.linspace(0, len(s), size)
    pick = np.clip(np.searchsorted(below, targets, side="left"), 0, len(full) - 1)
    left = np.clip(pick - 1, 0, len(full) - 1)
    nearer_left = np.abs(below[left] - targets) <= np.abs(below[pick] - targets)
    idx = np.unique(np.concatenate([[0, len(full) - 1], np.where(nearer_left, left, pick)]))
    return full[idx]


def exit_indices(scores: np.ndarray, thresholds: np.ndarray, lower: bool, skip: int = -1) -> np.ndarray:
    """Exit taken by each row (int64 [N]); early exit ``skip`` is treated as off."""
    N, K = scores.shape
    idx = np.full(N, K - 1, dtype=np.int64)
    open_ = np.ones(N, dtype=bool)
    for k in range(K - 1):
        if k == skip:
            continue
        p = passes(scores[:, k], np.float32(thresholds[k]), lower) & open_
        idx[p] = k
        open_ &= ~p
    return idx


def exit_set_sums(scores_k: np.ndarray, cands: np.ndarray, lower: bool, values: np.ndarray) -> np.ndarray:
    """For each candidate t: the sum of ``values`` [N, V] over rows whose score exits at t.

    O(N log N + T log N) with a sort and prefix sums; rows with a NaN score never count.
    """
    valid = ~np.isnan(scores_k)
    s = scores_k[valid]
    order = np.argsort(s, kind="stable")
    s = s[order]
    v = np.asarray(values, dtype=np.float64)[valid][order]
    prefix = np.vstack([np.zeros((1, v.shape[1])), np.cumsum(v, axis=0)])
    below = np.searchsorted(s, cands.astype(np.float32), side="left")  # rows with s < t
    return prefix[below] if lower else prefix[-1] - prefix[below]


def grid_evaluate(
    scores: np.ndarray,
    correct: np.ndarray,
    cum: np.ndarray,
    grids: Sequence[np.ndarray],
    lower: bool,
    max_elements: int = 1 << 24,
) -> Tuple[np.ndarray, np.ndarray]:
    """Correct-sample count and total cost of every threshold combination of ``grids``.

    Returns two float64 arrays of shape ``(len(grids[0]), ..., len(grids[-1]))``. Vectorised as
    matrix products: with P_k[j, n] = 1 when row n exits at exit k under its j-th candidate, and
    R the rows still running after exits < k for every combination of their candidates, the rows
    leaving at k are R (x) P_k and those going on R (x) (1 - P_k). Rows are processed in chunks so
    R stays under ``max_elements`` entries; 0/1 products summed in float32 are exact below 2^24.
    """
    N, K = correct.shape
    m = K - 1
    shape = tuple(len(g) for g in grids)
    n_correct = np.zeros(shape)
    cost = np.zeros(shape)
    widest = prod(shape[:-1]) if m > 1 else 1
    chunk = max(1, min(N, max_elements // widest))
    for lo in range(0, N, chunk):
        sl = slice(lo, lo + chunk)
        reach = np.ones((1, min(chunk, N - lo)), dtype=np.float32)
        for k in range(m):
            P = passes(scores[sl, k][None, :], grids[k][:, None], lower).astype(np.float32)
            lead = shape[: k + 1] + (1,) * (m - k - 1)
            n_correct += (reach @ (P * correct[sl, k]).T).reshape(lead)
            cost += (reach @ P.T).astype(np.float64).reshape(lead) * cum[k]
            Q = 1.0 - P
            if k == m - 1:
                n_correct += (reach @ (Q * correct[sl, K - 1]).T).reshape(shape)
                cost += (reach @ Q.T).astype(np.float64).reshape(shape) * cum[K - 1]
            else:
                reach = (reach[:, None, :] * Q[None, :, :]).reshape(-1, reach.shape[1])
    return n_correct, cost


def best_index(keys: Tuple[np.ndarray, ...]) -> int:
    """Index of the smallest key, compared lexicographically; ties go to the lowest index."""
    return int(np.lexsort(tuple(np.ravel(k) for k in reversed(keys)))[0])


def _key_at(keys, i) -> tuple:
    return tuple(float(np.ravel(k)[i]) for k in keys)


def one_exit_outcomes(
    scores: np.ndarray,
    correct: np.ndarray,
    cum: np.ndarray,
    lower: bool,
    thresholds: np.ndarray,
    k: int,
    cands: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray]:
    """Correct count and total cost for each candidate at exit ``k``, the other exits fixed."""
    N, K = correct.shape
    rows = np.arange(N)
    off = exit_indices(scores, thresholds, lower, skip=k)  # where each row goes with exit k off
    reach = off > k
    corr_off = correct[rows, off].astype(np.float64)
    cost_off = cum[off]
    s = np.where(reach, scores[:, k], np.float32(np.nan))
    gain = np.stack([correct[:, k] - corr_off, cum[k] - cost_off], axis=1)
    sums = exit_set_sums(s, cands, lower, gain)
    return corr_off.sum() + sums[:, 0], cost_off.sum() + sums[:, 1]


def coordinate_refine(
    scores: np.ndarray,
    correct: np.ndarray,
    cum: np.ndarray,
    lower: bool,
    start: Sequence[float],
    candidates: Sequence[np.ndarray],
    key: Key,
    max_rounds: int = 50,
) -> Tuple[np.ndarray, List[Tuple[List[float], float, float]]]:
    """Coordinate descent from ``start``: each exit in turn takes its best candidate (lowest
    ``key(accuracy, cost)``) with the others fixed, until a full round changes nothing. A change
    needs a strictly lower key, so it never ends worse than ``start`` and cannot cycle.
    Returns the thresholds and every (thresholds, accuracy, expected cost) it weighed."""
    N = correct.shape[0]
    t = np.asarray(start, dtype=np.float32).copy()
    weighed = []
    for _ in range(max_rounds):
        changed = False
        for k in range(len(t)):
            cands = np.unique(np.append(candidates[k], t[k]).astype(np.float32))
            n_corr, total = one_exit_outcomes(scores, correct, cum, lower, t, k, cands)
            acc, cost = n_corr / N, total / N
            keys = key(acc, cost)
            i = best_index(keys)
            cur = int(np.searchsorted(cands, t[k]))
            for j in np.linspace(0, len(cands) - 1, min(len(cands), 16)).astype(int):
                tt = t.copy()
                tt[k] = cands[j]
                weighed.append((tt.tolist(), float(acc[j]), float(cost[j])))
            if _key_at(keys, i) < _key_at(keys, cur):
                t[k] = cands[i]
                changed = True
        if not changed:
            break
    return t, weighed


def pareto(acc: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices of the undominated points (no other point has accuracy >= and cost <= with one
    strict), one per distinct (accuracy, cost), sorted by cost."""
    order = np.lexsort((-acc, cost))  # by cost, then higher accuracy first
    keep, best = [], -np.inf
    for i in order:
        if acc[i] > best:
            keep.append(i)
            best = acc[i]
    return np.asarray(keep, dtype=np.int64)


def accuracy_key(target: float) -> Key:
    """Feasible (accuracy >= target) first, then cheapest, then most accurate; infeasible points
    rank by accuracy so a search can climb towards the constraint."""

    def key(acc, cost):
        ok = acc >= target - 1e-12
        return (~ok).astype(np.int64), np.where(ok, cost, -acc), -acc

    return key


def budget_key(budget: float, tol: float, max_cost: float) -> Key:
    """Inside [budget (1 - tol), budget] first, most accurate there; else under the budget and as
    close to it as possible; over the budget last. When even the dearest setting is cheaper than
    the window, any cost within the budget is inside."""
    hi = budget * (1 + 1e-12)
    lo = budget * (1 - tol) if budget * (1 - tol) <= max_cost else -np.inf

    def key(acc, cost):
        inside = (cost <= hi) & (cost >= lo)
        under = cost < lo
        rank = np.where(inside, 0, np.where(under, 1, 2))
        return rank, np.where(inside, -acc, np.where(under, -cost, cost)), cost

    return key


def per_exit_grid_size(grid: int, early_exits: int, max_combos: int) -> int:
    """Candidates per exit so that the exhaustive grid has at most ``max_combos`` points."""
    g = int(np.floor(max_combos ** (1.0 / early_exits) + 1e-9))
    return max(2, min(grid, g))


def combo_thresholds(grids: Sequence[np.ndarray], flat: int) -> List[float]:
    idx = np.unravel_index(flat, tuple(len(g) for g in grids))
    return [float(g[i]) for g, i in zip(grids, idx)]

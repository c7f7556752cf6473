"""Greedy thresholds of ``000_fccd23acf6f041ab.txt``, branch by branch, each frozen before the next.

At branch k, for every candidate T (see ``search.full_candidates``, exact on the cache):

    objective(T) = O/E + (I/N)(1 - E/N)

E: samples that reach branch k (did not leave at a frozen earlier branch) and leave there at T;
O: how many of them branch k gets wrong; I: samples the whole model gets wrong with branches < k
frozen, branch k at T and the later branches *off* (their samples go on to the final exit);
N: all samples. With E = 0 the term O/E is taken as 0, so "nobody exits here" scores I/N.
Ties go to the candidate letting more samples leave (cheaper), then to the lower threshold.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .cache import ScoreCache
from .search import exit_set_sums, full_candidates, passes


def objective(O: np.ndarray, E: np.ndarray, I: np.ndarray, N: int) -> np.ndarray:
    """O/E + (I/N)(1 - E/N), with O/E = 0 where E = 0."""
    O, E, I = (np.asarray(a, dtype=np.float64) for a in (O, E, I))
    ratio = np.divide(O, E, out=np.zeros_like(O), where=E > 0)
    return ratio + (I / N) * (1 - E / N)


def pick(obj: np.ndarray, E: np.ndarray) -> int:
    """The argmin of ``obj``; ties to the larger E, then the lower index."""
    return int(np.lexsort((-np.asarray(E, dtype=np.float64), obj))[0])


def greedy(cache: ScoreCache) -> Tuple[List[float], List[np.ndarray], List[Tuple[List[float], float, float]]]:
    """Thresholds, the candidates of each branch, and (thresholds, accuracy, cost) weighed."""
    scores, correct, lower = cache.scores, cache.correct, cache.lower_is_confident
    N, K = correct.shape
    wrong = ~correct
    cum = cache.cumulative
    off = -np.inf if lower else np.inf
    t = np.full(K - 1, off, dtype=np.float32)
    left = np.zeros(N, dtype=bool)  # left at a frozen earlier branch
    wrong_left, cost_left = 0.0, 0.0
    grids, weighed = [], []
    for k in range(K - 1):
        cands = full_candidates(scores[:, k])
        reach = ~left
        s = np.where(reach, scores[:, k], np.float32(np.nan))
        values = np.stack(
            [
                np.ones(N),
                wrong[:, k],
                wrong[:, k].astype(np.float64) - wrong[:, K - 1],
                cum[k] - np.full(N, cum[K - 1]),
            ],
            axis=1,
        )
        sums = exit_set_sums(s, cands, lower, values)
        E, O = sums[:, 0], sums[:, 1]
        I = wrong_left + wrong[reach, K - 1].sum() + sums[:, 2]
        i = pick(objective(O, E, I, N), E)
        t[k] = cands[i]
        grids.append(cands)
        cost = (cost_left + reach.sum() * cum[K - 1] + sums[:, 3]) / N
        for j in np.unique(np.linspace(0, len(cands) - 1, min(len(cands), 200)).astype(int)):
            tt = t.copy()
            tt[k] = cands[j]
            weighed.append((tt.tolist(), 1.0 - float(I[j]) / N, float(cost[j])))
        leaving = passes(scores[:, k], t[k], lower) & reach
        wrong_left += float(wrong[leaving, k].sum())
        cost_left += float(leaving.sum()) * cum[k]
        left |= leaving
    return [float(v) for v in t], grids, weighed

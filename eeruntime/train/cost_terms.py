"""Normalised exit costs for the cost terms: gamma_k = (FLOPs of a sample leaving at exit k) / plain.

FLOPs follow :mod:`eeruntime.cost`: leaving at k runs stages 0..k and heads 0..k; ``plain`` is the
backbone alone (every stage and the final head), so gamma of the final exit is >= 1 (the early
heads it passed through cost extra) and the early exits' gammas are below it.
"""

from __future__ import annotations

from typing import List

from ..cost import measure_costs
from ..state import as_tuple, from_tuple


def normalised_exit_costs(model, x) -> List[float]:
    example = from_tuple([t[:1] for t in as_tuple(x)], x)
    cm = measure_costs(model, example)
    if cm.plain <= 0:
        raise ValueError(
            "the model's FLOPs could not be counted (plain cost 0); the cost term needs torch.utils.flop_counter to see its layers"
        )
    return [c / cm.plain for c in cm.cumulative]


def soft_cost(gates, costs):
    """gamma~_0 [B] of the recursion gamma~_k = g_k gamma_k + (1 - g_k) gamma~_{k+1},
    gamma~_{K-1} = gamma_{K-1}; ``gates`` are the K-1 early exits' g_k in (0, 1), [B] each."""
    if len(costs) != len(gates) + 1:
        raise ValueError(f"need one cost per exit ({len(gates) + 1}), got {len(costs)}")
    out = None
    for k in range(len(gates) - 1, -1, -1):
        nxt = costs[-1] if out is None else out
        out = gates[k] * costs[k] + (1 - gates[k]) * nxt
    return out if out is not None else costs[-1]

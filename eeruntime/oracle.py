"""The oracle of the benchmarks: the same stages and heads, each run on exactly the rows that reach
it, with no decisions and no packing.

The input is sorted once (outside the timed region) by exit index, latest first, so the rows that
reach stage k are the first n_k rows: each stage's input is a slice (a view), not a gather. Its
time is the floor the runtime's machinery (decisions, compaction, syncs, launches) is measured
against: efficiency = oracle time / runtime time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .state import as_tuple, call, from_tuple, stage_forward


@dataclass
class OraclePlan:
    x_sorted: object  # the input, rows sorted by exit index (latest first)
    reach: List[int]  # n_k: rows that reach stage k


def plan_oracle(x, exit_index: torch.Tensor, num_exits: int) -> OraclePlan:
    order = torch.argsort(exit_index, descending=True, stable=True)
    parts = [t.index_select(0, order.to(t.device)) for t in as_tuple(x)]
    counts = torch.bincount(exit_index.cpu(), minlength=num_exits).tolist()
    reach, left = [], int(exit_index.numel())
    for k in range(num_exits):
        reach.append(left)
        left -= counts[k]
    return OraclePlan(from_tuple(parts, x), reach)


@torch.inference_mode()
def plain_forward(model, x) -> torch.Tensor:
    """The plain backbone, the baseline of every speed-up: every stage, then the final exit only."""
    state = x
    for stage in model.stages:
        state = stage_forward(stage, state)
    return call(model.exits[-1], state)


@torch.inference_mode()
def oracle_forward(model, plan: OraclePlan) -> List[torch.Tensor]:
    """Run each stage and head on the first n_k rows; returns each exit's logits for those rows."""
    state = plan.x_sorted
    outs = []
    for k, n in enumerate(plan.reach):
        if n == 0:
            break
        state = from_tuple([t[:n] for t in as_tuple(state)], state)
        state = stage_forward(model.stages[k], state)
        outs.append(call(model.exits[k], state))
    return outs

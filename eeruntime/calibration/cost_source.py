"""Per-exit costs for calibration: FLOPs (the cost model of docs/design.md) or measured latency."""

from __future__ import annotations

from typing import Tuple

import torch

from ..cost import CostModel, measure_costs
from ..model import set_eval
from ..state import as_tuple, call, stage_forward
from ..timing import median_seconds


@torch.inference_mode()
def measure_latency(model, batch, warmup: int = 2, iters: int = 7) -> CostModel:
    """Seconds per sample of every stage and exit head, timed on ``batch`` (on the model's
    device, at its batch size): a :class:`CostModel` whose entries are seconds, not FLOPs.
    Only ratios between exits matter to calibration."""
    first = as_tuple(batch)[0]
    B = max(1, first.shape[0])
    device = first.device
    restore = set_eval(model)
    stage_s, head_s = [], []
    try:
        state = batch
        for stage, head in zip(model.stages, model.exits):
            inp = state
            stage_s.append(median_seconds(lambda: stage_forward(stage, inp), device, warmup, iters) / B)
            state = stage_forward(stage, inp)
            out = state
            head_s.append(median_seconds(lambda: call(head, out), device, warmup, iters) / B)
    finally:
        restore()
    return CostModel(stage_s, head_s)


def resolve_costs(cost, model, batch) -> Tuple[CostModel, str]:
    """The cost model and its unit for ``cost``: ``"flops"`` (counted on one sample),
    ``"latency"`` (timed on ``batch``) or a ready :class:`CostModel` (unit ``"custom"``)."""
    K = len(model.stages)
    if isinstance(cost, CostModel):
        if cost.num_exits != K:
            raise ValueError(f"the cost model has {cost.num_exits} exits but the model has {K}")
        return cost, "custom"
    if cost == "flops":
        cm = measure_costs(model, batch)
        if cm.plain <= 0:
            raise ValueError("the FLOP counter found no FLOPs in this model; pass cost='latency' or an ee.CostModel")
        return cm, "flops"
    if cost == "latency":
        return measure_latency(model, batch), "seconds"
    raise ValueError(f"unknown cost {cost!r}; accepted: 'flops', 'latency' or an ee.CostModel")

"""Cost model (docs/design.md, "Cost, speed-up, efficiency"): FLOPs per stage and exit head, expected cost and ideal speed-up.

c_k = FLOPs(stage k) + FLOPs(exit head k), counted once per model with
``torch.utils.flop_counter`` on one sample. Exiting at k costs sum_{j<=k} c_j; the plain model
costs every stage plus the final head only. Ideal speed-up = plain / sum_k f_k sum_{j<=k} c_j.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .state import as_tuple, call, from_tuple, stage_forward


@contextlib.contextmanager
def _countable_attention():
    """Turn off the fused "fast path" of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``
    while counting: in eval mode without grad they run one fused op (``_transformer_encoder_layer_fwd``)
    that ``FlopCounterMode`` does not know, so a whole encoder layer counted 0 FLOPs and a ViT's
    FLOPs-ideal speed-up came out below 1. The unfused path runs the same matmuls, which it counts.
    The switch is process-wide; other threads' layers take the unfused path for that moment."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """``scaled_dot_product_attention`` on CPU runs ``_scaled_dot_product_flash_attention_for_cpu``,
    which torch's FLOP registry lacks (it has the CUDA kernels): the same count as theirs,
    2*B*H*S_q*S_kv*(d_qk + d_v), from the shapes (FlopCounterMode passes shapes, not tensors)."""
    return sdpa_flop_count(query, key, value)


# Ops the FLOP counter misses, with their formulas (only those this torch has).
_EXTRA_FLOP_FORMULAS = {
    getattr(torch.ops.aten, name): formula
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_attention_flops),)
    if hasattr(torch.ops.aten, name)
}


def _flops(fn):
    """(FLOPs counted while running ``fn``, its result)."""
    with _countable_attention(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


@dataclass(frozen=True)
class CostModel:
    stage_flops: List[int]
    head_flops: List[int]

    @property
    def num_exits(self) -> int:
        return len(self.stage_flops)

    @property
    def exit_costs(self) -> List[int]:
        """c_k: stage k plus its exit head."""
        return [s + h for s, h in zip(self.stage_flops, self.head_flops)]

    @property
    def cumulative(self) -> List[int]:
        """Cost of a sample that leaves at exit k: sum_{j<=k} c_j."""
        out, run = [], 0
        for c in self.exit_costs:
            run += c
            out.append(run)
        return out

    @property
    def plain(self) -> int:
        """The backbone alone: every stage and the final head."""
        return sum(self.stage_flops) + self.head_flops[-1]

    def expected(self, fractions: Sequence[float]) -> float:
        """Average FLOPs per sample when a fraction f_k leaves at exit k."""
        if len(fractions) != self.num_exits:
            raise ValueError(f"need {self.num_exits} exit fractions, got {len(fractions)}")
        return float(sum(f * c for f, c in zip(fractions, self.cumulative)))

    def ideal_speedup(self, fractions: Sequence[float]) -> float:
        e = self.expected(fractions)
        return float(self.plain / e) if e > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"stage_flops": list(self.stage_flops), "head_flops": list(self.head_flops)}


@torch.no_grad()
def measure_costs(model, example) -> CostModel:
    """Count the FLOPs of every stage and head of ``model`` on one sample of ``example``."""
    state = from_tuple([t[:1] for t in as_tuple(example)], example)
    was_training = model.training
    model.eval()
    try:
        stage_flops, head_flops = [], []
        for stage, head in zip(model.stages, model.exits):
            f, state = _flops(lambda: stage_forward(stage, state))
            stage_flops.append(f)
            f, _ = _flops(lambda: call(head, state))
            head_flops.append(f)
    finally:
        model.train(was_training)
    return CostModel(stage_flops, head_flops)

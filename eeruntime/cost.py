"""Cost model (docs/design.md, "Cost, speed-up, efficiency"): FLOPs per stage and exit head, expected cost and ideal speed-up.

c_k = FLOPs(stage k) + FLOPs(exit head k), counted once per model with
``torch.utils.flop_counter`` on one sample. Exiting at k costs sum_{j<=k} c_j; the plain model
costs every stage plus the final head only. Ideal speed-up = plain / sum_k f_k sum_{j<=k} c_j.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import List, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .model import set_eval
from .state import as_tuple, call, from_tuple, stage_forward


def _attention_flops(B: int, heads: int, s_q: int, s_kv: int, dim: int) -> int:
    """Q K^T and A V of ``heads`` heads over ``dim`` = heads * head width: torch's own sdpa count."""
    dh = dim // heads
    return sdpa_flop_count((B, heads, s_q, dh), (B, heads, s_kv, dh), (B, heads, s_kv, dh))


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """``scaled_dot_product_attention`` on CPU runs ``_scaled_dot_product_flash_attention_for_cpu``,
    which torch's FLOP registry lacks (it has the CUDA kernels): the same count as theirs,
    2*B*H*S_q*S_kv*(d_qk + d_v), from the shapes (FlopCounterMode passes shapes, not tensors)."""
    return sdpa_flop_count(query, key, value)


def _encoder_layer_fwd_flops(
    src,
    embed_dim,
    num_heads,
    qkv_w,
    qkv_b,
    proj_w,
    proj_b,
    use_gelu,
    norm_first,
    eps,
    nw1,
    nb1,
    nw2,
    nb2,
    ffn_w1,
    ffn_b1,
    ffn_w2,
    ffn_b2,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    """``nn.TransformerEncoderLayer``'s fused eval "fast path" (one op for the whole layer), which
    torch's FLOP registry lacks: the q/k/v, output and two feed-forward projections on every token,
    and the attention, as the unfused path's ops count them."""
    B, S = (src[0], src[1]) if len(src) == 3 else (1, src[0])
    rows = B * S
    projections = qkv_w[0] * qkv_w[1] + proj_w[0] * proj_w[1] + ffn_w1[0] * ffn_w1[1] + ffn_w2[0] * ffn_w2[1]
    return 2 * rows * projections + _attention_flops(B, num_heads, S, S, embed_dim)


def _native_mha_flops(
    query, key, value, embed_dim, num_head, qkv_w, qkv_b, proj_w, proj_b, *args, out_shape=None, **kwargs
) -> int:
    """``nn.MultiheadAttention``'s fused eval "fast path": the q projection on the queries, k and v
    on the keys and values, the output projection, and the attention."""
    B, s_q = (query[0], query[1]) if len(query) == 3 else (1, query[0])
    s_kv = key[1] if len(key) == 3 else key[0]
    d_in = qkv_w[1]
    projections = 2 * B * (s_q + 2 * s_kv) * embed_dim * d_in + 2 * B * s_q * proj_w[0] * proj_w[1]
    return projections + _attention_flops(B, num_head, s_q, s_kv, embed_dim)


# Ops the FLOP counter misses, with their formulas (only those this torch has). Counting the fused
# transformer ops themselves, rather than switching their fast path off while counting, keeps the
# count from touching a process-wide setting that other threads' layers read.
_EXTRA_FLOP_FORMULAS = {
    getattr(torch.ops.aten, name): formula
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_attention_flops),
        ("_transformer_encoder_layer_fwd", _encoder_layer_fwd_flops),
        ("_native_multi_head_attention", _native_mha_flops),
    )
    if hasattr(torch.ops.aten, name)
}


def _flops(fn):
    """(FLOPs counted while running ``fn``, its result)."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


@dataclass(frozen=True)
class CostModel:
    """FLOPs (or seconds, or a user's unit) of each stage and exit head, one entry per exit."""

    stage_flops: List[int]
    head_flops: List[int]

    def __post_init__(self) -> None:
        # A short list was zipped away (a 3-exit model costed as 2: IndexError deep in a
        # calibration search) and a negative or NaN cost made "cheapest" meaningless (a silently
        # wrong calibration): both are refused here, where the numbers come in.
        for name in ("stage_flops", "head_flops"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not (hasattr(v, "__len__") and hasattr(v, "__iter__")):
                raise TypeError(f"CostModel.{name} must be a list of numbers, one per exit, got {type(v).__name__}")
            bad = [c for c in v if isinstance(c, bool) or not isinstance(c, Real) or not (0 <= float(c) < math.inf)]
            if bad:
                raise ValueError(
                    f"CostModel.{name} must hold finite numbers >= 0, one per exit; got {bad[0]!r} in {list(v)}"
                )
        if len(self.stage_flops) == 0 or len(self.stage_flops) != len(self.head_flops):
            raise ValueError(
                f"CostModel needs one stage cost and one head cost per exit (at least one exit); got "
                f"{len(self.stage_flops)} stage costs and {len(self.head_flops)} head costs"
            )

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
    # Detached: an input that requires grad (a calibration or training batch straight from a
    # preprocessing graph) makes the FLOP counter's module tracker hook autograd and fail.
    state = from_tuple([t[:1].detach() for t in as_tuple(example)], example)
    restore = set_eval(model)
    try:
        stage_flops, head_flops = [], []
        for stage, head in zip(model.stages, model.exits):
            f, state = _flops(lambda: stage_forward(stage, state))
            stage_flops.append(f)
            f, _ = _flops(lambda: call(head, state))
            head_flops.append(f)
    finally:
        restore()
    return CostModel(stage_flops, head_flops)

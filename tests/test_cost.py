"""FLOPs of the cost model (eeruntime/cost.py) against counts written out by hand.

Transformer layers used to count far too little: in eval mode without grad, nn.TransformerEncoderLayer
and nn.MultiheadAttention run one fused op the FLOP counter does not know (0 FLOPs for a whole layer),
and the unfused path's attention runs a CPU kernel missing from torch's FLOP registry (the
projections counted, not Q K^T and A V). make demo-vit reported a FLOPs-ideal speed-up of 0.97x with
81% leaving at block 1. Both paths now count the same, checked with the fast path on and off."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import eeruntime as ee
from eeruntime.cost import measure_costs
from eeruntime.heads import SequenceHead


class OpNames(TorchDispatchMode):
    """The aten ops a call runs (to tell the fused fast path from the unfused one)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def ops_of(module, *args):
    with torch.no_grad(), OpNames() as seen:
        module(*args)
    return seen.names


class SelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def linear_flops(rows, fan_in, fan_out):
    return 2 * rows * fan_in * fan_out


def encoder_layer_flops(S, d, ff):
    """Matmul FLOPs of one nn.TransformerEncoderLayer on one sequence of S tokens: the q/k/v and
    output projections, the two attention products, the two feed-forward layers."""
    return linear_flops(S, d, 3 * d) + 2 * (2 * S * S * d) + linear_flops(S, d, d) + 2 * linear_flops(S, d, ff)


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layers_count_the_same_on_either_path(norm_first, fast_path):
    S, d, ff, C = 9, 16, 24, 5
    layers = [
        nn.TransformerEncoderLayer(d, 4, ff, dropout=0.0, batch_first=True, norm_first=norm_first) for _ in range(2)
    ]
    heads = [SequenceHead(d, C, pool="cls") for _ in range(2)]
    model = ee.MultiExitModel(layers, heads).eval()
    x = torch.randn(3, S, d)
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fast_path)
    try:
        # the path this test means is the one the layer takes
        assert ("_transformer_encoder_layer_fwd" in ops_of(layers[0], x)) == fast_path
        costs = measure_costs(model, x)
        assert torch.backends.mha.get_fastpath_enabled() == fast_path  # counting leaves the setting alone
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    assert costs.stage_flops == [encoder_layer_flops(S, d, ff)] * 2
    assert costs.head_flops == [linear_flops(1, d, C)] * 2
    # a row leaving at exit 0 runs half the layers: the ideal speed-up is above 1
    assert costs.ideal_speedup([1.0, 0.0]) == pytest.approx(costs.plain / costs.cumulative[0])
    assert costs.ideal_speedup([1.0, 0.0]) > 1.9


@pytest.mark.parametrize("fast_path", [True, False])
def test_multihead_attention_counts_the_same_on_either_path(fast_path):
    S, d, C = 7, 16, 3
    stage = SelfAttention(d, 4)
    model = ee.MultiExitModel([stage], [SequenceHead(d, C)]).eval()
    x = torch.randn(2, S, d)
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fast_path)
    try:
        assert ("_native_multi_head_attention" in ops_of(stage, x)) == fast_path
        costs = measure_costs(model, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    # q, k, v and output projections on every token, then Q K^T and A V
    assert costs.stage_flops == [linear_flops(S, d, 3 * d) + linear_flops(S, d, d) + 2 * (2 * S * S * d)]


def test_digits_vit_blocks_are_counted():
    from eeruntime.zoo import digits_vit

    dim, depth = 32, 6
    costs = measure_costs(digits_vit(dim=dim, depth=depth).eval(), torch.rand(2, 1, 8, 8))
    block = encoder_layer_flops(17, dim, 2 * dim)  # 16 patch tokens + CLS, feed-forward 2*dim
    assert costs.stage_flops[1:] == [block] * (depth - 1)
    assert costs.stage_flops[0] > block  # the patch embedding rides with the first block


@pytest.mark.parametrize(
    "stage,head,match",
    [
        ([100, 200, 300], [5, 5], "3 stage costs and 2 head costs"),
        ([], [], "at least one exit"),
        ([100, -50, 300], [5, 5, 5], "finite numbers >= 0.*-50"),
        ([float("nan"), 1, 1], [1, 1, 1], "finite numbers >= 0.*nan"),
        ([1, 1], [1, float("inf")], "finite numbers >= 0.*inf"),
        ([1, True], [1, 1], "finite numbers >= 0.*True"),
        ("12", [1, 1], "list of numbers"),
    ],
)
def test_cost_model_refuses_costs_that_cannot_be_weighed(stage, head, match):
    # Before: a short list was zipped away (a calibration failed with an IndexError deep in its
    # search) and a negative or NaN cost was taken at its word (a calibration whose "cheapest"
    # thresholds sent everything to the exit with the negative cost, without a word).
    with pytest.raises((ValueError, TypeError), match=match):
        ee.CostModel(stage, head)


def test_cost_model_takes_ints_floats_and_numpy_numbers():
    import numpy as np

    cm = ee.CostModel([np.int64(2), 3.5], (np.float32(0.5), 1))
    assert cm.cumulative == [2.5, 7.0] and cm.plain == 6.5
    assert ee.CostModel(np.array([2.0, 3.5]), np.array([0.5, 1.0])).cumulative == [2.5, 7.0]


def test_calibration_refuses_a_cost_model_with_a_free_full_model():
    from eeruntime.calibration import ScoreCache

    logits = [torch.randn(10, 4), torch.randn(10, 4)]
    with pytest.raises(ValueError, match="full-model cost > 0"):
        ScoreCache.from_logits(logits, torch.arange(10) % 4, ee.CostModel([0, 0], [0, 0]))


def _mixed_mode_model():
    """A model in training mode with one BatchNorm the caller froze (eval), and one in eval mode
    with a dropout the caller keeps sampling (train, e.g. MC dropout)."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.1)) for _ in range(2)]
    return ee.MultiExitModel(stages, [nn.Linear(6, 3), nn.Linear(6, 3)])


@pytest.mark.parametrize(
    "measure",
    [
        lambda m, x: measure_costs(m, x),
        lambda m, x: ee.calibrate(m, (x, torch.arange(16) % 3), "greedy", grid=4, progress=False),
        lambda m, x: ee.calibrate(m, (x, torch.arange(16) % 3), "greedy", grid=4, cost="latency", progress=False),
    ],
    ids=["measure_costs", "calibrate", "calibrate-latency"],
)
def test_measuring_leaves_every_modules_mode_as_it_was(measure):
    # Before: the model was put in eval mode and back with model.train(was_training), which sets
    # every submodule to the model's own flag: a BatchNorm the caller froze went back to training
    # (its statistics moved at the next training step), an MC-dropout layer stopped sampling.
    x = torch.randn(16, 6)
    for top in (True, False):
        model = _mixed_mode_model().train(top)
        model.stages[0][1 if top else 2].train(not top)
        before = {name: m.training for name, m in model.named_modules()}
        measure(model, x)
        assert {name: m.training for name, m in model.named_modules()} == before

"""FLOPs of the cost model (eeruntime/cost.py) against counts written out by hand.

Transformer layers used to count far too little: in eval mode without grad, nn.TransformerEncoderLayer
runs one fused op the FLOP counter does not know (0 FLOPs for a whole layer), and the unfused path's
attention runs a CPU kernel missing from torch's FLOP registry (the projections counted, not
Q K^T and A V). make demo-vit reported a FLOPs-ideal speed-up of 0.97x with 81% leaving at block 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import eeruntime as ee
from eeruntime.cost import measure_costs
from eeruntime.heads import SequenceHead


def linear_flops(rows, fan_in, fan_out):
    return 2 * rows * fan_in * fan_out


def encoder_layer_flops(S, d, ff):
    """Matmul FLOPs of one nn.TransformerEncoderLayer on one sequence of S tokens: the q/k/v and
    output projections, the two attention products, the two feed-forward layers."""
    return linear_flops(S, d, 3 * d) + 2 * (2 * S * S * d) + linear_flops(S, d, d) + 2 * linear_flops(S, d, ff)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layers_are_counted_with_their_fused_fast_path_on(norm_first):
    S, d, ff, C = 9, 16, 24, 5
    layers = [
        nn.TransformerEncoderLayer(d, 4, ff, dropout=0.0, batch_first=True, norm_first=norm_first) for _ in range(2)
    ]
    heads = [SequenceHead(d, C, pool="cls") for _ in range(2)]
    model = ee.MultiExitModel(layers, heads).eval()
    assert torch.backends.mha.get_fastpath_enabled()  # the eval/no-grad path that used to count 0
    costs = measure_costs(model, torch.randn(3, S, d))
    assert costs.stage_flops == [encoder_layer_flops(S, d, ff)] * 2
    assert costs.head_flops == [linear_flops(1, d, C)] * 2
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on afterwards
    # a row leaving at exit 0 runs half the layers: the ideal speed-up is above 1
    assert costs.ideal_speedup([1.0, 0.0]) == pytest.approx(costs.plain / costs.cumulative[0])
    assert costs.ideal_speedup([1.0, 0.0]) > 1.9


def test_fast_path_setting_is_restored_when_it_was_off():
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model = ee.MultiExitModel([layer], [SequenceHead(8, 3)]).eval()
        measure_costs(model, torch.randn(2, 4, 8))
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_digits_vit_blocks_are_counted():
    from eeruntime.zoo import digits_vit

    dim, depth = 32, 6
    costs = measure_costs(digits_vit(dim=dim, depth=depth).eval(), torch.rand(2, 1, 8, 8))
    block = encoder_layer_flops(17, dim, 2 * dim)  # 16 patch tokens + CLS, feed-forward 2*dim
    assert costs.stage_flops[1:] == [block] * (depth - 1)
    assert costs.stage_flops[0] > block  # the patch embedding rides with the first block

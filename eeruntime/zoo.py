"""Small multi-exit models used by the demo, the tests and the benchmarks."""
from __future__ import annotations

from torch import nn

from .model import MultiExitModel


def _pool_head(channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def digits_cnn(num_classes: int = 10, width: int = 16) -> MultiExitModel:
    """A three-stage CNN for 1x8x8 digits with two early exits; later stages are the costly ones."""
    w1, w2, w3 = width, 4 * width, 8 * width
    stages = [
        _conv_block(1, w1, pool=False),
        nn.Sequential(_conv_block(w1, w2, pool=False), _conv_block(w2, w2, pool=True)),
        nn.Sequential(_conv_block(w2, w3, pool=False), _conv_block(w3, w3, pool=True)),
    ]
    exits = [
        _pool_head(w1, num_classes),
        _pool_head(w2, num_classes),
        nn.Sequential(nn.Flatten(), nn.Linear(w3 * 2 * 2, num_classes)),
    ]
    return MultiExitModel(stages, exits)


def conv_net(num_exits: int = 4, in_channels: int = 3, width: int = 32, num_classes: int = 10) -> MultiExitModel:
    """A plain conv net of ``num_exits`` stages (each doubling width and halving resolution),
    a pool + linear exit after each: the benchmark model of the runtime suite."""
    stages, exits = [], []
    cin = in_channels
    for k in range(num_exits):
        cout = width * (2 ** k)
        stages.append(nn.Sequential(_conv_block(cin, cout, pool=False), _conv_block(cout, cout, pool=k > 0)))
        exits.append(_pool_head(cout, num_classes))
        cin = cout
    return MultiExitModel(stages, exits)

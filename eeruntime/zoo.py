"""Small multi-exit models used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn

from .heads import SequenceHead
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
    w1, w2, w3 = 2 * width, 4 * width, 8 * width
    stages = [
        _conv_block(1, w1, pool=False),
        nn.Sequential(_conv_block(w1, w2, pool=False), _conv_block(w2, w2, pool=True)),
        nn.Sequential(_conv_block(w2, w3, pool=False), _conv_block(w3, w3, pool=True)),
    ]
    # Both early exits pool to 2x2: a global pool leaves too little to classify digits, and a
    # coarse layout keeps the first exit honest (unsure about the hard digits, which go on).
    exits = [
        nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(w1 * 2 * 2, num_classes)),
        nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(w2 * 2 * 2, num_classes)),
        nn.Sequential(nn.Flatten(), nn.Linear(w3 * 2 * 2, num_classes)),
    ]
    return MultiExitModel(stages, exits)


def conv_net(num_exits: int = 4, in_channels: int = 3, width: int = 32, num_classes: int = 10) -> MultiExitModel:
    """A plain conv net of ``num_exits`` stages (each doubling width and halving resolution),
    a pool + linear exit after each: the benchmark model of the runtime suite."""
    stages, exits = [], []
    cin = in_channels
    for k in range(num_exits):
        cout = width * (2**k)
        stages.append(nn.Sequential(_conv_block(cin, cout, pool=False), _conv_block(cout, cout, pool=k > 0)))
        exits.append(_pool_head(cout, num_classes))
        cin = cout
    return MultiExitModel(stages, exits)


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv + BN, a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        return nn.functional.relu(self.body(x) + self.shortcut(x))


def resnet_style(
    num_classes: int = 1000,
    widths=(64, 128, 256, 512),
    blocks=(2, 2, 2, 2),
    in_channels: int = 3,
) -> MultiExitModel:
    """A ResNet-18-style net (the defaults) cut into ``len(widths)`` stages, a global-pool +
    linear exit after each: the benchmark model of the CUDA-graph suite.

    Stage 0 is the ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool) and ``blocks[0]`` basic
    blocks at ``widths[0]``; stage k > 0 is ``blocks[k]`` basic blocks at ``widths[k]``, the first
    with stride 2. Any input of at least 32x32 works (the heads pool globally).
    """
    widths, blocks = list(widths), list(blocks)
    if len(widths) != len(blocks) or not widths:
        raise ValueError(f"widths and blocks need the same non-zero length, got {len(widths)} and {len(blocks)}")
    stem = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    stages, exits = [], []
    cin = widths[0]
    for k, (w, n) in enumerate(zip(widths, blocks)):
        group = [_BasicBlock(cin if i == 0 else w, w, stride=2 if (k > 0 and i == 0) else 1) for i in range(n)]
        stages.append(nn.Sequential(stem, *group) if k == 0 else nn.Sequential(*group))
        exits.append(_pool_head(w, num_classes))
        cin = w
    return MultiExitModel(stages, exits)


class PatchTokens(nn.Module):
    """[B, C, H, W] images -> [B, 1 + (H/p)(W/p), dim] tokens: a learned CLS token, then a linear
    embedding of each p x p patch (row-major), plus learned position embeddings."""

    def __init__(self, patch: int, dim: int, image: int = 8, channels: int = 1):
        super().__init__()
        if image % patch:
            raise ValueError(f"patch size {patch} does not divide the image size {image}")
        self.patch = int(patch)
        self.proj = nn.Linear(channels * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.02)

    def forward(self, x):
        B, C = x.shape[:2]
        p = self.patch
        t = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, H/p, W/p, p, p]
        t = t.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * p * p)
        return torch.cat([self.cls.expand(B, -1, -1), self.proj(t)], dim=1) + self.pos


def digits_vit(num_classes: int = 10, dim: int = 32, depth: int = 6, heads: int = 4, patch: int = 2) -> MultiExitModel:
    """A tiny ViT for 1x8x8 digits, plain torch: 2x2 patches (16 tokens and a CLS token), ``depth``
    pre-norm ``nn.TransformerEncoderLayer`` blocks, one stage per block (the patch embedding rides
    with the first) and a CLS exit (:class:`~eeruntime.heads.SequenceHead`) after each, so PABEE's patience has exits to count."""
    blocks = [
        nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        for _ in range(depth)
    ]
    stages = [nn.Sequential(PatchTokens(patch, dim), blocks[0]), *blocks[1:]]
    return MultiExitModel(stages, [SequenceHead(dim, num_classes, pool="cls") for _ in range(depth)])


def vit_style(
    num_classes: int = 1000,
    image: int = 224,
    patch: int = 16,
    dim: int = 384,
    depth: int = 12,
    heads: int = 6,
    num_stages: int = 4,
    channels: int = 3,
) -> MultiExitModel:
    """A ViT (ViT-S/16 by default: 224x224 RGB, 16x16 patches, 384 wide, 12 pre-norm blocks of 6
    heads), plain torch, cut into ``num_stages`` stages of ``depth / num_stages`` blocks (the patch
    embedding rides with the first) with a CLS exit after each: the transformer model of the
    serving bench on a GPU, where a small batch leaves the GPU underused, so that re-batching
    survivors into fuller batches costs little more (E3's regime; docs/serving.md)."""
    if num_stages < 1 or depth % num_stages:
        raise ValueError(f"num_stages ({num_stages}) must be >= 1 and divide depth ({depth})")
    per = depth // num_stages
    blocks = [
        nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        for _ in range(depth)
    ]
    stages = [
        nn.Sequential(PatchTokens(patch, dim, image, channels), *blocks[:per]) if s == 0 else
        nn.Sequential(*blocks[s * per : (s + 1) * per])
        for s in range(num_stages)
    ]  # fmt: skip
    return MultiExitModel(stages, [SequenceHead(dim, num_classes, pool="cls") for _ in range(num_stages)])

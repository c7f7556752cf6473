"""Small models shared by the tests: a random MLP with an exit after every stage, and a
transformer-like stage / exit pair whose state is a (hidden, mask) tuple."""

import torch
from torch import nn

import eeruntime as ee


def mlp_model(K=3, d_in=6, width=12, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    stages, exits = [], []
    d = d_in
    for _ in range(K):
        stages.append(nn.Sequential(nn.Linear(d, width), nn.Tanh()))
        exits.append(nn.Linear(width, C))
        d = width
    m = ee.MultiExitModel(stages, exits)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5)
    return m.eval()


class TupleStage(nn.Module):
    """A transformer-like stage carrying (hidden, mask)."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h, mask):
        return torch.tanh(self.lin(h)) * mask.unsqueeze(-1), mask


class TupleExit(nn.Module):
    def __init__(self, d, C):
        super().__init__()
        self.lin = nn.Linear(d, C)

    def forward(self, h, mask):
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.lin(pooled) * 3

"""Model factories for the Ray Serve tests: replicas import them by name (``slow_models:...``),
so they live in a module of their own that imports nothing heavy."""

import time

from models import mlp_model
from torch import nn


class Sleep(nn.Module):
    """Wraps a stage and sleeps first: a slow tier, so a test can act while rows are in it."""

    def __init__(self, inner, seconds: float):
        super().__init__()
        self.inner = inner
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


def slow_mlp(delay_s: float = 0.5, slow_from: int = 1, **kwargs):
    """``models.mlp_model`` whose stages from ``slow_from`` on sleep ``delay_s`` per call."""
    m = mlp_model(**kwargs)
    for k in range(slow_from, len(m.stages)):
        m.stages[k] = Sleep(m.stages[k], delay_s)
    return m

"""Side-by-side timing: several variants of one job measured in the same run, so that their
ratios (speed-up, efficiency) mean something on a machine whose speed drifts."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(v: List[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2]


def median_seconds(fn: Callable[[], object], device, warmup: int = 2, iters: int = 7) -> float:
    """Median wall time of ``fn()``, with the device synchronised around every call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _median(times)


@dataclass
class SideBySide:
    """Seconds per call of each variant, one entry per round."""

    times: Dict[str, List[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return _median(self.times[name])

    def ratio(self, a: str, b: str) -> float:
        """time(a) / time(b): the median over rounds of each round's ratio. Paired, so a round
        that ran slow for every variant cancels out."""
        return _median([x / y for x, y in zip(self.times[a], self.times[b])])


def side_by_side(
    fns: Dict[str, Callable[[], object]], device, rounds: int = 60, warmup: int = 2, inner: int = 1
) -> SideBySide:
    """Time every variant once per round (``inner`` calls, the device synchronised around them).

    The order within a round cycles through every permutation of the variants: a heavy variant
    leaves caches and the allocator in a state that slows whatever runs next, so a fixed order
    (or a plain rotation of three) biases the one that most often follows it."""
    device = torch.device(device)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    orders = list(itertools.permutations(names))
    out = SideBySide({name: [] for name in names})
    for r in range(rounds):
        for name in orders[r % len(orders)]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            out.times[name].append((time.perf_counter() - t0) / inner)
    return out

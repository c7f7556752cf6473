"""What each stage step costs, learned online from the scheduler's own steps; ``policy="slo"``
sizes how long a row may wait for a fuller batch from it (docs/serving.md, "policy='slo'").

A step of stage k on n rows costs about ``a_k + b_k * n`` seconds on one machine: a fixed part
(kernel launches, Python, the exit decision) and a part per row. Both are fitted by
exponentially weighted least squares over the recent steps, so the estimate follows the machine
(another job, a thermal limit) within a few hundred steps.
"""

from __future__ import annotations

import math
from typing import List

DECAY = 0.99  # weight of the past per step: the fit follows about the last 100 steps of a stage
MIN_STEPS = 8  # a stage's estimate is used only once it has seen this many steps
MIN_SPREAD = 1.0  # rows: below this spread of batch sizes the per-row part is not identifiable


class StepCosts:
    """Online ``a_k + b_k * n`` fits of each stage step's seconds, and the remaining-path budget
    ``policy="slo"`` needs (read by the submitting threads without a lock: a stale float is fine)."""

    def __init__(self, num_stages: int, max_batch: int):
        self.num_stages, self.max_batch = num_stages, max_batch
        # per stage: the weighted sums of 1, n, n^2, t, n*t
        self._sums: List[List[float]] = [[0.0] * 5 for _ in range(num_stages)]
        self._steps = [0] * num_stages
        self.fixed_s = [0.0] * num_stages
        self.per_row_s = [0.0] * num_stages
        # seconds a row entering stage k still needs in the worst case: every stage from k on at a
        # full batch, plus one full step of the costliest stage that may run before it; inf until
        # every stage has an estimate (then a row never waits: no budget can be sized yet)
        self.path_s = [math.inf] * num_stages

    def add(self, k: int, n: int, seconds: float) -> None:
        s = self._sums[k]
        s[0] = DECAY * s[0] + 1.0
        s[1] = DECAY * s[1] + n
        s[2] = DECAY * s[2] + n * n
        s[3] = DECAY * s[3] + seconds
        s[4] = DECAY * s[4] + n * seconds
        self._steps[k] += 1
        w, sn, snn, st, snt = s
        var = snn * w - sn * sn  # w^2 times the weighted variance of n
        if var > MIN_SPREAD * w * w:
            b = max(0.0, (snt * w - sn * st) / var)
            a = max(0.0, (st - b * sn) / w)
        else:  # (almost) one batch size so far: all of it counts as fixed cost
            a, b = st / w, 0.0
        self.fixed_s[k], self.per_row_s[k] = a, b
        if self._steps[k] == MIN_STEPS or self._steps[k] % 16 == 0:
            self._update_path()

    def cost_s(self, k: int, n: int) -> float:
        """The estimated seconds of a step of stage ``k`` on ``n`` rows (0 before any step)."""
        return self.fixed_s[k] + self.per_row_s[k] * n

    def _update_path(self) -> None:
        if min(self._steps) < MIN_STEPS:
            return
        full = [self.cost_s(k, self.max_batch) for k in range(self.num_stages)]
        longest = max(full)
        path, acc = [0.0] * self.num_stages, 0.0
        for k in range(self.num_stages - 1, -1, -1):
            acc += full[k]
            path[k] = acc + longest
        self.path_s = path

    def as_dict(self) -> dict:
        return {
            "fixed_ms": [round(a * 1e3, 4) for a in self.fixed_s],
            "per_row_ms": [round(b * 1e3, 5) for b in self.per_row_s],
            "steps": list(self._steps),
            "path_ms": [round(p * 1e3, 3) if math.isfinite(p) else None for p in self.path_s],
        }

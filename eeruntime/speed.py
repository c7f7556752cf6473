"""One measurement of the plain model against one or more runtimes on the same inputs: the numbers
behind the demo's table and ``eeruntime time``.

Every variant (the plain backbone, each runtime and, optionally, each runtime's oracle) runs once
per round over the whole input in serving batches, the order cycling through all permutations
(:func:`eeruntime.timing.side_by_side`). A variant's time is its median over the rounds, and every
ratio in a table is a ratio of those medians, so each row's speed-up is exactly its plain time
divided by its own time, both from this one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .oracle import oracle_forward, plain_forward, plan_oracle
from .timing import side_by_side

PLAIN = "plain"


def chunks(x: torch.Tensor, batch: int) -> List[torch.Tensor]:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    return [x[i : i + batch] for i in range(0, x.shape[0], batch)]


@dataclass
class SpeedTable:
    """Median seconds per pass over the input of each variant, from one interleaved run.

    ``seconds[name]``: ``"plain"``, each runtime's name, and ``"<name> oracle"`` when measured.
    """

    seconds: Dict[str, float]
    samples: int
    batch: int
    rounds: int

    def per_sample(self, name: str) -> float:
        return self.seconds[name] / self.samples

    def speedup(self, name: str) -> float:
        """Plain time / ``name``'s time."""
        return self.seconds[PLAIN] / self.seconds[name]

    def efficiency(self, name: str) -> Optional[float]:
        """Oracle time / runtime time (None when the oracle was not measured)."""
        oracle = self.seconds.get(f"{name} oracle")
        return None if oracle is None else oracle / self.seconds[name]

    def method(self) -> str:
        return (
            f"median of {self.rounds} interleaved rounds (every variant once per round over all "
            f"{self.samples} samples in batches of {self.batch}, the order cycling through every "
            f"permutation); speed-up = plain time / row time"
        )


@torch.inference_mode()
def measure(
    model, runtimes: Dict[str, Any], x: torch.Tensor, batch: int, device, rounds: int = 60, oracle: bool = True
) -> SpeedTable:
    """Time ``model``'s plain forward and each runtime of ``runtimes`` (name -> ``EERuntime``)
    over ``x`` in batches of ``batch``, side by side. With ``oracle``, also each runtime's oracle
    (the same stages run on exactly the rows that reach them, see :mod:`eeruntime.oracle`)."""
    if PLAIN in runtimes:
        raise ValueError(f"{PLAIN!r} names the plain model; give the runtimes other names")
    parts = chunks(x, batch)
    fns: Dict[str, Callable[[], object]] = {PLAIN: lambda: [plain_forward(model, c) for c in parts]}
    for name, rt in runtimes.items():
        fns[name] = (lambda r: lambda: [r(c) for c in parts])(rt)
        if oracle:
            plans = [plan_oracle(c, rt.infer(c).exit_index, rt.num_exits) for c in parts]
            fns[f"{name} oracle"] = (lambda ps: lambda: [oracle_forward(model, p) for p in ps])(plans)
    t = side_by_side(fns, device, rounds=rounds)
    return SpeedTable({k: t.median(k) for k in t.times}, int(x.shape[0]), batch, rounds)

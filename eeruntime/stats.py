"""What the runtime has seen: exits per exit point, samples, time, and the cost they imply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .cost import CostModel


@dataclass
class RuntimeStats:
    exit_counts: List[int]
    samples: int = 0
    calls: int = 0
    wall_time_s: float = 0.0
    cost_model: Optional[CostModel] = field(default=None, repr=False)

    @property
    def exit_fractions(self) -> List[float]:
        if self.samples == 0:
            return [0.0] * len(self.exit_counts)
        return [c / self.samples for c in self.exit_counts]

    @property
    def expected_cost(self) -> Optional[float]:
        """Ideal FLOPs per sample at the exit fractions seen (None before any sample)."""
        if self.cost_model is None or self.samples == 0:
            return None
        return self.cost_model.expected(self.exit_fractions)

    @property
    def plain_cost(self) -> Optional[float]:
        return None if self.cost_model is None else float(self.cost_model.plain)

    @property
    def ideal_speedup(self) -> Optional[float]:
        if self.cost_model is None or self.samples == 0:
            return None
        return self.cost_model.ideal_speedup(self.exit_fractions)

    @property
    def measured_time_per_sample_s(self) -> Optional[float]:
        """Measured wall time per sample (host clock around each call)."""
        return self.wall_time_s / self.samples if self.samples else None

    def as_dict(self) -> dict:
        return {
            "exit_counts": list(self.exit_counts),
            "exit_fractions": self.exit_fractions,
            "samples": self.samples,
            "calls": self.calls,
            "wall_time_s": self.wall_time_s,
            "expected_cost_flops": self.expected_cost,
            "plain_cost_flops": self.plain_cost,
            "ideal_speedup": self.ideal_speedup,
            "measured_time_per_sample_s": self.measured_time_per_sample_s,
        }

    def __str__(self) -> str:
        fr = ", ".join(f"{f:.3f}" for f in self.exit_fractions)
        s = f"RuntimeStats(samples={self.samples}, exit_fractions=[{fr}]"
        if self.ideal_speedup is not None:
            s += f", ideal_speedup={self.ideal_speedup:.2f}x"
        return s + ")"

"""Plots of calibration results (matplotlib, Agg: no display needed, the global backend untouched)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pareto(points):
    from .calibration.search import pareto

    if not points:
        return []
    acc = np.array([p[1] for p in points], dtype=np.float64)
    cost = np.array([p[2] for p in points], dtype=np.float64)
    return [points[i] for i in pareto(acc, cost)]


def frontier(calibration, path, *, relative: bool = True, title=None):
    """Accuracy against expected cost of a :class:`~eeruntime.calibrate.Calibration`, as a PNG.

    Shows the candidates weighed (grey), the accuracy/cost frontier (the sweep's, or the Pareto
    points among the candidates for other methods), the final exit alone (every sample runs the
    whole model) and the chosen thresholds (a red star). ``relative``: cost as a fraction of the
    full model's, else in the calibration's cost unit. Returns the matplotlib ``Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for attr in ("candidates", "accuracy", "expected_cost", "plain_cost", "final_accuracy", "exit_costs"):
        if not hasattr(calibration, attr):
            raise TypeError(f"frontier needs a Calibration (from ee.calibrate), got {type(calibration).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"frontier writes a PNG; give a path ending in .png, got {str(path)!r}")
    scale = 1.0 / calibration.plain_cost if relative else 1.0
    unit = calibration.cost_unit

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cands = list(calibration.candidates or [])
    if cands:
        ax.scatter(
            [p[2] * scale for p in cands], [100 * p[1] for p in cands], s=6, c="0.7", label="candidates", zorder=1,
        )
    front = calibration.frontier if calibration.frontier else _pareto(cands)
    if front:
        ax.plot(
            [p[2] * scale for p in front], [100 * p[1] for p in front], "-o", ms=3, color="tab:blue",
            label="frontier", drawstyle="steps-post", zorder=2,
        )
    ax.plot(
        [calibration.exit_costs[-1] * scale], [100 * calibration.final_accuracy], "s", ms=8, color="tab:purple",
        label="final exit only", zorder=3,
    )
    ax.plot(
        [calibration.expected_cost * scale], [100 * calibration.accuracy], "*", ms=16, color="tab:red",
        markeredgecolor="k", label="chosen", zorder=4,
    )
    ax.set_xlabel("expected cost (fraction of the full model)" if relative else f"expected cost ({unit} per sample)")
    ax.set_ylabel("accuracy on the calibration data (%)")
    ax.set_title(title or f"{calibration.method} calibration, {calibration.criterion_name}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return fig

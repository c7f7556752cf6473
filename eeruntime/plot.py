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


def _fmt(t: float) -> str:
    return ("inf" if t > 0 else "-inf") if np.isinf(t) else f"{t:.3g}"


def _tolerance(ax, calibration, scale) -> None:
    """The goal the chosen point had to meet: the lowest accepted accuracy (methods with
    ``max_drop``) or the cost budget (method ``budget``)."""
    settings = calibration.settings or {}
    if calibration.method in ("accuracy", "sweep") and settings.get("max_drop") is not None:
        floor = 100 * (calibration.final_accuracy - float(settings["max_drop"]))
        ax.axhline(
            floor,
            ls="--",
            lw=1,
            color="tab:orange",
            zorder=1.5,
            label=f"tolerance: final exit - {100 * float(settings['max_drop']):.3g} pt",
        )
    elif calibration.method == "budget" and settings.get("budget_cost") is not None:
        ax.axvline(
            float(settings["budget_cost"]) * scale,
            ls="--",
            lw=1,
            color="tab:orange",
            zorder=1.5,
            label=f"budget: {float(settings['budget']):.3g} of the full model",
        )


def frontier(calibration, path, *, relative: bool = True, title=None):
    """Accuracy against expected cost of a :class:`~eeruntime.calibrate.Calibration`, as a PNG.

    Shows the candidates weighed (grey), the accuracy/cost frontier (the sweep's, or the Pareto
    points among the candidates for other methods), the final exit alone (every sample runs the
    whole model), the tolerance the choice had to meet (the lowest accepted accuracy for
    ``max_drop``, the cost budget for ``"budget"``, dashed) and the chosen point (a red star,
    annotated with its thresholds). Accuracy and cost are those on the calibration data, as the
    y axis and a note under the plot say. ``relative``: cost as a fraction of the
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
            [p[2] * scale for p in cands],
            [100 * p[1] for p in cands],
            s=6,
            c="0.7",
            label="candidates",
            zorder=1,
        )
    front = calibration.frontier if calibration.frontier else _pareto(cands)
    if front:
        ax.plot(
            [p[2] * scale for p in front],
            [100 * p[1] for p in front],
            "-o",
            ms=3,
            color="tab:blue",
            label="frontier",
            drawstyle="steps-post",
            zorder=2,
        )
    ax.plot(
        [calibration.exit_costs[-1] * scale],
        [100 * calibration.final_accuracy],
        "s",
        ms=8,
        color="tab:purple",
        label="final exit only",
        zorder=3,
    )
    _tolerance(ax, calibration, scale)
    cx, cy = calibration.expected_cost * scale, 100 * calibration.accuracy
    ax.plot([cx], [cy], "*", ms=16, color="tab:red", markeredgecolor="k", label="chosen", zorder=4)
    ax.annotate(
        "T = " + ", ".join(_fmt(t) for t in calibration.thresholds),
        (cx, cy),
        xytext=(8, -14),
        textcoords="offset points",
        fontsize=9,
        color="tab:red",
        gid="chosen thresholds",
        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
    )
    ax.set_xlabel("expected cost (fraction of the full model)" if relative else f"expected cost ({unit} per sample)")
    ax.set_ylabel("accuracy on the calibration split (%)")
    # The thresholds were chosen on these very samples: the plot's accuracy is optimistic, and
    # the test split's is what to report.
    fig.text(
        0.01,
        0.005,
        f"accuracy and cost on the calibration split ({calibration.num_samples} samples), not a test split",
        fontsize=7,
        color="0.35",
        ha="left",
        va="bottom",
        gid="split note",
    )
    ax.set_title(title or f"{calibration.method} calibration, {calibration.criterion_name}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout(rect=(0, 0.03, 1, 1))  # room for the split note
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return fig

"""ee.plot.frontier: a PNG with labelled axes, the candidates, the frontier and the chosen point."""

import copy

import matplotlib
import numpy as np
import pytest
import torch
from test_calibrate import synthetic_cache

import eeruntime as ee
from eeruntime import plot


def _artist(fig, label):
    ax = fig.axes[0]
    found = [a for a in ax.lines + ax.collections if a.get_label() == label]
    assert len(found) == 1, f"expected one artist labelled {label!r}"
    return found[0]


@pytest.mark.parametrize("method", ["sweep", "accuracy", "greedy"])
def test_frontier_png_marks_the_chosen_point(tmp_path, method):
    backend = matplotlib.get_backend()
    cache, _, _ = synthetic_cache(120, 3, seed=4)
    cal = ee.calibrate(None, cache, method, grid=12)
    path = tmp_path / "sub" / "frontier.png"
    fig = plot.frontier(cal, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(path))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert matplotlib.get_backend() == backend, "plotting must not switch the user's backend"
    ax = fig.axes[0]
    assert "cost" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
    chosen = _artist(fig, "chosen")
    assert chosen.get_xdata()[0] == pytest.approx(cal.relative_cost)
    assert chosen.get_ydata()[0] == pytest.approx(100 * cal.accuracy)
    frontier = _artist(fig, "frontier")
    xs, ys = np.asarray(frontier.get_xdata()), np.asarray(frontier.get_ydata())
    assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) > 0)  # undominated points, by cost
    if method == "sweep":
        assert len(xs) == len(cal.frontier)
    offsets = _artist(fig, "candidates").get_offsets()
    assert len(offsets) == len(cal.candidates)


def test_frontier_absolute_cost_and_bad_input(tmp_path):
    cache, _, _ = synthetic_cache(60, 3, seed=4)
    cal = ee.calibrate(None, cache, "sweep", grid=6)
    fig = plot.frontier(cal, tmp_path / "abs.png", relative=False)
    assert "custom" in fig.axes[0].get_xlabel()
    assert _artist(fig, "chosen").get_xdata()[0] == pytest.approx(cal.expected_cost)
    with pytest.raises(ValueError, match="ending in .png"):
        plot.frontier(cal, tmp_path / "f.jpg")
    with pytest.raises(TypeError, match="needs a Calibration"):
        plot.frontier({"accuracy": 1.0}, tmp_path / "f.png")


def _texts(fig):
    return [t.get_text() for t in fig.texts + fig.axes[0].texts]


@pytest.mark.parametrize("max_drop", [0.0, 0.02])
def test_frontier_shows_tolerance_thresholds_and_split(tmp_path, max_drop):
    cache, _, _ = synthetic_cache(200, 3, seed=5)
    cal = ee.calibrate(None, cache, "accuracy", max_drop=max_drop, grid=10)
    cal.thresholds = [0.25, float("inf")]  # an infinite threshold is printed as a word, not a number
    fig = plot.frontier(cal, tmp_path / "f.png")
    tol = _artist(fig, f"tolerance: final exit - {100 * max_drop:.3g} pt")
    # the dashed line sits at the lowest accepted accuracy: the final exit's minus max_drop
    assert np.allclose(tol.get_ydata(), 100 * (cal.final_accuracy - max_drop))
    assert "T = 0.25, inf" in _texts(fig)
    assert "calibration split" in fig.axes[0].get_ylabel()
    note = [t for t in _texts(fig) if "calibration split" in t]
    assert len(note) == 1 and f"({cal.num_samples} samples)" in note[0] and "not a test split" in note[0]


def test_frontier_budget_line_at_the_budget(tmp_path):
    cache, _, _ = synthetic_cache(200, 3, seed=5)
    cal = ee.calibrate(None, cache, "budget", budget=0.6, grid=10, scorer_epochs=20, progress=False)
    fig = plot.frontier(cal, tmp_path / "b.png")
    line = _artist(fig, "budget: 0.6 of the full model")
    assert np.allclose(line.get_xdata(), 0.6)  # relative cost axis: the budget as a fraction
    assert not [a for a in fig.axes[0].lines if a.get_label().startswith("tolerance")]


def _same(a, b):
    """Structural equality of a Calibration's fields (modules by their state)."""
    if isinstance(a, torch.nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def _undominated(points):
    """Brute force: the points no other point beats (accuracy >= and cost <=, one strict), one per
    distinct (accuracy, cost), by cost."""
    keep = {
        (p[2], p[1])
        for p in points
        if not any((q[1] >= p[1] and q[2] <= p[2]) and (q[1] > p[1] or q[2] < p[2]) for q in points)
    }
    return sorted(keep)


@pytest.mark.parametrize("method", ["sweep", "accuracy", "greedy", "budget"])
def test_frontier_leaves_the_calibration_as_it_was_and_plots_its_points(tmp_path, method):
    # The plot reads the calibration's lists (candidates, frontier, thresholds, settings) and must
    # neither sort nor convert them in place.
    cache, _, _ = synthetic_cache(150, 3, seed=6)
    kw = {"budget": 0.6, "scorer_epochs": 5, "progress": False} if method == "budget" else {}
    cal = ee.calibrate(None, cache, method, grid=8, **kw)
    cal.candidates = list(reversed(cal.candidates))  # the caller's order, not the cost order
    before = copy.deepcopy(cal)
    fig = plot.frontier(cal, tmp_path / "f.png")
    for name in vars(before):
        assert _same(getattr(cal, name), getattr(before, name)), name
    line = _artist(fig, "frontier")
    drawn = list(zip(np.asarray(line.get_xdata()).tolist(), np.asarray(line.get_ydata()).tolist()))
    scale = 1 / cal.plain_cost  # relative cost
    want = [(c * scale, 100 * a) for c, a in _undominated(cal.frontier or cal.candidates)]
    assert np.allclose(drawn, want)
    offsets = _artist(fig, "candidates").get_offsets()
    assert np.allclose(offsets, [(p[2] * scale, 100 * p[1]) for p in cal.candidates])

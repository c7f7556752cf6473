"""ee.plot.frontier: a PNG with labelled axes, the candidates, the frontier and the chosen point."""
import matplotlib
import numpy as np
import pytest

import eeruntime as ee
from eeruntime import plot

from test_calibrate import synthetic_cache


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

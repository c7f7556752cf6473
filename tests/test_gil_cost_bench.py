"""bench/gil_cost.py: the smoke run writes its JSON and markdown with every variant, the derived
ratios agree with the per-row figures they come from, and bad arguments are refused."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gil_cost  # noqa: E402  (bench/ on sys.path)


def test_quick_run_writes_every_variant(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gil_cost.py"), "--quick", "--out", str(tmp_path), "--tag=-t"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (js,) = tmp_path.glob("gil-cost-*-t.json")
    doc = json.loads(js.read_text())
    res = doc["results"]
    assert set(res) == set(gil_cost.VARIANTS)
    alone = res["alone"]["cpu_us_per_row"]
    assert alone > 0 and res["alone"]["events_per_s"] == 0
    for v in ("gil-held", "gil-free"):
        assert res[v]["events_per_s"] > 0  # the background thread ran
        assert res[v]["cpu_x_alone"] == pytest.approx(res[v]["cpu_us_per_row"] / alone)
        assert res[v]["wall_x_alone"] == pytest.approx(res[v]["wall_us_per_row"] / res["alone"]["wall_us_per_row"])
    md = js.with_suffix(".md").read_text()
    for v in gil_cost.VARIANTS:
        assert f"\n| {v} | " in md


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--rounds", "0"], ["--rate", "0"], ["--work-us", "-1"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        gil_cost.parse_args(argv)


def test_the_two_background_kinds_spend_their_work():
    """A held wake-up spends its work on this thread's CPU clock (Python, the GIL held); a free one
    hashes the calibrated number of bytes."""
    import time

    t = time.thread_time()
    gil_cost._spin(2000)
    assert time.thread_time() - t >= 2e-3
    bg = gil_cost.Background(rate=1000, work_us=100, held=False, bytes_per_us=1500.0)
    assert bg.nbytes == 150_000 and not bg.held

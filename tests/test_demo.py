"""A shortened run of the demo (`python -m eeruntime demo`) and the report it writes."""

import json
import math
import os
import re

import pytest
import torch

import eeruntime as ee
from eeruntime.data import load_digits_split
from eeruntime.demo import run, threshold_notes
from eeruntime.threads import default_threads
from eeruntime.zoo import digits_cnn


def _printed_rows(text):
    """Name -> (ms/sample, gain or None) of the printed table."""
    rows = {}
    for m in re.finditer(r"^(CNN \(plain\)|B-CNN \(\w+\))\s+[\d.]+\s+([\d.]+)\s+(-|[\d.]+x)\s", text, re.M):
        rows[m.group(1)] = (float(m.group(2)), None if m.group(3) == "-" else float(m.group(3)[:-1]))
    return rows


@pytest.mark.slow
def test_short_demo_report(tmp_path, capsys):
    out = tmp_path / "demo"
    summary, model = run(str(out), device="cpu", epochs=3, batch=128, progress=False, rounds=3, return_model=True)
    printed = capsys.readouterr().out
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report == summary
    # Every row's numbers come from the one measurement: gain = plain time / row time.
    seconds = report["timing"]["seconds"]
    table = {r["name"]: r for r in report["table"]}
    plain = table["CNN (plain)"]
    assert plain["time_per_sample"] == pytest.approx(seconds["plain"] / report["test_samples"], rel=1e-12)
    for name in ("accuracy", "greedy"):
        row = table[f"B-CNN ({name})"]
        assert row["time_per_sample"] == pytest.approx(seconds[name] / report["test_samples"], rel=1e-12)
        assert row["gain"] == pytest.approx(plain["time_per_sample"] / row["time_per_sample"], rel=1e-12)
    assert report["speedup_measured"] == pytest.approx(seconds["plain"] / seconds["accuracy"], rel=1e-12)
    assert report["efficiency"] == pytest.approx(seconds["accuracy oracle"] / seconds["accuracy"], rel=1e-12)
    assert report["greedy"]["speedup_measured"] == pytest.approx(seconds["plain"] / seconds["greedy"], rel=1e-12)
    # ...and so does the printed table, up to its rounding (4 decimals of ms, 2 of the gain)
    rows = _printed_rows(printed)
    assert set(rows) == {"CNN (plain)", "B-CNN (accuracy)", "B-CNN (greedy)"}, printed
    p_ms = rows["CNN (plain)"][0]
    for name in ("B-CNN (accuracy)", "B-CNN (greedy)"):
        r_ms, gain = rows[name]
        lo, hi = (p_ms - 5e-5) / (r_ms + 5e-5), (p_ms + 5e-5) / max(r_ms - 5e-5, 1e-9)
        assert lo - 0.005 <= gain <= hi + 0.005, (name, p_ms, r_ms, gain)
    assert "Time: median of 3 interleaved rounds" in printed and "speed-up = plain time / row time" in printed
    assert report["threads"] == default_threads() and f"{default_threads()} torch thread(s)" in printed
    for key in (
        "baseline_accuracy",
        "ee_accuracy",
        "thresholds",
        "exit_fractions",
        "speedup_measured",
        "speedup_ideal",
        "efficiency",
        "device",
    ):
        assert key in report, key
    assert report["device"] == "cpu"
    assert 0.0 <= report["baseline_accuracy"] <= 1.0 and 0.0 <= report["ee_accuracy"] <= 1.0
    assert len(report["thresholds"]) == 2 and len(report["exit_fractions"]) == 3
    assert math.isclose(sum(report["exit_fractions"]), 1.0, abs_tol=1e-6)
    assert report["speedup_measured"] > 0 and report["speedup_ideal"] >= 1.0 - 1e-9
    assert report["efficiency_flops"] == pytest.approx(report["speedup_measured"] / report["speedup_ideal"])
    assert os.path.getsize(report["frontier_png"]) > 1000
    # The report's accuracy and exits are those of EERuntime on the test split: recompute them.
    split = load_digits_split(seed=0)
    assert report["test_samples"] == len(split.y_test)
    res = ee.EERuntime(model, thresholds=[float(t) for t in report["thresholds"]]).infer(split.x_test)
    assert report["ee_accuracy"] == pytest.approx(float((res.logits.argmax(1) == split.y_test).float().mean()))
    fractions = torch.bincount(res.exit_index, minlength=3).double() / len(split.y_test)
    assert report["exit_fractions"] == pytest.approx(fractions.tolist())
    with torch.inference_mode():
        plain = model.exits[-1](model.forward_until(split.x_test, 2))
    assert report["baseline_accuracy"] == pytest.approx(float((plain.argmax(1) == split.y_test).float().mean()))

    for thresholds in (report["thresholds"], report["greedy"]["thresholds"]):  # inf explained in words
        for note in threshold_notes("entropy", [float(t) for t in thresholds]):
            assert note in printed


@pytest.mark.parametrize("criterion", ["entropy", "max_prob"])
@pytest.mark.parametrize("t", [float("inf"), float("-inf")])
def test_threshold_notes_say_what_the_runtime_does(criterion, t):
    """The words under the table match what EERuntime does with that threshold at exit 1."""
    torch.manual_seed(0)
    model = digits_cnn(width=2).eval()
    x = torch.rand(64, 1, 8, 8)
    res = ee.EERuntime(model, thresholds=[t, 0.5], criterion=criterion).infer(x)
    (note,) = threshold_notes(criterion, [t, 0.5])
    assert note.startswith(f"T = {'inf' if t > 0 else '-inf'} at exit 1: ")
    if "every sample that reaches exit 1 leaves there" in note:
        assert bool((res.exit_index == 0).all())
    else:
        assert "no sample leaves at exit 1 (it is switched off)" in note
        assert not bool((res.exit_index == 0).any())
    assert threshold_notes(criterion, [0.3, 0.5]) == []

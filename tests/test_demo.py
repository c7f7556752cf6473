"""A shortened run of the demo (`python -m eeruntime demo`) and the report it writes."""
import json
import math
import os

import pytest
import torch

import eeruntime as ee
from eeruntime.__main__ import main as cli_main
from eeruntime.data import load_digits_split
from eeruntime.demo import run


@pytest.mark.slow
def test_short_demo_report(tmp_path):
    out = tmp_path / "demo"
    summary, model = run(str(out), device="cpu", epochs=3, batch=128, progress=False, rounds=1, return_model=True)
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report == json.loads(json.dumps(summary))
    for key in ("baseline_accuracy", "ee_accuracy", "thresholds", "exit_fractions", "speedup_measured",
                "speedup_ideal", "efficiency", "device"):
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


def test_cli_rejects_unknown_command(capsys):
    assert cli_main(["nonsense"]) == 2
    assert "demo" in capsys.readouterr().out
    assert cli_main(["--help"]) == 0

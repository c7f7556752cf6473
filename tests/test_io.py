"""rt.save / ee.load: JSON + safetensors round trips, refusals, and no unpickling."""

import json
import math
import pickle

import pytest
import torch
from test_calibrate import tiny_data, tiny_model
from torch import nn

import eeruntime as ee
from eeruntime.calibrate import Calibration
from eeruntime.eenet import EENetScorer


def same_inference(rt_a, rt_b, x):
    a, b = rt_a.infer(x), rt_b.infer(x)
    return (
        torch.equal(a.exit_index, b.exit_index)
        and torch.equal(a.logits, b.logits)
        and torch.equal(a.confidence, b.confidence)
    )


def test_builtin_criterion_round_trip(tmp_path):
    model = tiny_model()
    x, y = tiny_data(model, N=200)
    cal = ee.calibrate(model, (x, y), "sweep", criterion="max_prob", final="average", progress=False)
    rt = cal.runtime(model)
    rt.set_thresholds([math.inf, cal.thresholds[1]])  # an "exit never" threshold must survive JSON
    rt.save(tmp_path / "rt")
    doc = json.loads((tmp_path / "rt" / "runtime.json").read_text())  # strict JSON: no Infinity literal
    assert doc["num_exits"] == 3 and doc["criterion"] == {"kind": "builtin", "name": "max_prob"}
    assert not (tmp_path / "rt" / "weights.safetensors").exists()
    back = ee.load(tmp_path / "rt", model)
    assert back.thresholds == rt.thresholds and back.criterion == "max_prob" and back.final == "average"
    assert back.calibration.to_dict() == cal.to_dict()
    assert same_inference(rt, back, x)
    # a path to the JSON file works too, and runtime kwargs override what was saved
    other = ee.load(tmp_path / "rt" / "runtime.json", model, final="last", thresholds=0.9)
    assert other.final == "last" and other.thresholds == [0.9, 0.9]


def test_eenet_scorer_round_trip_without_pickle(tmp_path, monkeypatch):
    model = tiny_model()
    x, y = tiny_data(model, N=200)
    cal = ee.calibrate(model, (x, y), "budget", budget=0.6, progress=False, scorer_epochs=60)
    rt = cal.runtime(model)
    rt.save(tmp_path / "rt")

    def no_unpickling(*a, **k):
        raise AssertionError("load must not unpickle anything")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    fresh = tiny_model()
    fresh.load_state_dict(model.state_dict())
    back = ee.load(tmp_path / "rt", fresh)
    assert isinstance(back.criterion, EENetScorer) and back.criterion is not cal.scorer
    for (name, a), (_, b) in zip(cal.scorer.state_dict().items(), back.criterion.state_dict().items()):
        assert torch.equal(a, b), name
    assert back.thresholds == rt.thresholds
    assert same_inference(rt, back, x)
    assert back.calibration.scorer is back.criterion and back.calibration.method == "budget"
    assert back.calibration.exit_fractions == cal.exit_fractions


def test_load_refuses_other_exit_counts_versions_and_foreign_files(tmp_path):
    model = tiny_model()
    rt = ee.EERuntime(model, thresholds=[0.5, 0.6], criterion="entropy")
    rt.save(tmp_path / "rt")
    with pytest.raises(ValueError, match="saved for a model with 3 exits, but this model has 4"):
        ee.load(tmp_path / "rt", tiny_model(K=4))
    path = tmp_path / "rt" / "runtime.json"
    doc = json.loads(path.read_text())
    for version, msg in [(2, "newer eeruntime"), ("1", "format version '1'"), (None, "format version None")]:
        path.write_text(json.dumps({**doc, "format_version": version}))
        with pytest.raises(ValueError, match=msg):
            ee.load(tmp_path / "rt", model)
    path.write_text(json.dumps({**doc, "format": "something.else"}))
    with pytest.raises(ValueError, match="not a saved eeruntime runtime"):
        ee.load(tmp_path / "rt", model)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ee.load(tmp_path / "rt", model)
    with pytest.raises(FileNotFoundError, match="no saved runtime"):
        ee.load(tmp_path / "missing", model)


class UserHead(nn.Module):
    per_exit = True

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, logits, state, k, history=()):
        return torch.sigmoid(self.lin(logits.float()))[:, 0]


def test_user_criteria_need_to_be_passed_back(tmp_path):
    model = tiny_model()
    x, _ = tiny_data(model, N=50)
    head = UserHead()
    rt = ee.EERuntime(model, thresholds=0.5, criterion=head)
    rt.save(tmp_path / "mod")
    with pytest.raises(ValueError, match="cannot rebuild; construct it and pass it"):
        ee.load(tmp_path / "mod", model)
    again = UserHead()  # fresh weights, replaced by the saved ones
    back = ee.load(tmp_path / "mod", model, criterion=again)
    assert torch.equal(again.lin.weight, head.lin.weight)
    assert same_inference(rt, back, x)
    with pytest.raises(ValueError, match="do not fit the criterion module"):
        ee.load(tmp_path / "mod", model, criterion=EENetScorer(3))

    def top(logits, state):
        return torch.softmax(logits, 1).amax(1)

    ee.EERuntime(model, thresholds=0.5, criterion=top).save(tmp_path / "fn")
    with pytest.raises(ValueError, match="callable criterion 'test_user_criteria_need_to_be_passed_back.<locals>.top'"):
        ee.load(tmp_path / "fn", model)
    assert ee.load(tmp_path / "fn", model, criterion=top).criterion is top


def test_saving_twice_replaces_the_previous_runtime(tmp_path):
    model = tiny_model()
    ee.EERuntime(model, thresholds=0.1, criterion="entropy").save(tmp_path / "rt")
    ee.EERuntime(model, thresholds=0.7, criterion="margin").save(tmp_path / "rt")
    back = ee.load(tmp_path / "rt", model)
    assert back.criterion == "margin" and back.thresholds == pytest.approx([0.7, 0.7])
    assert back.calibration is None


def test_calibration_summary_needs_its_scorer():
    d = {"criterion": "EENetScorer", "scorer_config": {"num_exits": 3, "top_k": 3, "hidden": 16}}
    with pytest.raises(ValueError, match="pass it as scorer="):
        Calibration.from_dict(d)


def test_confidence_head_criterion_is_rebuilt_from_the_model(tmp_path):
    train = getattr(ee, "train", None)
    if train is None or not hasattr(train, "confidence_criterion"):
        pytest.skip("ee.train.confidence_criterion is not available in this checkout")
    model = tiny_model()
    x, y = tiny_data(model, N=100)
    train.add_confidence_heads(model, num_classes=5)
    cal = ee.calibrate(
        model, (x, y), "accuracy", criterion=train.confidence_criterion(model), max_drop=0.05, progress=False
    )
    rt = cal.runtime(model)
    rt.save(tmp_path / "rt")
    doc = json.loads((tmp_path / "rt" / "runtime.json").read_text())
    assert doc["criterion"]["name"] == "confidence_criterion" and doc["weights"] is None  # weights are the model's
    back = ee.load(tmp_path / "rt", model)
    assert same_inference(rt, back, x)
    assert back.calibration.exit_fractions == cal.exit_fractions


def test_a_runtime_saved_by_format_version_1_still_loads():
    """tests/fixtures/runtime_v1_eenet was written by eeruntime at 68605db (the EENet scorer
    named by its module path, cls=...; made by tests/fixtures/make_runtime_v1_eenet.py) with the
    inference result it gave: loading it today must give the same scorer, thresholds and result."""
    from pathlib import Path

    from safetensors.torch import load_file

    here = Path(__file__).parent / "fixtures" / "runtime_v1_eenet"
    back = ee.load(here, tiny_model())
    doc = json.loads((here / "runtime.json").read_text())
    assert isinstance(back.criterion, EENetScorer) and back.thresholds == doc["thresholds"]
    assert back.calibration.method == "budget" and back.calibration.scorer is back.criterion
    want = load_file(str(here / "expected.safetensors"))
    res = back.infer(want["x"])
    assert torch.equal(res.exit_index, want["exit_index"])
    torch.testing.assert_close(res.logits, want["logits"])
    torch.testing.assert_close(res.confidence, want["confidence"])


def test_a_learned_criterion_is_saved_by_its_registered_name(tmp_path):
    """The file names the EENet scorer "eenet" (its registered name), never a module path, and
    loading goes through the registry."""
    from eeruntime.criteria import LEARNED_CRITERIA

    model = tiny_model()
    scorer = EENetScorer(num_exits=3)
    ee.EERuntime(model, thresholds=[0.5, 0.5], criterion=scorer).save(tmp_path / "rt")
    entry = json.loads((tmp_path / "rt" / "runtime.json").read_text())["criterion"]
    assert entry["kind"] == "module" and entry["registered"] == "eenet" and "cls" not in entry
    assert LEARNED_CRITERIA["eenet"] is EENetScorer
    back = ee.load(tmp_path / "rt", model)
    assert isinstance(back.criterion, EENetScorer)
    for (name, a), (_, b) in zip(scorer.state_dict().items(), back.criterion.state_dict().items()):
        assert torch.equal(a, b), name

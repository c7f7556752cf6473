"""ee.load on files that are not what rt.save wrote: every field of runtime.json broken in turn
(wrong types, missing, out of range, huge sizes), binary and truncated files. Each must fail with
an error naming the file and the field, before anything is built (no model call, no allocation
from a size in the file), and a valid file must still load."""

import copy
import json
import math

import pytest
from test_calibrate import tiny_data, tiny_model

import eeruntime as ee
from eeruntime.bundle_schema import BadFile, check_runtime_doc, check_safetensors
from eeruntime.eenet import EENetScorer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A learned-criterion runtime with a calibration summary, saved once: (dir, doc, model)."""
    d = tmp_path_factory.mktemp("rt")
    model = tiny_model()
    x, y = tiny_data(model, N=120)
    cal = ee.calibrate(model, (x, y), "budget", budget=0.6, progress=False, scorer_epochs=5)
    cal.runtime(model).save(d / "rt")
    return d / "rt", json.loads((d / "rt" / "runtime.json").read_text()), model


def write(dirpath, doc):
    (dirpath / "runtime.json").write_text(json.dumps(doc))


def set_path(doc, path, value):
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


DELETE = object()
# (path into the document, bad value, words the error must contain besides the file name)
BROKEN = [
    (("num_exits",), "3", "'num_exits'"),
    (("num_exits",), 3.0, "'num_exits'"),
    (("num_exits",), True, "'num_exits'"),
    (("num_exits",), -1, "'num_exits'"),
    (("num_exits",), 10**12, "'num_exits'"),
    (("num_exits",), DELETE, "'num_exits' is missing"),
    (("thresholds",), 0.5, "'thresholds'"),
    (("thresholds",), {"0": 0.5}, "'thresholds'"),
    (("thresholds",), ["0.5", 0.2], "'thresholds[0]'"),
    (("thresholds",), [None, 0.2], "'thresholds[0]'"),
    (("thresholds",), [True, 0.2], "'thresholds[0]'"),
    (("thresholds",), ["nan", 0.2], "'thresholds[0]'"),
    (("thresholds",), [0.2], "'thresholds' has 1 items"),
    (("thresholds",), DELETE, "'thresholds' is missing"),
    (("final",), "mean", "'final'"),
    (("final",), None, "'final'"),
    (("criterion",), "entropy", "'criterion'"),
    (("criterion", "kind"), "plugin", "'criterion.kind'"),
    (("criterion", "kind"), DELETE, "'criterion.kind' is missing"),
    (("criterion", "cls"), 7, "'criterion.cls'"),
    (("criterion", "registered"), 7, "'criterion.registered'"),
    (("criterion", "config"), [3, 3, 16], "'criterion.config'"),
    (("criterion", "config", "hidden"), -4, "'criterion.config.hidden'"),
    (("criterion", "config", "hidden"), 10**13, "'criterion.config.hidden'"),
    (("criterion", "config", "top_k"), 2.5, "'criterion.config.top_k'"),
    (("criterion", "config", "num_exits"), 7, "'criterion.config.num_exits'"),
    (("criterion", "config", "top_k"), DELETE, "'criterion.config.top_k' is missing"),
    (("criterion", "per_exit"), "yes", "'criterion.per_exit'"),
    (("weights",), None, "'weights' is null but the criterion is a learned module"),
    (("weights",), "../../etc/passwd.safetensors", "'weights'"),
    (("weights",), 12, "'weights'"),
    (("calibration",), [], "'calibration'"),
    (("calibration", "thresholds"), [0.1], "'calibration.thresholds'"),
    (("calibration", "exit_fractions"), [0.5, 0.5, 2.0], "'calibration.exit_fractions[2]'"),
    (("calibration", "accuracy"), "high", "'calibration.accuracy'"),
    (("calibration", "num_samples"), -5, "'calibration.num_samples'"),
    (("calibration", "exit_costs"), DELETE, "'calibration.exit_costs' is missing"),
    (("calibration", "candidates"), [[[0.1], 0.5, 1.0]], "'calibration.candidates[0][0]'"),
    (("calibration", "grid"), [["x"], [0.1]], "'calibration.grid[0][0]'"),
    (("calibration", "settings"), "fast", "'calibration.settings'"),
]


@pytest.mark.parametrize(
    "path, value, words",
    BROKEN,
    ids=[f"{'.'.join(p)}={v if v is not DELETE else 'missing'}"[:40] for p, v, _ in BROKEN],
)
def test_each_broken_field_is_named(saved, tmp_path, monkeypatch, path, value, words):
    src, doc, model = saved
    (tmp_path / "weights.safetensors").write_bytes((src / "weights.safetensors").read_bytes())
    write(tmp_path, set_path(doc, path, value))
    built = []
    monkeypatch.setattr(
        EENetScorer, "__init__", lambda *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError)
    )
    with pytest.raises(ValueError) as info:
        ee.load(tmp_path, model)
    msg = str(info.value)
    assert str(tmp_path / "runtime.json") in msg and words in msg and "accepted" in msg, msg
    assert not built  # refused before any criterion was constructed


def test_the_valid_file_still_loads(saved, tmp_path):
    src, doc, model = saved
    assert check_runtime_doc(doc, "x") is doc
    back = ee.load(src, model)
    assert isinstance(back.criterion, EENetScorer) and back.calibration is not None


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xfe{\x00}\x00", bytes(range(256))])
def test_binary_file(tmp_path, content):
    (tmp_path / "runtime.json").write_bytes(content)
    with pytest.raises(ValueError, match="is not UTF-8 text") as info:
        ee.load(tmp_path, tiny_model())
    assert str(tmp_path / "runtime.json") in str(info.value)


@pytest.mark.parametrize(
    "text", ["", "[1, 2, 3]", "null", '"eeruntime.runtime"', "{" * 100000, '{"format": "eeruntime.runtime",']
)
def test_not_a_json_object(tmp_path, text):
    (tmp_path / "runtime.json").write_text(text)
    with pytest.raises(ValueError) as info:
        ee.load(tmp_path, tiny_model())
    assert str(tmp_path / "runtime.json") in str(info.value)


def test_truncated_or_foreign_weights(saved, tmp_path):
    src, doc, model = saved
    good = (src / "weights.safetensors").read_bytes()
    write(tmp_path, doc)
    cuts = [0, 4, 8, 20, len(good) // 2, len(good) - 1]
    for cut in cuts:
        (tmp_path / "weights.safetensors").write_bytes(good[:cut])
        with pytest.raises(ValueError) as info:
            ee.load(tmp_path, model)
        assert str(tmp_path / "weights.safetensors") in str(info.value), (cut, str(info.value))
    # a header that promises 2**40 elements in a small file: refused by arithmetic, not by the allocator
    header = json.dumps(
        {"heads.0.0.weight": {"dtype": "F64", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 8 << 40]}}
    ).encode()
    (tmp_path / "weights.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        check_safetensors(tmp_path / "weights.safetensors")
    (tmp_path / "weights.safetensors").write_bytes(good)
    assert ee.load(tmp_path, model).criterion is not None


def test_infinite_thresholds_still_round_trip(tmp_path):
    model = tiny_model()
    rt = ee.EERuntime(model, thresholds=[math.inf, -math.inf], criterion="max_prob")
    rt.save(tmp_path / "rt")
    assert ee.load(tmp_path / "rt", model).thresholds == [math.inf, -math.inf]
    with pytest.raises(BadFile):
        check_runtime_doc(
            {**json.loads((tmp_path / "rt" / "runtime.json").read_text()), "thresholds": ["Infinity", 1]}, "f"
        )

"""rt.save(path, weights=True) / ee.load(path, factory): the model rebuilt from its constructor and
the saved weights, in a fresh process, with clear refusals for a constructor that does not fit."""

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import eeruntime as ee
from eeruntime.bundle_schema import BadFile
from eeruntime.zoo import digits_cnn

ROOT = Path(__file__).resolve().parents[1]


def perturbed_digits(seed=0):
    """A digits model whose weights and batch-norm statistics differ from a fresh factory's, so a
    load that forgot a tensor (or the buffers) gives different outputs."""
    torch.manual_seed(seed)
    model = digits_cnn()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1)
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
    return model


def test_bundle_round_trip_in_a_fresh_process(tmp_path):
    model = perturbed_digits()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = ee.EERuntime(model, thresholds=[0.6, 0.3], criterion="entropy", final="average")
    rt.save(tmp_path / "bundle", weights=True, factory="eeruntime.zoo:digits_cnn")
    for k, v in model.state_dict().items():  # saving never writes the caller's model
        assert torch.equal(v, before[k]), k
    x = torch.randn(64, 1, 8, 8)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = textwrap.dedent(
        f"""
        import pickle, torch
        from safetensors.torch import load_file, save_file
        def refuse(*a, **k):
            raise AssertionError("load must not unpickle")
        pickle.load = pickle.loads = torch.load = refuse
        import eeruntime as ee
        rt = ee.load({str(tmp_path / "bundle")!r}, "eeruntime.zoo:digits_cnn")
        assert rt.final == "average" and rt.thresholds == [0.6, 0.3], (rt.final, rt.thresholds)
        res = rt.infer(load_file({str(tmp_path / "x.safetensors")!r})["x"])
        save_file({{"logits": res.logits, "exit": res.exit_index}}, {str(tmp_path / "out.safetensors")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(tmp_path / "out.safetensors"))
    want = rt.infer(x)
    assert torch.equal(got["exit"], want.exit_index)
    torch.testing.assert_close(got["logits"], want.logits)
    # the factory alone (fresh random weights) gives other logits: the weights really came back
    assert not torch.allclose(digits_cnn()(x)[-1], model(x)[-1])


def test_callable_factory_and_a_user_module(tmp_path, monkeypatch):
    model = perturbed_digits(1)
    rt = ee.EERuntime(model, thresholds=0.4, criterion="max_prob")
    factory = functools.partial(digits_cnn, width=16)
    rt.save(tmp_path / "b", weights=True)
    back = ee.load(tmp_path / "b", factory)
    assert back.model is not model
    for (k, a), (_, b) in zip(model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), k
    # a "module:factory" name from the user's own module
    (tmp_path / "my_models.py").write_text(
        "from eeruntime.zoo import digits_cnn\ndef build():\n    return digits_cnn()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.randn(20, 1, 8, 8)
    assert torch.equal(ee.load(tmp_path / "b", "my_models:build").infer(x).logits, rt.infer(x).logits)
    # a module passed as before is used as given: the bundle's weights do not overwrite it
    other = digits_cnn()
    kept = {k: v.clone() for k, v in other.state_dict().items()}
    assert ee.load(tmp_path / "b", other).model is other
    assert all(torch.equal(v, kept[k]) for k, v in other.state_dict().items())


def test_factory_that_does_not_fit_is_refused_with_names(tmp_path):
    ee.EERuntime(perturbed_digits(), thresholds=0.5).save(tmp_path / "b", weights=True, factory=digits_cnn)
    with pytest.raises(
        ValueError,
        match=r"saved from 'eeruntime.zoo:digits_cnn'.*shape differs: stages.0.0.weight: "
        r"saved \[32, 1, 3, 3\], model \[16, 1, 3, 3\]",
    ):
        ee.load(tmp_path / "b", functools.partial(digits_cnn, width=8))
    with pytest.raises(
        ValueError, match=r"not in the bundle: stages.0.0.0.weight.*not in the model: stages.0.0.weight"
    ):
        ee.load(tmp_path / "b", lambda: ee.zoo.conv_net(num_exits=3, in_channels=1))
    with pytest.raises(ValueError, match="'module:factory' string"):
        ee.load(tmp_path / "b", "eeruntime.zoo.digits_cnn")
    with pytest.raises(ValueError, match="cannot import the model factory's module 'no_such_mod'"):
        ee.load(tmp_path / "b", "no_such_mod:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        ee.load(tmp_path / "b", "eeruntime.zoo:nope")
    with pytest.raises(TypeError, match="returned a int, not a torch.nn.Module"):
        ee.load(tmp_path / "b", lambda: 3)
    ee.EERuntime(perturbed_digits(), thresholds=0.5).save(tmp_path / "nw")
    with pytest.raises(ValueError, match="holds no model weights"):
        ee.load(tmp_path / "nw", digits_cnn)
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model weights .* are missing"):
        ee.load(tmp_path / "b", digits_cnn)


def tied_model():
    """Two exits sharing one classifier layer (a tied weight appears twice in the state dict)."""
    head = torch.nn.Linear(6, 3)
    stages = [torch.nn.Linear(4, 6), torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh())]
    return ee.MultiExitModel(stages, [head, head])


def test_tied_weights_save_and_load(tmp_path):
    torch.manual_seed(3)
    model = tied_model()
    rt = ee.EERuntime(model, thresholds=0.5)
    rt.save(tmp_path / "b", weights=True)
    torch.manual_seed(4)
    back = ee.load(tmp_path / "b", tied_model)
    assert back.model.exits[0].weight is back.model.exits[1].weight
    x = torch.randn(10, 4)
    assert torch.equal(back.infer(x).logits, rt.infer(x).logits)


@pytest.fixture
def bundle(tmp_path):
    """A digits bundle saved with its weights: (dir, runtime, inputs)."""
    rt = ee.EERuntime(perturbed_digits(7), thresholds=[0.6, 0.3])
    rt.save(tmp_path / "b", weights=True, factory="eeruntime.zoo:digits_cnn")
    return tmp_path / "b", rt, torch.randn(12, 1, 8, 8)


def counting_factory():
    calls = []

    def factory():
        calls.append(1)
        return digits_cnn()

    return factory, calls


def test_a_broken_model_weights_file_is_refused_by_name_before_the_factory_runs(bundle):
    """model.safetensors truncated, foreign, or holding other tensors than runtime.json describes
    (another save's, edited): a ValueError naming the file, not the reader's SafetensorError or
    load_state_dict's RuntimeError, and the factory never called."""
    d, rt, x = bundle
    path = d / "model.safetensors"
    good = path.read_bytes()
    tensors = load_file(str(path))
    other = dict(tensors, **{"stages.0.0.weight": torch.zeros(16, 1, 3, 3)})
    fewer = {k: v for k, v in tensors.items() if k != "stages.0.0.weight"}
    more = dict(tensors, bogus=torch.zeros(3))
    wider = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    cases = [good[:0], good[:4], good[:100], good[: len(good) // 2], good[:-1], b"not safetensors" * 50]
    for t in (other, fewer, more, wider):
        save_file(t, str(path))
        cases.append(path.read_bytes())
    for i, content in enumerate(cases):
        path.write_bytes(content)
        factory, calls = counting_factory()
        with pytest.raises(ValueError) as info:
            ee.load(d, factory)
        assert str(path) in str(info.value) and not calls, (i, str(info.value))
    path.write_bytes(good)
    assert torch.equal(ee.load(d, "eeruntime.zoo:digits_cnn").infer(x).logits, rt.infer(x).logits)


MODEL_SECTION = [
    ("model", "x", "'model'"),
    ("model", {}, "'model.weights' is missing"),
    ("weights", None, "'model.weights'"),
    ("weights", "../b/model.safetensors", "'model.weights'"),
    ("weights", "/etc/passwd", "'model.weights'"),
    ("tensors", [1, 2], "'model.tensors'"),
    ("tensors", {"stages.0.0.weight": {}}, "'model.tensors[\"stages.0.0.weight\"].shape' is missing"),
    ("tensors", {"stages.0.0.weight": {"shape": "32,1,3,3", "dtype": "float32"}}, ".shape'"),
    ("tensors", {"stages.0.0.weight": {"shape": [32, -1], "dtype": "float32"}}, ".shape[1]'"),
    ("factory", 3, "'model.factory'"),
]


@pytest.mark.parametrize("key, value, words", MODEL_SECTION, ids=[f"{k}={v}"[:30] for k, v, _ in MODEL_SECTION])
def test_each_broken_field_of_the_model_section_is_named(bundle, key, value, words):
    """The model section of runtime.json is checked like the rest of the file: a BadFile naming
    the field, not a KeyError/TypeError, and a weights name is never a path (no reading outside
    the bundle)."""
    d, _, _ = bundle
    doc = json.loads((d / "runtime.json").read_text())
    if key == "model":
        doc["model"] = value
    else:
        doc["model"][key] = value
    (d / "runtime.json").write_text(json.dumps(doc))
    factory, calls = counting_factory()
    with pytest.raises(BadFile) as info:
        ee.load(d, factory)
    msg = str(info.value)
    assert str(d / "runtime.json") in msg and words in msg and "accepted" in msg, msg
    assert not calls


def test_two_runtimes_saved_as_json_files_in_one_folder_keep_their_own_weights(tmp_path):
    """rt.save("a.json", weights=True) then rt.save("b.json", weights=True) in one folder: each
    loads its own model (both used to write model.safetensors, so a.json loaded b's weights)."""
    x = torch.randn(12, 1, 8, 8)
    rts = {name: ee.EERuntime(perturbed_digits(seed), thresholds=[0.6, 0.3]) for seed, name in enumerate("ab")}
    for name, rt in rts.items():
        rt.save(tmp_path / f"{name}.json", weights=True)
    for name, rt in rts.items():
        back = ee.load(tmp_path / f"{name}.json", digits_cnn)
        assert torch.equal(back.infer(x).logits, rt.infer(x).logits), name


class UnsavableCriterion(torch.nn.Module):
    """A learned criterion whose config is not JSON: its save fails after the weights are written."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(10, 1)

    def forward(self, logits, state):
        return torch.sigmoid(self.lin(logits))[:, 0]

    def to_config(self):
        return {"scale": torch.tensor(1.0)}


def test_a_failed_save_leaves_the_previous_bundle_as_it_was(bundle):
    """A save that fails midway over a good bundle: every file keeps its bytes (the model weights
    used to be overwritten before the JSON failed, so the old JSON then loaded the new weights),
    the bundle loads as before, and no temporary file is left."""
    d, rt, x = bundle
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    other = ee.EERuntime(perturbed_digits(8), thresholds=[0.6, 0.3], criterion=UnsavableCriterion())
    with pytest.raises(TypeError, match="not JSON serializable"):
        other.save(d, weights=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert torch.equal(ee.load(d, digits_cnn).infer(x).logits, rt.infer(x).logits)
    # a save into a new folder that fails leaves no folder behind
    with pytest.raises(TypeError):
        other.save(d.parent / "new" / "b", weights=True)
    assert not (d.parent / "new" / "b").exists()


def test_save_returns_the_json_path_and_the_weights_are_as_readable_as_it(bundle, tmp_path):
    d, rt, _ = bundle
    assert rt.save(tmp_path / "again", weights=True) == tmp_path / "again" / "runtime.json"
    json_mode = os.stat(d / "runtime.json").st_mode & 0o777
    assert os.stat(d / "model.safetensors").st_mode & 0o777 == json_mode  # safetensors alone writes 0600

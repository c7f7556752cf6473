"""rt.save(path, weights=True) / ee.load(path, factory): the model rebuilt from its constructor and
the saved weights, in a fresh process, with clear refusals for a constructor that does not fit."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import eeruntime as ee
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

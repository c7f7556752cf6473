"""A shortened run of `python -m eeruntime demo-vit`: the tiny ViT trained with exits, its table
rows recomputed from the returned model, and PABEE per row never later than the whole-batch rule."""

import json
import math

import pytest
import torch

import eeruntime as ee
from eeruntime.__main__ import main as cli_main
from eeruntime.data import load_digits_split
from eeruntime.demo_vit import run
from eeruntime.exit_rules import Patience, whole_batch_patience
from eeruntime.zoo import PatchTokens, digits_vit


def test_patch_tokens_are_the_image_patches():
    emb = PatchTokens(2, 4)
    with torch.no_grad():
        emb.proj.weight.copy_(torch.eye(4))
        emb.proj.bias.zero_()
        emb.pos.zero_()
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    t = emb(x)
    assert t.shape == (2, 17, 4)
    assert torch.equal(t[:, 0], torch.zeros(2, 4))
    for i in range(4):
        for j in range(4):
            patch = x[:, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 4)
            assert torch.equal(t[:, 1 + 4 * i + j], patch)
    assert digits_vit(depth=3).num_exits == 3
    with pytest.raises(ValueError, match="does not divide"):
        PatchTokens(3, 4)


@pytest.mark.slow
def test_short_demo_vit_report(tmp_path):
    out = tmp_path / "vit"
    summary, model = run(
        str(out), device="cpu", epochs=1, batch=128, progress=False, rounds=1, depth=3, max_drop=0.05, return_model=True
    )
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report == json.loads(json.dumps(summary))
    P = report["patience"]
    rows = report["rows"]
    assert set(rows) == {
        "entropy (accuracy)",
        "entropy (greedy)",
        f"PABEE per row (P={P})",
        f"PABEE whole batch, HF (P={P})",
    }
    split = load_digits_split(seed=0)
    x, y = split.x_test, split.y_test
    for name, criterion in (("entropy (accuracy)", "entropy"), (f"PABEE per row (P={P})", Patience())):
        r = rows[name]
        assert math.isclose(sum(r["exit_fractions"]), 1.0, abs_tol=1e-6)
        assert r["speedup_measured"] > 0 and r["efficiency"] > 0 and r["speedup_ideal"] > 0
        res = ee.EERuntime(model, thresholds=[float(t) for t in r["thresholds"]], criterion=criterion).infer(x)
        assert r["ee_accuracy"] == pytest.approx(float((res.logits.argmax(1) == y).float().mean()))
        assert r["exit_fractions"] == pytest.approx(
            (torch.bincount(res.exit_index, minlength=3).double() / len(y)).tolist()
        )
    # HF's rule: each serving batch leaves at one exit, never before any of its rows would alone
    per_row = ee.EERuntime(model, thresholds=float(P), criterion=Patience()).infer(x).exit_index
    whole = rows[f"PABEE whole batch, HF (P={P})"]
    ks = [whole_batch_patience(model, x[i : i + 128], P)[1] for i in range(0, len(y), 128)]
    assert whole["mean_blocks_run"] == pytest.approx(
        1 + sum(k * len(y[i : i + 128]) for k, i in zip(ks, range(0, len(y), 128))) / len(y)
    )
    for k, i in zip(ks, range(0, len(y), 128)):
        assert (per_row[i : i + 128] <= k).all()
    assert rows[f"PABEE per row (P={P})"]["mean_blocks_run"] <= whole["mean_blocks_run"]
    with torch.inference_mode():
        plain = model.exits[-1](model.forward_until(x, 2))
    assert report["baseline_accuracy"] == pytest.approx(float((plain.argmax(1) == y).float().mean()))


def test_cli_lists_demo_vit(capsys):
    assert cli_main(["--help"]) == 0
    assert "demo-vit" in capsys.readouterr().out


def test_vit_style_stages_and_exits_run_as_the_per_sample_loop():
    from reference import per_sample_loop

    from eeruntime.zoo import vit_style

    torch.manual_seed(0)
    model = vit_style(num_classes=5, image=16, patch=8, dim=16, depth=4, heads=2, num_stages=2).eval()
    assert model.num_exits == 2 and len(model.stages[0]) == 3 and len(model.stages[1]) == 2
    x = torch.randn(9, 3, 16, 16)
    rt = ee.EERuntime(model, thresholds=[1.57], criterion="entropy")
    res = rt.infer(x)
    assert 0 < int((res.exit_index == 0).sum()) < 9  # both exits serve rows
    ref_logits, ref_exit, near = per_sample_loop(model, x, [1.57], "entropy", "last")
    clear = near > 1e-6
    assert torch.equal(res.exit_index[clear], ref_exit[clear])
    torch.testing.assert_close(res.logits.double()[clear], ref_logits[clear], atol=1e-4, rtol=1e-4)
    for bad in (5, 0):
        with pytest.raises(ValueError, match="must be >= 1 and divide depth"):
            vit_style(depth=12, num_stages=bad)

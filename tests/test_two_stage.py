"""DeeBERT's two-stage highway training: stage 1 moves only the backbone and the final exit,
stage 2 only the early exits; each leaves the other side bit-identical (weights and BatchNorm
buffers), and the whole equals its two halves run one after the other."""

import pytest
import torch
from torch import nn

import eeruntime as ee
from eeruntime.data import Batches


def bn_model(seed=0):
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU()) for _ in range(1)]
    stages += [nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()) for _ in range(2)]
    exits = [nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2)]
    exits.append(nn.Linear(16, 3))
    return ee.MultiExitModel(stages, exits)


def data(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Batches(x, y, batch_size=64, seed=seed), x, y


def split(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    early = {
        k: v for k, v in sd.items() if k.startswith("exits.") and not k.startswith(f"exits.{len(model.exits) - 1}.")
    }
    backbone = {k: v for k, v in sd.items() if k not in early}
    return backbone, early


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_stage_moves_only_its_side():
    model = bn_model()
    batches, x, y = data()
    bb0, ee0 = split(model)
    h1, h2 = ee.train.two_stage(model, batches, epochs=3, lr=1e-2, only="backbone", seed=0, progress=False)
    assert h2 is None and len(h1.loss) == 3
    bb1, ee1 = split(model)
    assert same(ee1, ee0)  # stage 1: highways (weights and BN running stats) untouched
    assert not same(bb1, bb0)
    assert any(not torch.equal(bb1[k], bb0[k]) for k in bb0 if "running_mean" in k)  # backbone BN trained
    flags = [p.requires_grad for p in model.parameters()]
    h1, h2 = ee.train.two_stage(model, batches, epochs=1, lr=1e-2, exit_epochs=3, only="exits", seed=0, progress=False)
    assert h1 is None and set(h2.terms) == {"ce_0", "ce_1"}
    bb2, ee2 = split(model)
    assert same(bb2, bb1)  # stage 2: backbone and final exit bit-identical
    assert not same(ee2, ee1)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training and all(m.training for m in model.modules())
    # the highways learned the task on the frozen features
    model.eval()
    with torch.no_grad():
        outs = model(x)
    for o in outs:
        assert float((o.argmax(1) == y).float().mean()) > 0.6


def test_two_stage_is_its_two_halves_in_order():
    batches, _, _ = data(1)
    a, b = bn_model(3), bn_model(3)
    ha = ee.train.two_stage(a, batches, epochs=2, lr=5e-3, exit_epochs=2, exit_lr=1e-2, seed=4, progress=False)
    again, _, _ = data(1)  # the same shuffles, continued from one stage to the next
    ee.train.two_stage(b, again, epochs=2, lr=5e-3, only="backbone", seed=4, progress=False)
    ee.train.two_stage(b, again, epochs=2, lr=1e-2, only="exits", seed=4, progress=False)
    assert same(a.state_dict(), b.state_dict())
    assert ha[0].method == "two_stage:backbone" and ha[1].method == "two_stage:exits"
    assert ha[1].terms["ce_0"][-1] < ha[1].terms["ce_0"][0]


def test_two_stage_bad_arguments():
    model = bn_model()
    batches, _, _ = data()
    with pytest.raises(ValueError, match="only must be"):
        ee.train.two_stage(model, batches, 1, 1e-3, only="final")
    with pytest.raises(ValueError, match="epochs"):
        ee.train.two_stage(model, batches, 1, 1e-3, exit_epochs=0)
    with pytest.raises(TypeError, match="MultiExitModel"):
        ee.train.two_stage(nn.Linear(2, 2), batches, 1, 1e-3)

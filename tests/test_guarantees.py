"""One test per sentence of the README's "Guarantees" section, in its order (test names say which)."""

import hashlib
import threading
import warnings

import numpy as np
import pytest
import torch
from models import TupleExit, TupleStage, mlp_model
from reference import per_sample_loop
from torch import nn

import eeruntime as ee

D, C = 6, 4


def identity_first_model(seed=0, tuple_state=False):
    """Stage 0 returns its input itself, so the state the runtime packs after exit 0 IS the caller's tensor."""
    torch.manual_seed(seed)

    class Same(nn.Module):
        def forward(self, *x):
            return x if len(x) > 1 else x[0]

    if tuple_state:
        return ee.MultiExitModel(
            [Same(), TupleStage(D), TupleStage(D)], [TupleExit(D, C), TupleExit(D, C), TupleExit(D, C)]
        ).eval()
    return ee.MultiExitModel(
        [Same(), nn.Sequential(nn.Linear(D, D), nn.Tanh()), nn.Linear(D, D)],
        [nn.Linear(D, C), nn.Linear(D, C), nn.Linear(D, C)],
    ).eval()


def split_thresholds(rt, x):
    """max_prob thresholds halfway between middle scores, so about half the rows leave at exit 0."""
    with torch.no_grad():
        s = x
        out = []
        for k in range(2):
            s = rt.model.stages[k](*s) if isinstance(s, tuple) else rt.model.stages[k](s)
            logits = rt.model.exits[k](*s) if isinstance(s, tuple) else rt.model.exits[k](s)
            v = torch.softmax(logits.double(), 1).max(1).values.sort().values
            out.append(float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)
    return out


# 1 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("inference", [False, True], ids=["normal", "inference-tensor"])
def test_g1_never_writes_the_callers_input(tuple_state, inference):
    model = identity_first_model(tuple_state=tuple_state)
    with torch.inference_mode(inference):
        h = torch.randn(40, 3, D) * 3 if tuple_state else torch.randn(40, D) * 3
        x = (h, torch.ones(40, 3)) if tuple_state else h
    before = [t.clone() for t in (x if tuple_state else (x,))]
    rt = ee.EERuntime(model, criterion="max_prob")
    thr = split_thresholds(rt, x)
    rt.set_thresholds(thr)
    res = rt.infer(x)
    assert 0 < int((res.exit_index == 0).sum()) < 40
    rows = torch.arange(40)
    step = rt.run_stage(0, x, rows)
    assert step.state is not None
    for t, b in zip(x if tuple_state else (x,), before):
        assert torch.equal(t, b)
    ref_logits, ref_exit, _ = per_sample_loop(model, x, thr, "max_prob")
    assert torch.equal(res.exit_index, ref_exit)


# 2 ------------------------------------------------------------------------------------------------
def test_g2_never_writes_memory_a_stage_kept():
    class KeepsNumpy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            self.arr = torch.tanh(self.lin(x) * 3).numpy().copy()
            self.snap = self.arr.copy()
            return torch.from_numpy(self.arr)

    torch.manual_seed(1)
    stage0 = KeepsNumpy()
    hooked = []
    model = ee.MultiExitModel(
        [stage0, nn.Sequential(nn.Linear(D, D), nn.Tanh()), nn.Linear(D, D)],
        [nn.Linear(D, C), nn.Linear(D, C), nn.Linear(D, C)],
    ).eval()
    model.stages[1].register_forward_hook(lambda m, i, o: hooked.append((o, o.clone())))
    x = torch.randn(50, D) * 3
    rt = ee.EERuntime(model, criterion="max_prob")
    rt.set_thresholds(split_thresholds(rt, x))
    hooked.clear()
    res = rt.infer(x)
    assert 0 < int((res.exit_index == 0).sum()) < 50 and int((res.exit_index == 1).sum()) > 0
    assert np.array_equal(stage0.arr, stage0.snap)  # numpy memory the stage kept
    kept, snap = hooked[0]
    assert torch.equal(kept, snap)  # a stage output a hook kept


# 3 ------------------------------------------------------------------------------------------------
def test_g3_never_changes_weights_or_buffers():
    torch.manual_seed(2)
    backbone = nn.Sequential(
        nn.Linear(D, D), nn.BatchNorm1d(D), nn.ReLU(), nn.Linear(D, D), nn.BatchNorm1d(D), nn.Linear(D, C)
    )
    model = ee.attach_exits(backbone, at=["2"], num_classes=C, example_input=torch.randn(2, D))
    rt = ee.EERuntime(model, thresholds=0.3, criterion="max_prob")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backbone.train()  # submodules put back in train mode after the runtime was built
    model.stages[1].train()
    x = torch.randn(64, D) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = rt.infer(x)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a buffer or weight changed"
    model.eval()
    ref_logits, ref_exit, _ = per_sample_loop(model, x, [0.3], "max_prob")
    assert torch.equal(got.exit_index, ref_exit)  # BatchNorm ran with its running statistics


# 4 ------------------------------------------------------------------------------------------------
def test_g4_eval_mode_is_announced_not_hidden():
    model = mlp_model(K=3).train()
    with pytest.warns(UserWarning, match="eval mode"):
        rt = ee.EERuntime(model, thresholds=0.5)
    assert not any(m.training for m in model.modules())  # left in eval mode, as the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ee.EERuntime(mlp_model(K=3).eval(), thresholds=0.5)  # nothing to announce
        rt(torch.randn(3, 6))
    model.stages[1].train()
    with pytest.warns(UserWarning, match=r"stages\.1"):
        rt(torch.randn(3, 6))
    assert not model.stages[1].training


# 5 ------------------------------------------------------------------------------------------------
def test_g5_a_changed_model_is_refused_not_run_in_part():
    model = mlp_model(K=3)
    rt = ee.EERuntime(model, thresholds=0.5)
    x = torch.randn(5, 6)
    rt(x)
    model.stages.append(nn.Sequential(nn.Linear(12, 12), nn.Tanh()))
    model.exits.append(nn.Linear(12, 5))
    with pytest.raises(RuntimeError, match="built for 3 exits .* now has 4"):
        rt(x)
    del model.stages[3], model.exits[3]
    rt(x)
    model.exits[1] = nn.Linear(12, 9)  # another class count: the message is about this call's exits
    with pytest.raises(ValueError, match="exit 1 returns 9 classes but exit 0 returns 5"):
        rt(x)


# 6 ------------------------------------------------------------------------------------------------
def test_g6_ops_never_mix_inputs_and_outputs():
    B = 20
    logits = torch.randn(B, 5) * 4
    want_out = torch.zeros(B, 5)
    rows = torch.randperm(B)
    conf, idx = torch.zeros(B), torch.zeros(B, dtype=torch.int64)
    keep, n = ee.ops.exit_scatter_ref(
        logits.clone(), torch.tensor([0.5]), "max_prob", 0, False, rows, want_out, conf.clone(), idx.clone()
    )
    out = logits  # the output is the logits being read
    ee.ops.exit_scatter(logits, torch.tensor([0.5]), "max_prob", 0, rows, out, conf, idx)
    assert torch.equal(out[rows[~keep]], want_out[rows[~keep]])
    with pytest.raises(ValueError, match="share memory"):
        ee.ops.scatter_rows(torch.ones(B, dtype=torch.bool), rows, [logits, logits], [out, out])


# 7 ------------------------------------------------------------------------------------------------
def test_g7_load_checks_the_whole_file_and_never_writes_it(tmp_path):
    model = mlp_model(K=3)
    ee.EERuntime(model, thresholds=[0.2, 0.4], criterion="margin").save(tmp_path / "rt")
    path = tmp_path / "rt" / "runtime.json"

    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "rt").iterdir()}

    before = digest()
    assert ee.load(tmp_path / "rt", model).thresholds == [0.2, 0.4]
    assert digest() == before
    path.write_text(path.read_text().replace('"margin"', '"margins"'))
    before = digest()
    with pytest.raises(ValueError, match="'criterion.name'"):
        ee.load(tmp_path / "rt", model)
    assert digest() == before


# 8 ------------------------------------------------------------------------------------------------
def test_g8_one_call_one_set_of_thresholds():
    """Two threshold sets that send every row to exit 0 (A) or to exit 1 (B); a call that took
    exit 0's threshold from B and exit 1's from A would send rows to exit 2."""
    model = mlp_model(K=3)
    rt = ee.EERuntime(model, thresholds=[-1.0, 2.0], criterion="max_prob")
    A, Bset = [-1.0, 2.0], [2.0, -1.0]  # A: all leave at 0; B: all leave at 1; B then A: all reach exit 2
    x = torch.randn(32, 6)
    stop = threading.Event()
    seen = []

    def flip():
        while not stop.is_set():
            rt.set_thresholds(A)
            rt.set_thresholds(Bset)

    t = threading.Thread(target=flip)
    t.start()
    try:
        for _ in range(150):
            seen.append(rt.infer(x).exit_index)
    finally:
        stop.set()
        t.join()
    for e in seen:
        assert bool((e == 0).all()) or bool((e == 1).all()), e.tolist()

"""EERuntime against the per-sample loop of docs/design.md (tests/reference.py)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import TupleExit, TupleStage, mlp_model
from reference import per_sample_loop, score64
from torch import nn

import eeruntime as ee

CRITERIA = ["entropy", "max_prob", "margin", "norm_entropy"]
NEAR = 1e-4  # rows whose score is this close to a threshold may legitimately flip


def thresholds_for(model, x, criterion, regime):
    """Thresholds where all / none / some samples leave at each early exit."""
    K = len(model.stages)
    if regime == "all":
        return [math.inf if criterion == "entropy" else -1.0] * (K - 1)
    if regime == "none":
        return [-1.0 if criterion == "entropy" else 2.0] * (K - 1)
    outs = model(x) if x.shape[0] else None
    thr = []
    for k in range(K - 1):
        if outs is None:
            thr.append(0.5)
            continue
        s = score64(outs[k], criterion)
        thr.append(float(s.quantile(0.4 if criterion == "entropy" else 0.6)))
    return thr


def assert_matches_loop(rt, model, x, thresholds, criterion, final="last"):
    res = rt.infer(x)
    ref_logits, ref_exit, near = per_sample_loop(model, x, thresholds, criterion, final)
    B = x[0].shape[0] if isinstance(x, tuple) else x.shape[0]
    assert res.logits.shape[0] == B and res.exit_index.shape == (B,) and res.confidence.shape == (B,)
    assert res.exit_index.dtype == torch.int64 and res.confidence.dtype == torch.float32
    if B == 0:
        assert res.logits.dim() == 2
        return res
    clear = near > NEAR
    assert torch.equal(res.exit_index[clear], ref_exit[clear])
    same = res.exit_index == ref_exit
    # float32 logits: a batched matmul and a one-row one may round differently (different BLAS
    # kernels); the random test weights are large, so allow 1e-4.
    torch.testing.assert_close(res.logits[same].double(), ref_logits[same], rtol=1e-4, atol=1e-4)
    return res


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("B", [0, 1, 7, 64])
@pytest.mark.parametrize("regime", ["all", "none", "some"])
def test_matches_per_sample_loop(criterion, B, regime):
    model = mlp_model()
    x = torch.randn(B, 6)
    thr = thresholds_for(model, x, criterion, regime)
    rt = ee.EERuntime(model, thresholds=thr, criterion=criterion)
    res = assert_matches_loop(rt, model, x, thr, criterion)
    if B and regime == "all":
        assert (res.exit_index == 0).all()
    if B and regime == "none":
        assert (res.exit_index == 2).all()


def test_large_batch_and_one_float_threshold():
    model = mlp_model(K=4)
    x = torch.randn(3001, 6)
    rt = ee.EERuntime(model, thresholds=1.0, criterion="entropy")
    assert rt.thresholds == [1.0, 1.0, 1.0]
    res = assert_matches_loop(rt, model, x, [1.0] * 3, "entropy")
    assert len(set(res.exit_index.tolist())) > 1, "the test needs a mix of exits"


def test_confidence_is_score_at_exit_taken():
    model = mlp_model()
    x = torch.randn(50, 6)
    rt = ee.EERuntime(model, thresholds=[0.5, 0.6], criterion="max_prob")
    res = rt.infer(x)
    outs = model(x)
    for i in range(50):
        k = int(res.exit_index[i])
        expect = score64(outs[k][i : i + 1], "max_prob")[0]
        assert abs(float(res.confidence[i]) - float(expect)) < 1e-5


def test_final_average():
    model = mlp_model()
    x = torch.randn(40, 6)
    thr = thresholds_for(model, x, "entropy", "some")
    rt = ee.EERuntime(model, thresholds=thr, criterion="entropy", final="average")
    res = assert_matches_loop(rt, model, x, thr, "entropy", final="average")
    assert (res.exit_index == 2).any() and (res.exit_index < 2).any()


def test_tuple_states():
    d, C = 8, 4
    model = ee.MultiExitModel([TupleStage(d) for _ in range(3)], [TupleExit(d, C) for _ in range(3)]).eval()
    h = torch.randn(33, 5, d)
    mask = (torch.rand(33, 5) > 0.3).float()
    x = (h, mask)
    outs = model(x)
    thr = [float(score64(outs[k], "entropy").median()) for k in range(2)]
    rt = ee.EERuntime(model, thresholds=thr)
    res = assert_matches_loop(rt, model, x, thr, "entropy")
    assert len(set(res.exit_index.tolist())) > 1


def test_callable_criterion():
    model = mlp_model()
    x = torch.randn(30, 6)

    def top_logit(logits, state):
        return logits.max(dim=1).values

    rt = ee.EERuntime(model, thresholds=[2.0, 2.5], criterion=top_logit)
    assert_matches_loop(rt, model, x, [2.0, 2.5], top_logit)


class AgreeWithHistory:
    """A per-exit scorer with history: 1 when this exit's argmax agrees with every earlier exit."""

    per_exit = True
    uses_history = True

    def __init__(self):
        self.seen = []

    def __call__(self, logits, state, k, history):
        self.seen.append((k, len(history)))
        agree = torch.ones(logits.shape[0])
        for h in history:
            assert h.shape == logits.shape
            agree = agree * (h.argmax(1) == logits.argmax(1)).float()
        return agree if k > 0 else torch.zeros(logits.shape[0])


def test_per_exit_scorer_with_history():
    model = mlp_model(K=4)
    x = torch.randn(64, 6)
    scorer = AgreeWithHistory()
    rt = ee.EERuntime(model, thresholds=0.5, criterion=scorer)
    res = rt.infer(x)
    assert all(len_h == k for k, len_h in scorer.seen)
    outs = model(x)
    preds = torch.stack([o.argmax(1) for o in outs])  # [K, B]
    for i in range(64):
        expect = 3
        for k in range(1, 3):
            if (preds[: k + 1, i] == preds[k, i]).all():
                expect = k
                break
        assert int(res.exit_index[i]) == expect


def test_nan_rows_never_exit_and_carry_nan():
    model = ee.MultiExitModel([nn.Identity(), nn.Identity()], [nn.Identity(), nn.Identity()])
    x = torch.tensor([[10.0, 0.0, 0.0], [float("nan"), 0.0, 0.0], [float("inf"), 0.0, 0.0]])
    rt = ee.EERuntime(model, thresholds=[0.5], criterion="max_prob")
    res = rt.infer(x)
    assert res.exit_index.tolist() == [0, 1, 1]
    assert torch.isnan(res.logits[1, 0]) and torch.isnan(res.confidence[1])


def test_set_thresholds_takes_effect_next_call():
    model = mlp_model()
    x = torch.randn(20, 6)
    rt = ee.EERuntime(model, thresholds=[-1.0, -1.0])
    assert (rt.infer(x).exit_index == 2).all()
    rt.set_thresholds([math.inf, math.inf])
    assert (rt.infer(x).exit_index == 0).all()
    rt.set_thresholds(0.3)
    assert rt.thresholds == [0.3, 0.3]


def test_a_written_thresholds_tensor_never_moves_the_runtimes_thresholds():
    """rt.thresholds_tensor gave the snapshot's cached tensor; a caller who wrote it (clamp_, fill_)
    silently moved every later call's decisions while rt.thresholds (and rt.save) kept the old ones."""
    model = mlp_model()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(3)) * 2
    rt = ee.EERuntime(model, thresholds=[0.7, 0.8], criterion="max_prob")
    t = rt.thresholds_tensor("cpu")
    assert t.tolist() == pytest.approx([0.7, 0.8])
    t.fill_(-1.0)  # every row would leave at exit 0
    rt.thresholds_snapshot().tensor("cpu").fill_(2.0)  # none would
    res = rt.infer(x)
    ref_logits, ref_exit, near = per_sample_loop(model, x, [0.7, 0.8], "max_prob")
    clear = near > 1e-5
    assert torch.equal(res.exit_index[clear], ref_exit[clear]) and len(set(ref_exit.tolist())) > 1
    assert rt.thresholds_tensor("cpu").tolist() == pytest.approx([0.7, 0.8])
    snap = rt.thresholds_snapshot()
    step = rt.run_stage(0, x, torch.arange(40), thresholds=snap)
    assert torch.equal(step.exit_rows, (ref_exit == 0).nonzero().flatten())


def test_drop_in_call_and_eval_mode():
    model = mlp_model().train()
    x = torch.randn(9, 6)
    rt = ee.EERuntime(model, thresholds=[-1.0, -1.0])
    assert not model.training
    torch.testing.assert_close(rt(x), model(x)[-1])


def test_never_modifies_weights_or_input():
    model = mlp_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(17, 6)
    x0 = x.clone()
    ee.EERuntime(model, thresholds=[0.5, 0.5])(x)
    assert torch.equal(x, x0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_stats_and_cost():
    model = mlp_model()
    x = torch.randn(100, 6)
    rt = ee.EERuntime(model, thresholds=thresholds_for(model, x, "entropy", "some"))
    res = rt.infer(x)
    rt.infer(x[:10])
    st_ = rt.stats
    counts = torch.bincount(torch.cat([res.exit_index, rt.infer(x[:0]).exit_index]), minlength=3)
    res10 = torch.bincount(ee.EERuntime(model, thresholds=rt.thresholds).infer(x[:10]).exit_index, minlength=3)
    assert st_.exit_counts == (counts + res10).tolist()
    assert st_.samples == 110 and st_.calls == 2
    cm = st_.cost_model
    # Linear(6,12): 2*6*12 FLOPs, Linear(12,12): 2*12*12, heads Linear(12,5): 2*12*5.
    assert cm.stage_flops == [144, 288, 288] and cm.head_flops == [120, 120, 120]
    f = st_.exit_fractions
    cum = [264, 264 + 408, 264 + 408 * 2]
    assert st_.ideal_speedup == pytest.approx((144 + 288 + 288 + 120) / sum(a * b for a, b in zip(f, cum)))
    rt.reset_stats()
    assert rt.stats.samples == 0


# ---------------------------------------------------------------- bad input
def test_bad_thresholds():
    model = mlp_model()
    with pytest.raises(ValueError, match="one per early exit"):
        ee.EERuntime(model, thresholds=[0.1, 0.2, 0.3])
    with pytest.raises(TypeError):
        ee.EERuntime(model, thresholds="high")
    with pytest.raises(ValueError, match="NaN"):
        ee.EERuntime(model, thresholds=float("nan"))
    rt = ee.EERuntime(model, thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match="one per early exit"):
        rt.set_thresholds([0.1])
    assert rt.thresholds == [0.1, 0.2]


def test_bad_criterion_and_final():
    with pytest.raises(ValueError, match="accepted: 'entropy'"):
        ee.EERuntime(mlp_model(), criterion="confidence")
    with pytest.raises(ValueError, match="final mode"):
        ee.EERuntime(mlp_model(), final="mean")


def test_stages_exits_mismatch():
    with pytest.raises(ValueError, match="same length"):
        ee.MultiExitModel([nn.Identity(), nn.Identity()], [nn.Identity()])
    with pytest.raises(TypeError, match="nn.Module"):
        ee.MultiExitModel([lambda x: x], [nn.Identity()])
    with pytest.raises(TypeError, match="MultiExitModel"):
        ee.EERuntime(nn.Linear(2, 2))


def test_a_model_that_is_not_a_module_is_refused_with_the_reason():
    # stages and exits alone do not make a model the runtime can walk: it puts every module in
    # eval mode and reads the device from the parameters (this once raised an AttributeError).
    class Duck:
        def __init__(self):
            self.stages = [nn.Linear(2, 2), nn.Linear(2, 2)]
            self.exits = [nn.Linear(2, 3), nn.Linear(2, 3)]

    with pytest.raises(TypeError, match=r"MultiExitModel \(an nn.Module with stages and exits\), got Duck"):
        ee.EERuntime(Duck(), thresholds=[0.5])
    model = ee.MultiExitModel(Duck().stages, Duck().exits)  # the same parts as a MultiExitModel run
    x = torch.randn(4, 2)
    res = ee.EERuntime(model, thresholds=[0.0]).infer(x)
    ref = model(x)[-1].detach()  # entropy < 0 never holds: every row reaches the final exit
    torch.testing.assert_close(res.logits, ref)
    assert res.exit_index.tolist() == [1, 1, 1, 1]


def test_calibration_training_and_load_refuse_a_model_that_is_not_a_module(tmp_path):
    # the same check as EERuntime's (eeruntime.model.is_multi_exit), each with its own words
    class Duck:
        def __init__(self):
            self.stages = [nn.Linear(2, 2), nn.Linear(2, 2)]
            self.exits = [nn.Linear(2, 3), nn.Linear(2, 3)]

    data = [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))]
    nn_module = r"MultiExitModel \(an nn.Module with stages and exits\)"
    with pytest.raises(TypeError, match="calibration needs a " + nn_module + ", got Duck"):
        ee.calibrate(Duck(), data, "greedy")
    with pytest.raises(TypeError, match="training needs a " + nn_module + ", got Duck"):
        ee.train.joint(Duck(), data, epochs=1, lr=1e-3)
    model = ee.MultiExitModel(Duck().stages, Duck().exits)
    ee.EERuntime(model, thresholds=[0.5]).save(tmp_path / "rt")
    with pytest.raises(ValueError, match="a model factory must be a callable"):
        ee.load(tmp_path / "rt", Duck())  # not a module, so taken for a factory, and not callable
    with pytest.raises(TypeError, match="load needs the " + nn_module):
        ee.load(tmp_path / "rt", nn.Linear(2, 2))  # a module without stages and exits
    assert ee.load(tmp_path / "rt", model).thresholds == [0.5]  # the module itself loads


def test_bad_inputs():
    rt = ee.EERuntime(mlp_model(), thresholds=[0.5, 0.5])
    with pytest.raises(TypeError, match="torch.Tensor"):
        rt([[1.0] * 6])
    with pytest.raises(TypeError, match="torch.Tensor"):
        rt(None)
    with pytest.raises(ValueError, match="batch dimension"):
        rt(torch.tensor(1.0))
    with pytest.raises(ValueError, match="member 0 is a meta tensor"):
        rt(torch.empty(4, 6, device="meta"))


def test_bad_exit_outputs():
    bad_dim = ee.MultiExitModel([nn.Identity(), nn.Identity()], [nn.Unflatten(1, (2, 2)), nn.Identity()])
    with pytest.raises(ValueError, match="exit 0 must return 2-D logits"):
        ee.EERuntime(bad_dim, thresholds=0.5)(torch.randn(3, 4))
    bad_c = ee.MultiExitModel([nn.Identity(), nn.Identity()], [nn.Identity(), nn.Linear(4, 3)])
    with pytest.raises(ValueError, match="exit 1 returns 3 classes but exit 0 returns 4"):
        ee.EERuntime(bad_c, thresholds=-1.0)(torch.randn(3, 4))


def test_empty_batch_returns_empty_result():
    rt = ee.EERuntime(mlp_model(C=7), thresholds=[0.5, 0.5])
    res = rt.infer(torch.randn(0, 6))
    assert res.logits.shape == (0, 7) and res.exit_index.shape == (0,) and res.confidence.shape == (0,)


# ---------------------------------------------------------------- property test
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    K=st.integers(1, 4),
    B=st.integers(0, 40),
    C=st.integers(1, 6),
    criterion=st.sampled_from(CRITERIA),
    q=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    seed=st.integers(0, 10_000),
    final=st.sampled_from(["last", "average"]),
)
def test_property_random_models(K, B, C, criterion, q, seed, final):
    torch.manual_seed(seed)
    model = mlp_model(K=K, C=C, seed=seed)
    x = torch.randn(B, 6) * 2
    if B:
        outs = model(x)
        thr = [float(score64(outs[k], criterion).nan_to_num(0.0).quantile(q[k])) for k in range(K - 1)]
    else:
        thr = [0.5] * (K - 1)
    rt = ee.EERuntime(model, thresholds=thr, criterion=criterion, final=final)
    assert_matches_loop(rt, model, x, thr, criterion, final)

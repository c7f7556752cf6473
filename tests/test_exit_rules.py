"""The text papers' exit rules: PABEE patience per row and BERxiT's learned exit, against
per-sample references (one row through the model alone, its counter / certainty in float64),
through packing across stages, with ee.calibrate, and saved / loaded."""

import math

import pytest
import torch
from models import TupleExit, TupleStage, mlp_model
from torch import nn

import eeruntime as ee
from eeruntime.calibration.cache import build_cache
from eeruntime.data import Batches
from eeruntime.exit_rules import LearnedExit, Patience, patience_scores_ref, whole_batch_patience


def _call(m, s):
    return m(*s) if isinstance(s, tuple) else m(s)


def _rows(x, i):
    return tuple(t[i : i + 1] for t in x) if isinstance(x, tuple) else x[i : i + 1]


@torch.no_grad()
def per_sample(model, x, thresholds, score_of):
    """Each row alone through the model; ``score_of(seen_logits, state, k)`` -> float64 score of
    that row at exit k (seen_logits: its logits at exits 0..k). Leaves at the first early exit
    with score >= threshold. Returns (logits [B, C], exit index [B])."""
    B = (x[0] if isinstance(x, tuple) else x).shape[0]
    K = len(model.stages)
    outs, exits = [], []
    for i in range(B):
        state, seen = _rows(x, i), []
        for k in range(K):
            state = _call(model.stages[k], state)
            seen.append(_call(model.exits[k], state))
            s = score_of(seen, state, k)
            if k == K - 1 or (not math.isnan(s) and s >= thresholds[k]):
                outs.append(seen[-1][0])
                exits.append(k)
                break
    return (torch.stack(outs) if outs else torch.empty(0, 0)), torch.tensor(exits, dtype=torch.int64)


def patience_of_row(seen, state, k):
    return float(patience_scores_ref(seen)[0, k])


def assert_runtime_matches(rt, model, x, thresholds, score_of):
    res = rt.infer(x)
    ref_logits, ref_exit = per_sample(model, x, thresholds, score_of)
    assert torch.equal(res.exit_index, ref_exit)
    if ref_exit.numel():
        torch.testing.assert_close(res.logits, ref_logits, rtol=1e-4, atol=1e-4)
    return res


# ------------------------------------------------------------------------------------------ PABEE
def test_patience_scores_follow_the_recurrence():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(40, 3, generator=g) for _ in range(5)]
    logits[2][3, 1] = float("nan")  # row 3 has no prediction at exit 2: NaN there, streak broken
    ref = patience_scores_ref(logits)
    crit = Patience()
    for k in range(5):
        got = crit(logits[k], None, k, logits[:k])
        torch.testing.assert_close(got, ref[:, k], equal_nan=True)
    assert math.isnan(float(ref[3, 2])) and float(ref[3, 3]) == 0.0
    assert ref.nan_to_num(0).max() >= 2  # some streaks of length >= 2 were exercised


@pytest.mark.parametrize("B", [0, 1, 37, 256])
@pytest.mark.parametrize("thresholds", [[1, 1, 2, 2, 2], [2.0] * 5, [4, 3, 1, 2, 4]])
def test_patience_matches_per_sample_loop(B, thresholds):
    model = mlp_model(K=6, C=3, seed=B)
    x = torch.randn(B, 6, generator=torch.Generator().manual_seed(B))
    rt = ee.EERuntime(model, thresholds=thresholds, criterion=Patience())
    res = assert_runtime_matches(rt, model, x, thresholds, patience_of_row)
    if B == 256:
        # rows leave at several exits, so the survivors' histories went through several packs
        assert len(torch.unique(res.exit_index)) >= 2


def test_patience_with_tuple_states_and_masks():
    d, C, K = 8, 3, 5
    model = ee.MultiExitModel([TupleStage(d) for _ in range(K)], [TupleExit(d, C) for _ in range(K)]).eval()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(33, 7, d, generator=g)
    mask = (torch.arange(7)[None] < torch.randint(1, 8, (33, 1), generator=g)).float()
    rt = ee.EERuntime(model, thresholds=1, criterion=Patience())
    assert_runtime_matches(rt, model, (h, mask), [1] * (K - 1), patience_of_row)


def test_patience_nan_rows_never_exit_early():
    model = ee.MultiExitModel([nn.Identity()] * 4, [nn.Identity()] * 4)
    x = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 2.0]])
    res = ee.EERuntime(model, thresholds=1, criterion=Patience()).infer(x)
    assert res.exit_index.tolist() == [1, 3, 1]
    assert torch.isnan(res.logits[1, 0])


def test_per_row_patience_against_whole_batch_rule():
    """HF's PABEE stops the batch when its one counter (the minimum of the rows' counters)
    reaches P; per row, every row leaves at or before that exit and most leave earlier."""
    model = mlp_model(K=6, C=3, seed=7)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(7))
    P = 2
    with torch.no_grad():
        scores = patience_scores_ref(model(x))
    whole_logits, whole_k = whole_batch_patience(model, x, P)
    reached = (scores.nan_to_num(-1).min(dim=0).values >= P).nonzero()
    expect_k = int(reached[0]) if len(reached) and int(reached[0]) < 5 else 5
    assert whole_k == expect_k
    with torch.no_grad():
        torch.testing.assert_close(whole_logits, model(x)[whole_k])
    res = ee.EERuntime(model, thresholds=P, criterion=Patience()).infer(x)
    assert (res.exit_index <= whole_k).all()
    assert res.exit_index.float().mean() < whole_k


# labels: one exit's predictions (random weights): with exit 3's, greedy sends every row to exit 3
@pytest.mark.parametrize("method, label_exit", [("greedy", 3), ("accuracy", 4)])
def test_calibrate_patience_reproduces_on_runtime(method, label_exit):
    model = mlp_model(K=5, C=3, seed=11)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 6, generator=g)
    with torch.no_grad():
        y = model(x)[label_exit].argmax(1)
    crit = Patience()
    cache = build_cache(model, (x, y), crit, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(cache.scores), patience_scores_ref(model(x)), equal_nan=True)
    cal = ee.calibrate(model, (x, y), method, criterion=crit, max_drop=0.05, progress=False)
    rt = cal.runtime(model)
    res = rt.infer(x)
    fractions = (torch.bincount(res.exit_index, minlength=5).double() / len(x)).tolist()
    assert fractions == pytest.approx(cal.exit_fractions)
    assert float((res.logits.argmax(1) == y).double().mean()) == pytest.approx(cal.accuracy)
    assert cal.exit_fractions[-1] < 1.0  # patience let some rows leave early


def test_patience_runtime_saves_and_loads_by_name(tmp_path):
    model = mlp_model(K=4, C=3, seed=9)
    rt = ee.EERuntime(model, thresholds=[1, 2, 1], criterion=Patience())
    rt.save(tmp_path / "rt")
    loaded = ee.load(tmp_path / "rt", model)
    assert isinstance(loaded.criterion, Patience) and loaded.thresholds == [1.0, 2.0, 1.0]
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(9))
    a, b = rt.infer(x), loaded.infer(x)
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.logits, b.logits)


def max_prob_named_patience(logits, state):
    return logits.softmax(1).max(1).values


max_prob_named_patience.__name__ = max_prob_named_patience.__qualname__ = "patience"  # as a user's module-level def


def test_a_criterion_name_names_one_criterion_in_saved_files(tmp_path):
    """A saved file names a criterion; ee.load rebuilds the registered one of that name. A user's
    own function called ``patience`` came back as PABEE's Patience, a subclass of a registered
    module as its parent, and a second registration replaced the first: all without a word."""
    from eeruntime import criteria

    model = mlp_model(K=3, C=3, seed=9)
    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(9))

    patience = max_prob_named_patience
    with pytest.raises(ValueError, match="named 'patience', the name of a registered criterion"):
        ee.EERuntime(model, thresholds=0.6, criterion=patience).save(tmp_path / "a")
    assert not (tmp_path / "a" / "runtime.json").exists()

    def my_score(logits, state):
        return patience(logits, state)

    rt = ee.EERuntime(model, thresholds=0.6, criterion=my_score)
    rt.save(tmp_path / "b")
    loaded = ee.load(tmp_path / "b", model, criterion=my_score)
    assert torch.equal(loaded.infer(x).exit_index, rt.infer(x).exit_index)
    ee.EERuntime(model, thresholds=1, criterion=Patience()).save(tmp_path / "c")  # the registered one still saves

    class Stricter(LearnedExit):  # not registered: its parent's name must not stand for it
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * 0.5

    rt = ee.EERuntime(model, thresholds=0.4, criterion=Stricter(12).eval())
    rt.save(tmp_path / "d")
    with pytest.raises(ValueError, match="which load cannot rebuild"):
        ee.load(tmp_path / "d", model)
    crit = Stricter(12)
    loaded = ee.load(tmp_path / "d", model, criterion=crit)
    assert torch.equal(loaded.infer(x).confidence, rt.infer(x).confidence)

    with pytest.raises(ValueError, match="'learned_exit' is taken by eeruntime.exit_rules.learned.LearnedExit"):
        criteria.register_criterion("learned_exit")(Stricter)
    assert criteria.LEARNED_CRITERIA["learned_exit"] is LearnedExit
    with pytest.raises(ValueError, match="'patience' is taken"):
        criteria.register_model_criterion(patience)
    assert criteria.MODEL_CRITERIA["patience"](model).__class__ is Patience
    criteria.register_criterion("learned_exit")(LearnedExit)  # the same definition again: allowed


# ------------------------------------------------------------------------------- BERxiT learned exit
def lte_of_row(lte, pool="cls"):
    """float64 certainty of a one-row state from the LTE's weights (independent of its forward)."""

    def score(seen, state, k):
        h, *rest = state if isinstance(state, tuple) else (state,)
        h = h.double()
        if h.dim() == 3:
            if pool == "cls":
                f = h[:, 0]
            elif pool == "last":  # the row's last real token
                f = h[:, int(rest[0][0].nonzero().max())]
            else:
                m = rest[0].double().unsqueeze(-1)
                f = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            f = h
        if not lte.shared and k >= len(lte.units):
            return 1.0
        u = lte.units[0 if lte.shared else k]
        return float(torch.sigmoid(f @ u.weight.double().T + u.bias.double())[0, 0])

    return score


@pytest.mark.parametrize("pool", ["cls", "mean", "last"])
@pytest.mark.parametrize("B", [0, 1, 41])
def test_learned_exit_matches_per_sample_loop(pool, B):
    d, C, K = 8, 4, 4
    torch.manual_seed(B)
    model = ee.MultiExitModel([TupleStage(d) for _ in range(K)], [TupleExit(d, C) for _ in range(K)]).eval()
    lte = LearnedExit(d, pool=pool).eval()
    with torch.no_grad():
        lte.units[0].weight.mul_(4)
    h = torch.randn(B, 6, d)
    mask = (torch.arange(6)[None] < torch.randint(1, 7, (B, 1))).float()
    thresholds = [0.5, 0.4, 0.6]
    rt = ee.EERuntime(model, thresholds=thresholds, criterion=lte)
    res = assert_runtime_matches(rt, model, (h, mask), thresholds, lte_of_row(lte, pool))
    if B == 41:
        assert len(torch.unique(res.exit_index)) >= 2


def test_learned_exit_per_exit_heads_and_width_errors():
    model = mlp_model(K=3, width=12)
    lte = LearnedExit([12, 12])
    x = torch.randn(20, 6)
    thresholds = [0.5, 0.5]
    assert_runtime_matches(ee.EERuntime(model, thresholds, criterion=lte), model, x, thresholds, lte_of_row(lte))
    with pytest.raises(ValueError, match="takes 5 features"):
        ee.EERuntime(model, 0.5, criterion=LearnedExit(5)).infer(x)
    with pytest.raises(ValueError, match="pool"):
        LearnedExit(4, pool="max")
    with pytest.raises(ValueError, match="in_features"):
        LearnedExit([4, 0])


def test_train_learned_exit_leaves_model_untouched_and_learns_correctness():
    torch.manual_seed(0)
    model = mlp_model(K=3, C=3, seed=2)
    model.stages[0].append(nn.BatchNorm1d(12))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(512, 6)
    with torch.no_grad():
        model.eval()
        y = model(x)[-1].argmax(1)
        model.train()
    data = Batches(x, y, batch_size=64, seed=0)
    lte = LearnedExit(12)
    w0 = lte.units[0].weight.detach().clone()
    hist = ee.train.learned_exit(model, lte, data, epochs=30, lr=0.02, progress=False, seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training and lte.training
    assert not torch.equal(lte.units[0].weight, w0)
    assert hist.terms["mse_0"][-1] < hist.terms["mse_0"][0]
    # the certainty separates right from wrong exit-0 predictions better than chance
    model.eval()
    with torch.no_grad():
        s0 = model.stages[0](x)
        right = model.exits[0](s0).argmax(1) == y
        u = lte(None, s0, 0)
    assert u[right].mean() > u[~right].mean() + 0.05


def test_train_learned_exit_refuses_labels_out_of_range():
    # Before: labels past the exits' classes were compared with their predictions (never equal),
    # and the LearnedExit trained on "every exit is wrong" without a word.
    model = mlp_model(K=3, C=3, seed=2)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(64) % 3
    lte = LearnedExit(12)
    before = {k: v.clone() for k, v in lte.state_dict().items()}
    with pytest.raises(ValueError, match=r"learned_exit: batch 1 of epoch 1: .*class indices in \[0, 3\).*got 3"):
        ee.train.learned_exit(model, lte, [(x, y), (x, y + 1)], epochs=1, lr=0.05, progress=False, seed=0)
    with pytest.raises(ValueError, match=r"learned_exit: batch 0 of epoch 1: .*class indices in \[0, 3\).*got 3"):
        lte2 = LearnedExit(12)
        w = {k: v.clone() for k, v in lte2.state_dict().items()}
        ee.train.learned_exit(model, lte2, [(x, y + 1)], epochs=1, lr=0.05, progress=False, seed=0)
    assert all(torch.equal(v, w[k]) for k, v in lte2.state_dict().items())
    assert before.keys() == lte.state_dict().keys()


def test_calibrate_and_save_load_learned_exit(tmp_path):
    model = mlp_model(K=3, C=3, seed=5)
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x)[-1].argmax(1)
    lte = LearnedExit(12)
    ee.train.learned_exit(model, lte, [(x, y)], epochs=20, lr=0.05, progress=False, seed=0)
    for method in ("greedy", "accuracy"):
        cal = ee.calibrate(model, (x, y), method, criterion=lte, max_drop=0.05, progress=False)
        rt = cal.runtime(model)
        res = rt.infer(x)
        fractions = (torch.bincount(res.exit_index, minlength=3).double() / len(x)).tolist()
        assert fractions == pytest.approx(cal.exit_fractions)
    rt.save(tmp_path / "rt")
    loaded = ee.load(tmp_path / "rt", model)
    assert isinstance(loaded.criterion, LearnedExit) and loaded.criterion is not lte
    assert loaded.thresholds == rt.thresholds
    r2 = loaded.infer(x)
    assert torch.equal(r2.exit_index, res.exit_index) and torch.equal(r2.confidence, res.confidence)
    # Saved by its registered name, not a module path; a file of format 1 (cls=the module path,
    # as main wrote before the criterion registry) still loads to the same runtime.
    import json

    doc = json.loads((tmp_path / "rt" / "runtime.json").read_text())
    assert doc["criterion"]["registered"] == "learned_exit" and "cls" not in doc["criterion"]
    del doc["criterion"]["registered"]
    doc["criterion"]["cls"] = "eeruntime.exit_rules.learned.LearnedExit"
    (tmp_path / "rt" / "runtime.json").write_text(json.dumps(doc))
    old = ee.load(tmp_path / "rt", model)
    assert isinstance(old.criterion, LearnedExit)
    r3 = old.infer(x)
    assert torch.equal(r3.exit_index, res.exit_index) and torch.equal(r3.confidence, res.confidence)

"""Training methods: their losses against hand computations, what each one trains and freezes,
argument checks, determinism, the learned criteria in the runtime, and real digits data."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from torch import nn

import eeruntime as ee
from eeruntime.data import Batches, load_digits_split
from eeruntime.heads import ConvHead, ExitHead
from eeruntime.zoo import digits_cnn


def small_backbone():
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def small_model(**kw):
    torch.manual_seed(0)
    return ee.attach_exits(small_backbone(), at=["2", "5"], **kw)


def toy_data(n=48, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return Batches(x, y, batch_size=batch, seed=seed)


def params_by_name(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def side_head_names(model, kind):
    return {n for n, _ in model.named_parameters() if f".{kind}_head." in n}


# ------------------------------------------------------------------ losses against hand computations
def test_soft_conditional_matches_the_unrolled_recursion():
    g = torch.Generator().manual_seed(3)
    B, C = 6, 5
    f = [torch.randn(B, C, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    a = [torch.randn(B, generator=g, dtype=torch.float64) * 2 for _ in range(3)]
    got = ee.train.soft_conditional(f, a).exp()
    p = [torch.softmax(t, 1) for t in f]
    g0, g1, g2 = (torch.sigmoid(t).unsqueeze(1) for t in a)
    # f~_1 = g1 f1 + (1-g1)(g2 f2 + (1-g2)(g3 f3 + (1-g3) f)), written out
    want = g0 * p[0] + (1 - g0) * (g1 * p[1] + (1 - g1) * (g2 * p[2] + (1 - g2) * p[3]))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.sum(1), torch.ones(B, dtype=torch.float64))
    # float32 stays finite when a gate saturates and an exit is certain
    f32 = [t.float() * 100 for t in f]
    a32 = [t.float() * 100 for t in a]
    assert torch.isfinite(ee.train.soft_conditional(f32, a32)).all()
    with pytest.raises(ValueError, match="one gate per early exit"):
        ee.train.soft_conditional(f, a[:2])


def test_soft_cost_matches_the_unrolled_recursion():
    g = torch.rand(3, 7, dtype=torch.float64)
    c = [0.2, 0.5, 0.9, 1.1]
    want = g[0] * c[0] + (1 - g[0]) * (g[1] * c[1] + (1 - g[1]) * (g[2] * c[2] + (1 - g[2]) * c[3]))
    torch.testing.assert_close(ee.train.soft_cost(list(g), c), want)
    # read as exit probabilities: the expected cost sum_k P(exit k) c_k
    p_exit = [g[0], (1 - g[0]) * g[1], (1 - g[0]) * (1 - g[1]) * g[2], (1 - g[0]) * (1 - g[1]) * (1 - g[2])]
    torch.testing.assert_close(ee.train.soft_cost(list(g), c), sum(p * ck for p, ck in zip(p_exit, c)))


def test_joint_and_post_train_losses_by_hand():
    g = torch.Generator().manual_seed(0)
    f = [torch.randn(5, 4, generator=g) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    loss, _ = ee.train.joint_loss(f, y, [1.0, 0.5, 0.3])
    nll = lambda lg: float(-torch.log_softmax(lg.double(), 1)[torch.arange(5), y].mean())  # noqa: E731
    assert math.isclose(float(loss), nll(f[0]) + 0.5 * nll(f[1]) + 0.3 * nll(f[2]), rel_tol=1e-6)

    pseudo = torch.tensor([1, 1, 0, 3, 2])
    a = [torch.randn(5, generator=g) for _ in range(2)]
    loss, terms = ee.train.post_train_loss(f[:2], pseudo, a, costs=[0.3, 0.6, 1.05], cost_weight=0.7)
    want = 0.0
    for k in range(2):
        lp = torch.log_softmax(f[k].double(), 1)
        want += float(-lp[torch.arange(5), pseudo].mean())
        h = torch.sigmoid(a[k].double())
        right = (f[k].argmax(1) == pseudo).double()
        want += float(-(right * torch.log(h) + (1 - right) * torch.log(1 - h)).mean())
    h0, h1 = torch.sigmoid(a[0].double()), torch.sigmoid(a[1].double())
    want += 0.7 * float((h0 * 0.3 + (1 - h0) * (h1 * 0.6 + (1 - h1) * 1.05)).mean())
    assert math.isclose(float(loss), want, rel_tol=1e-5)
    assert set(terms) == {"ce_0", "ce_1", "bce_0", "bce_1", "cost"}


def test_history_records_the_loss_and_per_exit_accuracy():
    model = small_model()
    data = [next(iter(toy_data()))]
    frozen_opt = lambda params, lr: torch.optim.SGD(params, lr=0.0)  # noqa: E731  (the model stays put)
    hist = ee.train.joint(model, data, epochs=2, lr=1.0, weights=[1, 2, 3], optimizer=frozen_opt, progress=False)
    x, y = data[0]
    model.train()
    with torch.no_grad():
        outs = model(x)
    want_loss = sum(w * float(F.cross_entropy(o.double(), y)) for w, o in zip([1, 2, 3], outs))
    for e in range(2):
        assert math.isclose(hist.loss[e], want_loss, rel_tol=1e-5)
        assert hist.exit_accuracy[e] == [float((o.argmax(1) == y).double().mean()) for o in outs]
    assert hist["samples"] == [16, 16] and set(hist.terms) == {"ce_0", "ce_1", "ce_2"}


# ------------------------------------------------------------------ what each method trains
def test_joint_trains_stages_and_exits_only():
    model = small_model(confidence=True, gates=True)
    before = params_by_name(model)
    ee.train.joint(model, toy_data(), epochs=1, lr=1e-2, progress=False)
    side = side_head_names(model, "confidence") | side_head_names(model, "gate")
    assert changed(before, model) == set(before) - side


def test_post_train_freezes_the_backbone_bit_for_bit():
    model = small_model(confidence=True)
    model.stages[1].train()
    model.eval()
    model.stages[0][1].train()  # mixed modes must come back as they were
    modes = {n: m.training for n, m in model.named_modules()}
    frozen = {n: t.clone() for n, t in model.state_dict().items() if n.startswith(("stages.", "exits.2."))}
    assert any("running_mean" in n for n in frozen)
    user_frozen = model.stages[2][0].weight
    user_frozen.requires_grad_(False)  # a user flag: must survive
    before = params_by_name(model)
    hist = ee.train.post_train(model, toy_data(), epochs=2, lr=1e-2, confidence=True, cost_weight=0.1, progress=False)
    for n, t in model.state_dict().items():
        if n in frozen:
            assert torch.equal(frozen[n], t), n  # weights and BatchNorm statistics
    trained = changed(before, model)
    assert trained == {n for n in before if n.startswith(("exits.0.", "exits.1."))}
    assert {n: m.training for n, m in model.named_modules() if n in modes} == modes
    assert not user_frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not user_frozen)
    assert all(p.grad is None for p in model.parameters())
    assert set(hist.terms) == {"ce_0", "ce_1", "bce_0", "bce_1", "cost"}
    assert len(hist.exit_agreement) == 2 and hist.exit_agreement[-1][2] == 1.0  # the final exit makes the pseudo-labels


def test_post_train_without_confidence_leaves_confidence_heads_alone():
    model = small_model(confidence=True)
    before = params_by_name(model)
    ee.train.post_train(model, toy_data(), epochs=1, lr=1e-2, progress=False)
    assert changed(before, model) == {n for n in before if n.startswith(("exits.0.", "exits.1."))} - side_head_names(
        model, "confidence"
    )


def test_differentiable_trains_stages_exits_and_gates():
    model = small_model(confidence=True)
    x = next(iter(toy_data()))[0]
    hist = ee.train.differentiable(model, toy_data(), epochs=1, lr=1e-2, cost_weight=0.5, progress=False, seed=0)
    assert all(model.exits[k].has_gate for k in range(2))  # added on the first batch
    before = params_by_name(model)
    ee.train.differentiable(model, toy_data(), epochs=1, lr=1e-2, cost_weight=0.5, progress=False)
    assert changed(before, model) == set(before) - side_head_names(model, "confidence")
    assert set(hist.terms) == {"ce", "cost"}
    with torch.no_grad():
        assert model.eval()(x)[0].shape == (16, 4)


@pytest.mark.parametrize("method", ["post_train", "differentiable"])
def test_cost_term_with_inputs_that_require_grad(method):
    # The cost term counts FLOPs on the first batch's first row; an input that required grad made
    # torch's FLOP counter fail with an AssertionError before any training.
    kw = dict(confidence=True) if method == "post_train" else {}
    runs = []
    for needs_grad in (False, True):
        model = small_model()
        data = [(x.clone().requires_grad_(needs_grad), y) for x, y in toy_data()]
        hist = getattr(ee.train, method)(model, data, 1, 1e-2, cost_weight=0.5, seed=0, progress=False, **kw)
        runs.append((hist.loss, params_by_name(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


def test_methods_wrap_plain_exit_modules():
    model = digits_cnn(width=4)  # its exits are plain nn.Sequential heads
    x = torch.rand(8, 1, 8, 8)
    data = [(x, torch.arange(8) % 10)]
    ee.train.differentiable(model, data, epochs=1, lr=1e-3, progress=False)
    assert isinstance(model.exits[0], ExitHead) and model.exits[0].has_gate
    assert model.exits[0].gate_head.in_features == 10  # the wrapped head's logits are its features
    ee.train.post_train(model, data, epochs=1, lr=1e-3, confidence=True, progress=False)
    assert model.exits[1].has_confidence and model.exits[1].has_gate


# ------------------------------------------------------------------ arguments, modes, determinism
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, d: ee.train.joint(m, d, 0, 1e-3), "epochs must be an int >= 1"),
        (lambda m, d: ee.train.joint(m, d, 1, 0.0), "lr must be a finite float > 0"),
        (lambda m, d: ee.train.joint(m, d, 1, float("nan")), "lr must be"),
        (lambda m, d: ee.train.joint(m, d, 1, 1e-3, weights=[1, 1]), "2 weights for a model with 3 exits"),
        (lambda m, d: ee.train.joint(m, d, 1, 1e-3, weights=[1, -1, 1]), ">= 0"),
        (lambda m, d: ee.train.post_train(m, d, 1, 1e-3, cost_weight=-1.0), "cost_weight must be"),
        (lambda m, d: ee.train.post_train(m, d, 1, 1e-3, cost_weight=0.5), "pass confidence=True"),
        (lambda m, d: ee.train.differentiable(m, d, 1, 1e-3, cost_weight=-0.1), "cost_weight must be"),
        (lambda m, d: ee.train.joint(m, [], 1, 1e-3), "no batches"),
        (lambda m, d: ee.train.joint(m, d, 1, 1e-3, optimizer="lbfgs"), "optimizer must be"),
        (lambda m, d: ee.train.joint(m, d, 1, 1e-3, weight_decay=True), "weight_decay must be"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(small_model(), toy_data())


def test_weights_as_a_string_and_weight_decay_as_a_bool_are_refused():
    # Before: weights="113" trained with weights [1, 1, 3]; weight_decay=True failed inside Adam
    # with "Boolean alpha only supported for Boolean results".
    with pytest.raises(TypeError, match="weights must be a sequence of 3 floats"):
        ee.train.joint(small_model(), toy_data(), 1, 1e-3, weights="113", progress=False)
    with pytest.raises(ValueError, match="weight_decay must be a finite float >= 0, got True"):
        ee.train.joint(small_model(), toy_data(), 1, 1e-3, weight_decay=True, progress=False)


@pytest.mark.parametrize(
    "make,err,match",
    [
        (lambda x, y: Batches(x, y, batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
        (lambda x, y: Batches(x, y, batch_size=-4), ValueError, "batch_size must be an int >= 1, got -4"),
        (lambda x, y: Batches(x, y, batch_size=2.5), ValueError, "batch_size must be an int >= 1, got 2.5"),
        (lambda x, y: Batches(x.tolist(), y), TypeError, "x as a tensor with one row per sample, got list"),
        (lambda x, y: Batches(x, y.tolist()), TypeError, "y as a tensor with one row per sample, got list"),
    ],
)
def test_batches_refuse_what_they_cannot_batch(make, err, match):
    # Before: batch_size=0 raised ZeroDivisionError from len(), -4 "__len__() should return >= 0",
    # a list x an AttributeError on .shape.
    x, y = torch.randn(10, 3), torch.arange(10)
    with pytest.raises(err, match=match):
        make(x, y)


def test_bad_data():
    m = small_model()
    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        ee.train.joint(m, [torch.zeros(2, 1, 6, 6)], 1, 1e-3, progress=False)
    with pytest.raises(TypeError, match="class indices"):
        ee.train.joint(m, [(torch.zeros(2, 1, 6, 6), torch.zeros(2))], 1, 1e-3, progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        ee.train.joint(m, iter(list(toy_data())), 2, 1e-3, progress=False)
    ee.train.joint(m, iter(list(toy_data())), 1, 1e-3, progress=False)  # one epoch of a generator is fine
    with pytest.raises(TypeError, match="MultiExitModel"):
        ee.train.joint(small_backbone(), toy_data(), 1, 1e-3)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TRAIN_KW = {
    "joint": {},
    "post_train": {"confidence": True, "cost_weight": 0.3},
    "differentiable": {"cost_weight": 0.3},
    "two_stage": {"only": "backbone"},
}


@pytest.mark.parametrize("method", sorted(TRAIN_KW))
def test_a_nan_loss_stops_training_before_the_step(method):
    # Before: the NaN loss was stepped on and every trained weight (and BatchNorm's running
    # statistics) became NaN, without a word; the history said "nan".
    good = list(toy_data())
    x, y = good[1]
    poisoned = x.clone()
    poisoned[3] = float("nan")
    base = small_model().eval()
    base.stages[1].requires_grad_(False)  # a stage the caller froze
    want = copy.deepcopy(base)  # trained on the batch before the poisoned one only
    getattr(ee.train, method)(want, good[:1], 1, 1e-2, seed=0, progress=False, **TRAIN_KW[method])
    model = copy.deepcopy(base)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match=f"{method}.*loss is nan on batch 1 of epoch 1"):
        getattr(ee.train, method)(
            model, [good[0], (poisoned, y), good[2]], 1, 1e-2, seed=0, progress=False, **TRAIN_KW[method]
        )
    got = _state(model)
    assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())
    assert _same_state(got, _state(want))
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in flags} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())  # the failed run put the modes back


BAD_LABELS = {
    "too large": (lambda y: torch.where(y == 1, 4, y), r"class indices in \[0, 4\).*got 4"),
    "negative": (lambda y: torch.where(y == 1, -1, y), r"class indices in \[0, (4|num_classes)\).*got -1"),
    "one short": (lambda y: y[:-1], "15 labels for 16 samples"),
}


@pytest.mark.parametrize("bad", sorted(BAD_LABELS))
@pytest.mark.parametrize("method", sorted(TRAIN_KW))
def test_labels_out_of_range_are_refused_before_the_step(method, bad):
    # Before: joint, differentiable and two_stage raised IndexError "Target 4 is out of bounds"
    # from inside cross_entropy (a device-side assert on CUDA, which kills the process's CUDA
    # context) after the forward pass had fed the batch to BatchNorm's running statistics;
    # post_train trained on and reported accuracies against the impossible labels, silently.
    make, match = BAD_LABELS[bad]
    good = list(toy_data())
    x, y = good[1]
    base = small_model()
    base.stages[1].requires_grad_(False)
    want = copy.deepcopy(base)  # trained on the batch before the bad one only
    getattr(ee.train, method)(want, good[:1], 1, 1e-2, seed=0, progress=False, **TRAIN_KW[method])
    model = copy.deepcopy(base)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"{method}.*batch 1 of epoch 1.*{match}"):
        getattr(ee.train, method)(
            model, [good[0], (x, make(y)), good[2]], 1, 1e-2, seed=0, progress=False, **TRAIN_KW[method]
        )
    assert _same_state(_state(model), _state(want))
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in flags} == flags
    assert all(p.grad is None for p in model.parameters())
    # On the first batch: no optimiser step, no BatchNorm statistic moved (heads that the
    # method adds on its first batch aside).
    model = copy.deepcopy(base)
    before = _state(model)
    with pytest.raises(ValueError, match=f"{method}.*batch 0 of epoch 1.*{match}"):
        getattr(ee.train, method)(model, [(x, make(y))], 1, 1e-2, seed=0, progress=False, **TRAIN_KW[method])
    after = _state(model)
    assert _same_state(before, {k: after[k] for k in before})
    assert all(p.grad is None for p in model.parameters())


def test_loss_functions_refuse_labels_out_of_range():
    # Before: IndexError from inside cross_entropy / nll_loss.
    lg = [torch.randn(3, 4), torch.randn(3, 4)]
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\).*got 7"):
        ee.train.joint_loss(lg, torch.tensor([0, 7, 1]), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\).*got -2"):
        ee.train.differentiable_loss(lg, [torch.randn(3)], torch.tensor([0, -2, 1]))
    soft = torch.softmax(torch.randn(3, 4), 1)  # class probabilities stay accepted, as in F.cross_entropy
    loss, _ = ee.train.joint_loss(lg, soft, [1.0, 1.0])
    assert torch.allclose(loss, sum(F.cross_entropy(v, soft) for v in lg))


@pytest.mark.parametrize("method", sorted(TRAIN_KW))
def test_empty_batches_are_skipped(method):
    # Before: an empty batch's mean loss was NaN (the epoch's history NaN) and Adam stepped on it
    # anyway (its momentum moved the weights on a batch with no samples).
    good = list(toy_data())
    x, y = good[0]
    base = small_model()
    runs = []
    for data in (good, [good[0], (x[:0], y[:0]), good[1], (x[:0], y[:0]), good[2]]):
        m = copy.deepcopy(base)
        h = getattr(ee.train, method)(m, data, 2, 1e-2, seed=0, progress=False, **TRAIN_KW[method])
        h = h[0] if isinstance(h, tuple) else h
        runs.append((_state(m), h.to_dict()))
    assert _same_state(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and all(math.isfinite(v) for v in runs[1][1]["loss"])


def test_same_seed_same_result_and_global_rng_untouched():
    base = small_model()
    runs = []
    for _ in range(2):
        m = copy.deepcopy(base)
        torch.manual_seed(123)
        h = ee.train.differentiable(m, toy_data(seed=5), epochs=2, lr=1e-2, cost_weight=0.2, seed=7, progress=False)
        after = torch.rand(1)  # the caller's RNG stream is where it was
        runs.append((m.state_dict(), h.to_dict(), after))
    (s1, h1, r1), (s2, h2, r2) = runs
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert h1 == h2
    torch.manual_seed(123)
    assert torch.equal(r1, torch.rand(1)) and torch.equal(r1, r2)


def test_train_mode_is_restored_and_progress_bars(capfd, monkeypatch):
    # EERUNTIME_PROGRESS=1: the terminal bar even though pytest's capture is not a terminal (a
    # short loop in a log prints nothing: eeruntime/progress.py, tests/test_progress.py)
    monkeypatch.setenv("EERUNTIME_PROGRESS", "1")
    m = small_model().eval()
    ee.train.joint(m, toy_data(), 1, 1e-3, progress=False)
    assert not any(mod.training for mod in m.modules())
    assert capfd.readouterr().err == ""
    ee.train.joint(m, toy_data(), 1, 1e-3, progress=True)
    assert "joint 1/1" in capfd.readouterr().err
    m.train()
    ee.train.differentiable(m, toy_data(), 1, 1e-3, progress=False)
    assert all(mod.training for mod in m.modules())  # the gates it added follow the model


# ------------------------------------------------------------------ learned criteria in the runtime
def gate_loop64(model, x, T):
    """Per-sample loop with the gates computed by hand in float64 from the pooled state.
    Returns the exit of each row and |g - T| at its deciding gates (small: a near-tie)."""
    exits, near = [], []
    for i in range(x.shape[0]):
        state, closest = x[i : i + 1], float("inf")
        for k in range(model.num_exits):
            state = model.stages[k](state)
            if k == model.num_exits - 1:
                break
            gh = model.exits[k].gate_head
            feats = state.double().mean(dim=(2, 3))
            g = float(torch.sigmoid(feats @ gh.weight.double().T + gh.bias.double())[0, 0])
            closest = min(closest, abs(g - T))
            if g >= T:
                break
        exits.append(k)
        near.append(closest)
    return torch.tensor(exits), torch.tensor(near)


@torch.no_grad()
def test_gate_criterion_matches_a_per_sample_loop():
    model = small_model(gates=True).eval()
    x = torch.randn(40, 1, 6, 6)
    state = x
    for k in range(2):  # spread the gates around 0.5 so that every exit gets samples
        state = model.stages[k](state)
        gh = model.exits[k].gate_head
        nn.init.normal_(gh.weight, std=3.0)
        gh.bias.copy_(-(state.mean(dim=(2, 3)) @ gh.weight.T).median() + 0.0123)
    for T in (0.3, 0.5, 0.7):
        rt = ee.EERuntime(model, thresholds=T, criterion=ee.train.gate_criterion(model))
        res = rt.infer(x)
        want, near = gate_loop64(model, x, T)
        clear = near > 1e-5
        assert int(clear.sum()) >= 38
        assert torch.equal(res.exit_index[clear], want[clear])
        outs = model(x)
        for i, k in enumerate(res.exit_index.tolist()):
            torch.testing.assert_close(res.logits[i], outs[k][i], rtol=1e-5, atol=1e-6)
        final = res.exit_index == 2
        assert torch.equal(res.confidence[final], torch.ones(int(final.sum())))
    want, near = gate_loop64(model, x, 0.5)
    assert len(set(want.tolist())) == 3
    # a sequence of gate modules works the same way
    gates = [lambda s, k=k: model.exits[k].gate(s) for k in range(2)]
    res2 = ee.EERuntime(model, thresholds=0.5, criterion=ee.train.gate_criterion(gates)).infer(x)
    assert torch.equal(res2.exit_index[near > 1e-5], want[near > 1e-5])


@torch.no_grad()
def test_confidence_criterion_matches_a_per_sample_loop():
    model = small_model(confidence=True).eval()
    x = torch.randn(30, 1, 6, 6)
    state = x
    for k in range(2):
        state = model.stages[k](state)
        h = model.exits[k].confidence_head
        nn.init.normal_(h.weight, std=3.0)
        h.bias.copy_(-(state.mean(dim=(2, 3)) @ h.weight.T).median() + 0.0123)  # no row exactly at a threshold
    crit = ee.train.confidence_criterion(model)
    res = ee.EERuntime(model, thresholds=[0.4, 0.6], criterion=crit).infer(x)
    want = []
    for i in range(30):
        state, k = x[i : i + 1], 0
        while k < 2:
            state = model.stages[k](state)
            h = model.exits[k].confidence_head
            c = torch.sigmoid(state.double().mean(dim=(2, 3)) @ h.weight.double().T + h.bias.double())[0, 0]
            if c >= [0.4, 0.6][k]:
                break
            k += 1
        want.append(k)
    assert res.exit_index.tolist() == want
    with pytest.raises(ValueError, match=r"early exit\(s\) \[0, 1\] have no gate"):
        ee.train.gate_criterion(model)


def test_gates_are_saved_with_the_model():
    model = small_model()
    ee.train.differentiable(model, toy_data(), epochs=1, lr=1e-2, progress=False)
    saved = copy.deepcopy(model.state_dict())
    fresh = small_model(gates=True)  # same layout, gates created up front
    fresh.load_state_dict(saved)
    x = torch.randn(10, 1, 6, 6)
    a = ee.EERuntime(model, 0.5, criterion=ee.train.gate_criterion(model)).infer(x)
    b = ee.EERuntime(fresh, 0.5, criterion=ee.train.gate_criterion(fresh)).infer(x)
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.logits, b.logits)
    assert any(k.endswith("gate_head.weight") for k in saved)


@requires_cuda
def test_training_on_cuda():
    model = small_model().cuda()
    hist = ee.train.differentiable(model, toy_data(), epochs=1, lr=1e-2, cost_weight=0.1, progress=False)
    assert model.exits[0].gate_head.weight.is_cuda and len(hist.loss) == 1
    ee.train.post_train(model, toy_data(), epochs=1, lr=1e-2, confidence=True, progress=False)
    res = ee.EERuntime(model, 0.5, criterion=ee.train.confidence_criterion(model)).infer(
        torch.randn(8, 1, 6, 6, device="cuda")
    )
    assert res.logits.is_cuda


# ------------------------------------------------------------------ real data: scikit-learn digits
@pytest.fixture(scope="module")
def digits_joint():
    torch.manual_seed(0)
    d = load_digits_split()
    model = digits_cnn(width=8)
    hist = ee.train.joint(model, Batches(d.x_train, d.y_train, 64, seed=0), epochs=6, lr=3e-3, seed=0, progress=False)
    return d, model, hist


def accuracy(model, x, y):
    with torch.no_grad():
        return [float((o.argmax(1) == y).double().mean()) for o in model.eval()(x)]


@pytest.mark.slow
def test_digits_joint_reaches_95_percent(digits_joint):
    d, model, hist = digits_joint
    acc = accuracy(model, d.x_test, d.y_test)
    assert acc[-1] >= 0.95, acc
    assert hist.loss[-1] < hist.loss[0]


@pytest.mark.slow
def test_digits_post_train_on_the_frozen_backbone(digits_joint):
    d, joint_model, _ = digits_joint
    # the jointly trained network as a plain backbone, then PTEE branches on it
    backbone = nn.Sequential(*copy.deepcopy(list(joint_model.stages)), copy.deepcopy(joint_model.exits[-1]))
    before = copy.deepcopy(backbone.state_dict())
    conv_head = lambda shape, c: ConvHead(shape[0], c, width=32)  # noqa: E731  (PTEE branch, pooled to 2x2)
    model = ee.attach_exits(backbone, at=["0", "1"], head=conv_head, confidence=True, example_input=d.x_train[:2])
    hist = ee.train.post_train(
        model,
        Batches(d.x_train, d.y_train, 64, seed=1),
        epochs=6,
        lr=3e-3,
        confidence=True,
        cost_weight=0.05,
        seed=0,
        progress=False,
    )
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    acc = accuracy(model, d.x_test, d.y_test)
    assert acc[0] >= 0.85, acc
    assert hist.exit_agreement[-1][0] > hist.exit_agreement[0][0]
    # PTEE's knob: one threshold on the confidence heads; a higher one sends every sample as deep or deeper
    exits = []
    for T in (0.5, 0.9, 0.95, 0.99):
        res = ee.EERuntime(model, thresholds=T, criterion=ee.train.confidence_criterion(model)).infer(d.x_test)
        exits.append(res.exit_index)
    for lo, hi in zip(exits, exits[1:]):
        assert bool((hi >= lo).all())
    assert float(exits[0].float().mean()) < float(exits[-1].float().mean())

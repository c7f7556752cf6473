"""The fused C++ CPU exit decision (backend "cpp", csrc/exit_decision_cpu.cpp) against the float64
oracle of tests/reference.py and torch.argmax; its threshold forms, layouts, checks, opcheck,
dispatch and use by EERuntime."""

from __future__ import annotations

import pytest
import torch
from reference import check_decision, decision_logits, decision_tol, score64

import eeruntime as ee
from eeruntime import _ext
from eeruntime.criteria import CRITERION_CODE
from eeruntime.ops import BackendUnavailable, _ext_backend, dispatch

needs_op = pytest.mark.skipif(
    _ext_backend._exit_decision_op() is None,
    reason=f"eeruntime._C is not built with exit_decision ({_ext.why_unavailable() or 'built before the op'}); "
    f"{_ext.BUILD_HINT}",
)
pytestmark = needs_op

CRITERIA = ("entropy", "max_prob", "margin", "norm_entropy")
NEG_INF, POS_INF, NAN = float("-inf"), float("inf"), float("nan")


def make_logits(B: int, C: int, dtype=torch.float32) -> torch.Tensor:
    return decision_logits(B, C, dtype, scale=6.0)


# ---------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("C", [1, 2, 3, 10, 32, 33, 1000, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_scores_flags_argmax_match_float64(C, dtype):
    # 37 rows: groups of 8 narrow rows plus a remainder, and enough rows to split work.
    B = 3 if C > 5000 else 37
    x = make_logits(B, C, dtype)
    for criterion in CRITERIA:
        ref = score64(x, criterion)
        finite = ref[~torch.isnan(ref)]
        thr = float(finite.median())  # rows on both sides, so a wrong flag shows
        conf, mask, argmax = ee.ops.exit_decision(x, thr, criterion, backend="cpp", return_argmax=True)
        check_decision(x, criterion, thr, conf, mask, argmax)


def special_rows(C: int) -> torch.Tensor:
    """Rows that test the NaN / inf rules, padded to C columns with ordinary values."""
    rows = [
        [1.0, NAN, 2.0],  # NaN: scores NaN, argmax the NaN
        [NAN, NAN, POS_INF],  # NaN before +inf: argmax the first NaN
        [1.0, POS_INF, 2.0],  # +inf: softmax NaN, argmax the +inf
        [POS_INF, POS_INF, 0.0],  # two +inf
        [NEG_INF, NEG_INF, NEG_INF],  # only -inf: softmax NaN, argmax 0
        [NEG_INF, 5.0, NEG_INF],  # one finite class: p = 1
        [3.0, 3.0, NEG_INF],  # tied maximum: margin 0
        [1e30, -1e30, 0.0],  # huge spread: e^(x - m) underflows
        [60.0, 0.0, 0.0],  # near one-hot: entropy ~ 0, never below it
    ]
    out = []
    for r in rows:
        # padding: -inf keeps the row's meaning; plain values make it an ordinary wide row
        pad = torch.full((C - 3,), NEG_INF) if "inf" in str(r) or NAN in r else torch.randn(C - 3) - 50
        out.append(torch.cat([torch.tensor(r), pad]))
    return torch.stack(out * 2)  # 18 rows: two groups of 8 and a remainder in the narrow path


@pytest.mark.parametrize("C", [3, 10, 100], ids=lambda c: f"C{c}")
def test_nan_and_inf_rows(C):
    x = special_rows(C)
    for criterion in CRITERIA:
        # thresholds every finite score passes, so only the NaN rows stay
        thr = POS_INF if criterion == "entropy" else -1.0
        conf, mask, argmax = ee.ops.exit_decision(x, thr, criterion, backend="cpp", return_argmax=True)
        check_decision(x, criterion, thr, conf, mask, argmax)
        nan_rows = torch.isnan(x).any(1) | torch.isposinf(x).any(1) | torch.isneginf(x).all(1)
        assert torch.isnan(conf[nan_rows]).all() and not mask[nan_rows].any()
        assert mask[~nan_rows].all()


# --------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(20, 24)[:, ::2],  # column stride 2: copied to contiguous first
        lambda: torch.randn(60, 12)[::3],  # rows at a stride
        lambda: torch.randn(20, 40)[:, 5:17],  # rows inside a wider buffer, offset start
        lambda: torch.randn(1, 12).expand(20, 12),  # every row the same memory (stride 0)
        lambda: torch.randn(12, 20).t(),  # transposed
        lambda: torch.randn(20, 3000)[:, 7:2007],  # wide rows inside a wider buffer
    ],
    ids=["col-strided", "row-strided", "column-slice", "expanded", "transposed", "wide-slice"],
)
def test_non_contiguous_logits(make):
    x = make() * 3
    before = x.clone()
    for criterion in CRITERIA:
        conf, mask, argmax = ee.ops.exit_decision(x, 0.5, criterion, backend="cpp", return_argmax=True)
        check_decision(x, criterion, 0.5, conf, mask, argmax)
        ref = ee.ops.exit_decision(x.contiguous(), 0.5, criterion, backend="cpp", return_argmax=True)
        for a, b in zip((conf, mask, argmax), ref):
            assert torch.equal(a, b)  # the layout does not change a single bit
    assert torch.equal(x, before)  # the input is never written


# ------------------------------------------------------------------------------------ thresholds
def test_threshold_forms_agree_and_a_view_is_read_at_call_time():
    x = make_logits(40, 10)
    h = score64(x, "entropy")
    srt = h.sort().values

    def between(i):  # halfway between two neighbouring scores: no row is a near-tie
        return float(srt[i] + srt[i + 1]) / 2

    thr_value = between(19)
    expected = ee.ops.exit_decision(x, thr_value, "entropy", backend="torch")[1]
    forms = [
        thr_value,
        torch.tensor(thr_value),
        torch.tensor([thr_value]),
        torch.tensor(thr_value, dtype=torch.float64),
        torch.tensor([0.0, thr_value, 9.0])[1],  # a 0-dim view at an offset
    ]
    for thr in forms:
        _, mask = ee.ops.exit_decision(x, thr, "entropy", backend="cpp")
        assert torch.equal(mask, expected), thr
    # the runtime's pattern: one buffer of thresholds, a view per exit, updated in place
    buf = torch.tensor([thr_value, 0.0])
    view = buf[0]
    for value in (thr_value, float(h.min()) - 1.0, float(h.max()) + 1.0, between(9)):
        buf[0] = value
        _, mask = ee.ops.exit_decision(x, view, "entropy", backend="cpp")
        assert torch.equal(mask, h < torch.tensor(value, dtype=torch.float32).double()), value
    assert ee.ops.exit_decision(x, 3, "max_prob", backend="cpp")[1].sum() == 0  # an int threshold
    # a threshold is compared in float32, as the reference's threshold tensor
    conf = ee.ops.exit_decision(x, 0.0, "max_prob", backend="cpp")[0]
    _, mask = ee.ops.exit_decision(x, float(conf[0]), "max_prob", backend="cpp")
    assert bool(mask[0])


@pytest.mark.parametrize(
    "thr, error, match",
    [
        (torch.tensor([0.1, 0.2]), ValueError, "one-element tensor"),
        (torch.zeros(0), ValueError, "one-element tensor"),
        ("0.5", TypeError, "float or a one-element tensor"),
        (True, TypeError, "float or a one-element tensor"),
        (None, TypeError, "float or a one-element tensor"),
    ],
    ids=["two-elements", "empty", "str", "bool", "None"],
)
def test_bad_threshold(thr, error, match):
    x = make_logits(4, 5)
    with pytest.raises(error, match=match):
        ee.ops.exit_decision(x, thr, "entropy", backend="cpp")


@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_numpy_and_odd_dtype_thresholds_are_read_as_their_real_value(backend):
    """A numpy scalar is a real number (as EERuntime's thresholds accept it); a float8 threshold
    tensor is read as its value. Before, numpy scalars failed with "must be a float ... got
    float32" and a float8 tensor with the C++ dispatch's NotImplementedError."""
    np = pytest.importorskip("numpy")
    x = make_logits(40, 10)
    score = score64(x, "max_prob")
    srt = score.sort().values
    value = float(srt[19] + srt[20]) / 2  # between two scores: no row is a near-tie
    expected = score >= value
    for thr in (np.float32(value), np.float64(value)):
        _, mask = ee.ops.exit_decision(x, thr, "max_prob", backend=backend)
        assert torch.equal(mask, expected), type(thr)
    assert ee.ops.exit_decision(x, np.int64(2), "max_prob", backend=backend)[1].sum() == 0
    assert ee.ops.exit_decision(x, np.int64(0), "max_prob", backend=backend)[1].all()
    if backend != "cpp":  # float8: the torch backend converts it (auto goes there)
        f8 = torch.tensor(value).to(torch.float8_e4m3fn)
        conf, mask = ee.ops.exit_decision(x, f8, "max_prob", backend=backend)
        assert torch.equal(mask, conf >= float(f8.float()))  # the kernel's own scores, against f8's value


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_complex_or_meta_threshold_is_refused_clearly(backend):
    """Before: a complex threshold failed in C++ ('not implemented for ComplexFloat') under auto and
    was silently cut to its real part by the torch backend; a meta one: 'Cannot copy out of meta'."""
    x = make_logits(4, 5)
    with pytest.raises(TypeError, match="real number.*complex64"):
        ee.ops.exit_decision(x, torch.tensor(0.5 + 0.5j), "entropy", backend=backend)
    with pytest.raises(ValueError, match="meta tensor"):
        ee.ops.exit_decision(x, torch.tensor(0.5, device="meta"), "entropy", backend=backend)
    with pytest.raises(BackendUnavailable, match="complex64"):
        ee.ops.exit_decision(x, torch.tensor(0.5 + 0.5j), "entropy", backend="cpp")


# ------------------------------------------------------------------------------- edges and checks
@pytest.mark.parametrize("return_argmax", [False, True])
def test_empty_batch(return_argmax):
    x = torch.empty(0, 7)
    out = ee.ops.exit_decision(x, torch.tensor(0.5), "margin", backend="cpp", return_argmax=return_argmax)
    assert len(out) == (3 if return_argmax else 2)
    assert out[0].shape == (0,) and out[0].dtype == torch.float32
    assert out[1].shape == (0,) and out[1].dtype == torch.bool
    if return_argmax:
        assert out[2].shape == (0,) and out[2].dtype == torch.int64


def test_op_checks_its_arguments():
    op = torch.ops.eeruntime.exit_decision
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="2-D"):
        op(torch.randn(5), None, 0.5, 0, False)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        op(torch.zeros(4, 5, dtype=torch.int64), None, 0.5, 0, False)
    with pytest.raises(ValueError, match="at least one class"):
        op(torch.empty(4, 0), None, 0.5, 0, False)
    with pytest.raises(ValueError, match="criterion must be a code 0-3"):
        op(x, None, 0.5, 4, False)
    with pytest.raises(ValueError, match="one-element tensor"):
        op(x, torch.zeros(3), 0.0, 0, False)
    conf, mask, argmax = op(x, None, 0.5, CRITERION_CODE["max_prob"], False)
    assert argmax.shape == (0,)  # not requested: empty
    assert torch.equal(mask, conf >= 0.5)


@pytest.mark.parametrize("B", [0, 9])
def test_opcheck(B):
    x = make_logits(B, 6)
    op = torch.ops.eeruntime.exit_decision.default
    for args in [
        (x, torch.tensor(0.7), 0.0, CRITERION_CODE["entropy"], True),
        (x, None, 0.3, CRITERION_CODE["margin"], False),
        (x.to(torch.bfloat16), torch.tensor([0.4]), 0.0, CRITERION_CODE["norm_entropy"], True),
    ]:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


# -------------------------------------------------------------------------------------- dispatch
def test_auto_picks_cpp_on_cpu(monkeypatch):
    assert dispatch.backends("exit_decision").index("cpp") == dispatch.backends("exit_decision").index("torch") - 1
    x = make_logits(16, 10)
    why = ee.ops.explain("exit_decision", x, 0.5, "entropy", False)
    assert why["cpp"] is None and why["triton"] is not None
    calls = []
    cpp = next(b for b in dispatch._REGISTRY["exit_decision"] if b.name == "cpp")
    monkeypatch.setattr(cpp, "fn", lambda *a, _fn=cpp.fn: calls.append(1) or _fn(*a))
    conf, _ = ee.ops.exit_decision(x, 0.5, "entropy")
    assert calls == [1]
    torch.testing.assert_close(conf, ee.ops.confidence_ref(x, "entropy"), atol=1e-5, rtol=0)


def test_grad_and_unsupported_dtype_go_to_the_torch_backend():
    x = make_logits(6, 5).requires_grad_()
    assert "require grad" in ee.ops.explain("exit_decision", x, 0.5, "entropy", False)["cpp"]
    conf, _ = ee.ops.exit_decision(x, 0.5, "entropy")  # auto: the differentiable reference
    conf.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        assert ee.ops.explain("exit_decision", x, 0.5, "entropy", False)["cpp"] is None
    f8 = make_logits(6, 5).to(torch.float8_e4m3fn)
    assert "float8_e4m3fn" in ee.ops.explain("exit_decision", f8, 0.5, "entropy", False)["cpp"]
    with pytest.raises(BackendUnavailable, match="float8_e4m3fn"):
        ee.ops.exit_decision(f8, 0.5, "entropy", backend="cpp")


def test_unbuilt_extension_falls_back_and_forcing_it_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", None)
    x = make_logits(6, 5)
    with pytest.raises(BackendUnavailable, match=r"_C is not built.*pip install --no-build-isolation -e \."):
        ee.ops.exit_decision(x, 0.5, "entropy", backend="cpp")
    assert ee.ops.explain("exit_decision", x, 0.5, "entropy", False)["torch"] is None
    conf, _ = ee.ops.exit_decision(x, 0.5, "entropy")  # auto: the torch reference
    torch.testing.assert_close(conf, ee.ops.confidence_ref(x, "entropy"))


def test_extension_built_before_the_op_says_rebuild(monkeypatch):
    monkeypatch.setattr(_ext_backend, "_exit_decision_op", lambda: None)
    with pytest.raises(BackendUnavailable, match="built before exit_decision.*rebuild"):
        ee.ops.exit_decision(make_logits(6, 5), 0.5, "entropy", backend="cpp")


# --------------------------------------------------------------------------------------- runtime
@pytest.mark.parametrize("criterion", CRITERIA)
def test_runtime_with_cpp_decisions_equals_torch_decisions(criterion, monkeypatch):
    torch.manual_seed(1)
    stages = [torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(3)]
    exits = [torch.nn.Linear(6, 10) for _ in range(3)]
    with torch.no_grad():
        for e in exits:
            e.weight.mul_(4.0)  # spread the scores over their range
    model = ee.MultiExitModel(stages, exits)
    x = torch.randn(300, 6)
    with torch.no_grad():
        s0 = score64(model(x)[0], criterion)
    # a threshold in the middle of exit 0's scores, in a gap so no row is a near-tie
    srt = s0.sort().values
    i = int(torch.argmax(srt[100:200].diff())) + 100
    thr = float(srt[i] + srt[i + 1]) / 2
    calls = []
    real = _ext_backend.cpu_loop_ops()  # the runtime's CPU loop decides with the fused exit_scatter op
    counted = _ext_backend.CpuLoopOps(
        lambda *a: calls.append(1) or real.exit_scatter(*a), real.compact, real.compact_, real.decide
    )
    monkeypatch.setattr("eeruntime.runtime.executors.cpu_loop_ops", lambda: counted)
    a = ee.EERuntime(model, thresholds=thr, criterion=criterion, decision_backend="cpp").infer(x)
    assert calls  # the cpp kernel made the decisions
    b = ee.EERuntime(model, thresholds=thr, criterion=criterion, decision_backend="torch").infer(x)
    assert 0 < int((a.exit_index == 0).sum()) < 300  # the threshold splits the batch
    assert torch.equal(a.exit_index, b.exit_index)
    assert torch.equal(a.logits, b.logits)
    torch.testing.assert_close(a.confidence, b.confidence, atol=1e-5, rtol=0)


def test_large_batch_matches_the_torch_reference():
    # Enough logits for at::parallel_for to split the rows over threads (when the extension is
    # built with OpenMP), with both the narrow (grouped) and the wide row paths.
    for B, C in ((5000, 20), (3000, 300)):
        x = torch.randn(B, C) * 3
        x[::97, 3] = NAN
        for criterion in CRITERIA:
            conf, mask, argmax = ee.ops.exit_decision(x, 0.5, criterion, backend="cpp", return_argmax=True)
            ref_conf, ref_mask, ref_argmax = ee.ops.exit_decision_ref(x, 0.5, criterion, return_argmax=True)
            torch.testing.assert_close(conf, ref_conf, atol=decision_tol(x.dtype, C, criterion), rtol=0, equal_nan=True)
            # near-ties may fall either way; NaN rows (never exit) are checked too
            clear = ~((ref_conf - 0.5).abs() <= decision_tol(x.dtype, C, criterion))
            assert torch.equal(mask[clear], ref_mask[clear])
            assert torch.equal(argmax, ref_argmax)

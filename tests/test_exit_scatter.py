"""``exit_scatter`` (decide + scatter in one call) and ``compact_`` (in-place pack), the compiled
ops of EERuntime's CPU loop, against float64 scores, ``index_copy_`` and boolean indexing; and
the runtime's in-place pack against the per-sample loop, including the models it must not use it
for (a stage that keeps or returns a tensor someone else holds)."""

import math

import pytest
import torch
from reference import decision_logits, decision_tol, exits64, per_sample_loop, score64

import eeruntime as ee
from eeruntime import _ext
from eeruntime.ops import BackendUnavailable, _ext_backend
from eeruntime.ownership import sole_owner

needs_op = pytest.mark.skipif(
    _ext_backend.cpu_loop_ops() is None,
    reason=f"eeruntime._C is not built with exit_scatter and compact_ ({_ext.why_unavailable() or 'built before them'}); "
    f"{_ext.BUILD_HINT}",
)
CRITERIA = ["entropy", "max_prob", "margin", "norm_entropy"]
BACKENDS = ["torch", pytest.param("cpp", marks=needs_op)]


def outputs(B, C, dtype=torch.float32):
    """Output buffers holding sentinels, so rows that must stay untouched can be checked."""
    return torch.full((B, C), -5.0, dtype=dtype), torch.full((B,), -6.0), torch.full((B,), 99, dtype=torch.int64)


# ------------------------------------------------------------------------------------ exit_scatter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("n", [0, 1, 9, 301])
def test_exit_scatter_matches_float64_and_index_copy(backend, criterion, dtype, n):
    torch.manual_seed(n)
    C, B = 7, n + 4  # the outputs have rows no logits row maps to
    x = decision_logits(n, C, dtype)
    ref = score64(x, criterion)
    finite = ref[~torch.isnan(ref)]
    thr = float(finite.median()) if finite.numel() else 0.5
    thresholds = torch.tensor([0.0, thr, 0.0])  # read at index `exit`
    rows = torch.randperm(B)[:n]
    out, conf, exit_index = outputs(B, C)
    keep, n_exit = ee.ops.exit_scatter(x, thresholds, criterion, 1, rows, out, conf, exit_index, backend=backend)
    assert keep.dtype == torch.bool and keep.shape == (n,) and isinstance(n_exit, int)
    leaves = ~keep
    assert n_exit == int(leaves.sum())
    # The score written for each leaving row, and the flags, against float64 (near-ties either way).
    full_conf = torch.full((n,), float("nan"))
    full_conf[leaves] = conf[rows[leaves]]
    t = decision_tol(dtype, C, criterion)
    for i in range(n):
        s = float(ref[i])
        if math.isnan(s) or abs(s - thr) > t:
            assert bool(leaves[i]) == exits64(s, thr, criterion), (i, s, thr)
    torch.testing.assert_close(full_conf[leaves].double(), ref[leaves], atol=t, rtol=0, equal_nan=True)
    # Leaving rows land at their original rows; every other row keeps its sentinel.
    exp_out, exp_conf, exp_idx = outputs(B, C)
    exp_out.index_copy_(0, rows[leaves], x[leaves].float())
    exp_idx.index_fill_(0, rows[leaves], 1)
    assert torch.equal(out, exp_out) and torch.equal(exit_index, exp_idx)
    untouched = torch.ones(B, dtype=torch.bool)
    untouched[rows[leaves]] = False
    assert (conf[untouched] == -6.0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_exit_scatter_final_writes_every_row_nan_included(backend, criterion):
    x = decision_logits(12, 5)
    x[3, 1] = float("nan")
    x[4, 0] = float("inf")
    rows = torch.randperm(12)
    out, conf, exit_index = outputs(12, 5)
    # No threshold at all: a one-exit model's final exit has none.
    keep, n_exit = ee.ops.exit_scatter(
        x, torch.empty(0), criterion, 0, rows, out, conf, exit_index, final=True, backend=backend
    )
    assert n_exit == 12 and not keep.any()
    torch.testing.assert_close(out[rows], x, atol=0, rtol=0, equal_nan=True)
    assert (exit_index == 0).all()
    ref = score64(x, criterion)
    assert torch.isnan(ref[3]) and torch.isnan(ref[4])
    torch.testing.assert_close(
        conf[rows].double(), ref, atol=decision_tol(torch.float32, 5, criterion), rtol=0, equal_nan=True
    )


@needs_op
def test_exit_scatter_cpp_equals_torch_backend_on_a_big_batch_and_converts_dtype():
    torch.manual_seed(0)
    x = torch.randn(5000, 40, dtype=torch.bfloat16) * 4
    thresholds = torch.tensor([1.5])
    rows = torch.randperm(6000)[:5000]
    results = []
    for backend in ("cpp", "torch"):
        out, conf, exit_index = outputs(6000, 40, dtype=torch.float16)  # bf16 logits into an fp16 output
        keep, n_exit = ee.ops.exit_scatter(x, thresholds, "entropy", 0, rows, out, conf, exit_index, backend=backend)
        results.append((keep, n_exit, out, exit_index))
    (k1, n1, o1, e1), (k2, n2, o2, e2) = results
    assert 1000 < n1 < 4000  # a real mix of leaving and staying rows
    # Flags may differ only at near-ties of the two fp32 computations.
    differ = k1 != k2
    ref = score64(x[differ], "entropy")
    assert ((ref - 1.5).abs() < decision_tol(torch.bfloat16, 40, "entropy")).all()
    both = ~(k1 | k2)  # left under both backends
    assert torch.equal(o1[rows[both]], x[both].to(torch.float16))
    assert torch.equal(o1[rows[both]], o2[rows[both]])
    assert torch.equal(e1[rows[~differ]], e2[rows[~differ]])


def test_exit_scatter_float8_thresholds_are_read_as_their_value():
    """A float8 thresholds tensor (a float dtype the op accepts) is decided on its values, as the
    reference's .to(float32); before, auto failed in C++ with 'not implemented for Float8_e4m3fn'."""
    x = decision_logits(30, 6, torch.float32, 3.0)
    thresholds = torch.tensor([0.5, 0.7]).to(torch.float8_e4m3fn)
    rows = torch.randperm(40)[:30]
    out, conf, exit_index = outputs(40, 6)
    keep, n_exit = ee.ops.exit_scatter(x, thresholds, "max_prob", 1, rows, out, conf, exit_index)
    leaves = score64(x, "max_prob") >= float(thresholds[1].float())
    assert torch.equal(keep, ~leaves) and n_exit == int(leaves.sum())
    assert torch.equal(exit_index[rows[leaves]], torch.ones(int(leaves.sum()), dtype=torch.int64))
    assert torch.equal(out[rows[leaves]], x[leaves])


@needs_op
def test_exit_scatter_bad_arguments_raise_before_writing():
    x = torch.randn(4, 3)
    rows = torch.arange(4)
    out, conf, idx = outputs(4, 3)
    thr = torch.tensor([10.0])  # entropy < 10: every row leaves
    with pytest.raises(ValueError, match="exit 2 has no threshold"):
        ee.ops.exit_scatter(x, thr, "entropy", 2, rows, out, conf, idx)
    with pytest.raises(ValueError, match="exit 2 has no threshold"):  # the op's own check
        torch.ops.eeruntime.exit_scatter(x, thr, 0, 2, False, rows, out, conf, idx)
    with pytest.raises(ValueError, match=r"rows must be int64 \[4\]"):
        ee.ops.exit_scatter(x, thr, "entropy", 0, rows[:3], out, conf, idx)
    with pytest.raises(ValueError, match=r"out must be a floating \[B, 3\]"):
        ee.ops.exit_scatter(x, thr, "entropy", 0, rows, torch.zeros(4, 2), conf, idx)
    with pytest.raises(ValueError, match=r"confidence must be torch.float32 \[4\]"):
        ee.ops.exit_scatter(x, thr, "entropy", 0, rows, out, conf[:3], idx)
    with pytest.raises(ValueError, match="named criterion"):
        ee.ops.exit_scatter(x, thr, "confident", 0, rows, out, conf, idx)
    with pytest.raises(IndexError, match="rows holds 7"):
        torch.ops.eeruntime.exit_scatter(x, thr, 0, 0, False, torch.tensor([0, 1, 7, 2]), out, conf, idx)
    assert (out == -5).all() and (conf == -6).all() and (idx == 99).all()
    with pytest.raises(ValueError, match="thresholds must be a CPU tensor|criterion must be a code"):
        torch.ops.eeruntime.exit_scatter(x, thr, 9, 0, False, rows, out, conf, idx)


@needs_op
@pytest.mark.parametrize("n", [0, 5])
def test_exit_scatter_opcheck(n):
    x = torch.randn(n, 4)
    out, conf, idx = outputs(n + 2, 4)
    args = (x, torch.tensor([0.7]), 1, 0, False, torch.randperm(n + 2)[:n], out, conf, idx)
    result = torch.library.opcheck(torch.ops.eeruntime.exit_scatter.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_exit_scatter_unbuilt_extension_falls_back_and_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", None)
    x = torch.randn(3, 4)
    out, conf, idx = outputs(3, 4)
    with pytest.raises(BackendUnavailable, match=r"_C is not built.*pip install --no-build-isolation -e \."):
        ee.ops.exit_scatter(x, torch.tensor([9.0]), "entropy", 0, torch.arange(3), out, conf, idx, backend="cpp")
    keep, n_exit = ee.ops.exit_scatter(x, torch.tensor([9.0]), "entropy", 0, torch.arange(3), out, conf, idx)
    assert n_exit == 3 and torch.equal(out, x)
    assert ee.ops.backends("exit_scatter") == ["cpp", "torch"]


# ---------------------------------------------------------------------------------------- compact_
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [0, 1, 7, 1000])
@pytest.mark.parametrize("pattern", ["none", "all", "some", "alternate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_compact_inplace_matches_boolean_indexing(backend, B, pattern, dtype):
    keep = {
        "none": torch.zeros(B, dtype=torch.bool),
        "all": torch.ones(B, dtype=torch.bool),
        "some": torch.rand(B) < 0.5,
        "alternate": torch.arange(B) % 2 == 1,
    }[pattern]
    t = (torch.randn(B, 3, 2) * 100).to(dtype)
    rows = torch.arange(B)
    scalar = torch.randn(B)  # one element per row
    expected = [t[keep], rows[keep], scalar[keep]]
    n = ee.ops.compact_(keep, [t, rows, scalar], backend=backend)
    assert n == int(keep.sum())
    for got, exp in zip((t, rows, scalar), expected):
        assert torch.equal(got[:n], exp)


@needs_op
def test_compact_inplace_strided_rows_and_refusals():
    keep = torch.tensor([False, True, True, False, True])
    base = torch.randn(5, 6)
    t = base[:, :4]  # dense rows at a stride: moved one by one
    expected = t[keep].clone()
    assert ee.ops.compact_(keep, [t], backend="cpp") == 3
    assert torch.equal(t[:3], expected)
    shared = torch.zeros(1, 4).expand(5, 4)
    with pytest.raises(ValueError, match="share memory"):
        ee.ops.compact_(keep, [shared])
    same = torch.randn(5, 2)
    with pytest.raises(ValueError, match="share memory"):
        ee.ops.compact_(keep, [same, same[:, :1]])
    transposed = torch.randn(4, 5).t()
    assert "not dense within a row" in ee.ops.explain("compact_", keep, [transposed])["cpp"]
    with pytest.raises(BackendUnavailable, match="not dense within a row"):
        ee.ops.compact_(keep, [transposed], backend="cpp")
    exp = transposed[keep].clone()
    ee.ops.compact_(keep, [transposed])  # auto: the torch reference takes it
    assert torch.equal(transposed[:3], exp)
    with pytest.raises(ValueError, match="not dense within a row"):  # the op's own check
        torch.ops.eeruntime.compact_(keep, [torch.randn(4, 5).t()])


@needs_op
def test_compact_inplace_opcheck():
    keep = torch.tensor([True, False, True, True])
    args = (keep, [torch.randn(4, 3), torch.arange(4), torch.randn(4, 2, 2).to(torch.bfloat16)])
    result = torch.library.opcheck(torch.ops.eeruntime.compact_.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------- ownership
def test_sole_owner_sees_every_other_holder():
    with torch.inference_mode():
        a = torch.randn(3, 4)
        assert sole_owner((a,), named=1) and not sole_owner((a,))
        t = (torch.randn(3), torch.randn(3, 2))
        assert sole_owner(t)
        view = t[0][:2]
        assert not sole_owner(t)  # a view shares the storage
        del view
        assert sole_owner(t)
        alias = t[1]
        assert not sole_owner(t)  # a second Python reference
        del alias
        w = torch.nn.Linear(3, 3).weight
        assert not sole_owner((w,), named=1)  # a parameter is not a plain tensor, and the module holds it
        d = torch.randn(3)
        assert not sole_owner((d, d), named=1)  # the same tensor twice
        x = torch.randn(4, 3)
        assert not sole_owner((x.view(4, 3),))  # a view of someone's tensor


# -------------------------------------------------------------------------- the runtime's CPU loop
class Keeper(torch.nn.Module):
    """A stage that keeps its last output (as a cache or a debugging hook would)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.last = None

    def forward(self, x):
        self.last = self.inner(x)
        return self.last


class ReturnsInput(torch.nn.Module):
    def forward(self, x):
        return x


class ViewOfInput(torch.nn.Module):
    def forward(self, x):
        return x.view(x.shape)


class TupleStage(torch.nn.Module):
    """(hidden, mask) in and out; the mask passes through untouched (someone else's tensor)."""

    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, h, mask):
        return torch.relu(self.lin(h)) * mask, mask


class TupleHead(torch.nn.Module):
    def __init__(self, dim, classes):
        super().__init__()
        self.lin = torch.nn.Linear(dim, classes)

    def forward(self, h, mask):
        return self.lin(h * mask)


def mlp(dim):
    return torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU())


def counting_loop_ops(monkeypatch):
    """Wrap the runtime's compiled CPU-loop ops to count calls (and what compact_ was given)."""
    real = _ext_backend.cpu_loop_ops()
    calls = {"exit_scatter": 0, "compact": 0, "compact_": 0, "decide": 0}

    def wrap(name):
        fn = getattr(real, name)

        def counted(*args):
            calls[name] += 1
            return fn(*args)

        return counted

    ops = _ext_backend.CpuLoopOps(wrap("exit_scatter"), wrap("compact"), wrap("compact_"), wrap("decide"))
    monkeypatch.setattr("eeruntime.runtime.executors.cpu_loop_ops", lambda: ops)
    return calls


def check_against_loop(model, x, thresholds, criterion="entropy", final="last", **kw):
    rt = ee.EERuntime(model, thresholds=thresholds, criterion=criterion, final=final, **kw)
    res = rt.infer(x)
    ref_logits, ref_exit, near = per_sample_loop(model, x, thresholds, criterion, final)
    clear = near > 1e-4  # near-ties of the float32 and float64 scores may fall either way
    assert torch.equal(res.exit_index[clear], ref_exit[clear])
    same = res.exit_index == ref_exit
    torch.testing.assert_close(res.logits[same].double(), ref_logits[same], atol=1e-5, rtol=1e-5)
    assert torch.bincount(res.exit_index, minlength=len(thresholds) + 1).min() > 0, "every exit must take rows"
    return res


@needs_op
@pytest.mark.parametrize("final", ["last", "average"])
def test_runtime_packs_its_own_stage_outputs_in_place(monkeypatch, final):
    torch.manual_seed(3)
    calls = counting_loop_ops(monkeypatch)
    model = ee.MultiExitModel([mlp(6) for _ in range(3)], [torch.nn.Linear(6, 5) for _ in range(3)])
    x = torch.randn(400, 6) * 3
    before = x.clone()
    check_against_loop(model, x, [1.3, 1.5], final=final)
    assert calls["exit_scatter"] == 3 and calls["compact_"] == 2
    # final="average" carries the exits' running sum, which is copied (it may alias exit logits)
    assert calls["compact"] == (2 if final == "average" else 0)
    assert torch.equal(x, before)


@needs_op
@pytest.mark.parametrize("stage0", ["keeper", "returns_input", "view_of_input"])
def test_runtime_never_overwrites_a_tensor_someone_else_holds(monkeypatch, stage0):
    torch.manual_seed(4)
    calls = counting_loop_ops(monkeypatch)
    first = {"keeper": Keeper(mlp(6)), "returns_input": ReturnsInput(), "view_of_input": ViewOfInput()}[stage0]
    model = ee.MultiExitModel([first, mlp(6), mlp(6)], [torch.nn.Linear(6, 5) for _ in range(3)])
    x = torch.randn(300, 6) * 3
    before = x.clone()
    ee.EERuntime(model, thresholds=[1.2, 1.5]).infer(x)
    # stage 0's output is copied; stage 1's own output is packed in place
    assert calls["compact"] == 1 and calls["compact_"] == 1
    assert torch.equal(x, before)  # the caller's input is never written
    if stage0 == "keeper":
        with torch.no_grad():
            assert torch.equal(first.last, first.inner(x))  # the module's cached output is intact
    check_against_loop(model, x, [1.2, 1.5])


@needs_op
def test_runtime_tuple_state_with_a_pass_through_member_is_copied(monkeypatch):
    torch.manual_seed(5)
    calls = counting_loop_ops(monkeypatch)
    model = ee.MultiExitModel([TupleStage(6) for _ in range(3)], [TupleHead(6, 4) for _ in range(3)])
    h, mask = torch.randn(200, 6) * 3, (torch.rand(200, 6) > 0.2).float()
    mask_before = mask.clone()
    check_against_loop(model, (h, mask), [1.0, 1.2])
    assert torch.equal(mask, mask_before)
    assert calls["compact_"] == 0 and calls["compact"] == 2


@needs_op
def test_runtime_forced_torch_backends_skip_the_compiled_loop(monkeypatch):
    calls = counting_loop_ops(monkeypatch)
    torch.manual_seed(6)
    model = ee.MultiExitModel([mlp(6) for _ in range(3)], [torch.nn.Linear(6, 5) for _ in range(3)])
    x = torch.randn(300, 6) * 3
    check_against_loop(model, x, [1.3, 1.5], decision_backend="torch")
    check_against_loop(model, x, [1.3, 1.5], compact_backend="torch")
    assert sum(calls.values()) == 0

"""The fused Triton exit-decision kernel against the float64 oracle of tests/reference.py.

On a machine without CUDA the kernel runs on CPU tensors in the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before triton is imported); with CUDA the same tests
run the compiled kernel on the GPU. Shapes stay small because the interpreter is slow.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from reference import check_decision, decision_logits, decision_tol, per_sample_loop, score64
from torch import nn

import eeruntime as ee
from eeruntime.ops import BackendUnavailable, dispatch
from eeruntime.ops import _triton_backend as tb
from eeruntime.ops.exit_decision import exit_decision_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a CUDA machine every test here runs the compiled kernel on the device (make gpu-check).
pytestmark = pytest.mark.gpu
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("CPU run without TRITON_INTERPRET=1: the kernel cannot run", allow_module_level=True)

from eeruntime.kernels.exit_decision import exit_decision_triton  # noqa: E402  (after the env check)

CRITERIA = ("entropy", "max_prob", "margin", "norm_entropy")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NEG_INF, POS_INF, NAN = float("-inf"), float("inf"), float("nan")


def make_logits(B: int, C: int, dtype, scale: float = 3.0) -> torch.Tensor:
    return decision_logits(B, C, dtype, scale)


# ---------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("C", [1, 2, 3, 10, 1000, pytest.param(50257, id="50257-chunked")])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_scores_flags_argmax_match_float64(C, dtype):
    B = 3 if C > 4096 else 12  # few rows on the chunked path: the interpreter is slow
    x = make_logits(B, C, dtype).to(DEVICE)
    for criterion in CRITERIA:
        ref = score64(x.cpu(), criterion)
        # The median score as threshold puts rows on both sides, so a wrong flag shows.
        thr = float(ref.nanmedian())
        conf, mask, argmax = exit_decision_triton(x, thr, criterion, return_argmax=True)
        check_decision(x, criterion, thr, conf, mask, argmax, ref=ref)


def special_rows(C: int) -> torch.Tensor:
    """Rows with NaN, +inf, -inf, all -inf, uniform and tied maxima spread over the row."""
    g = torch.Generator().manual_seed(1)
    rows = []

    def row():
        return torch.randn(C, generator=g) * 2

    r = row()
    r[C // 3] = NAN
    rows.append(r)  # NaN inside
    r = row()
    r[C - 1] = NAN
    r[C // 2] = NAN
    rows.append(r)  # two NaN, the last column
    r = row()
    r[C // 2] = POS_INF
    rows.append(r)  # +inf: softmax NaN
    r = row()
    r[0] = POS_INF
    r[C - 1] = POS_INF
    rows.append(r)  # two +inf
    rows.append(torch.full((C,), NEG_INF))  # all masked
    r = torch.full((C,), NEG_INF)
    r[C - 2] = 4.0
    rows.append(r)  # one live class: H = 0, p = 1
    rows.append(torch.zeros(C))  # uniform: H = log C
    r = row()
    r[C // 5] = 9.0
    r[C - 3] = 9.0
    rows.append(r)  # tie far apart (other lanes/chunks)
    r = row()
    r[::2] = NEG_INF
    rows.append(r)  # every other class masked
    r = row()
    r[C // 4] = NAN
    r[C // 2] = POS_INF
    rows.append(r)  # NaN and +inf
    r = row()
    r[: C // 2] = NEG_INF
    r[C - 1] = 30.0
    rows.append(r)  # large peak after masked half
    r = row()
    r[0] = NEG_INF
    r[1] = 50.0
    rows.append(r)  # -inf then the maximum
    return torch.stack(rows)


@pytest.mark.parametrize("C,chunk", [(100, None), (700, None), (100, 64), (1000, 256)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_special_rows(C, chunk, dtype):
    x = special_rows(C).to(dtype).to(DEVICE)
    # A narrow chunk forces the chunked path on narrow rows: many lanes, several chunks per row.
    kw = dict(one_block_max=16, chunk=chunk) if chunk else {}
    for criterion in CRITERIA:
        ref = score64(x.cpu(), criterion)
        thr = float(ref.nanmedian())
        conf, mask, argmax = exit_decision_triton(x, thr, criterion, True, **kw)
        check_decision(x, criterion, thr, conf, mask, argmax, ref=ref)
        # A threshold every finite score passes: exactly the NaN rows stay.
        always = math.inf if criterion == "entropy" else -math.inf
        _, mask_all = exit_decision_triton(x, always, criterion, **kw)
        assert torch.equal(mask_all.cpu(), ~torch.isnan(ref))


def running_max_rows(C: int, chunk: int) -> torch.Tensor:
    """Rows that move the chunked path's running max in every way: once in the first chunk, late
    (last whole chunk, the masked tail), on every chunk (ascending), never after the first
    (descending), at a chunk boundary, and past a long prefix of -inf (the floor reference)."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(C, generator=g) * 2
    rows = []
    for col in (0, chunk - 1, chunk, (C // chunk) * chunk - 1, C - 1):
        r = base.clone()
        r[col] = 12.0
        rows.append(r)  # the max in the first chunk, at boundaries, in the last whole chunk, the tail
    rows.append(torch.sort(base).values)  # rising on every chunk: a rescale each time
    rows.append(torch.sort(base, descending=True).values)
    rows.append(torch.linspace(-40.0, 40.0, C))  # rises by ~80/C per column: big rescales
    r = base.clone()
    r[: C - 5] = NEG_INF
    rows.append(r)  # only the tail is live
    r = base.clone()
    r[:chunk] = NEG_INF
    r[chunk + 3] = NAN
    rows.append(r)  # a -inf chunk, then a NaN
    r = base.clone()
    r[: 2 * chunk] = NEG_INF
    r[C - 2] = POS_INF
    rows.append(r)  # -inf chunks, then +inf in the tail
    r = base.clone()
    r[C - 1] = NAN
    rows.append(r)  # NaN in the last column of the tail
    r = base.clone()
    r[0] = POS_INF
    rows.append(r)  # +inf in the first column
    r = torch.full((C,), NEG_INF)
    r[chunk // 2] = -3.0
    r[C - 1] = -3.0
    rows.append(r)  # two live classes in different chunks, tied
    return torch.stack(rows)


# The chunked tests below use chunk 64 and row lengths that are multiples of 8 (and, but for the
# row without a tail, not of 16), so they share one compiled kernel per dtype, criterion and flag
# set (same BLOCK_C, VEC and Triton's divisibility specialisation): on a GPU each variant compiles
# once for all of them (the GPU check runs this file within a time box).
CHUNK = 64
BF16 = torch.bfloat16


@pytest.mark.parametrize(
    "C,dtype",
    [(1000, d) for d in DTYPES] + [(136, d) for d in DTYPES] + [(512, BF16)],  # a tail of 40, of 8, none
    ids=lambda v: str(v).split(".")[-1],
)
def test_chunked_running_max_moves(C, dtype):
    x = running_max_rows(C, CHUNK).to(dtype).to(DEVICE)
    for criterion in CRITERIA:
        ref = score64(x.cpu(), criterion)
        thr = float(ref.nanmedian())
        conf, mask, argmax = exit_decision_triton(x, thr, criterion, True, one_block_max=16, chunk=CHUNK)
        check_decision(x, criterion, thr, conf, mask, argmax, ref=ref)
        if criterion in ("entropy", "margin"):  # without any bookkeeping, and with the runner-up only
            conf_only, _ = exit_decision_triton(x, thr, criterion, one_block_max=16, chunk=CHUNK)
            assert torch.equal(conf_only.isnan(), conf.isnan())
            torch.testing.assert_close(conf_only, conf, atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.parametrize("C", [1000, 512, 40])  # a tail, none, no whole chunk
def test_chunked_prefetch_variant_agrees(C):
    """The chunked kernel's PREFETCH variant (loads one chunk ahead; the benchmark times both)."""
    x = torch.cat([running_max_rows(C, min(CHUNK, C // 2)), special_rows(C)]).to(torch.bfloat16).to(DEVICE)
    for criterion in CRITERIA:
        ref = score64(x.cpu(), criterion)
        thr = float(ref.nanmedian())
        for prefetch in (True, False):
            kw = dict(one_block_max=16, chunk=CHUNK, prefetch=prefetch)
            conf, mask, argmax = exit_decision_triton(x, thr, criterion, True, **kw)
            check_decision(x, criterion, thr, conf, mask, argmax, ref=ref)


@pytest.mark.parametrize("offset", [1e4, -1e4, 3e3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_chunked_large_offsets(offset, dtype):
    """Logits far from 0 (softmax is shift invariant): the path keeps its sums against a reference
    near offset * log2 e, whose rounding must not leak into the scores."""
    base = running_max_rows(1000, CHUNK)[:8]  # the finite rows
    x = (base.double() + offset).to(dtype).to(DEVICE)
    for criterion in CRITERIA:
        ref = score64(x.cpu(), criterion)
        thr = float(ref.nanmedian())
        conf, mask, argmax = exit_decision_triton(x, thr, criterion, True, one_block_max=16, chunk=CHUNK)
        check_decision(x, criterion, thr, conf, mask, argmax, ref=ref)


def test_chunked_path_matches_tile_path():
    x = make_logits(6, 300, torch.float32).to(DEVICE)
    for criterion in CRITERIA:
        a = exit_decision_triton(x, 0.5, criterion, True)
        b = exit_decision_triton(x, 0.5, criterion, True, one_block_max=8, chunk=32)
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
        assert torch.equal(a[2], b[2])
        # Another warp count (the benchmark's sweep) changes only how lanes map to threads.
        c = exit_decision_triton(x, 0.5, criterion, True, one_block_max=8, chunk=CHUNK, num_warps=2)
        torch.testing.assert_close(a[0], c[0], atol=1e-5, rtol=0)
        assert torch.equal(a[2], c[2])


# ------------------------------------------------------------------------------ layouts, threshold
@pytest.mark.parametrize("C,kw", [(37, {}), (37, dict(one_block_max=8, chunk=16)), (1000, {})])
def test_non_contiguous_rows(C, kw):
    wide = torch.randn(8, C + 13) * 3
    views = {
        "row stride > C": wide[:, 5 : 5 + C],
        "every other row": torch.randn(16, C)[::2],
        "column stride != 1": torch.randn(C, 8).t(),
        "broadcast row (stride 0)": torch.randn(1, C).expand(5, C),
        # C = 32 alone would allow 16-byte vectors; the stride of 34 must limit them to 2 elements
        "stride sharing only 2 with C": torch.randn(6, 34)[:, :32],
    }
    thr = 0.5
    for name, v in views.items():
        v = v.to(DEVICE)
        dense = v.contiguous()
        for criterion in ("entropy", "margin"):
            got = exit_decision_triton(v, thr, criterion, True, **kw)
            want = exit_decision_triton(dense, thr, criterion, True, **kw)
            # A strided and a dense row may compile to different reduction layouts (they do on
            # sm_90; the interpreter hides it), so S and T can differ in the last bit: scores agree
            # within the decision tolerance, flags wherever the score is not that close to the
            # threshold; the argmax involves no rounding and must be identical.
            tol = decision_tol(dense.dtype, C, criterion)
            torch.testing.assert_close(got[0], want[0], atol=tol, rtol=0, equal_nan=True, msg=name)
            assert torch.equal(got[2], want[2]), name
            clear = ((want[0].double() - thr).abs() > tol) | want[0].isnan()
            assert torch.equal(got[1][clear], want[1][clear]), name
            check_decision(dense, criterion, thr, *got)


def test_threshold_float_tensor_and_device_view():
    x = make_logits(16, 50, torch.float32).to(DEVICE)
    ref = score64(x.cpu(), "max_prob")
    lo, hi = float(ref.quantile(0.25)), float(ref.quantile(0.75))
    thr_all = torch.tensor([hi, lo, 0.0], device=DEVICE)  # like the runtime's [K-1] tensor
    for thr_val, thr in [
        (lo, lo),
        (lo, torch.tensor(lo, device=DEVICE)),
        (lo, torch.tensor([lo], device=DEVICE)),
        (lo, thr_all[1]),  # 0-dim view at an offset: read through its pointer
        (hi, thr_all[0]),
        (lo, torch.tensor(lo, dtype=torch.float64, device=DEVICE)),
        (lo, torch.tensor(lo)),  # a CPU tensor is moved to the logits' device
    ]:
        conf, mask = exit_decision_triton(x, thr, "max_prob")
        check_decision(x, "max_prob", thr_val, conf, mask)
    # New values in the same tensor are seen by the next launch (what a captured graph relies on).
    view = thr_all[2]
    before = exit_decision_triton(x, view, "max_prob")[1]
    thr_all[2] = 2.0  # above every probability: nothing exits
    after = exit_decision_triton(x, view, "max_prob")[1]
    assert before.all() and not after.any()


def test_empty_batch():
    for return_argmax in (False, True):
        out = exit_decision_triton(torch.empty(0, 10, device=DEVICE), 0.5, "entropy", return_argmax)
        assert len(out) == (3 if return_argmax else 2)
        assert [o.shape for o in out] == [(0,)] * len(out)
        assert [o.dtype for o in out] == [torch.float32, torch.bool, torch.int64][: len(out)]


def test_inputs_are_not_written():
    x = make_logits(4, 20, torch.float16).to(DEVICE)
    thr = torch.tensor(0.5, device=DEVICE)
    x0, thr0 = x.clone(), thr.clone()
    exit_decision_triton(x, thr, "entropy", True)
    assert torch.equal(x, x0) and torch.equal(thr, thr0)


def test_bad_inputs_raise():
    x = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        exit_decision_triton(x.double(), 0.5)
    with pytest.raises(ValueError, match="one-element tensor"):
        exit_decision_triton(x, torch.tensor([0.1, 0.2], device=DEVICE))
    with pytest.raises(TypeError, match="float or a one-element tensor"):
        exit_decision_triton(x, True)
    with pytest.raises(ValueError, match="unknown criterion"):
        exit_decision_triton(x, 0.5, "entropyy")
    with pytest.raises(ValueError, match="2-D"):
        exit_decision_triton(x[0], 0.5)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        exit_decision_triton(x, 0.5, num_warps=3)


# ------------------------------------------------------------------------------------- dispatch
def test_ops_backend_triton_matches_torch_backend():
    x = make_logits(32, 100, torch.bfloat16).to(DEVICE)
    for criterion in CRITERIA:
        thr = float(score64(x.cpu(), criterion).nanmedian())
        c1, m1, a1 = ee.ops.exit_decision(x, thr, criterion, backend="triton", return_argmax=True)
        c2, m2, a2 = ee.ops.exit_decision(x, thr, criterion, backend="torch", return_argmax=True)
        torch.testing.assert_close(c1, c2, atol=decision_tol(x.dtype, 100, criterion), rtol=0, equal_nan=True)
        far = (c2 - thr).abs() > decision_tol(x.dtype, 100, criterion)
        assert torch.equal(m1[far], m2[far]) and torch.equal(a1, a2)


def test_triton_is_registered_first():
    assert dispatch.backends("exit_decision")[0] == "triton" or (
        # an extension backend registered ahead of it is fine; triton must precede torch
        dispatch.backends("exit_decision").index("triton") < dispatch.backends("exit_decision").index("torch")
    )


def test_auto_on_cpu_picks_torch():
    x = torch.randn(4, 10)
    b = dispatch.select("exit_decision", "auto", x, 0.5, "entropy", False)
    assert b.name != "triton"
    why = dispatch.explain("exit_decision", x, 0.5, "entropy", False)["triton"]
    assert why is not None and "CUDA" in why


def test_forced_on_cpu_without_interpreter_says_to_set_it(monkeypatch):
    # The flag only matters before the kernels are imported: hide the imported module and the env var.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, tb.KERNEL_MODULE, raising=False)
    x = torch.randn(4, 10)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1") as e:
        ee.ops.exit_decision(x, 0.5, backend="triton")
    assert "backend='torch'" in str(e.value)  # the fix comes with the reason


def test_forced_on_cpu_after_a_compiled_import_says_so(monkeypatch):
    mod = sys.modules[tb.KERNEL_MODULE]
    monkeypatch.setattr(mod, "INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: the kernels were built for the GPU
    with pytest.raises(BackendUnavailable, match="already imported without TRITON_INTERPRET=1"):
        ee.ops.exit_decision(torch.randn(4, 10), 0.5, backend="triton")


def test_forced_without_triton_says_so(monkeypatch):
    monkeypatch.setattr(tb, "triton_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="triton is not installed"):
        ee.ops.exit_decision(torch.randn(4, 10, device=DEVICE), 0.5, backend="triton")
    # auto still runs, on the reference
    conf, _ = ee.ops.exit_decision(torch.randn(4, 10, device=DEVICE), 0.5)
    assert conf.shape == (4,)


def test_float64_logits_skip_triton_in_auto():
    x = torch.randn(4, 10, dtype=torch.float64, device=DEVICE)
    assert "float64" in dispatch.explain("exit_decision", x, 0.5, "entropy", False)["triton"]
    with pytest.raises(BackendUnavailable, match="float64"):
        ee.ops.exit_decision(x, 0.5, backend="triton")
    # auto takes the next backend (the C++ kernel on CPU when built, else the torch reference)
    assert dispatch.select("exit_decision", "auto", x, 0.5, "entropy", False).name != "triton"
    conf, mask = ee.ops.exit_decision(x, 0.5)
    ref_conf, ref_mask = exit_decision_ref(x, 0.5)
    torch.testing.assert_close(conf, ref_conf, atol=1e-5, rtol=0)
    clear = (ref_conf - 0.5).abs() > 1e-5  # a near-tie may fall either way
    assert torch.equal(mask[clear], ref_mask[clear])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")
def test_auto_on_cuda_picks_triton():
    x = torch.randn(4, 10, device="cuda")
    assert dispatch.select("exit_decision", "auto", x, 0.5, "entropy", False).name in ("triton", "cuda")


def test_launch_runs_under_a_guard_for_the_logits_device(monkeypatch):
    """Triton launches on the current device: the launcher must make logits' device current."""
    import contextlib

    from eeruntime.kernels import exit_decision as kernel_module

    seen = []

    def recording_guard(device):
        seen.append(torch.device(device))
        return contextlib.nullcontext()

    monkeypatch.setattr(kernel_module, "device_guard", recording_guard)
    x = make_logits(4, 10, torch.float32).to(DEVICE)
    conf, mask = exit_decision_triton(x, 0.5, "entropy")
    assert seen == [x.device]
    check_decision(x, "entropy", 0.5, conf, mask)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (logits on cuda:1 while cuda:0 is current)"
)
@pytest.mark.parametrize("C", [100, 5000])  # the tile path and the chunked path
def test_gpu_logits_on_another_device_than_the_current_one(C):
    x = make_logits(64, C, torch.float32).to("cuda:1")
    with torch.cuda.device(0):
        for criterion in CRITERIA:
            ref = score64(x.cpu(), criterion)
            thr = float(ref.nanmedian())
            conf, mask, argmax = exit_decision_triton(x, thr, criterion, return_argmax=True)
            assert conf.device == mask.device == x.device
            check_decision(x, criterion, thr, conf, mask, argmax, ref=ref)
        # the eager runtime on cuda:1, called with cuda:0 current
        model = _mlp_model().to("cuda:1").eval()
        h = torch.randn(32, 16, device="cuda:1")
        fast = ee.EERuntime(model, [0.5, 0.5], "max_prob", decision_backend="triton", graphs=False).infer(h)
        ref = ee.EERuntime(model, [0.5, 0.5], "max_prob", decision_backend="torch", graphs=False).infer(h)
        torch.cuda.synchronize(1)
    assert fast.logits.device == x.device
    torch.testing.assert_close(fast.confidence, ref.confidence, atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------- runtime
def _mlp_model(K: int = 3, C: int = 10, d: int = 16) -> ee.MultiExitModel:
    stages = [nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(K)]
    # Scaled heads spread the scores, so the thresholds below split the batch at every exit.
    exits = [nn.Linear(d, C) for _ in range(K)]
    with torch.no_grad():
        for i, e in enumerate(exits):
            e.weight.mul_(4.0 + 2 * i)
    return ee.MultiExitModel(stages, exits)


@pytest.mark.parametrize("criterion", ["entropy", "max_prob"])
def test_runtime_with_triton_decisions_matches_torch_and_per_sample_loop(criterion):
    model = _mlp_model().to(DEVICE).eval()
    x = torch.randn(64, 16, device=DEVICE)
    with torch.no_grad():
        all_logits = model(x)
    # Thresholds at score quantiles of exits 0 and 1 send about a third of the rows out at each.
    q = (1 / 3, 1 / 2) if criterion == "entropy" else (2 / 3, 1 / 2)
    thresholds = [float(score64(all_logits[k].cpu(), criterion).quantile(q[k])) for k in range(2)]
    kw = dict(graphs=False) if DEVICE == "cuda" else {}
    fast = ee.EERuntime(model, thresholds, criterion, decision_backend="triton", **kw).infer(x)
    ref = ee.EERuntime(model, thresholds, criterion, decision_backend="torch", **kw).infer(x)
    loop_logits, loop_exit, near = per_sample_loop(model.cpu(), x.cpu(), thresholds, criterion)
    model.to(DEVICE)
    far = near > 1e-4
    assert len(set(loop_exit.tolist())) == 3, "thresholds should spread rows over all exits"
    assert torch.equal(fast.exit_index.cpu()[far], loop_exit[far])
    assert torch.equal(fast.exit_index[far.to(DEVICE)], ref.exit_index[far.to(DEVICE)])
    torch.testing.assert_close(fast.logits.cpu()[far].double(), loop_logits[far], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.confidence[far.to(DEVICE)], ref.confidence[far.to(DEVICE)], atol=2e-5, rtol=0)


def test_previous_chunked_kernel_of_the_benchmark_still_agrees(monkeypatch):
    """bench/exit_decision_prev.py (the kernel the benchmark times the current one against, through
    this launcher) computes the same decisions: the side-by-side compares equal work."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from exit_decision_prev import chunked_kernel_prev

    x = special_rows(300).to(torch.bfloat16).to(DEVICE)
    kw = dict(one_block_max=16, chunk=CHUNK, _chunked_kernel=chunked_kernel_prev)
    for criterion in CRITERIA:
        ref = score64(x.cpu(), criterion)
        thr = float(ref.nanmedian())
        conf, mask, argmax = exit_decision_triton(x, thr, criterion, True, **kw)
        check_decision(x, criterion, thr, conf, mask, argmax, ref=ref)


def test_chunked_launch_turns_fp_contraction_off(monkeypatch):
    """The chunked path's correction for its reference's rounding holds only without implicit
    fma contraction, which the interpreter never does and the GPU compiler does by default: the
    launch must ask for it off (found on an H200: float32 rows offset by 1e4 scored 2.3e-4 off)."""
    import kernels.exit_decision as k

    launches = []

    class Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.name, kw))

    monkeypatch.setattr(k, "INTERPRETED", False)
    monkeypatch.setattr(k, "_exit_decision_chunked_kernel", Spy("chunked"))
    monkeypatch.setattr(k, "_exit_decision_tile_kernel", Spy("tile"))
    x = torch.randn(2, 40)
    k.exit_decision_triton(x, 0.5, "entropy", one_block_max=16, chunk=16)
    k.exit_decision_triton(x, 0.5, "entropy")
    assert [(name, kw["enable_fp_fusion"]) for name, kw in launches] == [("chunked", False), ("tile", True)]
    assert k.CHUNKED_FP_FUSION is False

"""eeruntime.runtime.graphs: bucket choice, chunking, the sync-free pack/scatter, the static-buffer loop
(run eagerly on CPU with capture=False) against the eager runtime and the per-sample loop, and on
a GPU the captured graphs (equality, no re-capture on set_thresholds, host syncs, threads, memory).
"""

import contextlib
import math
import threading
import warnings

import pytest
import torch
from conftest import requires_cuda
from models import TupleExit, TupleStage
from models import mlp_model as _mlp_model
from reference import per_sample_loop, score64
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import eeruntime as ee
from eeruntime.runtime.graphs import (
    CAPTURE_SAFE_BACKENDS,
    GraphRunner,
    _GraphsUnusable,
    _host_read,
    _HostReadProbe,
    autocast_state,
    bucket_for,
    check_buckets,
    chunk_bounds,
    compact_into_nosync,
    default_buckets,
    graphs_supported,
    scatter_rows_nosync,
)
from eeruntime.zoo import conv_net

NAMED = ["entropy", "max_prob", "margin", "norm_entropy"]
NEAR = 1e-4  # rows whose score is this close to a threshold may legitimately flip between paths


# ----------------------------------------------------------------------------------- models, data
def mlp_model(K=4, **kwargs):
    return _mlp_model(K=K, **kwargs)


def run_threads(worker, n: int) -> None:
    """Start ``worker(i)`` for i < n on n threads at once and wait for all."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def top_logit(logits, state):
    """A plain callable criterion f(logits, state)."""
    return logits.max(dim=1).values


class ScaledMaxProb:
    """A per-exit scorer without history: max softmax probability scaled by the exit index."""

    per_exit = True
    uses_history = False

    def __call__(self, logits, state, k, history):
        assert history == []
        return torch.softmax(logits.float(), 1).max(1).values * (1.0 + 0.1 * k)


class WithHistory(ScaledMaxProb):
    uses_history = True


def scores(criterion, logits, k):
    """Float64 score of each row at exit k, computed independently of the runtime."""
    if isinstance(criterion, str):
        return score64(logits, criterion)
    if getattr(criterion, "per_exit", False):
        return criterion(logits, None, k, []).double()
    return criterion(logits, None).double()


@torch.no_grad()
def quantile_thresholds(model, x, criterion, q=0.45):
    """Thresholds under which some but not all rows leave at every early exit."""
    outs = model(x)
    thr = []
    for k in range(len(outs) - 1):
        s = scores(criterion, outs[k], k)
        thr.append(float(s.quantile(q if criterion == "entropy" else 1 - q)))
    return thr


@torch.no_grad()
def tie_margin(model, x, thresholds, criterion, exit_index):
    """min |score - threshold| over the exits each row's decision went through."""
    outs = model(x)
    B = exit_index.shape[0]
    margin = torch.full((B,), math.inf, dtype=torch.float64)
    for k in range(len(outs) - 1):
        s = scores(criterion, outs[k], k).cpu()
        gap = (s - thresholds[k]).abs().nan_to_num(math.inf)
        reached = exit_index.cpu() >= k
        margin = torch.where(reached, torch.minimum(margin, gap), margin)
    return margin


def assert_same_result(res, counts, ref, near, atol=1e-5, rtol=1e-5):
    """Same exits (up to near-ties), same logits and confidence, counts that agree with them."""
    B = ref.exit_index.shape[0]
    assert res.logits.shape == ref.logits.shape and res.logits.dtype == ref.logits.dtype
    assert res.exit_index.shape == (B,) and res.exit_index.dtype == torch.int64
    assert res.confidence.shape == (B,) and res.confidence.dtype == torch.float32
    assert counts == torch.bincount(res.exit_index.cpu(), minlength=len(counts)).tolist()
    assert sum(counts) == B
    clear = (near > NEAR).to(res.exit_index.device)
    assert torch.equal(res.exit_index[clear], ref.exit_index[clear])
    same = clear & (res.exit_index == ref.exit_index)
    torch.testing.assert_close(res.logits[same], ref.logits[same], atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(res.confidence[same], ref.confidence[same], atol=atol, rtol=rtol, equal_nan=True)


def check_against_loop(res, model, x, thresholds, criterion, final):
    """The per-sample loop of docs/design.md (tests/reference.py) as the independent oracle."""
    ref_logits, ref_exit, near = per_sample_loop(model, x, thresholds, criterion, final)
    clear = near.cpu() > NEAR
    assert torch.equal(res.exit_index.cpu()[clear], ref_exit.cpu()[clear])
    torch.testing.assert_close(res.logits.cpu().double()[clear], ref_logits.cpu()[clear], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ buckets
def test_default_buckets_256_is_powers_then_multiples_of_8():
    assert default_buckets() == default_buckets(256) == tuple([1, 2, 4, 8] + list(range(16, 257, 8)))


@pytest.mark.parametrize("max_batch", [1, 2, 3, 5, 8, 9, 17, 100, 255, 256, 257, 300, 513, 1000, 2049])
def test_default_buckets_cover_max_batch_with_bounded_padding(max_batch):
    bs = default_buckets(max_batch)
    assert list(bs) == sorted(set(bs)) and bs[0] == 1
    assert bs[-1] >= max_batch and (len(bs) == 1 or bs[-2] < max_batch)  # stops at the first >= max
    for n in range(1, bs[-1] + 1):
        b = min(c for c in bs if c >= n)  # brute force
        if n <= 8:
            assert b == 1 << (n - 1).bit_length()
        elif n <= 256:
            assert b == -(-n // 8) * 8
        else:
            assert (b - n) / n < 1 / 8


def test_check_buckets_normalises_and_rejects():
    assert check_buckets([8, 1, 4, 4, 2]) == (1, 2, 4, 8)
    assert check_buckets((3,)) == (3,)
    for bad, exc in [
        ([], ValueError),
        ([0, 4], ValueError),
        ([-2], ValueError),
        ([1.5], TypeError),
        ([True], TypeError),
        ("8", TypeError),
        (None, TypeError),
        (8, TypeError),
    ]:
        with pytest.raises(exc):
            check_buckets(bad)


def test_bucket_for_is_smallest_bucket_at_least_n():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        bs = check_buckets(
            (torch.randint(1, 100, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)).tolist()
        )
        for n in range(1, bs[-1] + 1):
            assert bucket_for(n, bs) == min(b for b in bs if b >= n)
        with pytest.raises(ValueError, match="larger than the largest bucket"):
            bucket_for(bs[-1] + 1, bs)
    with pytest.raises(ValueError):
        bucket_for(0, (1, 2))
    with pytest.raises(TypeError):
        bucket_for(2.0, (1, 2))


def test_chunk_bounds_cover_the_batch_in_order():
    for B in range(0, 40):
        for size in range(1, 10):
            cb = chunk_bounds(B, size)
            assert [i for s, e in cb for i in range(s, e)] == list(range(B))
            assert all(e - s == size for s, e in cb[:-1]) and all(0 < e - s <= size for s, e in cb)
    with pytest.raises(ValueError):
        chunk_bounds(5, 0)


# ---------------------------------------------------------------------------- sync-free pack/scatter
@pytest.mark.parametrize("B", [0, 1, 2, 7, 33])
def test_compact_into_nosync_equals_boolean_indexing(B):
    for trial in range(6):
        keep = torch.rand(B) < [0.0, 1.0, 0.5, 0.2, 0.8, 0.5][trial]
        a = torch.randn(B, 3, 2)
        r = torch.randperm(max(B, 1))[:B]
        outs = [torch.full((B + 4, 3, 2), float("nan")), torch.full((B + 4,), -7, dtype=torch.int64)]
        count = torch.full((1,), -1, dtype=torch.int64)
        compact_into_nosync(keep, [a, r], outs, count)
        n = int(keep.sum())
        assert int(count) == n
        assert torch.equal(outs[0][:n], a[keep]) and torch.equal(outs[1][:n], r[keep])
        # the dropped rows follow, in order: rows [0, B) are a permutation of the input rows
        assert torch.equal(outs[0][n:B], a[~keep]) and torch.equal(outs[1][n:B], r[~keep])
        assert torch.isnan(outs[0][B:]).all() and (outs[1][B:] == -7).all()


@pytest.mark.parametrize("B", [0, 1, 9, 40])
def test_scatter_rows_nosync_equals_loop(B):
    cap = 50
    mask = torch.rand(B) < 0.5
    rows = torch.randperm(cap)[:B]
    src = torch.randn(B, 4)
    src_i = torch.arange(B)
    out = torch.full((cap + B, 4), 9.0)
    out_i = torch.full((cap + B,), -1, dtype=torch.int64)
    scatter_rows_nosync(mask, rows, [src, src_i], [out, out_i], spare_row=cap)
    expect = torch.full((cap, 4), 9.0)
    expect_i = torch.full((cap,), -1, dtype=torch.int64)
    for i in range(B):
        if mask[i]:
            expect[rows[i]] = src[i]
            expect_i[rows[i]] = i
    assert torch.equal(out[:cap], expect) and torch.equal(out_i[:cap], expect_i)


# ----------------------------------------------------------------- the static-buffer loop on CPU
def cpu_runner(rt, buckets=(1, 2, 4, 8), **kw):
    kw.setdefault("capture", False)
    return GraphRunner(rt, buckets=buckets, **kw)


@pytest.mark.parametrize("final", ["last", "average"])
@pytest.mark.parametrize("criterion", NAMED + ["callable"])
@pytest.mark.parametrize("pack", ["auto", "torch", "reference"])
def test_static_loop_matches_eager_and_per_sample_loop(criterion, final, pack):
    """pack: auto (the ops' selected backend, the C++ one when built), torch (the sync-free
    formulation the graphs use without the CUDA extension), reference (the ops' torch references)."""
    crit = top_logit if criterion == "callable" else criterion
    model = mlp_model()
    x = torch.randn(21, 6)  # chunks of 8, 8, 5; survivors land in every bucket
    thr = quantile_thresholds(model, x, crit)
    backend = "torch" if pack == "reference" else "auto"
    rt = ee.EERuntime(model, thresholds=thr, criterion=crit, final=final, graphs=False, compact_backend=backend)
    runner = cpu_runner(rt, pack="ops" if pack == "reference" else pack)
    res, counts = runner.infer(x)
    ref, ref_counts = rt._infer_eager(x, 21)
    assert_same_result(res, counts, ref, tie_margin(model, x, thr, crit, ref.exit_index))
    check_against_loop(res, model, x, thr, crit, final)
    assert all(c > 0 for c in counts), counts  # the thresholds made rows leave at every exit
    assert runner.num_captures == 0


class BodyOps(TorchDispatchMode):
    """Records the aten ops run inside GraphRunner._body, the code a CUDA graph captures."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func.overloadpacket, args))
        return func(*args, **(kwargs or {}))


# Ops that read device data on the host (a sync) or copy a Python value to the device: neither
# may sit in a captured graph.
HOST_OPS = {
    torch.ops.aten.nonzero,
    torch.ops.aten._local_scalar_dense,
    torch.ops.aten.item,
    torch.ops.aten.masked_select,
    torch.ops.aten.is_nonzero,
    torch.ops.aten.lift_fresh,
    torch.ops.aten.lift_fresh_copy,
    torch.ops.aten.equal,
    torch.ops.aten.allclose,
}


def host_ops(recorded):
    bad = [str(f) for f, _ in recorded if f in HOST_OPS]
    bad += [
        "index with a bool mask"
        for f, args in recorded
        if f in (torch.ops.aten.index, torch.ops.aten.index_put)
        and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
    ]
    return bad


def body_under(runner, mode):
    """Run every GraphRunner._body (the code a CUDA graph captures) under the dispatch ``mode``."""
    body = runner._body

    def wrapped(sig, k, b):
        with mode:
            body(sig, k, b)

    runner._body = wrapped
    return mode


def traced_body(runner):
    return body_under(runner, BodyOps())


@pytest.mark.parametrize("criterion", NAMED + ["callable", "per_exit"])
@pytest.mark.parametrize("final", ["last", "average"])
def test_graph_body_has_no_host_sync_or_host_copy(criterion, final):
    """What the graphs capture when the CUDA extension is absent (pack="torch"), traced on CPU."""
    crit = {"callable": top_logit, "per_exit": ScaledMaxProb()}.get(criterion, criterion)
    model = mlp_model()
    x = torch.randn(11, 6)
    rt = ee.EERuntime(model, thresholds=quantile_thresholds(model, x, crit), criterion=crit, final=final, graphs=False)
    runner = cpu_runner(rt, pack="torch")
    rec = traced_body(runner)
    res, counts = runner.infer(x)
    assert len(rec.ops) > 50 and counts[-1] < 11 and max(counts[:-1]) > 0  # it ran, with exits
    assert host_ops(rec.ops) == []
    # The runtime's own pre-capture probe (run over the first warm-up of each capture) agrees.
    probed = cpu_runner(rt, pack="torch")
    body_under(probed, _HostReadProbe())
    res_probed, _ = probed.infer(x)
    assert probed.disabled_reason is None
    assert torch.equal(res_probed.exit_index, res.exit_index)
    torch.testing.assert_close(res_probed.logits, res.logits)


def test_the_host_op_detector_sees_the_reference_pack():
    """The torch references of compact_into / scatter_rows call nonzero: the detector must say so
    (and this is why the graphs use them only when the selected backend is sync-free)."""
    model = mlp_model()
    x = torch.randn(11, 6)
    rt = ee.EERuntime(model, thresholds=quantile_thresholds(model, x, "entropy"), graphs=False, compact_backend="torch")
    runner = cpu_runner(rt, pack="ops")
    rec = traced_body(runner)
    runner.infer(x)
    assert "aten.nonzero" in host_ops(rec.ops)


def item_criterion(logits, state):
    if logits.sum().item() > 1e30:  # a host read
        pass
    return logits.max(1).values


def bool_index_criterion(logits, state):
    s = logits.max(1).values.clone()
    s[s < -1e30] = 0.0  # index_put with a bool mask: nonzero inside
    return s


@pytest.mark.parametrize(
    "crit,why", [(item_criterion, "aten.item"), (bool_index_criterion, "indexing with a bool mask")]
)
def test_pre_capture_probe_refuses_a_body_that_reads_on_the_host(crit, why):
    model = mlp_model()
    x = torch.randn(11, 6)
    rt = ee.EERuntime(model, thresholds=0.5, criterion=crit, graphs=False)
    runner = cpu_runner(rt, pack="torch")
    body_under(runner, _HostReadProbe())
    with pytest.warns(RuntimeWarning, match="CUDA graphs disabled"):
        res, counts = runner.infer(x)  # refused, then run eagerly
    assert why in runner.disabled_reason and "cannot be captured" in runner.disabled_reason
    check_against_loop(res, model, x, rt.thresholds, crit, "last")


def test_host_read_rules():
    cuda_like = torch.zeros(2)  # on CPU only the device-independent reads can be exercised
    assert _host_read(torch.ops.aten._local_scalar_dense.default, (cuda_like,), {}) is not None
    assert _host_read(torch.ops.aten.nonzero.default, (cuda_like,), {}) is not None
    assert _host_read(torch.ops.aten.add.Tensor, (cuda_like, cuda_like), {}) is None
    assert _host_read(torch.ops.aten._to_copy.default, (cuda_like,), {"device": torch.device("cpu")}) is None
    assert _host_read(torch.ops.aten.index.Tensor, (cuda_like, [torch.tensor([0, 1])]), {}) is None
    assert _host_read(torch.ops.aten.index.Tensor, (cuda_like, [torch.tensor([True, False])]), {}) is not None


def test_host_read_rules_refuse_host_to_device_copies():
    """A host-to-device copy cannot be captured either. Meta tensors stand in for device memory on
    CPU (the rules treat every non-CPU tensor as device data)."""
    aten = torch.ops.aten
    dev, host = torch.zeros(3, device="meta"), torch.ones(3)
    assert "host-to-device" in _host_read(aten._to_copy.default, (host,), {"device": torch.device("meta")})
    assert "host-to-device" in _host_read(aten.copy_.default, (dev, host), {})
    assert "lift_fresh" in _host_read(aten.lift_fresh.default, (dev,), {})  # torch.tensor(v, device=...)
    assert _host_read(aten.lift_fresh_copy.default, (dev,), {}) is not None
    assert "copy to the CPU" in _host_read(aten._to_copy.default, (dev,), {"device": torch.device("cpu")})
    assert "copy to the CPU" in _host_read(aten.copy_.default, (host, dev), {})
    # device to device, host to host, dtype-only casts and host constants stay allowed
    assert _host_read(aten.copy_.default, (dev, dev), {}) is None
    assert _host_read(aten.copy_.default, (host, host), {}) is None
    assert _host_read(aten._to_copy.default, (dev,), {"dtype": torch.float16}) is None
    assert _host_read(aten._to_copy.default, (dev,), {"device": torch.device("meta")}) is None
    assert _host_read(aten.lift_fresh.default, (host,), {}) is None  # a CPU scalar like torch.tensor(2.0)


def _criterion_with_host_constant(logits, state):
    return logits.max(1).values - torch.tensor([0.25]).to(logits.device)


def _criterion_copying_into_device(logits, state):
    s = logits.max(1).values
    return s.copy_(torch.zeros(s.shape))


@pytest.mark.parametrize("crit", [_criterion_with_host_constant, _criterion_copying_into_device])
def test_pre_capture_probe_refuses_host_to_device_copies(crit):
    """The probe (the dispatch mode over the first warm-up's op stream) on a criterion run on
    'device' (meta) logits: refused before the copy runs; a sync-free criterion passes."""
    logits = torch.zeros(4, 5, device="meta")
    with pytest.raises(_GraphsUnusable, match="host-to-device"), _HostReadProbe():
        crit(logits, None)
    with _HostReadProbe():
        assert top_logit(logits, None).shape == (4,)


class FakeStream:
    """Stands in for a torch.cuda.Stream on CPU: records which streams it was made to wait for."""

    def __init__(self, name):
        self.name = name
        self.waited = []

    def wait_stream(self, other):
        self.waited.append(other.name)


class FailsOnce(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.fail = True

    def forward(self, x):
        if self.fail:
            self.fail = False
            raise RuntimeError("stage failed in its warm-up")
        return self.inner(x)


@pytest.mark.parametrize("failure", ["stage raises", "probe refuses"])
def test_a_warm_up_that_raises_still_joins_the_side_stream(monkeypatch, failure):
    """GraphRunner._capture on CPU with fake streams: whether a warm-up raises (the stage) or is
    refused (the probe), the current stream must wait for the side stream before the error leaves
    _capture, or buffers allocated on the current stream are freed under the side stream's work."""
    model = mlp_model()
    crit = item_criterion if failure == "probe refuses" else "max_prob"
    if failure == "stage raises":
        model.stages[0] = FailsOnce(model.stages[0])
    rt = ee.EERuntime(model, thresholds=0.5, criterion=crit, graphs=False)
    runner = cpu_runner(rt, pack="torch")
    x = torch.randn(4, 6)
    with torch.inference_mode():
        sig = runner._signature(x, capture=False)
        sig.stages[0].inputs[0][:4].copy_(x)
        sig.stages[0].count.fill_(4)
    side, capture_stream, current = FakeStream("side"), FakeStream("capture"), FakeStream("current")
    monkeypatch.setattr(runner, "_cuda_streams", lambda device: (side, capture_stream))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    with pytest.raises((RuntimeError, _GraphsUnusable), match="warm-up|host"), torch.inference_mode():
        runner._capture(sig, 0, 4)
    assert side.waited == ["current"]  # the side stream started after the queued work
    assert current.waited == ["side"]  # and was joined although the warm-up raised
    assert capture_stream.waited == [] and runner.num_captures == 0


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: records the capture calls."""

    log = []

    def capture_begin(self, pool=None, capture_error_mode="global"):
        FakeGraph.log.append(("begin", pool, capture_error_mode))

    def capture_end(self):
        FakeGraph.log.append(("end",))


def test_warmup_captures_without_a_device_sync_per_capture(monkeypatch):
    """The capture sequence of warmup on CPU with fake streams and graphs: one device sync and one
    empty_cache for the whole warmup (torch.cuda.graph did both before each of its ~140 captures
    at warmup(256)), every capture on the capture stream after the warm-ups, all on one pool."""
    model = mlp_model()
    rt = ee.EERuntime(model, thresholds=0.5, criterion="max_prob", graphs=False)
    runner = cpu_runner(rt, buckets=(1, 2, 4, 8), pack="torch")
    side, capture_stream, current = FakeStream("side"), FakeStream("capture"), FakeStream("current")
    calls = {"synchronize": 0, "empty_cache": 0, "body": 0}
    FakeGraph.log = []
    pool = object()
    monkeypatch.setattr(runner, "_cuda_streams", lambda device: (side, capture_stream))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: pool)
    monkeypatch.setattr(torch.cuda, "graph", None)  # not used any more
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda device=None: calls.__setitem__("synchronize", calls["synchronize"] + 1)
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.__setitem__("empty_cache", calls["empty_cache"] + 1))
    body = runner._body

    def counted(sig, k, b):
        calls["body"] += 1
        body(sig, k, b)

    monkeypatch.setattr(runner, "_body", counted)
    with torch.inference_mode():
        sig = runner._signature(torch.randn(1, 6), capture=True)
        runner._warm(sig, 8)
    n = 4 * 4  # stages x buckets
    assert runner.num_captures == n and runner.prepared == [(k, b) for k in range(4) for b in (8, 4, 2, 1)]
    assert calls == {"synchronize": 1, "empty_cache": 1, "body": 3 * n}  # 2 warm-ups + the capture each
    assert FakeGraph.log == [("begin", pool, "thread_local"), ("end",)] * n
    assert capture_stream.waited == ["current"] * n  # each capture after the warm-ups it follows
    assert side.waited == ["current"] * n and current.waited == ["side"] * n


def test_sync_warning_filter():
    assert is_sync_warning("called a synchronizing CUDA operation")
    assert not is_sync_warning(
        "Synchronization debug mode is a prototype feature and does not yet detect all "
        "synchronizing operations (Triggered internally at Module.cpp:1003.)"
    )


def test_autocast_state_is_part_of_the_signature():
    assert autocast_state("cpu") == (False, None) and autocast_state("cuda") == (False, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_state("cpu") == (True, torch.bfloat16)
        assert autocast_state("cuda") == (False, None)
    prev = torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)  # thread-local flags; settable without a GPU
    torch.set_autocast_dtype("cuda", torch.float16)
    try:
        assert autocast_state("cuda") == (True, torch.float16)
    finally:
        torch.set_autocast_enabled("cuda", False)
        torch.set_autocast_dtype("cuda", prev)
    # A runner called in and out of autocast keeps one set of buffers (graphs) for each, and each
    # call gives what the eager runtime gives in the same autocast state (bfloat16 logits inside).
    model = mlp_model()
    x = torch.randn(9, 6)
    thr = quantile_thresholds(model, x, "max_prob")
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob", graphs=False)
    runner = cpu_runner(rt)
    for amp in (False, True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            res, counts = runner.infer(x)
            ref, _ = rt._infer_eager(x, 9)
            near = tie_margin(model, x, thr, "max_prob", ref.exit_index)
        assert res.logits.dtype == ref.logits.dtype == (torch.bfloat16 if amp else torch.float32)
        assert_same_result(res, counts, ref, near, atol=1e-2 if amp else 1e-5, rtol=1e-2 if amp else 1e-5)
    assert runner.num_signatures == 2


def test_one_count_read_per_early_exit_reached():
    model = mlp_model()
    x = torch.randn(8, 6)
    rt = ee.EERuntime(model, thresholds=2.0, criterion="max_prob", graphs=False)  # nobody exits early
    runner = cpu_runner(rt)
    runner.infer(x)
    assert runner.host_syncs == 3  # after each of the 3 early exits
    rt.set_thresholds(-1.0)  # everybody leaves at exit 0: one read, then stop
    res, counts = runner.infer(x)
    assert runner.host_syncs == 4 and counts == [8, 0, 0, 0] and (res.exit_index == 0).all()


def test_launch_ahead_reads_a_count_that_kept_its_bucket_once_at_the_end():
    model = mlp_model()
    x = torch.randn(8, 6)
    rt = ee.EERuntime(model, thresholds=2.0, criterion="max_prob", graphs=False)  # nobody exits early
    runner = cpu_runner(rt)
    ref, ref_counts = rt._infer_eager(x, 8)
    runner.infer(x)  # every count read: all 8 rows went on, in bucket 8, at every stage
    assert runner.host_syncs == 3
    for _ in range(2):  # now the counts go to the host on the way, and are read once at the end
        res, counts = runner.infer(x)
        assert counts == ref_counts == [0, 0, 0, 8]
        assert torch.equal(res.logits, ref.logits) and torch.equal(res.exit_index, ref.exit_index)
    assert runner.host_syncs == 3 + 2
    runner.launch_ahead = False  # every count read as it comes, as before
    assert runner.infer(x)[1] == [0, 0, 0, 8] and runner.host_syncs == 3 + 2 + 3


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
def test_launch_ahead_guesses_wrong_yet_every_call_is_exact(criterion):
    """Calls whose exits change from call to call (thresholds, batch sizes), so that some stages
    launch ahead at a bucket their survivors would have shrunk: each call still equals the eager
    runtime, row for row and count for count, and a guess that failed is not made again."""
    model = mlp_model(K=4)
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(64, 6, generator=gen)
    hi = quantile_thresholds(model, pool, criterion, q=0.02)  # almost nobody leaves early
    lo = quantile_thresholds(model, pool, criterion, q=0.6)  # most leave
    rt = ee.EERuntime(model, thresholds=hi, criterion=criterion, graphs=False)
    runner = cpu_runner(rt, buckets=(4, 8, 16, 32))
    wrong = 0
    for call, (thr, B) in enumerate([(hi, 32), (hi, 32), (lo, 32), (lo, 32), (hi, 13), (lo, 13), (hi, 32), (lo, 5)]):
        rt.set_thresholds(thr)
        x = pool[call : call + B]
        ahead_before = dict(next(iter(runner._sigs.values())).ahead) if runner._sigs else {}
        res, counts = runner.infer(x)
        ref, ref_counts = rt._infer_eager(x, B)
        near = tie_margin(model, x, thr, criterion, ref.exit_index)
        assert_same_result(res, counts, ref, near)
        assert counts == ref_counts
        sig = next(iter(runner._sigs.values()))
        # a guess that did not hold (the bucket would have shrunk) is unlearned by the call
        for key, guessed in ahead_before.items():
            if guessed and not sig.ahead[key]:
                wrong += 1
    assert wrong > 0  # the sequence did make launch-ahead guess wrong


@pytest.mark.parametrize("B", [3, 37])
def test_conv_model_default_buckets_and_chunks(B):
    model = conv_net(num_exits=4, in_channels=3, width=4, num_classes=7).eval()
    x = torch.randn(B, 3, 8, 8)
    big = torch.randn(64, 3, 8, 8)
    thr = quantile_thresholds(model, big, "max_prob")
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob", graphs=False)
    for buckets in (None, (2, 16)):
        runner = GraphRunner(rt, buckets=buckets, capture=False)
        res, counts = runner.infer(x)
        ref, _ = rt._infer_eager(x, B)
        assert_same_result(res, counts, ref, tie_margin(model, x, thr, "max_prob", ref.exit_index))


def test_per_exit_scorer_without_history():
    model = mlp_model()
    x = torch.randn(30, 6)
    scorer = ScaledMaxProb()
    thr = quantile_thresholds(model, x, scorer)
    rt = ee.EERuntime(model, thresholds=thr, criterion=scorer, graphs=False)
    res, counts = cpu_runner(rt).infer(x)
    ref, _ = rt._infer_eager(x, 30)
    assert_same_result(res, counts, ref, tie_margin(model, x, thr, scorer, ref.exit_index))
    assert len(set(res.exit_index.tolist())) > 2


def test_tuple_states():
    d, C = 8, 4
    model = ee.MultiExitModel([TupleStage(d) for _ in range(3)], [TupleExit(d, C) for _ in range(3)]).eval()
    x = (torch.randn(19, 5, d), (torch.rand(19, 5) > 0.3).float())
    thr = quantile_thresholds(model, x, "entropy")
    rt = ee.EERuntime(model, thresholds=thr, graphs=False)
    res, counts = cpu_runner(rt, buckets=(4, 16)).infer(list(x))  # a list is taken as a tuple
    ref, _ = rt._infer_eager(x, 19)
    assert_same_result(res, counts, ref, tie_margin(model, x, thr, "entropy", ref.exit_index))
    check_against_loop(res, model, x, thr, "entropy", "last")


def test_nan_rows_never_exit_and_carry_nan():
    model = ee.MultiExitModel([nn.Identity(), nn.Identity()], [nn.Identity(), nn.Identity()])
    x = torch.tensor([[10.0, 0.0, 0.0], [float("nan"), 0.0, 0.0], [float("inf"), 0.0, 0.0]])
    rt = ee.EERuntime(model, thresholds=[0.5], criterion="max_prob", graphs=False)
    res, counts = cpu_runner(rt).infer(x)
    assert res.exit_index.tolist() == [0, 1, 1] and counts == [1, 2]
    assert torch.isnan(res.logits[1, 0]) and torch.isnan(res.confidence[1])


@pytest.mark.parametrize("poison", [float("nan"), 1e4])
@pytest.mark.parametrize("pack", ["auto", "torch"])
def test_padded_rows_never_reach_the_output(poison, pack):
    """Fill every float static buffer (inputs, running sums, outputs) with garbage, including the
    padding rows every stage reads at bucket 8 for 5 rows: the result must not change."""
    model = mlp_model()
    x = torch.randn(5, 6)
    thr = quantile_thresholds(model, torch.randn(64, 6), "max_prob", q=0.3)
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob", final="average", graphs=False)
    runner = cpu_runner(rt, buckets=(8,), pack=pack)
    runner.warmup(8, example=x[:1])  # allocates every stage's buffers
    with torch.inference_mode():  # the buffers are inference tensors
        for t in runner.static_buffers():
            if t.is_floating_point():
                t.fill_(poison)
    res, counts = runner.infer(x)
    ref, _ = rt._infer_eager(x, 5)
    assert_same_result(res, counts, ref, tie_margin(model, x, thr, "max_prob", ref.exit_index))
    assert torch.isfinite(res.logits).all() and torch.isfinite(res.confidence).all()


def _storage_spans(tensors):
    return [
        (t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()) for t in tensors
    ]


def test_results_are_fresh_tensors_not_views_of_static_buffers():
    model = mlp_model()
    thr = quantile_thresholds(model, torch.randn(64, 6), "entropy")
    rt = ee.EERuntime(model, thresholds=thr, graphs=False)
    runner = cpu_runner(rt)
    x1, x2 = torch.randn(7, 6), torch.randn(7, 6)
    res1, _ = runner.infer(x1)
    kept = [t.clone() for t in (res1.logits, res1.exit_index, res1.confidence)]
    spans = _storage_spans(runner.static_buffers())
    for t in (res1.logits, res1.exit_index, res1.confidence):
        p = t.untyped_storage().data_ptr()
        assert not any(lo <= p < hi for lo, hi in spans)
    runner.infer(x2)  # reuses every static buffer
    for old, now in zip(kept, (res1.logits, res1.exit_index, res1.confidence)):
        assert torch.equal(old, now)


def test_set_thresholds_reuses_buffers_and_takes_effect():
    model = mlp_model()
    x = torch.randn(16, 6)
    rt = ee.EERuntime(model, thresholds=quantile_thresholds(model, x, "entropy", q=0.2), graphs=False)
    runner = cpu_runner(rt)
    runner.infer(x)
    ptrs = [t.data_ptr() for t in runner.static_buffers()]
    new = quantile_thresholds(model, x, "entropy", q=0.6)
    rt.set_thresholds(new)
    res, counts = runner.infer(x)
    assert [t.data_ptr() for t in runner.static_buffers()] == ptrs
    ref, _ = rt._infer_eager(x, 16)
    assert_same_result(res, counts, ref, tie_margin(model, x, new, "entropy", ref.exit_index))
    check_against_loop(res, model, x, new, "entropy", "last")


def test_warmup_prepares_every_bucket_largest_first_then_lazy_calls_add_none():
    model = mlp_model()
    x = torch.randn(13, 6)
    rt = ee.EERuntime(model, thresholds=quantile_thresholds(model, x, "entropy"), graphs=False)
    runner = GraphRunner(rt, capture=False)  # default buckets follow warmup's max_batch
    runner.warmup(20, example=x[:1])
    assert runner.buckets == default_buckets(20) == (1, 2, 4, 8, 16, 24)
    assert runner.prepared == [(k, b) for k in range(4) for b in (24, 16, 8, 4, 2, 1)]
    before = list(runner.prepared)
    res, counts = runner.infer(x)
    assert runner.prepared == before
    ref, _ = rt._infer_eager(x, 13)
    assert_same_result(res, counts, ref, tie_margin(model, x, rt.thresholds, "entropy", ref.exit_index))
    # a batch above the largest bucket runs in chunks of it
    big = torch.randn(50, 6)
    res, counts = runner.infer(big)
    ref, _ = rt._infer_eager(big, 50)
    assert_same_result(res, counts, ref, tie_margin(model, big, rt.thresholds, "entropy", ref.exit_index))


def test_default_buckets_follow_the_largest_warmup_and_never_shrink():
    model = mlp_model()
    x = torch.randn(4, 6)
    rt = ee.EERuntime(model, thresholds=0.5, graphs=False)
    runner = GraphRunner(rt, capture=False)
    assert runner.buckets == default_buckets(256)  # before any warmup
    runner.warmup(20, example=x[:1])
    assert runner.buckets == default_buckets(20)
    n = len(runner.prepared)
    runner.warmup(8, example=x[:1])  # smaller: keeps the buckets, prepares nothing new
    assert runner.buckets == default_buckets(20) and len(runner.prepared) == n
    runner.warmup(40, example=x[:1])
    assert runner.buckets == default_buckets(40) and runner.num_signatures == 1
    explicit = GraphRunner(rt, buckets=[3, 5], capture=False)
    explicit.warmup(100, example=x[:1])  # user buckets stay; the batch above them runs in chunks
    assert explicit.buckets == (3, 5) and explicit.prepared == [(k, b) for k in range(4) for b in (5, 3)]


def test_lazy_preparation_and_warmup_without_example():
    model = mlp_model()
    x = torch.randn(5, 6)
    rt = ee.EERuntime(model, thresholds=2.0, criterion="max_prob", graphs=False)  # nobody exits early
    lazy = cpu_runner(rt, buckets=(1, 2, 4, 8, 16))
    lazy.infer(x)
    assert lazy.prepared == [(k, 8) for k in range(4)]  # only what the call needed
    deferred = cpu_runner(rt, buckets=(1, 2, 4, 8, 16))
    deferred.warmup(4)  # no example and none seen yet: prepared at the first call
    assert deferred.prepared == []
    deferred.infer(x)
    assert deferred.prepared[:12] == [(k, b) for k in range(4) for b in (4, 2, 1)]
    assert set(deferred.prepared[12:]) == {(k, 8) for k in range(4)}


def test_input_signatures_get_their_own_buffers_and_overflow_runs_eagerly():
    model = conv_net(num_exits=3, in_channels=2, width=4, num_classes=5).eval()
    big = torch.randn(64, 2, 8, 8)
    thr = quantile_thresholds(model, big, "margin")
    rt = ee.EERuntime(model, thresholds=thr, criterion="margin", graphs=False)
    runner = cpu_runner(rt)
    runner.max_signatures = 2
    for hw in (8, 12, 8, 6):  # the third shape is past the limit: eager, still correct
        x = torch.randn(6, 2, hw, hw)
        res, counts = runner.infer(x)
        ref, _ = rt._infer_eager(x, 6)
        assert_same_result(res, counts, ref, tie_margin(model, x, thr, "margin", ref.exit_index))
    assert runner.num_signatures == 2


class ShapeShifter(nn.Module):
    """A stage whose per-sample output width changes when ``wide`` is set: static buffers cannot
    hold both."""

    wide = False

    def forward(self, x):
        return torch.cat([x, x], 1) if self.wide else x


class FirstColumns(nn.Module):
    def forward(self, x):
        return 3 * x[:, :2]


def test_varying_state_shape_falls_back_to_eager_or_raises_with_graphs_true():
    x = torch.randn(4, 3)
    for graphs in ("auto", True):
        model = ee.MultiExitModel([ShapeShifter(), nn.Identity()], [FirstColumns(), FirstColumns()]).eval()
        rt = ee.EERuntime(model, thresholds=[2.0], criterion="max_prob", graphs=graphs)
        runner = cpu_runner(rt)
        runner.infer(x)
        model.stages[0].wide = True
        if graphs is True:
            with pytest.raises(RuntimeError, match="graphs=True"):
                runner.infer(x)
            continue
        with pytest.warns(RuntimeWarning, match="static buffers need fixed shapes"):
            res, counts = runner.infer(x)
        assert runner.disabled_reason is not None and counts == [0, 4]
        torch.testing.assert_close(res.logits, 3 * x[:, :2])
        res, counts = runner.infer(x)  # stays eager, no second warning needed
        assert counts == [0, 4]


class _Double(nn.Module):
    def forward(self, x):
        return x.double()


def mixed_dtype_model(mixed=True):
    """Exit 1 returns float64 logits, the others float32 (all float32 with ``mixed=False``)."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)]
    exits = [nn.Linear(6, 4), nn.Sequential(nn.Linear(6, 4), _Double() if mixed else nn.Identity()), nn.Linear(6, 4)]
    return ee.MultiExitModel(stages, exits).eval()


def test_exits_of_different_logit_dtypes_are_refused_as_the_eager_loop_does():
    # Before: the static output buffer took exit 0's dtype and the graphs cast every later exit's
    # logits into it without a word (float64 logits rounded to float32; float32 beyond float16's
    # range became inf), where the eager loop refuses such a model.
    x = torch.randn(8, 6)
    for graphs in ("auto", True):
        rt = ee.EERuntime(mixed_dtype_model(), thresholds=2.0, criterion="max_prob", graphs=graphs)
        with pytest.raises(ValueError, match="exit 1 returns float64 logits but exit 0 returns float32"):
            rt._infer_eager(x, 8)  # the eager loop's own refusal, for reference
        runner = cpu_runner(rt)
        if graphs is True:
            with pytest.raises(RuntimeError, match="graphs=True.*exit 1 returns float64 logits but exit 0"):
                runner.infer(x)
            continue
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(ValueError, match="every exit must return one dtype"):
                runner.infer(x)  # the graphs give up, the eager loop refuses
        assert any("CUDA graphs disabled" in str(w.message) for w in seen)
        assert "exit 1 returns float64 logits but exit 0 returns float32" in runner.disabled_reason


@requires_cuda
def test_captured_graphs_refuse_exits_of_different_logit_dtypes_cuda():
    """On a GPU: warmup refuses the model (the capture's warm-up run sees the second dtype) and
    infer, graphs given up, raises the eager loop's error; a float32 model alongside still runs
    on graphs (the refusal is the model's, not the device's)."""
    x = torch.randn(8, 6, device="cuda")
    rt = ee.EERuntime(mixed_dtype_model().cuda(), thresholds=2.0, criterion="max_prob")
    with pytest.raises(RuntimeError, match="warmup failed.*exit 1 returns float64 logits but exit 0 returns float32"):
        rt.warmup(8, x[:1])
    with pytest.raises(ValueError, match="every exit must return one dtype"):
        rt.infer(x)
    rt = ee.EERuntime(mixed_dtype_model().cuda(), thresholds=2.0, criterion="max_prob")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="every exit must return one dtype"):
            rt.infer(x)
    assert any("exit 1 returns float64" in str(w.message) for w in seen)
    rt = ee.EERuntime(mixed_dtype_model(mixed=False).cuda(), thresholds=2.0, criterion="max_prob")
    res = rt.infer(x)
    runner = rt._graph_runner
    assert runner is not None and runner.disabled_reason is None and runner.num_captures > 0
    assert res.logits.dtype == torch.float32 and torch.equal(res.exit_index.cpu(), torch.full((8,), 2))


def test_threads_each_get_their_own_result_cpu():
    model = mlp_model()
    thr = quantile_thresholds(model, torch.randn(64, 6), "entropy")
    rt = ee.EERuntime(model, thresholds=thr, graphs=False)
    runner = cpu_runner(rt)
    inputs = [torch.randn(3 + 2 * i, 6) for i in range(8)]
    expected = [rt._infer_eager(x, x.shape[0])[0] for x in inputs]
    errors = []
    barrier = threading.Barrier(8)

    def worker(i):
        try:
            barrier.wait()
            for _ in range(3):
                res, _ = runner.infer(inputs[i])
                ref = expected[i]
                assert torch.equal(res.exit_index, ref.exit_index)
                torch.testing.assert_close(res.logits, ref.logits, atol=1e-5, rtol=1e-5)
        except Exception as e:  # noqa: BLE001 reported below
            errors.append((i, e))

    run_threads(worker, 8)
    assert not errors, errors


def test_empty_batch_and_inputs_left_untouched():
    model = mlp_model()
    rt = ee.EERuntime(model, thresholds=0.5, graphs=False)
    runner = cpu_runner(rt)
    res, counts = runner.infer(torch.randn(0, 6))
    assert res.logits.shape == (0, 5) and counts == [0, 0, 0, 0]
    x = torch.randn(9, 6)
    x0 = x.clone()
    w0 = [p.clone() for p in model.parameters()]
    runner.infer(x)
    assert torch.equal(x, x0) and all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def test_bad_arguments():
    model = mlp_model()
    rt = ee.EERuntime(model, thresholds=0.5, graphs=False)
    with pytest.raises(ValueError, match="uses_history"):
        GraphRunner(ee.EERuntime(model, thresholds=0.5, criterion=WithHistory(), graphs=False))
    with pytest.raises(ValueError, match="pack"):
        GraphRunner(rt, pack="cub")
    with pytest.raises(ValueError, match="capture"):
        GraphRunner(rt, capture="yes")
    with pytest.raises(ValueError, match="bucket"):
        GraphRunner(rt, buckets=[0])
    with pytest.raises(ValueError, match="CUDA"):
        GraphRunner(rt, capture=True).infer(torch.randn(3, 6))
    runner = cpu_runner(rt)
    with pytest.raises(ValueError, match="max_batch"):
        runner.warmup(0)
    with pytest.raises(TypeError, match="max_batch"):
        runner.warmup(2.5)
    with pytest.raises(ValueError, match="at least one row"):
        runner.warmup(4, example=torch.randn(0, 6))
    with pytest.raises(TypeError):
        runner.infer("not a tensor")


def test_graphs_supported_reasons():
    model = mlp_model()
    why = graphs_supported(ee.EERuntime(model, thresholds=0.5, criterion=WithHistory()))
    assert why is not None and "uses_history" in why
    why = graphs_supported(ee.EERuntime(model, thresholds=0.5))  # the model is on the CPU
    assert why is not None and ("cpu" in why or "CUDA" in why)
    # a per-exit scorer without history and a plain callable are not reasons by themselves
    for crit in (ScaledMaxProb(), top_logit):
        why = graphs_supported(ee.EERuntime(model, thresholds=0.5, criterion=crit))
        assert why is None or "history" not in why


def test_runtime_on_cpu_inputs_runs_eagerly_without_a_runner():
    model = mlp_model()
    x = torch.randn(10, 6)
    thr = quantile_thresholds(model, x, "entropy")
    rt = ee.EERuntime(model, thresholds=thr, graphs="auto")
    res = rt.infer(x)
    assert rt._graph_runner is None
    check_against_loop(res, model, x, thr, "entropy", "last")


# ---------------------------------------------------------------------------------------- GPU
@pytest.fixture
def exact_cuda():
    """TF32 off, so graph and eager paths differ only by batch-size effects in the kernels."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cuda_setup(criterion="max_prob", final="last", num_exits=4, seed=0, **rt_kw):
    torch.manual_seed(seed)
    model = conv_net(num_exits=num_exits, in_channels=3, width=8, num_classes=10).cuda().eval()
    pool = torch.randn(256, 3, 16, 16, device="cuda")
    thr = quantile_thresholds(model, pool, criterion, q=0.35)
    rt = ee.EERuntime(model, thresholds=thr, criterion=criterion, final=final, **rt_kw)
    return model, pool, rt


def eager_reference(rt, x):
    with torch.inference_mode():
        return rt._infer_eager(x, x.shape[0])


@requires_cuda
@pytest.mark.parametrize("final", ["last", "average"])
@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "callable", "per_exit"])
def test_gpu_graphs_equal_eager_and_per_sample_loop(exact_cuda, criterion, final):
    crit = {"callable": top_logit, "per_exit": ScaledMaxProb()}.get(criterion, criterion)
    model, pool, rt = cuda_setup(crit, final, graphs=True)
    for B in (1, 3, 8, 37, 256, 300):  # 300: chunks of the largest default bucket (256)
        x = pool.repeat(2, 1, 1, 1)[:B] + 0.01 * B
        rt.reset_stats()
        res = rt.infer(x)
        counts = rt.stats.exit_counts  # what the runner reported from its count reads
        ref, _ = eager_reference(rt, x)
        near = tie_margin(model, x, rt.thresholds, crit, ref.exit_index)
        assert_same_result(res, counts, ref, near, atol=1e-4, rtol=1e-4)
        if criterion != "per_exit":
            check_against_loop(res, model, x, rt.thresholds, crit, final)
    runner = rt._graph_runner
    assert runner is not None and runner.num_captures > 0 and runner.disabled_reason is None
    assert len(set(rt.infer(pool).exit_index.tolist())) == 4  # exits happen at every exit point


@requires_cuda
@pytest.mark.parametrize("pack", ["torch", "ops"])
def test_gpu_pack_variants_equal_eager(exact_cuda, pack):
    model, pool, rt = cuda_setup(graphs=True)
    if pack == "ops":
        from eeruntime.ops import dispatch

        probe = torch.zeros(4, device="cuda")
        keep = torch.ones(4, dtype=torch.bool, device="cuda")
        idx, cnt = torch.zeros(4, dtype=torch.int64, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda")
        try:
            name = dispatch.select("compact_into", "auto", keep, [probe], [probe.clone()], idx, cnt).name
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"no compact_into backend for CUDA tensors: {e}")
        if name not in CAPTURE_SAFE_BACKENDS["compact_into"]:
            pytest.skip(f"compact_into would run on {name!r}, which syncs; build the CUDA extension")
    runner = GraphRunner(rt, pack=pack)
    for B in (2, 29, 64):
        x = pool[:B]
        res, counts = runner.infer(x)
        ref, _ = eager_reference(rt, x)
        assert_same_result(
            res, counts, ref, tie_margin(model, x, rt.thresholds, "max_prob", ref.exit_index), atol=1e-4, rtol=1e-4
        )
    assert runner.num_captures > 0


class ScalesInPlace(torch.nn.Module):
    """A stage that changes its input in place before its body (as `x += pos_emb` would)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        x.mul_(1.5)
        return self.inner(x)


@requires_cuda
def test_gpu_lazy_capture_mid_call_of_a_stage_that_writes_its_input(exact_cuda):
    # The call that captures stage k runs its body in warm-ups before the replay: each must start
    # from the input as the call left it, or the in-place write is applied three times.
    model, pool, rt = cuda_setup(graphs=True)
    model.stages[1] = ScalesInPlace(model.stages[1])
    for B in (5, 64):
        x = pool[:B]
        rt.reset_stats()
        res = rt.infer(x)  # lazy: stage 1 is captured in the middle of this call
        counts = rt.stats.exit_counts
        ref, _ = eager_reference(rt, x)
        near = tie_margin(model, x, rt.thresholds, "max_prob", ref.exit_index)
        assert_same_result(res, counts, ref, near, atol=1e-4, rtol=1e-4)
    assert rt._graph_runner.num_captures > 0


class SleepsThenFails(nn.Module):
    """Queues ~50 ms of GPU work on the current (side) stream, then raises: a failing warm-up."""

    def forward(self, x):
        torch.cuda._sleep(100_000_000)
        raise RuntimeError("stage failed in its warm-up")


@requires_cuda
def test_gpu_a_warm_up_that_raises_leaves_the_current_stream_after_the_side_stream(exact_cuda):
    model, pool, rt = cuda_setup(graphs=True)
    stage0 = model.stages[0]
    model.stages[0] = SleepsThenFails()
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="warm-up"):
        rt.infer(pool[:8])  # the first call captures stage 0: its warm-up raises on the side stream
    # The current stream was made to wait for the side stream's queued sleep before the error
    # left the runner (without the join it would be idle already).
    assert not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    model.stages[0] = stage0  # the runner is still usable
    x = pool[:8]
    rt.reset_stats()
    res = rt.infer(x)
    ref, _ = eager_reference(rt, x)
    near = tie_margin(model, x, rt.thresholds, "max_prob", ref.exit_index)
    assert_same_result(res, rt.stats.exit_counts, ref, near, atol=1e-4, rtol=1e-4)


@requires_cuda
def test_gpu_set_thresholds_causes_no_capture(exact_cuda):
    model, pool, rt = cuda_setup(graphs=True)
    rt.warmup(64, example=pool[:1])
    runner = rt._graph_runner
    captured = runner.num_captures
    assert captured == 4 * len(default_buckets(64))
    for q in (0.1, 0.35, 0.7):
        new = quantile_thresholds(model, pool, "max_prob", q=q)
        rt.set_thresholds(new)
        for B in (1, 5, 17, 64):
            x = pool[B : 2 * B]
            rt.reset_stats()
            res = rt.infer(x)
            ref, _ = eager_reference(rt, x)
            near = tie_margin(model, x, new, "max_prob", ref.exit_index)
            assert_same_result(res, rt.stats.exit_counts, ref, near, atol=1e-4, rtol=1e-4)
    assert runner.num_captures == captured


def is_sync_warning(message: str) -> bool:
    """torch's warning for a sync under sync debug mode "warn" ("called a synchronizing CUDA
    operation"), not its one-time notice that the mode is a prototype."""
    return "synchroniz" in message and "prototype" not in message


def _sync_warnings(fn):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Count the sync warnings alone: the first set_sync_debug_mode of a process also warns once
    # that the mode is a prototype ("... synchronizing operations"), which a looser match counted
    # as a sync whenever this test was the first in its process to turn the mode on (xdist).
    return out, sum(is_sync_warning(str(w.message)) for w in caught)


@requires_cuda
def test_gpu_at_most_one_host_sync_per_early_exit(exact_cuda):
    model, pool, rt = cuda_setup(graphs=True)
    rt.warmup(256, example=pool[:1])
    runner = rt._graph_runner
    K = rt.num_exits
    for B in (1, 8, 64, 256):
        x = pool[:B]
        rt.infer(x)  # nothing left to capture after this
        before = runner.host_syncs
        runner.launch_ahead = False  # every count read as it comes
        res, n_sync = _sync_warnings(lambda: rt.infer(x))
        runner.launch_ahead = True
        reached = int(res.exit_index.max()) + 1  # stages run; a count is read after each early one
        assert n_sync == runner.host_syncs - before == min(reached, K - 1), (B, n_sync, reached)
        assert n_sync <= K - 1
        # launch-ahead reads some counts at the end instead, in one wait (which the sync debug
        # mode may or may not report): never more syncs
        before = runner.host_syncs
        _, n_sync = _sync_warnings(lambda: rt.infer(x))
        assert n_sync <= runner.host_syncs - before <= min(reached, K - 1), (B, n_sync, reached)
    rt.set_thresholds(-1.0)  # everybody leaves at exit 0: exactly one sync
    rt.infer(pool[:32])
    _, n_sync = _sync_warnings(lambda: rt.infer(pool[:32]))
    assert n_sync == 1


@requires_cuda
def test_gpu_launch_ahead_waits_once_and_every_call_equals_eager(exact_cuda):
    model, pool, rt = cuda_setup(graphs=True)  # max_prob: a threshold above 1 keeps every row
    exits_thr = list(rt.thresholds)
    K = rt.num_exits
    rt.set_thresholds(2.0)
    rt.infer(pool[:64])  # every count read: all 64 rows kept bucket 64 at every stage
    runner = rt._graph_runner
    before = runner.host_syncs
    res, counts = runner.infer(pool[:64])
    assert runner.host_syncs - before == 1 and counts == [0] * (K - 1) + [64]  # one wait, at the end
    # exits again: the guesses made under "nobody leaves" fail once, and every call stays exact
    rt.set_thresholds(exits_thr)
    for B in (64, 64, 256, 37):
        x = pool[:B]
        res, counts = runner.infer(x)
        ref, _ = eager_reference(rt, x)
        near = tie_margin(model, x, exits_thr, "max_prob", ref.exit_index)
        assert_same_result(res, counts, ref, near)


@requires_cuda
def test_gpu_eight_threads_get_their_own_results(exact_cuda):
    model, pool, rt = cuda_setup(graphs=True)
    rt.warmup(64, example=pool[:1])
    inputs = [pool[8 * i : 8 * i + 3 + 7 * i] for i in range(8)]
    expected = [eager_reference(rt, x)[0] for x in inputs]
    nears = [tie_margin(model, x, rt.thresholds, "max_prob", e.exit_index) for x, e in zip(inputs, expected)]
    torch.cuda.synchronize()
    errors = []
    barrier = threading.Barrier(8)

    def worker(i):
        try:
            stream = torch.cuda.Stream() if i % 2 else torch.cuda.current_stream()  # half on their own
            barrier.wait()
            for _ in range(20):
                with torch.cuda.stream(stream):
                    res = rt.infer(inputs[i])
                    stream.synchronize()
                assert_same_result(
                    res,
                    torch.bincount(res.exit_index.cpu(), minlength=4).tolist(),
                    expected[i],
                    nears[i],
                    atol=1e-4,
                    rtol=1e-4,
                )
        except Exception as e:  # noqa: BLE001 reported below
            errors.append((i, repr(e)))

    run_threads(worker, 8)
    assert not errors, errors


@requires_cuda
def test_gpu_memory_stays_flat_and_results_are_not_static_views(exact_cuda):
    model, pool, rt = cuda_setup(graphs=True)
    rt.warmup(256, example=pool[:1])
    for B in (1, 7, 64, 256, 300):
        rt.infer(pool.repeat(2, 1, 1, 1)[:B])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    spans = _storage_spans(rt._graph_runner.static_buffers())
    for i in range(60):
        res = rt.infer(pool[: 1 + (i * 37) % 256])
        p = res.logits.untyped_storage().data_ptr()
        assert not any(lo <= p < hi for lo, hi in spans)
        del res
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == base


@requires_cuda
def test_gpu_uncapturable_criterion_falls_back_or_raises():
    model, pool, _ = cuda_setup()

    def syncing(logits, state):
        if float(logits.sum().item()) != float(logits.sum().item()):  # a host sync: cannot be captured
            pass
        return logits.max(1).values

    rt = ee.EERuntime(model, thresholds=[1.0, 1.5, 2.0], criterion=syncing, graphs="auto")
    with pytest.warns(RuntimeWarning, match="CUDA graphs disabled"):
        res = rt.infer(pool[:16])
    ref, _ = eager_reference(rt, pool[:16])
    assert torch.equal(res.exit_index, ref.exit_index)
    rt = ee.EERuntime(model, thresholds=[1.0, 1.5, 2.0], criterion=syncing, graphs=True)
    with pytest.raises(RuntimeError, match="graphs=True"):
        rt.infer(pool[:16])
    history = ee.EERuntime(model, thresholds=0.5, criterion=WithHistory(), graphs=True)
    with pytest.raises(RuntimeError, match="uses_history"):
        history.infer(pool[:4])


@requires_cuda
def test_gpu_host_to_device_criterion_is_refused_before_capture_and_the_allocator_still_works(exact_cuda):
    model, pool, _ = cuda_setup()

    def with_device_constant(logits, state):
        return logits.max(1).values - torch.tensor(0.25, device=logits.device)  # a host-to-device copy

    rt = ee.EERuntime(model, thresholds=[1.0, 1.5, 2.0], criterion=with_device_constant, graphs="auto")
    with pytest.warns(RuntimeWarning, match="CUDA graphs disabled"):
        res = rt.infer(pool[:16])
    assert "lift_fresh" in rt._graph_runner.disabled_reason  # refused by the probe, not by a failed capture
    ref, _ = eager_reference(rt, pool[:16])
    assert torch.equal(res.exit_index, ref.exit_index)
    # No capture was left open: the allocator still empties its cache and new graphs capture.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    ok = ee.EERuntime(model, thresholds=rt.thresholds, criterion=top_logit, graphs=True)
    x = pool[:16]
    res = ok.infer(x)
    assert ok._graph_runner.num_captures > 0 and ok._graph_runner.disabled_reason is None
    ref, _ = eager_reference(ok, x)
    near = tie_margin(model, x, ok.thresholds, top_logit, ref.exit_index)
    assert_same_result(res, ok.stats.exit_counts, ref, near, atol=1e-4, rtol=1e-4)


@requires_cuda
def test_gpu_graphs_captured_under_autocast_are_not_replayed_outside_it(exact_cuda):
    model, pool, rt = cuda_setup(graphs=True)
    x = pool[:32]
    for amp in (True, False, True):
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            rt.reset_stats()
            res = rt.infer(x)
            ref, _ = eager_reference(rt, x)
            near = tie_margin(model, x, rt.thresholds, "max_prob", ref.exit_index)
        assert res.logits.dtype == ref.logits.dtype == (torch.float16 if amp else torch.float32)
        assert_same_result(res, rt.stats.exit_counts, ref, near, atol=1e-2 if amp else 1e-4, rtol=1e-2 if amp else 1e-4)
    assert rt._graph_runner.num_signatures == 2 and rt._graph_runner.disabled_reason is None


@requires_cuda
def test_gpu_set_thresholds_never_splits_a_captured_graph_call(exact_cuda):
    """#12's race test (tests/test_stage_step.py) on captured graphs: each call decides every exit
    with one threshold set."""
    from test_stage_step import _race

    model, pool, rt = cuda_setup("entropy", graphs=True)
    x = pool[:96]
    sets = [quantile_thresholds(model, x, "entropy", q=0.15), quantile_thresholds(model, x, "entropy", q=0.3)]
    refs = []
    for s in sets:
        rt.set_thresholds(s)
        refs.append(rt.infer(x))
    assert not torch.equal(refs[0].exit_index, refs[1].exit_index)
    _race(rt.infer, rt, x, sets, refs)
    assert rt._graph_runner.num_captures > 0 and rt._graph_runner.disabled_reason is None

"""A batch's memory layout through the runtime (eeruntime/rows_layout.py): a channels_last model
keeps channels_last stage inputs after every pack, on every executor, with the answers of the
per-sample loop."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import per_sample_loop

import eeruntime as ee
from eeruntime.rows_layout import from_rows, new_rows, row_order, to_rows
from eeruntime.runtime.graphs import GraphRunner
from eeruntime.serve import StageScheduler
from eeruntime.zoo import resnet_style

CL = torch.channels_last


@pytest.mark.parametrize(
    "make,order",
    [
        (lambda: torch.randn(4, 3, 5, 6).to(memory_format=CL), (2, 3, 1)),
        (lambda: torch.randn(4, 3, 2, 5, 6).to(memory_format=torch.channels_last_3d), (2, 3, 4, 1)),
        (lambda: torch.randn(4, 5, 6).transpose(1, 2), (2, 1)),
        (lambda: torch.randn(4, 3, 5, 6), None),  # contiguous
        (lambda: torch.randn(4, 6, 5)[:, :, ::2], None),  # rows not dense
        # one row's memory for every row (stride 0 in dim 0): not one dense block, left as it is
        (lambda: torch.randn(1, 3, 5, 6).to(memory_format=CL).expand(4, 3, 5, 6), None),
        (lambda: torch.randn(4, 6).t().t(), None),  # 2-D: rows are row-major or not dense
    ],
    ids=["channels_last", "channels_last_3d", "transposed", "contiguous", "strided", "expanded", "2d"],
)
def test_row_order_and_its_views(make, order):
    t = make()
    assert row_order(t) == order
    v = to_rows(t, order)
    assert torch.equal(from_rows(v, order), t) and from_rows(v, order).stride() == t.stride()
    if order is not None:
        assert v.is_contiguous() and v.data_ptr() == t.data_ptr()  # the same memory, row-major
    b = new_rows(t, 7)
    assert b.shape == (7, *t.shape[1:]) and b.dtype == t.dtype and row_order(b) == order
    assert bool((b == 0).all())


def _model():
    torch.manual_seed(0)
    return resnet_style(num_classes=10, widths=(8, 16, 16, 32), blocks=(1, 1, 1, 1)).eval().to(memory_format=CL)


def _hooked(model):
    seen = []
    for k, stage in enumerate(model.stages):
        stage.register_forward_pre_hook(
            lambda mod, inp, k=k: seen.append((k, inp[0].shape[0], inp[0].is_contiguous(memory_format=CL)))
        )
    return seen


def _channels_last_batch(B):
    """The channels_last model, a channels_last batch of ``B`` rows, entropy thresholds under which
    rows leave at every exit, and the list the stages' hooks fill."""
    from eeruntime.ops import confidence_ref

    model = _model()
    x = torch.randn(B, 3, 32, 32).to(memory_format=CL)
    with torch.no_grad():
        thr = [float(confidence_ref(o, "entropy").quantile(0.4)) for o in model(x)[:-1]]
    return model, x, thr, _hooked(model)


def _check(res, model, x, thr):
    ref_logits, ref_exit, near = per_sample_loop(model, x, thr, "entropy", "last")
    clear = near > 1e-4
    assert torch.equal(res.exit_index[clear], ref_exit[clear])
    torch.testing.assert_close(res.logits.double()[clear], ref_logits[clear], atol=1e-4, rtol=1e-4)
    assert len(set(res.exit_index.tolist())) >= 3  # rows left at several exits: packs happened


@pytest.mark.parametrize("backend", ["auto", "torch", "cpp"])
def test_channels_last_stays_through_the_eager_runtime(backend):
    if backend == "cpp" and not ee._ext.available():
        pytest.skip(f"the extension is not built: {ee._ext.why_unavailable()}")
    model, x, thr, seen = _channels_last_batch(48)
    res = ee.EERuntime(model, thresholds=thr, criterion="entropy", compact_backend=backend).infer(x)
    assert len(seen) == 4 and all(cl for _, _, cl in seen), seen  # every stage, after every pack
    _check(res, model, x, thr)


def test_channels_last_stays_in_the_graph_loop_and_the_stage_step():
    model, x, thr, seen = _channels_last_batch(48)
    rt = ee.EERuntime(model, thresholds=thr, criterion="entropy")
    runner = GraphRunner(rt, buckets=(8, 16, 32, 48), capture=False)  # the static buffers' loop, uncaptured
    res, _ = runner.infer(x)
    assert all(cl for _, _, cl in seen), seen
    _check(res, model, x, thr)
    seen.clear()
    step = rt.run_stage(0, x, torch.arange(48))
    assert step.state.is_contiguous(memory_format=CL)
    assert rt.run_stage(1, step.state, step.rows).state.is_contiguous(memory_format=CL)


def test_channels_last_stays_through_the_stage_scheduler():
    model, x, thr, seen = _channels_last_batch(40)
    rt = ee.EERuntime(model, thresholds=thr, criterion="entropy")
    with StageScheduler(rt, max_batch=16, fused=False, max_defer_ms=0) as sched:
        futures = [sched.submit_nowait(x[i : i + 4]) for i in range(0, 40, 4)]
        parts = [f.result(60) for f in futures]
    assert seen and all(cl for _, _, cl in seen), seen
    res = ee.InferenceResult(
        torch.cat([p.logits for p in parts]),
        torch.cat([p.exit_index for p in parts]),
        torch.cat([p.confidence for p in parts]),
    )
    _check(res, model, x, thr)


def test_take_rows_keeps_each_members_layout():
    from eeruntime.runtime import take_rows

    a = torch.randn(6, 3, 4, 5).to(memory_format=CL)
    b = torch.randn(6, 7)
    idx = torch.tensor([4, 0, 5])
    got = take_rows((a, b), idx)
    assert torch.equal(got[0], a[idx]) and torch.equal(got[1], b[idx])
    assert got[0].is_contiguous(memory_format=CL) and got[1].is_contiguous()
    assert take_rows(a, idx).is_contiguous(memory_format=CL)


@settings(max_examples=60, deadline=None)
@given(
    dims=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    data=st.data(),
    B=st.integers(1, 9),
)
def test_packs_of_any_dense_row_order_keep_it_and_equal_boolean_indexing(dims, data, B):
    """A tensor whose rows are dense in any order of its trailing dims (built contiguous in that
    order, then permuted back): compact with every backend, compact_into into a buffer of the same
    layout and compact_ give boolean indexing's values, in that layout."""
    perm = data.draw(st.permutations(range(1, len(dims) + 1)))
    g = torch.Generator().manual_seed(B)
    stored = torch.randn(B, *[dims[d - 1] for d in perm], generator=g)  # row-major in `perm` order
    inv = [0] * (len(dims) + 1)
    for i, d in enumerate((0, *perm)):
        inv[d] = i
    t = stored.permute(*inv)  # shape (B, *dims), rows dense in `perm` order
    keep = torch.rand(B, generator=g) < 0.5
    want = t[keep]
    order = row_order(t)
    assert order is None or to_rows(t, order).is_contiguous()
    backends = ["torch"] + (["cpp"] if ee._ext.available() else [])
    for backend in backends:
        index, (got,) = ee.ops.compact(keep, [t], backend=backend)
        assert torch.equal(got, want)
        # the layout of t's rows: the strides new rows of t's layout have (any order, when one row
        # or fewer, or every dim of size 1, leaves nothing to tell)
        assert got.stride() == new_rows(t, got.shape[0]).stride() or got.shape[0] <= 1
        out = new_rows(t, B)
        index_out, count = torch.zeros(B, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        ee.ops.compact_into(keep, [t], [out], index_out, count, backend=backend)
        n = int(count)
        assert n == want.shape[0] and torch.equal(out[:n], want)
    inplace = t.clone()  # (clone keeps the layout)
    n = ee.ops.compact_(keep, [inplace])
    assert torch.equal(inplace[:n], want) and inplace.stride() == t.clone().stride()

"""The compiled compaction ops of ``eeruntime._C`` (backends "cpp" and "cuda") against boolean
indexing, ``index_copy_`` and the ``torch`` references; their checks, dispatch and opcheck."""

import pytest
import torch

import eeruntime as ee
from eeruntime import _ext
from eeruntime.ops import BackendUnavailable
from eeruntime.ops._ext_backend import _compact_into_path
from eeruntime.rows_layout import row_order, to_rows

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"{_ext.why_unavailable()}; {_ext.BUILD_HINT}")
needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.with_cuda()),
    reason="needs a CUDA device; none on this machine"
    if not torch.cuda.is_available()
    else f"eeruntime._C was built without CUDA; {_ext.CUDA_BUILD_HINT}",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]
TRAILING = [(), (3,), (2, 5, 3)]
PATTERNS = ["none", "all", "some"]


def make_mask(B, pattern, device="cpu"):
    if pattern == "none":
        return torch.zeros(B, dtype=torch.bool, device=device)
    if pattern == "all":
        return torch.ones(B, dtype=torch.bool, device=device)
    return (torch.rand(B) < 0.5).to(device)


def make_tensor(shape, dtype, device="cpu"):
    """Distinct values per element where the dtype allows, so a wrong row cannot match by chance."""
    if dtype == torch.bool:
        return (torch.rand(shape) < 0.5).to(device)
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=torch.float32).to(dtype).to(device)
    hi = 256 if dtype == torch.uint8 else 1 << 30
    return torch.randint(0, hi, shape, dtype=torch.int64).to(dtype).to(device)


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------- compact
@needs_ext
@pytest.mark.parametrize("B", [0, 1, 7, 1000])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("trailing", TRAILING, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compact_matches_boolean_indexing(B, pattern, trailing, dtype):
    keep = make_mask(B, pattern)
    t = make_tensor((B, *trailing), dtype)
    other = torch.randn(B, 4)  # a second tensor of another dtype and row size in the same call
    index, (packed, packed_other) = ee.ops.compact(keep, [t, other], backend="cpp")
    assert_same(index, torch.arange(B)[keep])
    assert_same(packed, t[keep])
    assert_same(packed_other, other[keep])


def TRANSPOSED():
    return torch.randn(9, 4, 6).transpose(1, 2)


@needs_ext
@pytest.mark.parametrize(
    "make",
    [
        TRANSPOSED,  # rows dense in another dim order: kept in it
        lambda: torch.randn(18, 5)[::2],  # dense rows at a stride in dim 0
        lambda: torch.randn(9, 3, 5)[:, 1],  # dense rows inside a larger buffer
        lambda: torch.randn(1, 5).expand(9, 5),  # stride 0 in dim 0: every row the same memory
        lambda: torch.randn(9, 1, 4)[:, :, ::2],  # size-1 dim with any stride, strided last dim
    ],
    ids=["transposed", "row-strided", "column-slice", "expanded", "last-dim-strided"],
)
def test_compact_non_contiguous_inputs(make):
    t = make()
    before = t.clone()
    keep = torch.tensor([True, False, True, True, False, False, True, False, True])
    index, (packed,) = ee.ops.compact(keep, [t], backend="cpp")
    assert_same(packed, t[keep])
    # a result whose rows are dense: in the input's dim order when its rows were dense in another
    # (channels_last and the like: eeruntime/rows_layout.py), else row-major
    order = row_order(t)
    assert to_rows(packed, order).is_contiguous() and row_order(packed) == order
    assert (order is not None) == (make is TRANSPOSED)
    assert_same(index, keep.nonzero().squeeze(1))
    assert torch.equal(t, before)  # inputs are never written


@needs_ext
def test_compact_large_batch_parallel_paths():
    # 100k rows span several selection chunks and parallel copy tasks; short runs of kept rows
    # exercise the run-coalescing copy, the int16 rows the fixed-size copy.
    B = 100_000
    keep = torch.rand(B) < 0.7
    keep[1000:5000] = True
    tensors = [
        torch.randn(B, 33),  # 132-byte rows: runtime-size copies
        torch.randint(0, 1000, (B,), dtype=torch.int16),  # 2-byte rows: fixed-size copies
        torch.randn(B, 8),  # 32-byte rows
        torch.randn(B, 16),  # 64-byte rows
    ]
    index, packed = ee.ops.compact(keep, tensors, backend="cpp")
    assert_same(index, keep.nonzero().squeeze(1))
    for p, t in zip(packed, tensors):
        assert_same(p, t[keep])


@needs_ext
def test_compact_op_called_directly_and_empty_rows():
    keep = torch.tensor([False, True, True])
    t = torch.empty(3, 0, 2)  # zero bytes per row: only the shape changes
    index, packed = torch.ops.eeruntime.compact(keep, [t, torch.arange(3)])
    assert_same(index, torch.tensor([1, 2]))
    assert packed[0].shape == (2, 0, 2)
    assert_same(packed[1], torch.tensor([1, 2]))


# ----------------------------------------------------------------------------------- compact_into
@needs_ext
@pytest.mark.parametrize("B", [0, 1, 7, 1000])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_compact_into_writes_first_n_rows_only(B, pattern, dtype):
    keep = make_mask(B, pattern)
    t = make_tensor((B, 2, 3), dtype)
    cap = B + 5
    sentinel = make_tensor((cap, 2, 3), dtype)
    out = sentinel.clone()
    index_out = torch.full((cap,), -7, dtype=torch.int64)
    count_out = torch.full((1,), -1, dtype=torch.int64)
    ee.ops.compact_into(keep, [t], [out], index_out, count_out, backend="cpp")
    n = int(keep.sum())
    assert int(count_out) == n
    assert_same(out[:n], t[keep])
    assert_same(out[n:], sentinel[n:])
    assert_same(index_out[:n], keep.nonzero().squeeze(1))
    assert (index_out[n:] == -7).all()


@needs_ext
def test_compact_into_matches_torch_backend_with_strided_buffers():
    B = 50
    keep = torch.rand(B) < 0.3
    srcs = [torch.randn(B, 8)[:, ::2], torch.randn(2 * B, 3)[::2], torch.arange(B)]
    # output buffers: a row-strided slice of a larger buffer is fine (rows are dense)
    outs_cpp = [torch.zeros(B, 4), torch.zeros(B, 6)[:, :3], torch.zeros(B, dtype=torch.int64)]
    outs_ref = [o.clone() for o in outs_cpp]
    idx_cpp, idx_ref = torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64)
    cnt_cpp, cnt_ref = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    ee.ops.compact_into(keep, srcs, outs_cpp, idx_cpp, cnt_cpp, backend="cpp")
    ee.ops.compact_into(keep, srcs, outs_ref, idx_ref, cnt_ref, backend="torch")
    assert int(cnt_cpp) == int(cnt_ref) == int(keep.sum())
    for a, b in zip(outs_cpp + [idx_cpp], outs_ref + [idx_ref]):
        assert_same(a, b)


@needs_ext
def test_compact_into_non_dense_buffer_falls_back_or_raises():
    keep = torch.tensor([True, False, True])
    t = torch.randn(3, 4)
    out = torch.zeros(4, 3).t()  # [3, 4] whose rows are strided: cannot be written row by row
    idx, cnt = torch.zeros(3, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    why = ee.ops.explain("compact_into", keep, [t], [out], idx, cnt)
    assert "not dense within a row" in why["cpp"] and why["torch"] is None
    ee.ops.compact_into(keep, [t], [out], idx, cnt)  # auto: the torch reference takes it
    assert_same(out[:2], t[keep])
    with pytest.raises(BackendUnavailable, match="not dense within a row"):
        ee.ops.compact_into(keep, [t], [out], idx, cnt, backend="cpp")
    with pytest.raises(ValueError, match="not dense within a row"):
        torch.ops.eeruntime.compact_into(keep, [t], [out], idx, cnt)
    shared = torch.zeros(1, 4).expand(3, 4)  # every row the same memory: writes would collide
    assert "overlapping rows" in ee.ops.explain("compact_into", keep, [t], [shared], idx, cnt)["cpp"]
    with pytest.raises(ValueError, match="overlapping rows"):
        torch.ops.eeruntime.compact_into(keep, [t], [shared], idx, cnt)


# ----------------------------------------------------------------------------------- scatter_rows
def scatter_oracle(mask, rows, src, out):
    expected = out.clone()
    expected.index_copy_(0, rows[mask], src[mask].to(out.dtype))
    return expected


@needs_ext
@pytest.mark.parametrize("B", [0, 1, 7, 1000])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("trailing", TRAILING, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.int32, torch.bool], ids=str)
def test_scatter_rows_matches_index_copy(B, pattern, trailing, dtype):
    mask = make_mask(B, pattern)
    M = B + 3  # the output has rows no source maps to
    rows = torch.randperm(M)[:B]
    src = make_tensor((B, *trailing), dtype)
    logits = torch.randn(B, 10)
    out = make_tensor((M, *trailing), dtype)
    out_logits = torch.randn(M, 10)
    exp, exp_logits = scatter_oracle(mask, rows, src, out), scatter_oracle(mask, rows, logits, out_logits)
    ee.ops.scatter_rows(mask, rows, [src, logits], [out, out_logits], backend="cpp")
    assert_same(out, exp)
    assert_same(out_logits, exp_logits)


@needs_ext
def test_scatter_rows_converts_dtype_like_the_reference():
    B = 20
    mask = torch.rand(B) < 0.5
    rows = torch.randperm(B)
    src = torch.randn(B, 6, dtype=torch.float32)[:, ::2]  # strided source, float32 into bfloat16
    out_cpp = torch.zeros(B, 3, dtype=torch.bfloat16)
    out_ref = out_cpp.clone()
    ee.ops.scatter_rows(mask, rows, [src], [out_cpp], backend="cpp")
    ee.ops.scatter_rows(mask, rows, [src], [out_ref], backend="torch")
    assert_same(out_cpp, out_ref)
    assert_same(out_cpp, scatter_oracle(mask, rows, src, torch.zeros(B, 3, dtype=torch.bfloat16)))


@needs_ext
def test_scatter_rows_out_of_range_row_raises_before_writing():
    mask = torch.tensor([True, True, False])
    rows = torch.tensor([0, 5, 9])  # row 5 is masked and past the 3-row output
    out = torch.zeros(3, 2)
    with pytest.raises(IndexError, match="rows holds 5"):
        ee.ops.scatter_rows(mask, rows, [torch.ones(3, 2)], [out], backend="cpp")
    assert (out == 0).all()
    with pytest.raises(IndexError, match="rows holds -1"):
        ee.ops.scatter_rows(mask, torch.tensor([-1, 0, 0]), [torch.ones(3, 2)], [out], backend="cpp")
    # an unmasked row may hold anything: it is never read
    ee.ops.scatter_rows(torch.tensor([True, False, False]), rows, [torch.ones(3, 2)], [out], backend="cpp")
    assert_same(out, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))


# ------------------------------------------------------------------------------- errors, dispatch
@needs_ext
def test_mismatched_batch_and_bad_mask_raise():
    keep = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="batch size 3"):
        ee.ops.compact(keep, [torch.zeros(3, 2), torch.zeros(4, 2)], backend="cpp")
    with pytest.raises(ValueError, match="batch size 3"):  # the C++ check, without the Python one
        torch.ops.eeruntime.compact(keep, [torch.zeros(3, 2), torch.zeros(4, 2)])
    with pytest.raises(ValueError, match="1-D bool"):
        torch.ops.eeruntime.compact(keep.to(torch.uint8), [torch.zeros(3)])
    with pytest.raises(ValueError, match="1-D bool"):
        ee.ops.compact(keep.to(torch.uint8), [torch.zeros(3)], backend="cpp")
    with pytest.raises(ValueError, match="1-D bool"):
        torch.ops.eeruntime.compact(keep.reshape(1, 3), [torch.zeros(1)])
    with pytest.raises(ValueError, match="batch size 3"):
        torch.ops.eeruntime.compact(keep, [torch.tensor(1.0)])
    idx, cnt = torch.zeros(3, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"must hold >= 3 rows"):
        torch.ops.eeruntime.compact_into(keep, [torch.zeros(3, 2)], [torch.zeros(2, 2)], idx, cnt)
    with pytest.raises(ValueError, match=r"must hold >= 3 rows"):
        torch.ops.eeruntime.compact_into(keep, [torch.zeros(3, 2)], [torch.zeros(3, 2, dtype=torch.float64)], idx, cnt)
    with pytest.raises(ValueError, match="index_out must be int64"):
        torch.ops.eeruntime.compact_into(keep, [torch.zeros(3)], [torch.zeros(3)], idx.int(), cnt)
    with pytest.raises(ValueError, match="count_out must be a one-element int64"):
        torch.ops.eeruntime.compact_into(keep, [torch.zeros(3)], [torch.zeros(3)], idx, idx[:2])
    with pytest.raises(ValueError, match="output buffers"):
        torch.ops.eeruntime.compact_into(keep, [torch.zeros(3)], [], idx, cnt)
    with pytest.raises(ValueError, match="rows must be int64"):
        torch.ops.eeruntime.scatter_rows(keep, idx.int(), [torch.zeros(3)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="batch size 3"):
        torch.ops.eeruntime.scatter_rows(keep, idx, [torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="trailing shape"):
        torch.ops.eeruntime.scatter_rows(keep, idx, [torch.zeros(3, 2)], [torch.zeros(3, 3)])


def test_forcing_cuda_without_it_says_how_to_build():
    keep = torch.tensor([True, False])
    with pytest.raises(BackendUnavailable) as err:
        ee.ops.compact(keep, [torch.zeros(2)], backend="cuda")
    if not _ext.available():
        reason = "is not built"
    elif not _ext.with_cuda():
        reason = "built without CUDA"
    else:
        reason = "tensors are on cpu"  # the CUDA ops are there: no build line for CPU tensors
    assert reason in str(err.value)
    assert ("EERUNTIME_BUILD_CUDA=1" in str(err.value)) == (reason != "tensors are on cpu")
    assert ee.ops.backends("compact")[:2] == ["cuda", "cpp"] and ee.ops.backends("compact")[-1] == "torch"


def test_unbuilt_extension_falls_back_and_forcing_it_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", None)
    keep = torch.tensor([True, False, True])
    t = torch.randn(3, 2)
    for backend in ("cpp", "cuda"):
        with pytest.raises(BackendUnavailable, match=r"_C is not built.*pip install --no-build-isolation -e \."):
            ee.ops.compact(keep, [t], backend=backend)
    index, (packed,) = ee.ops.compact(keep, [t])  # auto: the torch reference
    assert_same(packed, t[keep])
    assert ee.ops.explain("compact", keep, [t])["torch"] is None


@needs_ext
def test_inputs_requiring_grad_go_to_the_differentiable_reference():
    keep = torch.tensor([True, False, True])
    t = torch.randn(3, 2, requires_grad=True)
    assert "requires grad" in ee.ops.explain("compact", keep, [t])["cpp"]
    _, (packed,) = ee.ops.compact(keep, [t])
    packed.sum().backward()
    assert_same(t.grad, keep[:, None].float().expand(3, 2).contiguous())
    with torch.no_grad():
        assert ee.ops.explain("compact", keep, [t])["cpp"] is None


@needs_ext
@pytest.mark.parametrize("B", [0, 6])
def test_opcheck_all_ops(B):
    keep = torch.tensor([True, False, True, True, False, True])[:B]
    tensors = [torch.randn(B, 3), torch.arange(B), torch.randn(B, 2, 2).to(torch.bfloat16)]

    def buffers(rows):
        return [
            torch.zeros(rows, 3),
            torch.zeros(rows, dtype=torch.int64),
            torch.zeros(rows, 2, 2, dtype=torch.bfloat16),
        ]

    outs = buffers(B + 1)
    rows = torch.randperm(B)
    scatter_outs = buffers(B)
    cases = [
        (torch.ops.eeruntime.compact.default, (keep, tensors)),
        (
            torch.ops.eeruntime.compact_into.default,
            (keep, tensors, outs, torch.zeros(B + 1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)),
        ),
        (torch.ops.eeruntime.scatter_rows.default, (keep, rows, tensors, scatter_outs)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


# --------------------------------------------------------------------------------------- runtime
def small_model(dim=6, classes=5):
    torch.manual_seed(1)
    stages = [torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU()) for _ in range(3)]
    exits = [torch.nn.Linear(dim, classes) for _ in range(3)]
    return ee.MultiExitModel(stages, exits)


@needs_ext
def test_runtime_compiled_cpu_loop_matches_torch_backend():
    # auto runs the compiled CPU loop (exit_scatter, compact_ / compact: their call counts are
    # checked in test_exit_scatter.py); compact_backend="torch" runs the references.
    model = small_model()
    x = torch.randn(300, 6) * 3
    # thresholds in the middle of the entropy range so every exit takes some rows
    rt_auto = ee.EERuntime(model, thresholds=[1.3, 1.58], criterion="entropy")
    rt_torch = ee.EERuntime(model, thresholds=[1.3, 1.58], criterion="entropy", compact_backend="torch")
    a, b = rt_auto.infer(x), rt_torch.infer(x)
    counts = torch.bincount(a.exit_index, minlength=3)
    assert (counts > 0).all(), counts  # the packing really moved rows between stages
    assert_same(a.exit_index, b.exit_index)
    assert_same(a.logits, b.logits)
    assert_same(a.confidence, b.confidence)
    rt_cpp = ee.EERuntime(model, thresholds=[1.3, 1.58], criterion="entropy", compact_backend="cpp")
    assert_same(rt_cpp(x), b.logits)


# ------------------------------------------------------------------------------------------- GPU
def aligned_and_misaligned(B, row_bytes, offset, device="cuda"):
    """[B, row_bytes] uint8 rows starting `offset` bytes into a buffer: offset 0 takes the 16-byte
    vector path, odd offsets the byte path."""
    buf = torch.randint(0, 256, (B * row_bytes + offset,), dtype=torch.uint8, device=device)
    return buf[offset:].view(B, row_bytes)


@needs_cuda_ext
@pytest.mark.parametrize("B", [0, 1, 7, 1000, 70_000])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_compact_matches_boolean_indexing(B, pattern):
    keep = make_mask(B, pattern, "cuda")
    tensors = [make_tensor((B, *tr), dt, "cuda") for dt in DTYPES for tr in TRAILING]
    # (row bytes, byte offset): 16-, 16-, 8-, 2-, 1- and 4-byte vector paths
    layouts = [(64, 0), (4096, 0), (24, 8), (6, 2), (5, 1), (12, 4)]
    tensors += [aligned_and_misaligned(B, rb, off) for rb, off in layouts]
    tensors += [torch.randn(B, 8, 6, device="cuda").transpose(1, 2), torch.randn(2 * B, 5, device="cuda")[::2]]
    index, packed = ee.ops.compact(keep, tensors, backend="cuda")
    assert_same(index, keep.nonzero().squeeze(1))
    for p, t in zip(packed, tensors):
        assert_same(p, t[keep])


@needs_cuda_ext
def test_cuda_compact_into_no_sync_tail_untouched_and_scatter():
    B, cap = 4099, 4200
    keep = torch.rand(B, device="cuda") < 0.4
    tensors = [torch.randn(B, 1024, device="cuda"), torch.arange(B, device="cuda"), aligned_and_misaligned(B, 7, 3)]
    sentinels = [
        torch.randn(cap, 1024, device="cuda"),
        torch.full((cap,), -5, device="cuda"),
        torch.randint(0, 256, (cap, 7), dtype=torch.uint8, device="cuda"),
    ]
    outs = [s.clone() for s in sentinels]
    index_out = torch.full((cap,), -3, dtype=torch.int64, device="cuda")
    count_out = torch.zeros(1, dtype=torch.int64, device="cuda")
    rows = torch.randperm(B, device="cuda")
    mask = ~keep
    src = torch.randn(B, 100, device="cuda", dtype=torch.float16)
    out = torch.randn(B, 100, device="cuda", dtype=torch.float16)
    expected = scatter_oracle(mask, rows, src, out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ee.ops.compact_into(keep, tensors, outs, index_out, count_out, backend="cuda")
        ee.ops.scatter_rows(mask, rows, [src], [out], backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    n = int(count_out)
    assert n == int(keep.sum())
    for o, t, s in zip(outs, tensors, sentinels):
        assert_same(o[:n], t[keep])
        assert_same(o[n:], s[n:])
    assert_same(index_out[:n], keep.nonzero().squeeze(1))
    assert (index_out[n:] == -3).all()
    assert_same(out, expected)


@needs_cuda_ext
def test_cuda_compact_into_graph_capture_and_replay_with_new_mask():
    B = 3000
    keep = torch.zeros(B, dtype=torch.bool, device="cuda")
    x = torch.randn(B, 256, device="cuda")
    out = torch.zeros(B, 256, device="cuda")
    index_out = torch.zeros(B, dtype=torch.int64, device="cuda")
    count_out = torch.zeros(1, dtype=torch.int64, device="cuda")
    rows = torch.arange(B, device="cuda")
    logits = torch.randn(B, 10, device="cuda")
    final = torch.zeros(B, 10, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture (CUB's first launch, allocator)
        ee.ops.compact_into(keep, [x], [out], index_out, count_out, backend="cuda")
        ee.ops.scatter_rows(~keep, rows, [logits], [final], backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ee.ops.compact_into(keep, [x], [out], index_out, count_out, backend="cuda")
        ee.ops.scatter_rows(~keep, rows, [logits], [final], backend="cuda")
    for p in (0.1, 0.9, 0.0, 1.0):
        keep.copy_(torch.rand(B, device="cuda") < p)
        final.zero_()
        graph.replay()
        torch.cuda.synchronize()
        n = int(count_out)
        assert n == int(keep.sum())
        assert_same(out[:n], x[keep])
        assert_same(index_out[:n], keep.nonzero().squeeze(1))
        assert_same(final[~keep], logits[~keep])
        assert (final[keep] == 0).all()


@needs_cuda_ext
def test_cuda_scatter_rows_matches_index_copy_and_skips_out_of_range():
    B = 5000
    mask = torch.rand(B, device="cuda") < 0.5
    rows = torch.randperm(B + 10, device="cuda")[:B]
    srcs = [torch.randn(B, 37, device="cuda"), torch.arange(B, device="cuda"), aligned_and_misaligned(B, 64, 0)]
    outs = [
        torch.zeros(B + 10, 37, device="cuda", dtype=torch.float16),  # float32 sources converted
        torch.zeros(B + 10, dtype=torch.int64, device="cuda"),
        torch.zeros(B + 10, 64, dtype=torch.uint8, device="cuda"),
    ]
    expected = [scatter_oracle(mask, rows, s, o) for s, o in zip(srcs, outs)]
    ee.ops.scatter_rows(mask, rows, srcs, outs, backend="cuda")
    for o, e in zip(outs, expected):
        assert_same(o, e)
    # a row past the output is skipped on CUDA (checking it would need a host sync)
    bad = torch.tensor([0, B + 10, 2], device="cuda")
    o = torch.zeros(B + 10, device="cuda")
    ee.ops.scatter_rows(
        torch.ones(3, dtype=torch.bool, device="cuda"), bad, [torch.ones(3, device="cuda")], [o], backend="cuda"
    )
    assert int(o.sum()) == 2 and o[0] == 1 and o[2] == 1


# ------------------------------------------------------------- compact_into's two CUDA paths
# "fused" (one kernel: select, index_out, count_out, first tensor's copy) and "cub" (CUB select,
# then a gather per tensor); _compact_into_path forces one at any batch size (tests only).
COMPACT_INTO_PATHS = ["fused", "cub"]
# (row bytes, byte offset of row 0, extra bytes between rows): 4-byte, 16-byte, 8-byte and byte
# vector paths at odd row strides; 64 KB rows split into column slices. A layout runs only while
# its buffer stays under ROW_LAYOUT_BYTES, so the memcheck step (every B but 70000) stays short.
ROW_LAYOUTS = [(4, 0, 0), (12, 4, 4), (7, 3, 2), (4096, 0, 0), (4104, 8, 24), (65536, 0, 16)]
ROW_LAYOUT_BYTES = 32 << 20


def strided_rows(B, row_bytes, offset, pad, device="cuda"):
    """[B, row_bytes] uint8 rows, row r at byte offset + r * (row_bytes + pad) of one buffer."""
    stride = row_bytes + pad
    buf = torch.randint(0, 256, (offset + B * stride,), dtype=torch.uint8, device=device)
    return buf[offset:].as_strided((B, row_bytes), (stride, 1))


def keep_mask(B, fraction, device="cuda"):
    p = float(torch.rand(())) if fraction == "random" else fraction
    return torch.rand(B, device=device) < p


def check_compact_into_cuda(keep, tensors, path):
    """compact_into on `path` against boolean indexing and nonzero: the first n rows and indices,
    the count, and nothing written past n (outputs and index_out start as sentinels)."""
    cap = keep.shape[0] + 3
    sentinels = [make_tensor((cap, *t.shape[1:]), t.dtype, "cuda") for t in tensors]
    outs = [s.clone() for s in sentinels]
    index_out = torch.full((cap,), -9, dtype=torch.int64, device="cuda")
    count_out = torch.full((1,), -1, dtype=torch.int64, device="cuda")
    with _compact_into_path(path):
        ee.ops.compact_into(keep, tensors, outs, index_out, count_out, backend="cuda")
    n = int(keep.sum())
    assert int(count_out) == n
    assert_same(index_out[:n], keep.nonzero().squeeze(1))
    assert (index_out[n:] == -9).all()
    for o, t, s in zip(outs, tensors, sentinels):
        assert_same(o[:n], t[keep])
        assert_same(o[n:], s[n:])


@needs_cuda_ext
@pytest.mark.parametrize("path", COMPACT_INTO_PATHS)
@pytest.mark.parametrize("B", [1, 7, 255, 4096, 5000, 70_000])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0, "random"], ids=str)
def test_cuda_compact_into_paths_match_boolean_indexing(path, B, fraction):
    keep = keep_mask(B, fraction)
    ids = torch.arange(B, device="cuda")  # a second tensor: the fused path gathers it by index_out
    for row_bytes, offset, pad in ROW_LAYOUTS:
        if B * (row_bytes + pad) > ROW_LAYOUT_BYTES:
            continue
        # Each layout first once: the fused kernel copies the first tensor itself.
        check_compact_into_cuda(keep, [strided_rows(B, row_bytes, offset, pad), ids], path)


@needs_cuda_ext
@pytest.mark.parametrize("path", COMPACT_INTO_PATHS)
def test_cuda_compact_into_paths_unaligned_mask_and_no_tensors(path):
    # A mask starting 1 byte into its buffer takes the fused kernel's byte loads; its last word
    # is partial (5001 is not a multiple of 16).
    B = 5001
    big = torch.rand(B + 1, device="cuda") < 0.3
    keep = big[1:]
    check_compact_into_cuda(keep, [torch.randn(B, 3, device="cuda"), torch.randn(B, 256, device="cuda")], path)
    index_out = torch.full((B,), -1, dtype=torch.int64, device="cuda")
    count_out = torch.zeros(1, dtype=torch.int64, device="cuda")
    with _compact_into_path(path):
        ee.ops.compact_into(keep, [], [], index_out, count_out, backend="cuda")
        empty_rows = torch.empty(B, 0, device="cuda")
        ee.ops.compact_into(
            keep, [empty_rows], [torch.empty(B, 0, device="cuda")], index_out, count_out, backend="cuda"
        )
    n = int(keep.sum())
    assert int(count_out) == n
    assert_same(index_out[:n], keep.nonzero().squeeze(1))


@needs_cuda_ext
@pytest.mark.parametrize("path", COMPACT_INTO_PATHS)
def test_cuda_compact_into_paths_graph_capture_replays_new_masks(path):
    B, row = 4096, 1024  # 4 KB float32 rows, the bench's case
    keep = torch.zeros(B, dtype=torch.bool, device="cuda")
    tensors = [torch.randn(B, row, device="cuda"), torch.arange(B, device="cuda"), strided_rows(B, 7, 3, 2)]
    outs = [torch.zeros_like(tensors[0]), torch.zeros_like(tensors[1]), torch.zeros(B, 7, dtype=torch.uint8).cuda()]
    index_out = torch.zeros(B, dtype=torch.int64, device="cuda")
    count_out = torch.zeros(1, dtype=torch.int64, device="cuda")
    with _compact_into_path(path):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture, as torch's docs ask
            ee.ops.compact_into(keep, tensors, outs, index_out, count_out, backend="cuda")
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ee.ops.compact_into(keep, tensors, outs, index_out, count_out, backend="cuda")
    for p in (0.5, 0.0, 1.0, 0.1):  # replayed outside the block: the captured path stays
        keep.copy_(torch.rand(B, device="cuda") < p)
        graph.replay()
        torch.cuda.synchronize()
        n = int(count_out)
        assert n == int(keep.sum())
        assert_same(index_out[:n], keep.nonzero().squeeze(1))
        for o, t in zip(outs, tensors):
            assert_same(o[:n], t[keep])


def test_compact_into_path_override_is_scoped_and_checked():
    with pytest.raises(ValueError, match="unknown compact_into path 'fast'.*'cub'"):
        with _compact_into_path("fast"):
            pass
    if not _ext.available():
        with pytest.raises(RuntimeError, match="cannot choose compact_into's CUDA path"):
            with _compact_into_path("cub"):
                pass
        return
    setter = _ext._C._set_fused_compact_max_rows
    default = _ext._C.FUSED_COMPACT_MAX_ROWS
    assert default == 1 << 16
    assert setter(-1) == default  # nothing overrides it outside a block
    with pytest.raises(KeyError):
        with _compact_into_path("cub"):
            assert setter(0) == 0
            with _compact_into_path("fused"):
                assert setter(2**31 - 1) == 2**31 - 1
            assert setter(0) == 0  # the inner block restored "cub"
            raise KeyError("restored on error too")
    assert setter(-1) == default


# ----------------------------------------------------------------- the build hint, only when it helps
def _refusals():
    """Forced backends refusing inputs for reasons of their own (a dtype, a device, a layout):
    (call, what the reason says)."""
    keep = torch.tensor([True, False, True])
    logits = torch.randn(3, 5)
    scatter_args = (torch.zeros(1), "entropy", 0, torch.arange(3), torch.zeros(3, 5), torch.zeros(3))
    return [
        (lambda: ee.ops.compact(keep.to("meta"), [torch.zeros(3, device="meta")], backend="cpp"), "on meta"),
        (lambda: ee.ops.compact(keep, [torch.zeros(3, 2).to_sparse()], backend="cpp"), "layout"),
        (lambda: ee.ops.compact(keep, [torch.zeros(3)], backend="cuda"), "tensors are on cpu"),
        (lambda: ee.ops.compact_(keep, [torch.zeros(3, 4)[:, ::2]], backend="cpp"), "not dense within a row"),
        (lambda: ee.ops.exit_decision(logits.to(torch.float8_e4m3fn), 0.5, backend="cpp"), "float8_e4m3fn"),
        (lambda: ee.ops.exit_decision(logits.to("meta"), 0.5, backend="cpp"), "on meta"),
        (lambda: ee.ops.exit_decision(logits.double(), 0.5, backend="triton"), "float64"),
        (
            lambda: ee.ops.exit_scatter(
                logits.to(torch.float8_e5m2), *scatter_args, torch.zeros(3, dtype=torch.int64), backend="cpp"
            ),
            "float8_e5m2",
        ),
    ]


@needs_ext
@pytest.mark.parametrize("case", range(8))
def test_a_refused_input_gets_no_build_hint(case, monkeypatch):
    # Before: every refusal of a forced backend ended with "To get the C++ ops, build it with `pip
    # install ...`" (or the CUDA build line, or triton's install line), also when the extension was
    # built and loaded and what it refused was the inputs' dtype, device or layout.
    monkeypatch.setattr(_ext, "with_cuda", lambda: True)  # as on a CUDA build: the cuda face judges the inputs
    call, reason = _refusals()[case]
    with pytest.raises(BackendUnavailable, match=reason) as err:
        call()
    msg = str(err.value)
    for hint in ("pip install", "EERUNTIME_BUILD_CUDA", "TRITON_INTERPRET", "To get the"):
        assert hint not in msg, msg


@pytest.mark.parametrize("case", [0, 2, 4, 5, 7])
def test_a_missing_extension_gets_the_build_hint(case, monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", None)
    call, _ = _refusals()[case]
    with pytest.raises(
        BackendUnavailable, match=r"_C is not built.*To get the .*pip install --no-build-isolation -e \."
    ):
        call()


def test_an_extension_without_cuda_gets_the_cuda_build_hint(monkeypatch):
    if _ext.available():
        monkeypatch.setattr(_ext, "with_cuda", lambda: False)
    with pytest.raises(BackendUnavailable, match=r"(built without CUDA|not built).*EERUNTIME_BUILD_CUDA=1"):
        ee.ops.compact(torch.tensor([True]), [torch.zeros(1)], backend="cuda")

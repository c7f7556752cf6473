"""The public ops on memory that is shared in every way a caller can share it: views, overlapping
rows, several storages over one buffer (numpy, dlpack, frombuffer), an output on an input. Each
result is compared with boolean indexing / the op's reference run on separate copies; where no
answer is right (two outputs on one memory) the op must refuse before it writes anything."""

import numpy as np
import pytest
import torch

import eeruntime as ee
from eeruntime import _ext
from eeruntime.ops.aliasing import overlap, self_overlapping

BACKENDS = ["torch"] + (["cpp"] if _ext.available() else [])


def keep_mask(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, generator=g) < 0.5
    m[0], m[-1] = False, True  # the first row moves, the last is kept: every row is read after a write
    return m


# ------------------------------------------------------------------------------------ the checks
def test_overlap_sees_memory_not_storage_objects():
    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    t1, t2 = torch.from_numpy(a), torch.from_numpy(a)
    assert t1.untyped_storage().data_ptr() == t2.untyped_storage().data_ptr() and overlap(t1, t2)
    assert overlap(torch.from_numpy(a[3:]), torch.from_numpy(a[:4]))  # distinct storages, partly common bytes
    assert not overlap(torch.from_numpy(a[3:]), torch.from_numpy(a[:3]))
    buf = bytearray(64)
    assert overlap(torch.frombuffer(buf, dtype=torch.float32), torch.frombuffer(buf, dtype=torch.int16)[8:])
    x = torch.randn(5, 3)
    assert overlap(x, torch.from_dlpack(x)[2:]) and not overlap(x[:2], x[2:])
    assert not overlap(x, torch.empty(0)) and not overlap(x[:0], x)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: torch.randn(6, 4), False),
        (lambda: torch.randn(6, 4)[:, ::2], False),
        (lambda: torch.randn(4, 6).t(), False),
        (lambda: torch.randn(1, 4).expand(6, 4), True),
        (lambda: torch.randn(30).as_strided((6, 4), (1, 1)), True),
        (lambda: torch.randn(30).as_strided((6, 4), (3, 1)), True),  # rows 3 apart, 4 long
        (lambda: torch.randn(30).as_strided((6, 4), (4, 1)), False),
        (lambda: torch.randn(30).as_strided((4, 6), (1, 4)), False),  # interleaved but disjoint
        (lambda: torch.randn(30).as_strided((3, 2, 2), (6, 1, 1)), True),  # inner dims collide
        (lambda: torch.randn(30).as_strided((3, 2, 2), (6, 1, 2)), False),  # inner dims interleave
    ],
)
def test_self_overlap(make, expected):
    assert self_overlapping(make()) is expected


# ------------------------------------------------------------------------------------ compact_
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        lambda B: [torch.randn(B * 4 + 3).as_strided((B, 4), (1, 1))],  # each row overlaps the next
        lambda B: [torch.randn(B * 4).as_strided((B, 4), (2, 1))],  # half-overlapping rows
        lambda B: [torch.randn(1, 5).expand(B, 5)],  # every row is one row
        lambda B: (lambda a: [torch.from_numpy(a), torch.from_numpy(a)])(np.random.rand(B, 3)),
        lambda B: (lambda a: [torch.from_numpy(a[:, :2]), torch.from_numpy(a[:, 1:])])(np.random.rand(B, 3)),
        lambda B: (
            lambda b: [
                torch.frombuffer(b, dtype=torch.float32).view(B, 4),
                torch.frombuffer(b, dtype=torch.int32).view(B, 4),
            ]
        )(bytearray(B * 16)),
        lambda B: (lambda x: [x, torch.from_dlpack(x)])(torch.randn(B, 2)),
    ],
    ids=["as_strided-1", "as_strided-2", "expand", "numpy-twice", "numpy-columns", "frombuffer-twice", "dlpack"],
)
def test_compact_inplace_refuses_shared_memory_and_writes_nothing(backend, make):
    B = 9
    tensors = make(B)
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match="share memory"):
        ee.ops.compact_(keep_mask(B), tensors, backend=backend)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_inplace_on_disjoint_parts_of_one_buffer(backend):
    B = 11
    buf = torch.randn(3 * B, 4)
    a, b = buf[:B], buf[B + 1 : 2 * B + 1]  # one storage, disjoint bytes: each is packed on its own
    keep = keep_mask(B, 1)
    want = [a[keep].clone(), b[keep].clone()]
    rest = buf[2 * B + 1 :].clone()
    n = ee.ops.compact_(keep, [a, b], backend=backend)
    assert n == int(keep.sum()) and torch.equal(a[:n], want[0]) and torch.equal(b[:n], want[1])
    assert torch.equal(buf[2 * B + 1 :], rest)  # memory outside the tensors is untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_inplace_with_its_mask_on_the_packed_memory(backend):
    B = 13
    flags = keep_mask(B, 2)
    keep = flags  # the mask is itself one of the tensors packed
    data = torch.randint(0, 2, (B, 3), dtype=torch.uint8)
    data[:, 0] = flags.to(torch.uint8)
    want_flags, want_data = flags[flags.clone()].clone(), data[flags.clone()].clone()
    n = ee.ops.compact_(keep, [flags, data], backend=backend)
    assert torch.equal(flags[:n], want_flags) and torch.equal(data[:n], want_data)
    # a mask that is a bool view of a column of the packed tensor
    data = torch.randint(0, 2, (B, 2), dtype=torch.uint8)
    data[0, 0], data[-1, 0] = 0, 1
    keep = data[:, 0].view(torch.bool)
    want = data[keep.clone()].clone()
    n = ee.ops.compact_(keep, [data], backend=backend)
    assert torch.equal(data[:n], want)


# ------------------------------------------------------------------------------------ compact_into / scatter_rows
@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_into_its_own_input(backend):
    B = 17
    t = torch.randn(B, 3)
    keep = keep_mask(B, 3)
    want_rows, want_index = t[keep].clone(), keep.nonzero().squeeze(1)
    idx, cnt = torch.empty(B, dtype=torch.int64), torch.empty(1, dtype=torch.int64)
    ee.ops.compact_into(keep, [t], [t], idx, cnt, backend=backend)
    n = int(cnt)
    assert torch.equal(t[:n], want_rows) and torch.equal(idx[:n], want_index)
    # the count written on the index buffer's memory: two outputs on one memory, refused
    with pytest.raises(ValueError, match="index_out and outs\\[0\\] share memory|count_out and index_out share memory"):
        ee.ops.compact_into(keep, [torch.randn(B, 3)], [torch.empty(B, 3)], idx, idx[:1], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_rows_source_on_its_output(backend):
    B = 12
    out = torch.randn(B, 5)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(4))
    mask = keep_mask(B, 4)
    src = out  # rows move inside one tensor: out[perm[i]] = out_before[i]
    want = out.clone()
    want.index_copy_(0, perm[mask], out.clone()[mask])
    ee.ops.scatter_rows(mask, perm, [src], [out], backend=backend)
    assert torch.equal(out, want)
    # the row ids live in the output they index
    out = torch.zeros(B, 2, dtype=torch.int64)
    out[:, 0] = perm
    rows = out[:, 0]
    src = torch.arange(2 * B).view(B, 2)
    want = out.clone()
    want.index_copy_(0, perm[mask], src[mask])
    ee.ops.scatter_rows(mask, rows, [src], [out], backend=backend)
    assert torch.equal(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_rows_refuses_outputs_on_one_memory(backend):
    B = 6
    mask, rows = torch.ones(B, dtype=torch.bool), torch.arange(B)
    out = torch.zeros(B, 4)
    with pytest.raises(ValueError, match="outs\\[1\\] and outs\\[0\\] share memory"):
        ee.ops.scatter_rows(
            mask, rows, [torch.randn(B, 2), torch.randn(B, 2)], [out[:, :2], out[:, 1:3]], backend=backend
        )
    with pytest.raises(ValueError, match="outs\\[0\\] has elements that share memory"):
        ee.ops.scatter_rows(mask, rows, [torch.randn(B, 4)], [torch.zeros(1, 4).expand(B, 4)], backend=backend)
    assert not out.any()


# ------------------------------------------------------------------------------------ exit_scatter
def exit_scatter_apart(logits, thr, criterion, k, rows, out, conf, exit_index, final):
    """The reference on separate copies of everything: what the aliased call must equal."""
    o, c, e = out.clone(), conf.clone(), exit_index.clone()
    keep, n = ee.ops.exit_scatter_ref(logits.clone(), thr.clone(), criterion, k, final, rows.clone(), o, c, e)
    return keep, int(n), o, c, e


def check_exit_scatter(backend, logits, thr, rows, out, conf, exit_index, final=False, criterion="max_prob"):
    want = exit_scatter_apart(logits, thr, criterion, 0, rows, out, conf, exit_index, final)
    keep, n = ee.ops.exit_scatter(logits, thr, criterion, 0, rows, out, conf, exit_index, final=final, backend=backend)
    assert 0 < n < logits.shape[0] or final  # some rows leave, some stay: the aliasing matters
    assert torch.equal(keep, want[0]) and n == want[1]
    assert torch.equal(out, want[2]) and torch.equal(conf, want[3]) and torch.equal(exit_index, want[4])


def peaked_logits(B, C, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * torch.linspace(0.2, 6, B)[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_scatter_out_is_the_logits(backend):
    B, C = 40, 6
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(5))
    logits = peaked_logits(B, C, 5)
    check_exit_scatter(backend, logits, torch.tensor([0.6]), perm, logits, torch.zeros(B), torch.full((B,), -1))
    # out is the logits shifted by one row (partly the same memory)
    buf = torch.cat([peaked_logits(B, C, 6), torch.zeros(1, C)])
    check_exit_scatter(backend, buf[:B], torch.tensor([0.6]), perm, buf[1:], torch.zeros(B + 0), torch.full((B,), -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_scatter_inputs_inside_other_outputs(backend):
    B, C = 32, 5
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(7))
    exit_index = perm.clone()
    rows = exit_index  # the row ids are the exit index being written
    check_exit_scatter(
        backend, peaked_logits(B, C, 7), torch.tensor([0.5]), rows, torch.zeros(B, C), torch.zeros(B), exit_index
    )
    conf = torch.full((B,), 0.5)
    thr = conf[3:4]  # the threshold is read from the confidence being written
    check_exit_scatter(
        backend, peaked_logits(B, C, 8), thr, perm, torch.zeros(B, C), conf, torch.zeros(B, dtype=torch.int64)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_scatter_refuses_outputs_on_one_memory(backend):
    B, C = 8, 3
    logits, rows = peaked_logits(B, C, 9), torch.arange(B)
    words = torch.zeros(B, dtype=torch.int64)
    out = torch.zeros(B, C)
    cases = [
        (out, words.view(torch.float32)[:B], words, "exit_index and confidence share memory"),
        (out, out[:, 0], torch.zeros(B, dtype=torch.int64), "confidence and out share memory"),
        (out, torch.zeros(1).expand(B), torch.zeros(B, dtype=torch.int64), "confidence has elements that share memory"),
        (torch.zeros(1, C).expand(B, C), torch.zeros(B), torch.zeros(B, dtype=torch.int64), "out has elements"),
    ]
    for o, c, e, msg in cases:
        before = [o.clone(), c.clone(), e.clone()]
        with pytest.raises(ValueError, match=msg):
            ee.ops.exit_scatter(logits, torch.tensor([0.0]), "max_prob", 0, rows, o, c, e, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip((o, c, e), before))

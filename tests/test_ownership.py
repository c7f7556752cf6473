"""The runtime never writes memory that anyone but itself can reach.

Stage 0 of each model below hands the runtime an output whose memory someone else still reaches,
in every way a module can (a kept tuple, a hook, a kept storage object, numpy, dlpack, a bytearray,
a registered buffer, a weak reference, shared memory, two outputs on one memory). Thresholds make
some rows leave at exit 0, so the survivors are packed before stage 1: the memory the stage kept
must still hold what the stage wrote, and the result must equal the float64 per-sample loop.
A plain stage's fresh output is still packed where it lies (the fast path is not lost)."""

import weakref

import numpy as np
import pytest
import torch
from reference import per_sample_loop
from torch import nn

import eeruntime as ee
from eeruntime.ownership import sole_owner

D, C, B = 6, 4, 64


class Kept(nn.Module):
    """Stage 0: tanh(lin(x)) [and a mask], returned in a way that leaves it reachable; ``kept()``
    reads the memory it can still reach, ``snap`` is what that memory held when it returned."""

    def __init__(self, how, tuple_state=False):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.how, self.tuple_state = how, tuple_state
        self.register_buffer("buf", torch.zeros(B, D))
        self.keep = None

    def forward(self, x):
        h = torch.tanh(self.lin(x) * 2)
        n = h.shape[0]
        how = self.how
        if how == "attribute-tuple":  # self.last = (h, m); return self.last
            self.keep = (h, torch.ones(n))
            out = self.keep
        elif how == "untyped_storage":
            self.keep = h.untyped_storage()
            out = h
        elif how == "numpy":
            self.keep = np.ascontiguousarray(h.numpy())
            out = torch.from_numpy(self.keep)
        elif how == "dlpack-of-output":
            self.keep = h
            out = torch.from_dlpack(h)
        elif how == "dlpack-of-buffer":
            self.buf[:n].copy_(h)
            out = torch.from_dlpack(self.buf[:n])
        elif how == "frombuffer":
            self.keep = bytearray(h.numpy().tobytes())
            out = torch.frombuffer(self.keep, dtype=torch.float32).view(n, D)
        elif how == "weakref":
            self.keep = weakref.ref(h)  # nothing strong: only the weak reference
            out = h
        elif how == "shared-memory":
            out = h.share_memory_()
        elif how == "list":
            self.keep = [h, torch.ones(n)]
            out = self.keep
        elif how in ("hook", "plain"):
            out = h
        else:
            raise ValueError(how)
        if self.tuple_state and not isinstance(out, (tuple, list)):
            out = (out, torch.ones(n))
        first = out[0] if isinstance(out, (tuple, list)) else out
        self.snap, self.out_ptr = first.clone(), first.data_ptr()
        return out

    def kept(self):
        how = self.how
        if how in ("attribute-tuple", "list"):
            return self.keep[0]
        if how == "untyped_storage":
            return torch.tensor([], dtype=torch.float32).set_(self.keep).view(-1, D)[: self.snap.shape[0]]
        if how == "numpy":
            return torch.from_numpy(self.keep)
        if how == "dlpack-of-output":
            return self.keep
        if how == "dlpack-of-buffer":
            return self.buf[: self.snap.shape[0]]
        if how == "frombuffer":
            return torch.frombuffer(self.keep, dtype=torch.float32).view(-1, D)
        if how == "weakref":
            return self.keep()
        raise ValueError(how)

    def untouched(self) -> bool:
        kept = self.kept()
        # A weakly referenced output that the runtime dropped (it packed a copy) is untouched.
        return (kept is None and self.how == "weakref") or torch.equal(kept, self.snap)


class Next(nn.Module):
    """Stage k > 0; records the address of the memory it reads (to see whether the runtime
    packed its input in place)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.seen_ptr = None
        self.probe, self.probed = None, []  # probe(): is what stage 0 kept still as it wrote it?

    def forward(self, h, *rest):
        self.seen_ptr = h.data_ptr()
        if self.probe is not None:
            self.probed.append(self.probe())
        out = torch.tanh(self.lin(h) * 2)
        return (out, *rest) if rest else out


class Exit(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, h, *rest):
        return self.lin(h) * 3


class TwoViews(nn.Module):
    """Stage 0 returning two tensors over one memory (two from_numpy of one array)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        a = np.ascontiguousarray(torch.tanh(self.lin(x) * 2).numpy())
        return torch.from_numpy(a), torch.from_numpy(a)


class TwoIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h, g):
        return torch.tanh(self.lin(h) + g), g


def model_with(stage0, tuple_state=False, seed=0):
    torch.manual_seed(seed)
    two = isinstance(stage0, TwoViews)
    stages = [stage0, TwoIn() if two else Next(), TwoIn() if two else Next()]
    return ee.MultiExitModel(stages, [Exit(), Exit(), Exit()]).eval()


def thresholds_with_some_exits(model, x):
    """max_prob thresholds halfway between the two middle scores of exits 0 and 1 (computed on
    the whole batch): about half the rows leave at exit 0, none within noise of a threshold."""
    with torch.no_grad():
        s = x
        thr = []
        for stage, ex in zip(model.stages[:2], model.exits[:2]):
            s = stage(*s) if isinstance(s, tuple) else stage(s)
            s = tuple(s) if isinstance(s, list) else s
            logits = ex(*s) if isinstance(s, tuple) else ex(s)
            scores = torch.softmax(logits.double(), 1).max(1).values.sort().values
            mid = len(scores) // 2
            thr.append(float(scores[mid - 1] + scores[mid]) / 2)
    return thr


def run_and_check(model, x):
    """Runs the runtime, then the oracle; returns (address stage 1 read, address stage 0 wrote)
    as they were during the runtime's call."""
    thr = thresholds_with_some_exits(model, x)
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob")
    res = rt.infer(x)
    addresses = getattr(model.stages[1], "seen_ptr", None), getattr(model.stages[0], "out_ptr", None)
    ref_logits, ref_exit, _ = per_sample_loop(model, x, thr, "max_prob")
    n0 = int((ref_exit == 0).sum())
    assert 0 < n0 < B, "the test needs rows that leave at exit 0 and rows that go on"
    assert torch.equal(res.exit_index, ref_exit)
    torch.testing.assert_close(res.logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
    return addresses


KEPT = [
    "attribute-tuple",
    "untyped_storage",
    "numpy",
    "dlpack-of-output",
    "dlpack-of-buffer",
    "frombuffer",
    "weakref",
    "list",
]


@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("how", KEPT)
def test_memory_a_stage_keeps_is_never_written(how, tuple_state):
    stage0 = Kept(how, tuple_state)
    model = model_with(stage0, tuple_state)
    model.stages[1].probe = stage0.untouched  # while the call runs (a weak reference dies after it)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 2
    run_and_check(model, x)
    assert model.stages[1].probed and all(model.stages[1].probed), f"{how}: the runtime wrote memory the stage kept"
    assert stage0.untouched(), f"{how}: the runtime wrote memory the stage kept"


@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
def test_output_kept_by_a_forward_hook_is_never_written(tuple_state):
    stage0 = Kept("hook", tuple_state)
    seen = []
    stage0.register_forward_hook(lambda mod, inp, out: seen.append(out))
    model = model_with(stage0, tuple_state)
    run_and_check(model, torch.randn(B, D, generator=torch.Generator().manual_seed(2)) * 2)
    kept = seen[-1][0] if tuple_state else seen[-1]
    assert torch.equal(kept, stage0.snap)


def test_output_in_shared_memory_is_never_written():
    model = model_with(Kept("shared-memory"))
    read, wrote = run_and_check(model, torch.randn(B, D, generator=torch.Generator().manual_seed(3)) * 2)
    assert read != wrote  # other processes may map it: copied, not packed in place


def test_two_outputs_on_one_memory_are_packed_once_each():
    model = model_with(TwoViews())
    run_and_check(model, torch.randn(B, D, generator=torch.Generator().manual_seed(4)) * 2)


@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
def test_a_fresh_output_is_still_packed_in_place(tuple_state):
    """The sound proof must not cost the fast path: a plain stage's output is packed where it lies."""
    pytest.importorskip("eeruntime._C")
    model = model_with(Kept("plain", tuple_state), tuple_state)
    read, wrote = run_and_check(model, torch.randn(B, D, generator=torch.Generator().manual_seed(5)) * 2)
    assert read == wrote


# ------------------------------------------------------------------------------ the proof itself
def fresh(n=4):
    return torch.tanh(torch.randn(n, 3))


def test_sole_owner_accepts_only_memory_nobody_else_reaches():
    assert sole_owner((fresh(),)) and sole_owner((fresh(), fresh()))
    with torch.inference_mode():
        assert sole_owner((fresh(),))
    a = np.random.rand(4, 3)
    base = fresh(8)
    keep = []
    cases = {
        "numpy": lambda: (torch.from_numpy(a),),
        "frombuffer": lambda: (torch.frombuffer(bytearray(48), dtype=torch.float32).view(4, 3),),
        "dlpack": lambda: (lambda t: (keep.append(t), (torch.from_dlpack(t),))[1])(fresh()),
        "dlpack-source": lambda: (lambda t: (keep.append(torch.from_dlpack(t)), (t,))[1])(fresh()),
        "view": lambda: (base[:4],),
        "storage-kept": lambda: (lambda t: (keep.append(t.untyped_storage()), (t,))[1])(fresh()),
        "weakref": lambda: (lambda t: (keep.append(weakref.ref(t)), (t,))[1])(fresh()),
        "parameter": lambda: (nn.Parameter(fresh()),),
        "shared": lambda: (fresh().share_memory_(),),
        "same-twice": lambda: (lambda t: (t, t))(fresh()),
        "second-tensor-on-storage": lambda: (lambda t: (t, torch.empty(0).set_(t.untyped_storage(), 0, (4,), (1,))))(
            fresh()
        ),
        "from_file": lambda: (torch.from_file(__file__, shared=False, size=12, dtype=torch.uint8).view(4, 3),),
    }
    for name, make in cases.items():
        parts = make()
        assert not sole_owner(parts), name
    t = fresh()
    parts = (t,)
    assert sole_owner(parts, named=1)  # the caller names the tensor once besides the tuple
    assert not sole_owner(parts, named=0)
    held = parts  # a second name for the tuple, as a hook or a stage attribute would hold it
    assert not sole_owner(parts, named=1) and sole_owner(parts, named=1, tuple_names=2)
    del held

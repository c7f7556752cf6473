"""The stage step (``rt.run_stage``), the public seam a scheduler or a remote tier calls: run
stage k on given rows, get back who leaves and the packed survivors. Checked against the model
run directly with boolean indexing, the per-sample loop and ``rt.infer``; plus the threshold
snapshots (one per call, so a concurrent ``set_thresholds`` never splits a call)."""

import threading

import pytest
import torch
from models import TupleExit, TupleStage, mlp_model
from reference import per_sample_loop, score64

import eeruntime as ee
from eeruntime.runtime import cat_rows, take_rows
from eeruntime.thresholds import ThresholdSnapshot

NAMED = ["entropy", "max_prob", "margin", "norm_entropy"]
NEAR = 1e-4


def quantile_thresholds(model, x, criterion, q=0.5):
    with torch.no_grad():
        outs = model(x)
    qq = q if criterion == "entropy" else 1 - q
    return [float(score64(o, criterion).quantile(qq)) for o in outs[:-1]]


def walk(rt, x, rows=None, thresholds=None):
    """Drive a whole batch through run_stage, one stage after another; returns the output in
    row-id order as (logits, exit_index, confidence) plus the per-step results."""
    B = (x[0] if isinstance(x, tuple) else x).shape[0]
    rows = torch.arange(B) if rows is None else rows
    state, carry, steps = x, None, []
    for k in range(rt.num_exits):
        res = rt.run_stage(k, state, rows, carry, thresholds=thresholds)
        steps.append(res)
        if res.state is None:
            break
        state, rows, carry = res.state, res.rows, res.carry
    return assemble(steps, B), steps


def assemble(steps, B):
    C = steps[0].logits.shape[1]
    logits = torch.full((B, C), float("nan"), dtype=steps[0].logits.dtype)
    exit_index = torch.full((B,), -1, dtype=torch.int64)
    confidence = torch.full((B,), float("nan"))
    for res in steps:
        logits[res.exit_rows] = res.logits
        exit_index[res.exit_rows] = res.k
        confidence[res.exit_rows] = res.confidence
    return logits, exit_index, confidence


def assert_same_as_infer(rt, x, got):
    ref = rt.infer(x)
    logits, exit_index, confidence = got
    assert torch.equal(exit_index, ref.exit_index)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(confidence, ref.confidence, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("criterion", NAMED)
@pytest.mark.parametrize("final", ["last", "average"])
def test_walk_equals_infer_and_per_sample_loop(criterion, final):
    model = mlp_model(K=4)
    x = torch.randn(50, 6)
    thr = quantile_thresholds(model, x, criterion, q=0.35)
    rt = ee.EERuntime(model, thresholds=thr, criterion=criterion, final=final)
    got, steps = walk(rt, x)
    assert_same_as_infer(rt, x, got)
    ref_logits, ref_exit, near = per_sample_loop(model, x, thr, criterion, final)
    clear = near > NEAR
    assert torch.equal(got[1][clear], ref_exit[clear])
    assert len({int(s.k) for s in steps if s.exit_rows.numel()}) > 1  # rows really left at several exits


def test_one_step_against_the_model_run_directly():
    """Stage k on given rows with arbitrary ids: the leavers are the rows whose float64 score
    passes, the survivors' state is the stage output of the rest (boolean indexing), in order."""
    model = mlp_model(K=3)
    x = torch.randn(40, 6)
    thr = quantile_thresholds(model, x, "max_prob", q=0.5)
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob")
    ids = torch.randperm(1000)[:40]
    x_before, ids_before = x.clone(), ids.clone()
    res = rt.run_stage(0, x, ids)
    assert torch.equal(x, x_before) and torch.equal(ids, ids_before)  # inputs never written
    with torch.no_grad():
        h = model.stages[0](x)
        logits = model.exits[0](h)
    score = score64(logits, "max_prob")
    leave = score >= thr[0]
    clear = (score - thr[0]).abs() > NEAR
    assert clear.all()  # no near-tie in this draw, so the sets below are exact
    assert isinstance(res, ee.StageResult) and res.k == 0
    assert torch.equal(res.exit_rows, ids[leave]) and torch.equal(res.rows, ids[~leave])
    assert res.exit_rows.dtype == res.rows.dtype == torch.int64 and res.confidence.dtype == torch.float32
    torch.testing.assert_close(res.logits, logits[leave])
    torch.testing.assert_close(res.confidence.double(), score[leave], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.state, h[~leave])
    assert res.carry == ()
    # The next step on the survivors goes on from there; the last stage lets every row go.
    nxt = rt.run_stage(1, res.state, res.rows)
    fin = rt.run_stage(2, nxt.state, nxt.rows, nxt.carry)
    assert fin.state is None and fin.rows.numel() == 0 and fin.carry == ()
    assert torch.equal(
        torch.sort(torch.cat([res.exit_rows, nxt.exit_rows, fin.exit_rows])).values, torch.sort(ids).values
    )


def test_tuple_state_is_packed_member_wise():
    d, C = 8, 4
    model = ee.MultiExitModel([TupleStage(d) for _ in range(3)], [TupleExit(d, C) for _ in range(3)]).eval()
    x = (torch.randn(33, 5, d), (torch.rand(33, 5) > 0.3).float())
    with torch.no_grad():
        outs = model(x)
    thr = [float(score64(outs[k], "entropy").median()) for k in range(2)]
    rt = ee.EERuntime(model, thresholds=thr)
    got, steps = walk(rt, x)
    assert_same_as_infer(rt, x, got)
    first = steps[0]
    assert isinstance(first.state, tuple) and len(first.state) == 2
    with torch.no_grad():
        h, m = model.stages[0](*x)
    kept = torch.ones(33, dtype=torch.bool)
    kept[first.exit_rows] = False
    torch.testing.assert_close(first.state[0], h[kept])
    assert torch.equal(first.state[1], m[kept])


class AgreeWithHistory:
    """A per-exit scorer with history: 1 when this exit's argmax agrees with every earlier exit."""

    per_exit = True
    uses_history = True

    def __call__(self, logits, state, k, history):
        agree = torch.ones(logits.shape[0])
        for h in history:
            agree = agree * (h.argmax(1) == logits.argmax(1)).float()
        return agree if k > 0 else torch.zeros(logits.shape[0])


@pytest.mark.parametrize("final", ["last", "average"])
def test_history_criterion_and_average_travel_in_the_carry(final):
    model = mlp_model(K=4)
    x = torch.randn(64, 6)
    rt = ee.EERuntime(model, thresholds=0.5, criterion=AgreeWithHistory(), final=final)
    got, steps = walk(rt, x)
    assert_same_as_infer(rt, x, got)
    # Stage k's survivors carry the running sum (average) and the k + 1 exits' logits so far.
    for res in steps[:-1]:
        want = int(final == "average") + res.k + 1
        assert len(res.carry) == want and all(c.shape[0] == res.rows.shape[0] for c in res.carry)
    with pytest.raises(ValueError, match="carry for stage 1"):
        rt.run_stage(1, steps[0].state, steps[0].rows, carry=None)


@pytest.mark.parametrize("final", ["last", "average"])
def test_survivors_of_two_batches_concatenated_then_continued(final):
    """A scheduler's move: run stage 0 on two requests, join their survivors with cat_rows and
    run the rest as one batch; each request's rows come out as rt.infer gives them."""
    model = mlp_model(K=3)
    a, b = torch.randn(20, 6), torch.randn(30, 6)
    thr = quantile_thresholds(model, torch.cat([a, b]), "entropy", q=0.4)
    rt = ee.EERuntime(
        model, thresholds=thr, criterion=AgreeWithHistory() if final == "average" else "entropy", final=final
    )
    if final == "average":
        rt.set_thresholds(0.5)
    ra = rt.run_stage(0, a, torch.arange(20))
    rb = rt.run_stage(0, b, torch.arange(100, 130))
    steps = [ra, rb]
    state = cat_rows([ra.state, rb.state])
    rows = cat_rows([ra.rows, rb.rows])
    carry = cat_rows([ra.carry, rb.carry])
    for k in (1, 2):
        res = rt.run_stage(k, state, rows, carry)
        steps.append(res)
        if res.state is None:
            break
        state, rows, carry = res.state, res.rows, res.carry
    for x, base in ((a, 0), (b, 100)):
        mine = []
        for s in steps:
            sel = ((s.exit_rows >= base) & (s.exit_rows < base + x.shape[0])).nonzero().squeeze(1)
            mine.append(
                ee.StageResult(s.k, s.exit_rows[sel] - base, s.logits[sel], s.confidence[sel], s.rows, None, ())
            )
        assert_same_as_infer(rt, x, assemble(mine, x.shape[0]))


@pytest.mark.parametrize("final", ["last", "average"])
def test_unchecked_step_equals_the_checked_step(final):
    # check=False (the scheduler's path past stage 0) skips validating what earlier steps
    # returned; the step itself is the same, row for row, bit for bit
    torch.manual_seed(11)
    model = mlp_model(K=4)
    x = torch.randn(40, 6)
    rt = ee.EERuntime(model, thresholds=quantile_thresholds(model, x, "entropy"), criterion="entropy", final=final)
    want, _ = walk(rt, x)
    rows, state, carry, steps = torch.arange(40), x, None, []
    for k in range(rt.num_exits):
        res = rt.run_stage(k, state, rows, carry, check=k == 0)
        steps.append(res)
        if res.state is None:
            break
        state, rows, carry = res.state, res.rows, res.carry
    for a, b in zip(assemble(steps, 40), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_a_step_checks_the_eval_mode_of_the_modules_it_runs():
    # a stage step checks the modules it runs (stage k and exit k), not the whole model's; a
    # module found training is switched to eval, with a warning naming it, before it runs
    torch.manual_seed(12)
    model = mlp_model(K=3)
    x = torch.randn(16, 6)
    rt = ee.EERuntime(model, thresholds=[-1.0, -1.0], criterion="entropy")  # nobody leaves early
    model.stages[2].train()
    s0 = rt.run_stage(0, x, torch.arange(16))
    assert model.stages[2].training  # stage 0's step did not look at stage 2
    s1 = rt.run_stage(1, s0.state, s0.rows, s0.carry, check=False)
    with pytest.warns(UserWarning, match=r"stages\.2"):
        s2 = rt.run_stage(2, s1.state, s1.rows, s1.carry, check=False)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(s2.logits, rt.infer(x).logits, rtol=0, atol=0)


def test_cat_rows_and_take_rows():
    t1, t2 = torch.randn(3, 2), torch.randn(4, 2)
    assert torch.equal(cat_rows([t1, t2]), torch.cat([t1, t2]))
    m1, m2 = torch.ones(3, 5), torch.zeros(4, 5)
    both = cat_rows([(t1, m1), (t2, m2)])
    assert (
        isinstance(both, tuple)
        and torch.equal(both[0], torch.cat([t1, t2]))
        and torch.equal(both[1], torch.cat([m1, m2]))
    )
    assert cat_rows([(), ()]) == ()
    idx = torch.tensor([4, 0, 2])
    assert torch.equal(take_rows(both, idx)[1], torch.cat([m1, m2])[idx])
    assert torch.equal(take_rows(t2, torch.tensor([1])), t2[1:2])
    with pytest.raises(ValueError):
        cat_rows([])
    with pytest.raises(TypeError):
        cat_rows([t1, (t2,)])


def test_stats_untouched_unless_recorded():
    model = mlp_model(K=3)
    rt = ee.EERuntime(model, thresholds=[0.5, 0.5], criterion="max_prob")
    x = torch.randn(16, 6)
    res = rt.run_stage(0, x, torch.arange(16))
    assert rt.stats.samples == 0 and rt.stats.calls == 0
    res = rt.run_stage(0, x, torch.arange(16), record=True)
    s = rt.stats
    assert s.exit_counts[0] == res.exit_rows.numel() and s.samples == res.exit_rows.numel()
    rt.record_exits([1, 2, 3], 6)
    assert rt.stats.exit_counts == [res.exit_rows.numel() + 1, 2, 3] and rt.stats.calls == 1
    with pytest.raises(ValueError, match="3 counts"):
        rt.record_exits([1, 2])


def test_bad_calls_say_what_is_accepted():
    model = mlp_model(K=3)
    rt = ee.EERuntime(model, thresholds=[0.5, 0.5], criterion="max_prob")
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="stage index"):
        rt.run_stage(3, x, torch.arange(4))
    with pytest.raises(ValueError, match="int64"):
        rt.run_stage(0, x, torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        rt.run_stage(0, x, torch.arange(5))
    with pytest.raises(TypeError, match="thresholds_snapshot"):
        rt.run_stage(0, x, torch.arange(4), thresholds=[0.5, 0.5])


# ------------------------------------------------------------------------------ snapshots
def test_snapshot_is_immutable_and_an_old_one_still_decides():
    model = mlp_model(K=3)
    x = torch.randn(40, 6)
    rt = ee.EERuntime(model, thresholds=[2.0, 2.0], criterion="max_prob")  # nobody leaves early
    old = rt.thresholds_snapshot()
    rt.set_thresholds(-1.0)  # everybody leaves at exit 0
    assert old.values == (2.0, 2.0) and rt.thresholds_snapshot().values == (-1.0, -1.0)
    with pytest.raises(AttributeError):
        old._values = (0.0, 0.0)
    assert rt.run_stage(0, x, torch.arange(40), thresholds=old).exit_rows.numel() == 0
    assert rt.run_stage(0, x, torch.arange(40)).exit_rows.numel() == 40


def _race(call, rt, x, sets, refs):
    """8 threads call ``call(x)`` while one thread flips the thresholds between ``sets``; every
    result must equal the result under one of the sets as a whole."""
    stop = threading.Event()
    errors, seen = [], set()

    def flipper():
        i = 0
        while not stop.is_set():
            rt.set_thresholds(sets[i % 2])
            i += 1

    def worker(_):
        try:
            for _ in range(25):
                res = call(x)
                match = [
                    j
                    for j, r in enumerate(refs)
                    if torch.equal(res.exit_index, r.exit_index)
                    and torch.allclose(res.logits, r.logits, rtol=1e-6, atol=1e-6)
                ]
                if not match:
                    errors.append(res.exit_index.tolist())
                seen.update(match)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    flip = threading.Thread(target=flipper)
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    flip.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    flip.join()
    assert not errors, f"{len(errors)} results mixed two threshold sets, e.g. {errors[0]}"
    return seen


def _race_setup():
    torch.manual_seed(0)
    model = mlp_model(K=6)
    x = torch.randn(96, 6)
    sets = [quantile_thresholds(model, x, "entropy", q=0.15), quantile_thresholds(model, x, "entropy", q=0.3)]
    rt = ee.EERuntime(model, thresholds=sets[0])
    refs = []
    for s in sets:
        rt.set_thresholds(s)
        refs.append(rt.infer(x))
    assert not torch.equal(refs[0].exit_index, refs[1].exit_index)
    return rt, x, sets, refs


def test_set_thresholds_never_splits_an_infer_call():
    rt, x, sets, refs = _race_setup()
    _race(rt.infer, rt, x, sets, refs)


def test_set_thresholds_never_splits_a_graph_executor_call():
    from eeruntime.runtime.graphs import GraphRunner

    rt, x, sets, refs = _race_setup()
    runner = GraphRunner(rt, buckets=(32, 96), capture=False)
    _race(lambda v: runner.infer(v)[0], rt, x, sets, refs)


def assert_same_step(got, ref):
    """Two stage steps agree: the same leavers and survivors (ids, in order), their outputs, the
    survivors' state and carry."""
    assert got.k == ref.k
    assert torch.equal(got.exit_rows.cpu(), ref.exit_rows.cpu()) and torch.equal(got.rows.cpu(), ref.rows.cpu())
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.confidence, ref.confidence, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert (got.state is None) == (ref.state is None)
    if ref.state is not None:
        for g, r in zip(as_parts(got.state), as_parts(ref.state)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert len(got.carry) == len(ref.carry)
    for g, r in zip(got.carry, ref.carry):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def as_parts(state):
    return state if isinstance(state, tuple) else (state,)


def graph_runner_walk(rt, runner, x, rows, snap):
    """Each stage run by the runner and by the eager step on the same inputs, compared; the walk
    goes on with the eager step's survivors. Returns the runner's steps."""
    from eeruntime.runtime.step import stage_step

    state, carry, steps = x, (), []
    for k in range(rt.num_exits):
        got = runner.run_stage(k, state, rows, carry, snap)
        assert got is not None, f"stage {k} did not run on the graph executor"
        with torch.inference_mode():
            ref = stage_step(rt.spec, k, state, rows, carry, snap)
        assert_same_step(got, ref)
        steps.append(got)
        if ref.state is None:
            break
        state, rows, carry = ref.state, ref.rows, ref.carry
    return steps


@pytest.mark.parametrize("final", ["last", "average"])
@pytest.mark.parametrize("criterion", ["entropy", "margin"])
def test_graph_executor_stage_step_equals_the_eager_step(criterion, final):
    """The scheduler's step on the graph executor's static buffers (here its eager form, which
    runs the very body a CUDA graph captures) gives the eager step's answer at every stage, for
    batches that fill a bucket or leave padding, and for survivors of two batches joined."""
    from eeruntime.runtime.graphs import GraphRunner

    model = mlp_model(K=4, d_in=6, width=16, C=5, seed=4)
    x = torch.randn(45, 6)
    rt = ee.EERuntime(
        model, thresholds=quantile_thresholds(model, x, criterion, q=0.35), criterion=criterion, final=final
    )
    runner = GraphRunner(rt, buckets=(4, 16, 64), capture=False)
    snap = rt.thresholds_snapshot()
    steps = graph_runner_walk(rt, runner, x, torch.arange(1000, 1045), snap)
    assert len(steps) >= 3 and sum(s.exit_rows.shape[0] for s in steps) == 45
    got = assemble(
        [ee.StageResult(s.k, s.exit_rows - 1000, s.logits, s.confidence, s.rows, None, ()) for s in steps], 45
    )
    assert_same_as_infer(rt, x, got)
    # stage 1 on the survivors of two stage-0 batches joined (what the scheduler runs)
    a = runner.run_stage(0, x[:7], torch.arange(7), (), snap)
    b = runner.run_stage(0, x[7:20], torch.arange(7, 20), (), snap)
    joined = cat_rows([a.state, b.state]), cat_rows([a.rows, b.rows]), cat_rows([a.carry, b.carry])
    graph_runner_walk_from = runner.run_stage(1, *joined, snap)
    from eeruntime.runtime.step import stage_step

    with torch.inference_mode():
        ref = stage_step(rt.spec, 1, *joined, snap)
    assert_same_step(graph_runner_walk_from, ref)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device, none here")
        ),
    ],
)
def test_graph_executor_stage_step_after_infer_and_a_threshold_swap(device):
    """The graph executor's step keeps state between calls (the thresholds last copied into its
    buffer, a stage's row buffer holding positions): a step after a different snapshot, after an
    ``infer`` call that packed other rows into the same buffers, and a step repeated with the
    positions kept each equal the eager step (on CUDA: the captured graphs replayed)."""
    from eeruntime.runtime.graphs import GraphRunner
    from eeruntime.runtime.step import stage_step

    model = mlp_model(K=4, d_in=6, width=16, C=5, seed=4).to(device)
    x = torch.randn(60, 6, device=device)
    rt = ee.EERuntime(model, thresholds=quantile_thresholds(model, x, "entropy", q=0.35), criterion="entropy")
    runner = GraphRunner(rt, buckets=(4, 16, 64), capture=None if device == "cuda" else False)
    lo = rt.thresholds_snapshot()
    rt.set_thresholds(quantile_thresholds(model, x, "entropy", q=0.8))
    hi = rt.thresholds_snapshot()
    first = runner.run_stage(0, x[:30], torch.arange(30), (), lo)
    assert first is not None and first.state is not None
    left = []
    for i, snap in enumerate([lo, hi, hi, lo, lo]):
        if i == 3:  # packs rows of another batch into stage 1's row buffer, under the other snapshot
            runner.infer(x[30:], thresholds=hi)
        got = runner.run_stage(1, first.state, first.rows, first.carry, snap)
        with torch.inference_mode():
            ref = stage_step(rt.spec, 1, first.state, first.rows, first.carry, snap)
        assert_same_step(got, ref)
        left.append(int(got.exit_rows.shape[0]))
    assert device == "cpu" or runner.num_captures > 0
    assert left[0] != left[1]  # the two snapshots decide differently here, so a stale one would show


def test_graph_executor_stage_step_declines_what_it_cannot_run():
    from eeruntime.runtime.graphs import GraphRunner

    model = mlp_model(K=3, d_in=6, width=16, C=5, seed=4)
    rt = ee.EERuntime(model, thresholds=0.5, criterion="max_prob")
    runner = GraphRunner(rt, buckets=(4, 8), capture=False)
    snap = rt.thresholds_snapshot()
    x = torch.randn(9, 6)
    assert runner.run_stage(0, x, torch.arange(9), (), snap) is None  # more rows than the largest bucket
    with torch.no_grad():
        h = model.stages[0](x[:3])
    assert runner.run_stage(1, h, torch.arange(3), (), snap) is None  # no signature has stage 1's buffers yet
    assert runner.run_stage(0, x[:3], torch.arange(3), (), snap) is not None
    assert runner.run_stage(1, h, torch.arange(3), (), snap) is not None  # now stage 0's body made them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device, none here")
@pytest.mark.parametrize("final", ["last", "average"])
def test_run_stage_on_cuda_replays_the_graphs_and_equals_the_eager_step(final):
    model = mlp_model(K=4, d_in=6, width=16, C=5, seed=4).cuda()
    x = torch.randn(45, 6, device="cuda")
    rt = ee.EERuntime(model, thresholds=quantile_thresholds(model, x, "entropy", q=0.35), final=final)
    rt.warmup(64, x[:1])
    runner = rt._graph_runner
    captures = runner.num_captures
    assert captures > 0
    snap = rt.thresholds_snapshot()
    graph_runner_walk(rt, runner, x, torch.arange(45), snap)
    syncs = runner.host_syncs
    state, rows, carry, steps = x, torch.arange(45), None, []
    for k in range(rt.num_exits):  # the public seam takes the graphs too
        res = rt.run_stage(k, state, rows, carry)
        steps.append(ee.StageResult(k, res.exit_rows.cpu(), res.logits.cpu(), res.confidence.cpu(), res.rows, None, ()))
        if res.state is None:
            break
        state, rows, carry = res.state, res.rows, res.carry
    assert runner.num_captures == captures  # every step replayed a graph captured at warm-up
    assert runner.host_syncs - syncs == len([s for s in steps if s.k < rt.num_exits - 1])  # one read per early exit
    logits, exit_index, _ = assemble(steps, 45)
    ref = rt.infer(x)
    assert torch.equal(exit_index, ref.exit_index.cpu())
    torch.testing.assert_close(logits, ref.logits.cpu(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the CPU step's compiled ops
def _cpu_loop_ops():
    from eeruntime.ops._ext_backend import cpu_loop_ops

    loop_ops = cpu_loop_ops()
    if loop_ops is None:
        pytest.skip("the extension eeruntime._C is not built here (make ext)")
    return loop_ops


def direct_and_dispatched_walk(rt, x, ids, snap):
    """Each stage run by the step with the compiled ops called directly and by the dispatched
    step, on the same inputs; the two must agree bit for bit (the same kernels decide and pack).
    The walk goes on with the dispatched step's survivors. Returns the direct steps."""
    from eeruntime.runtime.step import stage_step

    loop_ops = _cpu_loop_ops()
    state, rows, carry, steps = x, ids, (), []
    with torch.inference_mode():
        for k in range(rt.num_exits):
            got = stage_step(rt.spec, k, state, rows, carry, snap, loop_ops)
            ref = stage_step(rt.spec, k, state, rows, carry, snap)
            assert got.k == ref.k
            for name in ("exit_rows", "logits", "confidence", "rows"):
                g, r = getattr(got, name), getattr(ref, name)
                assert g.dtype == r.dtype and torch.equal(g, r), f"stage {k}: {name} differs"
            assert (got.state is None) == (ref.state is None)
            if ref.state is not None:
                assert all(torch.equal(g, r) for g, r in zip(as_parts(got.state), as_parts(ref.state)))
            assert len(got.carry) == len(ref.carry) and all(torch.equal(g, r) for g, r in zip(got.carry, ref.carry))
            steps.append(got)
            if ref.state is None:
                break
            state, rows, carry = ref.state, ref.rows, ref.carry
    return steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("final", ["last", "average"])
@pytest.mark.parametrize("criterion", NAMED)
def test_cpu_step_with_the_compiled_ops_equals_the_dispatched_step(criterion, final, dtype):
    """rt.run_stage on the CPU calls the compiled ops directly (as the fused pass does); each of
    its steps equals the dispatched step's, for every named criterion, both final modes and every
    logits dtype the kernels take, with ids that are not 0..n-1, through stages where some rows
    leave, none leave and all leave."""
    model = mlp_model(K=4, d_in=6, width=16, C=7, seed=3).to(dtype)
    x = torch.randn(37, 6).to(dtype)
    thr = quantile_thresholds(model.float(), x.float(), criterion, q=0.35)
    model.to(dtype)
    rt = ee.EERuntime(model, thresholds=thr, criterion=criterion, final=final)
    ids = torch.randperm(5000, generator=torch.Generator().manual_seed(1))[:37]
    steps = direct_and_dispatched_walk(rt, x, ids, rt.thresholds_snapshot())
    assert sum(s.exit_rows.shape[0] for s in steps) == 37
    assert len([s for s in steps if s.exit_rows.numel()]) > 1  # rows left at several exits
    # nobody leaves early (every step packs nothing), then everybody leaves at exit 0
    lower = criterion == "entropy"
    never = ThresholdSnapshot([-1.0 if lower else 2.0] * 3)
    assert [s.exit_rows.numel() for s in direct_and_dispatched_walk(rt, x, ids, never)] == [0, 0, 0, 37]
    always = ThresholdSnapshot([1e9 if lower else -1.0] * 3)
    assert [s.exit_rows.numel() for s in direct_and_dispatched_walk(rt, x, ids, always)] == [37]
    # one row, and the survivors of two batches joined (what the scheduler runs)
    direct_and_dispatched_walk(rt, x[5:6], ids[5:6], rt.thresholds_snapshot())
    a = rt.run_stage(0, x[:20], ids[:20])
    b = rt.run_stage(0, x[20:], ids[20:])
    joined = cat_rows([a.state, b.state]), cat_rows([a.rows, b.rows])
    with torch.inference_mode():
        from eeruntime.runtime.step import stage_step

        got = stage_step(rt.spec, 1, *joined, cat_rows([a.carry, b.carry]), rt.thresholds_snapshot(), _cpu_loop_ops())
        ref = stage_step(rt.spec, 1, *joined, cat_rows([a.carry, b.carry]), rt.thresholds_snapshot())
    assert_same_step(got, ref)


def test_cpu_step_packs_tuple_states_and_their_layouts_with_the_compiled_ops():
    """A (hidden, mask) state and a channels_last state through the direct step: member-wise,
    each in its own layout, equal to the dispatched step."""
    d, C = 8, 4
    model = ee.MultiExitModel([TupleStage(d) for _ in range(3)], [TupleExit(d, C) for _ in range(3)]).eval()
    x = (torch.randn(33, 5, d), (torch.rand(33, 5) > 0.3).float())
    with torch.no_grad():
        outs = model(x)
    rt = ee.EERuntime(model, thresholds=[float(score64(outs[k], "entropy").median()) for k in range(2)])
    steps = direct_and_dispatched_walk(rt, x, torch.arange(33), rt.thresholds_snapshot())
    assert isinstance(steps[0].state, tuple) and len(steps[0].state) == 2

    from eeruntime.zoo import resnet_style

    torch.manual_seed(0)
    net = resnet_style(num_classes=5, widths=(4, 8), blocks=(1, 1)).eval().to(memory_format=torch.channels_last)
    xc = torch.randn(12, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        thr = [float(score64(net(xc)[0], "entropy").median())]
    rt = ee.EERuntime(net, thresholds=thr, criterion="entropy")
    steps = direct_and_dispatched_walk(rt, xc, torch.arange(12), rt.thresholds_snapshot())
    assert steps[0].state.is_contiguous(memory_format=torch.channels_last)


def test_run_stage_on_the_cpu_takes_the_compiled_ops_without_the_dispatch(monkeypatch):
    """On the CPU with the extension built and a named criterion, a step makes no dispatched op
    call (the dispatch's checks are what cost); with compact_backend="torch" (or a criterion the
    kernels do not know) it takes the dispatched ops, and the answers are the same."""
    _cpu_loop_ops()
    from eeruntime import ops
    from eeruntime.runtime import step as step_module

    model = mlp_model(K=3, d_in=6, width=12, C=5, seed=2)
    x = torch.randn(29, 6)
    thr = quantile_thresholds(model, x, "margin", q=0.4)
    calls = []

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(step_module.ops, "compact", counting(ops.compact))
    monkeypatch.setattr(ops, "exit_decision", counting(ops.exit_decision))
    direct = ee.EERuntime(model, thresholds=thr, criterion="margin")
    got, _ = walk(direct, x)
    assert calls == []
    assert_same_as_infer(direct, x, got)
    dispatched = ee.EERuntime(model, thresholds=thr, criterion="margin", compact_backend="torch")
    ref, _ = walk(dispatched, x)
    assert "compact" in calls and "exit_decision" in calls
    for g, r in zip(got, ref):
        assert torch.equal(g, r)

"""StageScheduler: results equal rt.infer row for row whatever shares the batches; backpressure,
timeouts, cancellation, stage failures, shutdown and threshold swaps never leave a request pending
nor deliver a row to another request."""

import asyncio
import concurrent.futures
import gc
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from models import mlp_model
from serve_models import parked, scripted_model, scripted_rows, thresholds_for

import eeruntime as ee
from eeruntime.ops import confidence_ref
from eeruntime.serve import SchedulerClosed, SchedulerFull, StageFailed, StageScheduler

WAIT = 30  # seconds any single result may take before the test calls it hung


@torch.no_grad()
def near_threshold(model, x, thresholds, criterion, final, tol=1e-4):
    """Rows whose score at some early exit is within float noise of its threshold (their exit may
    legitimately differ between batch compositions)."""
    outs = model(x)
    near = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    acc = torch.zeros_like(outs[0])
    for k, thr in enumerate(thresholds):
        acc = acc + outs[k]
        near |= (confidence_ref(outs[k], criterion) - thr).abs() < tol
    return near


def submit_concurrently(sched, x, threads=4, seed=0, most_rows=6):
    """Split x into requests of 1-``most_rows`` rows, submitted in random order from several threads (one of
    them through asyncio, the others by submit_nowait or the blocking infer); returns
    [(start, stop, future)]."""
    rng = random.Random(seed)
    spans, i = [], 0
    while i < x.shape[0]:
        n = rng.randint(1, most_rows)
        spans.append((i, min(i + n, x.shape[0])))
        i += n
    rng.shuffle(spans)
    parts = [spans[t::threads] for t in range(threads)]
    results, lock = [], threading.Lock()

    def blocking(part, seed):
        r = random.Random(seed)
        for a, b in part:
            if r.random() < 0.3:  # sched.infer: inline when the scheduler happens to be idle
                f = concurrent.futures.Future()
                f.set_result(sched.infer(x[a:b]))
            else:
                f = sched.submit_nowait(x[a:b])
            with lock:
                results.append((a, b, f))
            if r.random() < 0.3:
                time.sleep(r.random() * 0.002)

    def via_asyncio(part):
        async def one(a, b):
            return await sched.submit(x[a:b])

        async def main():
            return await asyncio.gather(*(one(a, b) for a, b in part))

        for (a, b), res in zip(part, asyncio.run(main())):
            done = concurrent.futures.Future()
            done.set_result(res)
            with lock:
                results.append((a, b, done))

    workers = [threading.Thread(target=blocking, args=(p, t)) for t, p in enumerate(parts[1:])]
    workers.append(threading.Thread(target=via_asyncio, args=(parts[0],)))
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT)
    assert sum(b - a for a, b, _ in results) == x.shape[0]
    return results


CUDA_PARAM = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device, none here")
)


@pytest.mark.parametrize(
    "fused,defer,policy,wait,most_rows",
    [
        (False, 0.0, "deepest", 0.0, 6),
        (False, 0.0, "deepest", 0.0, 1),
        (True, 0.0, "deepest", 0.0, 6),
        (True, 5.0, "deepest", 0.0, 6),
        (True, 0.0, "request", 1.0, 6),
    ],
    ids=["step-by-step", "step-by-step-one-row-requests", "fused", "defer", "request"],
)
@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
@pytest.mark.parametrize("criterion,final", [("entropy", "last"), ("max_prob", "average"), ("margin", "last")])
@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
def test_scheduler_equals_infer_row_for_row_under_concurrent_submitters(
    criterion, final, device, fused, defer, policy, wait, most_rows, workers
):
    model = mlp_model(K=3, d_in=6, width=16, C=5, seed=1).to(device)
    x = torch.randn(600, 6).to(device)
    thresholds = thresholds_for(model, x, [0.35, 0.3], criterion)
    rt = ee.EERuntime(model, thresholds=thresholds, criterion=criterion, final=final)
    ref = rt.infer(x)
    assert all(int((ref.exit_index == k).sum()) > 60 for k in range(3))  # every stage really serves
    near = near_threshold(model, x, thresholds, criterion, final)
    rt.reset_stats()
    # fused=False: every batch step by step (rt.run_stage); fused: a stage-0 batch that nothing
    # could join later runs through every stage in one pass (rt.infer's path); defer: under a
    # backlog partial batches wait for full ones (up to 5 ms); request: every stage-0 batch in
    # one pass, survivors never re-batched (a 1 ms batching window at stage 0, under which
    # "deepest" would run batches step by step); 2 workers run batches at once, from the same queues
    # (a request of several rows may then leave in both); most_rows 1: every request one sample,
    # the common request under load, whose rows leaving a step are answered without grouping
    with ee.serve.StageScheduler(
        rt, max_batch=16, fused=fused, max_defer_ms=defer, workers=workers, policy=policy, max_wait_ms=wait
    ) as sched:  # the public name
        results = submit_concurrently(sched, x, seed=hash(criterion) % 1000, most_rows=most_rows)
        for a, b, f in results:
            got = f.result(WAIT)
            assert got.logits.shape == (b - a, 5) and got.exit_index.shape == (b - a,)
            # every part of the answer where the model ran (an index on another device fails below)
            assert got.logits.device == got.exit_index.device == got.confidence.device == x.device
            same = got.exit_index == ref.exit_index[a:b]
            assert bool((same | near[a:b]).all()), (a, b, got.exit_index, ref.exit_index[a:b])
            torch.testing.assert_close(got.logits[same], ref.logits[a:b][same], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.confidence[same], ref.confidence[a:b][same], rtol=1e-5, atol=1e-5)
        stats = sched.stats_dict()
    assert stats["requests"]["completed"] == len(results) and stats["pending_requests"] == 0
    assert sum(stats["exits"]) == x.shape[0] and max(stats["max_batch_seen"]) <= 16
    if policy == "request":  # every stage-0 batch ran whole (in one pass, or inline)
        assert stats["batches"][0] == stats["fused_batches"] + stats["inline_requests"]
    else:
        assert stats["batches"][1] < stats["exits"][1] + stats["exits"][2]  # survivors of requests shared batches
    assert (stats["fused_batches"] > 0) == fused and stats["fused_fallbacks"] == 0
    assert rt.stats.samples == x.shape[0] and rt.stats.exit_counts == stats["exits"]


def gated(K=3, max_batch=8, **kw):
    """A scripted model whose stage 0 holds until the hook's gate opens, and its scheduler."""
    model, hook = scripted_model(K)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    hook.hold(0)
    return StageScheduler(rt, max_batch=max_batch, **kw), hook


def drained(sched, timeout=WAIT):
    """No request pending and no row queued, once the worker has taken its next turn (dead rows
    are dropped between batches)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sched.pending() == 0 and sched.queue_depths() == [0] * sched.num_stages:
            return True
        time.sleep(0.005)
    return False


def check_answers(req_rows, futures, failed=()):
    """Each request's result has exactly its own rows (class = id % C, the exit it was scripted to)."""
    for (ids, exit_at), f in zip(req_rows, futures):
        if f in failed:
            continue
        r = f.result(WAIT)
        assert r.logits.argmax(1).tolist() == [i % 7 for i in ids]
        assert r.exit_index.tolist() == exit_at


def test_backpressure_error_and_wait():
    sched, hook = gated(max_queue_rows=6)
    try:
        first = sched.submit_nowait(scripted_rows([0, 1], [2, 2]))
        assert hook.entered.wait(WAIT)
        more = sched.submit_nowait(scripted_rows([2, 3, 4, 5], [0, 1, 2, 0]))
        with pytest.raises(SchedulerFull, match="6 of 6 rows pending"):
            sched.submit_nowait(scripted_rows([6], [0]))
        with pytest.raises(ValueError, match="can never be admitted"):
            sched.submit_nowait(scripted_rows(list(range(7)), [0] * 7))
        assert sched.stats.rejected == 1
        hook.gate.set()
        check_answers([([0, 1], [2, 2]), ([2, 3, 4, 5], [0, 1, 2, 0])], [first, more])
    finally:
        sched.close()
    waiting, hook = gated(max_queue_rows=2, when_full="wait")
    try:
        first = waiting.submit_nowait(scripted_rows([0, 1], [0, 1]))
        assert hook.entered.wait(WAIT)
        with pytest.raises(TimeoutError, match="no room"):
            waiting.submit_nowait(scripted_rows([9], [0]), timeout_s=0.05)
        threading.Timer(0.1, hook.gate.set).start()
        later = waiting.submit_nowait(scripted_rows([2], [2]), timeout_s=WAIT)  # blocks until room
        check_answers([([0, 1], [0, 1]), ([2], [2])], [first, later])
    finally:
        waiting.close()


FUSED = pytest.mark.parametrize("fused", [False, True], ids=["step-by-step", "fused"])


def test_a_timeout_that_is_not_seconds_is_refused_and_inf_means_none_leaving_timeouts_working():
    # An inf timeout used to stop the timeout thread (OverflowError in its wait), after which no
    # request of the scheduler ever timed out; a NaN one sat in the deadline heap, whose order
    # NaN breaks; zero or negative failed the request at once. Refused now, naming what is
    # accepted; inf is "no timeout".
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model.eval(), thresholds=0.5, criterion="max_prob")
    with StageScheduler(rt, max_batch=4, inline="never") as sched:
        for bad, err in [(float("nan"), ValueError), (0, ValueError), (-1.0, ValueError), ("5", TypeError)]:
            with pytest.raises(err, match="timeout_s must be"):
                sched.submit_nowait(scripted_rows([1], [0]), timeout_s=bad)
            with pytest.raises(err, match="timeout_s must be"):
                asyncio.run(sched.submit(scripted_rows([1], [0]), timeout_s=bad))
        assert sched.pending() == 0 and sched.stats.submitted == 0
        unbounded = sched.submit_nowait(scripted_rows([2], [0]), timeout_s=float("inf"))
        assert unbounded.result(WAIT).exit_index.tolist() == [0]
        # and timeouts still fire afterwards: a request held at stage 1 past its 50 ms
        hook.hold(1)
        late = sched.submit_nowait(scripted_rows([3], [2]), timeout_s=0.05)
        assert hook.entered.wait(WAIT)
        with pytest.raises(TimeoutError):
            late.result(WAIT)
        hook.gate.set()
    for bad in (float("nan"), 0.0, -2):
        with pytest.raises(ValueError, match="timeout_s must be > 0"):
            StageScheduler(rt, timeout_s=bad)
    with StageScheduler(rt, timeout_s=float("inf")) as sched:
        assert sched.timeout_s is None


@FUSED
def test_timeout_fires_while_the_rows_run_and_frees_them_at_every_stage(fused):
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    hook.hold(1, trigger=2)
    with StageScheduler(rt, max_batch=4, fused=fused) as sched:
        slow = sched.submit_nowait(scripted_rows([1, 2, 3], [0, 2, 2]), timeout_s=0.2)
        assert hook.entered.wait(WAIT)  # row 1 left at exit 0; rows 2, 3 are inside stage 1
        waiting = sched.submit_nowait(scripted_rows([4, 5], [1, 2]), timeout_s=0.2)  # stuck in stage 0's queue
        other = sched.submit_nowait(scripted_rows([6, 7], [1, 2]))
        with pytest.raises(TimeoutError, match="timed out"):
            slow.result(WAIT)  # answered although the worker is still busy
        with pytest.raises(TimeoutError, match="timed out"):
            waiting.result(WAIT)
        hook.gate.set()
        check_answers([([6, 7], [1, 2])], [other])
        # step by step, the dead rows are dropped before the next step; one pass (fused) runs its
        # batch to the end, but rows of a dead request still waiting never run
        assert fused or not {2, 3} & set(hook.seen(2))
        assert not {4, 5} & set(hook.seen())
        assert drained(sched) and sched.stats.timeouts == 2
        assert (sched.stats.fused_batches > 0) == fused


@FUSED
def test_cancellation_frees_rows_blocking_and_async(fused):
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    hook.hold(1, trigger=2)
    with StageScheduler(rt, max_batch=2, fused=fused) as sched:
        victim = sched.submit_nowait(scripted_rows([1, 2, 3], [0, 2, 2]))
        assert hook.entered.wait(WAIT)  # rows 2, 3 are inside stage 1
        keep = sched.submit_nowait(scripted_rows([4, 5], [2, 2]))
        assert victim.cancel()
        hook.gate.set()
        check_answers([([4, 5], [2, 2])], [keep])
        assert (fused or not {2, 3} & set(hook.seen(2))) and sched.stats.cancelled == 1

        async def cancel_one():
            hook.hold(1, trigger=60)
            blocker = asyncio.ensure_future(sched.submit(scripted_rows([60], [1])))
            while not hook.entered.is_set():
                await asyncio.sleep(0.005)
            task = asyncio.ensure_future(sched.submit(scripted_rows([7, 8], [2, 2])))
            await asyncio.sleep(0.05)  # admitted, waiting in stage 0's queue
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            hook.gate.set()
            return await blocker

        assert asyncio.run(cancel_one()).exit_index.tolist() == [1]
        assert not {7, 8} & set(hook.seen()) and sched.stats.cancelled == 2
        assert drained(sched)


def test_an_async_caller_cancelled_while_waiting_for_room_is_never_admitted():
    """when_full="wait": an asyncio caller's admission waits for room in another thread;
    cancelling the caller then must free its request too (found by a randomized run of
    submits, cancels and timeouts: the row ran anyway, and with a timeout its error was logged
    as never retrieved)."""
    model, hook = scripted_model(2)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    hook.hold(0)
    with StageScheduler(rt, max_batch=4, max_queue_rows=4, when_full="wait", inline="never") as sched:
        first = sched.submit_nowait(scripted_rows([0, 1, 2, 3], [0, 0, 0, 0]))
        assert hook.entered.wait(WAIT)  # the scheduler is full, its rows held in stage 0

        async def cancel_while_full():
            task = asyncio.ensure_future(sched.submit(scripted_rows([100], [1]), timeout_s=WAIT))
            await asyncio.sleep(0.05)  # waiting for room
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert sched.pending() == 1
            hook.gate.set()  # room: the waiting admission wakes, sees its caller gone
            check_answers([([0, 1, 2, 3], [0, 0, 0, 0])], [first])
            # a later caller is served as usual, in the room the cancelled one never took
            return await sched.submit(scripted_rows([5], [1]))

        assert asyncio.run(cancel_while_full()).exit_index.tolist() == [1]
        assert drained(sched)
        assert 100 not in hook.seen() and sched.stats.cancelled == 0  # (never admitted: nothing to cancel)
        assert sched.stats_dict()["requests"]["completed"] == 2


def test_an_async_caller_takes_a_thread_only_to_wait_for_room():
    """when_full="wait": an asyncio caller is admitted on its event loop while there is room
    (a thread hop per request cost each about 100 us in bursts); only when the scheduler
    is full does its admission wait for room in another thread, and it is answered then."""
    model, hook = scripted_model(2)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    with StageScheduler(rt, max_batch=4, max_queue_rows=4, when_full="wait", inline="never") as sched:

        async def main():
            loop = asyncio.get_running_loop()
            hops = []
            run_in_executor = loop.run_in_executor

            def counted(*args):
                hops.append(args[1])
                return run_in_executor(*args)

            loop.run_in_executor = counted  # (this loop only)
            answers = [await sched.submit(scripted_rows([i], [i % 2])) for i in range(6)]
            assert hops == []  # room every time: admitted on the loop
            hook.hold(0)
            first = sched.submit_nowait(scripted_rows([10, 11, 12, 13], [0, 0, 0, 0]))  # fills it
            assert hook.entered.wait(WAIT)  # (blocking the loop: nothing on it needs to run)
            waiting = asyncio.ensure_future(sched.submit(scripted_rows([20], [1])))
            await asyncio.sleep(0.05)
            assert len(hops) == 1 and not waiting.done()  # full: waiting for room in a thread
            hook.gate.set()
            return answers, first, await waiting

        answers, first, late = asyncio.run(main())
        assert [a.exit_index.tolist() for a in answers] == [[i % 2] for i in range(6)]
        check_answers([([10, 11, 12, 13], [0, 0, 0, 0])], [first])
        assert late.exit_index.tolist() == [1] and late.logits.argmax(1).tolist() == [20 % 7]


def test_an_async_caller_cancelled_once_admitted_leaves_no_error_logged_as_lost():
    """when_full="wait": the caller is cancelled after its admission (in another thread) but
    before it awaited its answer, and the request then times out: its error must not be logged
    by asyncio as "never retrieved" (a server's clients disconnecting would fill its log; found
    by the randomized run)."""
    model, hook = scripted_model(2)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    hook.hold(0)
    with StageScheduler(rt, max_batch=4, when_full="wait", inline="never") as sched:

        async def main():
            loop = asyncio.get_running_loop()
            logged = []
            loop.set_exception_handler(lambda _loop, context: logged.append(context))
            task = asyncio.ensure_future(sched.submit(scripted_rows([1], [1]), timeout_s=0.05))
            await asyncio.sleep(0)  # its admission runs in the executor
            time.sleep(0.3)  # (the loop blocked) admitted, then timed out: both posted to the loop
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            hook.gate.set()
            assert drained(sched) and sched.stats.timeouts == 1
            await asyncio.sleep(0.05)  # every answer posted has reached the loop
            del task
            time.sleep(0.05)  # (the worker's last frame lets go of the request)
            gc.collect()  # an error never retrieved is logged when its future goes
            return logged

        assert asyncio.run(main()) == []


def test_async_answers_of_one_batch_reach_their_loop_in_one_call_and_a_timeout_too():
    """A batch's answers to asyncio callers take one call_soon_threadsafe per loop (counted on
    the loop), each caller gets its own rows; a timeout reaches its caller as TimeoutError."""
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    hook.hold(0, trigger=90)
    with StageScheduler(rt, max_batch=8, inline="never") as sched:

        async def main():
            loop = asyncio.get_running_loop()
            calls = []
            real = loop.call_soon_threadsafe

            def counting(cb, *args):
                calls.append(threading.current_thread().name)
                return real(cb, *args)

            loop.call_soon_threadsafe = counting  # (an instance attribute shadows the method)
            blocker = asyncio.ensure_future(sched.submit(scripted_rows([90], [0])))
            while not hook.entered.is_set():
                await asyncio.sleep(0.005)
            reqs = [([i, i + 1], [0, 1]) for i in range(0, 12, 2)]  # 6 requests, 12 rows: 2 batches
            tasks = [asyncio.ensure_future(sched.submit(scripted_rows(ids, ex))) for ids, ex in reqs]
            await asyncio.sleep(0.05)  # all admitted while stage 0 is held
            before = len(calls)
            hook.gate.set()
            got = await asyncio.gather(blocker, *tasks)
            hook.hold(1, trigger=95)
            late = asyncio.ensure_future(sched.submit(scripted_rows([95], [2]), timeout_s=0.05))
            with pytest.raises(TimeoutError):
                await late
            hook.gate.set()
            return reqs, got, calls, before

        reqs, got, calls, before = asyncio.run(main())
    assert got[0].exit_index.tolist() == [0]
    for (ids, exit_at), r in zip(reqs, got[1:]):
        assert r.logits.argmax(1).tolist() == [i % 7 for i in ids] and r.exit_index.tolist() == exit_at
    # the blocker's batch, then 12 rows in batches of 8 and 4 (one pass each: 6 answers in two
    # calls, where one call per request would make 6), then the timeout's: all from other threads
    assert before == 0 and len(calls) == 4 and "MainThread" not in calls, calls


def test_a_closed_event_loop_does_not_stop_the_worker():
    """An asyncio caller whose loop closed before its answer (its task destroyed, not cancelled)
    loses that answer; the worker goes on serving."""
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    hook.hold(0)
    with StageScheduler(rt, max_batch=8, inline="never") as sched:
        loop = asyncio.new_event_loop()
        task = loop.create_task(sched.submit(scripted_rows([1], [0])))
        loop.run_until_complete(asyncio.sleep(0.05))  # admitted, held at stage 0
        assert hook.entered.wait(WAIT) and not task.done()
        loop.close()
        hook.gate.set()
        assert drained(sched)  # answered into the closed loop: dropped there
        check_answers([([2, 3], [1, 2])], [sched.submit_nowait(scripted_rows([2, 3], [1, 2]))])


WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])


@WORKERS
def test_stage_failure_fails_only_the_requests_the_stage_fails_on(workers):
    # A stage that raises on some rows (a poison input): their batch is run again one request at
    # a time, so exactly the requests holding such rows fail; the others sharing the batch are
    # answered right (they used to fail with it: one client's input failed its batch-mates).
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    poison = {13, 27}
    hook.fail_if = lambda k, ids: k == 1 and bool(poison & set(ids))
    rng = random.Random(0)
    reqs, futures, i = [], [], 0
    with StageScheduler(rt, max_batch=4, workers=workers) as sched:
        for _ in range(40):
            n = rng.randint(1, 3)
            ids = list(range(i, i + n))
            exit_at = [rng.randint(0, 2) if j not in poison else 2 for j in ids]
            reqs.append((ids, exit_at))
            futures.append(sched.submit_nowait(scripted_rows(ids, exit_at)))
            i += n
        done = [f.exception(WAIT) for f in futures]
        assert drained(sched)
    failing = [set(ids) for k, ids in hook.batches if k == 1 and poison & set(ids)]
    shared = set().union(*failing)
    failed = set()
    for (ids, _exit_at), f, exc in zip(reqs, futures, done):
        if poison & set(ids):
            assert isinstance(exc, StageFailed) and "injected failure at stage 1" in str(exc), ids
            assert "run alone after their batch failed" in str(exc) or set(ids) >= shared
            failed.add(f)
        else:
            assert exc is None, (ids, exc)
    assert len(failed) == 2
    check_answers(reqs, futures, failed)
    # the failing batches held other requests' rows too (answered above), and were run again
    assert shared - poison and sched.stats.failure_reruns >= 1
    # a batch run in one pass whose stage 1 raised ran again step by step: its stage-0 step
    # succeeded, so stage 1's batch is what failed, not every request of the pass
    assert sched.stats.fused_fallbacks >= 1


@pytest.mark.parametrize("fused", [True, False])
def test_a_poison_request_fails_alone_with_a_carry_at_a_deeper_stage(fused):
    # Patience carries each row's history between stages: the rows run again alone at stage 2
    # take their carry with them, and the others' answers equal rt.infer's on their own rows
    from eeruntime.exit_rules import Patience

    torch.manual_seed(4)
    model = mlp_model(K=4, d_in=6, width=12, C=5, seed=4)
    rt = ee.EERuntime(model, thresholds=2, criterion=Patience())

    def refuse_nan(module, args):
        if bool(torch.isnan(args[0]).any()):
            raise ValueError("NaN reached stage 2")

    model.stages[2].register_forward_pre_hook(refuse_nan)
    x = torch.randn(40, 6)
    poison = torch.full((2, 6), float("nan"))
    with StageScheduler(rt, max_batch=16, inline="never", max_defer_ms=0, fused=fused) as sched:
        with parked(sched):
            futures = [sched.submit_nowait(x[i : i + 4]) for i in range(0, 20, 4)]
            bad = sched.submit_nowait(poison)
            futures += [sched.submit_nowait(x[i : i + 4]) for i in range(20, 40, 4)]
        assert isinstance(bad.exception(WAIT), StageFailed) and "NaN reached stage 2" in str(bad.exception())
        for i, f in zip(range(0, 40, 4), futures):
            got, want = f.result(WAIT), rt.infer(x[i : i + 4])
            assert torch.equal(got.exit_index, want.exit_index)
            torch.testing.assert_close(got.logits, want.logits)
        assert sched.stats.failure_reruns >= 1 and drained(sched)


def test_one_pass_only_when_the_steps_would_form_the_same_batches():
    # max_wait 500 ms: a request admitted to an idle scheduler runs in one pass (nothing could join
    # it); requests admitted while it runs wait for fuller batches step by step, and the
    # survivors of separate stage-0 batches share a deeper batch
    sched, hook = gated(max_batch=4, max_wait_ms=500)
    try:
        first = sched.submit_nowait(scripted_rows([0, 1], [0, 2]))
        assert hook.entered.wait(WAIT)  # inside its one pass, at stage 0
        # each later request: one row leaves at exit 0, one goes on to exit 2
        later = [sched.submit_nowait(scripted_rows([10 + 2 * i, 11 + 2 * i], [0, 2])) for i in range(4)]
        hook.gate.set()
        check_answers([([0, 1], [0, 2])] + [([10 + 2 * i, 11 + 2 * i], [0, 2]) for i in range(4)], [first] + later)
        assert sched.stats.fused_batches == 1 and drained(sched)
        stage0 = [ids for k, ids in hook.batches if k == 0 and ids != [0, 1]]
        stage1 = [ids for k, ids in hook.batches if k == 1 and ids != [1]]
        # two stage-0 batches of 4 rows, whose survivors (2 each) waited and shared stage 1's batch
        assert stage0 == [[10, 11, 12, 13], [14, 15, 16, 17]] and stage1 == [[11, 13, 15, 17]], hook.batches
    finally:
        hook.gate.set()
        sched.close()


def test_request_policy_never_re_batches_survivors_as_request_batching_would():
    """policy="request" forms request-level batching's batches: a stage-0 batch (here two of 4
    rows, admitted while an idle request is held) runs whole, its survivors alone at every deeper
    stage, whatever its batching window (max_wait_ms); "deepest" with the same window lets the
    two batches' survivors share stage 1 (test_one_pass_only_when_the_steps_would_form_the_same_batches).
    With max_wait_ms=0 and max_defer_ms=0 the two policies form the same batches."""
    sched, hook = gated(max_batch=4, max_wait_ms=500.0, policy="request")
    try:
        first = sched.submit_nowait(scripted_rows([0, 1], [0, 2]))
        assert hook.entered.wait(WAIT)  # inside its one pass, at stage 0
        reqs = [([10 + 2 * i, 11 + 2 * i], [0, 2]) for i in range(4)]
        later = [sched.submit_nowait(scripted_rows(ids, ex)) for ids, ex in reqs]
        hook.gate.set()
        check_answers([([0, 1], [0, 2])] + reqs, [first] + later)
        assert drained(sched)
        stage0 = [ids for k, ids in hook.batches if k == 0 and ids != [0, 1]]
        stage1 = [ids for k, ids in hook.batches if k == 1 and ids != [1]]
        assert stage0 == [[10, 11, 12, 13], [14, 15, 16, 17]] and stage1 == [[11, 13], [15, 17]], hook.batches
        assert sched.stats.fused_batches == 3 and sched.stats_dict()["policy"] == "request"
    finally:
        hook.gate.set()
        sched.close()


def test_request_policy_refuses_what_would_re_batch_and_a_failing_pass_fails_only_its_requests():
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    with pytest.raises(ValueError, match="max_defer_ms applies to policy='deepest'"):
        StageScheduler(rt, policy="request", max_defer_ms=5)
    with pytest.raises(ValueError, match="fused=False"):
        StageScheduler(rt, policy="request", fused=False)
    assert StageScheduler(rt, policy="request").max_defer_s == 0.0  # (the CPU default is deepest's alone)
    # a pass that raises at stage 2 runs again step by step: only the request whose row got there fails
    hook.fail_if = lambda k, ids: k == 2
    with StageScheduler(rt, max_batch=8, policy="request", inline="never") as sched:
        hook.hold(0)
        held = sched.submit_nowait(scripted_rows([50], [0]))
        assert hook.entered.wait(WAIT)
        ok = sched.submit_nowait(scripted_rows([1, 2], [0, 1]))
        bad = sched.submit_nowait(scripted_rows([3], [2]))
        hook.gate.set()
        check_answers([([50], [0]), ([1, 2], [0, 1])], [held, ok])
        with pytest.raises(StageFailed, match="stage 2"):
            bad.result(WAIT)
        assert sched.stats.fused_fallbacks == 1 and drained(sched)


@pytest.mark.parametrize("max_defer_ms", [60_000.0, 0.0], ids=["backlogged", "off"])
def test_under_a_backlog_full_batches_go_first_so_survivors_share_deeper_batches(max_defer_ms):
    """max_defer_ms > 0 and stage 0 behind (it holds a full batch: here three, admitted while a
    request is held): a full stage-0 batch runs step by step, and while full stage-0 batches
    wait, a partial stage-1 batch is passed over, so the survivors of two stage-0 batches share
    one stage-1 batch; the backlog's last batch, stage 0 no longer behind, has its survivors run
    at once. max_defer_ms 0: the deepest stage first, every stage-0 batch in one pass with its
    survivors alone, as rt.infer would run them."""
    sched, hook = gated(max_batch=4, max_defer_ms=max_defer_ms)
    try:
        first = sched.submit_nowait(scripted_rows([100], [0]))  # idle: taken at once, held at stage 0
        assert hook.entered.wait(WAIT)
        # a backlog of three full stage-0 batches; two rows of each go on to exit 2
        reqs = [([4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3], [0, 2, 0, 2]) for i in range(3)]
        later = [sched.submit_nowait(scripted_rows(ids, ex)) for ids, ex in reqs]
        hook.gate.set()
        check_answers([([100], [0])] + reqs, [first] + later)
        assert drained(sched)
        stage1 = [ids for k, ids in hook.batches if k == 1]
        if max_defer_ms:
            assert stage1 == [[1, 3, 5, 7], [9, 11]], hook.batches
            assert sched.stats.fused_batches == 1  # the idle request's; the full batches step by step
        else:
            assert stage1 == [[1, 3], [5, 7], [9, 11]], hook.batches
            assert sched.stats.fused_batches == 4
    finally:
        hook.gate.set()
        sched.close()


def test_a_partial_batch_is_passed_over_for_at_most_max_defer_ms():
    """Stage 0 stays full and behind for eight batches of 30 ms or more; the two survivors of the
    first wait at stage 1 while full batches run,
    but only for max_defer_ms (50): they run after the second or third stage-0 batch, not after
    the eighth."""
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    slow = lambda k, ids: k == 0 and (time.sleep(0.03) or False)  # noqa: E731
    with StageScheduler(rt, max_batch=4, max_defer_ms=50.0) as sched:
        hook.hold(0, trigger=100)
        first = sched.submit_nowait(scripted_rows([100], [0]))
        assert hook.entered.wait(WAIT)
        reqs = [([0, 1, 2, 3], [0, 2, 0, 2])] + [([4 * i + j for j in range(4)], [0] * 4) for i in range(1, 9)]
        later = [sched.submit_nowait(scripted_rows(ids, ex)) for ids, ex in reqs]
        hook.hold_if = slow
        hook.gate.set()
        check_answers([([100], [0])] + reqs, [first] + later)
        order = [(k, ids) for k, ids in hook.batches if ids != [100]]
        at = order.index((1, [1, 3]))
        assert 2 <= sum(1 for k, _ in order[:at] if k == 0) <= 3, order
    with pytest.raises(ValueError, match="max_defer_ms must be >= 0"):
        StageScheduler(rt, max_defer_ms=-1)
    for key in ("max_wait_ms", "max_defer_ms"):  # (inf held a partial batch until it filled, a lone row forever)
        for value, words in (
            (math.inf, "must be finite"),
            (10**400, "must be finite"),  # (an int past float's range: was float()'s OverflowError)
            (math.nan, "must be >= 0"),
            ("5", "must be >= 0"),
        ):
            with pytest.raises(ValueError, match=f"{key} {words}"):
                StageScheduler(rt, **{key: value})
    with pytest.raises(ValueError, match="max_defer_ms applies to policy='deepest'"):
        StageScheduler(rt, policy="fill", max_defer_ms=5)


def test_a_partial_batch_the_rows_upstream_cannot_fill_is_not_passed_over():
    """Stage 0 behind, but its rows have mostly left at exit 0 lately (ten batches where every row
    did): the two survivors of the next batch are not expected to meet enough rows at stage 1
    (8 waiting x a share of about 0.1 < 2 needed), so they go on alone, at once, instead of
    waiting max_defer_ms for a batch that does not fill."""
    sched, hook = gated(max_batch=4, max_defer_ms=60_000.0)
    try:
        warm = [sched.submit_nowait(scripted_rows([200 + 4 * i + j for j in range(4)], [0] * 4)) for i in range(10)]
        hook.gate.set()
        for f in warm:
            f.result(WAIT)
        assert sched._survival(0) < 0.1  # learned: rows leave at exit 0
        hook.hold(0)
        first = sched.submit_nowait(scripted_rows([100], [0]))
        assert hook.entered.wait(WAIT)
        reqs = [([0, 1, 2, 3], [0, 2, 0, 2])] + [([4 * i + j for j in range(4)], [0] * 4) for i in (1, 2)]
        later = [sched.submit_nowait(scripted_rows(ids, ex)) for ids, ex in reqs]
        sched.max_defer_s = 0.05
        hook.gate.set()
        check_answers([([100], [0])] + reqs, [first] + later)
        order = [(k, ids) for k, ids in hook.batches if k > 0 or ids[0] < 100]
        assert order[:3] == [(0, [0, 1, 2, 3]), (1, [1, 3]), (2, [1, 3])], order
    finally:
        hook.gate.set()
        sched.close()


def test_max_defer_ms_default_is_20_ms_for_a_model_on_the_cpu_and_off_for_policy_fill():
    from eeruntime.serve.scheduler import DEFAULT_MAX_DEFER_MS_CPU

    rt = ee.EERuntime(mlp_model(), thresholds=0.5, criterion="max_prob")
    assert DEFAULT_MAX_DEFER_MS_CPU == 20.0
    for kw, want in [({}, 20.0), ({"max_defer_ms": 0}, 0.0), ({"max_defer_ms": 3.5}, 3.5), ({"policy": "fill"}, 0.0)]:
        with StageScheduler(rt, **kw) as sched:
            assert sched.stats_dict()["max_defer_ms"] == pytest.approx(want), kw


def test_the_deferral_pick_reads_the_backlog_and_the_measured_share_that_goes_on():
    """``_pick`` with max_defer_ms, read on set queues (no worker running): a partial stage-2
    batch is passed over for a full stage-0 batch only while stage 0 is behind (it holds
    max_batch rows for each worker, however long they waited) and the rows upstream times the shares that go on
    (measured, decayed) would fill it, and for at most max_defer_ms."""
    from eeruntime.serve.scheduler import _Chunk

    model, _ = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    sched = StageScheduler(rt, max_batch=8, max_defer_ms=100.0)
    sched.close()
    sched._closing = False  # the worker has stopped; the pick reads this flag (a closing scheduler never defers)
    now = time.perf_counter()
    chunk = lambda n, age: _Chunk(range(n), None, None, None, None, now - age)  # noqa: E731
    sched._queues[2].append(chunk(2, 0.01))  # partial (2 of 8), passed over 10 ms so far
    sched._queues[1].append(chunk(4, 0.01))
    sched._queues[0].extend(chunk(1, 0.001) for _ in range(12))  # 12 rows (behind: 8 make a batch), 1 ms old
    sched._reached, sched._went_on = [10.0, 10.0, 10.0], [5.0, 5.0, 0.0]  # half go on from 0 and from 1
    # need 6 at stage 2: 4 x 0.5 + 12 x 0.25 = 5 < 6: not worth waiting for, the deepest runs
    assert sched._pick(now) == (2, None)
    sched._queues[0].extend(chunk(1, 0.001) for _ in range(4))  # 16 x 0.25 + 2 = 6: fills, stage 0 goes first
    assert sched._pick(now) == (0, None)
    # every row goes on (stage 2 would fill from 4 + 7 rows), but stage 0 holds 7 rows, less than
    # a batch, however old: it keeps up, the deepest runs; with an 8th row it is behind again
    sched._went_on = [10.0, 10.0, 0.0]
    sched._queues[0].clear()
    sched._queues[0].extend(chunk(1, 10.0) for _ in range(7))
    assert sched._pick(now) == (2, None)
    sched._queues[0].append(chunk(1, 0.001))
    assert sched._pick(now) == (0, None)
    sched._queues[2][0] = chunk(2, 0.15)  # passed over for more than max_defer_ms already
    assert sched._pick(now) == (2, None)
    sched._closing = True
    # with two workers stage 0 is behind once it holds a full batch for each: 15 rows keep up
    two = StageScheduler(rt, max_batch=8, max_defer_ms=100.0, workers=2)
    two.close()
    two._closing = False
    two._queues[2].append(chunk(2, 0.01))
    two._queues[1].append(chunk(4, 0.01))
    two._reached, two._went_on = [10.0, 10.0, 10.0], [10.0, 10.0, 0.0]
    two._queues[0].extend(chunk(1, 10.0) for _ in range(15))
    assert two._pick(now) == (2, None)
    two._queues[0].append(chunk(1, 0.001))
    assert two._pick(now) == (0, None)
    # and a full stage-0 batch runs step by step (its survivors may wait at stage 1 for the next
    # batches') only if stage 0 was behind when it was taken: another full batch is left
    two._queues[1].clear()
    two._queues[2].clear()
    assert not two._fusable(two._gather(0))  # 16 rows: 8 taken, a full batch left
    assert two._fusable(two._gather(0))  # 8 rows: 8 taken, none left: one pass
    one = StageScheduler(rt, max_batch=8, max_defer_ms=100.0)
    one.close()
    one._closing = False
    one._queues[0].extend(chunk(1, 10.0) for _ in range(8))
    assert not one._fusable(one._gather(0))  # one worker: a full batch means stage 0 was behind
    one._closing = two._closing = True


@pytest.mark.parametrize("drain", [True, False])
@WORKERS
def test_shutdown_drains_or_fails_every_pending_request(drain, workers):
    sched, hook = gated(max_batch=2, workers=workers)
    futures = [sched.submit_nowait(scripted_rows([i], [i % 3])) for i in range(10)]
    assert hook.entered.wait(WAIT)
    threading.Timer(0.1, hook.gate.set).start()
    sched.close(drain=drain)
    assert all(f.done() for f in futures) and sched.pending() == 0
    # no row of a failed request is left queued (nor shown in the statistics served over HTTP)
    assert sched.queue_depths() == [0] * 3 and sched.stats_dict()["queue_depths"] == [0] * 3
    if drain:
        check_answers([([i], [i % 3]) for i in range(10)], futures)
    else:
        outcomes = [f.exception() for f in futures]
        assert any(isinstance(e, SchedulerClosed) for e in outcomes)
        check_answers([([i], [i % 3]) for i in range(10)], futures, {f for f, e in zip(futures, outcomes) if e})
    with pytest.raises(SchedulerClosed):
        sched.submit_nowait(scripted_rows([0], [0]))


def test_two_workers_run_two_batches_at_once_one_worker_runs_them_in_turn():
    for workers in (1, 2):
        sched, hook = gated(max_batch=4, workers=workers)
        hook.hold(0, trigger=0)  # only the batch holding row 0 waits at stage 0
        try:
            held = sched.submit_nowait(scripted_rows([0], [2]))
            assert hook.entered.wait(WAIT)  # a worker is inside stage 0 with it
            other = sched.submit_nowait(scripted_rows([1, 2], [0, 1]))
            if workers == 2:
                # the other worker answers it while the first is still held
                check_answers([([1, 2], [0, 1])], [other])
                assert not held.done()
                assert hook.ran_in(1) != hook.ran_in(0)  # two threads ran them
            else:
                time.sleep(0.2)  # (the one worker is held: nothing can answer it)
                assert not other.done()
            hook.gate.set()
            check_answers([([0], [2]), ([1, 2], [0, 1])], [held, other])
            assert drained(sched)
        finally:
            hook.gate.set()
            sched.close()


def test_survivors_of_batches_run_by_different_workers_share_a_deeper_batch():
    # 3 workers; one is held at stage 0 with a request (so the scheduler is busy: later requests
    # wait up to max_wait, 500 ms, for full batches of 4 rows at every stage). Two 4-row requests
    # then run at stage 0 in the other two workers at once (each waits inside until the other is
    # in), and their survivors, 2 each, meet in one stage-1 batch.
    sched, hook = gated(max_batch=4, max_wait_ms=500, workers=3)
    hook.hold(0, trigger=1)
    both_inside = threading.Barrier(2, timeout=WAIT)
    stage0 = sched.rt.model.stages[0]
    plain_hook = stage0.hook

    def hook_with_barrier(k, ids):
        if ids[0] >= 10:
            both_inside.wait()
        plain_hook(k, ids)

    stage0.hook = hook_with_barrier
    try:
        blocker = sched.submit_nowait(scripted_rows([1], [2]))
        assert hook.entered.wait(WAIT)
        later = [sched.submit_nowait(scripted_rows([10 + 4 * i + j for j in range(4)], [0, 2, 0, 2])) for i in range(2)]
        check_answers([([10 + 4 * i + j for j in range(4)], [0, 2, 0, 2]) for i in range(2)], later)
        hook.gate.set()
        check_answers([([1], [2])], [blocker])
        assert drained(sched)
        batches = [(k, sorted(ids), t) for (k, ids), t in zip(hook.batches, hook.threads) if ids[0] >= 10]
        assert len({t for k, _, t in batches if k == 0}) == 2, batches  # two workers ran stage 0
        assert [ids for k, ids, _ in batches if k == 1] == [[11, 13, 15, 17]], batches
    finally:
        hook.gate.set()
        sched.close()


def test_workers_must_be_a_positive_int():
    model = mlp_model(K=2, d_in=6, width=8, C=3)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers must be a positive int"):
            StageScheduler(ee.EERuntime(model), workers=bad)


@WORKERS
def test_threshold_swap_is_atomic_per_request(workers):
    model = mlp_model(K=3, d_in=6, width=16, C=5, seed=2)
    x = torch.randn(64, 6)
    old, new = thresholds_for(model, x, [0.2, 0.2], "entropy"), thresholds_for(model, x, [0.6, 0.3], "entropy")
    want_old = ee.EERuntime(model, thresholds=old).infer(x)
    want_new = ee.EERuntime(model, thresholds=new).infer(x)
    assert not torch.equal(want_old.exit_index, want_new.exit_index)
    gate, entered = threading.Event(), threading.Event()

    def hold(module, args):
        if not gate.is_set():
            entered.set()
            gate.wait(WAIT)

    model.stages[1].register_forward_pre_hook(hold)
    rt = ee.EERuntime(model, thresholds=old)
    with StageScheduler(rt, max_batch=8, workers=workers) as sched:
        before = [sched.submit_nowait(x[i : i + 4]) for i in range(0, 32, 4)]
        assert entered.wait(WAIT)  # some of them are past stage 0 with the old snapshot
        sched.set_thresholds(new)
        after = [sched.submit_nowait(x[i : i + 4]) for i in range(32, 64, 4)]
        gate.set()
        for want, futs, start in ((want_old, before, 0), (want_new, after, 32)):
            for j, f in enumerate(futs):
                a = start + 4 * j
                assert torch.equal(f.result(WAIT).exit_index, want.exit_index[a : a + 4])
    assert sched.thresholds == pytest.approx(new)


def test_bad_inputs_are_refused_at_submit_and_mismatched_layouts_never_share_a_batch():
    model = mlp_model(K=2, d_in=6, width=8, C=3)
    with StageScheduler(ee.EERuntime(model, thresholds=0.5), max_batch=8, max_queue_rows=8) as sched:
        with pytest.raises(TypeError, match="StageScheduler input"):
            sched.submit_nowait("not a tensor")
        # refused in the caller with what was wrong, never admitted (a 0-row request used to be
        # admitted and left pending forever: no row of it could ever leave)
        for x, err, what in [
            (torch.randn(0, 6), ValueError, "0 rows"),
            (torch.tensor(1.0), ValueError, "0-dim"),
            (torch.randn(2, 6, device="meta"), ValueError, "meta tensor"),
            (torch.randn(9, 6), ValueError, "can never be admitted"),
        ]:
            for submit in (sched.submit_nowait, sched.infer, lambda x: asyncio.run(sched.submit(x))):
                with pytest.raises(err, match=what):
                    submit(x)
        assert sched.pending() == 0 and sched.stats.submitted == 0
        good = sched.submit_nowait(torch.randn(3, 6))
        bad = sched.submit_nowait(torch.randn(2, 5))  # wrong width: fails alone, at stage 0
        assert isinstance(bad.exception(WAIT), StageFailed)
        assert good.result(WAIT).logits.shape == (3, 3)
    with pytest.raises(ValueError, match="max_batch"):
        StageScheduler(ee.EERuntime(model), max_batch=0)


def test_a_batch_gathers_rows_like_the_oldest_past_requests_of_other_layouts_and_snapshots():
    # Requests of two input layouts (rows of 3 and 5 columns) interleaved, and a threshold swap
    # between them: a batch takes every queued row sharing the oldest row's layout and snapshot,
    # in their order, passing over the others (which stay queued, in theirs). It used to stop at
    # the first unlike request, so interleaved layouts ran in batches of one request each.
    model, hook = scripted_model(2)
    rt = ee.EERuntime(model.eval(), thresholds=0.5, criterion="max_prob")

    def req(ident, width):
        rows = scripted_rows([ident, ident + 1], [0, 0])
        return torch.cat([rows, torch.zeros(2, width - 3)], 1)

    with StageScheduler(rt, max_batch=8, inline="never", max_defer_ms=0) as sched:
        with parked(sched):
            old = [(i, sched.submit_nowait(req(i, 3 if i % 20 == 0 else 5))) for i in (0, 10, 20, 30)]
            sched.set_thresholds(0.6)
            new = [(i, sched.submit_nowait(req(i, 3 if i % 20 == 0 else 5))) for i in (40, 50, 60)]
        for ident, f in old + new:
            got = f.result(WAIT)
            assert got.exit_index.tolist() == [0, 0] and got.logits.argmax(1).tolist() == [ident % 7, (ident + 1) % 7]
    assert [sorted(ids) for k, ids in hook.batches if k == 0] == [
        [0, 1, 20, 21],  # layout A, first snapshot
        [10, 11, 30, 31],  # layout B, first snapshot
        [40, 41, 60, 61],  # layout A, second snapshot
        [50, 51],
    ]


def test_gathering_past_other_layouts_splits_a_request_at_max_batch_and_keeps_queue_order():
    model, hook = scripted_model(2)
    rt = ee.EERuntime(model.eval(), thresholds=0.5, criterion="max_prob")
    a = [scripted_rows(list(range(i, i + 3)), [0] * 3) for i in (0, 100, 200)]  # 3 rows each
    b = torch.cat([scripted_rows([50, 51], [0, 0]), torch.zeros(2, 2)], 1)
    with StageScheduler(rt, max_batch=5, inline="never", max_defer_ms=0) as sched:
        with parked(sched):
            futures = [sched.submit_nowait(x) for x in (a[0], b, a[1], a[2])]
        for f, x in zip(futures, (a[0], b, a[1], a[2])):
            assert f.result(WAIT).logits.argmax(1).tolist() == [int(v) % 7 for v in x[:, 0]]
    # a[1] split at max_batch: its rest runs before a[2], and b (older) before either
    assert [ids for k, ids in hook.batches if k == 0] == [[0, 1, 2, 100, 101], [50, 51], [102, 200, 201, 202]]


WORKER = "eeruntime-stage-scheduler"  # the worker thread's default name


def in_thread(fn, *args):
    """Run fn(*args) in a new thread; returns (thread, box) where box[0] is its result or error."""
    box = []

    def run():
        try:
            box.append(fn(*args))
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            box.append(e)

    t = threading.Thread(target=run, name="caller")
    t.start()
    return t, box


def test_blocking_infer_on_an_idle_scheduler_runs_in_the_callers_thread_one_executor_at_a_time():
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    with StageScheduler(rt, max_batch=4) as sched:
        # idle: the whole request runs in this thread (no hand-off), and equals rt.infer
        x = scripted_rows([1, 2, 3], [0, 2, 1])
        got, want = sched.infer(x), rt.infer(x)
        assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.logits, want.logits)
        assert hook.ran_in(1) == hook.ran_in(2) == {threading.current_thread().name}
        d = sched.stats_dict()
        assert d["inline_requests"] == 1 and d["exits"] == [1, 1, 1] and d["batches"] == [1, 1, 1]
        assert d["requests"]["completed"] == 1 and sched.pending() == 0
        # a request with a timeout takes the worker's path (its timeout must fire mid-run)
        sched.infer(scripted_rows([4], [1]), timeout_s=WAIT)
        assert hook.ran_in(4) == {WORKER}
        # larger than max_batch: the worker splits it
        sched.infer(scripted_rows(list(range(10, 15)), [0] * 5))
        assert hook.ran_in(10) == {WORKER} and sched.stats_dict()["inline_requests"] == 1

        # while a caller runs inline, the worker runs nothing: arrivals wait and then share batches
        hook.hold(0, trigger=20)
        caller, box = in_thread(sched.infer, scripted_rows([20, 21], [2, 2]))
        assert hook.entered.wait(WAIT)
        assert hook.ran_in(20) == {"caller"}
        b = sched.submit_nowait(scripted_rows([22], [1]))
        c = sched.submit_nowait(scripted_rows([23], [0]))
        blocked = sched.infer  # not idle any more: this caller waits for the worker
        other, obox = in_thread(blocked, scripted_rows([24], [2]))
        time.sleep(0.1)
        assert not {22, 23, 24} & set(hook.seen()) and not b.done() and not c.done()
        hook.gate.set()
        caller.join(WAIT)
        other.join(WAIT)
        assert box[0].exit_index.tolist() == [2, 2] and obox[0].exit_index.tolist() == [2]
        check_answers([([22], [1]), ([23], [0])], [b, c])
        # the arrivals ran on the worker, together at stage 0
        assert hook.ran_in(22) == hook.ran_in(24) == {WORKER}
        assert any(k == 0 and {22, 23, 24} <= set(ids) for k, ids in hook.batches)
        assert sched.stats_dict()["inline_requests"] == 2 and drained(sched)


def test_inline_failure_and_shutdown_leave_no_request_pending():
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    hook.fail_if = lambda k, ids: k == 1 and 5 in ids
    sched = StageScheduler(rt, max_batch=4)
    with pytest.raises(StageFailed, match="injected failure at stage 1") as info:
        sched.infer(scripted_rows([5, 6], [2, 0]))
    assert isinstance(info.value.__cause__, RuntimeError) and sched.pending() == 0
    assert sched.infer(scripted_rows([7], [2])).exit_index.tolist() == [2]  # and it goes on
    assert sched.stats_dict()["inline_requests"] == 2 and sched.stats.stage_failures == 1

    # close(drain=True) waits for the request running inline
    hook.hold(1, trigger=8)
    caller, box = in_thread(sched.infer, scripted_rows([8], [2]))
    assert hook.entered.wait(WAIT)
    threading.Timer(0.1, hook.gate.set).start()
    sched.close(drain=True)
    caller.join(WAIT)
    assert box[0].exit_index.tolist() == [2] and sched.pending() == 0

    # close(drain=False) fails it (the caller sees SchedulerClosed once its step returns)
    sched = StageScheduler(rt, max_batch=4)
    hook.hold(1, trigger=9)
    caller, box = in_thread(sched.infer, scripted_rows([9], [2]))
    assert hook.entered.wait(WAIT)
    sched.close(drain=False)
    assert sched.pending() == 0
    hook.gate.set()
    caller.join(WAIT)
    assert isinstance(box[0], SchedulerClosed)
    with pytest.raises(SchedulerClosed):
        sched.infer(scripted_rows([0], [0]))


def test_an_idle_scheduler_does_not_wait_its_batching_window_a_busy_one_does():
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    hour = 3_600_000.0  # max_wait_ms: a request that waited it would outlive the test
    with StageScheduler(rt, max_batch=4, max_wait_ms=hour) as sched:
        # admitted to an idle scheduler: every stage of it runs at once (worker path, submit_nowait)
        check_answers([([1, 2], [0, 2])], [sched.submit_nowait(scripted_rows([1, 2], [0, 2]))])
        assert hook.ran_in(2) == {WORKER}
        # busy: a request admitted while another is pending waits for a full batch (or the window)
        hook.hold(0, trigger=3)
        a = sched.submit_nowait(scripted_rows([3], [2]))
        assert hook.entered.wait(WAIT)
        b = sched.submit_nowait(scripted_rows([10, 11], [0, 0]))
        hook.gate.set()
        check_answers([([3], [2])], [a])  # a's survivors (admitted idle) did not wait either
        time.sleep(0.1)
        assert not b.done() and not {10, 11} & set(hook.seen())
        c = sched.submit_nowait(scripted_rows([12, 13], [0, 0]))  # 4 rows: a full batch
        check_answers([([10, 11], [0, 0]), ([12, 13], [0, 0])], [b, c])
        assert (0, [10, 11, 12, 13]) in hook.batches


def test_inline_modes_always_and_never():
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    me = threading.current_thread().name
    with StageScheduler(rt, max_batch=4, inline="always") as sched:
        sched._clock = lambda: 0.0  # no time passes: only the quiet-period rule below needs it
        f = sched.submit_nowait(scripted_rows([1, 2], [1, 2]))
        assert f.done() and hook.ran_in(1) == {me}  # ran here, before submit_nowait returned

        async def one():
            return await sched.submit(scripted_rows([3], [0]))

        assert asyncio.run(one()).exit_index.tolist() == [0] and hook.ran_in(3) == {me}
        check_answers([([1, 2], [1, 2])], [f])
        assert sched.stats_dict()["inline_requests"] == 2
    # under load a lone submitting thread must not answer every request alone: with "always",
    # a request that arrives before the scheduler has been idle for as long as the last inline
    # run took goes to the worker (a fake clock: the stage hook advances it by 1 s)
    fake = [10.0]
    hook.hold_if = lambda k, ids: k == 0 and 30 in ids and fake.__setitem__(0, fake[0] + 1.0)
    with StageScheduler(rt, max_batch=4, inline="always") as sched:
        sched._clock = lambda: fake[0]
        first = sched.submit_nowait(scripted_rows([30], [1]))  # idle: inline; "takes" 1 s
        assert first.done() and hook.ran_in(30) == {me}
        fake[0] += 0.5  # the next request arrives 0.5 s after that answer: a backlog
        assert sched.submit_nowait(scripted_rows([31], [2])).result(WAIT).exit_index.tolist() == [2]
        assert hook.ran_in(31) == {WORKER}
        fake[0] += 1.0  # idle for 1 s since the last answer: inline again
        assert sched.submit_nowait(scripted_rows([32], [0])).done() and hook.ran_in(32) == {me}
        # the blocking infer needs no quiet period: its caller cannot submit anything meanwhile
        assert sched.infer(scripted_rows([33], [0])).exit_index.tolist() == [0] and hook.ran_in(33) == {me}
    hook.hold_if = None
    with StageScheduler(rt, max_batch=4, inline="never") as sched:
        assert sched.infer(scripted_rows([4], [2])).exit_index.tolist() == [2]
        assert hook.ran_in(4) == {WORKER} and sched.stats_dict()["inline_requests"] == 0
    with pytest.raises(ValueError, match="inline must be one of"):
        StageScheduler(rt, inline="sometimes")


@pytest.mark.parametrize("max_wait_ms", [3_600_000.0, 0.0])
def test_fill_policy_runs_the_fullest_stage_so_deeper_batches_fill(max_wait_ms):
    """policy="fill": with rows at stage 1 (2) and stage 0 (3), stage 0 runs first and its
    survivors join stage 1's rows in one full batch; a row that waited max_wait_ms (at 0: at
    once) makes its stage run first, which is the "deepest" policy."""
    model, hook = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    with StageScheduler(rt, max_batch=4, max_wait_ms=max_wait_ms, policy="fill") as sched:
        second, entered2 = threading.Event(), threading.Event()

        def hold_if(k, ids):
            if k == 0 and 3 in ids:  # the second stage-0 batch waits on its own gate
                entered2.set()
                assert second.wait(WAIT)
            return k == 0 and 100 in ids

        hook.hold(0)
        hook.hold_if = hold_if
        a = sched.submit_nowait(scripted_rows([100], [0]))  # idle: runs at once, held in stage 0
        assert hook.entered.wait(WAIT)
        b = sched.submit_nowait(scripted_rows([1, 2], [2, 2]))
        c = sched.submit_nowait(scripted_rows([3], [0]))
        hook.gate.set()
        assert entered2.wait(WAIT)  # stage 0 runs [1, 2, 3]
        d = sched.submit_nowait(scripted_rows([5, 6, 7], [1, 1, 1]))  # stage 0: 3 rows; stage 1: [1, 2] next
        second.set()
        check_answers([([100], [0]), ([1, 2], [2, 2]), ([3], [0]), ([5, 6, 7], [1, 1, 1])], [a, b, c, d])
        stage1 = [ids for k, ids in hook.batches if k == 1]
        if max_wait_ms:
            assert stage1[0] == [1, 2, 5, 6]  # stage 0's three ran first, then one full stage-1 batch
        else:
            assert stage1[0] == [1, 2]  # overdue at once: the deepest stage first
        assert sched.stats_dict()["policy"] == "fill"
    with pytest.raises(ValueError, match="policy must be one of"):
        StageScheduler(rt, policy="fullest")


def test_fill_policy_takes_the_deepest_of_full_stages_however_far_past_max_batch_they_reach():
    """Two full stages, the shallower holding more rows past max_batch (chunks of several rows
    overshoot it by different amounts): "the deepest full stage" is the deeper one. The pick is
    read on the queues of a closed scheduler (no worker to take them meanwhile)."""
    from eeruntime.serve.scheduler import _Chunk

    model, _ = scripted_model(3)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    sched = StageScheduler(rt, max_batch=4, max_wait_ms=3_600_000.0, policy="fill")
    sched.close()
    later = time.perf_counter() + 3600  # no row overdue
    chunk = lambda n: _Chunk(range(n), None, None, None, None, later)  # noqa: E731
    sched._queues[1].extend([chunk(3), chunk(2)])  # 5 rows
    sched._queues[0].extend([chunk(3), chunk(4)])  # 7 rows
    assert sched._pick_fill(time.perf_counter()) == 1
    sched._queues[1].clear()
    sched._queues[1].append(chunk(2))  # not full: the fullest, stage 0, runs
    assert sched._pick_fill(time.perf_counter()) == 0


def test_freeze_startup_objects_takes_them_out_of_full_collections():
    # In a fresh process (freezing is process-wide): before, a full collection walks every object
    # torch and eeruntime created at import (gc.get_objects(2), the oldest generation); after
    # freeze_startup_objects they are frozen, and what is created later is collected as usual.
    code = """
import gc, sys
import eeruntime.serve as s
gc.collect()
before = len(gc.get_objects(2))
frozen = s.freeze_startup_objects()
after = len(gc.get_objects(2))
class Cycle: pass
a = Cycle(); a.me = a; del a
got = gc.collect()
print(before, frozen, after, got, s.gc_stats()["frozen_objects"])
"""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    before, frozen, after, collected, reported = map(int, out.stdout.split()[-5:])
    assert before > 10_000 and frozen > 0.9 * before and after < 100, (before, frozen, after)
    assert collected >= 1 and reported == frozen  # a cycle made later is still collected


def test_set_switch_interval_sets_and_returns_the_previous_one():
    from eeruntime.serve import set_switch_interval

    before = sys.getswitchinterval()
    try:
        assert set_switch_interval(2e-4) == before and sys.getswitchinterval() == pytest.approx(2e-4)
        assert set_switch_interval(before) == pytest.approx(2e-4)
        for bad in (0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="must be > 0"):
                set_switch_interval(bad)
    finally:
        sys.setswitchinterval(before)
    assert sys.getswitchinterval() == before


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # (torch 2.13 deprecates tracing; it works)
@pytest.mark.parametrize("freeze", [False, True], ids=["traced", "traced-and-frozen"])
def test_torchscript_stages_serve_like_their_eager_modules(freeze):
    """Stages and exits traced by torch.jit (frozen or not: a frozen module has no training flag,
    which the runtime's eval-mode check must not need) give rt.infer's and the scheduler's answers
    of the eager model; docs/serving.md, "Several workers", says why one would."""
    import copy

    from eeruntime.zoo import resnet_style

    torch.manual_seed(0)
    model = resnet_style(num_classes=10, widths=(8, 16, 16, 32), blocks=(1, 1, 1, 1)).eval()
    x = torch.randn(96, 3, 32, 32)
    thresholds = thresholds_for(model, x, [0.3, 0.3, 0.2], "entropy")
    traced = copy.deepcopy(model)
    with torch.no_grad():
        h = x[:8]
        for k in range(len(traced.stages)):
            out = traced.stages[k](h)
            stage, head = torch.jit.trace(traced.stages[k], h), torch.jit.trace(traced.exits[k], out)
            traced.stages[k], traced.exits[k] = (
                (torch.jit.freeze(stage), torch.jit.freeze(head)) if freeze else (stage, head)
            )
            h = out
    want = ee.EERuntime(model, thresholds=thresholds, criterion="entropy").infer(x)
    assert len(set(want.exit_index.tolist())) == 4  # every exit serves some rows
    rt = ee.EERuntime(traced, thresholds=thresholds, criterion="entropy")
    got = rt.infer(x)
    assert torch.equal(got.exit_index, want.exit_index)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    with StageScheduler(rt, max_batch=8, workers=2) as sched:
        futures = [sched.submit_nowait(x[i : i + 3]) for i in range(0, x.shape[0], 3)]
        answers = [f.result(WAIT) for f in futures]
    assert torch.equal(torch.cat([a.exit_index for a in answers]), want.exit_index)
    torch.testing.assert_close(torch.cat([a.logits for a in answers]), want.logits, rtol=1e-5, atol=1e-5)


def _serve_calls(n, rt, x):
    """Calls of functions defined in eeruntime/serve/ (counted by a profile hook, not timed): per
    submit in the submitting thread, and in the worker while it answers ``n`` single-row requests
    gathered into one batch run in one pass (from its wake-up to its next sleep)."""
    serve_dir = str(Path(ee.serve.__file__).parent)
    counting, calls = [False], {}

    def hook(frame, event, arg):
        if counting[0] and event == "call" and frame.f_code.co_filename.startswith(serve_dir):
            ident = threading.get_ident()
            calls[ident] = calls.get(ident, 0) + 1

    threading.setprofile(hook)  # (threads started from now on: the scheduler's worker)
    try:
        sched = StageScheduler(rt, max_batch=n, inline="never", max_defer_ms=0)
    finally:
        threading.setprofile(None)
    try:
        sched.infer(x[:1])
        with sched._cv:  # park the worker, as an inline caller does (see _step): wake it to see that
            sched._inline = True
            sched._cv.notify_all()
        end = time.monotonic() + WAIT
        while sched._after_inline != 1:
            assert time.monotonic() < end, "the worker did not park"
            time.sleep(0.001)
        main = threading.get_ident()
        sys.setprofile(hook)
        counting[0] = True
        futures = [sched.submit_nowait(x[i : i + 1]) for i in range(n)]
        counting[0] = False
        sys.setprofile(None)
        per_submit = calls.pop(main, 0) / n
        counting[0] = True
        with sched._cv:
            sched._inline = False
            sched._cv.notify_all()
        results = [f.result(WAIT) for f in futures]
        while sched._sleeping != 1:  # (its next turn found nothing to run)
            assert time.monotonic() < end, "the worker did not go back to sleep"
            time.sleep(0.001)
        counting[0] = False
        stats = sched.stats_dict()
    finally:
        sched.close()
    assert stats["fused_batches"] == 2 and stats["batches"][0] == 2  # the warm-up's and the n rows'
    ref = rt.infer(x[:n])
    for i, r in enumerate(results):
        torch.testing.assert_close(r.logits, ref.logits[i : i + 1], rtol=1e-5, atol=1e-6)
    (worker_calls,) = calls.values()
    return per_submit, worker_calls


def test_the_machinery_calls_no_function_per_request_in_a_pass_and_three_per_submit():
    """The serving machinery's Python per request, where the host is the bound (docs/serving.md,
    "The serving machinery's own cost"), counted rather than timed: a submit calls three functions
    of eeruntime.serve (submit_nowait, _submit and the request's constructor; the future has no
    constructor of its own), and
    the worker calls as many of them to answer a pass of 32 single-row requests as of 8 (no call
    per request: its per-request work is inline)."""
    model = mlp_model(K=3, d_in=6, width=16, C=5, seed=1)
    x = torch.randn(64, 6)
    rt = ee.EERuntime(model, thresholds=thresholds_for(model, x, [0.35, 0.3], "max_prob"), criterion="max_prob")
    submit8, worker8 = _serve_calls(8, rt, x)
    submit32, worker32 = _serve_calls(32, rt, x)
    assert submit8 == submit32 == 3
    assert worker8 == worker32, (worker8, worker32)


def test_rows_of_a_request_leaving_out_of_order_reach_their_own_places():
    """With two workers, the parts of a request split across batches can come back to one batch in
    another order (here rows 1, 3, 2, 4 of six, then 5 and 0; and all four rows of another as 0, 2,
    1, 3): every row's answer must land in its own place, the places read from the row ids (not
    from the first and the last alone, which 16ad115's whole-request check did)."""
    from eeruntime.serve.scheduler import ROW_BITS, _Request

    model = mlp_model(K=3, d_in=6, width=16, C=5, seed=1)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    sched = StageScheduler(rt, max_batch=8, inline="never")
    try:
        future = concurrent.futures.Future()
        seq = 10**6  # (no request of the scheduler's own numbering)
        with sched._cv:
            sched._register(_Request(seq, 6, future, rt.thresholds_snapshot(), time.perf_counter(), None, None))
        want_logits, want_conf, want_exit = torch.zeros(6, 5), torch.zeros(6), torch.zeros(6, dtype=torch.int64)
        for k, order in ((1, [1, 3, 2, 4]), (2, [5, 0])):
            logits = torch.randn(len(order), 5)
            conf = torch.rand(len(order))
            for t, row in enumerate(order):
                want_logits[row], want_conf[row], want_exit[row] = logits[t], conf[t], k
            assert not future.done()
            sched._deliver(k, [(seq << ROW_BITS) + row for row in order], logits, conf)
        got = future.result(WAIT)
        assert torch.equal(got.logits, want_logits) and torch.equal(got.confidence, want_conf)
        assert got.exit_index.tolist() == want_exit.tolist() == [2, 1, 1, 1, 1, 2]
        # all four rows of a request leaving together, out of order: not views taken in order
        future = concurrent.futures.Future()
        with sched._cv:
            sched._register(_Request(seq + 1, 4, future, rt.thresholds_snapshot(), time.perf_counter(), None, None))
        order, logits, conf = [0, 2, 1, 3], torch.randn(4, 5), torch.rand(4)
        sched._deliver(0, [((seq + 1) << ROW_BITS) + row for row in order], logits, conf)
        got = future.result(WAIT)
        assert torch.equal(got.logits[order], logits) and torch.equal(got.confidence[order], conf)
        assert sched.pending() == 0
    finally:
        sched.close()


@pytest.mark.parametrize("options", [{}, {"fused": False}, {"policy": "request"}, {"policy": "fill"}])
def test_a_model_put_back_in_train_mode_is_served_in_eval_mode_saying_so(options):
    """model.train() after the runtime was built (BatchNorm would then use each batch's own
    statistics: a row's answer would depend on its batch-mates): the scheduler's steps run the
    runtime's guard, which puts the model back in eval mode with a warning, as rt.infer does, so
    every answer equals rt.infer of the model in eval mode."""
    import copy

    from eeruntime.zoo import digits_cnn

    torch.manual_seed(5)
    model = digits_cnn()
    for m in model.modules():  # running statistics unlike any batch's (train mode would ignore them)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(16, 1, 8, 8)
    with pytest.warns(UserWarning, match="put .* in eval mode"):
        rt = ee.EERuntime(model, thresholds=[2.2, 2.25], criterion="entropy")
    ref = ee.EERuntime(copy.deepcopy(model), thresholds=rt.thresholds, criterion="entropy").infer(x)
    model.train()
    # it matters (on copies: a forward in train mode updates the running statistics)
    assert not torch.allclose(copy.deepcopy(model).stages[0](x[:4]), copy.deepcopy(model).eval().stages[0](x[:4]))
    sched = StageScheduler(rt, max_batch=8, **options)
    try:
        with pytest.warns(UserWarning, match="EERuntime call: put .* in eval mode"):
            futures = [sched.submit_nowait(x[i : i + 4]) for i in range(0, 16, 4)]
            got = [f.result(WAIT) for f in futures]
    finally:
        sched.close()
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.cat([g.exit_index for g in got]), ref.exit_index)
    torch.testing.assert_close(torch.cat([g.logits for g in got]), ref.logits, rtol=1e-5, atol=1e-6)


def test_a_timeout_past_what_a_thread_can_wait_leaves_the_timeout_thread_running():
    """timeout_s=1e10 (finite, beyond threading.TIMEOUT_MAX, about 9.2e9 s) stopped the timeout
    thread (OverflowError: timestamp out of range), after which no request timed out any more,
    as an inf one did until session 21. Now its waits are bounded: a later request's own short
    timeout still fires, and the long one's request is answered."""
    model = mlp_model(K=3, d_in=6, width=16, C=5, seed=3)
    rt = ee.EERuntime(model, thresholds=[0.9, 0.9], criterion="max_prob")
    x = torch.randn(2, 6)
    with StageScheduler(rt, max_batch=8, timeout_s=1e10, inline="never") as sched:
        with parked(sched):
            slow = sched.submit_nowait(x[:1])
            time.sleep(0.05)  # (the timeout thread waits on the first deadline now)
            short = sched.submit_nowait(x[1:], timeout_s=0.05)
            try:
                err = short.exception(5)
            except concurrent.futures.TimeoutError:
                err = None  # (never failed: the timeout thread had stopped)
            assert isinstance(err, TimeoutError) and "timed out before" in str(err), err
        assert torch.equal(slow.result(WAIT).exit_index, rt.infer(x[:1]).exit_index)
        assert sched.stats_dict()["requests"]["timeouts"] == 1

"""Everything at once: random scheduler settings, requests of 1-6 rows from three blocking
submitters and one asyncio caller, random timeouts, cancellations, injected stage failures, slow
stages, threshold swaps, requests of three input layouts (which must never share a batch) and a
shutdown (draining or failing) that may come while requests still arrive. The scripted model says
exactly what each request's answer must be (its rows' classes and exits), so every answer is
checked, and every request must end: answered right, or failed with the error its case allows.
(These runs found three faults, each now a test of its own in test_serve_scheduler.py: two in the
asyncio path, and rows left queued after a shutdown that failed their requests.)"""

import asyncio
import concurrent.futures
import functools
import gc
import random
import threading
import time

import pytest
import torch
from serve_models import C, scripted_model, scripted_rows

import eeruntime as ee
from eeruntime.serve import SchedulerClosed, SchedulerFull, StageScheduler

WAIT = 30.0


def settings(rng):
    K = rng.choice([2, 3, 4])
    policy = rng.choice(["deepest", "deepest", "fill", "request"])
    kw = dict(
        max_batch=rng.choice([1, 2, 5, 8, 16]),
        workers=rng.choice([1, 2]),
        policy=policy,
        max_wait_ms=rng.choice([0.0, 0.5, 3.0]),
        inline=rng.choice(["blocking", "always", "never"]),
        max_queue_rows=rng.choice([10_000, 40]),
        when_full=rng.choice(["error", "wait"]),
    )
    if policy == "deepest":
        kw.update(max_defer_ms=rng.choice([0.0, 2.0, None]), fused=rng.choice([True, False]))
    if policy == "fill" and kw["max_wait_ms"] == 0:
        kw["max_wait_ms"] = 1.0  # (fill with no wait is "deepest")
    return K, kw


@functools.cache  # (each seed runs once: both tests below read it)
def chaos_run(seed):
    """One run; returns (settings, the outcomes counted, what went wrong, whether it was shut down
    while requests still arrived)."""
    rng = random.Random(seed)
    K, kw = settings(rng)
    model, hook = scripted_model(K)
    rt = ee.EERuntime(model, thresholds=0.9, criterion="max_prob")
    failing = set(rng.sample(range(1500), rng.choice([0, 0, 5])))  # rows whose batch raises
    slow = rng.choice([0.0, 0.0, 0.0003, 0.002])  # seconds per stage call: queues build up
    mixed = rng.random() < 0.3  # requests of three layouts (a wider row, float64)

    def fail_if(k, ids):
        if slow:
            time.sleep(slow)
        return any(i in failing for i in ids)

    hook.fail_if = fail_if
    sched = StageScheduler(rt, **kw)
    lock, next_id, records = threading.Lock(), [0], []  # records: (ids, exits, future, timeout)

    def request(r):
        n = r.randint(1, 6)
        with lock:
            ids = list(range(next_id[0], next_id[0] + n))
            next_id[0] += n
        exits = [r.randrange(K) for _ in ids]
        x = scripted_rows(ids, exits)
        if mixed and r.random() < 0.5:  # another layout: such rows must never share a batch
            x = torch.cat([x, x[:, 2:]], 1) if r.random() < 0.5 else x.double()
        return ids, exits, x

    def blocking(s):
        r = random.Random(s)
        for _ in range(50):
            ids, exits, x = request(r)
            timeout = r.choice([None, None, None, 0.0005, 0.01])
            try:
                if r.random() < 0.2:
                    f = concurrent.futures.Future()
                    try:
                        f.set_result(sched.infer(x, timeout_s=timeout))
                    except Exception as e:  # noqa: BLE001  (judged below with the rest)
                        f.set_exception(e)
                else:
                    f = sched.submit_nowait(x, timeout_s=timeout)
                    if r.random() < 0.1:
                        f.cancel()
            except (SchedulerFull, SchedulerClosed, TimeoutError):
                continue  # refused at the door: nothing admitted
            with lock:
                records.append((ids, exits, f, timeout))
            if r.random() < 0.2:
                time.sleep(r.random() * 0.002)
            if r.random() < 0.03:
                sched.set_thresholds(0.9)

    def via_asyncio(s):
        r = random.Random(s)

        async def one(x, timeout, cancel):
            task = asyncio.ensure_future(sched.submit(x, timeout_s=timeout))
            if cancel:
                await asyncio.sleep(r.random() * 0.003)
                task.cancel()
            try:
                return await task
            except BaseException as e:  # noqa: BLE001  (judged below)
                return e

        async def main():
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda _loop, context: logged.append(context))
            items = []
            for _ in range(40):
                ids, exits, x = request(r)
                items.append((ids, exits, x, r.choice([None, None, 0.002]), r.random() < 0.1))
            outs = await asyncio.gather(*(one(x, t, c) for _, _, x, t, c in items))
            await asyncio.sleep(0.05)  # answers posted late reach the loop
            gc.collect()  # (an error never retrieved is logged when its future goes)
            return items, outs

        items, outs = asyncio.run(main())
        for (ids, exits, _, timeout, _), out in zip(items, outs):
            f = concurrent.futures.Future()
            if isinstance(out, asyncio.CancelledError):
                f.cancel()
            elif isinstance(out, BaseException):
                f.set_exception(out)
            else:
                f.set_result(out)
            with lock:
                records.append((ids, exits, f, timeout))

    logged = []
    crashed = []  # a submitter that raised (its requests would go unchecked otherwise)

    def guarded(fn, s):
        try:
            fn(s)
        except BaseException as e:  # noqa: BLE001  (reported below)
            crashed.append(repr(e))

    threads = [threading.Thread(target=guarded, args=(blocking, seed * 10 + t)) for t in range(3)]
    threads.append(threading.Thread(target=guarded, args=(via_asyncio, seed * 10 + 7)))
    drain = rng.random() < 0.7
    early = rng.random() < 0.4  # shut down while requests still arrive
    for t in threads:
        t.start()
    if early:
        time.sleep(rng.random() * 0.05)
        sched.close(drain=drain, timeout_s=WAIT)
    for t in threads:
        t.join(WAIT)
    sched.close(drain=drain, timeout_s=WAIT)

    wrong, counts = [], {}
    for ids, exits, f, timeout in records:
        try:
            f.exception(WAIT)
        except concurrent.futures.CancelledError:
            pass
        except concurrent.futures.TimeoutError:
            wrong.append(("left pending", ids))
            continue
        e = None if f.cancelled() else f.exception()
        kind = "cancelled" if f.cancelled() else type(e).__name__ if e else "answered"
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "answered":
            res = f.result()
            if res.logits.argmax(1).tolist() != [i % C for i in ids] or res.exit_index.tolist() != exits:
                wrong.append(("wrong rows", ids, exits, res.exit_index.tolist()))
        elif kind == "StageFailed" and not failing:
            wrong.append(("failed with no failure injected", ids))
        elif kind == "TimeoutError" and timeout is None:
            wrong.append(("timed out with no timeout", ids))
        elif kind == "SchedulerClosed" and drain and not early:
            wrong.append(("closed while draining", ids))
        elif kind not in ("cancelled", "StageFailed", "TimeoutError", "SchedulerClosed", "SchedulerFull"):
            wrong.append((kind, ids, repr(e)))
    if sched.pending() or sched.queue_depths() != [0] * K:
        wrong.append(("pending after close", sched.pending(), sched.queue_depths()))
    wrong += [("logged by asyncio", c.get("message")) for c in logged]
    wrong += [("a submitter crashed", e) for e in crashed]
    return kw, counts, wrong, early


@pytest.mark.parametrize("seed", range(16))
def test_every_request_ends_with_its_own_rows_or_the_error_its_case_allows(seed):
    kw, counts, wrong, early = chaos_run(seed)
    assert not wrong, (kw, wrong[:5])
    # (a run shut down early may end before any request is answered: on a loaded machine the
    # submitters may barely have started, seen in CI once: 22 timeouts, 69 closed, 1 cancelled)
    assert counts.get("answered", 0) > 0 or early, (kw, counts)


def test_the_runs_reach_every_outcome():
    """The seeds above are not a quiet subset: between them they answer, time out, cancel,
    fail a stage and shut down with requests pending."""
    seen = set()
    for seed in range(16):
        seen |= set(chaos_run(seed)[1])
    assert seen >= {"answered", "TimeoutError", "cancelled", "StageFailed", "SchedulerClosed"}, seen

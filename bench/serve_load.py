"""Open-loop load benchmark of serving (in-process, no network): Poisson arrivals of single samples.

For each model and arrival rate it runs, back to back at the same rate,

  direct:       no serving machinery: the generator calls rt.infer on each request itself,
  (a) plain:    the plain model (every stage, final exit) behind request-level dynamic batching,
  (b) ee-req:   EERuntime.infer behind the same request-level dynamic batching,
  (c) stage:    ee.serve.StageScheduler with its defaults (rows of all requests re-batched at every
                stage; max_defer_ms None: 20 ms on a CPU, full batches first once stage 0 holds a
                full batch, a partial one passed over for at most 20 ms), every request through its
                worker thread (inline="never": an asyncio server's path),
  stage-nodefer: (c) with max_defer_ms=0: the deepest ready stage first, always (the default
                before session 9),
  stage-inline: the same with inline="always" (a request finding it idle runs in the caller),
  stage-steps:  (c) with fused=False: every batch step by step (rt.run_stage per stage), never in
                one pass (not in the default set),
  stage-wait:   (c) with max_wait_ms = --wait-ms: a stage short of max_batch rows waits that long
                for more, so deeper stages run fuller batches under load (not in the default set),
  stage-fill:   (c) with policy="fill": the fullest stage runs first, a row passed over for
                --wait-ms goes first (not in the default set),
  stage-defer:  (c) with max_defer_ms = --defer-ms: once stage 0 holds a full batch, full batches
                run first, so survivors wait (up to that long) at deeper stages for the next
                stage-0 batches' survivors and deeper batches fill (E3's aim; not in the default
                set: on a CPU, stage is stage-defer@20),
  stage-request: (b) inside the scheduler: StageScheduler(policy="request"), request-level
                batching with the scheduler's own machinery (its submit, snapshots, statistics,
                answers), so that (c) against it measures what re-batching buys with the
                per-request Python held equal (not in the default set; session 19),
  stage-behindN: (c) with stage 0 counted as behind (deferral's trigger) only once it holds N
                full batches, not one (e.g. stage-behind3; the scheduler's _behind_batches; not in
                the default set; replayed in session 18, run for real in session 19),

and records throughput and p50/p99 latency, measured from each request's *scheduled* arrival
(open loop: a late generator does not hide queueing). The SLO is 10x the plain model's batch-1
latency measured in the same run; a rate is sustained when p99 <= SLO and every request was
answered. Also measured, side by side, one request at a time: rt.infer, sched.infer (inline) and
submit through the worker thread (the serving machinery's own cost at light load).

SEARCH: the rate grid is coarse (multiples of the plain model's capacity), so after it each system's
highest sustained rate is found by search (find_max_sustained; --no-search skips it): a bracket
[lo, hi] per system, lo = the grid's highest sustained rate (checked first; if it fails, the
search starts again from the grid's lowest rate; a system failing there in two probes reports 0),
hi = 1.1x its saturated throughput, bisected geometrically until hi/lo <= 1 + --search-tol (5%).
Each probe is --search-repeats open-loop runs (3; at least --search-min-requests requests each),
judged by the median-p99 run. The systems' bisections run in lockstep, each round every system still
searching probed at its own midpoint in a rotated order, so a slow spell of a shared machine hits
them alike. Reported per system: the found rate (its highest sustained probe), the bracket, and
the found rate over ee-req's and over plain's (the issue's targets: stage >= 1.05x ee-req and
>= 2x plain at the SLO); every probe is in the JSON ("search"). "direct" is not searched.

NEAR SATURATION: after the grid, the issue's "near (b)'s saturation rate, (c)'s p99 is at most
half of (b)'s" is measured directly: open loop at --near-fractions (0.85, 0.95, 1.0) of ee-req's saturated
throughput measured in the same run, ee-req and every stage system --near-repeats (3) times in a
rotated order, judged by the median p99. The report also gives each stage system's p99 over
ee-req's at every grid rate ("(c) is never worse than (b) at any rate").

    python bench/serve_load.py                      # both models, the default rate grid
    python bench/serve_load.py --quick              # a smoke run (seconds)
    python bench/serve_load.py --device cuda --models resnet,resnet18 --max-batch 64   # on a GPU

On a GPU the requests' inputs are already on the device and every answer's logits are copied back
to the host when its request completes (an HTTP server must do both); (b) runs rt.infer and (c)
runs rt.run_stage, both replaying the CUDA graphs captured before the first rate.

Writes bench/results/serve-<device>-<date>.{json,md} and a latency-vs-throughput PNG.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import random
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import device_info, device_slug, thresholds_for_fractions  # noqa: E402

import eeruntime as ee  # noqa: E402
from eeruntime.cost import measure_costs  # noqa: E402
from eeruntime.criteria import lower_is_confident  # noqa: E402
from eeruntime.oracle import plain_forward  # noqa: E402
from eeruntime.runtime import InferenceResult  # noqa: E402
from eeruntime.serve import StageScheduler, freeze_startup_objects, set_switch_interval  # noqa: E402
from eeruntime.serve.stats import percentile  # noqa: E402
from eeruntime.state import cat_rows  # noqa: E402
from eeruntime.thresholds import ThresholdSnapshot  # noqa: E402
from eeruntime.timing import side_by_side  # noqa: E402
from eeruntime.zoo import digits_cnn, resnet_style, vit_style  # noqa: E402


class RequestBatcher:
    """Request-level dynamic batching, the usual serving baseline: a worker takes every request
    waiting (up to ``max_batch``), stacks them, runs ``fn`` on the batch, splits the answers.
    With ``workers`` > 1, as many threads do so at once from the one queue (a server's worker
    pool: TorchServe's workers, several ``@serve.batch`` replicas)."""

    def __init__(self, fn, max_batch: int, workers: int = 1, answers=None, collate=None):
        self.fn, self.max_batch = fn, max_batch
        # answers(out, n): the n requests' answers from fn's output (default: rows of a tensor)
        self.answers = answers or (lambda out, n: [out[i : i + 1] for i in range(n)])
        # collate(inputs): the batch fn runs on (default: stacked; bench/serve_text_load.py pads)
        self.collate = collate or torch.cat
        self._cv = threading.Condition()
        self._queue = []
        self._stop = False
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        self._worker = self._workers[0]
        for w in self._workers:
            w.start()

    def submit_nowait(self, x):
        f = concurrent.futures.Future()
        with self._cv:
            self._queue.append((x, f))
            self._cv.notify()
        return f

    def close(self):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for w in self._workers:
            w.join()

    def _run(self):
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queue:
                    return
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            out = self.fn(self.collate([x for x, _ in batch]))
            for (_, f), answer in zip(batch, self.answers(out, len(batch))):
                f.set_result(answer)


class Direct:
    """No serving machinery: the load generator itself calls ``fn`` on each request as it arrives
    (open loop all the same: a request that arrives while the previous one runs starts late, and
    its latency counts from its scheduled arrival). The light-load reference of rt.infer."""

    def __init__(self, fn):
        self.fn = fn

    def submit_nowait(self, x):
        f = concurrent.futures.Future()
        f.set_result(self.fn(x))
        return f

    def close(self):
        pass


def plain_system(model, max_batch, workers=1):
    return RequestBatcher(lambda x: plain_forward(model, x), max_batch, workers)


def ee_request_system(rt, max_batch, workers=1):
    return RequestBatcher(lambda x: rt.infer(x).logits, max_batch, workers)


def _result_rows(res: InferenceResult, n: int):
    # one split per output for the whole batch, as the scheduler's answers are made
    return map(InferenceResult, res.logits.split(1), res.exit_index.split(1), res.confidence.split(1))


def ee_request_full_system(rt, max_batch, workers=1):
    """(b) answering what the scheduler answers: each request's InferenceResult (logits, exit
    index and confidence, views of the batch's), where ee-req answers its logits alone."""
    return RequestBatcher(rt.infer, max_batch, workers, answers=_result_rows)


def _to_host(f) -> None:
    """Copy a finished request's logits to the host (a no-op on CPU): the answer is only there
    once a GPU's work for it is done and copied back."""
    try:
        res = f.result()
    except Exception:  # noqa: BLE001  (an unanswered request counts as such; its error is not ours)
        return
    logits = getattr(res, "logits", res)
    if logits.is_cuda:
        logits.cpu()


def open_loop(system, pool, rate: float, n: int, time_limit_s: float, drain_s: float, seed: int) -> dict:
    """Submit ``n`` single samples at Poisson arrivals of ``rate``/s (at most ``time_limit_s`` of
    arrivals); latency = completion - scheduled arrival."""
    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(n)]
    done_at = [math.inf] * n
    sched_at = [0.0] * n
    remaining = [n]
    all_done = threading.Event()

    def on_done(i):
        def cb(f):
            _to_host(f)
            done_at[i] = time.perf_counter()
            remaining[0] -= 1  # single writer per request; the worker thread runs callbacks
            if remaining[0] == 0:
                all_done.set()

        return cb

    t0 = time.perf_counter()
    t = t0
    sent = 0
    for i in range(n):
        t += gaps[i]
        if t - t0 > time_limit_s:
            break
        now = time.perf_counter()
        if t > now:
            time.sleep(t - now)
        sched_at[i] = t
        f = system.submit_nowait(pool[i % len(pool)])
        f.add_done_callback(on_done(i))
        sent += 1
    remaining[0] -= n - sent
    if remaining[0] == 0:
        all_done.set()
    all_done.wait(drain_s)
    lat = sorted((done_at[i] - sched_at[i]) for i in range(sent))
    answered = sum(1 for v in lat if math.isfinite(v))
    finish = max((done_at[i] for i in range(sent) if math.isfinite(done_at[i])), default=t0)
    return {
        "offered_rate": rate,
        "sent": sent,
        "answered": answered,
        "throughput": answered / max(finish - t0, 1e-9),
        "p50_ms": percentile(lat, 50) * 1e3 if lat else math.inf,
        "p99_ms": percentile(lat, 99) * 1e3 if lat else math.inf,
    }


def median_run(runs: list) -> dict:
    """One row for a (rate, system) cell run ``len(runs)`` times: the run with the median p99
    (its throughput and p50 with it), every run's p99 kept; answered/sent summed over the runs."""
    ordered = sorted(runs, key=lambda r: r["p99_ms"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["repeats"] = [round(r["p99_ms"], 2) for r in runs]
    row["answered"], row["sent"] = sum(r["answered"] for r in runs), sum(r["sent"] for r in runs)
    return row


def sustained(row: dict, slo_ms: float) -> bool:
    """A rate is sustained when every request was answered and p99 <= the SLO."""
    return row["answered"] == row["sent"] and row["p99_ms"] <= slo_ms


def requests_at(rate: float, args, floor: int = 20) -> int:
    """Requests in one open-loop run at ``rate``: --seconds of arrivals, at most --max-requests,
    at least ``floor`` (the grid's and near-saturation runs' 20; a search probe's
    --search-min-requests)."""
    return max(floor, min(args.max_requests, int(rate * args.seconds)))


def rotated(items: list, k: int) -> list:
    """``items`` started at index ``k`` (mod its length): the order of systems in pass ``k``, so a
    slow spell of the shared VM lands on a different system each pass."""
    k %= max(len(items), 1)
    return items[k:] + items[:k]


FLOOR_FAILS = 2  # failed probes at the floor before a system is reported as sustaining no rate


class Bracket:
    """One system's search: ``lo`` a rate it sustains once ``lo_ok`` (until then, a guess to
    check), ``hi`` a rate taken as failing, ``floor`` the lowest rate worth a probe."""

    def __init__(self, lo: float, hi: float, floor: float):
        self.lo, self.hi, self.floor = lo, hi, floor
        self.lo_ok = False  # lo seen sustained
        self.failed = False  # some probe failed (else hi was only assumed failing)
        self.floor_fails = 0  # probes failed at the floor
        self.probes = 0
        self.note = ""  # set when the system fails even at the floor: its rate is 0

    def next_rate(self) -> float:
        # check lo first; then the geometric midpoint: the rates span decades, and a relative
        # tolerance halves in log space with every probe
        return math.sqrt(self.lo * self.hi) if self.lo_ok else self.lo

    def record(self, rate: float, ok: bool) -> None:
        self.probes += 1
        if ok:
            self.lo, self.lo_ok = rate, True
            return
        self.failed = True
        if self.lo_ok:
            self.hi = rate
        elif rate > self.floor:  # the first guess failed: search [floor, that guess] instead
            self.lo, self.hi = self.floor, rate
        else:
            # one failure at the floor may be a slow spell of the machine (seen: a whole system
            # reported 0 from one probe whose p99 was 3% over the SLO): probed again next round
            self.floor_fails += 1
            if self.floor_fails >= FLOOR_FAILS:
                self.hi = rate
                self.note = (
                    f"fails even at the lowest rate {self.floor:.1f}/s ({self.floor_fails} probes): reported as 0"
                )

    def done(self, tol: float) -> bool:
        return bool(self.note) or (self.lo_ok and self.hi <= self.lo * (1 + tol))


def find_max_sustained(systems, probe, judge, lo, hi, floor, tol=0.05, repeats=3, log=None, on_round=None) -> dict:
    """Each system's highest sustained rate, by a geometric bisection of its bracket [lo, hi].

    ``probe(system, rate, seed)`` runs one open-loop run and returns its row (open_loop's dict);
    ``judge(row)`` says whether the row is sustained. ``lo``, ``hi`` and ``floor`` map each system
    to its first guess of a sustained rate, a rate taken as failing (never probed: e.g. 1.1x the
    saturated throughput) and the lowest rate worth a probe. A system's lo is probed first: if it
    fails, the search starts again from [floor, lo]; if the floor fails twice (one failure is
    probed again next round) the system's rate is 0.
    Then each probe at sqrt(lo * hi) replaces lo (sustained) or hi (not), until hi / lo <= 1 + tol.

    The bisections run in lockstep: each round probes every system still searching once (each
    at its own rate), ``repeats`` runs in a rotated order, and judges the run with the median p99
    (``median_run``), so a slow spell of a noisy machine hits every system alike, as in the grid.
    ``on_round(phase)``, if given, is called with "start" before a round's runs and "end" after
    them, before they are judged (the bench measures the SLO's reference there); what "end" returns
    (a dict or None) is added to that round's probe records.
    Returns {"systems": {name: found rate, bracket, ...}, "probes": [every probe, in order]}."""
    brackets = {s: Bracket(lo[s], hi[s], floor[s]) for s in systems}
    probes: list = []
    searching = list(systems)
    rnd = passes = 0
    while searching:
        rates = {s: brackets[s].next_rate() for s in searching}
        runs: dict = {s: [] for s in searching}
        if on_round:
            on_round("start")
        for rep in range(repeats):
            # a different system first in every pass (each first equally often); every system of
            # a pass gets the same seed: the same arrival pattern, scaled to its rate
            for s in rotated(searching, passes):
                runs[s].append(probe(s, rates[s], seed=10**6 + rnd * 1000 + rep))
            passes += 1
        extra = (on_round("end") if on_round else None) or {}
        for s in searching:
            row = median_run(runs[s])
            probes.append(
                {
                    "round": rnd,
                    "system": s,
                    "rate": rates[s],
                    "checks_lo": not brackets[s].lo_ok,
                    "p99_ms": row["p99_ms"],
                    "p99s_ms": row["repeats"],
                    "answered": row["answered"],
                    "sent": row["sent"],
                    "sustained": judge(row),
                    **extra,
                }
            )
            brackets[s].record(rates[s], probes[-1]["sustained"])
            if log:
                log(probes[-1])
        searching = [s for s in searching if not brackets[s].done(tol)]
        rnd += 1
    return {
        "systems": {
            s: {
                # the highest sustained probe: lo, once seen sustained (lo only ever rises)
                "found_rate": b.lo if b.lo_ok else 0.0,
                "bracket": [b.lo if b.lo_ok else 0.0, b.hi],
                "start_bracket": [lo[s], hi[s]],
                "probes": b.probes,
                # no probe failed: hi was taken as failing, never seen to; the rate may lie above it
                "capped": b.lo_ok and not b.failed,
                "note": b.note,
            }
            for s, b in brackets.items()
        },
        "probes": probes,
    }


def search_ratios(found: dict) -> dict:
    """Per system, its found rate over ee-req's and over plain's (None where either is absent or
    0), and for every stage-like system whether it meets the issue's targets: >= 1.05x (b) ee-req
    and >= 2x (a) plain at the SLO."""
    out = {}
    for s, rate in found.items():
        row = {
            f"x_{base.replace('-', '_')}": rate / found[base] if found.get(base) else None
            for base in ("ee-req", "plain")
        }
        if s.startswith("stage"):
            row["meets_1_05x_ee_req"] = row["x_ee_req"] is not None and row["x_ee_req"] >= 1.05
            row["meets_2x_plain"] = row["x_plain"] is not None and row["x_plain"] >= 2.0
        out[s] = row
    return out


SYSTEMS = (
    "direct",
    "plain",
    "ee-req",
    "ee-req-full",
    "stage",
    "stage-nodefer",
    "stage-steps",
    "stage-inline",
    "stage-wait",
    "stage-fill",
    "stage-defer",
    "stage-request",
)


def system_workers(name: str, workers: int = 1):
    """``name`` without its ``-xN`` suffix, and its worker threads: N, else ``workers``."""
    base, _, rest = name.partition("@")
    m = re.fullmatch(r"(.+)-x([1-9][0-9]*)", base)
    if m is None:
        return name, workers
    return m.group(1) + (f"@{rest}" if rest else ""), int(m.group(2))


def behind_batches(n: int, base: type = StageScheduler) -> type:
    """stage-behindN: the scheduler with stage 0 behind once it holds ``n`` full batches per worker
    (its ``_behind_batches``; its own rule is one), in ``_backlogged`` and ``_fusable`` alike."""
    return type(f"_Behind{n}", (base,), {"_behind_batches": n})


BEHIND = re.compile(r"stage-behind([1-9][0-9]*)")  # stage-behindN's name


def make_system(name, model, rt, max_batch, wait_ms=1.0, defer_ms=20.0, workers=1, scheduler_cls=StageScheduler):
    # e.g. ee-req-x2: that system with 2 worker threads (else ``workers``: --workers);
    # scheduler_cls: the stage systems' class (serve_machinery.py passes an earlier revision's)
    name, workers = system_workers(name, workers)
    if "@" in name:  # e.g. stage-fill@4: that system with max_wait_ms 4 (stage-defer@4: max_defer_ms 4)
        name, ms = name.split("@")[0], float(name.split("@")[1])
        wait_ms, defer_ms = (wait_ms, ms) if name == "stage-defer" else (ms, defer_ms)
    if name == "direct":
        return Direct(lambda x: rt.infer(x))
    if name == "plain":
        return plain_system(model, max_batch, workers)
    if name == "ee-req":
        return ee_request_system(rt, max_batch, workers)
    if name == "ee-req-full":
        return ee_request_full_system(rt, max_batch, workers)
    # "stage": every request through the worker thread; "stage-inline": a request that finds the
    # scheduler idle runs in the generator's thread (StageScheduler(inline="always"))
    # "stage-wait": a stage with fewer than max_batch rows waits up to wait_ms for more (a request
    # admitted to an idle scheduler never waits), so deeper stages run fuller batches under load;
    # "stage-fill": policy="fill" (the fullest stage first; a row passed over for wait_ms goes first)
    # "stage-defer": max_defer_ms=defer_ms (full batches first once stage 0 holds a full batch:
    # survivors wait up to defer_ms at deeper stages for the next stage-0 batches' survivors);
    # "stage-nodefer": max_defer_ms=0; the others keep the scheduler's default (None)
    inline = "always" if name == "stage-inline" else "never"
    behind = BEHIND.fullmatch(name)
    if behind:  # the default stage system with a deeper backlog trigger
        name, scheduler_cls = "stage", behind_batches(int(behind.group(1)), scheduler_cls)
    # "stage-request": (b) in the scheduler's machinery (never re-batched; no deferral, its default)
    policy = {"stage-fill": "fill", "stage-request": "request"}.get(name, "deepest")
    return scheduler_cls(
        rt,
        max_batch=max_batch,
        max_queue_rows=1 << 20,
        inline=inline,
        fused=name != "stage-steps",
        max_wait_ms=wait_ms if name in ("stage-wait", "stage-fill") else 0.0,
        policy=policy,
        max_defer_ms=defer_ms if name == "stage-defer" else 0.0 if name == "stage-nodefer" else None,
        workers=workers,
    )


def light_load_side_by_side(rt, pool, max_batch, rounds):
    """One request at a time (closed loop, the same mix of samples for every variant), timed side
    by side: rt.infer; sched.infer on an idle scheduler (runs in the caller's thread); and
    submit_nowait().result() with inline="never" (the worker thread's path: what an asyncio
    server's requests take)."""
    mix = pool[:64]
    it = {"i": 0}

    def nxt():
        it["i"] = (it["i"] + 1) % len(mix)
        return mix[it["i"]]

    with (
        StageScheduler(rt, max_batch=max_batch) as inline,
        StageScheduler(rt, max_batch=max_batch, inline="never") as worker,
    ):
        fns = {
            "rt.infer": lambda: rt.infer(nxt()),
            "sched.infer (inline)": lambda: inline.infer(nxt()),
            "submit (worker thread)": lambda: worker.submit_nowait(nxt()).result(),
        }
        sbs = side_by_side(fns, mix[0].device, rounds=rounds, inner=len(mix))
        assert inline.stats_dict()["inline_requests"] > 0 and worker.stats_dict()["inline_requests"] == 0
    base = sbs.median("rt.infer")
    return {
        name: {
            "median_ms": sbs.median(name) * 1e3,
            "minus_infer_ms": (sbs.median(name) - base) * 1e3,
            "ratio_to_infer": sbs.ratio(name, "rt.infer"),
        }
        for name in fns
    }


def _worker_clock(system):
    """A clock of the CPU time of the system's worker threads (Linux; their sum where there are
    several), or None. Read it with :func:`_read_clock`."""
    workers = getattr(system, "_workers", None) or [getattr(system, "_worker", None)]
    if any(w is None or w.ident is None for w in workers) or not hasattr(time, "pthread_getcpuclockid"):
        return None
    try:
        return [time.pthread_getcpuclockid(w.ident) for w in workers]
    except OSError:
        return None


def _read_clock(clock) -> float:
    """Seconds on a :func:`_worker_clock` (NaN without one)."""
    return math.nan if clock is None else sum(time.clock_gettime(c) for c in clock)


def saturated_capacity(systems, make, pool, n, repeats):
    """Each system's throughput with ``n`` single-sample requests submitted at once (a backlog:
    every batch as full as the system makes it), ``repeats`` times in a rotated order; the median
    req/s per system and, per repeat, its ratio to ee-req's run next to it. Completion is seen by
    a done-callback, as the open loop sees it (no thread waits on a future).

    Also the host CPU time per request of the two threads that share the GIL: the submitting
    thread's (``submit_us``) and the system's worker thread's (``worker_us``, which on a GPU
    includes a CUDA synchronize's spin-wait), medians over the repeats: what the serving
    machinery costs the host per request, beside the model's own work."""
    out = {name: [] for name in systems}
    cpu = {name: [] for name in systems}
    for rep in range(repeats):
        for name in rotated(systems, rep):
            system = make(name)
            for x in pool[:20]:  # warm the worker
                system.submit_nowait(x).result()
            left, done = [n], threading.Event()

            def cb(f, left=left, done=done):
                left[0] -= 1  # the worker thread runs callbacks: one writer
                if left[0] == 0:
                    done.set()

            clock = _worker_clock(system)
            w0 = _read_clock(clock)
            t0, c0 = time.perf_counter(), time.thread_time()
            for i in range(n):
                system.submit_nowait(pool[i % len(pool)]).add_done_callback(cb)
            c1 = time.thread_time()
            done.wait()
            out[name].append(n / (time.perf_counter() - t0))
            w1 = _read_clock(clock)
            cpu[name].append(((c1 - c0) / n * 1e6, (w1 - w0) / n * 1e6))
            system.close()
    res = {}
    for name, v in out.items():
        row = {"req_per_s": statistics.median(v), "runs": [round(x) for x in v]}
        if "ee-req" in out:
            row["ratio_to_ee_req"] = statistics.median(a / b for a, b in zip(v, out["ee-req"]))
        row["submit_us"] = statistics.median(c[0] for c in cpu[name])
        row["worker_us"] = statistics.median(c[1] for c in cpu[name])
        res[name] = row
    return res


def near_saturation(systems, run_once, ee_req_rate, fractions, repeats, requests_at) -> list:
    """The issue's "near (b)'s saturation rate, (c)'s p99 is at most half of (b)'s": open loop at
    each of ``fractions`` of ee-req's saturated throughput (``ee_req_rate``, measured in the same
    run), every system ``repeats`` times in a rotated order. Per rate and system: the median p99
    and p50 over the runs, every run's p99, and the median p99 over ee-req's (for a stage system,
    whether it is <= 0.5); and, pairing each run with ee-req's run of the same repeat (next to it in
    time, so a slow spell of the VM weighs on both), the median of the pairs' p99 ratios and how
    many of the pairs the stage system's p99 was the lower."""
    cells = []
    for i, f in enumerate(fractions):
        rate = round(f * ee_req_rate, 1)
        n = requests_at(rate)
        runs: dict = {s: [] for s in systems}
        for rep in range(repeats):
            for s in rotated(systems, rep):
                runs[s].append(run_once(s, rate, n, seed=50_000 + 1000 * i + rep))
        base = statistics.median(r["p99_ms"] for r in runs["ee-req"]) if "ee-req" in runs else math.nan
        cell: dict = {"fraction": f, "rate": rate, "requests": n, "systems": {}}
        for s in systems:
            p99 = statistics.median(r["p99_ms"] for r in runs[s])
            ratio = p99 / base if math.isfinite(p99) and math.isfinite(base) and base > 0 else None
            row = {
                "p99_ms": p99,
                "p50_ms": statistics.median(r["p50_ms"] for r in runs[s]),
                "p99_runs": [round(r["p99_ms"], 2) for r in runs[s]],
                "answered": sum(r["answered"] for r in runs[s]),
                "sent": sum(r["sent"] for r in runs[s]),
                "p99_x_ee_req": ratio,
            }
            if s.startswith("stage"):
                row["meets_half_ee_req_p99"] = ratio is not None and ratio <= 0.5
                if "ee-req" in runs:
                    pairs = [(a["p99_ms"], b["p99_ms"]) for a, b in zip(runs[s], runs["ee-req"])]
                    ok = [a / b for a, b in pairs if math.isfinite(a) and math.isfinite(b) and b > 0]
                    row["paired_p99_x_ee_req"] = statistics.median(ok) if len(ok) == len(pairs) else None
                    row["runs_below_ee_req"] = sum(1 for a, b in pairs if a < b)
            cell["systems"][s] = row
            print(
                f"  near saturation {f:.2f}x ee-req's: {s:14s} rate {rate:8.1f}/s  p50 {row['p50_ms']:8.2f} ms  "
                f"p99 {p99:9.2f} ms (runs {row['p99_runs']})" + (f"  x{ratio:.2f} of ee-req" if ratio else ""),
                flush=True,
            )
        cells.append(cell)
    return cells


def never_exits(rt) -> ThresholdSnapshot:
    """Thresholds no score passes, so nobody leaves early and every stage runs on all the rows
    (the benches' full batches at every stage)."""
    nobody = -math.inf if lower_is_confident(rt.criterion) else math.inf
    return ThresholdSnapshot([nobody] * (rt.num_exits - 1))


def stage_costs_ms(rt, model, x, reps=15):
    """The cheapest of ``reps`` runs (ms) of each stage step with every row going on, and of the
    plain model, at x's batch size: what bounds any early-exit server's throughput (stage 0 runs
    on every row)."""
    never = never_exits(rt)
    best = [math.inf] * rt.num_exits
    plain = math.inf
    # On CUDA every timing starts and ends with the device idle: a step's host read would
    # otherwise wait for work queued before it (the plain model's, launched asynchronously), and
    # the plain model's time would be its launches only (until session 15 it was: stage 0 at 64
    # rows then "cost" more than the whole plain model on the H100 and H200).
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(reps):
        state, rows, carry = x, torch.arange(x.shape[0]), None
        for k in range(rt.num_exits):
            sync()
            t = time.perf_counter()
            res = rt.run_stage(k, state, rows, carry, thresholds=never)
            sync()
            best[k] = min(best[k], time.perf_counter() - t)
            state, rows, carry = res.state, res.rows, res.carry
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            plain_forward(model, x)
        sync()
        plain = min(plain, time.perf_counter() - t)
    return {"stages_ms": [b * 1e3 for b in best], "plain_ms": plain * 1e3}


def full_batch_steps(rt, xs, snap, max_batch):
    """Run the batches ``xs`` through ``rt.run_stage`` keeping every stage's batch full: the
    survivors of successive stage-0 batches wait at each deeper stage until ``max_batch`` of them
    can run together (the rest run at the end). What a stage scheduler that kept every batch full
    would compute at saturation, without any of its per-request work. Returns the rows per step,
    per stage."""
    K = rt.num_exits
    queues = [[] for _ in range(K)]  # (state, rows, carry) chunks waiting at each stage
    batches = [[] for _ in range(K)]

    def run(k, chunks):
        state = cat_rows([c[0] for c in chunks]) if len(chunks) > 1 else chunks[0][0]
        rows = torch.cat([c[1] for c in chunks]) if len(chunks) > 1 else chunks[0][1]
        carry = None if k == 0 else cat_rows([c[2] for c in chunks]) if chunks[0][2] else chunks[0][2]
        res = rt.run_stage(k, state, rows, carry, thresholds=snap)
        batches[k].append(int(rows.shape[0]))
        if k + 1 < K and res.rows.shape[0]:
            queues[k + 1].append((res.state, res.rows, res.carry))

    def take(q, n):  # the first n rows of a queue, splitting a chunk if need be
        out = []
        while n:
            state, rows, carry = q[0]
            m = int(rows.shape[0])
            if m <= n:
                out.append(q.pop(0))
                n -= m
            else:
                cut = lambda t: (t[:n], t[n:])  # noqa: E731
                (s0, s1), (r0, r1) = cut(state), cut(rows)
                c0, c1 = (tuple(c[:n] for c in carry), tuple(c[n:] for c in carry)) if carry else (carry, carry)
                out.append((s0, r0, c0))
                q[0] = (s1, r1, c1)
                n = 0
        return out

    start = 0
    for x in xs:
        run(0, [(x, torch.arange(start, start + x.shape[0]), None)])
        start += x.shape[0]
        for k in range(K - 1, 0, -1):  # the deepest full batch first, as the scheduler does
            while sum(int(c[1].shape[0]) for c in queues[k]) >= max_batch:
                run(k, take(queues[k], max_batch))
    for k in range(1, K):  # the remainder, shallowest first (its survivors join the next stage's)
        while queues[k]:
            run(k, take(queues[k], min(max_batch, sum(int(c[1].shape[0]) for c in queues[k]))))
    return batches


def rebatch_bound(rt, model, x, max_batch, reps=5):
    """How much keeping every stage's batch full can gain on this machine, at most: per row (us),
    side by side on the same rows in rotated order (the cheapest of ``reps`` runs each),
    ``rt.infer`` on batches of ``max_batch`` (request-level batching at its fullest: each deeper
    stage runs on the survivors of one batch), :func:`full_batch_steps` on the same batches, and
    the plain model. infer / full is the most a stage scheduler can gain from re-batching
    survivors at saturation; below saturation batches are smaller and it gains less."""
    xs = [x[i : i + max_batch] for i in range(0, x.shape[0] - max_batch + 1, max_batch)]
    snap = rt.thresholds_snapshot()
    n = sum(int(b.shape[0]) for b in xs)

    def infer():
        for b in xs:
            rt.infer(b)

    def plain():
        with torch.no_grad():
            for b in xs:
                plain_forward(model, b)

    fns = {"infer": infer, "full": lambda: full_batch_steps(rt, xs, snap, max_batch), "plain": plain}
    best = {k: math.inf for k in fns}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    # one untimed run of each (warm-up), whose results also give the rows per step
    exits = torch.cat([rt.infer(b).exit_index for b in xs])
    full = full_batch_steps(rt, xs, snap, max_batch)
    plain()
    for rep in range(reps):
        for k in rotated(list(fns), rep):
            sync()
            t = time.perf_counter()
            fns[k]()
            sync()
            best[k] = min(best[k], time.perf_counter() - t)
    per_batch = exits.view(len(xs), -1)
    infer_batches = [float((per_batch >= k).sum(1).float().mean()) for k in range(rt.num_exits)]
    return {
        "us_per_row": {k: v / n * 1e6 for k, v in best.items()},
        "infer_over_full": best["infer"] / best["full"],
        "mean_batch_infer": infer_batches,
        "mean_batch_full": [sum(b) / len(b) if b else 0.0 for b in full],
    }


def median_call_ms(fn, x, iters=200):
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(10):
        fn(x)
    sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def tiny_mlp(width: int = 16, num_classes: int = 10, num_stages: int = 3) -> ee.MultiExitModel:
    """An MLP of ``num_stages`` stages (Linear + ReLU, ``width`` wide), a Linear exit after each."""
    return ee.MultiExitModel(
        [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(num_stages)],
        [nn.Linear(width, num_classes) for _ in range(num_stages)],
    )


MODELS = {
    # a model whose compute per request is negligible (3 stages of a 16-wide Linear), so the serving
    # machinery's host Python is the bound: the regime of the small model on a GPU (docs/serving.md,
    # "Session 15"), on a CPU (bench/serve_machinery.py)
    "tiny": dict(build=lambda: tiny_mlp(), shape=(16,), fractions=[0.5, 0.3, 0.2]),
    # the demo's digits CNN (3 exits, 1x8x8 inputs), random weights
    "digits": dict(build=lambda: digits_cnn(), shape=(1, 8, 8), fractions=[0.5, 0.3, 0.2]),
    # a small ResNet-style net (basic blocks, 4 exits, 32x32 RGB), random weights
    "resnet": dict(
        build=lambda: resnet_style(num_classes=10, widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1)),
        shape=(3, 32, 32),
        fractions=[0.5, 0.2, 0.15, 0.15],
    ),
    # ResNet-18's widths and depth at 32x32 (4 exits): a model with real work per row for a GPU
    "resnet18": dict(
        build=lambda: resnet_style(num_classes=10, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)),
        shape=(3, 32, 32),
        fractions=[0.5, 0.2, 0.15, 0.15],
    ),
    # the same net at ImageNet's 224x224 (GPU only: seconds per request on a CPU): a GPU's work
    # per batch outweighs the host's per request (though its cost grows nearly in proportion to
    # the batch here, so fuller deep batches save little: docs/serving.md, "Session 12")
    "resnet18-224": dict(
        build=lambda: resnet_style(num_classes=10, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)),
        shape=(3, 224, 224),
        fractions=[0.5, 0.2, 0.15, 0.15],
    ),
    # a ViT-S/16 at 224x224 (GPU only), 4 stages of 3 blocks: a transformer whose small batches
    # leave a GPU underused, so that a fuller batch costs little more than a small one (E3's
    # regime, where re-batching survivors should pay: docs/serving.md, "Session 15")
    "vit-224": dict(build=lambda: vit_style(num_classes=10), shape=(3, 224, 224), fractions=[0.5, 0.2, 0.15, 0.15]),
}


def build_runtime(spec: dict, device="cpu"):
    """The bench's model for a MODELS entry, built under torch.manual_seed(0), and its runtime
    with thresholds for the entry's exit fractions on 512 random samples (returned too):
    (model, rt, samples). Every serving bench builds its model here, so they serve the same one."""
    torch.manual_seed(0)
    model = spec["build"]().eval().to(device)
    pool_x = torch.randn(512, *spec["shape"]).to(device)
    with torch.no_grad():
        thr = thresholds_for_fractions(model, pool_x, spec["fractions"], "entropy")
    return model, ee.EERuntime(model, thresholds=thr, criterion="entropy"), pool_x


def warm_cuda(model, rt, pool_x, max_batch: int) -> None:
    """Before traffic on a CUDA model (``pool_x``: samples on its device): every bucket's graph
    captured, then every batch size up to ``max_batch`` once through the plain model, rt.infer and
    the scheduler's stage steps (serve_http_load.py warms its in-process runtime here too)."""
    if rt.graphs is not False:
        rt.warmup(max_batch, pool_x[:1])  # every bucket's graph captured before traffic
    # Every batch size once, for every system: cuDNN picks and sets up its kernels at the
    # first call of each shape, and those first calls otherwise land in some system's p99.
    with torch.no_grad():
        for b in range(1, max_batch + 1):
            plain_forward(model, pool_x[:b])
            rt.infer(pool_x[:b])
            # and the scheduler's stage steps (rt.run_stage) on the same graphs, so that no
            # system meets a first call of some size under traffic
            state, rows, carry = pool_x[:b], torch.arange(b), None
            for k in range(rt.num_exits):
                step = rt.run_stage(k, state, rows, carry)
                if step.state is None:
                    break
                state, rows, carry = step.state, step.rows, step.carry
    torch.cuda.synchronize()


def run_model(name, spec, args) -> dict:
    device = torch.device(args.device)
    model, rt, pool_x = build_runtime(spec, device)
    if device.type == "cuda":
        warm_cuda(model, rt, pool_x, args.max_batch)
    pool = [pool_x[i : i + 1].clone() for i in range(pool_x.shape[0])]
    # What a server does once it has loaded its model (eeruntime serve does): move every object
    # alive now (torch's and triton's modules, the model) out of the cyclic collector's reach, so a
    # full collection under load scans only what serving allocated since (docs/serving.md, "GC").
    freeze_startup_objects()
    plain1 = median_call_ms(lambda x: plain_forward(model, x), pool[0])
    ee1 = median_call_ms(lambda x: rt.infer(x), pool[0])
    xb = torch.cat(pool[: args.max_batch])
    plain_b = median_call_ms(lambda x: plain_forward(model, x), xb, iters=30) / args.max_batch
    slo_ms = 10 * plain1
    # The serving machinery's own cost at light load, one request at a time, side by side.
    light = light_load_side_by_side(rt, pool, args.max_batch, args.sbs_rounds)
    for k, v in light.items():
        print(
            f"[{name}] closed loop {k:24s} {v['median_ms']:.3f} ms/request ({v['minus_infer_ms']:+.3f} ms over rt.infer)"
        )
    costs = {b: stage_costs_ms(rt, model, xb[:b]) for b in (1, args.max_batch)}
    full = costs[args.max_batch]
    # Any early-exit server runs stage 0 on every row: at most plain(B) / stage0(B) times the
    # plain model's throughput, B = max_batch (with no other cost at all).
    bound = full["plain_ms"] / full["stages_ms"][0]
    # And by FLOPs (eeruntime.cost: every stage and exit head counted on one sample): with these
    # exit fractions no early-exit model does less than 1/ideal of the plain model's work
    ideal = measure_costs(model, pool_x[:1]).ideal_speedup(spec["fractions"])
    print(
        f"[{name}] cheapest stage steps at batch 1 {[round(v, 3) for v in costs[1]['stages_ms']]} ms, at batch "
        f"{args.max_batch} {[round(v, 3) for v in full['stages_ms']]} ms; plain {costs[1]['plain_ms']:.3f} / "
        f"{full['plain_ms']:.3f} ms: stage 0 bounds any early-exit server at {bound:.2f}x plain's throughput; "
        f"by FLOPs, these exit fractions at {ideal:.2f}x",
        flush=True,
    )
    rb = rebatch_bound(rt, model, torch.cat([pool_x, pool_x]), args.max_batch)
    print(
        f"[{name}] per row (us): rt.infer at batch {args.max_batch} {rb['us_per_row']['infer']:.1f} (stage batches "
        f"{[round(v, 1) for v in rb['mean_batch_infer']]}), every stage's batch full {rb['us_per_row']['full']:.1f} "
        f"({[round(v, 1) for v in rb['mean_batch_full']]}), plain {rb['us_per_row']['plain']:.1f}: re-batching survivors "
        f"can gain at most {rb['infer_over_full']:.2f}x here",
        flush=True,
    )
    systems = [s for s in args.systems if s != "direct"]
    sat = saturated_capacity(
        systems,
        lambda s: make_system(s, model, rt, args.max_batch, args.wait_ms, args.defer_ms, args.workers),
        pool,
        args.capacity_requests,
        args.capacity_repeats,
    )
    for s_, v in sat.items():
        print(
            f"[{name}] saturated {s_:14s} {v['req_per_s']:8.0f} req/s"
            + (f"  x{v['ratio_to_ee_req']:.3f} of ee-req" if "ratio_to_ee_req" in v else ""),
            flush=True,
        )
    capacity = 1e3 / plain_b  # plain rows/s at max_batch: the rate grid is relative to it
    rates = [round(capacity * f, 1) for f in args.rate_factors]
    print(
        f"[{name}] plain batch-1 {plain1:.3f} ms, rt.infer batch-1 {ee1:.3f} ms, plain per row at batch "
        f"{args.max_batch} {plain_b:.3f} ms; SLO p99 <= {slo_ms:.2f} ms; rates {rates}",
        flush=True,
    )

    def run_once(system_name, rate, n, seed):
        """One open-loop run of a fresh ``system_name`` at ``rate`` (the grid's and the search's)."""
        system = make_system(system_name, model, rt, args.max_batch, args.wait_ms, args.defer_ms, args.workers)
        for x in pool[:20]:  # warm the worker
            system.submit_nowait(x).result()
        r = open_loop(system, pool, rate, n, 1.5 * n / rate, args.drain_s, seed=seed)
        if system_name.startswith("stage"):
            st = system.stats_dict()
            r["mean_batch_per_stage"] = [round(b, 2) for b in st["mean_batch"]]
            r["overhead_ms_per_batch"] = round(st["overhead_ms_per_batch"], 4)
            r["inline_requests"] = st["inline_requests"]
        system.close()
        return r

    def reference_ms():
        """The plain model's batch-1 latency now: the SLO's unit, measured again next to every cell
        (this VM's speed drifts up to 2x within a run; an SLO fixed at the start would judge a
        slow spell's cells by a fast moment's yardstick)."""
        return median_call_ms(lambda x: plain_forward(model, x), pool[0], iters=60)

    rows = []
    for i, rate in enumerate(rates):
        n = requests_at(rate, args)
        runs = {name: [] for name in args.systems}
        ref_before = reference_ms()
        for rep in range(args.repeats):
            # the systems in a rotated order each repeat: a slow spell of this shared VM lands on a
            # different system each time, and the medians below keep it out of the comparison
            for system_name in rotated(args.systems, rep):
                runs[system_name].append(run_once(system_name, rate, n, seed=i * 1000 + rep))
        cell_slo = 10 * (ref_before + reference_ms()) / 2  # the SLO of this rate's cells
        for system_name in args.systems:
            r = median_run(runs[system_name])
            r["system"] = system_name
            r["slo_ms"] = cell_slo
            r["sustained"] = sustained(r, cell_slo)
            rows.append(r)
            print(
                f"  {system_name:14s} rate {rate:8.1f}/s  thr {r['throughput']:8.1f}/s  p50 {r['p50_ms']:8.2f} ms  "
                f"p99 {r['p99_ms']:9.2f} ms (SLO {cell_slo:.2f}) {'ok' if r['sustained'] else '--'}"
                + (f"  batches {r['mean_batch_per_stage']}" if "mean_batch_per_stage" in r else "")
                + (f"  (p99 of {len(r['repeats'])} runs: {r['repeats']})" if len(r["repeats"]) > 1 else ""),
                flush=True,
            )
    best = {
        s: max([r["offered_rate"] for r in rows if r["system"] == s and r["sustained"]], default=0.0)
        for s in args.systems
    }
    near_systems = ["ee-req"] + [s for s in systems if s.startswith("stage")]
    near = (
        near_saturation(
            near_systems,
            run_once,
            sat["ee-req"]["req_per_s"],
            args.near_fractions,
            args.near_repeats,
            lambda rate: requests_at(rate, args),
        )
        if args.near_repeats > 0 and "ee-req" in sat and len(near_systems) > 1
        else None
    )
    search = None if args.no_search else search_model(name, args, run_once, sat, best, rates[0], reference_ms, ideal)
    lowest = rates[0]
    p50_at_lowest = {r["system"]: r["p50_ms"] for r in rows if r["offered_rate"] == lowest}
    return {
        "model": name,
        "input_shape": list(spec["shape"]),
        "exit_fractions": spec["fractions"],
        "thresholds": rt.thresholds,
        "plain_batch1_ms": plain1,
        "infer_batch1_ms": ee1,
        "plain_per_row_ms_at_max_batch": plain_b,
        "slo_p99_ms": slo_ms,  # at the start; each cell's own (measured next to it) in its row's slo_ms
        "slo_p99_ms_range": [min(r["slo_ms"] for r in rows), max(r["slo_ms"] for r in rows)],
        "max_batch": args.max_batch,
        "rows": rows,
        "max_sustained_rate": best,
        # open loop at the lowest rate: each system's p50 minus the generator calling rt.infer itself
        "light_load_p50_ms": p50_at_lowest,
        "light_load_p50_over_direct_ms": {
            k: v - p50_at_lowest["direct"] for k, v in p50_at_lowest.items() if "direct" in p50_at_lowest
        },
        "closed_loop_light_load": light,
        "stage_costs_ms": {str(b): c for b, c in costs.items()},
        "stage0_bound_x_plain": bound,
        "flops_ideal_x_plain": ideal,
        "rebatch_bound": rb,
        "saturated": sat,
        **({"near_saturation": near} if near else {}),
        **({"search": search} if search else {}),
    }


def search_model(name, args, run_once, sat, grid_best, lowest_rate, reference_ms, ideal=None) -> dict:
    """The search of each system's highest sustained rate (find_max_sustained), after the grid:
    lo = the grid's highest sustained rate (else its lowest), hi = 1.1x the saturated throughput
    (no open loop keeps up above what a backlog gets through), floor = the grid's lowest rate.
    Each round's SLO is 10x ``reference_ms()`` (the plain model's batch-1 latency) measured before
    and after the round, as the grid's cells are.
    "direct" has no batching and no saturated run: it is the light-load reference, not searched."""
    systems = [s for s in args.systems if s != "direct"]
    slo = {"before": 0.0, "ms": 0.0}

    def on_round(phase):
        if phase == "start":
            slo["before"] = reference_ms()
            return None
        slo["ms"] = 10 * (slo["before"] + reference_ms()) / 2
        return {"slo_ms": slo["ms"]}

    def probe(system, rate, seed):
        # the grid's n rule, but at least --search-min-requests so that p99 means something
        n = requests_at(rate, args, floor=args.search_min_requests)
        return run_once(system, rate, n, seed)

    def log(p):
        print(
            f"  search round {p['round']} {p['system']:14s} rate {p['rate']:8.1f}/s  p99 {p['p99_ms']:9.2f} ms "
            f"(SLO {p['slo_ms']:.2f}) {'ok' if p['sustained'] else '--'}" + ("  (checks lo)" if p["checks_lo"] else ""),
            flush=True,
        )

    print(
        f"[{name}] search: each system's highest rate with p99 <= 10x plain batch-1 (measured at each round), to within "
        f"{args.search_tol:.0%}, {args.search_repeats} run(s) per probe, systems in lockstep",
        flush=True,
    )
    res = find_max_sustained(
        systems,
        probe,
        judge=lambda row: sustained(row, slo["ms"]),
        on_round=on_round,
        lo={s: grid_best[s] or lowest_rate for s in systems},
        hi={s: 1.1 * sat[s]["req_per_s"] for s in systems},
        floor={s: lowest_rate for s in systems},
        tol=args.search_tol,
        repeats=args.search_repeats,
        log=log,
    )
    ratios = search_ratios({s: v["found_rate"] for s, v in res["systems"].items()})
    for s, v in res["systems"].items():
        v.update(ratios[s])
    res.update(tol=args.search_tol, repeats=args.search_repeats, min_requests=args.search_min_requests)
    print(f"[{name}] " + "\n".join(search_table(res, ideal)), flush=True)
    return res


def search_table(search: dict, ideal: Optional[float] = None) -> list:
    """The search's markdown table (also printed) and a line on the issue's targets (``ideal``: the
    FLOPs-ideal speed-up over plain of the model's exit fractions, the 2x-plain target's ceiling)."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"Highest sustained rate, by search (p99 <= SLO, 10x the plain model's batch-1 latency measured around each "
        f"round; every request answered; bracket to within "
        f"{search['tol']:.0%}, median-p99 of {search['repeats']} run(s) per probe; each rate is up to "
        f"{search['tol']:.0%} below its system's true bound, so a ratio is good to about that much either way):",
        "",
        "| system | rate /s | bracket /s | x ee-req | x plain | probes |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for s, v in search["systems"].items():
        lo, hi = v["bracket"]
        lines.append(
            f"| {s} | {v['found_rate']:.0f} | [{lo:.0f}, {hi:.0f}]{' (never failed)' if v['capped'] else ''} | "
            f"{fmt(v['x_ee_req'])} | {fmt(v['x_plain'])} | {v['probes']} |"
        )
    notes = [f"{s}: {v['note']}" for s, v in search["systems"].items() if v["note"]]
    targets = [
        f"{s} {'meets' if v['meets_1_05x_ee_req'] else 'misses'} >= 1.05x ee-req, "
        f"{'meets' if v['meets_2x_plain'] else 'misses'} >= 2x plain"
        for s, v in search["systems"].items()
        if s.startswith("stage")
    ]
    reach = (
        f" The 2x-plain target is out of any early-exit server's reach here: by FLOPs, these exit fractions make "
        f"the model at most {ideal:.2f}x cheaper than plain."
        if ideal is not None and ideal < 2.0
        else ""
    )
    return (
        lines
        + [""]
        + (["; ".join(notes) + ".", ""] if notes else [])
        + (["Targets: " + "; ".join(targets) + "." + reach] if targets else [])
    )


def plot(results, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * len(results), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    for j, res in enumerate(results):
        ax = fig.add_subplot(1, len(results), j + 1)
        styles = {
            "direct": "x:",
            "plain": "s-",
            "ee-req": "o-",
            "stage": "^-",
            "stage-nodefer": "<-",
            "stage-inline": "v--",
            "stage-wait": "d-.",
            "stage-fill": "P-",
        }
        for system in dict.fromkeys(r["system"] for r in res["rows"]):
            pts = [r for r in res["rows"] if r["system"] == system]
            style = styles.get(system.split("@")[0], "*-")
            (line,) = ax.plot([r["throughput"] for r in pts], [r["p99_ms"] for r in pts], style, label=f"{system} p99")
            found = res.get("search", {}).get("systems", {}).get(system, {}).get("found_rate")
            if found:  # the search's highest sustained rate: a tick on the SLO line, in the system's colour
                ax.plot([found], [res["slo_p99_ms"]], "|", ms=16, mew=2, color=line.get_color())
        label = "SLO at the start (10x plain batch-1)" + (
            "; |: highest rate found by search" if res.get("search") else ""
        )
        lo, hi = res.get("slo_p99_ms_range", (res["slo_p99_ms"], res["slo_p99_ms"]))
        if hi > lo:  # measured next to each rate's cells: the band it spanned, the start's as a line
            ax.axhspan(lo, hi, color="grey", alpha=0.15, lw=0, label=f"SLO measured per rate, {lo:.1f}-{hi:.1f} ms")
        ax.axhline(res["slo_p99_ms"], color="grey", ls="--", lw=1, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_title(f"{res['model']}: latency vs throughput")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _rebatch_lines(res) -> list:
    rb = res.get("rebatch_bound")
    if not rb:
        return []
    us = rb["us_per_row"]
    return [
        f"What re-batching survivors can gain here, at most (offline, same rows, cheapest of 5 side by side): "
        f"rt.infer on batches of {res['max_batch']} {us['infer']:.1f} us/row (rows per stage step "
        f"{[round(v, 1) for v in rb['mean_batch_infer']]}); the same batches' stage steps with every deeper "
        f"batch kept full {us['full']:.1f} us/row ({[round(v, 1) for v in rb['mean_batch_full']]}); plain "
        f"{us['plain']:.1f} us/row: **{rb['infer_over_full']:.2f}x** rt.infer's throughput at saturation, with "
        "none of a scheduler's per-request work.",
        "",
    ]


def markdown(doc) -> str:
    lines = [
        f"# Serving load benchmark ({doc['device']['device']}, torch {doc['device']['torch']}, {doc['date']})",
        "",
        doc["note"],
        "",
    ]
    for res in doc["results"]:
        ms = res["max_sustained_rate"]
        lines += [
            f"## {res['model']} (exit fractions {res['exit_fractions']}, max_batch {res['max_batch']})",
            "",
            f"plain batch-1 {res['plain_batch1_ms']:.3f} ms; rt.infer batch-1 {res['infer_batch1_ms']:.3f} ms; "
            f"SLO p99 <= 10x the plain model's batch-1 latency measured next to each rate's cells: "
            + (
                "{:.2f}-{:.2f} ms".format(*res["slo_p99_ms_range"])
                if "slo_p99_ms_range" in res
                else f"{res['slo_p99_ms']:.2f} ms"
            )
            + f"; load average (1 min) {res['load_average_1_5_15']['before'][0]:.2f} "
            f"before, {res['load_average_1_5_15']['after'][0]:.2f} after",
            "",
            "highest sustained rate: " + ", ".join(f"{k} {v:.0f}/s" for k, v in ms.items()),
            "",
            f"Cheapest stage steps (every row going on), ms: batch 1 {[round(v, 3) for v in res['stage_costs_ms']['1']['stages_ms']]}, "
            f"batch {res['max_batch']} {[round(v, 3) for v in res['stage_costs_ms'][str(res['max_batch'])]['stages_ms']]}; "
            f"plain {res['stage_costs_ms']['1']['plain_ms']:.3f} / {res['stage_costs_ms'][str(res['max_batch'])]['plain_ms']:.3f}. "
            f"Stage 0 runs on every row, so no early-exit server can exceed {res['stage0_bound_x_plain']:.2f}x the plain "
            "model's throughput at this batch size."
            + (
                " By FLOPs (eeruntime.cost, every stage and exit head on one sample), these exit fractions make the "
                f"model at most {res['flops_ideal_x_plain']:.2f}x cheaper than plain."
                if "flops_ideal_x_plain" in res
                else ""
            ),
            "",
            *_rebatch_lines(res),
            "Saturated throughput (requests submitted at once, median of the rotated repeats; ratio to ee-req "
            "run next to it; host CPU time per request of the thread submitting and of the system's worker "
            "thread, which share the GIL, medians):",
            "",
            "| system | req/s | x ee-req | runs | host CPU us/request: submitting thread | worker thread |",
            "| --- | ---: | ---: | --- | ---: | ---: |",
            *[
                f"| {k} | {v['req_per_s']:.0f} | {v.get('ratio_to_ee_req', float('nan')):.3f} | {v['runs']} "
                f"| {v.get('submit_us', float('nan')):.1f} | {v.get('worker_us', float('nan')):.1f} |"
                for k, v in res["saturated"].items()
            ],
            "",
        ]
        if res.get("near_saturation"):
            lines += near_saturation_table(res["near_saturation"]) + [""]
        lines += grid_p99_lines(res)
        if res.get("search"):
            lines += search_table(res["search"], res.get("flops_ideal_x_plain")) + [""]
        lines += [
            "One request at a time, side by side (closed loop over the same 64 samples):",
            "",
            "| path | ms per request | minus rt.infer ms | ratio to rt.infer |",
            "| --- | ---: | ---: | ---: |",
        ]
        for k, v in res["closed_loop_light_load"].items():
            lines.append(f"| {k} | {v['median_ms']:.3f} | {v['minus_infer_ms']:+.3f} | {v['ratio_to_infer']:.3f} |")
        lines += [
            "",
            "Open loop at the lowest rate, p50 minus the generator calling rt.infer itself (direct): "
            + ", ".join(f"{k} {v:+.3f} ms" for k, v in res["light_load_p50_over_direct_ms"].items()),
            "",
            "| offered /s | system | throughput /s | p50 ms | p99 ms | SLO ms | sustained | stage mean batches |",
            "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['offered_rate']:.0f} | {r['system']} | {r['throughput']:.0f} | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r.get('slo_ms', res['slo_p99_ms']):.2f} | {'yes' if r['sustained'] else 'no'} | "
                f"{r.get('mean_batch_per_stage', '')} |"
            )
        lines.append("")
    return "\n".join(lines)


def near_saturation_table(cells: list) -> list:
    """The near-saturation runs as a markdown table and a line on the issue's target."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        "Near (b)'s saturation (open loop at fractions of ee-req's saturated throughput above; median of the "
        "rotated runs; the issue's target: (c)'s p99 at most half of (b)'s):",
        "",
        "| x ee-req's saturated | rate /s | system | p50 ms | p99 ms | p99 x ee-req | run by run: median ratio, "
        "runs below ee-req | p99 of each run |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        for s, v in c["systems"].items():
            paired = (
                f"{fmt(v['paired_p99_x_ee_req'])}, {v['runs_below_ee_req']} of {len(v['p99_runs'])}"
                if "runs_below_ee_req" in v
                else "-"
            )
            lines.append(
                f"| {c['fraction']:.2f} | {c['rate']:.0f} | {s} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
                f"{fmt(v['p99_x_ee_req'])} | {paired} | {v['p99_runs']} |"
            )
    verdicts = [
        f"{s} {'meets' if v['meets_half_ee_req_p99'] else 'misses'} it at {c['fraction']:.2f}x"
        for c in cells
        for s, v in c["systems"].items()
        if "meets_half_ee_req_p99" in v
    ]
    return lines + ([""] + ["Target: " + "; ".join(verdicts) + "."] if verdicts else [])


def grid_p99_lines(res: dict) -> list:
    """Each stage system's p99 over ee-req's at every grid rate (the issue's "(c) is never worse
    than (b) at any rate"), from the rows of the table below."""
    cells = {(r["offered_rate"], r["system"]): r for r in res["rows"]}
    rates = sorted({r["offered_rate"] for r in res["rows"]})
    stages = sorted({r["system"] for r in res["rows"] if r["system"].startswith("stage")})
    out = []
    for s in stages:
        parts = []
        for rate in rates:
            a, b = cells.get((rate, s)), cells.get((rate, "ee-req"))
            if a is None or b is None:
                continue
            ok = math.isfinite(a["p99_ms"]) and math.isfinite(b["p99_ms"]) and b["p99_ms"] > 0
            parts.append(f"{rate:.0f}/s {a['p99_ms'] / b['p99_ms']:.2f}" if ok else f"{rate:.0f}/s -")
        if parts:
            out.append(f"{s}'s p99 over ee-req's at each rate of the grid: " + ", ".join(parts) + ".")
    return out + [""] if out else []


def _finite(v):
    """Strict JSON: unanswered requests' infinite latencies as the string "inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked and converted (rate factors and systems as lists)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=next(par for par in __doc__.split("\n\n") if par.startswith("SEARCH:")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default="digits,resnet", help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument(
        "--rate-factors",
        default="0.1,0.3,0.6,0.9,1.2,1.6,2.0,2.5",
        help="arrival rates as multiples of the plain model's rows/s at max_batch",
    )
    p.add_argument("--seconds", type=float, default=3.0, help="arrivals per run (bounded by --max-requests)")
    p.add_argument("--max-requests", type=int, default=6000)
    p.add_argument("--drain-s", type=float, default=10.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument(
        "--systems",
        default=",".join(
            s
            for s in SYSTEMS
            if s not in ("ee-req-full", "stage-wait", "stage-fill", "stage-steps", "stage-defer", "stage-request")
        ),
        help=f"which of {', '.join(SYSTEMS)}",
    )
    p.add_argument(
        "--wait-ms",
        type=float,
        default=1.0,
        help="max_wait_ms of stage-wait and stage-fill (a system named stage-fill@4 or stage-wait@4 takes 4 ms)",
    )
    p.add_argument(
        "--defer-ms",
        type=float,
        default=20.0,
        help="max_defer_ms of stage-defer (a system named stage-defer@5 takes 5 ms)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every (rate, system) cell, in a rotated order; the row shown is the run with the median p99",
    )
    p.add_argument("--sbs-rounds", type=int, default=30, help="rounds of the closed-loop side by side")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared 2-core VM, OpenMP's spinning threads fight "
        "the serving worker, the load generator and other jobs)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker threads of every system but direct (a name's -xN suffix overrides: ee-req-x1)",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=0.1,
        help="the GIL switch interval of this process, for every system (eeruntime serve's default; Python's is 5)",
    )
    p.add_argument("--capacity-requests", type=int, default=2000, help="requests per saturated-throughput run")
    p.add_argument("--capacity-repeats", type=int, default=3, help="saturated-throughput runs per system")
    p.add_argument(
        "--no-search",
        action="store_true",
        help="skip the search of each system's highest sustained rate (after the grid; see the module docstring)",
    )
    p.add_argument(
        "--search-tol",
        type=float,
        default=0.05,
        help="the search stops when a system's bracket hi/lo <= 1 + this",
    )
    p.add_argument(
        "--search-repeats",
        type=int,
        default=3,
        help="runs per search probe, the systems in a rotated order; the probe is judged by its median-p99 run",
    )
    p.add_argument(
        "--search-min-requests", type=int, default=500, help="requests per search run at least (so p99 means something)"
    )
    p.add_argument(
        "--near-fractions",
        default="0.85,0.95,1.0",
        help="rates of the near-saturation runs, as fractions of ee-req's saturated throughput in the same run",
    )
    p.add_argument(
        "--near-repeats",
        type=int,
        default=3,
        help="runs of each system at each near-saturation rate, rotated (0: none)",
    )
    p.add_argument("--device", default="cpu", help="where the models run (cuda: see the module docstring)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: one model, three rates, 0.5 s each, a coarse search"
    )
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="", help="appended to the output files' names (a second run of the day)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rate_factors, args.seconds, args.drain_s = "digits", "0.1,1.0,2.0", 0.5, 5.0
        args.sbs_rounds = 3
        args.capacity_requests, args.capacity_repeats = 200, 1
        # a tiny search, so that the smoke test runs it: a coarse tolerance, one run per probe
        args.search_tol, args.search_repeats, args.search_min_requests = 0.3, 1, 100
        args.near_fractions, args.near_repeats = "0.9", 1
    if not args.search_tol > 0 or args.search_repeats < 1 or args.search_min_requests < 1:
        p.error("--search-tol must be > 0, --search-repeats and --search-min-requests >= 1")
    args.rate_factors = [float(f) for f in args.rate_factors.split(",")]
    args.near_fractions = [float(f) for f in args.near_fractions.split(",") if f]
    if args.near_repeats < 0 or not all(f > 0 for f in args.near_fractions):
        p.error("--near-repeats must be >= 0 and --near-fractions positive")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    args.systems = [x for x in args.systems.split(",") if x]
    unknown = {system_workers(x)[0].split("@")[0] for x in args.systems} - set(SYSTEMS)
    unknown = {x for x in unknown if not BEHIND.fullmatch(x)}
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; accepted: {', '.join(SYSTEMS)}, stage-behindN")
    unknown = {m for m in args.models.split(",")} - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; accepted: {', '.join(MODELS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_switch_interval(args.switch_interval_ms / 1e3)
    run_models("serve", args, lambda m: run_model(m, MODELS[m], args), write_results)
    return 0


def run_models(name: str, args, run, write) -> None:
    """``run(model)`` for each of ``--models``, with the load average before and after each, and
    ``write(stem, args, info, date, results, load_before)`` after every model, so a run stopped by
    a time box (make gpu-check) keeps the finished ones; ``stem``: bench/results'
    ``<name>-[quick-]<device>-<date><tag>`` (serve_http_load.py runs its models here too)."""
    load_before = os.getloadavg()
    info = device_info()
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{'quick-' if args.quick else ''}{device_slug(info['device'])}-{date}{args.tag}"
    results: list = []
    for m in args.models.split(","):
        load = os.getloadavg()
        results.append(run(m))
        results[-1]["load_average_1_5_15"] = {"before": load, "after": os.getloadavg()}
        write(stem, args, info, date, results, load_before)


def write_results(stem: Path, args, info: dict, date: str, results: list, load_before) -> None:
    """The JSON, markdown and plot of the models run so far (rewritten after each model)."""
    doc = {
        "device": info,
        "date": date,
        "results": results,
        "argv": sys.argv[1:],
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "note": "In-process open loop (Poisson arrivals of single samples; latency from the scheduled arrival). "
        + (
            f"Models on {info['device']} ({os.cpu_count()} CPU cores): inputs already on the device, each "
            "answer's logits copied to the host when its request completes; (b) replays CUDA graphs, and so "
            "do (c)'s stage steps (rt.run_stage on CUDA); every batch size run once before traffic. "
            if args.device.startswith("cuda")
            else f"Measured on a {os.cpu_count()}-core CPU "
        )
        + f"(GIL switch interval {args.switch_interval_ms} ms for every system; "
        + f"{args.workers} worker thread{'s' if args.workers > 1 else ''} per system unless its name says -xN; "
        + f"load average {load_before[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; per model below); "
        "the systems run back to back at each rate.",
    }
    stem.with_suffix(".json").write_text(json.dumps(_finite(doc), indent=1, allow_nan=False))
    stem.with_suffix(".md").write_text(markdown(doc))
    plot(results, str(stem) + "-latency.png")
    print(f"wrote {stem}.json, .md, -latency.png", flush=True)


if __name__ == "__main__":
    sys.exit(main())

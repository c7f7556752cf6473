"""Replay of serving on a virtual clock: Poisson arrivals of single samples through (b) request-level
batching and (c) the stage scheduler's *own* policy code, with every stage step costing what it
was measured to cost on this machine, at its batch size. No threads, no GIL, no other tenant: the
p99 of one policy against another, free of the run-to-run noise that swamps serve_load.py's
near-saturation figures on a small shared VM (docs/serving.md, "Session 11").

What is replayed, exactly:

  (b) ee-req   request-level batching: the worker takes up to max_batch waiting requests and
               runs them in one pass (rt.infer).
  (c) stage    a StageScheduler whose worker is stopped: its ``_pick``, ``_gather``, ``_fusable``
               and ``_learn`` decide every batch, as in serving (same chunks, same ready times,
               same "admitted to an idle scheduler" rule); a stage-0 batch in one pass costs its
               steps on its survivors. (A pass costs a little less: with no exits, 2.29 against
               2.41 ms for the ResNet-style model's four steps at 32 rows, in session 17. (b)'s
               passes and (c)'s are charged alike.)
  stage-nodefer  (c) with max_defer_ms=0.
  stage-age    (c) with stage 0 counted as behind once its oldest row has waited 4 x max_defer_ms
               (the rule before session 11) instead of once it holds a full batch.
  stage-behindN  (c) with stage 0 counted as behind once it holds N full batches (--behind, e.g.
               2,3; session 18) instead of one: below saturation a burst fills one batch often and
               N rarely, so deferral, and the latency it adds, starts nearer saturation.
  stage-steps  (c) with fused=False (serve_load.py's stage-steps): below a backlog (b)'s batches, but
               step by step, so the rows that leave at an exit are answered then, not when the
               batch's deepest step is done (what a pass cannot do), at --step-overhead-us more per
               step past stage 0 (below); under a backlog, stage's deferral.
  stage-interleave  (c) passing a partial deeper stage over for up to --interleave-ms whenever a
               shallower stage holds rows, and every stage-0 batch step by step (not only under a
               backlog): survivors of successive small batches share a deeper step at moderate
               load, where (b) pays each deeper stage's fixed cost per batch. A policy tried in
               replay only (session 17), not the scheduler's.

For each system, the highest rate whose median p99 stays within --slo-ms (default: 10x the plain
model's batch-1 latency measured here, the SLO of serve_load.py) is found by bisection: the
replay's answer to "(c) sustains >= 1.05x (b)'s rate within the SLO", free of the noise.

A batch run step by step (never (b)'s) pays --step-overhead-us for each step past stage 0 on top
of the step's cost: rt.run_stage's bookkeeping over a pass's compiled loop, and the scheduler's
Python per step (measured, see STEP_OVERHEAD_US). Each request leaves at the exit its pool sample
takes under rt.infer (request i is sample i mod 512, as in serve_load.py). Each system's own
per-request work (submit and answer, which serve_load cannot separate from its model passes) is
added to the worker's time as a constant, --overhead-us. Its defaults come from saturated bursts
on a model whose compute is negligible (session 17's bench/serve_machinery.py run): ee-req 8 us,
the stage scheduler 12.5 us. Session 11's isolated figures were 7.3 + 2.7 and 15.2 + 4.3 us. What
a replay leaves out: the GIL hand-offs between the submitting thread and the worker, and the
machine's own hiccups.

    python bench/serve_sim.py                    # resnet and digits, costs measured here
    python bench/serve_sim.py --quick            # a smoke run (seconds)
    python bench/serve_sim.py --overhead-us-stage 8 --overhead-us-ee-req 8   # the policies alone

Writes bench/results/serve-sim-<device>-<date>{tag}.{json,md}.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import device_info, device_slug  # noqa: E402
from serve_load import MODELS, behind_batches, build_runtime, median_call_ms, never_exits, plain_forward  # noqa: E402

from eeruntime.serve import StageScheduler  # noqa: E402
from eeruntime.serve.scheduler import _Chunk  # noqa: E402
from eeruntime.serve.stats import percentile  # noqa: E402

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # batch sizes whose step cost is measured
OLD_BEHIND_FACTOR = 4  # stage-age: the trigger before session 11 (oldest stage-0 row waited 4 x max_defer_ms)
# What a stage step costs the scheduler beyond the same stage inside a pass (rt.run_stage's own
# bookkeeping over the pass's compiled loop, and the worker's per-step Python: the batch's id
# tensor, the leavers' answers, the survivors' chunk), per step past stage 0 (a pass makes one call
# where a batch step by step makes one per stage). bench/stage_step_cost.py measures it: the same
# 2,400 queued single-row requests drained with fused=True and fused=False (max_defer_ms 0), 7
# rotated runs, (wall difference) / (steps past stage 0). Session 19, the 2-core VM, after the CPU
# step began calling the compiled ops directly: ResNet-style 48, 57 and 70 us at max_batch 4, 8 and
# 32 (the dispatched step before it: 77, 86 and 110), digits 39, 50 and 66 (79, 86 and 105); this
# default is ResNet-style's at the replay's max_batch, 32. (Session 17 had measured 76-80 us at
# max_batch 4 and 8 and used 75.) Without it a replay takes a batch step by step to cost what its
# pass costs, and answering leavers early looks free (docs/serving.md, "Session 17", "Session 19").
STEP_OVERHEAD_US = 70.0
SLO_X_PLAIN = 10.0  # the SLO: 10x the plain model's batch-1 latency (issue #19; serve_load.py's)
SLO_BRACKET = 0.02  # the SLO search stops once its bracket is within 2 % of the rate


class StepCosts:
    """Seconds of stage ``k``'s step at ``b`` rows: measured at ``sizes``, linear in between,
    proportional to ``b`` past the largest."""

    def __init__(self, sizes: List[int], step_s: List[List[float]]):
        self.sizes, self.step_s = list(sizes), step_s

    def __call__(self, k: int, b: int) -> float:
        s, y = self.sizes, self.step_s[k]
        if b >= s[-1]:
            return y[-1] * b / s[-1]
        j = bisect.bisect_left(s, b)
        if s[j] == b or j == 0:  # (j == 0: fewer rows than the smallest size measured)
            return y[j]
        return y[j - 1] + (y[j] - y[j - 1]) * (b - s[j - 1]) / (s[j] - s[j - 1])

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "step_ms": [[v * 1e3 for v in row] for row in self.step_s]}


def measure_step_costs(rt, x: torch.Tensor, sizes, reps: int, seed: int = 0) -> StepCosts:
    """The median of ``reps`` runs of every stage step at each batch size (nobody leaves, so every
    stage runs on all ``b`` rows), the sizes in a shuffled order each round."""
    never = never_exits(rt)
    sizes = [b for b in sizes if b <= x.shape[0]]
    runs: Dict[int, List[List[float]]] = {b: [[] for _ in range(rt.num_exits)] for b in sizes}
    rng = random.Random(seed)
    for _ in range(reps):
        for b in rng.sample(sizes, len(sizes)):
            state, rows, carry = x[:b], torch.arange(b), None
            for k in range(rt.num_exits):
                t = time.perf_counter()
                res = rt.run_stage(k, state, rows, carry, thresholds=never)
                runs[b][k].append(time.perf_counter() - t)
                state, rows, carry = res.state, res.rows, res.carry
    return StepCosts(sizes, [[statistics.median(runs[b][k]) for b in sizes] for k in range(rt.num_exits)])


def arrivals(rate: float, n: int, seed: int) -> List[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _summary(arr: List[float], done: List[float], stage_rows: List[List[int]], fused: int) -> dict:
    lat = sorted(d - a for a, d in zip(arr, done))
    return {
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "throughput": len(arr) / (max(done) - arr[0]),
        "mean_batch": [sum(b) / len(b) if b else 0.0 for b in stage_rows],
        "rows_per_stage": [sum(b) for b in stage_rows],
        "fused_batches": fused,
    }


def _pass_cost(
    costs: StepCosts, rows: List[int], exits: List[int], K: int, stage_rows: List[List[int]], learn=None
) -> float:
    """One pass of a stage-0 batch: every step on its survivors (their count appended to
    ``stage_rows[k]``; ``learn(k, reached, went_on)``)."""
    dur, alive = 0.0, rows
    for k in range(K):
        if not alive:
            break
        stage_rows[k].append(len(alive))
        dur += costs(k, len(alive))
        went_on = [r for r in alive if exits[r] > k]
        if learn is not None:
            learn(k, len(alive), len(went_on))
        alive = went_on
    return dur


def replay_batcher(costs: StepCosts, exits: List[int], arr: List[float], max_batch: int, overhead_s: float) -> dict:
    """(b): one worker, up to ``max_batch`` waiting requests per pass, in arrival order."""
    K = len(costs.step_s)
    done = [math.inf] * len(arr)
    t, i, stage_rows, passes = 0.0, 0, [[] for _ in range(K)], 0
    while i < len(arr):
        t = max(t, arr[i])
        batch = list(range(i, bisect.bisect_right(arr, t, lo=i)))[:max_batch]
        i += len(batch)
        t += _pass_cost(costs, batch, exits, K, stage_rows) + overhead_s * len(batch)
        passes += 1
        for r in batch:
            done[r] = t
    return _summary(arr, done, stage_rows, passes)


class _AgeTriggered(StageScheduler):
    """stage-age: stage 0 behind once its oldest row has waited OLD_BEHIND_FACTOR x max_defer_ms
    (the replay sets ``_now``), and a stage-0 batch not in one pass while a full one waits behind
    it and their survivors would fill stage 1's batch (the rules before session 11)."""

    _now = 0.0

    def _backlogged(self) -> bool:
        q0 = self._queues[0]
        return bool(q0) and self._now - q0[0].ready_at >= OLD_BEHIND_FACTOR * self.max_defer_s

    def _fusable(self, chunks) -> bool:
        if not self.fused or any(self._queues[1:]):
            return False
        if self.max_defer_s > 0 and self._backlogged():
            n = sum(c.n for c in chunks)
            if self._rows_up_to_batch(self._queues[0]) >= self.max_batch and self._fillable(
                1, self.max_batch - n * self._survival(0)
            ):
                return False
        return self.max_wait_s <= 0 or all(c.urgent for c in chunks)


class _Interleaved(StageScheduler):
    """stage-interleave: stage 0 counts as behind whenever it holds a row (not only a full batch),
    a partial stage is passed over (for at most max_defer_ms) whenever any shallower stage holds
    rows that could join it, and every stage-0 batch runs step by step (the arrivals that will
    join its survivors come while it runs: a batch that takes all of stage 0's rows would
    otherwise always run in one pass, and the policy would never engage below saturation)."""

    def _backlogged(self) -> bool:
        return bool(self._queues[0])

    def _fillable(self, k: int, need: float) -> bool:
        return any(self._queues[j] for j in range(k))

    def _fusable(self, chunks) -> bool:
        return self.fused and self.max_defer_s <= 0 and not any(self._queues[1:])


def policy_only(rt, cls=StageScheduler, **kw) -> StageScheduler:
    """A scheduler whose worker has stopped: only its policy methods are used (the replay owns
    the queues and the clock)."""
    sched = cls(rt, inline="never", max_queue_rows=1 << 20, **kw)
    sched.close()
    sched._closing = False  # (the pick reads it: a closing scheduler never defers)
    return sched


def replay_scheduler(
    sched: StageScheduler,
    costs: StepCosts,
    exits: List[int],
    arr: List[float],
    overhead_s: float,
    step_overhead_s: float = 0.0,
) -> dict:
    """(c): ``sched``'s own ``_pick`` / ``_gather`` / ``_fusable`` / ``_learn`` on a virtual clock;
    each step costs ``costs``, each answered request ``overhead_s`` more, and each step past stage
    0 of a batch not run in one pass ``step_overhead_s`` more (what a step costs beyond the same
    stage inside a pass: see STEP_OVERHEAD_US)."""
    K, n = sched.num_stages, len(arr)
    queues = sched._queues
    for q in queues:
        q.clear()
    snap = object()  # one thresholds snapshot: every row may share a batch
    done = [math.inf] * n
    t, i, pending, answered, fused = 0.0, 0, 0, 0, 0
    stage_rows: List[List[int]] = [[] for _ in range(K)]
    while answered < n:
        while i < n and arr[i] <= t:
            urgent = pending == 0  # admitted to an idle scheduler (StageScheduler.submit_nowait)
            ready = arr[i] if urgent else arr[i] + sched.max_wait_s
            queues[0].append(_Chunk([i], None, None, snap, None, ready, urgent))
            pending, i = pending + 1, i + 1
        if isinstance(sched, _AgeTriggered):
            sched._now = t
        k, wait = sched._pick(t)
        if k is None:
            nxt = arr[i] if i < n else math.inf
            t = nxt if wait is None else min(nxt, t + wait)
            assert t < math.inf, "the replay stalled with rows waiting"
            continue
        chunks = sched._gather(k)
        rows = [r for c in chunks for r in c.ids]
        if k == 0 and sched._fusable(chunks):
            t += _pass_cost(costs, rows, exits, K, stage_rows, sched._learn) + overhead_s * len(rows)
            fused += 1
            leave, stay = rows, []
        else:
            stage_rows[k].append(len(rows))
            leave = [r for r in rows if exits[r] <= k]
            stay = [r for r in rows if exits[r] > k]
            t += costs(k, len(rows)) + overhead_s * len(leave) + (step_overhead_s if k else 0.0)
            sched._learn(k, len(rows), len(stay))
            if stay:
                urgent = any(c.urgent for c in chunks)
                queues[k + 1].append(
                    _Chunk(stay, None, None, chunks[0].snap, None, t if urgent else t + sched.max_wait_s, urgent)
                )
        for r in leave:
            done[r] = t
        answered += len(leave)
        pending -= len(leave)
    return _summary(arr, done, stage_rows, fused)


def systems(
    rt, max_batch: int, defer_ms: float, interleave_ms: float = 1.0, behind: Sequence[int] = ()
) -> Dict[str, Callable[[], StageScheduler]]:
    return {
        "stage": lambda: policy_only(rt, max_batch=max_batch, max_defer_ms=defer_ms),
        "stage-nodefer": lambda: policy_only(rt, max_batch=max_batch, max_defer_ms=0),
        "stage-age": lambda: policy_only(rt, _AgeTriggered, max_batch=max_batch, max_defer_ms=defer_ms),
        "stage-interleave": lambda: policy_only(rt, _Interleaved, max_batch=max_batch, max_defer_ms=interleave_ms),
        "stage-steps": lambda: policy_only(rt, max_batch=max_batch, max_defer_ms=defer_ms, fused=False),
    } | {
        f"stage-behind{n}": (lambda n=n: policy_only(rt, behind_batches(n), max_batch=max_batch, max_defer_ms=defer_ms))
        for n in behind
    }


def highest_rate_within(p99_at: Callable[[float], float], slo_ms: float, hi: float, bracket: float = SLO_BRACKET):
    """The highest rate whose p99 (``p99_at(rate)``, ms) is within ``slo_ms``, by bisection on
    (0, ``hi``]: (rate, the bracket [lo, hi] it lies in); rate 0.0 when even ``hi`` x 2**-20 misses."""
    lo = 0.0
    if p99_at(hi) <= slo_ms:
        return hi, [hi, hi]
    while hi - lo > bracket * max(lo, hi * 2**-20):
        mid = (lo + hi) / 2
        if p99_at(mid) <= slo_ms:
            lo = mid
        else:
            hi = mid
    return lo, [lo, hi]


def run_model(name: str, args) -> dict:
    spec = MODELS[name]
    model, rt, pool_x = build_runtime(spec)
    with torch.inference_mode():
        plain_ms = median_call_ms(lambda x: plain_forward(model, x), pool_x[:1])
    slo_ms = args.slo_ms if args.slo_ms else SLO_X_PLAIN * plain_ms
    pool_exits = rt.infer(pool_x).exit_index.tolist()
    costs = measure_step_costs(rt, pool_x[: max(args.max_batch, 1)], SIZES, args.cost_reps)
    print(f"[{name}] step ms at {costs.sizes}: {[[round(v * 1e3, 3) for v in r] for r in costs.step_s]}", flush=True)
    n = args.requests
    exits = [pool_exits[i % len(pool_exits)] for i in range(n)]
    ovh = {"ee-req": args.overhead_us_ee_req / 1e6, "stage": args.overhead_us_stage / 1e6}
    makers = systems(rt, args.max_batch, args.defer_ms, args.interleave_ms, args.behind)

    def run(system: str, rate: float, seed: int, stage_ovh: Optional[float] = None) -> dict:
        arr = arrivals(rate, n, seed)
        if system == "ee-req":
            return replay_batcher(costs, exits, arr, args.max_batch, ovh["ee-req"])
        return replay_scheduler(
            makers[system](),
            costs,
            exits,
            arr,
            ovh["stage"] if stage_ovh is None else stage_ovh,
            args.step_overhead_us / 1e6,
        )

    def median_p99(system: str, rate: float, stage_ovh: Optional[float] = None) -> float:
        return statistics.median(run(system, rate, seed, stage_ovh)["p99_ms"] for seed in range(args.seeds))

    # (b)'s saturated throughput: far past it, the worker never idles
    sat = {s: run(s, args.overload, 0)["throughput"] for s in ["ee-req", *makers]}
    rows = []
    for f in args.fractions:
        rate = f * sat["ee-req"]
        row: dict = {"fraction": f, "rate": rate}
        for s in ["ee-req", *makers]:
            rs = [run(s, rate, seed) for seed in range(args.seeds)]
            mid = sorted(rs, key=lambda r: r["p99_ms"])[len(rs) // 2]
            row[s] = {**mid, "p99_runs_ms": [r["p99_ms"] for r in rs]}
        for s in makers:
            row[s]["p99_over_ee_req"] = row[s]["p99_ms"] / row["ee-req"]["p99_ms"]
        rows.append(row)
        print(
            f"[{name}] {f:.2f}x (b)'s saturation ({rate:.0f}/s): p99 "
            + ", ".join(f"{s} {row[s]['p99_ms']:.1f} ms" for s in ["ee-req", *makers]),
            flush=True,
        )
    # How much per-request work the stage scheduler can spend: stage (the default policy) at (b)'s
    # saturation rate, its own per-request cost swept, (b)'s kept at --overhead-us-ee-req
    sweep = []
    if args.sweep_us:
        rate, base = sat["ee-req"], median_p99("ee-req", sat["ee-req"])
        for us in args.sweep_us:
            thr = run("stage", args.overload, 0, us / 1e6)["throughput"]
            p99 = median_p99("stage", rate, us / 1e6)
            sweep.append({"stage_us": us, "p99_over_ee_req": p99 / base, "saturated_over_ee_req": thr / sat["ee-req"]})
        print(
            f"[{name}] at (b)'s saturation, stage's p99 over ee-req's by stage's per-request us: "
            + ", ".join(f"{r['stage_us']:g} us {r['p99_over_ee_req']:.2f}" for r in sweep),
            flush=True,
        )
    # The highest rate within the SLO, each system (the replay's noise-free answer to the issue's
    # ">= 1.05x (b) within the SLO")
    within = {}
    for s in ["ee-req", *makers]:
        rate, bracket = highest_rate_within(lambda r: median_p99(s, r), slo_ms, max(sat.values()))
        within[s] = {"rate": rate, "bracket": bracket}
    print(
        f"[{name}] highest rate with p99 <= {slo_ms:.2f} ms: "
        + ", ".join(f"{s} {v['rate']:.0f}/s ({v['rate'] / within['ee-req']['rate']:.3f}x)" for s, v in within.items()),
        flush=True,
    )
    return {
        "model": name,
        "fractions": spec["fractions"],
        "plain_batch1_ms": plain_ms,
        "slo_ms": slo_ms,
        "within_slo": within,
        "interleave_ms": args.interleave_ms,
        "step_overhead_us": args.step_overhead_us,
        "overhead_sweep": sweep,
        "max_batch": args.max_batch,
        "defer_ms": args.defer_ms,
        "overhead_us": {k: v * 1e6 for k, v in ovh.items()},
        "costs": costs.as_dict(),
        "saturated": sat,
        "rows": rows,
    }


def markdown(doc: dict) -> str:
    out = [
        f"# Serving replayed on measured stage costs ({doc['device']['device']}, {doc['date']})",
        "",
        doc["note"],
        "",
    ]
    for res in doc["results"]:
        names = ["ee-req", *[k for k in res["rows"][0] if k.startswith("stage")]]
        sat = res["saturated"]
        out += [
            f"## {res['model']} (max_batch {res['max_batch']}, max_defer_ms {res['defer_ms']}, stage-interleave's "
            f"{res['interleave_ms']:g} ms, each step past stage 0 {res['step_overhead_us']:g} us over a pass's, "
            "per-request work " + ", ".join(f"{k} {v:.1f} us" for k, v in res["overhead_us"].items()) + ")",
            "",
            "Saturated (replayed far past it): "
            + ", ".join(f"{s} {sat[s]:.0f}/s ({sat[s] / sat['ee-req']:.2f}x ee-req)" for s in names)
            + ".",
            "",
            "| rate (x ee-req saturated) | "
            + " | ".join(f"{s} p50 / p99 (ms)" for s in names)
            + " | "
            + " | ".join(f"{s} p99 / ee-req's" for s in names[1:])
            + " |",
            "|" + "---|" * (1 + 2 * len(names) - 1),
        ]
        for row in res["rows"]:
            cells = [f"{row['fraction']:.2f} ({row['rate']:.0f}/s)"]
            cells += [f"{row[s]['p50_ms']:.1f} / {row[s]['p99_ms']:.1f}" for s in names]
            cells += [f"{row[s]['p99_over_ee_req']:.2f}" for s in names[1:]]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        within = res["within_slo"]
        base = within["ee-req"]["rate"]
        out += [
            f"Highest rate with median p99 <= {res['slo_ms']:.2f} ms (10x the plain model's batch-1 latency, "
            f"{res['plain_batch1_ms']:.3f} ms, measured here; bisection to within {SLO_BRACKET:.0%}): "
            + ", ".join(
                f"{s} {v['rate']:.0f}/s ({v['rate'] / base:.3f}x ee-req)" if base else f"{s} {v['rate']:.0f}/s"
                for s, v in within.items()
            )
            + ".",
            "",
        ]
        if res.get("overhead_sweep"):
            out += [
                f"At (b)'s saturation rate, stage's p99 over ee-req's (and its saturated throughput over ee-req's) as "
                f"stage's own per-request work grows, ee-req's kept at {res['overhead_us']['ee-req']:.1f} us: "
                + ", ".join(
                    f"{r['stage_us']:g} us {r['p99_over_ee_req']:.2f} ({r['saturated_over_ee_req']:.2f}x)"
                    for r in res["overhead_sweep"]
                )
                + ".",
                "",
            ]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet,digits")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--defer-ms", type=float, default=20.0, help="stage's max_defer_ms (the CPU default)")
    ap.add_argument(
        "--step-overhead-us",
        type=float,
        default=STEP_OVERHEAD_US,
        help="what each step past stage 0 of a batch run step by step costs beyond the same stage in a pass",
    )
    ap.add_argument("--interleave-ms", type=float, default=1.0, help="stage-interleave's max_defer_ms")
    ap.add_argument(
        "--behind", default="", help="full batches in stage 0 that count as behind, one stage-behindN each (e.g. 2,3)"
    )
    ap.add_argument(
        "--slo-ms", type=float, default=0.0, help=f"the p99 SLO (0: {SLO_X_PLAIN:g}x the plain model's batch-1 latency)"
    )
    ap.add_argument("--fractions", default="0.5,0.8,0.9,0.95,1.0,1.05,1.2", help="rates, x ee-req's saturated")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--overload", type=float, default=1e6, help="arrivals/s of the saturated replays")
    ap.add_argument("--cost-reps", type=int, default=15)
    # per-request host work: saturated bursts on `tiny` (negligible compute) in session 17,
    # bench/serve_machinery.py: ee-req 115,592/s (8.7 us), stage-nodefer 76,865/s (13.0 us)
    ap.add_argument("--overhead-us-ee-req", type=float, default=8.0)
    ap.add_argument("--overhead-us-stage", type=float, default=12.5)
    ap.add_argument(
        "--sweep-us",
        default="10,20,30,40,50,60,70",
        help="stage per-request costs (us) to replay at (b)'s saturation rate ('' for none)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a smoke run: small counts, digits only")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"unknown --models {','.join(unknown)}; accepted: {', '.join(MODELS)}")
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.sweep_us = [float(v) for v in args.sweep_us.split(",") if v]
    try:
        args.behind = [int(v) for v in args.behind.split(",") if v]
    except ValueError:
        ap.error(f"--behind takes whole numbers of batches (e.g. 2,3), got {args.behind!r}")
    if any(n < 2 for n in args.behind):
        ap.error(f"--behind: each count must be >= 2 (1 is stage's own rule), got {args.behind}")
    if args.quick:
        args.models, args.requests, args.seeds, args.cost_reps = "digits", 1500, 1, 3
        args.fractions, args.sweep_us = [0.5, 1.05], [10.0, 40.0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = device_info()
    date = datetime.date.today().isoformat()
    results = [run_model(m, args) for m in args.models.split(",")]
    doc = {
        "device": info,
        "date": date,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "results": results,
        "note": "A replay, not a measurement of serving: arrivals on a virtual clock, each stage step costing its "
        f"median time measured here at its batch size ({os.cpu_count()} CPU cores, {args.threads} torch thread), "
        "each answered request a constant per-request cost; the stage systems decide with StageScheduler's own "
        "policy methods. Latency from arrival to answer; the median-p99 seed of "
        f"{args.seeds} per cell.",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serve-sim-{'quick-' if args.quick else ''}{device_slug(info['device'])}-{date}{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {stem}.json, .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

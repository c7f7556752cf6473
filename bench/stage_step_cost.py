"""What a stage step (``rt.run_stage``) costs beyond the same stage inside a pass, on a CPU, side by
side in one run: the step that calls the compiled CPU ops directly (session 19) against the step
through the ops' dispatch (before it), which stays in the tree as the step for every other device.

Why: a batch that the stage scheduler runs step by step (under a backlog with ``max_defer_ms``, or
with ``fused=False``) pays, for every step past stage 0, what a step costs over the same stage in
one pass of ``rt.infer``. bench/serve_sim.py charges it as ``--step-overhead-us`` (75 us, measured
in session 17), and its replays put that cost between the scheduler and (b)'s rate within the SLO
(docs/serving.md, "Session 19").

  1. The step alone: for stage k >= 1 of each model, on the state ``b`` rows reach there (prepared
     with thresholds that let no row leave), the median time of ``spec.forward`` (the stage and its
     exit head, which a pass runs too), of ``stage_step`` with the compiled ops, and of the
     dispatched ``stage_step``; reported as each step's cost beyond the forward.
  2. Through the scheduler: ``--requests`` single-row requests queued in a StageScheduler whose
     worker never starts, then drained in this thread (no GIL hand-offs, no other thread: its own
     Python alone) with ``fused=True`` (one pass per stage-0 batch) and with ``fused=False`` (the
     same batches step by step: ``max_defer_ms=0``, ``max_wait_ms=0``), for each step: the wall
     difference per step past stage 0, the figure the replay's ``--step-overhead-us`` stands for,
     and the same with the time spent in the model's forwards taken out (timed around
     ``spec.forward``: the same forwards either way, whose run-to-run noise is larger than a
     step's own cost).
     The dispatched step runs here with ``eeruntime.runtime.api.cpu_loop_ops_for`` patched to
     None for its drains (this bench only).

Every system runs in a rotated order, ``--repeats`` times; medians. Torch on 1 thread.

    python bench/stage_step_cost.py [--models tiny,digits,resnet] [--batches 4,8,32] [--repeats 7]
    python bench/stage_step_cost.py --quick            # a smoke run (seconds)

Writes bench/results/stage-step-cost-<device>-<date>[-quick][<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import device_name, report_doc, write_report  # noqa: E402
from serve_load import MODELS, build_runtime, never_exits, rotated  # noqa: E402

import eeruntime.runtime.api as runtime_api  # noqa: E402
from eeruntime.runtime.executors import cpu_loop_ops_for  # noqa: E402
from eeruntime.runtime.step import stage_step  # noqa: E402
from eeruntime.serve import StageScheduler  # noqa: E402

STEPS = ("direct", "dispatched")  # the step with the compiled ops called directly; through the dispatch


class _Drained(StageScheduler):
    """A StageScheduler whose worker thread returns at once: the caller drains it (``drain``)."""

    def _run(self) -> None:
        return

    def drain(self) -> None:
        while self._requests:
            self._step()


@contextlib.contextmanager
def step_kind(kind: str) -> Iterator[None]:
    """Inside the block, ``rt.run_stage`` on the CPU takes the ``kind`` step (``dispatched``:
    ``cpu_loop_ops_for`` patched to None, as before session 19)."""
    if kind == "direct":
        yield
        return
    saved = runtime_api.cpu_loop_ops_for
    runtime_api.cpu_loop_ops_for = lambda spec, device: None  # type: ignore[assignment]
    try:
        yield
    finally:
        runtime_api.cpu_loop_ops_for = saved


def median_us(fn: Callable[[], object], reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def step_part(name: str, batches: List[int], reps: int, repeats: int) -> list:
    """Part 1 for one model: a row per (stage, batch size)."""
    model, rt, pool = build_runtime(MODELS[name])
    spec, snap = rt.spec, rt.thresholds_snapshot()
    loop_ops = cpu_loop_ops_for(spec, torch.device("cpu"))
    if loop_ops is None:
        raise SystemExit("the compiled CPU ops are not built here (make ext): there is no direct step to measure")
    rows_out = []
    with torch.inference_mode():
        for b in batches:
            state, rows, carry = pool[:b].contiguous(), torch.arange(b), ()
            for k in range(rt.num_exits):
                if k >= 1:
                    fns = {
                        "forward": lambda k=k, s=state: spec.forward(k, s, b),
                        "direct": lambda k=k, s=state, r=rows, c=carry: stage_step(spec, k, s, r, c, snap, loop_ops),
                        "dispatched": lambda k=k, s=state, r=rows, c=carry: stage_step(spec, k, s, r, c, snap),
                    }
                    runs: Dict[str, List[float]] = {key: [] for key in fns}
                    for rep in range(repeats):
                        for key in rotated(list(fns), rep):
                            runs[key].append(median_us(fns[key], reps))
                    med = {key: statistics.median(v) for key, v in runs.items()}
                    left = int(stage_step(spec, k, state, rows, carry, snap, loop_ops).exit_rows.shape[0])
                    rows_out.append(
                        {
                            "model": name,
                            "stage": k,
                            "rows": b,
                            "leave": left,
                            "forward_us": med["forward"],
                            "direct_us": med["direct"],
                            "dispatched_us": med["dispatched"],
                            "direct_beyond_us": med["direct"] - med["forward"],
                            "dispatched_beyond_us": med["dispatched"] - med["forward"],
                        }
                    )
                if k + 1 < rt.num_exits:  # the next stage's state: every row goes on
                    res = stage_step(spec, k, state, rows, carry, never_exits(rt), loop_ops)
                    state, rows, carry = res.state, res.rows, res.carry
    return rows_out


@contextlib.contextmanager
def timed_forward(spec) -> Iterator[List[float]]:
    """Inside the block, every ``spec.forward`` (a stage and its exit head, in a pass or a step)
    adds its seconds to the list yielded: the model's own time, which the drains subtract."""
    spent = [0.0]
    forward = spec.forward

    def timed(k, state, n):
        t0 = time.perf_counter()
        try:
            return forward(k, state, n)
        finally:
            spent[0] += time.perf_counter() - t0

    spec.forward = timed  # (an instance attribute: shadows the method for this spec only)
    try:
        yield spent
    finally:
        del spec.forward


def drain_once(rt, xs: list, n: int, max_batch: int, fused: bool) -> tuple:
    """Queue ``n`` single-row requests, drain them in this thread: (seconds, seconds of it in the
    model's forwards, batches run past stage 0, inside a pass or as steps: with ``fused=False``
    the steps past stage 0)."""
    sched = _Drained(rt, max_batch=max_batch, max_defer_ms=0, fused=fused, max_queue_rows=n)
    futures = [sched.submit_nowait(xs[i % len(xs)]) for i in range(n)]
    gc.collect()
    with timed_forward(rt.spec) as spent:
        t0 = time.perf_counter()
        sched.drain()
        seconds = time.perf_counter() - t0
    if not all(f.done() for f in futures):
        raise RuntimeError("a drained request was left pending")
    return seconds, spent[0], sum(sched.stats_dict()["batches"][1:])


def scheduler_part(name: str, batches: List[int], n: int, repeats: int) -> list:
    """Part 2 for one model: a row per max_batch."""
    model, rt, pool = build_runtime(MODELS[name])
    xs = [pool[i : i + 1].clone() for i in range(pool.shape[0])]
    rows_out = []
    for mb in batches:
        systems = [f"{kind}-{'fused' if fused else 'steps'}" for kind in STEPS for fused in (True, False)]
        runs: Dict[str, list] = {s: [] for s in systems}
        for s in systems:  # one warm drain each
            with step_kind(s.split("-")[0]):
                drain_once(rt, xs, min(n, 200), mb, s.endswith("fused"))
        for rep in range(repeats):
            for s in rotated(systems, rep):
                with step_kind(s.split("-")[0]):
                    runs[s].append(drain_once(rt, xs, n, mb, s.endswith("fused")))
        row = {"model": name, "max_batch": mb, "requests": n}
        for kind in STEPS:
            fused, steps = runs[f"{kind}-fused"], runs[f"{kind}-steps"]
            per_step = [(ts - tf) / max(k, 1) * 1e6 for (tf, _, _), (ts, _, k) in zip(fused, steps)]
            # the same without the forwards' time (the same forwards either way: what differs
            # between their runs is the machine's noise, which dwarfs a step's own cost)
            machinery = [((ts - fs) - (tf - ff)) / max(k, 1) * 1e6 for (tf, ff, _), (ts, fs, k) in zip(fused, steps)]
            row[kind] = {
                "fused_us_per_request": statistics.median(t for t, _, _ in fused) / n * 1e6,
                "steps_us_per_request": statistics.median(t for t, _, _ in steps) / n * 1e6,
                "steps_past_stage0": steps[0][2],
                "overhead_us_per_step": statistics.median(per_step),
                "overhead_runs": [round(v, 1) for v in per_step],
                "machinery_us_per_step": statistics.median(machinery),
                "machinery_runs": [round(v, 1) for v in machinery],
            }
        rows_out.append(row)
    return rows_out


def markdown(doc) -> str:
    a = doc["args"]
    lines = [
        f"# A stage step's cost beyond the same stage in a pass ({doc['device']['device']}, torch "
        f"{doc['device']['torch']}, {doc['date']})",
        "",
        f"Machine: {doc['device']['device']}, torch {doc['device']['torch']} on 1 thread; load average (1 min) "
        f"{doc['load_average_1min']['before']:.2f} at the start, {doc['load_average_1min']['after']:.2f} at the end.",
        "",
        "Arguments: `"
        + " ".join(["python bench/stage_step_cost.py", *doc["argv"]])
        + "`; "
        + ", ".join(f"{k} {v}" for k, v in a.items())
        + ".",
        "",
        "`direct`: the step with the compiled CPU ops called directly (session 19); `dispatched`: the step "
        "through the ops' dispatch (before it; still the step off the CPU).",
        "",
        "## 1. The step alone, beyond its stage's forward (us, medians)",
        "",
        "| model | stage | rows | leave | forward | direct: beyond | dispatched: beyond | direct / dispatched |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["step"]:
        ratio = r["direct_beyond_us"] / r["dispatched_beyond_us"] if r["dispatched_beyond_us"] > 0 else float("nan")
        lines.append(
            f"| {r['model']} | {r['stage']} | {r['rows']} | {r['leave']} | {r['forward_us']:.1f} | "
            f"{r['direct_beyond_us']:.1f} | {r['dispatched_beyond_us']:.1f} | {ratio:.2f} |"
        )
    lines += [
        "",
        "## 2. Through the scheduler: per step past stage 0, steps over one pass (us, medians)",
        "",
        "Single-row requests queued, drained in one thread with `fused=True` and `fused=False` (`max_defer_ms=0`): "
        "per step past stage 0, (steps' wall - fused wall) / steps past stage 0, and the same with each run's "
        "time in the model's forwards taken out (`machinery`: the forwards are the same either way, and their "
        "run-to-run noise is larger than a step's own cost). The replay's `--step-overhead-us`.",
        "",
        "| model | max_batch | steps past stage 0 | direct: wall / machinery, us per step | "
        "dispatched: wall / machinery | direct: us per request, fused / steps | dispatched: fused / steps |",
        "| --- | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in doc["scheduler"]:
        d, p = r["direct"], r["dispatched"]
        lines.append(
            f"| {r['model']} | {r['max_batch']} | {d['steps_past_stage0']} | {d['overhead_us_per_step']:.1f} / "
            f"{d['machinery_us_per_step']:.1f} | {p['overhead_us_per_step']:.1f} / {p['machinery_us_per_step']:.1f} | "
            f"{d['fused_us_per_request']:.1f} / {d['steps_us_per_request']:.1f} | "
            f"{p['fused_us_per_request']:.1f} / {p['steps_us_per_request']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,digits,resnet", help=f"of: {', '.join(MODELS)} (CPU models)")
    p.add_argument("--batches", default="4,8,32", help="batch sizes of part 1, max_batch of part 2")
    p.add_argument("--reps", type=int, default=300, help="timed calls per median in part 1")
    p.add_argument("--requests", type=int, default=2400, help="queued requests per drain in part 2")
    p.add_argument("--repeats", type=int, default=7, help="rotated runs per system")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, batch 4, few calls")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="", help="appended to the output files' names (a second run of the day)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.reps, args.requests, args.repeats = "tiny", "4", 20, 120, 1
        args.tag = "-quick" + args.tag
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; accepted: {', '.join(MODELS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches must be comma-separated ints, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or min(args.reps, args.requests, args.repeats) < 1:
        p.error("--batches, --reps, --requests and --repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    step = [r for m in args.models for r in step_part(m, args.batches, args.reps, args.repeats)]
    sched = [r for m in args.models for r in scheduler_part(m, args.batches, args.requests, args.repeats)]
    doc = report_doc(
        argv,
        args={
            "models": ",".join(args.models),
            "batches": ",".join(map(str, args.batches)),
            "reps": args.reps,
            "requests": args.requests,
            "repeats": args.repeats,
        },
        load_average_1min={"before": load_start[0], "after": os.getloadavg()[0]},
        step=step,
        scheduler=sched,
    )
    doc["device"]["device"] = device_name("cpu")  # the models run on the CPU whatever else is here
    write_report(args.out, "stage-step-cost", doc, markdown(doc), args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The serving machinery's own host cost per request, on a CPU, side by side in one process:
request-level batching (``RequestBatcher``, system "ee-req" of bench/serve_load.py) against the
stage scheduler (``StageScheduler``, "stage"), and with ``--before REV`` an earlier git revision's
StageScheduler beside today's, so a change to eeruntime/serve/scheduler.py is measured before and
after in the same run.

    python bench/serve_machinery.py [--before REV] [--models tiny,digits] [--submits 2000] [--repeats 15]
    python bench/serve_machinery.py --quick                  # a smoke run (seconds)

Why: on an NVIDIA H200 the stage scheduler ran exactly the batches ee-req ran on the small model,
yet reached 26,039 req/s saturated against ee-req's 43,325: the host's Python per request was the
bound there (host CPU per request, submitting thread 16.2 against 7.7 us, worker thread 24.4
against 16.8 us; docs/serving.md, "Session 15"). That Python runs the same on a CPU, so this bench
measures it where the model's own compute is negligible, and a change can be judged here before a
GPU session.

  1. Isolated submit cost: the time per call of ``submit_nowait(x)`` for single-row requests with
     the system's worker parked, so only the submitting thread's work is counted (wall clock by
     perf_counter, and that thread's CPU time): a StageScheduler's worker parked as an inline
     caller parks it (``parked_scheduler``), a RequestBatcher's inside its batch function (it
     blocks on a threading.Event: ``parked_batcher``). Each measurement: a fresh system, one warm
     request, ``--submits`` submits timed as one block (the loop's own cost per call included
     alike), ``--repeats`` measurements per system in a rotated order; median and min per system,
     and the median of the per-repeat ratios to ee-req's. The worker's CPU time during the block
     is recorded too: about 0 shows it was parked.
  2. Saturated bursts: bench/serve_load.py's ``saturated_capacity`` (``--capacity-requests``
     single samples submitted at once, ``--capacity-repeats`` rotated runs) for ee-req,
     ee-req-full (request-level batching answering what the scheduler answers, each request's
     InferenceResult, where ee-req answers its logits alone), stage, stage-nodefer (and with --before, stage@before and stage-nodefer@before: the earlier class
     built with the kwargs make_system builds today's with), on models whose compute per request
     is negligible ("tiny", a 16-wide 3-stage MLP) or small ("digits"): req/s, the median of the
     per-run ratios to ee-req's, and the host CPU time per request of the submitting thread and
     of the worker thread.

Every model is built first, then ``eeruntime.serve.freeze_startup_objects()`` runs once (as
``eeruntime serve`` does: the GC's full collections otherwise dominate), and a ``gc.collect()``
precedes each measurement, so no system collects another's garbage. Torch on 1 thread, the GIL
switch interval 0.1 ms (``--switch-interval-ms``: ``eeruntime serve``'s and serve_load.py's
default). The load average is recorded before and after each part (a shared VM's other jobs
decide how long a thread hand-off takes).

Writes bench/results/serve-machinery-<device>-<date>[-quick][<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import device_name, report_doc, write_report  # noqa: E402
from serve_light_load import scheduler_at  # noqa: E402
from serve_load import (  # noqa: E402
    MODELS,
    RequestBatcher,
    _read_clock,
    _worker_clock,
    build_runtime,
    make_system,
    rotated,
    saturated_capacity,
)

from eeruntime.serve import freeze_startup_objects, set_switch_interval  # noqa: E402

BEFORE = "@before"  # a system name's suffix: the --before revision's StageScheduler
SUBMIT_SYSTEMS = ("ee-req", "stage")
CAPACITY_SYSTEMS = ("ee-req", "ee-req-full", "stage", "stage-nodefer")
PARK_TIMEOUT_S = 10.0


@contextlib.contextmanager
def parked_scheduler(sched, x):
    """``sched`` (a StageScheduler) with its worker threads parked for the block: submits are
    admitted (queued in its inbox) and nothing else runs.

    After one warm ``sched.infer(x)``, ``sched._inline`` is set under ``sched._cv``, as a caller
    running a request inline sets it: a worker's ``_step`` then waits on ``_cv`` counted in
    ``_after_inline``, not in ``_sleeping``, and a submit notifies only sleeping workers, so none
    is woken by the submits. The workers are woken once here so that each goes from its idle sleep
    into that wait before the block starts (else the first submit would wake one). On exit
    ``_inline`` is cleared and every worker notified (as ``_release_inline`` does), and ``close()``
    answers what the block submitted."""
    try:
        sched.infer(x)
        with sched._cv:
            sched._inline = True
            sched._cv.notify_all()
        if hasattr(sched, "_after_inline"):
            end = time.perf_counter() + PARK_TIMEOUT_S
            while sched._after_inline < len(sched._workers):
                if time.perf_counter() > end:
                    raise RuntimeError(f"the scheduler's workers did not park within {PARK_TIMEOUT_S} s")
                time.sleep(1e-4)
        else:  # a revision without the count: give the workers time to reach the wait
            time.sleep(0.05)
        yield sched
    finally:
        with sched._cv:
            sched._inline = False
            sched._cv.notify_all()
        sched.close()


@contextlib.contextmanager
def parked_batcher(rt, max_batch, x):
    """A RequestBatcher running ``rt.infer(batch).logits`` (ee-req's function) with its worker
    parked for the block inside that function: after one warm request, one more request whose
    batch blocks on a threading.Event, so the block's submits only queue (and notify a condition
    no thread waits on). On exit the event is set and ``close()`` answers what the block submitted."""
    gate, entered = threading.Event(), threading.Event()
    gate.set()

    def fn(batch):
        if not gate.is_set():
            entered.set()
            gate.wait()
        return rt.infer(batch).logits

    batcher = RequestBatcher(fn, max_batch)
    try:
        batcher.submit_nowait(x).result()  # warm
        gate.clear()
        batcher.submit_nowait(x)
        if not entered.wait(PARK_TIMEOUT_S):
            raise RuntimeError(f"the batcher's worker did not park within {PARK_TIMEOUT_S} s")
        yield batcher
    finally:
        gate.set()
        batcher.close()


def time_submits(system, xs, k: int) -> dict:
    """``k`` calls of ``system.submit_nowait`` over ``xs`` (round robin), timed as one block: per
    call, the wall time (us), the calling thread's CPU time (us), and the worker threads' CPU time
    meanwhile (us; about 0 with the worker parked)."""
    submit = system.submit_nowait
    n = len(xs)
    clock = _worker_clock(system)
    gc.collect()
    w0 = _read_clock(clock)
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(k):
        submit(xs[i % n])
    t1, c1 = time.perf_counter(), time.thread_time()
    w1 = _read_clock(clock)
    return {"wall_us": (t1 - t0) / k * 1e6, "cpu_us": (c1 - c0) / k * 1e6, "worker_cpu_us": (w1 - w0) / k * 1e6}


def submit_cost(systems, park, xs, k: int, repeats: int) -> dict:
    """Part 1: per system, ``repeats`` measurements of :func:`time_submits` (``k`` submits), each
    on a fresh system parked by ``park(name)`` (a context manager), the systems in a rotated order;
    median and min of the wall and CPU times, the median worker CPU, and the median of the
    per-repeat ratios to ee-req's."""
    runs: dict = {s: [] for s in systems}
    for rep in range(repeats):
        for name in rotated(list(systems), rep):
            with park(name) as system:
                runs[name].append(time_submits(system, xs, k))
    out = {}
    for name, rs in runs.items():
        row: dict = {}
        for key in ("wall_us", "cpu_us"):
            vals = [r[key] for r in rs]
            row[f"{key}_median"], row[f"{key}_min"] = statistics.median(vals), min(vals)
            if "ee-req" in runs:
                row[f"{key}_x_ee_req"] = statistics.median(a[key] / b[key] for a, b in zip(rs, runs["ee-req"]))
        row["worker_cpu_us_median"] = statistics.median(r["worker_cpu_us"] for r in rs)
        row["runs_wall_us"] = [round(r["wall_us"], 3) for r in rs]
        out[name] = row
    return out


def stage_maker(model, rt, args, before_cls):
    """``make(name)`` for the systems: serve_load's make_system, a ``<name>@before`` with the
    --before revision's StageScheduler in place of today's (the same kwargs)."""

    def make(name):
        if name.endswith(BEFORE):
            return make_system(name[: -len(BEFORE)], model, rt, args.max_batch, scheduler_cls=before_cls)
        return make_system(name, model, rt, args.max_batch)

    return make


def run_submit_part(args, built, before_cls) -> dict:
    model, rt, pool = built[args.submit_model]
    xs = pool[:64]
    make = stage_maker(model, rt, args, before_cls)
    systems = list(SUBMIT_SYSTEMS) + ([f"stage{BEFORE}"] if before_cls is not None else [])

    def park(name):
        if name == "ee-req":
            return parked_batcher(rt, args.max_batch, xs[0])
        return parked_scheduler(make(name), xs[0])

    res, load, after = timed_part(
        f"submit, {args.submit_model}",
        lambda: submit_cost(systems, park, xs, args.submits, args.repeats),
        lambda s, v: (
            f"  {s:22s} wall {v['wall_us_median']:6.2f} us (min {v['wall_us_min']:6.2f}, "
            f"x{v['wall_us_x_ee_req']:.2f} ee-req)  cpu {v['cpu_us_median']:6.2f} us (x{v['cpu_us_x_ee_req']:.2f})  "
            f"worker {v['worker_cpu_us_median']:.3f} us"
        ),
    )
    return {
        "model": args.submit_model,
        "submits": args.submits,
        "repeats": args.repeats,
        "load_average_1min": {"before": load[0], "after": after[0]},
        "systems": res,
    }


def timed_part(label, run, line):
    """``run()``'s per-system results, with the load average before and after it; each system's
    ``line(system, row)`` printed as it ends: (results, load before, load after)."""
    load = os.getloadavg()
    res = run()
    after = os.getloadavg()
    print(f"[{label}] load average {load[0]:.2f} -> {after[0]:.2f}", flush=True)
    for s, v in res.items():
        print(line(s, v), flush=True)
    return res, load, after


def run_capacity_part(name, args, built, before_cls) -> dict:
    model, rt, pool = built[name]
    systems = list(CAPACITY_SYSTEMS)
    if before_cls is not None:
        systems += [f"{s}{BEFORE}" for s in CAPACITY_SYSTEMS if s.startswith("stage")]
    make = stage_maker(model, rt, args, before_cls)
    gc.collect()
    res, load, after = timed_part(
        f"saturated, {name}",
        lambda: saturated_capacity(systems, make, pool, args.capacity_requests, args.capacity_repeats),
        lambda s, v: (
            f"  {s:22s} {v['req_per_s']:8.0f} req/s  x{v['ratio_to_ee_req']:.3f} ee-req  submit "
            f"{v['submit_us']:6.1f} us  worker {v['worker_us']:6.1f} us  runs {v['runs']}"
        ),
    )
    return {"model": name, "load_average_1min": {"before": load[0], "after": after[0]}, "systems": res}


def markdown(doc) -> str:
    a = doc["args"]
    sub = doc["submit"]
    la = sub["load_average_1min"]
    lines = [
        f"# Serving machinery's host cost per request ({doc['device']['device']}, torch {doc['device']['torch']}, "
        f"{doc['date']})",
        "",
        f"Machine: {doc['device']['device']}, torch {doc['device']['torch']} on 1 thread, GIL switch interval "
        f"{a['switch_interval_ms']} ms; load average (1 min) {doc['load_average_1min']['before']:.2f} at the start, "
        f"{doc['load_average_1min']['after']:.2f} at the end.",
        "",
        "Arguments: `"
        + " ".join(["python bench/serve_machinery.py", *doc["argv"]])
        + "`; "
        + ", ".join(f"{k} {v}" for k, v in a.items())
        + (f"; before = StageScheduler of {doc['before_revision']}" if doc["before_revision"] else "")
        + ".",
        "",
        f"## 1. Isolated submit cost ({sub['model']}, single-row requests, worker parked)",
        "",
        f"{sub['submits']} `submit_nowait(x)` calls timed as one block, per call; {sub['repeats']} fresh systems "
        f"each, rotated; x ee-req: the median of the per-repeat ratios. Load average {la['before']:.2f} -> "
        f"{la['after']:.2f}.",
        "",
        "| system | wall us median | wall us min | x ee-req | thread CPU us median | CPU min | x ee-req "
        "| worker CPU us (parked) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s, v in sub["systems"].items():
        lines.append(
            f"| {s} | {v['wall_us_median']:.2f} | {v['wall_us_min']:.2f} | {v['wall_us_x_ee_req']:.2f} | "
            f"{v['cpu_us_median']:.2f} | {v['cpu_us_min']:.2f} | {v['cpu_us_x_ee_req']:.2f} | "
            f"{v['worker_cpu_us_median']:.3f} |"
        )
    lines += [
        "",
        f"## 2. Saturated bursts ({a['capacity_requests']} requests at once, {a['capacity_repeats']} rotated runs "
        f"per system, max_batch {a['max_batch']})",
        "",
        "req/s: median; x ee-req: the median of the per-run ratios; host CPU per request of the submitting "
        "thread and of the worker thread (medians).",
        "",
    ]
    for res in doc["saturated"]:
        la = res["load_average_1min"]
        lines += [
            f"{res['model']} (load average {la['before']:.2f} -> {la['after']:.2f}):",
            "",
            "| model | system | req/s | x ee-req | submit us/req | worker us/req | runs (req/s) |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for s, v in res["systems"].items():
            lines.append(
                f"| {res['model']} | {s} | {v['req_per_s']:.0f} | {v['ratio_to_ee_req']:.3f} | {v['submit_us']:.1f} | "
                f"{v['worker_us']:.1f} | {v['runs']} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="a git revision whose StageScheduler to measure beside today's")
    p.add_argument("--models", default="tiny,digits", help=f"saturated bursts on these, of: {', '.join(MODELS)}")
    p.add_argument("--submit-model", default="tiny", help="the model whose samples part 1 submits")
    p.add_argument("--submits", type=int, default=2000, help="submits per measurement of part 1")
    p.add_argument("--repeats", type=int, default=15, help="measurements per system in part 1")
    p.add_argument("--capacity-requests", type=int, default=4000, help="requests per saturated run")
    p.add_argument("--capacity-repeats", type=int, default=7, help="saturated runs per system")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--switch-interval-ms", type=float, default=0.1, help="the GIL switch interval (eeruntime serve's)")
    p.add_argument("--quick", action="store_true", help="smoke run: 300 submits x 3, 300 requests x 1 per system")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="", help="appended to the output files' names (a second run of the day)")
    args = p.parse_args(argv)
    if args.quick:
        args.submits, args.repeats = 300, 3
        args.capacity_requests, args.capacity_repeats = 300, 1
        args.tag = "-quick" + args.tag
    models = [m for m in args.models.split(",") if m]
    unknown = set(models + [args.submit_model]) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; accepted: {', '.join(MODELS)}")
    args.models = models
    if min(args.submits, args.repeats, args.capacity_requests, args.capacity_repeats, args.max_batch) < 1:
        p.error("--submits, --repeats, --capacity-requests, --capacity-repeats and --max-batch must be >= 1")
    if not args.switch_interval_ms > 0:
        p.error("--switch-interval-ms must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    before_cls = scheduler_at(args.before) if args.before else None
    load_start = os.getloadavg()
    built = {m: build_runtime(MODELS[m]) for m in dict.fromkeys([args.submit_model, *args.models])}
    built = {
        m: (model, rt, [pool[i : i + 1].clone() for i in range(pool.shape[0])])
        for m, (model, rt, pool) in built.items()
    }
    freeze_startup_objects()  # once, after every model is built (as `eeruntime serve` does)
    switch = set_switch_interval(args.switch_interval_ms / 1e3)
    try:
        submit = run_submit_part(args, built, before_cls)
        saturated = [run_capacity_part(m, args, built, before_cls) for m in args.models]
    finally:
        sys.setswitchinterval(switch)  # (restored: a test may call main)
    doc = report_doc(
        argv,
        before_revision=args.before,
        args={
            "submit_model": args.submit_model,
            "submits": args.submits,
            "repeats": args.repeats,
            "models": ",".join(args.models),
            "capacity_requests": args.capacity_requests,
            "capacity_repeats": args.capacity_repeats,
            "max_batch": args.max_batch,
            "switch_interval_ms": args.switch_interval_ms,
            "quick": args.quick,
        },
        load_average_1min={"before": load_start[0], "after": os.getloadavg()[0]},
        submit=submit,
        saturated=saturated,
    )
    # the models run on the CPU whatever else the machine has: the report names the CPU
    doc["device"]["device"] = device_name("cpu")
    write_report(args.out, "serve-machinery", doc, markdown(doc), args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())

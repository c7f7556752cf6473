"""How an asyncio front end gets its answers from the stage scheduler, side by side in one process:

  per-request   ``await asyncio.wrap_future(sched.submit_nowait(x))``: each answer is one
                ``call_soon_threadsafe`` from the worker's thread (a write to the loop's
                self-pipe, and a handle the loop runs per request): what ``sched.submit`` did
                before session 14, and what any front end wrapping a concurrent future does;
  per-batch     ``await sched.submit(x)``: the answers of one batch for one loop take one call
                (eeruntime/serve/scheduler.py, ``_LoopAnswer``).

An asyncio loop (the main thread) submits single samples at Poisson arrivals of each rate (or all
at once: ``burst``), optionally spending ``--frontend-us`` of busy Python per request before the
submit and half that after the answer (a stand-in for an HTTP front end's parsing and encoding).
Every run gets a fresh scheduler (``inline="never"``: every request through the worker); the two
paths alternate run by run. Recorded per run: the worker thread's CPU time per request
(``pthread_getcpuclockid``), the loop thread's, the worker's voluntary context switches per
request (``/proc/self/task/<tid>/status``: each is a wait, for the GIL or for work), p50/p99 from
the scheduled arrival, and the throughput; reported as medians over ``--repeats`` runs.

    python bench/serve_async_answers.py [--models digits,resnet] [--rates 2000,burst] [--repeats 4]

Writes bench/results/serve-async-answers-<device>-<date>[<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import report_doc, write_report  # noqa: E402
from serve_load import MODELS, build_runtime, rotated  # noqa: E402

from eeruntime.serve import StageScheduler, freeze_startup_objects, set_switch_interval  # noqa: E402
from eeruntime.serve.stats import percentile  # noqa: E402

PATHS = ("per-request", "per-batch")
BURST = "burst"


def voluntary_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    return 0


def spin(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


async def open_loop(sched, path: str, xs, rate, n: int, frontend_us: float, seed: int) -> tuple:
    """Submit ``n`` samples at Poisson arrivals of ``rate``/s (None: all at once); the latencies
    from the scheduled arrivals and the seconds from the first arrival to the last answer."""
    rng = random.Random(seed)
    lat: list = []

    async def one(i: int, t_sched: float) -> None:
        spin(frontend_us)
        if path == "per-request":
            await asyncio.wrap_future(sched.submit_nowait(xs[i % len(xs)]))
        else:
            await sched.submit(xs[i % len(xs)])
        spin(frontend_us / 2)
        lat.append(time.perf_counter() - t_sched)

    tasks = []
    t0 = t = time.perf_counter()
    for i in range(n):
        if rate is not None:
            t += rng.expovariate(rate)
            wait = t - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        tasks.append(asyncio.ensure_future(one(i, t)))
    await asyncio.gather(*tasks)
    return sorted(lat), time.perf_counter() - t0


def run(rt, xs, path: str, rate, args, seed: int) -> dict:
    sched = StageScheduler(rt, max_batch=args.max_batch, inline="never")
    try:
        for x in xs[:20]:  # warm the worker
            sched.submit_nowait(x).result()
        worker = sched._workers[0]
        assert worker.ident is not None and worker.native_id is not None
        clock = time.pthread_getcpuclockid(worker.ident)
        c0, v0, l0 = time.clock_gettime(clock), voluntary_switches(worker.native_id), time.thread_time()
        lat, seconds = asyncio.run(open_loop(sched, path, xs, rate, args.requests, args.frontend_us, seed))
        c1, v1, l1 = time.clock_gettime(clock), voluntary_switches(worker.native_id), time.thread_time()
    finally:
        sched.close()
    n = len(lat)
    return {
        "answered": n,
        "worker_us_per_request": (c1 - c0) / n * 1e6,
        "loop_us_per_request": (l1 - l0) / n * 1e6,
        "worker_voluntary_switches_per_request": (v1 - v0) / n,
        "p50_ms": (percentile(lat, 50) or 0.0) * 1e3,
        "p99_ms": (percentile(lat, 99) or 0.0) * 1e3,
        "throughput": n / seconds,
    }


def run_model(name: str, args) -> dict:
    _, rt, pool = build_runtime(MODELS[name])
    xs = [pool[i : i + 1].clone() for i in range(pool.shape[0])]
    freeze_startup_objects()  # as `eeruntime serve` does once its model is loaded
    cells = []
    for rate_s in args.rates.split(","):
        rate = None if rate_s == BURST else float(rate_s)
        runs: dict = {p: [] for p in PATHS}
        for rep in range(args.repeats):
            for path in rotated(list(PATHS), rep):
                runs[path].append(run(rt, xs, path, rate, args, seed=rep))
        med = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in runs.items()}
        cells.append({"rate": rate_s, "median": med, "runs": runs})
        for p in PATHS:
            m = med[p]
            print(
                f"{name} {rate_s:>7} {p:12s} worker {m['worker_us_per_request']:6.1f} us  loop "
                f"{m['loop_us_per_request']:6.1f} us  switches {m['worker_voluntary_switches_per_request']:.2f}  "
                f"p50 {m['p50_ms']:7.2f} ms  p99 {m['p99_ms']:7.2f} ms  {m['throughput']:8.0f} req/s"
            )
    return {"model": name, "cells": cells}


def markdown(doc) -> str:
    lines = [
        f"# Asyncio answers, per request against per batch ({doc['device']['device']}, torch "
        f"{doc['device']['torch']}, {doc['date']})",
        "",
        doc["note"],
        "",
        "| model | arrivals/s | path | worker us/req | loop us/req | worker switches/req | p50 ms | p99 ms | req/s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in doc["results"]:
        for cell in res["cells"]:
            for p in PATHS:
                m = cell["median"][p]
                lines.append(
                    f"| {res['model']} | {cell['rate']} | {p} | {m['worker_us_per_request']:.1f} | "
                    f"{m['loop_us_per_request']:.1f} | {m['worker_voluntary_switches_per_request']:.2f} | "
                    f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['throughput']:.0f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits,resnet")
    p.add_argument(
        "--rates", default=f"2000,{BURST}", help=f"arrivals per second, comma-separated ('{BURST}': at once)"
    )
    p.add_argument("--requests", type=int, default=3000, help="requests per run")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--frontend-us", type=float, default=0.0, help="busy Python per request before the submit")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; accepted: {', '.join(MODELS)}")
    for r in args.rates.split(","):
        if r != BURST and not (r.replace(".", "", 1).isdigit() and float(r) > 0):
            p.error(f"--rates takes positive numbers or '{BURST}', got {r!r}")
    if args.requests < 1 or args.repeats < 1:
        p.error("--requests and --repeats must be >= 1")
    torch.set_num_threads(1)  # see serve_load.py --threads
    before = set_switch_interval()  # as `eeruntime serve` does (restored: a test may call main)
    try:
        results = [run_model(m, args) for m in args.models.split(",")]
    finally:
        sys.setswitchinterval(before)
    doc = report_doc(
        argv,
        results=results,
        note=f"{args.requests} single-sample requests per run from an asyncio loop, {args.repeats} runs per "
        f"path alternating, medians; {args.frontend_us:g} us of front-end Python per request; max_batch "
        f"{args.max_batch}; torch on 1 thread, GIL switch interval 0.1 ms (as `eeruntime serve`).",
    )
    write_report(args.out, "serve-async-answers", doc, markdown(doc), args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What another thread's Python costs a serving worker: rt.infer's time per row, alone and beside a
thread that wakes up ``--rate`` times a second (Poisson) and works ``--work-us`` each time, either
holding the GIL (Python, as a submitting thread or an HTTP event loop does) or without it (hashing
a buffer, which releases the GIL).

Why (docs/serving.md, "What another thread's Python costs the worker"): under load a server's
worker shares the interpreter with the thread that submits requests. Measured in session 11, the
worker's CPU time per request in situ was ~1.4x what the same calls cost alone. This separates the
two suspects: the GIL (the background thread's Python) and the hardware (the same amount of work
on the other core, GIL-free). Variants run in a rotated order, ``--rounds`` times; each figure is
the median over rounds of the median call.

    python bench/gil_cost.py                        # ResNet-style, batch 16, 3000/s x 50 us
    python bench/gil_cost.py --quick                # a smoke run (seconds)

Writes bench/results/gil-cost-<device>-<date>{tag}.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import _cpu_name, device_info, device_slug, thresholds_for_fractions  # noqa: E402

import eeruntime as ee  # noqa: E402
from eeruntime.serve import set_switch_interval  # noqa: E402

VARIANTS = ("alone", "gil-held", "gil-free")

# Bytes hashed per microsecond of work (sha256 at roughly 1.5 GB/s on a current x86 core); the
# GIL-free work is calibrated against the thread's CPU clock at start, so the two background
# variants spend about the same CPU time.
_BLOB = bytes(8 << 20)


def _spin(us: float) -> None:
    end = time.thread_time() + us * 1e-6
    while time.thread_time() < end:
        pass


def _bytes_per_us() -> float:
    n = 1 << 20
    best = float("inf")
    for _ in range(5):
        t = time.thread_time()
        hashlib.sha256(_BLOB[:n]).digest()
        best = min(best, time.thread_time() - t)
    return n / max(best * 1e6, 1e-3)


class Background:
    """A thread that sleeps an exponential gap, then works ``work_us``: Python holding the GIL
    (``held``) or hashing without it; until stopped. ``events`` counts its wake-ups."""

    def __init__(self, rate: float, work_us: float, held: bool, bytes_per_us: float, seed: int = 0):
        self.rate, self.work_us, self.held = rate, work_us, held
        self.nbytes = max(1, int(work_us * bytes_per_us))
        self.events = 0
        self._stop = threading.Event()
        self._rng = random.Random(seed)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            time.sleep(self._rng.expovariate(self.rate))
            if self.held:
                _spin(self.work_us)
            else:
                hashlib.sha256(_BLOB[: self.nbytes]).digest()  # releases the GIL (data > 2 KB)
            self.events += 1

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def time_calls(fn, x, calls: int) -> tuple:
    """(median wall s, median CPU s of this thread) over ``calls`` calls of ``fn(x)``."""
    for _ in range(3):
        fn(x)
    walls, cpus = [], []
    for _ in range(calls):
        t, c = time.perf_counter(), time.thread_time()
        fn(x)
        walls.append(time.perf_counter() - t)
        cpus.append(time.thread_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def run(args) -> dict:
    torch.manual_seed(0)
    import serve_load  # the bench's models

    spec = serve_load.MODELS[args.model]
    model = spec["build"]().eval()
    pool = torch.randn(256, *spec["shape"])
    with torch.no_grad():
        thr = thresholds_for_fractions(model, pool, spec["fractions"], "entropy")
    rt = ee.EERuntime(model, thresholds=thr, criterion="entropy")
    x = pool[: args.batch]
    set_switch_interval(args.switch_interval_ms / 1e3)
    bpu = _bytes_per_us()
    per = {v: {"wall_us_per_row": [], "cpu_us_per_row": [], "events_per_s": []} for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
            if v == "alone":
                wall, cpu = time_calls(rt.infer, x, args.calls)
                rate = 0.0
            else:
                t0 = time.perf_counter()
                with Background(args.rate, args.work_us, v == "gil-held", bpu, seed=r) as bg:
                    wall, cpu = time_calls(rt.infer, x, args.calls)
                rate = bg.events / (time.perf_counter() - t0)
            per[v]["wall_us_per_row"].append(wall / args.batch * 1e6)
            per[v]["cpu_us_per_row"].append(cpu / args.batch * 1e6)
            per[v]["events_per_s"].append(rate)
    out = {}
    for v, d in per.items():
        out[v] = {k: statistics.median(vals) for k, vals in d.items()}
        out[v]["rounds"] = {k: [round(a, 2) for a in vals] for k, vals in d.items()}
    base = out["alone"]
    for v in VARIANTS[1:]:
        out[v]["cpu_x_alone"] = out[v]["cpu_us_per_row"] / base["cpu_us_per_row"]
        out[v]["wall_x_alone"] = out[v]["wall_us_per_row"] / base["wall_us_per_row"]
        # the worker's extra CPU per background event, against the event's own work
        calls_per_s = 1e6 / (out[v]["wall_us_per_row"] * args.batch)
        extra_per_call = (out[v]["cpu_us_per_row"] - base["cpu_us_per_row"]) * args.batch
        events_per_call = out[v]["events_per_s"] / calls_per_s if calls_per_s else float("nan")
        out[v]["worker_extra_cpu_us_per_event"] = extra_per_call / events_per_call if events_per_call else float("nan")
    return out


def markdown(doc: dict) -> str:
    a = doc["args"]
    res = doc["results"]
    lines = [
        f"# What another thread's Python costs the worker ({doc['device']}, {doc['date']})",
        "",
        f"`rt.infer` on {a['batch']} rows of the {a['model']} model, {a['calls']} calls per variant and round, "
        f"{a['rounds']} rounds in a rotated order (medians); background thread: Poisson wake-ups at "
        f"{a['rate']:.0f}/s, {a['work_us']:.0f} us of work each; GIL switch interval {a['switch_interval_ms']} ms.",
        "",
        "| variant | wall us/row | CPU us/row | CPU x alone | wall x alone | worker's extra CPU per event, us "
        "| events/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in VARIANTS:
        r = res[v]
        lines.append(
            f"| {v} | {r['wall_us_per_row']:.1f} | {r['cpu_us_per_row']:.1f} | {r.get('cpu_x_alone', 1.0):.3f} "
            f"| {r.get('wall_x_alone', 1.0):.3f} | {r.get('worker_extra_cpu_us_per_event', 0.0):.1f} "
            f"| {r['events_per_s']:.0f} |"
        )
    lines += [
        "",
        "gil-held: the background thread runs Python (a spin on its CPU clock) holding the GIL; gil-free: it "
        "hashes a buffer, which releases the GIL, for about the same CPU time. What the worker loses to the "
        "first and not the second is the GIL's doing, not the other core's.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet", help="a bench/serve_load.py model (digits, resnet, ...)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--calls", type=int, default=120, help="rt.infer calls per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=3000.0, help="background wake-ups per second")
    p.add_argument("--work-us", type=float, default=50.0, help="background work per wake-up")
    p.add_argument("--switch-interval-ms", type=float, default=0.1, help="as eeruntime serve sets it")
    p.add_argument("--quick", action="store_true", help="a smoke run: digits, few calls, one round")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.calls, args.rounds, args.batch = "digits", 10, 1, 4
    for name in ("batch", "calls", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.rate <= 0 or args.work_us < 0:
        p.error("--rate must be > 0 and --work-us >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    info = device_info()
    date = datetime.date.today().isoformat()
    # the model runs on the CPU, whatever else the machine has
    doc = {"device": _cpu_name(), "date": date, "info": info, "args": vars(args), "results": run(args)}
    slug = device_slug(str(doc["device"]))
    stem = Path(args.out) / f"gil-cost-{slug}-{date}{args.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    md = markdown(doc)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The serving machinery's own cost at light load: one request at a time, side by side in one
process, over the same 64 samples (closed loop, so only the per-request overhead differs):

  rt.infer                      the reference (no serving machinery),
  sched.infer                   StageScheduler's blocking call (inline on an idle scheduler),
  submit via worker             submit_nowait(x).result() with inline="never": the worker
                                thread's path, which an asyncio server's requests take,
  before: sched.infer           with ``--before REV``: the StageScheduler of an earlier git
                                revision (its scheduler.py loaded beside this one), the
                                before/after of a change measured in the same run.

    python bench/serve_light_load.py [--before 2672833] [--rounds 24]

Writes bench/results/serve-light-load-<device>-<date>.{json,md}; the machine's load average is
recorded (a shared VM's other jobs decide how long a thread hand-off takes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import report_doc, thresholds_for_fractions, write_report  # noqa: E402
from serve_load import MODELS  # noqa: E402

import eeruntime as ee  # noqa: E402
from eeruntime.serve import StageScheduler  # noqa: E402
from eeruntime.timing import side_by_side  # noqa: E402


def scheduler_at(rev: str):
    """The StageScheduler class of git revision ``rev``, imported as a sibling module of today's
    (its relative imports resolve to this checkout's runtime and stats)."""
    src = subprocess.run(
        ["git", "-C", str(HERE.parent), "show", f"{rev}:eeruntime/serve/scheduler.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "scheduler_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("eeruntime.serve._scheduler_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "eeruntime.serve"
    spec.loader.exec_module(mod)
    return mod.StageScheduler


def run_model(name, spec, args, before_cls) -> dict:
    torch.manual_seed(0)
    model = spec["build"]().eval()
    pool = torch.randn(512, *spec["shape"])
    rt = ee.EERuntime(model, thresholds=thresholds_for_fractions(model, pool, spec["fractions"], "entropy"))
    mix = [pool[i : i + 1].clone() for i in range(64)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(mix)
        return mix[state["i"]]

    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        inline = stack.enter_context(StageScheduler(rt, max_batch=args.max_batch))
        worker = stack.enter_context(StageScheduler(rt, max_batch=args.max_batch, inline="never"))
        fns = {
            "rt.infer": lambda: rt.infer(nxt()),
            "sched.infer": lambda: inline.infer(nxt()),
            "submit via worker": lambda: worker.submit_nowait(nxt()).result(),
        }
        if before_cls is not None:
            before = stack.enter_context(before_cls(rt, max_batch=args.max_batch))
            fns["before: sched.infer"] = lambda: before.infer(nxt())
        sbs = side_by_side(fns, "cpu", rounds=args.rounds, inner=len(mix))
        inline_share = inline.stats_dict()["inline_requests"] / max(inline.stats_dict()["requests"]["submitted"], 1)
    base = sbs.median("rt.infer")
    paths = {
        k: {
            "ms_per_request": sbs.median(k) * 1e3,
            "minus_infer_ms": (sbs.median(k) - base) * 1e3,
            "ratio_to_infer": sbs.ratio(k, "rt.infer"),
        }
        for k in fns
    }
    print(f"[{name}] load average {load[0]:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
    for k, v in paths.items():
        print(f"  {k:22s} {v['ms_per_request']:.3f} ms  {v['minus_infer_ms']:+.3f} ms  x{v['ratio_to_infer']:.3f}")
    return {
        "model": name,
        "load_average_1min": {"before": load[0], "after": os.getloadavg()[0]},
        "sched_infer_inline_share": inline_share,
        "paths": paths,
    }


def markdown(doc) -> str:
    lines = [
        f"# Serving machinery at light load ({doc['device']['device']}, torch {doc['device']['torch']}, {doc['date']})",
        "",
        doc["note"],
        "",
        "| model | path | ms per request | minus rt.infer ms | ratio to rt.infer (paired) | load avg (1 min) |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for res in doc["results"]:
        la = res["load_average_1min"]
        for k, v in res["paths"].items():
            lines.append(
                f"| {res['model']} | {k} | {v['ms_per_request']:.3f} | {v['minus_infer_ms']:+.3f} | "
                f"{v['ratio_to_infer']:.3f} | {la['before']:.2f} -> {la['after']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits,resnet")
    p.add_argument("--before", help="a git revision whose StageScheduler to time beside today's")
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # see serve_load.py --threads
    before_cls = scheduler_at(args.before) if args.before else None
    results = [run_model(m, MODELS[m], args, before_cls) for m in args.models.split(",")]
    doc = report_doc(
        argv,
        before_revision=args.before,
        results=results,
        note="One request at a time (closed loop over the same 64 samples), every path once per round, "
        f"{args.rounds} rounds of 64 requests, medians; torch on 1 thread. Shared 2-core VM with other jobs "
        "running: the load average per model is in the table; a thread hand-off there costs a wait for a core.",
    )
    write_report(args.out, "serve-light-load", doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

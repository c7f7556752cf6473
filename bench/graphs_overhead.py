"""Where the CUDA-graph runtime's time goes when nothing exits: a breakdown of the gap between the
runtime and the plain model's CUDA graph (DESIGN's "no exits within 5 %" target, missed by 5.4 %
on the H100 in session 12: bench/results/nvidia-h100-80gb-hbm3-2026-11-27.md).

With nothing exiting the runtime does the plain model's work plus its own: every exit head, the
decision, the scatter of (no) leavers, the pack of all rows into the next stage's static buffer,
one graph per stage instead of one for the model, and a host read of the survivors' count between
stages (the GPU idles from the end of stage k until the host has launched stage k+1). Each
variant below adds one of these, all timed side by side in interleaved rounds
(``eeruntime.timing.side_by_side``) on the same batch (ResNet-18-style ``zoo.resnet_style``,
entropy thresholds of 0, so no row exits):

    plain_graph      every stage and the final head, one CUDA graph (bench/test_bench_graphs.py's)
    plain_split      the same as one graph per stage, replayed back to back (graph boundaries)
    heads_graph      every stage and every exit head, one graph (the heads' cost)
    runtime_replay   the runtime's own stage graphs replayed back to back, no count read between
                     them (its device work: heads, decisions, scatters, packs)
    runtime_synced   the same with a host read of the survivors' count between stages, the least
                     Python a sync costs (the bubbles' floor)
    runtime_read_all ``rt(x)`` reading every stage's count as it comes (``launch_ahead`` off: the
                     runtime before session 15)
    runtime_graphs   ``rt(x)``: the runtime as users call it (launch-ahead on: a count that could not
                     shrink the next stage's bucket last time is read at the end, in one wait)

Differences of medians of the per-round ratios to ``plain_graph`` give each part's share. Each
layout of ``--layouts`` runs the same model and batches again: ``contiguous`` (NCHW) and
``channels_last`` (the layout cuDNN's fast convolutions want; the runtime keeps it through its packs
since session 15, eeruntime/rows_layout.py). A CUDA
device is what this is for; on a CPU (no capture: "graphs" are plain calls) it runs as a smoke
test (``--quick``). Writes ``graphs-overhead-<device>-<date>{.json,.md}`` under ``--out``.

    python bench/graphs_overhead.py --res 224 --batches 256,64
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import capture_graph, cudnn_benchmark_on, device_info, device_slug  # noqa: E402

import eeruntime as ee  # noqa: E402
from eeruntime.oracle import plain_forward, stage_forward  # noqa: E402
from eeruntime.runtime.graphs import GraphRunner  # noqa: E402
from eeruntime.timing import side_by_side  # noqa: E402
from eeruntime.zoo import resnet_style  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
VARIANTS = (
    "plain_graph", "plain_split", "heads_graph", "runtime_replay", "runtime_synced", "runtime_read_all",
    "runtime_graphs",
)  # fmt: skip


def _replayable(fn, cuda: bool):
    """``fn`` as a CUDA graph's replay on CUDA; on a CPU, ``fn`` itself (nothing to capture)."""
    return capture_graph(fn).replay if cuda else fn


def measure(model, x, rounds: int, inner: int) -> dict:
    """Every variant on batch ``x`` (nothing exits), side by side; times per batch in ms and each
    variant's median per-round ratio to plain_graph."""
    cuda = x.device.type == "cuda"
    K = len(model.stages)
    rt = ee.EERuntime(model, thresholds=[0.0] * (K - 1), criterion="entropy", graphs=True, buckets=[x.shape[0]])
    with torch.inference_mode():
        first = rt.infer(x)
        assert int((first.exit_index == K - 1).sum()) == x.shape[0], "a row exited early"
        if cuda:
            runner, call = rt._graph_runner, (lambda: rt(x))
        else:  # the runtime runs eagerly on a CPU: the graph runner's loop (uncaptured) stands in
            runner = GraphRunner(rt, buckets=[x.shape[0]])
            runner.infer(x)
            call = lambda: runner.infer(x)  # noqa: E731
        sig = next(iter(runner._sigs.values()))
        B = x.shape[0]
        static_in = x.clone()

        def plain():
            return plain_forward(model, static_in)

        def with_heads():
            state, outs = static_in, []
            for stage, head in zip(model.stages, model.exits):
                state = stage_forward(stage, state)
                outs.append(head(state))
            return outs

        # one graph per stage: the stage's output buffer is the next graph's input
        split_fns, state = [], static_in
        for k, stage in enumerate(model.stages):
            out = stage_forward(stage, state).clone()

            def run(stage=stage, src=state, dst=out, last=k == K - 1):
                y = stage_forward(stage, src)
                dst.copy_(y)
                if last:
                    model.exits[-1](dst)

            split_fns.append(run)
            state = out
        plain_graph = _replayable(plain, cuda)
        heads_graph = _replayable(with_heads, cuda)
        split = [_replayable(f, cuda) for f in split_fns]

        def start_runtime():
            first_stage = sig.stages[0]
            first_stage.inputs[0][:B].copy_(x)
            first_stage.count.fill_(B)

        def runtime_replay():
            start_runtime()
            for k in range(K):
                runner._launch(sig, k, B)

        def read_all(fn):
            runner.launch_ahead = False
            try:
                return fn()
            finally:
                runner.launch_ahead = True

        def runtime_synced():
            start_runtime()
            for k in range(K):
                runner._launch(sig, k, B)
                if k < K - 1:
                    int(sig.stages[k + 1].count.item())

        variants = {
            "plain_graph": lambda: (static_in.copy_(x), plain_graph()),
            "plain_split": lambda: (static_in.copy_(x), [g() for g in split]),
            "heads_graph": lambda: (static_in.copy_(x), heads_graph()),
            "runtime_replay": runtime_replay,
            "runtime_synced": runtime_synced,
            "runtime_read_all": lambda: read_all(call),
            "runtime_graphs": call,
        }
        syncs_before = runner.host_syncs
        call()
        syncs = runner.host_syncs - syncs_before
        syncs_before = runner.host_syncs
        read_all(call)
        syncs_read_all = runner.host_syncs - syncs_before
        t = side_by_side(variants, x.device, rounds=rounds, warmup=2, inner=inner)
    ms = {name: 1e3 * t.median(name) for name in variants}
    ratio = {name: t.ratio(name, "plain_graph") for name in variants}
    parts = {
        "graph_boundaries": ratio["plain_split"] - 1,
        "heads": ratio["heads_graph"] - 1,
        "decide_scatter_pack": ratio["runtime_replay"] - ratio["heads_graph"],
        "sync_floor": ratio["runtime_synced"] - ratio["runtime_replay"],
        "host_python": ratio["runtime_read_all"] - ratio["runtime_synced"],
    }
    return {
        "batch": B,
        "ms": ms,
        "ratio_to_plain_graph": ratio,
        "speedup_vs_plain_graph": 1 / ratio["runtime_graphs"],
        "parts_of_plain_graph": parts,
        "host_syncs_per_call": syncs,
        "host_syncs_per_call_read_all": syncs_read_all,
        "launch_ahead_gain": ratio["runtime_read_all"] / ratio["runtime_graphs"],
        "captured": bool(sig.graphs),
    }


def kernel_table(model, x, top: int = 15) -> str:
    """torch.profiler's device-time table of one eager runtime call (graphs=False: the same kernels,
    each visible), or the reason it could not be made."""
    if x.device.type != "cuda":
        return "(no CUDA device: no kernel table)"
    K = len(model.stages)
    rt = ee.EERuntime(model, thresholds=[0.0] * (K - 1), criterion="entropy", graphs=False)
    try:
        with torch.inference_mode():
            for _ in range(3):
                rt(x)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    rt(x)
                torch.cuda.synchronize()
        return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)
    except Exception as e:  # the profiler is a diagnostic: its failure must not lose the timings
        return f"(profiler failed: {type(e).__name__}: {e})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batches", default="256,64")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument(
        "--layouts",
        default="contiguous,channels_last",
        help="memory layouts of the model and its input, each measured (channels_last: the layout convolutions "
        "want on a GPU; the runtime keeps it through its packs, eeruntime/rows_layout.py)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: 32x32, batch 8, 3 rounds")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    if set(layouts) - set(LAYOUTS) or not layouts:
        p.error(f"unknown layouts in {args.layouts!r}; accepted: {', '.join(LAYOUTS)}")
    if args.quick:
        args.res, args.batches, args.rounds, args.inner = 32, "8", 3, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    base = resnet_style(num_classes=100).to(device).to(dtype).eval()
    rows = []
    with cudnn_benchmark_on():
        for layout in layouts:
            fmt = LAYOUTS[layout]
            model = copy.deepcopy(base).to(memory_format=fmt)
            for B in batches:
                x = torch.randn(B, 3, args.res, args.res, device=device).to(dtype).to(memory_format=fmt)
                rows.append({"layout": layout, **measure(model, x, args.rounds, args.inner)})
                print(json.dumps({"layout": layout, "batch": B, **rows[-1]["ratio_to_plain_graph"]}), flush=True)
        table = kernel_table(base, torch.randn(batches[0], 3, args.res, args.res, device=device).to(dtype))
    info = device_info()
    doc = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "model": "resnet_style (ResNet-18 widths, 4 exits), nothing exits",
        "layouts": layouts,
        "resolution": args.res,
        "dtype": str(dtype).replace("torch.", ""),
        "rows": rows,
        "kernel_table": table,
    }
    stem = (
        Path(args.out) / f"graphs-overhead-{device_slug(info['device'])}-{datetime.date.today().isoformat()}{args.tag}"
    )
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    md = [f"# CUDA-graph runtime with no exits vs the plain graph: {info['device']}", ""]
    md.append(f"{doc['date']} | torch {info['torch']} | {args.res}x{args.res} | {doc['dtype']} | rounds {args.rounds}")
    md += [
        "",
        "| layout | batch | "
        + " | ".join(f"{v} ms (x plain)" for v in VARIANTS)
        + " | syncs/call (read_all / graphs) |",
    ]
    md.append("|---" * (len(VARIANTS) + 3) + "|")
    for r in rows:
        cells = [f"{r['ms'][v]:.3f} ({r['ratio_to_plain_graph'][v]:.3f})" for v in VARIANTS]
        md.append(
            f"| {r['layout']} | {r['batch']} | "
            + " | ".join(cells)
            + f" | {r['host_syncs_per_call_read_all']} / {r['host_syncs_per_call']} |"
        )
    md += [
        "",
        "Launch-ahead (runtime_read_all over runtime_graphs, median of per-round ratios): "
        + ", ".join(f"{r['layout']} batch {r['batch']} {r['launch_ahead_gain']:.3f}x" for r in rows),
    ]
    md += ["", "Shares of the plain graph's time in runtime_read_all (differences of the ratios above):", ""]
    md.append("| layout | batch | " + " | ".join(rows[0]["parts_of_plain_graph"]) + " |")
    md.append("|---" * (len(rows[0]["parts_of_plain_graph"]) + 2) + "|")
    for r in rows:
        parts = " | ".join(f"{v:+.3f}" for v in r["parts_of_plain_graph"].values())
        md.append(f"| {r['layout']} | {r['batch']} | {parts} |")
    md += ["", "Kernels of the eager runtime (device time, 5 calls at the first batch):", "", "```", table, "```", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Open-loop load against the Ray Serve forms of eeruntime (issue #17):

  (a) one replica of the plain model (every stage, the final exit) with request-level batching,
  (b) one replica of the runtime (the drop-in deployment) with request-level batching,
  (c) the two-tier split: tier 0 (stage 0, "edge") and tier 1 (stages 1-3, "cloud"), one replica each.

Poisson arrivals of single samples from the driver through a DeploymentHandle (127.0.0.1 only,
bounded count and time per rate): throughput and p50/p99 latency per arrival rate, the bytes of
survivor state sent between tiers per request, the fraction of requests that never reach tier 1,
the one-way transfer time; then the accuracy effect of sending the state in bf16 / fp16.

    python bench/ray_serve_load.py [--rates 20,40,80,160] [--seconds 6] [--out bench/results]

Writes bench/results/ray-serve-<date>.json, .md and a latency-vs-throughput PNG. Both "nodes"
are custom resources of one local Ray instance, so the numbers include Ray's cross-process path
(serialization, object store, scheduling) but no network.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "eeruntime.zoo:resnet_style"
MODEL_KWARGS = {"num_classes": 10, "widths": [16, 32, 64, 128], "blocks": [1, 1, 1, 1]}
SHAPE = (3, 32, 32)
EXIT0_FRACTION = 0.6  # thresholds chosen so about this share of samples leaves at exit 0


def build_model():
    from eeruntime.serve.ray.spec import RuntimeSpec

    return RuntimeSpec(model=MODEL, model_kwargs=MODEL_KWARGS).build().model


@torch.inference_mode()
def pick_thresholds(seed: int = 0):
    """Entropy thresholds putting ~60% of random inputs out at exit 0 and about half of the rest
    at each later early exit (a random-weight model has no real confidence; the split is what the
    serving path sees)."""
    model = build_model()
    state = torch.randn(512, *SHAPE, generator=torch.Generator().manual_seed(seed))
    thr = []
    for k in range(len(model.stages) - 1):
        state = model.stages[k](state)
        p = torch.softmax(model.exits[k](state).float(), 1)
        h = -(p * p.clamp_min(1e-30).log()).sum(1)
        thr.append(float(torch.quantile(h, EXIT0_FRACTION if k == 0 else 0.5)))
        state = state[h >= thr[-1]]
    return thr


async def open_loop(handle, rate: float, seconds: float, max_requests: int, seed: int):
    """Fire single-sample requests at Poisson times; returns per-request (latency s, answer meta)."""
    rng = np.random.default_rng(seed)
    n = min(max_requests, max(1, int(rate * seconds)))
    gaps = rng.exponential(1.0 / rate, n)
    xs = torch.randn(n, 1, *SHAPE, generator=torch.Generator().manual_seed(seed))
    results = [None] * n

    async def one(i, t_sched):
        try:
            ans = await handle.remote(xs[i])
            results[i] = (time.perf_counter() - t_sched, ans.get("meta", {}), None)
        except Exception as e:  # noqa: BLE001 - an error is a result of the load
            results[i] = (time.perf_counter() - t_sched, {}, type(e).__name__)

    tasks = []
    start = time.perf_counter()
    t = start
    for i in range(n):
        t += gaps[i]
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, t)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds * 4 + 60)
    elapsed = time.perf_counter() - start
    return results, elapsed


def summarize(results, elapsed, rate):
    ok = [r for r in results if r[2] is None]
    lat = np.array([r[0] for r in ok]) * 1e3
    row = {
        "rate": rate,
        "sent": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "throughput": len(ok) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }
    tiers = [r[1].get("tiers", 1) for r in ok]
    sent = [sum(r[1].get("transfer_bytes", [])) for r in ok]
    tms = [t for r in ok for t in r[1].get("transfer_ms", [])]
    if any("transfer_bytes" in r[1] for r in ok):
        row.update(
            never_tier2=float(np.mean([t == 1 for t in tiers])),
            bytes_per_request=float(np.mean(sent)),
            bytes_per_forwarded=float(np.mean([b for b in sent if b])) if any(sent) else 0.0,
            transfer_ms_p50=float(np.percentile(tms, 50)) if tms else None,
        )
    return row


def accuracy_effect(handle, thresholds, n=256):
    """Rows served through the tiers with each transfer dtype against rt.infer."""
    import eeruntime as ee
    from eeruntime.serve.ray.app import deploy

    model = build_model()
    x = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(123))
    ref = ee.EERuntime(model, thresholds=thresholds).infer(x)
    out = {}
    for dtype in ("same", "bf16", "fp16"):
        deploy(apps_config(thresholds, dtype))
        deadline = time.monotonic() + 60
        while handle.stats.remote().result(timeout_s=60)["transfer_dtype"] != dtype:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        answers = [handle.remote(x[i : i + 8]).result(timeout_s=120) for i in range(0, n, 8)]
        logits = torch.cat([a["logits"] for a in answers])
        exits = torch.cat([a["exit_index"] for a in answers])
        sent = sum(sum(a["meta"]["transfer_bytes"]) for a in answers)
        out[dtype] = {
            "same_exit": float((exits == ref.exit_index).float().mean()),
            "same_prediction": float((logits.argmax(1) == ref.logits.argmax(1)).float().mean()),
            "max_abs_logit_diff": float((logits - ref.logits).abs().max()),
            "bytes_per_sample": sent / n,
        }
    deploy(apps_config(thresholds, "same"))
    return out


def apps_config(thresholds, transfer_dtype="same"):
    from eeruntime.serve.ray.app import app_config

    base = {
        "model": MODEL,
        "model_kwargs": MODEL_KWARGS,
        "thresholds": thresholds,
        "torch_threads": 1,
        "max_batch_size": 16,
        "batch_wait_timeout_s": 0.001,
    }
    one = {"ray_actor_options": {"num_cpus": 0}}
    return [
        app_config("plain", {**base, "form": "plain", **one}, None),
        app_config("runtime", {**base, "form": "runtime", **one}, None),
        app_config(
            "tiers",
            {
                **base,
                "form": "tiers",
                "stages_per_tier": [1, 3],
                "num_exits": 4,
                "tier_options": [
                    {"ray_actor_options": {"num_cpus": 0, "resources": {"edge": 1}}},
                    {"ray_actor_options": {"num_cpus": 0, "resources": {"cloud": 1}}},
                ],
            },
            None,
            {"Tier0": {"transfer_dtype": transfer_dtype}},
        ),
    ]


def plot(rows, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for form, style in (("plain", "o-"), ("runtime", "s-"), ("tiers", "^-")):
        pts = [r for r in rows if r["form"] == form and r["p99_ms"] is not None]
        ax.plot([r["throughput"] for r in pts], [r["p99_ms"] for r in pts], style, label=f"{form} p99")
        ax.plot([r["throughput"] for r in pts], [r["p50_ms"] for r in pts], style, alpha=0.4, label=f"{form} p50")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Ray Serve, single-sample requests, open loop (shared 2-core VM)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="20,40,80,160")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--max-requests", type=int, default=1500)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",")]

    import ray
    from ray import serve

    from eeruntime.serve.ray.app import deploy
    from eeruntime.serve.ray.local import start_local_ray

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [os.environ.get("PYTHONPATH", "")])
    thresholds = pick_thresholds()
    start_local_ray({"edge": 8, "cloud": 8}, num_cpus=2, log_to_driver=False)
    rows = []
    try:
        with socket.socket() as sock:  # a free port for Serve's HTTP proxy (unused here)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(apps_config(thresholds), timeout_s=300)
        handles = {name: serve.get_app_handle(name) for name in ("plain", "runtime", "tiers")}
        for h in handles.values():  # warm up every path
            h.remote(torch.randn(1, *SHAPE)).result(timeout_s=120)
        for rate in rates:
            for form, h in handles.items():  # forms interleaved at each rate: same background load
                results, elapsed = asyncio.run(open_loop(h, rate, a.seconds, a.max_requests, seed=int(rate)))
                row = {"form": form, **summarize(results, elapsed, rate)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        accuracy = accuracy_effect(handles["tiers"], thresholds)
        print(json.dumps(accuracy), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    import ray as _ray

    day = dt.date.today().isoformat()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ray-serve-{day}"
    record = {
        "machine": f"shared {os.cpu_count()}-core VM ({platform.processor() or platform.machine()}), no GPU; "
        "both tiers' 'nodes' are custom resources of one local Ray instance",
        "torch": torch.__version__,
        "ray": _ray.__version__,
        "python": sys.version.split()[0],
        "model": MODEL,
        "model_kwargs": MODEL_KWARGS,
        "input": list(SHAPE),
        "thresholds": thresholds,
        "seconds_per_rate": a.seconds,
        "rows": rows,
        "transfer_dtype_accuracy": accuracy,
    }
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [
        "| form | rate (req/s) | throughput | p50 ms | p99 ms | errors | never tier 1 | bytes/request | transfer p50 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['form']} | {r['rate']:.0f} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['errors']} | {r.get('never_tier2', float('nan')):.2f} | {r.get('bytes_per_request', float('nan')):.0f} | "
            f"{r.get('transfer_ms_p50') or float('nan'):.1f} |"
        )
    lines += [
        "",
        "| transfer dtype | same exit as rt.infer | same prediction | max abs logit diff | bytes/sample |",
        "| --- | --- | --- | --- | --- |",
    ]
    for d, v in accuracy.items():
        lines.append(
            f"| {d} | {v['same_exit']:.3f} | {v['same_prediction']:.3f} | {v['max_abs_logit_diff']:.2e} | "
            f"{v['bytes_per_sample']:.0f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, str(stem) + "-latency.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

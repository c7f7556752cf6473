"""Serving a text encoder: requests of many lengths, side by side in one process.

    python bench/serve_text_load.py [--requests 3000] [--repeats 5] [--fractions 0.5,0.8] [--trim]
    python bench/serve_text_load.py --quick            # a smoke run (seconds)

Texts come in every length, and rows batch only with rows of the same shape. So a stage scheduler
without padding batches only requests of equal length, while request-level batching, as an HF
pipeline does, pads each batch to its longest request. ``StageScheduler(pad_to=...)`` pads each
request at submit to the shortest of a few lengths (docs/serving.md, "Text models"). This bench
measures what that buys, on a small BERT built from a config (random weights, nothing
downloaded; exits after layers 0 and 1 with thresholds for ``--fractions-exit`` of the rows), fed
single-text requests of uniform random lengths in ``[--min-len, --max-len]``:

- ``ee-req-pad``: request-level batching of ``rt.infer``, each batch padded to its longest request
  (``RequestBatcher`` of bench/serve_load.py with a padding collate);
- ``stage``: the stage scheduler without ``pad_to`` (``eeruntime serve``'s settings: no deferral);
- ``stage-pad``: the same with ``pad_to`` = ``--pad-to``;
- ``stage-request-pad``: ``policy="request"`` with ``pad_to``: request batching in the
  scheduler's machinery, so the difference to ``stage-pad`` is re-batching survivors.

Before timing, every system's answers for 64 requests are checked against ``rt.infer`` on each
request unpadded (logits within 1e-4; an exit may differ only for a row whose score is within
1e-4 of its threshold). Then: saturated throughput (``--requests`` at once, ``--repeats`` rotated
runs; the median, and the median of the per-run ratios to ee-req-pad's), and an open loop of
Poisson arrivals at ``--fractions`` of ee-req-pad's saturated rate (p50 and p99 of the median
run). Torch on 1 thread, GIL switch interval 0.1 ms, startup objects frozen, as in
bench/serve_load.py. Writes bench/results/serve-text-<device>-<date>[<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import report_doc, thresholds_for_fractions, write_report  # noqa: E402
from serve_load import RequestBatcher, median_run, open_loop, rotated, saturated_capacity  # noqa: E402

import eeruntime as ee  # noqa: E402
from eeruntime.serve import StageScheduler, freeze_startup_objects, set_switch_interval  # noqa: E402

SYSTEMS = ("ee-req-pad", "stage", "stage-pad", "stage-request-pad")
NEAR = 1e-4  # a row whose score is this close to a threshold may exit either way


def small_bert(trim: bool, max_len: int, seed: int = 0):
    """A 4-layer BERT (hidden 128) from a config, random weights, exits after layers 0 and 1."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=max(128, max_len),
        num_labels=4,
    )
    bert = transformers.BertForSequenceClassification(config).eval()
    return ee.attach_exits(bert, at=["bert.encoder.layer.0", "bert.encoder.layer.1"], trim=trim)


def texts(n: int, lo: int, hi: int, seed: int) -> list:
    """``n`` one-text requests (ids [1, L], mask of ones [1, L]), L uniform in [lo, hi]."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        out.append((torch.randint(1, 1000, (1, length), generator=g), torch.ones(1, length, dtype=torch.int64)))
    return out


def pad_collate(requests: list) -> tuple:
    """Requests (ids, mask) padded to the longest among them, as a tokenizer pads a batch."""
    longest = max(r[0].shape[1] for r in requests)
    ids = torch.zeros(len(requests), longest, dtype=torch.int64)
    mask = torch.zeros(len(requests), longest, dtype=torch.int64)
    for i, (a, m) in enumerate(requests):
        ids[i, : a.shape[1]] = a[0]
        mask[i, : m.shape[1]] = m[0]
    return ids, mask


def make_system(name: str, rt, max_batch: int, pad_to):
    if name == "ee-req-pad":
        return RequestBatcher(lambda x: rt.infer(x), max_batch, answers=_rows, collate=pad_collate)
    return StageScheduler(
        rt,
        max_batch=max_batch,
        inline="never",
        max_defer_ms=0.0,
        policy="request" if name == "stage-request-pad" else "deepest",
        pad_to=pad_to if name.endswith("-pad") else None,
        max_queue_rows=1 << 20,
    )


def _rows(res, n):
    return [ee.InferenceResult(*(t[i : i + 1] for t in (res.logits, res.exit_index, res.confidence))) for i in range(n)]


def check_answers(rt, systems, make, requests) -> dict:
    """Every system's answers for ``requests`` against rt.infer on each request unpadded: the
    largest logit difference, and how many exits differed (each only where the row's score at the
    exit that decided differently is within NEAR of its threshold)."""
    want = [rt.infer(r) for r in requests]
    with torch.no_grad():
        scores = [[o.softmax(-1).amax(-1) for o in rt.model(r)] for r in requests]
    report = {}
    for name in systems:
        system = make(name)
        try:
            got = [f.result(60) for f in [system.submit_nowait(r) for r in requests]]
        finally:
            system.close()
        worst, differ = 0.0, 0
        for g, w, sc in zip(got, want, scores):
            if not torch.equal(g.exit_index, w.exit_index):
                differ += 1
                k = int(torch.minimum(g.exit_index, w.exit_index).min())  # where the two decided apart
                margin = abs(float(sc[k].max()) - rt.thresholds[k])
                assert margin < NEAR, f"{name}: an exit differs from rt.infer's {margin} from its threshold"
            else:
                worst = max(worst, float((g.logits - w.logits).abs().max()))
        assert worst < 1e-4, f"{name}: logits differ from rt.infer's by {worst}"
        report[name] = {"max_abs_logit_diff": worst, "exits_differing": differ}
    return report


def run(args) -> dict:
    torch.set_num_threads(1)
    model = small_bert(args.trim, args.max_len)
    calib = texts(256, args.min_len, args.max_len, seed=1)
    # (one padded batch: padding changes no real token's output beyond float rounding)
    thresholds = thresholds_for_fractions(model, pad_collate(calib), args.fractions_exit, "max_prob")
    rt = ee.EERuntime(model, thresholds=thresholds, criterion="max_prob")
    pad_to = tuple(args.pad_to)
    pool = texts(2048, args.min_len, args.max_len, seed=2)

    def make(name):
        return make_system(name, rt, args.max_batch, pad_to)

    correctness = check_answers(rt, SYSTEMS, make, pool[:64])
    print("answers checked against rt.infer:", correctness, flush=True)
    freeze_startup_objects()
    set_switch_interval(args.switch_interval_ms / 1e3)
    sat = with_ratios(saturated_capacity(list(SYSTEMS), make, pool, args.requests, args.repeats))
    for s, row in sat.items():
        print(f"saturated {s:18s} {row['req_per_s']:9.0f} req/s", flush=True)
    base = sat["ee-req-pad"]["req_per_s"]
    cells = []
    for i, f in enumerate(args.fractions):
        rate = round(f * base, 1)
        n = max(50, min(args.requests, int(rate * args.seconds)))
        runs: dict = {s: [] for s in SYSTEMS}
        for rep in range(args.repeats):
            for s in rotated(list(SYSTEMS), rep):
                system = make(s)
                try:
                    runs[s].append(open_loop(system, pool, rate, n, args.seconds * 3, 30.0, seed=900 + 100 * i + rep))
                finally:
                    system.close()
        cell = {"fraction": f, "rate": rate, "requests": n, "systems": {s: median_run(runs[s]) for s in SYSTEMS}}
        for s in SYSTEMS:
            row = cell["systems"][s]
            print(f"{f:.2f}x: {s:18s} p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms", flush=True)
        cells.append(cell)
    return {"correctness": correctness, "saturated": sat, "open_loop": cells, "thresholds": rt.thresholds}


def with_ratios(sat: dict) -> dict:
    """Each system's saturated runs over ee-req-pad's run next to it (the same repeat): the
    median ratio, as ``ratio_to_ee_req_pad``."""
    base = sat["ee-req-pad"]["runs"]
    for row in sat.values():
        row["ratio_to_ee_req_pad"] = statistics.median(a / b for a, b in zip(row["runs"], base))
    return sat


def markdown(doc: dict) -> str:
    a = doc["args"]
    lines = [
        f"# Serving a text encoder: requests of many lengths ({doc['device']['device']}, {doc['date']})",
        "",
        f"Small BERT (4 layers, hidden 128, random weights; exits after layers 0 and 1, thresholds for "
        f"{a['fractions_exit']} of the rows{', trim=True' if a['trim'] else ''}); one-text requests of "
        f"{a['min_len']}-{a['max_len']} tokens (uniform); max_batch {a['max_batch']}; pad_to {a['pad_to']}; "
        f"torch on 1 thread. `python bench/serve_text_load.py {' '.join(doc['argv'])}`.",
        "",
        "Answers checked first against `rt.infer` on each request unpadded (64 requests per system):",
        "",
        "| system | largest logit difference | exits differing |",
        "| --- | ---: | ---: |",
    ]
    for s, c in doc["correctness"].items():
        lines.append(f"| {s} | {c['max_abs_logit_diff']:.1e} | {c['exits_differing']} |")
    lines += [
        "",
        f"Saturated ({a['requests']} requests at once, {a['repeats']} rotated runs; x ee-req-pad: median of the "
        "per-run ratios):",
        "",
        "| system | req/s | x ee-req-pad | runs |",
        "| --- | ---: | ---: | --- |",
    ]
    for s, r in doc["saturated"].items():
        lines.append(f"| {s} | {r['req_per_s']:.0f} | {r['ratio_to_ee_req_pad']:.3f} | {r['runs']} |")
    lines += [
        "",
        "Open loop, Poisson arrivals at fractions of ee-req-pad's saturated rate (the median-p99 run of "
        f"{a['repeats']}):",
        "",
        "| x ee-req-pad's | rate /s | system | p50 ms | p99 ms | p99 of each run |",
        "| ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for cell in doc["open_loop"]:
        for s, r in cell["systems"].items():
            lines.append(
                f"| {cell['fraction']:.2f} | {cell['rate']:.0f} | {s} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['repeats']} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000, help="requests per saturated run (at most, open loop)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fractions", default="0.5,0.8", help="open-loop rates, as fractions of ee-req-pad's saturated")
    p.add_argument("--seconds", type=float, default=2.0, help="open-loop arrivals per run, seconds")
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--pad-to", default="16,32,64")
    p.add_argument("--fractions-exit", default="0.4,0.3", help="share of rows leaving at exits 0 and 1")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--trim", action="store_true", help="attach_exits(trim=True): survivors cut to their longest")
    p.add_argument("--switch-interval-ms", type=float, default=0.1)
    p.add_argument("--quick", action="store_true", help="smoke run: 200 requests, 1 repeat, one rate")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    args.fractions = [float(v) for v in args.fractions.split(",")]
    args.fractions_exit = [float(v) for v in args.fractions_exit.split(",")]
    args.pad_to = [int(v) for v in args.pad_to.split(",")]
    if args.quick:
        args.requests, args.repeats, args.fractions, args.seconds = 200, 1, [0.5], 0.3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = report_doc(argv, args={k: v for k, v in vars(args).items() if k not in ("out", "tag")}, **run(args))
    write_report(args.out, "serve-text", doc, markdown(doc), tag=("-quick" if args.quick else "") + args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())

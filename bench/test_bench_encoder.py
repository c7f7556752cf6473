"""Encoder suite (CPU): a BERT-base-shaped encoder (12 layers, H=768, 12 heads, S=128, random
weights from a BertConfig) with exits after layers 4 and 8, at batch 1, 16 and 64.

Variants, timed side by side (eeruntime.timing.side_by_side: interleaved rounds, ratios as
medians of per-round ratios):

- ``plain``: every layer and the model's classifier (the speed-up baseline);
- ``runtime``: EERuntime (per-row exits, survivors packed between stages);
- ``oracle``: each stage on exactly the rows that reach it (efficiency = oracle / runtime);
- ``batch1``: the loop DeeBERT users run today (its maintainers: "the inference batch_size can
  only be 1"): one sample at a time, stop at its first confident exit;
- ``whole_batch``: HF PABEE's batched rule: the batch leaves at an exit only when every row may;
- ``runtime_trim`` (reported separately): EERuntime with length trimming (``trim=True``).

Inputs have real lengths drawn uniformly from [S/4, S] (right padding), so trimming has padding
to cut. Thresholds (max_prob) are set once on the 64-row batch for about 40% / 30% / 30% of
the rows at exits 0 / 1 / final.

    python bench/test_bench_encoder.py [--rounds N] [--batches 1,16,64] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import benchmark_record, device_info, thresholds_for_fractions  # noqa: E402

import eeruntime as ee  # noqa: E402
from eeruntime.ops import confidence_ref  # noqa: E402
from eeruntime.oracle import oracle_forward, plain_forward, plan_oracle  # noqa: E402
from eeruntime.state import as_tuple, call  # noqa: E402
from eeruntime.timing import side_by_side  # noqa: E402

transformers = pytest.importorskip("transformers")

S, LAYERS, HIDDEN, EXITS_AFTER = 128, 12, 768, (4, 8)
FRACTIONS = [0.4, 0.3, 0.3]
BATCHES = [1, 16, 64]


def build(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=12,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=512,
        num_labels=4,
    )
    backbone = transformers.BertForSequenceClassification(cfg).eval()
    at = [f"bert.encoder.layer.{n - 1}" for n in EXITS_AFTER]  # "after layer 4" = the 4th layer
    model = ee.attach_exits(backbone, at=at, head="mean")
    trimmed = ee.attach_exits(backbone, at=at, head="mean", trim=True)
    trimmed.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    B = max(BATCHES)
    ids = torch.randint(1000, cfg.vocab_size, (B, S), generator=g)
    lengths = torch.randint(S // 4, S + 1, (B,), generator=g)
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    x = model.prepare_input({"input_ids": ids * mask, "attention_mask": mask})
    thr = thresholds_for_fractions(model, x, FRACTIONS, "max_prob")
    return model, trimmed, x, thr


def rows(x, n):
    return tuple(t[:n].contiguous() for t in as_tuple(x))


@torch.inference_mode()
def batch1_loop(model, x, thr):
    """One sample at a time, each stopping at its first confident exit (DeeBERT's inference)."""
    K = model.num_exits
    out = []
    for i in range(as_tuple(x)[0].shape[0]):
        state = tuple(t[i : i + 1] for t in as_tuple(x))
        for k in range(K):
            state = call(model.stages[k], state)
            logits = call(model.exits[k], state)
            if k == K - 1 or float(confidence_ref(logits, "max_prob")[0]) >= thr[k]:
                break
        out.append(logits)
    return torch.cat(out)


@torch.inference_mode()
def whole_batch(model, x, thr):
    """Exit the whole batch at the first exit where every row is confident (HF PABEE's batching)."""
    K = model.num_exits
    state = x
    for k in range(K):
        state = call(model.stages[k], state)
        logits = call(model.exits[k], state)
        if k == K - 1 or bool((confidence_ref(logits, "max_prob") >= thr[k]).all()):
            return logits


def measure(model, trimmed, x_all, thr, batch, rounds):
    x = rows(x_all, batch)
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob", graphs=False)
    rt_trim = ee.EERuntime(trimmed, thresholds=thr, criterion="max_prob", graphs=False)
    res = rt.infer(x)
    # trimming changes the summation lengths only: rows within float noise of a threshold may flip
    trim_flips = int((rt_trim.infer(x).exit_index != res.exit_index).sum())
    plan = plan_oracle(x, res.exit_index, model.num_exits)
    fns = {
        "plain": lambda: plain_forward(model, x),
        "runtime": lambda: rt.infer(x),
        "oracle": lambda: oracle_forward(model, plan),
        "batch1": lambda: batch1_loop(model, x, thr),
        "whole_batch": lambda: whole_batch(model, x, thr),
        "runtime_trim": lambda: rt_trim.infer(x),
    }
    with torch.inference_mode():
        t = side_by_side(fns, "cpu", rounds=rounds, warmup=1)
    fractions = (torch.bincount(res.exit_index, minlength=model.num_exits).float() / batch).tolist()
    cost = ee.measure_costs(model, rows(x, 1))
    summary = {
        "batch": batch,
        "seq_len": S,
        "exit_fractions": fractions,
        "rounds": rounds,
        "trim_exit_flips": trim_flips,
        "torch_threads": torch.get_num_threads(),
    }
    summary.update({f"{n}_ms": t.median(n) * 1e3 for n in fns})
    summary.update(
        {
            "speedup_ideal": cost.ideal_speedup(fractions),
            "speedup_runtime": t.ratio("plain", "runtime"),
            "speedup_oracle": t.ratio("plain", "oracle"),
            "speedup_batch1": t.ratio("plain", "batch1"),
            "speedup_whole_batch": t.ratio("plain", "whole_batch"),
            "efficiency": t.ratio("oracle", "runtime"),
            "speedup_runtime_trim": t.ratio("plain", "runtime_trim"),
            "trim_gain": t.ratio("runtime", "runtime_trim"),
        }
    )
    return summary


@pytest.fixture(scope="module")
def built():
    return build()


@pytest.mark.parametrize("batch", BATCHES)
def test_encoder_runtime(benchmark, built, batch):
    model, trimmed, x, thr = built
    summary = measure(model, trimmed, x, thr, batch, rounds=3)
    benchmark_record(benchmark, **summary)
    print("\n" + json.dumps(summary, indent=1))
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob", graphs=False)
    xb = rows(x, batch)
    benchmark.pedantic(lambda: rt.infer(xb), rounds=2, warmup_rounds=0)


def table(results) -> str:
    cols = [
        "batch",
        "plain_ms",
        "runtime_ms",
        "oracle_ms",
        "batch1_ms",
        "whole_batch_ms",
        "speedup_ideal",
        "speedup_runtime",
        "speedup_oracle",
        "speedup_batch1",
        "speedup_whole_batch",
        "efficiency",
        "runtime_trim_ms",
        "trim_gain",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    model, trimmed, x, thr = build()
    results = []
    for b in [int(v) for v in args.batches.split(",")]:
        results.append(measure(model, trimmed, x, thr, b, args.rounds))
        print(json.dumps(results[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cpu-encoder-{datetime.date.today().isoformat()}")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": device_info(), "thresholds": thr, "results": results}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

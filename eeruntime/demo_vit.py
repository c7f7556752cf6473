"""``python -m eeruntime demo-vit``: BranchyNet's table for a tiny ViT, and PABEE per row vs per batch.

On scikit-learn's bundled digits (8x8 images as 16 patch tokens of 2x2 pixels and a CLS token):
train a 6-block ViT with an exit after every block (BranchyNet joint training), calibrate on a
held-out part of the training split, and time on the test split at a serving batch size:

- the plain ViT (every block, final exit);
- EERuntime with entropy thresholds (accuracy target, and the greedy method);
- EERuntime with PABEE's patience decided per row (``ee.exit_rules.Patience``), P the smallest
  patience within the accuracy target on the calibration data;
- HF's PABEE rule with the same P: one counter for the whole batch, which stops only when every
  row kept its prediction P times (``ee.exit_rules.whole_batch_patience``).

Each EERuntime row is also timed against the oracle (the same blocks run on exactly the rows that
reach them, no decisions, no packing): efficiency = oracle time / runtime time. Prints the table
and writes ``report.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Callable, Dict, Optional

import torch

from ._json import enc_float
from .calibration.cache import build_cache
from .data import Batches, load_digits_split
from .demo import _table
from .exit_rules import Patience, whole_batch_patience
from .oracle import oracle_forward, plain_forward, plan_oracle
from .runtime import EERuntime
from .timing import side_by_side
from .zoo import digits_vit


def _each(fn, items):
    """``fn`` over each item: one timed variant of the side-by-side table."""
    return [fn(i) for i in items]


def _chunks(x, batch):
    """``x`` in serving batches of ``batch`` rows (the last one shorter)."""
    return [x[i : i + batch] for i in range(0, x.shape[0], batch)]


def smallest_patience(cache, max_drop: float) -> int:
    """The smallest patience P (one for every exit) whose per-row accuracy on the cache is within
    ``max_drop`` of the final exit's; K - 1 (every row to the end or nearly) when none is."""
    K = cache.num_exits
    for P in range(1, K):
        if cache.outcome([float(P)] * (K - 1)).accuracy >= cache.final_accuracy - max_drop:
            return P
    return K - 1


def _accuracy(logits, y) -> float:
    return float((logits.argmax(1) == y).float().mean())


def _fractions(exit_index, K: int):
    return (torch.bincount(exit_index.cpu(), minlength=K).float() / max(1, exit_index.numel())).tolist()


def run(
    out: str = "demo_vit_out",
    device: Optional[str] = None,
    epochs: int = 60,
    batch: int = 256,
    max_drop: float = 0.005,
    seed: int = 0,
    progress: bool = True,
    rounds: int = 40,
    depth: int = 6,
    return_model: bool = False,
):
    """Run the demo; returns the report (a dict, also written to ``out/report.json``), and the
    trained model with ``return_model``."""
    from . import calibrate, train

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    split = load_digits_split(seed=seed)
    n_cal = int(split.x_train.shape[0] * 0.4)  # thresholds are chosen on data the model did not train on
    x_fit, y_fit = split.x_train[n_cal:], split.y_train[n_cal:]
    cal_data = Batches(split.x_train[:n_cal], split.y_train[:n_cal], batch_size=256, shuffle=False)

    model = digits_vit(depth=depth).to(dev)
    train.joint(
        model, Batches(x_fit, y_fit, batch_size=64, seed=seed), epochs=epochs, lr=3e-3, progress=progress, seed=seed
    )
    model.eval()
    K = model.num_exits
    x_test, y_test = split.x_test.to(dev), split.y_test.to(dev)
    N = len(y_test)
    with torch.inference_mode():
        baseline_acc = _accuracy(plain_forward(model, x_test), y_test)

    cal_acc = calibrate(model, cal_data, "accuracy", criterion="entropy", max_drop=max_drop, progress=progress)
    cal_greedy = calibrate(model, cal_data, "greedy", criterion="entropy", progress=progress)
    P = smallest_patience(build_cache(model, cal_data, Patience(), progress=progress), max_drop)
    runtimes = {
        "entropy (accuracy)": EERuntime(model, thresholds=cal_acc.thresholds, criterion="entropy"),
        "entropy (greedy)": EERuntime(model, thresholds=cal_greedy.thresholds, criterion="entropy"),
        f"PABEE per row (P={P})": EERuntime(model, thresholds=float(P), criterion=Patience()),
    }

    chunks = _chunks(x_test, batch)
    fns: Dict[str, Callable[[], object]] = {"plain": lambda: [plain_forward(model, c) for c in chunks]}
    results: Dict[str, tuple] = {}
    with torch.inference_mode():
        for name, rt in runtimes.items():
            res = rt.infer(x_test)
            plans = [plan_oracle(c, rt.infer(c).exit_index, K) for c in chunks]
            results[name] = (res.logits, res.exit_index, rt.thresholds, rt.stats.cost_model)
            fns[name] = functools.partial(_each, rt, chunks)
            fns[name + " oracle"] = functools.partial(_each, functools.partial(oracle_forward, model), plans)
        whole = [whole_batch_patience(model, c, P) for c in chunks]
        batch_name = f"PABEE whole batch, HF (P={P})"
        results[batch_name] = (
            torch.cat([lg for lg, _ in whole]),
            torch.cat([torch.full((c.shape[0],), k, dtype=torch.int64) for c, (_, k) in zip(chunks, whole)]),
            [float(P)] * (K - 1),
            None,
        )
        fns[batch_name] = lambda: [whole_batch_patience(model, c, P) for c in chunks]
    t = side_by_side(fns, dev, rounds=rounds)

    rows = [
        {
            "name": "ViT (plain)",
            "accuracy": baseline_acc,
            "time_per_sample": t.median("plain") / N,
            "gain": None,
            "thresholds": [],
            "exit_fractions": [],
        }
    ]
    report = {}
    for name, (logits, exit_index, thresholds, cost) in results.items():
        fractions = _fractions(exit_index, K)
        entry = {
            "thresholds": [enc_float(float(v)) for v in thresholds],
            "ee_accuracy": _accuracy(logits, y_test),
            "exit_fractions": fractions,
            "mean_blocks_run": float(exit_index.double().mean()) + 1,
            "speedup_measured": t.ratio("plain", name),
            "time_per_sample_s": t.median(name) / N,
        }
        if name + " oracle" in t.times:
            entry.update(
                speedup_oracle=t.ratio("plain", name + " oracle"),
                efficiency=t.ratio(name + " oracle", name),
                speedup_ideal=cost.ideal_speedup(fractions) if cost is not None else None,
            )
        report[name] = entry
        rows.append(
            {
                "name": name,
                "accuracy": entry["ee_accuracy"],
                "time_per_sample": entry["time_per_sample_s"],
                "gain": entry["speedup_measured"],
                "thresholds": thresholds,
                "exit_fractions": fractions,
            }
        )
    summary = {
        "baseline_accuracy": baseline_acc,
        "rows": report,
        "patience": P,
        "max_drop": max_drop,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": batch,
        "test_samples": N,
        "depth": depth,
        "epochs": epochs,
        "rounds": rounds,
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    print()
    print(_table(rows))
    print()
    for name, e in report.items():
        extra = (
            (
                f", oracle {e['speedup_oracle']:.2f}x, FLOPs-ideal {e['speedup_ideal']:.2f}x, "
                f"efficiency (oracle / runtime time) {e['efficiency']:.2f}"
            )
            if "efficiency" in e
            else ""
        )
        print(
            f"{name}: speed-up {e['speedup_measured']:.2f}x{extra}; blocks run per sample {e['mean_blocks_run']:.2f} of {K}"
        )
    print(f"device {summary['device']}, batch {batch}; report: {os.path.join(out, 'report.json')}")
    return (summary, model) if return_model else summary


OPTIONS = (
    ("--out", dict(default="demo_vit_out", help="folder for report.json")),
    ("--device", dict(choices=["cpu", "cuda"], default=None, help="default: cuda when present")),
    ("--epochs", dict(type=int, default=60)),
    ("--batch", dict(type=int, default=256, help="serving batch size for the timings")),
    ("--max-drop", dict(type=float, default=0.005, help="accuracy the calibration may give up")),
    ("--rounds", dict(type=int, default=40, help="interleaved timing rounds")),
    ("--seed", dict(type=int, default=0)),
    ("--no-progress", dict(action="store_true")),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eeruntime demo-vit", description=__doc__.splitlines()[0])
    for flag, kwargs in OPTIONS:
        ap.add_argument(flag, **kwargs)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")
    run(a.out, a.device, a.epochs, a.batch, a.max_drop, a.seed, progress=not a.no_progress, rounds=a.rounds)
    return 0

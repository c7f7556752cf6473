"""``python -m eeruntime demo``: BranchyNet's results table, reproduced by EERuntime on real data.

On scikit-learn's bundled handwritten digits: train a small CNN with two early exits (BranchyNet
joint training), calibrate thresholds (an accuracy target, and the greedy method of the
threshold-selection post), then time the plain backbone against EERuntime on the test split at a
serving batch size. Prints a table like BranchyNet's and writes ``report.json`` and the
accuracy / cost frontier plot into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

import torch

from ._json import enc_float
from .data import Batches, load_digits_split
from .oracle import oracle_forward, plain_forward, plan_oracle
from .runtime import EERuntime
from .timing import side_by_side
from .zoo import digits_cnn


def _chunks(x, batch):
    return [x[i : i + batch] for i in range(0, x.shape[0], batch)]


@torch.inference_mode()
def time_side_by_side(model, rt, x, batch: int, device, rounds: int = 90):
    """Seconds per pass over ``x`` in serving batches of the plain backbone, the runtime and the
    oracle (medians over ``rounds`` interleaved rounds), and their paired ratios."""
    chunks = _chunks(x, batch)
    plans = [plan_oracle(c, rt.infer(c).exit_index, rt.num_exits) for c in chunks]
    t = side_by_side({
        "plain": lambda: [plain_forward(model, c) for c in chunks],
        "runtime": lambda: [rt(c) for c in chunks],
        "oracle": lambda: [oracle_forward(model, p) for p in plans],
    }, device, rounds=rounds)
    out = {k: t.median(k) for k in t.times}
    out.update(speedup=t.ratio("plain", "runtime"), speedup_oracle=t.ratio("plain", "oracle"),
               efficiency=t.ratio("oracle", "runtime"))
    return out


def _table(rows: List[dict]) -> str:
    head = f"{'Network':<22}{'Acc. (%)':>9}{'Time (ms/sample)':>18}{'Gain':>7}  {'Thrshld. T':<22}{'Exit (%)':<22}"
    lines = [head, "-" * len(head)]
    for r in rows:
        thr = ", ".join(f"{t:.3g}" for t in r["thresholds"]) if r["thresholds"] else "-"
        ex = ", ".join(f"{100 * f:.1f}" for f in r["exit_fractions"]) if r["exit_fractions"] else "-"
        gain = f"{r['gain']:.2f}x" if r["gain"] else "-"
        lines.append(f"{r['name']:<22}{100 * r['accuracy']:>9.2f}{1e3 * r['time_per_sample']:>18.4f}{gain:>7}  {thr:<22}{ex:<22}")
    return "\n".join(lines)


def run(out: str = "demo_out", device: Optional[str] = None, epochs: int = 20, batch: int = 256,
        max_drop: float = 0.005, seed: int = 0, progress: bool = True, rounds: int = 90,
        return_model: bool = False):
    """Run the demo; returns the report (and the trained model with ``return_model``)."""
    from . import calibrate, plot, train

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    split = load_digits_split(seed=seed)
    # Hold out a calibration part of the training split: thresholds are chosen on data the model
    # did not train on, and judged on the test split.
    n_cal = int(split.x_train.shape[0] * 0.4)
    x_fit, y_fit = split.x_train[n_cal:], split.y_train[n_cal:]
    x_cal, y_cal = split.x_train[:n_cal], split.y_train[:n_cal]

    model = digits_cnn().to(dev)
    history = train.joint(model, Batches(x_fit, y_fit, batch_size=64, seed=seed), epochs=epochs, lr=3e-3,
                          progress=progress, seed=seed)
    model.eval()
    x_test, y_test = split.x_test.to(dev), split.y_test.to(dev)
    with torch.inference_mode():
        baseline_acc = float((plain_forward(model, x_test).argmax(1) == y_test).float().mean())

    cal_data = Batches(x_cal, y_cal, batch_size=256, shuffle=False)
    cal_acc = calibrate(model, cal_data, "accuracy", criterion="entropy", max_drop=max_drop, progress=progress)
    cal_greedy = calibrate(model, cal_data, "greedy", criterion="entropy", progress=progress)

    rows = []
    report = {}
    for name, cal in (("accuracy", cal_acc), ("greedy", cal_greedy)):
        rt = EERuntime(model, thresholds=cal.thresholds, criterion="entropy")
        res = rt.infer(x_test)
        acc = float((res.logits.argmax(1) == y_test).float().mean())
        fractions = (torch.bincount(res.exit_index.cpu(), minlength=rt.num_exits).float() / len(y_test)).tolist()
        t = time_side_by_side(model, rt, x_test, batch, dev, rounds=rounds)
        ideal = rt.stats.cost_model.ideal_speedup(fractions)
        measured = t["speedup"]
        report[name] = {
            "thresholds": list(cal.thresholds), "ee_accuracy": acc, "exit_fractions": fractions,
            "speedup_measured": measured, "speedup_ideal": ideal, "speedup_oracle": t["speedup_oracle"],
            "efficiency": t["efficiency"], "efficiency_flops": measured / ideal,
            "time_per_sample_s": t["runtime"] / len(y_test),
        }
        if not rows:
            rows.append({"name": "CNN (plain)", "accuracy": baseline_acc, "time_per_sample": t["plain"] / len(y_test),
                         "gain": None, "thresholds": [], "exit_fractions": []})
        rows.append({"name": f"B-CNN ({name})", "accuracy": acc, "time_per_sample": t["runtime"] / len(y_test),
                     "gain": measured, "thresholds": cal.thresholds, "exit_fractions": fractions})

    frontier_png = os.path.join(out, "frontier.png")
    plot.frontier(cal_acc, frontier_png, title="digits CNN, 3 exits: calibration candidates (entropy)")
    main = report["accuracy"]
    summary = {
        "baseline_accuracy": baseline_acc,
        "ee_accuracy": main["ee_accuracy"],
        "thresholds": [enc_float(t) for t in main["thresholds"]],
        "exit_fractions": main["exit_fractions"],
        "speedup_measured": main["speedup_measured"],
        "speedup_ideal": main["speedup_ideal"],
        # efficiency = oracle time / runtime time: what the runtime's machinery (decisions, packs,
        # host reads) costs against the same stages run on exactly the rows that reach them.
        # efficiency_flops = measured / FLOPs-ideal speed-up also charges the kernels' own
        # non-proportional cost at small batches (DESIGN.md's definition).
        "efficiency": main["efficiency"],
        "efficiency_flops": main["efficiency_flops"],
        "speedup_oracle": main["speedup_oracle"],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": batch,
        "test_samples": int(len(y_test)),
        "criterion": "entropy",
        "max_drop": max_drop,
        "greedy": {**report["greedy"], "thresholds": [enc_float(t) for t in report["greedy"]["thresholds"]]},
        "final_train_loss": history["loss"][-1] if isinstance(history, dict) and "loss" in history else None,
        "frontier_png": frontier_png,
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    print()
    print(_table(rows))
    print(f"\nspeed-up: measured {main['speedup_measured']:.2f}x, oracle {main['speedup_oracle']:.2f}x, "
          f"FLOPs-ideal {main['speedup_ideal']:.2f}x; efficiency (oracle / runtime time) {main['efficiency']:.2f}, "
          f"measured / FLOPs-ideal {main['efficiency_flops']:.2f}; device {summary['device']}")
    print(f"report: {os.path.join(out, 'report.json')}, frontier plot: {frontier_png}")
    return (summary, model) if return_model else summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eeruntime demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="folder for report.json and frontier.png")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256, help="serving batch size for the timings")
    ap.add_argument("--max-drop", type=float, default=0.005, help="accuracy the calibration may give up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")
    run(a.out, a.device, a.epochs, a.batch, a.max_drop, a.seed, progress=not a.no_progress)
    return 0

"""``python -m eeruntime demo``: BranchyNet's results table, reproduced by EERuntime on real data.

On scikit-learn's bundled handwritten digits: train a small CNN with two early exits (BranchyNet
joint training), calibrate thresholds (an accuracy target, and the greedy method of the
threshold-selection post), then time the plain backbone against EERuntime on the test split at a
serving batch size. Prints a table like BranchyNet's (every number of a row from one
measurement, see :mod:`eeruntime.speed`) and writes ``report.json`` and the accuracy / cost
frontier plot into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import List, Optional

import torch

from ._json import enc_float
from .data import Batches, load_digits_split
from .oracle import plain_forward
from .runtime import EERuntime
from .speed import PLAIN, measure
from .threads import cpu_count, using_threads
from .zoo import digits_cnn


def threshold_notes(criterion: str, thresholds) -> List[str]:
    """Plain words for the infinite thresholds of a table row (exits numbered from 1 as in the
    table: exit k's threshold is the k-th)."""
    below = criterion == "entropy"  # entropy exits when H < T; the other criteria when score >= T
    rule = "the entropy criterion exits when H < T" if below else f"{criterion} exits when its score >= T"
    notes = []
    for k, t in enumerate(thresholds, start=1):
        if math.isinf(t):
            if (t > 0) == below:
                what = f"every sample that reaches exit {k} leaves there and the stages after it never run"
            else:
                what = f"no sample leaves at exit {k} (it is switched off)"
            notes.append(f"T = {'inf' if t > 0 else '-inf'} at exit {k}: {rule}, so {what}.")
    return notes


def _table(rows: List[dict]) -> str:
    cells = []
    for r in rows:
        thr = ", ".join(f"{t:.3g}" for t in r["thresholds"]) if r["thresholds"] else "-"
        ex = ", ".join(f"{100 * f:.1f}" for f in r["exit_fractions"]) if r["exit_fractions"] else "-"
        gain = f"{r['gain']:.2f}x" if r["gain"] else "-"
        cells.append((r, thr, ex, gain))
    # Columns as wide as their longest entry (a six-exit ViT's thresholds, "PABEE whole batch, HF").
    wn = max([22] + [len(r["name"]) + 2 for r, *_ in cells])
    wt = max([22] + [len(thr) + 2 for _, thr, _, _ in cells])
    head = f"{'Network':<{wn}}{'Acc. (%)':>9}{'Time (ms/sample)':>18}{'Gain':>7}  {'Thrshld. T':<{wt}}{'Exit (%)'}"
    lines = [head, "-" * max(len(head), wn + 36 + wt + max(len(ex) for _, _, ex, _ in cells))]
    for r, thr, ex, gain in cells:
        lines.append(
            f"{r['name']:<{wn}}{100 * r['accuracy']:>9.2f}{1e3 * r['time_per_sample']:>18.4f}{gain:>7}  {thr:<{wt}}{ex}"
        )
    return "\n".join(lines)


def run(
    out: str = "demo_out",
    device: Optional[str] = None,
    epochs: int = 20,
    batch: int = 256,
    max_drop: float = 0.005,
    seed: int = 0,
    progress: bool = True,
    rounds: int = 90,
    return_model: bool = False,
    threads: Optional[int] = None,
):
    """Run the demo; returns the report (and the trained model with ``return_model``).
    ``threads``: torch CPU threads for the whole run (default :func:`eeruntime.threads.default_threads`)."""
    with using_threads(threads) as n_threads:
        summary, model = _run(out, device, epochs, batch, max_drop, seed, progress, rounds, n_threads)
    return (summary, model) if return_model else summary


def _run(out, device, epochs, batch, max_drop, seed, progress, rounds, n_threads):
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
    history = train.joint(
        model, Batches(x_fit, y_fit, batch_size=64, seed=seed), epochs=epochs, lr=3e-3, progress=progress, seed=seed
    )
    model.eval()
    x_test, y_test = split.x_test.to(dev), split.y_test.to(dev)
    with torch.inference_mode():
        baseline_acc = float((plain_forward(model, x_test).argmax(1) == y_test).float().mean())

    cal_data = Batches(x_cal, y_cal, batch_size=256, shuffle=False)
    cals = {
        "accuracy": calibrate(model, cal_data, "accuracy", criterion="entropy", max_drop=max_drop, progress=progress),
        "greedy": calibrate(model, cal_data, "greedy", criterion="entropy", progress=progress),
    }
    runtimes = {name: EERuntime(model, thresholds=cal.thresholds, criterion="entropy") for name, cal in cals.items()}
    # One measurement for every row: plain, both runtimes and their oracles in the same rounds.
    speed = measure(model, runtimes, x_test, batch, dev, rounds=rounds)

    rows = [
        {
            "name": "CNN (plain)",
            "accuracy": baseline_acc,
            "time_per_sample": speed.per_sample(PLAIN),
            "gain": None,
            "thresholds": [],
            "exit_fractions": [],
        }
    ]
    report = {}
    for name, rt in runtimes.items():
        res = rt.infer(x_test)
        acc = float((res.logits.argmax(1) == y_test).float().mean())
        fractions = (torch.bincount(res.exit_index.cpu(), minlength=rt.num_exits).float() / len(y_test)).tolist()
        ideal = rt.stats.cost_model.ideal_speedup(fractions)
        measured = speed.speedup(name)
        report[name] = {
            "thresholds": [enc_float(t) for t in rt.thresholds],
            "ee_accuracy": acc,
            "exit_fractions": fractions,
            "speedup_measured": measured,
            "speedup_ideal": ideal,
            "speedup_oracle": speed.speedup(f"{name} oracle"),
            "efficiency": speed.efficiency(name),
            "efficiency_flops": measured / ideal,
            "time_per_sample_s": speed.per_sample(name),
            "notes": threshold_notes("entropy", rt.thresholds),
        }
        rows.append(
            {
                "name": f"B-CNN ({name})",
                "accuracy": acc,
                "time_per_sample": speed.per_sample(name),
                "gain": measured,
                "thresholds": list(rt.thresholds),
                "exit_fractions": fractions,
            }
        )

    frontier_png = os.path.join(out, "frontier.png")
    plot.frontier(cals["accuracy"], frontier_png, title="digits CNN, 3 exits: calibration candidates (entropy)")
    main = report["accuracy"]
    summary = {
        "baseline_accuracy": baseline_acc,
        "ee_accuracy": main["ee_accuracy"],
        "thresholds": main["thresholds"],
        "exit_fractions": main["exit_fractions"],
        "speedup_measured": main["speedup_measured"],
        "speedup_ideal": main["speedup_ideal"],
        # efficiency = oracle time / runtime time: what the runtime's machinery (decisions, packs,
        # host reads) costs against the same stages run on exactly the rows that reach them.
        # efficiency_flops = measured / FLOPs-ideal speed-up also charges the kernels' own
        # non-proportional cost at small batches (docs/design.md, "Cost, speed-up, efficiency").
        "efficiency": main["efficiency"],
        "efficiency_flops": main["efficiency_flops"],
        "speedup_oracle": main["speedup_oracle"],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": n_threads,
        "cpus": cpu_count(),
        "batch": batch,
        "test_samples": int(len(y_test)),
        "criterion": "entropy",
        "max_drop": max_drop,
        "greedy": report["greedy"],
        # Every row's times, from the one measurement the table shows (seconds per pass over the
        # test split); speed-up of a row = plain / row.
        "timing": {"method": speed.method(), "seconds": speed.seconds, "rounds": rounds},
        "table": rows,
        "final_train_loss": history.loss[-1] if getattr(history, "loss", None) else None,
        "frontier_png": frontier_png,
    }
    summary = _strict(summary)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    print()
    print(_table(rows))
    print(f"\nTime: {speed.method()}; {n_threads} torch thread(s) on {cpu_count()} CPU(s), device {summary['device']}.")
    for name in runtimes:
        for note in report[name]["notes"]:
            print(f"B-CNN ({name}): {note}")
    print(
        f"Speed-up (accuracy row): measured {main['speedup_measured']:.2f}x, oracle {main['speedup_oracle']:.2f}x, "
        f"FLOPs-ideal {main['speedup_ideal']:.2f}x; efficiency (oracle / runtime time) {main['efficiency']:.2f}, "
        f"measured / FLOPs-ideal {main['efficiency_flops']:.2f}"
    )
    print(
        f"Accuracy is on the {len(y_test)}-sample test split; thresholds were chosen on a held-out part of "
        f"the training split (the frontier plot's accuracy axis)."
    )
    print(f"report: {os.path.join(out, 'report.json')}, frontier plot: {frontier_png}")
    return summary, model


def _strict(obj):
    """``obj`` with non-finite floats as strict-JSON strings (thresholds can be inf)."""
    if isinstance(obj, float):
        return enc_float(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="demo_out", help="folder for report.json and frontier.png")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256, help="serving batch size for the timings")
    ap.add_argument("--max-drop", type=float, default=0.005, help="accuracy the calibration may give up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=90, help="interleaved timing rounds")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: OMP_NUM_THREADS, else one fewer than the CPUs on "
        "machines of at most 4, so 1 on a 2-core machine)",
    )
    ap.add_argument("--no-progress", action="store_true")


def run_args(a: argparse.Namespace) -> int:
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    for name in ("epochs", "batch", "rounds", "threads"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be at least 1, got {v}")
    run(
        a.out,
        a.device,
        a.epochs,
        a.batch,
        a.max_drop,
        a.seed,
        progress=not a.no_progress,
        rounds=a.rounds,
        threads=a.threads,
    )
    return 0

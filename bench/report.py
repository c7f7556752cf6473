"""Turn a pytest-benchmark JSON file into markdown tables and plots, labelled with the device and
the versions the run recorded.

    python bench/report.py bench/results/<device>-<date>.json [--out PREFIX]

One table per suite (benchmark file): each case's median time and the ratios it recorded in
``extra_info`` (speed-ups, efficiency, bandwidth fractions). Plots: speed-up and efficiency vs
batch where a suite records them, and the fraction of copy bandwidth for the kernel suites.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

RATIO_KEYS = (
    "speedup_measured",
    "speedup_ideal",
    "speedup_oracle",
    "efficiency",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "speedup_vs_boolean",
    "gbps",
    "copy_fraction",
    "copy_fraction_graph",
)
PARAM_KEYS = ("scenario", "variant", "batch", "B", "C", "dtype", "row_bytes", "resolution", "impl")


def _label(machine: dict, info: dict) -> str:
    dev = info.get("device") or machine.get("cpu", {}).get("brand_raw", "cpu")
    return f"{dev} | torch {info.get('torch')} | triton {info.get('triton')} | CUDA {info.get('cuda')}"


def _suite(bench: dict) -> str:
    return os.path.basename(bench["fullname"].split("::")[0]).replace("test_bench_", "").replace(".py", "")


def load(path: str):
    with open(path) as f:
        data = json.load(f)
    suites = defaultdict(list)
    for b in data.get("benchmarks", []):
        suites[_suite(b)].append(b)
    return data, suites


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def markdown(data: dict, suites) -> str:
    lines = []
    for suite, benches in sorted(suites.items()):
        info = benches[0].get("extra_info", {})
        lines += [f"### {suite}", "", f"_{_label(data.get('machine_info', {}), info)}_", ""]
        params = [k for k in PARAM_KEYS if any(k in b.get("extra_info", {}) for b in benches)]
        ratios = [k for k in RATIO_KEYS if any(k in b.get("extra_info", {}) for b in benches)]
        header = ["case", *params, "median (ms)", *ratios]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for b in benches:
            ei = b.get("extra_info", {})
            row = [
                b["name"],
                *[_fmt(ei.get(k, "")) for k in params],
                f"{b['stats']['median'] * 1e3:.3f}",
                *[_fmt(ei.get(k, "")) for k in ratios],
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(data: dict, suites, prefix: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for suite, benches in sorted(suites.items()):
        label = _label(data.get("machine_info", {}), benches[0].get("extra_info", {}))
        for key in ("speedup_measured", "efficiency", "copy_fraction"):
            pts = defaultdict(list)
            for b in benches:
                ei = b.get("extra_info", {})
                x = ei.get("batch", ei.get("B"))
                if key in ei and x is not None:
                    series = " ".join(
                        str(ei[k]) for k in ("scenario", "resolution", "C", "dtype", "row_bytes") if k in ei
                    )
                    pts[series or suite].append((x, ei[key]))
            pts = {k: v for k, v in pts.items() if len(v) > 1}  # a line needs two batch sizes
            if not pts:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for series, xy in sorted(pts.items()):
                xy.sort()
                ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=series)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(f"{suite}: {key.replace('_', ' ')}", fontsize=10)
            fig.text(0.01, 0.01, label, fontsize=6)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            path = f"{prefix}-{suite}-{key}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def write_report(json_path: str, prefix: str) -> str:
    data, suites = load(json_path)
    md = markdown(data, suites)
    pngs = plots(data, suites, prefix)
    if pngs:
        md += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs) + "\n"
    path = prefix + ".md"
    with open(path, "w") as f:
        f.write(md)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--out", default=None, help="prefix of the .md and .png files (default: beside the JSON)")
    a = ap.parse_args()
    print(write_report(a.json, a.out or os.path.splitext(a.json)[0]))

"""`make gpu-check`: prove the GPU paths on one CUDA device in one short, time-boxed run.

    python tools/gpu_check.py [--dry-run] [--steps NAME,...] [--out DIR] [--arch 9.0] [--python PY]

Steps (docs/gpu-check.md says what each proves; every step has its own time box and prints one
summary line):

    sanity         the device, driver, torch / triton / CUDA / nvcc versions
    build          the extension for one architecture (sm_90 by default), CUDA ops required,
                   `pip install --no-build-isolation --no-deps --no-index -e .`: no network
    ext            the CUDA ops and the compiled (not interpreted) Triton kernel load
    tests          every GPU test (`pytest -m gpu tests -rs`): fails when a test skipped for want
                   of a GPU, CUDA ops or compiled Triton
    memcheck       compute-sanitizer --tool memcheck on the CUDA op tests
    bench-exit     exit kernel, B=4096 C=32000 bf16 entropy: Triton vs eager vs torch.compile
    bench-compact  compaction, B=4096, 4 KB and 64 KB rows
    bench-graphs   CUDA-graph runtime, 224x224, batch 1 / 64 / 256 with exits, 256 without
    serve          the serving load bench (bench/serve_load.py) on CUDA, short: plain, rt.infer and
                   the stage scheduler behind request batching, ResNet-style and ResNet-18-style;
                   writes bench/results/serve-<device>-<date>-gpu-check.{json,md} itself

It then writes bench/results/<device>-<date>.json (pytest-benchmark format plus a ``gpu_check``
section: device, versions, steps, DESIGN's targets against the figures) and the same as .md.
Exit status 0 only when every selected step passed (the targets are reported, not asserted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "results")
TOTAL_BUDGET_S = 600  # the whole run must fit in 10 minutes on an H100
PREFIX = "[gpu-check]"

# Skips that mean the check did not check: the device, the CUDA ops or compiled Triton missing.
# (A test that needs two GPUs may skip on a one-GPU machine.)
MISSING_GPU_SKIP = re.compile(
    r"needs a CUDA device|none on this machine|without CUDA|no CUDA ops|has no CUDA|TRITON_INTERPRET|interpreter",
    re.IGNORECASE,
)
ALLOWED_SKIP = re.compile(r"needs 2 CUDA devices", re.IGNORECASE)

BENCH_EXIT = ["bench/test_bench_exit_decision.py::test_exit_decision_bandwidth[B4096-C32000-bf16-entropy]"]
BENCH_COMPACT = [f"bench/test_bench_compact.py::test_compact_bandwidth[B4096-row{rb}B]" for rb in (4096, 65536)]
BENCH_GRAPHS = [
    f"bench/test_bench_graphs.py::test_graphs_vs_plain_vs_oracle[224-{case}]"
    for case in ("1-exits", "64-exits", "256-exits", "256-none")
]
# The serving bench, cut to fit its box: a ViT-S/16 at 224x224, a transformer whose small batches
# leave the GPU underused (E3's regime; since session 15, in place of the small ResNet-style model,
# whose GPU work per batch is less than the host's per request: (c) lost on the H100 and the H200).
# ResNet-18 at 224x224, the second model until session 18, was measured on the H100 (session 12)
# and the H200 (session 15); in session 18 the ViT alone filled the box on the H200 and ResNet-18
# was cut (docs/serving.md, "Session 18"), so it is run by hand (--models resnet18-224) when wanted.
# (b) ee-req against (c) stage (the scheduler's defaults: no deferral on a GPU; max_defer_ms lost on
# the H100 in session 12 and on the ViT in session 18), and both again with two worker threads
# (ee-req-x2, stage-x2); saturated throughput, the light-load side by side, three rates, 0.9x
# ee-req's saturated rate twice (the p99 target near (b)'s saturation) and a coarse search of the
# highest rate within the SLO per system, judged by the median of three runs per probe (one run per
# probe put ResNet-18 at 224x224 at 1.51x ee-req's rate on the H100, three runs at 0.79x:
# docs/serving.md, "Session 12").
SERVE_ARGS = [
    "--device", "cuda", "--models", "vit-224", "--max-batch", "64",
    "--systems", "plain,ee-req,stage,ee-req-x2,stage-x2", "--rate-factors", "0.3,1.0,2.0",
    "--seconds", "0.5", "--max-requests", "4000", "--drain-s", "5",
    "--capacity-requests", "3000", "--capacity-repeats", "2", "--sbs-rounds", "5",
    "--search-tol", "0.15", "--search-repeats", "3", "--search-min-requests", "500",
    "--near-fractions", "0.9", "--near-repeats", "2", "--tag=-gpu-check",
]  # fmt: skip

EXT_CHECK = (
    "import torch; from eeruntime import _ext; "
    "assert torch.cuda.is_available(), 'torch sees no CUDA device'; "
    "assert _ext.with_cuda(), _ext.why_unavailable() or 'eeruntime._C was built without its CUDA ops'; "
    "import eeruntime.kernels.exit_decision as k; "
    "assert not k.INTERPRETED, 'the Triton kernel runs in the interpreter (TRITON_INTERPRET is set)'; "
    "ops = [n for n in ('compact', 'compact_into', 'scatter_rows') if hasattr(torch.ops.eeruntime, n)]; "
    "assert len(ops) == 3, ops; print('CUDA ops loaded:', ', '.join(ops), '| Triton kernel compiled')"
)

SANITY = (
    "import json, torch; import importlib.util as u; "
    "t = __import__('triton') if u.find_spec('triton') else None; "
    "ok = torch.cuda.is_available(); "
    "print('GPU_CHECK_INFO ' + json.dumps(dict(device=torch.cuda.get_device_name() if ok else None, "
    "capability='.'.join(map(str, torch.cuda.get_device_capability())) if ok else None, "
    "device_count=torch.cuda.device_count(), torch=torch.__version__, cuda=torch.version.cuda, "
    "triton=getattr(t, '__version__', None))))"
)


@dataclass
class Step:
    name: str
    box_s: int  # time box: the step is stopped (and fails) past it
    what: str  # one line: what the step proves
    commands: List[List[str]]
    env: Dict[str, str] = field(default_factory=dict)
    bench: bool = False  # writes a pytest-benchmark JSON to merge into the results


@dataclass
class StepResult:
    name: str
    status: str  # ok | FAIL | TIMEOUT | not run
    seconds: float
    box_s: int
    summary: str

    def line(self) -> str:
        return f"{PREFIX} {self.name:<14} {self.status:<8} {self.seconds:6.1f} s / {self.box_s:>3} s  {self.summary}"


# ------------------------------------------------------------------------------------------- plan
def plan(
    python: str = "python",
    arch: str = "9.0",
    jobs: Optional[int] = None,
    test_workers: int = 1,
    out: str = DEFAULT_OUT,
) -> List[Step]:
    """Every step in the order it runs; the time boxes add up to at most TOTAL_BUDGET_S.
    ``test_workers`` > 1 runs the GPU tests in that many pytest-xdist processes (their first run
    compiles every Triton kernel variant, which one process does one after the other). ``out``:
    where the serving bench writes its files."""
    py = python
    workers = ["-n", str(test_workers)] if test_workers > 1 else []
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    bench = pytest + ["--benchmark-only", "-s"]
    jobs = jobs or os.cpu_count() or 8
    return [
        Step(
            "sanity",
            15,
            "device, driver and versions",
            [
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                [py, "-c", SANITY],
                ["nvcc", "--version"],
            ],
        ),
        Step(
            "build",
            45,  # 19-31 s on the H200 (sessions 3, 5, 15, 18)
            f"extension for sm_{arch.replace('.', '')} only, CUDA ops required, no network",
            [[py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]],
            env={"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(jobs), "EERUNTIME_BUILD_CUDA": "1"},
        ),
        Step("ext", 15, "CUDA ops and compiled Triton kernel load", [[py, "-c", EXT_CHECK]]),
        Step(
            "tests",
            155,  # 126 s of 140 on the H200 in session 18 (197 tests); 96 s in session 15
            "every GPU test, no GPU skip allowed",
            [pytest + ["-rs", "-m", "gpu", "--continue-on-collection-errors", *workers, "tests"]],
        ),
        Step(
            "memcheck",
            40,
            "compute-sanitizer memcheck on the CUDA op tests",
            [
                ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "10"]
                + pytest
                # Bounds are what memcheck checks: the odd batches (1, 7, 255, 1000, 5000) cover them;
                # 70000 and 4096 (large, aligned) and the graph captures run in the tests step.
                + ["tests/test_compact_ops.py", "-k", "cuda and not 70000 and not 4096 and not graph_capture"]
            ],
            env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        ),
        Step(
            "bench-exit",
            45,
            "exit kernel B=4096 C=32000 bf16 vs eager and torch.compile",
            [bench + BENCH_EXIT],
            bench=True,
        ),
        Step("bench-compact", 30, "compaction B=4096, 4 KB and 64 KB rows", [bench + BENCH_COMPACT], bench=True),
        Step(
            "bench-graphs",
            125,
            "graph runtime 224x224, batch 1/64/256 with exits, 256 without",
            [bench + BENCH_GRAPHS],
            bench=True,
        ),
        Step(
            "serve",
            125,
            "serving load bench on CUDA: plain, ee-req, stage, and the last two with two workers (ViT-S/16 at 224x224)",
            [[py, "bench/serve_load.py", *SERVE_ARGS, "--out", out]],
        ),
    ]


def select_steps(steps: Sequence[Step], spec: Optional[str]) -> List[Step]:
    """``spec``: comma-separated step names (in any order; they run in plan order), or None for all."""
    if not spec:
        return list(steps)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = [s.name for s in steps]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown step(s) {unknown or spec!r}; steps are: {', '.join(known)}")
    return [s for s in steps if s.name in names]


def describe(steps: Sequence[Step], bench_json_dir: str = "<tmp>") -> List[str]:
    """The dry-run listing: one line per step and command, and the total of the time boxes."""
    lines = []
    for s in steps:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in s.env.items())
        lines.append(f"{PREFIX} {s.name:<14} box {s.box_s:>3} s  {s.what}")
        for cmd in s.commands:
            cmd = cmd + ([f"--benchmark-json={bench_json_dir}/{s.name}.json"] if s.bench else [])
            lines.append("    " + (env + " " if env else "") + " ".join(shlex.quote(c) for c in cmd))
    total = sum(s.box_s for s in steps)
    lines.append(f"{PREFIX} {len(steps)} steps, time boxes total {total} s (budget {TOTAL_BUDGET_S} s)")
    return lines


# ------------------------------------------------------------------------------------ run a step
def run_command(cmd: List[str], env: Dict[str, str], timeout_s: float, log) -> tuple:
    """(returncode or None on timeout, output). The command runs in its own process group, which
    is killed (TERM, then KILL) when the time box runs out."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=max(timeout_s, 0.1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        out, _ = proc.communicate()
        rc = None
    log.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n{out}\n")
    log.flush()
    return rc, out or ""


def bad_skips(pytest_output: str) -> List[str]:
    """The ``-rs`` skip lines whose reason is a missing GPU, CUDA build or compiled Triton."""
    bad = []
    for line in pytest_output.splitlines():
        if line.startswith("SKIPPED") and MISSING_GPU_SKIP.search(line) and not ALLOWED_SKIP.search(line):
            bad.append(line.strip())
    return bad


def uncollected_for_missing_packages(output: str, tally: str) -> Optional[List[str]]:
    """When the only errors of a run are test modules that could not be imported for a missing
    package (and nothing failed), those packages; otherwise None."""
    modules = re.findall(r"^_* ERROR collecting (\S+) _*$", output, re.MULTILINE)
    missing = sorted(set(re.findall(r"ModuleNotFoundError: No module named '([^']+)'", output)))
    errors = re.search(r"(\d+) errors?\b", tally)
    if not modules or not missing or re.search(r"\d+ failed", tally) or errors is None:
        return None
    if int(errors.group(1)) != len(modules) or len(missing) < 1:
        return None
    return missing


def pytest_tally(output: str) -> str:
    """pytest's final tally line ("12 passed, 1 skipped in 3.2s"), or ''."""
    for line in reversed(output.splitlines()):
        if re.search(r"\b\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s|no tests ran", line):
            return line.strip("= ").strip()
    return ""


def summarize(step: Step, rc: Optional[int], output: str, info: dict) -> tuple:
    """(status, summary line) of a finished step from its exit code and output."""
    if step.name == "serve":
        return summarize_serve(step, rc, output)
    if rc is None:
        return "TIMEOUT", f"stopped after its {step.box_s} s time box; see the log"
    status = "ok" if rc == 0 else "FAIL"
    if step.name == "sanity":
        m = re.search(r"^GPU_CHECK_INFO (.*)$", output, re.MULTILINE)
        if m:
            info.update(json.loads(m.group(1)))
        nv = re.search(r"release (\d+\.\d+)", output)
        info["nvcc"] = nv.group(1) if nv else None
        smi = [ln for ln in output.splitlines() if ln.count(",") == 2 and "Cuda" not in ln]
        info["nvidia_smi"] = smi[0].strip() if smi else None
        if not info.get("device"):
            return "FAIL", "torch sees no CUDA device: nothing to check"
        return status, (
            f"{info['device']} (sm_{str(info.get('capability', '')).replace('.', '')}), torch "
            f"{info.get('torch')}, CUDA {info.get('cuda')}, nvcc {info.get('nvcc')}, triton {info.get('triton')}"
        )
    if step.name == "tests":
        tally = pytest_tally(output)
        bad = bad_skips(output)
        if bad:
            return "FAIL", f"{tally}; {len(bad)} skipped for want of the GPU path: {bad[0]}"
        missing = uncollected_for_missing_packages(output, tally)
        if rc != 0 and missing is not None:
            # Test modules of optional features (serving, Ray, ...) whose packages this machine
            # lacks: said in the summary, not a failure of the GPU paths.
            return "ok", f"{tally}; not collected (missing packages): {', '.join(missing)}"
        return status, tally or f"exit {rc}"
    if step.name == "memcheck":
        m = re.search(r"ERROR SUMMARY: (\d+) error", output)
        errs = f"memcheck: {m.group(1)} errors" if m else "memcheck: no summary"
        return status, f"{errs}; {pytest_tally(output)}"
    if step.name == "ext":
        lines = [ln for ln in output.splitlines() if ln.strip()]
        return status, lines[-1] if lines else f"exit {rc}"
    if step.name == "build":
        return status, "built" if rc == 0 else "build failed: " + " | ".join(output.strip().splitlines()[-3:])
    return status, pytest_tally(output) or exit_line(rc, output)


def exit_line(rc: int, output: str) -> str:
    """A failed command in one line: its exit code and its last line of output."""
    last = [ln.strip() for ln in output.splitlines() if ln.strip()][-1:]
    return f"exit {rc}: {last[0]}" if last else f"exit {rc}"


SERVE_WROTE = re.compile(r"^wrote (\S+)\.json, ", re.MULTILINE)


def summarize_serve(step: Step, rc: Optional[int], output: str) -> tuple:
    """The serving bench's figures per model, read from the JSON it wrote (after each model: a
    run stopped by its time box still reports the models it finished)."""
    wrote = SERVE_WROTE.findall(output)
    figures = ""
    if wrote:
        path = wrote[-1] + ".json"
        try:
            with open(path if os.path.isabs(path) else os.path.join(REPO, path)) as f:
                figures = serve_figures(json.load(f))
        except (OSError, ValueError) as e:
            figures = f"could not read {path}: {e}"
    if rc is None:
        return "TIMEOUT", f"stopped after its {step.box_s} s time box" + (f"; finished: {figures}" if figures else "")
    if rc != 0:
        return "FAIL", exit_line(rc, output)
    return "ok", figures or "no results written"


def serve_figures(doc: dict) -> str:
    """One clause per model: saturated throughput, the highest rate within the SLO and the p99 near
    (b)'s saturation of the stage scheduler's variants over (b) ee-req's, and the worker's cost
    over rt.infer at light load."""
    parts = []
    for r in doc.get("results", []):
        sat = r.get("saturated") or {}
        search = (r.get("search") or {}).get("systems", {})
        stages = [k for k in sat if k.startswith("stage")] or [k for k in search if k.startswith("stage")]
        bits = []
        for k in stages:
            x_sat = (sat.get(k) or {}).get("ratio_to_ee_req")
            x_slo = (search.get(k) or {}).get("x_ee_req")
            x_plain = (search.get(k) or {}).get("x_plain")
            bit = f"{k} saturated {_ratio(x_sat)} ee-req"
            if x_slo is not None:
                bit += f", at the SLO {_ratio(x_slo)} ee-req, {_ratio(x_plain)} plain"
            for cell in r.get("near_saturation") or []:
                p99 = cell.get("systems", {}).get(k, {})
                if "p99_x_ee_req" in p99:
                    bit += (
                        f", p99 at {cell['fraction']:.2f}x ee-req's saturation {_ratio(p99['p99_x_ee_req'])} ee-req's"
                    )
            bits.append(bit)
        worker = (r.get("closed_loop_light_load") or {}).get("submit (worker thread)", {}).get("minus_infer_ms")
        if worker is not None:
            bits.append(f"worker {worker:+.2f} ms over rt.infer")
        parts.append(f"{r.get('model', '?')}: " + "; ".join(bits))
    return " | ".join(parts)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


# --------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    name: str
    text: str  # DESIGN's target, in words
    match: Dict[str, object]  # extra_info fields that pick the benchmark case
    key: str  # the extra_info figure compared
    bound: float  # the figure must be >= bound
    step: str  # the step that measures it
    also: Sequence[str] = ()  # other extra_info figures of the same case, printed beside it


# The compaction targets are about the device's time (the runtime replays compact_into inside its
# captured graphs: bench/test_bench_compact.py's docstring); the eager-call figure and each path's
# graph figure are printed beside them.
COMPACT_ALSO = ("copy_fraction", "copy_fraction_graph_fused", "copy_fraction_graph_cub")

TARGETS = [
    Target(
        "exit_kernel_bandwidth",
        "exit kernel >= 80 % of copy bandwidth (B=4096, C=32000, bf16, entropy)",
        {"op": "exit_decision", "B": 4096, "C": 32000, "dtype": "bf16", "criterion": "entropy"},
        "fraction_of_copy",
        0.8,
        "bench-exit",
    ),
    Target(
        "exit_kernel_vs_eager",
        "exit kernel >= 3x eager (same case)",
        {"op": "exit_decision", "B": 4096, "C": 32000, "dtype": "bf16", "criterion": "entropy"},
        "speedup_vs_eager",
        3.0,
        "bench-exit",
    ),
    Target(
        "exit_kernel_vs_compile",
        "exit kernel not slower than torch.compile (same case)",
        {"op": "exit_decision", "B": 4096, "C": 32000, "dtype": "bf16", "criterion": "entropy"},
        "speedup_vs_compile",
        1.0,
        "bench-exit",
    ),
    Target(
        "compact_4KB",
        "compaction >= 70 % of copy bandwidth, B=4096, 4 KB rows (compact_into replayed in a CUDA graph)",
        {"op": "compact", "B": 4096, "row_bytes": 4096},
        "copy_fraction_graph",
        0.7,
        "bench-compact",
        also=COMPACT_ALSO,
    ),
    Target(
        "compact_64KB",
        "compaction >= 70 % of copy bandwidth, B=4096, 64 KB rows (compact_into replayed in a CUDA graph)",
        {"op": "compact", "B": 4096, "row_bytes": 65536},
        "copy_fraction_graph",
        0.7,
        "bench-compact",
        also=COMPACT_ALSO,
    ),
    Target(
        "runtime_efficiency_256",
        "runtime efficiency (oracle / graphs) >= 0.9 at batch 256, with exits",
        {"resolution": 224, "batch": 256, "scenario": "exits"},
        "efficiency",
        0.9,
        "bench-graphs",
    ),
    Target(
        "batch1_vs_plain_eager",
        "batch 1 faster than plain eager (speed-up > 1)",
        {"resolution": 224, "batch": 1, "scenario": "exits"},
        "speedup_vs_plain_eager",
        1.0,
        "bench-graphs",
    ),
    Target(
        "no_exit_vs_plain_graph",
        "no exits: within 5 % of the plain CUDA graph (speed-up >= 1/1.05)",
        {"resolution": 224, "batch": 256, "scenario": "none"},
        "speedup_vs_plain_graph",
        1 / 1.05,
        "bench-graphs",
    ),
]


def evaluate_targets(benchmarks: Sequence[dict], steps: Dict[str, StepResult]) -> List[dict]:
    """Each target with the measured figure and whether it holds; ``unmeasured`` (and why) when no
    benchmark case of a passing step recorded it."""
    rows = []
    for t in TARGETS:
        found = [
            b
            for b in benchmarks
            if all(b.get("extra_info", {}).get(k) == v for k, v in t.match.items())
            and b.get("extra_info", {}).get(t.key) is not None
        ]
        row = {"name": t.name, "target": t.text, "key": t.key, "bound": t.bound, "value": None}
        if found:
            ei = found[0]["extra_info"]
            value = float(ei[t.key])
            row.update(value=value, status="pass" if value >= t.bound else "FAIL")
            if t.also:
                row["also"] = {k: ei.get(k) for k in t.also}
        else:
            st = steps.get(t.step)
            why = "step not run" if st is None else f"step {st.status}: {st.summary}"
            row.update(status="unmeasured", why=f"{t.step}: {why}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- results
def device_slug(name: Optional[str]) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name or "no-device").strip("-").lower()


def result_stem(info: dict, today: Optional[datetime.date] = None) -> str:
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    return f"{device_slug(info.get('device'))}-{today.isoformat()}"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _figure(v) -> str:
    """A figure of a benchmark case in the .md: a list or a dict (the exit kernel's config sweep,
    "4096x8": fraction) rounded to 3 places."""
    if isinstance(v, list):
        return str([round(x, 3) for x in v])
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) + "}"
    return _fmt(v)


def markdown(info: dict, steps: Sequence[StepResult], targets: Sequence[dict], benchmarks: Sequence[dict]) -> str:
    lines = [
        f"# GPU check: {info.get('device') or 'no device'}",
        "",
        f"{info.get('date', '')} | torch {info.get('torch')} | CUDA {info.get('cuda')} | nvcc {info.get('nvcc')} | "
        f"triton {info.get('triton')} | driver/memory: {info.get('nvidia_smi')} | sm_{info.get('arch', '').replace('.', '')} build",
        "",
        "## Steps",
        "",
        "| step | status | seconds | time box | summary |",
        "|---|---|---|---|---|",
    ]
    for s in steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.box_s} | {s.summary.replace('|', '/')} |")
    lines += ["", "## DESIGN's targets", "", "| target | figure | measured | bound | status |", "|---|---|---|---|---|"]
    for t in targets:
        status = t["status"] if t["status"] != "unmeasured" else f"unmeasured ({t.get('why', '')})"
        also = "".join(f"; {k} {_fmt(v)}" for k, v in t.get("also", {}).items())
        measured = f"{_fmt(t['value'])} ({also[2:]})" if also else _fmt(t["value"])
        lines.append(f"| {t['target']} | {t['key']} | {measured} | {_fmt(t['bound'])} | {status.replace('|', '/')} |")
    if benchmarks:
        lines += ["", "## Benchmark cases", "", "| case | median (ms) | figures |", "|---|---|---|"]
        keys = (
            "copy_GBps",
            "achieved_GBps",
            "fraction_of_copy",
            "fraction_of_copy_prev",
            "speedup_vs_prev",
            "copy_fraction",
            "copy_fraction_graph",
            "speedup_vs_eager",
            "speedup_vs_compile",
            "speedup_vs_boolean",
            "efficiency",
            "speedup_vs_plain_eager",
            "speedup_vs_plain_graph",
            "speedup_ideal",
            "exit_fractions",
            "sweep_fraction_of_copy",
        )
        for b in benchmarks:
            ei = b.get("extra_info", {})
            figs = ", ".join(f"{k} {_figure(ei[k])}" for k in keys if ei.get(k) is not None)
            median = b.get("stats", {}).get("median")
            lines.append(f"| {b.get('name')} | {_fmt(median * 1e3) if median is not None else '-'} | {figs} |")
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str,
    info: dict,
    steps: Sequence[StepResult],
    benchmarks: Sequence[dict],
    machine_info: Optional[dict] = None,
    today: Optional[datetime.date] = None,
) -> tuple:
    """Write ``<device>-<date>.json`` (pytest-benchmark format, so bench/report.py reads it too,
    plus a ``gpu_check`` section) and ``.md``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = result_stem(info, today)
    by_name = {s.name: s for s in steps}
    targets = evaluate_targets(benchmarks, by_name)
    data = {
        "machine_info": machine_info or {},
        "benchmarks": list(benchmarks),
        "gpu_check": {
            "info": info,
            "steps": [vars(s) for s in steps],
            "targets": targets,
        },
    }
    json_path = os.path.join(out_dir, stem + ".json")
    md_path = os.path.join(out_dir, stem + ".md")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False, default=str)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown(info, steps, targets, benchmarks))
    return json_path, md_path


def merge_previous(
    out_dir: str,
    info: dict,
    steps: List[StepResult],
    benchmarks: List[dict],
    machine_info: dict,
    today: Optional[datetime.date] = None,
) -> tuple:
    """This run's results merged into the earlier result file of the same device and date in
    ``out_dir`` (if any): its steps and cases come first, those this run repeats are replaced."""
    path = os.path.join(out_dir, result_stem(info, today) + ".json")
    if not info.get("device") or not os.path.exists(path):
        return info, steps, benchmarks, machine_info
    with open(path) as f:
        old = json.load(f)
    section = old.get("gpu_check", {})
    new_steps = {s.name for s in steps}
    merged_steps = [StepResult(**s) for s in section.get("steps", []) if s["name"] not in new_steps] + list(steps)
    order = [s.name for s in plan()]
    merged_steps.sort(key=lambda s: order.index(s.name) if s.name in order else len(order))
    new_cases = {b.get("name") for b in benchmarks}
    merged_benchmarks = [b for b in old.get("benchmarks", []) if b.get("name") not in new_cases] + list(benchmarks)
    merged_info = {**section.get("info", {}), **{k: v for k, v in info.items() if v is not None}}
    return merged_info, merged_steps, merged_benchmarks, machine_info or old.get("machine_info", {})


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dry-run", action="store_true", help="print the steps, their commands and time boxes; run nothing"
    )
    ap.add_argument("--steps", default=None, help="comma-separated steps to run (default: all), e.g. ext,tests")
    ap.add_argument("--out", default=DEFAULT_OUT, help="where the .json and .md go")
    ap.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST for the build (default 9.0: H100/H200)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that has torch and triton")
    ap.add_argument(
        "--test-workers",
        type=int,
        default=None,
        help="pytest-xdist processes for the GPU tests (default 4 when xdist is installed, else 1)",
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="merge into the result files of the same device and date already in --out (steps of the "
        "same name and benchmark cases are replaced): a check split over several runs",
    )
    args = ap.parse_args(argv)
    if not re.fullmatch(r"\d+\.\d+a?", args.arch):
        ap.error(f"--arch takes one architecture like 9.0 or 9.0a, got {args.arch!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    workers = args.test_workers
    if workers is None:
        import importlib.util

        workers = 4 if importlib.util.find_spec("xdist") is not None else 1
    all_steps = plan(args.python, args.arch, test_workers=workers, out=args.out)
    try:
        steps = select_steps(all_steps, args.steps)
    except ValueError as e:
        print(f"{PREFIX} {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(describe(steps)))
        return 0

    import tempfile

    started = time.monotonic()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "arch": args.arch}
    results: List[StepResult] = []
    benchmarks: List[dict] = []
    machine_info: dict = {}
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "gpu-check.log")
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "a" if args.append else "w") as log:
        for step in steps:
            if results and results[0].name == "sanity" and results[0].status != "ok":
                results.append(StepResult(step.name, "not run", 0.0, step.box_s, "sanity failed"))
                print(results[-1].line(), flush=True)
                continue
            t0 = time.monotonic()
            rc, output = 0, ""
            json_path = os.path.join(tmp, f"{step.name}.json")
            for cmd in step.commands:
                left = step.box_s - (time.monotonic() - t0)
                cmd = cmd + ([f"--benchmark-json={json_path}"] if step.bench else [])
                log.write(f"\n## {step.name}\n")
                try:
                    c_rc, c_out = run_command(cmd, step.env, left, log)
                except FileNotFoundError as e:
                    c_rc, c_out = 127, f"{e}"
                output += c_out
                if c_rc is None:
                    rc = None
                    break
                rc = rc or c_rc
            status, summary = summarize(step, rc, output, info)
            if step.bench and os.path.exists(json_path):
                with open(json_path) as f:
                    data = json.load(f)
                machine_info = machine_info or data.get("machine_info", {})
                benchmarks += data.get("benchmarks", [])
                figures = _bench_figures(data.get("benchmarks", []))
                summary = f"{summary}; {figures}" if figures else summary
            results.append(StepResult(step.name, status, time.monotonic() - t0, step.box_s, summary))
            print(results[-1].line(), flush=True)
    if args.append:
        info, results, benchmarks, machine_info = merge_previous(args.out, info, results, benchmarks, machine_info)
    json_path, md_path = write_results(args.out, info, results, benchmarks, machine_info)
    failed = [r.name for r in results if r.status != "ok"]
    print(
        f"{PREFIX} {'all steps passed' if not failed else 'failed: ' + ', '.join(failed)} in "
        f"{time.monotonic() - started:.0f} s; wrote {os.path.relpath(json_path, REPO)}, "
        f"{os.path.relpath(md_path, REPO)} (log: {os.path.relpath(log_path, REPO)})"
    )
    return 0 if not failed else 1


def _bench_figures(benchmarks: Sequence[dict]) -> str:
    """A short list of the headline figure of each case, for the step's summary line."""
    out = []
    for b in benchmarks:
        ei = b.get("extra_info", {})
        for key in ("fraction_of_copy", "copy_fraction_graph", "copy_fraction", "efficiency"):
            if ei.get(key) is not None:
                out.append(f"{b.get('name', '?').split('[')[-1].rstrip(']')} {key} {ei[key]:.2f}")
                break
    return ", ".join(out)


if __name__ == "__main__":
    sys.exit(main())

"""tools/gpu_check.py (`make gpu-check`) on CPU: its plan, argument parsing, time boxes, skip and
output parsing, targets and result files; the GPU run itself is the script's job on a device."""

import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check as gc  # noqa: E402


def test_dry_run_lists_every_step_within_the_budget(capsys):
    assert gc.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    names = ["sanity", "build", "ext", "tests", "memcheck", "bench-exit", "bench-compact", "bench-graphs", "serve"]
    heads = [line.split()[1] for line in out.splitlines() if line.startswith(gc.PREFIX) and " box " in line]
    assert heads == names
    total = sum(s.box_s for s in gc.plan())
    assert total <= gc.TOTAL_BUDGET_S == 600
    assert f"time boxes total {total} s" in out
    # no network: the build installs nothing from an index, with build isolation off
    build = next(line for line in out.splitlines() if "pip install" in line)
    for flag in (
        "--no-index",
        "--no-deps",
        "--no-build-isolation",
        "TORCH_CUDA_ARCH_LIST=9.0",
        "EERUNTIME_BUILD_CUDA=1",
    ):
        assert flag in build
    assert "compute-sanitizer --tool memcheck" in out and "-m gpu --continue-on-collection-errors tests" in out
    assert "--benchmark-json=<tmp>/bench-graphs.json" in out
    # the serving bench writes into --out itself
    serve = next(line for line in out.splitlines() if "bench/serve_load.py" in line)
    assert "--device cuda" in serve and f"--out {gc.DEFAULT_OUT}" in serve and "--benchmark-json" not in serve
    assert any(f"--out {shlex.quote('/x y')}" in line for line in gc.describe(gc.plan(out="/x y")))


def test_steps_option_selects_in_plan_order_and_rejects_unknown(capsys):
    steps = gc.select_steps(gc.plan(), "tests, ext")
    assert [s.name for s in steps] == ["ext", "tests"]
    assert gc.main(["--dry-run", "--steps", "memcheck"]) == 0
    out = capsys.readouterr().out
    assert "memcheck" in out and "bench-exit" not in out and "1 steps" in out
    assert gc.main(["--dry-run", "--steps", "build,bogus"]) == 2
    assert "unknown step(s) ['bogus']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps are: sanity, build"):
        gc.select_steps(gc.plan(), ",")


def test_arch_option():
    assert "TORCH_CUDA_ARCH_LIST=8.0" in "\n".join(gc.describe(gc.plan(arch="8.0")))
    assert gc.parse_args(["--arch", "9.0a"]).arch == "9.0a"
    with pytest.raises(SystemExit):
        gc.parse_args(["--arch", "sm_90"])


class _Log:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_a_command_past_its_time_box_is_killed_with_its_children():
    log = _Log()
    t0 = time.monotonic()
    # the shell's child sleeps too: the whole process group must go
    rc, _ = gc.run_command(["sh", "-c", "sleep 30 & sleep 30; echo never"], {}, 1.0, log)
    assert rc is None and time.monotonic() - t0 < 15
    rc, out = gc.run_command(
        [sys.executable, "-c", "import os; print(os.environ['GPU_CHECK_X'])"], {"GPU_CHECK_X": "7"}, 60, log
    )
    assert rc == 0 and out.strip() == "7" and "GPU_CHECK_X" in log.text


PYTEST_RS = """
SKIPPED [1] tests/test_graphs.py:815: needs a CUDA device; none on this machine
SKIPPED [2] tests/test_kernel_exit_decision.py:280: needs 2 CUDA devices (logits on cuda:1 while cuda:0 is current)
SKIPPED [4] tests/test_compact_ops.py:358: eeruntime._C was built without CUDA; rebuild with ...
SKIPPED [1] tests/test_x.py:3: needs scikit-learn
12 passed, 8 skipped, 300 deselected in 41.2s
"""


def test_skips_for_want_of_a_gpu_fail_the_tests_step():
    bad = gc.bad_skips(PYTEST_RS)
    assert len(bad) == 2 and "none on this machine" in bad[0] and "built without CUDA" in bad[1]
    step = next(s for s in gc.plan() if s.name == "tests")
    status, summary = gc.summarize(step, 0, PYTEST_RS, {})
    assert status == "FAIL" and "2 skipped for want of the GPU path" in summary and "12 passed" in summary
    ok = "SKIPPED [2] t.py:1: needs 2 CUDA devices\n30 passed, 2 skipped in 9.0s\n"
    assert gc.summarize(step, 0, ok, {}) == ("ok", "30 passed, 2 skipped in 9.0s")
    assert gc.summarize(step, 1, "1 failed, 29 passed in 9.0s", {})[0] == "FAIL"
    assert gc.summarize(step, None, "", {})[0] == "TIMEOUT"


COLLECTION_ERRORS = """
==================================== ERRORS ====================================
___________________ ERROR collecting tests/test_serve_http.py __________________
ImportError while importing test module '/repo/tests/test_serve_http.py'.
E   ModuleNotFoundError: No module named 'fastapi'
____________________ ERROR collecting tests/test_ray.py ________________________
E   ModuleNotFoundError: No module named 'ray'
SKIPPED [2] t.py:1: needs 2 CUDA devices
30 passed, 2 skipped, 2 errors in 9.0s
"""


def test_test_modules_of_missing_optional_packages_do_not_fail_the_tests_step():
    step = next(s for s in gc.plan() if s.name == "tests")
    assert "--continue-on-collection-errors" in step.commands[0]
    status, summary = gc.summarize(step, 1, COLLECTION_ERRORS, {})
    assert status == "ok" and "not collected (missing packages): fastapi, ray" in summary
    # a test failure, or an error that is not a missing package, still fails it
    failed = COLLECTION_ERRORS.replace("30 passed", "1 failed, 29 passed")
    assert gc.summarize(step, 1, failed, {})[0] == "FAIL"
    other = COLLECTION_ERRORS.replace("2 errors", "3 errors")
    assert gc.summarize(step, 1, other, {})[0] == "FAIL"


def test_sanity_and_memcheck_summaries():
    info = {}
    out = (
        'NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB\nGPU_CHECK_INFO {"device": "NVIDIA H100 80GB HBM3", '
        '"capability": "9.0", "device_count": 1, "torch": "2.13.0", "cuda": "12.8", "triton": "3.5.0"}\n'
        "Cuda compilation tools, release 12.8, V12.8.93\n"
    )
    sanity = gc.plan()[0]
    status, summary = gc.summarize(sanity, 0, out, info)
    assert status == "ok" and "NVIDIA H100 80GB HBM3 (sm_90)" in summary and "nvcc 12.8" in summary
    assert info["nvcc"] == "12.8" and info["nvidia_smi"].startswith("NVIDIA H100") and info["cuda"] == "12.8"
    status, summary = gc.summarize(sanity, 0, 'GPU_CHECK_INFO {"device": null}\n', {})
    assert status == "FAIL" and "no CUDA device" in summary
    memcheck = next(s for s in gc.plan() if s.name == "memcheck")
    status, summary = gc.summarize(memcheck, 0, "10 passed in 50.0s\n========= ERROR SUMMARY: 0 errors\n", {})
    assert status == "ok" and "memcheck: 0 errors" in summary and "10 passed" in summary
    assert gc.summarize(memcheck, 9, "========= ERROR SUMMARY: 3 errors\n", {})[0] == "FAIL"


def _serve_doc():
    """What bench/serve_load.py writes, cut to the figures the step's summary reads (their names
    are checked against a real run in tests/test_serve_load_bench.py)."""
    sat = {"ee-req": {"ratio_to_ee_req": 1.0}, "stage": {"ratio_to_ee_req": 1.234}, "stage-defer": {}}
    search = {"ee-req": {"x_ee_req": 1.0, "x_plain": 1.5}, "stage": {"x_ee_req": 0.9, "x_plain": 1.35}}
    light = {"submit (worker thread)": {"minus_infer_ms": 0.5}}
    near = [{"fraction": 0.9, "systems": {"ee-req": {"p99_x_ee_req": 1.0}, "stage": {"p99_x_ee_req": 0.456}}}]
    return {
        "results": [
            {
                "model": "resnet",
                "saturated": sat,
                "search": {"systems": search},
                "closed_loop_light_load": light,
                "near_saturation": near,
            },
            {"model": "resnet18", "saturated": {"stage": {"ratio_to_ee_req": 2.0}}},
        ]
    }


def test_serve_step_summary_reads_the_bench_json(tmp_path):
    serve = next(s for s in gc.plan() if s.name == "serve")
    stem = tmp_path / "serve-nvidia-2026-11-26-gpu-check"
    stem.with_suffix(".json").write_text(json.dumps(_serve_doc()))
    out = f"[resnet] ...\nwrote {stem}.json, .md, -latency.png\n"
    status, summary = gc.summarize(serve, 0, out, {})
    assert status == "ok"
    resnet, resnet18 = summary.split(" | ")
    assert resnet.startswith(
        "resnet: stage saturated 1.23x ee-req, at the SLO 0.90x ee-req, 1.35x plain, "
        "p99 at 0.90x ee-req's saturation 0.46x ee-req's; stage-defer"
    )
    assert "stage-defer saturated - ee-req" in resnet and resnet.endswith("worker +0.50 ms over rt.infer")
    assert resnet18 == "resnet18: stage saturated 2.00x ee-req"
    # stopped by its box after the first model: a timeout, with what it finished
    status, summary = gc.summarize(serve, None, out, {})
    assert status == "TIMEOUT" and "125 s time box; finished: resnet: stage saturated 1.23x" in summary
    assert gc.summarize(serve, None, "[resnet] warming up\n", {}) == ("TIMEOUT", "stopped after its 125 s time box")
    status, summary = gc.summarize(serve, 1, "Traceback (most recent call last):\nAssertionError: no CUDA\n", {})
    assert status == "FAIL" and summary == "exit 1: AssertionError: no CUDA"
    status, summary = gc.summarize(serve, 0, f"wrote {tmp_path}/gone.json, .md\n", {})
    assert status == "ok" and summary.startswith(f"could not read {tmp_path}/gone.json")


def test_serve_step_arguments_parse_in_the_bench():
    import serve_load

    args = serve_load.parse_args(gc.SERVE_ARGS + ["--out", "/tmp/x"])
    assert args.device == "cuda" and args.systems == ["plain", "ee-req", "stage", "ee-req-x2", "stage-x2"]
    assert args.models == "vit-224" and args.max_batch == 64 and args.tag == "-gpu-check"
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--models", "resnet,bogus"])


def _bench(name, **extra):
    return {"name": name, "fullname": f"bench/x.py::{name}", "stats": {"median": 0.002}, "extra_info": extra}


EXIT_CASE = dict(op="exit_decision", B=4096, C=32000, dtype="bf16", criterion="entropy")


def test_targets_against_the_figures():
    benchmarks = [
        _bench(
            "exit", **EXIT_CASE, fraction_of_copy=0.85, speedup_vs_eager=2.5, speedup_vs_compile=1.3, copy_GBps=3000.0
        ),
        _bench(
            "exit-other", op="exit_decision", B=4096, C=32000, dtype="bf16", criterion="margin", fraction_of_copy=0.1
        ),
        _bench("compact4k", op="compact", B=4096, row_bytes=4096, copy_fraction=0.05, copy_fraction_graph=0.71),
        _bench("compact64k", op="compact", B=4096, row_bytes=65536, copy_fraction=0.9),  # eager only: not the target
        _bench("g256", resolution=224, batch=256, scenario="exits", efficiency=0.93),
        _bench("g256none", resolution=224, batch=256, scenario="none", speedup_vs_plain_graph=0.96),
        _bench("g64none", resolution=64, batch=256, scenario="none", speedup_vs_plain_graph=0.5),
    ]
    steps = {"bench-graphs": gc.StepResult("bench-graphs", "TIMEOUT", 100.0, 100, "stopped")}
    rows = {r["name"]: r for r in gc.evaluate_targets(benchmarks, steps)}
    assert [r["name"] for r in gc.evaluate_targets([], {})] == [t.name for t in gc.TARGETS]
    assert rows["exit_kernel_bandwidth"]["status"] == "pass" and rows["exit_kernel_bandwidth"]["value"] == 0.85
    assert rows["exit_kernel_vs_eager"]["status"] == "FAIL"  # 2.5 < 3
    assert rows["exit_kernel_vs_compile"]["status"] == "pass"
    # the graph figure is the target's, the eager one is carried beside it
    assert rows["compact_4KB"]["status"] == "pass" and rows["compact_4KB"]["key"] == "copy_fraction_graph"
    assert rows["compact_4KB"]["also"]["copy_fraction"] == 0.05
    assert (
        rows["compact_64KB"]["status"] == "unmeasured" and "bench-compact: step not run" in rows["compact_64KB"]["why"]
    )
    md = gc.markdown({}, [], gc.evaluate_targets(benchmarks, steps), [])
    assert "| copy_fraction_graph | 0.71 (copy_fraction 0.05; copy_fraction_graph_fused -;" in md
    assert rows["runtime_efficiency_256"]["status"] == "pass"
    assert rows["no_exit_vs_plain_graph"]["status"] == "pass"  # 0.96 >= 1/1.05, the 64x64 case is not it
    assert rows["batch1_vs_plain_eager"]["status"] == "unmeasured" and "TIMEOUT" in rows["batch1_vs_plain_eager"]["why"]


def test_result_files(tmp_path):
    info = {
        "device": "NVIDIA H100 80GB HBM3",
        "torch": "2.13.0",
        "cuda": "12.8",
        "nvcc": "12.8",
        "triton": "3.5.0",
        "arch": "9.0",
        "date": "2026-11-26T02:00:00+00:00",
    }
    steps = [gc.StepResult("sanity", "ok", 1.5, 15, "fine"), gc.StepResult("tests", "FAIL", 80.0, 130, "1 failed | x")]
    benchmarks = [
        _bench(
            "exit",
            **EXIT_CASE,
            fraction_of_copy=0.9,
            fraction_of_copy_prev=0.42,
            speedup_vs_prev=2.1428,
            sweep_fraction_of_copy={"4096x8": 0.9, "4096x8+prefetch": 0.87654, "8192x4": None},
            speedup_vs_eager=4.0,
            speedup_vs_compile=1.1,
            exit_fractions=[0.5, 0.5],
        )
    ]
    json_path, md_path = gc.write_results(
        str(tmp_path), info, steps, benchmarks, {"node": "x"}, today=datetime.date(2026, 11, 26)
    )
    assert pathlib.Path(json_path).name == "nvidia-h100-80gb-hbm3-2026-11-26.json"
    assert pathlib.Path(md_path).name == "nvidia-h100-80gb-hbm3-2026-11-26.md"
    data = json.loads(pathlib.Path(json_path).read_text())
    assert data["benchmarks"] == benchmarks and data["machine_info"] == {"node": "x"}
    assert data["gpu_check"]["info"]["device"] == "NVIDIA H100 80GB HBM3"
    assert [s["status"] for s in data["gpu_check"]["steps"]] == ["ok", "FAIL"]
    assert {t["name"]: t["status"] for t in data["gpu_check"]["targets"]}["exit_kernel_bandwidth"] == "pass"
    md = pathlib.Path(md_path).read_text()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3")
    assert "torch 2.13.0 | CUDA 12.8 | nvcc 12.8 | triton 3.5.0" in md
    assert "| tests | FAIL | 80.0 | 130 | 1 failed / x |" in md  # a '|' in a summary cannot break the table
    assert (
        "| exit kernel >= 80 % of copy bandwidth (B=4096, C=32000, bf16, entropy) | fraction_of_copy | 0.9 | 0.8 | pass |"
        in md
    )
    assert "unmeasured (bench-graphs: step not run)" in md
    # the exit kernel's previous version and config sweep (a dict) in its case's figures
    assert "fraction_of_copy_prev 0.42, speedup_vs_prev 2.14" in md
    assert "sweep_fraction_of_copy {4096x8 0.9, 4096x8+prefetch 0.877, 8192x4 -}" in md
    assert "exit_fractions [0.5, 0.5]" in md
    # bench/report.py renders the same file (pytest-benchmark format)
    import report

    _, suites = report.load(json_path)
    assert "exit" in report.markdown(data, suites)
    assert gc.result_stem({}, datetime.date(2026, 1, 2)) == "no-device-2026-01-02"


def _collect(*args):
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return r.stdout


def test_the_benchmark_cases_it_runs_exist():
    """The node ids of the three benchmark steps name collected cases (the plan follows the code)."""
    collected = set(
        _collect(
            "bench/test_bench_exit_decision.py", "bench/test_bench_compact.py", "bench/test_bench_graphs.py"
        ).split()
    )
    for node in gc.BENCH_EXIT + gc.BENCH_COMPACT + gc.BENCH_GRAPHS:
        assert node in collected, node


def test_gpu_marker_selects_the_gpu_tests_and_memcheck_selection():
    out = _collect("-m", "gpu", "tests")
    for node in (
        "tests/test_graphs.py::test_gpu_graphs_equal_eager_and_per_sample_loop",
        "tests/test_graphs.py::test_gpu_host_to_device_criterion_is_refused_before_capture_and_the_allocator_still_works",
        "tests/test_compact_ops.py::test_cuda_compact_into_graph_capture_and_replay_with_new_mask",
        "tests/test_kernel_exit_decision.py::test_gpu_logits_on_another_device_than_the_current_one",
        "tests/test_kernel_exit_decision.py::test_chunked_path_matches_tile_path",
        "tests/test_train.py::",
    ):
        assert node in out, node
    assert "tests/test_graphs.py::test_default_buckets" not in out  # CPU-only tests stay out
    memcheck = next(s for s in gc.plan() if s.name == "memcheck").commands[0]
    k = memcheck[memcheck.index("-k") + 1]
    out = _collect("tests/test_compact_ops.py", "-k", k)
    assert "test_cuda_compact_matches_boolean_indexing[some-1000]" in out
    assert "70000" not in out and "graph_capture" not in out
    assert "test_cuda_compact_into_paths_match_boolean_indexing[0.5-5000-fused]" in out
    assert "test_cuda_compact_into_paths_match_boolean_indexing[random-255-cub]" in out


def test_append_merges_a_check_split_over_two_runs(tmp_path):
    today = datetime.date(2026, 11, 26)
    info = {"device": "NVIDIA H200", "torch": "2.11.0", "date": "first"}
    first = [gc.StepResult("sanity", "ok", 1.0, 15, "a"), gc.StepResult("tests", "FAIL", 9.0, 130, "b")]
    gc.write_results(str(tmp_path), info, first, [_bench("exit", **EXIT_CASE, fraction_of_copy=0.5)], {"m": 1}, today)
    second = [gc.StepResult("sanity", "ok", 2.0, 15, "c"), gc.StepResult("bench-exit", "ok", 30.0, 75, "d")]
    merged = gc.merge_previous(
        str(tmp_path),
        {"device": "NVIDIA H200", "date": "second", "torch": None},
        second,
        [_bench("exit", **EXIT_CASE, fraction_of_copy=0.9)],
        {},
        today,
    )
    info2, steps, benchmarks, machine = merged
    assert [(s.name, s.summary) for s in steps] == [("sanity", "c"), ("tests", "b"), ("bench-exit", "d")]
    assert len(benchmarks) == 1 and benchmarks[0]["extra_info"]["fraction_of_copy"] == 0.9
    assert info2 == {"device": "NVIDIA H200", "torch": "2.11.0", "date": "second"} and machine == {"m": 1}
    # nothing to merge with: unchanged
    assert gc.merge_previous(str(tmp_path / "none"), info, second, [], {}, today)[1] == second


def test_test_workers_option(capsys):
    assert gc.main(["--dry-run", "--steps", "tests", "--test-workers", "4"]) == 0
    assert " -n 4 " in capsys.readouterr().out
    assert gc.main(["--dry-run", "--steps", "tests", "--test-workers", "1"]) == 0
    assert " -n " not in capsys.readouterr().out


def test_gpu_session_script_dry_run_prints_the_plan_and_runs_the_overhead_smoke(tmp_path):
    """tools/gpu_session.sh, the one command a device session runs, on a CPU with --dry-run:
    gpu-check's plan, then bench/graphs_overhead.py's smoke run into OUT (no wheels installed)."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("needs make")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, GPU_PYTHON=sys.executable, GPU_WHEELS_DIR=str(tmp_path / "no-wheels"), OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    r = subprocess.run(
        ["bash", str(root / "tools" / "gpu_session.sh"), str(out), "--dry-run"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[gpu-check] 9 steps, time boxes total 595 s" in r.stdout
    # every file in one archive, the reports beside it: at most 8 files come back from a device
    with tarfile.open(out / "gpu-extras.tar.gz") as tar:
        names = [pathlib.Path(n).name for n in tar.getnames()]
    for stem in ("graphs-overhead-", "serve-machinery-"):
        assert sum(n.startswith(stem) and n.endswith(".json") for n in names) == 1, names
        assert len(list(out.glob(f"{stem}*.md"))) == 1
    assert (out / "gpu-check.tar.gz").exists() and len(list(out.iterdir())) <= 8

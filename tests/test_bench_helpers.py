"""The benchmark suites' measurement helpers (bench/common.py, the compiled baseline of
bench/test_bench_exit_decision.py), checked on CPU: what they time and how they restore state."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402  (bench/ on sys.path)

from eeruntime.ops.exit_decision import exit_decision_ref  # noqa: E402


def test_cudnn_benchmark_is_restored_after_the_block_also_on_error():
    saved = torch.backends.cudnn.benchmark
    try:
        for before in (False, True):
            torch.backends.cudnn.benchmark = before
            with common.cudnn_benchmark_on():
                assert torch.backends.cudnn.benchmark is True
            assert torch.backends.cudnn.benchmark is before
            with pytest.raises(KeyError), common.cudnn_benchmark_on():
                raise KeyError("a failing case")
            assert torch.backends.cudnn.benchmark is before
    finally:
        torch.backends.cudnn.benchmark = saved


def test_synced_waits_for_the_device_on_cuda_only(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    calls = []
    fn = lambda: calls.append(1) or "out"  # noqa: E731
    assert common.synced(fn, "cpu") is fn
    wrapped = common.synced(fn, "cuda")
    assert wrapped() == "out" and calls == [1] and syncs == ["cuda"]  # after the call, every call
    wrapped()
    assert len(syncs) == 2


def test_copy_bandwidth_uses_event_timing_over_at_least_1_gib(monkeypatch):
    timed = []

    def fake_per_call_seconds(fn, target_s=0.05, max_inner=1000):
        timed.append(fn)
        return 1e-3, 10

    monkeypatch.setattr(common, "per_call_seconds", fake_per_call_seconds)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
    assert common.COPY_BYTES >= 1 << 30
    # "cpu" stands in for the device: torch.empty does not touch the pages, and nothing is copied
    assert common.copy_bandwidth("cpu") == 2 * common.COPY_BYTES / 1e-3
    assert len(timed) == 1
    # too little free memory: the buffers shrink by halves, never below 256 MiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    assert common.copy_bandwidth("cpu") == 2 * (1 << 28) / 1e-3


def test_compiled_baseline_compiles_once_per_row_length():
    """Batch dynamic, classes static: batches 2, 5 and 17 at two row lengths are 2 compiles (it
    was one per shape, ~51 in the suite), and the compiled baseline still equals the reference."""
    import test_bench_exit_decision as suite

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = suite.compiled_reference("entropy", counting_backend)
    thr = torch.tensor(0.5)
    for C in (10, 30):
        for B in (2, 5, 17):
            x = torch.randn(B, C) * 3
            conf, flag = suite.prepare_compiled(compiled, x, thr)
            ref_conf, ref_flag = exit_decision_ref(x, thr, "entropy")
            torch.testing.assert_close(conf, ref_conf)
            assert torch.equal(flag, ref_flag)
            compiled(x, thr)  # the timed calls: no compile
    assert len(graphs) == 2
    torch._dynamo.reset()


def test_config_sweep_records_each_config_within_its_time_box(monkeypatch):
    """The BLOCK_C x num_warps sweep (run by the Triton interpreter here): one figure per config,
    launched with that config, moved / seconds / copy_bw; none past its time box; a config whose
    scores disagree with the default launch is named, and one that raises is a note."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
        pytest.skip("the kernel needs TRITON_INTERPRET=1 on CPU")
    import test_bench_exit_decision as suite

    from eeruntime.kernels import exit_decision as kernel_module

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(4, 96) * 3).to(device)
    launches = []
    real = kernel_module.exit_decision_triton

    def recording(*args, **kw):
        launches.append((kw.get("chunk"), kw.get("num_warps")))
        out = real(*args, **kw)
        if kw.get("num_warps") == 2 and kw.get("chunk") == 64:  # a miscompiled config, simulated
            out[0].add_(1.0)
        if kw.get("num_warps") == 1 and kw.get("chunk") == 64:
            raise RuntimeError("out of resources")
        return out

    monkeypatch.setattr(kernel_module, "exit_decision_triton", recording)
    timed = []

    def fake_timer(fn, target_s=0.05, max_inner=1000):
        timed.append(fn.keywords)
        return 1e-3 * fn.keywords["num_warps"], 1

    monkeypatch.setattr(suite, "per_call_seconds", fake_timer)
    fractions, notes, wrong = suite.config_sweep(
        x, 0.5, "entropy", moved=1000, copy_bw=1e6, configs=((32, 1), (64, 2), (64, 1))
    )
    assert fractions == {
        "32x1": 1.0,
        "32x1+prefetch": 1.0,
        "64x2": 0.5,
        "64x2+prefetch": 0.5,
        "64x1": None,
        "64x1+prefetch": None,
    }
    assert [(k["chunk"], k["num_warps"], k["prefetch"]) for k in timed] == [
        (32, 1, False),
        (32, 1, True),
        (64, 2, False),
        (64, 2, True),
    ]
    assert all(k["one_block_max"] == 0 for k in timed)  # the chunked path, whatever C
    assert (32, 2) not in launches and (64, 1) in launches
    assert wrong == ["64x2", "64x2+prefetch"]
    assert len(notes) == 2 and all("64x1" in n and "out of resources" in n for n in notes)

    timed.clear()
    fractions, notes, wrong = suite.config_sweep(x, 0.5, "entropy", 1000, 1e6, configs=((32, 1),), budget_s=-1)
    assert fractions == {"32x1": None, "32x1+prefetch": None} and not timed and not wrong
    assert any("time box" in n for n in notes)


def test_device_slug_tells_gpus_apart_and_keeps_the_cpu_names(tmp_path):
    # two cards of one vendor measured on one day must not write the same result files
    assert common.device_slug("NVIDIA H200") == "nvidia-h200"
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.device_slug("AMD EPYC 7B13 (2 cores)") == "amd"  # as every CPU result so far
    assert common.device_slug("Intel(R) Xeon(R) Processor (16 cores)") == "intel"  # no parentheses in file names
    assert common.device_slug("") == "cpu" and common.device_slug("(?)") == "cpu"
    doc = {"device": {"device": "NVIDIA H200"}, "date": "2026-11-27"}
    assert common.write_report(tmp_path, "x", doc, "md").name == "x-nvidia-h200-2026-11-27"

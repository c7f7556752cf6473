"""bench/stage_step_cost.py: what a stage step costs beyond the same stage in a pass. Its pieces
are checked against rt.infer (the drained scheduler answers every request as rt.infer does, by
either step), the dispatched step it measures is really the dispatched one (and is put back), and
a quick run writes its report."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import serve_load  # noqa: E402  (bench/ on sys.path)
import stage_step_cost  # noqa: E402

from eeruntime import ops  # noqa: E402
from eeruntime.ops._ext_backend import cpu_loop_ops  # noqa: E402

needs_ext = pytest.mark.skipif(cpu_loop_ops() is None, reason="the extension eeruntime._C is not built here (make ext)")


@needs_ext
def test_dispatched_step_kind_takes_the_dispatch_and_is_put_back(monkeypatch):
    """Inside step_kind("dispatched") rt.run_stage goes through ops.compact (the dispatch);
    outside it, and after an exception inside it, it does not; the answers are the same."""
    model, rt, pool = serve_load.build_runtime(serve_load.MODELS["tiny"])
    x, rows = pool[:24], torch.arange(24)
    calls = []
    real = ops.compact
    monkeypatch.setattr(ops, "compact", lambda *a, **k: calls.append(1) or real(*a, **k))
    direct = rt.run_stage(0, x, rows)
    assert calls == []
    with stage_step_cost.step_kind("dispatched"):
        dispatched = rt.run_stage(0, x, rows)
    assert calls
    for name in ("exit_rows", "logits", "confidence", "rows", "state"):
        assert torch.equal(getattr(direct, name), getattr(dispatched, name)), name
    calls.clear()
    with pytest.raises(RuntimeError, match="inside"):
        with stage_step_cost.step_kind("dispatched"):
            raise RuntimeError("inside")
    rt.run_stage(0, x, rows)
    assert calls == []


@pytest.mark.parametrize("fused", [True, False])
def test_drained_scheduler_answers_every_request_as_rt_infer(fused):
    """The bench's worker-less scheduler, drained in the calling thread, answers each single-row
    request with its row of rt.infer (one pass per batch or step by step), and counts the batches
    that ran past stage 0 (inside a pass or as steps)."""
    model, rt, pool = serve_load.build_runtime(serve_load.MODELS["tiny"])
    xs = [pool[i : i + 1].clone() for i in range(60)]
    want = rt.infer(pool[:60])
    sched = stage_step_cost._Drained(rt, max_batch=8, max_defer_ms=0, fused=fused, max_queue_rows=60)
    futures = [sched.submit_nowait(x) for x in xs]
    assert not any(f.done() for f in futures)  # nothing ran them but the drain
    sched.drain()
    got = [f.result(0) for f in futures]
    assert torch.equal(torch.cat([g.exit_index for g in got]), want.exit_index)
    torch.testing.assert_close(torch.cat([g.logits for g in got]), want.logits, rtol=1e-5, atol=1e-6)
    seconds, forwards, steps = stage_step_cost.drain_once(rt, xs, 60, 8, fused)
    assert 0 < forwards < seconds
    assert "forward" not in vars(rt.spec)  # the timer is taken off again
    deep = int((want.exit_index > 0).sum())
    assert steps >= -(-deep // 8)  # at least the stage-1 batches those rows need


@needs_ext
def test_quick_run_writes_both_parts(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "bench" / "stage_step_cost.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("stage-step-cost-*-quick.json")
    doc, md = json.loads(js.read_text()), js.with_suffix(".md").read_text()
    assert [(r["model"], r["stage"], r["rows"]) for r in doc["step"]] == [("tiny", 1, 4), ("tiny", 2, 4)]
    for r in doc["step"]:
        assert 0 < r["forward_us"] and 0 < r["direct_us"] and 0 < r["dispatched_us"]
        assert f"| tiny | {r['stage']} | 4 | {r['leave']} |" in md
    (row,) = doc["scheduler"]
    assert row["model"] == "tiny" and row["max_batch"] == 4
    for kind in ("direct", "dispatched"):
        assert row[kind]["steps_past_stage0"] > 0 and len(row[kind]["overhead_runs"]) == 1
        assert len(row[kind]["machinery_runs"]) == 1
        assert row[kind]["fused_us_per_request"] > 0 and row[kind]["steps_us_per_request"] > 0
    assert "The step alone" in md and "Through the scheduler" in md and "Arguments:" in md


def test_bad_arguments_are_refused():
    for argv, msg in ((["--models", "nope"], "unknown models"), (["--batches", "4,x"], "comma-separated")):
        with pytest.raises(SystemExit):
            stage_step_cost.parse_args(argv)
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "stage_step_cost.py"), *argv],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and msg in proc.stderr

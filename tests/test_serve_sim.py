"""bench/serve_sim.py: the replay of serving on a virtual clock, checked against references
computed here (a lone request's latency from the cost table, rows conserved per stage), against
itself where the policies must agree (the stage scheduler without deferral forms exactly (b)'s
batches), and where re-batching can and cannot pay (stage costs with and without a fixed part);
and its smoke run writing JSON and markdown."""

import json
import pathlib
import subprocess
import sys

import pytest
from models import mlp_model

import eeruntime as ee

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import serve_sim  # noqa: E402  (bench/ on sys.path)

K = 4
SIZES = [1, 2, 4, 8, 16, 32]


def affine_costs(fixed_ms, per_row_ms):
    """Stage k's step costs fixed_ms[k] + per_row_ms[k] x b (ms), tabulated at SIZES."""
    return serve_sim.StepCosts(SIZES, [[(f + c * b) / 1e3 for b in SIZES] for f, c in zip(fixed_ms, per_row_ms)])


def runtime():
    return ee.EERuntime(mlp_model(K=K, seed=1), thresholds=0.5, criterion="max_prob")


def exits_for(n, seed=0):
    import random

    rng = random.Random(seed)
    return [rng.choices(range(K), weights=[0.5, 0.2, 0.15, 0.15])[0] for _ in range(n)]


def test_step_costs_interpolate_between_measured_sizes_and_scale_past_the_largest():
    c = serve_sim.StepCosts([1, 4, 8], [[1.0, 4.0, 6.0]])
    assert c(0, 1) == 1.0 and c(0, 4) == 4.0 and c(0, 8) == 6.0
    assert c(0, 6) == pytest.approx(5.0)  # halfway from 4 to 8
    assert c(0, 2) == pytest.approx(2.0)
    assert c(0, 16) == pytest.approx(12.0)  # past the largest size: proportional


@pytest.mark.parametrize("system", ["ee-req", "stage", "stage-nodefer", "stage-age", "stage-interleave", "stage-steps"])
def test_a_lone_request_takes_its_own_steps_cost(system):
    """Arrivals a second apart (nothing ever shares a batch): every request's latency is the cost
    of the steps to its exit on one row plus the per-request cost, from the table directly."""
    costs = affine_costs([1.0, 0.5, 0.5, 0.5], [0.1, 0.05, 0.05, 0.05])
    n = 40
    exits = exits_for(n)
    arr = [float(i) for i in range(n)]
    ovh = 20e-6
    if system == "ee-req":
        res = serve_sim.replay_batcher(costs, exits, arr, 32, ovh)
    else:
        res = serve_sim.replay_scheduler(serve_sim.systems(runtime(), 32, 20.0)[system](), costs, exits, arr, ovh)
    want = sorted(sum(costs(k, 1) for k in range(e + 1)) + ovh for e in exits)
    assert res["p50_ms"] == pytest.approx(want[n // 2] * 1e3, rel=0.2)  # (percentile interpolates)
    assert min(want) * 1e3 <= res["p50_ms"] <= max(want) * 1e3
    assert res["p99_ms"] == pytest.approx(max(want) * 1e3, rel=0.05)
    assert res["rows_per_stage"] == [sum(1 for e in exits if e >= k) for k in range(K)]


@pytest.mark.parametrize("rate", [300.0, 2000.0, 20000.0])
def test_without_deferral_the_scheduler_forms_exactly_the_batches_of_request_level_batching(rate):
    """max_defer_ms 0 and max_wait_ms 0: every stage-0 batch of whatever waits runs in one pass
    with its survivors alone, which is what (b) does: same latencies, given the same per-request cost."""
    costs = affine_costs([1.0, 0.8, 0.8, 0.8], [0.1, 0.02, 0.02, 0.02])
    n = 3000
    exits = exits_for(n, seed=2)
    arr = serve_sim.arrivals(rate, n, seed=3)
    b = serve_sim.replay_batcher(costs, exits, arr, 16, 15e-6)
    c = serve_sim.replay_scheduler(serve_sim.systems(runtime(), 16, 20.0)["stage-nodefer"](), costs, exits, arr, 15e-6)
    for key in ("p50_ms", "p99_ms", "throughput"):
        assert c[key] == pytest.approx(b[key], rel=1e-9), key
    assert c["mean_batch"] == pytest.approx(b["mean_batch"])
    assert c["rows_per_stage"] == b["rows_per_stage"] == [sum(1 for e in exits if e >= k) for k in range(K)]


def test_under_overload_deferral_fills_deeper_batches_and_pays_only_for_fixed_step_costs():
    """Far past saturation, the stage scheduler with deferral runs fuller deeper batches than (b).
    With a fixed cost per step that is more requests per second; with costs proportional to the
    rows (no fixed part) fuller batches cost the same and the rates agree."""
    n = 4000
    exits = exits_for(n, seed=4)
    arr = serve_sim.arrivals(1e6, n, seed=5)
    make = serve_sim.systems(runtime(), 32, 20.0)["stage"]
    fixed = affine_costs([1.0, 1.0, 1.0, 1.0], [0.1, 0.02, 0.02, 0.02])
    b, c = (
        serve_sim.replay_batcher(fixed, exits, arr, 32, 0.0),
        serve_sim.replay_scheduler(make(), fixed, exits, arr, 0.0),
    )
    assert all(cb > bb for cb, bb in zip(c["mean_batch"][1:], b["mean_batch"][1:])), (c["mean_batch"], b["mean_batch"])
    assert c["throughput"] > 1.15 * b["throughput"]
    linear = affine_costs([0.0] * K, [0.1, 0.02, 0.02, 0.02])
    b, c = (
        serve_sim.replay_batcher(linear, exits, arr, 32, 0.0),
        serve_sim.replay_scheduler(make(), linear, exits, arr, 0.0),
    )
    assert c["throughput"] == pytest.approx(b["throughput"], rel=0.01)


def test_the_full_batch_trigger_defers_sooner_than_the_age_trigger():
    """Just past (b)'s saturation on costs with a fixed part per step: stage 0 holds a full batch
    long before its oldest row has waited 4 x max_defer_ms (80 ms), so the scheduler re-batches
    survivors while the queue is still short: its p99 is well below the age-triggered rule's."""
    n = 6000
    exits = exits_for(n, seed=6)
    costs = affine_costs([1.2, 1.2, 1.2, 1.2], [0.11, 0.02, 0.02, 0.02])
    sat = serve_sim.replay_batcher(costs, exits, serve_sim.arrivals(1e6, n, 0), 32, 10e-6)["throughput"]
    arr = serve_sim.arrivals(1.05 * sat, n, seed=7)
    make = serve_sim.systems(runtime(), 32, 20.0)
    rows = serve_sim.replay_scheduler(make["stage"](), costs, exits, arr, 20e-6)
    age = serve_sim.replay_scheduler(make["stage-age"](), costs, exits, arr, 20e-6)
    b = serve_sim.replay_batcher(costs, exits, arr, 32, 10e-6)
    assert rows["p99_ms"] < 0.5 * age["p99_ms"] and rows["p99_ms"] < 0.5 * b["p99_ms"], (rows, age, b)


def test_steps_form_the_batches_of_passes_and_answer_the_rows_leaving_early_sooner():
    """stage-steps (fused=False, no deferral) forms exactly (b)'s batches; its rows leave when
    their exit's step is done, not when the batch's deepest step is: so the same rows per stage,
    and, given the same per-request cost, every request answered no later than under (b) (sooner
    when it leaves before the deepest stage its batch reaches)."""
    n = 3000
    exits = exits_for(n, seed=10)
    costs = affine_costs([1.0, 0.8, 0.8, 0.8], [0.1, 0.02, 0.02, 0.02])
    arr = serve_sim.arrivals(2000.0, n, seed=11)
    b = serve_sim.replay_batcher(costs, exits, arr, 16, 0.0)
    steps = serve_sim.replay_scheduler(serve_sim.systems(runtime(), 16, 20.0)["stage-steps"](), costs, exits, arr, 0.0)
    assert steps["mean_batch"] == pytest.approx(b["mean_batch"])
    assert steps["rows_per_stage"] == b["rows_per_stage"] and steps["fused_batches"] == 0
    assert steps["p50_ms"] < b["p50_ms"] and steps["p99_ms"] <= b["p99_ms"] + 1e-9


@pytest.mark.parametrize("system", ["stage-steps", "stage-nodefer"])
def test_each_step_past_stage_0_of_a_batch_run_step_by_step_pays_the_step_overhead(system):
    """Lone requests (nothing shares a batch): run step by step, a request that leaves at exit e
    pays e step overheads over the cost of its steps; in one pass (stage-nodefer), none."""
    costs = affine_costs([1.0, 0.5, 0.5, 0.5], [0.1, 0.05, 0.05, 0.05])
    n = 40
    exits = exits_for(n, seed=12)
    arr = [float(i) for i in range(n)]
    step = 0.25e-3
    res = serve_sim.replay_scheduler(serve_sim.systems(runtime(), 32, 20.0)[system](), costs, exits, arr, 0.0, step)
    per = step if system == "stage-steps" else 0.0
    want = sorted(sum(costs(k, 1) for k in range(e + 1)) + e * per for e in exits)
    assert res["p99_ms"] == pytest.approx(max(want) * 1e3, rel=0.02)
    assert res["fused_batches"] == (0 if system == "stage-steps" else n)


def test_the_slo_search_brackets_the_highest_rate_within_the_slo():
    """On a p99 that is a known step function of the rate, the bisection returns a rate within the
    SLO and a bracket within 2 % around the true threshold; 0 when nothing is within it."""
    for true in (123.0, 9_876.0, 40_000.0):
        rate, (lo, hi) = serve_sim.highest_rate_within(lambda r: 1.0 if r <= true else 9.0, 5.0, 50_000.0)
        assert rate == lo <= true < hi <= lo * 1.02 + 1e-9
    assert serve_sim.highest_rate_within(lambda r: 1.0, 5.0, 50_000.0) == (50_000.0, [50_000.0, 50_000.0])
    assert serve_sim.highest_rate_within(lambda r: 9.0, 5.0, 50_000.0)[0] == 0.0


def test_interleaving_shares_deeper_steps_at_moderate_load_which_lowers_p50_and_raises_p99():
    """Below saturation (stage 0 keeps up, so the default policy never defers), stage-interleave
    runs stage-0 batches step by step and passes a partial deeper stage over while stage 0 holds
    arrivals: the survivors of successive stage-0 batches share fuller deeper steps than (b)'s, so
    most rows leave sooner (p50), while the rows held back make the tail (p99) longer, each held at
    most the bound per deeper stage plus the steps run meanwhile (docs/serving.md, "Session 17")."""
    n = 4000
    exits = exits_for(n, seed=8)
    costs = affine_costs([1.0, 1.0, 1.0, 1.0], [0.1, 0.02, 0.02, 0.02])
    sat = serve_sim.replay_batcher(costs, exits, serve_sim.arrivals(1e6, n, 0), 32, 0.0)["throughput"]
    arr = serve_sim.arrivals(0.5 * sat, n, seed=9)
    make = serve_sim.systems(runtime(), 32, 20.0, interleave_ms=2.0)
    b = serve_sim.replay_batcher(costs, exits, arr, 32, 0.0)
    nodefer = serve_sim.replay_scheduler(make["stage-nodefer"](), costs, exits, arr, 0.0)
    inter = serve_sim.replay_scheduler(make["stage-interleave"](), costs, exits, arr, 0.0)
    assert nodefer["mean_batch"] == pytest.approx(b["mean_batch"])  # (no deferral: (b)'s batches)
    assert all(i > bb * 1.05 for i, bb in zip(inter["mean_batch"][1:], b["mean_batch"][1:])), (inter, b)
    assert inter["rows_per_stage"] == b["rows_per_stage"]
    assert inter["p50_ms"] < 0.9 * b["p50_ms"]
    assert b["p99_ms"] * 1.2 < inter["p99_ms"] <= b["p99_ms"] + 3 * (2.0 + 2 * 4.2)


def test_quick_run_writes_json_and_markdown(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_sim.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (js,) = tmp_path.glob("serve-sim-quick-*.json")
    doc = json.loads(js.read_text())
    (res,) = doc["results"]
    assert res["model"] == "digits" and [r["fraction"] for r in res["rows"]] == [0.5, 1.05]
    for row in res["rows"]:
        for s in ("ee-req", "stage", "stage-nodefer", "stage-age", "stage-interleave", "stage-steps"):
            assert row[s]["p99_ms"] >= row[s]["p50_ms"] > 0
    # the SLO search's rate is sustained and its bracket's top is not, per the replay itself
    assert res["slo_ms"] == pytest.approx(10 * res["plain_batch1_ms"])
    for s, v in res["within_slo"].items():
        lo, hi = v["bracket"]
        assert lo == v["rate"] and hi <= lo * 1.02 + 1e-9 and (lo > 0), (s, v)
    # the per-request sweep: more work per request, fewer requests per second saturated
    sweep = res["overhead_sweep"]
    assert [r["stage_us"] for r in sweep] == [10.0, 40.0]
    assert sweep[0]["saturated_over_ee_req"] > sweep[1]["saturated_over_ee_req"]
    md = js.with_suffix(".md").read_text()
    assert "stage p99 / ee-req's" in md and "| 1.05 (" in md and "10 us" in md
    with pytest.raises(SystemExit):
        serve_sim.parse_args(["--models", "nosuch"])


def test_a_deeper_backlog_trigger_waits_for_more_full_batches_in_stage_0():
    """stage-behind2 counts stage 0 as behind only with two full batches queued (stage's rule: one),
    and runs a full batch step by step only when another full one waits behind it."""
    from eeruntime.serve.scheduler import _Chunk

    make = serve_sim.systems(runtime(), 4, 20.0, behind=[2])
    one, two = make["stage"](), make["stage-behind2"]()

    def fill(sched, rows):
        q = sched._queues[0]
        q.clear()
        q.extend(_Chunk(range(i, i + 1), None, None, None, None, 0.0, False) for i in range(rows))

    for rows, want_one, want_two in [(3, False, False), (4, True, False), (7, True, False), (8, True, True)]:
        fill(one, rows)
        fill(two, rows)
        assert (one._backlogged(), two._backlogged()) == (want_one, want_two), rows
    batch = [_Chunk(range(i, i + 1), None, None, None, None, 0.0, False) for i in range(4)]
    fill(two, 3)  # a full batch taken, less than one more behind it: one pass
    assert two._fusable(batch)
    fill(two, 4)  # another full batch behind it: step by step, its survivors may be passed over
    assert not two._fusable(batch)
    with pytest.raises(SystemExit):
        serve_sim.parse_args(["--behind", "1"])


def test_a_deeper_backlog_trigger_still_fills_deeper_batches_under_overload():
    """Far past saturation stage 0 holds any number of full batches, so stage-behind3 re-batches
    survivors as stage does: the same rates, both above (b)'s on costs with a fixed part."""
    n = 4000
    exits = exits_for(n, seed=4)
    arr = serve_sim.arrivals(1e6, n, seed=5)
    make = serve_sim.systems(runtime(), 32, 20.0, behind=[3])
    fixed = affine_costs([1.0, 1.0, 1.0, 1.0], [0.1, 0.02, 0.02, 0.02])
    b = serve_sim.replay_batcher(fixed, exits, arr, 32, 0.0)
    one = serve_sim.replay_scheduler(make["stage"](), fixed, exits, arr, 0.0)
    three = serve_sim.replay_scheduler(make["stage-behind3"](), fixed, exits, arr, 0.0)
    assert three["throughput"] > 1.15 * b["throughput"]
    assert three["throughput"] == pytest.approx(one["throughput"], rel=0.02)

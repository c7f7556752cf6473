"""bench/serve_load.py's search of each system's highest sustained rate (find_max_sustained): the
bisection checked with a fake prober (fast, deterministic: a system sustains exactly up to a known
rate), and the smoke run (--quick) writing the search into its JSON and markdown."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools"))

import serve_load  # noqa: E402  (bench/ on sys.path)

SLO_MS = 10.0


class FakeProber:
    """Stands in for an open-loop run: system s sustains every rate up to ``limits[s]`` (p99 1 ms,
    within the SLO) and no rate above it (p99 100 ms). Every call is recorded, in order."""

    def __init__(self, limits, slow_runs=None):
        self.limits = limits
        self.calls = []  # (system, rate, seed)
        # slow_runs[s] = k: the first k runs of every probe of s are slow (a noisy machine's spell)
        self.slow_runs = slow_runs or {}

    def __call__(self, system, rate, seed):
        self.calls.append((system, rate, seed))
        runs_of_this_probe = sum(
            1 for c in self.calls if c[0] == system and c[1] == rate and c[2] // 1000 == seed // 1000
        )
        slow = runs_of_this_probe <= self.slow_runs.get(system, 0)
        p99 = 1.0 if rate <= self.limits[system] and not slow else 100.0
        return {"p99_ms": p99, "p50_ms": p99 / 2, "throughput": rate, "answered": 500, "sent": 500}


def judge(row):
    return serve_load.sustained(row, SLO_MS)


def search(limits, lo, hi, floor, tol=0.05, repeats=1, **kw):
    prober = FakeProber(limits, **kw)
    systems = list(limits)
    res = serve_load.find_max_sustained(
        systems,
        prober,
        judge,
        lo={s: lo for s in systems},
        hi={s: hi for s in systems},
        floor={s: floor for s in systems},
        tol=tol,
        repeats=repeats,
    )
    return res, prober


@pytest.mark.parametrize("tol", [0.05, 0.2])
def test_search_finds_each_systems_limit_within_the_tolerance(tol):
    # limits spread over the bracket, one of them (ee-req) below the first guess lo=400
    limits = {"plain": 583.0, "ee-req": 350.0, "stage": 1748.0, "stage-fill": 4990.0}
    res, prober = search(limits, lo=400.0, hi=5500.0, floor=100.0, tol=tol)
    for s, limit in limits.items():
        got = res["systems"][s]
        lo, hi = got["bracket"]
        # the true limit lies in the final bracket, which is within the tolerance
        assert lo <= limit < hi and hi / lo <= 1 + tol + 1e-12, (s, got)
        assert limit / (1 + tol) <= got["found_rate"] <= limit
        # the found rate is the highest probe of that system judged sustained, and the record says so
        mine = [p for p in res["probes"] if p["system"] == s]
        assert got["found_rate"] == max(p["rate"] for p in mine if p["sustained"])
        assert all(p["sustained"] == (p["rate"] <= limit) for p in mine)
        assert got["probes"] == len(mine) == sum(1 for c in prober.calls if c[0] == s)
        # capped: no probe failed (stage-fill's limit is within 20% of hi: with tol 0.2 it may never fail)
        assert got["capped"] == all(p["sustained"] for p in mine) and got["note"] == ""
    assert not res["systems"]["stage"]["capped"]
    # bisection, not a scan: a handful of probes per system for a bracket spanning 14x
    assert max(v["probes"] for v in res["systems"].values()) <= 3 + math.ceil(
        math.log2(math.log(55) / math.log(1 + tol))
    )


def test_a_system_failing_even_at_the_lowest_rate_reports_zero():
    res, prober = search({"plain": 50.0, "stage": 2000.0}, lo=400.0, hi=5000.0, floor=100.0)
    plain = res["systems"]["plain"]
    assert plain["found_rate"] == 0.0 and "fails even at the lowest rate" in plain["note"]
    # probed at its first guess, then at the floor twice (one failure there may be noise), then
    # dropped from the lockstep
    assert [c[1] for c in prober.calls if c[0] == "plain"] == [400.0, 100.0, 100.0]
    assert plain["probes"] == 3 and plain["bracket"] == [0.0, 100.0]
    assert res["systems"]["stage"]["found_rate"] > 1900.0


def test_one_failed_probe_at_the_floor_is_probed_again():
    """A slow spell during the floor's first probe does not report the system as sustaining 0."""

    class NoisyFloor(FakeProber):
        def __call__(self, system, rate, seed):
            row = super().__call__(system, rate, seed)
            if rate == 100.0 and sum(1 for c in self.calls if c[1] == 100.0) == 1:
                row = dict(row, p99_ms=100.0)  # the floor's first run: slow
            return row

    prober = NoisyFloor({"ee-req": 300.0})
    res = serve_load.find_max_sustained(
        ["ee-req"], prober, judge, lo={"ee-req": 400.0}, hi={"ee-req": 5000.0}, floor={"ee-req": 100.0}, repeats=1
    )
    got = res["systems"]["ee-req"]
    assert [c[1] for c in prober.calls][:3] == [400.0, 100.0, 100.0]
    assert not got["note"] and 300.0 / 1.05 <= got["found_rate"] <= 300.0


def test_a_system_sustaining_hi_is_marked_capped():
    # hi is taken as failing without a probe: a system that never fails is reported as such
    res, _ = search({"stage": 1e9}, lo=400.0, hi=5000.0, floor=100.0)
    got = res["systems"]["stage"]
    assert got["capped"] and 5000.0 / 1.05 <= got["found_rate"] < 5000.0


def test_each_probe_is_judged_by_its_median_p99_run():
    # one slow run of three at a sustained rate: the median run is fast, the search is not fooled
    res, _ = search({"ee-req": 1000.0}, lo=400.0, hi=5000.0, floor=100.0, repeats=3, slow_runs={"ee-req": 1})
    assert 1000.0 / 1.05 <= res["systems"]["ee-req"]["found_rate"] <= 1000.0
    assert all(len(p["p99s_ms"]) == 3 for p in res["probes"])
    # two slow runs of three: the median is slow, every probe fails, the system reports 0
    res, _ = search({"ee-req": 1000.0}, lo=400.0, hi=5000.0, floor=100.0, repeats=3, slow_runs={"ee-req": 2})
    assert res["systems"]["ee-req"]["found_rate"] == 0.0


def test_unanswered_requests_fail_a_probe_whatever_the_p99():
    assert serve_load.sustained({"p99_ms": 1.0, "answered": 500, "sent": 500}, SLO_MS)
    assert not serve_load.sustained({"p99_ms": 1.0, "answered": 499, "sent": 500}, SLO_MS)
    assert not serve_load.sustained({"p99_ms": 10.5, "answered": 500, "sent": 500}, SLO_MS)


def passes_of(calls):
    """The probe calls grouped by pass: one (round, repeat) each, told apart by the seed."""
    out = {}
    for c in calls:
        out.setdefault(c[2], []).append(c)
    return list(out.values())


def test_the_systems_run_in_lockstep_in_a_rotated_order():
    systems = ["plain", "ee-req", "stage", "stage-inline"]
    # same limit and bracket: every system searches for the same number of rounds
    res, prober = search({s: 1000.0 for s in systems}, lo=400.0, hi=5000.0, floor=100.0, repeats=3)
    rounds = max(p["round"] for p in res["probes"]) + 1
    assert rounds >= 3
    passes = passes_of(prober.calls)
    assert len(passes) == 3 * rounds
    for calls in passes:
        # lockstep: each pass probes every system once, before the next pass starts
        assert len(calls) == len(systems) and sorted(c[0] for c in calls) == sorted(systems)
    assert [c for calls in passes for c in calls] == prober.calls
    # a probe's repeats run at one rate per system
    for s in systems:
        mine = [c[1] for c in prober.calls if c[0] == s]
        assert mine[0::3] == mine[1::3] == mine[2::3]
    # the first system changes from each pass to the next, and in any len(systems) passes in a row
    # each system is first once: a slow spell at the start of a pass lands on each system alike
    firsts = [calls[0][0] for calls in passes]
    assert all(a != b for a, b in zip(firsts, firsts[1:]))
    for i in range(len(firsts) - len(systems) + 1):
        assert sorted(firsts[i : i + len(systems)]) == sorted(systems)


def test_lockstep_drops_finished_systems_and_keeps_rotating_the_rest():
    # plain fails at its guess and twice at the floor (rounds 0 to 2); the others go on, still rotated
    res, prober = search({"plain": 10.0, "ee-req": 900.0, "stage": 1500.0}, lo=400.0, hi=5000.0, floor=100.0)
    passes = passes_of(prober.calls)
    assert all(len(calls) == 3 for calls in passes[:3])
    later = [calls for calls in passes[3:] if len(calls) == 2]
    assert len(later) >= 2 and all("plain" not in {c[0] for c in calls} for calls in passes[3:])
    firsts = [calls[0][0] for calls in later]
    assert all(a != b for a, b in zip(firsts, firsts[1:])), firsts


def test_search_ratios_name_the_issue_targets():
    r = serve_load.search_ratios({"plain": 1000.0, "ee-req": 1900.0, "stage": 2100.0, "stage-fill": 1800.0})
    assert r["stage"]["x_ee_req"] == pytest.approx(2100 / 1900) and r["stage"]["x_plain"] == pytest.approx(2.1)
    assert r["stage"]["meets_1_05x_ee_req"] and r["stage"]["meets_2x_plain"]
    assert not r["stage-fill"]["meets_1_05x_ee_req"] and not r["stage-fill"]["meets_2x_plain"]
    assert "meets_2x_plain" not in r["ee-req"] and r["ee-req"]["x_plain"] == pytest.approx(1.9)
    # a baseline that sustains nothing: no ratio, and no target met
    r = serve_load.search_ratios({"plain": 0.0, "ee-req": 1900.0, "stage": 2100.0})
    assert r["stage"]["x_plain"] is None and not r["stage"]["meets_2x_plain"]


def test_targets_line_says_when_2x_plain_is_above_the_flops_ideal():
    """ResNet-style's exit fractions make it at most ~1.42x cheaper than plain by FLOPs: the table
    says the 2x-plain target cannot be met there; digits (2.84x) gets no such sentence."""
    ratios = serve_load.search_ratios({"plain": 1000.0, "ee-req": 1900.0, "stage": 2100.0})
    systems = {
        s: dict(found_rate=r, bracket=[r, r * 1.05], capped=False, probes=3, note="", **ratios[s])
        for s, r in (("plain", 1000.0), ("ee-req", 1900.0), ("stage", 2100.0))
    }
    search = {"systems": systems, "tol": 0.05, "repeats": 3}
    (line,) = [ln for ln in serve_load.search_table(search, 1.4219) if "Targets" in ln]
    assert line.startswith("Targets: stage meets >= 1.05x ee-req, meets >= 2x plain.")
    assert line.endswith("by FLOPs, these exit fractions make the model at most 1.42x cheaper than plain.")
    for ideal in (2.84, None):
        (line,) = [ln for ln in serve_load.search_table(search, ideal) if "Targets" in ln]
        assert "FLOPs" not in line
    # the ideal itself: plain's FLOPs over the expected FLOPs of the exit fractions (docs/design.md),
    # recomputed here from the model's stages by torch's counter
    spec = serve_load.MODELS["resnet"]
    model = spec["build"]().eval()
    from torch.utils.flop_counter import FlopCounterMode

    x, stage_f, head_f = torch.randn(1, *spec["shape"]), [], []
    with torch.no_grad():
        h = x
        for stage, head in zip(model.stages, model.exits):
            with FlopCounterMode(display=False) as fc:
                h = stage(h)
            with FlopCounterMode(display=False) as fh:
                head(h)
            stage_f.append(fc.get_total_flops())
            head_f.append(fh.get_total_flops())
    # exiting at k costs every stage and head up to k; plain costs every stage and the last head
    cum = [sum(stage_f[: k + 1]) + sum(head_f[: k + 1]) for k in range(len(stage_f))]
    plain = sum(stage_f) + head_f[-1]
    expected = sum(f * c for f, c in zip(spec["fractions"], cum))
    assert plain / expected == pytest.approx(1.42, abs=0.01)  # (what docs/serving.md quotes)
    assert serve_load.measure_costs(model, x).ideal_speedup(spec["fractions"]) == pytest.approx(plain / expected)


def test_near_saturation_judges_the_median_p99_against_ee_reqs():
    """Runs at fractions of ee-req's saturated rate, every system per repeat in a rotated order;
    a stage system meets the issue's target when its median p99 is at most half of ee-req's."""
    p99s = {"ee-req": [40.0, 400.0, 44.0], "stage": [19.0, 25.0, 21.0], "stage-x": [30.0, 30.0, 10.0]}
    calls = []

    def run_once(system, rate, n, seed):
        calls.append((system, rate, n, seed))
        rep = (sum(1 for c in calls if c[0] == system) - 1) % 3  # the same runs at each rate
        return {"p99_ms": p99s[system][rep], "p50_ms": 1.0 + rep, "answered": n, "sent": n}

    cells = serve_load.near_saturation(
        ["ee-req", "stage", "stage-x"], run_once, 1000.0, [0.5, 0.95], 3, lambda rate: int(rate)
    )
    assert [c["rate"] for c in cells] == [500.0, 950.0] and [c["requests"] for c in cells] == [500, 950]
    # rotated: each repeat starts with the next system
    assert [c[0] for c in calls[:9]] == ["ee-req", "stage", "stage-x", "stage", "stage-x", "ee-req"] + [
        "stage-x",
        "ee-req",
        "stage",
    ]
    assert len({c[3] for c in calls}) == 6  # a seed per (rate, repeat), shared by the systems
    v = cells[0]["systems"]
    assert v["ee-req"]["p99_ms"] == 44.0 and v["ee-req"]["p99_runs"] == [40.0, 400.0, 44.0]
    assert v["stage"]["p99_x_ee_req"] == pytest.approx(21 / 44) and v["stage"]["meets_half_ee_req_p99"]
    assert v["stage-x"]["p99_x_ee_req"] == pytest.approx(30 / 44) and not v["stage-x"]["meets_half_ee_req_p99"]
    assert "meets_half_ee_req_p99" not in v["ee-req"] and v["stage"]["p50_ms"] == 2.0
    # run by run, each with ee-req's of the same repeat: 19/40, 25/400, 21/44; 30/40, 30/400, 10/44
    assert v["stage"]["paired_p99_x_ee_req"] == pytest.approx(19 / 40) and v["stage"]["runs_below_ee_req"] == 3
    assert v["stage-x"]["paired_p99_x_ee_req"] == pytest.approx(10 / 44) and v["stage-x"]["runs_below_ee_req"] == 3
    assert "paired_p99_x_ee_req" not in v["ee-req"]
    table = serve_load.near_saturation_table(cells)
    assert "| 0.50 | 500 | stage | 2.00 | 21.00 | 0.48 | 0.47, 3 of 3 | [19.0, 25.0, 21.0] |" in table
    assert "| 0.50 | 500 | ee-req | 2.00 | 44.00 | 1.00 | - | [40.0, 400.0, 44.0] |" in table
    assert table[-1] == (
        "Target: stage meets it at 0.50x; stage-x misses it at 0.50x; stage meets it at 0.95x; stage-x misses it at 0.95x."
    )
    # unanswered requests (infinite p99) give no ratio and miss the target
    cells = serve_load.near_saturation(
        ["ee-req", "stage"],
        lambda s, rate, n, seed: {"p99_ms": math.inf if s == "stage" else 5.0, "p50_ms": 1.0, "answered": 1, "sent": 2},
        100.0,
        [0.9],
        1,
        lambda rate: 10,
    )
    assert cells[0]["systems"]["stage"]["p99_x_ee_req"] is None
    assert not cells[0]["systems"]["stage"]["meets_half_ee_req_p99"]
    assert cells[0]["systems"]["stage"]["paired_p99_x_ee_req"] is None
    assert cells[0]["systems"]["stage"]["runs_below_ee_req"] == 0


def test_grid_p99_lines_compare_each_stage_system_with_ee_req_rate_by_rate():
    rows = [
        {"offered_rate": 100.0, "system": "ee-req", "p99_ms": 10.0},
        {"offered_rate": 100.0, "system": "stage", "p99_ms": 12.0},
        {"offered_rate": 100.0, "system": "plain", "p99_ms": 1.0},
        {"offered_rate": 200.0, "system": "ee-req", "p99_ms": math.inf},
        {"offered_rate": 200.0, "system": "stage", "p99_ms": 30.0},
    ]
    assert serve_load.grid_p99_lines({"rows": rows}) == [
        "stage's p99 over ee-req's at each rate of the grid: 100/s 1.20, 200/s -.",
        "",
    ]
    assert serve_load.grid_p99_lines({"rows": rows[:1]}) == []


def test_on_round_brackets_each_rounds_runs_and_its_record_reaches_the_probes():
    prober = FakeProber({"ee-req": 1000.0, "stage": 700.0})
    events, slos = [], iter(range(1, 100))

    def on_round(phase):
        events.append((phase, len(prober.calls)))
        return {"slo_ms": float(next(slos))} if phase == "end" else None

    res = serve_load.find_max_sustained(
        ["ee-req", "stage"],
        prober,
        judge,
        lo={"ee-req": 400.0, "stage": 400.0},
        hi={"ee-req": 5000.0, "stage": 5000.0},
        floor={"ee-req": 100.0, "stage": 100.0},
        repeats=2,
        on_round=on_round,
    )
    rounds = 1 + max(p["round"] for p in res["probes"])
    assert [e[0] for e in events] == ["start", "end"] * rounds
    # "start" before a round's runs, "end" after all of them
    for (_, at_start), (_, at_end) in zip(events[::2], events[1::2]):
        searching = (at_end - at_start) // 2
        assert searching in (1, 2) and at_end - at_start == 2 * searching
    # each probe carries its round's record
    assert all(p["slo_ms"] == p["round"] + 1 for p in res["probes"])


def test_quick_run_writes_the_search(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    systems = "plain,ee-req,stage"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "serve_load.py"),
        "--quick",
        "--systems",
        systems,
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("serve-quick-*.json")
    res = json.loads(js.read_text())["results"][0]
    assert set(res["max_sustained_rate"]) == set(systems.split(","))  # the grid's, kept
    search = res["search"]
    assert set(search["systems"]) == set(systems.split(",")) and search["tol"] == 0.3
    for s, v in search["systems"].items():
        mine = [p for p in search["probes"] if p["system"] == s]
        assert len(mine) == v["probes"] >= 1
        # the found rate is the highest sustained probe (0 when none), and inside its bracket
        assert v["found_rate"] == max([p["rate"] for p in mine if p["sustained"]], default=0.0)
        assert v["bracket"][0] == v["found_rate"] <= v["bracket"][1]
        # each probe judged against its round's SLO (10x plain batch-1 measured around the round)
        for p in mine:
            assert 0 < p["slo_ms"] < 20 * res["plain_batch1_ms"] * 10
            ok = p["answered"] == p["sent"] and isinstance(p["p99_ms"], float) and p["p99_ms"] <= p["slo_ms"]
            assert p["sustained"] == ok
    # and every grid cell against its own, measured next to it
    for r in res["rows"]:
        assert r["sustained"] == (r["answered"] == r["sent"] and r["p99_ms"] <= r["slo_ms"])
    lo, hi = res["slo_p99_ms_range"]
    assert lo == min(r["slo_ms"] for r in res["rows"]) and hi == max(r["slo_ms"] for r in res["rows"])
    assert "x_ee_req" in search["systems"]["stage"] and "meets_2x_plain" in search["systems"]["stage"]
    md = js.with_suffix(".md").read_text()
    assert "Highest sustained rate, by search" in md and "| stage |" in md
    assert "Highest sustained rate, by search" in proc.stdout
    # near (b)'s saturation: ee-req and the stage systems at 0.9x ee-req's saturated rate, once
    (near,) = res["near_saturation"]
    assert near["fraction"] == 0.9 and near["rate"] == pytest.approx(
        0.9 * res["saturated"]["ee-req"]["req_per_s"], abs=0.1
    )
    assert set(near["systems"]) == {"ee-req", "stage"} and len(near["systems"]["stage"]["p99_runs"]) == 1
    assert "Near (b)'s saturation" in md and "stage's p99 over ee-req's at each rate of the grid" in md
    # make gpu-check's serve step reads its summary from this JSON (the names it looks up exist)
    import gpu_check

    figures = gpu_check.serve_figures(json.loads(js.read_text()))
    x_sat = res["saturated"]["stage"]["ratio_to_ee_req"]
    x_slo = search["systems"]["stage"]["x_ee_req"]
    # (x_slo is None when ee-req sustained no rate at all, as a loaded machine's quick search may
    # find: the clause is then left out)
    at_slo = "" if x_slo is None else f", at the SLO {x_slo:.2f}x ee-req"
    assert figures.startswith(f"digits: stage saturated {x_sat:.2f}x ee-req{at_slo}")
    x_near = res["near_saturation"][0]["systems"]["stage"]["p99_x_ee_req"]
    assert f"p99 at 0.90x ee-req's saturation {gpu_check._ratio(x_near)} ee-req's" in figures
    worker = res["closed_loop_light_load"]["submit (worker thread)"]["minus_infer_ms"]
    assert figures.endswith(f"worker {worker:+.2f} ms over rt.infer")


def test_system_names_set_the_scheduler_knobs():
    """make_system: "stage-defer" takes --defer-ms (or its @ms), "stage-fill@4" its max_wait_ms;
    "stage" keeps the scheduler's default (20 ms on a CPU), "stage-nodefer" and policy fill defer
    nothing."""
    import torch

    import eeruntime as ee
    from eeruntime.zoo import digits_cnn

    model = digits_cnn().eval()
    rt = ee.EERuntime(model, thresholds=0.5, criterion="max_prob")
    want = {
        ("stage-defer", 20.0): (0.0, 20.0, "deepest"),
        ("stage-defer@7", 20.0): (0.0, 7.0, "deepest"),
        ("stage-fill@4", 9.0): (4.0, 0.0, "fill"),
        ("stage", 9.0): (0.0, 20.0, "deepest"),  # the scheduler's default on a CPU
        ("stage-nodefer", 9.0): (0.0, 0.0, "deepest"),
        ("stage-fill", 9.0): (1.0, 0.0, "fill"),
        ("stage-request", 9.0): (0.0, 0.0, "request"),  # (b) in the scheduler's machinery
        ("stage-behind3", 9.0): (0.0, 20.0, "deepest"),  # stage with a deeper backlog trigger
    }
    for (name, defer), (wait, max_defer, policy) in want.items():
        sched = serve_load.make_system(name, model, rt, 8, wait_ms=1.0, defer_ms=defer)
        try:
            assert (sched.max_wait_s * 1e3, sched.max_defer_s * 1e3, sched.policy) == (wait, max_defer, policy), name
            assert sched._behind_batches == (3 if name == "stage-behind3" else 1), name
            assert sched.infer(torch.randn(2, 1, 8, 8)).logits.shape == (2, 10)
        finally:
            sched.close()


def test_a_names_xn_suffix_sets_its_worker_threads_and_answers_stay_those_of_rt_infer():
    """ "ee-req-x2": request batching with two worker threads on one queue; "stage-x2": the
    scheduler with workers=2; no suffix: --workers. Every answer is still rt.infer's for its row."""
    import concurrent.futures

    import eeruntime as ee
    from eeruntime.zoo import digits_cnn

    assert serve_load.system_workers("ee-req-x2") == ("ee-req", 2)
    assert serve_load.system_workers("stage-defer-x3@7") == ("stage-defer@7", 3)
    assert serve_load.system_workers("stage-nodefer", 4) == ("stage-nodefer", 4)
    assert serve_load.system_workers("stage-x1", 2) == ("stage", 1)
    model = digits_cnn().eval()
    rt = ee.EERuntime(model, thresholds=[2.2, 2.25], criterion="entropy")
    x = torch.randn(96, 1, 8, 8)
    want = rt.infer(x).logits
    for name, workers in (("ee-req-x2", 2), ("stage-x2", 2), ("plain", 3), ("stage", 3), ("stage-request-x2", 2)):
        system = serve_load.make_system(name, model, rt, 8, workers=3)
        try:
            assert len(system._workers) == workers and len({w.ident for w in system._workers}) == workers
            with concurrent.futures.ThreadPoolExecutor(4) as pool:  # submitters racing the workers
                futures = list(pool.map(lambda i: system.submit_nowait(x[i : i + 1]), range(x.shape[0])))
            got = torch.cat(
                [f.result(30) if name == "plain" or name.startswith("ee-req") else f.result(30).logits for f in futures]
            )
            if name != "plain":
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        finally:
            system.close()
        assert not any(w.is_alive() for w in system._workers)


def test_full_batch_steps_run_every_row_through_the_stages_rt_infer_does_in_full_batches():
    """The re-batching bound's step walk: every stage sees exactly the rows rt.infer runs there
    (counted from its exit indices), in batches of max_batch but for the remainder at the end."""
    import torch

    import eeruntime as ee
    from eeruntime.zoo import digits_cnn

    torch.manual_seed(3)
    model = digits_cnn().eval()
    x = torch.randn(8 * 12, 1, 8, 8)
    with torch.no_grad():
        thr = serve_load.thresholds_for_fractions(model, x, [0.5, 0.3, 0.2], "entropy")
    rt = ee.EERuntime(model, thresholds=thr, criterion="entropy")
    xs = [x[i : i + 12] for i in range(0, x.shape[0], 12)]
    batches = serve_load.full_batch_steps(rt, xs, rt.thresholds_snapshot(), 12)
    exits = torch.cat([rt.infer(b).exit_index for b in xs])
    assert [sum(b) for b in batches] == [int((exits >= k).sum()) for k in range(3)]
    assert batches[0] == [12] * 8
    for b in batches[1:]:
        assert all(n <= 12 for n in b) and b.count(12) >= len(b) - 1, b  # one partial step: the remainder
    rb = serve_load.rebatch_bound(rt, model, x, 12, reps=1)
    assert set(rb["us_per_row"]) == {"infer", "full", "plain"} and rb["infer_over_full"] > 0
    assert rb["mean_batch_full"][0] == 12 and rb["mean_batch_infer"][0] == 12
    # rows per step at each deeper stage: full batches hold at least as many as one batch's survivors
    assert all(f >= i for f, i in zip(rb["mean_batch_full"][1:], rb["mean_batch_infer"][1:]))


_BLOB = bytes(16 << 10)


def _burn(us: float) -> None:
    """Spend ``us`` microseconds of this thread's CPU time, mostly hashing, which releases the GIL:
    a thread spinning in Python would cost the other thread CPU through the GIL (bench/gil_cost.py)
    and blur what each thread spends."""
    import hashlib
    import time

    end = time.thread_time() + us * 1e-6
    while time.thread_time() < end:
        hashlib.sha256(_BLOB).digest()


class _BurningSystem:
    """A serving system whose submit costs ``submit_us`` of the caller's CPU and whose worker
    thread spends ``worker_us`` of its own on each request."""

    def __init__(self, submit_us: float, worker_us: float, workers: int = 1):
        import queue
        import threading

        self.submit_us, self.worker_us = submit_us, worker_us
        self._q: queue.Queue = queue.Queue()
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        self._worker = self._workers[0]
        for w in self._workers:
            w.start()

    def _run(self):
        while True:
            f = self._q.get()
            if f is None:
                return
            _burn(self.worker_us)
            f.set_result(torch.zeros(1, 3))

    def submit_nowait(self, x):
        import concurrent.futures

        _burn(self.submit_us)
        f: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put(f)
        return f

    def close(self):
        for _ in self._workers:
            self._q.put(None)
        for w in self._workers:
            w.join()


@pytest.mark.skipif(not hasattr(__import__("time"), "pthread_getcpuclockid"), reason="needs per-thread CPU clocks")
def test_saturated_capacity_reports_each_threads_host_cpu_per_request():
    """The saturated run's host CPU per request, per thread, against systems that spend known CPU
    time in the submitting thread and in their worker (a few us of queue and future overhead on
    top, never less)."""
    costs = {"ee-req": (50.0, 300.0, 1), "stage": (250.0, 100.0, 1), "stage-x2": (50.0, 200.0, 2)}
    res = serve_load.saturated_capacity(
        list(costs), lambda name: _BurningSystem(*costs[name]), [torch.zeros(1, 3)] * 4, n=60, repeats=2
    )
    for name, (sub, work, _) in costs.items():  # (the worker CPU of every worker thread, summed)
        assert sub <= res[name]["submit_us"] < sub + 100, (name, res[name])
        assert work <= res[name]["worker_us"] < work + 100, (name, res[name])
    assert res["ee-req"]["ratio_to_ee_req"] == 1.0


def test_async_answers_bench_runs_both_paths_and_answers_every_request(tmp_path):
    """bench/serve_async_answers.py: both asyncio answer paths run on the same arrivals, every
    request is answered, and the report names each path per rate."""
    import serve_async_answers

    rc = serve_async_answers.main(
        ["--models", "digits", "--rates", "800,burst", "--requests", "60", "--repeats", "1", "--out", str(tmp_path)]
    )
    assert rc == 0
    (js,) = tmp_path.glob("serve-async-answers-*.json")
    doc = json.loads(js.read_text())
    (res,) = doc["results"]
    assert [c["rate"] for c in res["cells"]] == ["800", "burst"]
    for cell in res["cells"]:
        for path in serve_async_answers.PATHS:
            (run,) = cell["runs"][path]
            assert run["answered"] == 60 and run["throughput"] > 0 and run["p99_ms"] >= run["p50_ms"] > 0
            assert run["worker_us_per_request"] > 0 and run["loop_us_per_request"] > 0
    md = js.with_suffix(".md").read_text()
    assert md.count("| digits |") == 4 and "per-batch" in md and "per-request" in md
    with pytest.raises(SystemExit):
        serve_async_answers.main(["--rates", "fast"])


def test_http_front_bench_times_every_variant_and_restores_the_servers_encoder(tmp_path):
    """bench/serve_http_front.py: each variant of the app answers 200 for both body kinds (else it
    raises), every cell is timed, and the server module's encoder is today's again afterwards."""
    import serve_http_front

    from eeruntime.serve import codec, server

    assert serve_http_front.main(["--requests", "20", "--repeats", "1", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("serve-http-front-*.json")
    doc = json.loads(js.read_text())
    assert sorted(doc["us_per_request"]) == sorted(
        f"{v}/{b}" for v in serve_http_front.VARIANTS for b in serve_http_front.BODIES
    )
    assert all(v > 0 for v in doc["us_per_request"].values())
    assert server.encode_safetensors is codec.encode_safetensors
    assert "| safetensors |" in js.with_suffix(".md").read_text()


# --------------------------------------------------------------------------- bench/serve_machinery.py


def test_the_tiny_model_runs_on_the_cpu_and_leaves_at_every_exit():
    model, rt, pool = serve_load.build_runtime(serve_load.MODELS["tiny"])
    assert len(model.stages) == 3 and pool.shape[1:] == (16,)
    exits = rt.infer(pool[:128]).exit_index
    assert set(exits.tolist()) == {0, 1, 2}


def test_ee_req_full_answers_each_request_its_rows_of_rt_infer():
    """ee-req-full (request-level batching answering what the scheduler answers): each request
    gets its own row of rt.infer's logits, exit index and confidence, whatever batch it rode in."""
    model, rt, pool = serve_load.build_runtime(serve_load.MODELS["tiny"])
    want = rt.infer(pool[:50])
    system = serve_load.make_system("ee-req-full", model, rt, 8)
    try:
        got = [f.result(timeout=30) for f in [system.submit_nowait(pool[i : i + 1]) for i in range(50)]]
    finally:
        system.close()
    for i, res in enumerate(got):
        assert res.logits.shape == (1, want.logits.shape[1]) and res.exit_index.shape == res.confidence.shape == (1,)
        torch.testing.assert_close(res.logits, want.logits[i : i + 1], rtol=1e-5, atol=1e-6)
        assert res.exit_index.item() == want.exit_index[i].item()
        torch.testing.assert_close(res.confidence, want.confidence[i : i + 1], rtol=1e-5, atol=1e-6)


def test_parked_systems_admit_submits_without_answering_until_released():
    """serve_machinery's parking: with the worker parked, submits are admitted and none is
    answered (the worker spends no CPU); on leaving the block every one is answered, as rt.infer
    answers it, and the system is closed."""
    import time

    import serve_machinery

    model, rt, pool = serve_load.build_runtime(serve_load.MODELS["tiny"])
    xs = [pool[i : i + 1] for i in range(40)]
    want = rt.infer(pool[:40]).logits
    parks = {
        "stage": lambda: serve_machinery.parked_scheduler(serve_load.make_system("stage", model, rt, 8), xs[0]),
        "ee-req": lambda: serve_machinery.parked_batcher(rt, 8, xs[0]),
    }
    for name, park in parks.items():
        with park() as system:
            if name == "stage":
                assert system._after_inline == len(system._workers) == 1 and system._sleeping == 0
            clock = serve_load._worker_clock(system)
            w0 = serve_load._read_clock(clock)
            futures = [system.submit_nowait(x) for x in xs]
            time.sleep(0.05)
            assert not any(f.done() for f in futures), name
            assert serve_load._read_clock(clock) - w0 < 1e-3, name
        got = torch.cat([f.result(0) if name == "ee-req" else f.result(0).logits for f in futures])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not any(w.is_alive() for w in system._workers), name


def _run_machinery(tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "bench" / "serve_machinery.py"), "--quick", "--out", str(tmp_path), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("serve-machinery-*-quick.json")
    return json.loads(js.read_text()), js.with_suffix(".md").read_text()


def _check_machinery(doc, md, submit_systems, capacity_systems, models):
    assert doc["args"]["quick"] and doc["device"]["device"] in md
    sub = doc["submit"]
    assert sub["model"] == "tiny" and list(sub["systems"]) == submit_systems
    for s, v in sub["systems"].items():
        assert 0 < v["wall_us_min"] <= v["wall_us_median"] < 1000, s
        assert 0 < v["cpu_us_min"] <= v["cpu_us_median"] < 1000, s
        assert v["worker_cpu_us_median"] < 1.0, s  # parked: the worker ran nothing meanwhile
        assert len(v["runs_wall_us"]) == sub["repeats"] == 3
        assert f"| {s} | {v['wall_us_median']:.2f} |" in md
    assert sub["systems"]["ee-req"]["wall_us_x_ee_req"] == 1.0
    assert [r["model"] for r in doc["saturated"]] == models
    for res in doc["saturated"]:
        assert list(res["systems"]) == capacity_systems
        for s, v in res["systems"].items():
            assert v["req_per_s"] > 0 and v["ratio_to_ee_req"] > 0 and len(v["runs"]) == 1, (res["model"], s)
            assert v["submit_us"] > 0 and v["worker_us"] > 0, (res["model"], s)
            assert f"| {res['model']} | {s} | {v['req_per_s']:.0f} |" in md
    assert "Isolated submit cost" in md and "Saturated bursts" in md and "Arguments:" in md


def test_machinery_quick_run_writes_every_system(tmp_path):
    doc, md = _run_machinery(tmp_path)
    assert doc["before_revision"] is None
    _check_machinery(
        doc, md, ["ee-req", "stage"], ["ee-req", "ee-req-full", "stage", "stage-nodefer"], ["tiny", "digits"]
    )


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout (git show of a revision)")
def test_machinery_before_head_runs_the_earlier_class_beside_todays(tmp_path):
    doc, md = _run_machinery(tmp_path, "--before", "HEAD", "--models", "tiny")
    assert doc["before_revision"] == "HEAD" and "StageScheduler of HEAD" in md
    _check_machinery(
        doc,
        md,
        ["ee-req", "stage", "stage@before"],
        ["ee-req", "ee-req-full", "stage", "stage-nodefer", "stage@before", "stage-nodefer@before"],
        ["tiny"],
    )


def test_stage_behind_n_is_accepted_by_name_and_other_names_are_refused(capsys):
    """--systems takes stage-behindN for any N >= 1 (the scheduler with a deeper backlog trigger),
    and refuses a name that is neither a system nor of that form, saying what is accepted."""
    args = serve_load.parse_args(["--systems", "ee-req,stage-behind3,stage-behind12-x2"])
    assert args.systems == ["ee-req", "stage-behind3", "stage-behind12-x2"]
    for bad in ("stage-behind0", "stage-behindx", "stage-ahead3"):
        with pytest.raises(SystemExit):
            serve_load.parse_args(["--systems", f"ee-req,{bad}"])
        assert "unknown systems" in capsys.readouterr().err

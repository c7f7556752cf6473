"""Runtime suite (CPU and, when present, CUDA eager): a 4-stage conv net with 4 exits at batch 16,
64 and 256 (thresholds set once, on a 256-sample batch, for the target fractions).

Three variants side by side: the plain backbone (every stage, final head), EERuntime, and the
oracle (eeruntime.oracle: each stage on exactly the rows that reach it, no decisions or packs).
Reports measured speed-up (plain / runtime), FLOPs-ideal speed-up (cost model) and efficiency
(oracle / runtime). Target: efficiency >= 0.97 with exits and with none.
"""

import json

import pytest
import torch
from common import benchmark_record, synced, thresholds_for_fractions

import eeruntime as ee
from eeruntime.oracle import oracle_forward, plain_forward, plan_oracle
from eeruntime.timing import side_by_side
from eeruntime.zoo import conv_net

SCENARIOS = {"exits": [0.5, 0.2, 0.15, 0.15], "none": [0.0, 0.0, 0.0, 1.0]}
BATCH = 256
BATCHES = [16, 64, 256]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def setup_cache():
    return {}


def _setup(cache, device, scenario, batch=BATCH):
    key = (device, scenario, batch)
    if key not in cache:
        torch.manual_seed(0)
        model = conv_net(num_exits=4, in_channels=3, width=16).to(device).eval()
        x = torch.randn(BATCH, 3, 32, 32, device=device)
        thr = thresholds_for_fractions(model, x, SCENARIOS[scenario], "entropy")
        x = x[:batch].contiguous()
        rt = ee.EERuntime(model, thresholds=thr, criterion="entropy", graphs=False)
        res = rt.infer(x)
        plan = plan_oracle(x, res.exit_index, 4)
        cache[key] = (model, x, rt, plan, res)
    return cache[key]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("batch", BATCHES)
def test_runtime_vs_plain_vs_oracle(benchmark, setup_cache, device, scenario, batch):
    model, x, rt, plan, res = _setup(setup_cache, device, scenario, batch)
    fractions = (torch.bincount(res.exit_index.cpu(), minlength=4).float() / batch).tolist()
    with torch.inference_mode():
        # Interleaved rounds in changing orders, so drift in machine load hits all three alike.
        t = side_by_side(
            {
                "plain": lambda: plain_forward(model, x),
                "runtime": lambda: rt(x),
                "oracle": lambda: oracle_forward(model, plan),
            },
            device,
            rounds=60,
        )
    tp, tr, to = t.median("plain"), t.median("runtime"), t.median("oracle")
    cost = ee.measure_costs(model, x[:1])
    summary = {
        "scenario": scenario,
        "batch": batch,
        "dtype": "float32",
        "exit_fractions": fractions,
        "plain_ms": tp * 1e3,
        "runtime_ms": tr * 1e3,
        "oracle_ms": to * 1e3,
        "speedup_measured": t.ratio("plain", "runtime"),
        "speedup_ideal": cost.ideal_speedup(fractions),
        "speedup_oracle": t.ratio("plain", "oracle"),
        "efficiency": t.ratio("oracle", "runtime"),
    }
    benchmark_record(benchmark, **summary)
    print("\n" + json.dumps(summary, indent=1))
    benchmark.pedantic(synced(lambda: rt(x), device), rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["plain", "oracle"])
def test_baselines(benchmark, setup_cache, device, variant):
    model, x, rt, plan, res = _setup(setup_cache, device, "exits")
    benchmark_record(benchmark, variant=variant, batch=BATCH)
    with torch.inference_mode():
        fn = (lambda: plain_forward(model, x)) if variant == "plain" else (lambda: oracle_forward(model, plan))
        benchmark.pedantic(synced(fn, device), rounds=10, warmup_rounds=1)

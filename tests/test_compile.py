"""torch.compile paths: EERuntime(compile=True) compiles each stage and head once with a dynamic
batch and gives the eager runtime's results; torch.compile(rt.infer) is refused with a message
that points to compile=True. A counting backend (no code generation) keeps most tests fast; one
test runs the default inductor backend on a tiny model."""

import pytest
import torch
from models import TupleExit, TupleStage, mlp_model
from torch import nn

import eeruntime as ee
from eeruntime.compiled import INFER_NOT_TRACEABLE
from eeruntime.heads import PoolLinearHead


class CountingBackend:
    """A torch.compile backend that records each graph it is given and runs it as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def conv_model():
    torch.manual_seed(0)
    stages = [
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()),
    ]
    exits = [PoolLinearHead(4, 5, confidence=True), PoolLinearHead(4, 5, confidence=True), PoolLinearHead(8, 5)]
    return ee.MultiExitModel(stages, exits).eval()


def assert_same_result(a, b):
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.confidence, b.confidence, rtol=1e-4, atol=1e-4)


def test_compile_true_with_inductor_matches_eager():
    model = mlp_model(K=3, C=4, seed=1)
    eager = ee.EERuntime(model, thresholds=[0.6, 0.8], criterion="entropy")
    rt = ee.EERuntime(model, thresholds=[0.6, 0.8], criterion="entropy", compile=True)
    seen = set()
    for B in (23, 7):
        x = torch.randn(B, 6, generator=torch.Generator().manual_seed(B))
        res = rt.infer(x)
        assert_same_result(res, eager.infer(x))
        seen.update(res.exit_index.tolist())
    assert len(seen) >= 2  # rows left early: the later stages ran compiled on packed batches
    assert rt.stats.samples == 30 and sum(rt.stats.exit_counts) == 30


def test_each_part_compiled_once_across_batch_sizes():
    """A new batch size (including survivors' counts of 1 and 0) never recompiles a part."""
    torch.manual_seed(4)
    widths = [6, 16, 16, 24]
    stages = [nn.Sequential(nn.Linear(a, b), nn.LayerNorm(b), nn.GELU()) for a, b in zip(widths, widths[1:])]
    model = ee.MultiExitModel(stages, [nn.Linear(b, 4) for b in widths[1:]]).eval()
    backend = CountingBackend()
    rt = ee.EERuntime(model, thresholds=[0.45, 0.5], criterion="max_prob", compile={"backend": backend})
    eager = ee.EERuntime(model, thresholds=[0.45, 0.5], criterion="max_prob")
    counts, exits = [], set()
    for B in (40, 9, 33, 5, 64, 2, 1, 0):
        x = torch.randn(B, 6, generator=torch.Generator().manual_seed(B)) * 3
        res = rt.infer(x)
        assert_same_result(res, eager.infer(x))
        counts.append(backend.graphs)
        exits.update(res.exit_index.tolist())
    assert exits == {0, 1, 2}
    assert 0 < counts[0] <= 6 and set(counts) == {counts[0]}


def test_confidence_heads_compiled_match_eager():
    """Compiled ExitHeads; a confidence criterion still reads their confidence heads."""
    model = conv_model()
    crit = ee.train.confidence_criterion(model)
    rt = ee.EERuntime(model, thresholds=0.5, criterion=crit, compile={"backend": CountingBackend()})
    eager = ee.EERuntime(model, thresholds=0.5, criterion=crit)
    for B in (16, 5):
        x = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(B))
        assert_same_result(rt.infer(x), eager.infer(x))


def test_tuple_states_compile_and_model_untouched():
    d, K = 8, 3
    torch.manual_seed(2)
    model = ee.MultiExitModel([TupleStage(d) for _ in range(K)], [TupleExit(d, 3) for _ in range(K)]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = torch.randn(20, 5, d)
    mask = (torch.arange(5)[None] < torch.randint(1, 6, (20, 1))).float()
    h0, m0 = h.clone(), mask.clone()
    backend = CountingBackend()
    rt = ee.EERuntime(model, thresholds=0.5, criterion="max_prob", compile={"backend": backend})
    assert_same_result(rt.infer((h, mask)), ee.EERuntime(model, thresholds=0.5, criterion="max_prob").infer((h, mask)))
    assert torch.equal(h, h0) and torch.equal(mask, m0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.stages[0], TupleStage)  # the model holds its own modules, not compiled wrappers


def test_replaced_stage_is_recompiled():
    model = mlp_model(K=2, C=3)
    backend = CountingBackend()
    rt = ee.EERuntime(model, thresholds=0.5, criterion="max_prob", compile={"backend": backend})
    x = torch.randn(8, 6)
    rt.infer(x)
    model.exits[1] = nn.Sequential(nn.Linear(12, 3), nn.Tanh())
    res = rt.infer(x)
    with torch.no_grad():
        ref = ee.EERuntime(model, thresholds=0.5, criterion="max_prob").infer(x)
    assert_same_result(res, ref)


def test_compiling_infer_is_refused_with_a_pointer_to_compile_true():
    model = mlp_model(K=2, C=3)
    rt = ee.EERuntime(model, thresholds=0.5)
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="compile=True") as info:
        torch.compile(rt.infer, backend="eager")(x)
    assert str(info.value) == INFER_NOT_TRACEABLE
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="compile=True"):
        torch.compile(rt, backend="eager")(x)
    assert rt.stats.calls == 0  # the refused calls left no stats behind
    rt.infer(x)  # eager calls are unaffected
    assert rt.stats.calls == 1


FULLGRAPH_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import eeruntime as ee
from models import mlp_model
rt = ee.EERuntime(mlp_model(K=2, C=3), thresholds=0.5)
try:
    torch.compile(rt.infer, backend="eager", fullgraph=True)(torch.randn(4, 6))
except RuntimeError as e:
    print(str(e))
"""


def test_fullgraph_compile_of_infer_is_refused_too():
    """With fullgraph=True dynamo's own error quotes the reason. In a subprocess: that failure
    leaves this torch's frame evaluation holding one more reference to later frames' locals,
    which would turn the in-place pack's ownership proof off for the rest of the test session."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", FULLGRAPH_SCRIPT.format(tests=tests)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert INFER_NOT_TRACEABLE in out.stdout


def test_compile_argument_errors():
    model = mlp_model(K=2, C=3)
    with pytest.raises(TypeError, match="compile must be"):
        ee.EERuntime(model, compile="yes")
    with pytest.raises(ValueError, match="graphs=True"):
        ee.EERuntime(model, compile=True, graphs=True)
    with pytest.raises(ValueError, match="dynamic"):
        ee.EERuntime(model, compile={"dynamic": False})

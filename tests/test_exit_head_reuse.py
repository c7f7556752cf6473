"""ExitHead's feature reuse between an exit's logits and its learned criterion: never stale, never
kept between calls, and no obstacle to torch.compile of the default heads."""

import pytest
import torch
from torch import nn

import eeruntime as ee
from eeruntime.heads import ConvHead, PoolLinearHead

CH, C = 3, 5


def conv_model(seed=0):
    torch.manual_seed(seed)
    stages = [
        nn.Identity(),
        nn.Sequential(nn.Conv2d(CH, CH, 3, padding=1), nn.Tanh()),
        nn.Sequential(nn.Conv2d(CH, CH, 3, padding=1), nn.Tanh()),
    ]
    exits = [ConvHead(CH, C, confidence=True), PoolLinearHead(CH, C, confidence=True, gate=True), PoolLinearHead(CH, C)]
    model = ee.MultiExitModel(stages, exits).eval()
    with torch.no_grad():  # confidences spread over (0, 1), so a threshold splits the batch
        for h in exits[:2]:
            h.confidence_head.weight.mul_(8)
    return model


def batch(seed, B=48):
    return torch.randn(B, CH, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("criterion", ["confidence", "gate"])
@pytest.mark.parametrize("buffer_kind", ["inference", "normal"])
def test_a_reused_input_buffer_never_gets_the_previous_batchs_scores(criterion, buffer_kind):
    """Stage 0 is the identity, so exit 0 reads the caller's buffer itself; the buffer is refilled
    in place between calls (an inference tensor has no version counter to show it changed)."""
    model = conv_model()
    if criterion == "gate":
        model.exits[0].add_gate()
        with torch.no_grad():
            model.exits[0].gate_head.weight.mul_(8)
        crit = ee.train.gate_criterion(model)
    else:
        crit = ee.train.confidence_criterion(model)
    first, second = batch(1), batch(2)
    with torch.no_grad():  # a threshold that splits the second batch at exit 0
        s = crit(model.exits[0](second), second, 0).sort().values
        thr = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    rt = ee.EERuntime(model, thresholds=thr, criterion=crit)
    if buffer_kind == "inference":
        with torch.inference_mode():
            buf = first.clone()
    else:
        buf = first.clone()
    a = rt.infer(buf)
    with torch.inference_mode():
        buf.copy_(second)
    b = rt.infer(buf)
    want = ee.EERuntime(model, thresholds=thr, criterion=crit).infer(second.clone())
    assert torch.equal(b.exit_index, want.exit_index) and torch.equal(b.confidence, want.confidence)
    assert torch.equal(b.logits, want.logits)
    assert not torch.equal(a.confidence, b.confidence)
    assert 0 < int((b.exit_index == 0).sum()) < len(second)  # the learned criterion decided something


def test_the_criterion_runs_each_exit_body_once():
    model = conv_model()
    calls = []
    model.exits[0].body.register_forward_hook(lambda *a: calls.append(1))
    rt = ee.EERuntime(model, thresholds=0.5, criterion=ee.train.confidence_criterion(model))
    rt.infer(batch(3))
    assert len(calls) == 1


def test_no_batch_is_kept_by_a_head_after_a_call():
    model = conv_model()
    x = batch(4)
    ee.EERuntime(model, thresholds=0.5, criterion=ee.train.confidence_criterion(model)).infer(x)

    def tensors_in(v):
        if isinstance(v, (tuple, list)):
            return any(tensors_in(u) for u in v)
        return isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)

    for head in model.exits:
        assert not any(tensors_in(v) for v in vars(head).values())


@pytest.mark.parametrize("head", ["conv", "pool"])
def test_default_heads_compile_in_inference_mode(head):
    """torch.compile (dynamo, whole graph) of a default exit head on an inference tensor."""
    h = (ConvHead(CH, C, confidence=True) if head == "conv" else PoolLinearHead(CH, C, gate=True)).eval()
    compiled = torch.compile(h, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        x = batch(5, B=8)
        got = compiled(x)
        want = h(x)
        assert torch.allclose(got, want, atol=1e-6)
        # the compiled head's logits carry no features: the criterion recomputes them, correctly
        unit = h.confidence if head == "conv" else h.gate
        assert torch.allclose(unit(x, logits=got), unit(x, logits=want), atol=1e-6)
        x.mul_(-1)  # the same buffer, new values: the compiled head follows
        assert torch.allclose(compiled(x), h(x), atol=1e-6)

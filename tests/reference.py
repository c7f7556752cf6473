"""Independent oracles for the tests: a float64 confidence score and the per-sample loop of
docs/design.md (one sample at a time, stop at the first exit whose criterion holds)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def score64(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Float64 score per row from the definitions (independent of the runtime's reference)."""
    x = logits.double()
    C = x.shape[1]
    rows = []
    for r in x:
        if torch.isnan(r).any() or torch.isposinf(r).any() or torch.isneginf(r).all():
            rows.append(float("nan"))
            continue
        p = torch.exp(r - r.max())
        p = p / p.sum()
        h = float(-(p[p > 0] * torch.log(p[p > 0])).sum())
        ps = torch.sort(p, descending=True).values
        if criterion == "entropy":
            rows.append(h)
        elif criterion == "max_prob":
            rows.append(float(ps[0]))
        elif criterion == "margin":
            rows.append(float(ps[0] - (ps[1] if C > 1 else 0.0)))
        elif criterion == "norm_entropy":
            rows.append(1.0 if C == 1 else 1.0 - h / math.log(C))
        else:
            raise ValueError(criterion)
    return torch.tensor(rows, dtype=torch.float64)


def exits64(score: float, threshold: float, criterion) -> bool:
    if math.isnan(score):
        return False
    return score < threshold if criterion == "entropy" else score >= threshold


def _call(m, s):
    return m(*s) if isinstance(s, tuple) else m(s)


@torch.no_grad()
def per_sample_loop(model, x, thresholds, criterion="entropy", final="last"):
    """Per-sample reference: returns (logits [B, C] float64, exit_index [B], margins [B]) where
    ``margins`` is |score - threshold| at the deciding exits (small values are near-ties)."""
    model.eval()
    parts = x if isinstance(x, tuple) else (x,)
    B = parts[0].shape[0]
    K = len(model.stages)
    outs, exits, near = [], [], []
    for i in range(B):
        state = tuple(p[i : i + 1] for p in parts) if isinstance(x, tuple) else x[i : i + 1]
        seen = []
        closest = float("inf")
        for k in range(K):
            state = _call(model.stages[k], state)
            if isinstance(state, list):
                state = tuple(state)
            logits = _call(model.exits[k], state)
            seen.append(logits.double())
            if k == K - 1:
                out = torch.stack(seen).mean(0) if final == "average" else logits.double()
                outs.append(out[0])
                exits.append(k)
                near.append(closest)
                break
            if callable(criterion):
                s = float(criterion(logits, state)[0])
                done = not math.isnan(s) and s >= thresholds[k]
            else:
                s = float(score64(logits, criterion)[0])
                done = exits64(s, thresholds[k], criterion)
            if not math.isnan(s):
                closest = min(closest, abs(s - thresholds[k]))
            if done:
                outs.append(logits.double()[0])
                exits.append(k)
                near.append(closest)
                break
    C = outs[0].shape[0] if outs else None
    logits = torch.stack(outs) if outs else torch.empty(0, C or 0, dtype=torch.float64)
    return logits, torch.tensor(exits, dtype=torch.int64), torch.tensor(near, dtype=torch.float64)


# -------------------------------------------------------------- fast exit-decision backends' oracle
# 16-bit logits are exact in fp32 and the oracle scores those same rounded values, so the
# tolerances bound a backend's fp32 arithmetic (fast exp/log included). 16-bit rows get a little
# more room: their coarse grid yields larger logit gaps, hence larger terms e^d d in T.
DECISION_ATOL = {torch.float32: 1e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-5}


def decision_tol(dtype, C: int, criterion: str) -> float:
    # Entropy grows like log C and its rounding error with it; the other scores lie in [0, 1].
    return DECISION_ATOL[dtype] * (max(1.0, math.log(C)) if criterion == "entropy" else 1.0)


def decision_logits(B: int, C: int, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    """Random rows of mixed confidence, with masked (-inf) classes and a tied maximum."""
    x = torch.randn(B, C) * torch.linspace(0.3, scale, B)[:, None]
    if B > 1 and C > 3:
        x[1, torch.randperm(C)[: C // 2]] = float("-inf")  # masked classes
    if B > 2 and C > 1:
        x[2, :2] = x[2].max() + 1.0  # two equal maxima: margin 0, argmax the first
    return x.to(dtype)


def check_decision(x, criterion, thr, conf, mask, argmax=None, ref=None):
    """A backend's conf, mask (and argmax) against the float64 oracle on the same rounded values;
    flags must agree except for rows within the tolerance of the threshold."""
    if ref is None:
        ref = score64(x.cpu(), criterion)
    conf, mask = conf.cpu(), mask.cpu()
    assert conf.dtype == torch.float32 and mask.dtype == torch.bool and conf.shape == mask.shape == (x.shape[0],)
    assert torch.equal(torch.isnan(conf), torch.isnan(ref)), (conf, ref)
    t = decision_tol(x.dtype, x.shape[1], criterion)
    torch.testing.assert_close(conf.double(), ref, atol=t, rtol=0, equal_nan=True)
    if criterion == "entropy":
        assert not (conf < 0).any()  # H >= 0 exactly; rounding below 0 must be clamped
    for i in range(x.shape[0]):
        s = float(ref[i])
        if math.isnan(s) or abs(s - thr) > t:  # a near-tie may fall either way
            assert bool(mask[i]) == exits64(s, thr, criterion), (i, s, thr)
    if argmax is not None:
        assert argmax.dtype == torch.int64
        assert torch.equal(argmax.cpu(), x.cpu().argmax(dim=1))

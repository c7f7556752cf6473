"""Independent oracles for the tests: a float64 confidence score and the per-sample loop of
DESIGN.md (one sample at a time, stop at the first exit whose criterion holds)."""
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
                outs.append(out[0]); exits.append(k); near.append(closest)
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
                outs.append(logits.double()[0]); exits.append(k); near.append(closest)
                break
    C = outs[0].shape[0] if outs else None
    logits = torch.stack(outs) if outs else torch.empty(0, C or 0, dtype=torch.float64)
    return logits, torch.tensor(exits, dtype=torch.int64), torch.tensor(near, dtype=torch.float64)

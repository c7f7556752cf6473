"""EENet per-exit scorers (``003_581877c910efdcfa.txt``) and their training on a calibration cache.

Exit k's scorer is a small MLP on

    [top-m softmax probabilities of exit k, normalised entropy 1 + sum p log p / log C,
     vote_k = fraction of exits 0..k whose argmax equals exit k's, sigmoid(u_j) for j < k]

with two outputs: the exit *utility* logit u_k (sigmoid(u_k) = q_hat_k, the predicted chance that
exit k is right) and the *assignment* logit h_k. The assignment scores are a stick-breaking
distribution over exits, r_hat_k = a_k prod_{j<k} (1 - a_j) with a_k = sigmoid(h_k) and
a_{K-1} = 1, so they sum to one. Training minimises (EENet's three losses)

    L_g      = 1/K sum_k sum_n w_nk BCE(q_hat_nk, q_nk),   w_nk proportional to 1 - sum_{j<k} r_hat_nj
    L_CE     = -1/(NK) sum_n sum_k r_nk log r_hat_nk,       r the paper's target assignment
    L_budget = |B - 1/N sum_n sum_k r_hat_nk c_k| / B

with q_nk = 1 when exit k predicts sample n correctly and c_k the relative cost of leaving at k.
As a runtime criterion (:class:`EENetScorer` is a per-exit scorer, see ``eeruntime.criteria``) the
score of exit k is u_k and a sample leaves when u_k >= T_k. The scorer computes in float64 and
returns float32, so its scores do not depend on how rows are batched: the runtime sees the same
values as the calibration that chose the thresholds.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .criteria import register_criterion

DEFAULT_TOP_K = 3


def exit_features(logits: torch.Tensor, top_k: int = DEFAULT_TOP_K) -> torch.Tensor:
    """Float64 [B, top_k + 1]: the top ``top_k`` softmax probabilities (zero-padded when there
    are fewer classes) and the normalised entropy 1 + sum p log p / log C (1 when C = 1)."""
    p = torch.softmax(logits.double(), dim=1)
    B, C = p.shape
    m = min(top_k, C)
    top = p.topk(m, dim=1).values if B > 0 else p.new_zeros((0, m))
    if m < top_k:
        top = torch.cat([top, p.new_zeros((B, top_k - m))], dim=1)
    if C == 1:
        ne = torch.where(torch.isnan(p[:, 0]), p[:, 0], torch.ones_like(p[:, 0]))
    else:
        ne = 1.0 + torch.special.xlogy(p, p).sum(dim=1) / math.log(C)
    return torch.cat([top, ne[:, None]], dim=1)


@register_criterion("eenet", legacy_path="eeruntime.scorers.EENetScorer")
class EENetScorer(nn.Module):
    """Per-exit EENet scorers for a model with ``num_exits`` exits (a runtime criterion).

    Called by :class:`eeruntime.EERuntime` as ``scorer(logits, state, k, history)`` with
    ``history`` the earlier exits' logits of the same rows; returns the float32 utility logit u_k.
    """

    per_exit = True
    uses_history = True

    def __init__(self, num_exits: int, top_k: int = DEFAULT_TOP_K, hidden: int = 16):
        super().__init__()
        if num_exits < 2:
            raise ValueError(f"EENetScorer needs at least two exits, got {num_exits}")
        self.num_exits, self.top_k, self.hidden = int(num_exits), int(top_k), int(hidden)
        base = self.top_k + 2  # top probs, normalised entropy, vote
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(base + k, hidden), nn.ReLU(), nn.Linear(hidden, 2)) for k in range(num_exits)
        )
        self.double()

    # ------------------------------------------------------------------ config, for save/load
    def to_config(self) -> dict:
        return {"num_exits": self.num_exits, "top_k": self.top_k, "hidden": self.hidden}

    @classmethod
    def from_config(cls, config: dict) -> EENetScorer:
        return cls(int(config["num_exits"]), int(config["top_k"]), int(config["hidden"]))

    # ------------------------------------------------------------------ scoring
    def chain(self, base: torch.Tensor, preds: torch.Tensor, upto: int):
        """Utility and assignment logits of exits 0..upto: float64 [B, upto+1] each.

        ``base`` float64 [B, >= upto+1, top_k+1] from :func:`exit_features`; ``preds`` int64
        [B, >= upto+1] the argmax of each exit's logits.
        """
        us, hs = [], []
        for k in range(upto + 1):
            vote = (preds[:, : k + 1] == preds[:, k : k + 1]).double().mean(dim=1, keepdim=True)
            parts = [base[:, k], vote] + [torch.sigmoid(u)[:, None] for u in us]
            out = self.heads[k](torch.cat(parts, dim=1))
            us.append(out[:, 0])
            hs.append(out[:, 1])
        return torch.stack(us, dim=1), torch.stack(hs, dim=1)

    def forward(self, logits: torch.Tensor, state=None, k: int = 0, history: Sequence[torch.Tensor] = ()):
        if not 0 <= k < self.num_exits:
            raise ValueError(f"exit index {k} out of range for a scorer of {self.num_exits} exits")
        if len(history) != k:
            raise ValueError(
                f"the EENet scorer of exit {k} needs the logits of the {k} earlier exits (history), got "
                f"{len(history)}; use it through EERuntime, which carries them (uses_history = True)"
            )
        dev = self.heads[0][0].weight.device
        if logits.device != dev:
            raise ValueError(f"logits are on {logits.device} but the scorer is on {dev}; move it with scorer.to(...)")
        seen = [*history, logits]
        base = torch.stack([exit_features(x, self.top_k) for x in seen], dim=1)
        preds = (
            torch.stack([x.argmax(dim=1) for x in seen], dim=1)
            if logits.shape[0]
            else logits.new_zeros((0, k + 1), dtype=torch.int64)
        )
        u, _ = self.chain(base, preds, k)
        return u[:, k].float()

    @torch.no_grad()
    def scores(self, features: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """Float32 [N, K] utility logits from cached features and predictions, the same values
        the runtime computes for these rows."""
        dev = self.heads[0][0].weight.device
        base = torch.as_tensor(features, dtype=torch.float64, device=dev)
        u, _ = self.chain(base, torch.as_tensor(preds, dtype=torch.int64, device=dev), self.num_exits - 1)
        return u.float().cpu().numpy()


def assignment_targets(correct: torch.Tensor) -> torch.Tensor:
    """EENet's r: 1 / (number of correct exits) at each correct exit; 1/K everywhere when none is."""
    q = correct.double()
    n_right = q.sum(dim=1, keepdim=True)
    K = q.shape[1]
    return torch.where(n_right > 0, q / n_right.clamp(min=1), torch.full_like(q, 1.0 / K))


def eenet_losses(u: torch.Tensor, h: torch.Tensor, correct: torch.Tensor, costs: torch.Tensor, budget: float):
    """(L_g, L_CE, L_budget) of the module docstring; ``costs`` relative cost of leaving at k."""
    N, K = u.shape
    q = correct.double()
    a = torch.sigmoid(h[:, : K - 1])
    # stick-breaking: survive_k = prod_{j<k} (1 - a_j) is the mass not yet assigned before exit k
    survive = torch.cat([torch.ones_like(u[:, :1]), torch.cumprod(1 - a, dim=1)], dim=1)
    r_hat = survive * torch.cat([a, torch.ones_like(u[:, :1])], dim=1)
    # w weights the correctness loss towards samples still expected at exit k; detached so the
    # assignment is shaped by its own two losses rather than by making BCE terms vanish.
    w = survive.detach() / survive.detach().sum(dim=0, keepdim=True).clamp(min=1e-12)
    bce = nn.functional.binary_cross_entropy_with_logits(u, q, reduction="none")
    l_g = (w * bce).sum() / K
    l_ce = -(assignment_targets(correct) * torch.log(r_hat.clamp(min=1e-12))).sum() / (N * K)
    l_budget = (budget - (r_hat * costs).sum(dim=1).mean()).abs() / budget
    return l_g, l_ce, l_budget


def train_eenet_scorer(
    features: np.ndarray,
    preds: np.ndarray,
    correct: np.ndarray,
    costs: Sequence[float],
    budget: float,
    *,
    top_k: int = DEFAULT_TOP_K,
    hidden: int = 16,
    epochs: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    history: Optional[List[dict]] = None,
) -> EENetScorer:
    """Train an :class:`EENetScorer` full-batch with Adam on cached per-exit features.

    ``features`` float64 [N, K, top_k+1], ``preds`` int64 [N, K], ``correct`` bool [N, K];
    ``costs`` [K] relative cost of leaving at each exit and ``budget`` the relative average cost.
    Rows with non-finite features (NaN logits) are left out. The global RNG is not touched.
    ``history``, when a list, receives the final losses.
    """
    from .progress import bar as progress_bar

    feats = torch.as_tensor(features, dtype=torch.float64)
    N, K, F = feats.shape
    if F != top_k + 1:
        raise ValueError(f"features have {F} columns per exit, expected top_k + 1 = {top_k + 1}")
    ok = torch.isfinite(feats).all(dim=2).all(dim=1)
    if not bool(ok.any()):
        raise ValueError("no calibration row has finite scores at every exit; cannot train EENet scorers")
    feats = feats[ok]
    pr = torch.as_tensor(preds, dtype=torch.int64)[ok]
    cor = torch.as_tensor(correct, dtype=torch.bool)[ok]
    c = torch.as_tensor(list(costs), dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scorer = EENetScorer(K, top_k=top_k, hidden=hidden)
    opt = torch.optim.Adam(scorer.parameters(), lr=lr)
    bar = progress_bar(range(epochs), desc="EENet scorers", enabled=progress)
    losses = (None, None, None)
    threads = torch.get_num_threads()
    # The scorers are a few hundred weights: extra threads only add synchronisation, which on a
    # busy machine costs 10-40x; one thread is the fast setting here.
    torch.set_num_threads(1)
    try:
        for _ in bar:
            u, h = scorer.chain(feats, pr, K - 1)
            losses = eenet_losses(u, h, cor, c, budget)
            loss = sum(losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress:
                bar.set_postfix(loss=float(loss.detach()), refresh=False)
    finally:
        torch.set_num_threads(threads)
    scorer.eval()
    for p in scorer.parameters():
        p.requires_grad_(False)
    if history is not None:
        history.append({name: float(v.detach()) for name, v in zip(("l_g", "l_ce", "l_budget"), losses)})
    return scorer

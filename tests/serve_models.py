"""Models for the serving tests.

``scripted_model``: rows are ``[id, exit_at, payload]``; every stage passes them through (a copy)
after calling a hook with the stage index and the ids it sees (to record, block or raise), and
exit k gives row i confident one-hot logits (class ``id % C``) when ``exit_at == k``, flat logits
otherwise. Which row leaves where, and which rows share a batch, are thus known exactly.
"""

import contextlib
import socket
import threading
import time

import torch
from torch import nn

import eeruntime as ee
from eeruntime.ops import confidence_ref

C = 7


@contextlib.contextmanager
def parked(sched, wait=30.0):
    """Hold a StageScheduler's workers (as an inline caller does, see StageScheduler._step), so
    every request submitted meanwhile is queued before the first batch is gathered."""
    with sched._cv:
        sched._inline = True
        sched._cv.notify_all()
    end = time.monotonic() + wait
    while sched._after_inline != sched.workers:
        assert time.monotonic() < end, "the worker did not park"
        time.sleep(0.001)
    try:
        yield
    finally:
        with sched._cv:
            sched._inline = False
            sched._cv.notify_all()


def check_padded_serving_and_bundle(model, rt, x, requests, thr, factory, path):
    """The scheduler's ``pad_to`` (``requests``, the rows of the text batch ``x`` cut to their
    real lengths, right-padded to 8 or 16 tokens in shared batches) answers each as ``rt.infer``
    answers it alone, with a mix of exits (a differing exit only within float noise of ``thr``,
    by the per-sample loop's margins); a bundle of ``rt`` saved with its weights and loaded into
    ``factory(seed=1)`` (other random weights) gives ``rt.infer``'s answers on ``x``. Shared by
    the HF encoder and decoder family tests."""
    from reference import per_sample_loop

    from eeruntime.serve import StageScheduler

    with StageScheduler(rt, max_batch=32, inline="never", max_defer_ms=0, pad_to=(8, 16)) as sched:
        with parked(sched):
            futures = [sched.submit_nowait(r) for r in requests]
        answers = [f.result(30) for f in futures]
    _, _, margins = per_sample_loop(model, model.prepare_input(x), [thr, thr], "max_prob")
    left = 0
    for r, got, margin in zip(requests, answers, margins.tolist()):
        want = rt.infer(r)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
        assert margin < 1e-4 or torch.equal(got.exit_index, want.exit_index)
        left += int(want.exit_index[0] < 2)
    assert 0 < left < len(requests)  # a mix of exits
    rt.save(path / "b", weights=True)
    back = ee.load(path / "b", lambda: factory(seed=1))
    again, want = back.infer(x), rt.infer(x)
    assert torch.equal(again.exit_index, want.exit_index) and torch.equal(again.logits, want.logits)


def free_port():
    """A port the OS says is free on 127.0.0.1 (servers in tests bind 127.0.0.1 only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HookStage(nn.Module):
    def __init__(self, k, hook):
        super().__init__()
        self.k, self.hook = k, hook

    def forward(self, x):
        self.hook(self.k, x[:, 0].long().tolist())
        return x.clone()


class ScriptedExit(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        onehot = nn.functional.one_hot(x[:, 0].long() % C, C).float() * 30.0
        here = (x[:, 1].long() == self.k).unsqueeze(1)
        return torch.where(here, onehot, torch.zeros_like(onehot)) + x[:, 2:3] * 0.01


class Hook:
    """Records the ids each stage saw per batch; can hold a batch until ``gate`` opens (those
    for which ``hold_if(k, ids)`` is true) or fail it (``fail_if``)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batches = []  # (k, ids)
        self.threads = []  # the thread that ran each of them (its name), aligned with batches
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.hold_if = None  # (k, ids) -> bool
        self.fail_if = None  # (k, ids) -> bool

    def hold(self, k, trigger=None):
        """Hold stage ``k`` (only batches holding id ``trigger``, when given) until ``gate`` opens."""
        self.gate.clear()
        self.entered.clear()
        self.hold_if = lambda s, ids: s == k and (trigger is None or trigger in ids)

    def __call__(self, k, ids):
        with self.lock:
            self.batches.append((k, ids))
            self.threads.append(threading.current_thread().name)
        if self.hold_if is not None and self.hold_if(k, ids) and not self.gate.is_set():
            self.entered.set()
            assert self.gate.wait(30), "test gate never opened"
        if self.fail_if is not None and self.fail_if(k, ids):
            raise RuntimeError(f"injected failure at stage {k}")

    def ran_in(self, ident):
        """Names of the threads that ran batches holding row ``ident``."""
        with self.lock:
            return {t for (_, ids), t in zip(self.batches, self.threads) if ident in ids}

    def seen(self, k=None):
        with self.lock:
            return [i for s, ids in self.batches if k is None or s == k for i in ids]


def scripted_model(K=3, hook=None):
    hook = hook or Hook()
    return ee.MultiExitModel([HookStage(k, hook) for k in range(K)], [ScriptedExit(k) for k in range(K)]), hook


def scripted_rows(ids, exit_at):
    ids = torch.as_tensor(ids, dtype=torch.float32)
    return torch.stack([ids, torch.as_tensor(exit_at, dtype=torch.float32), torch.randn(len(ids))], 1)


@torch.no_grad()
def thresholds_for(model, x, fractions, criterion):
    """Thresholds under which about ``fractions[k]`` of ``x`` leaves at early exit k: quantiles of
    the scores of the rows still running there."""
    outs = model(x)
    alive = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    thresholds = []
    for k in range(len(outs) - 1):
        s = confidence_ref(outs[k], criterion)
        q = min(fractions[k] * x.shape[0] / max(int(alive.sum()), 1), 1.0)
        live = s[alive]
        thr = float(live.quantile(q)) if criterion == "entropy" else float(live.quantile(1.0 - q))
        thresholds.append(thr)
        alive &= ~((s < thr) if criterion == "entropy" else (s >= thr))
    return thresholds


def tiny_text_model(kind: str = "bert", trim: bool = False, seed: int = 1234):
    """A small BERT or RoBERTa (random weights, from a config: nothing downloaded; vocabulary 60,
    at most 40 tokens, 3 classes) with exits after layers 0 and 2, attached by ``ee.attach_exits``.
    The same weights for the same seed (the caller's random state left as it was)."""
    import transformers

    common = dict(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=3,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "bert":
            model = transformers.BertForSequenceClassification(transformers.BertConfig(**common))
        else:  # RoBERTa: pad token 1, positions counted from the ids
            model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**common))
        prefix = "bert" if kind == "bert" else "roberta"
        return ee.attach_exits(model.eval(), at=[f"{prefix}.encoder.layer.0", f"{prefix}.encoder.layer.2"], trim=trim)


def tiny_bert_text():
    """:func:`tiny_text_model`'s BERT: a factory (no arguments) for the text-serving tests'
    bundles and replicas, the same weights at every call."""
    return tiny_text_model("bert")

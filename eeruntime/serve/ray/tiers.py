"""Stage-split serving: the model's stages grouped into tiers, each tier its own Ray Serve
deployment (own replicas, own ``ray_actor_options`` such as ``{"resources": {"edge": 1}}``), the
edge/cloud tiers of differentiable branching (README, "Scale-out with Ray").

    client --> tier 0 (stages 0..a-1) --survivors--> tier 1 (stages a..b-1) --survivors--> ...
                 |  exited rows answered here          |  exited rows answered here

Tier t gathers work from many requests with ``@serve.batch`` (for t > 0 that is the survivors
of many requests, re-batched with ``cat_rows``), runs its stages with early exits through
``rt.run_stage`` and answers the rows that left. Each request's survivors - packed state, their
row ids, the criterion's carry and the request's thresholds snapshot (:mod:`.wire`) - go on to
tier t+1 through a DeploymentHandle; the request waits for that answer (its coroutine only; the
tier keeps batching others) and merges it. Tier 0 is the ingress: the client gets one answer,
rows in input order, the same as ``rt.infer`` row for row, plus what the split cost (``meta``:
tiers touched, bytes sent and one-way transfer time per hop).

Failures: a call to the next tier has a timeout; when the next tier's replica dies under it
(``ActorDiedError`` / unavailable), the request's survivors are sent again (the stages are pure
functions of their input), at most ``retries`` times; other requests are not touched. An
overloaded next tier (``max_queued_requests`` reached) fails the request with ``BackPressureError``
(HTTP 503) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from ray import serve

from ...runtime import cat_rows, take_rows
from ...thresholds import ThresholdSnapshot
from .deployment import DEFAULT_MAX_BATCH, DEFAULT_WAIT_S, _deployment_options, check_app_pad_to
from .replica import (
    CONFIG_KEYS,
    ReplicaBase,
    TierError,
    batch_settings,
    raise_if_error,
    rows_of,
    run_groups,
    signature,
)
from .wire import Survivors, check_transfer_dtype

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2


@dataclass
class _Work:
    """Rows of one request that reached this tier."""

    state: Any
    rows: torch.Tensor  # the request's own row ids
    carry: Optional[tuple]
    thresholds: Optional[tuple]  # None at tier 0: the batch takes the current snapshot


@dataclass
class _Outcome:
    """What this tier did with one request's rows: the leavers, and the survivors (or None)."""

    rows: torch.Tensor
    logits: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor
    survivors: Optional[Survivors]
    thresholds: tuple
    batch_rows: int = 0


@dataclass
class _Trace:
    tiers: int = 1
    transfer_bytes: List[int] = field(default_factory=list)
    transfer_ms: List[float] = field(default_factory=list)
    batch_rows: List[int] = field(default_factory=list)


def _is_replica_gone(e: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError))


class TierReplica(ReplicaBase):
    """One tier: stages ``first .. last-1`` of the model (``last == num_exits`` for the final tier)."""

    def __init__(
        self,
        spec,
        tier: int,
        first: int,
        last: int,
        next_tier=None,
        max_batch_size: int = DEFAULT_MAX_BATCH,
        batch_wait_timeout_s: float = DEFAULT_WAIT_S,
        transfer_dtype: str = "same",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        pad_to: Optional[Sequence[int]] = None,
    ):
        self.tier = int(tier)
        self.first, self.last = int(first), int(last)
        self._next = next_tier
        self._lower = check_transfer_dtype(transfer_dtype)
        self.transfer_dtype = transfer_dtype
        self.timeout_s, self.retries = check_call_limits(timeout_s, retries)
        self._setup(spec, max_batch_size, batch_wait_timeout_s, pad_to)
        K = self.rt.num_exits
        if self.pad_to and self.first != 0:
            raise ValueError(f"tier {tier} starts at stage {first}: pad_to pads the requests tier 0 takes")
        if not 0 <= self.first < self.last <= K:
            raise ValueError(f"tier {tier}: stages {first}..{last - 1} are not inside the model's {K} stages")
        if self.last < K and next_tier is None:
            raise ValueError(f"tier {tier} ends at stage {last - 1} of {K} but has no next tier to send survivors to")

    def config_keys(self):
        return CONFIG_KEYS + ("transfer_dtype",)

    def reconfigure(self, config) -> None:
        config = self._check_config(config)
        name = config.get("transfer_dtype")
        lower = check_transfer_dtype(name) if name is not None else self._lower
        # (checked first, applied last: a config refused in part changes nothing)
        super().reconfigure({k: v for k, v in config.items() if k != "transfer_dtype"})
        if name is not None:
            self._lower, self.transfer_dtype = lower, name

    def _batched_method(self):
        return self._batched

    def stats(self) -> Dict[str, Any]:
        out = super().stats()
        out.update(transfer_dtype=self.transfer_dtype, stages=[self.first, self.last])
        return out

    # ---------------------------------------------------------------- entry points
    async def infer(self, x) -> Dict[str, Any]:
        """Tier 0's entry: a request's input; the whole answer, rows in input order."""
        if self.first != 0:
            raise RuntimeError(f"tier {self.tier} starts at stage {self.first}; send inputs to tier 0")
        x = self._padded(x)
        n = rows_of(x)
        trace = _Trace()
        parts, thresholds = await self._serve_rows(_Work(x, torch.arange(n), None, None), trace)
        logits = torch.cat([p[1] for p in parts])
        rows = torch.cat([p[0] for p in parts])
        out = logits.new_empty((n,) + tuple(logits.shape[1:]))
        out[rows] = logits
        exit_index = torch.empty(n, dtype=torch.int64)
        exit_index[rows] = torch.cat([p[2] for p in parts])
        confidence = torch.empty(n, dtype=torch.float32)
        confidence[rows] = torch.cat([p[3] for p in parts])
        self.metrics.request()
        return {
            "logits": out,
            "exit_index": exit_index,
            "confidence": confidence,
            "thresholds": list(thresholds),
            "meta": {
                "tiers": trace.tiers,
                "transfer_bytes": trace.transfer_bytes,
                "transfer_ms": trace.transfer_ms,
                "batch_rows": trace.batch_rows,
            },
        }

    async def forward(self, survivors: Survivors) -> Dict[str, Any]:
        """Tier t > 0's entry: survivors from tier t-1; answers those rows (unordered parts)."""
        received = time.time()
        if survivors.stage != self.first:
            raise ValueError(f"tier {self.tier} runs stages from {self.first}, got rows for stage {survivors.stage}")
        transfer_ms = (received - survivors.sent_at) * 1e3
        self.metrics.received(transfer_ms)
        state, rows, carry = survivors.decode()
        trace = _Trace()
        parts, _ = await self._serve_rows(_Work(state, rows, carry, survivors.thresholds), trace)
        self.metrics.request()
        return {"parts": parts, "transfer_ms": transfer_ms, "trace": trace}

    # ---------------------------------------------------------------- one request's rows
    async def _serve_rows(self, work: _Work, trace: _Trace):
        outcome: _Outcome = raise_if_error(await self._batched(work))
        trace.batch_rows.append(outcome.batch_rows)
        parts = [(outcome.rows, outcome.logits, outcome.exit_index, outcome.confidence)]
        if outcome.survivors is not None:
            answer = await self._send(outcome.survivors)
            parts.extend(answer["parts"])
            sub: _Trace = answer["trace"]
            trace.tiers += sub.tiers
            trace.transfer_bytes += [outcome.survivors.nbytes] + sub.transfer_bytes
            trace.transfer_ms += [answer["transfer_ms"]] + sub.transfer_ms
            trace.batch_rows += sub.batch_rows
        return parts, outcome.thresholds

    async def _send(self, survivors: Survivors) -> Dict[str, Any]:
        from ray.exceptions import RayTaskError

        self.metrics.sent(survivors.num_rows, survivors.nbytes)
        for attempt in range(self.retries + 1):
            response = self._next.forward.remote(survivors.stamp())
            try:
                return await asyncio.wait_for(_awaited(response), timeout=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - only a dead replica is retried
                if isinstance(e, asyncio.TimeoutError) and not isinstance(e, RayTaskError):
                    # this call's own timeout (a later tier's, handed back as a RayTaskError that
                    # is also a TimeoutError, goes up as it is: it says which tier timed out)
                    response.cancel()
                    self.metrics.request(ok=False)
                    raise TimeoutError(
                        f"tier {self.tier + 1} did not answer {survivors.num_rows} rows within {self.timeout_s} s"
                    ) from None
                if not _is_replica_gone(e):
                    raise
                if attempt == self.retries:
                    self.metrics.request(ok=False)
                    raise TierError(
                        f"tier {self.tier + 1} lost its replica {attempt + 1} times for this request: {type(e).__name__}"
                    ) from e
                self.metrics.retried()
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- the batch
    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_WAIT_S)
    async def _batched(self, works: List[_Work]) -> List:
        return await self._compute(self._run_batch, works)

    def _run_batch(self, works: List[_Work]) -> List:
        current = self.rt.thresholds_snapshot()
        return run_groups(
            works,
            lambda w: (w.thresholds, signature(w.state), len(w.carry) if w.carry is not None else -1),
            lambda group: self._run_group(group, current),
        )

    def _run_group(self, works: List[_Work], current: ThresholdSnapshot) -> List[_Outcome]:
        thr = current if works[0].thresholds is None else ThresholdSnapshot(works[0].thresholds)
        sizes = [w.rows.numel() for w in works]
        N = sum(sizes)
        t0 = time.perf_counter()
        state = cat_rows([w.state for w in works]) if len(works) > 1 else works[0].state
        carry = None if self.first == 0 else cat_rows([w.carry for w in works])
        owner = torch.repeat_interleave(torch.arange(len(works)), torch.tensor(sizes))
        local = torch.cat([w.rows for w in works])
        ids = torch.arange(N)  # batch row ids; owner[id] and local[id] say whose row it is
        K = self.rt.num_exits
        counts = [0] * K
        left = []  # (exit_rows, logits, k, confidence) per stage
        for k in range(self.first, self.last):
            res = self.rt.run_stage(k, self._model_input(state) if k == 0 else state, ids, carry, thresholds=thr)
            counts[k] = int(res.exit_rows.numel())
            left.append((res.exit_rows, res.logits, k, res.confidence))
            state, ids, carry = res.state, res.rows, res.carry
            if ids.numel() == 0:
                break
        self.rt.record_exits(counts, sum(counts))
        self.metrics.batch(N, counts, time.perf_counter() - t0)
        exit_rows = torch.cat([e[0] for e in left])
        logits = torch.cat([e[1] for e in left])
        exit_k = torch.cat([torch.full((e[0].numel(),), e[2], dtype=torch.int64) for e in left])
        conf = torch.cat([e[3] for e in left])
        exit_owner = owner[exit_rows]
        surv_owner = owner[ids] if ids.numel() else ids
        out = []
        for i in range(len(works)):
            mine = (exit_owner == i).nonzero().flatten()
            survivors = None
            if ids.numel():
                keep = (surv_owner == i).nonzero().flatten()
                if keep.numel():
                    survivors = Survivors.encode(
                        take_rows(state, keep),
                        local[ids[keep]],
                        take_rows(carry, keep),
                        thr.values,
                        self.last,
                        lower=self._lower,
                    )
            out.append(
                _Outcome(
                    rows=local[exit_rows[mine]],
                    logits=logits[mine],
                    exit_index=exit_k[mine],
                    confidence=conf[mine],
                    survivors=survivors,
                    thresholds=thr.values,
                    batch_rows=N,
                )
            )
        return out


async def _awaited(response):
    return await response


def check_call_limits(timeout_s, retries) -> tuple:
    """``(timeout_s, retries)`` of the calls to the next tier, checked: a negative ``retries``
    made no call at all (the request failed with an AssertionError), a NaN or non-positive
    timeout failed every call at once."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(
            f"retries must be an integer >= 0 (times a request's survivors are sent again), got {retries!r}"
        )
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s), retries


def split_stages(num_exits: int, stages_per_tier: Sequence[int]) -> List[tuple]:
    """``[2, 2]`` for a 4-stage model -> ``[(0, 2), (2, 4)]``: each tier's first and end stage."""
    # A list of ints only: a string ("13", "1,3") or floats (1.5) were read digit by digit or
    # truncated, splitting the model otherwise than the config said, or failing on int(",").
    if not isinstance(stages_per_tier, (list, tuple)) or any(
        isinstance(c, bool) or not isinstance(c, int) for c in stages_per_tier
    ):
        raise ValueError(
            f"stages_per_tier must be a list of integers, one stage count per tier (e.g. [1, 3]), got {stages_per_tier!r}"
        )
    counts = list(stages_per_tier)
    if not counts or any(c <= 0 for c in counts) or sum(counts) != num_exits:
        raise ValueError(
            f"stages per tier must be positive counts summing to the model's {num_exits} stages, got {counts}"
        )
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


def tiered_app(
    spec,
    stages_per_tier: Sequence[int],
    *,
    num_exits: Optional[int] = None,
    tier_options: Optional[Sequence[Dict[str, Any]]] = None,
    transfer_dtype: str = "same",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retries: int = DEFAULT_RETRIES,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    batch_wait_timeout_s: float = DEFAULT_WAIT_S,
    user_config: Optional[Dict[str, Any]] = None,
    name_prefix: str = "Tier",
    pad_to: Optional[Sequence[int]] = None,
):
    """A Ray Serve application of chained tiers; tier 0 is the ingress.

    ``stages_per_tier``: how many stages each tier runs (e.g. ``[1, 3]``). ``tier_options[t]``:
    ``serve.deployment`` options of tier t (``ray_actor_options``, ``num_replicas`` or
    ``autoscaling_config``, ``max_ongoing_requests``, ``max_queued_requests``). ``user_config``
    goes to tier 0, whose thresholds every request carries along (so changing it hot-swaps the
    thresholds of the whole chain at once, atomically per request). ``num_exits``: the model's
    number of stages (built once here to count them when not given). ``pad_to``: text
    requests padded at tier 0 as :func:`~eeruntime.serve.ray.deployment.runtime_app` pads them.
    """
    from .spec import RuntimeSpec

    spec = RuntimeSpec.from_value(spec)
    check_transfer_dtype(transfer_dtype)
    check_call_limits(timeout_s, retries)
    batch_settings({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})
    pad_to = check_app_pad_to(spec, pad_to)
    if num_exits is None:
        num_exits = len(spec.build().model.stages)
    bounds = split_stages(num_exits, stages_per_tier)
    tier_options = list(tier_options or [{} for _ in bounds])
    if len(tier_options) != len(bounds):
        raise ValueError(f"got {len(tier_options)} tier_options for {len(bounds)} tiers")
    allowed = {"ray_actor_options", "num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests"}
    nxt = None
    for t in reversed(range(len(bounds))):
        opts = dict(tier_options[t])
        unknown = set(opts) - allowed
        if unknown:
            raise ValueError(f"tier {t}: unknown option(s) {sorted(unknown)}; accepted: {sorted(allowed)}")
        options = _deployment_options(
            f"{name_prefix}{t}",
            opts.get("num_replicas"),
            opts.get("autoscaling_config"),
            opts.get("ray_actor_options"),
            opts.get("max_ongoing_requests"),
            opts.get("max_queued_requests"),
            user_config if t == 0 else None,
            max_batch_size,
        )
        first, last = bounds[t]
        nxt = (
            serve.deployment(TierReplica)  # type: ignore[attr-defined]  # Ray's overloads pick the decorator-factory form
            .options(**options)
            .bind(
                spec.to_dict(),
                t,
                first,
                last,
                nxt,
                max_batch_size,
                batch_wait_timeout_s,
                transfer_dtype,
                timeout_s,
                retries,
                pad_to if t == 0 else None,
            )
        )
    return nxt

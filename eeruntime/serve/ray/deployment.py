"""The drop-in Ray Serve deployment: one replica holds the whole runtime; requests that arrive
together are stacked by ``@serve.batch`` and run as one ``rt.infer`` call (the runtime then
exits rows inside that batch), off the event loop. ``plain=True`` serves the same model without
early exits (every stage, the final exit), the baseline of the benchmarks.

    from ray import serve
    from eeruntime.serve.ray import RuntimeSpec, runtime_app
    handle = serve.run(runtime_app(RuntimeSpec(model="eeruntime.zoo:digits_cnn"), num_replicas=2))
    answer = handle.remote(x).result()      # {"logits", "exit_index", "confidence", "thresholds"}
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from ray import serve

from ...oracle import plain_forward
from ...runtime import cat_rows
from ..scheduler import check_pad_to
from .replica import ReplicaBase, batch_settings, raise_if_error, rows_of, run_groups, signature

DEFAULT_MAX_BATCH = 32
DEFAULT_WAIT_S = 0.002


class RuntimeReplica(ReplicaBase):
    def __init__(
        self,
        spec,
        max_batch_size: int = DEFAULT_MAX_BATCH,
        batch_wait_timeout_s: float = DEFAULT_WAIT_S,
        plain: bool = False,
        pad_to: Optional[Sequence[int]] = None,
    ):
        self.plain = bool(plain)
        self._setup(spec, max_batch_size, batch_wait_timeout_s, pad_to)

    def _batched_method(self):
        return self._batched

    async def infer(self, x) -> Dict[str, Any]:
        return raise_if_error(await self._batched(self._padded(x)))

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_WAIT_S)
    async def _batched(self, xs: List) -> List:
        return await self._compute(self._run_batch, xs)

    def _run_batch(self, xs: List) -> List:
        # On the compute thread, where thresholds are swapped: these are the ones this batch uses.
        thresholds = self.rt.thresholds
        answers = run_groups(xs, signature, lambda group: self._run_group(group, thresholds))
        for a in answers:
            self.metrics.request(ok=not isinstance(a, BaseException))
        return answers

    def _run_group(self, xs: List, thresholds) -> List[Dict[str, Any]]:
        sizes = [rows_of(x) for x in xs]
        x = cat_rows(xs) if len(xs) > 1 else xs[0]
        K = self.rt.num_exits
        t0 = time.perf_counter()
        if self.plain:
            logits = plain_forward(self.rt.model, x)
            exit_index = torch.full((logits.shape[0],), K - 1, dtype=torch.int64)
            confidence = torch.full((logits.shape[0],), float("nan"))
        else:
            res = self.rt.infer(self._model_input(x))
            logits, exit_index, confidence = res.logits, res.exit_index, res.confidence
        counts = torch.bincount(exit_index, minlength=K).tolist()
        self.metrics.batch(sum(sizes), counts, time.perf_counter() - t0)
        out, start = [], 0
        for n in sizes:
            sl = slice(start, start + n)
            out.append(
                {
                    "logits": logits[sl].clone(),
                    "exit_index": exit_index[sl].clone(),
                    "confidence": confidence[sl].clone(),
                    "thresholds": list(thresholds),
                    "meta": {"batch_rows": sum(sizes), "tiers": 1},
                }
            )
            start += n
        return out


def runtime_app(
    spec,
    *,
    plain: bool = False,
    name: Optional[str] = None,
    num_replicas: Optional[int] = None,
    autoscaling_config: Optional[Dict[str, Any]] = None,
    ray_actor_options: Optional[Dict[str, Any]] = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    batch_wait_timeout_s: float = DEFAULT_WAIT_S,
    max_ongoing_requests: Optional[int] = None,
    max_queued_requests: Optional[int] = None,
    user_config: Optional[Dict[str, Any]] = None,
    pad_to: Optional[Sequence[int]] = None,
):
    """A Ray Serve application serving ``spec``'s runtime (``plain=True``: the model without
    exits). Replica options pass through to ``serve.deployment``; ``user_config`` (keys
    ``thresholds``, ``max_batch_size``, ``batch_wait_timeout_s``) can be changed later without a
    restart. ``pad_to``: for a text encoder attached with ``ee.attach_exits``, sequence lengths
    each request is padded to (the shortest that holds it) so that texts of different lengths
    share a batch, as ``StageScheduler(pad_to=...)`` pads (docs/serving.md, "Text models");
    checked here against the model, built once for it. The returned application goes to
    ``serve.run`` (or is the target of a ``serve run`` config, see
    :func:`eeruntime.serve.ray.app.build_app`)."""
    from .spec import RuntimeSpec

    spec = RuntimeSpec.from_value(spec)
    batch_settings({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})
    pad_to = check_app_pad_to(spec, pad_to)
    options = _deployment_options(
        name or ("PlainModel" if plain else "EERuntime"),
        num_replicas,
        autoscaling_config,
        ray_actor_options,
        max_ongoing_requests,
        max_queued_requests,
        user_config,
        max_batch_size,
    )
    dep = serve.deployment(RuntimeReplica).options(**options)  # type: ignore[attr-defined]  # Ray's overloads pick the decorator-factory form
    return dep.bind(spec.to_dict(), max_batch_size, batch_wait_timeout_s, plain, pad_to)


def check_app_pad_to(spec, pad_to) -> Optional[List[int]]:
    """``pad_to`` checked where the app is built (the model built once for it: whether it can
    pad is its input adapter's), rather than by replicas that fail to start; None stays None."""
    if pad_to is None:
        return None
    return list(check_pad_to(pad_to, getattr(spec.build().model, "input_adapter", None)))


def _deployment_options(
    name,
    num_replicas,
    autoscaling_config,
    ray_actor_options,
    max_ongoing_requests,
    max_queued_requests,
    user_config,
    max_batch_size,
) -> Dict[str, Any]:
    if num_replicas is not None and autoscaling_config is not None:
        raise ValueError("give num_replicas or autoscaling_config, not both")
    if max_ongoing_requests is None:
        # Serve's default (5) would cap every batch at 5 requests; two batches' worth lets the
        # next batch fill while one runs.
        max_ongoing_requests = 2 * int(max_batch_size)
    options: Dict[str, Any] = {"name": name}
    for key, value in (
        ("num_replicas", num_replicas),
        ("autoscaling_config", autoscaling_config),
        ("ray_actor_options", ray_actor_options),
        ("max_ongoing_requests", max_ongoing_requests),
        ("max_queued_requests", max_queued_requests),
        ("user_config", user_config),
    ):
        if value is not None:
            options[key] = value
    return options

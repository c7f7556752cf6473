"""What every eeruntime replica on Ray Serve shares: building the runtime from a spec, running the
model off the event loop, hot-swapping thresholds and batch settings through ``reconfigure``,
stats, and the HTTP / handle entry point. The drop-in deployment (:mod:`.deployment`) and the
stage tiers (:mod:`.tiers`) add what they batch and run.

Why one worker thread: the replica's event loop must keep accepting requests (and filling the
next ``@serve.batch``) while torch computes; torch itself uses the cores through its intra-op
threads, so a second compute thread would only contend with the first. Threshold swaps run on the
same thread, between batches, which is what makes every answer's ``thresholds`` exact.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict

import torch

from ...state import check_state
from ...thresholds import thresholds_from_json
from ..codec import input_spec_for
from ..process import freeze_startup_objects
from ..scheduler import check_pad_to, pad_tokens
from . import http
from .metrics import ReplicaMetrics
from .spec import RuntimeSpec


class TierError(RuntimeError):
    """The next tier could not answer a request (its replicas kept dying, or it timed out).
    (Defined here, beside the replicas' base that answers it over HTTP as a 503; tiers.py raises it.)"""


# reconfigure(user_config) keys every replica understands.
CONFIG_KEYS = ("thresholds", "max_batch_size", "batch_wait_timeout_s")


def overloaded_errors():
    """Exceptions that mean "a deployment is full or gone": answered 503 over HTTP."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return (BackPressureError, DeploymentUnavailableError)


class ReplicaBase:
    tier = 0

    def _setup(self, spec, max_batch_size: int, batch_wait_timeout_s: float, pad_to=None) -> None:
        self.spec = RuntimeSpec.from_value(spec)
        self.rt = self.spec.build()
        # a text encoder's requests padded to a few lengths so that texts of different lengths
        # share a @serve.batch (rows batch only with rows of the same shape: replica.signature)
        self._adapter = getattr(self.rt.model, "input_adapter", None)
        self.pad_to = check_pad_to(pad_to, self._adapter)
        # an input adapter with input names (an HF model's): every request is mapped by it (a dict
        # of a text model's inputs by name could not be batched as it is), so that requests in
        # every form rt.infer takes become its one tuple and share batches
        self._by_name = bool(getattr(self._adapter, "names", ()))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eeruntime-compute")
        self.metrics = ReplicaMetrics(self.rt.num_exits, tier=self.tier)
        # What a row of an HTTP request must look like: learned from the first answered request
        # (as ``eeruntime serve`` does), so a later one of another row shape or kind of dtype gets
        # a 422 saying so rather than reaching the model (a 500 "Internal Server Error").
        # (token ids for a text encoder attached with ee.attach_exits: codec.TokenInputSpec)
        self._inputs = input_spec_for(self.rt.model)
        self.metrics.thresholds(self.rt.thresholds)
        self._batch_settings = batch_settings(
            {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        )
        self._apply_batch_settings()
        freeze_startup_objects()  # the replica's process is loaded (eeruntime/serve/process.py)

    def _padded(self, x):
        """``x`` as this replica batches it: for a model whose input adapter has input names (an
        HF model's), the adapter's tuple (the request in whatever form ``rt.infer`` takes, a dict
        by name included; what the adapter refuses fails this request alone, before any batch),
        with ``pad_to`` padded to the shortest length that holds it, as
        ``StageScheduler(pad_to=...)`` pads; else ``x`` as it is."""
        if not self._by_name:
            return x
        state = self._adapter(x)
        return pad_tokens(state, self.pad_to, self._adapter) if isinstance(state, tuple) else state

    def _model_input(self, x):
        """A batch's input as ``rt.infer`` / ``run_stage(0, ...)`` take it: the adapter's state
        by name (its tuple is in the stages' order, which they would read as the forward's)."""
        return dict(zip(self._adapter.names, x)) if self._by_name and isinstance(x, tuple) else x

    # ---------------------------------------------------------------- configuration
    def _batched_method(self):
        raise NotImplementedError

    def _apply_batch_settings(self) -> None:
        m = self._batched_method()
        m.set_max_batch_size(self._batch_settings["max_batch_size"])
        m.set_batch_wait_timeout_s(self._batch_settings["batch_wait_timeout_s"])

    def _check_config(self, config) -> Dict[str, Any]:
        if config is None:
            return {}
        if not isinstance(config, dict):
            raise TypeError(
                f"user_config must be a dict with keys from {self.config_keys()}, got {type(config).__name__}"
            )
        unknown = set(config) - set(self.config_keys())
        if unknown:
            raise ValueError(f"unknown user_config key(s) {sorted(unknown)}; accepted: {list(self.config_keys())}")
        return config

    def config_keys(self):
        return CONFIG_KEYS

    def reconfigure(self, config) -> None:
        """Ray Serve calls this on the running replica when the deployment's ``user_config``
        changes (no restart): new thresholds take effect from the next batch; the batch under way
        finishes with the set it started with."""
        config = self._check_config(config)
        # Every value is checked before any is applied: a config refused in part changes nothing
        # (Ray Serve reports the reconfigure as failed; the replica must not run half of it).
        settings = batch_settings({**self._batch_settings, **{k: v for k, v in config.items() if v is not None}})
        if config.get("thresholds") is not None:
            values = thresholds_from_json(config["thresholds"])  # ("inf" as the answers spell it)
            # On the compute thread, between two batches.
            self._executor.submit(self.rt.set_thresholds, values).result()
            self.metrics.thresholds(self.rt.thresholds)
        self._batch_settings = settings
        self._apply_batch_settings()

    # ---------------------------------------------------------------- entry points
    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def infer(self, x) -> Dict[str, Any]:
        raise NotImplementedError

    async def __call__(self, request):
        """A handle call with a tensor (or a tuple of tensors, or a numpy array) gets a dict of
        tensors; an HTTP request gets JSON (see :mod:`.http`)."""
        if not http.is_http_request(request):
            x = _as_input(request)
            answer = await self.infer(x)
            self._inputs.learn(x)
            return answer
        try:
            x = await http.read_inputs(request, self._inputs)
            answer = await self.infer(x)
        except http.InputError as e:
            return http.error_response(e.status, str(e))
        except (ValueError, TypeError) as e:
            # the input does not fit the model (shape, dtype; a text model's input adapter): the
            # runtime's own message.
            return http.error_response(400, f"the input does not fit the model: {_message(e)}")
        except overloaded_errors() as e:
            return http.error_response(503, f"overloaded, retry later: {type(_cause(e)).__name__}")
        except TierError as e:
            return http.error_response(503, f"a tier could not answer, retry later: {_message(e)}")
        except (TimeoutError, asyncio.TimeoutError) as e:
            return http.error_response(504, f"timed out: {_message(e)}")
        self._inputs.learn(x)
        return http.answer_json(answer)

    def stats(self) -> Dict[str, Any]:
        import os

        import ray

        out = self.metrics.snapshot()
        out["thresholds"] = self.rt.thresholds
        out["pid"] = os.getpid()
        ctx = ray.get_runtime_context()
        out["node"] = ctx.get_node_id()
        out["resources"] = {k: v for k, v in ctx.get_assigned_resources().items() if v}
        out.update(self._batch_settings)
        return out

    def thresholds(self):
        return self.rt.thresholds


def _cause(e: BaseException) -> BaseException:
    """The exception a later tier raised, out of Ray's wrapper: a ``RayTaskError`` is also an
    instance of its cause's class, but its text is the remote traceback, never for a client."""
    from ray.exceptions import RayTaskError

    while isinstance(e, RayTaskError) and isinstance(e.cause, BaseException) and e.cause is not e:
        e = e.cause
    return e


def _message(e: BaseException) -> str:
    return str(_cause(e))


def batch_settings(config: Dict[str, Any]) -> Dict[str, Any]:
    """``max_batch_size`` (an int >= 1) and ``batch_wait_timeout_s`` (a finite float >= 0) of
    ``config``, checked: Ray's batch queue takes any value from its setters, and with a size
    below 1 or a NaN / negative wait it never forms a batch, so every request would hang."""
    size, wait = config["max_batch_size"], config["batch_wait_timeout_s"]
    if isinstance(size, float) and size.is_integer():  # (8.0 from a JSON config)
        size = int(size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {size!r}")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not (math.isfinite(wait) and wait >= 0):
        raise ValueError(f"batch_wait_timeout_s must be a finite number of seconds >= 0, got {wait!r}")
    return {"max_batch_size": size, "batch_wait_timeout_s": float(wait)}


def _as_input(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    elif isinstance(x, list):
        x = tuple(torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in x)
    check_state(x, "request input")
    return x


def signature(state) -> tuple:
    """Rows of two states can share a batch when every member agrees beyond dim 0."""
    from ...state import as_tuple

    return tuple((tuple(t.shape[1:]), t.dtype) for t in as_tuple(state))


def group_by(items, key) -> Dict[Any, list]:
    groups: Dict[Any, list] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups


def run_groups(items, key, run_group):
    """``run_group(list_of_items) -> list_of_answers`` on each group of compatible items. A group
    of several that raises is run again one item at a time, so that only the requests the model
    fails on get the exception (one request's bad rows failed every request batched with it);
    the others are answered as if they had come alone (the stages are pure functions of their
    rows). Groups of other signatures are unaffected."""
    answers: list = [None] * len(items)
    for idxs in group_by(items, key).values():
        try:
            outs = run_group([items[i] for i in idxs])
        except Exception as e:  # noqa: BLE001 - delivered to the requests that cause it only
            outs = [_alone(run_group, items[i]) for i in idxs] if len(idxs) > 1 else [e]
        for i, out in zip(idxs, outs):
            answers[i] = out
    return answers


def _alone(run_group, item):
    try:
        return run_group([item])[0]
    except Exception as e:  # noqa: BLE001 - this request's own failure
        return e


def raise_if_error(answer):
    if isinstance(answer, BaseException):
        raise answer
    return answer


def rows_of(state) -> int:
    return check_state(state, "state")

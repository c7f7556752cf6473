"""Config-driven deployment: the application builder Ray Serve's ``serve run`` / ``serve deploy``
configs name, and the same from Python.

A config (YAML for ``serve run config.yaml``; see the README's "Scale-out with Ray")::

    applications:
      - name: eeruntime
        route_prefix: /
        import_path: eeruntime.serve.ray.app:build_app
        args:
          form: tiers                    # runtime | plain | tiers
          model: eeruntime.zoo:resnet_style
          model_kwargs: {num_classes: 10, widths: [16, 32, 64, 128], blocks: [1, 1, 1, 1]}
          bundle: /models/resnet         # rt.save(path, weights=True)
          stages_per_tier: [1, 3]
          tier_options:
            - {ray_actor_options: {num_cpus: 1, resources: {edge: 1}}}
            - {ray_actor_options: {num_cpus: 1, resources: {cloud: 1}}, max_queued_requests: 64}
        deployments:
          - name: Tier0
            user_config: {thresholds: [0.4, 0.4, 0.4], transfer_dtype: bf16}

Changing only a deployment's ``user_config`` in such a config and deploying it again updates the
running replicas in place (``reconfigure``, no restart): that is how thresholds are hot-swapped.
(``serve.run`` of a Python application re-versions the code and restarts the replicas.)
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .deployment import runtime_app
from .spec import RuntimeSpec
from .tiers import tiered_app

FORMS = ("runtime", "plain", "tiers")
APP_KEYS = {
    "form",
    "stages_per_tier",
    "tier_options",
    "transfer_dtype",
    "timeout_s",
    "retries",
    "max_batch_size",
    "batch_wait_timeout_s",
    "num_replicas",
    "autoscaling_config",
    "ray_actor_options",
    "max_ongoing_requests",
    "max_queued_requests",
    "num_exits",
    "spec",
    "pad_to",
}


def build_app(args: Dict[str, Any]):
    """The Ray Serve application for ``args`` (the ``args`` of a config's application): the
    spec's fields (``model``, ``model_kwargs``, ``bundle``, ``weights``, ``thresholds``, ...) at
    the top level or under ``spec``, ``form`` and the options of :func:`runtime_app` /
    :func:`tiered_app`."""
    args = dict(args or {})
    spec_fields = set(RuntimeSpec.__dataclass_fields__)
    unknown = set(args) - APP_KEYS - spec_fields
    if unknown:
        raise ValueError(f"unknown app argument(s) {sorted(unknown)}; accepted: {sorted(APP_KEYS | spec_fields)}")
    spec = RuntimeSpec.from_value(args.pop("spec", None) or {k: args.pop(k) for k in list(args) if k in spec_fields})
    form = args.pop("form", "runtime")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; accepted: {', '.join(FORMS)}")
    common = {k: args.pop(k) for k in ("max_batch_size", "batch_wait_timeout_s", "pad_to") if k in args}
    if form == "tiers":
        if "stages_per_tier" not in args:
            raise ValueError("form 'tiers' needs stages_per_tier, e.g. [1, 3]")
        allowed = {"stages_per_tier", "tier_options", "transfer_dtype", "timeout_s", "retries", "num_exits"}
        _only(args, allowed, form)
        return tiered_app(spec, args.pop("stages_per_tier"), **args, **common)
    _only(
        args,
        {"num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests", "max_queued_requests"},
        form,
    )
    return runtime_app(spec, plain=form == "plain", **args, **common)


def _only(args, allowed, form) -> None:
    extra = set(args) - allowed
    if extra:
        raise ValueError(f"form {form!r} does not take {sorted(extra)}; it takes {sorted(allowed)}")


def app_config(
    name: str,
    args: Dict[str, Any],
    route_prefix: Optional[str] = "/",
    user_config: Optional[Dict[str, Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """One application's entry of a Serve config: ``user_config`` maps deployment names
    (``EERuntime``, ``PlainModel``, ``Tier0``, ...) to their user_config."""
    app: Dict[str, Any] = {
        "name": name,
        "import_path": f"{__name__}:build_app",
        "args": dict(args),
        "route_prefix": route_prefix,
    }
    if user_config:
        app["deployments"] = [{"name": dep, "user_config": cfg} for dep, cfg in user_config.items()]
    return app


def deploy(applications: List[Dict[str, Any]], timeout_s: float = 120.0) -> None:
    """Deploy a multi-application Serve config (the entries of :func:`app_config`) on the
    running Serve instance and wait until every application runs: what ``serve deploy`` does
    through the dashboard, for clusters started without one. Applications not listed are
    removed; a deployment whose only change is its ``user_config`` is reconfigured in place."""
    import time

    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": applications})
    client = _get_global_client()
    if client is None:
        raise RuntimeError("Ray Serve is not running here: start it first (serve.start() or `serve start`)")
    client.deploy_apps(schema)
    names = {a["name"] for a in applications}
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {s.name: s.app_status for s in client.list_serve_statuses() if s.name in names}
        states = {n: s.status for n, s in statuses.items()}
        failed = {n: s.message for n, s in statuses.items() if s.status == ApplicationStatus.DEPLOY_FAILED}
        if failed:
            raise RuntimeError(f"deploying {sorted(failed)} failed: {failed}")
        if len(states) == len(names) and set(states.values()) == {ApplicationStatus.RUNNING}:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s} s: {states}")
        time.sleep(0.25)

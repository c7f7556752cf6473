"""Command line of the Ray Serve forms: ``python -m eeruntime serve --ray BUNDLE --model module:factory
[--form runtime|plain|tiers] ...`` (or ``python -m eeruntime.serve.ray ...``). It starts (or joins, ``--address``) a Ray cluster, deploys the
application from a Serve config (so a later ``serve deploy`` of the same config with another
``user_config`` hot-swaps thresholds in place) and serves HTTP until interrupted;
``--print-config`` writes that config as YAML for ``serve run config.yaml`` instead."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

from ..scheduler import wait_ms_error
from .app import FORMS, app_config


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", nargs="?", help="a directory saved by rt.save(path, weights=True)")
    p.add_argument("--model", required=True, help="the model factory, module:function")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="the factory's keyword arguments (JSON)")
    p.add_argument("--weights", help="a safetensors state_dict for the model (when the bundle has none)")
    p.add_argument("--thresholds", type=_floats, help="override the bundle's thresholds (comma-separated)")
    p.add_argument("--criterion", default="entropy", help="without a bundle: the exit criterion")
    p.add_argument(
        "--form",
        choices=FORMS,
        default="runtime",
        help="runtime: the runtime per replica; plain: the model without exits; tiers: stage tiers",
    )
    p.add_argument("--stages-per-tier", type=_ints, help="tiers: stages each tier runs, e.g. 1,3")
    p.add_argument(
        "--tier-resources", default=None, help="tiers: one Ray custom resource per tier that places it, e.g. edge,cloud"
    )
    p.add_argument(
        "--transfer-dtype",
        default="same",
        choices=["same", "bf16", "fp16"],
        help="tiers: precision of the survivors' state sent between tiers",
    )
    p.add_argument("--num-replicas", type=int, default=1, help="replicas per deployment (per tier)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs each replica reserves")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per replica")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument(
        "--pad-to",
        type=_ints,
        default=None,
        help="a text encoder's (attached with ee.attach_exits): sequence lengths, e.g. 32,64,128; each request "
        "is padded to the shortest that holds it so texts of different lengths share batches (tier 0 for tiers)",
    )
    p.add_argument("--max-queued-requests", type=int, default=None, help="backpressure: queued requests per deployment")
    p.add_argument("--name", default="eeruntime", help="the Serve application name")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--duration", type=float, default=None, help="serve this many seconds, then stop (default: until Ctrl-C)"
    )
    p.add_argument("--print-config", action="store_true", help="print the Serve config (YAML) and exit")


def config_from_args(a: argparse.Namespace) -> dict:
    """The Serve config (``applications: [...]``) the arguments describe; a wait that is
    negative, NaN or infinite is refused here (a SystemExit saying so), not by a replica that
    then fails to start."""
    bad = wait_ms_error(a.batch_wait_ms)
    if bad:
        raise SystemExit(f"--batch-wait-ms {bad}")
    args = {
        "model": a.model,
        "model_kwargs": a.model_kwargs,
        "form": a.form,
        "criterion": a.criterion,
        "max_batch_size": a.max_batch_size,
        "batch_wait_timeout_s": a.batch_wait_ms / 1e3,
    }
    for key, value in (
        ("bundle", a.bundle),
        ("weights", a.weights),
        ("thresholds", a.thresholds),
        ("torch_threads", a.torch_threads),
        ("pad_to", a.pad_to),
    ):
        if value is not None:
            args[key] = value
    actor = {"num_cpus": a.num_cpus}
    user_config = None
    if a.form == "tiers":
        if not a.stages_per_tier:
            raise SystemExit("--form tiers needs --stages-per-tier, e.g. --stages-per-tier 1,3")
        n = len(a.stages_per_tier)
        resources = a.tier_resources.split(",") if a.tier_resources else [None] * n
        if len(resources) != n:
            raise SystemExit(f"--tier-resources names {len(resources)} resources for {n} tiers")
        options = []
        for r in resources:
            opt = {
                "ray_actor_options": {**actor, **({"resources": {r: 1}} if r else {})},
                "num_replicas": a.num_replicas,
            }
            if a.max_queued_requests is not None:
                opt["max_queued_requests"] = a.max_queued_requests
            options.append(opt)
        args.update(stages_per_tier=a.stages_per_tier, tier_options=options, num_exits=sum(a.stages_per_tier))
        user_config = {"Tier0": {"transfer_dtype": a.transfer_dtype}}
    else:
        args.update(ray_actor_options=actor, num_replicas=a.num_replicas)
        if a.max_queued_requests is not None:
            args["max_queued_requests"] = a.max_queued_requests
    return {
        "http_options": {"host": a.host, "port": a.port},
        "applications": [app_config(a.name, args, "/", user_config)],
    }


def run(a: argparse.Namespace) -> int:
    if a.duration is not None and not a.duration > 0:  # (NaN or <= 0: Ray started and stopped at once)
        raise SystemExit(f"--duration must be > 0 seconds (inf or none: until Ctrl-C), got {a.duration}")
    config = config_from_args(a)
    if a.print_config:
        import yaml

        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    import ray
    from ray import serve

    from .app import deploy

    if a.address:
        ray.init(address=a.address)
    else:
        from .local import start_local_ray

        # One machine plays every tier: give it plenty of each tier's resource.
        start_local_ray({r: 1e6 for r in (a.tier_resources or "").split(",") if r} or None)
    try:
        serve.start(http_options=config["http_options"])
        deploy(config["applications"])
        print(
            f'serving {a.form} at http://{a.host}:{a.port}/ (POST JSON {{"inputs": [[...]]}}); Ctrl-C stops', flush=True
        )
        deadline = None if a.duration is None else time.monotonic() + a.duration
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eeruntime serve --ray", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

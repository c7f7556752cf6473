"""``python -m eeruntime torchserve-archive BUNDLE --model module:factory --out STORE``: a model
directory for TorchServe (docs/serving.md, "TorchServe").

TorchServe loads a directory in its model store as it loads an extracted .mar (its
``MAR-INF/MANIFEST.json`` says what to run), so no torch-model-archiver step is needed::

    STORE/NAME/MAR-INF/MANIFEST.json   handler: eeruntime.serve.torchserve_handler
    STORE/NAME/model-config.yaml       TorchServe's settings + an ``eeruntime:`` section
    STORE/NAME/bundle/                 a copy of BUNDLE (rt.save(path, weights=True))

then ``torchserve --start --model-store STORE --models NAME=NAME --disable-token-auth --ncs``.
The worker imports the handler and the model's factory from its own Python, the one that runs
``torchserve`` (so eeruntime and the model's module must be installed there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict

from .cli import add_scheduler_arguments, parse_shape, scheduler_options_error

HANDLER = "eeruntime.serve.torchserve_handler"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="directory written by rt.save(path, weights=True)")
    p.add_argument(
        "--model", required=True, help="the model's constructor, 'module:factory' (called with no arguments)"
    )
    p.add_argument("--out", required=True, help="TorchServe's model store (created if missing)")
    p.add_argument("--name", default="eeruntime", help="the model's name in TorchServe (/predictions/NAME)")
    p.add_argument(
        "--batch-mode",
        action="store_true",
        help="TorchServe's own batching (--batch-size, --max-batch-delay-ms) and rt.infer per batch, "
        "instead of its async worker with the stage scheduler",
    )
    p.add_argument("--batch-size", type=int, default=8, help="with --batch-mode: requests per batch, at most")
    p.add_argument("--max-batch-delay-ms", type=int, default=5, help="with --batch-mode: wait for a fuller batch")
    p.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    p.add_argument("--response-timeout-s", type=int, default=60)
    add_scheduler_arguments(p)


def model_config(args: argparse.Namespace) -> Dict[str, Any]:
    """model-config.yaml's content: TorchServe's keys (docs of its ModelConfig) and ours."""
    section: Dict[str, Any] = {
        "model": args.model,
        "bundle": "bundle",
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "policy": args.policy,
        "max_queue_rows": args.max_queue_rows,
        "timeout_s": args.timeout_s,
        "scheduler_workers": args.scheduler_workers,
        "max_rows": args.max_rows,
    }
    if args.max_defer_ms is not None:  # (absent: none, as in `eeruntime serve`; see the handler)
        section["max_defer_ms"] = args.max_defer_ms
    if args.input_shape:
        section["input_shape"] = list(parse_shape(args.input_shape))
    return {
        "minWorkers": args.workers,
        "maxWorkers": args.workers,
        # async: every request goes to the worker at once (batchSize 1, no delay), the scheduler batches
        "batchSize": args.batch_size if args.batch_mode else 1,
        "maxBatchDelay": args.max_batch_delay_ms if args.batch_mode else 0,
        "responseTimeout": args.response_timeout_s,
        "asyncCommunication": not args.batch_mode,
        "eeruntime": section,
    }


def write(args: argparse.Namespace) -> Path:
    """Check that the bundle loads with its factory, then write STORE/NAME; returns that path."""
    import eeruntime as ee

    bad = scheduler_options_error(args)
    if bad:
        raise ValueError(bad)
    bundle = Path(args.bundle)
    ee.load(bundle, args.model)  # fails here, with the loader's message, rather than in a worker's log
    if args.input_shape:
        parse_shape(args.input_shape)
    target = Path(args.out) / args.name
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or give another --name / --out")
    shutil.copytree(bundle, target / "bundle")
    (target / "MAR-INF").mkdir()
    manifest = {
        "createdOn": time.strftime("%d/%m/%Y %H:%M:%S"),
        "runtime": "python",
        "model": {"modelName": args.name, "handler": HANDLER, "modelVersion": "1.0", "configFile": "model-config.yaml"},
        "archiverVersion": "eeruntime",
    }
    (target / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # JSON is YAML: TorchServe's frontend (snakeyaml) and worker (PyYAML) both read it.
    (target / "model-config.yaml").write_text(json.dumps(model_config(args), indent=2) + "\n")
    return target


def run(args: argparse.Namespace) -> int:
    target = write(args)
    print(
        f"wrote {target}\nrun: torchserve --start --model-store {target.parent} --models {args.name}={args.name} "
        f"--disable-token-auth --ncs\nthen: curl -s localhost:8080/predictions/{args.name} "
        "-H 'content-type: application/json' -d '{\"inputs\": [...]}'"
    )
    return 0

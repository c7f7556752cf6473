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
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

from .cli import add_scheduler_arguments, parse_lengths, parse_shape, scheduler_options_error

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
    if args.pad_to:
        section["pad_to"] = parse_lengths(args.pad_to)
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


# a model name that is one path component (the directory is STORE/NAME, never outside STORE) and
# reads as itself in TorchServe's `--models NAME=NAME,...` list and its /predictions/NAME URL
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def options_error(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the archive's options, or None; said before anything is loaded or written
    (a model directory TorchServe cannot load, or whose every request is refused, is no archive)."""
    bad = scheduler_options_error(args)
    if bad:
        return bad
    if not NAME_PATTERN.fullmatch(args.name):
        return f"--name must be letters, digits, '_', '-' or '.', starting with a letter or digit, got {args.name!r}"
    for attr, least, what in (
        ("workers", 1, "worker processes"),
        ("batch_size", 1, "requests per TorchServe batch"),
        ("max_batch_delay_ms", 0, "ms TorchServe waits for a fuller batch"),
        ("response_timeout_s", 1, "s TorchServe waits for an answer"),
    ):
        if getattr(args, attr) < least:
            return f"--{attr.replace('_', '-')} must be >= {least} ({what}), got {getattr(args, attr)}"
    if args.input_shape:
        parse_shape(args.input_shape)  # (a ValueError saying what is accepted)
    return None


def write(args: argparse.Namespace) -> Path:
    """Check the options and that the bundle loads with its factory, then write STORE/NAME whole or
    not at all (built in a temporary directory beside it, then renamed); returns that path."""
    import eeruntime as ee

    bad = options_error(args)
    if bad:
        raise ValueError(bad)
    bundle = Path(args.bundle)
    rt = ee.load(bundle, args.model)  # fails here, with the loader's message, rather than in a worker's log
    if args.pad_to:  # (lengths the model cannot pad to, likewise: the scheduler's own check)
        from .scheduler import check_pad_to

        check_pad_to(parse_lengths(args.pad_to), getattr(rt.model, "input_adapter", None))
    store = Path(args.out)
    target = store / args.name
    if store.exists() and not store.is_dir():
        raise ValueError(f"--out {store} is a file; give the model store's directory (created if missing)")
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or give another --name / --out")
    made_store = not store.exists()
    # (a name of its own, made with mkdir: the directory gets the user's umask, as copytree's do)
    work = store / f".{args.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        store.mkdir(parents=True, exist_ok=True)
        work.mkdir()
    except OSError as e:
        if made_store and store.is_dir() and not any(store.iterdir()):
            store.rmdir()
        raise ValueError(f"cannot write in {store}: {e}") from None
    try:
        # (a store inside the bundle's directory is not part of the bundle: copying it would copy
        # this model's own directory into itself)
        inside = store.resolve()
        shutil.copytree(
            bundle, work / "bundle", ignore=lambda d, names: [n for n in names if Path(d, n).resolve() == inside]
        )
        (work / "MAR-INF").mkdir()
        manifest = {
            "createdOn": time.strftime("%d/%m/%Y %H:%M:%S"),
            "runtime": "python",
            "model": {
                "modelName": args.name,
                "handler": HANDLER,
                "modelVersion": "1.0",
                "configFile": "model-config.yaml",
            },
            "archiverVersion": "eeruntime",
        }
        (work / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
        # JSON is YAML: TorchServe's frontend (snakeyaml) and worker (PyYAML) both read it.
        (work / "model-config.yaml").write_text(json.dumps(model_config(args), indent=2) + "\n")
        if target.exists():  # made meanwhile by someone else: theirs is kept
            raise FileExistsError(f"{target} exists; remove it or give another --name / --out")
        work.rename(target)
    except BaseException as e:  # (KeyboardInterrupt too: nothing is left half-written)
        shutil.rmtree(work, ignore_errors=True)
        if made_store:
            try:
                store.rmdir()  # (only if still empty)
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, FileExistsError):
            raise ValueError(f"cannot write {target}: {e}") from None
        raise
    return target


def run(args: argparse.Namespace) -> int:
    target = write(args)
    print(
        f"wrote {target}\nrun: torchserve --start --model-store {target.parent} --models {args.name}={args.name} "
        f"--disable-token-auth --ncs\nthen: curl -s localhost:8080/predictions/{args.name} "
        "-H 'content-type: application/json' -d '{\"inputs\": [...]}'"
    )
    return 0

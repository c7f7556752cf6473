"""``python -m eeruntime serve BUNDLE --model module:factory [--host 127.0.0.1 --port 8000]``."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Optional

TOKEN_ENV = "EERUNTIME_ADMIN_TOKEN"
# StageScheduler's policies (scheduler.POLICIES, spelled out here: this module imports no torch
# until a server starts, so --help stays fast; tests/test_serve_http.py checks they agree)
POLICIES = ("deepest", "fill", "request")
# --max-defer-ms when not given, in the HTTP server: off. Its event loop hands requests to the
# scheduler in bursts (every request parsed in one pass of the loop at once), which fill stage 0
# below saturation and set deferral off; measured on the 2-core VM over HTTP (docs/serving.md, "Over
# HTTP"), the scheduler's CPU default (20 ms) lost to none: 0.79x and 0.74x the saturated req/s of
# request batching on the ResNet-style model in two runs (0.75x in a third; 0.91x, 0.89x and 0.95x
# on digits), and at half that rate p99s of 79 and 152 ms against 22-36 ms in two of them (the
# first went the other way: 116 against 176 ms). The same default in EarlyExitLitAPI (measured:
# docs/serving.md, "Session 15") and the TorchServe handler's async mode (not measured there: its
# event loop submits like this server's).
SERVE_MAX_DEFER_MS = 0.0
# uvicorn's log levels (uvicorn.config.LOG_LEVELS; spelled out to import no uvicorn for --help):
# another name failed with a KeyError only once the port was bound and announced
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eeruntime serve", description="Serve a saved runtime bundle over HTTP with the stage scheduler."
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``eeruntime serve`` (registered in eeruntime/cli.py)."""
    p.add_argument("bundle", help="directory written by rt.save(path, weights=True)")
    p.add_argument(
        "--model", required=True, help="the model's constructor, 'module:factory' (called with no arguments)"
    )
    p.add_argument(
        "--weights",
        help="a safetensors state dict loaded into the --model factory's model (for a runtime saved without "
        "the model's weights, e.g. by `eeruntime calibrate`; default: the bundle's own)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start); at most 65535")
    add_scheduler_arguments(p)
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body accepted (then 413)")
    p.add_argument(
        "--admin-token-file",
        help=f"file holding the admin token (or set ${TOKEN_ENV}); without one the admin endpoint is disabled",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model runs, e.g. cuda or cuda:1 (requests are moved there, answers back to the host)",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=0.1,
        help="the interpreter's GIL switch interval in this process (docs/serving.md; Python's default is 5)",
    )
    p.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)


def scheduler_options_error(args: argparse.Namespace, style: str = "flag") -> Optional[str]:
    """What is wrong with the scheduler's and the request checks' options (argparse checks each
    one's type alone), or None: said before a model is loaded or a file is written. ``style``:
    how to name them, as options (``"flag"``: ``--max-batch``), as keyword arguments
    (``"keyword"``: ``max_batch``, ``workers``, as :class:`~eeruntime.serve.litserve_api.EarlyExitLitAPI`
    takes them) or as model-config.yaml's keys (``"config"``: ``max_batch``, ``scheduler_workers``)."""

    def name(attr: str) -> str:
        if style == "flag":
            return f"--{attr.replace('_', '-')}"
        return "workers" if style == "keyword" and attr == "scheduler_workers" else attr

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    from .scheduler import wait_ms_error  # (here: --help imports no torch)

    for attr in ("max_wait_ms", "max_defer_ms"):
        value = getattr(args, attr)
        bad = None if value is None else wait_ms_error(value)
        if bad:
            return f"{name(attr)} {bad}"
    # a bound that refuses every request (0 rows, no time) is a mistake, not a setting: refused
    # here rather than answering every request 413, 503 or 504
    for attr, what in (
        ("max_batch", "rows per stage step"),
        ("max_queue_rows", "rows admitted and not answered"),
        ("max_rows", "rows per request"),
    ):
        value = getattr(args, attr)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{name(attr)} must be an integer >= 1 (the most {what}), got {value!r}"
    if args.timeout_s is not None and not (number(args.timeout_s) and args.timeout_s > 0):
        return f"{name('timeout_s')} must be > 0 (seconds a request may take), got {args.timeout_s}"
    sw = args.scheduler_workers
    if isinstance(sw, bool) or not isinstance(sw, int) or sw < 1:
        return f"{name('scheduler_workers')} must be >= 1 (the scheduler's worker threads), got {sw!r}"
    shape = getattr(args, "input_shape", None)  # (eeruntime serve's and torchserve-archive's)
    if shape is not None:
        try:
            parse_shape(shape)
        except ValueError as e:
            return str(e)
    lengths = getattr(args, "pad_to", None)  # (a model's own check is the scheduler's, once loaded)
    if isinstance(lengths, str):
        try:
            parse_lengths(lengths)
        except ValueError as e:
            return str(e)
    policy = name("policy")
    if args.policy not in POLICIES:
        return f"{policy} must be one of {', '.join(POLICIES)}, got {args.policy!r}"
    if args.policy == "fill" and args.max_defer_ms:
        return (
            f"{name('max_defer_ms')} applies to {policy} deepest; {policy} fill already runs full batches first "
            f"and bounds how long rows are passed over by {name('max_wait_ms')}"
        )
    if args.policy == "request" and args.max_defer_ms:
        return (
            f"{name('max_defer_ms')} applies to {policy} deepest; {policy} request never re-batches survivors, "
            "so there is no deeper batch to fill"
        )
    return None


def add_scheduler_arguments(p: argparse.ArgumentParser) -> None:
    """The scheduler's and the request checks' options (also ``eeruntime torchserve-archive``'s)."""
    p.add_argument("--max-batch", type=int, default=32, help="most rows per stage step")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="how long a stage may wait for a fuller batch")
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="deepest",
        help="which stage runs next (docs/serving.md, 'Policy'): the deepest ready stage, 'fill' to keep "
        "every stage's batch full under load (rows passed over at most --max-wait-ms), or 'request': "
        "request-level batching (a batch gathered at stage 0 runs whole, survivors never re-batched)",
    )
    p.add_argument(
        "--max-defer-ms",
        type=float,
        default=None,
        help="policy 'deepest': how long a partial batch may be passed over for full ones once stage 0 holds a "
        "full batch (survivors then wait for the next stage-0 batches' and deeper batches fill); 0: never; "
        "default: 0, in `eeruntime serve` and a TorchServe archive (over HTTP it lost: docs/serving.md, "
        "'Over HTTP'); the scheduler's own default is 20 on a CPU and 0 on a GPU (docs/serving.md, 'Policy')",
    )
    p.add_argument(
        "--scheduler-workers",
        type=int,
        default=1,
        help="the scheduler's worker threads, which run batches at once from the same stage queues "
        "(docs/serving.md, 'Several workers'); on a CPU, leave them cores (torch's intra-op threads)",
    )
    p.add_argument(
        "--max-queue-rows", type=int, default=4096, help="rows admitted and not answered, at most (then 503)"
    )
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout")
    p.add_argument("--max-rows", type=int, default=256, help="rows per request, at most")
    p.add_argument("--input-shape", help="each row's shape, e.g. 1,8,8 (default: the first answered request's)")
    p.add_argument(
        "--pad-to",
        help="a text encoder's (attached with ee.attach_exits): sequence lengths, e.g. 32,64,128; each "
        "request is padded to the shortest that holds it so texts of different lengths share batches "
        "(docs/serving.md, 'Text models')",
    )


def parse_shape(text: str) -> tuple:
    """``"1,8,8"`` -> ``(1, 8, 8)``; a ValueError that says what is accepted otherwise."""
    accepted = f"--input-shape takes sizes >= 1 separated by commas (e.g. 1,8,8), got {text!r}"
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise ValueError(accepted) from None
    if not all(d >= 1 for d in shape):  # no request could match a shape with a size of 0 or less
        raise ValueError(accepted)
    return shape


def parse_lengths(text: str) -> list:
    """``"32,64"`` -> ``[32, 64]`` (the scheduler checks them); a ValueError saying what is accepted."""
    try:
        return [int(d) for d in text.split(",")]
    except ValueError:
        raise ValueError(f"--pad-to takes sequence lengths separated by commas, e.g. 32,64,128; got {text!r}") from None


def main(argv=None) -> int:
    if argv is not None and "--ray" in argv:  # the Ray Serve forms: eeruntime/serve/ray/cli.py
        from .ray.cli import main as ray_main

        return ray_main([a for a in argv if a != "--ray"])
    return run(parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    import eeruntime as ee
    from eeruntime.bundle import resolve_factory
    from eeruntime.user_inputs import load_model

    from .codec import InputSpec, model_float_dtype
    from .process import freeze_startup_objects, set_switch_interval
    from .scheduler import StageScheduler
    from .server import create_app

    token = os.environ.get(TOKEN_ENV)
    if args.admin_token_file:
        try:
            with open(args.admin_token_file) as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            print(f"eeruntime serve: --admin-token-file {args.admin_token_file}: cannot read it ({e})", file=sys.stderr)
            return 2
        if not token:  # an empty token would have turned the admin endpoint off without a word
            print(
                f"eeruntime serve: --admin-token-file {args.admin_token_file} is empty; put the token in it "
                f"(or leave the option out to run without the admin endpoint)",
                file=sys.stderr,
            )
            return 2
    if not 0 <= args.port <= 65535:
        print(f"eeruntime serve: --port must be in [0, 65535] (0: a free one), got {args.port}", file=sys.stderr)
        return 2
    if args.max_body_bytes < 1:
        print(f"eeruntime serve: --max-body-bytes must be >= 1, got {args.max_body_bytes}", file=sys.stderr)
        return 2
    if not 0 < args.switch_interval_ms < float("inf"):  # (Python takes inf, and sets it to 0)
        print(f"eeruntime serve: --switch-interval-ms must be > 0, got {args.switch_interval_ms}", file=sys.stderr)
        return 2
    bad = scheduler_options_error(args)
    if bad:
        print(f"eeruntime serve: {bad}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(
            f"eeruntime serve: --device {args.device!r} is not a device ({e}); e.g. cpu, cuda, cuda:1", file=sys.stderr
        )
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"eeruntime serve: --device {args.device} asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        source = args.model
        if args.weights is not None:
            # the factory's model with these weights, as `eeruntime calibrate` and `time` take
            # them (a runtime saved by `calibrate` holds thresholds, not the model's weights)
            source = load_model(args.model, args.weights, device)
        elif device.type != "cpu":
            factory = resolve_factory(args.model)
            source = lambda: factory().to(device)  # noqa: E731  (the bundle's weights are loaded into it there)
        rt = ee.load(args.bundle, source)
    except (ValueError, TypeError, OSError) as e:  # OSError: a file of the bundle unreadable (permissions)
        hint = ""
        if "holds no model weights" in str(e):
            hint = "; or give them with --weights FILE.safetensors (a state dict of the --model factory's model)"
        print(f"eeruntime serve: cannot load {args.bundle}: {e}{hint}", file=sys.stderr)
        return 2
    spec = None
    if args.input_shape is not None:  # checked above (scheduler_options_error)
        spec = InputSpec([parse_shape(args.input_shape)], dtype=model_float_dtype(rt.model))
    # Bind before the scheduler starts its threads, so --port 0 can say which port it got and a
    # port in use or a host that is not this machine's is said in a line, with nothing to stop.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:  # in use, no such host (socket.gaierror), not an address of this machine
        sock.close()
        print(
            f"eeruntime serve: cannot listen on --host {args.host} --port {args.port}: {e.strerror or e}",
            file=sys.stderr,
        )
        return 1
    try:
        pad_to = None if args.pad_to is None else parse_lengths(args.pad_to)
        sched = StageScheduler(
            rt,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            policy=args.policy,
            max_defer_ms=SERVE_MAX_DEFER_MS if args.max_defer_ms is None else args.max_defer_ms,
            max_queue_rows=args.max_queue_rows,
            timeout_s=args.timeout_s,
            workers=args.scheduler_workers,
            pad_to=pad_to,
        )
    except ValueError as e:  # (--pad-to: not lengths, or not a text model; the rest is checked above)
        sock.close()
        print(f"eeruntime serve: {e}", file=sys.stderr)
        return 2
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(
            sched, admin_token=token, max_body_bytes=args.max_body_bytes, max_rows=args.max_rows, input_spec=spec
        )
    except BaseException:
        sock.close()
        sched.close()
        raise
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL is bracketed
    print(
        f"eeruntime serve: {args.bundle} on http://{host}:{port} "
        f"(device {device}, max_batch={args.max_batch}, admin {'on' if token else 'off'})",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False))
    # the model, torch and the server are loaded: keep full GC collections from walking them
    # under load (eeruntime/serve/process.py says why; /stats shows the frozen count)
    freeze_startup_objects()
    set_switch_interval(args.switch_interval_ms / 1e3)
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again: both end
    # here as KeyboardInterrupt, after the app's shutdown has drained the scheduler.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sched.close()
    return 0

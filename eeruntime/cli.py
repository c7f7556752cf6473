"""The command line: ``eeruntime COMMAND [options]`` (console script) or ``python -m eeruntime``.

Commands are a registry: one function per command, decorated with :func:`command`, that adds its
options to the parser it is given and returns the function that runs them (``args -> exit code``).
Heavy imports belong inside that runner so ``eeruntime --help`` stays fast. Adding a command::

    @command("hello", "say hello")
    def _hello(p):
        p.add_argument("name")
        return lambda a: print(f"hello {a.name}") or 0

Exit codes: 0 done, 1 the command failed on what it was given (the message says what), 2 usage
(an unknown command or option, a bad argument).
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

PROG = "eeruntime"

Runner = Callable[[argparse.Namespace], Optional[int]]


@dataclass
class Command:
    name: str
    help: str
    configure: Callable[..., Any]  # (parser) -> Runner, or with raw: () -> main(argv) -> int
    raw: bool = False  # the command parses its own arguments: configure() returns main(argv) -> int


COMMANDS: Dict[str, Command] = {}


def command(name: str, help: str, raw: bool = False):
    """Register ``configure(parser) -> runner`` as the command ``name``; with ``raw``,
    ``configure()`` (no parser) returns a ``main(argv) -> int`` that parses its own arguments."""

    def register(configure):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, configure, raw)
        return configure

    return register


class CommandError(Exception):
    """A command cannot do what it was asked; the message says why (exit 1, no traceback)."""


def version_line() -> str:
    import torch

    from . import __version__, _ext

    ext = _ext.describe()
    return f"{PROG} {__version__} (torch {torch.__version__}, python {sys.version.split()[0]}; {ext})"


def usage() -> str:
    lines = [
        f"usage: {PROG} COMMAND [options]    ({PROG} COMMAND --help for a command's options)",
        f"       {PROG} --version",
        "",
        "commands:",
    ]
    width = max(len(c.name) for c in COMMANDS.values()) + 2
    lines += [f"  {c.name:<{width}}{c.help}" for c in COMMANDS.values()]
    return "\n".join(lines)


def _fail(msg: str, code: int) -> int:
    print(f"{PROG}: {msg}", file=sys.stderr)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return _fail("a command is needed", 2)
    first, rest = argv[0], argv[1:]
    if first in ("-h", "--help", "help"):
        print(usage())
        return 0
    if first in ("-V", "--version"):
        print(version_line())
        return 0
    if first not in COMMANDS:
        kind = "option" if first.startswith("-") else "command"
        close = difflib.get_close_matches(first.lstrip("-"), list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return _fail(f"unknown {kind} {first!r}{hint}; commands: {', '.join(COMMANDS)} (see {PROG} --help)", 2)
    cmd = COMMANDS[first]
    if cmd.raw:
        try:
            return int(cmd.configure()(rest) or 0)
        except SystemExit as e:  # its own argparse: --help (0) or a usage error (2, message printed)
            if isinstance(e.code, str):  # its own refusal, SystemExit("what was wrong"): not yet printed
                return _fail(e.code, 2)
            return int(e.code or 0)
    parser = argparse.ArgumentParser(prog=f"{PROG} {cmd.name}", description=cmd.help)
    runner = cmd.configure(parser)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message printed)
        return int(e.code or 0)
    try:
        return int(runner(args) or 0)
    except (CommandError, ValueError, OSError) as e:
        # What the user gave is wrong or missing (the messages say what), or a path it named cannot
        # be written or read (a file where a folder is wanted, no permission); anything else is a
        # bug and keeps its traceback.
        return _fail(f"{cmd.name}: error: {e}", 1)


def _finite(text: str) -> float:
    """An argparse type: a float that is a number (nan and inf reached ee.calibrate, which raised
    a TypeError with a traceback)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# ---------------------------------------------------------------- commands


@command("demo", "train, calibrate and time a 3-exit CNN on the bundled digits (a BranchyNet-style table)")
def _demo(p):
    from .demo import add_arguments, run_args

    add_arguments(p)
    return run_args


def _model_options(p, data_help: str) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="a function returning your ee.MultiExitModel (called with no arguments); the "
        "current directory is importable",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="FILE.safetensors",
        help="a state dict to load into the model (if the factory does not load its own)",
    )
    p.add_argument("--data", required=True, metavar="FILE|MODULE:FUNCTION", help=data_help)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: OMP_NUM_THREADS, else one fewer than the CPUs on machines of at most 4)",
    )


def _device(name):
    import torch

    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:  # torch's "Invalid device string", with a traceback before
        raise CommandError(f"--device {name!r} is not a device ({e}); e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: no CUDA device is available here")
    return dev


def _load(a, need_labels: bool):
    from .user_inputs import InputError, load_data, load_model

    try:
        dev = _device(a.device)
        model = load_model(a.model, a.weights, dev)
        x, y = load_data(a.data)
    except InputError as e:
        raise CommandError(str(e)) from None
    if need_labels and y is None:
        raise CommandError(f"--data {a.data!r} has no labels (y); calibration needs them")
    x = x.to(dev)
    _check_model_takes(model, x, a)
    return dev, model, x, None if y is None else y.to(dev)


def _check_model_takes(model, x, a) -> None:
    """Run the model on two rows of ``x``: data the model cannot take (another shape, channel
    count or dtype) is the user's to fix, said in a line, not a traceback from inside the model."""
    import torch

    from .oracle import plain_forward

    try:
        with torch.inference_mode():
            plain_forward(model, x[:2])
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CommandError(
            f"the model of --model {a.model!r} cannot run on the x of --data {a.data!r} "
            f"(rows of shape {list(x.shape[1:])}, {x.dtype}): {first}"
        ) from None


@command("calibrate", "choose thresholds for your model on your labelled data and save the runtime")
def _calibrate(p):
    from .calibrate import METHODS

    _model_options(
        p,
        "labelled calibration data: a .safetensors/.pt file with tensors x and y, or a "
        "function returning (x, y) or (x, y) batches",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the runtime (rt.save)")
    p.add_argument("--method", choices=METHODS, default="accuracy")
    p.add_argument(
        "--criterion",
        default="entropy",
        choices=["entropy", "max_prob", "margin", "norm_entropy"],
        help="ignored by --method budget, which learns its own",
    )
    p.add_argument(
        "--max-drop",
        type=_finite,
        default=0.01,
        help="accuracy/sweep: accuracy the thresholds may give up, as a fraction (0.01 = 1 point)",
    )
    p.add_argument(
        "--budget", type=_finite, default=None, help="budget: average cost as a fraction of the full model's, in (0, 1]"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also write the accuracy / cost frontier")
    p.add_argument("--no-progress", action="store_true")

    def run(a):
        from . import calibrate, plot
        from .threads import using_threads

        out = Path(a.out)
        if out.suffix != ".json" and out.exists() and not out.is_dir():  # said before calibrating, not after
            raise CommandError(f"--out {a.out}: is a file; give a directory (created if needed) or a *.json file name")
        with using_threads(a.threads):
            dev, model, x, y = _load(a, need_labels=True)
            budget = a.budget if a.method == "budget" else None
            if a.method == "budget" and budget is None:
                raise CommandError("--method budget needs --budget (a fraction of the full model's cost, e.g. 0.5)")
            cal = calibrate(
                model,
                (x, y),
                a.method,
                None if a.method == "budget" else a.criterion,
                max_drop=a.max_drop,
                budget=budget,
                batch_size=a.batch_size,
                progress=not a.no_progress,
            )
            rt = cal.runtime(model)
            path = rt.save(a.out)
        print(cal.summary())
        print(f"saved: {path} (load it with ee.load({str(a.out)!r}, model) or `{PROG} time {a.out} ...`)")
        if a.plot:
            plot.frontier(cal, a.plot)
            print(f"frontier plot: {a.plot}")
        return 0

    return run


@command("time", "time a saved runtime against the plain model on your data, side by side")
def _time(p):
    p.add_argument(
        "runtime",
        metavar="RUNTIME",
        help="a runtime saved by rt.save or `eeruntime calibrate`; one saved with weights=True runs its own "
        "weights in the --model factory's model (unless --weights is given)",
    )
    _model_options(
        p,
        "inputs: a .safetensors/.pt file with tensor x (and y for accuracy), or a function "
        "returning x, (x, y) or (x, y) batches",
    )
    p.add_argument("--batch", type=int, default=256, help="serving batch size")
    p.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")

    def run(a):
        import torch

        from .io import load
        from .oracle import plain_forward
        from .speed import PLAIN, measure
        from .threads import using_threads

        if a.batch < 1 or a.rounds < 1:
            raise CommandError(f"--batch and --rounds must be at least 1, got {a.batch} and {a.rounds}")
        with using_threads(a.threads) as threads:
            dev, model, x, y = _load(a, need_labels=False)
            # A bundle saved with weights=True (and no --weights): time the model it holds, loaded
            # into the one the factory built here (names and shapes checked). Passing the model as
            # it was timed and scored its freshly built weights (random, for most factories) with
            # the bundle's thresholds, and said nothing.
            own = a.weights is None and _has_model_weights(a.runtime)
            rt = load(a.runtime, (lambda: model) if own else model)
            res = rt.infer(x)
            speed = measure(model, {"runtime": rt}, x, a.batch, dev, rounds=a.rounds, oracle=False)
        fractions = torch.bincount(res.exit_index.cpu(), minlength=rt.num_exits).double() / x.shape[0]
        print(f"{'':<10}{'ms/sample':>11}{'speed-up':>10}{'accuracy':>10}")
        for name in (PLAIN, "runtime"):
            acc = "-"
            if y is not None:
                with torch.inference_mode():
                    logits = plain_forward(model, x) if name == PLAIN else res.logits
                acc = f"{100 * float((logits.argmax(1) == y).double().mean()):.2f}%"
            gain = "-" if name == PLAIN else f"{speed.speedup(name):.2f}x"
            print(f"{name:<10}{1e3 * speed.per_sample(name):>11.4f}{gain:>10}{acc:>10}")
        print(
            f"exits (%): {', '.join(f'{100 * f:.1f}' for f in fractions.tolist())}; "
            f"thresholds {list(rt.thresholds)} ({rt.criterion if isinstance(rt.criterion, str) else 'learned'})"
        )
        print(f"time: {speed.method()}; {threads} torch thread(s), device {dev}")
        return 0

    return run


def _has_model_weights(runtime) -> bool:
    """Whether the saved runtime at ``runtime`` holds its model's weights (``rt.save(path, weights=True)``)."""
    from .io import _paths, _read

    json_path, _ = _paths(runtime)
    return json_path.is_file() and _read(json_path).get("model") is not None


@command("bench", "run the benchmark suites of a source checkout (bench/) and write their report")
def _bench(p):
    p.add_argument(
        "--suites",
        default=None,
        metavar="DIR",
        help="the bench/ folder of an eeruntime checkout (default: the one beside this package)",
    )
    p.add_argument("-k", default=None, help="pytest -k expression selecting cases")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")

    def run(a):
        import os
        import subprocess

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        suites = a.suites or os.path.join(here, "bench")
        script = os.path.join(suites, "run_all.py")
        if not os.path.isfile(script):
            raise CommandError(
                f"no benchmark suites at {suites} (they ship with the source, not the installed package): "
                f"run it in a clone of the repository, or pass --suites PATH/TO/bench"
            )
        cmd = [sys.executable, script] + (["-k", a.k] if a.k else []) + (["--out", a.out] if a.out else [])
        return subprocess.call(cmd)

    return run


@command(
    "serve",
    "serve a saved runtime bundle over HTTP (stage scheduler; --ray: Ray Serve; needs the [serve] or [ray] extra)",
    raw=True,
)
def _serve():
    from .serve.cli import main  # argparse only; uvicorn / ray are imported when it runs

    return main


@command("torchserve-archive", "write a TorchServe model directory for a saved bundle (docs/serving.md)")
def _torchserve_archive(p):
    from .serve.torchserve_archive import add_arguments, run  # argparse and eeruntime only

    add_arguments(p)

    def go(a):
        try:
            return run(a)
        except (TypeError, ValueError, FileExistsError) as e:
            raise CommandError(str(e)) from None

    return go


@command("demo-vit", "the demo for a tiny 6-exit ViT, with PABEE per row vs whole batch", raw=True)
def _demo_vit():
    from .demo_vit import main

    return main

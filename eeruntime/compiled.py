"""``EERuntime(model, compile=True)``: each stage and exit head compiled once by ``torch.compile``.

The runtime's loop cannot be one traced graph: how many rows go on after each exit is data, read
on the host, and the next stage runs on exactly that many rows. So the runtime compiles the parts
that are plain tensor programs (every stage, every exit head), with the batch dimension marked
dynamic, and keeps the loop, the exit decisions, the packing and the stats bookkeeping eager
around them. One graph per part then serves every batch size >= 2; batches of 0 or 1 rows run
the part's eager module, because dynamo specialises sizes 0 and 1 (a graph for them would be a
recompile for no gain). ``torch.compile(rt.infer)`` is refused with a message that points here
(README.md, section "torch.compile").

A compiled :class:`~eeruntime.heads.ExitHead` does not tag its logits with its features (see
its docstring), so a confidence-head or gate criterion runs the head's body once more, eagerly.
"""

from __future__ import annotations

from typing import Any, Dict, Union

import torch
from torch import nn

INFER_NOT_TRACEABLE = (
    "torch.compile(rt.infer) is not supported: the early-exit loop reads on the host how many rows "
    "go on after each exit and runs the next stage on exactly those rows, so it cannot be one traced "
    "graph. Compile the stages and heads instead, once each with a dynamic batch: "
    "ee.EERuntime(model, ..., compile=True) (or compile={'mode': ..., 'backend': ...} for torch.compile options)."
)


@torch.compiler.disable(reason=INFER_NOT_TRACEABLE)
def _refuse_tracing():
    raise RuntimeError(INFER_NOT_TRACEABLE)


def refuse_if_traced() -> None:
    """Raise the message above when called while torch.compile traces the caller (dynamo runs a
    disabled function eagerly, so the error reaches the user, with or without fullgraph)."""
    if torch.compiler.is_compiling():
        _refuse_tracing()


def compile_options(compile: Union[bool, Dict[str, Any]]) -> Union[None, Dict[str, Any]]:
    """``False`` -> None; ``True`` -> {}; a dict of ``torch.compile`` keyword arguments as is."""
    if compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        bad = {"dynamic", "fullgraph"} & set(compile)
        if bad:
            raise ValueError(
                f"compile options {sorted(bad)} are set by the runtime (dynamic batch, graph breaks allowed)"
            )
        return dict(compile)
    raise TypeError(f"compile must be True, False or a dict of torch.compile options, got {type(compile).__name__}")


class CompiledPart:
    """A stage or head compiled with a dynamic batch dim; 0 or 1 rows run the eager module."""

    def __init__(self, module: nn.Module, options: Dict[str, Any]):
        self.module = module
        self.compiled = torch.compile(module, **options)

    def __call__(self, *state):
        if state[0].shape[0] < 2:
            return self.module(*state)
        for t in state:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return self.compiled(*state)


class CompiledModel:
    """What the runtime's loop walks with ``compile=True``: ``stages`` and ``exits`` as compiled
    parts of the user's model (which is not modified; its weights are shared, not copied)."""

    def __init__(self, model, options: Dict[str, Any]):
        self.model = model
        self.stages = [CompiledPart(m, options) for m in model.stages]
        self.exits = [CompiledPart(m, options) for m in model.exits]

    def matches(self, model) -> bool:
        """False once a stage or exit of ``model`` was replaced, added or removed."""
        return [p.module for p in self.stages] == list(model.stages) and [p.module for p in self.exits] == list(
            model.exits
        )

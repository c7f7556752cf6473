"""``MultiExitModel``: a classifier as a chain of stages, each followed by an exit head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Protocol, Sequence

import torch
from torch import nn

from .state import call, stage_forward

if TYPE_CHECKING:
    from .encoders import TokenLayout


class ModuleSeq(Protocol):
    """Modules by position: an ``nn.ModuleList``, a list or a tuple of modules."""

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> nn.Module: ...

    def __iter__(self) -> Iterator[nn.Module]: ...


class StagedModel(Protocol):
    """What the runtime walks (``EERuntime``, its executors, calibration): a :class:`MultiExitModel`
    or any object with ``stages`` and ``exits``, one exit after each stage (a protocol, so a
    duck-typed model type-checks as it runs)."""

    @property
    def stages(self) -> ModuleSeq: ...

    @property
    def exits(self) -> ModuleSeq: ...


def is_multi_exit(model: object) -> bool:
    """True for what the runtime, calibration, training and ``ee.load`` accept as a model: an
    ``nn.Module`` (they switch its modes, read its parameters and device) with ``stages`` and
    ``exits``. Each caller words its own error."""
    return isinstance(model, nn.Module) and hasattr(model, "stages") and hasattr(model, "exits")


def set_eval(model: nn.Module) -> Callable[[], None]:
    """Put ``model`` in eval mode; the returned callback gives every submodule back its own
    mode. (``model.train(was_training)`` would set them all to the model's flag: a BatchNorm the
    caller froze in a training model would train again, an MC-dropout layer stop sampling.)"""
    modes = {m: m.training for m in model.modules()}
    model.eval()

    def restore() -> None:
        for m, training in modes.items():
            m.training = training

    return restore


def model_device(model) -> Optional[torch.device]:
    """The device of a module's first parameter (or buffer); None for a module with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


class MultiExitModel(nn.Module):
    """Stages ``s_0 .. s_{K-1}`` and exits ``e_0 .. e_{K-1}``.

    Stage k maps the state of stage k-1 (the input for k = 0) to its own state; exit k maps stage
    k's state to logits [B, C]. A state is a tensor or a tuple of tensors sharing batch dim 0; a
    tuple is passed to the next module unpacked (``stage(*state)``). The last exit is the final
    classifier. ``model(x)`` runs every stage and returns the list of all exits' logits (training
    and evaluation alike); :class:`eeruntime.EERuntime` runs it with early exits.

    ``input_adapter`` (optional, set by ``attach_exits`` for HF encoders) turns a user's input
    (a dict, a ``BatchEncoding``, a tuple in the backbone's forward order) into stage 0's
    input; :meth:`prepare_input` applies it.
    """

    # Set by attach_exits only (a model built by hand has none of them): the split it made.
    split_points: List[str]
    split_mode: str
    token_layout: Optional[TokenLayout]

    def __init__(self, stages: Sequence[nn.Module], exits: Sequence[nn.Module], *, input_adapter=None):
        super().__init__()
        if input_adapter is not None and not callable(input_adapter):
            raise TypeError(
                f"input_adapter must be callable (input -> state of stage 0), got {type(input_adapter).__name__}"
            )
        # Maps what users pass (e.g. an HF model's dict of input_ids / attention_mask) to the
        # tensor or tuple that stage 0 takes; None: inputs are passed as they are.
        self.input_adapter = input_adapter
        stages, exits = list(stages), list(exits)
        if len(stages) != len(exits):
            raise ValueError(
                f"stages and exits must have the same length (one exit after each stage); "
                f"got {len(stages)} stages and {len(exits)} exits"
            )
        if len(stages) == 0:
            raise ValueError("a MultiExitModel needs at least one stage and its exit")
        for what, mods in (("stages", stages), ("exits", exits)):
            for i, m in enumerate(mods):
                if not isinstance(m, nn.Module):
                    raise TypeError(f"{what}[{i}] must be a torch.nn.Module, got {type(m).__name__}")
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def prepare_input(self, x):
        """Stage 0's input for a user's input ``x`` (the input adapter's result, or ``x``)."""
        adapter = getattr(self, "input_adapter", None)
        return adapter(x) if adapter is not None else x

    def forward(self, x) -> List[torch.Tensor]:
        outs = []
        state = self.prepare_input(x)
        for stage, head in zip(self.stages, self.exits):
            state = stage_forward(stage, state)
            outs.append(call(head, state))
        return outs

    def forward_until(self, x, k: int):
        """The state after stage ``k`` (0-based)."""
        state = self.prepare_input(x)
        for stage in self.stages[: k + 1]:
            state = stage_forward(stage, state)
        return state

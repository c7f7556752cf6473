"""What the runtime checks about the caller's model before each call.

- Every module runs in eval mode. ``EERuntime(model)`` switches the modules that are training and
  warns, naming them; a call that finds modules back in train mode (``backbone.train()`` after
  ``attach_exits``, ``model.stages[1].train()``) does the same. Checking only the top module's flag
  is not enough: a submodule in train mode would run BatchNorm on batch statistics and update its
  running buffers. The runtime does not switch the modules back after a call: calls may run on
  several threads at once, and a module switched back by one call would train inside another.
- The model has the stages and exits the runtime was built for: a stage or exit appended or
  removed later would otherwise be ignored or fail inside the loop. The thresholds are per exit,
  so the answer is a new ``EERuntime``, not a silent adoption.

The list of modules is cached and refreshed only when a module was registered anywhere since
(torch's global module-registration hook bumps a counter), so the per-call check is one pass over
the modules' ``training`` flags.
"""

from __future__ import annotations

import threading
import warnings
from typing import Dict, List, Optional, Sequence, Sized, Tuple, cast

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

_generation = 0
_hook = None
_hook_lock = threading.Lock()


def _bump(module, name, submodule):
    global _generation
    _generation += 1
    return None


def _install() -> None:
    global _hook
    with _hook_lock:
        if _hook is None:
            _hook = register_module_module_registration_hook(_bump)


def _has_mode(m: nn.Module) -> bool:
    """Does ``m`` have a training flag? A frozen TorchScript module (``torch.jit.freeze``) has
    none: it runs inference only. Asked once, when the guard lists the modules, so the check at
    every call reads each listed flag directly."""
    return hasattr(m, "training")


def eval_everywhere(model: nn.Module, modules: List[Tuple[str, nn.Module]], when: str) -> List[str]:
    """Switch every training module of ``modules`` to eval mode; warn naming them. Returns their names."""
    training = [name or type(model).__name__ for name, m in modules if m.training]
    if not training:
        return []
    for _, m in modules:
        m.training = False  # not m.eval(): that would recurse into each child again
    shown = ", ".join(training[:8]) + (f" and {len(training) - 8} more" if len(training) > 8 else "")
    warnings.warn(
        f"{when}: put {len(training)} module(s) in eval mode ({shown}); the runtime runs inference only "
        "(BatchNorm uses its running statistics, dropout is off) and leaves the model in eval mode. Call "
        "model.train() yourself to train it again.",
        UserWarning,
        stacklevel=4,
    )
    return training


class ModelGuard:
    """Per-runtime record of the model's structure; :meth:`check` runs at the start of every call."""

    def __init__(self, model: nn.Module, num_exits: int):
        _install()
        self.model = model
        self.num_exits = num_exits
        self._refresh()
        eval_everywhere(model, self._modules, "EERuntime(model)")

    def _refresh(self) -> None:
        self._generation = _generation
        self._modules = [(name, m) for name, m in self.model.named_modules() if _has_mode(m)]
        self._stage_modules: Dict[int, List[nn.Module]] = {}

    def _modules_of(self, k: int) -> List[nn.Module]:
        """The modules stage ``k`` and exit ``k`` run (cached like the model's list)."""
        mods = self._stage_modules.get(k)
        if mods is None:
            stages, exits = cast(Sequence[nn.Module], self.model.stages), cast(Sequence[nn.Module], self.model.exits)
            mods = self._stage_modules[k] = [m for m in (*stages[k].modules(), *exits[k].modules()) if _has_mode(m)]
        return mods

    def check(self, stage: Optional[int] = None) -> None:
        """Refuse a changed structure, and switch modules found training to eval (warning): all
        of them, or with ``stage``, only if one of stage ``stage``'s or exit ``stage``'s modules
        is (a stage step runs nothing else; a serving worker checks before every step)."""
        model = self.model
        K = self.num_exits
        stages, exits = cast(Sized, model.stages), cast(Sized, model.exits)  # ModuleLists of a MultiExitModel
        if len(stages) != K or len(exits) != K:
            raise RuntimeError(
                f"this EERuntime was built for {K} exits but the model now has {len(stages)} stages and "
                f"{len(exits)} exits (changed after the runtime was built); build a new "
                f"ee.EERuntime(model, thresholds=...) with one threshold per early exit"
            )
        if self._generation != _generation:
            self._refresh()
        if stage is not None:
            if any(m.training for m in self._modules_of(stage)):
                eval_everywhere(model, self._modules, "EERuntime call")
            return
        for _, m in self._modules:
            if m.training:
                eval_everywhere(model, self._modules, "EERuntime call")
                return

"""Exit heads: what ``attach_exits`` puts after each stage, and where confidence heads and gates live.

Every default head is an :class:`ExitHead`: a *body* turns the stage's state into a feature
vector [B, D], a *classifier* turns the features into logits [B, C], and two optional one-unit
heads read the same features:

- ``confidence_head`` (PTEE): ``confidence(state) = sigmoid(w . features + b)`` [B], trained by
  :func:`eeruntime.train.post_train` to predict that this exit's prediction is right;
- ``gate_head`` (differentiable branching): ``gate(state) = g_b = sigmoid(w . features + b)`` [B],
  trained by :func:`eeruntime.train.differentiable`; at inference a sample exits when g_b >= T.

``forward`` returns the logits only, so a head with a confidence head or a gate is still a plain
exit for :class:`eeruntime.MultiExitModel` and :class:`eeruntime.EERuntime`. Both one-unit heads
are submodules, so they are saved and loaded with the model's ``state_dict``
(keys ``exits.<k>.confidence_head.*`` and ``exits.<k>.gate_head.*``).

Any other module can become an ``ExitHead`` with :func:`wrap_head`: its output (the logits) is
then the feature vector and the classifier is the identity.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ExitHead",
    "PoolLinearHead",
    "ConvHead",
    "SequenceHead",
    "GlobalPool",
    "TokenPool",
    "wrap_head",
    "equip_heads",
]
TOKEN_POOLS = ("cls", "mean", "last")


class GlobalPool(nn.Module):
    """Average over every spatial dimension: [B, C, *S] -> [B, C] (channels first, like conv
    feature maps), or with ``channels_last`` [B, *S, C] -> [B, C] (Swin's maps); a [B, C] input
    passes through. When the state is a tuple, only its first member is pooled (the others, e.g.
    a residual branch carried across an fx split, belong to the next stage)."""

    def __init__(self, channels_last: bool = False):
        super().__init__()
        self.channels_last = bool(channels_last)

    def forward(self, x, *rest):
        if x.dim() <= 2:
            return x
        first = 1 if getattr(self, "channels_last", False) else 2  # (a GlobalPool pickled before it had one)
        return x.mean(dim=tuple(range(first, first + x.dim() - 2)))

    def extra_repr(self) -> str:
        return "channels_last=True" if getattr(self, "channels_last", False) else ""


class TokenPool(nn.Module):
    """Pool a token state [B, S, H] (tokens first, features last, as transformer encoders give
    them) to [B, H]: ``"cls"`` takes token 0 (BERT's [CLS], ViT's class token); ``"mean"``
    averages the real tokens; ``"last"`` takes each row's last real token (a decoder's: with
    causal attention it is the one that has seen the whole text; the last column without a
    mask, token 0 for a row with no real token). The mask is member ``mask_index`` of the state tuple (None: every
    token is real); ``padding_mask=True`` reads it as torch's ``key_padding_mask`` (True = pad),
    else as HF's ``attention_mask`` (non-zero = real). Padded tokens never reach the result:
    they are selected out, not multiplied by 0, so even a NaN there cannot leak in."""

    def __init__(self, pool: str = "cls", mask_index: Optional[int] = None, padding_mask: bool = False):
        super().__init__()
        if pool not in TOKEN_POOLS:
            raise ValueError(f"unknown token pool {pool!r}; accepted: {', '.join(map(repr, TOKEN_POOLS))}")
        if mask_index is not None and int(mask_index) < 1:
            raise ValueError(
                f"mask_index is the mask's position in the state tuple (>= 1, the tokens are 0), got {mask_index}"
            )
        self.pool = pool
        self.mask_index = None if mask_index is None else int(mask_index)
        self.padding_mask = bool(padding_mask)

    def forward(self, x, *rest):
        if x.dim() != 3:
            raise ValueError(f"a token head needs a [B, S, H] state, got shape {tuple(x.shape)}")
        if self.pool == "cls":
            return x[:, 0]
        if self.mask_index is None:
            return x[:, -1] if self.pool == "last" else x.mean(dim=1)
        if len(rest) < self.mask_index:
            raise ValueError(
                f"the token head reads the mask at state position {self.mask_index}, but the state has {len(rest) + 1} member(s)"
            )
        mask = rest[self.mask_index - 1]
        if self.pool == "last":
            real = ~mask.bool() if self.padding_mask else mask != 0
            last = (real * torch.arange(x.shape[1], device=x.device)).amax(dim=1) if x.shape[1] else real.sum(1)
            return x[torch.arange(x.shape[0], device=x.device), last]
        real = ~mask.bool() if self.padding_mask else mask != 0
        real = real.unsqueeze(-1)
        total = torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
        return total / real.sum(dim=1).clamp_min(1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}, mask_index={self.mask_index}, padding_mask={self.padding_mask}"


class _AdaptivePool(nn.Module):
    """Adaptive average pool of a [B, C, *S] map to ``size`` per spatial dim, flattened to [B, C * size^n]."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x):
        n = x.dim() - 2
        if n < 1 or n > 3:
            raise ValueError(
                f"ConvHead needs a [B, C, *spatial] map with 1 to 3 spatial dims, got shape {tuple(x.shape)}"
            )
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[n - 1]
        return torch.flatten(pool(x, self.size), 1)


class _FirstOf(nn.Module):
    """Run ``module`` on the first member of a state and drop the rest."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x, *rest):
        return self.module(x)


class ExitHead(nn.Module):
    """body: state -> features [B, D]; classifier: features -> logits [B, C]; optional
    ``confidence_head`` / ``gate_head``: Linear(D, 1), read through a sigmoid.

    ``forward(*state)`` returns the logits. ``confidence(*state)`` and ``gate(*state)`` return
    float [B] values in (0, 1). ``parts(*state)`` returns ``(logits, confidence_logit,
    gate_logit)`` from one pass of the body (the training methods use it; the missing ones are
    None).

    Inference reuse: the runtime calls ``forward`` and then the criterion (``confidence`` or
    ``gate``, through :class:`eeruntime.train.HeadScorer`) with the logits ``forward`` returned.
    Without autograd, ``forward`` tags the logits tensor it returns with the features they came
    from, and ``confidence(*state, logits=those logits)`` reads them from the tag instead of running
    the body again, so a conv body runs once per exit. The features belong to the logits object,
    not to the state: an input buffer changed in place between two calls (inference tensors have
    no version counter to tell) can never bring back an earlier batch's features, the head holds
    no state between calls, and threads sharing a head cannot see each other's. ``forward`` under
    ``torch.compile`` tags nothing (the criterion then runs the body itself).
    """

    def __init__(
        self, body: nn.Module, classifier: nn.Module, feature_dim: int, *, confidence: bool = False, gate: bool = False
    ):
        super().__init__()
        if int(feature_dim) < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim}")
        self.body = body
        self.classifier = classifier
        self.feature_dim = int(feature_dim)
        self.confidence_head: Optional[nn.Module] = None
        self.gate_head: Optional[nn.Module] = None
        if confidence:
            self.add_confidence_head()
        if gate:
            self.add_gate()

    # ---------------------------------------------------------------- one-unit heads
    def _unit(self) -> nn.Linear:
        ref = next(iter(self.parameters()), None)
        lin = nn.Linear(self.feature_dim, 1)
        if ref is not None:
            lin = lin.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
        return lin

    def add_confidence_head(self) -> nn.Module:
        """Create the confidence head if it is missing; return it."""
        if self.confidence_head is None:
            self.confidence_head = self._unit()
        return self.confidence_head

    def add_gate(self) -> nn.Module:
        """Create the gate if it is missing; return it."""
        if self.gate_head is None:
            self.gate_head = self._unit()
        return self.gate_head

    @property
    def has_confidence(self) -> bool:
        return self.confidence_head is not None

    @property
    def has_gate(self) -> bool:
        return self.gate_head is not None

    # ---------------------------------------------------------------- features
    def features(self, *state) -> torch.Tensor:
        return self.body(*state)

    def forward(self, *state) -> torch.Tensor:
        feats = self.body(*state)
        logits = self.classifier(feats)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            _tag(logits, self, feats, state)
        return logits

    def parts(self, *state):
        f = self.features(*state)
        conf = self.confidence_head(f).squeeze(-1) if self.confidence_head is not None else None
        gate = self.gate_head(f).squeeze(-1) if self.gate_head is not None else None
        return self.classifier(f), conf, gate

    def _features_of(self, state, logits: Optional[torch.Tensor]) -> torch.Tensor:
        tag = getattr(logits, _FEATURES, None) if logits is not None else None
        if tag is not None and tag[0]() is self:
            return logits if tag[1] is _SAME else tag[1]
        return self.body(*state)

    def confidence(self, *state, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sigmoid(confidence head(features)) [B]; ``logits``: what ``forward`` returned for this
        state, whose features are then reused."""
        if self.confidence_head is None:
            raise RuntimeError("this exit head has no confidence head; create it with add_confidence_head()")
        return torch.sigmoid(self.confidence_head(self._features_of(state, logits)).squeeze(-1))

    def gate(self, *state, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sigmoid(gate(features)) [B]; ``logits`` as in :meth:`confidence`."""
        if self.gate_head is None:
            raise RuntimeError("this exit head has no gate; create it with add_gate()")
        return torch.sigmoid(self.gate_head(self._features_of(state, logits)).squeeze(-1))


# The attribute ExitHead.forward sets on the logits it returns: (weak ref to the head, features).
_FEATURES = "_eeruntime_exit_features"
_SAME = object()  # the features are the logits themselves (an identity classifier)


def _tag(logits: torch.Tensor, head: ExitHead, feats: torch.Tensor, state) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(feats, torch.Tensor):
        return
    if logits is not feats and (feats._base is not None or any(feats is s for s in state)):
        # Features that are the state or a view of it cost nothing to recompute, and holding them
        # would keep a reference to the stage's output (the runtime could not pack it in place).
        return
    try:
        setattr(logits, _FEATURES, (weakref.ref(head), _SAME if logits is feats else feats))
    except (AttributeError, TypeError):  # a tensor subclass without a __dict__
        pass


class PoolLinearHead(ExitHead):
    """Global average pool + linear: the smallest exit (BranchyNet-style). ``channels_last``:
    the maps are [B, *S, C] (see :class:`GlobalPool`)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels_last: bool = False,
        confidence: bool = False,
        gate: bool = False,
    ):
        super().__init__(
            GlobalPool(channels_last),
            nn.Linear(in_channels, num_classes),
            in_channels,
            confidence=confidence,
            gate=gate,
        )


class SequenceHead(ExitHead):
    """Exit for a transformer encoder's token state [B, S, H] (+ mask): pool the tokens
    (:class:`TokenPool`: the CLS token or the masked mean; the features), then LayerNorm and
    linear (the classifier). The pooled
    width is H, the features axis; a plain pool-linear head on such a state would average
    over H and classify along the tokens, which is never what is meant."""

    def __init__(
        self,
        hidden_size: int,
        num_classes: int,
        *,
        pool: str = "cls",
        mask_index: Optional[int] = None,
        padding_mask: bool = False,
        confidence: bool = False,
        gate: bool = False,
    ):
        classifier = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, num_classes))
        super().__init__(
            TokenPool(pool, mask_index, padding_mask), classifier, hidden_size, confidence=confidence, gate=gate
        )


class ConvHead(ExitHead):
    """PTEE-style branch: ``blocks`` x (conv 3x3 -> BatchNorm -> ReLU) of ``width`` channels
    (default: the input's), adaptive average pool to ``pool_size`` per spatial dim, flatten,
    linear. ``dims`` is the number of spatial dims of the state (2 for images). The default
    ``pool_size=2`` keeps a coarse layout: early features pooled to one value per channel lose
    the "where" that early layers are good at. Measured once on the digits CNN's first stage
    (8 channels, 8x8) after post-training: pool 1 gave 59% (width 8) / 83% (width 32) test
    accuracy, pool 2 gave 92% / 96%."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width: Optional[int] = None,
        blocks: int = 1,
        pool_size: int = 2,
        dims: int = 2,
        confidence: bool = False,
        gate: bool = False,
    ):
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3 spatial dims, got {dims}")
        if blocks < 1 or pool_size < 1:
            raise ValueError(f"blocks and pool_size must be >= 1, got blocks={blocks}, pool_size={pool_size}")
        width = int(width or in_channels)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
        layers, cin = [], in_channels
        for _ in range(blocks):
            layers += [conv(cin, width, 3, padding=1, bias=False), bn(width), nn.ReLU()]
            cin = width
        layers.append(_AdaptivePool(pool_size))
        feature_dim = width * pool_size**dims
        super().__init__(
            _FirstOf(nn.Sequential(*layers)),
            nn.Linear(feature_dim, num_classes),
            feature_dim,
            confidence=confidence,
            gate=gate,
        )


def wrap_head(module: nn.Module, num_classes: int, *, confidence: bool = False, gate: bool = False) -> ExitHead:
    """Make any exit module an :class:`ExitHead`: its logits are the features, the classifier is
    the identity, and a confidence head or gate reads the logits. An ``ExitHead`` is returned
    as it is (with the requested one-unit heads added)."""
    if isinstance(module, ExitHead):
        head = module
    else:
        if not isinstance(module, nn.Module):
            raise TypeError(f"an exit head must be a torch.nn.Module, got {type(module).__name__}")
        head = ExitHead(module, nn.Identity(), num_classes)
    if confidence:
        head.add_confidence_head()
    if gate:
        head.add_gate()
    return head


def equip_heads(
    model, *, confidence: bool = False, gate: bool = False, num_classes: Optional[int] = None, example=None
) -> Sequence[int]:
    """Give every early exit of ``model`` a confidence head and/or a gate, wrapping exits that are
    not :class:`ExitHead` with :func:`wrap_head` (their ``state_dict`` keys move under
    ``exits.<k>.body.``). ``num_classes`` (or ``example``, run through the model once) sizes the
    one-unit heads of wrapped exits. Returns the indices of the exits that changed."""
    from .state import call, stage_forward

    if not (confidence or gate):
        return []
    missing = [
        k
        for k, e in enumerate(list(model.exits)[:-1])
        if not isinstance(e, ExitHead) or (confidence and not e.has_confidence) or (gate and not e.has_gate)
    ]
    if not missing:
        return []
    if any(not isinstance(model.exits[k], ExitHead) for k in missing) and num_classes is None:
        if example is None:
            raise ValueError("wrapping a plain exit module needs num_classes or an example input to find it")
        was = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                state = example
                for stage in model.stages:
                    state = stage_forward(stage, state)
                num_classes = int(call(model.exits[-1], state).shape[-1])
        finally:
            for m, t in was.items():
                m.training = t
    ref = next(iter(model.parameters()), None)
    for k in missing:
        head = model.exits[k]
        if not isinstance(head, ExitHead):
            wrapped = wrap_head(head, num_classes)
            wrapped.train(head.training)
            model.exits[k] = head = wrapped
        if confidence:
            head.add_confidence_head().train(head.training)
        if gate:
            head.add_gate().train(head.training)
        if ref is not None:
            head.to(ref.device)  # a head without parameters of its own got its new units on the default device
    return missing

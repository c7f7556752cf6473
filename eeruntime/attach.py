"""``attach_exits``: turn a trained backbone into a :class:`~eeruntime.MultiExitModel`.

The backbone is cut at the named split points into stages; an exit head follows each stage, and
the backbone's own tail (its classifier and the parameter-free ops just before it, e.g. avgpool +
flatten + fc) is the final exit. Running every exit of the result gives the backbone's output at
the final exit, bit for bit: the stages and the tail run the backbone's own modules, in its order,
with the same ops (checked on a dry run).

Two ways to cut:

- ``children``: for modules whose children run in order. ``nn.Sequential`` always qualifies; a
  nested ``nn.Sequential`` child is opened when a split point names one of its children
  (``"features.10"``). Other modules qualify when running their children in order gives their
  output exactly on the dry run. Torchvision-style classifiers (ResNet, VGG, AlexNet) flatten in
  ``forward`` just before the classifier: a ``Flatten(1)`` is inserted where a child whose first
  layer is ``nn.Linear`` gets a map of more than two dims whose last dim does not fit it but whose
  flattened size does.
- ``fx``: ``torch.fx.symbolic_trace`` and split the graph at named nodes. A split point is a node
  name (``"layer1_0_relu_1"``) or the qualified name of a submodule that ``forward`` calls once
  (``"layer1"``; it is traced as one node). When values other than the split node are still
  needed later (a residual input), the state is a tuple: the split node's value first, then those
  values; default heads read the first member only.

The tail starts after the last parametrised layer before the classifier (the last layer with
parameters); in ``fx`` mode, at the first node from there on whose value alone flows on. Split
points must lie before the tail and leave at least one layer for the last stage.

The result *shares* the backbone's modules (training it trains the backbone; pass ``copy=True``
to work on a deep copy). The backbone itself is not changed: no module is replaced, wrapped or
re-registered, and its train/eval mode is restored after the dry run.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import functools
import operator
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Literal,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
    overload,
)

import torch
from torch import fx, nn

from . import encoders
from .encoders import TokenLayout, output_logits
from .heads import TOKEN_POOLS, ConvHead, PoolLinearHead, SequenceHead, wrap_head
from .model import MultiExitModel
from .state import State, as_tuple, call, stage_forward

MODES = ("auto", "children", "fx")
_NOT_A_NODE = "is not a node or submodule called by forward"
HEADS = ("auto", "pool_linear", "conv") + TOKEN_POOLS
_MAX_LISTED = 60

HeadSpec = Union[str, Callable[..., nn.Module], Sequence[nn.Module], nn.ModuleList]
# A backbone's input for the dry run: a tensor, a tuple (or list) of tensors, or for HF models what
# they take (a dict, a BatchEncoding); checked when used.
ExampleInput = Any
Points = List[Tuple[str, Tuple[int, ...]]]  # valid split points with their state shapes (points_only)


def attach_exits(
    backbone: nn.Module,
    at: Union[str, Sequence[str]],
    num_classes: Optional[int] = None,
    *,
    head: HeadSpec = "auto",
    example_input: ExampleInput = None,
    confidence: bool = False,
    gates: bool = False,
    mode: str = "auto",
    copy: bool = False,
    trim: bool = False,
) -> MultiExitModel:
    """Split ``backbone`` at ``at`` and put an exit after each split.

    Args:
        backbone: a trained classifier returning logits [B, C] (or an HF ``ModelOutput`` / a dict
            with ``logits``, or a tuple whose first member is the logits). HF encoders (BERT,
            RoBERTa, DistilBERT, ALBERT, ELECTRA, DeBERTa, MPNet, ModernBERT, ViT, ...), HF
            decoder sequence classifiers (GPT-2, Llama, Qwen2, Mistral: causal attention, the
            ``score`` head on each row's last real token; exit heads pool that token too) and
            timm ViTs are cut between their layers (see :mod:`eeruntime.encoders`); an HF base
            model without a classifier needs ``num_classes``. Other HF models (other decoder
            families, language-model heads, ...) are refused with why and what is supported.
        at: the split points, in forward order: child names (``"layer1"``, ``"features.10"``),
            fx node names (``"layer1_1_relu_1"``) or torchvision's dotted node names
            (``"layer1.1.relu_1"``), submodule names, or an encoder's layers
            (``"bert.encoder.layer.3"``, ``"encoder.layer.3"``, ``"blocks.3"``; a split point
            ends the stage after that layer). :func:`split_points` lists them.
        num_classes: the classes of every exit; default: the backbone's output width. A value
            that differs from it replaces the backbone's classifier (its last ``nn.Linear``, or
            1x1 convolution) in the final exit with a new one for fine-tuning; the backbone keeps
            its own.
        head: ``"auto"`` (``"pool_linear"`` for feature maps, a token head for a transformer's
            [B, S, H] states), ``"pool_linear"`` (global average pool + linear; on tokens: the
            masked mean; on the [B, H, W, C] maps of Swin-like models, timm's ``output_fmt="NHWC"``,
            the mean over H and W), ``"conv"`` (PTEE branch: conv 3x3 + BN + ReLU, pool, linear), ``"cls"``
            / ``"mean"`` / ``"last"`` (token heads: CLS token, masked mean or last real token,
            LayerNorm, linear; decoders' default is ``"last"``, and ``"cls"`` is refused on them:
            token 0 has seen only itself), a factory
            ``head(state_shape, num_classes) -> nn.Module`` (``state_shape`` is the split value's
            shape without the batch dim, from the dry run on ``example_input``, which it
            therefore requires), or a sequence of ready modules, one per split point.
        example_input: a batch of 2 or more rows the backbone accepts (a tensor, a tuple of
            tensors, or for HF models a dict / ``BatchEncoding``); used for the dry run that finds
            the heads' input shapes and checks the split (and, in fx mode, which values carry
            the batch dim). When omitted, a random batch is made from the backbone's first layer
            (Conv1d/2d/3d at 32 per spatial dim, or Linear) or an encoder's config.
        confidence: give each early exit a PTEE confidence head (see :mod:`eeruntime.heads`).
        gates: give each early exit a differentiable-branching gate.
        mode: ``"auto"`` (``children`` for ``nn.Sequential`` and for modules whose children
            reproduce the output on the dry run, ``fx`` otherwise), ``"children"`` or ``"fx"``;
            ignored for encoders.
        copy: work on ``copy.deepcopy(backbone)`` instead of sharing its modules.
        trim: for HF text encoders and decoders, each stage after the first cuts the packed
            survivors' sequence axis to the longest real sequence among them
            (:func:`eeruntime.encoders.trim_tokens`; results unchanged: a decoder's causal
            attention never reads a later column, with right or left padding; refused for rotary
            scaling that follows the sequence length, dynamic or longrope). Off by default:
            a caller that concatenates stage states of several batches (``cat_rows``) needs them
            the same length.
            :func:`eeruntime.encoders.set_trim` switches it later.

    Returns:
        a ``MultiExitModel`` with ``len(at) + 1`` exits, on the backbone's device. It records the
        split in ``model.split_points`` and ``model.split_mode`` (``"encoder"`` for encoders), and
        for encoders the input adapter (``model.input_adapter``: dict / tuple / tensor inputs to
        the tuple stage 0 takes) and the token layout (``model.token_layout``).
    """
    _check_backbone(backbone)
    names = _check_at(at)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(map(repr, MODES))}")
    if num_classes is not None:
        num_classes = _check_num_classes(num_classes)
    custom_factory = callable(head) and not isinstance(head, (str, nn.Module))
    if custom_factory and example_input is None:
        raise ValueError(
            "a head factory gets the state shapes from a dry run: pass example_input=<a batch the backbone accepts>"
        )
    if copy:
        backbone = _copy.deepcopy(backbone)

    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        with torch.no_grad():
            layers = encoders.encoder_layers(backbone)
            if layers is None and encoders.is_hf_model(backbone):
                raise encoders.unsupported(backbone, encoders.why_not_hf(backbone))
            if layers is not None:
                built = _build_encoder(backbone, layers, names, example_input)
            else:
                built = _build_generic(backbone, names, example_input, mode)
            C, tail = built.classes, built.split.tail
            if num_classes is not None and C is not None and tail is not None and num_classes != C:
                # checked on the dry run, so in eval mode: a BatchNorm of the tail keeps its statistics
                built.split.tail = _new_classifier(tail, num_classes, backbone, C, built.states[-1])
    finally:
        for m, t in modes.items():
            m.training = t

    C, tail = built.classes, built.split.tail
    if num_classes is None:
        if C is None:
            raise ValueError(
                f"{type(backbone).__name__} has no classifier (it returns no logits): pass num_classes=<number of classes>"
            )
        num_classes = C
    nhwc = (_channels_last_maps(backbone), built.image_size)
    if C is None or tail is None:  # a base encoder (no classifier, no logits): the final exit is a new token head
        tail = _make_heads(head, built.states[-1:], num_classes, ["(final exit)"], built.layouts[-1:], nhwc)[0]

    heads = _make_heads(head, built.states[:-1], num_classes, names, built.layouts[:-1], nhwc)
    ref = next(iter(backbone.parameters()), None)
    for k, h in enumerate(heads):
        if confidence or gates:
            h = heads[k] = wrap_head(h, num_classes, confidence=confidence, gate=gates)
        if ref is not None:
            h.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
    if ref is not None and C is None:
        tail.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
    model = MultiExitModel(built.split.stages, heads + [tail], input_adapter=built.input_adapter)
    shared = set(backbone.modules())
    for m in model.modules():  # new containers and heads follow the backbone; its own modules keep their modes
        if m not in shared:
            m.training = backbone.training
    model.split_points = list(names)
    model.split_mode = built.mode
    model.token_layout = built.layouts[0] if built.layouts and built.layouts[0] is not None else None
    layout = model.token_layout
    if trim and (layout is None or layout.mask_index is None or encoders.set_trim(model, True) == 0):
        raise ValueError(
            "trim=True applies to HF text encoders (their stages carry an attention mask); this model has none"
        )
    return model


@dataclass(frozen=True)
class SplitPoint:
    """A valid split point: ``name`` (pass it in ``at``) and ``shape``, the state there without
    the batch dim (its first member for a tuple state), from a dry run."""

    name: str
    shape: Tuple[int, ...]


def split_points(backbone: nn.Module, example_input: ExampleInput = None, mode: str = "auto") -> List[SplitPoint]:
    """The split points ``attach_exits(backbone, at=...)`` accepts, in forward order, with the
    state's shape at each (like timm's ``feature_info``). Encoders list their layers; other
    backbones list their children (``mode="children"``, the default when they run in order) or
    every splittable graph node by torchvision's dotted names (``mode="fx"``)."""
    _check_backbone(backbone)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(map(repr, MODES))}")
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        with torch.no_grad():
            names = encoders.encoder_layers(backbone)
            if names is None and encoders.is_hf_model(backbone):
                raise encoders.unsupported(backbone, encoders.why_not_hf(backbone))
            if names is not None:
                built = _build_encoder(backbone, names, names[:-1], example_input)
                return [SplitPoint(n, tuple(as_tuple(s)[0].shape[1:])) for n, s in zip(names[:-1], built.states)]
            probe = _as_input(example_input) if example_input is not None else _probe_input(backbone)
            expected = output_logits(call(backbone, probe))
            if expected is None or expected.dim() != 2:
                raise ValueError("the backbone must return logits [B, C] (a tensor, or an output with .logits)")
            children = mode == "children" or (
                mode == "auto"
                and (isinstance(backbone, nn.Sequential) or _children_in_order(backbone, probe, expected))
            )
            if children:
                points = _split_children(backbone, [], probe, expected, points_only=True)
            else:
                points = _split_fx(backbone, [], probe, expected, points_only=True)
            return [SplitPoint(n, s) for n, s in points]
    finally:
        for m, t in modes.items():
            m.training = t


@dataclass
class _Built:
    split: _Split
    states: List[State]  # the dry run's state after each stage
    layouts: List[Optional[TokenLayout]]  # per state: a TokenLayout for token states, else None
    classes: Optional[int]  # the backbone's output width (None: it returns no logits)
    mode: str
    input_adapter: Optional[Callable[..., State]] = None
    image_size: Optional[Tuple[int, ...]] = None  # the dry run's image size (H, W) for a [B, C, H, W] input


def _build_generic(backbone: nn.Module, at: Sequence[str], example_input: ExampleInput, mode: str) -> _Built:
    probe = _as_input(example_input) if example_input is not None else _probe_input(backbone)
    try:
        raw = call(backbone, probe)
    except Exception as e:
        if example_input is not None:
            raise
        raise ValueError(
            f"the backbone does not run on a guessed input of shape {tuple(as_tuple(probe)[0].shape)} "
            f"({type(e).__name__}: {e}); pass example_input=<a batch the backbone accepts>"
        ) from e
    expected = output_logits(raw)
    if expected is None or expected.dim() != 2:
        what = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(raw).__name__
        raise ValueError(
            f"the backbone must return logits [B, C] (a tensor, or an output with .logits); it returned {what}"
        )
    try:
        split, used = _split(backbone, at, probe, expected, mode)
    except ValueError as e:
        hooks = len(backbone._forward_hooks) + len(backbone._forward_pre_hooks)
        if hooks and "does not reproduce" in str(e):
            raise ValueError(
                f"{e}; {type(backbone).__name__} has {hooks} forward hook(s) on {type(backbone).__name__} itself, "
                "which run around its forward but never in its stages: remove them before attaching (hooks on "
                "its submodules are kept and run)"
            ) from None
        raise
    assert split.tail is not None  # the children and fx splits always keep the backbone's own tail
    if not isinstance(raw, torch.Tensor):
        split.tail = encoders.LogitsOf(split.tail)
    states = _dry_run(split.stages, probe)
    layouts = split.layouts or [_guess_layout(backbone, s) for s in states]
    x = as_tuple(probe)[0]
    image_size = tuple(x.shape[2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None
    return _Built(split, states, layouts, int(expected.shape[1]), used, image_size=image_size)


def _guess_layout(backbone: nn.Module, state: State) -> Optional[TokenLayout]:
    """A 3-D state of a backbone without 1-D convolutions is read as tokens [B, S, H] (mean
    pooled): a conv1d map [B, C, L] would be channels first."""
    x = as_tuple(state)[0]
    if x.dim() != 3 or any(isinstance(m, (nn.Conv1d, nn.BatchNorm1d)) for m in backbone.modules()):
        return None
    return TokenLayout(pool="mean")


def _build_encoder(backbone: nn.Module, names: List[str], at: Sequence[str], example_input: ExampleInput) -> _Built:
    """The encoder split at ``at``; ``names``: its layers (``encoders.encoder_layers``)."""
    kind = "decoder" if encoders.hf_decoder(backbone) is not None else "encoder"
    cuts = [_encoder_cut(a, names, kind) for a in at]
    for i in range(1, len(cuts)):
        if cuts[i] == cuts[i - 1]:  # two spellings of one layer ("layer.1", "bert.encoder.layer.1"): an empty stage
            raise ValueError(
                f"split points {at[i - 1]!r} and {at[i]!r} name the same layer {names[cuts[i]]!r}; give each layer once"
            )
    if cuts != sorted(cuts):
        raise ValueError(f"split points must be in forward order; got {list(at)}")
    if cuts[-1] >= len(names) - 1:
        raise ValueError(
            f"split point {at[cuts.index(cuts[-1])]!r} is the last layer: it leaves the last stage empty; valid: {_listing(names[:-1])}"
        )
    split = encoders.split_encoder(backbone, cuts)
    _check_held(backbone, split)
    adapter = split.input_adapter
    primary = adapter.names[0] if adapter is not None else None
    pad = getattr(adapter, "last_token_pad_id", None)
    probe = example_input if example_input is not None else _encoder_probe(backbone, primary, pad)
    x = adapter(probe) if adapter is not None else _as_input(probe)
    # a decoder's forward fills a key/value cache by default (config.use_cache); the stages run
    # without one, as its forward computes with use_cache=False (with a cache, attention reads
    # copies of the keys and values: eager attention then rounds differently in the last bit)
    nocache = {"use_cache": False} if encoders.hf_decoder(backbone) is not None else {}
    if adapter is not None:
        raw = backbone(**dict(zip(adapter.names, as_tuple(x))), **nocache)
    else:
        raw = call(backbone, x)
    expected = output_logits(raw)
    logits = isinstance(expected, torch.Tensor) and expected.dim() == 2
    if split.tail is None and logits:  # a classifier the split did not find (DeiT's with-teacher pair of heads)
        raise encoders.unsupported(
            backbone,
            "it returns logits, but its classifier is not one eeruntime rebuilds as the final exit; attach to its "
            f"base model (.{getattr(backbone, 'base_model_prefix', 'base_model')}) with num_classes= for a new final head",
        )
    if split.tail is not None and not logits:
        raise ValueError(f"{type(backbone).__name__} returned no logits [B, C]; cannot check its classifier tail")
    states = _reproduce(backbone, split, x, expected)
    if adapter is not None and adapter.can_pad:
        # row 0 alone, every token real: HF's mask function then gives the layers no mask at all
        # (None), a path the padded batch does not take (MRA's layers fail on it)
        first = [t[:1] for t in as_tuple(x)]
        if pad is not None:  # a decoder: up to its last real token (its classifier reads that one)
            mask = first[adapter.names.index("attention_mask")]
            end = int(((mask != 0) * torch.arange(mask.shape[1], device=mask.device)).amax()) + 1
            first = [t[:, :end] for t in first]
        solo = tuple(torch.ones_like(t) if n == "attention_mask" else t for n, t in zip(adapter.names, first))
        _reproduce(backbone, split, solo, output_logits(backbone(**dict(zip(adapter.names, solo)), **nocache)))
    classes = int(expected.shape[1]) if split.tail is not None else None
    layouts: List[Optional[TokenLayout]] = [split.layout] * len(states)
    return _Built(_Split(list(split.stages), split.tail), states, layouts, classes, "encoder", adapter)


# what a base model runs after its layers: a new final head does not use it, nor does every
# classifier (BigBird's reads the tokens, not the pooler); the dry run checks the tail that does
_AFTER_LAYERS = ("pooler", "layernorm", "final_norm", "norm", "ln_f")


def _check_held(backbone: nn.Module, split: encoders.EncoderSplit) -> None:
    """Refuse an encoder whose own parameters the stages and the tail do not hold: its forward
    uses them between the layers (BEiT's shared relative position bias), and a dry run cannot
    tell while they are zero, as a fresh model's are."""
    base = getattr(backbone, "base_model", backbone)
    held = {id(p) for m in [*split.stages, split.tail] if m is not None for p in m.parameters()}
    missing = [n for n, p in base.named_parameters() if id(p) not in held and n.split(".")[0] not in _AFTER_LAYERS]
    if missing:
        raise encoders.unsupported(
            backbone, f"its forward uses parameters outside its layers and classifier: {_listing(missing)}"
        )


def _reproduce(backbone: nn.Module, split: encoders.EncoderSplit, x: State, expected: Any) -> List[State]:
    """The stages' states on ``x``; the model is refused when they fail, or when the stages and
    the tail do not give ``expected`` (its own logits on ``x``) bit for bit."""
    extra = "more than the hidden states and the attention mask (relative positions, rotary embeddings, ...)"
    try:
        states = _dry_run(split.stages, x)
        out = call(split.tail, states[-1]) if split.tail is not None else None
    except Exception as e:  # the layers needed what the forward computes between them
        why = f"its forward gives its layers {extra}: run one by one they fail ({type(e).__name__}: {e})"
        raise encoders.unsupported(backbone, why) from e
    if split.tail is not None:
        if not (isinstance(out, torch.Tensor) and out.shape == expected.shape and torch.equal(out, expected)):
            why = (
                f"its forward gives its layers {extra}, or its classifier is not the tail eeruntime rebuilds: run "
                "stage by stage, its layers and classifier do not reproduce its output on a dry run"
            )
            raise encoders.unsupported(backbone, why)
    return states


def _encoder_cut(a: str, names: List[str], kind: str = "encoder") -> int:
    """The index of the layer a split point names: its qualified name or a unique dotted suffix;
    ``kind``: "encoder" or "decoder", as the refusal names the layers."""
    if a in names:
        return names.index(a)
    hits = [i for i, n in enumerate(names) if n.endswith("." + a)]
    if len(hits) == 1:
        return hits[0]
    why = "matches several layers" if hits else "is not one of its layers"
    raise ValueError(
        f"split point {a!r} {why}; valid split points (the {kind}'s layers, in order): {_listing(names[:-1])}"
    )


def _encoder_probe(
    backbone: nn.Module, primary: Optional[str] = None, pad: Optional[int] = None
) -> Union[Dict[str, torch.Tensor], torch.Tensor]:
    """A random batch of 2 for an encoder: token ids with a padded second row, or images, as
    ``primary`` (the main input its forward takes) says; an image model's config may have a
    vocab_size too (BEiT's, for masked image modelling). ``pad``: a decoder classifier's pad
    token, the ids of the padded tokens and of no real one (as a tokenizer pads)."""
    g = torch.Generator().manual_seed(0)
    p = next(iter(backbone.parameters()))
    cfg = getattr(getattr(backbone, "base_model", None), "config", None)
    if primary != "pixel_values" and cfg is not None and hasattr(cfg, "vocab_size"):
        S = min(8, int(getattr(cfg, "max_position_embeddings", 8)))
        ids = torch.randint(0, int(cfg.vocab_size), (2, S), generator=g)
        mask = torch.ones(2, S, dtype=torch.long)
        mask[1, S // 2 :] = 0
        if pad is not None:
            ids = torch.randint(0, int(cfg.vocab_size) - 1, (2, S), generator=g)
            ids = torch.where(mask.bool(), ids + (ids >= pad).long(), torch.full_like(ids, pad))
        return {"input_ids": ids.to(p.device), "attention_mask": mask.to(p.device)}
    if cfg is not None and hasattr(cfg, "image_size"):
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size,) * 2
        return torch.randn((2, int(getattr(cfg, "num_channels", 3))) + tuple(size), generator=g).to(p.device, p.dtype)
    pe = getattr(backbone, "patch_embed", None)
    size = tuple(getattr(pe, "img_size", None) or (224, 224))
    chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
    return torch.randn((2, chans) + size, generator=g).to(p.device, p.dtype)


def _new_classifier(tail: nn.Module, num_classes: int, backbone: nn.Module, classes: int, state: State) -> nn.Module:
    """``tail`` with a new classifier (``replace_classifier``), checked on the dry run's last
    ``state``: a tail whose logits need the old width further on (LeViT adds the output of
    ``head``, which ends the last stage, to that of ``head_dist``, in the tail) is refused here
    rather than failing in the model's first forward."""
    new = replace_classifier(tail, num_classes, backbone, classes)
    why = _logits_misfit(new, state, num_classes)
    if why is None:
        return new
    name = [n for n, m in tail.named_modules() if _is_classifier(m, classes)][-1]
    raise ValueError(
        f"num_classes={num_classes} differs from the backbone's {classes}, but a new classifier in place of "
        f"{name!r} (its last layer with {classes} outputs) does not give [B, {num_classes}] logits on the "
        f"dry run ({why}); give the backbone a {num_classes}-class classifier before attaching (e.g. timm's "
        "reset_classifier on a copy), or attach without num_classes"
    )


def _logits_misfit(tail: nn.Module, state: State, num_classes: int) -> Optional[str]:
    """None when ``tail`` maps ``state`` to logits [B, num_classes]; else what it did instead."""
    B = as_tuple(state)[0].shape[0]
    try:
        with _fx_quiet([tail]):
            out = output_logits(call(tail, state))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if isinstance(out, torch.Tensor) and tuple(out.shape) == (B, num_classes):
        return None
    return f"it returned {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"


def replace_classifier(tail: nn.Module, num_classes: int, backbone: nn.Module, classes: int) -> nn.Module:
    """A copy of ``tail`` with its classifier (the last ``nn.Linear`` with ``classes`` outputs, or
    1x1 convolution with ``classes`` output channels, as in SqueezeNet and DLA) replaced by a new
    one with ``num_classes`` outputs. Neither the backbone nor ``tail`` is changed: the
    containers on the way to that layer are shallow copies (their other members stay shared)."""
    found = [(n, m) for n, m in tail.named_modules() if _is_classifier(m, classes)]
    if not found:
        raise ValueError(
            f"num_classes={num_classes} differs from the backbone's {classes}, but its classifier tail has no "
            f"nn.Linear (or 1x1 convolution) with {classes} outputs to replace"
        )
    qualname, old = found[-1]  # the copies below share their children: old is still the module at qualname
    path = qualname.split(".")
    # Every container on the way is copied, the backbone's and the tail's own (fx makes fresh
    # ones for dotted names): the tail passed in stays as it was.
    tail = parent = _shallow_copy(tail)
    for name in path[:-1]:
        child = _shallow_copy(parent.get_submodule(name))
        parent._modules[name] = child
        parent = child
    new: nn.Module
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        conv = cast(Union[nn.Conv1d, nn.Conv2d, nn.Conv3d], old)
        new = type(conv)(conv.in_channels, num_classes, 1, bias=conv.bias is not None)
    parent._modules[path[-1]] = new.to(device=old.weight.device, dtype=old.weight.dtype)
    return tail


def _is_classifier(m: nn.Module, classes: int) -> bool:
    """A layer that can be the classifier: a Linear with ``classes`` outputs, or a plain 1x1
    convolution (stride 1, no groups, no padding) with ``classes`` output channels."""
    if isinstance(m, nn.Linear):
        return m.out_features == classes
    if type(m) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return False
    conv = cast(Union[nn.Conv1d, nn.Conv2d, nn.Conv3d], m)
    padding = conv.padding  # "valid" / "same" are no padding for a 1x1 kernel
    return (
        conv.out_channels == classes
        and conv.groups == 1
        and all(k == 1 for k in conv.kernel_size)
        and all(t == 1 for t in conv.stride)
        and (isinstance(padding, str) or all(p == 0 for p in padding))
    )


def _shallow_copy(m: nn.Module) -> nn.Module:
    c = _copy.copy(m)
    c._modules = OrderedDict(m._modules)
    return c


# ---------------------------------------------------------------------------- arguments
def _check_backbone(backbone: Any) -> None:
    """A plain nn.Module: wrappers whose forward is not the model's own Python code (DataParallel,
    torch.compile, TorchScript) cannot be cut into stages; say what to pass instead."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
    if isinstance(backbone, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"backbone is a {type(backbone).__name__} wrapper: attach to the model it wraps, backbone.module "
            "(the multi-exit model shares its modules)"
        )
    if type(backbone).__name__ == "OptimizedModule" and isinstance(getattr(backbone, "_orig_mod", None), nn.Module):
        raise TypeError(
            "backbone is a torch.compile wrapper (OptimizedModule): attach to the original model, backbone._orig_mod, "
            "and compile the stages with EERuntime(model, ..., compile=True)"
        )
    if isinstance(backbone, torch.jit.ScriptModule):
        raise TypeError(
            f"backbone is a TorchScript module ({type(backbone).__name__}): its forward cannot be cut into stages; "
            "attach to the Python module it was scripted or traced from"
        )


def _check_at(at: Union[str, Sequence[str]]) -> List[str]:
    try:
        names = [at] if isinstance(at, str) else list(at)
    except TypeError:
        raise TypeError(f"at must be a split-point name or a sequence of names, got {type(at).__name__}") from None
    if not names:
        raise ValueError("at is empty: name at least one split point")
    for a in names:
        if not isinstance(a, str) or not a:
            raise TypeError(f"split points are non-empty strings (module or node names), got {a!r}")
    dup = sorted({a for a in names if names.count(a) > 1})
    if dup:
        raise ValueError(f"split point(s) {dup} given more than once")
    return names


def _check_num_classes(n: Any) -> int:
    """``num_classes`` as an int >= 1. Only integers: ``int(2.5)`` would silently build 2-class
    heads, ``True`` one class, ``"3"`` is a form field or a file passing strings."""
    try:
        value = (
            None if isinstance(n, (bool, str, bytes)) or getattr(n, "dtype", None) == torch.bool else operator.index(n)
        )
    except TypeError:
        value = None
    if value is None:
        raise TypeError(f"num_classes must be a positive int (the classes of every exit), got {n!r}")
    if value < 1:
        raise ValueError(f"num_classes must be a positive int, got {value}")
    return value


def _as_input(x: ExampleInput) -> State:
    if isinstance(x, list):
        x = tuple(x)
    for t in as_tuple(x):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example_input must be a tensor or a tuple of tensors, got {type(t).__name__}")
    return x


def _probe_input(backbone: nn.Module) -> torch.Tensor:
    """A random batch of 2 shaped for the backbone's first parametrised layer (Conv or Linear)."""
    first = next((m for m in backbone.modules() if not list(m.children()) and _has_params(m)), None)
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if not isinstance(first, convs + (nn.Linear,)):
        what = type(first).__name__ if first is not None else "missing"
        raise ValueError(
            f"cannot guess an input for {type(backbone).__name__} (its first layer is {what}, not a Conv or Linear): "
            "pass example_input=<a batch the backbone accepts>"
        )
    p = next(first.parameters())
    g = torch.Generator().manual_seed(0)
    shape: Tuple[int, ...]
    if isinstance(first, nn.Linear):
        shape = (2, first.in_features)
    else:
        shape = (2, first.in_channels) + (32,) * (convs.index(type(first)) + 1)
    return torch.randn(shape, generator=g).to(device=p.device, dtype=p.dtype)


# ---------------------------------------------------------------------------- splitting
@dataclass
class _Split:
    stages: Sequence[nn.Module]
    tail: Optional[nn.Module]  # None: a base encoder without a classifier (the last stage gives no logits)
    layouts: Optional[List[Optional[TokenLayout]]] = None  # per stage: a TokenLayout when its state is tokens


def _split(
    backbone: nn.Module, at: Sequence[str], probe: State, expected: torch.Tensor, mode: str
) -> Tuple[_Split, str]:
    if mode == "children" or (mode == "auto" and isinstance(backbone, nn.Sequential)):
        return _split_children(backbone, at, probe, expected), "children"
    if mode == "fx" or not _children_in_order(backbone, probe, expected):
        return _split_fx(backbone, at, probe, expected), "fx"
    # auto, children in order: name children; fx node names still work.
    try:
        return _split_children(backbone, at, probe, expected), "children"
    except ValueError as children_error:
        try:
            return _split_fx(backbone, at, probe, expected), "fx"
        except ValueError as fx_error:
            if _NOT_A_NODE not in str(fx_error):
                raise fx_error from None  # fx knows the node: its reason is the one that applies
            raise ValueError(
                f"{children_error}; or an fx node name (ee.split_points(backbone, mode='fx') lists them)"
            ) from None


def _dry_run(stages: Sequence[nn.Module], probe: State) -> List[State]:
    states: List[State] = []
    state = probe
    for stage in stages:
        state = stage_forward(stage, state)
        states.append(state)
    return states


def _run_split(split: _Split, probe: State) -> Any:
    states = _dry_run(split.stages, probe)
    return call(split.tail, states[-1])


@contextlib.contextmanager
def _fx_quiet(modules: Iterable[Optional[nn.Module]]) -> Iterator[None]:
    """Calls of the GraphModules in ``modules`` raise their errors without torch.fx's print: its
    ``_WrappedCall`` writes the traceback of an error in a generated forward to stderr before
    re-raising it, and the dry runs here turn such errors into a ValueError that says why. Each
    GraphModule has a class of its own, whose ``__call__`` is fx's wrapper; it is set aside for
    the block (the call made is the one the wrapper makes) and put back after."""
    saved: Dict[Any, Any] = {}
    for root in modules:
        for m in root.modules() if root is not None else ():
            cls: Any = type(m)
            if isinstance(m, fx.GraphModule) and cls not in saved and "__call__" in vars(cls):
                saved[cls] = vars(cls)["__call__"]
                cls.__call__ = functools.partialmethod(_unwrapped_call, cls)
    try:
        yield
    finally:
        for cls, f in saved.items():
            cls.__call__ = f


def _unwrapped_call(self: nn.Module, cls: type, *args: Any, **kwargs: Any) -> Any:
    return cls.__mro__[1].__call__(self, *args, **kwargs)  # as fx's wrapper calls: super(cls, self).__call__


def _verify(split: _Split, probe: State, expected: torch.Tensor, how: str, exact: bool = True) -> None:
    try:
        with _fx_quiet([*split.stages, split.tail]):
            out = output_logits(_run_split(split, probe))
    except Exception as e:
        raise ValueError(f"the {how} split fails on the dry run ({type(e).__name__}: {e})") from e
    same = (
        isinstance(out, torch.Tensor)
        and out.shape == expected.shape
        and (torch.equal(out, expected) if exact else torch.allclose(out, expected, rtol=1e-4, atol=1e-5))
    )
    if not same:
        hint = " (its children do not run in order in forward; use mode='fx')" if how == "children" else ""
        raise ValueError(f"the {how} split does not reproduce the backbone's output on the dry run{hint}")


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _first_leaf(m: nn.Module) -> nn.Module:
    while isinstance(m, nn.Sequential) and len(m) > 0:
        m = m[0]
    return m


def _mutates_input(m: nn.Module) -> bool:
    return bool(getattr(_first_leaf(m), "inplace", False))


def _clone_unless_inference(x: torch.Tensor) -> torch.Tensor:
    """Stage-entry guard: the next stage's first op works in place, and the exit head before it
    may have saved the same tensor for backward. Inference (the runtime) needs no copy."""
    return x if torch.is_inference_mode_enabled() else x.clone()


class _InputGuard(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _clone_unless_inference(x)


def _blocks(backbone: nn.Module, at: Sequence[str]) -> List[Tuple[str, nn.Module]]:
    """The backbone's children as (qualified name, module), opening nested nn.Sequential
    children that a split point reaches into."""
    blocks = list(backbone.named_children())
    changed = True
    while changed:
        changed = False
        names = [n for n, _ in blocks]
        for a in at:
            if a in names:
                continue
            for i, (n, m) in enumerate(blocks):
                if isinstance(m, nn.Sequential) and a.startswith(n + "."):
                    blocks[i : i + 1] = [(f"{n}.{c}", cm) for c, cm in m.named_children()]
                    changed = True
                    break
            if changed:
                break
    return _open_single_trunk(blocks)


def _open_single_trunk(blocks: List[Tuple[str, nn.Module]]) -> List[Tuple[str, nn.Module]]:
    """Open a first ``nn.Sequential`` child that holds every parametrised layer but the
    classifier (torchvision's MobileNetV3 / VGG / ConvNeXt ``features``, timm's DenseNet):
    unopened, no child could end an early stage, and the listing of split points would be empty.
    Only then: a split that worked before keeps its stages (and their state_dict keys)."""
    while True:
        with_params = [i for i, (_, m) in enumerate(blocks) if _has_params(m)]
        if len(with_params) != 2 or with_params[0] != 0:
            return blocks
        name, trunk = blocks[0]
        if not (isinstance(trunk, nn.Sequential) and len(trunk) > 1):
            return blocks
        blocks = [(f"{name}.{c}", m) for c, m in trunk.named_children()] + blocks[1:]


def _run_blocks(
    blocks: Sequence[Tuple[str, nn.Module]], probe: State, shapes: Optional[List[Tuple[int, ...]]] = None
) -> Tuple[State, Set[int]]:
    """Run blocks in order, flattening (torchvision-style) where a Linear-led block gets a
    feature map it can only take flattened. Returns the output and the indices of the blocks
    that get a flatten; appends each block's output shape (no batch dim) to ``shapes``."""
    flatten_before: Set[int] = set()
    state = probe
    for i, (_, m) in enumerate(blocks):
        lin = _first_leaf(m)
        if (
            isinstance(lin, nn.Linear)
            and isinstance(state, torch.Tensor)
            and state.dim() > 2
            and state.shape[-1] != lin.in_features
            and state[0].numel() == lin.in_features
        ):
            flatten_before.add(i)
            state = torch.flatten(state, 1)
        state = stage_forward(m, state)
        if shapes is not None:
            shapes.append(tuple(as_tuple(state)[0].shape[1:]))
    return state, flatten_before


def _children_in_order(backbone: nn.Module, probe: State, expected: torch.Tensor) -> bool:
    blocks = list(backbone.named_children())
    if not blocks:
        return False
    try:
        out, _ = _run_blocks(blocks, probe)
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and out.shape == expected.shape and torch.equal(out, expected)


@overload
def _split_children(
    backbone: nn.Module, at: Sequence[str], probe: State, expected: torch.Tensor, points_only: Literal[False] = False
) -> _Split: ...
@overload
def _split_children(
    backbone: nn.Module, at: Sequence[str], probe: State, expected: torch.Tensor, points_only: Literal[True]
) -> Points: ...
def _split_children(
    backbone: nn.Module, at: Sequence[str], probe: State, expected: torch.Tensor, points_only: bool = False
) -> Union[_Split, Points]:
    """The children split at ``at``; with ``points_only``, the valid split points instead, as
    ``[(child name, shape)]``."""
    blocks = _blocks(backbone, at)
    names = [n for n, _ in blocks]
    with_params = [i for i, (_, m) in enumerate(blocks) if _has_params(m)]
    if len(with_params) < 2:
        raise ValueError(
            f"{type(backbone).__name__} has {len(with_params)} child(ren) with parameters; a split needs layers before the classifier"
        )
    last_layer = with_params[-2]  # the last parametrised block before the classifier ends the last stage
    valid = names[:last_layer]
    if points_only:
        shapes: List[Tuple[int, ...]] = []
        _run_blocks(blocks[:last_layer], probe, shapes)
        return list(zip(valid, shapes))
    idx = []
    for a in at:
        if a not in valid:
            why = (
                "is part of the classifier tail or leaves the last stage empty"
                if a in names
                else "is not a child module"
            )
            raise ValueError(f"split point {a!r} {why}; valid split points (in order): {_listing(valid)}")
        idx.append(names.index(a))
    if idx != sorted(idx):
        raise ValueError(f"split points must be in forward order; got {list(at)}, valid order: {_listing(valid)}")
    try:
        _, flatten_before = _run_blocks(blocks, probe)
    except Exception as e:
        raise ValueError(
            f"running the children of {type(backbone).__name__} in order fails ({type(e).__name__}: {e}); use mode='fx'"
        ) from e

    def seq(lo: int, hi: int, guard: bool) -> nn.Sequential:
        items: List[Tuple[str, nn.Module]] = []
        if guard and _mutates_input(blocks[lo][1]):
            items.append(("_input_guard", _InputGuard()))
        for i in range(lo, hi):
            if i in flatten_before:
                items.append((f"_flatten_{i}", nn.Flatten(1)))
            items.append((blocks[i][0].replace(".", "_"), blocks[i][1]))
        return nn.Sequential(OrderedDict(items))

    bounds = [0] + [i + 1 for i in idx] + [last_layer + 1]
    stages = [seq(bounds[k], bounds[k + 1], guard=k > 0) for k in range(len(bounds) - 1)]
    split = _Split(stages, seq(last_layer + 1, len(blocks), guard=False))
    _verify(split, probe, expected, "children")
    return split


def _listing(names: Sequence[str]) -> str:
    if len(names) <= _MAX_LISTED:
        return ", ".join(names) if names else "(none)"
    return ", ".join(names[:_MAX_LISTED]) + f", ... ({len(names) - _MAX_LISTED} more)"


# ---------------------------------------------------------------------------- fx
class _SplitTracer(fx.Tracer):
    """fx tracer that keeps the split points' modules as leaves, names every node the way
    torchvision's feature extraction does (``layer1.1.relu_1``, ``layer1.0.add``: the scope
    module's qualified name, then the op, ``_N`` for its N-th repeat there), and traces an
    ``nn.TransformerEncoder`` as its layers, one node per layer (its own forward builds masks
    with Python control flow that tracing cannot follow)."""

    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)
        self._scopes = [""]
        self.dotted: Dict[fx.Node, str] = {}
        self._repeats: Dict[str, int] = {}
        self.padding_masks: Set[fx.Node] = set()  # nodes passed to expanded encoder layers as key-padding masks
        self.expanded = False

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.TransformerEncoder):
            return qualname in self.leaves
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Any:
        name = self.path_of_module(m)
        if isinstance(m, nn.TransformerEncoder) and name not in self.leaves:
            self.expanded = True
            forward = functools.partial(_encoder_by_layers, m, self)
        self._scopes.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._scopes.pop()

    def create_node(
        self,
        kind: str,
        target: fx.node.Target,
        args: Tuple[fx.node.Argument, ...],
        kwargs: Dict[str, fx.node.Argument],
        name: Optional[str] = None,
        type_expr: Optional[Any] = None,
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "call_module":
            base = str(target)  # a module call's target is the module's qualified name
        elif kind in ("call_function", "call_method"):
            stem = re.sub(r"_[0-9]+$", "", node.name)
            base = f"{self._scopes[-1]}.{stem}" if self._scopes[-1] else stem
        else:
            return node
        n = self._repeats.get(base, 0)
        self._repeats[base] = n + 1
        self.dotted[node] = base if n == 0 else f"{base}_{n}"
        return node


def _encoder_by_layers(
    enc: nn.TransformerEncoder,
    tracer: _SplitTracer,
    src: fx.Proxy,
    mask: Union[None, torch.Tensor, fx.Proxy] = None,
    src_key_padding_mask: Union[None, torch.Tensor, fx.Proxy] = None,
    is_causal: Optional[bool] = None,
) -> fx.Proxy:
    """nn.TransformerEncoder.forward as a plain run of its layers (then its norm). Numerically
    the same on the real tokens; its nested-tensor fast path (eval, with a padding mask) leaves
    zeros at padded positions where this leaves the layers' values."""
    if isinstance(src_key_padding_mask, fx.Proxy):
        tracer.padding_masks.add(src_key_padding_mask.node)
    x = src
    for layer in enc.layers:
        x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    return enc.norm(x) if enc.norm is not None else x


_COMPUTE = ("call_module", "call_function", "call_method")


def _node_inputs(n: fx.Node) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a))
    return found


class _BatchRecorder(fx.Interpreter):
    """Records which nodes yield a tensor with the input's batch size (those can travel in a state)."""

    def __init__(self, gm: fx.GraphModule, batch: int) -> None:
        super().__init__(gm)
        self.batch = batch
        self.batched: Set[fx.Node] = set()
        self.shapes: Dict[fx.Node, Tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == self.batch:
            self.batched.add(n)
            self.shapes[n] = tuple(v.shape[1:])
        return v


@overload
def _split_fx(
    backbone: nn.Module, at: Sequence[str], probe: State, expected: torch.Tensor, points_only: Literal[False] = False
) -> _Split: ...
@overload
def _split_fx(
    backbone: nn.Module, at: Sequence[str], probe: State, expected: torch.Tensor, points_only: Literal[True]
) -> Points: ...
def _split_fx(
    backbone: nn.Module, at: Sequence[str], probe: State, expected: torch.Tensor, points_only: bool = False
) -> Union[_Split, Points]:
    """The fx split at ``at``; with ``points_only``, the valid split points instead, as
    ``[(dotted name, shape)]``."""
    modules = dict(backbone.named_modules())
    leaves = [a for a in at if a in modules and a != ""]
    nested = [(a, b) for a in leaves for b in leaves if a != b and b.startswith(a + ".")]
    if nested:
        raise ValueError(
            f"split points {nested[0][0]!r} and {nested[0][1]!r} are nested modules; name modules that run one after the other"
        )
    tracer = _SplitTracer(leaves)
    own = set(vars(backbone))
    try:
        try:
            graph = tracer.trace(backbone)
        except Exception as e:
            raise ValueError(
                f"torch.fx cannot trace {type(backbone).__name__} ({type(e).__name__}: {e}); make forward traceable, "
                "or use mode='children' for a module whose children run in order"
            ) from e
        bound = _bind_defaults(graph, len(as_tuple(probe)))
        gm = fx.GraphModule(backbone, graph)  # shares the backbone's submodules and parameters
    finally:
        for name in set(vars(backbone)) - own:  # fx stores tensor constants on the traced module: gm has them
            delattr(backbone, name)
    recorder = _BatchRecorder(gm, as_tuple(probe)[0].shape[0])
    try:
        recorder.run(*as_tuple(probe))
    except Exception as e:
        if not bound:
            raise
        reason = str(e).split("\n")[0]
        raise ValueError(
            f"the fx trace of {type(backbone).__name__} fails on the example ({type(e).__name__}: {reason}); "
            f"forward's optional argument(s) {', '.join(map(repr, bound))}, which the example does not give, were "
            "traced as if given (Python control flow on them, such as `if mask is not None`, takes the branch of a "
            "value) and then bound to their defaults: pass them in example_input (a tuple, in forward's order), or "
            "use mode='children' for a module whose children run in order"
        ) from None
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=-1) for n in nodes}
    compute = [n for n in nodes if n.op in _COMPUTE]

    def live_after(i: int) -> List[fx.Node]:
        # get_attr values are re-read in each stage, so they never travel between stages.
        return [n for n in nodes[: i + 1] if n.op in ("placeholder",) + _COMPUTE and last_use[n] > i]

    def splittable(n: fx.Node) -> bool:
        return n in recorder.batched and all(v in recorder.batched for v in live_after(pos[n]))

    def has_params(n: fx.Node) -> bool:
        if n.op == "call_module":
            return _has_params(gm.get_submodule(_module_name(n)))
        return any(a.op == "get_attr" for a in _node_inputs(n))

    param_nodes = [n for n in compute if has_params(n)]
    if len(param_nodes) < 2:
        raise ValueError(
            f"{type(backbone).__name__} has {len(param_nodes)} parametrised layer(s); a split needs layers before the classifier"
        )
    last_layer, classifier = pos[param_nodes[-2]], pos[param_nodes[-1]]
    cut = [
        i
        for i in range(last_layer, classifier)
        if nodes[i].op in _COMPUTE and live_after(i) == [nodes[i]] and splittable(nodes[i])
    ]
    boundary = cut[0] if cut else last_layer
    if not splittable(nodes[boundary]):
        raise ValueError(
            f"cannot separate the classifier of {type(backbone).__name__}: the values after {nodes[boundary].name!r} are not batched tensors"
        )
    dotted = tracer.dotted
    valid_nodes = [n for n in compute if pos[n] < boundary and splittable(n)]
    if points_only:
        return [(dotted.get(n, n.name), recorder.shapes[n]) for n in valid_nodes]
    valid = [dotted.get(n, n.name) for n in valid_nodes]

    by_name = {n.name: n for n in compute}
    by_name.update({dotted[n]: n for n in compute if n in dotted})
    targets: Dict[str, List[fx.Node]] = {}
    for n in compute:
        if n.op == "call_module":
            targets.setdefault(_module_name(n), []).append(n)
    split_nodes: List[fx.Node] = []
    for a in at:
        n = by_name.get(a)
        if n is None and a in targets:
            if len(targets[a]) > 1:
                raise ValueError(
                    f"split point {a!r}: forward calls this module {len(targets[a])} times; name one of its nodes: {[m.name for m in targets[a]]}"
                )
            n = targets[a][0]
        if n is None or pos[n] >= boundary or not splittable(n):
            if n is None:
                why = _NOT_A_NODE
            elif pos[n] >= boundary:
                why = "is part of the classifier tail or leaves the last stage empty"
            else:
                why = "does not give batched tensors (its value, or one still needed later, has no batch dim)"
            raise ValueError(
                f"split point {a!r} {why}; valid split points (node names, in order): {_listing(valid)}; "
                "fx's underscored names (layer1_1_relu_1) and a submodule's qualified name (e.g. 'layer1', when "
                "forward calls it once) also work"
            )
        if n in split_nodes:  # two spellings of one node ("blk_0", "blk.0"): an empty stage
            raise ValueError(f"split points {at[split_nodes.index(n)]!r} and {a!r} name the same node; give each once")
        split_nodes.append(n)
    order = [pos[n] for n in split_nodes]
    if order != sorted(order):
        by_pos = [a for _, a in sorted(zip(order, at))]
        raise ValueError(f"split points must be in forward order; got {list(at)}, forward order is {by_pos}")

    placeholders = [n for n in nodes if n.op == "placeholder"]
    stages: List[nn.Module] = []
    layouts: List[Optional[TokenLayout]] = []
    inputs, start = placeholders, 0
    for c in order + [boundary]:
        outputs = _outputs_at(nodes[c], live_after(c))
        stages.append(_subgraph(gm, nodes, inputs, range(start, c + 1), outputs, guard=bool(stages)))
        layouts.append(_fx_layout(outputs, recorder.shapes, tracer.padding_masks))
        inputs, start = outputs, c + 1
    out_node = next(n for n in nodes if n.op == "output")
    tail = _subgraph(gm, nodes, inputs, range(start, pos[out_node]), out_node.args[0], guard=False, raw_output=True)
    split = _Split(stages, tail, layouts if tracer.expanded else None)
    # An expanded nn.TransformerEncoder is the same math in another kernel order (see _encoder_by_layers)
    _verify(split, probe, expected, "fx", exact=not tracer.expanded)
    return split


_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _inlinable(v: Any) -> bool:
    """A default fx can hold in a node's arguments: a constant, a tuple or list of them, or the
    get_attr node fx made of a tensor default."""
    if isinstance(v, (tuple, list)):
        return all(_inlinable(a) for a in v)
    return isinstance(v, _CONSTANTS) or (isinstance(v, fx.Node) and v.op == "get_attr")


def _bind_defaults(graph: fx.Graph, given: int) -> List[str]:
    """Bind the forward arguments after the first ``given`` (those the example does not pass:
    timm Eva's ``attn_mask=None, is_causal=False``) to their default values, as calling the
    backbone with the example does. Traced as inputs they would be stage 0's required arguments,
    and, never batched, they could not travel between stages. A tensor default is read from the
    attribute fx stored it in. Returns the names bound."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    bound = []
    for ph in placeholders[given:]:
        if not ph.args or not _inlinable(ph.args[0]):  # no default (*args, **kwargs), or one fx cannot inline
            continue
        value = ph.args[0]
        for user in list(ph.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is ph else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is ph else a)
        bound.append(str(ph.target))
        graph.erase_node(ph)
    return bound


def _fx_layout(
    outputs: List[fx.Node], shapes: Dict[fx.Node, Tuple[int, ...]], padding_masks: Set[fx.Node]
) -> Optional[TokenLayout]:
    """Token layout of an fx state whose first member is [B, S, H]: its key-padding mask, when
    an expanded TransformerEncoder took one and it travels in the state."""
    if len(shapes.get(outputs[0], ())) != 2:
        return None
    idx = next((i for i, n in enumerate(outputs) if n in padding_masks), None)
    return TokenLayout(mask_index=idx, padding_mask=idx is not None, pool="mean")


def _module_name(n: fx.Node) -> str:
    """The qualified name of the submodule a ``call_module`` node calls (fx stores it as the target)."""
    return cast(str, n.target)


def _outputs_at(split: fx.Node, live: List[fx.Node]) -> List[fx.Node]:
    return [split] + [n for n in live if n is not split]


def _mutating_consumer(node: fx.Node, gm: fx.GraphModule) -> bool:
    for u in node.users:
        if u.op == "call_module" and _mutates_input(gm.get_submodule(_module_name(u))):
            return True
        if u.op == "call_function" and (u.kwargs.get("inplace") or u.target in (operator.iadd, operator.imul)):
            return True
        if u.op == "call_method" and str(u.target).endswith("_") and not str(u.target).startswith("_"):
            return True
    return False


def _subgraph(
    gm: fx.GraphModule,
    nodes: List[fx.Node],
    inputs: List[fx.Node],
    span: range,
    outputs: Any,  # the nodes the stage returns; with raw_output, the graph output's argument as fx holds it
    *,
    guard: bool,
    raw_output: bool = False,
) -> fx.GraphModule:
    g = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for n in inputs:
        ph = g.placeholder(n.name)
        if guard and _mutating_consumer(n, gm):
            ph = g.call_function(_clone_unless_inference, (ph,))
        env[n] = ph

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env and a.op == "get_attr":
            env[a] = g.get_attr(cast(str, a.target))  # a get_attr node's target is the attribute's qualified name
        return env[a]

    for i in span:
        n = nodes[i]
        if n.op in ("get_attr", "placeholder"):
            continue
        env[n] = g.node_copy(n, lookup)
    if raw_output:
        g.output(fx.node.map_arg(outputs, lookup))
    else:
        g.output(lookup(outputs[0]) if len(outputs) == 1 else tuple(lookup(o) for o in outputs))
    g.lint()
    return fx.GraphModule(gm, g)


# ---------------------------------------------------------------------------- heads
def _channels_last_maps(backbone: nn.Module) -> bool:
    """True when the backbone's feature maps are [B, H, W, C]: timm says so in ``output_fmt``
    (Swin, MambaOut, ...); torchvision's SwinTransformer (or a subclass) permutes to it in its
    first layer."""
    if getattr(backbone, "output_fmt", None) == "NHWC":
        return True
    return any(
        k.__name__ == "SwinTransformer" and k.__module__.startswith("torchvision.") for k in type(backbone).__mro__
    )


def _is_channels_last(x: torch.Tensor, maps_nhwc: bool, image_size: Optional[Tuple[int, ...]]) -> bool:
    """Whether the map ``x`` is [B, H, W, C]: a 4-D map of a backbone whose maps are
    (``maps_nhwc``), unless its shape reads as [B, C, H, W] of the dry run's image (``image_size``)
    and not as [B, H, W, C]: Swin's patch embedding is a conv, whose map is permuted only after
    it (timm's 'patch_embed.proj', torchvision's 'features.0.0'). A map that reads both ways
    (H == W == C, a square image) is taken as the backbone says."""
    if not maps_nhwc or x.dim() != 4:
        return False
    if image_size is None or len(image_size) != 2:
        return True
    H, W = image_size

    def of_image(h: int, w: int) -> bool:  # (h, w) is (H, W) scaled by one factor, give or take rounding
        return abs(h * W - w * H) < H + W

    return not (of_image(x.shape[2], x.shape[3]) and not of_image(x.shape[1], x.shape[2]))


def _make_heads(
    head: HeadSpec,
    states: Sequence[State],
    num_classes: int,
    at: Sequence[str],
    layouts: Sequence[Optional[TokenLayout]],
    channels_last: Tuple[bool, Optional[Tuple[int, ...]]] = (False, None),
) -> List[nn.Module]:
    n = len(states)
    if isinstance(head, nn.ModuleList):
        head = list(head)
    elif isinstance(head, nn.Module):
        raise TypeError(
            "head must be 'auto', 'pool_linear', 'conv', 'cls', 'mean', 'last', a factory head(state_shape, num_classes), or a sequence of modules (one per split point); got a single module"
        )
    if isinstance(head, str):
        if head not in HEADS:
            raise ValueError(
                f"unknown head {head!r}; accepted: {', '.join(map(repr, HEADS))}, a factory head(state_shape, num_classes) or a list of modules"
            )
        return [_default_head(head, s, num_classes, a, lay, channels_last) for s, a, lay in zip(states, at, layouts)]
    if callable(head):  # modules were turned into a list or refused above
        out = []
        for k, s in enumerate(states):
            h = head(as_tuple(s)[0].shape[1:], num_classes)
            if not isinstance(h, nn.Module):
                raise TypeError(
                    f"the head factory must return an nn.Module, got {type(h).__name__} for split point {at[k]!r}"
                )
            out.append(h)
        return out
    heads = list(head)
    if len(heads) != n:
        raise ValueError(f"got {len(heads)} head modules for {n} split points; give one per split point")
    for k, h in enumerate(heads):
        if not isinstance(h, nn.Module):
            raise TypeError(f"head {k} must be an nn.Module, got {type(h).__name__}")
    return heads


def _default_head(
    head: str,
    state: State,
    num_classes: int,
    at: str,
    layout: Optional[TokenLayout],
    channels_last: Tuple[bool, Optional[Tuple[int, ...]]] = (False, None),
) -> nn.Module:
    x = as_tuple(state)[0]
    if layout is not None:  # tokens [B, S, H]: pool along S, classify the H features
        causal = layout.pool == "last"  # a decoder's tokens: each has seen only those before it
        if head == "conv":
            use = "'last' or 'mean'" if causal else "'cls', 'mean' or 'last'"
            raise ValueError(
                f"head='conv' needs a [B, C, *spatial] map; split point {at!r} yields tokens {tuple(x.shape)} (use {use})"
            )
        if head == "cls" and causal:
            raise ValueError(
                f"head='cls' reads token 0, and split point {at!r} is in a decoder: under its causal attention token 0 "
                "has seen only itself (with left padding, a pad token), none of the text; use 'last' (each row's last "
                "real token, the default) or 'mean'"
            )
        pool = layout.pool if head == "auto" else ("mean" if head == "pool_linear" else head)
        return SequenceHead(
            x.shape[-1], num_classes, pool=pool, mask_index=layout.mask_index, padding_mask=layout.padding_mask
        )
    if x.dim() < 2:
        raise ValueError(f"split point {at!r} yields shape {tuple(x.shape)}; default heads need [B, C, ...]")
    if head in TOKEN_POOLS:
        raise ValueError(
            f"head={head!r} is a token head; split point {at!r} yields a feature map {tuple(x.shape)} (use 'pool_linear' or 'conv')"
        )
    nhwc = _is_channels_last(x, *channels_last)
    if head in ("auto", "pool_linear"):
        return PoolLinearHead(x.shape[-1] if nhwc else x.shape[1], num_classes, channels_last=nhwc)
    if nhwc:
        raise ValueError(
            f"head='conv' needs a channels-first map [B, C, H, W]; split point {at!r} yields a channels-last map "
            f"{tuple(x.shape)} ([B, H, W, C], as Swin's are): use 'pool_linear' or a head factory"
        )
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"head='conv' needs a [B, C, *spatial] map at {at!r}, got shape {tuple(x.shape)}")
    return ConvHead(x.shape[1], num_classes, dims=x.dim() - 2)

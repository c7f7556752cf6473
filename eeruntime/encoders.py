"""Transformer encoders cut into stages: HF (BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA,
DeBERTa, MPNet, ModernBERT, ViT, ...; :data:`SUPPORTED`), HF decoder sequence classifiers
(GPT-2, Llama, Qwen2, Mistral; :data:`DECODERS`) and timm ViTs.

An encoder's stages carry a token state: ``(hidden [B, S, H], attention_mask [B, S])`` for text
(HF's mask: non-zero = real token), ``hidden`` alone for images (every patch is real). Stage 0
runs the embeddings and the first layers; each later stage runs its layers on the state it gets.
Every stage rebuilds the layers' attention mask from the 2-D mask with the model's own mask
function, so a state packed row-wise (or trimmed along S) stays consistent with its mask.

The input adapter (:class:`HFInputs`) turns what users pass an HF model (a dict, a tokenizer's
``BatchEncoding``, a tuple in ``forward`` order, or the main tensor alone) into the fixed tuple
stage 0 takes, filling an absent ``attention_mask`` with ones and ``token_type_ids`` with zeros
(HF's own defaults).

Families whose encoder gives each layer more than the hidden states and the mask have their
own stage kind, calling the encoder's own methods as its forward does: DeBERTa's relative
positions (:class:`HFRelativeLayers`), MPNet's position bias (:class:`HFBiasLayers`),
ModernBERT's rotary embeddings and sliding-window masks (:class:`HFRotaryLayers`). ALBERT's
layer groups are shared across depths: its split points are depths.

Decoders (:class:`HFDecoderLayers`) carry the same state. Each stage builds the causal mask
combined with the padding mask (HF's ``create_causal_mask``, or its sliding-window variant for
the layers of that kind) and, for rotary models, the rotary embeddings, as the model's forward
does with ``use_cache=False``; positions count from column 0, as HF's forward counts them
without ``position_ids``. The tail (:class:`HFLastTokenTail`) runs the final norm and ``score``
and reads each row's last real token; exit heads pool that token (``"last"``). HF's classifier
reads the last token whose id is not ``pad_token_id``, the stages the last real token by the
mask: the same token when pad ids sit exactly at the masked end of a row, as tokenizers pad on
either side. The input adapter refuses inputs where the two differ (ids on the CPU; ids on a
GPU are not read, which would wait for the device), and attach refuses a classifier without a
pad token (HF's own classifies one unpadded row at a time).
Right padding: a text alone gives its row's answer. Left padding: HF's answer for the padded
row (its positions start at column 0, pads included), which the stages reproduce.

The final exit is the model's own classifier tail (its pooler, norm, dropout and classifier, in
its order); ``attach_exits`` checks that stages + tail give the model's logits on a dry run.
Models whose layers are called in a loop by ``forward`` are handled here, not by torch.fx,
because their forward builds masks with Python control flow that tracing cannot follow.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Sequence, Tuple, cast

import torch
from torch import nn

from .state import dtype_name

# Inputs of an HF encoder that the runtime carries (others are refused with a clear error).
_PRIMARY = ("input_ids", "pixel_values")
_HF_ACCEPTED = _PRIMARY + ("attention_mask", "token_type_ids")

# What attach_exits cuts, as its refusals name it (the families tests/test_encoder_families.py
# and tests/test_encoders.py check against the unmodified models).
SUPPORTED = (
    "supported: BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ALBERT, ELECTRA, DeBERTa (v1, v2/v3), MPNet and "
    "ModernBERT text encoders (sequence classifiers or base models), GPT-2, Llama, Qwen2 and Mistral decoders "
    "(sequence classifiers or base models, causal attention without a key/value cache), ViT and DeiT image "
    "classifiers, and timm VisionTransformers"
)


def unsupported(model: nn.Module, why: str) -> ValueError:
    """The error attach_exits raises for a model it cannot cut: its class (and HF model_type),
    why, and what is supported."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    named = f"{type(model).__name__}" + (f" (model_type {kind!r})" if isinstance(kind, str) and kind else "")
    return ValueError(f"{named} cannot be cut into early-exit stages: {why}; {SUPPORTED}")


def is_hf_model(model: nn.Module) -> bool:
    """True for a Hugging Face transformers model (a ``PreTrainedModel``)."""
    tf = sys.modules.get("transformers")  # a model of it exists only once it is imported
    pre = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    return isinstance(pre, type) and isinstance(model, pre)


def why_not_hf(model: nn.Module) -> str:
    """Why an HF model is not an encoder :func:`hf_encoder` finds (for :func:`unsupported`).
    These models would otherwise fall to the generic split, which cannot trace an HF forward."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in DECODERS:
        return (
            f"it is a {kind} decoder without a sequence classifier (a `score` head on the last real token); its "
            "...ForSequenceClassification model, or its base model with num_classes=, is cut"
        )
    # a key/value cache in forward's inputs (spelled past_key_values, cache or use_cache across releases)
    if {"use_cache", "past_key_values", "cache"} & set(inspect.signature(model.forward).parameters):
        return (
            f"its forward takes a key/value cache, as decoders do, and decoder family {kind!r} is not one whose "
            "positions, masks and classifier eeruntime rebuilds"
        )
    return "it has no `embeddings` module followed by a list of layers (encoder.layer, layers, transformer.layer)"


@dataclass
class TokenLayout:
    """How to read a token state: the mask's position in the state tuple (None: no mask),
    whether it is a key-padding mask (True = pad, torch) or an attention mask (non-zero = real,
    HF), and the default pooling of exit heads (``"cls"`` when the model has a class token)."""

    mask_index: Optional[int] = None
    padding_mask: bool = False
    pool: str = "cls"


@dataclass
class EncoderSplit:
    stages: Sequence[nn.Module]
    tail: Optional[nn.Module]  # None: the last stage's output is the logits (a backbone without a classifier)
    layout: TokenLayout
    layer_names: List[str]  # qualified names of the layers, in order (the split points)
    input_adapter: Optional[HFInputs] = None
    extra_names: dict = field(default_factory=dict)  # alias -> layer name (e.g. timm feature_info names)


def output_logits(out):
    """The logits of a model output: a tensor as it is; ``.logits`` / ``["logits"]`` of an HF
    ``ModelOutput`` or a dict; the first member of a tuple. None when there is none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "logits"):
        v = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        return v if isinstance(v, torch.Tensor) else None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class LogitsOf(nn.Module):
    """Wrap a module whose output holds the logits (ModelOutput, dict, tuple): return the logits."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        out = self.module(*args)
        logits = output_logits(out)
        if logits is None:
            raise ValueError(f"cannot find logits in the output {type(out).__name__}")
        return logits


# ---------------------------------------------------------------------------- HF inputs
class HFInputs:
    """Map an HF model's inputs, as users pass them, to the tuple stage 0 takes (``names``).
    ``pad_token_id``: the model's, for :meth:`pad`."""

    def __init__(
        self,
        names: Sequence[str],
        forward_order: Sequence[str],
        pad_token_id: int = 0,
        vocab_size: Optional[int] = None,
        max_length: Optional[int] = None,
        type_vocab_size: Optional[int] = None,
        last_token_pad_id: Optional[int] = None,
    ):
        self.names = tuple(names)
        self.forward_order = tuple(forward_order)
        self.pad_token_id = int(pad_token_id)
        # the model's config's, when it has them: token ids are checked against them (text only)
        self.vocab_size = vocab_size
        self.max_length = max_length  # what its position embeddings hold: no longer sequence fits
        self.type_vocab_size = type_vocab_size  # rows of its segment embeddings (RoBERTa's: 1)
        # a decoder classifier's pad token: it reads each row's last token whose id is not this one,
        # the stages the last real token by the mask; inputs where the two differ are refused
        self.last_token_pad_id = last_token_pad_id
        # why padding an input changes its answer (None: it does not; serving's pad_to is refused)
        self.length_dependent: Optional[str] = None

    @property
    def can_pad(self) -> bool:
        """Can :meth:`pad` lengthen this model's inputs: token ids with an attention mask (text)."""
        return self.names[:2] == ("input_ids", "attention_mask")

    def pad(self, state: Tuple[torch.Tensor, ...], length: int) -> Tuple[torch.Tensor, ...]:
        """``state`` (a tuple this adapter made, [B, S] per member) right-padded to ``length``
        tokens, as a tokenizer pads: the model's pad token, attention mask 0, segment 0. The real
        tokens' outputs do not change, up to float rounding: every layer masks the padded keys
        out of attention, the rest of a layer works token by token, and the exit heads and the
        model's tail pool the real tokens (the first, or a decoder's last real one)."""
        extra = length - state[0].shape[1]
        if extra <= 0:
            return state
        fills = {"input_ids": self.pad_token_id}  # attention_mask, token_type_ids: 0
        return tuple(
            torch.nn.functional.pad(t, (0, extra), value=fills.get(name, 0)) for name, t in zip(self.names, state)
        )

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            given = {self.names[0]: x}
        elif isinstance(x, Mapping):
            given = dict(x.items())
        elif isinstance(x, (tuple, list)):
            if len(x) > len(self.forward_order):
                raise ValueError(f"got {len(x)} positional inputs; the model's forward takes {self.forward_order}")
            given = {n: v for n, v in zip(self.forward_order, x) if v is not None}
        else:
            raise TypeError(
                f"an HF model's input is a dict (or a tokenizer's BatchEncoding), a tuple in forward order "
                f"{self.forward_order[:4]} or the {self.names[0]} tensor; got {type(x).__name__}"
            )
        if given.get("use_cache") is False:  # what the stages do anyway (a decoder's, with no cache)
            del given["use_cache"]
        unknown = sorted(k for k, v in given.items() if k not in self.names and v is not None)
        if unknown:
            cache = sorted({"cache", "past_key_values", "use_cache"} & set(unknown))
            hint = (
                f"; the stages run without a key/value cache (a tuple is read in the forward's order "
                f"{self.forward_order[:3]}; pass a dict of {list(self.names)}; over HTTP, name the "
                'safetensors tensors or the JSON "inputs" fields so)'
                if cache
                else ""
            )
            raise ValueError(
                f"inputs {unknown} are not supported by the early-exit stages; accepted: {list(self.names)}{hint}"
            )
        main = given.get(self.names[0])
        if not isinstance(main, torch.Tensor):
            raise ValueError(f"the input needs {self.names[0]!r} (a tensor); got keys {sorted(given)}")
        out = []
        for n in self.names:
            v = given.get(n)
            if v is None:  # HF's own defaults: every token real, segment 0
                v = torch.ones_like(main) if n == "attention_mask" else torch.zeros_like(main)
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"input {n!r} must be a tensor, got {type(v).__name__}")
            out.append(v)
        if self.names[0] == "input_ids":
            self._check_tokens(out)
        return out[0] if len(out) == 1 else tuple(out)

    def _check_tokens(self, members: List[torch.Tensor]) -> None:
        """Text inputs the model could only fail on, refused with what was wrong (the model's
        own errors name none of it: an embedding's "index out of range in self", a size mismatch
        in the position embeddings). The ids' values are checked on the CPU only (elsewhere it
        would wait for the device)."""
        ids = members[0]
        # The shape first: an empty list becomes a float32 tensor (JSON [[]], torch.tensor([[]])),
        # whose dtype is not what is wrong with it.
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {list(ids.shape)}")
        if ids.shape[1] == 0:  # the model's own error is a reshape deep inside attention
            raise ValueError(
                f"input_ids has 0 tokens per row (shape {list(ids.shape)}); a row needs at least one token "
                "(a tokenizer gives [CLS] [SEP] for an empty text)"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got {dtype_name(ids.dtype)}")
        for name, t in zip(self.names[1:], members[1:]):
            if t.shape != ids.shape:
                raise ValueError(f"{name} has shape {list(t.shape)}; it must match input_ids' {list(ids.shape)}")
        if self.max_length is not None and ids.shape[1] > self.max_length:
            raise ValueError(
                f"a sequence of {ids.shape[1]} tokens; this model takes at most {self.max_length} "
                "(as many as its position embeddings hold)"
            )
        if self.vocab_size is not None and ids.device.type == "cpu" and ids.numel():
            lo, hi = (int(v) for v in ids.aminmax())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, {self.vocab_size}) (the model's vocab_size); got ids from {lo} to {hi}"
                )
        pad = getattr(self, "last_token_pad_id", None)  # (an adapter pickled before it had one)
        if pad is not None and ids.device.type == "cpu" and ids.numel():
            self._check_last_token(ids, members[self.names.index("attention_mask")], pad)
        types = getattr(self, "type_vocab_size", None)  # (an adapter pickled before it had one)
        if types is not None and "token_type_ids" in self.names and ids.device.type == "cpu" and ids.numel():
            seg = members[self.names.index("token_type_ids")]
            lo, hi = (int(v) for v in seg.aminmax())
            if lo < 0 or hi >= types:
                raise ValueError(
                    f"token_type_ids must be in [0, {types}) (the model's type_vocab_size; RoBERTa-style models "
                    f"have 1 segment: leave token_type_ids out); got ids from {lo} to {hi}"
                )

    @staticmethod
    def _check_last_token(ids: torch.Tensor, mask: torch.Tensor, pad: int) -> None:
        """A decoder classifier reads each row's last token whose id is not ``pad`` (HF's rule);
        the stages cannot see the ids and read the last real token by the mask. Refuse a row
        where the two differ (a real token equal to the pad token at its end, pad ids without a
        mask, a mask that pads tokens whose ids are not the pad token): its answer would not be
        the model's."""
        S = ids.shape[1]
        by_ids = cast(torch.Tensor, last_real_token(ids != pad, S))
        by_mask = cast(torch.Tensor, last_real_token(mask, S))
        bad = (by_ids != by_mask).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            raise ValueError(
                f"row {i}: the model's classifier reads its last token whose id is not the pad token {pad} "
                f"(position {int(by_ids[i])}), but its attention_mask's last real token is at position "
                f"{int(by_mask[i])}; a decoder's input must hold pad_token_id exactly where the mask pads the "
                "row's end (as a tokenizer pads; a text ending in the pad token, e.g. an EOS used as pad, is not "
                "classified by its last token), and a padded input needs its attention_mask"
            )


# ---------------------------------------------------------------------------- HF stages
class HFEmbed(nn.Module):
    """Stage-0 entry of an HF encoder: embeddings of the inputs; passes the 2-D mask on.
    ``project``: the linear map a model with embeddings narrower than its layers applies to
    them before its first layer (ELECTRA's ``embeddings_project``)."""

    def __init__(self, embeddings: nn.Module, names: Sequence[str], project: Optional[nn.Module] = None):
        super().__init__()
        self.embeddings = embeddings
        self.project = project
        self.names = tuple(names)
        params = inspect.signature(embeddings.forward).parameters
        self._pass = tuple(n for n in self.names if n != "attention_mask" and n in params)
        # DeBERTa's embeddings take the 2-D mask as `mask` (they zero the padded tokens' vectors)
        self._mask_arg = "attention_mask" in self.names and "mask" in params

    def forward(self, *inputs):
        given = dict(zip(self.names, inputs))
        kwargs = {n: given[n] for n in self._pass}
        if self._mask_arg:
            kwargs["mask"] = given["attention_mask"]
        hidden = self.embeddings(**kwargs)
        if self.project is not None:
            hidden = self.project(hidden)
        mask = given.get("attention_mask")
        return hidden if mask is None else (hidden, mask)


def trim_tokens(state: tuple, mask_index: int = 1, padding_mask: bool = False) -> tuple:
    """Cut the sequence axis (dim 1) of every state member that has it to the longest real
    sequence among the rows: columns past the last real token of every row are padding for all
    of them. Exact for encoders: a padded key gets zero attention weight and tokens do not mix
    otherwise; exact for decoders too, with either padding side (causal attention: no kept token
    sees a cut column). With left padding (or none) nothing is cut. Reads one scalar to the host."""
    mask = state[mask_index]
    S = mask.shape[1]
    real = (mask == 0) if padding_mask else (mask != 0)
    cols = real.any(dim=0)
    # last real column + 1 (at least 1 column, token 0, is kept)
    L = max(int(S - torch.flip(cols, (0,)).int().argmax()) if bool(cols.any()) else 1, 1)
    if L >= S:
        return state
    return tuple(t[:, :L] if t.dim() >= 2 and t.shape[1] == S else t for t in state)


def trim_ref(state: tuple, mask_index: int = 1, padding_mask: bool = False) -> tuple:
    """Plain reference of :func:`trim_tokens`: per column, loop."""
    mask = state[mask_index]
    S = mask.shape[1]
    L = 1
    for j in range(S):
        col = mask[:, j]
        if bool(((col == 0) if padding_mask else (col != 0)).any()):
            L = j + 1
    return tuple(t[:, :L] if t.dim() >= 2 and t.shape[1] == S else t for t in state)


class HFLayers(nn.Module):
    """A run of HF encoder layers on ``(hidden, mask)`` (or ``hidden`` alone). The layers'
    attention mask is built from the 2-D mask by ``create_bidirectional_mask``, the function the
    HF encoders' own forward calls (older transformers: ``get_extended_attention_mask``).

    ``trim`` (stages after the first): the state this stage gets is packed rows; it first cuts
    the sequence axis to the longest real sequence among them (:func:`trim_tokens`), so batch
    and length compaction go together. Skipped while a CUDA graph is being captured (its shapes
    are fixed)."""

    def __init__(self, layers: Sequence[nn.Module], config, embed: Optional[nn.Module] = None, mask_maker=None):
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.config = config
        self.trim = False
        self._mask_maker = mask_maker  # older transformers: the base model's get_extended_attention_mask

    def layer_mask(self, hidden, mask):
        if mask is None:
            return None
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:
            return self._mask_maker(mask, hidden.shape[:2])
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)

    def forward(self, *state):
        if self.embed is not None:
            state = self.embed(*state)
            state = state if isinstance(state, tuple) else (state,)
        elif self.trim and len(state) > 1 and not _capturing():
            state = trim_tokens(state)
        hidden, mask = state[0], (state[1] if len(state) > 1 else None)
        if hidden.shape[0] == 0:
            # No rows: a layer maps [B, S, H] to [B, S, H], but HF attention fails on B = 0 (a
            # view with -1 over 0 elements). Passing the empty state on gives the empty answers
            # (logits [0, C]) that any other model's 0-row batch gets.
            return hidden if mask is None else (hidden, mask)
        hidden = self.run_layers(hidden, mask)
        return hidden if mask is None else (hidden, mask)

    def run_layers(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The layers on ``hidden`` (at least one row), given what the family's encoder gives
        each layer; the subclasses below are the families whose layers take more."""
        ext = self.layer_mask(hidden, mask)
        extra = self.layer_args(hidden)
        for layer in self.layers:
            # no mask (images; HF's mask function gives None when every token is real): the
            # layer's own default, unless it takes more after the mask (MPNet's bias)
            out = layer(hidden, ext, *extra) if ext is not None or extra else layer(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def layer_args(self, hidden) -> tuple:
        """What each layer takes after the hidden states and the mask (nothing here)."""
        return ()


class HFBiasLayers(HFLayers):
    """A run of MPNet layers: besides the mask, its encoder gives every layer a relative position
    bias (``compute_position_bias``, from the sequence length alone: trimming stays exact).
    The bias embedding is registered in each stage; the encoder's method computes it."""

    def __init__(self, layers: Sequence[nn.Module], config, encoder: nn.Module, embed=None):
        super().__init__(layers, config, embed=embed)
        self.relative_attention_bias = encoder.relative_attention_bias
        self.__dict__["_encoder"] = encoder  # not a submodule: its layers belong to the stages

    def layer_args(self, hidden) -> tuple:
        encoder: Any = self.__dict__["_encoder"]
        return (encoder.compute_position_bias(hidden),)


class HFRelativeLayers(HFLayers):
    """A run of DeBERTa (v1, v2/v3) layers. Its encoder gives every layer, besides the mask it
    builds from the 2-D mask (``get_attention_mask``), the tokens' relative positions
    (``get_rel_pos``, from the sequence length alone) and the relative position embeddings
    (``get_rel_embedding``); v2 with ``conv_kernel_size`` adds a convolution of the embeddings
    to layer 0's output. All three are the encoder's own methods, called here as its forward
    calls them; the modules they read are registered in each stage that uses them.

    Trimming trailing pad columns (``trim``) is exact here too: relative positions depend on
    the distance between tokens only, and the convolution runs in stage 0, which never trims."""

    def __init__(self, layers: Sequence[nn.Module], config, encoder: nn.Module, first: bool, embed=None):
        super().__init__(layers, config, embed=embed)
        self.rel_embeddings = getattr(encoder, "rel_embeddings", None)
        self.rel_norm = getattr(encoder, "LayerNorm", None)
        self.conv = getattr(encoder, "conv", None) if first else None
        self.__dict__["_encoder"] = encoder  # not a submodule: its layers belong to the stages

    def run_layers(self, hidden, mask):
        enc = self._encoder
        ext = enc.get_attention_mask(mask)
        rel_pos = enc.get_rel_pos(hidden)
        rel_emb = enc.get_rel_embedding()
        embedded = hidden
        for i, layer in enumerate(self.layers):
            out = layer(hidden, ext, query_states=None, relative_pos=rel_pos, rel_embeddings=rel_emb)
            hidden = out[0] if isinstance(out, tuple) else out
            if i == 0 and self.conv is not None:
                hidden = self.conv(embedded, hidden, mask)
        return hidden


def _relative_encoder(base: nn.Module) -> Optional[nn.Module]:
    """The encoder of a DeBERTa-style model (relative positions given to each layer), else None."""
    enc = getattr(base, "encoder", None)
    methods = ("get_rel_pos", "get_rel_embedding", "get_attention_mask")
    return enc if isinstance(enc, nn.Module) and all(callable(getattr(enc, m, None)) for m in methods) else None


class HFRotaryLayers(HFLayers):
    """A run of ModernBERT layers. Its forward gives each layer, by the layer's
    ``attention_type``, a mask (full, or a sliding window of ``config.local_attention`` tokens)
    and rotary position embeddings of the positions 0..S-1 (``rotary_emb``, registered here).
    Both depend on token positions only, so trimming trailing pad columns stays exact."""

    def __init__(self, layers: Sequence[nn.Module], config, rotary: nn.Module, embed=None):
        super().__init__(layers, config, embed=embed)
        self.rotary_emb = rotary

    def run_layers(self, hidden, mask):
        from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

        kw = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        masks = {"full_attention": create_bidirectional_mask(**kw)}
        masks["sliding_attention"] = create_bidirectional_sliding_window_mask(**kw)
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = {t: self.rotary_emb(hidden, positions, t) for t in {lay.attention_type for lay in self.layers}}
        for layer in self.layers:
            kind = layer.attention_type
            hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=rotary[kind])
        return hidden


def _rotary(base: nn.Module, layers: Sequence[nn.Module]) -> Optional[nn.Module]:
    """The rotary embedding of a ModernBERT-style model (layers typed full / sliding), else None."""
    rotary = getattr(base, "rotary_emb", None)
    typed = all(isinstance(getattr(lay, "attention_type", None), str) for lay in layers)
    return rotary if isinstance(rotary, nn.Module) and typed else None


def _bias_encoder(base: nn.Module) -> Optional[nn.Module]:
    """The encoder of an MPNet-style model (a relative position bias given to each layer), else None."""
    enc = getattr(base, "encoder", None)
    ok = callable(getattr(enc, "compute_position_bias", None)) and isinstance(
        getattr(enc, "relative_attention_bias", None), nn.Module
    )
    return enc if ok else None


class HFTail(nn.Module):
    """The classifier of an HF sequence / image classification model, on the last hidden state.

    ``kind`` follows the model families' forward:
    ``pooler`` (BERT: pooler -> dropout -> classifier), ``distil`` (DistilBERT: token 0 ->
    pre_classifier -> ReLU -> dropout -> classifier), ``sequence`` (RoBERTa: a classifier module
    that reads the whole sequence), ``cls`` (ViT: norm -> token 0 -> classifier), ``norm_head``
    (ModernBERT: norm -> token 0, or the mean of the real tokens with ``pool="mean"`` ->
    pre_classifier (its head) -> dropout -> classifier)."""

    KINDS = ("pooler", "distil", "sequence", "cls", "norm_head")

    def __init__(
        self, kind: str, classifier: nn.Module, *, pooler=None, dropout=None, pre_classifier=None, norm=None, pool="cls"
    ):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown tail kind {kind!r}")
        self.kind = kind
        self.pool = pool
        # registered in forward order
        self.pooler, self.pre_classifier, self.norm, self.dropout = pooler, pre_classifier, norm, dropout
        self.classifier = classifier

    def _drop(self, x):
        return self.dropout(x) if self.dropout is not None else x

    def forward(self, hidden, *rest):
        if self.kind == "pooler":
            return self.classifier(self._drop(self.pooler(hidden)))
        if self.kind == "distil":
            return self.classifier(self._drop(torch.relu(self.pre_classifier(hidden[:, 0]))))
        if self.kind == "sequence":
            return self.classifier(hidden)
        if self.kind == "norm_head":
            hidden = self.norm(hidden)
            if self.pool == "mean":  # the model's own arithmetic: masked sum / number of real tokens
                mask = rest[0].unsqueeze(-1)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
            else:
                pooled = hidden[:, 0]
            return self.classifier(self._drop(self.pre_classifier(pooled)))
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.classifier(hidden[:, 0])


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def set_trim(model, on: bool = True) -> int:
    """Turn length trimming on or off in every HF encoder stage of ``model`` (an attached
    encoder); returns how many stages it applies to (stage 0 embeds, it never trims)."""
    stages = [stage for stage in list(model.stages)[1:] if isinstance(stage, HFLayers)]
    why = next((getattr(s, "untrimmable", None) for s in stages if getattr(s, "untrimmable", None)), None)
    if on and why:
        raise ValueError(
            f"trim=True would change this model's results: {why}, and a trimmed stage would see a shorter one; "
            "leave trim off"
        )
    for stage in stages:
        stage.trim = bool(on)
    return len(stages)


def _hf_tail(model: nn.Module, base: nn.Module) -> Optional[HFTail]:
    clf = getattr(model, "classifier", None)
    if model is base or not isinstance(clf, nn.Module):
        return None
    drop = getattr(model, "dropout", None)
    head_module = getattr(model, "head", None)
    if isinstance(head_module, nn.Module) and isinstance(getattr(base, "final_norm", None), nn.Module):  # ModernBERT
        pool = getattr(model.config, "classifier_pooling", "cls")
        return HFTail(
            "norm_head",
            clf,
            pre_classifier=head_module,
            dropout=getattr(model, "drop", None),
            norm=base.final_norm,
            pool=pool,
        )
    if isinstance(getattr(model, "pre_classifier", None), nn.Module):
        return HFTail("distil", clf, pre_classifier=model.pre_classifier, dropout=drop)
    if not isinstance(clf, nn.Linear):
        return HFTail("sequence", clf)
    # the pooler is the base model's (BERT) or the classifier model's own (DeBERTa's ContextPooler)
    pooler = getattr(model, "pooler", None)
    pooler = pooler if isinstance(pooler, nn.Module) else getattr(base, "pooler", None)
    activation = getattr(base, "pooler_activation", None)
    if isinstance(pooler, nn.Linear) and isinstance(activation, nn.Module):
        pooler = AlbertPooler(pooler, activation)
    if pooler is not None:
        return HFTail("pooler", clf, pooler=pooler, dropout=drop)
    return HFTail("cls", clf, norm=getattr(base, "layernorm", None))


def hf_encoder(model: nn.Module) -> Optional[Tuple[Any, List[nn.Module], List[str]]]:
    """(base model, the layer run at each depth, the split point names) when ``model`` is an HF
    encoder this module can cut, else None. The names are the layers' qualified names; ALBERT's
    are ``<base>.encoder.layer.<depth>`` (one layer group runs at several depths)."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or not hasattr(getattr(base, "config", None), "to_dict"):
        return None
    if not isinstance(getattr(base, "embeddings", None), nn.Module):
        return None
    shared = _albert_depths(base)
    if shared is not None:
        prefix = _qualified(model, [cast(nn.Module, base.encoder)])[0]
        return base, shared, [f"{prefix}.layer.{i}" for i in range(len(shared))]
    # where the model families keep their layer list, across transformers releases
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
        layers: Any = base
        for a in path.split("."):
            layers = getattr(layers, a, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return base, list(layers), _qualified(model, layers)
    return None


def _albert_depths(base: Any) -> Optional[List[nn.Module]]:
    """ALBERT's layer group at each of its num_hidden_layers depths, as its encoder picks them
    (depth i runs group int(i / (layers / groups))), else None."""
    groups = getattr(getattr(base, "encoder", None), "albert_layer_groups", None)
    if not isinstance(groups, nn.ModuleList) or len(groups) == 0:
        return None
    depth, count = int(base.config.num_hidden_layers), int(base.config.num_hidden_groups)
    return [groups[int(i / (depth / count))] for i in range(depth)]


class AlbertPooler(nn.Module):
    """ALBERT's pooled output: its pooler (linear) on token 0, then its pooler_activation."""

    def __init__(self, pooler: nn.Module, activation: nn.Module):
        super().__init__()
        self.pooler, self.pooler_activation = pooler, activation

    def forward(self, hidden):
        return self.pooler_activation(self.pooler(hidden[:, 0]))


def _qualified(model: nn.Module, modules: Iterable[nn.Module]) -> List[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in modules]


def split_hf(model: nn.Module, cuts: Sequence[int]) -> EncoderSplit:
    """Cut an HF encoder after layers ``cuts`` (0-based indices, increasing)."""
    found = hf_encoder(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} is not an HF encoder with an embeddings module and a layer list")
    base, layers, layer_names = found
    if getattr(base.config, "is_decoder", False):
        raise unsupported(model, "it is configured as a decoder (is_decoder=True), and only encoders are cut")
    if getattr(base, "attention_type", None) == "block_sparse":  # refused before a dry run switches it
        raise unsupported(
            model,
            "its block_sparse attention needs the per-block masks its forward builds (its forward also switches "
            "to full attention for good on a short batch); set_attention_type('original_full') gives full attention, "
            "which is cut",
        )
    order = [n for n in inspect.signature(model.forward).parameters if n not in ("self", "kwargs")]
    primary = next((n for n in order if n in _PRIMARY), None)
    if primary is None:
        raise ValueError(f"{type(model).__name__}.forward takes none of {_PRIMARY}; cannot tell its main input")
    names = [primary]
    if primary == "input_ids":
        names.append("attention_mask")
        if "token_type_ids" in order and "token_type_ids" in inspect.signature(base.embeddings.forward).parameters:
            names.append("token_type_ids")
    mask_maker = getattr(base, "get_extended_attention_mask", None)
    # ELECTRA (ALBERT): embeddings of embedding_size, projected to hidden_size by the base model's
    # (encoder's) forward
    project = getattr(
        base, "embeddings_project", getattr(getattr(base, "encoder", None), "embedding_hidden_mapping_in", None)
    )
    bounds = [0] + [c + 1 for c in cuts] + [len(layers)]
    relative = _relative_encoder(base) if primary == "input_ids" else None
    if relative is not None and int(getattr(base, "z_steps", 0) or 0) > 1:
        raise unsupported(model, "its z_steps re-run the last layer with query states")
    biased = _bias_encoder(base) if primary == "input_ids" else None
    rotary = _rotary(base, layers) if primary == "input_ids" else None
    stages: List[HFLayers] = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        run = layers[lo:hi]
        embed = HFEmbed(base.embeddings, names, project) if k == 0 else None
        if relative is not None:
            stages.append(HFRelativeLayers(run, base.config, relative, k == 0, embed=embed))
        elif rotary is not None:
            stages.append(HFRotaryLayers(run, base.config, rotary, embed=embed))
        elif biased is not None:
            stages.append(HFBiasLayers(run, base.config, biased, embed=embed))
        else:
            stages.append(HFLayers(run, base.config, embed=embed, mask_maker=mask_maker))
    tail = _hf_tail(model, base)
    text = primary == "input_ids"
    layout = TokenLayout(mask_index=1 if text else None, padding_mask=False, pool="cls")

    def config_int(name: str) -> Optional[int]:
        v = getattr(base.config, name, None)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    inputs = HFInputs(
        names,
        order,
        pad_token_id=config_int("pad_token_id") or 0,
        vocab_size=config_int("vocab_size"),
        max_length=_max_tokens(base.embeddings),
        type_vocab_size=_table_rows(base.embeddings, "token_type_embeddings"),
    )
    return EncoderSplit(stages, tail, layout, layer_names, inputs)


def _table_rows(embeddings: nn.Module, name: str) -> Optional[int]:
    """The rows of an embedding table of ``embeddings`` (None when it has none by that name)."""
    table = getattr(embeddings, name, None)
    return table.num_embeddings if isinstance(table, nn.Embedding) else None


def _max_tokens(embeddings: nn.Module) -> Optional[int]:
    """The longest sequence an HF text encoder takes: the rows of its position embedding table,
    less RoBERTa's offset (its positions count from padding_idx + 1: 514 rows hold 512 tokens).
    None without a table (DeBERTa-v3's relative positions, ModernBERT's rotary embeddings): the
    model runs any length."""
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        return None
    pad = getattr(embeddings, "padding_idx", None)
    return table.num_embeddings - (pad + 1 if isinstance(pad, int) and not isinstance(pad, bool) else 0)


# ---------------------------------------------------------------------------- HF decoders
# Decoder sequence classifiers cut into stages, by model_type: what each family's forward gives
# its layers (tests/test_decoder_families.py checks each against the unmodified model). Others
# (OPT's positions counted from the mask, GPT-Neo's local layers, ...) are refused by name.
DECODERS = ("gpt2", "llama", "qwen2", "mistral")


def hf_decoder(model: nn.Module) -> Optional[Tuple[Any, List[nn.Module], List[str]]]:
    """(base model, its decoder layers, their qualified names) when ``model`` is an HF decoder
    this module cuts (:data:`DECODERS`): a sequence classifier (a ``score`` head on the last
    real token) or the base model itself, else None."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or getattr(getattr(base, "config", None), "model_type", None) not in DECODERS:
        return None
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    if model is not base and not (classifier and isinstance(getattr(model, "score", None), nn.Linear)):
        return None  # a language-model head (GPT2LMHeadModel), a token classifier, ...
    layers = getattr(base, "h", getattr(base, "layers", None))
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    return base, list(layers), _qualified(model, layers)


def last_real_token(mask: Optional[torch.Tensor], length: int, padding_mask: bool = False) -> Optional[torch.Tensor]:
    """The position of each row's last real token [B] (int64) by its 2-D mask, 0 for a row with
    none (HF's decoder classifiers: the argmax of position * real); None without a mask (the
    last column is every row's)."""
    if mask is None:
        return None
    real = (mask == 0) if padding_mask else (mask != 0)
    cols = torch.arange(length, device=mask.device)
    return (real * cols).amax(dim=1) if length else cols.new_zeros(mask.shape[0])


class HFDecoderEmbed(nn.Module):
    """Stage-0 entry of an HF decoder: the token embeddings (GPT-2: plus the position embeddings
    of positions 0..S-1, then its dropout, as its forward adds them); passes the 2-D mask on."""

    def __init__(self, tokens: nn.Module, positions: Optional[nn.Module] = None, dropout: Optional[nn.Module] = None):
        super().__init__()
        self.tokens, self.positions, self.dropout = tokens, positions, dropout

    def forward(self, input_ids, attention_mask):
        hidden = self.tokens(input_ids)
        if self.positions is not None:
            at = torch.arange(input_ids.shape[1], device=hidden.device).unsqueeze(0)
            hidden = hidden + self.positions(at).to(hidden.device)
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        return hidden, attention_mask


class HFDecoderLayers(HFLayers):
    """A run of HF decoder layers (GPT-2, Llama, Qwen2, Mistral). As the model's forward (with no
    key/value cache), each stage builds the layers' causal mask combined with the padding mask
    (``create_causal_mask``, or ``create_sliding_window_causal_mask`` for the layers of a
    sliding-window kind) and, for rotary models, the rotary embeddings of positions 0..S-1
    (``rotary_emb``, registered here); both from the state, so packed rows stay consistent.

    Positions count from column 0, padding or not, as HF's forward counts them without
    ``position_ids``. Trimming trailing columns (``trim``) is exact with either padding side:
    under causal attention no kept token sees a later column, and no position moves."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        config,
        kinds: Sequence[str],
        rotary: Optional[nn.Module] = None,
        embed: Optional[nn.Module] = None,
    ):
        super().__init__(layers, config, embed=embed)
        self.rotary_emb = rotary
        # why cutting pad columns would change the results (None: it does not)
        self.untrimmable = _length_dependent_rope(rotary)
        self.kinds = tuple(kinds)  # each layer's mask: "full_attention" or "sliding_attention"
        from transformers import masking_utils

        self._makers = {
            "full_attention": masking_utils.create_causal_mask,
            "sliding_attention": masking_utils.create_sliding_window_causal_mask,
        }
        params = inspect.signature(masking_utils.create_causal_mask).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # its name across releases
        self._cache_position = "cache_position" in params

    def run_layers(self, hidden, mask):
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kw = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask, position_ids=positions)
        kw[self._cache_arg] = None
        if self._cache_position:
            kw["cache_position"] = positions[0]
        masks = {kind: self._makers[kind](**kw) for kind in set(self.kinds)}
        extra = {} if self.rotary_emb is None else {"position_embeddings": self.rotary_emb(hidden, positions)}
        for layer, kind in zip(self.layers, self.kinds):
            out = layer(hidden, attention_mask=masks[kind], position_ids=positions, use_cache=False, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def _length_dependent_rope(rotary: Optional[nn.Module]) -> Optional[str]:
    """Why rotary embeddings whose frequencies follow the batch's sequence length (pads
    included: HF's dynamic NTK and LongRoPE scaling) make trimming inexact, else None."""
    kinds = getattr(rotary, "rope_type", None)
    for kind in kinds.values() if isinstance(kinds, dict) else [kinds]:
        if isinstance(kind, str) and ("dynamic" in kind or kind == "longrope"):
            return f"its rotary embeddings (rope_type {kind!r}) pick their frequencies by the batch's sequence length, pads included"
    return None


class HFLastTokenTail(nn.Module):
    """The classifier of an HF decoder: final norm -> ``score`` on every token -> each row's last
    real token (by the mask; HF's forward reads the last token whose id is not the pad token,
    the same one for inputs :class:`HFInputs` passes), in the model's order of operations."""

    def __init__(self, norm: nn.Module, score: nn.Module):
        super().__init__()
        self.norm, self.score = norm, score

    def forward(self, hidden, mask=None):
        logits = self.score(self.norm(hidden))
        last = last_real_token(mask, hidden.shape[1])
        if last is None:
            return logits[:, -1]
        return logits[torch.arange(hidden.shape[0], device=logits.device), last]


def _decoder_kinds(model: nn.Module, base: Any, n: int) -> List[str]:
    """Each layer's mask kind, as the family's forward picks it."""
    cfg = base.config
    kind = cfg.model_type
    if kind == "qwen2":
        kinds = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)[:n]
    elif kind == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        kinds = ["sliding_attention"] * n
    else:
        kinds = ["full_attention"] * n
    odd = sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})
    if odd:
        raise unsupported(model, f"its layers' attention kinds {odd} are not full or sliding-window causal attention")
    return kinds


def split_hf_decoder(model: nn.Module, cuts: Sequence[int]) -> EncoderSplit:
    """Cut an HF decoder (:func:`hf_decoder`) after layers ``cuts`` (0-based, increasing)."""
    found = hf_decoder(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} is not an HF decoder classifier eeruntime cuts")
    base, layers, layer_names = found
    cfg = base.config
    try:
        import transformers.masking_utils  # noqa: F401
    except ImportError:
        raise unsupported(model, "decoders need transformers.masking_utils (transformers 4.53 or later)") from None
    pad = getattr(cfg, "pad_token_id", None)
    if model is not base and not (isinstance(pad, int) and not isinstance(pad, bool)):
        raise ValueError(
            f"{type(model).__name__} has no pad token (config.pad_token_id is {pad!r}): its classifier reads each "
            "row's last token whose id is not the pad token, and without one the model classifies a single unpadded "
            "row at a time. Set model.config.pad_token_id (the tokenizer's pad_token_id; GPT-2 and Llama tokenizers "
            "have none: their eos_token_id, as fine-tuning scripts set it) before attaching"
        )
    kinds = _decoder_kinds(model, base, len(layers))
    gpt2 = isinstance(getattr(base, "wte", None), nn.Embedding)
    if gpt2:
        embed = HFDecoderEmbed(base.wte, base.wpe, getattr(base, "drop", None))
    else:
        embed = HFDecoderEmbed(base.embed_tokens)
    rotary = getattr(base, "rotary_emb", None)
    names = ("input_ids", "attention_mask")
    bounds = [0] + [c + 1 for c in cuts] + [len(layers)]
    stages = [
        HFDecoderLayers(layers[lo:hi], cfg, kinds[lo:hi], rotary, embed=embed if k == 0 else None)
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
    norm = getattr(base, "ln_f", getattr(base, "norm", None))
    if not isinstance(norm, nn.Module):
        raise unsupported(model, "it has no final norm (ln_f or norm) after its layers")
    tail = HFLastTokenTail(norm, cast(nn.Module, model.score)) if model is not base else None
    order = [n for n in inspect.signature(model.forward).parameters if n not in ("self", "kwargs")]
    vocab = getattr(cfg, "vocab_size", None)
    inputs = HFInputs(
        names,
        order,
        pad_token_id=pad if isinstance(pad, int) else 0,
        vocab_size=vocab if isinstance(vocab, int) else None,
        max_length=base.wpe.num_embeddings if gpt2 else None,  # rotary positions: any length
        last_token_pad_id=pad if model is not base else None,
    )
    inputs.length_dependent = _length_dependent_rope(rotary)
    layout = TokenLayout(mask_index=1, padding_mask=False, pool="last")
    return EncoderSplit(stages, tail, layout, layer_names, inputs)


# ---------------------------------------------------------------------------- timm ViT
_TIMM_EMBED = ("patch_embed", "pos_drop", "patch_drop", "norm_pre")


def timm_vit(model: nn.Module) -> bool:
    """True for a timm VisionTransformer-style model (patch_embed, _pos_embed, blocks, forward_head)."""
    return all(
        hasattr(model, a) for a in _TIMM_EMBED + ("_pos_embed", "blocks", "norm", "forward_head")
    ) and isinstance(model.blocks, nn.Sequential)


class TimmEmbed(nn.Module):
    """patch_embed -> _pos_embed -> patch_drop -> norm_pre of a timm ViT. ``_pos_embed`` is the
    model's own method; the modules and parameters it reads (pos_drop, pos_embed, cls_token,
    reg_token) are registered here, so they are part of the multi-exit model's parameters."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        for a in _TIMM_EMBED:
            setattr(self, a, getattr(owner, a))
        for n, p in owner.named_parameters(recurse=False):
            self.register_parameter(n, p)
        self.__dict__["_owner"] = owner  # not a submodule: its other layers belong to other stages

    def forward(self, x):
        x = self._owner._pos_embed(self.patch_embed(x))
        return self.norm_pre(self.patch_drop(x))


class TimmTail(nn.Module):
    """norm -> forward_head of a timm ViT (pooling, fc_norm, head). Registers the model's
    children that the stages do not hold."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        for n, m in owner.named_children():
            if n not in _TIMM_EMBED + ("blocks",):
                setattr(self, n, m)
        self.__dict__["_owner"] = owner

    def forward(self, x):
        # pre_logits, then our own `head`, so a replaced classifier (num_classes) is the one used
        return self.head(self._owner.forward_head(self._owner.norm(x), pre_logits=True))


def split_timm_vit(model: nn.Module, cuts: Sequence[int]) -> EncoderSplit:
    blocks = list(cast(Iterable[nn.Module], model.blocks))
    bounds = [0] + [c + 1 for c in cuts] + [len(blocks)]
    stages = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        run = nn.Sequential(*blocks[lo:hi])
        stages.append(nn.Sequential(TimmEmbed(model), run) if k == 0 else run)
    prefix = getattr(model, "num_prefix_tokens", 1)
    pool = "cls" if prefix > 0 and getattr(model, "global_pool", "token") == "token" else "mean"
    names = _qualified(model, blocks)
    aliases = {}
    for info in getattr(model, "feature_info", None) or []:
        mod = info.get("module")
        if mod in names:
            aliases[mod] = mod
    return EncoderSplit(stages, TimmTail(model), TokenLayout(pool=pool), names, None, aliases)


# ---------------------------------------------------------------------------- dispatch
def encoder_layers(model: nn.Module) -> Optional[List[str]]:
    """The qualified names of an encoder's layers (its split points), or None when ``model`` is
    not an encoder this module cuts."""
    hf = hf_encoder(model) or hf_decoder(model)
    if hf is not None:
        return hf[2]
    if timm_vit(model):
        return _qualified(model, cast(Iterable[nn.Module], model.blocks))
    return None


def split_encoder(model: nn.Module, cuts: Sequence[int]) -> EncoderSplit:
    if hf_decoder(model) is not None:
        return split_hf_decoder(model, cuts)
    if hf_encoder(model) is not None:
        return split_hf(model, cuts)
    return split_timm_vit(model, cuts)

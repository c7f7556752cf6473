"""HF architectures beyond BERT: each built from a tiny config (random weights, nothing
downloaded), attached by ``ee.attach_exits``, and either checked against the unmodified model
(final exit == its logits on a padded batch; ``rt.infer`` == the per-sample loop with a mix of
exits; each text alone == its row in the padded batch) or refused by attach with a message that
names what is not supported and what is."""

import pytest
import torch
from reference import per_sample_loop
from torch import nn

import eeruntime as ee

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional dependency (make test installs it)"
)

V, H = 60, 32
COMMON = dict(
    vocab_size=V,
    hidden_size=H,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=40,
    num_labels=3,
)
SUPPORTED = "supported: BERT"  # the start of the list every refusal names


def seeded(build):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval()


def text_batch(B=12, S=14, seed=1):
    """Right-padded token ids (row 0 full, others 2..S real tokens), never the pad ids 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    lengths = torch.randint(2, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    return {"input_ids": torch.where(mask.bool(), ids, torch.zeros_like(ids)), "attention_mask": mask}


def check_family(backbone, at):
    """Final exit == the HF model (every threshold infinite: no early exit); a mix of exits ==
    the per-sample loop; each row alone, unpadded == its row in the padded batch."""
    model = ee.attach_exits(backbone, at=at)
    x = text_batch()
    with torch.no_grad():
        want = backbone(**x).logits
        never = ee.EERuntime(model, thresholds=float("inf"), criterion="max_prob").infer(x)
        assert bool((never.exit_index == len(at)).all())
        torch.testing.assert_close(never.logits, want, rtol=1e-5, atol=1e-6)
        scores = model(x)[0].softmax(-1).amax(-1).sort().values
        thr = float(scores[5] + scores[6]) / 2  # half the rows leave at exit 0, none on the threshold
        res = ee.EERuntime(model, thresholds=thr, criterion="max_prob").infer(x)
        ref_logits, ref_exit, _ = per_sample_loop(model, model.prepare_input(x), [thr] * len(at), "max_prob")
        assert torch.equal(res.exit_index, ref_exit) and len(set(ref_exit.tolist())) >= 2
        torch.testing.assert_close(res.logits.double(), ref_logits, rtol=1e-4, atol=1e-5)
        for i in range(len(want)):
            n = int(x["attention_mask"][i].sum())
            alone = model({k: v[i : i + 1, :n] for k, v in x.items()})[-1]
            torch.testing.assert_close(alone[0], never.logits[i], rtol=1e-4, atol=1e-5)


def check_trim(backbone, at):
    """attach_exits(trim=True): cutting the survivors' trailing pad columns keeps every result
    (positions that are relative, or counted from 0, do not move)."""
    x = {k: torch.cat([v, torch.zeros(12, 4, dtype=v.dtype)], 1) for k, v in text_batch().items()}
    plain = ee.attach_exits(backbone, at=at)
    trimmed = ee.attach_exits(backbone, at=at, trim=True)
    trimmed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        scores = plain(x)[0].softmax(-1).amax(-1).sort().values
    thr = float(scores[3] + scores[4]) / 2
    want = ee.EERuntime(plain, thresholds=thr, criterion="max_prob").infer(x)
    got = ee.EERuntime(trimmed, thresholds=thr, criterion="max_prob").infer(x)
    assert torch.equal(got.exit_index, want.exit_index)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ supported families
def test_xlm_roberta_is_the_model():  # RoBERTa's layout: pad id 1, positions counted from the ids
    check_family(
        seeded(lambda: transformers.XLMRobertaForSequenceClassification(transformers.XLMRobertaConfig(**COMMON))),
        ["layer.0", "layer.2"],
    )


def test_deit_is_the_model():
    cfg = transformers.DeiTConfig(
        image_size=16, patch_size=4, hidden_size=H, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
    )
    backbone = seeded(lambda: transformers.DeiTForImageClassification(cfg))
    model = ee.attach_exits(backbone, at=["deit.layers.0", "layers.2"])
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        never = ee.EERuntime(model, thresholds=float("inf"), criterion="max_prob").infer(x)
        torch.testing.assert_close(never.logits, backbone(x).logits, rtol=1e-5, atol=1e-6)
        scores = model(x)[0].softmax(-1).amax(-1).sort().values
        thr = float(scores[5] + scores[6]) / 2
        res = ee.EERuntime(model, thresholds=thr, criterion="max_prob").infer(x)
    ref_logits, ref_exit, _ = per_sample_loop(model, x, [thr, thr], "max_prob")
    assert torch.equal(res.exit_index, ref_exit) and len(set(ref_exit.tolist())) >= 2
    torch.testing.assert_close(res.logits.double(), ref_logits, rtol=1e-4, atol=1e-5)


def beit(**kw):
    cfg = transformers.BeitConfig(
        image_size=16,
        patch_size=4,
        hidden_size=H,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        **kw,
    )
    return transformers.BeitForImageClassification(cfg)


def test_beit_is_probed_with_images():
    """BEiT's config has a vocab_size (for masked image modelling): attach probed it with token
    ids and refused it ("inputs ['attention_mask', 'input_ids'] are not supported"). Mean
    pooling (its default) is its pooler, which the tail runs."""
    backbone = seeded(beit)
    model = ee.attach_exits(backbone, at=["beit.layers.0", "layers.2"])
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        never = ee.EERuntime(model, thresholds=float("inf"), criterion="max_prob").infer(x)
        torch.testing.assert_close(never.logits, backbone(x).logits, rtol=1e-5, atol=1e-6)


def test_parameters_the_stages_would_not_run_are_refused_even_while_zero():
    """BEiT's shared relative position bias sits outside its layers, and a fresh model's table is
    zero: the dry run matched, attach succeeded, and the stages never added the bias (after
    training, or with the table set, the final exit was not the model)."""
    backbone = seeded(lambda: beit(use_shared_relative_position_bias=True))
    with pytest.raises(
        ValueError, match=f"Beit.*parameters outside its layers.*relative_position_bias_table.*{SUPPORTED}"
    ):
        ee.attach_exits(backbone, at=["layers.1"])
    # a base model's pooler is not used by a new final head: that is not refused
    base = seeded(lambda: transformers.BertModel(transformers.BertConfig(**COMMON)))
    assert ee.attach_exits(base, at=["layer.1"], num_classes=3).num_exits == 2


# ------------------------------------------------------------------ DeBERTa
def deberta_v2():
    cfg = transformers.DebertaV2Config(**COMMON, relative_attention=True, pos_att_type=["p2c", "c2p"])
    return transformers.DebertaV2ForSequenceClassification(cfg)


def deberta():
    cfg = transformers.DebertaConfig(**COMMON, relative_attention=True, pos_att_type=["p2c", "c2p"])
    return transformers.DebertaForSequenceClassification(cfg)


def deberta_v3(conv: int = 3):
    """DeBERTa-v3's layout (DebertaV2 classes): relative positions only, log buckets, a
    LayerNorm on the relative embeddings; ``conv``: v2-xlarge's convolution after layer 0."""
    cfg = transformers.DebertaV2Config(
        **COMMON,
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        position_buckets=8,
        norm_rel_ebd="layer_norm",
        conv_kernel_size=conv,
        type_vocab_size=2,
    )
    return transformers.DebertaV2ForSequenceClassification(cfg)


@pytest.mark.parametrize("build", [deberta_v3, deberta_v2, deberta], ids=["v3-conv", "v2", "v1"])
def test_deberta_relative_positions_are_given_to_every_stage(build):
    """DeBERTa's encoder gives each layer the relative positions and their embeddings (and its
    ContextPooler sits on the classifier model): the stages called the layers without them and
    failed inside ("dropout(): argument 'input' must be Tensor, not NoneType")."""
    backbone = seeded(build)
    at = ["deberta.encoder.layer.0", "layer.2"]
    check_family(backbone, at)
    check_trim(backbone, at)


# ------------------------------------------------------------------ MPNet
def mpnet():
    backbone = transformers.MPNetForSequenceClassification(transformers.MPNetConfig(**COMMON))
    with torch.no_grad():  # a bias as large as a trained model's (its init, std 0.02, hardly moves a logit)
        backbone.mpnet.encoder.relative_attention_bias.weight.mul_(100)
    return backbone


def test_mpnet_position_bias_is_given_to_every_stage():
    """MPNet's encoder gives each layer a relative position bias: the stages called the layers
    without it and the dry run refused the model. A row alone (every token real, so no mask at
    all for the layers) gets the bias too."""
    check_family(seeded(mpnet), ["mpnet.encoder.layer.0", "layer.2"])
    check_trim(seeded(mpnet), ["layer.0", "layer.2"])


# ------------------------------------------------------------------ ModernBERT
def modernbert(pooling="cls"):
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1, cls_token_id=1, sep_token_id=1)
    cfg = transformers.ModernBertConfig(
        **COMMON, **ids, global_attn_every_n_layers=2, local_attention=8, classifier_pooling=pooling
    )
    return transformers.ModernBertForSequenceClassification(cfg)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_modernbert_rotary_and_sliding_window_layers_and_its_head(pooling):
    """ModernBERT's forward gives each layer rotary embeddings and a full or sliding-window
    mask by its type, and its classifier reads final_norm -> pool -> head: the stages called the
    layers without them and failed inside ("cannot unpack non-iterable NoneType object")."""
    backbone = seeded(lambda: modernbert(pooling))
    check_family(backbone, ["model.layers.0", "layers.2"])  # 14 tokens: the window of 8 cuts some
    check_trim(backbone, ["layers.0", "layers.2"])


# ------------------------------------------------------------------ ALBERT
@pytest.mark.parametrize("groups", [1, 2])
def test_albert_shared_layers_cut_by_depth(groups):
    """ALBERT runs one layer group at several depths (num_hidden_groups groups over
    num_hidden_layers depths); its split points are the depths (``albert.encoder.layer.<i>``).
    Before: not found as an encoder ("cannot guess an input ... pass example_input", then fx
    could not trace it)."""
    cfg = transformers.AlbertConfig(**COMMON, embedding_size=16, num_hidden_groups=groups, inner_group_num=2)
    backbone = seeded(lambda: transformers.AlbertForSequenceClassification(cfg))
    names = [p.name for p in ee.split_points(backbone)]
    assert names == [f"albert.encoder.layer.{i}" for i in range(3)]
    check_family(backbone, ["albert.encoder.layer.0", "layer.2"])
    check_trim(backbone, ["layer.0", "layer.2"])
    model = ee.attach_exits(backbone, at=["layer.1"])
    # the stages hold the embeddings, the projection and the shared groups: one set of parameters
    base = [backbone.albert.embeddings, backbone.albert.encoder]
    assert {id(p) for p in model.stages.parameters()} == {id(p) for m in base for p in m.parameters()}


# ------------------------------------------------------------------ ELECTRA
def test_electra_with_its_embedding_projection_is_the_model():
    """ELECTRA's embeddings are narrower than its layers (embedding_size, 128 by default) and its
    forward projects them (``embeddings_project``) before layer 0: the stages skipped it and
    failed deep inside ("mat1 and mat2 shapes cannot be multiplied")."""
    backbone = seeded(
        lambda: transformers.ElectraForSequenceClassification(transformers.ElectraConfig(**COMMON, embedding_size=16))
    )
    check_family(backbone, ["electra.encoder.layer.0", "layer.2"])


# ------------------------------------------------------------------ refused, with what is supported
def opt():  # a decoder family not cut (GPT-2, Llama, Qwen2, Mistral are: tests/test_decoder_families.py)
    cfg = transformers.OPTConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=4, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=H
    )
    return transformers.OPTForSequenceClassification(cfg)


def deit_with_teacher():
    cfg = transformers.DeiTConfig(
        image_size=16, patch_size=4, hidden_size=H, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
    )
    return transformers.DeiTForImageClassificationWithTeacher(cfg)


@pytest.mark.parametrize(
    "build, at, why",
    [
        # before: "cannot guess an input ... pass example_input"; with one, fx's "co_varnames is too small"
        (opt, "layers.1", "decoder family 'opt' is not one"),
        # before: "has no classifier (it returns no logits): pass num_classes" (it returns logits)
        (deit_with_teacher, "layers.1", "classifier"),
        # a BERT configured as a decoder: refused before too, without naming what is supported
        (
            lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**COMMON, is_decoder=True)),
            "layer.1",
            "decoder",
        ),
    ],
)
def test_unsupported_architectures_are_refused_naming_what_is_supported(build, at, why):
    backbone = seeded(build)
    name = type(backbone).__name__
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(ValueError, match=f"{name}.*{why}.*{SUPPORTED}"):
        ee.attach_exits(backbone, at=[at])
    with pytest.raises(ValueError, match=f"{name}.*{why}.*{SUPPORTED}"):
        ee.split_points(backbone)
    if build is opt:  # an example input does not change the answer
        ids = text_batch(2, 8)["input_ids"]
        with pytest.raises(ValueError, match=f"{name}.*{why}.*{SUPPORTED}"):
            ee.attach_exits(backbone, at=[at], example_input=ids)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_layers_that_fail_without_a_mask_are_refused_at_attach_not_at_the_first_unpadded_row():
    """MRA's layers need a mask; HF's mask function gives None when every token is real. The
    dry run (a padded batch) passed, and a request with no padding crashed inside the model
    ("'NoneType' object has no attribute 'ndim'")."""
    cfg = transformers.MraConfig(**{**COMMON, "max_position_embeddings": 64})
    backbone = seeded(lambda: transformers.MraForSequenceClassification(cfg))
    with pytest.raises(ValueError, match=f"MraForSequenceClassification.*they fail.*{SUPPORTED}"):
        ee.attach_exits(backbone, at=["layer.1"])


def big_bird(attention):
    cfg = transformers.BigBirdConfig(
        **{**COMMON, "max_position_embeddings": 64}, attention_type=attention, block_size=2, num_random_blocks=1
    )
    return transformers.BigBirdForSequenceClassification(cfg)


def test_big_bird_full_attention_is_the_model_block_sparse_is_refused_and_left_as_it_was():
    """Block-sparse attention needs masks BigBird's forward builds per block; its forward also
    switches the model's layers to full attention for good when a batch is short, as the dry
    run's was: attach silently changed what the caller's model computes on long inputs."""
    check_family(seeded(lambda: big_bird("original_full")), ["layer.0", "layer.2"])
    backbone = seeded(lambda: big_bird("block_sparse"))
    with pytest.raises(ValueError, match=f"BigBird.*block_sparse.*original_full.*{SUPPORTED}"):
        ee.attach_exits(backbone, at=["layer.1"])
    assert {layer.attention_type for layer in backbone.bert.encoder.layer} == {"block_sparse"}


class DoubledBert(transformers.BertForSequenceClassification):
    """A forward that does more than its layers and classifier (it doubles the logits)."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        out = super().forward(input_ids, attention_mask, token_type_ids, **kwargs)
        out.logits = out.logits * 2
        return out


class NeedyLayer(nn.Module):
    """A layer that needs more than the hidden states and the mask, as its encoder's forward
    gives it (here: every argument BERT's encoder passes, none optional)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, mask, encoder_hidden_states, *, encoder_attention_mask, cache, **kwargs):
        return self.layer(hidden, mask)


def test_a_forward_that_does_something_else_is_refused_naming_what_is_supported():
    backbone = seeded(lambda: DoubledBert(transformers.BertConfig(**COMMON)))
    with pytest.raises(ValueError, match=f"DoubledBert.*do not reproduce its output.*{SUPPORTED}"):
        ee.attach_exits(backbone, at=["layer.1"])
    needy = seeded(lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**COMMON)))
    layers = needy.bert.encoder.layer
    for i in range(len(layers)):
        layers[i] = NeedyLayer(layers[i])
    with pytest.raises(ValueError, match=f"more than the hidden states.*they fail \\(TypeError: .*{SUPPORTED}"):
        ee.attach_exits(needy, at=["layer.1"])


# ------------------------------------------------------------------ the longest input
def xlm_roberta():
    return transformers.XLMRobertaForSequenceClassification(transformers.XLMRobertaConfig(**COMMON))


@pytest.mark.parametrize("build, longest", [(xlm_roberta, 38), (mpnet, 38), (modernbert, None), (deberta_v3, None)])
def test_the_longest_input_is_what_the_position_table_holds(build, longest):
    """RoBERTa-style positions count from padding_idx + 1: 40 position embeddings hold 38 tokens,
    and 39 or 40 failed deep inside ("index out of range in self"). Without a position table
    (ModernBERT's rotary embeddings, DeBERTa-v3's relative positions) the model runs any length,
    and the adapter refused more than max_position_embeddings."""
    backbone = seeded(build)
    model = ee.attach_exits(backbone, at=[ee.split_points(backbone)[1].name])
    rt = ee.EERuntime(model, thresholds=float("inf"), criterion="max_prob")
    fits = COMMON["max_position_embeddings"] + 8 if longest is None else longest
    x = text_batch(3, S=fits)
    with torch.no_grad():
        torch.testing.assert_close(rt.infer(x).logits, backbone(**x).logits, rtol=1e-5, atol=1e-6)
    if longest is not None:
        x = text_batch(3, S=longest + 1)
        with pytest.raises((IndexError, RuntimeError)):  # the model's own failure, deep inside
            backbone(**x)
        with pytest.raises(ValueError, match=f"{longest + 1} tokens; this model takes at most {longest}"):
            rt.infer(x)


def test_segment_ids_beyond_the_models_segment_table_are_refused_by_name():
    """RoBERTa-style models have one segment (type_vocab_size 1); segment ids 1 from a BERT-style
    tokenizer failed inside the embeddings ("index out of range in self")."""
    cfg = transformers.XLMRobertaConfig(**COMMON, type_vocab_size=1)  # as the released checkpoints
    backbone = seeded(lambda: transformers.XLMRobertaForSequenceClassification(cfg))
    rt = ee.EERuntime(ee.attach_exits(backbone, at=["layer.1"]), thresholds=0.5)
    x = {**text_batch(3), "token_type_ids": torch.ones(3, 14, dtype=torch.long)}
    with pytest.raises(IndexError):  # the model's own failure
        backbone(**x)
    with pytest.raises(ValueError, match=r"token_type_ids must be in \[0, 1\).*got ids from 1 to 1"):
        rt.infer(x)
    assert rt.infer({**x, "token_type_ids": torch.zeros(3, 14, dtype=torch.long)}).logits.shape == (3, 3)


# ------------------------------------------------------------------ serving and bundles of the new stage kinds
@pytest.mark.parametrize("build", [deberta_v3, mpnet, modernbert], ids=["deberta-v3", "mpnet", "modernbert"])
def test_new_families_served_with_pad_to_and_saved_with_their_weights(build, tmp_path):
    """The scheduler's pad_to (requests of different lengths right-padded to 8 or 16 tokens in
    shared batches) answers each as rt.infer answers it alone; a bundle saved with its weights
    and loaded into a fresh model (other random weights) gives rt.infer's answers."""
    from serve_models import check_padded_serving_and_bundle

    def factory(seed=0):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            backbone = build().eval()
            names = ee.split_points(backbone)
            return ee.attach_exits(backbone, at=[names[0].name, names[2].name])

    model = factory()
    x = text_batch(16, seed=2)
    with torch.no_grad():
        scores = model(x)[0].softmax(-1).amax(-1).sort().values
    thr = float(scores[7] + scores[8]) / 2
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob")
    requests = [
        (x["input_ids"][i : i + 1, :n], x["attention_mask"][i : i + 1, :n])
        for i, n in enumerate(x["attention_mask"].sum(1).tolist())
    ]
    check_padded_serving_and_bundle(model, rt, x, requests, thr, factory, tmp_path)


@pytest.mark.parametrize(
    "build", [deberta_v3, deberta, mpnet, modernbert], ids=["deberta-v3", "deberta", "mpnet", "modernbert"]
)
def test_a_batch_of_no_rows_gives_empty_results_in_every_family(build):
    """A batch of 0 rows gives the empty answers a 1-row batch's layout has (as BERT's do,
    tests/test_encoders.py): the families whose layers take more than a mask failed inside HF
    attention ("cannot reshape tensor of 0 elements")."""
    backbone = seeded(build)
    names = ee.split_points(backbone)
    model = ee.attach_exits(backbone, at=[names[0].name, names[2].name])
    rt = ee.EERuntime(model, thresholds=0.5, criterion="max_prob")
    x = text_batch(3)
    one = rt.infer({k: v[:1] for k, v in x.items()})
    got = rt.infer({k: v[:0] for k, v in x.items()})
    for name in ("logits", "exit_index", "confidence"):
        a, b = getattr(got, name), getattr(one, name)[:0]
        assert a.shape == b.shape and a.dtype == b.dtype, name

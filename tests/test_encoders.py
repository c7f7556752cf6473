"""Transformer encoders with exits: HF BERT / RoBERTa / DistilBERT / ViT built from small configs
(random weights), cut at their layers by name, run by EERuntime on the inputs users pass (dict,
BatchEncoding, tuple in forward order) and checked row for row against the per-sample loop;
padded tokens never change a row's result; token heads pool along the tokens."""

import pytest
import torch
from reference import per_sample_loop
from torch import nn

import eeruntime as ee
from eeruntime.heads import SequenceHead, TokenPool

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional dependency (make test installs it)"
)

V, S = 50, 12


def bert_config(**kw):
    base = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    base.update(kw)
    return transformers.BertConfig(**base)


def bert():
    return transformers.BertForSequenceClassification(bert_config()).eval()


def roberta():
    return transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(**{**bert_config().to_dict(), "pad_token_id": 1, "max_position_embeddings": 40})
    ).eval()


def distilbert():
    cfg = transformers.DistilBertConfig(
        vocab_size=V, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=32, num_labels=3
    )
    return transformers.DistilBertForSequenceClassification(cfg).eval()


def vit():
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )
    return transformers.ViTForImageClassification(cfg).eval()


def text_batch(B=16, seed=0):
    """Token ids with right padding: row i has a real length between 3 and S (the mask says so)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    lengths = torch.randint(3, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    return {"input_ids": ids, "attention_mask": mask}


def median_threshold(model, x, k=0):
    with torch.no_grad():
        logits = model(x)[k]
    return float(torch.softmax(logits, 1).max(1).values.median())


def check_rows(rt, model, x, thr):
    """EERuntime on x == the per-sample loop, row for row (rows near a threshold excepted)."""
    res = rt.infer(x)
    ref_logits, ref_exit, margin = per_sample_loop(model, model.prepare_input(x), thr, "max_prob")
    clear = margin > 1e-5
    assert clear.sum() >= len(clear) - 2
    assert torch.equal(res.exit_index[clear], ref_exit[clear])
    torch.testing.assert_close(res.logits[clear].double(), ref_logits[clear], rtol=1e-4, atol=1e-5)
    return res


# ------------------------------------------------------------------ HF text models
@pytest.mark.parametrize(
    "make, at",
    [
        (bert, ["bert.encoder.layer.0", "bert.encoder.layer.2"]),
        (roberta, ["encoder.layer.1", "layer.2"]),
        (distilbert, ["transformer.layer.0", "transformer.layer.1"]),
    ],
)
def test_hf_text_final_exit_is_the_model_and_runtime_matches_per_sample_loop(make, at):
    backbone = make()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = ee.attach_exits(backbone, at=at)
    assert model.split_mode == "encoder" and model.num_exits == 3
    assert all(isinstance(h, SequenceHead) for h in model.exits[:-1])
    x = text_batch()
    with torch.no_grad():
        outs = model.eval()(x)
        want = backbone(**x).logits
    assert torch.equal(outs[-1], want)  # stages + the model's own tail: its logits, bit for bit
    assert all(o.shape == want.shape for o in outs)
    thr = median_threshold(model, x)
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob")
    res = check_rows(rt, model, x, [thr, thr])
    assert len(set(res.exit_index.tolist())) >= 2  # a real mix of exits, survivors packed
    for k, v in backbone.state_dict().items():  # the backbone is never written
        assert torch.equal(v, before[k]), k


def test_hf_inputs_as_users_pass_them():
    backbone = bert()
    model = ee.attach_exits(backbone, at=["layer.1"])
    x = text_batch(12)
    thr = median_threshold(model, x)
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob")
    want = rt.infer(x)
    enc = transformers.BatchEncoding(dict(x))  # what a tokenizer returns
    tt = torch.zeros_like(x["input_ids"])
    for given in (
        enc,
        (x["input_ids"], x["attention_mask"]),
        (x["input_ids"], x["attention_mask"], tt),
        {**x, "token_type_ids": tt},
    ):
        got = rt.infer(given)
        assert torch.equal(got.exit_index, want.exit_index)
        assert torch.equal(got.logits, want.logits)
    # input_ids alone: every token is real, as in HF
    full = {"input_ids": x["input_ids"], "attention_mask": torch.ones_like(x["attention_mask"])}
    assert torch.equal(rt(x["input_ids"]), rt(full))
    with pytest.raises(ValueError, match=r"\['labels'\] are not supported.*accepted"):
        rt({**x, "labels": torch.zeros(12, dtype=torch.long)})
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        rt({"attention_mask": x["attention_mask"]})
    # rows of no tokens at all: the model failed in a reshape inside attention ("cannot reshape
    # tensor of 0 elements into shape [12, 0, -1, 8]")
    with pytest.raises(ValueError, match=r"input_ids has 0 tokens per row \(shape \[12, 0\]\)"):
        rt({k: v[:, :0] for k, v in x.items()})


@pytest.mark.parametrize(
    "make, at",
    [
        (bert, ["layer.0", "layer.2"]),
        (roberta, ["encoder.layer.1"]),
        (distilbert, ["transformer.layer.0", "transformer.layer.1"]),
        (vit, ["vit.layers.1", "layers.2"]),
    ],
)
def test_a_batch_of_no_rows_gives_empty_results_as_the_tensor_path_does(make, at):
    # Before: rt.infer / rt.run_stage / model(x) on input_ids of shape [0, S] (or 0 images) failed
    # inside HF attention ("cannot reshape tensor of 0 elements into shape [0, 12, -1, 8]"); a
    # plain model's 0-row batch gives logits [0, C], exit_index [0] and confidence [0].
    model = ee.attach_exits(make(), at=at)
    rt = ee.EERuntime(model, thresholds=0.5, criterion="max_prob")
    x = torch.randn(3, 3, 16, 16) if make is vit else text_batch(3)
    empty = x[:0] if make is vit else {k: v[:0] for k, v in x.items()}
    one = rt.infer(x[:1] if make is vit else {k: v[:1] for k, v in x.items()})
    got = rt.infer(empty)
    for name in ("logits", "exit_index", "confidence"):
        a, b = getattr(got, name), getattr(one, name)[:0]  # the 1-row answer's layout, no rows
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, name
    with torch.no_grad():
        outs = model.eval()(empty)
    assert [tuple(o.shape) for o in outs] == [(0, one.logits.shape[1])] * model.num_exits
    step = rt.run_stage(0, empty, torch.zeros(0, dtype=torch.int64))
    assert step.exit_rows.shape == (0,) and step.rows.shape == (0,)
    assert step.logits.shape == (0, one.logits.shape[1]) and step.logits.dtype == one.logits.dtype
    assert step.confidence.shape == (0,) and step.confidence.dtype == torch.float32


def test_padded_tokens_never_change_a_rows_result():
    """Longer padding and garbage token ids under the mask: every row keeps its exit and logits."""
    backbone = bert()
    model = ee.attach_exits(backbone, at=["layer.0", "layer.2"], head="mean")
    assert model.exits[0].body.pool == "mean"
    x = text_batch(16)
    thr = median_threshold(model, x)
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob")
    res = rt.infer(x)
    g = torch.Generator().manual_seed(5)
    extra = 7
    ids = torch.cat([x["input_ids"], torch.zeros(16, extra, dtype=torch.long)], 1)
    mask = torch.cat([x["attention_mask"], torch.zeros(16, extra, dtype=torch.long)], 1)
    ids = torch.where(mask.bool(), ids, torch.randint(3, V, ids.shape, generator=g))
    res2 = rt.infer({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(res2.exit_index, res.exit_index)
    torch.testing.assert_close(res2.logits, res.logits, rtol=1e-4, atol=1e-5)


def test_base_encoder_needs_num_classes_and_gets_a_token_head():
    backbone = transformers.BertModel(bert_config()).eval()
    with pytest.raises(ValueError, match="no classifier.*num_classes"):
        ee.attach_exits(backbone, at=["encoder.layer.1"])
    model = ee.attach_exits(backbone, at=["encoder.layer.1"], num_classes=4)
    assert isinstance(model.exits[-1], SequenceHead)
    x = text_batch(10)
    thr = median_threshold(model, x)
    check_rows(ee.EERuntime(model, thresholds=thr, criterion="max_prob"), model, x, [thr])


def test_num_classes_replaces_the_classifier_not_the_backbones():
    backbone = bert()
    model = ee.attach_exits(backbone, at=["layer.1"], num_classes=7)
    x = text_batch(6)
    with torch.no_grad():
        outs = model.eval()(x)
    assert [o.shape[1] for o in outs] == [7, 7]
    assert backbone.classifier.out_features == 3  # the backbone keeps its own head
    new = model.exits[-1].classifier
    assert new is not backbone.classifier and new.in_features == 32
    assert model.exits[-1].pooler is backbone.bert.pooler  # the rest of the tail is shared


def test_encoder_split_errors_name_the_layers():
    with pytest.raises(ValueError, match=r"'layer.9' is not one of its layers.*bert.encoder.layer.0, .*layer.2"):
        ee.attach_exits(bert(), at=["layer.9"])
    with pytest.raises(ValueError, match="last layer"):
        ee.attach_exits(bert(), at=["layer.3"])
    with pytest.raises(ValueError, match="forward order"):
        ee.attach_exits(bert(), at=["layer.2", "layer.1"])
    # two spellings of one layer made an empty stage and an exit that repeats the one before it
    with pytest.raises(ValueError, match="'layer.1' and 'bert.encoder.layer.1' name the same layer"):
        ee.attach_exits(bert(), at=["layer.1", "bert.encoder.layer.1"])
    with pytest.raises(ValueError, match=r"needs a \[B, C, \*spatial\] map.*yields tokens.*'cls', 'mean' or 'last'"):
        ee.attach_exits(bert(), at=["layer.1"], head="conv")


# ------------------------------------------------------------------ HF ViT
def test_hf_vit_attached_by_name_heads_pool_tokens():
    backbone = vit()
    model = ee.attach_exits(backbone, at=["vit.layers.1", "layers.2"])
    head = model.exits[0]
    assert isinstance(head, SequenceHead) and head.classifier[-1].in_features == 32  # H, not the 17 tokens
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], backbone(x).logits)
    thr = median_threshold(model, x)
    res = check_rows(ee.EERuntime(model, thresholds=thr, criterion="max_prob"), model, x, [thr, thr])
    assert len(set(res.exit_index.tolist())) >= 2


# ------------------------------------------------------------------ token heads
def test_token_pool_against_float64_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 7, 4, generator=g)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    h[1, 3:] = float("nan")  # a padded token's value can be anything
    got = TokenPool("mean", mask_index=1)(h, mask)
    for i in range(5):
        n = int(mask[i].sum())
        torch.testing.assert_close(got[i].double(), h[i, :n].double().mean(0), rtol=1e-6, atol=1e-7)
    pad = TokenPool("mean", mask_index=1, padding_mask=True)(h, mask == 0)
    assert torch.equal(pad, got)
    assert torch.equal(TokenPool("cls")(h, mask), h[:, 0])
    with pytest.raises(ValueError, match="unknown token pool"):
        TokenPool("max")
    with pytest.raises(ValueError, match=r"\[B, S, H\]"):
        TokenPool("cls")(torch.randn(3, 4))


# ------------------------------------------------------------------ torch's nn.TransformerEncoder
class TorchTextClassifier(nn.Module):
    """Embedding -> nn.TransformerEncoder (key-padding mask, True = pad) -> masked mean -> linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4)
        self.fc = nn.Linear(32, 3)

    def forward(self, ids, pad):
        h = self.encoder(self.embed(ids), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.fc((h * keep).sum(1) / keep.sum(1))


def test_torch_transformer_encoder_split_at_its_layers():
    backbone = TorchTextClassifier().eval()
    x = text_batch(16)
    ids, pad = x["input_ids"], x["attention_mask"] == 0
    model = ee.attach_exits(backbone, at=["encoder.layers.0", "encoder.layers.2"], example_input=(ids[:2], pad[:2]))
    assert model.split_mode == "fx"
    head = model.exits[0]
    assert isinstance(head, SequenceHead) and head.body.pool == "mean" and head.body.padding_mask
    state = model.forward_until((ids, pad), 0)
    assert isinstance(state, tuple) and torch.equal(state[head.body.mask_index], pad)  # the mask travels with the rows
    with torch.no_grad():
        torch.testing.assert_close(model.eval()((ids, pad))[-1], backbone(ids, pad), rtol=1e-4, atol=1e-5)
    thr = median_threshold(model, (ids, pad))
    res = check_rows(ee.EERuntime(model, thresholds=thr, criterion="max_prob"), model, (ids, pad), [thr, thr])
    assert len(set(res.exit_index.tolist())) >= 2
    names = [p.name for p in ee.split_points(backbone, example_input=(ids[:2], pad[:2]), mode="fx")]
    assert {"encoder.layers.0", "encoder.layers.2", "embed"} <= set(names)


# ------------------------------------------------------------------ length trimming
def test_trim_tokens_against_its_reference():
    from eeruntime.encoders import trim_ref, trim_tokens

    g = torch.Generator().manual_seed(0)
    for lengths, left in (([5, 3, 2], False), ([1, 1], False), ([0, 0], False), ([4, 2, 7], False), ([2, 3], True)):
        S = 7
        mask = (torch.arange(S)[None] < torch.tensor(lengths)[:, None]).long()
        if left:
            mask = mask.flip(1)
        h = torch.randn(len(lengths), S, 4, generator=g)
        for padding in (False, True):
            m = (mask == 0) if padding else mask
            got, want = trim_tokens((h, m), 1, padding), trim_ref((h, m), 1, padding)
            assert [t.shape for t in got] == [t.shape for t in want]
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        expect = S if left else max(max(lengths), 1)
        assert trim_tokens((h, mask))[0].shape[1] == expect


@pytest.mark.parametrize(
    "compact_backend, executor",
    [("auto", "FusedCpuPass"), ("torch", "EagerPass")],  # both CPU executors of eeruntime/runtime/executors.py
)
def test_trimming_survivors_keeps_every_result(compact_backend, executor, monkeypatch):
    from eeruntime.runtime import api

    made = []
    real = api.eager_pass

    def spy(*args):
        run = real(*args)
        made.append(type(run).__name__)
        return run

    monkeypatch.setattr(api, "eager_pass", spy)
    backbone = bert()
    x = {
        k: torch.cat([v, torch.zeros(24, 4, dtype=v.dtype)], 1) for k, v in text_batch(24, seed=3).items()
    }  # 4 more pads
    plain = ee.attach_exits(backbone, at=["layer.0", "layer.2"], head="mean")
    trimmed = ee.attach_exits(backbone, at=["layer.0", "layer.2"], head="mean", trim=True)
    trimmed.load_state_dict(plain.state_dict())  # same heads
    thr = median_threshold(plain, x)
    want = ee.EERuntime(plain, thresholds=thr, criterion="max_prob").infer(x)
    seen = []  # the layers are the backbone's, shared by both models: hook after the plain run
    trimmed.stages[1].layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    made.clear()
    got = ee.EERuntime(trimmed, thresholds=thr, criterion="max_prob", compact_backend=compact_backend).infer(x)
    assert made and set(made) == {executor}
    assert torch.equal(got.exit_index, want.exit_index)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    check_rows(ee.EERuntime(trimmed, thresholds=thr, criterion="max_prob"), trimmed, x, [thr, thr])
    # stage 1's layers ran on the survivors trimmed to the longest of them
    longest = int(x["attention_mask"][want.exit_index >= 1].sum(1).max())
    assert seen[0] == longest <= S < S + 4
    with pytest.raises(ValueError, match="trim=True applies to HF text encoders"):
        ee.attach_exits(vit(), at=["layers.1"], trim=True)

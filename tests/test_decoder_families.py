"""HF decoder sequence classifiers (GPT-2, Llama, Qwen2, Mistral), each built from a tiny config
(random weights, nothing downloaded), attached by ``ee.attach_exits`` and checked against the
unmodified model: the final exit == its logits on right- and left-padded batches of mixed
lengths; ``rt.infer`` == the per-sample loop with a mix of exits; each text alone == its row in
a right-padded batch; ``trim=True`` == untrimmed; ``pad_to`` serving == ``rt.infer``; a bundle
with weights round trips; the caller's model is left as it was. Inputs where HF's rule (the
last token whose id is not the pad token) and the mask's last real token differ are refused."""

import pytest
import torch
from reference import per_sample_loop

import eeruntime as ee
from eeruntime.heads import TokenPool

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional dependency (make test installs it)"
)

V, H, PAD = 60, 32, 0
COMMON = dict(
    vocab_size=V,
    hidden_size=H,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=40,
    num_labels=3,
)
IDS = dict(pad_token_id=PAD, bos_token_id=1, eos_token_id=1)


def gpt2(**kw):
    cfg = transformers.GPT2Config(
        vocab_size=V, n_embd=H, n_layer=4, n_head=2, n_positions=40, num_labels=3, **{**IDS, **kw}
    )
    return transformers.GPT2ForSequenceClassification(cfg)


def llama(**kw):
    cfg = transformers.LlamaConfig(**{**COMMON, "num_key_value_heads": 1, **IDS, **kw})
    return transformers.LlamaForSequenceClassification(cfg)


def qwen2(**kw):  # layers 2 and 3 attend through a sliding window of 4 tokens
    cfg = transformers.Qwen2Config(
        **COMMON, num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=2, **IDS, **kw
    )
    assert cfg.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    return transformers.Qwen2ForSequenceClassification(cfg)


def mistral(**kw):  # every layer attends through a sliding window of 4 tokens
    cfg = transformers.MistralConfig(**COMMON, num_key_value_heads=1, sliding_window=4, **IDS, **kw)
    return transformers.MistralForSequenceClassification(cfg)


FAMILIES = [gpt2, llama, qwen2, mistral]
NAMES = ["gpt2", "llama", "qwen2", "mistral"]


def seeded(build, seed=0, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build(**kw).eval()


def text_batch(B=12, S=14, seed=1, side="right"):
    """Token ids padded on ``side`` with the pad id (row 0 full, others 2..S real tokens); no
    real token is the pad id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    lengths = torch.randint(2, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    if side == "left":
        mask = mask.flip(1)
    return {"input_ids": torch.where(mask.bool(), ids, torch.full_like(ids, PAD)), "attention_mask": mask}


def split_at(backbone):
    names = ee.split_points(backbone)
    return [names[0].name, names[2].name]


def mixed_threshold(model, x, lo, hi):
    with torch.no_grad():
        scores = model(x)[0].softmax(-1).amax(-1).sort().values
    return float(scores[lo] + scores[hi]) / 2  # rows below leave later, none on the threshold


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("build", FAMILIES, ids=NAMES)
def test_decoder_is_the_model(build, side):
    """Final exit == the HF model (no early exit); a mix of exits == the per-sample loop. HF
    counts positions from column 0 whatever the padding (its forward without position_ids), and
    so do the stages: a left-padded row is the model's answer for that padded row."""
    backbone = seeded(build)
    model = ee.attach_exits(backbone, at=split_at(backbone))
    x = text_batch(side=side)
    with torch.no_grad():
        want = backbone(**x).logits
        never = ee.EERuntime(model, thresholds=float("inf"), criterion="max_prob").infer(x)
        assert bool((never.exit_index == 2).all())
        torch.testing.assert_close(never.logits, want, rtol=1e-5, atol=1e-6)
        thr = mixed_threshold(model, x, 5, 6)
        res = ee.EERuntime(model, thresholds=thr, criterion="max_prob").infer(x)
    ref_logits, ref_exit, _ = per_sample_loop(model, model.prepare_input(x), [thr, thr], "max_prob")
    assert torch.equal(res.exit_index, ref_exit) and len(set(ref_exit.tolist())) >= 2
    torch.testing.assert_close(res.logits.double(), ref_logits, rtol=1e-4, atol=1e-5)
    if side == "right":  # each text alone, unpadded == its row (and == the model on it alone)
        with torch.no_grad():
            for i in range(len(want)):
                n = int(x["attention_mask"][i].sum())
                alone = {k: v[i : i + 1, :n] for k, v in x.items()}
                got = model(alone)[-1]
                torch.testing.assert_close(got[0], never.logits[i], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(got, backbone(**alone).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [gpt2, qwen2], ids=["gpt2", "qwen2"])
def test_trim_keeps_every_result_with_either_padding_side(build):
    """trim=True cuts the survivors' trailing pad columns: exact under causal attention (no kept
    token sees a later column; positions count from column 0 and do not move). A batch padded on
    both sides (left-padded texts right-padded to a common length, as pad_to does) too."""
    backbone = seeded(build)
    at = split_at(backbone)
    plain = ee.attach_exits(backbone, at=at)
    trimmed = ee.attach_exits(backbone, at=at, trim=True)
    trimmed.load_state_dict(plain.state_dict())  # the same new exit heads
    for side in ("right", "left"):
        x = {
            k: torch.cat([v, torch.full((12, 4), PAD if k == "input_ids" else 0)], 1)
            for k, v in text_batch(side=side).items()
        }
        thr = mixed_threshold(plain, x, 3, 4)
        want = ee.EERuntime(plain, thresholds=thr, criterion="max_prob").infer(x)
        got = ee.EERuntime(trimmed, thresholds=thr, criterion="max_prob").infer(x)
        assert torch.equal(got.exit_index, want.exit_index) and len(set(want.exit_index.tolist())) >= 2
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            never = ee.EERuntime(trimmed, thresholds=float("inf"), criterion="max_prob").infer(x)
            torch.testing.assert_close(never.logits, backbone(**x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_decoders_served_with_pad_to_and_saved_with_their_weights(build, tmp_path):
    """The scheduler's pad_to (requests right-padded to 8 or 16 tokens in shared batches) answers
    each as rt.infer answers it alone; a bundle saved with its weights and loaded into a fresh
    model (other random weights) gives rt.infer's answers."""
    from serve_models import check_padded_serving_and_bundle

    def factory(seed=0):
        backbone = seeded(build, seed)
        return ee.attach_exits(backbone, at=split_at(backbone))

    model = factory()
    x = text_batch(16, seed=2)
    thr = mixed_threshold(model, x, 7, 8)
    rt = ee.EERuntime(model, thresholds=thr, criterion="max_prob")
    requests = [  # dicts: a tuple is in forward order, GPT-2's (input_ids, cache, attention_mask, ...)
        {k: v[i : i + 1, :n] for k, v in x.items()} for i, n in enumerate(x["attention_mask"].sum(1).tolist())
    ]
    check_padded_serving_and_bundle(model, rt, x, requests, thr, factory, tmp_path)


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_the_callers_model_and_inputs_are_left_as_they_were(build):
    backbone = seeded(build, attn_implementation="eager")
    backbone.train()
    backbone.score.eval()  # a mix of modes, each kept
    modes = {n: m.training for n, m in backbone.named_modules()}
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = ee.attach_exits(backbone, at=split_at(backbone), trim=True)
    assert {n: m.training for n, m in backbone.named_modules()} == modes
    assert backbone.config._attn_implementation == "eager"
    x = text_batch()
    given = {k: v.clone() for k, v in x.items()}
    model.eval()
    backbone.eval()
    with torch.no_grad():
        got = ee.EERuntime(model, thresholds=0.5, criterion="max_prob").infer(x)
        never = ee.EERuntime(model, thresholds=float("inf"), criterion="max_prob").infer(x)
        torch.testing.assert_close(never.logits, backbone(**x).logits, rtol=1e-5, atol=1e-6)  # eager attention
    assert got.logits.shape == (12, 3)
    assert all(torch.equal(v, given[k]) for k, v in x.items())
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert backbone.config._attn_implementation == "eager"


def test_inputs_are_taken_as_the_models_forward_takes_them():
    """A dict, the ids alone (every token real), a tuple in GPT-2's forward order (input_ids,
    cache, attention_mask); use_cache=False is what the stages do; a cache is refused naming it."""
    backbone = seeded(gpt2)
    rt = ee.EERuntime(ee.attach_exits(backbone, at=["h.1"]), thresholds=float("inf"), criterion="max_prob")
    x = text_batch(4)
    with torch.no_grad():
        want = backbone(**x).logits
        torch.testing.assert_close(rt.infer((x["input_ids"], None, x["attention_mask"])).logits, want)
        torch.testing.assert_close(rt.infer({**x, "use_cache": False}).logits, want)
        full = x["input_ids"][:1]
        torch.testing.assert_close(rt.infer(full).logits, backbone(full).logits)
    with pytest.raises(
        ValueError, match=r"inputs \['cache'\] are not supported.*without a key/value cache.*pass a dict"
    ):
        rt.infer((x["input_ids"], x["attention_mask"]))
    with pytest.raises(ValueError, match=r"inputs \['use_cache'\] are not supported.*without a key/value cache"):
        rt.infer({**x, "use_cache": True})


@pytest.mark.parametrize("side", ["right", "left"])
def test_an_example_input_padded_as_a_tokenizer_pads_is_taken(side):
    """attach's dry run also runs row 0 alone with every token real: a padded row 0 (pad ids at
    its end) was then read by HF at its last non-pad token and by the stages at its last column,
    and the model was refused as not reproducing its output."""
    backbone = seeded(llama)
    x = text_batch(4, 8, seed=3, side=side)
    x = {k: v[[1, 0, 2, 3]] for k, v in x.items()}  # row 0 padded
    assert int(x["attention_mask"][0].sum()) < 8
    model = ee.attach_exits(backbone, at=["layers.1"], example_input=x)
    never = ee.EERuntime(model, thresholds=float("inf"), criterion="max_prob").infer(x)
    with torch.no_grad():
        torch.testing.assert_close(never.logits, backbone(**x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_a_batch_of_no_rows_gives_empty_results(build):
    backbone = seeded(build)
    rt = ee.EERuntime(ee.attach_exits(backbone, at=split_at(backbone)), thresholds=0.5, criterion="max_prob")
    x = text_batch(3)
    one = rt.infer({k: v[:1] for k, v in x.items()})
    got = rt.infer({k: v[:0] for k, v in x.items()})
    for name in ("logits", "exit_index", "confidence"):
        a, b = getattr(got, name), getattr(one, name)[:0]
        assert a.shape == b.shape and a.dtype == b.dtype, name


def test_a_decoder_base_model_gets_a_new_final_head_on_the_last_token():
    backbone = seeded(lambda: transformers.LlamaModel(transformers.LlamaConfig(**COMMON, num_key_value_heads=1, **IDS)))
    model = ee.attach_exits(backbone, at=["layers.1"], num_classes=5)
    assert [h.body.pool for h in model.exits] == ["last", "last"]
    x = text_batch()
    thr = mixed_threshold(model, x, 5, 6)
    res = ee.EERuntime(model, thresholds=thr, criterion="max_prob").infer(x)
    ref_logits, ref_exit, _ = per_sample_loop(model, model.prepare_input(x), [thr], "max_prob")
    assert torch.equal(res.exit_index, ref_exit) and res.logits.shape == (12, 5)
    torch.testing.assert_close(res.logits.double(), ref_logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the last real token
def test_last_token_pool_is_each_rows_last_real_token():
    """TokenPool("last") against a per-row loop: right, left and no padding, a row with no real
    token (token 0, as HF's argmax gives), torch's key-padding mask (True = pad), no mask."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 4, generator=g)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]]
    )
    want = []
    for row, m in zip(x, mask):
        real = [j for j in range(6) if m[j]]
        want.append(row[real[-1] if real else 0])
    want = torch.stack(want)
    assert torch.equal(TokenPool("last", mask_index=1)(x, mask), want)
    assert torch.equal(TokenPool("last", mask_index=1, padding_mask=True)(x, mask == 0), want)
    assert torch.equal(TokenPool("last")(x), x[:, -1])


def test_inputs_where_the_pad_ids_and_the_mask_disagree_are_refused():
    """The model's classifier reads the last token whose id is not the pad token, the stages the
    mask's last real token: where they differ the answer would not be the model's (checked:
    HF's logits differ from the mask's reading there), and the input is refused saying why."""
    backbone = seeded(gpt2)
    rt = ee.EERuntime(ee.attach_exits(backbone, at=split_at(backbone)), thresholds=float("inf"), criterion="max_prob")
    x = text_batch(3, 8)
    ends_in_pad = {"input_ids": x["input_ids"].clone(), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    ends_in_pad["input_ids"][1, -1] = PAD  # a real last token that is the pad id (an EOS used as pad)
    no_mask = {"input_ids": x["input_ids"]}  # padded ids without their mask: every token attended
    masked_ids = {"input_ids": torch.randint(2, V, (3, 8)), "attention_mask": x["attention_mask"]}
    for bad, row in [(ends_in_pad, 1), (no_mask, 1), (masked_ids, 1)]:
        with torch.no_grad():
            hf = backbone(**bad).logits
            mask = bad.get("attention_mask", torch.ones(3, 8, dtype=torch.long))
            last = (mask * torch.arange(8)).amax(1)
            full = backbone.score(backbone.transformer(**bad).last_hidden_state)
            assert not torch.allclose(hf[row], full[row, last[row]])  # the mask's reading is not the model's
        with pytest.raises(
            ValueError, match=f"row {row}: the model's classifier reads its last token whose id is not the pad token 0"
        ):
            rt.infer(bad)
    torch.testing.assert_close(rt.infer(x).logits, backbone(**x).logits, rtol=1e-5, atol=1e-6)


def test_a_decoder_without_a_pad_token_is_refused_saying_what_to_set():
    """Without a pad token HF's classifier reads the last column and refuses batches of more than
    one row ("Cannot handle batch sizes > 1"): attach refuses, naming config.pad_token_id."""
    backbone = seeded(gpt2, pad_token_id=None)
    with pytest.raises(ValueError, match="Cannot handle batch sizes"):
        backbone(**text_batch(2, 8))
    with pytest.raises(ValueError, match=r"GPT2ForSequenceClassification has no pad token.*config.pad_token_id"):
        ee.attach_exits(backbone, at=["h.1"])
    backbone.config.pad_token_id = PAD
    assert ee.attach_exits(backbone, at=["h.1"]).num_exits == 2


@pytest.mark.parametrize(
    "build, why",
    [
        (
            lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=2)),
            "without a sequence classifier",
        ),
        (
            lambda: transformers.OPTForSequenceClassification(
                transformers.OPTConfig(
                    vocab_size=V,
                    hidden_size=H,
                    num_hidden_layers=2,
                    ffn_dim=64,
                    num_attention_heads=2,
                    word_embed_proj_dim=H,
                )
            ),
            "decoder family 'opt' is not one",
        ),
        (
            lambda: transformers.LlamaForTokenClassification(transformers.LlamaConfig(**COMMON, **IDS)),
            "without a sequence classifier",
        ),
    ],
    ids=["gpt2-lm-head", "opt", "llama-tokens"],
)
def test_other_decoders_are_refused_naming_what_is_supported(build, why):
    backbone = seeded(build)
    with pytest.raises(ValueError, match=f"{type(backbone).__name__}.*{why}.*supported: BERT.*GPT-2, Llama"):
        ee.attach_exits(backbone, at=["layers.0"])


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "longrope",
            "factor": 4.0,
            "short_factor": [1.0] * 8,
            "long_factor": [4.0] * 8,
            "original_max_position_embeddings": 16,
        },
    ],
    ids=["dynamic", "longrope"],
)
def test_trim_is_refused_where_the_rotary_frequencies_follow_the_sequence_length(rope):
    """Dynamic and LongRoPE scaling pick their frequencies by the batch's length (pads included):
    a trimmed stage saw a shorter one and gave other logits than the model (and than untrimmed),
    silently. Untrimmed stages are the model; trim=True and set_trim are refused naming why."""
    backbone = seeded(llama, rope_scaling=rope, max_position_embeddings=16 if rope["rope_type"] == "dynamic" else 64)
    model = ee.attach_exits(backbone, at=["layers.0"])
    x = {  # 22 columns (past the original 16), no row longer than 12 real tokens
        k: torch.cat([v, torch.zeros(8, 10, dtype=v.dtype)], 1) for k, v in text_batch(8, 12, seed=3).items()
    }
    with torch.no_grad():
        want = backbone(**x).logits
    torch.testing.assert_close(
        ee.EERuntime(model, thresholds=float("inf"), criterion="max_prob").infer(x).logits, want, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=f"trim=True.*rope_type '{rope['rope_type']}'.*sequence length"):
        ee.attach_exits(backbone, at=["layers.0"], trim=True)
    with pytest.raises(ValueError, match=f"rope_type '{rope['rope_type']}'"):
        ee.encoders.set_trim(model, True)
    assert ee.encoders.set_trim(model, False) == 1


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
def test_pad_to_is_refused_where_padding_changes_the_rotary_frequencies(kind):
    """pad_to pads a request to a longer sequence: with dynamic scaling past the model's original
    length that changed its answer (its row of the padded batch is the model's answer for the
    padded row, not for the text), silently. Refused, naming why; linear scaling is padded."""
    from eeruntime.serve import StageScheduler

    backbone = seeded(llama, rope_scaling={"rope_type": kind, "factor": 2.0}, max_position_embeddings=16)
    rt = ee.EERuntime(ee.attach_exits(backbone, at=["layers.0"]), thresholds=float("inf"), criterion="max_prob")
    x = text_batch(1, 10, seed=3)
    padded = {k: torch.cat([v, torch.zeros(1, 14, dtype=v.dtype)], 1) for k, v in x.items()}  # as pad_to=(24,) pads
    with torch.no_grad():
        alone, as_padded = backbone(**x).logits, backbone(**padded).logits
        torch.testing.assert_close(rt.infer(padded).logits, as_padded, rtol=1e-5, atol=1e-6)
    if kind == "linear":
        torch.testing.assert_close(as_padded, alone, rtol=1e-4, atol=1e-5)
        with StageScheduler(rt, pad_to=(24,)) as sched:
            torch.testing.assert_close(sched.submit_nowait(x).result(30).logits, rt.infer(x).logits)
        return
    assert not torch.allclose(as_padded, alone, rtol=1e-4, atol=1e-5)  # the model's own answers differ
    with pytest.raises(
        ValueError, match="pad_to would change this model's answers.*rope_type 'dynamic'.*without pad_to"
    ):
        StageScheduler(rt, pad_to=(24,))


@pytest.mark.parametrize("build", FAMILIES, ids=NAMES)
def test_a_cls_head_on_a_decoder_is_refused(build):
    """Token 0 of a causal decoder has seen only itself (with left padding: a pad token), so a
    "cls" exit reads nothing of the text: refused, naming "last" and "mean"."""
    backbone = seeded(build)
    x = text_batch(4, 8)
    with torch.no_grad():  # token 0's state is the same whatever follows it
        h = backbone.base_model(**x).last_hidden_state
        other = backbone.base_model(
            input_ids=torch.cat([x["input_ids"][:, :1], x["input_ids"][:, 1:].flip(1)], 1)
        ).last_hidden_state
        torch.testing.assert_close(h[:, 0], other[:, 0])
    with pytest.raises(ValueError, match=r"head='cls' reads token 0.*causal.*use 'last'.*or 'mean'"):
        ee.attach_exits(backbone, at=split_at(backbone), head="cls")
    assert [h.body.pool for h in ee.attach_exits(backbone, at=split_at(backbone), head="mean").exits[:-1]] == [
        "mean"
    ] * 2


def test_a_learned_exit_reading_token_0_is_refused_on_a_decoder():
    """LearnedExit pools "cls" by default: on a decoder it scored each row by token 0, which has
    seen none of the text (see test_a_cls_head_on_a_decoder_is_refused), silently. The runtime
    and ee.train.learned_exit refuse it naming pool="last"; "last" == the per-sample loop."""
    from eeruntime.exit_rules import LearnedExit

    backbone = seeded(llama)
    model = ee.attach_exits(backbone, at=split_at(backbone))
    x = text_batch(side="left")
    with pytest.raises(ValueError, match=r"LearnedExit\(pool='cls'\) reads token 0.*decoder.*pool='last'"):
        ee.EERuntime(model, thresholds=0.5, criterion=LearnedExit(H))
    data = [(model.prepare_input(x), torch.zeros(12, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"LearnedExit\(pool='cls'\) reads token 0"):
        ee.train.learned_exit(model, LearnedExit(H), data, 1, 1e-3, progress=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lte = LearnedExit(H, pool="last").eval()
    with torch.no_grad():
        state = model.stages[0](*model.prepare_input(x))
        last = (x["attention_mask"] * torch.arange(14)).amax(1)  # left padding: the last column
        want = torch.sigmoid(lte.units[0](state[0][torch.arange(12), last]).squeeze(-1))
        torch.testing.assert_close(lte(torch.zeros(12, 3), state, 0), want)
    thr = float(want.sort().values[5] + want.sort().values[6]) / 2
    res = ee.EERuntime(model, thresholds=thr, criterion=lte).infer(x)
    ref_logits, ref_exit, _ = per_sample_loop(
        model, model.prepare_input(x), [thr, thr], lambda logits, state: lte(logits, state, 0)
    )
    assert torch.equal(res.exit_index, ref_exit) and bool((ref_exit == 0).any()) and bool((ref_exit > 0).any())
    torch.testing.assert_close(res.logits.double(), ref_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_a_wrong_split_point_on_a_decoder_lists_the_decoders_layers(build):
    """The refusal named "the encoder's layers" for a decoder's too."""
    backbone = seeded(build)
    with pytest.raises(ValueError, match=r"'nope' is not one of its layers; valid split points \(the decoder's layers"):
        ee.attach_exits(backbone, at=["nope"])

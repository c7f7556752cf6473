"""HF architectures beyond BERT: each built from a tiny config (random weights, nothing
downloaded), attached by ``ee.attach_exits``, and either checked against the unmodified model
(final exit == its logits on a padded batch; ``rt.infer`` == the per-sample loop with a mix of
exits; each text alone == its row in the padded batch) or refused by attach with a message that
names what is not supported and what is."""

import pytest
import torch
from reference import per_sample_loop

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


# ------------------------------------------------------------------ ELECTRA
def test_electra_with_its_embedding_projection_is_the_model():
    """ELECTRA's embeddings are narrower than its layers (embedding_size, 128 by default) and its
    forward projects them (``embeddings_project``) before layer 0: the stages skipped it and
    failed deep inside ("mat1 and mat2 shapes cannot be multiplied")."""
    backbone = seeded(
        lambda: transformers.ElectraForSequenceClassification(transformers.ElectraConfig(**COMMON, embedding_size=16))
    )
    check_family(backbone, ["electra.encoder.layer.0", "layer.2"])

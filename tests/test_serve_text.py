"""The stage scheduler serving a text encoder attached with ``ee.attach_exits`` (HF BERT / RoBERTa
from small configs, random weights): requests in every form ``rt.infer`` takes (a dict, a tuple in
the forward's order, the ids alone) answered as ``rt.infer`` answers each of them, sharing batches;
a request the input adapter refuses refused at submit; ``pad_to`` batching requests of different
lengths, answered as ``rt.infer`` on each request unpadded (checked against the per-sample loop's
margins, so an exit may differ only within float noise of its threshold)."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
import torch
from reference import per_sample_loop
from serve_models import parked, tiny_text_model

import eeruntime as ee
from eeruntime.serve import StageScheduler

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional dependency (make test installs it)"
)

V = 60
WAIT = 30.0
NEAR = 1e-4  # a row whose deciding score is this close to its threshold may exit either way


def text_runtime(kind: str = "bert", trim: bool = False, seed: int = 0):
    text = tiny_text_model(kind, trim=trim, seed=seed)
    # thresholds under which about a third of the rows leave at each early exit
    ids, mask = requests_of([12], seed=seed + 100, rows=64)[0]
    with torch.no_grad():
        outs = text((ids, mask))
    p0, p1 = (o.softmax(-1).amax(-1) for o in outs[:2])
    t0 = float(p0.quantile(2 / 3))
    t1 = float(p1[p0 < t0].quantile(1 / 2))
    return ee.EERuntime(text, thresholds=[t0, t1], criterion="max_prob")


def requests_of(lengths, seed=1, rows=1):
    """One request per length: (ids [rows, L], mask of ones [rows, L]), ids never the pad ids."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(2, V, (rows, n), generator=g), torch.ones(rows, n, dtype=torch.int64)) for n in lengths]


def assert_as_infer(rt, request, got, padded_loop_input=None):
    """``got`` (an InferenceResult) is ``rt.infer(request)``'s answer: logits within float
    rounding, and each exit the same unless the per-sample loop puts the row within NEAR of a
    threshold."""
    ref = rt.infer(request)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-5)
    ids, mask = request if isinstance(request, tuple) else (request["input_ids"], request["attention_mask"])
    _, loop_exit, margins = per_sample_loop(rt.model, (ids, mask, torch.zeros_like(ids)), rt.thresholds, "max_prob")
    assert torch.equal(loop_exit, ref.exit_index)
    differs = got.exit_index != ref.exit_index
    assert bool((margins[differs] < NEAR).all()), (got.exit_index, ref.exit_index, margins)


def test_requests_in_every_form_rt_infer_takes_are_answered_alike_and_share_batches():
    rt = text_runtime()
    ((ids, mask),) = requests_of([9], rows=8)
    mask[5:, 6:] = 0  # rows 5-7 padded after 6 tokens
    forms = [
        {"input_ids": ids[0:2], "attention_mask": mask[0:2]},
        transformers.BatchEncoding({"input_ids": ids[2:3], "attention_mask": mask[2:3]}),
        (ids[3:4], mask[3:4]),  # the forward's order
        ids[4:5],  # the ids alone: every token real
        {"input_ids": ids[5:8], "attention_mask": mask[5:8], "token_type_ids": torch.zeros_like(ids[5:8])},
    ]
    with StageScheduler(rt, max_batch=16, inline="never", max_defer_ms=0) as sched:
        with parked(sched):
            futures = [sched.submit_nowait(x) for x in forms]
        answers = [f.result(WAIT) for f in futures]
        stats = sched.stats_dict()
    for x, got in zip(forms, answers):
        request = (x["input_ids"], x["attention_mask"]) if isinstance(x, dict) or hasattr(x, "keys") else x
        if isinstance(request, torch.Tensor):
            request = (request, torch.ones_like(request))
        assert_as_infer(rt, request, got)
    # mapped to one form at submit, the five requests ran as one stage-0 batch
    assert stats["batches"][0] == 1, stats


def test_requests_as_dicts_from_an_event_loop():
    rt = text_runtime()
    reqs = requests_of([7, 7, 7, 7])

    async def main(sched):
        return await asyncio.gather(*(sched.submit({"input_ids": i, "attention_mask": m}) for i, m in reqs))

    with StageScheduler(rt, max_batch=8) as sched:
        answers = asyncio.run(main(sched))
    for r, got in zip(reqs, answers):
        assert_as_infer(rt, r, got)


def test_a_request_the_input_adapter_refuses_fails_at_submit_not_in_a_batch():
    rt = text_runtime()
    ((ids, mask),) = requests_of([6])
    with StageScheduler(rt, max_batch=8, inline="never") as sched:
        # a 4th member is position_ids in BERT's forward order, which the stages do not take:
        # refused at submit, naming the input (it used to be admitted and fail at stage 0 as
        # StageFailed, the model's fault, a 500 over HTTP)
        with pytest.raises(ValueError, match="position_ids"):
            sched.submit_nowait((ids, mask, torch.zeros_like(ids), torch.arange(6)[None]))
        with pytest.raises(ValueError, match="'labels'"):
            sched.infer({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(1)})
        with pytest.raises(TypeError, match="dict"):
            sched.submit_nowait("a sentence")
        assert sched.stats_dict()["stage_failures"] == 0
        assert_as_infer(rt, (ids, mask), sched.submit_nowait((ids, mask)).result(WAIT))  # serving on


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("trim", [False, True])
def test_pad_to_batches_requests_of_different_lengths_answered_as_each_alone(kind, trim):
    rt = text_runtime(kind, trim=trim, seed=3)
    lengths = [3, 8, 5, 12, 16, 7, 1, 10, 16, 4, 9, 14]
    reqs = requests_of(lengths, seed=4)
    with StageScheduler(rt, max_batch=32, inline="never", max_defer_ms=0, pad_to=(8, 16)) as sched:
        with parked(sched):
            futures = [sched.submit_nowait(r) for r in reqs]
        answers = [f.result(WAIT) for f in futures]
        stats = sched.stats_dict()
    for r, got in zip(reqs, answers):
        assert got.logits.shape == (1, 3)
        assert_as_infer(rt, r, got)
    # two lengths (8 and 16): two stage-0 batches (without pad_to: eleven, one per length)
    assert stats["batches"][0] == 2, stats
    # the padded rows exit as often as unpadded: some leave early, so padding did not
    # hide a difference behind all-final answers
    assert 0 < sum(int(a.exit_index[0] < 2) for a in answers) < len(answers)


def test_pad_to_keeps_a_request_longer_than_every_length_and_never_changes_the_callers_tensors():
    rt = text_runtime()
    reqs = requests_of([20, 5], seed=7)
    before = [(i.clone(), m.clone()) for i, m in reqs]
    with StageScheduler(rt, max_batch=8, pad_to=[8]) as sched:
        answers = [sched.infer(r) for r in reqs]
    for r, b, got in zip(reqs, before, answers):
        assert torch.equal(r[0], b[0]) and torch.equal(r[1], b[1])
        assert_as_infer(rt, r, got)


def test_hf_inputs_pad_fills_as_a_tokenizer_does():
    rt = text_runtime("roberta")
    adapter = rt.model.input_adapter
    assert adapter.pad_token_id == 1  # RoBERTa's
    ids = torch.tensor([[5, 6, 7]])
    state = adapter({"input_ids": ids, "attention_mask": torch.tensor([[True, True, False]])})
    padded = adapter.pad(state, 5)
    assert padded[0].tolist() == [[5, 6, 7, 1, 1]]
    assert padded[1].tolist() == [[True, True, False, False, False]] and padded[1].dtype == torch.bool
    assert padded[2].tolist() == [[0] * 5]
    assert adapter.pad(state, 3) is state


@pytest.mark.parametrize("bad", [0, -4, [], [8, 0], ["16"], 2.5, [True]])
def test_pad_to_refuses_what_is_not_lengths(bad):
    rt = text_runtime()
    with pytest.raises(ValueError, match="pad_to must be positive sequence lengths"):
        StageScheduler(rt, pad_to=bad)


def test_pad_to_is_refused_for_a_model_without_token_masks():
    from models import mlp_model

    with pytest.raises(ValueError, match="has no input adapter"):
        StageScheduler(ee.EERuntime(mlp_model(), thresholds=0.5), pad_to=(8,))


def test_over_http_a_text_request_the_adapter_refuses_is_a_422_and_good_ones_equal_rt_infer():
    pytest.importorskip("httpx", reason="the [serve] extra (make test installs it)")
    pytest.importorskip("uvicorn", reason="the [serve] extra (make test installs it)")
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save
    from test_serve_http import Served, no_traceback

    from eeruntime.serve.server import create_app

    rt = text_runtime()
    ((ids, mask),) = requests_of([10], rows=3)
    st = {"content-type": "application/vnd.safetensors", "accept": "application/vnd.safetensors"}
    with StageScheduler(rt, max_batch=8) as sched:
        s = Served(create_app(sched))
        try:
            r = s.client.post("/v1/infer", json={"inputs": ids.tolist()})  # the ids alone, as JSON
            assert r.status_code == 200, r.text
            assert_as_infer(rt, (ids, torch.ones_like(ids)), _result(r.json()))
            body = st_save({"input_0": ids, "input_1": mask})
            r = s.client.post("/v1/infer", content=body, headers=st)
            assert r.status_code == 200, r.text
            assert_as_infer(rt, (ids, mask), _result(st_load(r.content)))
            # a 4th input is position_ids in BERT's forward: not taken by the stages. Said as a
            # 422 (it was a 500 "the model failed", with the adapter's error in the log)
            four = st_save({f"input_{i}": t for i, t in enumerate((ids, mask, mask * 0, mask.clone()))})
            r = s.client.post("/v1/infer", content=four, headers=st)
            assert r.status_code == 422 and "position_ids" in r.json()["error"], r.text
            no_traceback(r)
            # texts of another length: no row shape is learned for token ids
            short = ids[:2, :4]
            r = s.client.post("/v1/infer", json={"inputs": short.tolist()})
            assert r.status_code == 200, r.text
            assert_as_infer(rt, (short, torch.ones_like(short)), _result(r.json()))
            # what the model could only fail on (a 500, "the model failed", before): said as a 422
            for inputs, what in [
                ([[1.5, 2.0, 3.0]], "integer token ids"),  # floats are not rounded into ids
                ([[1, 2, V]], f"token ids must be in [0, {V})"),
                ([[-1, 2]], "token ids must be in"),
                ([[1] * 41], "at most 40"),  # max_position_embeddings
                ([[[1, 2]]], "must be [batch, tokens]"),
                # rows without tokens: torch reads an empty list as float32, which was refused as
                # "must hold integer token ids, got float32"; the ids' dtype is not what is wrong
                ([[]], "0 tokens per row"),
                ([[], []], "0 tokens per row"),
            ]:
                r = s.client.post("/v1/infer", json={"inputs": inputs})
                assert r.status_code == 422 and what in r.json()["error"], (inputs, r.text)
                no_traceback(r)
            odd = st_save({"input_0": ids, "input_1": mask[:, :5].contiguous()})
            r = s.client.post("/v1/infer", content=odd, headers=st)
            assert r.status_code == 422 and "must match input_ids" in r.json()["error"], r.text
            assert sched.stats_dict()["stage_failures"] == 0
        finally:
            s.stop()


def _result(d):
    """An answer (JSON fields or safetensors tensors) as an InferenceResult."""
    t = {k: torch.as_tensor(v) for k, v in d.items()}
    return ee.InferenceResult(t["logits"], t["exit_index"], t["confidence"])


def test_rt_infer_refuses_token_ids_the_model_could_only_fail_on_saying_what_was_wrong():
    rt = text_runtime()
    ok = torch.randint(0, V, (2, 6))
    for x, err, what in [
        (ok.float(), TypeError, "integer token ids"),  # an embedding's "Expected ... Long, Int"
        (torch.full((2, 6), V), ValueError, f"in \\[0, {V}\\)"),  # "index out of range in self"
        (torch.randint(0, V, (2, 41)), ValueError, "at most 40"),  # a size mismatch in the positions
        ((ok, torch.ones(2, 5, dtype=torch.int64)), ValueError, "must match input_ids"),
        (ok[0], ValueError, r"\[batch, tokens\]"),
        (torch.empty(2, 0), ValueError, "0 tokens per row"),  # an empty float tensor: no ids to be floats
    ]:
        with pytest.raises(err, match=what):
            rt.infer(x)
    assert rt.infer(ok).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="longer than this model takes"):
        StageScheduler(rt, pad_to=(16, 64))


def test_cli_pad_to_reaches_the_scheduler_and_what_cannot_pad_exits_2(tmp_path, capsys, monkeypatch):
    from serve_models import tiny_bert_text

    from eeruntime.serve import cli
    from eeruntime.zoo import digits_cnn

    torch.manual_seed(0)
    ee.EERuntime(tiny_bert_text(), thresholds=0.5, criterion="max_prob").save(tmp_path / "text", weights=True)
    ee.EERuntime(digits_cnn(), thresholds=[2.2, 2.25]).save(tmp_path / "digits", weights=True)
    made = []

    def fake_app(sched, **kw):  # (stops the server before it serves)
        made.append(sched)
        sched.close()
        raise RuntimeError("stop here")

    monkeypatch.setattr("eeruntime.serve.server.create_app", fake_app)
    before = sys.getswitchinterval()
    text = [str(tmp_path / "text"), "--model", "serve_models:tiny_bert_text", "--port", "0"]
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            cli.main([*text, "--pad-to", "16,8"])
    finally:
        sys.setswitchinterval(before)
    assert made[0].pad_to == (8, 16)
    for args, message in [
        ([*text, "--pad-to", "8,x"], "sequence lengths separated by commas"),
        ([*text, "--pad-to", "0"], "pad_to must be positive sequence lengths"),
        ([*text, "--pad-to", "64"], "longer than this model takes (40"),
        ([str(tmp_path / "digits"), "--model", "eeruntime.zoo:digits_cnn", "--pad-to", "8"], "has no input adapter"),
    ]:
        assert cli.main([*args, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_litserve_adapter_takes_token_ids_as_json_from_the_first_request(tmp_path):
    # The adapter checked a text model's requests as any model's: JSON numbers became floats
    # until an answered request had taught it ints, and the model then failed (a 500)
    pytest.importorskip("litserve", reason="the [serve] extra (make test installs it)")
    import gc

    from fastapi import HTTPException
    from serve_models import tiny_bert_text

    from eeruntime.serve.litserve_api import EarlyExitLitAPI

    torch.manual_seed(0)
    rt = ee.EERuntime(tiny_bert_text(), thresholds=[0.4, 0.45], criterion="max_prob")
    rt.save(tmp_path / "text", weights=True)
    api = EarlyExitLitAPI(tmp_path / "text", "serve_models:tiny_bert_text", max_batch=8, pad_to=[16, 8])
    switch = sys.getswitchinterval()
    api.setup("cpu")  # (also sets up the process as a server's: undone below for the other tests)
    try:
        assert api.sched.pad_to == (8, 16)
        ((ids, _),) = requests_of([7], rows=2)

        async def ask(doc):
            return await api.predict(await api.decode_request(doc))

        got = asyncio.run(ask({"inputs": ids.tolist()}))
        torch.testing.assert_close(got.logits, rt.infer(ids).logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(got.exit_index, rt.infer(ids).exit_index)
        for doc, what in [({"inputs": [[1.5, 2.0]]}, "integer token ids"), ({"inputs": [[[1, 2]]]}, "[batch, tokens]")]:
            with pytest.raises(HTTPException) as e:
                asyncio.run(ask(doc))
            assert e.value.status_code == 422 and what in e.value.detail, e.value.detail
    finally:
        api.sched.close()
        sys.setswitchinterval(switch)
        gc.unfreeze()


@pytest.mark.parametrize("fused", [True, False])
def test_an_input_adapter_maps_each_request_exactly_once_on_every_path(fused):
    # An adapter whose output, read as an input again, gives another state (here: doubled), so a
    # request mapped twice answers wrong. infer() on a busy scheduler used to hand the adapter's
    # output on to submit, which mapped it again.
    import threading

    from models import mlp_model

    base = mlp_model(K=3)
    model = ee.MultiExitModel(list(base.stages), list(base.exits), input_adapter=lambda x: x * 2.0).eval()
    rt = ee.EERuntime(model, thresholds=0.5, criterion="max_prob")
    x = torch.randn(12, 6)
    want = [rt.infer(x[i : i + 3]) for i in range(0, 12, 3)]
    with StageScheduler(rt, max_batch=8, fused=fused, max_defer_ms=0) as sched:
        got = [sched.infer(x[0:3])]  # idle: inline, in this thread
        box = []
        with parked(sched):  # busy: infer takes the worker's path
            t = threading.Thread(target=lambda: box.append(sched.infer(x[3:6])))
            t.start()
            later = [sched.submit_nowait(x[i : i + 3]) for i in (6, 9)]
            time.sleep(0.05)
        t.join(WAIT)
        got += box + [f.result(WAIT) for f in later]
    for g, w in zip(got, want):
        assert torch.equal(g.exit_index, w.exit_index)
        torch.testing.assert_close(g.logits, w.logits)


def named_runtime(kind: str):
    """A BERT (tiny_text_model's) or a GPT-2 (test_decoder_families' tiny one, pad token 0),
    attached with exits, with thresholds under which rows leave at each exit; and a padded batch
    by name (ids, attention_mask, and for BERT token_type_ids with a second segment), its padded
    positions holding the pad id."""
    if kind == "bert":
        rt = text_runtime(seed=1234)  # (tiny_bert_text's weights)
        g = torch.Generator().manual_seed(11)
        ids = torch.randint(2, V, (6, 10), generator=g)
        lengths = torch.tensor([10, 7, 3, 10, 5, 8])
        mask = (torch.arange(10)[None] < lengths[:, None]).long()
        segments = ((torch.arange(10)[None] >= lengths[:, None] // 2) & mask.bool()).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        return rt, {"input_ids": ids, "attention_mask": mask, "token_type_ids": segments}
    from test_decoder_families import gpt2, seeded, split_at, text_batch

    backbone = seeded(gpt2)
    model = ee.attach_exits(backbone, at=split_at(backbone))
    with torch.no_grad():
        outs = model(text_batch(64, 12, seed=2))
    p0, p1 = (o.softmax(-1).amax(-1) for o in outs[:2])
    t0 = float(p0.quantile(2 / 3))
    t1 = float(p1[p0 < t0].quantile(1 / 2))
    return ee.EERuntime(model, thresholds=[t0, t1], criterion="max_prob"), text_batch(6, 10, seed=3)


def assert_rows_equal(got, want):
    assert torch.equal(got.exit_index, want.exit_index), (got.exit_index, want.exit_index)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_over_http_a_padded_batch_by_name_with_its_mask_equals_rt_infer_of_the_dict(kind):
    """A client could not send an attention mask by name: JSON carried the ids alone, and for
    GPT-2 safetensors input_1 is the forward's cache slot (a 422 whose advice, a dict, HTTP could
    not give). Now JSON "inputs" may be an object of named lists and safetensors tensors may be
    named by the model's input names: a padded batch with its mask answers as rt.infer of the
    same dict, row for row (the ids alone answer otherwise: the mask is read)."""
    pytest.importorskip("httpx", reason="the [serve] extra (make test installs it)")
    pytest.importorskip("uvicorn", reason="the [serve] extra (make test installs it)")
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save
    from test_serve_http import Served, no_traceback

    from eeruntime.serve.server import create_app

    rt, x = named_runtime(kind)
    want = rt.infer(x)
    assert len(set(want.exit_index.tolist())) >= 2, want.exit_index  # a mix of exits
    if kind == "bert":  # (GPT-2 refuses its pad ids without the mask)
        assert not torch.allclose(rt.infer(x["input_ids"]).logits, want.logits)  # (the mask matters)
    st = {"content-type": "application/vnd.safetensors", "accept": "application/vnd.safetensors"}
    with StageScheduler(rt, max_batch=8) as sched:
        s = Served(create_app(sched))
        try:
            r = s.client.post("/v1/infer", json={"inputs": {k: v.tolist() for k, v in x.items()}})
            assert r.status_code == 200, r.text
            assert_rows_equal(_result(r.json()), want)
            r = s.client.post("/v1/infer", content=st_save(x), headers=st)
            assert r.status_code == 200, r.text
            assert_rows_equal(_result(st_load(r.content)), want)
            # a mask of booleans (a tokenizer's return_tensors="pt" gives ints; numpy users bools)
            bools = {**x, "attention_mask": x["attention_mask"].bool()}
            r = s.client.post("/v1/infer", content=st_save(bools), headers=st)
            assert r.status_code == 200, r.text
            assert_rows_equal(_result(st_load(r.content)), want)
            # the ids alone by name: every token real, as rt.infer takes them
            alone = x["input_ids"][:1, :4]
            r = s.client.post("/v1/infer", json={"inputs": {"input_ids": alone.tolist()}})
            assert r.status_code == 200, r.text
            assert_rows_equal(_result(r.json()), rt.infer({"input_ids": alone}))
            names = list(rt.model.input_adapter.names)
            ids, mask = x["input_ids"].tolist(), x["attention_mask"].tolist()
            refused = [
                ({"input_ids": ids, "attention_mask": mask, "position_ids": mask}, ["position_ids", str(names)]),
                ({"attention_mask": mask}, ["no 'input_ids'", str(names)]),
                ({"input_ids": ids, "attention_mask": [[1, True]]}, ["inputs.attention_mask[0][1] is true"]),
                ({"input_ids": ids, "attention_mask": [[1.0] * 10] * 6}, ["attention_mask has dtype float32"]),
                ({"input_ids": [[1, 2], [3]]}, ["inputs.input_ids must be a rectangular nested list"]),
                ({"input_ids": ids, "attention_mask": mask[:2]}, ["attention_mask has 2 rows but input_ids has 6"]),
                ({"input_ids": ids, "attention_mask": [r[:4] for r in mask]}, ["must match input_ids"]),
                ({"input_ids": 5}, ["input_ids needs a batch dimension"]),
            ]
            for inputs, words in refused:
                r = s.client.post("/v1/infer", json={"inputs": inputs})
                assert r.status_code == 422 and all(w in r.json()["error"] for w in words), (inputs, r.text)
                no_traceback(r)
            r = s.client.post("/v1/infer", content=st_save({**x, "mask": x["attention_mask"].clone()}), headers=st)
            assert r.status_code == 422 and "['mask']" in r.json()["error"] and str(names) in r.text, r.text
            for positional in ("input", "input_0"):  # (a positional name among named ones: which is it?)
                mixed = st_save({positional: x["input_ids"], "attention_mask": x["attention_mask"]})
                r = s.client.post("/v1/infer", content=mixed, headers=st)
                assert r.status_code == 422 and f"['{positional}']" in r.json()["error"], r.text
            # the old positional forms are unchanged (and name the new one when refused)
            full = x["input_ids"][:1]  # (row 0: no padding)
            r = s.client.post("/v1/infer", content=st_save({"input": full}), headers=st)
            assert r.status_code == 200, r.text
            assert_rows_equal(_result(st_load(r.content)), rt.infer(full))
            r = s.client.post("/v1/infer", content=st_save({"inputs": x["input_ids"]}), headers=st)
            assert r.status_code == 422 and "input_0, input_1" in r.text and str(names) in r.text, r.text
            if kind == "gpt2":
                # input_1 is the cache slot in GPT-2's forward order: refused, saying to name them
                two = st_save({"input_0": x["input_ids"], "input_1": x["attention_mask"]})
                r = s.client.post("/v1/infer", content=two, headers=st)
                assert r.status_code == 422 and "name the safetensors tensors" in r.json()["error"], r.text
                no_traceback(r)
            assert sched.stats_dict()["stage_failures"] == 0
        finally:
            s.stop()


def test_over_http_a_model_without_named_inputs_refuses_inputs_by_name():
    pytest.importorskip("httpx", reason="the [serve] extra (make test installs it)")
    pytest.importorskip("uvicorn", reason="the [serve] extra (make test installs it)")
    from models import mlp_model
    from safetensors.torch import save as st_save
    from test_serve_http import Served, no_traceback

    from eeruntime.serve.server import create_app

    rt = ee.EERuntime(mlp_model(), thresholds=0.5, criterion="max_prob")
    with StageScheduler(rt, max_batch=8) as sched:
        s = Served(create_app(sched))
        try:
            r = s.client.post("/v1/infer", json={"inputs": {"input_ids": [[1.0] * 6]}})
            assert r.status_code == 422 and "this model takes no named inputs" in r.json()["error"], r.text
            assert 'send JSON "inputs" as a nested list' in r.json()["error"]
            no_traceback(r)
            r = s.client.post(
                "/v1/infer",
                content=st_save({"input_ids": torch.ones(1, 6)}),
                headers={"content-type": "application/octet-stream"},
            )
            assert r.status_code == 422 and "'input' or input_0, input_1" in r.json()["error"], r.text
            assert s.client.post("/v1/infer", json={"inputs": [[1.0] * 6]}).status_code == 200
        finally:
            s.stop()


def test_litserve_takes_a_text_models_inputs_by_name(tmp_path):
    pytest.importorskip("litserve", reason="the [serve] extra (make test installs it)")
    import gc

    from fastapi import HTTPException
    from serve_models import tiny_bert_text

    from eeruntime.serve.litserve_api import EarlyExitLitAPI

    rt, x = named_runtime("bert")
    rt.save(tmp_path / "text", weights=True)
    api = EarlyExitLitAPI(tmp_path / "text", "serve_models:tiny_bert_text", max_batch=8)
    assert torch.equal(tiny_bert_text()(x)[-1], rt.model(x)[-1])  # (the factory's weights are rt's)
    switch = sys.getswitchinterval()
    api.setup("cpu")
    try:

        async def ask(doc):
            return await api.predict(await api.decode_request(doc))

        got = asyncio.run(ask({"inputs": {k: v.tolist() for k, v in x.items()}}))
        assert_rows_equal(got, rt.infer(x))
        with pytest.raises(HTTPException) as e:
            asyncio.run(ask({"inputs": {"input_ids": x["input_ids"].tolist(), "labels": [[1]]}}))
        assert e.value.status_code == 422 and "['labels']" in e.value.detail, e.value.detail
        assert "attention_mask" in e.value.detail
    finally:
        api.sched.close()
        sys.setswitchinterval(switch)
        gc.unfreeze()

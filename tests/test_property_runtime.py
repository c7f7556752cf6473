"""Property-based: EERuntime against the float64 per-sample loop over random models (1 to 4 exits),
states (a tensor, or a (hidden, mask) tuple with ragged masks), criteria (the four named ones and a
callable), thresholds anywhere in the scores' range, batch sizes 0 to 300, final modes and dtypes.
Every example also checks that the caller's input and the model's weights come back untouched.
Bounded: a few seconds (max_examples below, no deadline: the shared CPU is slow at times)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import TupleExit, TupleStage, mlp_model
from reference import per_sample_loop, score64

import eeruntime as ee

CRITERIA = ["entropy", "max_prob", "margin", "norm_entropy", "callable"]
# dtype -> (how close to a threshold a row's float64 score may be and still flip, logits tolerance):
# the runtime scores in float32 whatever the logits' dtype (and final="average" sums in float32),
# and batched and one-row matmuls round differently, more so in bfloat16.
TOL = {torch.float64: (1e-5, 1e-6), torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 6e-2)}


def top_two_gap(logits, state):
    """A user criterion: the gap between the two largest logits (exits when >= T)."""
    top = logits.double().topk(min(2, logits.shape[1]), dim=1).values
    gap = top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0] * 0 + 1
    return gap.float()


def tuple_model(K, C, d, seed):
    torch.manual_seed(seed)
    m = ee.MultiExitModel([TupleStage(d) for _ in range(K)], [TupleExit(d, C) for _ in range(K)])
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)
    return m.eval()


def scores_for(model, x, criterion):
    with torch.no_grad():
        outs = model(x)
    if criterion == "callable":
        return [top_two_gap(o, None).double() for o in outs]
    return [score64(o.float(), criterion) for o in outs]


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    K=st.integers(1, 4),
    B=st.one_of(st.integers(0, 3), st.integers(4, 64), st.integers(65, 300)),
    C=st.integers(1, 7),
    state=st.sampled_from(["tensor", "tuple"]),
    criterion=st.sampled_from(CRITERIA),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    final=st.sampled_from(["last", "average"]),
    q=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_runtime_matches_the_per_sample_loop(K, B, C, state, criterion, dtype, final, q, seed):
    g = torch.Generator().manual_seed(seed)
    if state == "tuple":
        d, S = 4, 5
        model = tuple_model(K, C, d, seed).to(dtype)
        lengths = torch.randint(1, S + 1, (B,), generator=g)
        mask = (torch.arange(S)[None, :] < lengths[:, None]).to(dtype)
        x = ((torch.randn(B, S, d, generator=g) * 2).to(dtype), mask)
    else:
        model = mlp_model(K=K, C=C, seed=seed).to(dtype)
        x = (torch.randn(B, 6, generator=g) * 2).to(dtype)
    crit = top_two_gap if criterion == "callable" else criterion
    if B:
        thr = [float(s.nan_to_num(0.0).quantile(qk)) for s, qk in zip(scores_for(model, x, criterion)[: K - 1], q)]
    else:
        thr = [0.5] * (K - 1)
    inputs_before = [t.clone() for t in (x if isinstance(x, tuple) else (x,))]
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}

    res = ee.EERuntime(model, thresholds=thr, criterion=crit, final=final).infer(x)

    for t, before in zip(x if isinstance(x, tuple) else (x,), inputs_before):
        assert torch.equal(t, before), "the runtime changed its input"
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
    assert res.logits.shape == (B, C) and res.exit_index.shape == (B,) and res.confidence.shape == (B,)
    assert res.exit_index.dtype == torch.int64 and res.confidence.dtype == torch.float32
    if B == 0:
        return
    ref_logits, ref_exit, near = per_sample_loop(model, x, thr, crit, final)
    near_tol, logit_tol = TOL[dtype]
    clear = near > near_tol
    assert torch.equal(res.exit_index[clear], ref_exit[clear])
    same = res.exit_index == ref_exit
    torch.testing.assert_close(res.logits[same].double(), ref_logits[same], rtol=logit_tol, atol=logit_tol)
    assert int(res.exit_index.max()) <= K - 1

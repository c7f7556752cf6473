"""Bad input through the public API: each error says what was wrong, where, and what is accepted,
and nothing is left half-changed (thresholds keep their old values after a refused set)."""

import numpy as np
import pytest
import torch
from models import TupleExit, TupleStage, mlp_model
from test_calibrate import tiny_data, tiny_model
from torch import nn

import eeruntime as ee

# ------------------------------------------------------------------------------ thresholds
BAD_THRESHOLDS = [
    ({0.5, 0.2}, TypeError, "got a set"),
    (frozenset({0.1, 0.3}), TypeError, "got a frozenset"),
    ({0: 0.1, 1: 0.2}, TypeError, "got a dict"),
    ([True, False], TypeError, "threshold 0 is a bool"),
    ([0.3, np.bool_(True)], TypeError, "threshold 1 is a bool"),
    (True, TypeError, "is a bool"),
    (torch.tensor([True, False]), TypeError, "torch.bool tensor"),
    ([0.1, float("nan")], ValueError, "threshold 1 is NaN"),
    (torch.tensor([0.1, float("nan")]), ValueError, "threshold 1 is NaN"),
    (float("nan"), ValueError, "NaN"),
    (["0.1", "0.2"], TypeError, "threshold 0 is a str"),
    ("0.5", TypeError, "got a str"),
    ([0.1, None], TypeError, "threshold 1 is a NoneType"),
    (torch.empty(2, device="meta"), ValueError, "meta tensor"),
    (torch.empty((), device="meta"), ValueError, "meta tensor"),
    ([0.1, 0.2, 0.3], ValueError, "got 3 thresholds for a model with 3 exits"),
    # flattened: a [2, 1] or [1, 2] tensor passed as the 2 thresholds (a 2-D numpy array was refused)
    (torch.tensor([[0.1], [0.2]]), ValueError, r"0-dim or 1-D tensor, got shape \[2, 1\]"),
    (torch.tensor([[0.1, 0.2]]), ValueError, r"got shape \[1, 2\]"),
    (np.array([[0.1, 0.2]]), TypeError, "threshold 0 is a ndarray"),
    (object(), TypeError, "got a object"),
    # Before: a RuntimeError "Cannot access data pointer of Tensor that doesn't have storage" and an
    # OverflowError "int too large to convert to float".
    (torch.tensor([0.1, 0.2]).to_sparse(), ValueError, "sparse_coo tensor"),
    ([0.1, 10**400], ValueError, "threshold 1 is too large"),
]


@pytest.mark.parametrize("bad, err, words", BAD_THRESHOLDS, ids=[repr(b)[:30] for b, _, _ in BAD_THRESHOLDS])
def test_bad_thresholds_are_refused_and_change_nothing(bad, err, words):
    rt = ee.EERuntime(mlp_model(K=3), thresholds=[0.3, 0.6], criterion="max_prob")
    with pytest.raises(err, match=words) as info:
        rt.set_thresholds(bad)
    assert "float" in str(info.value)  # every refusal says what is accepted: floats, one per early exit
    assert rt.thresholds == [0.3, 0.6]
    with pytest.raises(err, match=words):
        ee.EERuntime(mlp_model(K=3), thresholds=bad, criterion="max_prob")


def test_an_int_too_long_to_print_is_refused_as_too_large_too():
    """An int past float's range was refused by printing it: past 4300 digits Python refuses to
    (ValueError 'Exceeds the limit (4300 digits) for integer string conversion'), said instead of
    what is wrong and accepted; the message no longer prints it (nor the 400 digits of 10**400)."""
    rt = ee.EERuntime(mlp_model(K=3), thresholds=[0.3, 0.6], criterion="max_prob")
    with pytest.raises(ValueError, match="threshold 1 is too large for a float.*inf means: never exit"):
        rt.set_thresholds([0.1, 10**5000])
    assert rt.thresholds == [0.3, 0.6]


@pytest.mark.parametrize(
    "good, want",
    [
        ([np.float32(0.25), 0.5], [0.25, 0.5]),
        (np.array([0.25, 0.5]), [0.25, 0.5]),
        ((0.25, 1), [0.25, 1.0]),
        (torch.tensor([0.25, 0.5], dtype=torch.float64), [0.25, 0.5]),
        (torch.tensor(0.25), [0.25, 0.25]),
        (np.array(0.25), [0.25, 0.25]),  # before: TypeError "iteration over a 0-d array"
        (np.float64(0.25), [0.25, 0.25]),
        ([np.array(0.25), torch.tensor(0.5)], [0.25, 0.5]),
        ([float("inf"), -float("inf")], [float("inf"), -float("inf")]),
        (2, [2.0, 2.0]),
    ],
)
def test_good_thresholds_still_accepted(good, want):
    assert ee.EERuntime(mlp_model(K=3), thresholds=good, criterion="max_prob").thresholds == want


# ------------------------------------------------------------------------------ states
class Returns(nn.Module):
    """A stage returning whatever it was built with, beside a real hidden state."""

    def __init__(self, extra):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.extra = extra

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.extra(h)


class AnyExit(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, h, *rest):
        return self.lin(h if isinstance(h, torch.Tensor) else h["hidden"])


@pytest.mark.parametrize(
    "extra, words",
    [
        (lambda h: (h, None), "got None at position 1 of the tuple"),
        (lambda h: (h, 3), "got a int at position 1 of the tuple"),
        (lambda h: (h, "mask"), "got a str at position 1 of the tuple"),
        (lambda h: (h, torch.tensor(1.0)), "member 1 is a 0-dim tensor"),
        (lambda h: (h, torch.ones(h.shape[0] + 1)), "member 0 has"),
        (lambda h: (), "got an empty tuple"),
        (lambda h: {"hidden": h}, "got a dict"),
        (lambda h: h[:1], "stage 0 returned 1 rows for a batch of"),
        (lambda h: None, "got None"),
        (lambda h: h.to("meta"), "meta tensor"),
    ],
)
def test_a_stage_returning_no_state(extra, words):
    model = ee.MultiExitModel([Returns(extra), nn.Identity()], [AnyExit(), AnyExit()]).eval()
    rt = ee.EERuntime(model, thresholds=2.0, criterion="max_prob")
    with pytest.raises((TypeError, ValueError), match=words) as info:
        rt(torch.randn(5, 6))
    msg = str(info.value)
    assert "stage 0" in msg and ("a torch.Tensor" in msg or "rows" in msg or "0-dim" in msg or "real" in msg), msg


@pytest.mark.parametrize(
    "x, words",
    [
        ({"input_ids": torch.ones(2, 3)}, "got a dict"),
        ((torch.randn(2, 6), None), "got None at position 1"),
        (torch.randn(3, 6, device="meta"), "meta tensor"),
        ((torch.randn(3, 6, device="meta"),), "meta tensor"),
    ],
)
def test_bad_model_inputs(x, words):
    with pytest.raises((TypeError, ValueError), match=words) as info:
        ee.EERuntime(mlp_model(K=2, d_in=6), thresholds=0.5)(x)
    assert "EERuntime input" in str(info.value) and "accepted" not in str(info.value) or "must be" in str(info.value)


def test_a_parameter_free_model_on_a_meta_input():
    model = ee.MultiExitModel([nn.Identity(), nn.ReLU()], [nn.Flatten(), nn.Flatten()]).eval()
    with pytest.raises(ValueError, match="meta tensor .* create the input on the model's device"):
        ee.EERuntime(model, thresholds=0.5)(torch.randn(4, 3, device="meta"))


def test_a_callable_criterion_returning_meta():
    def meta_scores(logits, state):
        return torch.empty(logits.shape[0], device="meta")

    rt = ee.EERuntime(mlp_model(K=3), thresholds=0.5, criterion=meta_scores)
    with pytest.raises(ValueError, match="meta_scores returned a meta tensor .* at exit 0"):
        rt(torch.randn(4, 6))


def test_tuple_states_still_run():
    model = ee.MultiExitModel([TupleStage(4), TupleStage(4)], [TupleExit(4, 3), TupleExit(4, 3)]).eval()
    h, m = torch.randn(5, 7, 4), torch.ones(5, 7)
    assert ee.EERuntime(model, thresholds=0.5)((h, m)).shape == (5, 3)
    assert ee.EERuntime(model, thresholds=0.5)([h, m]).shape == (5, 3)


# ------------------------------------------------------------------------------ calibration labels
@pytest.mark.parametrize("bad", [-1, 5, 10**9])
def test_calibration_refuses_labels_outside_the_classes(bad):
    model = tiny_model()
    x, y = tiny_data(model, N=60)
    with torch.no_grad():
        C = model(x[:1])[-1].shape[1]
    y = y.clone()
    y[17] = bad if bad != 5 else C
    with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, {C}\).* for sample 17"):
        ee.calibrate(model, (x, y), "accuracy", progress=False)
    y2 = y.clone()  # in a later batch: the sample number counts across batches
    y2[17] = 0
    y2[44] = C
    with pytest.raises(ValueError, match="for sample 44"):
        ee.calibrate(model, [(x[:30], y2[:30]), (x[30:], y2[30:])], "accuracy", progress=False)


def test_calibration_from_logits_refuses_bad_labels():
    from eeruntime.calibration import ScoreCache

    logits = [torch.randn(10, 4), torch.randn(10, 4)]
    cost = ee.CostModel([1.0, 1.0], [0.1, 0.1])
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        ScoreCache.from_logits(logits, torch.full((10,), 4), cost)
    with pytest.raises(ValueError, match="integer class indices"):
        ScoreCache.from_logits(logits, torch.zeros(10), cost)


@pytest.mark.parametrize("wide_at", [0, 1])
def test_exits_of_different_logit_dtypes_are_refused_not_cast_down(wide_at):
    """Every row's logits are written into one tensor of exit 0's dtype: a float32 exit after a
    float16 one had its values beyond float16's range turned into inf, without a word (rt.run_stage
    returned the same rows in float32, the per-sample loop the exit's own values)."""
    from torch import nn

    import eeruntime as ee

    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))]
    exits = [nn.Linear(4, 3), nn.Linear(4, 3)]
    narrow = 1 - wide_at
    exits[narrow] = nn.Sequential(exits[narrow], _Half())
    rt = ee.EERuntime(ee.MultiExitModel(stages, exits).eval(), thresholds=2.0, criterion="max_prob")
    with pytest.raises(ValueError, match="every exit must return one dtype"):
        rt.infer(torch.randn(5, 4))


class _Half(torch.nn.Module):
    def forward(self, x):
        return x.half()

"""attach_exits: the final exit reproduces the backbone bit for bit, split points are checked,
heads get the right shapes, and the backbone is shared, never changed."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import per_sample_loop
from torch import nn

import eeruntime as ee
from eeruntime.heads import ConvHead, ExitHead, PoolLinearHead


# ------------------------------------------------------------------ backbones
def seq_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """torchvision's ResNet layout: stem, layer1..layer4, avgpool, fc, flatten in forward."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
        self.layer3 = nn.Sequential(BasicBlock(16, 24, 2))
        self.layer4 = nn.Sequential(BasicBlock(24, 32, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class OutOfOrder(nn.Module):
    """Children registered in an order forward does not follow, functional ops and a skip: only fx can split it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(12, 5)
        self.b = nn.Conv2d(12, 12, 3, padding=1)
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.c = nn.Conv2d(12, 12, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.a(x))
        skip = h
        h = F.relu(self.b(h)) + skip
        h = F.gelu(self.c(h))
        return self.head(h.mean(dim=(2, 3)))


class TwoInputs(nn.Module):
    """A backbone taking (x, scale): the scale stays live across splits (a tuple state)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x, scale):
        h = torch.relu(self.a(x)) * scale
        h = torch.relu(self.b(h)) * scale
        return self.out(h)


def randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ bit-exact final exit
@pytest.mark.parametrize(
    "make, at, x_shape, mode",
    [
        (seq_cnn, ["2", "5"], (5, 3, 12, 12), "children"),
        (TinyResNet, ["layer1", "layer2", "layer3"], (5, 3, 32, 32), "children"),
        (TinyResNet, ["bn1", "layer1.0", "layer2"], (5, 3, 32, 32), "children"),
        (TinyResNet, ["layer1_0_relu", "layer2_0_bn2", "layer3"], (5, 3, 32, 32), "fx"),
        (OutOfOrder, ["relu", "add"], (5, 3, 8, 8), "fx"),
        (OutOfOrder, ["a", "b"], (5, 3, 8, 8), "fx"),
    ],
)
def test_final_exit_reproduces_backbone_bit_for_bit(make, at, x_shape, mode):
    backbone = randomise_bn(make()).eval()
    before = snapshot(backbone)
    x = torch.randn(x_shape)
    model = ee.attach_exits(backbone, at=at, num_classes=None, example_input=x[:2])
    assert model.split_mode == mode
    assert model.num_exits == len(at) + 1
    model.eval()
    with torch.no_grad():
        outs = model(x)
        want = backbone(x)
    assert torch.equal(outs[-1], want)
    for k, o in enumerate(outs[:-1]):
        assert o.shape == want.shape, k
    assert_same(snapshot(backbone), before)  # the backbone is not changed
    # the stages and the tail share the backbone's parameters (no copies)
    ids = {id(p) for p in backbone.parameters()}
    shared = {id(p) for m in list(model.stages) + [model.exits[-1]] for p in m.parameters()}
    assert shared == ids


def test_fx_split_with_two_inputs_and_a_live_input():
    backbone = TwoInputs().eval()
    x, s = torch.randn(7, 6), torch.rand(7, 1) + 0.5
    model = ee.attach_exits(backbone, at=["a"], example_input=(x[:2], s[:2])).eval()
    assert model.split_mode == "fx"
    with torch.no_grad():
        state = model.forward_until((x, s), 0)
        outs = model((x, s))
        want = backbone(x, s)
    assert isinstance(state, tuple) and len(state) == 2  # the split value first, then the live scale
    assert torch.equal(state[1], s)
    assert torch.equal(outs[-1], want)


def test_runtime_on_attached_model_matches_per_sample_loop():
    backbone = randomise_bn(TinyResNet()).eval()
    x = torch.randn(24, 3, 32, 32)
    model = ee.attach_exits(backbone, at=["layer1_0_relu", "layer2"], mode="fx", example_input=x[:2])
    with torch.no_grad():
        all_exits = model.eval()(x)
    # thresholds that nobody meets: the runtime gives the backbone's output for every row
    rt = ee.EERuntime(model, thresholds=1.0, criterion="max_prob")
    res = rt.infer(x)
    assert torch.equal(res.exit_index, torch.full((24,), 2))
    torch.testing.assert_close(res.logits, backbone(x).detach(), rtol=1e-5, atol=1e-6)
    # thresholds at the median score of exit 0: a mix of exits, row for row as the per-sample loop
    thr = float(torch.softmax(all_exits[0], 1).max(1).values.median())
    rt.set_thresholds([thr, thr])
    res = rt.infer(x)
    ref_logits, ref_exit, margin = per_sample_loop(model, x, [thr, thr], "max_prob")
    clear = margin > 1e-5
    assert torch.equal(res.exit_index[clear], ref_exit[clear])
    assert len(set(res.exit_index.tolist())) >= 2
    torch.testing.assert_close(res.logits[clear].double(), ref_logits[clear], rtol=1e-4, atol=1e-5)


class OptionalMaskAttention(nn.Module):
    """Timm's Eva layout: forward(x, attn_mask=None, is_causal=False), the optional arguments
    passed down to every attention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 24) for _ in range(3)])
        self.fc = nn.Linear(8, 4)

    def forward(self, x, attn_mask=None, is_causal=False):
        h = self.embed(x)
        for qkv in self.blocks:
            q, k, v = qkv(h).chunk(3, dim=-1)
            h = h + F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.fc(h.mean(1))


def test_optional_forward_arguments_take_their_defaults():
    """The optional arguments were traced as inputs: stage 0 wanted three arguments (every listed
    point failed on the dry run with "missing 2 required positional arguments") and, never
    batched, they left no split point between the blocks. Arguments the example does not give
    are bound to their defaults, as calling the backbone with the example does."""
    torch.manual_seed(0)
    backbone = OptionalMaskAttention().eval()
    x = torch.randn(16, 5, 6)
    names = [p.name for p in ee.split_points(backbone, example_input=x)]
    assert "add" in names and "add_1" in names
    model = ee.attach_exits(backbone, at=["add", "add_1"], example_input=x)
    with torch.no_grad():
        outs = model.eval()(x)
    assert torch.equal(outs[-1], backbone(x))
    thr = float(torch.softmax(outs[0], 1).max(1).values.median())
    res = ee.EERuntime(model, thresholds=[thr, thr], criterion="max_prob").infer(x)
    ref_logits, ref_exit, margin = per_sample_loop(model, x, [thr, thr], "max_prob")
    clear = margin > 1e-5
    assert torch.equal(res.exit_index[clear], ref_exit[clear])
    torch.testing.assert_close(res.logits[clear].double(), ref_logits[clear], rtol=1e-4, atol=1e-5)


HALF = torch.full((8,), 0.5)


class TensorAndTupleDefaults(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, bias=HALF, dims=(1,), dtype=torch.float32):
        return self.fc(self.b(self.a(x) + bias).mean(dims).to(dtype))


class BranchOnAnOptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, mask=None):
        h = self.a(x)
        if mask is not None:  # fx traces a mask as given (a Proxy is not None)
            h = h * mask
        return self.fc(self.b(h).mean(1))


def test_optional_forward_arguments_with_tensor_tuple_and_dtype_defaults_take_them_too():
    """A tensor default crashed attach with NameError "name '_tensor_constant0' is not defined"
    (fx's generated forward named it in its signature), and a tuple or dtype default stayed a
    stage input, refused as "does not give batched tensors (...) valid split points: (none)".
    Neither attach leaves an attribute on the backbone (fx stores a tensor constant on the module
    it traces)."""
    torch.manual_seed(0)
    backbone = TensorAndTupleDefaults().eval()
    before = set(vars(backbone))
    x = torch.randn(8, 5, 6)
    assert "a" in [p.name for p in ee.split_points(backbone, example_input=x)]
    model = ee.attach_exits(backbone, at=["a"], example_input=x)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], backbone(x))
    assert set(vars(backbone)) == before


def test_a_default_that_forward_branches_on_is_refused_naming_it():
    """fx traces ``if mask is not None`` with the mask as given: bound to None, the traced forward
    failed on the example with a bare TypeError from inside fx ("unsupported operand type(s) for
    *: 'Tensor' and 'NoneType' While executing %mul ...")."""
    backbone = BranchOnAnOptionalMask().eval()
    x = torch.randn(4, 5, 6)
    with pytest.raises(
        ValueError, match=r"BranchOnAnOptionalMask.*\(TypeError: unsupported operand.*'mask'.*example_input"
    ):
        ee.attach_exits(backbone, at=["a"], example_input=x, mode="fx")
    # given in the example, it is an input like x
    mask = torch.ones(4, 5, 1)
    model = ee.attach_exits(backbone, at=["a"], example_input=(x, mask), mode="fx")
    with torch.no_grad():
        assert torch.equal(model.eval()((x, mask))[-1], backbone(x, mask))


def test_inplace_first_op_after_a_split_still_trains():
    # layer after 'bn1' starts with ReLU(inplace=True): the head's saved input must survive it
    backbone = TinyResNet()
    x = torch.randn(4, 3, 32, 32)
    for at, mode in ((["bn1"], "children"), (["bn1"], "fx")):
        model = ee.attach_exits(backbone, at=at, head="conv", mode=mode, example_input=x[:2]).train()
        outs = model(x)
        sum(o.sum() for o in outs).backward()  # would raise "modified by an inplace operation"
        assert model.exits[0].classifier.weight.grad is not None
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            assert torch.equal(model.eval()(x)[-1], backbone.eval()(x))
        backbone.train()


# ------------------------------------------------------------------ split-point errors
def test_unknown_split_point_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'layer9' is not a child.*conv1, bn1, relu, maxpool, layer1, layer2, layer3"):
        ee.attach_exits(TinyResNet(), at=["layer9"])


def test_a_children_model_refusing_a_name_says_fx_names_work_too():
    """A backbone cut by its children (ResNet) also takes fx node names: a misspelt one was
    answered with the children only, and an fx node that fx refuses (the flatten in the tail)
    with "is not a child module" instead of fx's reason."""
    with pytest.raises(
        ValueError, match=r"'layer1.1.relu_9' is not a child.*layer3.*split_points\(backbone, mode='fx'\)"
    ):
        ee.attach_exits(TinyResNet(), at=["layer1.1.relu_9"])
    with pytest.raises(ValueError, match=r"'flatten' is part of the classifier tail.*layer4.0.bn2;"):
        ee.attach_exits(TinyResNet(), at=["flatten"])


def test_a_forward_hook_on_the_backbone_itself_is_named_when_the_split_differs():
    """Hooks on the backbone run around its forward, never in its stages: a hook that changes the
    output made attach refuse with "does not reproduce" and no word of why."""
    backbone = TinyResNet().eval()
    backbone.register_forward_hook(lambda m, inputs, out: out * 2)
    with pytest.raises(ValueError, match=r"does not reproduce.*1 forward hook\(s\) on TinyResNet itself"):
        ee.attach_exits(backbone, at=["layer1"])
    assert len(backbone._forward_hooks) == 1
    backbone.layer4.register_forward_hook(lambda m, inputs, out: out * 2)  # hooks of its modules run in the stages
    backbone._forward_hooks.clear()
    x = torch.randn(4, 3, 16, 16)
    model = ee.attach_exits(backbone, at=["layer1"], example_input=x)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], backbone(x))


@pytest.mark.parametrize(
    "wrap, hint",
    [
        (nn.DataParallel, r"DataParallel wrapper.*backbone\.module"),
        (torch.compile, r"torch\.compile wrapper.*backbone\._orig_mod.*EERuntime\(model, \.\.\., compile=True\)"),
        (lambda m: torch.jit.trace(m, torch.randn(2, 3, 8, 8)), r"TorchScript module.*the Python module"),
    ],
)
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_wrapped_backbones_are_refused_with_what_to_pass(wrap, hint):
    """DataParallel, torch.compile and TorchScript wrap the model; attach answered "torch.fx
    cannot trace ..." (or a children error naming 'module'), not what to pass instead."""
    wrapped = wrap(seq_cnn().eval())
    for call_ in (
        lambda: ee.attach_exits(wrapped, at=["2"], example_input=torch.randn(2, 3, 8, 8)),
        lambda: ee.split_points(wrapped),
    ):
        with pytest.raises(TypeError, match=hint):
            call_()


@pytest.mark.parametrize("at", [["layer4"], ["avgpool"], ["fc"]])
def test_split_in_the_classifier_tail_is_rejected(at):
    with pytest.raises(ValueError, match=r"classifier tail.*valid split points.*layer3"):
        ee.attach_exits(TinyResNet(), at=at)


def test_out_of_order_split_points_are_rejected():
    with pytest.raises(ValueError, match="forward order"):
        ee.attach_exits(TinyResNet(), at=["layer2", "layer1"])
    with pytest.raises(ValueError, match="forward order"):
        ee.attach_exits(OutOfOrder(), at=["b", "a"], example_input=torch.randn(2, 3, 8, 8))


def test_sequential_errors_list_child_names():
    with pytest.raises(ValueError, match=r"valid split points \(in order\): 0, 1, 2, 3, 4, 5"):
        ee.attach_exits(seq_cnn(), at=["10"])
    with pytest.raises(ValueError, match="more than once"):
        ee.attach_exits(seq_cnn(), at=["2", "2"])
    with pytest.raises(ValueError, match="empty"):
        ee.attach_exits(seq_cnn(), at=[])


def test_fx_errors_list_node_names():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        ValueError, match=r"'nope' is not a node.*valid split points \(node names, in order\): a, relu, b, relu_1, add"
    ):
        ee.attach_exits(OutOfOrder(), at=["nope"], example_input=x)
    with pytest.raises(ValueError, match="classifier tail"):
        ee.attach_exits(OutOfOrder(), at=["mean"], example_input=x)

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.blk, self.c = nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return self.c(self.blk(h) + h)

    # fx's underscored name and the dotted name of one node made an empty stage (an exit repeating the one before)
    assert [p.name for p in ee.split_points(Skip(), mode="fx")][:3] == ["a", "blk.0", "blk.1"]
    with pytest.raises(ValueError, match="'blk_0' and 'blk.0' name the same node"):
        ee.attach_exits(Skip(), at=["blk_0", "blk.0"], mode="fx")
    assert ee.attach_exits(Skip(), at=["blk_0", "blk.1"], mode="fx").num_exits == 3


def test_children_mode_on_a_module_that_does_not_run_them_in_order():
    with pytest.raises(ValueError, match="mode='fx'"):
        ee.attach_exits(OutOfOrder(), at=["b"], mode="children", example_input=torch.randn(2, 3, 8, 8))


def test_untraceable_backbone_in_fx_mode():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # data-dependent control flow
                h = h * 2
            return self.b(h)

    with pytest.raises(ValueError, match="torch.fx cannot trace Branchy"):
        ee.attach_exits(Branchy(), at=["a"], mode="fx")


# ------------------------------------------------------------------ heads and shapes
def test_head_factory_gets_the_dry_run_shapes():
    backbone = randomise_bn(TinyResNet()).eval()
    x = torch.randn(2, 3, 40, 40)
    seen = []

    def factory(shape, num_classes):
        seen.append((tuple(shape), num_classes))
        return nn.Sequential(nn.Flatten(), nn.Linear(shape.numel(), num_classes))

    model = ee.attach_exits(backbone, at=["maxpool", "layer2"], head=factory, example_input=x)
    with torch.no_grad():  # independent: run the backbone's modules by hand
        s0 = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        s1 = backbone.layer2(backbone.layer1(s0))
    assert seen == [(tuple(s0.shape[1:]), 10), (tuple(s1.shape[1:]), 10)]
    assert [o.shape for o in model.eval()(x)] == [torch.Size([2, 10])] * 3


class ChannelsLastNet(nn.Module):
    """Swin's layout: a conv patch embedding (its output [B, C, H, W]), permuted to [B, H, W, C]
    for the blocks, which the backbone declares as timm does (``output_fmt = "NHWC"``)."""

    output_fmt = "NHWC"

    def __init__(self, C=12):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 4, stride=4)
        self.norm = nn.LayerNorm(C)
        self.blocks = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Linear(C, C))
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        x = self.norm(self.stem(x).permute(0, 2, 3, 1))
        return self.head(self.blocks(x).mean(dim=(1, 2)))


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_a_channels_first_map_inside_a_channels_last_backbone_is_pooled_over_its_space(size):
    """A backbone whose maps are [B, H, W, C] (Swin) still has a [B, C, H, W] map before the
    permute of its patch embedding, a listed split point (timm's 'patch_embed.proj',
    torchvision's 'features.0.0'): its head pooled over C and H and classified the W columns
    (Linear(8, 5) for 12 channels). Each map is now read by its shape against the image's."""
    torch.manual_seed(0)
    backbone = ChannelsLastNet().eval()
    x = torch.randn(6, 3, *size)
    assert "stem" in [p.name for p in ee.split_points(backbone, example_input=x)]
    model = ee.attach_exits(backbone, at=["stem", "blocks.0"], example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(model(x)[-1], backbone(x))
        nchw = backbone.stem(x)
        nhwc = backbone.blocks[0](backbone.norm(nchw.permute(0, 2, 3, 1)))
        for head, state, space in ((model.exits[0], nchw, (2, 3)), (model.exits[1], nhwc, (1, 2))):
            assert head.classifier.in_features == 12
            torch.testing.assert_close(head.features(state), state.mean(dim=space))
    # the conv head takes the channels-first map
    assert isinstance(ee.attach_exits(backbone, at=["stem"], head="conv", example_input=x).exits[0], ConvHead)


def test_a_pool_head_pickled_before_channels_last_still_runs():
    """GlobalPool gained ``channels_last``; a model pickled before (``torch.save(model)`` by the
    earlier version, its GlobalPool's state without the attribute) failed in its first forward
    with AttributeError. It reads as the channels-first pool it was."""
    import pickle

    head = PoolLinearHead(8, 3)
    del head.body.__dict__["channels_last"]  # the instance as the earlier class made it
    old = pickle.loads(pickle.dumps(head))
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(old.features(x), x.mean(dim=(2, 3)))


def test_default_and_conv_heads_and_ready_modules():
    backbone = seq_cnn().eval()
    m = ee.attach_exits(backbone, at=["2", "5"])
    assert [type(h) for h in m.exits[:-1]] == [PoolLinearHead, PoolLinearHead]
    assert [h.classifier.in_features for h in m.exits[:-1]] == [8, 16]
    m = ee.attach_exits(backbone, at=["2", "5"], head="conv")
    assert [type(h) for h in m.exits[:-1]] == [ConvHead, ConvHead]
    heads = [nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c, 10)) for c in (8, 16)]
    m = ee.attach_exits(backbone, at=["2", "5"], head=heads)
    assert m.exits[0] is heads[0] and m.exits[1] is heads[1]
    with pytest.raises(ValueError, match="2 split points"):
        ee.attach_exits(backbone, at=["2", "5"], head=heads[:1])
    with pytest.raises(ValueError, match="unknown head 'mlp'"):
        ee.attach_exits(backbone, at=["2"], head="mlp")
    with pytest.raises(ValueError, match="example_input"):
        ee.attach_exits(backbone, at=["2"], head=lambda s, c: nn.Linear(1, c))


def test_confidence_and_gate_heads_are_in_the_state_dict():
    m = ee.attach_exits(seq_cnn(), at=["2", "5"], confidence=True, gates=True)
    for k in range(2):
        assert isinstance(m.exits[k], ExitHead) and m.exits[k].has_confidence and m.exits[k].has_gate
        assert f"exits.{k}.confidence_head.weight" in m.state_dict()
        assert f"exits.{k}.gate_head.weight" in m.state_dict()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        state = m.eval().forward_until(x, 0)
        c, g = m.exits[0].confidence(state), m.exits[0].gate(state)
    assert c.shape == g.shape == (3,) and bool(((c > 0) & (c < 1)).all())


def test_design_usage_without_an_example_input():
    backbone = randomise_bn(TinyResNet()).eval()
    model = ee.attach_exits(backbone, at=["layer1", "layer2"], num_classes=10)  # input guessed from conv1
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], backbone(x))
    digits_like = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    with pytest.raises(
        ValueError, match=r"does not run on a guessed input of shape \(2, 1, 32, 32\).*pass example_input"
    ):
        ee.attach_exits(digits_like, at=["1"])
    assert ee.attach_exits(digits_like, at=["1"], example_input=torch.zeros(2, 1, 8, 8)).num_exits == 2


@pytest.mark.parametrize("mode", ["children", "fx"])
def test_num_classes_replaces_the_final_classifier_for_fine_tuning(mode):
    # the classifier sits in a nested Sequential, as in torchvision's MobileNet / VGG
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10)),
    ).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = backbone(x)
    model = ee.attach_exits(backbone, at=["1"], num_classes=7, mode=mode, example_input=x[:2]).eval()
    with torch.no_grad():
        outs = model(x)
        assert torch.equal(backbone(x), want)  # the backbone still predicts its 10 classes
    assert [o.shape for o in outs] == [torch.Size([4, 7])] * 2
    assert backbone[5][2].out_features == 10
    new = [m for m in model.exits[-1].modules() if isinstance(m, nn.Linear)]
    assert new[-1].out_features == 7 and new[-1] is not backbone[5][2]
    assert any(m is backbone[5][0] for m in model.modules())  # the rest of the classifier is shared
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ee.attach_exits(seq_cnn(), at=["2"], num_classes=0)


class TwoHeads(nn.Module):
    """Two classifiers averaged, as in LeViT / DeiT-distilled: the first ends the last stage,
    the second is the tail."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 10)
        self.head_dist = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 10))

    def forward(self, x):
        h = torch.flatten(self.body(x), 1)
        return (self.head(h) + self.head_dist(h)) / 2


def test_num_classes_refused_when_the_tail_cannot_take_a_new_classifier():
    """Replacing fc gave a model that failed in its first forward (a shape mismatch deep in the
    traced tail); attach checks the new tail on the dry run and says what to do instead, leaving
    the backbone as it was (its BatchNorm statistics too: the check runs in eval mode)."""
    backbone = TwoHeads().train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(
        ValueError, match=r"num_classes=5 .* in place of 'head_dist.1' .* does not give \[B, 5\] logits"
    ):
        ee.attach_exits(backbone, at=["body"], num_classes=5, example_input=x)
    assert backbone.training and all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    model = ee.attach_exits(backbone, at=["body"], example_input=x)  # its own 10 classes
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], backbone.eval()(x))


def test_a_failing_check_on_a_traced_tail_prints_nothing_to_stderr(capfd):
    """The new-classifier check runs the fx-traced tail; torch.fx prints the traceback of an
    error in a GraphModule's generated forward to stderr ("Call using an FX-traced Module, line
    ... <--- HERE") before re-raising it, which attach turns into its ValueError: the user saw a
    traceback, then the refusal. The reason is in the ValueError, and stderr stays clean."""
    backbone = TwoHeads().eval()
    x = torch.randn(4, 3, 8, 8)
    capfd.readouterr()
    with pytest.raises(
        ValueError, match=r"does not give \[B, 5\] logits on the dry run \(RuntimeError: The size of tensor"
    ):
        ee.attach_exits(backbone, at=["body"], num_classes=5, example_input=x)
    assert capfd.readouterr().err == ""
    # the tail's own error handling is back afterwards: fx's print is fx's business outside attach
    model = ee.attach_exits(backbone, at=["body"], example_input=x)
    with pytest.raises(RuntimeError):
        model.exits[-1](torch.randn(4, 8), torch.randn(4, 7))  # the add in its generated forward fails
    assert "FX-traced Module" in capfd.readouterr().err


def test_num_classes_and_example_input_checks():
    emb = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="pass example_input"):
        ee.attach_exits(emb, at=["1"])
    tokens = torch.randint(0, 20, (4, 5))
    m = ee.attach_exits(
        nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.ReLU(), nn.Flatten(), nn.Linear(40, 3)),
        at=["0"],
        head=lambda s, c: nn.Sequential(nn.Flatten(), nn.Linear(s.numel(), c)),
        example_input=tokens,
    )
    assert [o.shape for o in m(tokens)] == [torch.Size([4, 3])] * 2


def test_num_classes_must_be_an_int_not_something_that_converts():
    """int(2.5) built 2-class heads, True one class, "3" three: silently, from a value no caller meant."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    for bad in (2.5, 4.0, True, "3", torch.tensor(True)):
        with pytest.raises(TypeError, match="num_classes must be a positive int"):
            ee.attach_exits(backbone, at=["1"], num_classes=bad)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            ee.attach_exits(backbone, at=["1"], num_classes=bad)
    x = torch.randn(5, 6)
    for good in (4, np.int64(4), torch.tensor(4)):
        m = ee.attach_exits(backbone, at=["1"], num_classes=good)
        assert [o.shape[1] for o in m.eval()(x)] == [4, 4] and type(m.exits[0].classifier.out_features) is int


def test_shared_by_default_copied_on_request():
    backbone = seq_cnn()
    shared = ee.attach_exits(backbone, at=["2"])
    assert shared.stages[0][0] is backbone[0]
    copied = ee.attach_exits(backbone, at=["2"], copy=True)
    assert copied.stages[0][0] is not backbone[0]
    with torch.no_grad():
        copied.stages[0][0].weight.add_(1.0)
    assert not torch.equal(copied.stages[0][0].weight, backbone[0].weight)


def test_modes_of_the_backbone_are_left_alone():
    backbone = seq_cnn().train()
    backbone[1].eval()  # a frozen BatchNorm inside a training backbone
    before = {m: m.training for m in backbone.modules()}
    model = ee.attach_exits(backbone, at=["2", "5"])
    assert {m: m.training for m in backbone.modules()} == before
    assert model.exits[0].training  # new modules follow the backbone's mode


# ------------------------------------------------------------------ head feature reuse
def test_exit_head_reuses_features_only_for_its_own_logits():
    head = ConvHead(4, 3, confidence=True, gate=True).eval()
    other = ConvHead(4, 3, confidence=True).eval()
    calls = []
    head.body.register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        fresh = torch.sigmoid(head.confidence_head(head.body(x)).squeeze(-1))
        calls.clear()
    with torch.inference_mode():
        logits = head(x)
        c = head.confidence(x, logits=logits)  # the features behind these logits: no second body pass
        assert len(calls) == 1 and torch.equal(c, fresh)
        head.gate(y)  # no logits given: the body runs
        head.confidence(x)
        assert len(calls) == 3
        other_logits = other(x)
        head.confidence(x, logits=other_logits)  # another head's logits carry nothing for this one
        assert len(calls) == 4
        x.add_(1.0)  # an inference tensor changed in place: nothing is keyed on it
        c2 = head.confidence(x)
        assert not torch.equal(c2, c) and len(calls) == 5
    calls.clear()
    logits = head(x)
    head.confidence(x, logits=logits)  # with autograd on, nothing is tagged
    assert len(calls) == 2 and not hasattr(logits, "_eeruntime_exit_features")
    assert not any(isinstance(v, torch.Tensor) and v.shape[0] == 2 for v in vars(head).values())  # no batch kept

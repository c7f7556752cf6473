"""The vision models people serve, with random weights: torchvision resnet18 / mobilenet_v3_small
and timm resnet18 / vit_tiny, attached by their own names (torchvision's dotted node names,
timm's feature_info names), checked row for row against the per-sample loop; split_points
listings; a num_classes that differs from the backbone's replaces its classifier only.

torchvision and timm live in the vision venv that ``make test`` sets up beside the main one
(see the Makefile: it shares the main venv's pinned torch); elsewhere these tests skip."""

import pytest
import torch
from reference import per_sample_loop
from torch import nn

import eeruntime as ee
from eeruntime.heads import PoolLinearHead, SequenceHead

WHY = "torchvision / timm are installed in the vision venv only (make test runs this file there)"
torchvision = pytest.importorskip("torchvision", reason=WHY)
timm = pytest.importorskip("timm", reason=WHY)


def check_rows(model, x, min_exits=2):
    """EERuntime == the per-sample loop row for row, at thresholds giving a mix of exits."""
    with torch.no_grad():
        first = model.eval()(x)[0]
    thr = float(torch.softmax(first.double(), 1).max(1).values.median())
    thresholds = [thr] * (model.num_exits - 1)
    res = ee.EERuntime(model, thresholds=thresholds, criterion="max_prob").infer(x)
    ref_logits, ref_exit, margin = per_sample_loop(model, x, thresholds, "max_prob")
    clear = margin > 1e-6
    assert clear.sum() >= len(clear) - 2
    assert torch.equal(res.exit_index[clear], ref_exit[clear])
    torch.testing.assert_close(res.logits[clear].double(), ref_logits[clear], rtol=1e-4, atol=1e-5)
    assert len(set(res.exit_index.tolist())) >= min_exits
    return res


def images(B=16, size=32, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "make, at, mode",
    [
        (
            lambda: torchvision.models.resnet18(num_classes=10),
            ["layer1.1.relu_1", "layer2"],
            "fx",
        ),  # torchvision node name
        (lambda: torchvision.models.resnet18(num_classes=10), ["layer1", "layer2.0"], "children"),
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), ["features.2", "features.5"], "children"),
        (lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), ["layer1", "layer2"], "children"),
    ],
)
def test_cnns_attach_by_their_names_and_match_the_per_sample_loop(make, at, mode):
    backbone = make().eval()
    x = images()
    model = ee.attach_exits(backbone, at=at)
    assert model.split_mode == mode
    assert all(isinstance(h, PoolLinearHead) for h in model.exits[:-1])
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], backbone(x))
    check_rows(model, x)


def test_timm_vit_by_feature_info_names():
    backbone = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10
    ).eval()
    names = [f["module"] for f in backbone.feature_info]
    model = ee.attach_exits(backbone, at=[names[3], names[7]])
    assert model.split_mode == "encoder"
    head = model.exits[0]
    assert isinstance(head, SequenceHead) and head.classifier[-1].in_features == 192  # features, not the 17 tokens
    x = images()
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], backbone(x))
    check_rows(model, x)
    # the multi-exit model holds every parameter of the backbone (pos_embed and cls_token too)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in backbone.parameters())


def test_split_points_list_names_with_shapes():
    rn = torchvision.models.resnet18(num_classes=10).eval()
    x = images(2)
    points = ee.split_points(rn, example_input=x)
    assert [p.name for p in points] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    assert dict((p.name, p.shape) for p in points)["layer2"] == (128, 4, 4)
    fine = {p.name: p.shape for p in ee.split_points(rn, example_input=x, mode="fx")}
    assert fine["layer1.1.relu_1"] == (64, 8, 8) and "layer1.0.add" in fine and "fc" not in fine
    # torchvision's own listing of node names agrees on every name it shares with ours
    from torchvision.models.feature_extraction import get_graph_node_names

    assert set(fine) <= set(get_graph_node_names(rn)[1])
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10).eval()
    vp = ee.split_points(vit)
    assert [p.name for p in vp] == [f"blocks.{i}" for i in range(11)]
    assert {p.shape for p in vp} == {(17, 192)}
    for p in points + vp:  # every listed point is accepted
        assert (
            ee.attach_exits(rn if p in points else vit, at=[p.name], example_input=x if p in points else None).num_exits
            == 2
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda: torchvision.models.mobilenet_v3_small(),
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8),
    ],
)
def test_num_classes_for_fine_tuning_replaces_only_the_classifier(make):
    backbone = make().eval()
    x = images(4)
    with torch.no_grad():
        want = backbone(x)
    at = "features.4" if isinstance(backbone, torchvision.models.MobileNetV3) else "blocks.5"
    model = ee.attach_exits(backbone, at=[at], num_classes=5).eval()
    with torch.no_grad():
        outs = model(x)
        assert torch.equal(backbone(x), want)  # 1000 classes, unchanged
    assert [o.shape for o in outs] == [torch.Size([4, 5])] * 2
    new = [m for m in model.exits[-1].modules() if isinstance(m, nn.Linear)][-1]
    assert new.out_features == 5 and all(new is not m for m in backbone.modules())


@pytest.mark.parametrize(
    "make, first",
    [
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), "features.0"),
        (lambda: timm.create_model("densenet121", pretrained=False, num_classes=10), "features.conv0"),
    ],
)
def test_a_features_sequential_is_opened_for_its_split_points(make, first):
    """Every layer but the classifier sits in one nn.Sequential child (``features``): its children
    are the split points (split_points listed none, and attach's error offered "(none)")."""
    backbone = make().eval()
    x = images(8)
    points = ee.split_points(backbone, example_input=x)
    assert points and points[0].name == first and all(p.name.startswith("features.") for p in points)
    with pytest.raises(ValueError, match=f"valid split points \\(in order\\): {first}, "):
        ee.attach_exits(backbone, at=["nonsense"], example_input=x)
    model = ee.attach_exits(backbone, at=[points[len(points) // 2].name], example_input=x)  # a listed point works
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], backbone(x))
    check_rows(model, x)


def test_num_classes_for_a_distilled_levit_is_refused_with_a_way_out():
    """LeViT's eval output is the mean of two classifiers, ``head`` (which ends the last stage)
    and ``head_dist`` (the tail): replacing the one in the tail built a model that failed in its
    first forward. attach refuses, naming the way out, which works."""
    import copy

    backbone = timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=10).eval()
    x = images(4, size=64)
    with pytest.raises(ValueError, match=r"num_classes=5 .*'head_dist.linear'.*reset_classifier on a copy"):
        ee.attach_exits(backbone, at=["stages.1"], num_classes=5, example_input=x)
    five = copy.deepcopy(backbone)
    five.reset_classifier(5)
    model = ee.attach_exits(five, at=["stages.1"], example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(model(x)[-1], five(x)) and model(x)[0].shape == (4, 5)


def test_a_distilled_timm_vit_is_refused_clearly():
    """DeiT-distilled averages two heads on two tokens, which the timm ViT split does not run."""
    backbone = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10
    ).eval()
    with pytest.raises(ValueError, match="VisionTransformerDistilled.*do not reproduce its output"):
        ee.attach_exits(backbone, at=["blocks.3"])


@pytest.mark.parametrize(
    "make, at, size",
    [
        (
            lambda: torchvision.models.SwinTransformer(
                patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=10
            ),
            ["features.1", "features.3.0"],
            32,
        ),
        (
            lambda: timm.create_model(
                "swin_tiny_patch4_window7_224",
                pretrained=False,
                img_size=56,
                window_size=7,
                embed_dim=24,
                depths=(2, 2),
                num_heads=(2, 2),
                num_classes=10,
            ),
            ["layers.0"],
            56,
        ),
    ],
)
def test_swin_maps_are_channels_last_and_heads_pool_over_space(make, at, size):
    """Swin's maps are [B, H, W, C] (timm says so in output_fmt): the default head read H as the
    channels (a Linear(H, classes) after averaging over W and C), which only ran at the dry
    run's image size. It now averages over H and W and classifies the C features."""
    backbone = make().eval()
    x = images(8, size=size)
    model = ee.attach_exits(backbone, at=at, example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(model(x)[-1], backbone(x))
        state = x
        for stage, head in zip(model.stages[:-1], model.exits[:-1]):
            state = stage(state)
            assert head.classifier.in_features == state.shape[-1] != state.shape[1]
            torch.testing.assert_close(head.features(state), state.mean(dim=(1, 2)))
    check_rows(model, x)
    with pytest.raises(ValueError, match=r"head='conv' needs a channels-first map.*\[B, H, W, C\]"):
        ee.attach_exits(backbone, at=at, head="conv", example_input=x)


def tv_swin():
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=10
    )


def tv_swin_subclass():
    class MySwin(torchvision.models.SwinTransformer):
        pass

    return MySwin(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=10)


@pytest.mark.parametrize(
    "make, conv, at",
    [
        (tv_swin, "features.0.0", "features.1"),
        (tv_swin_subclass, "features.0.0", "features.1"),  # the maps are channels-last in a subclass too
        (
            lambda: timm.create_model(
                "swin_tiny_patch4_window7_224",
                pretrained=False,
                img_size=32,
                window_size=4,
                embed_dim=24,
                depths=(2, 2),
                num_heads=(2, 2),
                num_classes=10,
            ),
            "patch_embed.proj",
            "layers.0",
        ),
    ],
)
def test_swin_patch_embedding_conv_is_channels_first(make, conv, at):
    """Swin's patch embedding is a conv ([B, C, H, W]) permuted to [B, H, W, C] after it, and the
    conv is a listed split point: its head pooled over C and H, a Linear(W, classes). A subclass
    of torchvision's SwinTransformer got channels-first heads for its [B, H, W, C] maps."""
    backbone = make().eval()
    x = images(6, size=32)
    assert conv in [p.name for p in ee.split_points(backbone, example_input=x, mode="fx")]
    model = ee.attach_exits(backbone, at=[conv, at], example_input=x, mode="fx").eval()
    with torch.no_grad():
        assert torch.equal(model(x)[-1], backbone(x))
        first = model.stages[0](x)
        second = model.stages[1](first)
        first, second = (
            first[0] if isinstance(first, tuple) else first,
            second[0] if isinstance(second, tuple) else second,
        )
        assert first.shape[1] == second.shape[-1] == 24 != first.shape[-1]
        for head, state, space in ((model.exits[0], first, (2, 3)), (model.exits[1], second, (1, 2))):
            assert head.classifier.in_features == 24
            torch.testing.assert_close(head.features(state), state.mean(dim=space))
    check_rows(model, x)


@pytest.mark.parametrize(
    "make, path",
    [
        (lambda: torchvision.models.squeezenet1_1(num_classes=10), "classifier.1"),
        (lambda: timm.create_model("dla34", pretrained=False, num_classes=10), "fc"),
    ],
)
def test_num_classes_replaces_a_1x1_conv_classifier(make, path):
    """SqueezeNet and DLA classify with a 1x1 convolution: num_classes was refused ("no
    nn.Linear with 10 outputs"); the conv is now replaced by a new one, and the final exit is the
    backbone with that conv in its place."""
    import copy

    backbone = make().eval()
    x = images(4, size=64)
    with torch.no_grad():
        want = backbone(x)
    model = ee.attach_exits(backbone, at=[ee.split_points(backbone, example_input=x)[2].name], num_classes=5).eval()
    new = [m for m in model.exits[-1].modules() if isinstance(m, nn.Conv2d) and m.out_channels == 5]
    assert len(new) == 1 and new[0].kernel_size == (1, 1) and all(new[0] is not m for m in backbone.modules())
    ref = copy.deepcopy(backbone)
    parent, name = ref.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2]
    setattr(parent, name, new[0])
    with torch.no_grad():
        assert torch.equal(model(x)[-1], ref(x))
        assert torch.equal(backbone(x), want)

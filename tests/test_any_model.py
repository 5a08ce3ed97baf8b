"""Any nn.Module: layers found from the model's own structure (timm's feature_info, or a module walk), outputs read
as maps (tokens with prefix tokens, channels-last stages, tuple outputs), explained like pfnet's networks and equal
to pytorch-grad-cam with the reshape a user would otherwise write by hand. Random weights, small inputs."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import cams
from cams import LayerError, explain
from cams import layers as L
from cams.align import layer_offsets, layer_stride
from cams.multi import explain_methods

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-4

#: id -> (timm name, create_model options, input (h, w)); at least one of every family the issue names.
TIMM = {
    "resnet": ("resnet10t", {}, (64, 64)),
    "convnext": ("convnext_atto", {}, (64, 64)),
    "efficientnet": ("tf_efficientnet_lite0", {}, (64, 64)),
    "deit": ("deit_tiny_patch16_224", {"img_size": 64}, (64, 64)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": (48, 80)}, (48, 80)),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, (64, 64)),
    "pit": ("pit_ti_224", {"img_size": 64}, (64, 64)),
}


def _timm(key: str, **extra) -> nn.Module:
    name, options, _ = TIMM[key]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**options, **extra}).eval()


def _images(count: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


class Block(nn.Module):
    def __init__(self, channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


class Handmade(nn.Module):
    """A user's own network: a stem, two stages of blocks in a ModuleList, a head."""

    def __init__(self, classes: int = 7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stages = nn.ModuleList([nn.Sequential(Block(8), Block(8)), nn.Sequential(Block(8, 2), Block(8))])
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


class Tokens(nn.Module):
    """Tokens whose grid cannot be derived: 10 tokens from a 32x32 input (not a grid of that shape)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(1), nn.Linear(64, 40))
        self.mix = nn.Sequential(nn.Linear(4, 4), nn.GELU())
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        tokens = self.mix(self.embed(x).view(x.shape[0], 10, 4))
        return self.head(tokens.flatten(1))


def _firing_order(model: nn.Module, names: list[str], input_hw) -> list[str]:
    order: list[str] = []
    handles = [L.resolve(model, name).register_forward_hook(
        lambda module, inputs, output, name=name: order.append(name) if name not in order else None)
        for name in names]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_hw))
    finally:
        for handle in handles:
            handle.remove()
    return order


# ------------------------------------------------------------------------------------------ catalogue
@pytest.mark.parametrize("key", list(TIMM))
def test_timm_layers_in_depth_order_and_defaults_explained(key):
    model = _timm(key, num_classes=5)
    input_hw = TIMM[key][2]
    specs = cams.available_layers(model)
    names = [spec.name for spec in specs]
    assert len(names) == len(set(names)) and names
    assert L.pfnet_family(model) is None
    # stem and stages, then blocks, each in the order the forward pass reaches them
    outer = [spec.name for spec in specs if spec.kind in ("stem", "stage")]
    blocks = cams.block_layers(model)
    assert blocks, "every family has blocks"
    assert _firing_order(model, outer, input_hw) == outer
    assert _firing_order(model, blocks, input_hw) == blocks
    defaults = cams.layers.default_layers(model)
    stages = [spec.name for spec in specs if spec.kind == "stage"]
    if key in ("deit", "deit_distilled", "pit"):  # the classifier reads the class token(s) only: see below
        assert defaults[-1] == {"pit": "transformers.2.blocks.2"}.get(key, "blocks.10")
    else:
        assert defaults and defaults[-1] == (stages or blocks)[-1]
    assert cams.default_layer(model) == defaults[-1]
    explanation = explain(model, _images(2, *input_hw), defaults + [blocks[0]])
    heatmaps = explanation.heatmaps
    assert heatmaps.shape == (2, 1, len(defaults) + 1, *input_hw)
    assert bool(torch.isfinite(heatmaps).all()) and float(heatmaps.min()) >= 0 and float(heatmaps.max()) <= 1
    assert float(heatmaps.amax(dim=(-2, -1)).min()) > 0.99  # every map has its peak (random weights: not flat)


def test_feature_info_gives_every_stage_and_its_reduction():
    model = _timm("efficientnet")  # timm lists blocks 0, 1, 2, 4, 6 (one per stride): all seven are stages
    stages = [spec.name for spec in cams.available_layers(model) if spec.kind == "stage"]
    assert stages == [f"blocks.{index}" for index in range(7)] + ["bn2"]  # then the head's map (below)
    assert [layer_stride(model, name) for name in stages] == [2, 4, 8, 16, 16, 32, 32, 32]
    assert layer_stride(model, "blocks.5.1") == 32  # a block: its stage's
    resnet = _timm("resnet")
    assert [spec.name for spec in cams.available_layers(resnet) if spec.kind != "block"] == [
        "act1", "layer1", "layer2", "layer3", "layer4"]
    assert cams.block_layers(resnet) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]  # one block a stage
    assert L.layer_spec(resnet, "layer4.0").same_as == "layer4" and L.canonical(resnet, "layer4.0") == "layer4"
    wrapped = _timm("convnext")  # a stage module around its blocks (downsample, blocks): not known to be the same
    assert L.layer_spec(wrapped, "stages.3.blocks.1").same_as is None


def test_a_head_convolution_before_the_pooling_gives_the_final_feature_map():
    # EfficientNet: blocks.6 (320 ch) -> conv_head 1x1 (1280) -> bn2 (BN + act) -> pooling: bn2's map is pooled
    model = _timm("efficientnet", num_classes=5)
    assert cams.layers.default_layers(model) == ["blocks.6", "bn2"]
    assert "final feature map" in L.layer_spec(model, "bn2").label
    heatmaps = explain(model, _images(1, 64, 64), ["bn2"]).heatmaps
    assert float(heatmaps.max()) > 0.99 and float(heatmaps.min()) >= 0
    torch.manual_seed(0)
    mobile = torchvision.models.mobilenet_v2(num_classes=4).eval()  # features[-1] is the head conv block
    assert cams.layers.default_layers(mobile)[-1] == "features.18"
    after_pool = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4).eval()
    assert "conv_head" not in cams.layers.default_layers(after_pool)  # its head conv sees the pooled 1x1 vector
    assert cams.layers.default_layers(after_pool)[-1] == "blocks.5"
    assert cams.layers.default_layers(_timm("resnet"))[-1] == "layer4"  # no head: the last stage is pooled


def test_vit_blocks_without_stages_and_class_token_heads():
    model = _timm("deit")
    specs = cams.available_layers(model)
    assert [spec.name for spec in specs if spec.kind == "block"] == [f"blocks.{index}" for index in range(12)]
    assert L.token_grid(model, "blocks.3", (64, 96)) == (4, 6)
    # The head reads the class token only: the last block's patch tokens get no gradient (a flat Grad-CAM, as
    # pytorch-grad-cam gives there); the defaults stop one block before, and the label says why.
    assert cams.layers.default_layers(model) == ["blocks.9", "blocks.10"]
    assert "no gradient" in L.layer_spec(model, "blocks.11").label
    flat = explain(model, _images(1, 64, 64), ["blocks.11", "blocks.10"]).heatmaps
    assert float(flat[0, 0, 0].max()) == 0 and float(flat[0, 0, 1].max()) > 0.99
    pit = _timm("pit")
    assert cams.layers.default_layers(pit) == ["transformers.1", "transformers.2.blocks.2"]
    assert "no gradient" in L.layer_spec(pit, "transformers.2").label
    pooled = _timm("deit", global_pool="avg")  # an average-pooled head: every block counts
    assert cams.layers.default_layers(pooled) == ["blocks.10", "blocks.11"]


def test_torchvision_resnet_found_by_the_walk():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6).eval()
    specs = cams.available_layers(model)
    assert [spec.name for spec in specs if spec.kind != "block"] == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert cams.block_layers(model) == [f"layer{stage}.{index}" for stage in range(1, 5) for index in range(2)]
    assert cams.layers.default_layers(model) == ["layer3", "layer4"]
    explanation = explain(model, _images(1, 64, 64), ["maxpool", "layer4", "layer4.1.conv2"], targets=2)
    assert bool(torch.isfinite(explanation.heatmaps).all())
    assert explanation.class_names == tuple(f"class {index}" for index in range(6))
    assert explanation.target_name(0, 1).startswith("class ")


def test_torchvision_mobile_networks_found_by_the_walk():
    # EfficientNet: features.1..7 are stages of MBConv blocks (an MBConv's own list of conv groups around a
    # squeeze-excitation is the inside of one block); features.0 is the stem, features.8 the head's final map
    torch.manual_seed(0)
    effnet = torchvision.models.efficientnet_b0(num_classes=5).eval()
    specs = cams.available_layers(effnet)
    assert [spec.name for spec in specs if spec.kind != "block"] == [f"features.{index}" for index in range(9)]
    assert cams.block_layers(effnet)[:3] == ["features.1.0", "features.2.0", "features.2.1"]
    assert len(cams.block_layers(effnet)) == 16 and cams.layers.default_layers(effnet) == ["features.7", "features.8"]
    # MobileNetV2 has no stages: its 17 inverted-residual blocks, between a conv-group stem and the head's map
    mobile = torchvision.models.mobilenet_v2(num_classes=5).eval()
    assert cams.block_layers(mobile) == [f"features.{index}" for index in range(1, 18)]
    outer = [spec.name for spec in cams.available_layers(mobile) if spec.kind != "block"]
    assert outer == ["features.0", "features.18"]
    heatmaps = explain(effnet, _images(1, 64, 64), ["features.3", "features.8"]).heatmaps
    assert bool(torch.isfinite(heatmaps).all()) and float(heatmaps.amax(dim=(-2, -1)).min()) > 0  # random: tiny maps


def test_torchvision_vit_class_token_found_by_the_walk():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: every gradient would be zero
    blocks = [f"encoder.layers.encoder_layer_{index}" for index in range(3)]
    assert cams.block_layers(model) == blocks and cams.layers.default_layers(model) == blocks[:2]
    assert [spec.name for spec in cams.available_layers(model) if spec.kind == "stem"] == ["conv_proj"]
    heatmaps = explain(model, _images(1, 64, 64), blocks).heatmaps  # [1, 17, 32]: a class token, a 4x4 grid
    assert heatmaps.amax(dim=(-2, -1)).flatten().tolist() == pytest.approx([1, 1, 0], abs=1e-6)


def test_a_users_own_module():
    model = Handmade().eval()
    specs = cams.available_layers(model)
    assert [(spec.name, spec.kind) for spec in specs] == [
        ("stem", "stem"), ("stages.0", "stage"), ("stages.0.0", "block"), ("stages.0.1", "block"),
        ("stages.1", "stage"), ("stages.1.0", "block"), ("stages.1.1", "block")]
    assert cams.layers.default_layers(model) == ["stages.0", "stages.1"]
    explanation = explain(model, _images(2, 32, 32), cams.layers.default_layers(model) + ["stages.1.0.conv"])
    assert bool(torch.isfinite(explanation.heatmaps).all())
    # a plain nn.Sequential of blocks: its blocks
    plain = nn.Sequential(Block(3), Block(3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).eval()
    assert cams.block_layers(plain) == ["0", "1"] and cams.layers.default_layers(plain) == ["0", "1"]
    # no blocks at all: its convolutions
    vgg_like = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 2)).eval()
    assert cams.layer_names(vgg_like) == ["0", "2"] and cams.layers.default_layers(vgg_like) == ["2"]
    assert explain(vgg_like, _images(1, 16, 16), "2").heatmaps.shape == (1, 1, 1, 16, 16)


def test_unknown_layer_lists_the_valid_ones():
    model = Handmade().eval()
    with pytest.raises(LayerError, match=r"unknown layer 'stages\.7'.*any of its modules.*stages\.1\.1"):
        L.resolve(model, "stages.7")
    with pytest.raises(LayerError, match="unknown layer ''"):
        L.resolve(model, "")


# ------------------------------------------------------------------------------------------ maps
def test_swin_channels_last_and_pit_tuple_stages_read_as_maps():
    swin = _timm("swin", num_classes=5)
    acts = {}
    handle = L.resolve(swin, "layers.3").register_forward_hook(lambda m, i, o: acts.__setitem__("out", o))
    with torch.no_grad():
        swin(torch.zeros(1, 3, 64, 64))
    handle.remove()
    assert tuple(acts["out"].shape) == (1, 2, 2, 768)  # NHWC
    assert tuple(L.to_grid(swin, "layers.3", acts["out"], (64, 64)).shape) == (1, 768, 2, 2)
    pit = _timm("pit", num_classes=5)
    explanation = explain(pit, _images(1, 64, 64), ["transformers.1", "transformers.2.blocks.0"])
    assert bool(torch.isfinite(explanation.heatmaps).all())


@pytest.mark.parametrize(("key", "layer"), [("swin", "layers.2"), ("deit", "blocks.9")])
def test_every_method_reads_derived_maps(key, layer):
    model = _timm(key, num_classes=5)
    images = _images(2, *TIMM[key][2])
    methods = ["gradcam", "gradcampp", "layercam", "eigencam", "eigencam_fixed"]
    results = explain_methods(model, images, [layer], methods, targets=2)
    for method in methods:
        heatmaps = results[method].heatmaps
        assert heatmaps.shape == (2, 2, 1, *TIMM[key][2]) and bool(torch.isfinite(heatmaps).all()), method
    alone = explain(model, images, [layer], "gradcam", targets=2)
    assert torch.allclose(alone.heatmaps, results["gradcam"].heatmaps, atol=1e-5)


def test_underivable_tokens_name_the_shape_and_the_reshape_argument():
    model = Tokens().eval()
    with pytest.raises(LayerError) as caught:
        explain(model, _images(1, 32, 32), "mix")
    message = str(caught.value)
    assert "(1, 10, 4)" in message and "reshape=" in message and "'mix'" in message
    grid = explain(model, _images(1, 32, 32), "mix", reshape={"mix": (2, 5)}, align="none")
    called = explain(model, _images(1, 32, 32), "mix", align="none",
                     reshape=lambda out: out.transpose(1, 2).reshape(out.shape[0], 4, 2, 5))
    assert torch.equal(grid.heatmaps, called.heatmaps)
    both = explain_methods(model, _images(1, 32, 32), ["mix"], ["gradcam", "eigencam"], reshape=(2, 5))
    assert torch.allclose(both["gradcam"].heatmaps, grid.heatmaps, atol=1e-6)
    with pytest.raises(LayerError, match="must return a map"):
        explain(model, _images(1, 32, 32), "mix", reshape=lambda out: out)


def test_class_names_and_alignment():
    model = _timm("resnet")  # 1000 ImageNet classes: timm's names
    explanation = explain(model, _images(1, 64, 64), "layer4", targets=["espresso"])
    assert explanation.class_names[967] == "espresso" and explanation.target_name() == "espresso"
    assert layer_offsets(model, ["layer4", "layer3.0"], "model") == [(0.0, 0.0), (0.0, 0.0)]  # nothing measured
    model.cam_offsets = {"layer4": (2.0, 2.0)}  # recorded for one layer: shared by the layers of its stride
    assert layer_offsets(model, ["layer4.0", "layer3"], "model") == [(2.0, 2.0), (0.0, 0.0)]
    with pytest.raises(cams.MethodError):
        explain(model, _images(1, 64, 64), "layer4", method="cam")


# ------------------------------------------------------------------------------------------ pytorch-grad-cam
def _tokens_reshape(prefix: int, height: int, width: int):
    """What a pytorch-grad-cam user writes for a ViT: drop the prefix tokens, tokens to a channels-first map."""
    def reshape(tensor):
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape


@pytest.mark.parametrize(("key", "layers", "reshape"), [
    ("convnext", ["stages.2", "stages.3", "stages.3.blocks.0"], None),
    ("deit_distilled", ["blocks.5", "blocks.10"], _tokens_reshape(2, 3, 5)),
])
def test_matches_pytorch_grad_cam(key, layers, reshape):
    model = _timm(key, num_classes=10)
    images = _images(2, *TIMM[key][2])
    explanation = explain(model, images, layers, targets=2, align="none")
    for target in range(2):
        class_ids = explanation.targets[:, target]
        for position, name in enumerate(layers):
            with GradCAM(model=model, target_layers=[L.resolve(model, name)], reshape_transform=reshape) as cam:
                expected = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in class_ids])
            model.zero_grad(set_to_none=True)
            error = float(np.abs(explanation.heatmaps[:, target, position].numpy() - expected).max())
            assert error < TOLERANCE, f"{key} {name} target#{target}: max |diff| {error:.2e}"

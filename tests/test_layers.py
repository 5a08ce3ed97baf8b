"""cams.layers: layer catalogue, names, labels, defaults, resolution and token-to-grid reshapes."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import pfnet  # noqa: F401  (registers the architectures)
from cams import layers as L


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def r50():
    return timm.create_model("resnet50_pf", width_mult=0.25, num_classes=10).eval()


@pytest.fixture(scope="module")
def hybrid():
    return timm.create_model("resnet50_hybrid", width_mult=0.25, num_classes=10).eval()


@pytest.fixture(scope="module")
def r50max():
    return timm.create_model("resnet50_max", width_mult=0.25, num_classes=10).eval()


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("vit_ti_max", num_classes=10, img_size=64).eval()


@pytest.fixture(scope="module")
def pit():
    return timm.create_model("pit_ti_max", num_classes=10).eval()


def test_family_of(r50, vit, pit):
    assert L.family_of(r50) == "resnet"
    assert L.family_of(vit) == "vit"
    assert L.family_of(pit) == "pit"
    with pytest.raises(L.LayerError, match="not a pfnet"):
        L.family_of(nn.Linear(2, 2))


def test_resnet_catalogue(r50):
    specs = L.available_layers(r50)
    names = [spec.name for spec in specs]
    assert len(names) == len(set(names))
    # stem + 4 stages + 16 blocks + 16 spatial ops
    assert len(names) == 1 + 4 + 2 * 16
    for name in ["stem", "layer1", "layer2", "layer3", "layer4", "layer1.0", "layer3.5", "layer4.2",
                 "layer3.5.conv_block", "layer2.0.conv_block"]:
        assert name in names
    kinds = {spec.name: spec.kind for spec in specs}
    assert kinds["stem"] == "stem" and kinds["layer3"] == "stage"
    assert kinds["layer3.5"] == "block" and kinds["layer3.5.conv_block"] == "op"
    assert "max-pool" in L.layer_spec(r50, "stem").label
    assert "3x3 conv" in L.layer_spec(r50, "layer3.5.conv_block").label


def test_resnet_spatial_op_labels(r50max, hybrid):
    assert "3x3 max-pool" in L.layer_spec(r50max, "layer3.5.conv_block").label
    assert "conv" not in L.layer_spec(r50max, "layer3.5.conv_block").label.split(":")[-1]
    assert "2x2 avg-pool" in L.layer_spec(hybrid, "layer3.0.conv_block").label
    assert "3x3 conv" in L.layer_spec(hybrid, "layer3.0.conv_block").label
    assert "3x3 max-pool" in L.layer_spec(hybrid, "layer3.1.conv_block").label
    # layer1 keeps the resolution: a max-pool even in its first block
    assert "max-pool" in L.layer_spec(hybrid, "layer1.0.conv_block").label


def test_label_follows_a_replaced_spatial_op():
    """Labels are remembered per op module (a speed-up): a block given another op gets that op's label."""
    model = timm.create_model("resnet50_pf", width_mult=0.25, num_classes=10).eval()
    assert "3x3 conv" in L.layer_spec(model, "layer2.1.conv_block").label
    model.layer2[1].conv_block = nn.MaxPool2d(3, stride=1, padding=1)
    label = L.layer_spec(model, "layer2.1.conv_block").label
    assert "3x3 max-pool" in label and "conv" not in label.split(":")[-1]


def test_stage_and_last_block_are_one_tensor(r50):
    assert L.layer_spec(r50, "layer4.2").same_as == "layer4"
    assert L.layer_spec(r50, "layer3.5").same_as == "layer3"
    assert L.layer_spec(r50, "layer3.4").same_as is None
    assert L.canonical(r50, "layer4.2") == "layer4"
    seen = {}
    handles = [L.resolve(r50, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
               for name in ("layer4", "layer4.2")]
    try:
        with torch.no_grad():
            r50(torch.randn(1, 3, 64, 64))
    finally:
        for handle in handles:
            handle.remove()
    assert seen["layer4"] is seen["layer4.2"]


def test_defaults(r50, vit, pit):
    assert L.default_layers(r50) == ["layer3", "layer4"]
    assert L.default_layer(r50) == "layer4"
    assert L.default_layers(vit) == ["blocks.10", "blocks.11"]
    assert L.default_layer(vit) == "blocks.11"
    assert L.default_layers(pit) == ["transformers.1", "transformers.2"]
    for model in (r50, vit, pit):
        names = L.layer_names(model)
        assert all(name in names for name in L.default_layers(model))


def test_resolve(r50):
    assert L.resolve(r50, "stem") is r50.maxpool
    assert L.resolve(r50, "layer4") is r50.layer4
    assert L.resolve(r50, "layer3.5") is r50.layer3[5]
    assert L.resolve(r50, "layer3.5.conv_block") is r50.layer3[5].conv_block


@pytest.mark.parametrize("bad", ["layer5", "layer3.6", "layer3.5.reduction_block", "fc", "", "conv1", 3])
def test_unknown_layer_lists_valid_names(r50, bad):
    with pytest.raises(L.LayerError) as info:
        L.resolve(r50, bad)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "unknown layer" in message and "layer4.2" in message and "stem" in message


def test_vit_catalogue(vit):
    specs = L.available_layers(vit)
    assert [spec.name for spec in specs] == [f"blocks.{index}" for index in range(12)]
    assert specs[0].label == "block 1 · attention"
    assert specs[1].label == "block 2 · max-pool"
    assert specs[11].label == "block 12 · max-pool"
    assert L.resolve(vit, "blocks.3") is vit.blocks[3]
    with pytest.raises(L.LayerError, match="blocks.11"):
        L.resolve(vit, "blocks.12")


def test_pit_catalogue(pit):
    names = L.layer_names(pit)
    assert names[:3] == ["transformers.0", "transformers.0.blocks.0", "transformers.0.blocks.1"]
    assert len(names) == 3 + 2 + 6 + 4
    assert L.resolve(pit, "transformers.1.blocks.5") is pit.transformers[1].blocks[5]
    assert L.layer_spec(pit, "transformers.1.blocks.5").same_as == "transformers.1"
    assert "max-pool" in L.layer_spec(pit, "transformers.2.blocks.1").label
    assert "attention" in L.layer_spec(pit, "transformers.2.blocks.2").label


def _capture(model, name, x):
    seen = {}
    handle = L.resolve(model, name).register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["out"]


def test_vit_to_grid_non_square(vit):
    x = torch.randn(2, 3, 64, 96)
    tokens = _capture(vit, "blocks.4", x)
    assert tokens.shape[:2] == (2, 4 * 6)
    assert L.token_grid(vit, "blocks.4", (64, 96)) == (4, 6)
    grid = L.to_grid(vit, "blocks.4", tokens, (64, 96))
    assert grid.shape == (2, vit.num_features, 4, 6)
    # row-major: token r * w + c sits at (r, c)
    assert torch.equal(grid[:, :, 2, 5], tokens[:, 2 * 6 + 5])
    # the patch embedding, flattened as ViTMax does, comes back as the conv output
    with torch.no_grad():
        patches = vit.patch_embed(x)
    assert torch.equal(L.to_grid(vit, "blocks.0", patches.flatten(2).transpose(1, 2), (64, 96)), patches)
    with pytest.raises(L.LayerError, match="tokens"):
        L.to_grid(vit, "blocks.4", tokens, (64, 64))


def test_pit_to_grid_non_square(pit):
    x = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        embedded = pit.patch_embed(x)
    assert L.token_grid(pit, "transformers.0.blocks.0", (80, 112)) == tuple(embedded.shape[-2:])
    for stage in range(3):
        stage_map = _capture(pit, f"transformers.{stage}", x)
        assert stage_map.dim() == 4
        assert L.to_grid(pit, f"transformers.{stage}", stage_map, (80, 112)) is stage_map
        tokens = _capture(pit, f"transformers.{stage}.blocks.1", x)
        grid = L.to_grid(pit, f"transformers.{stage}.blocks.1", tokens, (80, 112))
        assert grid.shape[-2:] == stage_map.shape[-2:]
        last = len(pit.transformers[stage].blocks) - 1
        last_tokens = _capture(pit, f"transformers.{stage}.blocks.{last}", x)
        assert torch.equal(L.to_grid(pit, f"transformers.{stage}.blocks.{last}", last_tokens, (80, 112)), stage_map)


def test_resnet_maps_pass_through(r50):
    act = torch.randn(1, 8, 4, 4)
    assert L.to_grid(r50, "layer4", act, (128, 128)) is act
    with pytest.raises(L.LayerError):
        L.token_grid(r50, "layer4", (128, 128))


def test_block_layers_are_every_block_in_depth_order(r50, vit, pit):
    blocks = L.block_layers(r50)
    assert len(blocks) == 16
    assert blocks[:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert blocks[-1] == "layer4.2"
    assert L.block_layers(vit) == [f"blocks.{i}" for i in range(len(vit.blocks))]
    pit_blocks = L.block_layers(pit)
    assert pit_blocks[0] == "transformers.0.blocks.0"
    assert len(pit_blocks) == sum(len(stage.blocks) for stage in pit.transformers)


def test_expand_layers_replaces_blocks_and_drops_repeats(r50):
    names = L.expand_layers(r50, ["layer4", L.BLOCKS, "layer1.0"])
    assert names[0] == "layer4"
    assert names[1:] == L.block_layers(r50)
    assert L.expand_layers(r50, ["layer3", "layer3"]) == ["layer3"]

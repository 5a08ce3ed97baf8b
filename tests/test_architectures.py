"""Architectures against the official checkpoint layout: keys, shapes, parameter counts, MACs, timm names, grads.

Each full-size model is built once (module-scoped, parametrized fixture) and dropped before the next one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models.resnet import ResNet as TimmResNet

import pfnet
from pfnet.pit import PiTMax
from pfnet.profile import count_macs, count_params, measure_latency_ms
from pfnet.resnet import PFResNet
from pfnet.vit import Attention, EffLayer, ViTMax

LAYOUT_PATH = Path(__file__).parent / "data" / "official_checkpoint_layout.json"
LAYOUT = json.loads(LAYOUT_PATH.read_text())["models"]
# Logits of each official-size model built with seed 0, recorded before the timm-native rework (commit c48be40)
# by running this file as a script (``PYTHONPATH=. python tests/test_architectures.py``); a change to construction
# or initialisation order shows up here.
REFERENCE_LOGITS_PATH = Path(__file__).parent / "data" / "reference_logits.json"

# official layout name -> (timm name, class)
OFFICIAL = {
    "resnet50": ("resnet50_pf", PFResNet),
    "resnet50_max": ("resnet50_max", PFResNet),
    "resnet50_hybrid": ("resnet50_hybrid", PFResNet),
    "vit_s_max": ("vit_s_max", ViTMax),
    "pit_s_max": ("pit_s_max", PiTMax),
}
RESNETS = ("resnet50_pf", "resnet50_max", "resnet50_hybrid")


@pytest.fixture(scope="module", params=sorted(OFFICIAL))
def official(request):
    name = request.param
    torch.manual_seed(0)
    model = timm.create_model(OFFICIAL[name][0])
    yield name, model
    del model


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    if isinstance(model, PFResNet):
        return model.conv1[0]
    if isinstance(model, ViTMax):
        return model.patch_embed.proj
    return model.patch_embed.conv


def forward_backward(model: torch.nn.Module, size: tuple[int, int], batch: int = 1) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(batch, 3, *size))
    out.square().mean().backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    return out


def test_layout_file_lists_the_five_official_models():
    assert set(LAYOUT) == set(OFFICIAL)


def test_state_dict_matches_official_layout(official):
    name, model = official
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    expected = LAYOUT[name]["state_dict"]
    assert sorted(set(expected) - set(ours)) == [], "keys missing from our model"
    assert sorted(set(ours) - set(expected)) == [], "keys the official checkpoint does not have"
    wrong = {key: (ours[key], shape) for key, shape in expected.items() if ours[key] != list(shape)}
    assert wrong == {}


def test_parameter_order_matches_official(official):
    """Keys in the official order, so optimizer states (indexed by parameter position) carry over."""
    name, model = official
    assert list(model.state_dict()) == list(LAYOUT[name]["state_dict"])


def logits_sample(model: torch.nn.Module) -> list[list[float]]:
    """Every 50th logit of two fixed random images (eval mode)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    model.eval()
    with torch.no_grad():
        return model(images)[:, ::50].tolist()


def test_logits_for_a_fixed_seed_unchanged(official):
    name, model = official
    expected = json.loads(REFERENCE_LOGITS_PATH.read_text())["models"][name]
    assert torch.allclose(torch.tensor(logits_sample(model)), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_parameter_count(official):
    name, model = official
    assert count_params(model) == LAYOUT[name]["params"]


def test_macs_at_224(official):
    name, model = official
    gmacs = count_macs(model, (224, 224)) / 1e9
    assert gmacs == pytest.approx(LAYOUT[name]["gmacs_224"], rel=0.01)


def test_timm_returns_our_class(official):
    name, model = official
    assert type(model) is OFFICIAL[name][1]
    assert model.num_classes == 1000


def test_forward_backward_224(official):
    _, model = official
    model.eval()
    out = forward_backward(model, (224, 224))
    assert out.shape == (1, 1000)


def test_forward_backward_non_square(official):
    _, model = official
    model.eval()
    assert forward_backward(model, (160, 224)).shape == (1, 1000)


def test_timm_resnet50_not_shadowed():
    assert type(timm.create_model("resnet50", num_classes=10)) is TimmResNet
    assert pfnet.resnet50_pf is not None


def test_all_names_registered():
    for name in RESNETS + ("vit_ti_max", "vit_s_max", "vit_b_max", "pit_ti_max", "pit_s_max", "pit_b_max"):
        assert timm.is_model(name), name


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_width_mult_and_num_classes(name):
    model = timm.create_model(name, width_mult=0.25, num_classes=10)
    assert isinstance(model, PFResNet) and model.num_classes == 10 and model.fc.out_features == 10
    assert model.num_features == 512
    model.train()
    assert forward_backward(model, (64, 96), batch=2).shape == (2, 10)


@pytest.mark.parametrize("name", ["vit_ti_max", "pit_ti_max"])
def test_small_transformers_other_sizes(name):
    model = timm.create_model(name, num_classes=10)
    assert model.num_classes == 10
    for size in ((224, 224), (160, 224), (96, 128)):
        assert forward_backward(model, size).shape == (1, 10)


def test_transformer_img_size_sets_pos_embed():
    vit = timm.create_model("vit_ti_max", num_classes=10, img_size=(160, 224))
    assert vit.pos_embed.shape == (1, 10 * 14, 192)
    pit = timm.create_model("pit_ti_max", num_classes=10, img_size=160)
    assert pit.pos_embed.shape == (1, 64, 19, 19)
    assert forward_backward(pit, (160, 160)).shape == (1, 10)


def test_blocks_alternate_attention_and_eff_layer():
    vit = timm.create_model("vit_ti_max", num_classes=10)
    assert [type(block.attn) for block in vit.blocks] == [Attention, EffLayer] * 6
    pit = timm.create_model("pit_ti_max", num_classes=10)
    for transformer in pit.transformers:
        kinds = [type(block.attn) for block in transformer.blocks]
        assert kinds == [Attention if index % 2 == 0 else EffLayer for index in range(len(kinds))]
    tokens = torch.randn(2, 12, 64)
    assert pit.transformers[0].blocks[1](tokens, (3, 4)).shape == tokens.shape
    with pytest.raises(ValueError):
        pit.transformers[0].blocks[1](tokens)  # 12 tokens: not square, no grid given


def test_profile_keeps_model_state():
    model = timm.create_model("resnet50_max", width_mult=0.25, num_classes=10)
    model.train()
    stats = model.conv1[1].running_mean.clone()
    assert count_macs(model, (64, 64)) > 0
    assert measure_latency_ms(model, (64, 64), warmup=0, runs=1) > 0
    assert model.training and all(module.training for module in model.modules())
    assert torch.equal(model.conv1[1].running_mean, stats)


if __name__ == "__main__":  # records tests/data/reference_logits.json (only when initialisation changes on purpose)
    reference = {}
    for layout_name, (timm_name, _) in OFFICIAL.items():
        torch.manual_seed(0)
        reference[layout_name] = logits_sample(timm.create_model(timm_name))
    REFERENCE_LOGITS_PATH.write_text(json.dumps({"about": "see tests/test_architectures.py", "models": reference}))

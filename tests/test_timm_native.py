"""pfnet's models as timm models: the options timm passes, pretrained_cfg, the classifier interface, features_only,
and the official parameter order (the layout file keeps the official checkpoints' key order)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.layers import DropPath
from torch import nn

from pfnet import zoo
from pfnet.pit import PIT_SIZES
from pfnet.resnet import ARCHS as RESNETS
from pfnet.vit import VIT_SIZES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = json.loads((Path(__file__).parent / "data" / "official_checkpoint_layout.json").read_text())["models"]
REGISTERED = [*RESNETS, *VIT_SIZES, *PIT_SIZES]
FAMILY = {**dict.fromkeys(RESNETS, "resnet"), **dict.fromkeys(VIT_SIZES, "vit"), **dict.fromkeys(PIT_SIZES, "pit")}
# Small builds of each family, fast on a CPU.
TINY = {
    "resnet50_hybrid": dict(width_mult=0.25),
    "vit_ti_max": dict(img_size=64),
    "pit_ti_max": dict(img_size=64),
}
# The official code (naver-ai/PfLayer vit_pf.py / pit_pf.py at b4bb770) built with this project's timm (1.0.31)
# at drop_path_rate=0.1 has 11 DropPath and 43 Dropout modules in ViT-S-max and in PiT-S-max: pos_drop, attn_drop
# and proj_drop in the 6 attention blocks, proj_drop in the 6 eff layers, timm's Mlp drop1 and drop2 in all 12
# blocks (1 + 12 + 6 + 24); block 0 has drop rate 0, hence no DropPath. (DeiT's plain ViT-S with timm 0.4's
# one-dropout Mlp has 37.)
OFFICIAL_DROP_MODULES = {"vit_s_max": (11, 43), "pit_s_max": (11, 43)}
OFFICIAL_DROP_PATH_RATES = {  # the official stochastic-depth rules, drop_path_rate=0.1, 12 blocks
    "vit_s_max": [rate.item() for rate in torch.linspace(0, 0.1, 12)][1:],
    "pit_s_max": [0.1 * index / 12 for index in range(1, 12)],
}


def on_meta(name: str, **kwargs) -> nn.Module:
    """A full-size build without memory or initialisation cost (structure only)."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def tiny(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=kwargs.pop("num_classes", 10), **TINY[name], **kwargs)


def tiny_input(name: str, batch: int = 2, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, 64, 64, generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------------------- regularisation
@pytest.mark.parametrize("name", sorted(OFFICIAL_DROP_MODULES))
def test_drop_modules_as_in_the_official_code(name):
    model = on_meta(name, drop_path_rate=0.1)
    drop_paths = [module for module in model.modules() if isinstance(module, DropPath)]
    dropouts = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    assert (len(drop_paths), len(dropouts)) == OFFICIAL_DROP_MODULES[name]
    assert [module.drop_prob for module in drop_paths] == pytest.approx(OFFICIAL_DROP_PATH_RATES[name])
    assert not any(isinstance(module, (DropPath, nn.Dropout)) and getattr(module, "drop_prob", module.p) > 0
                   for module in on_meta(name).modules())


@pytest.mark.parametrize("name", ["vit_s_max", "pit_s_max"])
def test_drop_rates_reach_their_places(name):
    model = on_meta(name, drop_rate=0.1, attn_drop_rate=0.05)
    rates = {key: module.p for key, module in model.named_modules() if isinstance(module, nn.Dropout)}
    assert rates.pop("pos_drop") == 0.1
    by_kind: dict[str, set[float]] = {}
    for key, rate in rates.items():
        by_kind.setdefault(".".join(key.split(".")[-2:]), set()).add(rate)
    assert by_kind == {"attn.attn_drop": {0.05}, "attn.proj_drop": {0.1}, "mlp.drop1": {0.1}, "mlp.drop2": {0.1}}


def test_resnet_drop_path_follows_timms_resnet():
    ours = [m.drop_prob for m in on_meta("resnet50_max", drop_path_rate=0.1).modules() if isinstance(m, DropPath)]
    timms = [m.drop_prob for m in on_meta("resnet50", drop_path_rate=0.1).modules() if isinstance(m, DropPath)]
    assert len(ours) == 15 and ours == pytest.approx(timms)


@pytest.mark.parametrize("name", sorted(TINY))
def test_regularisation_is_random_in_training_only(name):
    model = tiny(name, drop_rate=0.3, drop_path_rate=0.3)
    images = tiny_input(name)
    model.train()
    assert not torch.equal(model(images), model(images))
    model.eval()
    assert torch.equal(model(images), model(images))
    plain = tiny(name)  # same seed, no regularisation: identical weights, identical eval outputs
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.eval()(images), model(images))


# ----------------------------------------------------------------------------------------- refused options
@pytest.mark.parametrize("name", REGISTERED)
def test_unknown_options_are_refused(name):
    for option in ({"drop_block_rate": 0.1}, {"bn_eps": 1e-3}, {"embed_dim": 64}, {"no_such_option": 1}):
        with pytest.raises(TypeError, match=rf"{name} does not accept {next(iter(option))}"):
            timm.create_model(name, **option)
    with pytest.raises(ValueError, match="pfnet.load"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", [*VIT_SIZES, *PIT_SIZES])
def test_features_only_refused_for_token_models(name):
    with pytest.raises(TypeError, match="features_only"):
        timm.create_model(name, features_only=True)
    assert type(on_meta(name, features_only=False)).__name__ in ("ViTMax", "PiTMax")


@pytest.mark.parametrize(("options", "message"), [
    ({"global_pool": "token"}, "global_pool 'token'"), ({"global_pool": ""}, "num_classes=0"),
    ({"drop_path_rate": 1.0}, "drop_path_rate"), ({"drop_rate": -0.1}, "drop_rate"),
    ({"num_classes": -1}, "num_classes"),
])
@pytest.mark.parametrize("name", sorted(TINY))
def test_bad_values_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        on_meta(name, **TINY[name], **options)


# -------------------------------------------------------------------------------------------- pretrained_cfg
@pytest.mark.parametrize("name", REGISTERED)
def test_data_config_is_the_zoos_preprocessing(name):
    own = [entry for entry in zoo.ZOO.values() if entry.arch == name and entry.classes == "imagenet"]
    entries = own or [e for e in zoo.ZOO.values() if e.family == FAMILY[name] and e.classes == "imagenet"]
    config = resolve_data_config(model=on_meta(name))
    for entry in entries:
        expected = entry.preprocess
        assert config["interpolation"] == expected.interpolation
        assert config["crop_pct"] == pytest.approx(expected.crop_pct)
        assert config["input_size"] == (3, expected.input_size, expected.input_size)
        assert (config["mean"], config["std"]) == (expected.mean, expected.std)


def test_resnet50_hybrid_eval_transform_resizes_bilinearly_and_crops_like_the_zoo():
    config = resolve_data_config(model=on_meta("resnet50_hybrid"))
    assert (config["interpolation"], config["crop_pct"]) == ("bilinear", 0.875)  # timm's default: bicubic
    resize, crop = create_transform(**config).transforms[:2]
    assert resize.size == 256 and resize.interpolation.value == "bilinear" and tuple(crop.size) == (224, 224)


@pytest.mark.parametrize("model_id", zoo.ids())
def test_zoo_builds_carry_their_entrys_preprocessing(model_id):
    entry = zoo.get(model_id)
    with torch.device("meta"):
        model = entry.build()
    config = resolve_data_config(model=model)
    assert config["input_size"] == (3, entry.preprocess.input_size, entry.preprocess.input_size)
    assert config["interpolation"] == entry.preprocess.interpolation
    assert config["crop_pct"] == pytest.approx(entry.preprocess.crop_pct)
    assert model.pretrained_cfg["num_classes"] == entry.num_classes == model.num_classes


@pytest.mark.parametrize("name", REGISTERED)
def test_pretrained_cfg_names_first_conv_and_classifier(name):
    model = on_meta(name)
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    assert model.get_submodule(model.pretrained_cfg["classifier"]) is model.get_classifier()


# --------------------------------------------------------------------------------------- classifier interface
@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_is_forward_features_then_forward_head(name):
    model = tiny(name).eval()
    images = tiny_input(name)
    with torch.no_grad():
        logits = model(images)
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
        assert torch.equal(model.forward_head(features), logits)
        assert pooled.shape == (2, model.num_features)
        assert torch.allclose(model.get_classifier()(pooled), logits, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_reset_classifier_and_pre_logits_features(name):
    model = tiny(name).eval()
    images = tiny_input(name)
    classifier = model.pretrained_cfg["classifier"]
    body = {key: value for key, value in model.state_dict().items() if not key.startswith(classifier + ".")}
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        model.reset_classifier(5)
        assert model.num_classes == 5 and model(images).shape == (2, 5)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity)
        assert torch.equal(model(images), pooled)
        model.reset_classifier(3, global_pool="max")
        assert model.get_classifier().training is False  # the model is in eval mode
        assert model(images).shape == (2, 3)
    featureless = tiny(name, num_classes=0).eval()
    featureless.load_state_dict(body)  # strict: the body is all there is
    with torch.no_grad():
        assert torch.equal(featureless(images), pooled)


@pytest.mark.parametrize("name", sorted(TINY))
def test_global_pool_choices(name):
    images = tiny_input(name)
    outputs = {}
    for pool in ("avg", "max", "avgmax"):
        model = tiny(name, num_classes=0, global_pool=pool).eval()
        with torch.no_grad():
            outputs[pool] = model(images)
    assert torch.allclose(outputs["avgmax"], 0.5 * (outputs["avg"] + outputs["max"]), atol=1e-5)
    unpooled = tiny(name, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert torch.equal(unpooled(images), unpooled.forward_features(images))


def test_resnet_catavgmax_doubles_the_head_input():
    model = tiny("resnet50_hybrid", global_pool="catavgmax")
    assert model.get_classifier().in_features == 2 * model.num_features


@pytest.mark.parametrize("name", sorted(TINY))
def test_in_chans(name):
    model = tiny(name, in_chans=1).eval()
    assert model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels == 1
    with torch.no_grad():
        assert model(tiny_input(name, channels=1)).shape == (2, 10)


@pytest.mark.parametrize("name", [*VIT_SIZES, *PIT_SIZES])
def test_no_weight_decay_is_the_position_embedding(name):
    model = on_meta(name)
    assert model.no_weight_decay() == {"pos_embed"}
    assert all(hasattr(model, key) for key in model.no_weight_decay())


# -------------------------------------------------------------------------------------------- features_only
def test_resnet_features_only_is_timms_feature_list():
    images = tiny_input("resnet50_hybrid")
    features = tiny("resnet50_hybrid", features_only=True).eval()
    plain = tiny("resnet50_hybrid").eval()
    with torch.no_grad():
        maps = features(images)
        assert [m.shape[1] for m in maps] == features.feature_info.channels() == [64, 64, 128, 256, 512]
        assert [64 // m.shape[-1] for m in maps] == features.feature_info.reduction() == [2, 4, 8, 16, 32]
        assert torch.equal(maps[-1], plain.forward_features(images))
    picked = tiny("resnet50_hybrid", features_only=True, out_indices=(2, 4))
    assert picked.feature_info.channels() == [128, 512]
    assert set(features.state_dict()) <= set(plain.state_dict())


# ------------------------------------------------------------------------------------ official parameter order
class OfficialParameters(nn.Module):
    """Parameters with the official checkpoint's names (dots as '__'), shapes and order: what the official
    model hands its optimizer."""

    def __init__(self, name: str):
        super().__init__()
        for key, shape in LAYOUT[name]["state_dict"].items():
            if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                self.register_parameter(key.replace(".", "__"), nn.Parameter(torch.zeros(shape)))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


@pytest.mark.parametrize("name", ["vit_s_max", "pit_s_max"])
def test_official_optimizer_state_resumes_and_steps(name):
    from timm.optim import create_optimizer_v2

    official = OfficialParameters(name)
    official_optimizer = create_optimizer_v2(official, opt="sgd", lr=0.1, weight_decay=0.05)
    for parameter in official.parameters():
        parameter.grad = torch.ones_like(parameter)
    official_optimizer.step()  # creates a momentum buffer per parameter
    model = timm.create_model(name)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.1, weight_decay=0.05)
    assert [len(group["params"]) for group in optimizer.param_groups] == \
        [len(group["params"]) for group in official_optimizer.param_groups]
    optimizer.load_state_dict(official_optimizer.state_dict())
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()  # fails with a shape mismatch when the parameter order differs from the official one
    assert all(optimizer.state[parameter]["momentum_buffer"].shape == parameter.shape
               for parameter in model.parameters())


# ---------------------------------------------------------------------------- training with timm's building blocks
def write_image_folder(root: Path, classes: tuple[str, ...] = ("circle", "square"), per_class: int = 4) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in classes:
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            pixels = torch.randint(0, 256, (72, 80, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{index}.png")


def train_step(model: nn.Module, optimizer, loss_fn, images: torch.Tensor, targets: torch.Tensor) -> float:
    loss = loss_fn(model(images), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("name", sorted(TINY))
def test_trains_and_resumes_with_timms_training_blocks(name, tmp_path, one_torch_thread):
    """What timm's train.py does with these models (its create_model call, data, optimizer, loss, resume),
    on a tiny synthetic ImageFolder."""
    from timm.data import create_dataset, create_loader
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.models import resume_checkpoint
    from timm.optim import create_optimizer_v2

    def create() -> nn.Module:  # train.py's call with its defaults, --num-classes 2 --drop-path 0.1 --model-kwargs
        return timm.create_model(name, pretrained=False, in_chans=3, num_classes=2, drop_rate=0.0,
                                 drop_path_rate=0.1, drop_block_rate=None, global_pool=None, bn_momentum=None,
                                 bn_eps=None, scriptable=None, checkpoint_path="", **TINY[name])

    def optimizer_for(net: nn.Module):
        return create_optimizer_v2(net, opt="adamw", lr=1e-3, weight_decay=0.05)

    write_image_folder(tmp_path / "data" / "train")
    dataset = create_dataset("", root=str(tmp_path / "data"), split="train", is_training=True)
    torch.manual_seed(0)
    model = create()
    config = resolve_data_config({"input_size": (3, 64, 64)}, model=model)
    assert config["interpolation"] == model.pretrained_cfg["interpolation"]
    loader = create_loader(dataset, input_size=config["input_size"], batch_size=4, is_training=True,
                           use_prefetcher=False, interpolation=config["interpolation"], mean=config["mean"],
                           std=config["std"], crop_pct=config["crop_pct"], num_workers=0)
    optimizer = optimizer_for(model)
    decay = {id(parameter): group["weight_decay"] for group in optimizer.param_groups for parameter in group["params"]}
    for key in getattr(model, "no_weight_decay", set)():
        assert decay[id(model.get_parameter(key))] == 0.0
    assert decay[id(model.get_submodule(model.pretrained_cfg["first_conv"]).weight)] == 0.05
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()
    losses = [train_step(model, optimizer, loss_fn, images, targets) for images, targets in loader]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(start[model.pretrained_cfg["first_conv"] + ".weight"],
                           model.state_dict()[model.pretrained_cfg["first_conv"] + ".weight"])

    checkpoint = tmp_path / "last.pth.tar"  # the fields timm's CheckpointSaver writes
    torch.save({"epoch": 0, "arch": name, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "version": 2}, checkpoint)
    resumed = create()
    resumed_optimizer = optimizer_for(resumed)
    assert resume_checkpoint(resumed, str(checkpoint), optimizer=resumed_optimizer, log_info=False) == 1
    resumed.train()
    images, targets = next(iter(loader))
    for net, net_optimizer in ((model, optimizer), (resumed, resumed_optimizer)):
        torch.manual_seed(3)  # same drop-path draws
        train_step(net, net_optimizer, loss_fn, images, targets)
    for (key, value), resumed_value in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, resumed_value), key

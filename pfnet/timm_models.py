"""Any timm model by name, ``timm:<name>[.<tag>]``, as a zoo entry: architecture, Hub weights, classes and
preprocessing all from timm's registry (the tag's ``pretrained_cfg``, ``timm.data.resolve_data_config``).

Weights come the way timm's own ``pretrained=True`` fetches them: ``huggingface_hub`` into the Hugging Face cache timm
shares (``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT`` mirrors, ``HF_HUB_OFFLINE``), through pfnet's download path,
which adds the size cap, the sha256 record and the plain messages every zoo entry has. The Hub repository's
``config.json`` is fetched beside the weights; when cached, its ``pretrained_cfg`` and ``label_names`` win over the
registry's (a repository trained on other classes names them there).
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Any

from pfnet import zoo
from pfnet.errors import UnknownModelError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)?$")
HUB_CONFIG = "config.json"
PREPROCESS_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def timm_name(model_id: str) -> str:
    """The timm name in a ``timm:<name>[.<tag>]`` id (checked for shape, not yet against the registry)."""
    name = model_id[len(zoo.TIMM_PREFIX):].strip() if model_id.startswith(zoo.TIMM_PREFIX) else model_id.strip()
    if not NAME.match(name):
        raise UnknownModelError(f"{model_id[:80]!r} is not a timm model name; write timm:<name>[.<tag>], "
                                "e.g. timm:convnext_tiny.fb_in1k")
    return name


def resolve(model_id: str) -> tuple[str, Any]:
    """(``name.tag`` with the default tag filled in, timm's pretrained_cfg or None) of a ``timm:`` id."""
    import timm
    from timm.models import get_pretrained_cfg

    name = timm_name(model_id)
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise UnknownModelError(f"timm {timm.__version__} has no model {arch!r}; list similar names with "
                                f"timm.list_models('*{arch[:20]}*')")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise UnknownModelError(f"timm's {arch} has no pretrained tag {tag!r}; its tags: "
                                f"{', '.join(tags) or 'none'}") from None
    if cfg is not None and cfg.tag:
        return f"{arch}.{cfg.tag}", cfg
    return arch, cfg


def canonical(model_id: str) -> str:
    """``timm:<name>.<tag>``: the id with timm's default tag filled in (one id per set of weights)."""
    return zoo.TIMM_PREFIX + resolve(model_id)[0]


def hub_repo(cfg: Any) -> str | None:
    return getattr(cfg, "hf_hub_id", None) or None


def cached_hub_config(repo: str | None) -> dict[str, Any]:
    """The repository's config.json from the Hugging Face cache ({} when not cached or unreadable)."""
    if not repo:
        return {}
    from huggingface_hub import try_to_load_from_cache

    from pfnet.download import hf_cache_dir

    try:
        found = try_to_load_from_cache(repo, HUB_CONFIG, cache_dir=hf_cache_dir())
        if isinstance(found, str) and os.path.isfile(found) and os.path.getsize(found) < (1 << 22):
            with open(found, encoding="utf-8") as handle:
                config = json.load(handle)
            return config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        pass
    return {}


def entry(model_id: str) -> zoo.ZooEntry:
    """The zoo entry of a ``timm:`` id (:class:`~pfnet.errors.UnknownModelError` for a name timm does not know)."""
    name, cfg = resolve(model_id)
    repo = hub_repo(cfg)
    config = cached_hub_config(repo)
    return _entry(name, repo, json.dumps(config, sort_keys=True, default=str))


@lru_cache(maxsize=64)
def _entry(name: str, repo: str | None, config_text: str) -> zoo.ZooEntry:
    from timm.models import get_pretrained_cfg

    config = json.loads(config_text)
    cfg = get_pretrained_cfg(name)
    hub_cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    overrides = {key: hub_cfg[key] for key in PREPROCESS_KEYS if key in hub_cfg}
    num_classes = int(config.get("num_classes") or getattr(cfg, "num_classes", None) or 1000)
    classes, labels = _classes(cfg, config, num_classes)
    safe = name.replace("/", "_")
    if repo:
        filename = getattr(cfg, "hf_hub_filename", None)
        source = zoo.WeightSource("hf", f"{repo}/{filename}" if filename else repo, f"timm_{safe}.safetensors")
        where = f"weights from the Hugging Face Hub ({repo})"
    else:
        source = zoo.WeightSource("none", f"timm has no downloadable weights for {name}", f"timm_{safe}.pth")
        where = "no downloadable weights: pass a local checkpoint, or weights='random'"
    return zoo.ZooEntry(
        zoo.TIMM_PREFIX + name, f"timm {name}", name, "timm", source, zoo.timm_preprocess(name, overrides),
        zoo.PaperFigures(), classes=classes, labels=labels,
        note=f"timm {name}: {where}; classes and preprocessing from its pretrained_cfg.",
        description=f"{name} from timm's registry.")


def _classes(cfg: Any, config: dict[str, Any], num_classes: int) -> tuple[str, tuple[str, ...]]:
    """("imagenet", ()) for ImageNet-1k heads (the catalogue's own class list), else ("imagenet", names)."""
    names = config.get("label_descriptions") or config.get("label_names")
    if isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return "imagenet", tuple(names)
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(cfg.to_dict()) if cfg is not None else None
    if num_classes == 1000 and subset in (None, "imagenet-1k"):
        return "imagenet", ()
    if subset:
        try:
            described = tuple(ImageNetInfo(subset).label_descriptions())
            if len(described) == num_classes:
                return "imagenet", described
        except Exception:  # noqa: BLE001 - a label file timm lacks: numbered classes instead
            pass
    return "imagenet", tuple(f"class {index}" for index in range(num_classes))

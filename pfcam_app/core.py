"""The app's plumbing: error display, image sources, cached model loading and cached CAM runs.

Everything here is glue between Streamlit and the pfnet/cams functions: no model or CAM maths.
Models are loaded once per process (``st.cache_resource``, shared by every session; the engine is thread-safe);
CAM results are cached (``st.cache_data``) by (image hash, model, weights identity, layers, method, target, mode,
alignment),
so changing the colormap or the opacity only re-renders.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import streamlit as st
from PIL import Image

from pfnet import weights, zoo
from pfnet.assets import assets_dir
from pfnet.errors import PfnetError
from pfnet.preprocess import prepare

EXAMPLES_DIR = assets_dir() / "examples"
IMAGE_LIMIT_MB = 20
CHECKPOINT_LIMIT_MB = 1024
CHECKPOINT_TYPES = ["pth", "pt", "bin", "safetensors", "ckpt", "tar"]
IMAGENET_DEFAULT = ("r50", "r50_hybrid")
DEMO_DEFAULT = ("demo_r50", "demo_r50_hybrid")
N_SCENES = 8
SCORECAM_BATCH = 32  # one image per explain call; Score-CAM's masked copies go through 32 at a time
STATUS_LABEL = {"bundled": "bundled", "cached": "cached", "downloadable": "can download", "missing": "missing"}
STATUS_ICON = {"bundled": ":material/inventory_2:", "cached": ":material/check_circle:",
               "downloadable": ":material/cloud_download:", "missing": ":material/error:"}


# ----------------------------------------------------------------------------------------------------------------
# Errors: a message on the page, never a traceback
# ----------------------------------------------------------------------------------------------------------------

def error_text(exc: BaseException) -> str:
    """PfnetError / ImageError (a PfnetError too): their own message; anything else: short generic + its text."""
    if isinstance(exc, PfnetError) or _is_cam_error(exc):
        return str(exc)
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"Something unexpected went wrong ({type(exc).__name__}{': ' + detail if detail else ''})."


def _is_cam_error(exc: BaseException) -> bool:
    """cams' own errors (bad layer / method / target) carry messages written for people too."""
    try:
        from cams.layers import CamError
    except ImportError:
        return False
    return isinstance(exc, CamError)


@contextlib.contextmanager
def guard(context: str, where: Any = None) -> Iterator[None]:
    """Run a block; on failure show ``st.error`` (in ``where``) and carry on with the rest of the page.

    Streamlit's own control flow (st.stop / st.rerun) derives from BaseException and passes through.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the point is to keep the page alive
        (where or st).error(f"**{context}** — {error_text(exc)}", icon=":material/error:")


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One image to explain: raw bytes (what export receives too), its hash, and ground truth for demo scenes."""

    name: str
    data: bytes = field(repr=False)
    digest: str
    kind: str = "upload"  # "upload" | "example" | "scene"
    box: tuple[int, int, int, int] | None = None  # ground-truth box of a demo scene (x0, y0, x1, y1)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    label: str | None = None  # ground-truth class of a demo scene
    refused: str | None = None  # why it was refused before decoding (e.g. too large)


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def from_upload(upload: Any) -> Source:
    size = getattr(upload, "size", None)
    if size is None:
        size = len(upload.getvalue())
    if size > IMAGE_LIMIT_MB * 1024 * 1024:
        return Source(upload.name, b"", "", refused=f"{upload.name}: the file is {size / 2**20:.1f} MB; images "
                                                    f"are limited to {IMAGE_LIMIT_MB} MB. Resize it and try again.")
    data = upload.getvalue()
    return Source(upload.name, data, digest_of(data))


def example_photos() -> list[str]:
    from cams.images import IMAGE_EXTENSIONS

    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def photo_source(name: str) -> Source:
    data = (EXAMPLES_DIR / name).read_bytes()
    return Source(name, data, digest_of(data), kind="example")


def scene_size() -> int:
    """Demo scenes are drawn at the largest demo input size: the other demo models see them downscaled."""
    return max(zoo.get(model_id).preprocess.input_size for model_id in zoo.DEMO_IDS)


@st.cache_data(show_spinner=False, max_entries=64)
def _scene(index: int, size: int) -> tuple[bytes, tuple[int, int, int, int], np.ndarray, str]:
    from pfdemo import scenes

    scene = scenes.render_scene(scenes.TEST_SEED, index, size)
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="PNG")
    return buffer.getvalue(), tuple(int(v) for v in scene.box), scene.mask, scene.class_name


def scene_options() -> list[str]:
    """Demo scenes (held-out evaluation stream of pfdemo.scenes, at the demo models' input size)."""
    try:
        return [f"scene_{i:02d}_{_scene(i, scene_size())[3]}.png" for i in range(N_SCENES)]
    except Exception:  # noqa: BLE001 - the app works without demo scenes (the caller says so)
        return []


def scene_source(option: str) -> Source:
    index = int(option.split("_")[1])
    data, box, mask, label = _scene(index, scene_size())
    return Source(option, data, digest_of(data), kind="scene", box=box, mask=mask, label=label)


@st.cache_resource(show_spinner=False, max_entries=32)
def decode(digest: str, name: str, _data: bytes) -> Image.Image:
    """``cams.images.load_image`` (validated RGB), once per image content; shared, never modified in place."""
    from cams.images import load_image

    return load_image(_data, name)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Slot:
    """A selected model: loaded (``model`` set) or not (``problem`` says why and what to do)."""

    id: str
    entry: zoo.ZooEntry
    model: Any = None
    key: str = ""  # weights identity: part of every cache key
    weights_label: str = ""
    problem: str | None = None


def device_name() -> str:
    return str(weights.select_device())


def default_weights_key(model_id: str, status: str) -> str:
    path = weights.cached_path(model_id)
    try:
        info = path.stat()
        return f"{status}:{path}:{info.st_size}:{info.st_mtime_ns}"
    except OSError:
        return f"{status}:{model_id}"


@st.cache_resource(show_spinner=False, max_entries=12)
def _load_default(model_id: str, weights_key: str, device: str) -> Any:
    return weights.load(model_id, device=device)


@st.cache_resource(show_spinner=False, max_entries=2)
def read_upload(digest: str, _data: bytes) -> dict:
    """The uploaded checkpoint's state dict (read without running code by pfnet.weights)."""
    return weights.read_checkpoint(_data)


@st.cache_resource(show_spinner=False, max_entries=4)
def _load_uploaded(model_id: str, digest: str, device: str, _state: dict) -> Any:
    return weights.load(model_id, weights=_state, device=device)


def load_default(model_id: str) -> Slot:
    entry = zoo.get(model_id)
    status = weights.weight_status(model_id)
    slot = Slot(model_id, entry, weights_label=STATUS_LABEL.get(status, status))
    if status == "downloadable":
        slot.problem = (f"the weights for {entry.name} are not downloaded yet: press **Download** next to it in "
                        f"the sidebar, or upload a checkpoint (source: {entry.source.page}).")
        return slot
    slot.key = default_weights_key(model_id, status)
    try:
        slot.model = _load_default(model_id, slot.key, device_name())
    except Exception as exc:  # noqa: BLE001 - shown on the page, the app carries on with the others
        slot.problem = error_text(exc)
    return slot


def load_uploaded(model_id: str, digest: str, state: dict, name: str) -> Slot:
    entry = zoo.get(model_id)
    slot = Slot(model_id, entry, key=f"upload:{digest}", weights_label=f"uploaded {name}")
    try:
        slot.model = _load_uploaded(model_id, digest, device_name(), state)
    except Exception as exc:  # noqa: BLE001
        slot.problem = error_text(exc)
    return slot


@st.cache_data(show_spinner=False, max_entries=32)
def model_stats(model_id: str, weights_key: str, device: str, _model: Any) -> dict[str, float]:
    """Parameters, MACs at the entry's input size, and median latency, measured on the loaded model."""
    from pfnet import profile

    size = zoo.get(model_id).preprocess.input_size
    return {"params": profile.count_params(_model), "macs": profile.count_macs(_model, (size, size)),
            "latency_ms": profile.measure_latency_ms(_model, (size, size), warmup=1, runs=5), "size": size}


# ----------------------------------------------------------------------------------------------------------------
# CAMs
# ----------------------------------------------------------------------------------------------------------------

def engine_targets(target: tuple) -> Any:
    """The sidebar's target choice as ``cams.explain``'s ``targets`` argument."""
    kind = target[0]
    if kind == "top":
        return int(target[1]) if int(target[1]) > 1 else None
    return [target[1]]


@st.cache_data(show_spinner=False, max_entries=512)
def run_cams(digest: str, model_key: str, model_id: str, layers: tuple[str, ...], method: str, target: tuple,
             mode: str, align: str, _image: Image.Image, _model: Any) -> dict[str, Any]:
    """One image through one model: heatmaps [T, L, H, W], targets [T], probs [C], crop box, time taken."""
    from cams.engine import explain

    entry = zoo.get(model_id)
    started = time.perf_counter()
    prepared = prepare(_image, entry.preprocess, mode)
    result = explain(_model, prepared.tensor.unsqueeze(0), list(layers), method=method,
                     targets=engine_targets(target), class_names=entry.class_names(), batch_size=SCORECAM_BATCH,
                     align=align)
    seconds = time.perf_counter() - started
    return {"heatmaps": _numpy(result.heatmaps[0], np.float32), "targets": _numpy(result.targets[0], np.int64),
            "probs": _numpy(result.probs[0], np.float32), "crop_box": tuple(float(v) for v in prepared.crop_box),
            "seconds": seconds, "stamp": time.time()}


def _numpy(value: Any, dtype: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value).astype(dtype, copy=False)

"""The app's plumbing: error display, image sources, cached model loading and cached CAM runs.

Everything here is glue between Streamlit and the pfnet/cams functions: no model or CAM maths.
Models are loaded once per process (``st.cache_resource``, shared by every session; the engine is thread-safe);
CAM results are kept in one process-wide store (:class:`CamStore`) by (image hash, model, weights identity, layers,
method, target, mode, alignment, options), so changing the colormap or the opacity only re-renders, and the export panel
writes the CAMs already on the page instead of computing them again.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator

import numpy as np
import streamlit as st
from PIL import Image

from pfcam_app.network import network
from pfcam_app.upload_limits import CHECKPOINT_LIMIT_MB, CHECKPOINT_TYPES, IMAGE_LIMIT_MB  # noqa: F401 (core.*)
from pfnet import weights, zoo
from pfnet.assets import assets_dir
from pfnet.errors import PfnetError
from pfnet.preprocess import prepare

EXAMPLES_DIR = assets_dir() / "examples"
IMAGE_MAX_PIXELS = 8000 * 8000  # per image, read from the header before decoding
SESSION_PIXELS = 100_000_000  # decoded pixels a session may hold (RGB: 300 MB), released with the session
DECODED_KEY = "_decoded"  # session state: image digest -> decoded image
IMAGENET_DEFAULT = ("r50", "r50_hybrid")
DEMO_DEFAULT = ("demo_r50", "demo_r50_hybrid")
N_SCENES = 8
DEMO_SCENE = 1  # the scene selected on a first screen with the demo models
FIRST_PHOTO = "cat_chelsea.jpg"  # the photo selected on a first screen with ImageNet models
SCORECAM_BATCH = 32  # one image per explain call; Score-CAM's masked copies go through 32 at a time
CAM_ENTRIES = 512  # CAM results kept (image x model x settings)
CAM_BYTES = 256 * 2**20  # and their arrays' bytes, whichever bound is met first
UPLOAD_ENTRIES = 16  # parsed uploaded checkpoints and their models kept (upload_store)
UPLOAD_CACHE_BYTES = 1536 * 2**20  # and their bytes: one checkpoint at the 1 GB cap and its model, or several small
STATUS_LABEL = {"bundled": "bundled", "installed": "installed", "cached": "cached", "downloadable": "can download",
                "missing": "missing", "unreachable": "no network", "failed": "download failed"}
STATUS_ICON = {"bundled": ":material/inventory_2:", "installed": ":material/inventory_2:",
               "cached": ":material/check_circle:", "downloadable": ":material/cloud_download:",
               "missing": ":material/error:", "unreachable": ":material/wifi_off:", "failed": ":material/cloud_off:"}
READY = ("bundled", "installed", "cached")
PHOTO_DEFAULT = zoo.PHOTO_FALLBACK  # ImageNet networks installed with pfcam: beside the demo models offline
FIRST_PHOTOS = ("cat_chelsea.jpg", "coffee.jpg")  # explained by them on the offline first screen
RANDOM_LABEL = "random weights (asked for)"
FAILED_KEY = "_download_failed"  # session state: model id -> why its download failed


# ----------------------------------------------------------------------------------------------------------------
# Errors: a message on the page, never a traceback
# ----------------------------------------------------------------------------------------------------------------

def error_text(exc: BaseException) -> str:
    """PfnetError / ImageError (a PfnetError too): their own message; anything else: short generic + its text."""
    if isinstance(exc, PfnetError) or _is_cam_error(exc):
        return str(exc)
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"Something unexpected went wrong ({type(exc).__name__}{': ' + detail if detail else ''})."


_MARKDOWN = re.compile(r"([\\`*_\[\]!<>$~|#@&])")  # emphasis, links, images, HTML, maths, tables, e-mail links
WORD_JOINER = "\u2060"  # invisible; splits what Streamlit matches in the text itself
_ARROW = re.compile(r"(^|\s)(<->|->|<-|--|>=|<=|~=)(?=\s|$)")  # Streamlit draws these as arrows, a dash, signs
_COLON = re.compile(r":(?=[A-Za-z/])")  # ":red[", ":material/", ":streamlit:", "http://"
_WWW = re.compile(r"\b(www)(?=\.)", re.IGNORECASE)


def plain(text: object) -> str:
    """User-given text (file names, labels, messages quoting them) made inert for Streamlit's Markdown, so it shows
    as typed: line breaks flattened; Markdown's characters backslash-escaped (emphasis, links, HTML, maths, e-mail
    autolinks, a leading list mark); an invisible word joiner after a ``:`` that a letter or ``/`` follows, inside
    ``www.`` and inside a lone ``->``, because Streamlit finds colour spans (``:red[...]``), icons
    (``:material/...:``, ``:streamlit:``), autolinks and arrows in the parsed text, where an escape no longer
    holds."""
    text = " ".join(str(text).splitlines())
    text = _ARROW.sub(lambda m: m.group(1) + m.group(2)[0] + WORD_JOINER + m.group(2)[1:], text)
    escaped = _MARKDOWN.sub(r"\\\1", text)
    escaped = re.sub(r"^(\s*)([-+])(?=\s)", r"\1\\\2", escaped)  # "- x" and "+ x" start a list
    escaped = re.sub(r"^(\s*\d+)([.)])(?=\s)", r"\1\\\2", escaped)  # so does "1. x"
    return _WWW.sub(r"\1" + WORD_JOINER, _COLON.sub(":" + WORD_JOINER, escaped))


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
        (where or st).error(f"**{plain(context)}** — {plain(error_text(exc))}", icon=":material/error:")


def widget_default(key: str, value: Any) -> Any:
    """A widget's default, or None where the page already set its value (Streamlit warns about both)."""
    return None if key in st.session_state else value


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
        release_upload(upload)
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


def release_upload(upload: Any) -> None:
    """Drop a refused upload's bytes from Streamlit's store now instead of holding them for the session (the
    server's upload limits, pfcam_app/upload_limits.py, go by file name: an image-named file up to the image cap;
    a checkpoint-named one up to its cap, whichever slot it was sent to)."""
    try:
        from streamlit.runtime import get_instance
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        if ctx is not None and getattr(upload, "file_id", None):
            get_instance().uploaded_file_mgr.remove_file(ctx.session_id, upload.file_id)
    except Exception:  # noqa: BLE001 - best effort: without a runtime (tests, bare mode) there is nothing held
        pass


def keep_decoded(digests: set[str]) -> None:
    """Forget the session's decoded images that are no longer on the page."""
    held = st.session_state.get(DECODED_KEY, {})
    for digest in [digest for digest in held if digest not in digests]:
        del held[digest]


def decode(digest: str, name: str, data: bytes) -> Image.Image:
    """``cams.images.load_image`` (validated RGB), once per image content and session; never modified in place.

    Each session holds at most SESSION_PIXELS decoded pixels: an image that would pass the budget is refused
    from its header, before it is decoded. The images live in the session's state and go with it."""
    from cams.images import ImageError, load_image

    held: dict[str, Image.Image] = st.session_state.setdefault(DECODED_KEY, {})
    if digest in held:
        return held[digest]
    pixels = header_pixels(data)
    used = sum(image.width * image.height for image in held.values())
    if pixels is not None and used + pixels > SESSION_PIXELS:
        raise ImageError(name, f"this page already holds {used / 1e6:.0f} MP of decoded images and this one has "
                               f"{pixels / 1e6:.0f} MP; a session may hold {SESSION_PIXELS / 1e6:.0f} MP. "
                               f"Remove some images or use smaller ones.")
    image = load_image(data, name, max_bytes=IMAGE_LIMIT_MB * 2**20, max_pixels=IMAGE_MAX_PIXELS)
    held[digest] = image
    return image


def header_pixels(data: bytes) -> int | None:
    """Width x height from the image's header (nothing decoded), or None if the header is unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.width) * int(image.height)
    except Exception:  # noqa: BLE001 - load_image gives the reason
        return None


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

    @property
    def random(self) -> bool:
        """Random weights, asked for in the sidebar: every row and card says so."""
        return getattr(self.model, "weights_origin", None) == "random"

    @property
    def title(self) -> str:
        return f"{self.entry.name} (random weights)" if self.random else self.entry.name


@dataclass(frozen=True)
class CamOptions:
    """``cams.explain``'s options beyond the method, as the sidebar set them (the defaults: the plain maps)."""

    aug_smooth: bool = False  # six augmented copies of each image, their maps averaged: about 6x the time
    eigen_smooth: bool = False  # the weighted activations' first principal component instead of their sum
    precision: str = "float32"  # "bfloat16": Score-CAM's / Ablation-CAM's extra forwards in bf16 autocast

    def explain_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``cams.explain``."""
        return {"aug_smooth": self.aug_smooth, "eigen_smooth": self.eigen_smooth, "precision": self.precision}

    @property
    def recorded(self) -> tuple[tuple[str, Any], ...]:
        """What ``cams.explain`` records of them (``Explanation.options``): the ones not at their default."""
        return tuple((name, value) for name, value in self.explain_arguments().items()
                     if value not in (False, "float32"))

    @property
    def label(self) -> str:
        """The options in use, for a caption ("aug_smooth · bfloat16"); empty for the defaults."""
        return " · ".join(name if value is True else str(value) for name, value in self.recorded)


@dataclass
class Settings:
    """What the sidebar decided: the models (``ready``: those loaded) and how to explain and draw."""

    slots: list[Slot]
    ready: list[Slot]
    method: str
    layers_by_family: dict[str, list[str]]
    target: tuple
    colormap: str
    opacity: float
    mode: str
    align: str
    options: CamOptions = field(default_factory=CamOptions)
    every_model: bool = False  # every model explains every image (off: scenes by the demo models, photos by the rest)

    def layers_of(self, slot: Slot) -> tuple[str, ...]:
        """The layers picked for the slot's group (``ZooEntry.layer_group``: a pfnet family, else the model)."""
        return tuple(self.layers_by_family.get(slot.entry.layer_group, ()))

    @property
    def runnable(self) -> list[Slot]:
        """Loaded models with at least one layer chosen."""
        return [slot for slot in self.ready if self.layers_of(slot)]

    def key(self, digest: str, slot: Slot, target: tuple | None = None) -> tuple:
        """The CAM store key of one image through one model (``target``: another target than the page's)."""
        return cam_key(digest, slot, self.layers_of(slot), self.method, target or self.target, self.mode, self.align,
                       self.options)


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


def tensor_bytes(tensors: Any) -> int:
    """What a state dict or a model holds: its tensors' bytes, plus pfnet's per-tensor overhead."""
    from pfnet.checkpoint import TENSOR_OVERHEAD

    values = tensors.state_dict().values() if hasattr(tensors, "state_dict") else tensors.values()
    return sum(int(t.nelement()) * int(t.element_size()) + TENSOR_OVERHEAD for t in values if hasattr(t, "nelement"))


@st.cache_resource(show_spinner=False)
def upload_store() -> CamStore:
    """Uploaded checkpoints, parsed, and the models made from them: bounded in bytes (``UPLOAD_CACHE_BYTES``), not
    in entries (a million-tensor file pinned ~1.8 GB in one entry); shared by the sessions of the process."""
    return CamStore(UPLOAD_ENTRIES, UPLOAD_CACHE_BYTES)


def read_upload(digest: str, data: bytes) -> dict:
    """The uploaded checkpoint's state dict (read without running code by pfnet.weights), kept in
    :func:`upload_store`."""
    found = upload_store().get(("state", digest))
    if found is not None:
        return found["value"]
    state = weights.read_checkpoint(data)
    upload_store().put(("state", digest), {"value": state, "_bytes": tensor_bytes(state)})
    return state


def _load_uploaded(model_id: str, digest: str, device: str, state: dict) -> Any:
    key = ("model", model_id, digest, device)
    found = upload_store().get(key)
    if found is not None:
        return found["value"]
    model = weights.load(model_id, weights=state, device=device)
    upload_store().put(key, {"value": model, "_bytes": tensor_bytes(model)})
    return model


def failed_downloads() -> dict[str, str]:
    """This session's failed downloads: model id -> the reason (cleared by a successful one)."""
    return st.session_state.setdefault(FAILED_KEY, {})


def model_status(model_id: str) -> str:
    """pfnet's weight status, with "downloadable" split by what this page knows: "unreachable" (no network),
    "failed" (this session's download failed), or "downloadable"."""
    try:
        status = weights.weight_status(model_id)
    except Exception:  # noqa: BLE001 - an unreadable cache must not break the page
        return "missing"
    if status == "downloadable":
        if model_id in failed_downloads():
            return "failed"
        if not network().online:
            return "unreachable"
    return status


def load_default(model_id: str) -> Slot:
    entry = zoo.get(model_id)
    status = model_status(model_id)
    slot = Slot(model_id, entry, weights_label=STATUS_LABEL.get(status, status))
    place = f"place the file at `{weights.cached_path(model_id)}` or upload a checkpoint (source: {entry.source.page})"
    if status == "downloadable":
        slot.problem = (f"the weights for {entry.name} are not downloaded yet: press **Download** next to it in "
                        f"the sidebar, or {place}.")
        return slot
    if status == "unreachable":
        state = network()
        slot.problem = (f"the weights for {entry.name} are not cached and cannot be downloaded ({state.reason}: "
                        f"{state.where}; `PFCAM_OFFLINE=0` tries anyway); {place}.")
        return slot
    if status == "failed":
        slot.problem = (f"the download of {entry.name} failed: {failed_downloads()[model_id]} Press **Download** to "
                        f"try again, or {place}.")
        return slot
    slot.key = default_weights_key(model_id, status)
    try:
        slot.model = _load_default(model_id, slot.key, device_name())
    except Exception as exc:  # noqa: BLE001 - shown on the page, the app carries on with the others
        slot.problem = error_text(exc)  # the server's own files: no user text in it
    return slot


@st.cache_resource(show_spinner=False, max_entries=4)
def _load_random(model_id: str, device: str) -> Any:
    return weights.load(model_id, weights=weights.RANDOM, device=device)


def load_random(model_id: str) -> Slot:
    """The model with random weights: only when asked for in the sidebar, and marked on every row and card."""
    entry = zoo.get(model_id)
    slot = Slot(model_id, entry, key=f"random:{model_id}", weights_label=RANDOM_LABEL)
    try:
        slot.model = _load_random(model_id, device_name())
    except Exception as exc:  # noqa: BLE001
        slot.problem = plain(error_text(exc))
    return slot


def load_uploaded(model_id: str, digest: str, state: dict, name: str) -> Slot:
    entry = zoo.get(model_id)
    slot = Slot(model_id, entry, key=f"upload:{digest}", weights_label=f"uploaded {plain(name)}")
    try:
        slot.model = _load_uploaded(model_id, digest, device_name(), state)
    except Exception as exc:  # noqa: BLE001
        slot.problem = plain(error_text(exc))
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


class CamStore:
    """CAM results by key, least recently used dropped first; shared by the sessions of a process (thread-safe).

    Values are never modified after ``put``: readers share them."""

    def __init__(self, capacity: int, max_bytes: int = CAM_BYTES):
        self.capacity, self.max_bytes = capacity, max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def size_of(value: dict[str, Any]) -> int:
        """Its arrays' bytes, plus ``value["_bytes"]`` (what a value that is not arrays says it holds)."""
        return sum(item.nbytes for item in value.values() if isinstance(item, np.ndarray)) + value.get("_bytes", 0)

    def get(self, key: tuple) -> dict[str, Any] | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: dict[str, Any]) -> None:
        with self._lock:
            if key in self._items:
                self.bytes -= self.size_of(self._items[key])
            self._items[key] = value
            self.bytes += self.size_of(value)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity or (self.bytes > self.max_bytes and len(self._items) > 1):
                self.bytes -= self.size_of(self._items.popitem(last=False)[1])

    def values(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


@st.cache_resource(show_spinner=False)
def cam_store() -> CamStore:
    return CamStore(CAM_ENTRIES)


def cam_key(digest: str, slot: Slot, layers: tuple[str, ...], method: str, target: tuple, mode: str,
            align: str, options: CamOptions) -> tuple:
    """What a CAM result depends on: the image, the model and its weights, and the settings (``options`` too: maps
    made with other options are other maps)."""
    return digest, slot.key, slot.id, tuple(layers), method, tuple(target), mode, align, options


def compute_cams(key: tuple, image: Image.Image, model: Any, progress: Any = None) -> dict[str, Any]:
    """One image through one model (``key`` from :func:`cam_key`), stored: heatmaps [T, L, H, W], targets [T],
    probs [C], crop box, seconds taken. ``progress(done, total)`` is passed to ``cams.explain``."""
    from cams.engine import explain

    _, _, model_id, layers, method, target, mode, align, options = key
    entry = zoo.get(model_id)
    started = time.perf_counter()
    prepared = prepare(image, entry.preprocess, mode)
    result = explain(model, prepared.tensor.unsqueeze(0), list(layers), method=method,
                     targets=engine_targets(target), class_names=entry.class_names(), batch_size=SCORECAM_BATCH,
                     align=align, progress=progress, **options.explain_arguments())
    if result.errors and result.errors[0]:  # NaN: this image's error, shown as such and never stored
        from cams.layers import CamError

        raise CamError(f"{result.errors[0]}; no heatmap or class is shown for it")
    value = {"heatmaps": _numpy(result.heatmaps[0], np.float32), "targets": _numpy(result.targets[0], np.int64),
             "probs": _numpy(result.probs[0], np.float32), "crop_box": tuple(float(v) for v in prepared.crop_box),
             "seconds": time.perf_counter() - started}
    cam_store().put(key, value)
    return value


def _numpy(value: Any, dtype: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value).astype(dtype, copy=False)

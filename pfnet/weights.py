"""Checkpoints: where they come from (bundled, cache, download, path, upload), how they are read, what they fit.

Every checkpoint is read without running code: ``torch.load(..., weights_only=True)`` (with ``argparse.Namespace``
as the one extra allowed type, for training checkpoints) or safetensors. Downloads go to a temporary file in the
cache and are renamed into place only when complete; their sha256 is recorded next to them and checked on every
later load. Every failure the user can cause or meet is a :class:`~pfnet.errors.PfnetError` with a plain message.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import os
import re
import socket
import struct
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn

from pfnet import zoo
from pfnet.errors import CheckpointError, PfnetError, WeightsUnavailableError

__all__ = [
    "Fit", "GDRIVE_URL", "HF_URL", "cache_dir", "cached_path", "detect_architecture", "fetch", "load",
    "max_bytes", "offline", "read_checkpoint", "select_device", "weight_status",
]

Progress = Callable[[int, Union[int, None]], None]
WeightsArg = Union[None, str, os.PathLike, bytes, bytearray, memoryview, Mapping]

GDRIVE_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
HF_URL = "{endpoint}/{repo}/resolve/main/{filename}"
HF_DEFAULT_FILE = "model.safetensors"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: larger than any checkpoint in the zoo, optimizer state included
CHUNK = 1 << 20
USER_AGENT = "pfcam/1.0 (+https://github.com/naver-ai/PfLayer)"

# Container keys that hold the weights, in order of preference (timm train.py, DeiT main.py, DDP wrappers).
CONTAINER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
_MAX_NESTING = 4
_TRUE = {"1", "true", "yes", "on"}

# ---------------------------------------------------------------------------------------------------------------
# Configuration: cache, network, limits, device
# ---------------------------------------------------------------------------------------------------------------


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


def max_bytes() -> int:
    """The hard cap on downloaded and uploaded checkpoints (env ``PFCAM_MAX_BYTES``, default 1 GiB)."""
    raw = os.environ.get("PFCAM_MAX_BYTES", "").strip()
    if raw:
        try:
            value = int(float(raw))
        except ValueError:
            raise PfnetError(f"PFCAM_MAX_BYTES must be a number of bytes, not {raw!r}") from None
        if value > 0:
            return value
    return DEFAULT_MAX_BYTES


def _timeout() -> float:
    try:
        return float(os.environ.get("PFCAM_TIMEOUT", "30"))
    except ValueError:
        return 30.0


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


# ---------------------------------------------------------------------------------------------------------------
# Where a zoo entry's file is, and what state it is in
# ---------------------------------------------------------------------------------------------------------------


def cached_path(model_id: str) -> Path:
    """Where the entry's file is (bundled: assets/weights) or should be (cache: downloaded or placed by hand)."""
    entry = zoo.get(model_id)
    if entry.source.kind == "bundled":
        return zoo.DEMO_DIR / entry.source.filename
    return cache_dir() / entry.source.filename


def weight_status(model_id: str) -> str:
    """"bundled" | "cached" | "downloadable" | "missing" (downloadable: not cached and network allowed)."""
    entry = zoo.get(model_id)
    path = cached_path(model_id)
    if entry.source.kind == "bundled":
        return "bundled" if path.is_file() else "missing"
    if path.is_file():
        return "cached"
    return "missing" if offline() else "downloadable"


def _sha_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_recorded(path: Path) -> str | None:
    try:
        text = _sha_file(path).read_text().strip()
    except OSError:
        return None
    match = re.match(r"^([0-9a-fA-F]{64})\b", text)
    return match.group(1).lower() if match else ""


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _verify(entry: zoo.ZooEntry, path: Path) -> None:
    """Check a cached/bundled file against the known or recorded sha256; record it the first time."""
    expected = (entry.source.sha256 or "").lower() or None
    recorded = None if entry.source.kind == "bundled" else _read_recorded(path)
    actual = _sha256_of(path)
    reference = expected or recorded or None  # "" (an unreadable record) counts as no record
    if reference is None:
        if entry.source.kind != "bundled":
            # Placed by hand: trust it now, notice any later change.
            with contextlib.suppress(OSError):
                _write_atomic(_sha_file(path), f"{actual}  {path.name}\n".encode())
        return
    if actual != reference:
        where = "bundled file" if entry.source.kind == "bundled" else "cached file"
        advice = (f"restore it from the repository (git checkout -- {path})" if entry.source.kind == "bundled"
                  else f"delete {path} and {_sha_file(path)} and download it again "
                       f"(or place a fresh copy from {entry.source.page} there)")
        raise CheckpointError(f"the {where} for {entry.name} is corrupt or was changed: its sha256 is "
                              f"{actual[:16]}..., expected {reference[:16]}...; {advice}")


def _unavailable(entry: zoo.ZooEntry, reason: str) -> WeightsUnavailableError:
    path = cached_path(entry.id)
    return WeightsUnavailableError(
        f"weights for {entry.name} are not cached and cannot be downloaded ({reason}). "
        f"To use them, download the file from {entry.source.page} and save it as {path} "
        f"(or upload it / pass its path as weights=...).")


def fetch(model_id: str, progress: Progress | None = None) -> Path:
    """The entry's checkpoint on local disk: bundled, cached (verified), or downloaded into the cache now."""
    entry = zoo.get(model_id)
    path = cached_path(model_id)
    if entry.source.kind == "bundled":
        if not path.is_file():
            raise WeightsUnavailableError(
                f"the bundled weights for {entry.name} are missing: expected {path} "
                "(recreate them with `python -m pfnet.train_demo`, or restore assets/weights from the repository)")
        _verify(entry, path)
        return path
    if path.is_file():
        _verify(entry, path)
        return path
    if offline():
        raise _unavailable(entry, "offline")
    url = _source_url(entry)
    _download(url, path, entry, progress)
    return path


def _source_url(entry: zoo.ZooEntry) -> str:
    source = entry.source
    if source.kind == "gdrive":
        template = os.environ.get("PFCAM_GDRIVE_URL") or GDRIVE_URL
        if "{id}" not in template:
            raise PfnetError("PFCAM_GDRIVE_URL must contain '{id}' where the Drive file id goes")
        return template.replace("{id}", urllib.parse.quote(source.ref, safe=""))
    if source.kind == "hf":
        parts = source.ref.split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or HF_DEFAULT_FILE
        template = os.environ.get("PFCAM_HF_URL") or HF_URL
        endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        try:
            return template.format(endpoint=endpoint, repo=repo, filename=filename)
        except (KeyError, IndexError, ValueError):
            raise PfnetError("PFCAM_HF_URL may only use {endpoint}, {repo} and {filename}") from None
    raise PfnetError(f"{entry.name} has no download source ({source.kind})")


# ---------------------------------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------------------------------


def _looks_like_html(head: bytes) -> bool:
    text = head.lstrip()[:512].lower()
    return text.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<meta", b"<!--", b"<title"))


def _html_reason(head: bytes) -> str:
    text = head.decode("utf-8", "replace").lower()
    if "quota" in text or "too many users" in text:
        return "Google Drive says the file's download quota is exceeded; try again later or download it by hand"
    if "virus" in text:
        return "Google Drive served its virus-scan warning page instead of the file"
    if "sign in" in text or "accounts.google" in text:
        return "Google Drive asks to sign in: the file is not shared publicly"
    return "the server sent a web page instead of the checkpoint"


class _Tqdm:
    """tqdm for the CLI (off when stderr is not a terminal); a no-op when tqdm is missing."""

    def __init__(self, name: str):
        self.bar = None
        self.name = name

    def __call__(self, done: int, total: int | None) -> None:
        if self.bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a requirement
                self.bar = False
                return
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.name,
                            disable=None, leave=False)
        if self.bar:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _download(url: str, path: Path, entry: zoo.ZooEntry, progress: Progress | None) -> None:
    """Stream ``url`` into a temporary file next to ``path``; rename it into place only when all is well."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PfnetError(f"cannot create the cache directory {path.parent}: {error.strerror or error}") from None
    limit = max_bytes()
    bar = None
    if progress is None:
        bar = progress = _Tqdm(entry.name)
    try:
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as error:
        raise PfnetError(f"cannot write to the cache directory {path.parent}: {error.strerror or error}") from None
    temp = Path(temp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            try:
                response = urllib.request.urlopen(request, timeout=_timeout())
            except urllib.error.HTTPError as error:
                error.close()
                raise _unavailable(entry, f"download failed: HTTP {error.code} {error.reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
                raise _unavailable(entry, f"network error: {_reason(error)}") from None
            with response:
                total = _content_length(response)
                if total is not None and total > limit:
                    raise _unavailable(entry, f"the file is {total} bytes, over the {limit}-byte limit "
                                              "(PFCAM_MAX_BYTES)")
                content_type = (response.headers.get("Content-Type") or "").lower()
                done = 0
                first = True
                progress(0, total)
                while True:
                    try:
                        block = response.read(CHUNK)
                    except http.client.IncompleteRead as error:
                        got = done + len(error.partial or b"")
                        raise _unavailable(entry, f"download interrupted after {got} of {total} bytes") from None
                    except (OSError, http.client.HTTPException) as error:
                        raise _unavailable(entry, f"download interrupted after {done} bytes: "
                                                  f"{_reason(error)}") from None
                    if not block:
                        break
                    if first:
                        first = False
                        if "text/html" in content_type or _looks_like_html(block):
                            raise _unavailable(entry, _html_reason(block))
                    done += len(block)
                    if done > limit:
                        raise _unavailable(entry, f"the file is over the {limit}-byte limit (PFCAM_MAX_BYTES)")
                    out.write(block)
                    digest.update(block)
                    progress(done, total)
            if total is not None and done != total:
                raise _unavailable(entry, f"download interrupted: got {done} of {total} bytes")
            if done == 0:
                raise _unavailable(entry, "the server sent an empty file")
            out.flush()
            os.fsync(out.fileno())
        value = digest.hexdigest()
        expected = (entry.source.sha256 or "").lower()
        if expected and value != expected:
            raise _unavailable(entry, f"the downloaded file's sha256 {value[:16]}... is not the expected "
                                      f"{expected[:16]}...")
        with open(temp, "rb") as check:
            head = check.read(64)
        try:
            _sniff(head, "the downloaded file", done)
        except CheckpointError as error:
            raise _unavailable(entry, str(error)) from None
        _write_atomic(_sha_file(path), f"{value}  {path.name}\n".encode())
        os.replace(temp, path)
    except OSError as error:  # disk full, permissions: the network errors were mapped above
        with contextlib.suppress(OSError):
            temp.unlink()
        raise PfnetError(f"cannot save the download in {path.parent}: {error.strerror or error}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    finally:
        if bar is not None:
            bar.close()


def _content_length(response: Any) -> int | None:
    raw = response.headers.get("Content-Length")
    try:
        value = int(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return "host not found (no network?)"
    text = getattr(reason, "strerror", None) or str(reason)
    return text or type(reason).__name__


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _sniff(head: bytes, what: str = "the file", total: int | None = None) -> str:
    """'safetensors' | 'zip' | 'pickle', else a CheckpointError saying what the file looks like."""
    if not head:
        raise CheckpointError(f"{what} is empty, not a checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if total is None or 0 < header_len <= total - 8:
            return "safetensors"
        raise CheckpointError(f"{what} is a truncated or corrupt safetensors file")
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if _looks_like_html(head):
        raise CheckpointError(f"{what} is a web page (HTML), not a checkpoint; if it came from Google Drive, "
                              "download the file itself rather than the page")
    sample = head[:256]
    if all(byte in b"\t\n\r" or 32 <= byte < 127 for byte in sample) or _is_utf8_text(sample):
        raise CheckpointError(f"{what} is a text file, not a checkpoint (.pth/.pt/.bin/.safetensors)")
    raise CheckpointError(f"{what} is not a PyTorch (.pth/.pt/.bin) or safetensors checkpoint "
                          "(unrecognised format)")


def _is_utf8_text(sample: bytes) -> bool:
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\n\r" for ch in text)


@contextlib.contextmanager
def _allow_namespace():
    """Let weights_only unpickling accept ``argparse.Namespace`` (training checkpoints' ``args``), nothing else."""
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        with serialization.safe_globals([argparse.Namespace]):
            yield
    else:  # torch 2.4: no context manager; Namespace is harmless to allow for the process
        serialization.add_safe_globals([argparse.Namespace])
        yield


def _torch_load(source: Any, what: str) -> Any:
    try:
        with _allow_namespace():
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure is the file's fault, reported plainly
        raise CheckpointError(_torch_load_reason(error, what)) from None


def _torch_load_reason(error: Exception, what: str) -> str:
    text = str(error)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    detail_text = detail.group(1).strip() if detail else text
    unsafe = re.search(r"Unsupported global: GLOBAL\s+([\w.]+)", text)
    if unsafe or "Unsupported global" in text:
        name = f" ({unsafe.group(1)})" if unsafe else ""
        return (f"{what} was refused: its pickle refers to a Python object{name} that is not a tensor or a plain "
                "value, and pfcam never runs code from a checkpoint. Re-save only the state_dict "
                "(torch.save(model.state_dict(), path)) or use .safetensors")
    if "Invalid magic number" in text:
        return f"{what} is a Python pickle but not a PyTorch checkpoint (not written by torch.save)"
    detail_text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", detail_text)
    return f"{what} is a truncated or corrupt checkpoint ({_short(detail_text)})"


def _short(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    line = line.split(". ")[0].rstrip(".")  # the first sentence; torch appends paragraphs of advice
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _load_safetensors(data: bytes | None, path: Path | None, what: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load as load_bytes, load_file
    except ImportError:  # pragma: no cover - safetensors is a requirement
        raise CheckpointError("reading .safetensors needs the 'safetensors' package") from None
    try:
        return dict(load_file(str(path), device="cpu") if path is not None else load_bytes(bytes(data)))
    except Exception as error:  # noqa: BLE001 - SafetensorError and friends
        raise CheckpointError(f"{what} is a truncated or corrupt safetensors file ({_short(str(error))})") from None


def _read_raw(source: Any) -> Any:
    """The file's content as loaded (a dict, perhaps nested), from a path, bytes or a file-like object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        limit = max_bytes()
        if len(data) > limit:
            raise CheckpointError(f"the uploaded file is {len(data)} bytes, over the {limit}-byte limit "
                                  "(PFCAM_MAX_BYTES)")
        kind = _sniff(data[:64], "the uploaded file", len(data))
        if kind == "safetensors":
            return _load_safetensors(data, None, "the uploaded file")
        return _torch_load(io.BytesIO(data), "the uploaded file")
    if hasattr(source, "read") and not isinstance(source, (str, os.PathLike)):
        limit = max_bytes()
        data = source.read(limit + 1)
        if len(data) > limit:
            raise CheckpointError(f"the uploaded file is over the {limit}-byte limit (PFCAM_MAX_BYTES)")
        return _read_raw(data)
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"cannot read a checkpoint from a {type(source).__name__}; "
                              "pass a path, bytes or a state dict")
    path = Path(source).expanduser()
    what = f"{path.name!r}"
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    kind = _sniff(head, what, size)
    if kind == "safetensors":
        return _load_safetensors(None, path, what)
    return _torch_load(str(path), what)


def read_checkpoint(source: Any) -> dict[str, torch.Tensor]:
    """A path, bytes, file-like object or already-loaded dict -> a flat state dict in pfnet's key names."""
    raw = source if isinstance(source, (Mapping, nn.Module)) else _read_raw(source)
    return normalize_state_dict(raw)


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _unwrap(obj: Any, depth: int = 0) -> Mapping:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, nn.Module):  # an in-memory model handed over directly
        return obj.state_dict()
    if isinstance(obj, Mapping) and depth < _MAX_NESTING:
        for key in CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if isinstance(inner, Mapping) and inner:
                return _unwrap(inner, depth + 1)
    if isinstance(obj, Mapping):
        odd = [(k, v) for k, v in obj.items() if isinstance(k, str) and k.endswith((".weight", ".bias"))
               and not isinstance(v, torch.Tensor)]
        if odd:
            raise CheckpointError(f"the checkpoint's state dict holds non-tensor values "
                                  f"(e.g. {odd[0][0]} is a {type(odd[0][1]).__name__})")
        keys = ", ".join(map(str, list(obj)[:8])) or "nothing"
        raise CheckpointError(f"no weights found in the checkpoint: it holds {keys} but no state dict "
                              f"(looked for {', '.join(CONTAINER_KEYS)})")
    raise CheckpointError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")


_TV_BLOCK = re.compile(r"^(layer\d+\.\d+\.)(conv|bn)([123])\.(.+)$")
_TV_BLOCK_NAMES = {"1": "reduction_block", "2": "conv_block", "3": "expansion_block"}


def _convert_resnet_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision/timm ResNet names (conv1, bn1, layerX.Y.convN/bnN) -> pfnet's (conv1.0/1, *_block.0/1)."""
    if "conv1.0.weight" in state or not ("conv1.weight" in state or any(_TV_BLOCK.match(k) for k in state)):
        return state
    converted = {}
    for key, value in state.items():
        if key.startswith("conv1."):
            key = "conv1.0." + key[len("conv1."):]
        elif key.startswith("bn1."):
            key = "conv1.1." + key[len("bn1."):]
        else:
            match = _TV_BLOCK.match(key)
            if match:
                prefix, kind, index, rest = match.groups()
                key = f"{prefix}{_TV_BLOCK_NAMES[index]}.{0 if kind == 'conv' else 1}.{rest}"
        converted[key] = value
    return converted


def normalize_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Unwrap containers, strip ``module.`` prefixes, convert torchvision/timm ResNet names."""
    state = dict(_unwrap(obj))
    if any(k.startswith("module.") for k in state):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("_orig_mod.") for k in state):  # torch.compile wrappers
        state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in state.items()}
    return _convert_resnet_names(state)


# ---------------------------------------------------------------------------------------------------------------
# Which architecture a checkpoint fits
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """A zoo architecture a checkpoint fits: timm name, head size, width, and the zoo entries built that way."""

    arch: str
    num_classes: int
    width_mult: float | None
    model_ids: tuple[str, ...]
    name: str

    def __str__(self) -> str:
        return f"{self.name} ({self.num_classes} classes)"


@dataclass(frozen=True)
class _Layout:
    shapes: dict[str, tuple[int, ...]]
    head: frozenset[str]  # keys whose first dimension is the number of classes


def _kwargs_key(kwargs: Mapping[str, Any]) -> tuple:
    return tuple(sorted(kwargs.items()))


@lru_cache(maxsize=64)
def _layout(arch: str, kwargs_key: tuple) -> _Layout | None:
    """Key -> shape of ``arch`` built on the meta device (no memory, no init cost); None if it cannot be built."""
    import timm

    import pfnet  # noqa: F401  (registers the architectures)

    kwargs = dict(kwargs_key)
    if not timm.is_model(arch):
        return None
    try:
        with torch.device("meta"):
            a = timm.create_model(arch, num_classes=7, **kwargs).state_dict()
            b = timm.create_model(arch, num_classes=11, **kwargs).state_dict()
    except Exception:  # noqa: BLE001 - an architecture still being written should not break loading
        return None
    shapes = {k: tuple(v.shape) for k, v in a.items()}
    head = frozenset(k for k, v in b.items() if k in shapes and tuple(v.shape) != shapes[k])
    return _Layout(shapes, head)


def _arch_kwargs(entry: zoo.ZooEntry) -> dict[str, Any]:
    return dict(entry.arch_kwargs)


def _candidates(state: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    def add(arch: str, kwargs: dict[str, Any]) -> None:
        if (arch, kwargs) not in seen:
            seen.append((arch, kwargs))

    for entry in zoo.ZOO.values():
        add(entry.arch, _arch_kwargs(entry))
    # ResNets of any width: the first bottleneck's reduction conv says the width multiplier.
    probe = state.get("layer1.0.reduction_block.0.weight")
    if probe is not None and probe.ndim == 4:
        width = probe.shape[0] / 64
        for entry in list(zoo.ZOO.values()):
            if entry.family == "resnet":
                add(entry.arch, {**_arch_kwargs(entry), "width_mult": width})
    return seen


def _compare(state: Mapping[str, torch.Tensor], layout: _Layout, num_classes: int | None = None):
    """(missing, unexpected, mis-shaped, num_classes found) of ``state`` against ``layout``."""
    optional = {k for k in layout.shapes if k.endswith("num_batches_tracked")}
    missing = [k for k in layout.shapes if k not in state and k not in optional]
    unexpected = [k for k in state if k not in layout.shapes]
    misshaped = []
    classes: set[int] = set()
    for key, want in layout.shapes.items():
        if key not in state:
            continue
        got = tuple(state[key].shape)
        if key in layout.head:
            if len(got) == len(want) and got[1:] == want[1:] and len(got) > 0:
                classes.add(got[0])
                if num_classes is not None and got[0] != num_classes:
                    misshaped.append((key, got, (num_classes, *want[1:])))
                continue
            misshaped.append((key, got, (num_classes if num_classes is not None else "C", *want[1:])))
        elif got != want:
            misshaped.append((key, got, want))
    found = classes.pop() if len(classes) == 1 else None
    return missing, unexpected, misshaped, found


def _fit_name(arch: str, kwargs: dict[str, Any], num_classes: int) -> tuple[tuple[str, ...], str]:
    same_build = [e for e in zoo.ZOO.values() if e.arch == arch and _arch_kwargs(e) == kwargs]
    exact = [e for e in same_build if _classes_of(e) == num_classes]
    ids = tuple(e.id for e in exact)
    if exact:
        return ids, exact[0].name
    width = kwargs.get("width_mult")
    base = next((e.name for e in zoo.ZOO.values() if e.arch == arch and not _arch_kwargs(e)), None) or arch
    if width is not None and width != 1.0 and not same_build:
        base = f"{base} (width x{width:g})"
    elif same_build:
        base = same_build[0].name
    return ids, f"{base} with {num_classes} classes"


def _classes_of(entry: zoo.ZooEntry) -> int | None:
    try:
        return entry.num_classes
    except Exception:  # noqa: BLE001 - a class list that cannot be read just matches nothing
        return None


def detect_architecture(state_dict: Mapping[str, Any]) -> Fit | None:
    """Which zoo architecture (+ head size + width) a state dict fits exactly, from its keys and shapes."""
    try:
        state = normalize_state_dict(state_dict)
    except CheckpointError:
        return None
    for arch, kwargs in _candidates(state):
        layout = _layout(arch, _kwargs_key(kwargs))
        if layout is None:
            continue
        missing, unexpected, misshaped, classes = _compare(state, layout)
        if missing or unexpected or misshaped or (layout.head and classes is None):
            continue
        ids, name = _fit_name(arch, kwargs, classes or 0)
        return Fit(arch, classes or 0, _width(arch, kwargs), ids, name)
    return None


def _width(arch: str, kwargs: Mapping[str, Any]) -> float | None:
    """The width multiplier of a build (1.0 for a ResNet without one; None where the family has none)."""
    family = next((e.family for e in zoo.ZOO.values() if e.arch == arch), None)
    return float(kwargs.get("width_mult", 1.0)) if family == "resnet" else kwargs.get("width_mult")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _listing(label: str, items: list, limit: int = 5) -> str:
    shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
    return f"{label} ({len(items)}): {shown}"


def _shape(shape: tuple) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _mismatch_error(entry: zoo.ZooEntry, state: Mapping[str, torch.Tensor], missing, unexpected,
                    misshaped, found_classes: int | None) -> CheckpointError:
    fit = detect_architecture(state)
    parts: list[str] = []
    entry_width = _width(entry.arch, _arch_kwargs(entry))
    if fit is not None and fit.arch == entry.arch and fit.width_mult == entry_width \
            and fit.num_classes != entry.num_classes:
        what = "ImageNet-1k classes" if entry.classes == "imagenet" else f"{entry.classes} classes"
        others = [zoo.ZOO[i].name for i in fit.model_ids if i in zoo.ZOO]
        hint = f" (the zoo's {', '.join(others)} has that head)" if others else ""
        parts.append(f"this checkpoint has a {fit.num_classes}-class head{hint}, but {entry.name} predicts "
                     f"{entry.num_classes} {what}; pick a checkpoint trained on those classes")
    elif fit is not None:
        parts.append(f"this checkpoint fits {fit.name}, not {entry.name}")
    else:
        parts.append(f"this checkpoint does not fit {entry.name} (nor any other model in the zoo)")
    details = []
    if missing:
        details.append(_listing("missing keys", list(missing)))
    if unexpected:
        details.append(_listing("unexpected keys", list(unexpected)))
    if misshaped:
        details.append(_listing("mis-shaped keys", [f"{k} {_shape(got)} vs {_shape(want)} in the model"
                                                    for k, got, want in misshaped], limit=3))
    return CheckpointError("; ".join(parts) + (". " + "; ".join(details) if details else ""))


def _prepare_for(entry: zoo.ZooEntry, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check ``state`` against the entry's layout (one clear error), fill BN counters, match dtypes."""
    layout = _layout(entry.arch, _kwargs_key(_arch_kwargs(entry)))
    if layout is None:
        raise PfnetError(f"{entry.name}'s architecture {entry.arch!r} is not available in this installation")
    missing, unexpected, misshaped, classes = _compare(state, layout, entry.num_classes)
    if missing or unexpected or misshaped:
        raise _mismatch_error(entry, state, missing, unexpected, misshaped, classes)
    out = dict(state)
    for key, shape in layout.shapes.items():
        if key not in out and key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=torch.long)  # torchvision's v1 checkpoints predate the counter
    return out


def _matching_dtypes(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    reference = model.state_dict()
    out = {}
    for key, value in state.items():
        target = reference[key]
        if value.is_floating_point() and target.is_floating_point() and value.dtype != target.dtype:
            value = value.to(target.dtype)  # fp16/bf16 checkpoints: upcast to the model's dtype
        out[key] = value
    return out


def load(model_id: str, weights: WeightsArg = None, device: str | torch.device | None = None) -> nn.Module:
    """A zoo model with its weights, in eval mode on ``device``.

    ``weights``: None (the zoo's source: bundled file, cache, or a download), a path, bytes (an upload), or an
    already-read state dict / checkpoint dict.
    """
    entry = zoo.get(model_id)
    target = select_device(device)
    if weights is None:
        state = read_checkpoint(fetch(model_id))
    else:
        state = read_checkpoint(weights)
    state = _prepare_for(entry, state)
    model = entry.build()
    state = _matching_dtypes(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # pragma: no cover - _prepare_for checks keys and shapes first
        raise CheckpointError(f"the checkpoint does not fit {entry.name}: {_short(str(error), 400)}") from None
    return model.to(target).eval()


def describe(model_id: str) -> dict[str, Any]:
    """Status, path and page of an entry's weights (for the app's model picker and the CLI)."""
    entry = zoo.get(model_id)
    return {"id": entry.id, "name": entry.name, "status": weight_status(model_id), "path": str(cached_path(model_id)),
            "page": entry.source.page, "kind": entry.source.kind}


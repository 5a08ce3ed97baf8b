"""Reading a checkpoint without running code (path, bytes, upload; torch weights_only or safetensors) and
normalising it to a flat state dict in pfnet's key names (containers unwrapped, ``module.`` stripped, ResNet names).

Nothing is inflated or allocated before its size is known to fit :func:`max_bytes`: a path's file size, the
uncompressed size of every member of torch's zip, the storage sizes the pickle declares (read by walking its
opcodes, never by unpickling) and the tensor sizes a safetensors header declares are all checked first."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from pfnet import effnet
from pfnet.checkpoint_sizes import pickle_storages, safetensors_tensor_bytes, safetensors_tensor_count
from pfnet.errors import CheckpointError, PfnetError


DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: larger than any checkpoint in the zoo, optimizer state included
# Container keys that hold the weights, in order of preference (timm train.py, DeiT main.py, DDP wrappers).
CONTAINER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
_MAX_NESTING = 4
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers itself
_LEGACY_PICKLES = 4  # torch's pre-zip format: magic number, protocol, system info, then the state (then raw data)


def max_bytes() -> int:
    """The hard cap on checkpoints (env ``PFCAM_MAX_BYTES``, default 1 GiB): on a path's file size, an upload's
    or download's bytes, and on what a file would decompress or allocate to."""
    return _positive_setting("PFCAM_MAX_BYTES", "bytes", DEFAULT_MAX_BYTES)


def _positive_setting(name: str, unit: str, default: int) -> int:
    """The environment variable ``name`` as a positive whole number, ``default`` when it is unset, empty or not
    positive; :class:`PfnetError` naming it when it is not a number."""
    raw = os.environ.get(name, "").strip()
    if raw:
        try:
            value = int(float(raw))
        except ValueError:
            raise PfnetError(f"{name} must be a number of {unit}, not {raw!r}") from None
        if value > 0:
            return value
    return default


DEFAULT_MAX_TENSORS = 100_000  # the zoo's checkpoints hold 150-700 tensors, optimizer state included a few thousand
TENSOR_OVERHEAD = 2048  # bytes a parsed tensor holds besides its data (its object, storage, name): measured ~1.8 KB


def max_tensors() -> int:
    """The cap on the number of tensors a checkpoint may hold (env ``PFCAM_MAX_TENSORS``, default 100,000): a
    file of a million one-byte tensors would pin ~1.8 GB once parsed, though its data is 1 MB."""
    return _positive_setting("PFCAM_MAX_TENSORS", "tensors", DEFAULT_MAX_TENSORS)


def check_tensors(nbytes: int, count: int, what: str) -> None:
    """Refuse a file declaring more than :func:`max_tensors` tensors, or whose parsed form (data plus
    ``TENSOR_OVERHEAD`` per tensor) would be over :func:`max_bytes`, before it is parsed."""
    limit = max_tensors()
    if count > limit:
        raise CheckpointError(f"{what} holds more than {limit:,} tensors (over the limit, PFCAM_MAX_TENSORS); "
                              "refused before reading it whole")
    check_size(nbytes, f"{what} declares tensors of")
    check_size(nbytes + count * TENSOR_OVERHEAD, f"{what} declares {count:,} tensors that, parsed, would hold")


def check_size(nbytes: int, subject: str) -> None:
    """Refuse ``nbytes`` over :func:`max_bytes` with a CheckpointError that reads "<subject> N bytes, over ..."
    (``subject`` e.g. "'x.pth' is" or "the download is"); for the download code as much as for reading."""
    limit = max_bytes()
    if nbytes > limit:
        raise CheckpointError(f"{subject} {nbytes:,} bytes, over the {limit:,}-byte limit (PFCAM_MAX_BYTES); "
                              "refused before reading it")


def sniff(head: bytes, what: str = "the file", total: int | None = None) -> str:
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
    if looks_like_html(head):
        raise CheckpointError(f"{what} is a web page (HTML), not a checkpoint; if it came from Google Drive, "
                              "download the file itself rather than the page")
    sample = head[:256]
    if all(byte in b"\t\n\r" or 32 <= byte < 127 for byte in sample) or _is_utf8_text(sample):
        raise CheckpointError(f"{what} is a text file, not a checkpoint (.pth/.pt/.bin/.safetensors)")
    raise CheckpointError(f"{what} is not a PyTorch (.pth/.pt/.bin) or safetensors checkpoint "
                          "(unrecognised format)")


def looks_like_html(head: bytes) -> bool:
    text = head.lstrip()[:512].lower()
    return text.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<meta", b"<!--", b"<title"))


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
    # torch names the refused callable as "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL posix.system".
    unsafe = re.search(r"GLOBAL\s+([\w.]+)", text)
    if unsafe or "Unsupported global" in text:
        name = f" (GLOBAL {unsafe.group(1)})" if unsafe else ""
        return (f"{what} was refused: the file tries to run code{name}, and pfcam never runs code from a "
                "checkpoint. If it is your own, re-save only the state_dict (torch.save(model.state_dict(), "
                "path)) or use .safetensors")
    if "Invalid magic number" in text:
        return f"{what} is a Python pickle but not a PyTorch checkpoint (not written by torch.save)"
    detail_text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", detail_text)
    return f"{what} is a truncated or corrupt checkpoint ({shorten(detail_text)})"


def shorten(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    line = line.split(". ")[0].rstrip(".")  # the first sentence; torch appends paragraphs of advice
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _check_zip(source: str | IO[bytes], what: str) -> None:
    """Torch's zip: every member's uncompressed size (as torch's own reader sees the archive) and the storages
    its pickle declares must fit the cap, before anything is inflated."""
    try:
        reader = torch._C.PyTorchFileReader(source)
        records = reader.get_all_records()
        if hasattr(reader, "get_record_size"):
            total = sum(reader.get_record_size(name) for name in records)
        else:  # torch before 2.6: the central directory as Python's zipfile reads it
            with zipfile.ZipFile(source) as archive:
                total = sum(info.file_size for info in archive.infolist())
    except Exception as error:  # noqa: BLE001 - torch.load would fail at the same place: say so now
        raise CheckpointError(_torch_load_reason(error, what)) from None
    check_size(total, f"{what} would decompress to")
    if "data.pkl" in records:
        nbytes, count = pickle_storages(io.BytesIO(reader.get_record("data.pkl")), max_tensors=max_tensors())
        check_tensors(nbytes, count, what)


def _check_pickle(stream: IO[bytes], what: str) -> None:
    """Torch's older pickle format: the storages its pickles declare (torch allocates them as it meets them)."""
    nbytes, count = pickle_storages(stream, pickles=_LEGACY_PICKLES, max_tensors=max_tensors())
    check_tensors(nbytes, count, what)


def _check_safetensors(read: Any, head: bytes, what: str) -> None:
    """The tensor sizes a safetensors header declares (``read(n)``: the file's first n bytes)."""
    (length,) = struct.unpack("<Q", head[:8])
    header = read(8 + min(length, _SAFETENSORS_MAX_HEADER))
    count = safetensors_tensor_count(header)
    if count > max_tensors():  # counted in the raw header: a million entries are never parsed as JSON
        check_tensors(0, count, what)
    check_tensors(safetensors_tensor_bytes(header), count, what)


def _load_safetensors(data: bytes | None, path: Path | None, what: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load as load_bytes, load_file
    except ImportError:  # pragma: no cover - safetensors is a requirement
        raise CheckpointError("reading .safetensors needs the 'safetensors' package") from None
    try:
        return dict(load_file(str(path), device="cpu") if path is not None else load_bytes(bytes(data)))
    except Exception as error:  # noqa: BLE001 - SafetensorError and friends
        raise CheckpointError(f"{what} is a truncated or corrupt safetensors file ({shorten(str(error))})") from None


def _read_raw(source: Any) -> Any:
    """The file's content as loaded (a dict, perhaps nested), from a path, bytes or a file-like object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        what = "the uploaded file"
        check_size(len(data), f"{what} is")
        kind = sniff(data[:64], what, len(data))
        if kind == "safetensors":
            _check_safetensors(lambda n: data[:n], data, what)
            return _load_safetensors(data, None, what)
        if kind == "zip":
            _check_zip(io.BytesIO(data), what)
        else:
            _check_pickle(io.BytesIO(data), what)
        return _torch_load(io.BytesIO(data), what)
    if hasattr(source, "read") and not isinstance(source, (str, os.PathLike)):
        limit = max_bytes()
        data = source.read(limit + 1)
        if len(data) > limit:
            raise CheckpointError(f"the uploaded file is over the {limit:,}-byte limit (PFCAM_MAX_BYTES)")
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
        check_size(size, f"{what} is")
        with open(path, "rb") as handle:
            head = handle.read(64)
            kind = sniff(head, what, size)
            if kind == "safetensors":
                handle.seek(0)
                _check_safetensors(handle.read, head, what)
            elif kind == "pickle":
                handle.seek(0)
                _check_pickle(handle, what)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if kind == "safetensors":
        return _load_safetensors(None, path, what)
    if kind == "zip":
        _check_zip(str(path), what)
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
    """Unwrap containers, strip ``module.`` prefixes, convert torchvision/timm ResNet names and EfficientNet-PyTorch
    names (:mod:`pfnet.effnet`)."""
    state = dict(_unwrap(obj))
    if any(k.startswith("module.") for k in state):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("_orig_mod.") for k in state):  # torch.compile wrappers
        state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in state.items()}
    return effnet.to_timm(_convert_resnet_names(state))

"""Hostile inputs for the hardening tests and benchmarks/bench_hostile.py, built small and fast: a zip bomb
checkpoint (gigabytes of zeros deflated to megabytes), torch-style pickles that declare any storage size, sparse
oversized files, code-running pickle payloads, a large float TIFF that compresses well; and
:func:`measure_load`, which loads one file in a fresh process and reports its peak RSS growth and time."""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ZERO_CHUNK = 1 << 20

# The measuring process: import pfnet and cams, reset the peak RSS (Linux: /proc/self/clear_refs), load once,
# report the peak's growth over the RSS before the load, and the seconds the load took.
_MEASURE = r"""
import json, re, resource, sys, time
root, kind, path, model_id = sys.argv[1:5]
sys.path.insert(0, root)
import psutil
import cams.images, pfnet

def peak():
    try:
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

try:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak restarts from the current RSS: imports do not count
except OSError:
    pass
rss = max(psutil.Process().memory_info().rss, peak())
start = time.perf_counter()
try:
    if kind == "image":
        image = cams.images.load_image(path)
        outcome = f"loaded {image.size[0]}x{image.size[1]} {image.mode}, pixel {image.getpixel((0, 0))}"
    else:
        model = pfnet.load(model_id, weights=path)
        outcome = f"loaded ({sum(p.numel() for p in model.parameters())} parameters)"
except Exception as error:
    outcome = f"{type(error).__name__}: {error}"
seconds = time.perf_counter() - start
print(json.dumps({"outcome": outcome, "seconds": seconds, "peak_growth_mb": max(0, peak() - rss) / 2**20}))
"""


def measure_load(kind: str, path: Path | str, env: dict[str, str] | None = None, root: Path | str = ROOT,
                 model_id: str = "demo_r50") -> dict:
    """Load ``path`` once in a fresh process (``kind`` "image": cams.images.load_image; "checkpoint":
    pfnet.load(model_id, weights=path)) with the code in ``root``: {"outcome", "seconds", "peak_growth_mb"}."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(root), kind, str(path), model_id],
                            capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    lines = result.stdout.strip().splitlines()
    if result.returncode or not lines:
        raise RuntimeError(f"the measuring process failed (exit {result.returncode}): {result.stderr[-500:]}")
    return json.loads(lines[-1])


class StorageRef:
    """Pickled by :class:`TorchPickler` as torch's persistent storage record (``'storage', type, key, ...``)."""

    def __init__(self, storage_type: type, key: str, numel: int):
        self.storage_type, self.key, self.numel = storage_type, key, numel


class TensorRef:
    """Pickled as torch pickles a tensor: ``_rebuild_tensor_v2(storage, offset, shape, stride, ...)``."""

    def __init__(self, storage: StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, step = [], 1
        for size in reversed(self.shape):
            stride.insert(0, step)
            step *= size
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(state: dict) -> bytes:
    buffer = io.BytesIO()
    TorchPickler(buffer, protocol=2).dump(state)
    return buffer.getvalue()


def declared_state(numel: int, key: str = "fc.weight") -> dict:
    """A state dict of one float32 tensor of ``numel`` elements in storage "0" (not allocated: only described)."""
    return {key: TensorRef(StorageRef(torch.FloatStorage, "0", numel), (numel,))}


def zeros_deflated(nbytes: int) -> bytes:
    """A raw deflate stream of ``nbytes`` zeros (a multiple of 1 MiB), made at once: after a full flush, every
    1 MiB block of zeros compresses to the same bytes, so one block is repeated."""
    assert nbytes % ZERO_CHUNK == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(ZERO_CHUNK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (nbytes // ZERO_CHUNK) + compressor.flush()


def write_zip(path: Path, members: list[tuple[str, bytes | int, int, int, int]]) -> None:
    """A plain zip of ``(name, data, method, crc, uncompressed size)`` members, data already compressed; an int
    as data is that many zero bytes left as a hole in the file (sparse: no disk blocks, no writing)."""
    central, offset = [], 0
    with open(path, "wb") as out:
        for name, data, method, crc, size in members:
            encoded, length = name.encode(), data if isinstance(data, int) else len(data)
            out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, length, size,
                                  len(encoded), 0) + encoded)
            if isinstance(data, int):
                out.seek(length, os.SEEK_CUR)
            else:
                out.write(data)
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc,
                                       length, size, len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
            offset += 30 + len(encoded) + length
        directory = b"".join(central)
        out.write(directory)
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), len(directory), offset, 0))


def stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return (name, data, 0, zlib.crc32(data), len(data))


def torch_zip(path: Path, data_pkl: bytes, storages: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A checkpoint in torch's zip layout (``archive/data.pkl``, ``archive/data/<key>``, version, byteorder)."""
    members = [stored("archive/data.pkl", data_pkl), stored("archive/byteorder", b"little"),
               *storages, stored("archive/version", b"3\n")]
    write_zip(path, members)
    return path


def zeros_crc(nbytes: int) -> int:
    chunk, crc = bytes(ZERO_CHUNK), 0
    for _ in range(nbytes // ZERO_CHUNK):
        crc = zlib.crc32(chunk, crc)
    return crc


def zip_bomb_checkpoint(path: Path, nbytes: int = 2 << 30) -> Path:
    """A valid torch checkpoint of one float32 tensor of ``nbytes`` zeros, deflated to about nbytes / 1000."""
    return torch_zip(path, torch_pickle(declared_state(nbytes // 4)),
                     [("archive/data/0", zeros_deflated(nbytes), 8, zeros_crc(nbytes), nbytes)])


def sparse_checkpoint(path: Path, nbytes: int = 3 << 29) -> Path:
    """A valid torch checkpoint of one float32 tensor of ``nbytes`` zeros, stored (not deflated) as a hole:
    the file's size is ``nbytes`` and more, but it takes no disk space and no time to make."""
    return torch_zip(path, torch_pickle(declared_state(nbytes // 4)),
                     [("archive/data/0", nbytes, 0, zeros_crc(nbytes), nbytes)])


def sparse_safetensors(path: Path, nbytes: int = 3 << 29) -> Path:
    """A well-formed safetensors file of one float32 tensor of ``nbytes`` zeros, sparse on disk (no blocks)."""
    header = json.dumps({"fc.weight": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}})
    header = header.encode() + b" " * (-len(header) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + nbytes)
    return path


class ShellPayload:
    """Unpickling runs ``os.system`` (pickled as ``posix.system``): it creates ``marker`` if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def float_tiff(path: Path, side: int = 8000, value: float = 0.5) -> Path:
    """A ``side`` x ``side`` constant 32-bit float TIFF, deflated (8000 px: about 370 KB for 256 MB of pixels)."""
    from PIL import Image

    Image.new("F", (side, side), value).save(path, "TIFF", compression="tiff_adobe_deflate")
    return path


def _small(fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, fmt)
    return buffer.getvalue()


def _patch(data: bytes, offset: int, packed: bytes) -> bytes:
    return data[:offset] + packed + data[offset + len(packed):]


def _png_bomb(side: int) -> bytes:
    data = _small("PNG")  # IHDR: length, type, then width and height big-endian at 16; its CRC at 29
    data = _patch(data, 16, struct.pack(">II", side, side))
    return _patch(data, 29, struct.pack(">I", zlib.crc32(data[12:29])))


def _jpeg_bomb(side: int) -> bytes:
    data = _small("JPEG")
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    return _patch(data, sof + 5, struct.pack(">HH", side, side))


def _tiff_bomb(side: int) -> bytes:
    data = _small("TIFF")
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength
            data = _patch(data, entry + 8, struct.pack("<H" if kind == 3 else "<I", side))
    return data


def _webp_bomb(side: int) -> bytes:
    data = _small("WEBP")
    start = data.index(b"\x9d\x01\x2a")  # VP8 key frame start code, then 14-bit width and height
    return _patch(data, start + 3, struct.pack("<HH", side & 0x3FFF, side & 0x3FFF))


def _gif_descriptor(data: bytes) -> int:
    """Offset of the first image descriptor (0x2C) of a GIF: past the global colour table and extensions."""
    flags, position = data[10], 13
    if flags & 0x80:
        position += 3 << ((flags & 7) + 1)
    while data[position] == 0x21:  # extension: introducer, label, then sub-blocks up to an empty one
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    assert data[position] == 0x2C
    return position


def header_bomb(fmt: str, side: int = 65535) -> bytes:
    """A small ``fmt`` file whose header claims ``side`` x ``side`` pixels (WebP: at most 16383)."""
    if fmt == "PNG":
        return _png_bomb(side)
    if fmt == "JPEG":
        return _jpeg_bomb(side)
    if fmt == "TIFF":
        return _tiff_bomb(side)
    if fmt == "WEBP":
        return _webp_bomb(min(side, 16383))
    data = _small(fmt)
    if fmt == "GIF":  # the logical screen stays small; the first frame's descriptor claims the size
        return _patch(data, _gif_descriptor(data) + 5, struct.pack("<HH", side, side))
    if fmt == "BMP":  # BITMAPINFOHEADER width and height
        return _patch(data, 18, struct.pack("<ii", side, side))
    raise ValueError(fmt)


def gif_header_bomb(path: Path) -> Path:
    path.write_bytes(header_bomb("GIF"))
    return path

"""Drawing and encoding one export result: the overlay in the chosen format, the raw heatmap, the grid thumbnail.

Public so that any executor (the local one, a Ray one) writes the same files: :func:`render_result` is the whole
per-result job. Encoding is the export's main cost, so PNGs are written here (:func:`png_bytes`): every row
"up"-filtered in one numpy subtraction and deflated by ISA-L (the ``isal`` package; the standard ``zlib`` where it
is missing) in ~3 ms per 640x480 overlay, against ~40 ms for libpng's adaptive filters at zlib level 1 (files
~10 % larger). The pixels are the same; any PNG reader decodes them. JPEG and WebP (OpenCV) are lossy and cheap.
"""
from __future__ import annotations

import struct
from pathlib import Path
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from cams.export.files import write_bytes, write_npy
from cams.render import overlay_pixels, shrink

try:  # ISA-L: 4-6x zlib's speed at its fast levels, the same zlib stream format
    from isal.isal_zlib import compress as _deflate, crc32 as _crc32
    DEFLATE_LEVEL = 2
except ImportError:  # pragma: no cover - isal is a requirement; this keeps a bare environment working
    from zlib import compress as _deflate, crc32 as _crc32
    DEFLATE_LEVEL = 1

#: overlay format -> (file suffix, OpenCV parameters; None: :func:`png_bytes`)
FORMATS: dict[str, tuple[str, list[int] | None]] = {
    "png": (".png", None),
    "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
    "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]),
}
DEFAULT_FORMAT = "png"
OVERLAY = "overlay"
HEATMAP = "heatmap"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_UP = 2  # PNG row filter: each byte minus the byte above it (the first row: minus zero)


def overlay_suffix(fmt: str) -> str:
    return FORMATS[fmt][0]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", _crc32(data, _crc32(kind)))


def png_bytes(pixels: np.ndarray) -> bytes:
    """An HxWx3 uint8 RGB array as the bytes of an 8-bit RGB PNG file (lossless)."""
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps: PNG's modulo 256
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return b"".join((PNG_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", _deflate(filtered, DEFLATE_LEVEL)), _chunk(b"IEND", b"")))


def rgb_pixels(picture: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image's HxWx3 uint8 array (an array is checked and passed through)."""
    if isinstance(picture, np.ndarray):
        if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
            raise ValueError(f"pixels must be an HxWx3 uint8 RGB array, got {picture.dtype} {picture.shape}")
        return picture
    return np.asarray(picture if picture.mode == "RGB" else picture.convert("RGB"))


def encode_image(picture: Image.Image | np.ndarray, fmt: str = DEFAULT_FORMAT) -> bytes:
    """``picture`` (an RGB image, or its HxWx3 uint8 array) as the bytes of a ``fmt`` file."""
    extension, params = FORMATS[fmt]
    pixels = rgb_pixels(picture)
    if params is None:
        return png_bytes(pixels)
    ok, data = cv2.imencode(extension, cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {fmt} image")
    return data.tobytes()


def write_picture(path: Path, picture: Image.Image | np.ndarray, fmt: str = DEFAULT_FORMAT) -> None:
    """Write ``picture`` (an RGB image or array) to ``path`` as ``fmt`` (atomically)."""
    write_bytes(path, encode_image(picture, fmt))


def render_result(image: Image.Image, heat: np.ndarray, box: Sequence[float] | None, colormap: str, opacity: float,
                  files: Sequence[tuple[Path, str]], fmt: str = DEFAULT_FORMAT, cell_size: int | None = None, *,
                  pixels: np.ndarray | None = None, small: np.ndarray | None = None) -> Image.Image | None:
    """One result's job: write each of ``files`` ((path, OVERLAY | HEATMAP)); return the grid thumbnail of the
    overlay (None when ``cell_size`` is None, i.e. no grid is drawn). The overlay is drawn only if needed.

    The thumbnail is the overlay drawn on the image shrunk to the grid cell (:func:`cams.render.shrink`), not the
    full-size overlay shrunk: the same picture within rounding, without resampling a photo-sized overlay.
    ``pixels`` (``image`` as an HxWx3 uint8 array) and ``small`` (``shrink(pixels, cell_size)``) may be passed by
    callers that draw several results of one image, to make them once.
    """
    if pixels is None and (cell_size is not None or any(kind == OVERLAY for _, kind in files)):
        pixels = rgb_pixels(image)
    for path, kind in files:
        if kind == OVERLAY:
            write_picture(path, overlay_pixels(pixels, heat, box, colormap, opacity), fmt)
        else:
            write_npy(path, heat)
    if cell_size is None:
        return None
    if small is None:
        small = shrink(pixels, cell_size)
    scale_x, scale_y = small.shape[1] / pixels.shape[1], small.shape[0] / pixels.shape[0]
    left, top, right, bottom = box if box is not None else (0, 0, pixels.shape[1], pixels.shape[0])
    small_box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    return Image.fromarray(overlay_pixels(small, heat, small_box, colormap, opacity), "RGB")


def write_grid_sheet(path: Path, sheet: Image.Image) -> None:
    """Grids are always PNG (labels and thin lines: a lossy format would smear them)."""
    write_picture(path, sheet, "png")

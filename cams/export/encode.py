"""Drawing and encoding one export result: the overlay in the chosen format, the raw heatmap, the grid thumbnail.

Public so that any executor (the local one, a Ray one) writes the same files: :func:`render_result` is the whole
per-result job. Encoding is the export's main cost (PERF_NOTES: ~18 ms per 640x480 PNG with Pillow level 1), so
PNGs go through OpenCV (zlib level 1 + the RLE strategy: the same pixels, smaller files and faster on photo
overlays than Pillow's level 1); JPEG and WebP are lossy and much cheaper, for when exact pixels do not matter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from cams.export.files import write_bytes, write_npy
from cams.render import overlay, thumbnail

#: overlay format -> (file suffix, OpenCV extension, OpenCV parameters)
FORMATS: dict[str, tuple[str, str, list[int]]] = {
    "png": (".png", ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]),
    "jpeg": (".jpg", ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
    "webp": (".webp", ".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]),
}
DEFAULT_FORMAT = "png"
OVERLAY = "overlay"
HEATMAP = "heatmap"


def overlay_suffix(fmt: str) -> str:
    return FORMATS[fmt][0]


def encode_image(picture: Image.Image, fmt: str = DEFAULT_FORMAT) -> bytes:
    """``picture`` (RGB) as the bytes of a ``fmt`` file."""
    _, extension, params = FORMATS[fmt]
    pixels = np.asarray(picture.convert("RGB") if picture.mode != "RGB" else picture)
    ok, data = cv2.imencode(extension, cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {fmt} image")
    return data.tobytes()


def write_picture(path: Path, picture: Image.Image, fmt: str = DEFAULT_FORMAT) -> None:
    """Write ``picture`` to ``path`` as ``fmt`` (atomically)."""
    write_bytes(path, encode_image(picture, fmt))


def render_result(image: Image.Image, heat: np.ndarray, box: Sequence[float] | None, colormap: str, opacity: float,
                  files: Sequence[tuple[Path, str]], fmt: str = DEFAULT_FORMAT,
                  cell_size: int | None = None) -> Image.Image | None:
    """One result's job: write each of ``files`` ((path, OVERLAY | HEATMAP)); return the grid thumbnail of the
    overlay (None when ``cell_size`` is None, i.e. no grid is drawn). The overlay is drawn only if needed."""
    picture = None
    if cell_size is not None or any(kind == OVERLAY for _, kind in files):
        picture = overlay(image, heat, box, colormap, opacity)
    for path, kind in files:
        if kind == OVERLAY:
            write_picture(path, picture, fmt)
        else:
            write_npy(path, heat)
    return None if cell_size is None else thumbnail(picture, cell_size)


def write_grid_sheet(path: Path, sheet: Image.Image) -> None:
    """Grids are always PNG (labels and thin lines: a lossy format would smear them)."""
    write_picture(path, sheet, "png")


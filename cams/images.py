"""Reading user images safely: every file is treated as hostile.

``load_image`` is the one door from a file (or uploaded bytes) to a plain 8-bit RGB ``PIL.Image``:

* size limit in bytes, checked before the data is read;
* a pixel limit, checked from the header before any pixel is decoded (Pillow's own decompression-bomb
  guard is turned into an ``ImageError`` too);
* a format allow-list (JPEG, PNG, WEBP, BMP, TIFF, GIF) decided by content, not by the file name;
* ``verify()`` and a full decode inside ``try``: truncated or corrupt files fail with ``ImageError``
  (truncated images are never "loaded anyway");
* EXIF orientation applied; 16-bit and 32-bit greyscale scaled to 8 bit in float32, a band of rows at a time
  (never a float64 or whole-image copy); CMYK, palette, greyscale -> RGB; transparency composited on white;
  animated files (GIF, APNG, WebP, multi-page TIFF): the first frame.

Every ``ImageError`` message names the file and the reason.
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from struct import error as struct_error  # raised by some plugins on short headers

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pfnet.errors import PfnetError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Pillow format names accepted (MPO is the multi-picture JPEG some cameras write).
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_OPENERS = ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"]  # Pillow's JPEG opener also yields MPO
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_PIXELS = 8000 * 8000
BACKGROUND = (255, 255, 255)
_BAND_SAMPLES = 1 << 22  # samples converted at a time from 16-bit and float images (16 MB of float32)

__all__ = ["ImageError", "IMAGE_EXTENSIONS", "ALLOWED_FORMATS", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS",
           "has_image_extension", "load_image", "path_problem", "printable"]


class ImageError(PfnetError):
    """A file that cannot be used as an image; the message names the file and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def path_problem(text: str) -> str | None:
    """Why ``text`` (a path read from a user's file or an upload's name) cannot name a file here, or None: a NUL
    byte, or characters the file system's encoding cannot hold (lone surrogates). Callers report it as a row
    problem; ``Path`` and ``os`` would raise ``ValueError`` / ``UnicodeEncodeError`` on it."""
    if "\0" in text:
        return "holds a NUL byte, which no path can hold"
    try:
        os.fsencode(text)
    except UnicodeError:
        return "holds characters a path cannot hold here"
    return None


def printable(text: str) -> str:
    """``text`` safe for messages, JSON and CSV: undecodable bytes replaced, control characters (NUL included)
    shown as ``\\xNN``."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def has_image_extension(path: str | os.PathLike) -> bool:
    """Whether the name ends in one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _read_limited(path: Path, name: str, max_bytes: int) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(name, "not a regular file")
    if info.st_size == 0:
        raise ImageError(name, "empty file")
    if info.st_size > max_bytes:
        raise ImageError(name, f"too large: {info.st_size:,} bytes (limit {max_bytes:,} bytes)")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise ImageError(name, f"cannot read ({exc.strerror or exc})") from None
    return data


def _bomb_reason(message: str, limit: int) -> str:
    found = re.search(r"\((\d+) pixels\)", message)
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return f"too large: {pixels} (limit {limit:,} pixels)"


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Identify and decode (first frame only), enforcing the format and pixel limits."""
    def opened() -> Image.Image:
        image = Image.open(io.BytesIO(data), formats=_OPENERS)
        if image.format not in ALLOWED_FORMATS:  # pragma: no cover - formats= already restricts
            raise ImageError(name, f"not an image (format {image.format} is not supported)")
        return image

    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        # Pillow warns above MAX_IMAGE_PIXELS (and raises above twice that): both become ImageError.
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            image = opened()
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageError(name, f"truncated or corrupt (size {width}x{height})")
            bomb = any(issubclass(item.category, Image.DecompressionBombWarning) for item in caught)
            if width * height > max_pixels or bomb:
                limit = min(max_pixels, int(pillow_limit)) if (bomb and pillow_limit) else max_pixels
                raise ImageError(name, f"too large: {width}x{height} pixels (limit {limit:,} pixels)")
            # verify() checks structure/checksums without decoding; it leaves the object unusable.
            image.verify()
            image = opened()
            image.load()
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            limit = min(max_pixels, int(pillow_limit)) if pillow_limit else max_pixels
            raise ImageError(name, _bomb_reason(str(exc), limit)) from None
        except UnidentifiedImageError:
            raise ImageError(name, "not an image (supported: JPEG, PNG, WEBP, BMP, TIFF, GIF)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
                struct_error, MemoryError, ZeroDivisionError) as exc:
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ImageError(name, f"truncated or corrupt ({detail})") from None
    return image


def _orient(image: Image.Image) -> Image.Image:
    """``image`` turned upright in place (without EXIF orientation it is untouched: no copy is made)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not sink a readable image
        pass
    return image


def _bands(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixels) of the image a band of rows at a time: no whole-image array is ever made."""
    width, height = image.size
    step = max(1, _BAND_SAMPLES // max(1, width))
    for top in range(0, height, step):
        yield top, np.asarray(image.crop((0, top, width, min(height, top + step))))


def _finite_band(band: np.ndarray) -> np.ndarray:
    return np.nan_to_num(band.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """Integer/float greyscale modes (16-bit PNG/TIFF, 32-bit TIFF) -> mode L, scaled, not clipped. Worked in
    float32 a band of rows at a time, so the cost is the decoded image plus the 8-bit result."""
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    if image.mode == "F":  # floats: [0, 1] data is scaled, anything else is clipped to [0, 255]
        top_value = max((float(_finite_band(band).max()) for _, band in _bands(image) if band.size), default=0.0)
        gain = 255.0 if top_value <= 1.0 else 1.0
    for top, band in _bands(image):
        if image.mode == "F":
            scaled = _finite_band(band)
            scaled *= gain
        else:  # 16-bit samples (Pillow keeps 16-bit PNGs as I;16 or I): 0..65535 -> 0..255
            scaled = np.clip(band, 0, 65535).astype(np.float32)
            scaled /= 257.0
        np.clip(scaled, 0, 255, out=scaled)
        np.rint(scaled, out=scaled)
        out[top:top + band.shape[0]] = scaled
    return Image.fromarray(out, mode="L")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image.copy()
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(name, f"unsupported pixel mode {image.mode} ({exc})") from None


def load_image(source: str | os.PathLike | bytes, name: str | None = None, *,
               max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A validated 8-bit RGB image from a path or raw bytes; raises ``ImageError`` for anything unusable.

    ``name`` is what error messages call the file (default: the path, or ``"upload"`` for bytes).
    The returned image is fully decoded and detached from the file, upright (EXIF orientation applied).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "upload"
        data = bytes(source)
        if not data:
            raise ImageError(label, "empty file")
        if len(data) > max_bytes:
            raise ImageError(label, f"too large: {len(data):,} bytes (limit {max_bytes:,} bytes)")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        data = _read_limited(path, label, max_bytes)
        if len(data) > max_bytes:
            raise ImageError(label, f"too large: more than {max_bytes:,} bytes")
    else:
        raise TypeError(f"load_image takes a path or bytes, not {type(source).__name__}")
    image = _open(data, label, max_pixels)
    try:
        upright = _orient(image)
        if upright.mode.startswith("I") or upright.mode == "F":  # 16-bit or float samples
            upright = _to_eight_bit(upright)
            image.close()  # the wide samples are no longer needed: free them before the RGB copy is made
        rgb = _to_rgb(upright, label)
    except ImageError:
        raise
    except (OSError, ValueError, MemoryError) as exc:
        raise ImageError(label, f"truncated or corrupt ({exc})") from None
    finally:
        image.close()
    return rgb

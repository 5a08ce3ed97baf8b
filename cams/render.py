"""Heatmaps -> pictures: colour maps, overlays on the original image, labelled comparison grids.

``overlay`` maps a heatmap computed at the network's input resolution back through the preprocessing:
the heatmap covers ``crop_box`` (the region of the original image the network saw, see
``pfnet.preprocess``), so it is resampled onto that region of the *original* image. Outside the box
the image is dimmed and left uncoloured, and the box is outlined: nothing is silently cropped away.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, cache
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

Box = tuple[float, float, float, float]

# name -> OpenCV colour map; the 256-entry RGB lookup tables are built once from OpenCV.
COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "hot": cv2.COLORMAP_HOT,
    "bone": cv2.COLORMAP_BONE,
}
OUTSIDE_DIM = 0.4  # brightness kept outside the crop box
BOX_COLOUR = (255, 255, 255)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)
MISSING_COLOUR = (230, 230, 230)

__all__ = ["COLORMAPS", "colormap_lut", "colorize", "heatmap_on_image", "overlay", "overlay_pixels",
           "thumbnail", "thumbnail_size", "shrink", "GridGeometry", "grid_geometry", "grid"]


@cache
def colormap_lut(colormap: str) -> np.ndarray:
    """The 256x3 uint8 RGB lookup table of a colour map in ``COLORMAPS``."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; expected one of {', '.join(COLORMAPS)}")
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    bgr = cv2.applyColorMap(ramp, COLORMAPS[colormap]).reshape(256, 3)
    lut = np.ascontiguousarray(bgr[:, ::-1])
    lut.setflags(write=False)
    return lut


def _as_heatmap(heatmap) -> np.ndarray:
    if hasattr(heatmap, "detach"):  # torch tensor
        heatmap = heatmap.detach().cpu().numpy()
    array = np.asarray(heatmap, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {array.shape}")
    return np.clip(np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def colorize(heatmap, colormap: str = "jet") -> np.ndarray:
    """HxW values in [0, 1] (clipped; NaN -> 0) -> HxWx3 uint8 RGB through ``colormap``."""
    return _colour(_as_heatmap(heatmap), colormap)


@cache
def _user_colormap(colormap: str) -> np.ndarray:
    """The lookup table as OpenCV's ``applyColorMap`` takes it (256x1x3; it copies the entries in their order)."""
    table = np.ascontiguousarray(colormap_lut(colormap).reshape(256, 1, 3))
    table.setflags(write=False)
    return table


def _colour(heat: np.ndarray, colormap: str) -> np.ndarray:
    """``colorize`` for a float32 map already clipped to [0, 1] (OpenCV: fast on photo-sized maps)."""
    index = cv2.convertScaleAbs(heat, alpha=255.0)  # round half to even, like np.rint
    return cv2.applyColorMap(index, _user_colormap(colormap))  # one lookup per pixel, half a merge + LUT's time


def heatmap_on_image(heatmap, image_size: tuple[int, int], crop_box: Box | None = None) -> np.ndarray:
    """Resample a heatmap (covering ``crop_box``) onto the whole image grid (w, h) -> HxW float32.

    Pixel centres are mapped exactly (a box with fractional edges is fine); pixels outside the box take the
    nearest edge value (``overlay`` does not colour them).
    """
    width, height = image_size
    return _resample(_as_heatmap(heatmap), _box(crop_box, image_size), (0, 0, width, height))


def _resample(heat: np.ndarray, box: Box, region: tuple[int, int, int, int]) -> np.ndarray:
    """The heatmap (covering ``box``) bilinearly sampled at the pixel centres of ``region`` (x0, y0, x1, y1)."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = region
    rows, cols = heat.shape
    if (x0, y0, x1, y1) == box:  # the region is the whole box: the same pixel-centre mapping, ~10x faster
        return cv2.resize(heat, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    scale_x, scale_y = cols / (right - left), rows / (bottom - top)
    # pixel centre (x + 0.5) -> heatmap coordinate u = (x + 0.5 - left) * scale, sampled at index u - 0.5
    matrix = np.array([[scale_x, 0.0, (x0 + 0.5 - left) * scale_x - 0.5],
                       [0.0, scale_y, (y0 + 0.5 - top) * scale_y - 0.5]], dtype=np.float64)
    return cv2.warpAffine(heat, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _box(crop_box: Box | None, image_size: tuple[int, int]) -> Box:
    width, height = image_size
    if crop_box is None:
        return (0.0, 0.0, float(width), float(height))
    left, top, right, bottom = (float(value) for value in crop_box)
    if not (right > left and bottom > top):
        raise ValueError(f"crop_box must be (left, top, right, bottom) with right > left and bottom > top, "
                         f"got {crop_box}")
    return (left, top, right, bottom)


def _box_pixels(image_size: tuple[int, int], box: Box) -> tuple[int, int, int, int]:
    """The pixels whose centres lie inside the box, as slice bounds (x0, y0, x1, y1), clipped to the image."""
    width, height = image_size
    # centre x + 0.5 in [left, right)  <=>  ceil(left - 0.5) <= x < ceil(right - 0.5)
    x0, x1 = (min(max(int(np.ceil(edge - 0.5)), 0), width) for edge in (box[0], box[2]))
    y0, y1 = (min(max(int(np.ceil(edge - 0.5)), 0), height) for edge in (box[1], box[3]))
    return x0, y0, x1, y1


def overlay(image: Image.Image, heatmap, crop_box: Box | None = None, colormap: str = "jet",
            opacity: float = 0.5) -> Image.Image:
    """The heatmap blended onto ``image`` (RGB) at the original image's size.

    ``heatmap`` is at the network's input resolution and covers ``crop_box`` (left, top, right, bottom) of
    the original (None: the whole image). Inside the box: ``(1 - opacity) * image + opacity * colour``.
    Outside it: the image dimmed, not coloured, with the box outlined.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(overlay_pixels(np.asarray(rgb), heatmap, crop_box, colormap, opacity), "RGB")


def overlay_pixels(pixels: np.ndarray, heatmap, crop_box: Box | None = None, colormap: str = "jet",
                   opacity: float = 0.5) -> np.ndarray:
    """``overlay`` on an HxWx3 uint8 RGB array (the crop box in its pixels): a new array, the same pixels."""
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    opacity = float(opacity)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be an HxWx3 uint8 array, got {pixels.dtype} {pixels.shape}")
    size = (pixels.shape[1], pixels.shape[0])
    box = _box(crop_box, size)
    x0, y0, x1, y1 = _box_pixels(size, box)
    # uint8 all the way (cv2 rounds and saturates): a large photo must not turn into several float copies.
    inside = None
    if x1 > x0 and y1 > y0:
        colours = _colour(_resample(_as_heatmap(heatmap), box, (x0, y0, x1, y1)), colormap)
        inside = cv2.addWeighted(np.ascontiguousarray(pixels[y0:y1, x0:x1]), 1.0 - opacity, colours, opacity, 0.0)
        if (x0, y0, x1, y1) == (0, 0, size[0], size[1]):  # the box covers the image: the blend is the picture
            return inside
    result = cv2.convertScaleAbs(pixels, alpha=OUTSIDE_DIM)
    if inside is not None:
        result[y0:y1, x0:x1] = inside
    _outline(result, [round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1],
             max(1, round(min(size) / 150)))
    return result


def _outline(pixels: np.ndarray, corners: Sequence[int], width: int) -> None:
    """Draw the rectangle ``corners`` (x0, y0, x1, y1, inclusive) ``width`` pixels thick, inwards, in
    ``BOX_COLOUR``, clipped to the image: what Pillow's ``ImageDraw.rectangle(outline=, width=)`` draws."""
    x0, y0, x1, y1 = corners
    if x1 < x0 or y1 < y0:
        return
    height, image_width = pixels.shape[:2]

    def paint(left: int, top: int, right: int, bottom: int) -> None:  # inclusive corners, clipped
        left, top = max(left, 0), max(top, 0)
        right, bottom = min(right, image_width - 1), min(bottom, height - 1)
        if right >= left and bottom >= top:
            pixels[top:bottom + 1, left:right + 1] = BOX_COLOUR

    paint(x0, y0, x1, min(y0 + width - 1, y1))  # top
    paint(x0, max(y1 - width + 1, y0), x1, y1)  # bottom
    paint(x0, y0, min(x0 + width - 1, x1), y1)  # left
    paint(max(x1 - width + 1, x0), y0, x1, y1)  # right


# ---------------------------------------------------------------- grid

@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# Text is measured and rasterised once per (font, text): an export draws the same labels and many of the same
# captions on every image's grid, and FreeType's rendering was most of a grid's cost.
@lru_cache(maxsize=4096)
def _text_width(font, text: str) -> int:
    if not text:
        return 0
    left, _, right, _ = font.getbbox(text)
    return int(np.ceil(right - left))


def _line_height(font) -> int:
    _, top, _, bottom = font.getbbox("Ag|y")
    return int(np.ceil(bottom - top)) + 4


@lru_cache(maxsize=4096)
def _fit(font, text: str, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if _text_width(font, text) <= width:
        return text
    while text and _text_width(font, text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


@lru_cache(maxsize=4096)
def _text_mask(font, text: str) -> tuple[Image.Image, int, int]:
    """The coverage of ``text`` as ``ImageDraw.text`` rasterises it at the origin, and its offset (left, top)."""
    left, top, right, bottom = (int(value) for value in font.getbbox(text))
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    return mask, left, top


def _draw_text(sheet: Image.Image, origin: tuple[int, int], text: str, font) -> None:
    """``ImageDraw.text(origin, text, TEXT_COLOUR, font)`` on ``sheet``, the same pixels, from the cached mask."""
    if text:
        mask, left, top = _text_mask(font, text)
        sheet.paste(TEXT_COLOUR, (origin[0] + left, origin[1] + top), mask)


@dataclass(frozen=True)
class GridGeometry:
    """Where everything goes in ``grid``: all in pixels."""

    rows: int
    cols: int
    cell_size: int
    pad: int
    label_width: int  # left margin holding the row labels
    header_height: int  # top margin holding the column labels
    caption_height: int  # below each cell
    font_size: int

    @property
    def size(self) -> tuple[int, int]:
        width = self.label_width + self.cols * (self.cell_size + self.pad) + self.pad
        height = self.header_height + self.rows * (self.cell_size + self.caption_height + self.pad) + self.pad
        return width, height

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel of the cell square at (row, col)."""
        x = self.label_width + self.pad + col * (self.cell_size + self.pad)
        y = self.header_height + self.pad + row * (self.cell_size + self.caption_height + self.pad)
        return x, y


def grid_geometry(rows: int, cols: int, row_labels: Sequence[str] = (), cell_size: int = 224,
                  caption_lines: int = 1, font_size: int | None = None) -> GridGeometry:
    """The layout ``grid`` uses (exposed so callers and tests can find the cells)."""
    if rows < 1 or cols < 1 or cell_size < 16:
        raise ValueError("grid needs at least one row, one column and cell_size >= 16")
    font_size = font_size or max(10, min(18, cell_size // 14))
    font = _font(font_size)
    pad = max(4, cell_size // 28)
    widest = max((_text_width(font, label) for label in row_labels), default=0)
    label_width = min(widest, 2 * cell_size) + 2 * pad if widest else 0
    header_height = _line_height(font) + pad
    caption_height = caption_lines * _line_height(font) + pad // 2
    return GridGeometry(rows, cols, cell_size, pad, label_width, header_height, caption_height, font_size)


def thumbnail(image: Image.Image, side: int) -> Image.Image:
    """An RGB copy fitted into a ``side`` square (aspect kept, never enlarged).

    ``reducing_gap=2``: a cheap integer box reduction first, then Lanczos over the last factor of two or more;
    indistinguishable at grid-cell size and several times faster than Lanczos from a full-size photo.
    """
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return thumb


def thumbnail_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """The (w, h) ``thumbnail`` gives an image of ``size`` (Pillow's rounding: the aspect as close as it gets)."""
    width, height = size
    if width <= side and height <= side:
        return width, height
    aspect = width / height
    if aspect >= 1:  # Pillow: x / y >= aspect with x = y = side
        return side, _round_aspect(side / aspect, lambda n: 0 if n == 0 else abs(aspect - side / n))
    return _round_aspect(side * aspect, lambda n: abs(aspect - n / side)), side


def _round_aspect(number: float, key) -> int:
    return max(min(math.floor(number), math.ceil(number), key=key), 1)


def shrink(pixels: np.ndarray, side: int) -> np.ndarray:
    """An HxWx3 uint8 array fitted into a ``side`` square like ``thumbnail`` (same size), by area averaging:
    ~4x cheaper than Lanczos on a photo; what the export's grid cells are drawn on."""
    width, height = thumbnail_size((pixels.shape[1], pixels.shape[0]), side)
    if (width, height) == (pixels.shape[1], pixels.shape[0]):
        return pixels.copy()
    return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)


def grid(cells: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str] = (),
         col_labels: Sequence[str] = (), captions: Sequence[Sequence[str]] | None = None,
         cell_size: int = 224) -> Image.Image:
    """A labelled comparison sheet: rows (e.g. models) x columns (e.g. layers).

    Each image is fitted into a ``cell_size`` square (aspect kept, centred); ``None`` draws an empty "n/a"
    cell. Row labels go in a left margin, column labels above the first row, ``captions[r][c]`` (e.g.
    class and probability; "\\n" for a second line) under each cell. Long texts are shortened with "…".
    """
    rows = len(cells)
    cols = max((len(row) for row in cells), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("grid needs at least one cell")
    if row_labels and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    if col_labels and len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    captions = captions or [[""] * cols for _ in range(rows)]
    lines = max([1] + [len(str(text).split("\n")) for row in captions for text in row])
    geometry = grid_geometry(rows, cols, row_labels, cell_size, caption_lines=lines)
    font = _font(geometry.font_size)
    line_height = _line_height(font)
    sheet = Image.new("RGB", geometry.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    pad = geometry.pad
    for col, label in enumerate(col_labels):
        x, _ = geometry.cell_origin(0, col)
        text = _fit(font, str(label), cell_size)
        _draw_text(sheet, (x + (cell_size - _text_width(font, text)) // 2, pad // 2), text, font)
    for row in range(rows):
        if row_labels:
            _, y = geometry.cell_origin(row, 0)
            text = _fit(font, str(row_labels[row]), geometry.label_width - 2 * pad)
            _draw_text(sheet, (pad, y + (cell_size - line_height) // 2), text, font)
        for col in range(cols):
            x, y = geometry.cell_origin(row, col)
            image = cells[row][col] if col < len(cells[row]) else None
            if image is None:
                draw.rectangle([x, y, x + cell_size - 1, y + cell_size - 1], fill=MISSING_COLOUR)
                width = _text_width(font, "n/a")
                _draw_text(sheet, (x + (cell_size - width) // 2, y + (cell_size - line_height) // 2), "n/a", font)
            else:
                thumb = thumbnail(image, cell_size)
                sheet.paste(thumb, (x + (cell_size - thumb.width) // 2, y + (cell_size - thumb.height) // 2))
            row_captions = captions[row] if row < len(captions) else []
            caption = str(row_captions[col]) if col < len(row_captions) else ""
            for index, part in enumerate(caption.split("\n")[:lines]):
                text = _fit(font, part, cell_size)
                _draw_text(sheet, (x + (cell_size - _text_width(font, text)) // 2, y + cell_size + index * line_height),
                           text, font)
    return sheet

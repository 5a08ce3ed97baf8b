"""Procedural shape scenes with ground truth (class, box, mask) for the bundled demo models.

Each scene is one solid shape drawn with a random colour, size, rotation and position on a cluttered
background (colour gradient, low-frequency colour noise, a texture, and thin distractor strokes that are not
class objects). Scene ``index`` of ``seed`` is a pure function of ``(seed, index, size)``: its random generator
is seeded from the pair, so it never depends on batch composition or order.

Design choices that matter for CAM localization (see ``assets/weights/DEMO_CARD.md``):

* every class is a *solid*, compact shape: a hollow ring or a thin cross puts the pixels that a stride-32
  feature map responds to (the shape's middle) outside the mask, so even a correct heatmap fails the strict
  pointing game; fat shapes keep the object's centre of mass on the object;
* objects are 28-46 % of the image side (36-59 px at 128 px, 45-74 px at 160 px), larger than one 32-px cell of the
  layer-4 grid, so the peak cell's centre usually lies on the object;
* the object's colour is random but differs from the background under it in colour and in luma, either way
  (light on dark or dark on light); a hue-only edge is hard to see for a small net and for people alike;
* positions are uniform over the whole image (the shape always fully inside), so a centred prior scores
  poorly; distractors are thin strokes, arcs and dots, so texture/edge detectors alone cannot solve the task.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pfnet.preprocess import IMAGENET_MEAN, IMAGENET_STD
from pfnet.zoo import SCENE_CLASSES as CLASS_NAMES  # the demo models' head: label i is shape i below

#: Seeds used by ``pfdemo.train``: training streams ``TRAIN_SEED`` (indices 0, 1, 2, ...), evaluation
#: uses ``TEST_SEED``; tests use yet another seed. Different seeds give independent streams.
TRAIN_SEED = 0
TEST_SEED = 2022

#: Object diameter (circumscribed circle) as a fraction of the image side.
SIZE_RANGE = (0.28, 0.46)
MIN_CONTRAST = 90.0  # Euclidean RGB distance between object colour and the mean background under it
#: ... and luma (Rec. 601) difference: a shape that differs from its background in hue only is hard to see. A
#: demo R50 trained without this scored 0.77 on scenes with |luma difference| < 20 against 0.90 above it.
MIN_LUMA_CONTRAST = 40.0
LUMA = np.array([0.299, 0.587, 0.114])
#: Grey levels at ``palette=0`` (the start of the training curriculum), light on dark or dark on light as the
#: scene's random colours are. With fully random colours from the first step, width-0.25 ResNets stay at chance
#: for the whole CPU budget (measured: 700 steps at 96 px, loss ln 10); plain scenes reach 60 % train accuracy
#: within 300 steps. Light-on-dark only taught one polarity: that model scored 0.98 on light objects and 0.76 on
#: dark ones.
PLAIN_LIGHT = 230.0
PLAIN_DARK = 25.0


@dataclass(frozen=True)
class Scene:
    image: np.ndarray          # uint8 [H, W, 3] RGB
    label: int                 # index into CLASS_NAMES
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), half-open: mask pixels satisfy x0 <= x < x1, y0 <= y < y1
    mask: np.ndarray           # bool [H, W], True on the object

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1) * radius


def _shapes() -> list[np.ndarray]:
    """Unit outlines (circumradius about 1, centred) of the classes, in CLASS_NAMES order."""
    circle = _regular(64, 0.85)
    square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.72
    triangle = _regular(3, 1.0, -np.pi / 2)
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    star = np.stack([np.cos(t), np.sin(t)], 1) * np.where(np.arange(10) % 2 == 0, 1.0, 0.5)[:, None]
    a, b = 0.32, 0.95  # thick arms: the crossing is a solid block, not a thin "+"
    cross = np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                      [-b, -a], [-a, -a]], float)
    tt = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    heart = np.stack([16 * np.sin(tt) ** 3, -(13 * np.cos(tt) - 5 * np.cos(2 * tt) - 2 * np.cos(3 * tt)
                                              - np.cos(4 * tt))], 1)
    heart = (heart - heart.mean(0)) / 17.0
    th = np.linspace(0, np.pi, 33)
    half = np.stack([np.cos(th), -np.sin(th)], 1)
    half[:, 1] += 0.42
    arrow = np.array([[-1, -0.25], [0.15, -0.25], [0.15, -0.65], [1, 0], [0.15, 0.65], [0.15, 0.25],
                      [-1, 0.25]], float)
    ellipse = np.stack([np.cos(tt), 0.5 * np.sin(tt)], 1)
    diamond = np.array([[1, 0], [0, 0.58], [-1, 0], [0, -0.58]], float)
    return [circle, square, triangle, star, cross, heart, half, arrow, ellipse, diamond]


_SHAPES = _shapes()
assert len(_SHAPES) == len(CLASS_NAMES)


_NOISE_BANK: tuple[np.ndarray, np.ndarray] | None = None  # the bank and its transpose, both C-contiguous
_BANK_SIDE = 1024


def _noise_patch(rng: np.random.Generator, size: int) -> np.ndarray:
    """[S, S, 3] unit Gaussian noise: a randomly offset window of a fixed bank (a per-pixel draw is slow)."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        bank = np.random.default_rng(0x0B5E55).standard_normal((_BANK_SIDE, _BANK_SIDE, 3), dtype=np.float32)
        _NOISE_BANK = bank, np.ascontiguousarray(bank.transpose(1, 0, 2))
    if size > _BANK_SIDE:
        return rng.standard_normal((size, size, 3), dtype=np.float32)
    oy, ox = rng.integers(0, _BANK_SIDE - size + 1, 2)
    flip = int(rng.integers(0, 4))
    if flip & 1:  # the transposed window, read from the transposed bank (rows contiguous: faster to add)
        return _NOISE_BANK[1][ox:ox + size, oy:oy + size]
    return _NOISE_BANK[0][oy:oy + size, ox:ox + size]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _add_scaled(img: np.ndarray, plane: np.ndarray, colour: np.ndarray) -> None:
    """``img += plane[..., None] * colour`` one channel at a time: the same float32 products and sums, about
    four times faster than broadcasting over a last axis of 3."""
    for channel in range(img.shape[-1]):
        img[..., channel] += plane * colour[channel]


def _background(rng: np.random.Generator, size: int, clutter: float = 1.0) -> np.ndarray:
    """Float32 [S, S, 3] cluttered background: gradient + colour noise + a texture (separable maths only)."""
    s = size
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s
    theta = rng.uniform(0, 2 * np.pi)
    cx, cy = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    ramp = cx * grid[None, :] + cy * grid[:, None]
    ramp -= ramp.min()
    ramp /= max(float(ramp.max()), 1e-6)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    k = int(rng.integers(3, 9))
    blob = rng.standard_normal((k, k, 3)).astype(np.float32) * np.float32(rng.uniform(15, 45) * clutter)
    blob += c0.astype(np.float32)
    small = cv2.resize(blob, (max(4 * k, 8), max(4 * k, 8)), interpolation=cv2.INTER_CUBIC)
    img = cv2.resize(small, (s, s), interpolation=cv2.INTER_LINEAR)
    _add_scaled(img, ramp, (clutter * (c1 - c0)).astype(np.float32))
    kind = int(rng.integers(0, 4))
    amp = rng.uniform(10, 40)
    phi, freq = rng.uniform(0, np.pi), rng.uniform(4, 14) * 2 * np.pi
    colour = (clutter * amp * rng.uniform(-1, 1, 3)).astype(np.float32)
    if kind == 0:    # stripes: sin(a x + b y) = sin(a x) cos(b y) + cos(a x) sin(b y)
        ax, by = freq * np.cos(phi) * grid, freq * np.sin(phi) * grid
        tex = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
    elif kind == 1:  # checker
        tex = np.outer(np.sign(np.sin(freq * grid)), np.sign(np.sin(freq * grid)))
    elif kind == 2:  # grain
        tex = _noise_patch(rng, s)[..., 0]
    else:            # plain
        return img
    _add_scaled(img, tex.astype(np.float32), colour)
    return img


def _distractors(rng: np.random.Generator, img: np.ndarray, clutter: float = 1.0) -> None:
    """Thin strokes, arcs and dots (never a class shape), drawn in place; ``clutter`` < 1 paints fewer."""
    s = img.shape[0]
    count = int(rng.integers(2, 7))
    keep = int(round(count * clutter))
    for number in range(count):
        if number >= keep:
            img = np.empty((1, 1, 3), np.float32)  # keep consuming the same random draws, paint nowhere
        kind = int(rng.integers(0, 3))
        colour = tuple(float(c) for c in _random_colour(rng))
        thick = int(rng.integers(1, 3))
        pts = rng.uniform(-0.1 * s, 1.1 * s, (4, 2))
        if kind == 0:
            cv2.polylines(img, [pts[: int(rng.integers(2, 5))].astype(np.int32)], False, colour, thick,
                          cv2.LINE_AA)
        elif kind == 1:
            axes = rng.uniform(0.05 * s, 0.3 * s, 2)
            start = rng.uniform(0, 360)
            cv2.ellipse(img, (int(pts[0, 0]), int(pts[0, 1])), (int(axes[0]), int(axes[1])),
                        float(rng.uniform(0, 180)), start, start + rng.uniform(60, 240), colour, thick,
                        cv2.LINE_AA)
        else:
            for x, y in pts:
                cv2.circle(img, (int(x), int(y)), int(rng.integers(1, 4)), colour, -1, cv2.LINE_AA)


def render_scene(seed: int, index: int, size: int = 160, *, draw_object: bool = True, clutter: float = 1.0,
                 palette: float = 1.0) -> Scene:
    """Scene ``index`` of stream ``seed`` at ``size`` x ``size`` pixels.

    ``draw_object=False`` returns the identical scene without the object painted (same mask/box/label):
    the exact background under the object, used by tests. ``clutter`` in [0, 1] scales the background's
    gradient, noise and texture amplitudes and the number of distractors; ``palette`` in [0, 1] blends the
    colours from a light object on a dark background (0) to the random ones (1). Both make the same random
    draws at every value, so the object is the same; training ramps them up from 0 (a curriculum), evaluation
    always uses 1.
    """
    if size < 32:
        raise ValueError("size must be at least 32")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x5CE7E])
    s = size
    clutter = float(min(max(clutter, 0.0), 1.0))
    img = _background(rng, s, clutter)
    _distractors(rng, img, clutter)

    label = int(rng.integers(0, len(CLASS_NAMES)))
    diameter = rng.uniform(*SIZE_RANGE) * s
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    outline = _SHAPES[label] @ rot.T * (diameter / 2)
    lo, hi = outline.min(0), outline.max(0)
    margin = 2.0
    centre = rng.uniform(margin - lo, s - 1 - margin - hi)
    poly = outline + centre
    mask_u8 = np.zeros((s, s), np.uint8)
    cv2.fillPoly(mask_u8, [np.round(poly * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    mask = mask_u8.astype(bool)
    if not mask.any():  # cannot happen for size >= 32, kept as a guard
        mask[int(centre[1]), int(centre[0])] = True

    # Object colour: random, but far enough from the background it covers, in colour and in luma.
    under = np.array(cv2.mean(img, mask_u8)[:3])
    candidates = rng.uniform(0, 255, (8, 3))
    dist = np.linalg.norm(candidates - under, axis=1)
    luma = (candidates - under) @ LUMA
    ok = np.flatnonzero((dist >= MIN_CONTRAST) & (np.abs(luma) >= MIN_LUMA_CONTRAST))
    colour = candidates[ok[0]] if ok.size else np.where(under @ LUMA > 127, 0.0, 255.0)
    palette = float(min(max(palette, 0.0), 1.0))
    if palette < 1.0:
        light = (colour - under) @ LUMA > 0
        plain_object, plain_background = (PLAIN_LIGHT, PLAIN_DARK) if light else (PLAIN_DARK, PLAIN_LIGHT)
        colour = palette * colour + (1.0 - palette) * plain_object
        img *= np.float32(palette)
        img += np.float32((1.0 - palette) * plain_background)
    shade_dir = rng.uniform(-1, 1, 2)
    shade_amp = rng.uniform(0, 25)
    noise_sigma = rng.uniform(0, 6) * clutter
    sensor = _noise_patch(rng, s)

    x, y, w, h = cv2.boundingRect(mask_u8)
    box = (int(x), int(y), int(x + w), int(y + h))
    if draw_object:  # shading computed over the object's box only
        ax = (np.arange(x, x + w, dtype=np.float32) - np.float32(centre[0])) * np.float32(shade_dir[0])
        ay = (np.arange(y, y + h, dtype=np.float32) - np.float32(centre[1])) * np.float32(shade_dir[1])
        shade = (ay[:, None] + ax[None, :]) * np.float32(shade_amp / (diameter / 2))
        inside = mask[y:y + h, x:x + w]
        for channel, value in enumerate(np.broadcast_to(np.float32(colour), (3,))):
            np.copyto(img[y:y + h, x:x + w, channel], shade + value, where=inside)
    img += np.float32(noise_sigma) * sensor
    image = np.clip(img, 0, 255, out=img).astype(np.uint8)

    return Scene(image=image, label=label, box=box, mask=mask)


def to_tensor(images: np.ndarray | Sequence[np.ndarray], mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 [H,W,3] or [N,H,W,3] -> float32 normalized [3,H,W] / [N,3,H,W]."""
    arr = np.asarray(images)
    t = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)
    sd = torch.tensor(std, dtype=torch.float32)
    t = (t - m) / sd
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def scene_batch(seed: int, indices: Sequence[int] | range, size: int = 160, clutter: float = 1.0,
                palette: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, list[Scene]]:
    """Render ``indices`` of stream ``seed``: (normalized [N,3,S,S] tensor, labels int64 [N], scenes)."""
    scenes = [render_scene(seed, int(i), size, clutter=clutter, palette=palette) for i in indices]
    x = to_tensor(np.stack([sc.image for sc in scenes]))
    y = torch.tensor([sc.label for sc in scenes], dtype=torch.int64)
    return x, y, scenes


class SceneDataset(Dataset):
    """``n`` scenes of stream ``seed``; item i is ``transform(scene)`` or, by default, (normalized tensor, label)."""

    def __init__(self, n: int, seed: int, size: int = 160, transform: Callable[[Scene], object] | None = None):
        if n < 0:
            raise ValueError("n must be non-negative")
        self.n, self.seed, self.size, self.transform = int(n), int(seed), int(size), transform

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return render_scene(self.seed, index % self.n if self.n else index, self.size)

    def __getitem__(self, index: int):
        scene = self.scene(index)
        if self.transform is not None:
            return self.transform(scene)
        return to_tensor(scene.image), scene.label

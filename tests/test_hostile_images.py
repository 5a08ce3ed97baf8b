"""Hostile images (issue #11): decode amplification of wide samples bounded (8. float TIFF), animated GIF accepted as
its first frame (9.), and what already held kept so: header bombs in every format refused from the header, RSS
flat over many loads and explains. Memory is measured in a fresh process (hostile_files.measure_load)."""
from __future__ import annotations

import io
import sys

import numpy as np
import psutil
import pytest
from PIL import Image

import hostile_files as hostile
from cams.images import IMAGE_EXTENSIONS, ImageError, has_image_extension, load_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# 8. Wide samples (float, 16-bit) decode without float64 or whole-image copies
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="peak RSS is read from /proc or the resource module")
@pytest.mark.slow
def test_large_float_tiff_costs_little_more_than_its_pixels(tmp_path):
    path = hostile.float_tiff(tmp_path / "float.tif", side=8000, value=0.5)
    assert path.stat().st_size < 500_000  # 256 MB of float32 pixels in under 500 KB
    result = hostile.measure_load("image", path)
    assert result["outcome"] == "loaded 8000x8000 RGB, pixel (128, 128, 128)", result
    # The decoded float image alone is 256 MB and the RGB result 192 MB; c48be40's float64 copies took 2,262 MB.
    assert result["peak_growth_mb"] < 600, result


def _reference(samples: np.ndarray) -> np.ndarray:
    """What the 8-bit conversion must give, in float64 over the whole image at once."""
    if samples.dtype.kind == "f":
        finite = np.nan_to_num(samples.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = finite * 255.0 if finite.max() <= 1.0 else finite
    else:
        scaled = np.clip(samples.astype(np.float64), 0, 65535) / 257.0
    return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


@pytest.mark.parametrize("top", [1.0, 3.0])
def test_float_samples_are_scaled_over_the_whole_image_not_per_band(top):
    # 2100 rows of 2048 samples are converted in two bands; the value that decides the scale is in the second.
    rng = np.random.default_rng(0)
    samples = rng.uniform(0.0, 0.9, size=(2100, 2048)).astype(np.float32)
    samples[2090, 5] = top
    samples[0, :4] = [np.nan, np.inf, -np.inf, -0.5]
    image = load_image(encode(Image.fromarray(samples, mode="F"), "TIFF"), name="f.tif")
    pixels = np.asarray(image)
    assert image.mode == "RGB" and (pixels[..., 0] == pixels[..., 2]).all()
    assert np.abs(pixels[..., 0].astype(int) - _reference(samples)).max() <= 1
    if top == 1.0:
        assert pixels[2090, 5, 0] == 255 and pixels[1000, 1000, 0] == round(samples[1000, 1000] * 255)
    else:  # data beyond [0, 1] is taken as 0..255 and clipped, not scaled
        assert pixels[2090, 5, 0] == 3 and pixels[1000, 1000, 0] <= 1
    assert pixels[0, :4, 0].tolist() == [0, 0, 0, 0]


def test_sixteen_bit_samples_match_the_exact_scaling():
    samples = np.arange(0, 65536, 7, dtype=np.uint16)[:9000].reshape(90, 100)
    image = load_image(encode(Image.fromarray(samples), "PNG"), name="deep.png")
    assert (np.asarray(image)[..., 1] == _reference(samples)).all()


# ----------------------------------------------------------------------------------------------------------------
# 9. GIF: accepted, first frame of animated ones
# ----------------------------------------------------------------------------------------------------------------


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (24, 16), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (24, 16)
    assert np.asarray(image)[8, 12].tolist() == [255, 0, 0]
    assert ".gif" in IMAGE_EXTENSIONS and has_image_extension(path)


def test_gif_transparency_is_composited_on_white():
    frame = Image.new("P", (10, 10), 0)
    frame.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    frame.paste(1, (5, 0, 10, 10))
    image = load_image(encode(frame, "GIF", transparency=0), name="t.gif")
    assert np.asarray(image)[5, 2].tolist() == [255, 255, 255]
    assert np.asarray(image)[5, 7].tolist() == [255, 0, 0]


# ----------------------------------------------------------------------------------------------------------------
# Held: header bombs in every format refused from the header; RSS flat over many loads and explains
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF"])
def test_header_bombs_are_refused_before_decoding(fmt):
    data = hostile.header_bomb(fmt)
    assert len(data) < 5000
    pixels = "268,402,689" if fmt == "WEBP" else "4,294,836,225"  # 16383^2 (WebP's most) or 65535^2
    with pytest.raises(ImageError, match=rf"^bomb: too large: ({pixels} pixels|\d+x\d+ pixels) \(limit "):
        load_image(data, name="bomb")


@pytest.mark.slow
def test_rss_stays_flat_over_many_loads_and_explains(one_torch_thread):
    from cams import explain
    from pfnet import load, zoo
    from pfnet.preprocess import prepare

    model, preprocess = load("demo_r50"), zoo.get("demo_r50").preprocess
    data = encode(Image.new("RGB", (96, 64), (30, 160, 90)), "PNG")

    def step():
        explain(model, prepare(load_image(data, name="a.png"), preprocess).tensor[None], ["layer4"])

    process = psutil.Process()
    for _ in range(50):
        step()
    before = process.memory_info().rss
    for _ in range(1000):
        step()
    growth = (process.memory_info().rss - before) / 2**20
    assert growth < 30, f"RSS grew {growth:.0f} MB over 1,000 load + explain calls"

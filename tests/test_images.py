"""cams.images.load_image: every file is hostile; the fixtures are generated here, not stored."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cams.images import IMAGE_EXTENSIONS, ImageError, has_image_extension, load_image
from pfnet.errors import PfnetError


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG claiming ``width`` x ``height`` with a tiny (wrong) data stream."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 40x20 JPEG (red left half, blue right half) whose EXIF says 'rotate 90 deg clockwise to view'."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


@pytest.fixture
def red_png() -> bytes:
    return encode(Image.new("RGB", (30, 20), (255, 0, 0)), "PNG")


def test_error_type_and_extensions():
    assert issubclass(ImageError, PfnetError)
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"} == IMAGE_EXTENSIONS
    assert has_image_extension("a/B.JPG") and has_image_extension("x.tiff")
    assert not has_image_extension("notes.txt") and not has_image_extension("pic.svg")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_allowed_formats_load_as_rgb(tmp_path, fmt):
    path = tmp_path / f"ok.{fmt.lower()}"
    path.write_bytes(encode(Image.new("RGB", (31, 17), (10, 200, 30)), fmt))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (31, 17)
    assert np.abs(np.asarray(image, dtype=int)[8, 15] - (10, 200, 30)).max() <= 6


def test_path_and_bytes_give_the_same_pixels(tmp_path, red_png):
    path = tmp_path / "red.png"
    path.write_bytes(red_png)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(red_png, name="red.png")))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        load_image(path)
    with pytest.raises(ImageError, match="up.jpg: empty file"):
        load_image(b"", name="up.jpg")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


@pytest.mark.parametrize("payload", [
    b"hello, I am a text file pretending to be a JPEG\n",
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
    b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
])
def test_not_an_image_even_if_named_jpg(tmp_path, payload):
    path = tmp_path / "photo.jpg"
    path.write_bytes(payload)
    with pytest.raises(ImageError, match=r"photo\.jpg: not an image"):
        load_image(path)


def test_format_outside_allow_list_is_refused():
    ppm = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PPM")
    with pytest.raises(ImageError, match="not an image"):
        load_image(ppm, name="x.ppm")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_truncated_files_fail(fmt):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = encode(noisy, fmt)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2], name=f"cut.{fmt.lower()}")


def test_corrupt_png_checksum_fails(red_png):
    broken = bytearray(red_png)
    idat = broken.index(b"IDAT")
    broken[idat + 6] ^= 0xFF  # flip a byte inside the compressed data: CRC mismatch
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(bytes(broken), name="crc.png")


def test_byte_limit_checked_before_reading(tmp_path, red_png, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(red_png)

    def no_read(*args, **kwargs):  # the limit must trip on stat(), before open()
        raise AssertionError("file was opened")

    monkeypatch.setattr("builtins.open", no_read)
    with pytest.raises(ImageError, match=r"too large: [\d,]+ bytes \(limit 10 bytes\)"):
        load_image(path, max_bytes=10)
    monkeypatch.undo()
    with pytest.raises(ImageError, match="too large"):
        load_image(red_png, max_bytes=10)


def test_pixel_limit_names_the_size():
    with pytest.raises(ImageError, match=r"big\.png: too large: 30x20 pixels \(limit 500 pixels\)"):
        load_image(encode(Image.new("RGB", (30, 20)), "PNG"), name="big.png", max_pixels=500)


def test_decompression_bomb_header_is_refused_without_decoding():
    with pytest.raises(ImageError, match=r"bomb\.png: too large: 12000x12000 pixels \(limit [\d,]+ pixels\)"):
        load_image(png_header_only(12000, 12000), name="bomb.png")


def test_pillow_bomb_guard_becomes_image_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned = encode(Image.new("L", (40, 40)), "PNG")  # 1,600 px: Pillow warns
    with pytest.raises(ImageError, match=r"too large: 40x40 pixels \(limit 1,000 pixels\)"):
        load_image(warned, name="w.png")
    raised = encode(Image.new("L", (50, 50)), "PNG")  # 2,500 px > 2x limit: Pillow raises
    with pytest.raises(ImageError, match=r"too large: 2,500 pixels \(limit 1,000 pixels\)"):
        load_image(raised, name="e.png")


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896], [65535, 1000, 65280]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = load_image(data, name="deep.png")
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert pixels[..., 0].tolist() == [[0, 1, 128], [255, 4, 254]]


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = load_image(data, name="cmyk.jpg")
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image, dtype=int)[8, 8]
    assert red > 230 and green < 30 and blue < 30


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 0, 128)])
    pixels = np.asarray(load_image(encode(rgba, "PNG"), name="a.png"), dtype=int)[0]
    assert pixels[0].tolist() == [255, 0, 0]
    assert pixels[1].tolist() == [255, 255, 255]
    assert np.abs(pixels[2] - 127).max() <= 1

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 255), (0, 0)])
    assert np.asarray(load_image(encode(la, "PNG"), name="la.png"))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_palette_with_transparency_is_composited_on_white():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255] + [0, 255, 0] + [0, 0, 0] * 254)
    palette.putdata([0, 1])
    data = encode(palette, "PNG", transparency=1)
    assert np.asarray(load_image(data, name="p.png"))[0].tolist() == [[0, 0, 255], [255, 255, 255]]


def test_grayscale_becomes_three_equal_channels():
    gray = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), mode="L")
    pixels = np.asarray(load_image(encode(gray, "PNG"), name="g.png"))
    assert pixels.shape == (1, 3, 3)
    assert pixels[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]


def test_exif_orientation_is_applied():
    image = load_image(exif_rotated_jpeg(6), name="rot.jpg")
    assert image.size == (20, 40)  # portrait after rotating 90 deg clockwise
    pixels = np.asarray(image, dtype=int)
    top, bottom = pixels[5, 10], pixels[35, 10]  # red (stored left) ends up on top
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_file_gives_the_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 255, 0)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    image = load_image(buffer.getvalue(), name="anim.png")
    assert np.asarray(image)[4, 4].tolist() == [255, 0, 0]


def test_result_is_detached_from_the_source(tmp_path, red_png):
    path = tmp_path / "red.png"
    path.write_bytes(red_png)
    image = load_image(path)
    path.unlink()
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_rejects_other_source_types():
    with pytest.raises(TypeError):
        load_image(123)  # type: ignore[arg-type]

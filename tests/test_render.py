"""cams.render: colour maps, overlays mapped back through the crop box, labelled grids."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cams.render import (COLORMAPS, colorize, colormap_lut, grid, grid_geometry, heatmap_on_image, overlay,
                          overlay_pixels, shrink, thumbnail, thumbnail_size)
from pfnet.preprocess import Preprocess, crop_box_for


def quadrant_heatmap(side: int = 32) -> np.ndarray:
    """1 in the top-left quadrant, 0 elsewhere."""
    heat = np.zeros((side, side), np.float32)
    heat[: side // 2, : side // 2] = 1.0
    return heat


def test_required_colormaps_exist():
    assert {"jet", "turbo", "viridis", "inferno"} <= set(COLORMAPS)


@pytest.mark.parametrize("name", sorted(COLORMAPS))
def test_colorize_shape_dtype_and_endpoints(name):
    heat = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    colours = colorize(heat, name)
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    lut = colormap_lut(name)
    assert colours[0, 0].tolist() == lut[0].tolist() and colours[0, 1].tolist() == lut[255].tolist()


def test_colormap_endpoint_values_are_rgb():
    jet = colorize(np.array([[0.0, 1.0]]), "jet")[0]
    assert jet[0][2] > 100 and jet[0][0] == 0  # jet starts dark blue
    assert jet[1][0] > 100 and jet[1][2] == 0  # ... and ends dark red
    viridis = colorize(np.array([[0.0, 1.0]]), "viridis")[0]
    assert viridis[0].tolist() == pytest.approx([68, 1, 84], abs=2)  # purple
    assert viridis[1].tolist() == pytest.approx([253, 231, 37], abs=2)  # yellow
    inferno = colorize(np.array([[0.0, 1.0]]), "inferno")[0]
    assert max(inferno[0]) < 10 and min(inferno[1][:2]) > 240  # black -> pale yellow


def test_colorize_clips_and_handles_nan_and_tensors():
    colours = colorize(torch.tensor([[-3.0, 7.0, float("nan")]]), "turbo")
    lut = colormap_lut("turbo")
    assert colours[0].tolist() == [lut[0].tolist(), lut[255].tolist(), lut[0].tolist()]


def test_colorize_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown colormap"):
        colorize(np.zeros((2, 2)), "rainbow-unicorn")
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((2, 2, 2)), "jet")


def test_overlay_is_at_the_original_size():
    image = Image.new("RGB", (317, 121), (128, 128, 128))
    result = overlay(image, np.random.default_rng(0).random((224, 224)), (0, 0, 317, 121))
    assert result.size == (317, 121) and result.mode == "RGB"


def test_overlay_opacity_extremes():
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    heat = np.full((8, 8), 1.0, np.float32)
    assert np.array_equal(np.asarray(overlay(image, heat, opacity=0.0)), np.asarray(image))
    full = np.asarray(overlay(image, heat, colormap="jet", opacity=1.0))
    assert (full == colormap_lut("jet")[255]).all()
    half = np.asarray(overlay(image, heat, colormap="jet", opacity=0.5), dtype=float)
    expected = 0.5 * np.array([10, 20, 30]) + 0.5 * colormap_lut("jet")[255]
    assert np.abs(half - expected).max() <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="opacity"):
        overlay(image, heat, opacity=1.5)


def test_hot_top_left_quadrant_colours_top_left_of_the_whole_image():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    result = np.asarray(overlay(image, quadrant_heatmap(), None, "jet", 1.0))
    hot, cold = colormap_lut("jet")[255], colormap_lut("jet")[0]
    assert (result[:45, :95] == hot).all()  # top-left quarter of the (non-square) image
    assert (result[55:, :] == cold).all() and (result[:, 105:] == cold).all()


def test_heatmap_is_mapped_into_the_crop_box():
    # A 300x200 image in "center" mode: the network saw a centred square.
    preprocess = Preprocess(input_size=32, resize_size=40)
    box = crop_box_for((300, 200), preprocess, "center")
    left, top, right, bottom = box
    assert (right - left) == pytest.approx(160) and (left, top) == pytest.approx((70, 20))
    image = Image.new("RGB", (300, 200), (200, 200, 200))
    result = np.asarray(overlay(image, quadrant_heatmap(32), box, "jet", 1.0))
    hot, cold = colormap_lut("jet")[255], colormap_lut("jet")[0]
    mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
    # top-left quadrant of the box is hot, the rest of the box is cold
    assert (result[int(top) + 3: int(mid_y) - 3, int(left) + 3: int(mid_x) - 3] == hot).all()
    assert (result[int(mid_y) + 3: int(bottom) - 3, int(left) + 3: int(right) - 3] == cold).all()
    assert (result[int(top) + 3: int(bottom) - 3, int(mid_x) + 3: int(right) - 3] == cold).all()
    # outside the box: the image dimmed and uncoloured (grey stays grey), not cropped away
    outside = result[100, 10]
    assert outside[0] == outside[1] == outside[2] and 40 < outside[0] < 200
    # the box is outlined in white
    assert (result[100, int(round(left))] == 255).all()


def test_heatmap_on_image_maps_pixel_centres_exactly():
    heat = np.arange(4, dtype=np.float32).reshape(1, 4) / 3.0
    resampled = heatmap_on_image(np.repeat(heat, 4, 0), (8, 4), (0, 0, 8, 4))
    # 2x upsampling: output centres 1.5 and 2.5 land at input index 0.25 and 0.75 (between values 0 and 1/3)
    assert resampled.shape == (4, 8)
    assert resampled[0, 0] == pytest.approx(0.0) and resampled[0, -1] == pytest.approx(1.0)
    assert resampled[0, 1] == pytest.approx(0.25 / 3.0, abs=1 / 64)
    assert resampled[0, 2] == pytest.approx(0.75 / 3.0, abs=1 / 64)
    assert np.allclose(resampled, resampled[0])  # rows are identical


def test_overlay_rejects_an_empty_box():
    with pytest.raises(ValueError, match="crop_box"):
        overlay(Image.new("RGB", (10, 10)), np.zeros((4, 4)), (5, 5, 5, 9))


def test_grid_size_is_cells_plus_margins_and_cells_land_where_geometry_says():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    cells = [[Image.new("RGB", (50, 50), colour) for colour in row] for row in colours]
    row_labels, col_labels = ["R50", "R50-hybrid"], ["layer2", "layer3", "layer4"]
    captions = [["cat 91.0%", "cat 88.0%", "dog 40.0%"], ["a", "b", "c"]]
    sheet = grid(cells, row_labels, col_labels, captions, cell_size=64)
    geometry = grid_geometry(2, 3, row_labels, 64)
    assert sheet.size == geometry.size
    width, height = sheet.size
    assert width == geometry.label_width + 3 * 64 + 4 * geometry.pad and geometry.label_width > 0
    assert height == geometry.header_height + 2 * (64 + geometry.caption_height) + 3 * geometry.pad
    pixels = np.asarray(sheet)
    for row in range(2):
        for col in range(3):
            x, y = geometry.cell_origin(row, col)
            assert pixels[y + 32, x + 32].tolist() == list(colours[row][col])
    # labels and captions put dark text in the margins
    assert pixels[: geometry.header_height].min() < 100
    assert pixels[:, : geometry.label_width].min() < 100
    x, y = geometry.cell_origin(0, 0)
    assert pixels[y + 64: y + 64 + geometry.caption_height, x: x + 64].min() < 100


def test_grid_keeps_aspect_and_marks_missing_cells():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    sheet = grid([[wide, None]], ["model"], ["a", "b"], [["x", ""]], cell_size=64)
    geometry = grid_geometry(1, 2, ["model"], 64)
    pixels = np.asarray(sheet)
    x, y = geometry.cell_origin(0, 0)
    assert pixels[y + 32, x + 32].tolist() == [255, 0, 0]
    assert pixels[y + 4, x + 32].tolist() == [255, 255, 255]  # letterbox above the 64x32 thumbnail
    x, y = geometry.cell_origin(0, 1)
    assert pixels[y + 2, x + 2].tolist() == [230, 230, 230]


def test_grid_without_labels_and_with_two_line_captions():
    cells = [[Image.new("RGB", (10, 10))]]
    plain = grid(cells, cell_size=32)
    assert plain.size == grid_geometry(1, 1, (), 32).size
    two = grid(cells, captions=[["cat\n12.5%"]], cell_size=32)
    assert two.size[1] > plain.size[1]


def test_grid_validates_labels():
    with pytest.raises(ValueError, match="row labels"):
        grid([[Image.new("RGB", (4, 4))]], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        grid([])


def test_colorize_maps_every_level_through_the_lookup_table():
    for name in ("jet", "viridis"):
        levels = np.arange(256, dtype=np.float32).reshape(16, 16) / 255.0
        assert np.array_equal(colorize(levels, name), colormap_lut(name)[np.arange(256).reshape(16, 16)])


def test_a_whole_pixel_box_resamples_like_the_general_box_path():
    # (0, 0, w, h) takes cv2.resize; a box off by 1e-6 takes the general warpAffine path: the same map.
    heat = np.random.default_rng(1).random((9, 13)).astype(np.float32)
    exact = heatmap_on_image(heat, (70, 41), (0, 0, 70, 41))
    general = heatmap_on_image(heat, (70, 41), (0, 0, 70 + 1e-6, 41))
    assert exact.shape == general.shape == (41, 70)
    assert np.abs(exact - general).max() < 1e-4
    inner = heatmap_on_image(heat, (90, 60), (10, 5, 80, 46))  # an integer box inside a larger image
    assert np.abs(inner[5:46, 10:80] - exact).max() < 1e-5


@pytest.mark.parametrize(("size", "box"), [((300, 200), (70.3, 20.6, 230.4, 180.5)), ((900, 600), (150, 0, 750, 600)),
                                       ((900, 600), (-20.2, 30.7, 400.5, 640.0)), ((64, 64), (10, 10, 13, 60))])
def test_the_crop_box_outline_is_what_pillow_draws(size, box):
    from PIL import ImageDraw

    black = Image.new("RGB", size, (0, 0, 0))
    drawn = np.asarray(overlay(black, np.zeros((8, 8), np.float32), box, "jet", opacity=0.0))  # outline only
    expected = Image.new("RGB", size, (0, 0, 0))
    corners = [round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1]
    ImageDraw.Draw(expected).rectangle(corners, outline=(255, 255, 255), width=max(1, round(min(size) / 150)))
    assert np.array_equal(drawn, np.asarray(expected))


def test_overlay_pixels_is_overlay_on_the_array():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    heat = np.random.default_rng(3).random((16, 16)).astype(np.float32)
    box = (10.5, 3.2, 60.1, 47.9)
    assert np.array_equal(overlay_pixels(np.asarray(image), heat, box, "turbo", 0.3),
                          np.asarray(overlay(image, heat, box, "turbo", 0.3)))
    with pytest.raises(ValueError, match="uint8"):
        overlay_pixels(np.zeros((4, 4, 3), np.float32), heat)


def test_shrink_fits_like_thumbnail_and_averages():
    pixels = np.random.default_rng(4).integers(0, 255, (301, 517, 3), dtype=np.uint8)
    for side in (16, 64, 224, 600):
        small = shrink(pixels, side)
        assert (small.shape[1], small.shape[0]) == thumbnail_size((517, 301), side) == \
            thumbnail(Image.fromarray(pixels), side).size
    flat = np.full((300, 400, 3), 77, np.uint8)
    assert (shrink(flat, 50) == 77).all()


@pytest.mark.parametrize("caption", ["Ag|yj", "dog 9%", "ÄÖü 12.5%"])  # each fits a 64 px cell
def test_grid_captions_are_the_pixels_imagedraw_draws(caption):
    """Captions are pasted from cached text masks: the same pixels as drawing the text in place."""
    from math import ceil

    from PIL import ImageDraw, ImageFont

    cell = Image.new("RGB", (64, 64), (200, 30, 30))
    for _ in range(2):  # the second grid takes the cached masks
        sheet = grid([[cell]], captions=[[caption]], cell_size=64)
    geometry = grid_geometry(1, 1, (), 64)
    font = ImageFont.load_default(size=geometry.font_size)
    expected = Image.new("RGB", sheet.size, (255, 255, 255))
    expected.paste(cell, geometry.cell_origin(0, 0))
    x, y = geometry.cell_origin(0, 0)
    left, _, right, _ = font.getbbox(caption)
    ImageDraw.Draw(expected).text((x + (64 - ceil(right - left)) // 2, y + 64), caption, fill=(20, 20, 20), font=font)
    assert np.array_equal(np.asarray(sheet), np.asarray(expected))

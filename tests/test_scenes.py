"""Procedural scenes: determinism, ground truth (box, mask), spread over the image, dataset/tensor helpers."""
import numpy as np
import pytest
import torch

from pfdemo.scenes import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, LUMA, MIN_LUMA_CONTRAST, PLAIN_DARK, \
    PLAIN_LIGHT, Scene, SceneDataset, render_scene, scene_batch, to_tensor

SIZES = (128, 160, 224)


def test_class_names():
    assert isinstance(CLASS_NAMES, tuple) and len(CLASS_NAMES) >= 8
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert "ring" not in CLASS_NAMES  # hollow shapes defeat the pointing game (see module docstring)


@pytest.mark.parametrize("size", SIZES)
def test_deterministic_and_types(size):
    a, b = render_scene(7, 123, size), render_scene(7, 123, size)
    assert isinstance(a, Scene)
    assert a.image.dtype == np.uint8 and a.image.shape == (size, size, 3)
    assert a.mask.dtype == bool and a.mask.shape == (size, size)
    assert isinstance(a.label, int) and 0 <= a.label < len(CLASS_NAMES)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.label == b.label and a.box == b.box


def test_independent_of_order_and_batch():
    direct = [render_scene(3, i, 128) for i in (5, 2, 9)]
    _, labels, batch = scene_batch(3, range(0, 10), 128)
    for sc, i in zip(direct, (5, 2, 9)):
        assert np.array_equal(sc.image, batch[i].image)
        assert sc.label == int(labels[i])
    ds = SceneDataset(10, 3, 128, transform=lambda s: s)
    assert np.array_equal(ds[9].image, direct[2].image)


def test_different_indices_and_seeds_differ():
    images = [render_scene(0, i, 128).image for i in range(6)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])
    assert not np.array_equal(render_scene(0, 0, 128).image, render_scene(1, 0, 128).image)


@pytest.mark.parametrize("size", SIZES)
def test_box_tightly_encloses_mask(size):
    for i in range(40):
        sc = render_scene(11, i, size)
        x0, y0, x1, y1 = sc.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        ys, xs = np.nonzero(sc.mask)
        assert xs.min() == x0 and xs.max() == x1 - 1 and ys.min() == y0 and ys.max() == y1 - 1
        inside = np.zeros_like(sc.mask)
        inside[y0:y1, x0:x1] = True
        assert not (sc.mask & ~inside).any()


def test_mask_pixels_differ_from_background():
    for i in range(60):
        sc = render_scene(5, i, 160)
        bg = render_scene(5, i, 160, draw_object=False)
        assert np.array_equal(bg.mask, sc.mask) and bg.label == sc.label
        diff = np.abs(sc.image.astype(int) - bg.image.astype(int)).sum(2)
        assert (diff[~sc.mask] == 0).all()            # nothing outside the mask changes
        assert np.mean(diff[sc.mask] > 30) > 0.9      # the object really shows where the mask says
        # and the object stands out against its immediate surroundings
        assert np.linalg.norm(sc.image[sc.mask].mean(0) - bg.image[sc.mask].mean(0)) > 50


def test_objects_are_not_tiny_not_huge_and_spread():
    size = 160
    scenes = [render_scene(21, i, size) for i in range(400)]
    labels = np.array([s.label for s in scenes])
    assert set(labels.tolist()) == set(range(len(CLASS_NAMES)))
    area = np.array([s.mask.mean() for s in scenes])
    assert area.min() > 0.005 and area.max() < 0.25
    centres = np.array([((s.box[0] + s.box[2]) / 2, (s.box[1] + s.box[3]) / 2) for s in scenes])
    dist = np.linalg.norm(centres - size / 2, axis=1)
    assert dist.mean() > 0.2 * size
    # a centred prior would point at the object only rarely
    assert np.mean([s.mask[size // 2, size // 2] for s in scenes]) < 0.25
    # all four quadrants are used
    quadrants = (centres[:, 0] > size / 2).astype(int) * 2 + (centres[:, 1] > size / 2)
    assert np.bincount(quadrants, minlength=4).min() > 50


def test_tensor_helpers():
    ds = SceneDataset(4, 2, 128)
    assert len(ds) == 4
    x, y = ds[1]
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32 and y == render_scene(2, 1, 128).label
    img = render_scene(2, 1, 128).image
    expect = (img[5, 7] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(x[:, 5, 7].numpy(), expect, atol=1e-5)
    xb, yb, scenes = scene_batch(2, [0, 1], 128)
    assert xb.shape == (2, 3, 128, 128) and yb.dtype == torch.int64
    assert torch.allclose(xb[1], x)
    assert torch.allclose(to_tensor(np.stack([s.image for s in scenes])), xb)
    with pytest.raises(IndexError):
        ds[4]


def test_clutter_curriculum_keeps_the_object():
    full = render_scene(4, 17, 128)
    plain = render_scene(4, 17, 128, clutter=0.0)
    assert plain.label == full.label and plain.box == full.box and np.array_equal(plain.mask, full.mask)
    bg = plain.image[~plain.mask].reshape(-1, 3).astype(float)
    assert bg.std(0).max() < 1.0  # flat background without clutter
    assert np.array_equal(render_scene(4, 17, 128, clutter=1.0).image, full.image)


def test_palette_curriculum_goes_from_plain_greys_to_the_random_colours():
    for index in range(12):
        full = render_scene(4, index, 128)
        plain = render_scene(4, index, 128, clutter=0.0, palette=0.0)
        assert plain.label == full.label and plain.box == full.box and np.array_equal(plain.mask, full.mask)
        coloured = render_scene(4, index, 128, clutter=0.0)
        under = render_scene(4, index, 128, clutter=0.0, draw_object=False).image[full.mask].astype(float).mean(0)
        light = (coloured.image[full.mask].astype(float).mean(0) - under) @ LUMA > 0
        obj, bg = plain.image[plain.mask].astype(float), plain.image[~plain.mask].astype(float)
        # the plain scene keeps the polarity of the coloured one at the same clutter; only the object's shading
        # (up to 25 levels) varies, the background is one grey
        want_obj, want_bg = (PLAIN_LIGHT, PLAIN_DARK) if light else (PLAIN_DARK, PLAIN_LIGHT)
        assert abs(np.median(obj) - want_obj) <= 25 and np.abs(bg - want_bg).max() <= 1
        half = render_scene(4, index, 128, clutter=0.0, palette=0.5)
        # halfway, each background pixel is the mean of the plain grey and the random colour
        assert np.abs(half.image[~half.mask].astype(float)
                      - (coloured.image[~coloured.mask].astype(float) + want_bg) / 2).max() <= 1
        assert np.array_equal(render_scene(4, index, 128, palette=1.0).image, full.image)


def test_objects_stand_out_in_luma_both_ways():
    differences = []
    for index in range(200):
        scene = render_scene(9, index, 96)
        under = render_scene(9, index, 96, draw_object=False).image[scene.mask].astype(float).mean(0)
        differences.append((scene.image[scene.mask].astype(float).mean(0) - under) @ LUMA)
    differences = np.array(differences)
    # shading is symmetric about the centre and sensor noise has mean 0: the mean keeps the chosen contrast
    assert np.abs(differences).min() >= MIN_LUMA_CONTRAST - 8
    assert 0.35 <= (differences > 0).mean() <= 0.65  # light-on-dark and dark-on-light both common

"""pfcam's metrics against the reference packages themselves (Quantus 0.6), and every minimal case of issue #23
that is not a box-accuracy case (those are in tests/test_boxacc_wsol.py, ROAD's in tests/test_road.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cams
from cams import metrics as M
from cams import sanity as S
from pfnet.resnet import PFResNet

quantus = pytest.importorskip("quantus")


def plateau_maps(seed: int, n: int = 24, side: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Maps with tied maxima (plateaus and scattered twins) and non-empty object masks."""
    rng = np.random.default_rng(seed)
    maps = np.round(rng.random((n, side, side)) * 150) / 150  # 151 levels: the maximum often ties
    masks = np.zeros((n, side, side), dtype=bool)
    for i in range(n):
        y0, x0 = rng.integers(0, side - 4, size=2)
        h, w = rng.integers(2, side // 2, size=2)
        masks[i, y0:y0 + h, x0:x0 + w] = True
    return maps.astype(np.float32), masks


def test_issue_2x2_plateau_object_at_0_1():
    mask = np.zeros((2, 2), dtype=bool)
    mask[0, 1] = True
    h = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert M.pointing_game(h, mask=mask, tolerance=0)  # the first argmax (0, 0) would miss
    assert M.pointing_game(h[:, ::-1], mask=mask[:, ::-1], tolerance=0)


def test_pointing_game_is_mirror_invariant():
    maps, masks = plateau_maps(1)
    for h, mask in zip(maps, masks):
        for tolerance in (0, 2.0, None):
            expected = M.pointing_game(h, mask=mask, tolerance=tolerance)
            for flip in (lambda a: a[:, ::-1], lambda a: a[::-1, :], lambda a: a[::-1, ::-1], np.transpose):
                assert M.pointing_game(flip(h), mask=flip(mask), tolerance=tolerance) == expected


def test_pointing_game_with_tolerance_takes_the_nearest_maximum():
    h = np.zeros((30, 30))
    h[0, 0] = h[20, 20] = 1.0
    mask = np.zeros((30, 30), dtype=bool)
    mask[20, 23:26] = True  # 3 px to the right of the second maximum
    assert M.pointing_game(h, mask=mask, tolerance=3.0) and not M.pointing_game(h, mask=mask, tolerance=2.9)


def test_pointing_game_equals_quantus_any_maximum():
    maps, masks = plateau_maps(2)
    ours = [M.pointing_game(h, mask=m, tolerance=0) for h, m in zip(maps, masks)]
    theirs = quantus.PointingGame(disable_warnings=True, display_progressbar=False)(
        model=None, x_batch=np.zeros((len(maps), 1, *maps.shape[1:]), np.float32), y_batch=np.zeros(len(maps), int),
        a_batch=maps[:, None], s_batch=masks[:, None].astype(np.float32))
    assert 0 < sum(ours) < len(ours)
    assert [bool(v) for v in theirs] == ours


def test_energy_in_box_equals_quantus_relevance_mass_accuracy():
    rng = np.random.default_rng(3)
    maps = rng.random((8, 16, 16)).astype(np.float32)
    masks = np.zeros((8, 16, 16), dtype=bool)
    boxes = [(2 + i, 1, 9 + i, 12) for i in range(8)]
    for i, box in enumerate(boxes):
        masks[i] = M.box_to_mask(box, (16, 16))
    theirs = quantus.RelevanceMassAccuracy(disable_warnings=True, display_progressbar=False)(
        model=None, x_batch=np.zeros((8, 1, 16, 16), np.float32), y_batch=np.zeros(8, int), a_batch=maps[:, None],
        s_batch=masks[:, None].astype(np.float32))
    np.testing.assert_allclose([M.energy_in_box(h, box) for h, box in zip(maps, boxes)], theirs, atol=1e-6)


def test_deletion_insertion_takes_a_baseline_per_image():
    """Issue #23: 2 images, 17 steps, a zero baseline per image crashed (``expand_as``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    images = torch.randn(2, 3, 8, 8)
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    per_image = M.deletion_insertion(model, images, maps, [0, 1], steps=17, baseline=torch.zeros(2, 3, 8, 8))
    shared = M.deletion_insertion(model, images, maps, [0, 1], steps=17, baseline=0.0)
    np.testing.assert_allclose(per_image.deletion, shared.deletion, atol=1e-6)
    baselines = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    mixed = M.deletion_insertion(model, images, maps, [0, 1], steps=17, baseline=baselines, batch_size=2)
    alone = M.deletion_insertion(model, images[1:], maps[1:], [1], steps=17, baseline=1.0)
    np.testing.assert_allclose(mixed.deletion[1], alone.deletion[0], atol=1e-6)


# ------------------------------------------------------------------------------------------------------ MPRT


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = PFResNet("conv", num_classes=3, width_mult=0.125, depths=(1, 1, 1, 1)).eval()
    return model, torch.randn(4, 3, 32, 32)


def layercam(model, inputs, targets, **_) -> np.ndarray:
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
    result = cams.explain(model, x, ["layer3"], method="layercam", targets=[[int(t)] for t in np.asarray(targets)],
                          align="none")
    return result.heatmaps[:, 0].numpy()  # [N, 1, H, W]


def quantus_randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Quantus's cascade to its end: every module with ``reset_parameters``, top down, ``manual_seed(seed + 1)``."""
    import copy

    out = copy.deepcopy(model)
    for _, module in [m for m in out.named_modules() if hasattr(m[1], "reset_parameters")][::-1]:
        torch.manual_seed(seed + 1)
        module.reset_parameters()
    return out.eval()


def test_mprt_endpoint_equals_quantus(tiny):
    """Quantus's MPRT endpoint (every layer randomised, Spearman of the maps) on a fixed model and seed equals
    pfcam's Spearman of the trained model's maps and the same randomised model's (pfcam's own cascade randomises
    whole blocks with its own initialisation: docs/measuring.md)."""
    model, images = tiny
    targets = np.zeros(len(images), dtype=int)
    seed = 7
    theirs = quantus.MPRT(seed=seed, return_last_correlation=True, disable_warnings=True,
                          display_progressbar=False)(
        model=model, x_batch=images.numpy(), y_batch=targets, a_batch=None, explain_func=layercam, batch_size=4)
    trained = layercam(model, images.numpy(), targets)[:, 0]
    randomised = layercam(quantus_randomised(model, seed), images.numpy(), targets)[:, 0]
    ours = S.spearman(trained, randomised)
    assert not any(M.is_flat(m) for m in randomised)  # Quantus scores a flat map NaN; pfcam 0 (documented)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)

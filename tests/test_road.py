"""ROAD against pytorch-grad-cam's implementation on a tiny model, and the removal rules and imputation on their own."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import (AveragerAcrossThresholds,
                                                              PerturbationConfidenceMetric, RemoveLeastRelevantFirst,
                                                              RemoveMostRelevantFirst)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

import cams
from cams import road as R
from pfnet.resnet import PFResNet

PERCENTILES = [10, 20, 30, 40, 50, 60, 70, 80, 90]


@pytest.fixture(scope="module")
def tiny():
    """A seeded tiny ResNet, 3 images of 32 px, their LayerCAM maps at layer3 (ties: about 6 % of each map at 0)."""
    torch.manual_seed(0)
    model = PFResNet("conv", num_classes=3, width_mult=0.125, depths=(1, 1, 1, 1)).eval()
    images = torch.randn(3, 3, 32, 32)
    result = cams.explain(model, images, ["layer3"], method="layercam", align="none")
    return model, images, result.heatmaps[:, 0, 0].numpy(), result.targets[:, 0].numpy()


def grad_cam_road(order: str, percentiles=PERCENTILES):
    """pytorch-grad-cam's ROAD average with its imputer's noise turned off (comparable without sharing a RNG)."""
    remove = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    return AveragerAcrossThresholds(
        lambda p: PerturbationConfidenceMetric(remove(p, NoisyLinearImputer(noise=0.0))), percentiles)


def test_imputation_system_is_pytorch_grad_cams():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 9, 11))
    removed = rng.random((9, 11)) < 0.6
    a, b, missing = R.imputation_system(removed, image)
    a_ref, b_ref = NoisyLinearImputer.setup_sparse_system((~removed).astype(np.float32), image, neighbors_weights)
    np.testing.assert_allclose(a.toarray(), a_ref.toarray(), atol=1e-15)
    np.testing.assert_allclose(b, b_ref, atol=1e-12)
    assert missing.tolist() == np.flatnonzero(removed).tolist()


def test_impute_without_noise_is_pytorch_grad_cams_imputer():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.normal(size=(3, 16, 16)).astype(np.float32))
    removed = rng.random((16, 16)) < 0.7
    ours = R.impute(image, removed, noise=0.0)
    theirs = NoisyLinearImputer(noise=0.0)(image, torch.from_numpy((~removed).astype(np.float32)))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(ours[:, ~torch.from_numpy(removed)], image[:, ~torch.from_numpy(removed)])


def test_noise_is_seeded_and_only_on_removed_pixels():
    image = torch.zeros(3, 64, 64)
    removed = np.zeros((64, 64), bool)
    removed[10:50, 10:50] = True
    a = R.impute(image, removed, noise=0.01, generator=torch.Generator().manual_seed(3))
    b = R.impute(image, removed, noise=0.01, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    inside = a[:, torch.from_numpy(removed)]
    assert float(inside.std()) == pytest.approx(0.01, rel=0.05)  # imputing zeros gives zeros, plus the noise
    assert torch.count_nonzero(a[:, ~torch.from_numpy(removed)]) == 0
    everything = R.impute(torch.ones(3, 8, 8), np.ones((8, 8), bool), noise=0.0)
    assert torch.equal(everything, torch.zeros(3, 8, 8))  # nothing to impute from: 0, the normalised mean


@pytest.mark.parametrize(("score", "target"), [("probability", ClassifierOutputSoftmaxTarget),
                                           ("logit", ClassifierOutputTarget)])
def test_road_equals_pytorch_grad_cam_on_a_tiny_model(tiny, score, target):
    model, images, heatmaps, classes = tiny
    assert max(float((h == h.min()).mean()) for h in heatmaps) < 0.1  # no percentile lands on the tie at 0
    fractions = [1 - p / 100 for p in PERCENTILES]
    ours = R.road(model, images, heatmaps, classes, fractions=fractions, removal="percentile", score=score,
                  noise=0.0, batch_size=5)
    targets = [target(int(c)) for c in classes]
    morf = grad_cam_road("morf")(images, heatmaps, targets, model)
    lerf = grad_cam_road("lerf")(images, heatmaps, targets, model)
    np.testing.assert_allclose(ours.morf_score - ours.original, morf, atol=1e-5)
    np.testing.assert_allclose(ours.lerf_score - ours.original, lerf, atol=1e-5)
    np.testing.assert_allclose(ours.combined, (lerf - morf) / 2, atol=1e-5)
    # and fraction by fraction
    for j, p in enumerate(PERCENTILES):
        one = grad_cam_road("morf", [p])(images, heatmaps, targets, model)
        np.testing.assert_allclose(ours.morf[:, j] - ours.original, one, atol=1e-5)


def test_rank_removal_equals_pytorch_grad_cam_where_nothing_ties(tiny):
    model, images, _, classes = tiny
    heatmaps = np.random.default_rng(2).random((3, 32, 32)).astype(np.float32)
    fractions = [1 - p / 100 for p in PERCENTILES]
    ours = R.road(model, images, heatmaps, classes, fractions=fractions, removal="rank", noise=0.0)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    np.testing.assert_allclose(ours.morf_score - ours.original,
                               grad_cam_road("morf")(images, heatmaps, targets, model), atol=1e-5)
    np.testing.assert_allclose(ours.lerf_score - ours.original,
                               grad_cam_road("lerf")(images, heatmaps, targets, model), atol=1e-5)
    for order in R.ORDERS:
        assert np.array_equal(R.removal_masks(heatmaps[0], fractions, order, "rank"),
                              R.removal_masks(heatmaps[0], fractions, order, "percentile"))


def test_rank_removal_takes_exact_counts_where_percentiles_take_every_tie():
    h = np.zeros((10, 10), np.float32)
    h[:3] = np.linspace(0.1, 1.0, 30).reshape(3, 10)  # 30 distinct values above a plateau of 70 zeros
    morf = R.removal_masks(h, [0.5], "morf", "rank")[0]
    assert morf.sum() == 100 - 50 and morf[:3].all()  # 100 - ceil(0.5 * 99) pixels: the 30, then 20 zeros
    assert morf[3, :10].all() and morf[4, :10].all() and not morf[5:].any()  # zeros go in row-major order
    lerf = R.removal_masks(h, [0.1], "lerf", "rank")[0]
    assert lerf.sum() == 100 - 90 and lerf[3].all() and not lerf[:3].any()
    # pytorch-grad-cam's rule: the 50th percentile is 0, nothing lies below it, so MoRF removes everything
    assert R.removal_masks(h, [0.5], "morf", "percentile")[0].all()
    assert R.removal_masks(h, [0.1], "lerf", "percentile")[0].sum() == 70  # every zero, not 10 pixels
    with pytest.raises(ValueError):
        R.removal_masks(h, [1.0], "morf")


def test_road_is_seeded_and_independent_of_batch_size(tiny):
    model, images, heatmaps, classes = tiny
    a = R.road(model, images, heatmaps, classes, fractions=[0.2, 0.6], seed=1, batch_size=3)
    b = R.road(model, images, heatmaps, classes, fractions=[0.2, 0.6], seed=1, batch_size=7)
    assert a.morf.shape == (3, 2) and np.array_equal(a.morf, b.morf) and np.array_equal(a.lerf, b.lerf)
    two = R.road(model, images, np.stack([heatmaps, heatmaps], axis=1), classes, fractions=[0.2, 0.6], seed=1)
    assert two.morf.shape == (3, 2, 2)
    np.testing.assert_array_equal(two.morf[0, 0], a.morf[0])  # the first image's first map: the same draws
    assert not np.array_equal(two.morf[:, 0], two.morf[:, 1])  # the same map again: fresh noise
    np.testing.assert_allclose(two.morf[:, 0], two.morf[:, 1], atol=0.05)  # ... which moves the scores a little
    with pytest.raises(ValueError):
        R.road(model, images, heatmaps[:2], classes)


def test_issue_4x4_map_with_twelve_zeros_at_half():
    """Issue #23: pytorch-grad-cam removes all 16 pixels of this map at f = 0.5; the default follows it."""
    h = np.zeros((4, 4), np.float32)
    h[0] = [0.4, 0.3, 0.2, 0.1]
    kept = []
    RemoveMostRelevantFirst(50, lambda image, mask: kept.append(mask.numpy()))(torch.zeros(3, 4, 4),
                                                                             torch.from_numpy(h))
    assert not kept[0].any()  # pytorch-grad-cam keeps nothing: all 16 pixels go
    assert np.array_equal(R.removal_masks(h, [0.5], "morf")[0], kept[0] == 0)  # the default: its rule
    assert R.removal_masks(h, [0.5], "morf", "rank")[0].sum() == 8


def test_default_removal_equals_pytorch_grad_cam_on_tied_maps(tiny):
    """Maps with a plateau of zeros (a ReLU'd CAM): the default ROAD is pytorch-grad-cam's ROAD classes'."""
    model, images, heatmaps, classes = tiny
    tied = np.where(heatmaps < np.quantile(heatmaps, 0.4, axis=(1, 2), keepdims=True), 0.0, heatmaps)
    tied = tied.astype(np.float32)
    fractions = [1 - p / 100 for p in PERCENTILES]
    ours = R.road(model, images, tied, classes, fractions=fractions, noise=0.0)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    np.testing.assert_allclose(ours.morf_score - ours.original,
                               grad_cam_road("morf")(images, tied, targets, model), atol=1e-5)
    np.testing.assert_allclose(ours.lerf_score - ours.original,
                               grad_cam_road("lerf")(images, tied, targets, model), atol=1e-5)

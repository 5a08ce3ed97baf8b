"""Heatmap alignment: the fitted offset, the shifted drawing, and how explain / pfnet.load use them."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pfnet
from cams import explain
from cams import metrics
from cams.align import AlignError, fit_offset, layer_offsets, layer_strides, sampling_grid, shift_heatmap
from cams.layers import LayerError
from cams.engine import normalise
from pfnet import zoo


def disc(size, centre, radius):
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_fit_offset_recovers_a_known_displacement():
    rng = np.random.default_rng(0)
    masks, peaks = [], []
    for _ in range(40):
        centre = rng.integers(20, 108, size=2)
        masks.append(disc(128, centre, 4))
        peaks.append((int(centre[0]) + 9, int(centre[1]) - 5))  # every peak 9 px low, 5 px left
    peaks.append(None)  # a flat map is skipped
    masks.append(disc(128, (64, 64), 4))
    assert fit_offset(peaks, masks, max_shift=16) == (-9.0, 5.0)


def test_fit_offset_aims_at_centres_and_clips_moved_peaks():
    masks = [disc(64, (32, 32), 10)] * 4
    # all peaks inside the object, but on average 2 px above and 3 px left of its centre
    assert fit_offset([(30, 29), (30, 29), (29, 30), (31, 28)], masks, max_shift=8) == (2.0, 3.0)
    assert fit_offset([(32, 32)] * 4, masks, max_shift=8) == (0.0, 0.0)
    block = np.zeros((64, 64), bool)
    block[56:, 56:] = True  # centre (59.5, 59.5): shifts 19 and 20 are equally good, the smaller wins
    assert fit_offset([(40, 40)], [block], max_shift=30) == (19.0, 19.0)
    # a peak in the corner cannot be moved out of the image: every positive shift costs what 0 costs
    assert fit_offset([(63, 63)], [block], max_shift=8) == (-3.0, -3.0)


def test_fit_offset_refuses_what_it_cannot_fit():
    with pytest.raises(AlignError, match="no heatmap"):
        fit_offset([None, None], [disc(32, (16, 16), 3)] * 2, max_shift=4)
    with pytest.raises(AlignError, match="non-empty 2-D"):
        fit_offset([(1, 1)], [np.zeros((32, 32), bool)], max_shift=4)
    with pytest.raises(AlignError, match="2 peaks for 1"):
        fit_offset([(1, 1), (2, 2)], [disc(32, (16, 16), 3)], max_shift=4)


def test_peak_of_flat_and_non_finite_maps_is_none():
    """What fit_offset is given: cams.metrics.peak, None where a map has no peak to align."""
    assert metrics.peak(np.zeros((8, 8))) is None
    assert metrics.peak(np.full((8, 8), np.nan)) is None
    heat = np.zeros((8, 8))
    heat[5, 2] = 1
    assert metrics.peak(heat) == (5, 2)


def test_zero_offset_grid_is_the_plain_bilinear_resize():
    maps = torch.rand(3, 1, 4, 5)
    grid = sampling_grid((128, 160), (0.0, 0.0)).expand(3, -1, -1, -1)
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    plain = F.interpolate(maps, size=(128, 160), mode="bilinear", align_corners=False)
    assert torch.allclose(sampled, plain, atol=1e-5)


@pytest.mark.parametrize("offset", [(-16.0, 8.0), (5.0, -3.0)])
def test_normalise_draws_the_map_moved_by_the_offset_with_edges_replicated(offset):
    raw = torch.rand(2, 4, 4)
    base = normalise(raw, (128, 128)).numpy()
    moved = normalise(raw, (128, 128), offset).numpy()
    dy, dx = (int(v) for v in offset)
    rows = np.clip(np.arange(128) - dy, 0, 127)
    cols = np.clip(np.arange(128) - dx, 0, 127)
    expected = base[:, rows[:, None], cols[None, :]]
    # min-max after the shift: the moved map still spans [0, 1] only if its peak stayed in view
    for b in range(2):
        e = expected[b]
        e = (e - e.min()) / (e.max() - e.min())
        assert np.allclose(moved[b], e, atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return pfnet.resnet.PFResNet("max", num_classes=4, width_mult=0.125).eval()


def test_explain_uses_the_models_offsets_unless_told_otherwise(tiny):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    plain = explain(tiny, images, ["layer3", "layer4"], align="none").heatmaps
    assert torch.equal(explain(tiny, images, ["layer3", "layer4"]).heatmaps, plain)  # no offsets recorded
    tiny.cam_offsets = {"layer4": (-15.0, -16.0)}
    try:
        aligned = explain(tiny, images, ["layer3", "layer4"]).heatmaps
        # layer3 has no offset; layer4's maps are the plain ones moved up-left
        assert torch.equal(aligned[:, :, 0], plain[:, :, 0])
        rows = np.clip(np.arange(64) + 15, 0, 63)
        cols = np.clip(np.arange(64) + 16, 0, 63)
        assert all(not metrics.is_flat(plain[n, 0, 1].numpy()) for n in range(2))  # something to move
        for n in range(2):
            want = plain[n, 0, 1].numpy()[rows[:, None], cols[None, :]]
            if want.max() > want.min():
                want = (want - want.min()) / (want.max() - want.min())
            assert np.allclose(aligned[n, 0, 1].numpy(), want, atol=1e-4)
        assert torch.equal(explain(tiny, images, ["layer4"], align="none").heatmaps[:, :, 0], plain[:, :, 1])
        # the same tensor under a longer name gets the same offset, whichever name the mapping uses
        assert layer_offsets(tiny, ["layer4.2"]) == [(-15.0, -16.0)]
        assert layer_offsets(tiny, ["layer4"], {"layer4": [1, 2]}) == [(1.0, 2.0)]
        assert layer_offsets(tiny, ["layer4"], {"layer4.2": [1, 2]}) == [(1.0, 2.0)]
    finally:
        del tiny.cam_offsets


@pytest.mark.parametrize(("align", "message"), [("rf", "align must be one of"), (None, "align must be one of"),
                                            (True, "align must be one of"), ({"layer4": (1,)}, "pair"),
                                            ({"layer4": (float("nan"), 0)}, "finite")])
def test_bad_alignment_is_refused_clearly(tiny, align, message):
    with pytest.raises(AlignError, match=message):
        explain(tiny, torch.randn(1, 3, 64, 64), ["layer4"], align=align)


def test_an_offset_for_a_layer_the_model_lacks_is_refused(tiny):
    with pytest.raises(LayerError, match="unknown layer 'layer5'"):
        explain(tiny, torch.randn(1, 3, 64, 64), ["layer4"], align={"layer5": (1, 1)})


def test_layer_strides_come_from_the_network():
    model = pfnet.resnet.PFResNet("conv", num_classes=4, width_mult=0.125).eval()
    assert layer_strides(model, ["layer1", "layer3", "layer4.2"], (128, 96)) == [4, 16, 32]


def test_shift_heatmap_refuses_what_it_cannot_draw_exactly():
    with pytest.raises(AlignError, match="whole pixels"):
        shift_heatmap(np.eye(8, dtype=np.float32), (0.4, 0))
    with pytest.raises(AlignError, match="2-D"):
        shift_heatmap(np.zeros(8, np.float32), (1, 1))
    moved = shift_heatmap(np.eye(8, dtype=np.float32), (2, 0))
    assert moved[4, 2] == 1.0 and moved[2, 2] == 0.0 and moved[0, 0] == 1.0  # edge rows replicated


def test_demo_models_carry_their_fitted_offsets_only_with_their_own_weights():
    entry = zoo.get("demo_r50_max")
    card = zoo.demo_card()["models"]["r50_max"]
    assert entry.cam_offsets == {layer: tuple(v) for layer, v in card["cam_offsets"].items()}
    assert entry.preprocess.input_size == card["input_size"]
    model = pfnet.load("demo_r50_max", device="cpu")
    assert model.cam_offsets == entry.cam_offsets
    dy, dx = model.cam_offsets["layer4"]
    assert -32 <= dy < 0 and -32 <= dx < 0  # a max-pool net draws its layer-4 maps down-right of its objects
    reloaded = pfnet.load("demo_r50_max", weights=str(zoo.DEMO_DIR / card["file"]), device="cpu")
    assert reloaded.cam_offsets == {}
    assert zoo.get("r50").cam_offsets == {}


def test_layer_strides_from_the_structure_equal_the_measured_ones():
    from cams.align import layer_stride
    from cams.layers import layer_names

    for model, size in [(pfnet.resnet.PFResNet("hybrid", num_classes=4, width_mult=0.125).eval(), (96, 128)),
                        (zoo.get("pit_s_max").build().eval(), (224, 224))]:
        names = layer_names(model)
        assert [layer_stride(model, name) for name in names] == layer_strides(model, names, size)
    model = pfnet.resnet.PFResNet("max", num_classes=4, width_mult=0.125)
    assert [layer_stride(model, n) for n in ("stem", "layer1.2", "layer2.0.conv_block", "layer3", "layer4.1")] == \
        [4, 4, 8, 16, 32]


def test_a_recorded_offset_is_shared_by_the_layers_of_its_stride(tiny):
    from cams.align import stride_offsets

    tiny.cam_offsets = {"layer4": (-15.0, -16.0)}
    try:
        same = ["layer4.0", "layer4.0.conv_block", "layer4.1", "layer4.2", "layer4"]
        assert layer_offsets(tiny, same + ["layer3.5", "layer1", "stem"]) == [(-15.0, -16.0)] * 5 + [(0.0, 0.0)] * 3
        assert stride_offsets(tiny) == {32: (-15.0, -16.0)}
        # drawn alike: layer4.1's aligned map is its plain map moved by layer4's offset
        images = torch.randn(1, 3, 64, 64)
        moved = explain(tiny, images, ["layer4.1"], align={"layer4.1": (-15, -16)}).heatmaps
        assert torch.equal(explain(tiny, images, ["layer4.1"]).heatmaps, moved)
        # an explicit mapping is applied to the layers it names only
        assert layer_offsets(tiny, ["layer4.1", "layer4"], {"layer4": (1, 2)}) == [(0.0, 0.0), (1.0, 2.0)]
        # recorded offsets of one stride that disagree: each recorded layer keeps its own, the others none
        tiny.cam_offsets = {"layer4": (-15.0, -16.0), "layer4.0": (-9.0, -9.0), "layer3": (-4.0, -4.0)}
        assert layer_offsets(tiny, ["layer4.0", "layer4.1", "layer4.2", "layer3.1"]) == \
            [(-9.0, -9.0), (0.0, 0.0), (-15.0, -16.0), (-4.0, -4.0)]
        assert stride_offsets(tiny) == {32: None, 16: (-4.0, -4.0)}
    finally:
        del tiny.cam_offsets

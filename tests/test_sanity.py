"""The randomisation sanity check: comparisons with known answers, the units, reproducible re-initialisation, a model
whose randomised unit does not change its output, the demo model failing after full randomisation, the CLI."""
from __future__ import annotations

import copy
import csv
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from torch import nn

from cams import sanity as S
from pfnet.pit import PiTMax
from pfnet.resnet import PFResNet
from pfnet.vit import ViTMax


def tiny_resnet(seed: int = 0, variant: str = "conv") -> PFResNet:
    torch.manual_seed(seed)
    return PFResNet(variant, num_classes=3, width_mult=0.125, depths=(1, 1, 1, 1)).eval()


# ------------------------------------------------------------------------------------------- comparisons


def test_spearman_known_answers():
    rng = np.random.default_rng(0)
    a = rng.random((12, 10))
    assert S.spearman(a, a ** 3 + 2) == pytest.approx(1.0)   # any increasing transform
    assert S.spearman(a, -a) == pytest.approx(-1.0)
    b = np.round(rng.random((12, 10)) * 4) / 4                # many ties
    c = np.round(rng.random((12, 10)) * 3) / 3
    assert S.spearman(b, c) == pytest.approx(spearmanr(b.ravel(), c.ravel()).statistic, abs=1e-12)
    batch = S.spearman(np.stack([a, b]), np.stack([-a, c]))
    assert batch.shape == (2,) and batch[0] == pytest.approx(-1.0)


def test_spearman_of_flat_maps():
    flat, ramp = np.zeros((8, 8)), np.arange(64.0).reshape(8, 8)
    assert S.spearman(flat, ramp) == 0.0 and S.spearman(ramp, flat) == 0.0
    assert S.spearman(flat, flat) == 1.0


def brute_force_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al.'s SSIM written out window by window (an independent implementation)."""
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_known_answers():
    rng = np.random.default_rng(1)
    x, y = rng.random((16, 19)), rng.random((16, 19))
    assert S.ssim(x, x) == pytest.approx(1.0)
    assert S.ssim(x, y) == pytest.approx(brute_force_ssim(x, y), abs=1e-12)
    assert S.ssim(x, y) == pytest.approx(S.ssim(y, x))
    # two constant maps: (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.8, 0.2, 0.01 ** 2
    assert S.ssim(np.full((12, 12), a), np.full((12, 12), b)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    assert S.ssim(np.stack([x, x]), np.stack([x, y])).tolist() == pytest.approx([1.0, S.ssim(x, y)])
    with pytest.raises(ValueError):
        S.ssim(x, y[:, :5])


# ------------------------------------------------------------------------------------------------- units


def _covered(model: nn.Module, units) -> list[str]:
    names = []
    for unit in units:
        for path in unit.modules:
            names += [f"{path}.{name}" for name, _ in model.get_submodule(path).named_parameters()]
        names += list(unit.parameters)
    return names


@pytest.mark.parametrize("model", [
    PFResNet("hybrid", num_classes=3, width_mult=0.125),
    ViTMax(img_size=32, patch_size=8, num_classes=3, embed_dim=16, depth=4, num_heads=2),
    PiTMax(img_size=32, patch_size=8, stride=4, base_dims=8, heads=(1, 2), depths=(2, 1), num_classes=3),
], ids=["resnet", "vit", "pit"])
def test_units_run_from_the_head_down_and_cover_every_parameter_once(model):
    units = S.randomisation_units(model)
    covered = _covered(model, units)
    assert sorted(covered) == sorted(name for name, _ in model.named_parameters())
    assert len(covered) == len(set(covered))
    labels = [unit.label for unit in units]
    if isinstance(model, PFResNet):
        assert labels[:4] == ["fc", "layer4.2", "layer4.1", "layer4.0"] and labels[-2:] == ["layer1.0", "conv1"]
        assert len(labels) == 18  # head, 16 blocks, stem
    elif isinstance(model, ViTMax):
        assert labels == ["head", "blocks.3", "blocks.2", "blocks.1", "blocks.0", "patch_embed"]
    else:
        assert labels == ["head", "transformers.1.blocks.0", "pools.0", "transformers.0.blocks.1",
                          "transformers.0.blocks.0", "patch_embed"]


def test_reinitialise_is_reproducible_per_unit_and_changes_the_weights():
    model = tiny_resnet()
    unit = S.Unit("layer2.0", ("layer2.0",))
    first, second, other = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    S.reinitialise(first, unit, seed=5)
    S.reinitialise(second, S.Unit("fc", ("fc",)), seed=5)  # another unit first: same weights for layer2.0 after
    S.reinitialise(second, unit, seed=5)
    S.reinitialise(other, unit, seed=6)
    key = "layer2.0.reduction_block.0.weight"
    assert torch.equal(first.state_dict()[key], second.state_dict()[key])
    assert not torch.equal(first.state_dict()[key], model.state_dict()[key])
    assert not torch.equal(first.state_dict()[key], other.state_dict()[key])
    assert torch.equal(first.state_dict()["layer1.0.reduction_block.0.weight"],
                       model.state_dict()["layer1.0.reduction_block.0.weight"])  # other units untouched
    bn = first.layer2[0].reduction_block[1]
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))


# ---------------------------------------------------------------------------------------- known answers


class WithUnusedPart(PFResNet):
    """A ResNet carrying a module that its forward never uses: re-initialising it cannot change any output."""

    def __init__(self):
        super().__init__("conv", num_classes=3, width_mult=0.125, depths=(1, 1, 1, 1))
        self.unused = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 4))


def test_a_unit_that_does_not_change_the_output_keeps_correlation_one():
    torch.manual_seed(0)
    model = WithUnusedPart().eval()
    before = copy.deepcopy(model.state_dict())
    images = torch.randn(4, 3, 64, 64)
    unit = S.Unit("unused", ("unused",))
    changed = copy.deepcopy(model)
    S.reinitialise(changed, unit, seed=0)
    assert not torch.equal(changed.unused[0].weight, model.unused[0].weight)  # it really is re-initialised
    result = S.sanity_check(model, images, ["layer3", "layer4"], ["gradcam", "eigencam"], units=[unit])
    randomised = [c for c in result.comparisons if c.mode != "reference"]
    assert {(c.mode, c.depth) for c in randomised} == {("cascading", 0), ("cascading", 1), ("independent", 1)}
    for c in randomised:
        assert c.spearman == pytest.approx(np.ones(4), abs=1e-12) and c.ssim == pytest.approx(np.ones(4), abs=1e-12)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())  # model untouched


def test_randomising_the_head_changes_grad_cam_but_not_eigen_cam():
    model = tiny_resnet(1)
    result = S.sanity_check(model, torch.randn(6, 3, 64, 64), ["layer4"], ["gradcam", "eigencam"],
                            modes=("independent",), units=[S.Unit("fc", ("fc",))])
    by_method = {c.method: c for c in result.comparisons if c.mode == "independent"}
    assert by_method["eigencam"].spearman == pytest.approx(np.ones(6), abs=1e-12)  # class-independent
    assert np.median(by_method["gradcam"].spearman) < 0.99


@pytest.mark.slow
def test_demo_grad_cam_loses_its_map_when_every_unit_is_random(one_torch_thread):
    from pfdemo.bench import scene_images as demo_images
    from pfnet import zoo
    from pfnet.weights import load

    model = load("demo_r50")
    images, _ = demo_images(zoo.get("demo_r50").preprocess, 8)
    result = S.sanity_check(model, images, ["layer4"], ["gradcam"], modes=("cascading",))
    cascade = sorted((c for c in result.comparisons if c.mode == "cascading"), key=lambda c: c.depth)
    assert len(cascade) == 19 and cascade[-1].unit == "conv1"
    assert np.median(cascade[0].spearman) == pytest.approx(1.0)
    assert np.median(cascade[-1].spearman) < 0.5


# ---------------------------------------------------------------------------------------------------- CLI


def run_cli(*argv: str) -> tuple[int, str, str]:
    from pfcam.cli import build_parser

    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["sanity", *argv])
    code = args.handler(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_cli_writes_csv_table_and_plot(tmp_path, one_torch_thread):
    csv_path, png, md = tmp_path / "s.csv", tmp_path / "s.png", tmp_path / "s.md"
    code, out, err = run_cli("--models", "demo_r50", "--layers", "layer4", "--methods", "gradcam", "--n", "3",
                             "--modes", "cascading", "--csv", str(csv_path), "--plot", str(png), "--markdown", str(md))
    assert code == 0, err
    rows = list(csv.DictReader(csv_path.open()))
    assert "spearman" in rows[0] and "ssim" in rows[0]
    cascade = [r for r in rows if r["mode"] == "cascading"]
    assert [int(r["depth"]) for r in cascade] == list(range(19))
    assert float(cascade[0]["spearman"]) == pytest.approx(1.0)
    assert {r["randomised"] for r in rows if r["mode"] == "reference"} == {"centre Gaussian", "uniform random"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_mode & 0o777 == 0o644
    assert "demo_r50" in out and "ref: centre Gaussian" in out and "| demo_r50 | layer4 | Grad-CAM |" in md.read_text()
    steps = [line for line in err.splitlines() if line.startswith("[sanity demo_r50] ") and "/19 " in line]
    assert len(steps) == 19  # one line per step when stderr is not a terminal


def test_cli_refuses_bad_arguments_and_skips_models_without_data(tmp_path):
    code, _, err = run_cli("--methods", "nosuch")
    assert code == 2 and "unknown method" in err
    code, _, err = run_cli("--models", "r50", "--methods", "gradcam")
    assert code == 1 and "needs images" in err
    code, _, err = run_cli("--models", "demo_r50", "--csv", str(tmp_path / "missing" / "s.csv"))
    assert code == 2 and "does not exist" in err


def test_folder_images_skips_unreadable_files(tmp_path):
    from cams.sanity_cli import SanityError, folder_images
    from pfnet import zoo

    (tmp_path / "sub").mkdir()
    for index in range(3):
        Image.new("RGB", (40 + index, 30), (index * 60, 90, 30)).save(tmp_path / "sub" / f"{index}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    problems: list[str] = []
    pre = zoo.get("demo_r50").preprocess
    images, names = folder_images(tmp_path, pre, 2, problems)
    assert images.shape == (2, 3, pre.input_size, pre.input_size) and names == ["sub/0.png", "sub/1.png"]
    assert len(problems) == 1 and "broken.jpg" in problems[0]
    with pytest.raises(SanityError):
        folder_images(tmp_path / "sub" / "0.png", pre, 2, [])
    assert not math.isnan(float(images.mean()))

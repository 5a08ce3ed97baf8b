"""pfdemo.train's schedule and its --score-only door, pfdemo.scoring's alignment fit (the training itself is
exercised by the shipped card)."""
import json
import shutil

import pytest

from pfcam.cli import main as pfcam
from pfdemo import scoring, train as train_demo
from pfnet.zoo import DEMO_DIR


@pytest.mark.parametrize(("size", "phases"), [
    (128, [[0.3, 96], [1.0, 128]]),                  # the recipe the 128-px demo models were trained with
    (160, [[0.3, 96], [0.75, 128], [1.0, 160]]),
    (224, [[0.3, 96], [0.75, 128], [1.0, 224]]),
])
def test_size_schedule_ends_at_the_evaluation_size(size, phases):
    assert train_demo.size_phases(size) == phases
    assert train_demo.size_at(0.0, size) == 96 and train_demo.size_at(0.999, size) == size


def test_score_only_refuses_weights_the_card_does_not_describe(tmp_path, capsys):
    assert train_demo.main(["--model", "r50", "--score-only", "--out", str(tmp_path)]) == 2
    assert "no card entry and weights for r50" in capsys.readouterr().err
    card = DEMO_DIR / "demo_card.json"
    if not card.is_file():
        pytest.skip("bundled demo card not present")
    shutil.copy(card, tmp_path / "demo_card.json")
    (tmp_path / "demo_r50.safetensors").write_bytes(b"not the shipped file")
    # the same through pfcam's command line
    assert pfcam(["train-demo", "--model", "r50", "--score-only", "--out", str(tmp_path)]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    assert json.loads((tmp_path / "demo_card.json").read_text()) == json.loads(card.read_text())  # untouched


def test_card_offsets_are_recorded_only_where_the_fits_agree():
    card_path = DEMO_DIR / "demo_card.json"
    if not card_path.is_file():
        pytest.skip("bundled demo card not present")
    for name, entry in json.loads(card_path.read_text())["models"].items():
        for layer, fits in entry["cam_offset_fits"].items():
            assert set(fits) == set(scoring.FIT_METHODS)
            values = list(fits.values())
            spread = max(max(abs(a[k] - b[k]) for a in values for b in values) for k in (0, 1))
            if layer in entry["cam_offsets"]:
                median = [sorted(v[k] for v in values)[1] for k in (0, 1)]
                assert entry["cam_offsets"][layer] == median, (name, layer)
                assert spread <= 2 * scoring.AGREEMENT_PX
            else:
                assert spread > scoring.AGREEMENT_PX, (name, layer)


def test_fit_alignment_records_the_median_only_where_the_methods_agree(monkeypatch):
    """Synthetic Grad-CAM / Grad-CAM++ / LayerCAM peaks displaced from each object's centre by known amounts:
    layer4's three fits agree (recorded, the median), layer3's spread 10 px (not recorded)."""
    import numpy as np
    import torch

    from pfnet.resnet import PFResNet

    displaced = {"layer4": {"gradcam": (6, 7), "gradcampp": (6, 7), "layercam": (7, 8)},
                 "layer3": {"gradcam": (5, 0), "gradcampp": (0, 0), "layercam": (-5, 0)}}
    shown: list = []
    real_batch = scoring.scene_batch

    def batch(*args, **kwargs):
        x, y, scenes = real_batch(*args, **kwargs)
        shown[:] = scenes
        return x, y, scenes

    def maps(net, x, labels, layers, method="gradcam", align="none"):
        out = np.zeros((len(x), len(layers), x.shape[-2], x.shape[-1]), np.float32)
        for i, scene in enumerate(shown):
            ys, xs = np.nonzero(scene.mask)
            for position, layer in enumerate(layers):
                dy, dx = displaced[layer][method]
                out[i, position, int(round(ys.mean())) + dy, int(round(xs.mean())) + dx] = 1.0
        return out

    monkeypatch.setattr(scoring, "scene_batch", batch)
    monkeypatch.setattr(scoring, "label_maps", maps)
    torch.manual_seed(0)
    net = PFResNet("max", num_classes=10, width_mult=0.125).eval()
    report = scoring.fit_alignment(net, 128, n=40, batch=20)
    fits4 = report["layer4"]["fits"]
    assert all(abs(fits4[m][k] + displaced["layer4"][m][k]) <= 1 for m in fits4 for k in (0, 1)), fits4
    assert report["layer4"]["offset"] == [float(np.median([f[k] for f in fits4.values()])) for k in (0, 1)]
    assert report["layer3"]["offset"] is None, report["layer3"]

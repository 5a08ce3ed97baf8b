"""The export's progress: one line per image on a non-terminal stderr (CLI), and explanations passed in by
the caller (``run_export(reuse=...)``, the app's page CAMs) used instead of computing them again."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cams.engine
from cams import Explanation
from cams.export import run_export
from pfnet import PFResNet
from pfnet.preprocess import Preprocess, prepare

ROOT = Path(__file__).resolve().parent.parent


class Entry:
    id, name = "tiny", "Tiny R50"
    preprocess = Preprocess(64, 64)

    def class_names(self) -> list[str]:
        return [f"shape {i}" for i in range(10)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PFResNet("conv", num_classes=10, width_mult=0.25).eval()


def pictures(folder: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"pic{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cli_prints_one_line_per_image_when_stderr_is_not_a_terminal(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    pictures(inputs, 3)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    done = subprocess.run([sys.executable, "-m", "cams", "export", str(inputs), "--out", str(tmp_path / "out"),
                           "--models", "demo_r50", "--device", "cpu", "--batch-size", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PFCAM_OFFLINE": "1", "PFCAM_CACHE": str(tmp_path / "c")})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    progress = [line for line in lines if re.fullmatch(r"\d / 4 images: .*", line)]
    assert [line.split(" images: ")[0] for line in progress] == ["1 / 4", "2 / 4", "3 / 4", "4 / 4"]
    named = sorted(line.split(" images: ", 1)[1] for line in progress)
    assert named[:3] == [str(inputs / f"pic{i}.png") for i in range(3)]
    assert named[3].startswith(f"skipped {inputs / 'broken.png'}: ")
    assert "\r" not in done.stderr  # no bar redrawn in a log
    assert "3 of 4 images processed" in done.stdout


def test_explanations_passed_in_are_used_and_only_the_rest_is_computed(tmp_path, model, monkeypatch):
    from cams.images import load_image

    paths = pictures(tmp_path, 3)
    reference = run_export(paths, tmp_path / "ref", {"tiny": (model, Entry())}, layers=["layer3", "layer4.1"])
    known = {}
    for path in paths[:2]:  # the caller already explained two of the three
        tensor = prepare(load_image(path), Entry.preprocess, "full").tensor.unsqueeze(0)
        known[path.name] = cams.engine.explain(model, tensor, ["layer3", "layer4.1"], targets=1,
                                               class_names=Entry().class_names())
    asked, batches = [], []
    real = cams.engine.explain
    monkeypatch.setattr(cams.engine, "explain", lambda m, images, *a, **k: batches.append(len(images)) or
                        real(m, images, *a, **k))

    def reuse(model_id, item, image):
        asked.append((model_id, Path(item.label).name, image.size))
        return known.get(Path(item.label).name)

    report = run_export(paths, tmp_path / "out", {"tiny": (model, Entry())}, layers=["layer3", "layer4.1"],
                        reuse=reuse)
    assert sorted(asked) == [("tiny", p.name, (48, 40)) for p in paths]
    assert batches == [1]  # only the third image was explained
    assert report.ok and len(report.rows) == 6
    for got, want in zip(report.rows, reference.rows):
        assert (got["image"], got["layer"], got["class_id"]) == (want["image"], want["layer"], want["class_id"])
        assert np.allclose(np.load(tmp_path / "out" / got["heatmap"]), np.load(tmp_path / "ref" / want["heatmap"]),
                           atol=1e-6)


def test_explanations_made_otherwise_are_not_used(tmp_path, model, monkeypatch):
    paths = pictures(tmp_path, 1)
    other = Explanation(heatmaps=torch.zeros(1, 1, 1, 64, 64), targets=torch.zeros(1, 1, dtype=torch.int64),
                        probs=torch.full((1, 10), 0.1), layers=("layer4",), method="gradcam")
    batches = []
    real = cams.engine.explain
    monkeypatch.setattr(cams.engine, "explain", lambda m, images, *a, **k: batches.append(len(images)) or
                        real(m, images, *a, **k))
    for layers, method in [(["layer3"], "gradcam"), (["layer4"], "layercam")]:  # other layers, other method
        report = run_export(paths, tmp_path / f"out-{method}", {"tiny": (model, Entry())}, layers=layers,
                            method=method, reuse=lambda *args: other)
        assert report.ok and all(row["status"] == "computed" for row in report.rows)
    assert batches == [1, 1]
    heat = np.load(tmp_path / "out-layercam" / report.rows[0]["heatmap"])
    assert heat.max() == pytest.approx(1.0)  # computed, not the zeros passed in

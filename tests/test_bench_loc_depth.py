"""bench-loc across depth: --layers blocks, --plot, and the app's depth scores (cams.depth) agreeing with
bench-loc's."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cams import bench_loc
from cams import metrics as M
from cams.layers import block_layers
from pfcam.cli import main
from bench_loc_support import TINY
from pfnet import zoo

FAST = ["--n", "4", "--val-n", "2", "--faith-n", "0", "--batch-size", "4"]


def test_layers_blocks_scores_every_block_in_depth_order_and_plots(tiny_zoo, tmp_path: Path, capsys):
    csv_path, png = tmp_path / "depth.csv", tmp_path / "depth.png"
    assert main(["bench-loc", "--models", TINY, "--layers", "blocks,layer4", "--methods", "gradcam", *FAST,
                 "--csv", str(csv_path), "--plot", str(png)]) == 0, capsys.readouterr().err
    blocks = block_layers(zoo.ZOO[TINY].build())
    with csv_path.open() as handle:
        records = list(csv.DictReader(handle))
    cams = [r for r in records if r["method"] == "gradcam"]
    # every block once (layer4 is layer4.2's tensor: its own row, at the same depth), references last
    assert [r["layer"] for r in cams] == blocks + ["layer4"]
    assert [int(r["depth"]) for r in cams] == list(range(1, len(blocks) + 1)) + [len(blocks)]
    assert [r["method"] for r in records[-2:]] == [bench_loc.GAUSSIAN, bench_loc.RANDOM]
    assert records[-1]["depth"] == ""
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 1000  # one panel per metric


def test_plot_without_block_rows_says_so(tiny_zoo, tmp_path: Path, capsys):
    rows = [bench_loc.Row("m", "-", bench_loc.GAUSSIAN, {"pointing15": 0.5}, kind="baseline")]
    with pytest.raises(ValueError, match="--layers blocks"):
        bench_loc.plot_depth(rows)


def test_progress_is_a_line_per_batch_off_a_terminal(tiny_zoo, capsys):
    import re

    assert main(["bench-loc", "--models", TINY, "--layers", "layer4", "--methods", "gradcam,eigencam", "--n", "6",
                 "--val-n", "3", "--faith-n", "0", "--batch-size", "4"]) == 0
    out, err = capsys.readouterr()
    steps = [tuple(map(int, m.groups())) for m in re.finditer(r"^\[bench-loc\] (\d+)/(\d+) ", err, re.M)]
    # validation: 1 batch; test: 2 batches (all methods of a batch at once)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert "\r" not in err
    assert out.rstrip().splitlines()[-1].split()[1:3] == ["-", "uniform"]  # the table ends with the references


def test_app_depth_scores_agree_with_bench_loc(tiny_zoo):
    """The app's Measure panel (cams.depth, image by image) and bench-loc (``evaluate_model``, batches through every
    method at once) drive the same metrics: on the same images, boxes and layers they give the same values."""
    from cams import explain
    from cams.bench_loc import bench as bench_run
    from cams.depth import DepthScores

    model = bench_run.load_model(TINY)
    torch.manual_seed(2)
    images = torch.randn(4, 3, 64, 64)
    boxes = [(4.0, 4.0, 40.0, 40.0), (20.0, 8.0, 60.0, 50.0), (0.0, 30.0, 34.0, 64.0), (10.0, 12.0, 50.0, 44.0)]
    blocks = block_layers(model)
    samples = [bench_loc.Sample(f"image {index}", M.as_boxes(box)) for index, box in enumerate(boxes)]
    split = bench_loc.Split("images", samples, lambda start, stop: images[start:stop], 64)
    opts = bench_loc.Options(tuple(blocks), ("gradcam",), batch_size=4, faith_n=0, threshold=0.5)
    rows = bench_loc.evaluate_model(model, TINY, zoo.get(TINY).class_names(), None, split, opts)
    gaussian = next(row for row in rows if row.method == bench_loc.GAUSSIAN)
    # energy of the Gaussian reference is a property of the boxes alone: computed by hand
    expected = np.mean([M.energy_in_box(M.centre_gaussian((64, 64)), box=box) for box in boxes])
    assert abs(gaussian.values["energy"] - expected) < 1e-9
    rows = rows[:len(blocks)]
    heatmaps = explain(model, images, blocks, "gradcam").heatmaps[:, 0].numpy()  # [N, L, H, W]
    scores = DepthScores(blocks)
    for image_maps, box in zip(heatmaps, boxes):
        scores.add(image_maps, box)
    values = scores.values()
    assert [row.layer for row in rows] == blocks
    for index, row in enumerate(rows):
        assert abs(row.values["pointing15"] - values["pointing_game"][index]) < 1e-9, row.layer
        assert abs(row.values["energy"] - values["energy_in_box"][index]) < 1e-5, row.layer
        assert abs(row.values["maxboxacc_v2"] - values["maxboxacc_v2"][index]) < 1e-9, row.layer

"""bench-loc across depth: --layers blocks, --plot, and score_images for callers with their own images."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
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
    again = bench_loc.read_csv(csv_path)  # the CSV gives the rows back: the figure can be drawn again from it
    assert [(r.layer, r.method, r.depth, r.kind) for r in again][-3:] == [
        ("layer4", "gradcam", len(blocks), "cam"), ("-", bench_loc.GAUSSIAN, None, "baseline"),
        ("-", bench_loc.RANDOM, None, "baseline")]
    assert again[0].values["pointing15"] == float(records[0]["pointing15"])
    assert bench_loc.plot_depth(again)[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_block_rows_says_so(tiny_zoo, tmp_path: Path, capsys):
    rows = [bench_loc.Row("m", "-", bench_loc.GAUSSIAN, {"pointing15": 0.5}, kind="baseline")]
    try:
        bench_loc.plot_depth(rows)
    except ValueError as error:
        assert "--layers blocks" in str(error)
    else:
        raise AssertionError("plot_depth drew rows without depth")


def test_score_images_on_own_boxes(tiny_zoo):
    from cams.bench_loc import bench as bench_run

    model = bench_run.load_model(TINY)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    boxes = [(4.0, 4.0, 40.0, 40.0), [(0.0, 0.0, 20.0, 30.0), (30.0, 30.0, 60.0, 60.0)], (10.0, 12.0, 50.0, 44.0)]
    rows = bench_loc.score_images(model, images, boxes, methods=["gradcam", "eigencam"])
    blocks = block_layers(model)
    assert [(r.layer, r.method) for r in rows[:-2]] == [(b, m) for m in ("gradcam", "eigencam") for b in blocks]
    assert [r.depth for r in rows[:len(blocks)]] == list(range(1, len(blocks) + 1))
    assert [r.kind for r in rows[-2:]] == ["baseline", "baseline"]
    for row in rows:
        assert row.n == 3 and row.values["deletion_auc"] is None and row.values["road_morf"] is None
        assert 0.0 <= row.values["maxboxacc_v2"] <= 1.0 and 0.0 <= row.values["energy"] <= 1.0
    # energy of the Gaussian reference is a property of the boxes alone: compute it by hand
    gaussian = rows[-2]
    heat = M.centre_gaussian((64, 64))
    expected = np.mean([M.energy_in_box(heat, box=b) for b in boxes])
    assert abs(gaussian.values["energy"] - expected) < 1e-9


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
    """The app's Measure panel (cams.depth, image by image) and bench-loc (score_images, batches through every
    method at once) drive the same metrics: on the same images, boxes and layers they give the same values."""
    from cams import explain
    from cams.bench_loc import bench as bench_run
    from cams.depth import DepthScores

    model = bench_run.load_model(TINY)
    torch.manual_seed(2)
    images = torch.randn(4, 3, 64, 64)
    boxes = [(4.0, 4.0, 40.0, 40.0), (20.0, 8.0, 60.0, 50.0), (0.0, 30.0, 34.0, 64.0), (10.0, 12.0, 50.0, 44.0)]
    blocks = block_layers(model)
    rows = bench_loc.score_images(model, images, boxes, methods=["gradcam"])[:len(blocks)]
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

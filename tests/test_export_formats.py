"""cams.export overlay formats and the heatmaps-only mode: every format decodes to the overlay of the stored
heatmap, heatmaps-only writes heatmaps and records and nothing else, and a rerun with another format redoes the
overlays while a heatmaps-only rerun keeps what is there."""
from __future__ import annotations

import csv

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cams.export import run_export
from cams.export.files import LOCK_NAME
from cams.render import overlay
from test_export import FakeEntry, noise, tiny

SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


@pytest.fixture(scope="module")
def models() -> dict:
    return {"tiny": (tiny(), FakeEntry())}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for index, size in enumerate([(80, 60), (50, 70)]):
        noise(*size, seed=index).save(folder / f"p{index}.png")
    return folder


def expected_overlay(out: Path, row: dict, photos: Path) -> np.ndarray:
    image = Image.open(photos / Path(row["image"]).name).convert("RGB")
    heat = np.load(out / row["heatmap"])
    return np.asarray(overlay(image, heat, row["crop_box"], "jet", 0.5)).astype(int)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_each_format_decodes_to_the_overlay_of_the_stored_heatmap(tmp_path, models, photos, fmt):
    out = tmp_path / "out"
    report = run_export([photos], out, models, layers=["layer3", "layer4"], overlay_format=fmt)
    assert report.computed == 4 and not report.warnings
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["overlay_format"] == fmt and manifest["settings"]["overlays"] is True
    for row in manifest["rows"]:
        assert row["overlay"].endswith(SUFFIX[fmt]) and row["grid"].endswith(".png")
        decoded = np.asarray(Image.open(out / row["overlay"]).convert("RGB")).astype(int)
        wanted = expected_overlay(out, row, photos)
        assert decoded.shape == wanted.shape
        if fmt == "png":  # lossless: the very pixels
            assert np.array_equal(decoded, wanted)
        else:  # lossy, on noise photos: close on average
            assert np.abs(decoded - wanted).mean() < 25
        heat = np.load(out / row["heatmap"])
        assert heat.dtype == np.float32 and heat.shape == (64, 64) and heat.min() >= 0 and heat.max() <= 1


def test_heatmaps_only_writes_heatmaps_and_records_only(tmp_path, models, photos):
    out = tmp_path / "out"
    report = run_export([photos], out, models, layers=["layer4"], overlays=False)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and p.name != LOCK_NAME)  # the manifest's lock file
    assert [Path(p).suffix for p in written].count(".npy") == 2
    assert {Path(p).suffix for p in written} == {".npy", ".json", ".csv"}  # no overlay, no grid
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["overlays"] is False and manifest["settings"]["overlay_format"] is None
    assert len(manifest["rows"]) == 2  # one row per heatmap, though no overlay was drawn
    assert len(list(csv.DictReader((out / "manifest.csv").open()))) == 2
    for row in manifest["rows"]:
        assert row["overlay"] == "" and row["grid"] == "" and row["status"] == "computed"
        assert np.load(out / row["heatmap"]).dtype == np.float32
    assert report.computed == 2


def test_rerun_with_another_format_redoes_the_overlays(tmp_path, models, photos):
    out = tmp_path / "out"
    run_export([photos], out, models, layers=["layer4"])
    again = run_export([photos], out, models, layers=["layer4"], overlay_format="jpeg")
    assert [row["status"] for row in again.rows] == ["computed", "computed"]
    assert all((out / row["overlay"]).suffix == ".jpg" and (out / row["overlay"]).is_file() for row in again.rows)
    same = run_export([photos], out, models, layers=["layer4"], overlay_format="jpeg")
    assert [row["status"] for row in same.rows] == ["existing", "existing"]


def test_heatmaps_only_rerun_keeps_overlay_runs_and_an_overlay_run_fills_them_in(tmp_path, models, photos):
    out = tmp_path / "out"
    first = run_export([photos], out, models, layers=["layer4"], colormap="viridis")
    kept = run_export([photos], out, models, layers=["layer4"], overlays=False)
    assert [row["status"] for row in kept.rows] == ["existing", "existing"]  # the heatmaps are the same
    assert [row["heatmap"] for row in kept.rows] == [row["heatmap"] for row in first.rows]
    bare = tmp_path / "bare"
    run_export([photos], bare, models, layers=["layer4"], overlays=False)
    filled = run_export([photos], bare, models, layers=["layer4"])
    assert [row["status"] for row in filled.rows] == ["computed", "computed"]
    assert all((bare / row["overlay"]).is_file() for row in filled.rows)


def test_cli_format_and_no_overlays_options(tmp_path):
    from cams.export import add_export_parser
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_export_parser(sub)
    args = parser.parse_args(["export", "x.jpg", "--out", str(tmp_path), "--format", "webp", "--no-overlays"])
    assert (args.overlay_format, args.overlays) == ("webp", False)
    args = parser.parse_args(["export", "x.jpg", "--out", str(tmp_path)])
    assert (args.overlay_format, args.overlays) == ("png", True)
    bad = subprocess.run([sys.executable, "-m", "cams", "export", "x.jpg", "--out", str(tmp_path), "--format", "gif"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--format" in bad.stderr


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 5, 3), (61, 47, 3)])
def test_png_bytes_decode_to_the_same_pixels_in_pillow_and_opencv(shape):
    import io

    import cv2

    from cams.export import encode_image
    from cams.export.encode import png_bytes

    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = png_bytes(pixels)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded[..., ::-1], pixels)
    assert encode_image(Image.fromarray(pixels), "png") == encode_image(pixels, "png") == data


def test_stored_heatmaps_are_the_engine_maps_of_each_model_input(tmp_path, photos):
    """The loader thread prepares each image once per distinct preprocessing: models sharing one and a model with
    another (input size and center crop) both get exactly their own input."""
    from cams import explain
    from pfnet.preprocess import Preprocess, prepare_batch

    other = FakeEntry(id="other", preprocess=Preprocess(48, 56))
    models = {"a": (tiny(seed=1), FakeEntry(id="a")), "b": (tiny("max", seed=2), FakeEntry(id="b")),
              "other": (tiny(seed=3), other)}
    out = tmp_path / "out"
    report = run_export([photos], out, models, layers=["layer4"], mode="center", batch_size=1)  # batch 1: exact
    assert report.computed == 6 and not report.warnings
    for row in report.rows:
        network, entry = models[row["model"]]
        image = Image.open(photos / Path(row["image"]).name).convert("RGB")
        tensor, _ = prepare_batch([image], entry.preprocess, "center")
        wanted = explain(network, tensor, ["layer4"], "gradcam", targets=1).heatmaps[0, 0, 0].numpy()
        assert np.allclose(np.load(out / row["heatmap"]), wanted, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "center"])
def test_grid_cells_match_the_shrunk_overlays(tmp_path, models, mode):
    """Grid cells are drawn on the image shrunk to the cell, not by shrinking each full-size overlay: the same
    picture within rounding (checked on a smooth photo, where either way of shrinking keeps its content). One
    difference, wanted: the crop box outline is drawn at the cell's scale, a crisp line instead of a faint one."""
    from cams.render import grid_geometry, thumbnail
    from pfnet.assets import assets_dir

    photo = sorted((assets_dir() / "examples").glob("*.jpg"))[0]
    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(photo).convert("RGB").resize((240, 180)).save(folder / "photo.png")
    out = tmp_path / "out"
    report = run_export([folder], out, models, layers=["layer3", "layer4"], mode=mode, cell_size=64)
    assert report.computed == 2
    sheet = np.asarray(Image.open(out / report.rows[0]["grid"]).convert("RGB")).astype(int)
    geometry = grid_geometry(1, 2, ["Tiny R50"], 64, caption_lines=2)
    assert sheet.shape[:2] == geometry.size[::-1]
    for col, row in enumerate(report.rows):
        shrunk = thumbnail(Image.open(out / row["overlay"]), 64)
        x, y = geometry.cell_origin(0, col)
        x, y = x + (64 - shrunk.width) // 2, y + (64 - shrunk.height) // 2
        cell = sheet[y:y + shrunk.height, x:x + shrunk.width]
        difference = np.abs(cell - np.asarray(shrunk).astype(int)).max(axis=2)
        away = np.ones(difference.shape, bool)
        if mode == "center":  # box (30, 0, 210, 180) of 240x180 -> (8, 0, 56, 48) of the 64x48 cell
            assert (cell[:, [8, 55]] == 255).all() and (cell[[0, 47], 8:56] == 255).all()
            away[:, 6:11] = away[:, 53:58] = away[:3] = away[-3:] = False
        assert difference[away].mean() < 3 and np.percentile(difference[away], 99) < 25, \
            (difference[away].mean(), np.percentile(difference[away], 99))


def test_network_threads_leave_cores_to_the_threads_beside_the_network():
    from cams.export.executor import network_threads

    assert [network_threads(True, cores) for cores in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]
    assert [network_threads(False, cores) for cores in (1, 2, 3, 4, 16)] == [1, 1, 2, 3, 15]


def test_export_threads_set_the_rule_or_the_users_count_and_restore_torchs(monkeypatch, models):
    import torch
    from cams.export.cli import export_threads
    from cams.export.executor import network_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for overlays in (True, False):
        with export_threads(None, overlays, models) as threads:
            assert threads == torch.get_num_threads() == network_threads(overlays)
        assert torch.get_num_threads() == before
    with export_threads(3, True, models) as threads:  # --threads wins
        assert threads == torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    with export_threads(None, True, {"gpu": (tiny().to("meta"), FakeEntry())}) as threads:
        assert threads == before  # not on the CPU: torch's own count
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with export_threads(None, True, models) as threads:
        assert threads == before  # the user's OMP_NUM_THREADS: torch follows it already


def test_cli_export_runs_the_network_on_the_rules_threads(tmp_path):
    import os

    from cams.export.executor import network_threads

    noise(40, 30).save(tmp_path / "a.png")
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "cams", "export", str(tmp_path / "a.png"), "--models", "demo_r50",
               "--layers", "layer4", "--device", "cpu"]
    done = subprocess.run(command + ["--out", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"torch threads: {network_threads(True)} (--threads)" in done.stderr
    done = subprocess.run(command + ["--out", str(tmp_path / "heat"), "--no-overlays", "--threads", "2"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "torch threads: 2 (--threads)" in done.stderr, done.stderr
    assert list((tmp_path / "heat").rglob("*.npy")) and not list((tmp_path / "heat").rglob("*layer4*.png"))
    bad = subprocess.run(command + ["--out", str(tmp_path / "o"), "--threads", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--threads" in bad.stderr

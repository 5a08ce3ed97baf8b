"""Paths read from a user's file are hostile (issue #26): a NUL byte or characters no path can hold in a labels CSV,
a bench-loc boxes.csv or an ILSVRC solution CSV is a row problem, reported, and the run goes on (exit 0)."""
from __future__ import annotations

import json

import pytest

from pfcam.cli import main

NUL_ROW = "in/sc\0ene_00.png"


def scene(path, index: int) -> None:
    from pfdemo.scenes import render_scene

    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(render_scene(7, index, 96).image).save(path)


def test_path_problem_names_nul_and_unencodable_text():
    from cams.images import path_problem, printable

    assert path_problem("a/b.png") is None
    assert "NUL" in path_problem(NUL_ROW)
    assert path_problem("x\ud800.png") is not None  # a lone surrogate no encoding holds
    assert printable(NUL_ROW) == "in/sc\\x00ene_00.png"


def test_a_nul_row_in_a_labels_csv_is_reported_and_the_export_goes_on(tmp_path, capsys):
    folder = tmp_path / "in"
    scene(folder / "scene_00.png", 0)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"image,label\n{NUL_ROW},star\nin/scene_00.png,circle\n", encoding="utf-8")
    out = tmp_path / "out"
    status = main(["export", str(folder), "--out", str(out), "--models", "demo_r50", "--layers", "layer4",
                   "--labels", str(labels)])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "line 2" in err and "NUL" in err and "\\x00" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("line 2" in warning for warning in manifest["warnings"])
    assert [row["target"] for row in manifest["rows"]] == ["label"]  # the good row still gives its label


def test_a_nul_row_in_a_boxes_csv_is_reported_and_bench_loc_goes_on(tmp_path, capsys):
    folder = tmp_path / "data"
    rows = ["image,x0,y0,x1,y1,label"]
    for index in range(4):
        scene(folder / f"scene_{index:02d}.png", index)
        rows.append(f"scene_{index:02d}.png,10,10,60,60,circle")
    rows.append("sc\0ene_00.png,1,1,9,9,star")
    (folder / "boxes.csv").write_text("\n".join(rows) + "\n")
    status = main(["bench-loc", "--models", "demo_r50", "--layers", "layer4", "--methods", "gradcam",
                   "--data", str(folder), "--n", "3", "--val-n", "1", "--faith-n", "1", "--faith-steps", "2"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "boxes.csv line 6" in err and "NUL" in err


@pytest.mark.parametrize("image_id", ["ILSVRC2012_val_0000\x0001", "ILSVRC2012_val_\udcff"])
def test_a_hostile_image_id_in_the_imagenet_solution_csv_is_a_row_problem(tmp_path, image_id):
    from cams.bench_loc.imagenet_val import read_loc_solution

    path = tmp_path / "LOC_val_solution.csv"
    path.write_text(f"ImageId,PredictionString\n{image_id},n01440764 1 1 9 9\n", encoding="utf-8",
                    errors="surrogateescape")
    problems: list[str] = []
    assert read_loc_solution(path, {}, problems) == []
    assert problems and all(isinstance(problem, str) for problem in problems)
    json.dumps(problems)  # printable: no NUL, no lone surrogate in what is shown
    assert all("\0" not in problem for problem in problems)


def test_upload_names_with_nul_and_undecodable_bytes_are_exported_under_printable_labels(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from cams.export import run_export
    from export_worker import tiny_models

    picture = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(picture, "PNG")
    names = ["x\0y\udcff.png", "../../etc/\npasswd.png"]
    report = run_export([(name, picture.getvalue()) for name in names], tmp_path / "out", tiny_models())
    assert report.ok and not report.errors
    labels = {row["image"] for row in report.rows}
    assert labels == {"x\\x00y\ufffd.png", "../../etc/\\x0apasswd.png"}
    json.loads((tmp_path / "out" / "manifest.json").read_text())  # writable as JSON: no NUL, no lone surrogate
    assert all(path.is_relative_to(tmp_path / "out") for path in (tmp_path / "out").rglob("*"))

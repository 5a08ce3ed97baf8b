"""Per-image records are written after the files they name (issue #26): when the disk fills part-way, no
``results__*.json`` names a file that was never written, and a rerun with room completes."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cams.export.encode
from cams.export import run_export
from export_worker import tiny_models


@pytest.fixture(scope="module")
def models() -> dict:
    return tiny_models()


def images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"img{index:02d}.png")
    return folder


def named_files(out: Path) -> dict[str, list[str]]:
    """record -> the files its entries name."""
    named = {}
    for record in out.rglob("results__*.json"):
        entries = json.loads(record.read_text())["entries"].values()
        named[record.relative_to(out).as_posix()] = [entry[key] for entry in entries
                                                     for key in ("overlay", "heatmap") if entry.get(key)]
    return named


def test_a_full_disk_part_way_leaves_no_record_naming_a_missing_file(tmp_path, models, monkeypatch):
    real = cams.export.encode.write_npy
    calls = []

    def filling(path, heat):  # the disk fills after 5 heatmaps: later writes fail as on a full disk
        calls.append(path)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, heat)

    monkeypatch.setattr(cams.export.encode, "write_npy", filling)
    src, out = images(tmp_path / "in", 12), tmp_path / "out"
    report = run_export([src], out, models, batch_size=2)
    assert report.stopped and "the disk is full" in report.stopped, report.stopped
    named = named_files(out)
    assert named, "some records were written before the disk filled"
    missing = {record: [f for f in files if not (out / f).is_file()] for record, files in named.items()}
    assert not any(missing.values()), missing
    monkeypatch.setattr(cams.export.encode, "write_npy", real)
    again = run_export([src], out, models, batch_size=2)
    assert again.ok and not again.stopped
    assert all((out / f).is_file() for files in named_files(out).values() for f in files)
    assert len(named_files(out)) == 12


def test_manifest_and_records_are_one_line_per_row_and_entry(tmp_path, models):
    from cams.export.files import json_text

    out = tmp_path / "out"
    run_export([images(tmp_path / "photos", 3)], out, models, layers=["layer4"], overlays=False)
    manifest_text = (out / "manifest.json").read_text()
    manifest = json.loads(manifest_text)
    lines = manifest_text.splitlines()
    assert len(manifest["rows"]) == 3 * len(models)
    lines = [line.rstrip(",") for line in lines]
    for row in manifest["rows"]:  # each row is one line, as json.dumps writes it
        assert f"  {json.dumps(row, ensure_ascii=False)}" in lines
    record = next(out.rglob("results__*.json"))
    parsed = json.loads(record.read_text())
    record_lines = [line.rstrip(",") for line in record.read_text().splitlines()]
    for key, entry in parsed["entries"].items():  # each entry is one line
        assert f"  {json.dumps(key)}: {json.dumps(entry)}" in record_lines
    value = {"rows": [{"a": 1.5, "b": "é"}], "empty": [], "entries": {"k": {"x": None}}, "n": 0}
    assert json.loads(json_text(value)) == value
    assert "é" in json_text(value) and "\\u00e9" in json_text(value, ensure_ascii=True)
    with pytest.raises(ValueError, match="not JSON compliant"):
        json_text({"rows": [float("nan")]})

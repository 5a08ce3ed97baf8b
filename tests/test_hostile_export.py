"""Hostile conditions for exports (issue #11): symbolic link loops, an output below a file, a read-only folder,
permission denied, a full disk (a small tmpfs), leftovers of killed runs (SIGKILL at random points, then a rerun
equals an uninterrupted run), concurrent exports into one folder, planted links, inputs inside the output, and
reruns with other settings: each gives a clear message, keeps what finished, and the manifest lists it."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cams.export.encode
import cams.export.executor
from cams.export import EXIT_CANNOT_START, EXIT_STOPPED, ExportError, run_export
from export_worker import tiny_models

WORKER = Path(__file__).with_name("export_worker.py")
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def models() -> dict:
    return tiny_models()


def images(folder: Path, count: int, seed: int = 0, size: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{index:02d}.png")
    return folder


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def results(out: Path) -> dict[str, bytes]:
    """Every result file's bytes (manifests, records with their times, and the lock left out)."""
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(out.rglob("*"))
            if path.is_file() and path.suffix in (".png", ".npy")}


def row_facts(out: Path) -> list[tuple]:
    return sorted((r["image_dir"], r["layer"], r["rank"], r["class_id"], r["overlay"], r["heatmap"], r["grid"])
                  for r in manifest(out)["rows"])


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A small tmpfs at ``where`` (the test is skipped where mounting is not allowed), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_symlink_loop_in_an_input_folder_is_skipped_and_the_rest_exported(tmp_path, models):
    src = images(tmp_path / "in", 2)
    os.symlink("loop.png", src / "loop.png")  # points at itself
    os.symlink(src / "a.png", src / "b.png")
    os.symlink(src / "b.png", src / "a.png")  # a two-link cycle
    report = run_export([src], tmp_path / "out", models)
    reasons = {Path(item["input"]).name: item["reason"] for item in report.skipped}
    assert reasons == {"loop.png": "a symbolic link loop", "a.png": "a symbolic link loop",
                       "b.png": "a symbolic link loop"}
    assert report.processed == 2 and not report.stopped
    assert {item["input"] for item in manifest(tmp_path / "out")["skipped"]} == \
        {str(src / name) for name in reasons}


def test_out_below_an_existing_file_is_refused_with_a_message(tmp_path, models):
    src = images(tmp_path / "in", 1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="part of the path is a file, not a folder"):
        run_export([src], tmp_path / "file" / "out", models)
    done = subprocess.run([sys.executable, "-m", "pfcam", "export", str(src), "--out", str(tmp_path / "file" / "o"),
                           "--models", "demo_r50", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == EXIT_CANNOT_START, done.stderr
    assert "error: using the output folder" in done.stderr and "Traceback" not in done.stderr


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, models):
    src = images(tmp_path / "in", 1)
    with tmpfs(tmp_path / "ro", "1m") as mount:
        (mount / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(ExportError, match="the file system is read-only"):
            run_export([src], mount / "out", models)


def test_permission_denied_part_way_keeps_what_finished_and_the_manifest_lists_it(tmp_path, models, monkeypatch):
    src = images(tmp_path / "in", 4)
    real, calls = cams.export.encode.write_picture, []

    def failing(path, image, fmt="png"):
        calls.append(path)
        if len(calls) > 3:  # the first batch (2 images x 2 layers) is on disk; then the folder is taken away
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path, image, fmt)

    monkeypatch.setattr(cams.export.encode, "write_picture", failing)
    out = tmp_path / "out"
    report = run_export([src], out, models, batch_size=2)
    assert report.stopped.startswith("writing the export failed: permission denied (")
    listed = manifest(out)
    assert listed["stopped"] == report.stopped
    assert listed["rows"] and all((out / row["overlay"]).is_file() and (out / row["heatmap"]).is_file()
                                  for row in listed["rows"])  # only what is really there
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(cams.export.encode, "write_picture", real)
    again = run_export([src], out, models, batch_size=2)  # a rerun finishes the rest
    assert not again.stopped and len(manifest(out)["rows"]) == 4 * 2


def test_a_full_disk_stops_with_a_message_and_a_rerun_with_space_completes(tmp_path):
    src = images(tmp_path / "in", 6, size=64)
    with tmpfs(tmp_path / "small", "96k") as mount:
        out = mount / "out"
        done = subprocess.run([sys.executable, str(WORKER), str(out), str(src)], capture_output=True, text=True,
                              cwd=ROOT, env=ENV, timeout=600)
        assert done.returncode == EXIT_STOPPED, done.stderr
        assert "the disk is full" in done.stderr and "Traceback" not in done.stderr
        assert not list(out.rglob("*.tmp"))  # nothing half-written
        for path in out.rglob("*.png"):
            Image.open(path).load()
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        done = subprocess.run([sys.executable, str(WORKER), str(out), str(src)], capture_output=True, text=True,
                              cwd=ROOT, env=ENV, timeout=600)
        assert done.returncode == 0, done.stderr
        assert len(manifest(out)["rows"]) == 6 * 2


def test_temporary_files_of_killed_runs_are_removed_by_the_next_run(tmp_path, models):
    src = images(tmp_path / "in", 1)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    dead = out / "sub" / ".x.png.99999999.abc123.tmp"  # a pid that cannot exist
    old = out / ".y.npy.tmp"
    live = out / f".z.png.{os.getpid()}.def456.tmp"  # a writer still running
    for path in (dead, old, live):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    report = run_export([src], out, models)
    assert sorted(report.orphans) == [".y.npy.tmp", "sub/.x.png.99999999.abc123.tmp"]
    assert not dead.exists() and not old.exists() and live.exists()


def test_an_input_inside_the_output_folder_is_listed_as_skipped(tmp_path, models):
    out = tmp_path / "out"
    inside = images(out / "mine", 1)
    report = run_export([inside / "img00.png", inside], out, models)
    assert [item["reason"].split(" (")[0] for item in report.skipped] == ["inside the output folder"] * 2
    assert report.processed == 0


def test_a_symlink_planted_at_an_output_path_is_replaced_not_followed(tmp_path, models):
    src = images(tmp_path / "in", 1)
    out = tmp_path / "out"
    first = run_export([src], out, models)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = out / first.rows[0]["overlay"]
    target.unlink()
    os.symlink(victim, target)
    report = run_export([src], out, models)
    assert victim.read_text() == "keep me"
    assert not target.is_symlink() and Image.open(target).size == (48, 48)
    assert report.rows[0]["status"] == "computed"


def test_a_rerun_with_other_settings_keeps_the_earlier_rows(tmp_path, models):
    src = images(tmp_path / "in", 2)
    out = tmp_path / "out"
    run_export([src], out, models, layers=["layer3"])
    run_export([src], out, models, layers=["layer4"], colormap="viridis")
    rows = manifest(out)["rows"]
    assert sorted((r["layer"], r["settings"]["colormap"]) for r in rows) == \
        [("layer3", "jet")] * 2 + [("layer4", "viridis")] * 2
    assert len(manifest(out)["runs"]) == 2


def run_worker(out: Path, *inputs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *map(str, inputs)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_exports_with_different_inputs_into_one_folder_all_listed(tmp_path):
    groups = [images(tmp_path / f"in{i}", 3, seed=i) for i in range(3)]
    out = tmp_path / "out"
    workers = [run_worker(out, group) for group in groups]
    for worker in workers:
        assert worker.wait(timeout=600) == 0, worker.stderr.read()
    listed = manifest(out)
    assert len({row["image"] for row in listed["rows"]}) == 9 and len(listed["rows"]) == 9 * 2
    assert len(listed["runs"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_point_then_a_rerun_equals_an_uninterrupted_run(tmp_path, seed):
    src = images(tmp_path / "in", 6, seed=10)
    reference = tmp_path / "reference"
    started = time.perf_counter()
    assert run_worker(reference, src).wait(timeout=600) == 0
    took = time.perf_counter() - started
    out = tmp_path / "killed"
    worker = run_worker(out, src)
    time.sleep(random.Random(seed).uniform(0.3, 1.0) * took)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    for path in out.rglob("*.png") if out.exists() else []:
        if not path.name.endswith(".tmp"):
            Image.open(path).load()  # never half-written
    assert run_worker(out, src).wait(timeout=600) == 0
    assert not list(out.rglob("*.tmp"))
    assert results(out) == results(reference)
    assert row_facts(out) == row_facts(reference)


def test_a_full_disk_in_process_names_the_cause_whichever_writer_hits_it(tmp_path, models):
    with tmpfs(tmp_path / "tiny", "96k") as mount:
        report = run_export([images(tmp_path / "in", 6)], mount / "out", models)
        assert report.stopped and "the disk is full" in report.stopped, report.stopped
        assert not list((mount / "out").rglob("*.tmp"))


def listed_files(out: Path) -> set[str]:
    rows = manifest(out)["rows"]
    return {row[key] for row in rows for key in ("overlay", "heatmap") if row.get(key)}


def test_a_full_disk_part_way_leaves_the_manifest_up_to_date(tmp_path, models):
    """The manifest's room is held from the start: when the outputs fill the disk, it is still written and lists
    exactly the results whose files are there."""
    with tmpfs(tmp_path / "small", "256k") as mount:
        out = mount / "out"
        report = run_export([images(tmp_path / "in", 20)], out, models, batch_size=2)
        assert report.stopped and "the disk is full" in report.stopped, report.stopped
        assert not any("manifest could not be updated" in w for w in report.warnings), report.warnings
        listed = listed_files(out)
        assert listed and all((out / path).is_file() for path in listed)
        finished = {path.relative_to(out).as_posix() for path in out.rglob("*.npy")
                    if path.with_suffix(".png").is_file()}  # both files of a result are there
        assert finished <= listed, finished - listed
        assert len(manifest(out)["images"]) < 20  # it did stop part-way
        assert not list(out.glob(".manifest-room.*"))


def test_a_disk_without_room_for_the_manifest_refuses_before_writing(tmp_path, models):
    with tmpfs(tmp_path / "small", "512k") as mount:
        out = mount / "out"
        assert run_export([images(tmp_path / "first", 1)], out, models).ok
        before = (out / "manifest.json").read_bytes()
        folders = sorted(p.name for p in out.iterdir())
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        (mount / "filler").write_bytes(bytes(free - 8192))  # 8 KB left: less than the manifest of 6 more images
        with pytest.raises(ExportError, match="reserving room for the manifest failed: the disk is full"):
            run_export([images(tmp_path / "more", 6, seed=1)], out, models)
        assert sorted(p.name for p in out.iterdir()) == folders  # nothing written, no room file left
        assert (out / "manifest.json").read_bytes() == before


def test_the_room_held_covers_the_manifest_written(tmp_path, models, monkeypatch):
    """The bound of cams.export.reserve against real manifests: long names, three ranks, a rerun that adds images."""
    from cams.export.reserve import ManifestRoom

    held = []
    real = ManifestRoom.hold

    def hold(room):
        held.append(room.nbytes)
        real(room)

    monkeypatch.setattr(ManifestRoom, "hold", hold)
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    for batch in range(2):
        for index in range(8):
            name = f"{'a_long_name_' * 5}{batch}_{index:02d}.png"[-64:]
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(src / name)
        before = sum((out / n).stat().st_size for n in ("manifest.json", "manifest.csv") if (out / n).exists())
        assert run_export([src], out, models, topk=3).ok
        written = sum((out / n).stat().st_size for n in ("manifest.json", "manifest.csv"))
        assert written <= held[-1], (written, held[-1])
        assert held[-1] - before < 20 * (written - before)  # a bound, not a blank cheque

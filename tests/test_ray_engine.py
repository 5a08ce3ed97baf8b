"""``--engine ray`` on a real multi-node Ray cluster on loopback (a head and two worker nodes, one CPU and the
smallest object store each), against the local engine on the same inputs: the same files, heatmaps, manifest
rows and skipped inputs; a rerun computes nothing; a worker node lost mid-run loses and duplicates nothing; and
bench-loc's table. Without Ray, ``--engine ray`` says how to install it.

The cluster tests share one module-scoped cluster and are slow (worker processes start torch); the local
reference runs use one torch thread, as each Ray actor does, and never explain an image alone (oneDNN takes
another path for a batch of one; the Ray actors never do), so the heatmaps match to the last bit.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from cams.bench_loc import FolderData, run_bench
from cams.export import (EXIT_OK, EXIT_STOPPED, ExportError, check_shared, collect_inputs, load_models,
                         run_export)
from cams.export.files import remove_orphans
from cams.export.ray_executor import probe_name
from cams.ray_runtime import RayOptions, failure_message, init_ray
from pfcam.cli import main
from pfnet import zoo

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray Data's own settings shuffle

DEMO = ("demo_r50", "demo_r50_hybrid")
NODE = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}  # the smallest store Ray accepts
CLUSTER_WORKERS = 2
BAD = {"empty.png": "empty file", "truncated.png": "truncated or corrupt", "fake.jpg": "not an image"}
needs_demo_weights = pytest.mark.skipif(
    any(not (zoo.DEMO_DIR / zoo.get(model_id).source.filename).is_file() for model_id in DEMO),
    reason="the bundled demo weights (assets/weights) are not there")


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def make_inputs(folder: Path, count: int = 5) -> list:
    """``count`` good images of several formats and sizes (one EXIF-rotated, one nested), three bad files, a
    text file; and an upload. Returns the sources to export."""
    (folder / "sub").mkdir(parents=True)
    for index in range(count):
        noise(40 + 7 * index, 36 + 5 * index, index).save(folder / f"photo{index}.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(60, 30, 40).save(folder / "rotated.jpg", exif=exif.tobytes())
    noise(44, 44, 41).convert("L").save(folder / "sub" / "gray.webp")
    (folder / "empty.png").write_bytes(b"")
    whole = io.BytesIO()
    noise(64, 64, 42).save(whole, "PNG")
    (folder / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (folder / "fake.jpg").write_text("this is not a JPEG\n")
    (folder / "notes.txt").write_text("a text file\n")
    upload = io.BytesIO()
    noise(50, 40, 43).save(upload, "PNG")
    return [folder, ("../upload.png", upload.getvalue())]


def files_of(folder: Path) -> dict[str, int]:
    """Relative path -> mtime of every file under ``folder``."""
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns
            for path in sorted(folder.rglob("*")) if path.is_file()}


def local_export(*args, **kwargs):
    """The local engine with one torch thread, as each Ray actor has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_export(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def assert_same_export(local: Path, ray_out: Path, statuses: bool = True) -> None:
    """The two output folders hold the same files; heatmaps within 1e-6, overlays within one level, the
    manifests' rows, images, skipped inputs and warnings equal (statuses too unless told otherwise)."""
    assert sorted(files_of(local)) == sorted(files_of(ray_out))
    assert not [name for name in files_of(ray_out) if name.endswith(".tmp")]  # no temporary or probe file
    ours, theirs = (json.loads((folder / "manifest.json").read_text()) for folder in (local, ray_out))
    drop = (lambda row: row) if statuses else (lambda row: {k: v for k, v in row.items() if k != "status"})
    assert [drop(row) for row in theirs["rows"]] == [drop(row) for row in ours["rows"]]
    for key in ("images", "skipped", "warnings", "columns", "format"):
        assert theirs[key] == ours[key], key
    assert len({(r["image"], r["model"], r["layer"], r["rank"]) for r in theirs["rows"]}) == len(theirs["rows"])
    for row in ours["rows"]:
        assert np.abs(np.load(local / row["heatmap"]) - np.load(ray_out / row["heatmap"])).max() <= 1e-6
        if row["overlay"]:  # none with overlays=False
            a, b = (np.asarray(Image.open(folder / row["overlay"]), dtype=np.int16) for folder in (local, ray_out))
            assert np.abs(a - b).max() <= 1
        records = [json.loads((folder / row["heatmap"]).with_name("results__gradcam.json").read_text())
                   for folder in (local, ray_out)]
        assert [record["entries"] for record in records[:1]] == [record["entries"] for record in records[1:]]


# ---------------------------------------------------------------------------------------------- without a cluster
def test_without_ray_the_engine_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    photo = tmp_path / "a.png"
    noise(32, 32, 0).save(photo)
    assert main(["export", str(photo), "--out", str(tmp_path / "out"), "--models", "demo_r50",
                 "--engine", "ray"]) == 2
    assert "pip install -r requirements/ray.txt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
    assert main(["bench-loc", "--models", "demo_r50", "--engine", "ray"]) == 2
    assert "pip install -r requirements/ray.txt" in capsys.readouterr().err
    with pytest.raises(ExportError, match="requirements/ray.txt"):
        run_export([photo], tmp_path / "out", {}, engine="ray")
    with pytest.raises(ExportError, match="unknown engine"):
        run_export([photo], tmp_path / "out", {}, engine="spark")


def test_a_node_that_does_not_see_the_output_folder_fails_the_run(tmp_path):
    (tmp_path / ".probe.tmp").write_bytes(b"")
    check_shared(str(tmp_path), ".probe.tmp")  # seen: fine
    with pytest.raises(ExportError, match="every node mounts"):
        check_shared(str(tmp_path / "elsewhere"), ".probe.tmp")


def test_the_probe_outlives_another_run_s_clean_up_while_its_driver_lives(tmp_path):
    probe = tmp_path / probe_name()
    dead = tmp_path / probe.name.replace(f".{os.getpid()}.", ".99999999.")  # a driver that was killed
    for path in (probe, dead):
        path.write_bytes(b"")
    assert remove_orphans(tmp_path) == [dead.name] and probe.is_file()
    check_shared(str(tmp_path), probe.name)


@pytest.mark.slow
@needs_demo_weights
def test_without_an_address_a_local_runtime_starts_and_stops_with_the_command(tmp_path):
    pytest.importorskip("ray", reason="Ray is installed by requirements-test.txt")
    photo = Path(__file__).resolve().parent.parent / "assets" / "examples" / "coffee.jpg"
    ray_tmp = Path(tempfile.mkdtemp(prefix="pfr", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
        done = subprocess.run([sys.executable, "-m", "cams", "export", str(photo), "--out", str(tmp_path / "out"),
                               "--models", "demo_r50", "--layers", "layer4", "--engine", "ray"],
                              cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "1 results computed" in done.stdout
        assert (ray_tmp / "ray").is_dir()  # the runtime was this command's own
        deadline = time.monotonic() + 30
        while True:
            left = [process.info["name"] for process in psutil.process_iter(["name", "cmdline"])
                    if str(ray_tmp) in " ".join(process.info["cmdline"] or [])]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left, f"Ray processes left running: {left}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- on a cluster
@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes on loopback, with their session files in a folder of their own; every process
    it started, and that folder, are gone afterwards."""
    ray = pytest.importorskip("ray", reason="Ray is installed by requirements-test.txt")
    from ray.cluster_utils import Cluster

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    ray_tmp = tempfile.mkdtemp(prefix="pfr", dir="/tmp")  # short: Ray's socket paths live under it
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_tmp
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(NODE))
        workers = [cluster.add_node(**NODE) for _ in range(CLUSTER_WORKERS)]
        cluster.wait_for_nodes()
        init_ray(RayOptions(address=cluster.address))
        yield cluster, workers
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        deadline = time.monotonic() + 30
        left = []
        while time.monotonic() < deadline:
            left = [child for child in psutil.Process().children(recursive=True)
                    if child.pid not in before and child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
            if not left:
                break
            time.sleep(0.5)
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"Ray processes left running: {[child.name() for child in left]}"


@pytest.fixture(scope="module")
def demo_models():
    models, _ = load_models(list(DEMO), device="cpu", log=lambda _: None)
    return models


@pytest.fixture(scope="module")
def both_engines(cluster, demo_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("ray-engine")
    sources = make_inputs(base / "in")
    local = local_export(sources, base / "local", demo_models, batch_size=3)
    on_ray = run_export(sources, base / "ray", demo_models, batch_size=3, engine="ray",
                        ray_options=RayOptions(workers=CLUSTER_WORKERS))
    return base, sources, local, on_ray


@pytest.mark.slow
@needs_demo_weights
def test_ray_writes_what_the_local_engine_writes(both_engines):
    base, _, local, on_ray = both_engines
    assert_same_export(base / "local", base / "ray")
    assert sorted(on_ray.files) == sorted(local.files)
    assert on_ray.computed == local.computed == 8 * 2 * 2  # 7 good files and the upload x 2 models x 2 layers
    # as the local engine lists them: what the scan refused, then what could not be read, in input order
    assert [item["input"].rsplit("/", 1)[-1] for item in on_ray.skipped] == ["notes.txt", "empty.png", "fake.jpg",
                                                                             "truncated.png"]
    reasons = {item["input"].rsplit("/", 1)[-1]: item["reason"] for item in on_ray.skipped}
    assert all(reasons[name].startswith(reason) for name, reason in BAD.items())


@pytest.mark.slow
@needs_demo_weights
def test_a_rerun_on_ray_computes_nothing(both_engines, demo_models):
    base, sources, local, on_ray = both_engines
    before = files_of(base / "ray")
    again = run_export(sources, base / "ray", demo_models, batch_size=3, engine="ray",
                       ray_options=RayOptions(workers=CLUSTER_WORKERS))
    assert again.computed == 0 and again.existing == on_ray.computed and again.files == []
    after = files_of(base / "ray")
    changed = [name for name in before if name not in ("manifest.json", "manifest.csv") and after[name] != before[name]]
    assert sorted(after) == sorted(before) and changed == []
    assert [row["status"] for row in again.rows] == ["existing"] * len(on_ray.rows)


@pytest.mark.slow
@needs_demo_weights
@pytest.mark.parametrize("settings", [{"overlay_format": "jpeg"}, {"overlays": False},
                                      {"overlays": False, "eigen_smooth": True}],
                         ids=["jpeg", "heatmaps-only", "eigen-smooth"])
def test_ray_honours_the_overlay_format_heatmaps_only_and_the_method_options(cluster, demo_models, tmp_path, settings):
    sources = make_inputs(tmp_path / "in", count=3)
    local = local_export(sources, tmp_path / "local", demo_models, batch_size=3, **settings)
    on_ray = run_export(sources, tmp_path / "ray", demo_models, batch_size=3, engine="ray",
                        ray_options=RayOptions(workers=CLUSTER_WORKERS), **settings)
    assert_same_export(tmp_path / "local", tmp_path / "ray")
    assert sorted(on_ray.files) == sorted(local.files) and on_ray.computed == local.computed == 6 * 2 * 2
    suffixes = {Path(name).suffix for name in on_ray.files}
    assert suffixes == ({".jpg", ".npy", ".json", ".png"} if settings.get("overlays", True) else {".npy", ".json"})
    assert not [name for name in on_ray.files if name.endswith(".png") and "/grid__" not in f"/{name}"]
    recorded = json.loads((tmp_path / "ray" / "manifest.json").read_text())["settings"]
    assert recorded["eigen_smooth"] is settings.get("eigen_smooth", False)  # the workers' maps: the same as local's


@pytest.mark.slow
@needs_demo_weights
def test_a_full_disk_stops_a_ray_run_as_it_stops_a_local_one(cluster, tmp_path, capsys):
    from test_hostile_export import tmpfs

    cluster_, _ = cluster
    sources = make_inputs(tmp_path / "in", count=3)[:1]
    command = ["export", str(sources[0]), "--models", "demo_r50", "--batch-size", "2", "--engine", "ray",
               "--ray-address", cluster_.address, "--workers", "2"]
    with tmpfs(tmp_path / "small", "160k") as mount:
        out = mount / "out"
        assert main([*command, "--out", str(out)]) == EXIT_STOPPED
        err = capsys.readouterr().err
        assert "error: the export stopped: writing the export failed: the disk is full" in err, err
        assert "Traceback" not in err
        assert not list(out.rglob("*.tmp"))  # nothing half-written, no probe left
        for path in out.rglob("*.npy"):
            np.load(path)  # whole
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        assert main([*command, "--out", str(out)]) == EXIT_OK  # a rerun with space completes
        assert len(json.loads((out / "manifest.json").read_text())["rows"]) == 5 * 2  # 5 readable x 2 layers


@pytest.mark.slow
@needs_demo_weights
def test_a_refusal_on_a_worker_is_the_local_engine_s_message(cluster, demo_models, tmp_path):
    sources = make_inputs(tmp_path / "in", count=1)[:1]
    messages = []
    for engine, out in (("local", tmp_path / "local"), ("ray", tmp_path / "ray")):
        out.mkdir()
        item = collect_inputs([tmp_path / "in" / "photo0.png"])[0][0]
        (out / item.folder).symlink_to(tmp_path, target_is_directory=True)  # a planted link: never written through
        with pytest.raises(ExportError) as caught:
            run_export(sources, out, {"demo_r50": demo_models["demo_r50"]}, batch_size=3, engine=engine,
                       ray_options=RayOptions(workers=CLUSTER_WORKERS))
        messages.append(str(caught.value))
    assert messages[0].startswith("refusing to write through the symbolic link")
    assert messages[1] == messages[0].replace(str(tmp_path / "local"), str(tmp_path / "ray"))


@pytest.mark.slow
@needs_demo_weights
def test_export_and_bench_loc_commands_on_ray(cluster, tmp_path, capsys):
    cluster_, _ = cluster
    ray_args = ["--engine", "ray", "--ray-address", cluster_.address, "--workers", "2"]
    photo = Path(__file__).resolve().parent.parent / "assets" / "examples" / "coffee.jpg"
    assert main(["export", str(photo), "--out", str(tmp_path / "out"), "--models", "demo_r50", *ray_args]) == 0
    assert "2 results computed" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["engine"] == "ray" and len(manifest["rows"]) == 2

    bench = ["bench-loc", "--models", "demo_r50,demo_r50_hybrid", "--layers", "layer4", "--methods",
             "gradcam,layercam", "--n", "6", "--val-n", "3", "--faith-n", "2", "--faith-steps", "3"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*bench, "--csv", str(tmp_path / "local.csv")]) == 0
    finally:
        torch.set_num_threads(threads)
    local_table = capsys.readouterr().out
    assert main([*bench, "--csv", str(tmp_path / "ray.csv"), *ray_args]) == 0
    ray_table = capsys.readouterr().out
    assert ray_table == local_table
    rows = [list(csv.reader((tmp_path / name).open())) for name in ("local.csv", "ray.csv")]
    assert rows[0] == rows[1] and len(rows[0]) == 1 + 2 * (2 + 2)  # header, 2 models x (2 methods + 2 references)


@pytest.mark.slow
@needs_demo_weights
def test_bench_loc_on_ray_reports_unreadable_images_as_the_local_engine_does(cluster, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = ["image,x0,y0,x1,y1,label"]
    for index in range(6):
        noise(64, 64, index).save(folder / f"img{index}.png")
        lines.append(f"img{index}.png,8,8,40,40,circle")
    (folder / "broken.png").write_bytes(b"not a png")
    lines.append("broken.png,0,0,10,10,circle")
    (folder / "boxes.csv").write_text("\n".join(lines) + "\n")
    args = dict(models=["demo_r50"], layers=["layer4"], methods=["gradcam"], n=4, val_n=2, faith_n=1,
                faith_steps=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_bench(data=FolderData(folder), **args)
    finally:
        torch.set_num_threads(threads)
    on_ray = run_bench(data=FolderData(folder), engine="ray", ray_options=RayOptions(workers=1), **args)
    assert on_ray.problems == local.problems and any("broken.png" in problem for problem in local.problems)
    assert [(r.model, r.layer, r.method, r.values, r.threshold) for r in on_ray.rows] == \
        [(r.model, r.layer, r.method, r.values, r.threshold) for r in local.rows]
    assert on_ray.caption == local.caption


@pytest.mark.slow
@needs_demo_weights
def test_a_worker_node_lost_mid_run_loses_and_duplicates_nothing(cluster, demo_models, tmp_path):
    """Last in the module: it takes a node away (and adds one back for whoever comes after)."""
    cluster_, workers = cluster
    models = {"demo_r50": demo_models["demo_r50"]}
    sources = make_inputs(tmp_path / "in", count=13)  # 16 readable images: no local batch of one
    local_export(sources, tmp_path / "local", models, batch_size=2)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = run_export(sources, tmp_path / "ray", models, batch_size=2, engine="ray",
                                           ray_options=RayOptions(workers=CLUSTER_WORKERS))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 300
        while thread.is_alive() and time.monotonic() < deadline and \
                not list((tmp_path / "ray").rglob("results__*.json")):
            time.sleep(0.1)
        written_before = len(list((tmp_path / "ray").rglob("results__*.json")))
        assert thread.is_alive(), "the run ended before a node could be taken away; give it more images"
        cluster_.remove_node(workers[0], allow_graceful=False)
        thread.join(timeout=600)
        assert not thread.is_alive()
    finally:
        workers[0] = cluster_.add_node(**NODE)
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    total = 16 * 2  # 15 good files and the upload x 2 layers
    assert 0 < written_before < total // 2
    assert len(report.rows) == total
    assert_same_export(tmp_path / "local", tmp_path / "ray", statuses=False)
    again = run_export(sources, tmp_path / "ray", models, batch_size=2, engine="ray",
                       ray_options=RayOptions(workers=CLUSTER_WORKERS))
    assert again.computed == 0 and again.files == []


def test_a_worker_error_is_named_in_one_line():
    """Ray Data keeps the text of a task's error, not the error: the worker's own exception line is the message."""
    report = ("ray::MapBatches(Scorer)() (pid=1, ip=192.0.2.2)\n  File \"scoring.py\", line 3, in evaluate\n"
              "cams.bench_loc.data.BenchError: --data x: no usable test image\n\n"
              "The above exception was the direct cause of the following exception:\n\n"
              "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
              "To change retry attempts, configure `ray.data.DataContext.get_current()`.")
    assert failure_message(RuntimeError(report)) == "BenchError: --data x: no usable test image"
    assert failure_message(RuntimeError("the node died\n")) == "the node died"

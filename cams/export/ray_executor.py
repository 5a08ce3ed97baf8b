"""Carrying out an export plan (:mod:`cams.export.plan`) on a Ray cluster with Ray Data (``engine="ray"``).

The driver lists the inputs (:func:`cams.export.inputs.collect_inputs`, as the local engine does). Then one Ray
Data pipeline, each image one row, in blocks of a batch: an actor pool (:class:`ExportWorker`) carries out each
block whole with the local engine's code. An actor receives every model once, moved to the GPU Ray gave it (or
kept on the CPU); it reads and decodes each input (:func:`cams.export.inputs.read_input`: bad inputs get the
local records), explains and writes with the local executor itself (:class:`ActorExecutor`:
``ExportExecutor.process``, each result through :func:`cams.export.encode.render_result` on its writer threads,
beside the next model's explanation), so both engines write the same files, records and grids, in the same
format (or none, without overlays); a block's rows come back only after its files are on disk. No image or
heatmap travels between processes: on CPUs, moving them cost more than the drawing they would spread (docs/ray.md).

The driver gathers each image's rows, skipped inputs and warnings, keyed by the image's place in the input list
(an image that comes twice counts once); ``run_export`` merges the manifest into the folder's
(:func:`cams.export.files.merge_manifest`, on the driver). An OS error while writing (disk full, permissions)
stops the run as it stops the local one: ``report.stopped`` says why in the same words, and what finished is
kept and listed.

Where the outputs go: every node must see the output folder at the same path (a shared filesystem: NFS, a
cluster filesystem, a FUSE-mounted bucket). Each block checks, before reading or writing, that it sees a probe
file the driver put there, and fails the run with a clear message where it does not (rather than writing into
a node's own disk). The inputs must be readable at the paths the driver listed, too.

Lost workers and nodes: Ray Data retries a task whose worker or node died and restarts lost actors (its
defaults: task ``max_retries=-1``, actor ``max_restarts=-1``, ``max_task_retries=-1``), and recomputes blocks
that were on a lost node. Every file is written atomically (temp + rename), so an image drawn again rewrites
the same files whole; a result that reached disk before the loss is reported ``existing`` by the retry. A rerun
skips what is done, as the local engine does.
"""
from __future__ import annotations

import copy
import os
import secrets
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cams.engine import Explanation
from cams.export.executor import ExportExecutor, explain_batch
from cams.export.files import ExportError, ExportReport, os_error_text
from cams.export.inputs import InputItem, read_input
from cams.export.plan import ExportPlan, ModelPlan
from cams.ray_runtime import (RayOptions, Shared, dataset_of, failure_message, from_column, pool_arguments,
                              ray_session, results_of, to_column, worker_device)

PROBE_PREFIX = ".pfcam-ray-probe"


def on_cpu(plan: ExportPlan) -> ExportPlan:
    """The plan with every network on the CPU, so any node can receive it (the driver's copies stay put)."""
    def cpu(network: Any) -> Any:
        tensors = list(network.parameters()) + list(network.buffers())
        return network if all(t.device.type == "cpu" for t in tensors) else copy.deepcopy(network).cpu()

    return replace(plan, models=tuple(replace(model, network=cpu(model.network)) for model in plan.models))


def probe_name() -> str:
    """The driver's probe file in ``--out``, named as the temporary files are (``.NAME.PID.RANDOM.tmp``): another
    run's clean-up (:func:`cams.export.files.remove_orphans`) leaves it while this driver lives, and removes it
    when the driver was killed."""
    return f"{PROBE_PREFIX}.{os.getpid()}.{secrets.token_hex(8)}.tmp"


def check_shared(root: str, probe: str) -> None:
    """Fail the run where this node does not see the output folder the driver writes to."""
    if not (Path(root) / probe).is_file():
        raise ExportError(f"node {socket.gethostname()} does not see the output folder {root}: with "
                          "--engine ray, --out must be on a filesystem every node mounts at the same path "
                          "(docs/ray.md)")


# ------------------------------------------------------------------------------------------------- the actors
class ActorExecutor(ExportExecutor):
    """The local executor as an actor runs it. Ray Data's blocks group inputs (bad ones too) where the local
    engine's batches group good images, so an image can be alone in its batch where it never is locally. Alone,
    it takes another oneDNN convolution path (~1e-6 apart); a copy keeps it company."""

    def explain(self, model: ModelPlan, batch, need: list[int], loaded) -> dict[int, tuple[Explanation, int]]:
        if len(need) != 1:
            return super().explain(model, batch, need, loaded)
        # the executor's own input, kept per preprocessing: models that share one prepare the image once
        tensor = self._network_input(loaded[need[0]], batch[need[0]][1], model)
        item = batch[need[0]][0]
        explanation = explain_batch(self.plan, model, torch.stack([tensor, tensor]), [item, item],
                                    self.report.warnings.append)
        return {} if explanation is None else {need[0]: (explanation, 0)}


class ExportWorker:
    """Actor: holds every model of the plan (on its GPU, if Ray gave it one) and carries out a batch of inputs
    whole with the local engine's code: reads them (:func:`read_input`), explains and writes their files
    (:class:`ActorExecutor`), so no image or heatmap travels between processes. A batch's rows come back once its
    files are on disk. An OS error stops the batch, as it stops the local run; its rows say so (``stopped``), with
    what was finished. A refusal (``ExportError``: a planted link, an output folder this node does not see)
    comes back in its own words (``refused``) and fails the run."""

    def __init__(self, plan: Shared, root: str, probe: str, max_bytes: int, max_pixels: int,
                 writers: int | None):
        device = worker_device()
        plan = plan.get()
        self.plan = replace(plan, models=tuple(replace(model, network=model.network.to(device))
                                               for model in plan.models))
        self.root, self.probe, self.writers = Path(root), probe, writers
        self.limits = (max_bytes, max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        report = ExportReport(out_dir=self.root)
        executor = ActorExecutor(self.root, self.plan, report, writers=self.writers)
        rows, refused = [], None
        try:
            try:
                check_shared(str(self.root), self.probe)
                rows = [(index, item, *read_input(item, *self.limits)) for index, item in from_column(batch)]
                good = [(item, image, info) for _, item, image, info, _ in rows if image is not None]
                if good and self.plan.models:
                    executor.process(good)
            finally:
                executor.finish()
        except ExportError as exc:
            refused = str(exc)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop met while resolving a path
            if isinstance(exc, RuntimeError) and "loop" not in str(exc).lower():
                raise
            report.stopped = os_error_text(exc, "writing the export")
        if refused:
            return to_column([{"refused": refused}])
        call = secrets.token_hex(8)  # this call's rows, so that the driver can wait for all of a stopped batch
        results = []
        for index, item, image, info, problem in rows:
            folder = item.folder if image is not None else None  # a bad input has no folder
            results.append({"index": index, "info": info, "problem": problem,
                            "rows": [r for r in report.rows if r["image_dir"] == folder],
                            "files": [f for f in report.files if f.split("/", 1)[0] == folder],
                            "warnings": [], "stale": 0, "stopped": report.stopped, "refused": None,
                            "call": (call, len(rows))})
        if results:
            results[0]["warnings"] = report.warnings
            results[0]["stale"] = executor.stale_count
        return to_column(results)


# ------------------------------------------------------------------------------------------------- the driver
def execute_on_ray(root: Path, plan: ExportPlan, items: Sequence[InputItem], report: ExportReport,
                   tick: Callable[[str], None], options: RayOptions, *, max_bytes: int, max_pixels: int,
                   writers: int | None = None) -> int:
    """Run the pipeline for ``items`` into ``root``; fill ``report`` (images, rows, skipped, warnings, files,
    stopped) in input order, as the local engine does; return how many kept outputs are stale."""
    results: dict[int, dict[str, Any]] = {}
    if items:
        probe = probe_name()
        (root / probe).write_bytes(b"")
        try:
            with ray_session(options):
                results = _run_pipeline(root, plan, items, report, tick, options, probe, max_bytes, max_pixels,
                                        writers)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray wraps the actors' errors; the run stops with its message
            raise ExportError(f"the Ray run failed: {failure_message(exc)}") from exc
        finally:
            (root / probe).unlink(missing_ok=True)
    lost = [items[index].label for index in range(len(items)) if index not in results]
    if lost and report.stopped is None:
        raise ExportError(f"the Ray run returned no result for {len(lost)} images (first: {lost[0]})")
    stale = 0
    for index in sorted(results):
        result = results[index]
        report.images.append(result["info"])
        if result["problem"] is not None:
            report.skipped.append(result["problem"])
        report.rows.extend(result["rows"])
        report.files.extend(result["files"])
        report.warnings.extend(result["warnings"])
        stale += result["stale"]
    return stale


def _run_pipeline(root: Path, plan: ExportPlan, items: Sequence[InputItem], report: ExportReport,
                  tick: Callable[[str], None], options: RayOptions, probe: str, max_bytes: int, max_pixels: int,
                  writers: int | None) -> dict[int, dict[str, Any]]:
    """Each image's result by its place in ``items``; after an OS error, those of the batches finished by then
    (``report.stopped`` says why)."""
    settings = {"plan": Shared(on_cpu(plan)), "root": str(root), "probe": probe, "max_bytes": max_bytes,
                "max_pixels": max_pixels, "writers": writers}
    dataset = dataset_of(list(enumerate(items)), blocks=-(-len(items) // plan.batch_size))
    dataset = dataset.map_batches(ExportWorker, batch_size=plan.batch_size, batch_format="numpy",
                                  fn_constructor_kwargs=settings, **pool_arguments(options))
    results: dict[int, dict[str, Any]] = {}
    stopped_left: dict[str, int] = {}  # a stopped batch's rows still to come
    for result in results_of(dataset):
        if result["refused"]:
            raise ExportError(result["refused"])
        if result["index"] in results:
            continue  # recomputed after a loss: counted once
        results[result["index"]] = result
        (root / probe).touch()  # fresh: the clean-up of temporary files removes those an hour old
        tick(items[result["index"]].label)
        if result["stopped"]:
            report.stopped = report.stopped or result["stopped"]
            call, size = result["call"]
            stopped_left[call] = stopped_left.get(call, size) - 1
            if not stopped_left[call]:
                break  # that batch is all here: stop, as the local run stops at its first OS error
    return results

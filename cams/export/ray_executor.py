"""Carrying out an export plan (:mod:`cams.export.plan`) on a Ray cluster with Ray Data (``engine="ray"``).

The driver lists the inputs (:func:`cams.export.inputs.collect_inputs`, as the local engine does). Then one Ray
Data pipeline, each image one row:

1. tasks read and decode each input (:func:`cams.export.inputs.read_input`, the local engine's reading: bad
   inputs get its records) and preprocess it for every model its earlier outputs do not already cover;
2. an actor pool explains (:func:`cams.export.executor.explain_batch`); each actor receives every model once,
   moved to the GPU Ray gave it (or kept on the CPU);
3. tasks draw and write with the local executor itself (:class:`HandedExecutor`: ``ExportExecutor.process``
   handed the actors' explanations; each result through :func:`cams.export.encode.render_result` on its writer
   threads), so both engines write the same files, records and grids, in the same format (or none, without
   overlays); a task returns only after its files are on disk.

The driver gathers each image's rows, skipped inputs and warnings, keyed by the image's place in the input list
(an image that comes twice counts once); ``run_export`` merges the manifest into the folder's
(:func:`cams.export.files.merge_manifest`, on the driver). An OS error while writing (disk full, permissions)
stops the run as it stops the local one: ``report.stopped`` says why in the same words, and what finished is
kept and listed.

Where the outputs go: every node must see the output folder at the same path (a shared filesystem: NFS, a
cluster filesystem, a FUSE-mounted bucket). Each task checks, before reading or writing, that it sees a probe
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
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cams.engine import Explanation
from cams.export.executor import ExportExecutor, explain_batch
from cams.export.files import ExportError, ExportReport, os_error_text, read_state
from cams.export.inputs import InputItem, read_input
from cams.export.plan import ExportPlan, ModelPlan
from cams.ray_runtime import (RayOptions, Shared, dataset_of, failure_message, from_column, pool_arguments,
                              ray_session, results_of, to_column, worker_device)
from pfnet.preprocess import prepare

PROBE_PREFIX = ".pfcam-ray-probe"


def without_networks(plan: ExportPlan) -> ExportPlan:
    """The plan for the tasks that read and write (they never run a model)."""
    return replace(plan, models=tuple(replace(model, network=None) for model in plan.models))


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
                          "(README: Scale-out on Ray)")


# ------------------------------------------------------------------------------------------------- the stages
def read_stage(batch: dict[str, np.ndarray], plan: ExportPlan, root: str, probe: str, max_bytes: int,
               max_pixels: int) -> dict[str, np.ndarray]:
    """Task: decode each input; preprocess it for every model that still needs it."""
    try:
        check_shared(root, probe)
        refused = None
    except ExportError as exc:  # said by the write stage, which meets it too
        refused = str(exc)
    rows = []
    for index, item in from_column(batch):
        image, info, problem = (None, None, None) if refused else read_input(item, max_bytes, max_pixels)
        tensors: dict[str, np.ndarray] = {}
        if image is not None:
            for model in plan.models:
                record = read_state(Path(root) / item.folder / model.folder / plan.record_name) or {}
                if plan.needs(Path(root), record, model):
                    tensors[model.id] = prepare(image, model.entry.preprocess, plan.mode).tensor.numpy()
        rows.append({"index": index, "item": item, "image": image, "info": info, "problem": problem,
                     "tensors": tensors, "explained": {}, "warnings": []})
    return to_column(rows)


class Explainer:
    """Actor: holds every model of the plan (on its GPU, if Ray gave it one) and explains batches of rows."""

    def __init__(self, plan: Shared):
        device = worker_device()
        plan = plan.get()
        self.plan = replace(plan, models=tuple(replace(model, network=model.network.to(device))
                                               for model in plan.models))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = from_column(batch)
        for model in self.plan.models:
            need = [i for i, row in enumerate(rows) if model.id in row["tensors"]]
            if not need:
                continue
            tensor = torch.from_numpy(np.stack([rows[i]["tensors"][model.id] for i in need]))
            if len(need) == 1:  # alone, an image takes another oneDNN convolution path (~1e-6 apart) than in the
                tensor = tensor.repeat(2, 1, 1, 1)  # batches the local engine explains: give it a copy for company
            explanation = explain_batch(self.plan, model, tensor, [rows[i]["item"].label for i in need],
                                        rows[need[0]]["warnings"].append)
            for position, i in enumerate(need):
                rows[i]["explained"][model.id] = None if explanation is None else (
                    explanation.heatmaps[position].numpy(), explanation.targets[position].numpy(),
                    explanation.probs[position].numpy())
        for row in rows:
            row["tensors"] = {}
        return to_column(rows)


class HandedExecutor(ExportExecutor):
    """The local executor, handed explanations computed by the actors instead of running the models."""

    def __init__(self, root: Path, plan: ExportPlan, report: ExportReport, explained: list[dict[str, Any]],
                 writers: int | None = None):
        super().__init__(root, plan, report, writers=writers)
        self.explained = explained  # per batch image: model id -> (heatmaps, targets, probs), or None if failed

    def explain(self, model: ModelPlan, batch, need: list[int], loaded=None) -> dict[int, tuple[Explanation, int]]:
        missing = [i for i in need if model.id not in self.explained[i]]
        if missing:  # its outputs went missing between the read and the write: the next run redoes it
            names = ", ".join(batch[i][0].label for i in missing)
            self.report.warnings.append(f"{model.id}: not explained in this run (its outputs changed while it "
                                        f"ran): {names}; run again to complete")
        found = {}
        for i in need:
            part = self.explained[i].get(model.id)
            if part is not None:
                heatmaps, targets, probs = (torch.from_numpy(value[None]) for value in part)
                found[i] = (Explanation(heatmaps, targets, probs, tuple(model.layers), self.plan.method,
                                        model.class_names), 0)
        return found


def write_stage(batch: dict[str, np.ndarray], plan: ExportPlan, root: str, probe: str,
                writers: int | None) -> dict[str, np.ndarray]:
    """Task: draw and write every file of these images (the local executor's code); each image's rows, files and
    the batch's warnings come back once the files are on disk. An OS error stops the batch, as it stops the
    local run; its rows say so (``stopped``), with what was finished. A refusal (``ExportError``: a planted link,
    an output folder this node does not see) comes back in its own words (``refused``) and fails the run."""
    rows = from_column(batch)
    good = [row for row in rows if row["image"] is not None]
    report = ExportReport(out_dir=Path(root))
    executor = HandedExecutor(Path(root), plan, report, [row["explained"] for row in good], writers)
    refused = None
    try:
        try:
            check_shared(root, probe)
            if good and plan.models:
                executor.process([(row["item"], row["image"], row["info"]) for row in good])
        finally:
            executor.finish()
    except ExportError as exc:
        refused = str(exc)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop met while resolving a path
        if isinstance(exc, RuntimeError) and "loop" not in str(exc).lower():
            raise
        report.stopped = os_error_text(exc, "writing the export")
    call = secrets.token_hex(8)  # this call's rows, so that the driver can wait for all of a stopped batch
    results = []
    for row in rows:
        folder = row["item"].folder if row["image"] is not None else None  # a bad input has no folder
        results.append({"index": row["index"], "info": row["info"], "problem": row["problem"],
                        "rows": [r for r in report.rows if r["image_dir"] == folder],
                        "files": [f for f in report.files if f.split("/", 1)[0] == folder],
                        "warnings": row["warnings"], "stale": 0, "stopped": report.stopped,
                        "refused": refused, "call": (call, len(rows))})
    if results:
        results[0]["warnings"] = results[0]["warnings"] + report.warnings
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
        except Exception as exc:  # noqa: BLE001 - Ray wraps the tasks' errors; the run stops with its message
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
    light = without_networks(plan)
    where = {"root": str(root), "probe": probe}
    dataset = dataset_of(list(enumerate(items)), blocks=-(-len(items) // plan.batch_size))
    dataset = dataset.map_batches(read_stage, batch_size=plan.batch_size, batch_format="numpy",
                                  fn_kwargs={"plan": light, **where, "max_bytes": max_bytes, "max_pixels": max_pixels})
    if plan.models:
        dataset = dataset.map_batches(Explainer, batch_size=plan.batch_size, batch_format="numpy",
                                      fn_constructor_kwargs={"plan": Shared(on_cpu(plan))}, **pool_arguments(options))
    dataset = dataset.map_batches(write_stage, batch_size=plan.batch_size, batch_format="numpy",
                                  fn_kwargs={"plan": light, **where, "writers": writers})
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

"""The Measure panel: localization across depth (issue #14, item 4). For the chosen images that have boxes (demo
scenes, or the user's own with a boxes CSV), every block of each loaded model (``cams.layers.block_layers``) is
explained with the page's method and scored against the boxes (``cams.depth``): one line per model, metric vs
depth, with the table beneath.

The work is bounded for a shared server: at most ``MEASURE_CELLS`` image x block heatmaps per model, images in
batches of ``MEASURE_BATCH`` (one explain call per model and batch covers every block), a progress bar, and a
Stop button that keeps what finished (Continue resumes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import streamlit as st

from pfcam_app.stoppable import Stoppable
from pfcam_app.core import (SCORECAM_BATCH, Settings, Slot, Source, decode, engine_targets, error_text, guard,
                            plain)
from pfcam_app.uploads import accepted, upload_types

MEASURE_CELLS = 256  # image x block heatmaps per model in one measurement (R50's 16 blocks: 16 images)
MEASURE_BATCH = 8  # images per explain call
BOXES_LIMIT_BYTES = 1 << 20  # a boxes CSV larger than this is refused unread
RESULTS_KEY = "_measure_results"  # session state: (signature, {model id: ModelRun})
RUN_KEY = "_measure_run"  # session state: the signature the user asked to measure
STOP_KEY = "_measure_stopped"  # session state: the signature whose measurement the user stopped
JOB = Stoppable("measure", RUN_KEY, STOP_KEY)


@dataclass
class Target:
    """An image with ground truth in its own pixels: boxes, and the scene's mask when it has one."""

    source: Source
    boxes: list[tuple[float, float, float, float]]
    mask: np.ndarray | None = None
    label: str | None = None  # its ground-truth class (a scene's, or the boxes CSV's label column)


@dataclass
class ModelRun:
    """One model's measurement so far: its depth scores, the next image to do, images left out and why."""

    scores: Any  # cams.depth.DepthScores
    planned: int
    next: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.next >= self.planned


def parse_boxes(data: bytes) -> tuple[dict[str, list[tuple[float, float, float, float]]], dict[str, str], list[str]]:
    """An uploaded boxes CSV (``image,x0,y0,x1,y1[,label]``, original-image pixels) -> boxes by image name, the
    first label given for each image, and the problems met (hostile input: never raises)."""
    from cams.bench_loc.data import parse_boxes_csv

    if len(data) > BOXES_LIMIT_BYTES:
        return {}, {}, [f"the boxes file is {len(data) / 2**20:.1f} MB; the limit is {BOXES_LIMIT_BYTES >> 20} MB"]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return {}, {}, ["the boxes file is not UTF-8 text (expected a CSV: image,x0,y0,x1,y1[,label])"]
    if "\0" in text:
        return {}, {}, ["the boxes file is binary, not a CSV (expected image,x0,y0,x1,y1[,label])"]
    problems: list[str] = []
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    labels: dict[str, str] = {}
    for _, name, box, label in parse_boxes_csv(text, "boxes CSV", problems):
        boxes.setdefault(name, []).append(box)
        if label and label.strip():
            labels.setdefault(name, label.strip())
    if not boxes and not problems:
        problems.append("the boxes file has no rows (expected image,x0,y0,x1,y1[,label])")
    return boxes, labels, problems


def bundled_boxes() -> tuple[dict[str, list[tuple[float, float, float, float]]], dict[str, str]]:
    """The hand-drawn boxes of the bundled photos (``assets/examples/boxes.csv``; none when it is missing)."""
    from pfcam_app.core import EXAMPLES_DIR

    try:
        data = (EXAMPLES_DIR / "boxes.csv").read_bytes()
    except OSError:
        return {}, {}
    boxes, labels, _ = parse_boxes(data)
    return boxes, labels


def measurable(sources: list[Source], csv_boxes: dict[str, list], csv_labels: dict[str, str] | None = None
               ) -> list[Target]:
    """The chosen images with ground truth: demo scenes (box, mask and class), images named in the boxes CSV
    (with the class its label column gives), and the bundled photos (their hand-drawn boxes)."""
    targets = []
    bundled, bundled_labels = bundled_boxes() if any(s.kind == "example" for s in sources) else ({}, {})
    for source in sources:
        if source.refused:
            continue
        if source.box is not None:
            targets.append(Target(source, [tuple(float(v) for v in source.box)], source.mask, source.label))
        elif source.name in csv_boxes:
            targets.append(Target(source, list(csv_boxes[source.name]), label=(csv_labels or {}).get(source.name)))
        elif source.kind == "example" and source.name in bundled:
            targets.append(Target(source, list(bundled[source.name]), label=bundled_labels.get(source.name) or None))
    return targets


def signature(targets: list[Target], settings: Settings, truth: bool = False, protocol: str = "wsol") -> tuple:
    """What a measurement depends on: a new one starts when any of it changes."""
    return (tuple((t.source.digest, tuple(t.boxes), t.label) for t in targets),
            tuple((slot.id, slot.key) for slot in settings.ready), settings.method, settings.options.recorded,
            "truth" if truth else settings.target, settings.mode, settings.align, protocol)


def truth_targets(batch: list[Target], class_names: list[str], skipped: list[str]) -> list[list[int]]:
    """Per image, its ground-truth class among ``class_names`` (-1: its top class, when it has no label the model
    knows; ``skipped`` says so)."""
    from cams.engine import resolve_classes

    rows = []
    for target in batch:
        ids, _ = resolve_classes([target.label], class_names, len(class_names)) if target.label else ([], [])
        note = (f"{target.source.name}: {repr(target.label) if target.label else 'no label'} is not one of the "
                "model's classes; its top class was explained")
        if not ids and note not in skipped:  # a stopped batch is redone: said once
            skipped.append(note)
        rows.append([ids[0] if ids else -1])
    return rows


def measure_batch(slot: Slot, run: ModelRun, targets: list[Target], settings: Settings, progress: Any,
                  truth: bool = False) -> None:
    """The next batch of images through one model: one explain call for every block, then scored. ``truth``:
    each image's ground-truth class instead of the page's target."""
    import torch

    from cams.depth import heatmap_region
    from cams.engine import explain
    from pfnet.preprocess import prepare

    chunk = targets[run.next:min(run.planned, run.next + MEASURE_BATCH)]
    batch, images = [], []
    for target in chunk:
        try:  # the session's decoded image, within its pixel budget
            images.append(decode(target.source.digest, target.source.name, target.source.data))
            batch.append(target)
        except Exception as exc:  # noqa: BLE001 - this image only
            run.skipped.append(f"{target.source.name}: {error_text(exc)}")
    if not batch:
        run.next += len(chunk)
        return
    prepared = [prepare(image, slot.entry.preprocess, settings.mode) for image in images]
    names = list(slot.entry.class_names())
    if truth:
        explained = truth_targets(batch, names, run.skipped)
    else:
        explained = engine_targets(("top", 1) if settings.target[0] == "top" else settings.target)  # the first only
    result = explain(slot.model, torch.stack([p.tensor for p in prepared]), run.scores.layers,
                     method=settings.method, targets=explained, class_names=names,
                     batch_size=SCORECAM_BATCH, align=settings.align, progress=progress,
                     **settings.options.explain_arguments())
    heatmaps = result.heatmaps.detach().cpu().numpy()  # [N, 1, L, H, W]
    regions = [heatmap_region(target.boxes, target.mask, ready.crop_box, image.size, heatmaps.shape[-2:])
               for target, image, ready in zip(batch, images, prepared)]
    # Scored only now that the batch is through (a Stop during explain redoes the whole batch, never half of it).
    for index, (target, (boxes, mask)) in enumerate(zip(batch, regions)):
        if index < len(result.errors) and result.errors[index]:  # NaN: that image's error, never a score
            run.skipped.append(f"{target.source.name}: {result.errors[index]}")
        elif boxes:
            run.scores.add(heatmaps[index, 0], boxes, mask)
        else:
            run.skipped.append(f"{target.source.name}: its boxes fall outside {slot.entry.name}'s crop")
    run.next += len(chunk)


def measure_panel(sources: list[Source], settings: Settings) -> None:
    with st.expander("Measure: localization across depth", expanded=RUN_KEY in st.session_state,
                     icon=":material/monitoring:"):
        st.caption("Every block of each loaded model, scored against the ground-truth boxes of the chosen images "
                   "(demo scenes and the bundled photos have theirs; for your own images upload a boxes CSV "
                   "`image,x0,y0,x1,y1[,label]` in original-image pixels). The page's method, and its target "
                   "or each image's ground-truth class; "
                   f"at most {MEASURE_CELLS} image × block heatmaps per model.")
        upload = accepted(st.file_uploader("Boxes CSV for your uploaded images", type=upload_types("boxes CSV"),
                                           key="measure_boxes", max_upload_size=1), "boxes CSV")
        csv_boxes: dict[str, list] = {}
        csv_labels: dict[str, str] = {}
        if upload is not None:
            csv_boxes, csv_labels, problems = parse_boxes(upload.getvalue())
            for problem in problems[:10]:
                st.warning(f"Boxes CSV: {plain(problem)}", icon=":material/warning:")
            if len(problems) > 10:
                st.caption(f"… and {len(problems) - 10} more problems in the boxes CSV.")
        targets = measurable(sources, csv_boxes, csv_labels)
        if not targets:
            st.info("None of the chosen images has boxes: pick demo scenes, or upload a boxes CSV naming your "
                    "uploaded images.", icon=":material/crop_free:")
            return
        if not settings.ready:
            st.info("Load a model in the sidebar to measure.", icon=":material/arrow_back:")
            return
        truth = any(target.label for target in targets) and st.toggle(
            "Explain each image's ground-truth class", key="measure_truth",
            help="The class of the scene, or the label column of the boxes CSV, instead of the page's target (the "
                 "protocol of MaxBoxAccV2). An image whose label is not one of a model's classes is explained at "
                 "its top class, and the notes under the table say so.")
        from cams.boxacc import DEFAULT_PROTOCOL, PROTOCOL_LABELS, PROTOCOLS

        protocol = st.radio("MaxBoxAccV2 protocol", PROTOCOLS, index=PROTOCOLS.index(DEFAULT_PROTOCOL),
                            format_func=lambda p: f"{p} ({PROTOCOL_LABELS[p]})", horizontal=True,
                            key="measure_protocol",
                            help="wsol: clovaai/wsolevaluation's exact numbers (8-bit thresholds, inclusive boxes), "
                                 "comparable with the WSOL literature. pfcam: the float map and half-open boxes "
                                 "(docs/measuring.md).")
        sig = signature(targets, settings, truth, protocol)
        held = st.session_state.get(RESULTS_KEY)
        runs: dict[str, ModelRun] = held[1] if held and held[0] == sig else {}
        st.session_state[RESULTS_KEY] = (sig, runs)  # one measurement per session: older ones are dropped
        unfinished = not runs or any(not run.done for run in runs.values())
        holder = JOB.controls(sig, unfinished, "Measure", "Measuring stopped; what finished is shown.",
                              "Stop measuring", "Ends at the next progress step; finished images stay.")
        if holder is not None:
            _measure(targets, settings, runs, truth, protocol)
            holder.empty()
        if runs:
            _show(runs, settings)


def _measure(targets: list[Target], settings: Settings, runs: dict[str, ModelRun], truth: bool = False,
             protocol: str = "wsol") -> None:
    from cams.depth import DepthScores
    from cams.layers import block_layers

    bar = st.progress(0.0, text="Measuring…")
    for slot in settings.ready:
        with guard(f"Measuring {slot.entry.name}"):
            if slot.id not in runs:
                layers = block_layers(slot.model)
                if not layers:
                    st.warning(f"{slot.entry.name} has no blocks to measure.")
                    continue
                planned = min(len(targets), max(1, MEASURE_CELLS // len(layers)))
                runs[slot.id] = ModelRun(DepthScores(layers, protocol), planned)
            run = runs[slot.id]
            while not run.done:
                what = f"**{slot.entry.name}** · images {run.next + 1}–{min(run.planned, run.next + MEASURE_BATCH)}" \
                       f" of {run.planned} · {len(run.scores.layers)} blocks"

                def progress(done: int, total: int, what: str = what) -> None:
                    bar.progress(min(1.0, done / total) if total else 0.0, text=f"{what}: {done} / {total}")

                progress(0, 1)
                measure_batch(slot, run, targets, settings, progress, truth)
    bar.empty()


def _show(runs: dict[str, ModelRun], settings: Settings) -> None:
    import pandas as pd

    from cams.depth import DEPTH_METRICS

    names = {slot.id: slot.entry.name for slot in settings.ready}
    rows = [{"model": names.get(model_id, model_id), **row}
            for model_id, run in runs.items() if run.scores.n for row in run.scores.rows()]
    for model_id, run in runs.items():
        left = run.planned - run.next
        note = f" ({left} not measured yet)" if left else ""
        if run.skipped:
            st.caption(plain(f"{names.get(model_id, model_id)}: " + "; ".join(run.skipped[:5])))
        if note:
            st.caption(plain(f"{names.get(model_id, model_id)}: {run.scores.n} images scored{note}."))
    if not rows:
        st.caption("No image scored yet.")
        return
    table = pd.DataFrame(rows)
    metric = st.radio("Metric", list(DEPTH_METRICS), format_func=DEPTH_METRICS.get, horizontal=True,
                      key="measure_metric")
    chart = table.pivot_table(index="depth", columns="model", values=metric, aggfunc="first")
    st.line_chart(chart, x_label="block (1 = nearest the input)", y_label=DEPTH_METRICS[metric])
    st.dataframe(table.rename(columns=DEPTH_METRICS), hide_index=True, key="measure_table")
    target = "top-1 class" if settings.target[0] == "top" else plain(str(settings.target[1]))
    protocol = next(iter(runs.values())).scores.protocol
    used = f" ({settings.options.label})" if settings.options.label else ""
    st.caption(f"Up to {int(table['n'].max())} image(s) per model · {settings.method}{used} · target: {target} · "
               f"MaxBoxAccV2: {protocol} protocol · pointing game: a hit when any maximal pixel is on the object.")

"""Carrying out an export plan (:mod:`cams.export.plan`) on this machine: per batch of images one ``explain``
call per model, then the overlays, heatmaps, result records and grids, drawn and written by a pool of writer
threads while the next batch is explained (the per-result work is :func:`cams.export.encode.render_result`).
A loader thread decodes and preprocesses the next images meanwhile (:meth:`ExportExecutor.load_ahead`), so the
thread that runs the network does little else."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from PIL import Image

from cams import engine
from cams.export.encode import HEATMAP, OVERLAY, overlay_suffix, render_result, rgb_pixels, write_grid_sheet
from cams.export.files import (STATE_FORMAT, ExportReport, ensure_dir, entry_key, json_text, now, read_state,
                               write_npy, write_text)
from cams.export.inputs import InputItem, inside, safe_name
from cams.export.plan import RAW_KEYS, ExportPlan, ModelPlan
from cams.images import ImageError, load_image
from cams.render import grid, shrink, thumbnail
from pfnet.errors import PfnetError
from pfnet.preprocess import Preprocess, crop_box_for, prepare


CLASS_CHARS = 40
MAX_PENDING_WRITES = 64  # queued PNG/npy writes before the explaining side waits


def write_record(path: Path, record: Mapping[str, Any], files: Mapping[str, Future] | None = None) -> None:
    """One image and model's result record (:data:`STATE_FORMAT`), read back by re-runs. ``files``: entry key ->
    the writer job of that entry's files; the record is written after them, and an entry whose files failed
    (a full disk) is left out, so a record never names a file that was not written."""
    if files:
        entries = dict(record.get("entries", {}))
        for key, job in files.items():
            if job.exception() is not None:  # waits for the job; its failure is reported by finish()
                entries.pop(key, None)
        if not entries:
            return
        record = {**record, "entries": entries}
    write_text(path, json_text(record, ensure_ascii=True))


def default_writers() -> int:
    """Writer threads: encoding (OpenCV, zlib, numpy) releases the GIL, so they run beside the network."""
    return max(2, min(4, os.cpu_count() or 1))


def network_threads(overlays: bool = True, cores: int | None = None) -> int:
    """Torch threads for an export's network on the CPU, leaving cores to the threads beside it: half of them
    while writers draw and encode overlays (for the demo pair they spend about twice the network's CPU per
    image), one for the loader when only heatmaps are written. Torch's own default (one thread per core) makes
    its threads wait on cores the writers hold: on 2 cores ``benchmarks/bench_export_threads.py`` (200 photos, demo
    pair) took 10.7 s with two threads against 8.6 s with one for PNG overlays, 6.7 s against 6.3 s for heatmaps
    only."""
    cores = max(1, cores or os.cpu_count() or 1)
    return max(1, cores // 2 if overlays else cores - 1)


def result_stem(layer: str, method: str, target: str, class_name: str, class_id: int) -> str:
    """The file name, less its suffix, of one result's overlay and heatmap in its image and model folder:
    ``<layer>__<method>__<target>-<class>`` (each part sanitised; ``target`` as :attr:`ModelPlan.targets`)."""
    return f"{safe_name(layer)}__{safe_name(method)}__{target}-{safe_name(class_name, CLASS_CHARS, f'class{class_id}')}"


def explain_batch(plan: ExportPlan, model: ModelPlan, tensor: Any, items: list[InputItem],
                  warn: Callable[[str], None]) -> engine.Explanation | None:
    """``model``'s explanation of a preprocessed batch of ``items`` as the plan asks (every planned layer and
    target), or None when it failed; ``warn`` is told why, naming the images. Every engine explains through this."""
    try:
        return engine.explain(model.network, tensor, model.layers, plan.method,
                              targets=model.engine_targets([item.key for item in items]), align=model.align,
                              class_names=model.class_names, batch_size=plan.batch_size, keep_raw=plan.raw_maps,
                              **plan.explain_options)
    except (PfnetError, ValueError, RuntimeError) as exc:
        warn(f"{model.id}: explaining failed for {', '.join(item.label for item in items)}: {exc}")
        return None


# reuse(model id, input, image) -> an Explanation of that one image made with the run's settings, or None
Reuse = Callable[[str, InputItem, Image.Image], Any]


@dataclass
class Loaded:
    """What the loader thread made of one image besides decoding it: its output folders (model id -> folder), the
    network inputs per preprocessing (models sharing one share them), with overlays the pixel array and its
    grid-cell-sized copy, and the digest of the file's bytes."""

    folders: dict[str, Path] = field(default_factory=dict)
    tensors: dict[Preprocess, torch.Tensor] = field(default_factory=dict)
    pixels: np.ndarray | None = None
    small: np.ndarray | None = None
    source: str | None = None


class ExportExecutor:
    """Carries out ``plan`` into the folder ``root`` (checked by the caller), accumulating ``report``."""

    def __init__(self, root: Path, plan: ExportPlan, report: ExportReport, reuse: Reuse | None = None,
                 writers: int | None = None):
        self.root, self.plan, self.report = root, plan, report
        self.reuse = reuse
        self.stale_count = 0
        # Rendering overlays and grids and encoding images are the export's own cost; writer threads overlap
        # them with the next explain (numpy, OpenCV and zlib release the GIL). Jobs start in the order they were
        # queued, so a grid job waits only on thumbnail jobs already started (no deadlock). The backlog is
        # bounded so a large folder cannot pile up in memory.
        self._writer = ThreadPoolExecutor(max_workers=writers or default_writers(),
                                          thread_name_prefix="pfcam-export-writer")
        self._pending: deque[Future] = deque()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfcam-export-loader")
        self._loaded: dict[str, Loaded] = {}  # item key -> what load_ahead made, taken by process()

    def submit(self, job: Callable[..., Any], *args: Any) -> Future:
        """Run ``job(*args)`` on the writer thread, after every job queued before it."""
        future = self._writer.submit(job, *args)
        self._pending.append(future)
        while len(self._pending) > MAX_PENDING_WRITES:
            self._pending.popleft().result()
        return future

    def write(self, write: Callable[[Path, Any], None], path: Path, value: Any) -> None:
        """Write ``value`` to ``path`` (atomically, as ``write`` does) on the writer thread."""
        self.submit(write, path, value)

    def finish(self) -> None:
        """Wait for every queued write; re-raise the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pending.clear()
            self._writer.shutdown(wait=True)
            self._loader.shutdown(wait=True, cancel_futures=True)
            self._loaded.clear()

    # -------------------------------------------------------------------------------------------- loading
    def load_ahead(self, items: Iterable[InputItem], load: Callable[[InputItem], Image.Image],
                   ahead: int | None = None, on_caller: bool = False
                   ) -> Iterator[tuple[InputItem, Image.Image | ImageError]]:
        """``(item, load(item))`` in order, or ``(item, the ImageError)`` for a bad one: the loader thread decodes
        up to ``ahead`` images (default: a batch) beyond the one handed out and prepares their network inputs and
        pixels, while the caller's thread explains the batch before. Other exceptions are raised here.
        ``on_caller``: ``load`` runs on the caller's thread, one image at a time (a decoder that needs the caller's
        thread, as the app's reads its Streamlit session)."""
        if on_caller:
            for item in items:
                yield item, self._load(item, load)
            return
        pending: deque[tuple[InputItem, Future]] = deque()
        remaining = iter(items)
        ahead = max(1, ahead or self.plan.batch_size)
        while True:
            while len(pending) <= ahead and (item := next(remaining, None)) is not None:
                pending.append((item, self._loader.submit(self._load, item, load)))
            if not pending:
                return
            item, future = pending.popleft()
            yield item, future.result()

    def _load(self, item: InputItem, load: Callable[[InputItem], Image.Image]) -> Image.Image | ImageError:
        """Loader-thread job: decode one image and make what ``process`` and the writers will need of it."""
        try:
            image = load(item)
        except ImageError as exc:
            return exc
        loaded = Loaded()
        for model in self.plan.models:
            if not model.explains(item.key):
                continue  # no result from this model: no folder either
            loaded.folders[model.id] = ensure_dir(self.root, item.folder, model.folder)
            preprocess = model.entry.preprocess
            if preprocess not in loaded.tensors:
                loaded.tensors[preprocess] = prepare(image, preprocess, self.plan.mode).tensor
        if self.plan.overlays:
            loaded.pixels = rgb_pixels(image)
            loaded.small = shrink(loaded.pixels, self.plan.cell_size)
        loaded.source = item.content_digest()
        self._loaded[item.key] = loaded
        return image

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def explain(self, model: ModelPlan, batch: list[tuple[InputItem, Image.Image, dict[str, Any]]],
                need: list[int], loaded: list[Loaded]) -> dict[int, tuple[engine.Explanation, int]]:
        """``model``'s explanation of the images ``need`` (indices into ``batch``, whose loader-thread work is
        ``loaded``): index -> (explanation, the image's position in it); empty when explaining failed (a warning
        says so). The one step another engine may replace (:class:`cams.export.ray_executor.ActorExecutor`)."""
        tensor = torch.stack([self._network_input(loaded[index], batch[index][1], model) for index in need])
        explanation = explain_batch(self.plan, model, tensor, [batch[index][0] for index in need],
                                    self.report.warnings.append)
        if explanation is None:
            return {}
        return {index: (explanation, position) for position, index in enumerate(need)}

    # -------------------------------------------------------------------------------------------- one batch
    def process(self, batch: list[tuple[InputItem, Image.Image, dict[str, Any]]]) -> None:
        loaded = [self._loaded.pop(item.key, None) or Loaded() for item, _, _ in batch]
        # cells[(image index, model id, layer, target)] = (thumbnail, its future, or None; caption; computed now?)
        cells: dict[tuple[int, str, str, str], tuple[Image.Image | None, str, bool]] = {}
        rows: dict[int, list[dict[str, Any]]] = {index: [] for index in range(len(batch))}
        for model in self.plan.models:
            # images without a label this model knows get nothing from it (run_export and the plan say so)
            mine = [index for index, (item, _, _) in enumerate(batch) if model.explains(item.key)]
            states: dict[int, dict[str, Any]] = {}
            need: list[int] = []
            for index in mine:
                item = batch[index][0]
                folder = loaded[index].folders.get(model.id) or ensure_dir(self.root, item.folder, model.folder)
                states[index] = read_state(folder / self.plan.record_name) or {}
                if self.plan.needs(self.root, states[index], model):
                    need.append(index)
            found = {index: (known, 0) for index in need
                     if (known := self._reused(model, *batch[index][:2])) is not None}
            need = [index for index in need if index not in found]
            if need:
                found.update(self.explain(model, batch, need, loaded))
            for index in mine:
                item, image, _ = batch[index]
                explanation, position = found.get(index, (None, None))
                if position is not None:
                    errors = explanation.errors or engine.image_errors(explanation.probs, explanation.heatmaps)
                    if errors[position]:  # NaN: this image's error, a reason in the manifest, no result written
                        self.report.skipped.append({"input": item.label, "stage": "explain", "model": model.id,
                                                    "reason": f"{model.id}: {errors[position]}; no result written"})
                        position = None
                box = crop_box_for(image.size, model.entry.preprocess, self.plan.mode)
                state = self._update(model, item, image, box, states[index], explanation, position, loaded[index])
                for layer, target in self.plan.outputs(model):
                    entry = state.get("entries", {}).get(entry_key(layer, target))
                    if entry is None:
                        continue
                    rows[index].append(self._row(item, model, entry, target))
                    caption = f"{entry['class_name']}\n{entry['probability']:.1%}"
                    if model.chosen_classes:  # a given class: where the model ranks it
                        caption += f" · rank {entry['rank']}"
                    cells[(index, model.id, layer, target)] = (entry.pop("_thumb", None), caption,
                                                               entry.get("_status") == "computed")
        for index, (item, _image, info) in enumerate(batch):
            grids = self._grids(index, item, cells)
            info["grids"] = grids
            for row in rows[index]:
                row["grid"] = grids.get(row["target"], "")
            self.report.rows.extend(rows[index])

    def _network_input(self, loaded: Loaded, image: Image.Image, model: ModelPlan) -> torch.Tensor:
        """The image as ``model`` takes it: made by the loader thread, or here if it was not (an image handed to
        ``process`` directly)."""
        preprocess = model.entry.preprocess
        if preprocess not in loaded.tensors:
            loaded.tensors[preprocess] = prepare(image, preprocess, self.plan.mode).tensor
        return loaded.tensors[preprocess]

    def _reused(self, model: ModelPlan, item: InputItem, image: Image.Image) -> Any:
        """The caller's explanation of this image (``reuse``), if it has one made as this run would make it."""
        if self.reuse is None or model.label_ids is not None or self.plan.raw_maps:
            return None
        known = self.reuse(model.id, item, image)
        fits = (known is not None and tuple(known.layers) == tuple(model.layers)
                and known.method == self.plan.method and tuple(known.heatmaps.shape[:2]) == (1, len(model.targets))
                and dict(known.options) == self.plan.run_options  # maps made with other options are other maps
                and (not model.classes or [int(c) for c in known.targets[0]] == list(model.classes))
                and int(known.heatmaps.shape[-1]) == int(model.entry.preprocess.input_size))
        return known if fits else None

    def _update(self, model: ModelPlan, item: InputItem, image: Image.Image, box, state: dict[str, Any],
                explanation, position: int | None, loaded: Loaded) -> dict[str, Any]:
        """Write what this image and model still need; return the merged state (entries get ``_status``)."""
        if loaded.source is None:  # not made by the loader thread
            loaded.source = item.content_digest()
        # Outputs of another version of this file (changed in place: same path, same folder) are stale too.
        settings = {**self.plan.record_settings(model), "source": loaded.source}
        if model.label_ids is not None:  # another label for this image makes its earlier result stale
            settings["label"] = model.label_ids[item.key]
        old_entries = state.get("entries", {}) if isinstance(state.get("entries"), dict) else {}
        folder = self.root / item.folder / model.folder
        entries: dict[str, Any] = {}
        changed = False
        for layer_index, layer in enumerate(model.layers):
            for target_index, target in enumerate(model.targets):
                key = entry_key(layer, target)
                old = old_entries.get(key)
                if self.plan.usable(self.root, old) and not self.plan.overwrite:
                    kept = dict(old)
                    earlier = old.get("settings") or state.get("settings")
                    kept["_status"] = "existing" if self.plan.same_settings(earlier, settings) else "stale"
                    self.stale_count += kept["_status"] == "stale"
                    entries[key] = kept
                    continue
                if explanation is None or position is None:
                    continue  # not computed (explain failed): no row
                class_id = int(explanation.targets[position, target_index])
                probs = explanation.probs[position]
                rank = int((probs > probs[class_id]).sum()) + 1 if model.chosen_classes else target_index + 1
                names = model.class_names
                class_name = names[class_id] if names and 0 <= class_id < len(names) else f"class{class_id}"
                probability = float(probs[class_id])
                stem = result_stem(layer, self.plan.method, target, class_name, class_id)
                npy = folder / f"{stem}.npy"
                png = folder / f"{stem}{overlay_suffix(self.plan.overlay_format)}" if self.plan.overlays else None
                heat = explanation.heatmaps[position, target_index, layer_index].numpy()
                raw_fields: dict[str, Any] = {}
                if self.plan.raw_maps and explanation.raw is not None:
                    raw = explanation.raw[position, target_index, layer_index].numpy()
                    raw_npy = folder / f"{stem}.raw.npy"
                    self.submit(write_npy, raw_npy, raw)
                    self.report.files.append(self.rel(raw_npy))
                    raw_fields = {"raw_heatmap": self.rel(raw_npy), "raw_min": float(raw.min()),
                                  "raw_max": float(raw.max())}
                files = [(path, kind) for path, kind in ((png, OVERLAY), (npy, HEATMAP))
                         # a link is replaced
                         if path is not None and (self.plan.overwrite or path.is_symlink() or not path.exists())]
                self.report.files.extend(self.rel(path) for path, _ in files)
                if self.plan.overlays and loaded.pixels is None:  # drawn once for all of this image's results
                    loaded.pixels = rgb_pixels(image)
                    loaded.small = shrink(loaded.pixels, self.plan.cell_size)
                thumb = self.submit(partial(render_result, pixels=loaded.pixels, small=loaded.small), image, heat,
                                    box, self.plan.colormap, self.plan.opacity, files, self.plan.overlay_format,
                                    self.plan.cell_size if self.plan.overlays else None)
                ours = {self.rel(path) for path in (png, npy) if path is not None}
                if self.plan.overwrite and isinstance(old, dict):  # another class name leaves an old file behind
                    for name in ("overlay", "heatmap"):
                        previous = old.get(name)
                        if isinstance(previous, str) and previous not in ours:
                            earlier_file = self.root / previous
                            if (inside(earlier_file, self.root) and earlier_file.is_file()
                                    and earlier_file.parent == folder.resolve()):
                                earlier_file.unlink()
                entries[key] = {"layer": layer, "target": target, "rank": rank, "class_id": class_id,
                                "class_name": class_name, "probability": probability,
                                "overlay": self.rel(png) if png else None, "heatmap": self.rel(npy),
                                "crop_box": [round(float(v), 4) for v in box], "input_size": model.input_size,
                                "settings": settings, "_status": "computed", "_thumb": thumb, **raw_fields}
                changed = True
        if changed:
            kept_extra = {key: value for key, value in old_entries.items()
                          if key not in entries and isinstance(value, dict)}
            record = {"format": STATE_FORMAT, "image": item.label, "model": model.id, "method": self.plan.method,
                      "settings": settings, "size": list(image.size), "updated_at": now(),
                      "entries": {key: {k: v for k, v in value.items() if not k.startswith("_")}
                                  for key, value in {**kept_extra, **entries}.items()}}
            path = folder / self.plan.record_name
            jobs = {key: value["_thumb"] for key, value in entries.items() if isinstance(value.get("_thumb"), Future)}
            # written beside the network like the rest, after the files it names (queued before it: no deadlock)
            self.submit(write_record, path, record, jobs)
            self.report.files.append(self.rel(path))
        return {"entries": entries}

    def _row(self, item: InputItem, model: ModelPlan, entry: Mapping[str, Any], target: str) -> dict[str, Any]:
        return {"image": item.label, "image_dir": item.folder, "model": model.id, "layer": entry["layer"],
                "method": self.plan.method, "target": target, "rank": int(entry["rank"]),
                "class_id": int(entry["class_id"]), "class_name": str(entry["class_name"]),
                "probability": round(float(entry["probability"]), 6),
                "overlay": entry.get("overlay") or "", "heatmap": entry["heatmap"], "grid": "",
                "status": entry.get("_status", "existing"),
                "crop_box": entry.get("crop_box"), "input_size": entry.get("input_size"),
                **{key: entry[key] for key in RAW_KEYS if key in entry}}

    def _grids(self, index: int, item: InputItem, cells) -> dict[str, str]:
        """Write (when new results or missing) one grid per target; return target -> relative path (none without
        overlays)."""
        if not self.plan.overlays:
            return {}
        columns: list[str] = []
        for model in self.plan.models:
            columns.extend(layer for layer in model.layers if layer not in columns)
        written: dict[str, str] = {}
        for target in self.plan.targets:
            mine = {key: value for key, value in cells.items() if key[0] == index and key[3] == target}
            if not mine:
                continue
            path = self.root / item.folder / f"grid__{safe_name(self.plan.method)}__{target}.png"
            fresh = any(value[2] for value in mine.values())
            if path.exists() and not fresh and not self.plan.overwrite:
                written[target] = self.rel(path)
                continue
            pictures, captions = [], []
            for model in self.plan.models:
                row_pictures, row_captions = [], []
                for layer in columns:
                    cell = mine.get((index, model.id, layer, target))
                    picture = None if cell is None else cell[0]
                    if cell is not None and picture is None:  # kept from an earlier run: read it back
                        picture = self._thumb_from_disk(item, model, layer, target)
                    row_pictures.append(picture)
                    row_captions.append("" if cell is None else cell[1])
                pictures.append(row_pictures)
                captions.append(row_captions)
            self.submit(self._write_grid, path, pictures, columns, captions)
            self.report.files.append(self.rel(path))
            written[target] = self.rel(path)
        return written

    def _write_grid(self, path: Path, pictures: list[list[Any]], columns: list[str],
                    captions: list[list[str]]) -> None:
        """Writer-thread job: compose and write one grid; cells are thumbnails or futures of earlier jobs."""
        cells = [[picture.result() if isinstance(picture, Future) else picture for picture in row]
                 for row in pictures]
        sheet = grid(cells, [model.label for model in self.plan.models], columns, captions,
                     cell_size=self.plan.cell_size)
        write_grid_sheet(path, sheet)

    def _thumb_from_disk(self, item: InputItem, model: ModelPlan, layer: str, target: str) -> Image.Image | None:
        state = read_state(self.root / item.folder / model.folder / self.plan.record_name)
        entry = (state or {}).get("entries", {}).get(entry_key(layer, target))
        if not self.plan.usable(self.root, entry):
            return None
        try:
            picture = load_image(self.root / entry["overlay"])
        except ImageError:
            return None
        return thumbnail(picture, self.plan.cell_size)

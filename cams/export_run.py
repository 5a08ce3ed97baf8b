"""The work of one export: which layers and top-k each model gets (``_plans``), then per batch of images one
``explain`` call per model, the overlays, heatmaps, result records and grids (``_Run``)."""
from __future__ import annotations

import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from cams.align import layer_offsets
from cams.export_files import (ExportReport, STATE_FORMAT, _ensure_dir, _key, _now, _read_state, _usable,
                               _write_npy, _write_png, _write_text)
from cams.export_inputs import InputItem, _inside, _short_hash, safe_name
from cams.images import ImageError, load_image
from cams.render import grid, overlay, thumbnail
from pfnet.errors import PfnetError


CLASS_CHARS = 40
MAX_PENDING_WRITES = 64  # queued PNG/npy writes before the explaining side waits
# reuse(model id, input, image) -> an Explanation of that one image made with the run's settings, or None
Reuse = Callable[[str, InputItem, Image.Image], Any]


@dataclass
class _Plan:
    id: str
    folder: str
    label: str
    model: Any
    entry: Any
    layers: list[str]
    class_names: list[str] | None
    topk: int
    align: str = "model"  # cams.explain's align: "model" (the model's recorded offsets) or "none"
    cam_offsets: dict[str, list[float]] = field(default_factory=dict)  # the non-zero offsets explain draws with

    @property
    def input_size(self) -> int:
        return int(self.entry.preprocess.input_size)


def _requested_layers(layers: Any, model_id: str, family: str | None) -> Sequence[str] | None:
    if layers is None or isinstance(layers, str):
        return None if layers is None else [name.strip() for name in layers.split(",") if name.strip()]
    if isinstance(layers, Mapping):  # keyed by model id or by family ("resnet", "vit", "pit")
        chosen = layers.get(model_id, layers.get(family) if family else None)
        return None if chosen is None else list(chosen)
    return list(layers)


def _plans(models: Mapping[str, tuple[Any, Any]], layers: Any, topk: int, warn: Callable[[str], None],
           align: str = "model") -> list[_Plan]:
    from cams.layers import LayerError, default_layers, family_of, layer_names

    plans: list[_Plan] = []
    folders: set[str] = set()
    for model_id, pair in models.items():
        model, entry = pair
        label = getattr(entry, "name", None) or model_id
        try:
            family = family_of(model)
            valid = layer_names(model)
            wanted = _requested_layers(layers, model_id, family)
            wanted = list(default_layers(model)) if wanted is None else wanted
        except LayerError as exc:
            warn(f"{model_id}: skipped ({exc})")
            continue
        chosen: list[str] = []
        for name in wanted:
            if name not in valid:
                shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
                warn(f"{model_id}: has no layer {name!r}; skipped for this model (valid layers: {shown})")
            elif name not in chosen:
                chosen.append(name)
        if not chosen:
            warn(f"{model_id}: none of the requested layers exists; model skipped")
            continue
        try:
            class_names = list(entry.class_names())
        except Exception:  # noqa: BLE001 - names are a nicety; ids still work
            class_names = None
        classes = getattr(model, "num_classes", None) or (len(class_names) if class_names else None)
        k = topk
        if isinstance(classes, int) and k > classes:
            warn(f"{model_id}: top-{topk} asked of a model with {classes} classes; using top-{classes}")
            k = classes
        folder = safe_name(model_id, 64, "model")
        if folder in folders:
            folder = f"{folder}-{_short_hash(model_id)}"
        folders.add(folder)
        offsets = {layer: list(offset) for layer, offset in zip(chosen, layer_offsets(model, chosen, align))
                   if any(offset)}
        plans.append(_Plan(model_id, folder, str(label), model, entry, chosen, class_names, k, align, offsets))
    return plans


class _Run:
    """One export run: holds the settings and accumulates the report."""

    def __init__(self, root: Path, plans: list[_Plan], method: str, mode: str, colormap: str, opacity: float,
                 overwrite: bool, batch_size: int, cell_size: int, report: ExportReport, reuse: Reuse | None = None):
        self.root, self.plans, self.method, self.mode = root, plans, method, mode
        self.colormap, self.opacity, self.overwrite = colormap, float(opacity), overwrite
        self.batch_size, self.cell_size, self.report = batch_size, cell_size, report
        self.reuse = reuse
        self.stale_count = 0
        # Rendering overlays and grids and encoding PNGs are the export's own cost; one writer thread overlaps
        # them with the next explain (numpy, OpenCV, Pillow and zlib release the GIL). It runs jobs in the order
        # they were queued, so a grid job finds the thumbnails of the overlay jobs queued before it done. The
        # backlog is bounded so a large folder cannot pile up in memory.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfcam-export-writer")
        self._pending: deque[Future] = deque()

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

    def _render(self, image: Image.Image, heat, box, files: list[tuple[Path, Callable[[Path, Any], None], str]]
                ) -> Image.Image:
        """Writer-thread job: the overlay, the files in ``files`` ((path, writer, "overlay"|"heatmap")), and the
        grid thumbnail, which is returned."""
        picture = overlay(image, heat, box, self.colormap, self.opacity)
        for path, write, kind in files:
            write(path, picture if kind == "overlay" else heat)
        return thumbnail(picture, self.cell_size)

    def finish(self) -> None:
        """Wait for every queued write; re-raise the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pending.clear()
            self._writer.shutdown(wait=True)

    def settings_for(self, plan: _Plan) -> dict[str, Any]:
        settings = {"mode": self.mode, "colormap": self.colormap, "opacity": round(self.opacity, 4),
                    "input_size": plan.input_size}
        if plan.cam_offsets:  # outputs drawn with another alignment are kept, flagged stale
            settings["cam_offsets"] = plan.cam_offsets
        return settings

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # -------------------------------------------------------------------------------------------- one batch
    def process(self, batch: list[tuple[InputItem, Image.Image, dict[str, Any]]]) -> None:
        from cams.engine import explain
        from pfnet.preprocess import crop_box_for, prepare_batch

        # cells[(image index, model id, layer, rank)] = (thumbnail, its future, or None; caption; computed now?)
        cells: dict[tuple[int, str, str, int], tuple[Image.Image | None, str, bool]] = {}
        rows: dict[int, list[dict[str, Any]]] = {index: [] for index in range(len(batch))}
        for plan in self.plans:
            states: list[dict[str, Any]] = []
            need: list[int] = []
            for index, (item, image, _) in enumerate(batch):
                folder = _ensure_dir(self.root, item.folder, plan.folder)
                state = _read_state(folder / f"results__{safe_name(self.method)}.json") or {}
                entries = state.get("entries", {}) if state else {}
                done = all(_usable(self.root, entries.get(_key(layer, rank)))
                           for layer in plan.layers for rank in range(1, plan.topk + 1))
                states.append(state)
                if self.overwrite or not done:
                    need.append(index)
            found = {index: (known, 0) for index in need
                     if (known := self._reused(plan, *batch[index][:2])) is not None}
            need = [index for index in need if index not in found]
            if need:
                images = [batch[index][1] for index in need]
                tensor, boxes = prepare_batch(images, plan.entry.preprocess, self.mode)
                try:
                    explanation = explain(plan.model, tensor, plan.layers, self.method, targets=plan.topk,
                                          align=plan.align,
                                          class_names=plan.class_names, batch_size=self.batch_size)
                    found.update((index, (explanation, position)) for position, index in enumerate(need))
                except (PfnetError, ValueError, RuntimeError) as exc:
                    names = ", ".join(batch[index][0].label for index in need)
                    self.report.warnings.append(f"{plan.id}: explaining failed for {names}: {exc}")
            for index, (item, image, info) in enumerate(batch):
                explanation, position = found.get(index, (None, None))
                box = crop_box_for(image.size, plan.entry.preprocess, self.mode)
                state = self._update(plan, item, image, box, states[index], explanation, position)
                for layer in plan.layers:
                    for rank in range(1, plan.topk + 1):
                        entry = state.get("entries", {}).get(_key(layer, rank))
                        if entry is None:
                            continue
                        rows[index].append(self._row(item, plan, entry))
                        cells[(index, plan.id, layer, rank)] = (entry.pop("_thumb", None),
                                                                f"{entry['class_name']}\n{entry['probability']:.1%}",
                                                                entry.get("_status") == "computed")
        for index, (item, image, info) in enumerate(batch):
            grids = self._grids(index, item, cells)
            info["grids"] = grids
            for row in rows[index]:
                row["grid"] = grids.get(row["rank"], "")
            self.report.rows.extend(rows[index])

    def _reused(self, plan: _Plan, item: InputItem, image: Image.Image) -> Any:
        """The caller's explanation of this image (``reuse``), if it has one made as this run would make it."""
        if self.reuse is None:
            return None
        known = self.reuse(plan.id, item, image)
        fits = (known is not None and tuple(known.layers) == tuple(plan.layers) and known.method == self.method
                and tuple(known.heatmaps.shape[:2]) == (1, plan.topk)
                and int(known.heatmaps.shape[-1]) == plan.input_size)
        return known if fits else None

    def _update(self, plan: _Plan, item: InputItem, image: Image.Image, box, state: dict[str, Any], explanation,
                position: int | None) -> dict[str, Any]:
        """Write what this image and model still need; return the merged state (entries get ``_status``)."""
        settings = self.settings_for(plan)
        old_entries = state.get("entries", {}) if isinstance(state.get("entries"), dict) else {}
        folder = self.root / item.folder / plan.folder
        entries: dict[str, Any] = {}
        changed = False
        for layer_index, layer in enumerate(plan.layers):
            for rank in range(1, plan.topk + 1):
                key = _key(layer, rank)
                old = old_entries.get(key)
                old_ok = _usable(self.root, old)
                if old_ok and not self.overwrite:
                    kept = dict(old)
                    kept["_status"] = "existing" if (old.get("settings") or state.get("settings")) == settings \
                        else "stale"
                    self.stale_count += kept["_status"] == "stale"
                    entries[key] = kept
                    continue
                if explanation is None or position is None:
                    continue  # not computed (explain failed): no row
                class_id = int(explanation.targets[position, rank - 1])
                names = plan.class_names
                class_name = names[class_id] if names and 0 <= class_id < len(names) else f"class{class_id}"
                probability = float(explanation.probs[position, class_id])
                stem = (f"{safe_name(layer)}__{safe_name(self.method)}__top{rank}-"
                        f"{safe_name(class_name, CLASS_CHARS, f'class{class_id}')}")
                png, npy = folder / f"{stem}.png", folder / f"{stem}.npy"
                heat = explanation.heatmaps[position, rank - 1, layer_index].numpy()
                files = [(path, write, kind) for path, write, kind in ((png, _write_png, "overlay"),
                                                                      (npy, _write_npy, "heatmap"))
                         if self.overwrite or not path.exists()]
                self.report.files.extend(self.rel(path) for path, _, _ in files)
                thumb = self.submit(self._render, image, heat, box, files)
                if self.overwrite and isinstance(old, dict):  # a different class name leaves an old file behind
                    for name in ("overlay", "heatmap"):
                        previous = old.get(name)
                        if isinstance(previous, str) and previous not in (self.rel(png), self.rel(npy)):
                            target = self.root / previous
                            if _inside(target, self.root) and target.is_file() and target.parent == folder.resolve():
                                target.unlink()
                entries[key] = {"layer": layer, "rank": rank, "class_id": class_id, "class_name": class_name,
                                "probability": probability, "overlay": self.rel(png), "heatmap": self.rel(npy),
                                "crop_box": [round(float(v), 4) for v in box], "input_size": plan.input_size,
                                "settings": settings, "_status": "computed", "_thumb": thumb}
                changed = True
        if changed:
            kept_extra = {key: value for key, value in old_entries.items()
                          if key not in entries and isinstance(value, dict)}
            record = {"format": STATE_FORMAT, "image": item.label, "model": plan.id, "method": self.method,
                      "settings": settings, "size": list(image.size), "updated_at": _now(),
                      "entries": {key: {k: v for k, v in value.items() if not k.startswith("_")}
                                  for key, value in {**kept_extra, **entries}.items()}}
            path = folder / f"results__{safe_name(self.method)}.json"
            _write_text(path, json.dumps(record, indent=1, ensure_ascii=True))
            self.report.files.append(self.rel(path))
        return {"entries": entries}

    def _row(self, item: InputItem, plan: _Plan, entry: Mapping[str, Any]) -> dict[str, Any]:
        return {"image": item.label, "image_dir": item.folder, "model": plan.id, "layer": entry["layer"],
                "method": self.method, "rank": int(entry["rank"]), "class_id": int(entry["class_id"]),
                "class_name": str(entry["class_name"]), "probability": round(float(entry["probability"]), 6),
                "overlay": entry["overlay"], "heatmap": entry["heatmap"], "grid": "",
                "status": entry.get("_status", "existing"),
                "crop_box": entry.get("crop_box"), "input_size": entry.get("input_size")}

    def _grids(self, index: int, item: InputItem, cells) -> dict[int, str]:
        """Write (when new results or missing) one grid per rank; return rank -> relative path."""
        columns: list[str] = []
        for plan in self.plans:
            columns.extend(layer for layer in plan.layers if layer not in columns)
        ranks = max(plan.topk for plan in self.plans)
        written: dict[int, str] = {}
        for rank in range(1, ranks + 1):
            mine = {key: value for key, value in cells.items() if key[0] == index and key[3] == rank}
            if not mine:
                continue
            path = self.root / item.folder / f"grid__{safe_name(self.method)}__top{rank}.png"
            fresh = any(value[2] for value in mine.values())
            if path.exists() and not fresh and not self.overwrite:
                written[rank] = self.rel(path)
                continue
            pictures, captions = [], []
            for plan in self.plans:
                row_pictures, row_captions = [], []
                for layer in columns:
                    cell = mine.get((index, plan.id, layer, rank))
                    picture = None if cell is None else cell[0]
                    if cell is not None and picture is None:  # kept from an earlier run: read it back
                        picture = self._thumb_from_disk(item, plan, layer, rank)
                    row_pictures.append(picture)
                    row_captions.append("" if cell is None else cell[1])
                pictures.append(row_pictures)
                captions.append(row_captions)
            self.submit(self._write_grid, path, pictures, columns, captions)
            self.report.files.append(self.rel(path))
            written[rank] = self.rel(path)
        return written

    def _write_grid(self, path: Path, pictures: list[list[Any]], columns: list[str],
                    captions: list[list[str]]) -> None:
        """Writer-thread job: compose and write one grid; cells are thumbnails or futures of earlier jobs."""
        cells = [[picture.result() if isinstance(picture, Future) else picture for picture in row]
                 for row in pictures]
        sheet = grid(cells, [plan.label for plan in self.plans], columns, captions, cell_size=self.cell_size)
        _write_png(path, sheet)

    def _thumb_from_disk(self, item: InputItem, plan: _Plan, layer: str, rank: int) -> Image.Image | None:
        state = _read_state(self.root / item.folder / plan.folder / f"results__{safe_name(self.method)}.json")
        entry = (state or {}).get("entries", {}).get(_key(layer, rank))
        if not _usable(self.root, entry):
            return None
        try:
            picture = load_image(self.root / entry["overlay"])
        except ImageError:
            return None
        return thumbnail(picture, self.cell_size)

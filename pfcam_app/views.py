"""Presentation: the per-image result grid (with progress while it computes), the colour scale, top-5 tables,
model cards, layer choices. No CAM maths here: overlays come from ``cams.render.overlay`` and scene scores from
``cams.metrics``."""
from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st
from PIL import Image, ImageDraw

from cams.engine import EIGEN_METHODS
from pfcam_app.core import Settings, Slot, Source, cam_store, compute_cams, error_text, guard, plain
from pfnet import zoo

DISPLAY_SIDE = 448  # longest side of the images shown on the page (overlays are rendered at this size)
MIN_COLUMNS = 3  # the grid keeps at least this many columns so that one or two layers do not blow cells up
BOX_COLOUR = (0, 255, 0)
SCALE_SIZE = (512, 16)  # the colour scale's bar, in pixels
IGNORES_TARGET = {method: ("KPCA-CAM" if method == "kpcacam" else "Eigen-CAM")
                   + ": the same map for any target (first principal component)" for method in sorted(EIGEN_METHODS)}


# ----------------------------------------------------------------------------------------------------- layers

def layer_choices(model: Any) -> tuple[list[str], dict[str, str], list[str]]:
    """(names offered, name -> label, default names) for a model's family.

    Stage aliases ("layer4") are the very same tensors as their last block ("layer4.2"): only the block is
    offered, and the defaults (last block of layer3 and of layer4 for ResNets) are given as block names.
    Names come in network depth order: a block's spatial op ("layer4.2.conv_block") before the block's output.
    """
    from cams import layers as cam_layers

    specs = cam_layers.available_layers(model)
    aliases = {spec.same_as: spec.name for spec in specs if spec.same_as}
    offered = [spec for spec in specs if spec.name not in aliases]
    ops = {spec.name.rsplit(".", 1)[0]: spec for spec in offered if spec.kind == "op"}
    ordered = []
    for spec in offered:
        if spec.kind != "op":
            ordered += [ops[spec.name], spec] if spec.name in ops else [spec]
    offered = ordered + [spec for spec in offered if spec not in ordered]
    labels = {spec.name: spec.label for spec in offered}
    defaults = [aliases.get(name, name) for name in cam_layers.default_layers(model)]
    return [spec.name for spec in offered], labels, [name for name in defaults if name in labels]


def colour_scale(colormap: str) -> Image.Image:
    """The colormap as a bar from 0 (left) to 1 (right), with its ends labelled."""
    from PIL import ImageFont

    from cams.render import colormap_lut

    width, height = SCALE_SIZE
    ramp = colormap_lut(colormap)[np.linspace(0, 255, width).round().astype(int)]
    bar = np.repeat(ramp[None], height, axis=0)
    labelled = Image.new("RGB", (width, height + 18), "white")
    labelled.paste(Image.fromarray(bar.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(labelled)
    font = ImageFont.load_default(size=13)
    draw.text((0, height + 2), "0 low", fill="black", font=font)
    draw.text((width // 2, height + 2), "0.5", fill="black", font=font, anchor="ma")
    draw.text((width, height + 2), "high 1", fill="black", font=font, anchor="ra")
    return labelled


# ------------------------------------------------------------------------------------------------ small helpers

def display_copy(image: Image.Image) -> tuple[Image.Image, float]:
    """A copy no larger than DISPLAY_SIDE on its longest side, and the scale factor applied."""
    scale = min(1.0, DISPLAY_SIDE / max(image.size))
    if scale >= 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS), scale


def with_box(image: Image.Image, box: tuple, scale: float) -> Image.Image:
    out = image.copy()
    x0, y0, x1, y1 = (v * scale for v in box)
    width = max(2, round(max(out.size) / 150))
    ImageDraw.Draw(out).rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOUR, width=width)
    return out


def percent(value: float) -> str:
    return f"{100.0 * float(value):.1f}%"


def scene_scores(source: Source, heatmap: np.ndarray, crop_box: tuple, image_size: tuple[int, int]) -> str:
    """Pointing-game hit and energy in the ground-truth region, in the heatmap's (network input) geometry: the
    scene's mask (resized to the input when the model's input size differs) for the pointing game, its box for
    the energy, as bench-loc scores them."""
    from cams import metrics
    from cams.depth import heatmap_region

    boxes, mask = heatmap_region(source.box, source.mask, crop_box, image_size, heatmap.shape)
    if not boxes:
        return "object outside the crop"
    box = boxes[0]
    hit = metrics.pointing_game(heatmap, mask=mask) if mask is not None and mask.any() else \
        metrics.pointing_game(heatmap, box=box)
    energy = metrics.energy_in_box(heatmap, box=box)
    return f"pointing {'hit ✓' if hit else 'miss ✗'} · energy in box {percent(energy)}"


# ------------------------------------------------------------------------------------------------- the grid

def heatmaps_header(settings: Settings) -> None:
    """Above the grids: the colour scale of the chosen colormap, and what a method ignores."""
    scale, words = st.columns([2, 3], vertical_alignment="center")
    scale.image(colour_scale(settings.colormap), width="stretch")
    words.caption(f"Colour scale ({settings.colormap}): each heatmap is scaled to its own range, 0 = the least and "
                  "1 = the most evidence for the target class in that map; the numbers are not comparable across "
                  "cells. Under each cell: the explained class and its probability.")
    if settings.method in IGNORES_TARGET:
        st.caption(f":orange[{IGNORES_TARGET[settings.method]}: the target setting changes only the class named "
                   "under each cell, not the map.]")


STOP_KEY = "_stopped_work"  # session state: the CAM store keys whose computation the user stopped


def _stop(keys: frozenset) -> None:
    st.session_state[STOP_KEY] = keys


def _resume() -> None:
    st.session_state.pop(STOP_KEY, None)


def stop_control(sources: list[Source], settings: Settings) -> tuple[frozenset, Any]:
    """For Score-CAM with work left: a Stop button (pressing it ends the running computation at its next
    progress step and leaves what was left undone), or, once stopped, what was left out and a Continue button.
    Returns the stopped store keys (new work, e.g. another image, is not stopped) and the placeholder holding
    the button, for the page to clear once the work is done."""
    from cams.engine import SCORED_METHODS

    if settings.method not in SCORED_METHODS:
        return frozenset(), None
    pending = frozenset(key for key in (settings.key(source.digest, slot) for source in sources
                                        if not source.refused for slot in settings.runnable)
                        if cam_store().get(key) is None)
    stopped = pending & st.session_state.get(STOP_KEY, frozenset())
    holder = st.empty()
    if stopped:
        box = holder.container()
        box.info(f"Score-CAM stopped: {len(stopped)} image × model result{'s' * (len(stopped) > 1)} not computed.",
                 icon=":material/pause_circle:")
        box.button("Continue", key="resume_cams", icon=":material/play_arrow:", on_click=_resume)
    elif pending:
        holder.button("Stop Score-CAM", key="stop_cams", icon=":material/stop_circle:", on_click=_stop,
                      args=(pending,), help="Ends the computation at its next progress step; finished results stay.")
    return stopped, holder


def photo_note(source: Source, slot: Slot) -> str | None:
    """What a demo model's cell must say about an image that is not one of its shape scenes."""
    if slot.entry.classes != "scenes" or source.kind == "scene":
        return None
    return "⚠ photo: not one of the 10 shapes this demo model knows" if source.kind == "example" else \
        "⚠ 10-shape demo model: meaningful on shape scenes only"


def _photo_warning(source: Source, slots: list[Slot]) -> None:
    demo = [slot.entry.name for slot in slots if photo_note(source, slot)]
    if not demo:
        return
    shapes = ", ".join(zoo.scene_classes())
    lead = "This is a photograph" if source.kind == "example" else "If this is a photograph"
    st.warning(f"{lead}: {' and '.join(demo)} know only 10 synthetic shapes ({shapes}). On a photo their class is "
               "a forced guess among those shapes, and the heatmap shows what drove that guess, not where the "
               "object is. Use ImageNet models (R50, R50-hybrid) for photos.", icon=":material/warning:")


SUITED_NOTE = {
    "scene": "Demo scene: explained by the demo models only (the ImageNet models on the page do not know shapes).",
    "example": "Photograph: explained by the ImageNet models only (the demo models on the page know 10 shapes).",
}


def suited_slots(source: Source, slots: list[Slot]) -> list[Slot]:
    """The models an example is explained by: a demo scene by the scene models, a bundled photo by the photo
    (ImageNet) models, when the page has any of that kind; uploads (unknown content) by every model."""
    if source.kind == "scene":
        chosen = [slot for slot in slots if slot.entry.classes == "scenes"]
    elif source.kind == "example":
        chosen = [slot for slot in slots if slot.entry.classes != "scenes"]
    else:
        chosen = slots
    return chosen or slots


def _computing(slot: Slot, layers: tuple[str, ...], method: str, where: Any):
    """A progress bar in ``where`` while one model explains one image; returns the engine's callback."""
    import time

    from cams.engine import METHODS, SCORED_METHODS

    what = f"**{slot.entry.name}** · {METHODS[method]} of {len(layers)} layer{'s' * (len(layers) > 1)}"
    bar = where.progress(0.0, text=f"{what}: computing…")
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        unit = "channels" if method in SCORED_METHODS else "images"
        text = f"{what}: {done} / {total} {unit}"
        if 0 < done < total:
            left = (time.monotonic() - started) / done * (total - done)
            text += f" · about {left:.0f} s left" if left < 120 else f" · about {left / 60:.0f} min left"
        bar.progress(min(1.0, done / total) if total else 0.0, text=text)

    return progress


def render_image(source: Source, settings: Settings, stopped: frozenset = frozenset()) -> dict[str, float]:
    """One image: the original (with its ground-truth box for scenes) beside the model x layer grid,
    then each model's top-5. Cells not yet computed show a progress bar while they compute (or, when the
    page's work was stopped, say so). Returns seconds spent computing per model id (0 when already computed)."""
    from cams import metrics, render
    from pfcam_app.core import decode

    st.subheader(plain(source.name), anchor=False, divider="gray")
    if source.refused:
        st.error(plain(source.refused), icon=":material/block:")
        return {}
    try:
        image = decode(source.digest, source.name, source.data)
    except Exception as exc:  # noqa: BLE001 - this image only; the others render
        st.error(f"**{plain(source.name)}** cannot be used — {plain(error_text(exc))}",
                 icon=":material/broken_image:")
        return {}
    slots = settings.runnable if settings.every_model else suited_slots(source, settings.runnable)
    if len(slots) < len(settings.runnable):
        st.caption(f"{SUITED_NOTE[source.kind]} *Every model on every image* in the sidebar shows the others too.")
    _photo_warning(source, slots)
    shown, scale = display_copy(image)
    timings: dict[str, float] = {}
    left, right = st.columns([1, 3], gap="medium")
    with left:
        original = with_box(shown, source.box, scale) if source.box is not None else shown
        note = f" · ground truth: {source.label} (green box)" if source.label else ""
        st.image(original, caption=f"Original · {image.width}×{image.height}{note}", width="stretch")
    results: dict[str, dict] = {}
    target = settings.target
    with right:
        group_shown = None
        for slot in slots:
            layers = settings.layers_of(slot)
            if slot.entry.layer_group != group_shown:  # column headers (one per layer) once per layer group
                for column, name in zip(st.columns(max(len(layers), MIN_COLUMNS)), layers):
                    column.markdown(f"**{name}**")
                group_shown = slot.entry.layer_group
            with guard(f"{slot.entry.name} on {source.name}"):
                if target[0] == "class" and target[1] not in slot.entry.class_names():
                    st.warning(f"**{slot.entry.name}**: '{target[1]}' is not one of its "
                               f"{slot.entry.num_classes} classes; pick a class it knows.")
                    continue
                key = settings.key(source.digest, slot)
                result = cam_store().get(key)
                fresh = result is None
                if fresh and key in stopped:
                    st.caption(f"**{slot.entry.name}** · stopped before it was computed")
                    continue
                if fresh:
                    holder = st.empty()
                    result = compute_cams(key, image, slot.model, _computing(slot, layers, settings.method, holder))
                    holder.empty()
                timings[slot.id] = result["seconds"] if fresh else 0.0
                results[slot.id] = result
                took = (f"computed in {result['seconds']:.2f} s" if fresh
                        else f"from cache (computed in {result['seconds']:.2f} s)")
                ignores = IGNORES_TARGET.get(settings.method)
                names = slot.entry.class_names()
                note = photo_note(source, slot)
                for rank, class_id in enumerate(result["targets"]):
                    suffix = f" · target #{rank + 1}" if len(result["targets"]) > 1 else ""
                    st.markdown(f"**{slot.title}**{suffix} · :gray[{took}]"
                                + (f" · :blue[options: {plain(settings.options.label)}]"
                                   if settings.options.label else "")
                                + (f" · :orange[{ignores}]" if ignores else ""))
                    row = st.columns(max(len(layers), MIN_COLUMNS))
                    for index, column in enumerate(row[:len(layers)]):
                        heatmap = result["heatmaps"][rank, index]
                        crop = tuple(v * scale for v in result["crop_box"])
                        cell = render.overlay(shown, heatmap, crop, settings.colormap, settings.opacity)
                        caption = f"{names[int(class_id)]} · {percent(result['probs'][int(class_id)])}"
                        if metrics.is_flat(heatmap):
                            caption += " · flat map: no positive evidence at this layer"
                        if source.box is not None:  # demo scene: ground-truth box and its scores
                            cell = with_box(cell, source.box, scale)
                            caption += " · " + scene_scores(source, heatmap, result["crop_box"], image.size)
                        if note:
                            caption += f" · {note}"
                        column.image(cell, caption=caption, width="stretch")
    if results:
        with left:
            for slot in [s for s in slots if s.id in results]:
                probs = results[slot.id]["probs"]
                names = slot.entry.class_names()
                order = np.argsort(-probs)[:5]
                lines = [f"{rank + 1}. {names[i]} — {percent(probs[i])}" for rank, i in enumerate(order)]
                st.markdown(f"**{slot.title}** · top-5\n\n" + "\n".join(f":small[{line}]  " for line in lines))
    return timings


# ----------------------------------------------------------------------------------------------- model card

def _figure(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def model_card(slot: Slot, device: str) -> None:
    from pfcam_app.core import model_stats

    entry = slot.entry
    with st.expander(f"Model card · {slot.title}", expanded=False, icon=":material/memory:"):
        st.caption(f"`{plain(entry.id)}` · architecture `{plain(entry.arch)}` · weights: {slot.weights_label}")
        if slot.random:
            st.warning("Random weights, as asked for: the heatmaps show what an untrained network responds to, "
                       "not what a trained one learned.", icon=":material/casino:")
        if entry.description:
            st.markdown(entry.description)
        if entry.baseline:
            base = zoo.get(entry.baseline)
            st.caption(f"Baseline: **{base.name}** (`{base.id}`), the network it is derived from; the sidebar's "
                       f"*Add its baseline* puts it beside this one.")
        offsets = getattr(slot.model, "cam_offsets", None) or {}
        if offsets:
            with guard(f"Alignment of {entry.name}"):
                st.caption(alignment_note(slot.model, offsets))
        else:
            st.caption(f"Alignment: not measured for {'these weights' if slot.key else 'this model'}; its heatmaps "
                       "are drawn with the plain resize.")
        if entry.note:
            st.markdown(plain(entry.note) if entry.is_timm else entry.note)
        with guard(f"Measuring {entry.name}"):
            stats = model_stats(slot.id, slot.key, device, slot.model)
            paper = entry.paper
            size = stats["size"]
            paper_macs = "{:.1f} G (224×224)" if size != 224 else "{:.1f} G"
            rows = [
                ("Parameters", f"{stats['params'] / 1e6:.2f} M", _figure(paper.params_m, "{:.1f} M")),
                (f"MACs ({size}×{size})", f"{stats['macs'] / 1e9:.3f} G", _figure(paper.gflops, paper_macs)),
                (f"Latency ({device}, batch 1)", f"{stats['latency_ms']:.1f} ms",
                 _figure(paper.gpu_ms, "{:.1f} ms (GPU)")),
            ]
            if entry.classes == "imagenet":
                rows.append(("ImageNet top-1 / top-5", "not measured here",
                             f"{_figure(paper.top1, '{:.1f}')} / {_figure(paper.top5, '{:.1f}')}"))
            table = "| | Measured here | Paper |\n|---|---|---|\n" + "\n".join(
                f"| {a} | {b} | {c} |" for a, b, c in rows)
            st.markdown(table)
            if paper.source != "the paper" and entry.classes == "imagenet":
                st.caption(f"The *Paper* column gives the figures of {paper.source}, not of the parameter-free "
                           "layers paper.")
            elif entry.is_timm:
                st.caption("The *Paper* column is empty for a model added by timm name: see its Hub page.")
            if paper.note:
                st.caption(f"Paper note: {paper.note}")
            if entry.classes == "scenes":
                st.caption("The paper has no figures for the demo models (width 0.25, trained on synthetic scenes).")
            models = zoo.demo_card().get("models", {}) if entry.classes == "scenes" else {}
            card = models.get(entry.id) or models.get(entry.id.removeprefix("demo_"))
            if card:
                st.caption(demo_card_line(card))


def alignment_note(model: Any, offsets: dict) -> str:
    """Which offsets were measured, and which layers each one is drawn with (all layers of its stride)."""
    from cams.align import layer_stride, stride_offsets

    moved = ", ".join(f"{layer} ({dy:+g}, {dx:+g}) px" for layer, (dy, dx) in offsets.items())
    names = layer_choices(model)[0]
    parts = []
    for stride, offset in sorted(stride_offsets(model).items()):
        same = [name for name in names if layer_stride(model, name) == stride]
        shown = ", ".join(same) if len(same) <= 4 else f"{same[0]} … {same[-1]} ({len(same)} layers)"
        parts.append(f"every stride-{stride} layer ({shown}) is drawn moved by ({offset[0]:+g}, {offset[1]:+g}) px"
                     if offset else f"the stride-{stride} layers' offsets disagree: those not measured are "
                                    "drawn unshifted")
    return (f"Alignment measured for these weights (rows, columns): {moved}. While *Align heatmaps* is on, "
            + "; ".join(parts) + "; layers of other strides are drawn unshifted.")


def demo_card_line(card: dict) -> str:
    """The demo card's own figures (measured when the model was trained, by pfdemo.train)."""
    facts = []
    if isinstance(card.get("test_accuracy"), (int, float)):
        facts.append(f"test accuracy {percent(card['test_accuracy'])} on held-out scenes")
    for key in ("pointing_game", "pointing_game_layer3"):
        pointing = card.get(key) or {}
        if isinstance(pointing.get("hit_15px"), (int, float)):
            notes = [f"strict {percent(pointing['hit_strict'])}"] if isinstance(pointing.get("hit_strict"),
                                                                                  (int, float)) else []
            plain = (card.get(f"{key}_unaligned") or {}).get("hit_15px")
            if isinstance(plain, (int, float)):
                notes.append(f"unaligned {percent(plain)}")
            facts.append(f"Grad-CAM pointing game at {pointing.get('layer', '?')} {percent(pointing['hit_15px'])}"
                         + (f" ({'; '.join(notes)})" if notes else ""))
    if card.get("train_minutes") is not None:
        facts.append(f"trained {card['train_minutes']} min on CPU")
    return "Demo card (from training): " + (" · ".join(facts) if facts else "no figures recorded") + \
        ". See assets/weights/DEMO_CARD.md."

"""Presentation: the per-image result grid, top-5 tables, model cards, layer pickers. No CAM maths here:
overlays come from ``cams.render.overlay`` and scene scores from ``cams.metrics``."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import streamlit as st
from PIL import Image, ImageDraw

from pfcam_app.core import Slot, Source, error_text, guard, run_cams
from pfnet import zoo

DISPLAY_SIDE = 448  # longest side of the images shown on the page (overlays are rendered at this size)
MIN_COLUMNS = 3  # the grid keeps at least this many columns so that one or two layers do not blow cells up
BOX_COLOUR = (0, 255, 0)


# ----------------------------------------------------------------------------------------------------- layers

def layer_choices(model: Any) -> tuple[list[str], dict[str, str], list[str]]:
    """(names offered, name -> label, default names) for a model's family.

    Stage aliases ("layer4") are the very same tensors as their last block ("layer4.2"): only the block is
    offered, and the defaults (last block of layer3 and of layer4 for ResNets) are given as block names.
    """
    from cams import layers as cam_layers

    specs = cam_layers.available_layers(model)
    aliases = {spec.same_as: spec.name for spec in specs if spec.same_as}
    offered = [spec for spec in specs if spec.name not in aliases]
    labels = {spec.name: spec.label for spec in offered}
    defaults = [aliases.get(name, name) for name in cam_layers.default_layers(model)]
    return [spec.name for spec in offered], labels, [name for name in defaults if name in labels]


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
    import cv2

    from cams import metrics

    height, width = heatmap.shape
    box = metrics.map_box(source.box, crop_box, (width, height))
    if box is None:
        return "object outside the crop"
    mask = None
    if source.mask is not None and tuple(round(v) for v in crop_box) == (0, 0, *image_size):
        mask = source.mask if source.mask.shape == (height, width) else cv2.resize(
            source.mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    hit = metrics.pointing_game(heatmap, mask=mask) if mask is not None and mask.any() else \
        metrics.pointing_game(heatmap, box=box)
    energy = metrics.energy_in_box(heatmap, box=box)
    return f"pointing {'hit ✓' if hit else 'miss ✗'} · energy in box {percent(energy)}"


# ------------------------------------------------------------------------------------------------- the grid

def render_image(source: Source, slots: list[Slot], layers_by_family: dict[str, list[str]], method: str,
                 target: tuple, mode: str, colormap: str, opacity: float, align: str = "model") -> dict[str, float]:
    """One image: the original (with its ground-truth box for scenes) beside the model x layer grid,
    then each model's top-5. Returns seconds spent computing per model id (0 when served from the cache)."""
    from cams import metrics, render
    from pfcam_app.core import decode

    st.subheader(source.name, anchor=False, divider="gray")
    if source.refused:
        st.error(source.refused, icon=":material/block:")
        return {}
    try:
        image = decode(source.digest, source.name, source.data)
    except Exception as exc:  # noqa: BLE001 - this image only; the others render
        st.error(f"**{source.name}** cannot be used — {error_text(exc)}", icon=":material/broken_image:")
        return {}
    shown, scale = display_copy(image)
    timings: dict[str, float] = {}
    left, right = st.columns([1, 3], gap="medium")
    with left:
        original = with_box(shown, source.box, scale) if source.box is not None else shown
        note = f" · ground truth: {source.label} (green box)" if source.label else ""
        st.image(original, caption=f"Original · {image.width}×{image.height}{note}", width="stretch")
    results: dict[str, dict] = {}
    with right:
        family_shown = None
        for slot in slots:
            family = slot.entry.family
            layers = layers_by_family.get(family, [])
            if not layers:
                continue
            if family != family_shown:  # column headers (one per layer) once per family
                for column, name in zip(st.columns(max(len(layers), MIN_COLUMNS)), layers):
                    column.markdown(f"**{name}**")
                family_shown = family
            with guard(f"{slot.entry.name} on {source.name}"):
                if target[0] == "class" and target[1] not in slot.entry.class_names():
                    st.warning(f"**{slot.entry.name}**: '{target[1]}' is not one of its "
                               f"{slot.entry.num_classes} classes; pick a class it knows.")
                    continue
                before = time.time()
                result = run_cams(source.digest, slot.key, slot.id, tuple(layers), method, target, mode, align,
                                  image, slot.model)
                fresh = result["stamp"] >= before
                timings[slot.id] = result["seconds"] if fresh else 0.0
                results[slot.id] = result
                took = (f"computed in {result['seconds']:.2f} s" if fresh
                        else f"from cache (computed in {result['seconds']:.2f} s)")
                names = slot.entry.class_names()
                for rank, class_id in enumerate(result["targets"]):
                    suffix = f" · target #{rank + 1}" if len(result["targets"]) > 1 else ""
                    st.markdown(f"**{slot.entry.name}**{suffix} · :gray[{took}]")
                    row = st.columns(max(len(layers), MIN_COLUMNS))
                    for index, column in enumerate(row[:len(layers)]):
                        heatmap = result["heatmaps"][rank, index]
                        crop = tuple(v * scale for v in result["crop_box"])
                        cell = render.overlay(shown, heatmap, crop, colormap, opacity)
                        caption = f"{names[int(class_id)]} · {percent(result['probs'][int(class_id)])}"
                        if metrics.is_flat(heatmap):
                            caption += " · flat map: no positive evidence at this layer"
                        if source.box is not None:  # demo scene: ground-truth box and its scores
                            cell = with_box(cell, source.box, scale)
                            caption += " · " + scene_scores(source, heatmap, result["crop_box"], image.size)
                        column.image(cell, caption=caption, width="stretch")
    if results:
        with left:
            for slot in [s for s in slots if s.id in results]:
                probs = results[slot.id]["probs"]
                names = slot.entry.class_names()
                order = np.argsort(-probs)[:5]
                lines = [f"{rank + 1}. {names[i]} — {percent(probs[i])}" for rank, i in enumerate(order)]
                st.markdown(f"**{slot.entry.name}** · top-5\n\n" + "\n".join(f":small[{line}]  " for line in lines))
    return timings


# ----------------------------------------------------------------------------------------------- model card

def _figure(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def model_card(slot: Slot, device: str) -> None:
    from pfcam_app.core import model_stats

    entry = slot.entry
    with st.expander(f"Model card · {entry.name}", expanded=False, icon=":material/memory:"):
        st.caption(f"`{entry.id}` · architecture `{entry.arch}` · weights: {slot.weights_label}")
        offsets = getattr(slot.model, "cam_offsets", None) or {}
        if offsets:
            moved = ", ".join(f"{layer} ({dy:+g}, {dx:+g}) px" for layer, (dy, dx) in offsets.items())
            st.caption(f"Alignment measured for these weights (rows, columns): {moved}; used while "
                       "*Align heatmaps* is on.")
        if entry.note:
            st.markdown(entry.note)
        with guard(f"Measuring {entry.name}"):
            stats = model_stats(slot.id, slot.key, device, slot.model)
            paper = entry.paper
            size = stats["size"]
            rows = [
                ("Parameters", f"{stats['params'] / 1e6:.2f} M", _figure(paper.params_m, "{:.1f} M")),
                (f"MACs ({size}×{size})", f"{stats['macs'] / 1e9:.3f} G", _figure(paper.gflops, "{:.1f} G (224×224)" if size != 224 else "{:.1f} G")),
                (f"Latency ({device}, batch 1)", f"{stats['latency_ms']:.1f} ms", _figure(paper.gpu_ms, "{:.1f} ms (GPU)")),
            ]
            if entry.classes == "imagenet":
                rows.append(("ImageNet top-1 / top-5", "not measured here",
                             f"{_figure(paper.top1, '{:.1f}')} / {_figure(paper.top5, '{:.1f}')}"))
            table = "| | Measured here | Paper |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
            st.markdown(table)
            if paper.note:
                st.caption(f"Paper note: {paper.note}")
            if entry.classes == "scenes":
                st.caption("The paper has no figures for the demo models (width 0.25, trained on synthetic scenes).")
            models = zoo.demo_card().get("models", {}) if entry.classes == "scenes" else {}
            card = models.get(entry.id) or models.get(entry.id.removeprefix("demo_"))
            if card:
                st.caption(demo_card_line(card))


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

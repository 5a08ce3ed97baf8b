"""The Sanity panel, beside Measure: the model-parameter randomisation check (``cams.sanity``; Adebayo et al.,
NeurIPS 2018) on the chosen images. For each loaded model the units (head, blocks top-down, stem) are
re-initialised one more at each step on a copy of the model (cascading), and each method's heatmaps at the page's
layers are compared with the trained model's: the median Spearman rank correlation and SSIM over the images,
plotted against the number of units randomised, one chart per method.

Bounded for a shared server like Measure: at most ``SANITY_IMAGES`` images and ``SANITY_METHODS`` methods, a
progress bar, and a Stop button that keeps the finished steps (Continue resumes: a unit's random weights come
from the seed and its name, so redoing a step gives the same copy)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import streamlit as st

from pfcam_app.core import Settings, Source, decode, error_text, guard, plain
from pfcam_app.stoppable import Stoppable

SANITY_IMAGES = 4  # images per check
SANITY_METHODS = 3  # methods per check
SANITY_SEED = 0
RESULTS_KEY = "_sanity_results"  # session state: (signature, {model id: SanityRun})
RUN_KEY = "_sanity_run"  # session state: the signature the user asked to check
STOP_KEY = "_sanity_stopped"  # session state: the signature whose check the user stopped
JOB = Stoppable("sanity", RUN_KEY, STOP_KEY)
METRICS = {"spearman": "Spearman (median)", "ssim": "SSIM (median)"}


@dataclass
class SanityRun:
    """One model's cascade so far: the images, the trained maps per method, the copy being randomised, the rows."""

    images: Any  # torch.Tensor [N, 3, S, S]
    classes: np.ndarray  # [N] the trained model's top-1 class: what every heatmap explains
    layers: list[str]
    units: list  # cams.sanity.Unit, top down
    trained: dict[str, np.ndarray]  # method -> [N, L, S, S]
    variant: Any  # the copy with ``depth`` units randomised (``next - 1`` done)
    next: int = 0  # the next cascade step (0: the unchanged copy)
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.next > len(self.units)


def signature(sources: list[Source], settings: Settings, methods: tuple[str, ...]) -> tuple:
    """What a check depends on: a new one starts when any of it changes."""
    return (tuple(source.digest for source in sources), tuple((slot.id, slot.key) for slot in settings.ready),
            methods, tuple((slot.id, settings.layers_of(slot)) for slot in settings.ready), settings.mode)


def start_run(slot: Any, sources: list[Source], settings: Settings, methods: tuple[str, ...]) -> SanityRun:
    """The trained maps of one model on the chosen images (decoded within the session's budget)."""
    import copy

    import torch

    from cams.sanity import fixed_target_heatmaps, predicted_classes, randomisation_units
    from pfnet.preprocess import prepare

    tensors, skipped = [], []
    for source in sources:
        try:
            image = decode(source.digest, source.name, source.data)
            tensors.append(prepare(image, slot.entry.preprocess, settings.mode).tensor)
        except Exception as exc:  # noqa: BLE001 - this image only
            skipped.append(f"{source.name}: {error_text(exc)}")
    layers = list(settings.layers_of(slot))
    if not tensors:
        raise ValueError("none of the chosen images could be read")
    images = torch.stack(tensors)
    classes = predicted_classes(slot.model, images)
    trained = {method: fixed_target_heatmaps(slot.model, images, layers, method, classes) for method in methods}
    return SanityRun(images, classes, layers, randomisation_units(slot.model), trained,
                     copy.deepcopy(slot.model), skipped=skipped)


def cascade_step(run: SanityRun, model_name: str) -> None:
    """Randomise the next unit of the copy (none at step 0) and compare every method x layer with the trained maps."""
    from cams import metrics as M
    from cams.sanity import fixed_target_heatmaps, reinitialise, spearman, ssim

    depth = run.next
    unit = "none"
    if depth:
        unit = run.units[depth - 1].label
        reinitialise(run.variant, run.units[depth - 1], SANITY_SEED)
    for method, trained in run.trained.items():
        maps = fixed_target_heatmaps(run.variant, run.images, run.layers, method, run.classes)
        for position, layer in enumerate(run.layers):
            a, b = trained[:, position], maps[:, position]
            run.rows.append({"model": model_name, "method": method, "layer": layer, "depth": depth,
                             "randomised": unit, "spearman": float(np.median(spearman(a, b))),
                             "ssim": float(np.median(ssim(a, b))), "flat": int(sum(M.is_flat(m) for m in b)),
                             "n": int(a.shape[0])})
    run.next += 1


def sanity_panel(sources: list[Source], settings: Settings) -> None:
    from cams.engine import METHODS

    with st.expander("Sanity check: model randomisation", expanded=RUN_KEY in st.session_state,
                     icon=":material/shuffle:"):
        st.caption("Do the heatmaps depend on what the network learned? Each loaded model's units (head, blocks "
                   "from the top down, stem) are re-initialised one more at each step, on a copy, and each "
                   "method's heatmaps at the page's layers are compared with the trained model's: median Spearman "
                   "rank correlation and SSIM over the images (1 = unchanged). A faithful method falls towards 0 as "
                   "the cascade goes down. Every heatmap explains the trained model's top-1 class, drawn by the "
                   f"plain resize; at most {SANITY_IMAGES} images and {SANITY_METHODS} methods.")
        chosen = [source for source in sources if not source.refused][:SANITY_IMAGES]
        if not chosen:
            st.info("Choose images to check.", icon=":material/image:")
            return
        if not settings.ready:
            st.info("Load a model in the sidebar to check.", icon=":material/arrow_back:")
            return
        offered = [method for method in METHODS if method != "scorecam"]
        default = [settings.method] if settings.method in offered else offered[:1]
        methods = tuple(st.multiselect("Methods", offered, default=default, format_func=METHODS.get,
                                       max_selections=SANITY_METHODS, key="sanity_methods"))
        if not methods:
            st.info("Choose at least one method.", icon=":material/checklist:")
            return
        sig = signature(chosen, settings, methods)
        held = st.session_state.get(RESULTS_KEY)
        runs: dict[str, SanityRun] = held[1] if held and held[0] == sig else {}
        st.session_state[RESULTS_KEY] = (sig, runs)  # one check per session: older ones are dropped
        unfinished = not runs or any(not run.done for run in runs.values())
        holder = JOB.controls(sig, unfinished, "Run the sanity check", "Sanity check stopped; what finished is shown.",
                              "Stop the check", "Ends after the current step; finished steps stay.")
        if holder is not None:
            _check(chosen, settings, methods, runs)
            holder.empty()
        if runs:
            _show(runs)


def _check(sources: list[Source], settings: Settings, methods: tuple[str, ...], runs: dict[str, SanityRun]) -> None:
    bar = st.progress(0.0, text="Sanity check…")
    for slot in settings.ready:
        with guard(f"Sanity check of {slot.entry.name}"):
            if not settings.layers_of(slot):
                continue
            if slot.id not in runs:
                bar.progress(0.0, text=f"**{slot.entry.name}** · the trained model's heatmaps")
                runs[slot.id] = start_run(slot, sources, settings, methods)
            run = runs[slot.id]
            while not run.done:
                total = len(run.units) + 1
                label = "the unchanged copy" if run.next == 0 else f"randomising {run.units[run.next - 1].label}"
                bar.progress(run.next / total, text=f"**{slot.entry.name}** · step {run.next} of {total - 1}: {label}")
                cascade_step(run, slot.entry.name)
    bar.empty()


def _show(runs: dict[str, SanityRun]) -> None:
    import pandas as pd

    from cams.engine import METHODS

    rows = [row for run in runs.values() for row in run.rows]
    for run in runs.values():
        if run.skipped:
            st.caption(plain("; ".join(run.skipped[:5])))
    if not rows:
        st.caption("No step finished yet.")
        return
    table = pd.DataFrame(rows)
    metric = st.radio("Similarity", list(METRICS), format_func=METRICS.get, horizontal=True, key="sanity_metric")
    table["line"] = table["model"] + " · " + table["layer"]
    for method in dict.fromkeys(table["method"]):
        part = table[table["method"] == method]
        st.markdown(f"**{plain(METHODS.get(method, method))}**")
        chart = part.pivot_table(index="depth", columns="line", values=metric, aggfunc="first")
        st.line_chart(chart, x_label="units randomised (cascade, from the top)", y_label=METRICS[metric])
    st.dataframe(table.drop(columns="line").rename(columns=METRICS), hide_index=True, key="sanity_table")
    flat = int(table["flat"].sum())
    st.caption(f"{int(table['n'].max())} image(s) · seed {SANITY_SEED}" + (
        f" · {flat} flat heatmap(s) of randomised models (Spearman 0 against a map with structure)" if flat else "")
        + " · the command-line version: `pfcam sanity` (docs/measuring.md).")

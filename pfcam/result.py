"""What ``pfcam.explain`` returns: the core's :class:`cams.Explanation` with the original images and their crop
boxes, so that it can draw itself (:meth:`Result.overlay`, :meth:`Result.show`) and write itself in the export's
layout (:meth:`Result.save`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cams import Explanation
from cams.export import (DEFAULT_FORMAT, FORMATS, HEATMAP, OVERLAY, ExportError, InputItem, ensure_dir, os_error_text,
                         overlay_suffix, render_result, result_stem, safe_name, target_names)
from cams.render import overlay

Box = tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class Result:
    """Heatmaps of ``model`` for every image x target x layer, with the images they explain.

    ``explanation``: the core's result (``heatmaps`` [N, T, L, S, S] in [0, 1] at the network's input size S,
    ``targets`` [N, T] class ids, ``probs``); ``images``: the original RGB pictures; ``crop_boxes``: the region of
    each that the network saw (left, top, right, bottom); ``items``: their names in saved folders.
    """

    explanation: Explanation
    images: tuple[Image.Image, ...]
    crop_boxes: tuple[Box, ...]
    items: tuple[InputItem, ...]
    model: str
    top_k: int = 1
    chosen: bool = False  # the classes were given (classes=), not the top-k

    # ------------------------------------------------------------------------------------------ the numbers
    @property
    def heatmaps(self) -> torch.Tensor:
        """float32 [N, T, L, S, S] in [0, 1]: image x target x layer."""
        return self.explanation.heatmaps

    @property
    def layers(self) -> tuple[str, ...]:
        return self.explanation.layers

    @property
    def method(self) -> str:
        return self.explanation.method

    @property
    def classes(self) -> torch.Tensor:
        """int64 [N, T]: the class explained by each target of each image."""
        return self.explanation.targets

    @property
    def probabilities(self) -> torch.Tensor:
        """float32 [N, T]: the model's probability of each explained class."""
        return self.explanation.target_probs()

    def __len__(self) -> int:
        return len(self.images)

    def heatmap(self, image: int = 0, target: int = 0, layer: str | int = -1) -> np.ndarray:
        """One heatmap [S, S] (float32 in [0, 1]); ``layer``: a name or position (-1: the last, the deepest by
        default)."""
        return self.explanation.heatmap(image, target, layer)

    def class_name(self, image: int = 0, target: int = 0) -> str:
        return self.explanation.target_name(image, target)

    def caption(self, image: int = 0, target: int = 0, layer: str | int = -1) -> str:
        """``<layer>: <class> <probability>``, as the figures label a heatmap."""
        probability = float(self.probabilities[image, target])
        name = self.layers[self.explanation.layer_index(layer)]
        return f"{name}: {self.class_name(image, target)} {probability:.1%}"

    # ---------------------------------------------------------------------------------------------- drawing
    def overlay(self, image: int = 0, target: int = 0, layer: str | int = -1, colormap: str = "jet",
                opacity: float = 0.5) -> Image.Image:
        """The heatmap drawn on the original image, at its size (``cams.render.overlay``: outside the crop box
        the image is dimmed and the box outlined)."""
        return overlay(self.images[image], self.heatmap(image, target, layer), self.crop_boxes[image], colormap,
                       opacity)

    def figure(self, target: int = 0, colormap: str = "jet", opacity: float = 0.5, size: float = 3.0) -> Any:
        """A matplotlib figure (pyplot's, so Jupyter shows it): one row per image, one column per layer."""
        import matplotlib.pyplot as plt

        rows, cols = len(self.images), len(self.layers)
        figure, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
        for row in range(rows):
            for col in range(cols):
                axis = axes[row][col]
                axis.imshow(self.overlay(row, target, col, colormap, opacity))
                axis.set_title(self.caption(row, target, col), fontsize=9)
                axis.axis("off")
        figure.suptitle(f"{self.model} · {self.explanation.method_label}", fontsize=10)
        figure.tight_layout()
        return figure

    def show(self, target: int = 0, colormap: str = "jet", opacity: float = 0.5) -> None:
        """Show :meth:`figure` (in Jupyter, under the cell; elsewhere in matplotlib's window, if it has one)."""
        import matplotlib.pyplot as plt

        self.figure(target, colormap, opacity)
        plt.show()

    # ----------------------------------------------------------------------------------------------- saving
    def save(self, folder: str | Path, overlay_format: str = DEFAULT_FORMAT, colormap: str = "jet",
             opacity: float = 0.5) -> list[Path]:
        """Write every overlay and raw heatmap in ``pfcam export``'s layout, replacing earlier files of the same
        name; returns the paths written (overlay and heatmap per image x target x layer)::

            folder/<image stem>-<hash8>/<model>/<layer>__<method>__<target>-<class>.png   overlay, original size
            folder/<image stem>-<hash8>/<model>/<layer>__<method>__<target>-<class>.npy   heatmap [S, S] float32

        ``<target>`` is ``top<k>`` (``top_k=``) or ``class<id>`` (``classes=``). A file's folder has the name
        ``pfcam export`` gives it; a picture, array or tensor is ``image<i>-<hash of its pixels>``. No manifest or
        grid is written (``pfcam export`` writes those). Raises ``cams.export.ExportError`` when the folder cannot
        be written.
        """
        if overlay_format not in FORMATS:
            raise ValueError(f"unknown overlay format {overlay_format!r}; expected one of {sorted(FORMATS)}")
        root = Path(folder)
        written: list[Path] = []
        try:
            root.mkdir(parents=True, exist_ok=True)
            root = root.resolve()
            model_folder = safe_name(self.model, 64, "model")
            for index, (picture, box, item) in enumerate(zip(self.images, self.crop_boxes, self.items, strict=True)):
                out = ensure_dir(root, item.folder, model_folder)
                ids = [int(class_id) for class_id in self.classes[index]]
                names = target_names(self.top_k, ids if self.chosen else ())
                pixels = np.asarray(picture)
                for target, target_name in enumerate(names):
                    for layer_index, layer in enumerate(self.layers):
                        class_name = (self.class_name(index, target) if self.explanation.class_names
                                      else f"class{ids[target]}")  # as the export names a class without names
                        stem = result_stem(layer, self.method, target_name, class_name, ids[target])
                        files = [(out / f"{stem}{overlay_suffix(overlay_format)}", OVERLAY),
                                 (out / f"{stem}.npy", HEATMAP)]
                        render_result(picture, self.heatmap(index, target, layer_index), box, colormap, opacity,
                                      files, overlay_format, pixels=pixels)
                        written.extend(path for path, _ in files)
        except OSError as exc:
            raise ExportError(os_error_text(exc, f"saving into {folder}")) from exc
        return written

    def __repr__(self) -> str:
        return (f"Result(model={self.model!r}, method={self.method!r}, images={len(self)}, "
                f"targets={self.explanation.num_targets}, layers={list(self.layers)})")

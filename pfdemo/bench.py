"""The demo scenes as bench-loc's data (the command line's default, ``pfcam bench-loc`` without ``--data``)."""
from __future__ import annotations

import time
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from cams.bench_loc import BenchError, DefaultData, Sample, Split
from pfdemo.scenes import CLASS_NAMES, TEST_SEED, TRAIN_SEED, render_scene, to_tensor


def scene_split(name: str, seed: int, n: int, preprocess: Any, stream: int) -> Split:
    """``n`` scenes of stream ``seed`` at the entry's input size (mode "full": scene == input geometry)."""
    size = int(preprocess.input_size)
    scenes = [render_scene(seed, index, size) for index in range(n)]
    images = np.stack([scene.image for scene in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
    samples = [Sample(f"scene {seed}/{index}", [tuple(float(v) for v in scene.box)], scene.mask,
                      (CLASS_NAMES[scene.label],)) for index, scene in enumerate(scenes)]

    def tensors(start: int, stop: int) -> torch.Tensor:
        return to_tensor(images[start:stop], preprocess.mean, preprocess.std)

    return Split(name, samples, tensors, size, stream)


class SceneData:
    """Held-out scenes: the test split is stream ``seed`` (default :data:`TEST_SEED`), the validation split stream
    ``seed + 1``; neither may be the training stream. Rendered once per input size and normalisation."""

    region = "mask"

    def __init__(self, seed: int | None = None):
        self.seed = TEST_SEED if seed is None else int(seed)
        if (self.seed & 0xFFFFFFFF) in {TRAIN_SEED & 0xFFFFFFFF, (TRAIN_SEED - 1) & 0xFFFFFFFF}:
            raise BenchError(f"--seed {self.seed}: the test stream ({self.seed}) and validation stream "
                             f"({self.seed + 1}) must differ from the training stream ({TRAIN_SEED})")
        self.problems: list[str] = []
        self._cache: dict = {}

    def skip_reason(self, entry: Any) -> str | None:
        if entry.classes == "scenes":
            return None
        return f"an {entry.classes} model has no scene classes to localize; give it your own images with --data DIR"

    def splits(self, preprocess: Any, n: int, val_n: int, log: Callable[[str], None]) -> tuple[Split | None, Split]:
        key = (int(preprocess.input_size), preprocess.mean, preprocess.std, n, val_n)
        if key not in self._cache:
            t0 = time.perf_counter()
            val = scene_split("validation", self.seed + 1, val_n, preprocess, 1) if val_n else None
            self._cache[key] = (val, scene_split("test", self.seed, n, preprocess, 0))
            log(f"rendered {n + val_n} scenes at {preprocess.input_size} px in {time.perf_counter() - t0:.0f} s")
        return self._cache[key]

    def describe(self, n_test: int, n_val: int | None, sizes: str) -> tuple[str, str]:
        return (f"{n_test} held-out pfdemo.scenes (stream {self.seed}, indices 0-{n_test - 1}; training uses "
                f"stream {TRAIN_SEED}) at {sizes} px, mode full",
                f"on {n_val} validation scenes (stream {self.seed + 1})" if n_val is not None else "")


SCENES = DefaultData(SceneData, "the held-out demo scenes of pfdemo.scenes",
                     f"test scene stream (default {TEST_SEED}; validation uses seed + 1)")


def scene_images(preprocess: Any, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` held-out demo scenes (the demo models' evaluation stream) at the model's input size, as a
    normalised batch with their names: the sanity check's default images."""
    size = int(preprocess.input_size)
    images = np.stack([render_scene(TEST_SEED, index, size).image for index in range(n)])
    return to_tensor(images, preprocess.mean, preprocess.std), [f"scene {TEST_SEED}/{index}" for index in range(n)]

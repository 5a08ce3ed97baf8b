"""``bench-loc --engine ray``: the models of ``run_bench`` scored on a Ray cluster with Ray Data.

One unit of work per model, run by an actor pool: an actor receives the models once (moved to the GPU Ray gave
it, or kept on the CPU) and the data source, builds the model's splits and calls
:func:`cams.bench_loc.scoring.evaluate_model` exactly as the local engine does, so a unit's rows are the local
rows of that model. The driver puts them back in the local order. Unusable inputs met on the workers join
``data.problems``, each once.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from cams.bench_loc.data import BenchError, DataSource
from cams.bench_loc.scoring import Options, Row, evaluate_model
from cams.ray_runtime import (RayOptions, Shared, dataset_of, failure_message, from_column, pool_arguments,
                              ray_session, results_of, to_column, worker_device)


class Scorer:
    """Actor: every model and the data source; scores one model per row."""

    def __init__(self, models: Shared, data: DataSource, n: int, val_n: int):
        device = worker_device()
        self.models = [(model_id, network.to(device), names, pre, opts)
                       for model_id, network, names, pre, opts in models.get()]
        self.data, self.n, self.val_n = data, n, val_n

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for model_index in from_column(batch):
            model_id, network, names, pre, opts = self.models[model_index]
            lines: list[str] = []
            val, test = self.data.splits(pre, self.n, self.val_n, lines.append)
            lines.append(f"{model_id}: {len(test)} test images, {len(val) if val else 0} validation images")
            rows = evaluate_model(network, model_id, names, val, test, opts, lines.append)
            out.append({"model": model_index, "rows": rows, "log": lines, "problems": list(self.data.problems),
                        "samples": (val.samples if val is not None else None, test.samples)})
        return to_column(out)


def evaluate_on_ray(models: Sequence[tuple[str, Any, Any, Options]], data: DataSource, n: int, val_n: int,
                    options: RayOptions, log: Callable[[str], None]) -> tuple[list[Row], dict[str, tuple]]:
    """Rows of every (model id, eval-mode model, zoo entry, its options: layers expanded) in the local engine's
    order, and per model what the caption reads (validation samples or None, test samples, preprocessing)."""
    shipped = [(model_id, network.cpu(), list(entry.class_names()), entry.preprocess, opts)
               for model_id, network, entry, opts in models]
    results: dict[int, dict[str, Any]] = {}
    try:
        with ray_session(options):
            dataset = dataset_of(list(range(len(models))), blocks=len(models))
            dataset = dataset.map_batches(Scorer, batch_size=1, batch_format="numpy",
                                          fn_constructor_kwargs={"models": Shared(shipped), "data": data, "n": n,
                                                                 "val_n": val_n},
                                          **pool_arguments(options))
            for result in results_of(dataset):
                results.setdefault(result["model"], result)  # a unit recomputed after a loss counts once
    except Exception as exc:  # noqa: BLE001 - Ray wraps the workers' errors; the run stops with its message
        raise BenchError(f"the Ray run failed: {failure_message(exc)}") from exc
    rows: list[Row] = []
    used: dict[str, tuple] = {}
    for index, (model_id, _, entry, _) in enumerate(models):
        result = results[index]
        for line in result["log"]:
            log(line)
        rows.extend(result["rows"])
        for problem in result["problems"]:
            if problem not in data.problems:
                data.problems.append(problem)
        used[model_id] = (*result["samples"], entry.preprocess)
    return rows, used

"""bench-loc's depth figure (``--plot F.png``): each metric against depth (the block index of
:func:`cams.layers.block_layers`), one line per model, one row of panels per method; each model's reference
heatmaps as horizontal lines in its colour (centred Gaussian dashed, uniform random dotted). Panels run method by
method, metric by metric, ``COLUMNS`` to a row."""
from __future__ import annotations

from collections.abc import Sequence

from cams.bench_loc.accum import MAXBOX_KEYS
from cams.bench_loc.scoring import GAUSSIAN, RANDOM, Row
from cams.bench_loc.table import HEADERS, KEYS, method_label
from cams.plotting import new_figure, png_bytes

REFERENCE_STYLES = {GAUSSIAN: "--", RANDOM: ":"}
COLUMNS = 4


def plotted_keys(rows: Sequence[Row]) -> list[str]:
    """The metrics with a value on some row that has a depth (accuracy is the model's, not the layer's)."""
    return [key for key in KEYS if key != "accuracy"
            and any(row.depth is not None and row.values.get(key) is not None for row in rows)]


def plot_depth(rows: Sequence[Row], dpi: int = 110) -> bytes:
    """PNG bytes of the figure; ``rows`` as ``run_bench`` returns them. Rows without a depth (layers that are not
    a block's output) are left out; raises ``ValueError`` when no row has one."""
    from matplotlib.lines import Line2D

    deep = [row for row in rows if row.kind == "cam" and row.depth is not None]
    keys = plotted_keys(rows)
    if not deep or not keys:
        raise ValueError("nothing to plot against depth: no scored row is a block (use --layers blocks)")
    models = list(dict.fromkeys(row.model for row in deep))
    methods = list(dict.fromkeys(row.method for row in deep))
    colours = {model: f"C{index}" for index, model in enumerate(models)}
    stages = _stage_starts(deep)
    panels = [(method, key) for method in methods for key in keys]
    columns = min(COLUMNS, len(panels))
    grid_rows = -(-len(panels) // columns)
    figure = new_figure(3.2 * columns, 2.5 * grid_rows + 0.5, dpi)
    axes = figure.subplots(grid_rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for index, (method, key) in enumerate(panels):
        ax = axes[index]
        for model in models:
            series = sorted((row for row in deep if row.model == model and row.method == method
                             and row.values.get(key) is not None), key=lambda row: row.depth)
            if series:
                ax.plot([row.depth for row in series], [row.values[key] for row in series], marker="o",
                        markersize=2.5, linewidth=1.4, color=colours[model], label=model)
            for row in rows:
                if row.model == model and row.kind == "baseline" and row.values.get(key) is not None:
                    ax.axhline(row.values[key], color=colours[model], linewidth=0.9,
                               linestyle=REFERENCE_STYLES.get(row.method, "-."))
        for start in stages:
            ax.axvline(start - 0.5, color="0.8", linewidth=0.6)
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.tick_params(labelsize=7)
        protocol = f" ({deep[0].box_protocol})" if key in MAXBOX_KEYS else ""
        ax.set_title(f"{method_label(method)} · {HEADERS[key]}{protocol}", fontsize=8)
        if index + columns >= len(panels):
            ax.set_xlabel("block (depth; grey lines: stage starts)", fontsize=7)
    handles = [Line2D([], [], color=colours[model], linewidth=1.4) for model in models]
    handles += [Line2D([], [], color="0.3", linestyle=style, linewidth=0.9) for style in REFERENCE_STYLES.values()]
    names = models + [f"{kind} (reference)" for kind in REFERENCE_STYLES]
    figure.legend(handles, names, loc="outside upper center", ncols=len(names), fontsize=8, frameon=False)
    return png_bytes(figure)


def _stage_starts(rows: Sequence[Row]) -> list[int]:
    """Depths where a new stage begins (``layer2.0`` after ``layer1.2``), from the rows' block names."""
    first: dict[str, int] = {}
    for row in rows:
        stage = row.layer.split(".")[0] if "." in row.layer else None
        if stage is not None:
            first[stage] = min(first.get(stage, row.depth), row.depth)
    return sorted(depth for depth in first.values() if depth > 1)

"""The sanity check's figure: per model x layer, median Spearman and SSIM of trained vs randomised heatmaps against
randomisation depth, one line per method with its interquartile band (matplotlib, Agg canvas, no pyplot state)."""
from __future__ import annotations

from collections.abc import Sequence

from cams.plotting import new_figure, png_bytes

PANELS = (("cascading", "spearman", "cascading: Spearman"), ("cascading", "ssim", "cascading: SSIM"),
          ("independent", "spearman", "independent: Spearman"), ("independent", "ssim", "independent: SSIM"))


def plot_sanity(rows: Sequence, pass_below: float | None = 0.5, dpi: int = 110) -> bytes:
    """PNG bytes. ``rows``: :class:`cams.sanity_cli.Row` objects. Rows of panels: model x layer; columns: the
    modes present x (Spearman, SSIM). A dotted line in each method's colour marks the same trained heatmaps'
    Spearman against a centred Gaussian; the grey dashed line the pass threshold."""
    from matplotlib.lines import Line2D

    from cams.engine import METHODS

    keys = list(dict.fromkeys((row.model, row.layer) for row in rows))
    methods = list(dict.fromkeys(row.method for row in rows))
    panels = [p for p in PANELS if any(row.mode == p[0] for row in rows)]
    if not keys or not panels:
        raise ValueError("nothing to plot: no cascading or independent rows")
    figure = new_figure(4.2 * len(panels), 3.2 * len(keys), dpi)
    axes = figure.subplots(len(keys), len(panels), squeeze=False)
    colours = {method: f"C{index}" for index, method in enumerate(methods)}
    for r, (model, layer) in enumerate(keys):
        mine = [row for row in rows if row.model == model and row.layer == layer]
        labels = {row.depth: row.randomised for row in mine if row.mode == "cascading"}
        labels.update({row.depth: row.randomised for row in mine if row.mode == "independent"})
        labels[0] = labels.get(0, "none")
        for c, (mode, metric, title) in enumerate(panels):
            ax = axes[r][c]
            for method in methods:
                series = sorted((row for row in mine if row.mode == mode and row.method == method),
                                key=lambda row: row.depth)
                if not series:
                    continue
                x = [row.depth for row in series]
                median = [getattr(row, metric)[0] for row in series]
                ax.fill_between(x, [getattr(row, metric)[1] for row in series],
                                [getattr(row, metric)[2] for row in series], color=colours[method], alpha=0.18,
                                linewidth=0)
                ax.plot(x, median, marker="o", markersize=2.5, linewidth=1.4, color=colours[method],
                        label=METHODS.get(method, method))
                reference = next((row for row in mine if row.mode == "reference" and row.method == method
                                  and row.randomised == "centre Gaussian"), None)
                if reference is not None:
                    ax.axhline(getattr(reference, metric)[0], color=colours[method], linestyle=":", linewidth=0.9)
            if metric == "spearman" and pass_below is not None:
                ax.axhline(pass_below, color="0.45", linestyle="--", linewidth=0.9)
            ticks = sorted(labels)
            ax.set_xticks(ticks)
            ax.set_xticklabels([labels[t] for t in ticks], rotation=90, fontsize=6)
            ax.set_ylim(-0.15, 1.05)
            ax.grid(alpha=0.3, linewidth=0.5)
            ax.set_title(f"{model} {layer} · {title}", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            if c == 0:
                ax.set_ylabel("median (IQR band)", fontsize=7)
    handles, names = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], color="0.45", linestyle="--", linewidth=0.9),
                Line2D([], [], color="0.2", linestyle=":", linewidth=0.9)]
    names += [f"pass below {pass_below:g}" if pass_below is not None else "", "centre-Gaussian reference"]
    figure.legend(handles, names, loc="outside upper center", ncols=len(names), fontsize=8, frameon=False)
    figure.supxlabel("re-initialised, from the head down (cascading: this unit and all above it; "
                     "independent: this unit alone)", fontsize=8)
    return png_bytes(figure)

"""Heatmap grid of SGS masks (matplotlib, Agg backend: no display needed). Layers with the
same mask share one panel, so the grid stays readable for deep models."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

from torch import Tensor

from reparam.convert.report import MaskGroup, SGSReport, group_masks, names_line, sgs_mask_groups


def supported_formats() -> list[str]:
    """File extensions (no dot) matplotlib's Agg canvas can write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(FigureCanvasAgg.get_supported_filetypes())


def _groups(source: SGSReport | Mapping[str, Tensor]) -> list[MaskGroup]:
    if isinstance(source, SGSReport):
        return [g for g in sgs_mask_groups(source) if g.status != "frozen"]
    rows = []
    for name, mask in source.items():
        values = mask.detach().double().cpu()
        if values.ndim > 2:
            values = values.reshape(-1, *values.shape[-2:])[0]
        rows.append((name, values.tolist(), "", ""))
    return group_masks(rows)


def _short(name: str, limit: int = 0) -> str:
    name = name[:-len(".weight")] if name.endswith(".weight") else name
    return name if not limit or len(name) <= limit else "…" + name[-(limit - 1):]


def _draw(ax, group: MaskGroup, label: str, vmax: float, cell: float) -> None:
    import numpy as np

    values = np.asarray(group.mask, dtype=float)
    ax.imshow(values, cmap="viridis", vmin=0, vmax=vmax)
    kh, kw = values.shape
    labels = [[f"{float(v):.3g}" if max(kh, kw) <= 3 else f"{float(v):.2g}" for v in row] for row in values]
    chars = max(len(text) for row in labels for text in row)
    size = min(10.0, 0.85 * cell / max(kh, kw) / (0.6 * chars))  # points: a label fits its cell
    for i in range(kh):
        for j in range(kw):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=size,
                    color="black" if values[i, j] > 0.6 * vmax else "white")
    ax.set_xticks([])
    ax.set_yticks([])
    count = len(group.weights)
    who = _short(group.weights[0], 24) if count == 1 else f"{count} layers"
    ax.set_title(f"{label}: {who}" + (f"\n{group.status}" if group.status else ""), fontsize=7)


def _label(index: int) -> str:
    return chr(65 + index) if index < 26 else str(index + 1)


def plot_masks(
    source: SGSReport | Mapping[str, Tensor], path: str | os.PathLike, title: str | None = None,
    columns: int | None = None,
) -> list[MaskGroup]:
    """One annotated heatmap per distinct mask (``to_sgs(...).report``, or ``name -> (kh, kw)
    mask``); a panel standing for several layers says how many, and the legend under the grid
    names them. Written to ``path`` (the format from its extension); returns the panels' groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(source)
    if not groups:
        raise ValueError("plot_masks: no masks to plot")
    cols = min(columns or max(4, math.ceil(math.sqrt(1.5 * len(groups)))), len(groups))
    rows = math.ceil(len(groups) / cols)
    kernel = max(max(len(g.mask), len(g.mask[0])) for g in groups)
    side = max(2.0, 0.4 * kernel) if len(groups) > 12 else max(2.4, 0.42 * kernel + 0.6)  # inches per panel
    legend = [f"{_label(i)}: {names_line([_short(w) for w in g.weights], 150)}"
              for i, g in enumerate(groups) if len(g.weights) > 1]
    legend_height = 0.2 + 0.16 * len(legend)
    fig = plt.figure(figsize=(max(side * cols, 8), side * rows + 0.6 + legend_height), layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=[side * rows, legend_height])
    axes = grid[0].subgridspec(rows, cols).subplots(squeeze=False)
    vmax = max(max(max(r) for r in g.mask) for g in groups) or 1.0
    for ax in axes.flat:
        ax.axis("off")
    for index, (ax, group) in enumerate(zip(axes.flat, groups)):
        ax.axis("on")
        _draw(ax, group, _label(index), vmax, cell=72 * (side - 0.5))
    text_ax = fig.add_subplot(grid[1])
    text_ax.axis("off")
    text_ax.text(0, 1, "\n".join(legend) or "every panel is one layer", va="top", ha="left", fontsize=7,
                 family="monospace")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
    return groups

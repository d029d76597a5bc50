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


def _short(name: str) -> str:
    return name[:-len(".weight")] if name.endswith(".weight") else name


def _draw(ax, group: MaskGroup, label: str, vmax: float) -> None:
    import numpy as np

    values = np.asarray(group.mask, dtype=float)
    ax.imshow(values, cmap="viridis", vmin=0, vmax=vmax)
    kh, kw = values.shape
    size = 10 if max(kh, kw) <= 3 else (8 if max(kh, kw) <= 5 else 7)
    for i in range(kh):
        for j in range(kw):
            v = float(values[i, j])
            ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=size, color="black" if v > 0.6 * vmax else "white")
    ax.set_xticks([])
    ax.set_yticks([])
    count = len(group.weights)
    who = _short(group.weights[0]) if count == 1 else f"{count} layers"
    ax.set_title(f"{label}: {who}" + (f"\n{group.status}" if group.status else ""), fontsize=8)


def plot_masks(
    source: SGSReport | Mapping[str, Tensor], path: str | os.PathLike, title: str | None = None, columns: int = 5
) -> None:
    """One annotated heatmap per distinct mask (``to_sgs(...).report``, or ``name -> (kh, kw)
    mask``), a legend naming the layers of each panel, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(source)
    if not groups:
        raise ValueError("plot_masks: no masks to plot")
    cols = min(columns, len(groups))
    rows = math.ceil(len(groups) / cols)
    side = max(2.4, 0.42 * max(len(g.mask) for g in groups) + 0.6)
    legend = [f"{chr(65 + i) if i < 26 else i + 1}: {names_line([_short(w) for w in g.weights], 110)}"
              for i, g in enumerate(groups)]
    fig = plt.figure(figsize=(max(side * cols, 8), side * rows + 0.9 + 0.17 * len(legend)), layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=[side * rows, 0.2 + 0.17 * len(legend)])
    axes = grid[0].subgridspec(rows, cols).subplots(squeeze=False)
    vmax = max(max(max(r) for r in g.mask) for g in groups) or 1.0
    for ax in axes.flat:
        ax.axis("off")
    for index, (ax, group) in enumerate(zip(axes.flat, groups)):
        ax.axis("on")
        _draw(ax, group, legend[index].split(":")[0], vmax)
    text_ax = fig.add_subplot(grid[1])
    text_ax.axis("off")
    text_ax.text(0, 1, "\n".join(legend), va="top", ha="left", fontsize=7, family="monospace")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)

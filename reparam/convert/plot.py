"""Heatmap grid of SGS masks (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

from torch import Tensor


def plot_masks(masks: Mapping[str, Tensor], path: str | os.PathLike, title: str | None = None, columns: int = 6) -> None:
    """One small annotated heatmap per layer (``name -> (kh, kw) mask``), written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(masks.items())
    if not items:
        raise ValueError("plot_masks: no masks to plot")
    cols = min(columns, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    vmax = max(float(m.max()) for _, m in items)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, mask) in zip(axes.flat, items):
        values = mask.detach().double().cpu()
        if values.ndim > 2:
            values = values.reshape(-1, *values.shape[-2:])[0]
        ax.imshow(values.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        kh, kw = values.shape
        size = 9 if max(kh, kw) <= 3 else (7 if max(kh, kw) <= 5 else 5)
        for i in range(kh):
            for j in range(kw):
                v = float(values[i, j])
                ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=size,
                        color="black" if v > 0.6 * vmax else "white")
        label = name[:-len(".weight")] if name.endswith(".weight") else name
        ax.set_title(label if len(label) <= 24 else "…" + label[-23:], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=90)
    plt.close(fig)

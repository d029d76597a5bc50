"""What data-driven ``G`` looks like: a per-layer table, a heatmap grid (the paper's Figures 4-5)
and ``G`` across depth. matplotlib (Agg backend) and pandas are imported lazily."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from torch import Tensor


def _kernel(g: Tensor) -> Tensor:
    """``G`` as ``(kh, kw)`` float64 on the CPU (a mask broadcast to the weight: its first tap map)."""
    g = g.detach().double().cpu()
    return g.reshape(-1, *g.shape[-2:])[0] if g.ndim > 2 else g.reshape(g.shape[-2:] if g.ndim == 2 else (1, -1))


def tap_summary(g: Tensor) -> dict[str, float]:
    """Centre (``G[kh//2, kw//2]``), edge (mean of the other taps of the centre row and column)
    and corner (mean of the four corner taps) of one layer's ``G``, plus its min and max."""
    g = _kernel(g)
    kh, kw = g.shape
    cy, cx = kh // 2, kw // 2
    cross = torch.cat([g[cy, :cx], g[cy, cx + 1:], g[:cy, cx], g[cy + 1:, cx]])
    corners = g[[0, 0, -1, -1], [0, -1, 0, -1]] if kh > 1 and kw > 1 else g.new_full((1,), math.nan)
    return {"centre": float(g[cy, cx]), "edge": float(cross.mean()) if cross.numel() else math.nan,
            "corner": float(corners.mean()), "min": float(g.min()), "max": float(g.max())}


def g_table(masks: Mapping[str, Tensor]):
    """One row per layer, in the given (model) order: depth index, name, kernel and :func:`tap_summary`."""
    import pandas as pd

    rows = [{"layer": i, "name": name, "kernel": "x".join(map(str, _kernel(g).shape)), **tap_summary(g)}
            for i, (name, g) in enumerate(masks.items())]
    return pd.DataFrame(rows, columns=["layer", "name", "kernel", "centre", "edge", "corner", "min", "max"])


def depth_subset(count: int, limit: int) -> list[int]:
    """``count`` layers if at most ``limit``, else ``limit`` indices evenly spaced over depth,
    first and last included."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_g_grid(masks: Mapping[str, Tensor], path: str | os.PathLike, title: str = "", max_layers: int = 24,
                columns: int = 6) -> list[int]:
    """A heatmap per layer on one colour scale, values written in the cells (only the centre beyond 5x5); more
    than ``max_layers`` layers: an evenly spaced subset by depth (said in the title). Returns
    the depth indices shown."""
    if not masks:
        raise ValueError("plot_g_grid: no masks to plot")
    plt = _pyplot()
    items = list(masks.items())
    shown = depth_subset(len(items), max_layers)
    cols = min(columns, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols + 0.8, 2.2 * rows + 0.6), squeeze=False, layout="constrained")
    vmax = max(float(_kernel(g).max()) for _, g in items)
    for ax in axes.flat:
        ax.axis("off")
    image = None
    for ax, index in zip(axes.flat, shown):
        name, g = items[index]
        g = _kernel(g)
        image = ax.imshow(g.numpy(), cmap="magma", vmin=0, vmax=vmax)
        size = 8 if max(g.shape) <= 3 else 6
        for i, j in _annotated_cells(g.shape):
            v = float(g[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size, color="black" if v > 0.6 * vmax else "white")
        label = name.removesuffix(".weight")
        ax.set_title(f"#{index} " + (label if len(label) <= 20 else "…" + label[-19:]), fontsize=7)
    subset = f" — {len(shown)} of {len(items)} layers, evenly spaced by depth" if len(shown) < len(items) else ""
    fig.suptitle(f"{title}{subset}".strip(" —"), fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="G (mean 1 per layer)")
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
    return shown


def _annotated_cells(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Every cell up to 5x5; only the centre of a larger kernel."""
    kh, kw = shape
    if max(kh, kw) <= 5:
        return [(i, j) for i in range(kh) for j in range(kw)]
    return [(kh // 2, kw // 2)]


def plot_g_depth(masks: Mapping[str, Tensor], path: str | os.PathLike, title: str = "") -> None:
    """Centre, edge and corner ``G`` against layer depth (with each layer's min-max band):
    one look says where the statistic concentrated the gradient."""
    if not masks:
        raise ValueError("plot_g_depth: no masks to plot")
    plt = _pyplot()
    table = g_table(masks)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.fill_between(table["layer"], table["min"], table["max"], color="0.88", label="min-max")
    for column, style in (("centre", "o-"), ("edge", "s-"), ("corner", "^-")):
        ax.plot(table["layer"], table[column], style, markersize=3.5, linewidth=1.2, label=column)
    ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle="--", label="G = 1 (no scaling)")
    ax.set_xlabel("layer (depth order of the model's qualifying convs)")
    ax.set_ylabel("G")
    ax.set_title(title or "G across depth", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)

"""``reparam pgt``: show how the PowerGrad Transform flattens a distribution (paper Fig. 2).

    reparam pgt --alpha 0.25 --plot out.png
    reparam pgt --alpha 1 0.5 0.25 0 --classes 10 --seed 3 --plot fig2.png

Prints, per alpha, the stationary threshold ``(sum p**alpha)**(1/(alpha-1))``, the largest and
smallest transformed probability and the entropy; ``--plot`` draws the transformed
distributions unordered and rank-ordered (Agg backend, no display needed).  A single
``--alpha`` is shown next to the reference values 1, 0.5 and 0 (as in the paper's Figure 2);
several alphas are shown as given, always with alpha = 1 (the original distribution).
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

from reparam.cli._common import fail

DEFAULT_ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.1, 0.0)
#: drawn alongside a single requested alpha
REFERENCE_ALPHAS = (1.0, 0.5, 0.0)
#: line colours, all clearly visible on white; alpha = 1 is drawn in black
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:cyan")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pgt",
        help="PowerGrad Transform: table and Figure-2-style plot of p**a / sum p**a",
        description="Flatten a distribution with the PowerGrad Transform for several alphas.",
    )
    parser.add_argument(
        "--alpha", type=float, nargs="+", default=list(DEFAULT_ALPHAS), metavar="A",
        help="one or more alphas in [0, 1] (default: %(default)s); a single alpha is shown with the "
        "references 1, 0.5 and 0, several as given plus alpha=1",
    )
    parser.add_argument("--classes", type=int, default=10, help="number of classes C (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random distribution (default: 0)")
    parser.add_argument(
        "--probs", type=float, nargs="+", default=None, metavar="P",
        help="use this distribution instead of a random one (normalised; overrides --classes)",
    )
    parser.add_argument(
        "--plot", default=None, metavar="FILE",
        help="write the figure to this file; its extension picks the format (png, pdf, svg, ...; none: .png is added)",
    )
    parser.set_defaults(handler=run)


def _distribution(args: argparse.Namespace) -> Any:
    import torch

    if args.probs is not None:
        p = torch.tensor(args.probs, dtype=torch.float64)
        if p.numel() < 2 or bool((p < 0).any()) or not float(p.sum()) > 0:
            raise ValueError("--probs needs at least two non-negative values with a positive sum")
        return p / p.sum()
    if args.classes < 2:
        raise ValueError(f"--classes must be at least 2, got {args.classes}")
    gen = torch.Generator().manual_seed(args.seed)
    z = 2.0 * torch.randn(args.classes, generator=gen, dtype=torch.float64)
    return torch.softmax(z, dim=0)


def _plot(p: Any, curves: dict[float, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = np.argsort(-p.numpy())
    classes = np.arange(1, p.numel() + 1)
    fig, (ax_u, ax_r) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    others = itertools.cycle(COLOURS)
    for alpha in sorted(curves, reverse=True):
        values = curves[alpha].numpy()
        style = {"color": "black", "linewidth": 2.2} if alpha == 1.0 else {"color": next(others)}
        label = f"α = {alpha:g}" + (" (original)" if alpha == 1.0 else "")
        ax_u.plot(classes, values, marker="o", label=label, **style)
        ax_r.plot(classes, values[order], marker="o", label=label, **style)
    uniform = 1.0 / p.numel()
    for ax, title in ((ax_u, "(a) unordered distribution"), (ax_r, "(b) rank-ordered distribution")):
        ax.axhline(uniform, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("class index" if ax is ax_u else "rank")
        ax.set_xticks(classes)
    ax_u.set_ylabel("p'ᵢ = pᵢ^α / Σⱼ pⱼ^α")
    ax_r.legend(fontsize=8)
    fig.suptitle(f"PowerGrad Transform, C = {p.numel()} (dotted: uniform 1/C)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_path(text: str) -> tuple[Path | None, str | None]:
    """``(path that will be written, None)`` or ``(None, why not)``, decided before any work:
    a folder is rejected, a name without extension gets ``.png``, the extension must be a
    format matplotlib writes, and the folder must exist."""
    from matplotlib.figure import Figure

    path = Path(text)
    if path.is_dir():
        return None, f"--plot {text} is a folder; give a file name, e.g. {path / 'pgt.png'}"
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        return None, f"--plot {text}: {path.suffix!r} is not a figure format; use one of {', '.join(sorted(formats))}"
    if not path.absolute().parent.is_dir():
        return None, f"--plot {text}: the folder {path.absolute().parent} does not exist"
    return path, None


def run(args: argparse.Namespace) -> int:
    from reparam.pgt._common import check_alpha
    from reparam.pgt.theory import power_transform, stationary_threshold

    try:
        alphas = [check_alpha(a) for a in args.alpha]
        p = _distribution(args)
    except ValueError as err:
        return fail("pgt", err)
    plot = None
    if args.plot:
        plot, problem = plot_path(args.plot)
        if problem is not None:
            return fail("pgt", problem)
    shown = set(alphas)
    shown |= set(REFERENCE_ALPHAS) if len(shown) == 1 else {1.0}
    curves = {a: power_transform(p, a) for a in sorted(shown, reverse=True)}
    header = f"{'alpha':>6} {'threshold':>10} {'max p':>8} {'min p':>8} {'entropy':>8}"
    print(f"PowerGrad Transform of a distribution over C = {p.numel()} classes (uniform 1/C = {1 / p.numel():.4f})")
    print(header)
    print("-" * len(header))
    for alpha, q in curves.items():
        entropy = float(-(q[q > 0] * q[q > 0].log()).sum())
        print(
            f"{alpha:>6.3g} {float(stationary_threshold(p, alpha)):>10.4f} "
            f"{float(q.max()):>8.4f} {float(q.min()):>8.4f} {entropy:>8.4f}"
        )
    if plot is not None:
        try:
            _plot(p, curves, plot)
        except OSError as err:
            return fail("pgt", f"cannot write {plot}: {err.strerror or err}")
        print(f"wrote {plot}")
    return 0


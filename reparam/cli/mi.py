"""``reparam mi``: data-driven SGS masks (the SGS paper's mutual-information G) of a model.

    reparam mi --model torchvision:resnet18 --images natural --batches 2 --batch-size 128 \\
        --image-size 32 --k 5 --out masks.safetensors --plot G.png
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from reparam.cli._common import INTERRUPTED, MODEL_SPEC_HELP, fail, prepare_output
from reparam.sgs.dependence import MEASURES


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "mi",
        help="data-driven SGS masks (mutual information between neighbouring pixels): file, heatmaps, G across depth",
        description="Compute G of every conv with a kernel larger than 1x1 from the dependence between neighbouring "
                    "pixels of its input (the SGS paper's method) on random crops of real images, and save it.",
    )
    parser.add_argument("--model", required=True, metavar="SPEC",
                        help=MODEL_SPEC_HELP)
    parser.add_argument("--images", default="natural", metavar="natural|DIR",
                        help="'natural' (photographs shipped with scikit-image / scikit-learn) or a folder of images "
                             "(torchvision ImageFolder layout or plain files); default: natural")
    parser.add_argument("--batches", type=int, default=2, help="number of batches (default: 2, the CIFAR-100 config)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the random square crops (default: 32)")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="crop a random fraction in [LO, HI] of the image's short side and resize it to "
                             "--image-size (whole-scene statistics); default: crops at native resolution")
    parser.add_argument("--k", type=float, default=5.0, help="the k of S = k NMI / ((k-1) NMI + 1) (default: 5)")
    parser.add_argument("--diagonal-removal", action="store_true", help="the official ImageNet config's option")
    parser.add_argument("--exclude-padding", action="store_true", help="leave the zero-padding ring out of the pairs")
    parser.add_argument("--measure", choices=MEASURES, default="nmi", help="dependence measure (default: nmi)")
    parser.add_argument("--device", default="cpu", help="device for the statistics pass (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crops (default: 0)")
    parser.add_argument("--out", required=True, metavar="FILE", help="masks file (.safetensors)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="heatmap grid of G per layer; G across depth goes to <PNG stem>_depth.png")
    parser.add_argument("--max-layers", type=int, default=24,
                        help="most layers in the heatmap grid; more are subsampled evenly by depth (default: 24)")
    parser.set_defaults(handler=run)


def depth_plot_path(plot: str) -> str:
    stem, ext = os.path.splitext(plot)
    return f"{stem}_depth{ext or '.png'}"


def _argument_problem(args: argparse.Namespace) -> str | None:
    """The first bad argument, as one line (checked before any model is built)."""

    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size),
                        ("--image-size", args.image_size), ("--max-layers", args.max_layers)):
        if value < 1:
            return f"{flag} {value}: must be >= 1"
    if not args.k >= 1:
        return f"--k {args.k}: must be >= 1 (the paper uses 5)"
    if args.diagonal_removal and args.measure != "nmi":
        return f"--diagonal-removal applies to --measure nmi only, not {args.measure}"
    if args.crop_scale is not None and not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        return f"--crop-scale {args.crop_scale[0]} {args.crop_scale[1]}: need 0 < LO <= HI <= 1"
    if args.device != "cpu":
        import torch

        try:
            device = torch.device(args.device)
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            return f"--device {args.device}: not usable here ({str(err).splitlines()[0]})"
    for path in filter(None, (args.out, args.plot, args.plot and depth_plot_path(args.plot))):
        problem = prepare_output(path)
        if problem:
            return problem
    return None


def _image_problem(source: str) -> str | None:
    from reparam.errors import ConfigError
    from reparam.images import folder_images, natural_photographs

    try:
        natural_photographs() if source == "natural" else folder_images(source)
    except ConfigError as err:
        return f"--images natural: {err}" if source == "natural" else f"--images {err}"
    return None


def _model_problem(model) -> str | None:
    from torch import nn

    from reparam.sgs.streaming import qualifying_convs

    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    if first.in_channels != 3:
        return f"the model's first conv takes {first.in_channels} channels; the images are RGB (3)"
    if not qualifying_convs(model):
        return "the model has no conv with a kernel larger than 1 in both directions, so there is no G to compute"
    return None


def run(args: argparse.Namespace) -> int:
    from reparam.convert import load_model
    from reparam.errors import ReparamError

    problem = _argument_problem(args) or _image_problem(args.images)
    if problem:
        return fail("mi", problem)
    try:
        model = load_model(args.model)
    except ReparamError as err:
        return fail("mi", err)
    problem = _model_problem(model)
    if problem:
        return fail("mi", f"{args.model}: {problem}")
    try:
        masks = _compute(args, model)
        _save(args, model, masks)
    except KeyboardInterrupt:
        print("\nreparam mi: interrupted", file=sys.stderr)
        return INTERRUPTED
    except ReparamError as err:
        return fail("mi", err)
    except OSError as err:
        return fail("mi", f"cannot write the output: {err}")
    return 0


def _compute(args: argparse.Namespace, model):
    import torch

    from reparam.images import image_batches
    from reparam.sgs.streaming import masks_from_data

    crop_scale = tuple(args.crop_scale) if args.crop_scale else None
    batches = image_batches(args.images, args.batches, args.batch_size, args.image_size, seed=args.seed, scale=crop_scale)
    model = model.to(args.device)
    with torch.no_grad():
        return masks_from_data(model, [b.to(args.device) for b in batches], k=args.k, progress=True,
                               diagonal_removal=args.diagonal_removal, exclude_padding=args.exclude_padding,
                               measure=args.measure)


def _metadata(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "source": "reparam mi", "statistic": "k-transformed NMI between neighbouring input pixels (SGS paper, Sec. 3.3)",
        "model": args.model, "images": args.images, "batches": args.batches, "batch_size": args.batch_size,
        "image_size": args.image_size, "crop_scale": args.crop_scale, "seed": args.seed, "k": args.k,
        "diagonal_removal": args.diagonal_removal, "exclude_padding": args.exclude_padding, "measure": args.measure,
        "model_mode": "eval (BatchNorm running statistics)",
    }


def _save(args: argparse.Namespace, model, masks) -> None:
    from reparam.convert import save_masks
    from reparam.sgs.plots import depth_subset, g_table, plot_g_depth, plot_g_grid

    masks = {name: g.detach().cpu() for name, g in masks.items()}
    save_masks(args.out, masks, model=model, metadata=_metadata(args))
    table = g_table(masks)
    shown = table if len(table) <= 20 else table.iloc[depth_subset(len(table), 12)]
    shown = shown.assign(name=shown["name"].map(lambda n: n if len(n) <= 34 else "…" + n[-33:]))  # the tail tells layers apart
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if len(shown) < len(table):
        print(f"({len(shown)} of {len(table)} layers shown; all are in {args.out})")
    written = [args.out]
    if args.plot:
        title = f"{args.model}: G from {args.batches}x{args.batch_size} {args.images} crops at {args.image_size} px, k={args.k:g}"
        plot_g_grid(masks, args.plot, title=title, max_layers=args.max_layers)
        plot_g_depth(masks, depth_plot_path(args.plot), title=title)
        written += [args.plot, depth_plot_path(args.plot)]
    print("wrote " + ", ".join(written))


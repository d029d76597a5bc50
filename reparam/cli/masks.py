"""``reparam masks``: the SGS mask of every converted layer, as a file and a heatmap grid.

    reparam masks --model torchvision:resnet18 --block acb --bn after --out masks.safetensors --plot masks.png
"""
from __future__ import annotations

import argparse
from typing import Any

from reparam.cli._convert_common import add_model_arguments, fail


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "masks",
        help="SGS masks of a model's converted layers: safetensors file and heatmap grid",
        description="Convert a model and write the SGS mask of every converted layer.",
    )
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="masks file (.safetensors)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write a heatmap grid of the masks")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from reparam.cli._convert_common import prepare_output, printed_warnings
    from reparam.convert import convert_model, load_model, save_masks, to_sgs
    from reparam.convert.plot import plot_masks
    from reparam.errors import ReparamError

    for path in filter(None, (args.out, args.plot)):
        problem = prepare_output(path)
        if problem:
            return fail("masks", problem)
    try:
        with printed_warnings("masks"):
            model = convert_model(load_model(args.model), args.block, args.bn,
                                  include=args.include, exclude=args.exclude)
        sgs = to_sgs(model, warn=False)
        plain, masks, constants = sgs
        if not masks:
            return fail("masks", "no conv was converted, so there are no masks (see --include/--exclude)")
        save_masks(args.out, masks, model=plain, constants=constants,
                   metadata={"model": args.model, "block": args.block, "bn": args.bn})
    except ReparamError as err:
        return fail("masks", err)
    for layer in sgs.report.layers:
        status = "exact" if layer.exact else "APPROXIMATE: " + "; ".join(layer.reasons)
        print(f"{layer.weight}: {[[round(v, 6) for v in row] for row in layer.mask]}  [{status}]")
    if args.plot:
        try:
            plot_masks(masks, args.plot, title=f"{args.model} {args.block} bn={args.bn}")
        except OSError as err:
            return fail("masks", f"cannot write {args.plot}: {err}")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0

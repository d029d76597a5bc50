"""``reparam masks``: the SGS mask of every converted layer, as a file and a heatmap grid.

    reparam masks --model torchvision:resnet18 --block acb --bn after --out masks.safetensors --plot masks.png

The printed summary groups layers with identical masks (and reasons), so it fits a terminal
whatever the model's depth.
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

from reparam.cli._convert_common import INTERRUPTED, add_model_arguments, fail


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "masks",
        help="SGS masks of a model's converted layers: safetensors file and heatmap grid",
        description="Convert a model and write the SGS mask of every converted layer.",
    )
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="masks file (.safetensors)")
    parser.add_argument("--plot", default=None, metavar="IMAGE",
                        help="write a heatmap grid of the masks (.png, .pdf, .svg, ...; no extension: .png is added)")
    parser.set_defaults(handler=run)


def _plot_path(path: str) -> tuple[str | None, str | None]:
    """``(path to write, problem)``: a path without extension gets ``.png``; an extension
    matplotlib cannot write is a problem, found before any work."""
    from reparam.convert.plot import supported_formats

    root, ext = os.path.splitext(path)
    if not ext or os.path.isdir(path):
        path = (os.path.join(path, "masks") if os.path.isdir(path) else root) + ".png"
        ext = ".png"
    formats = supported_formats()
    if ext[1:].lower() not in formats:
        return None, f"--plot {path}: cannot write {ext!r} images; use one of {', '.join('.' + f for f in formats)}"
    return path, None


def _checked_outputs(args: argparse.Namespace) -> tuple[str | None, str | None]:
    plot = None
    if args.plot:
        plot, problem = _plot_path(args.plot)
        if problem:
            return None, problem
    from reparam.cli._convert_common import prepare_output

    for path in filter(None, (args.out, plot)):
        problem = prepare_output(path)
        if problem:
            return None, problem
    return plot, None


def run(args: argparse.Namespace) -> int:
    from reparam.cli._convert_common import printed_warnings
    from reparam.convert import NothingToConvertWarning, convert_model, load_model, save_masks, to_sgs
    from reparam.convert.foreign import layer_metadata, outcome_line
    from reparam.convert.plot import plot_masks
    from reparam.convert.report import mask_groups_text
    from reparam.errors import ReparamError

    plot, problem = _checked_outputs(args)
    if problem:
        return fail("masks", problem)
    fresh = [path for path in (args.out, plot) if path and not os.path.exists(path)]
    written: list[str] = []  # removed again on failure when this run created them
    try:
        with printed_warnings("masks"), warnings.catch_warnings():
            warnings.simplefilter("ignore", NothingToConvertWarning)  # the error below says it in one line
            model = convert_model(load_model(args.model), args.block, args.bn,
                                  include=args.include, exclude=args.exclude)
            sgs = to_sgs(model, warn=False)
        if not sgs.masks:
            return fail("masks", f"no masks for {args.model}: no conv was converted (see --include/--exclude) and "
                                 "the model has no trainable branched block reparam recognises")
        conversion = model.reparam_report
        happened = outcome_line(conversion, sgs.report)  # converted convs and recognised blocks alike
        meta = {"model": args.model, "block": args.block, "bn": args.bn, "bn_used": conversion.placements(),
                "bn_summary": conversion.bn_summary(), "outcome": happened, "layers": layer_metadata(sgs.report)}
        if plot:
            written.append(plot)
            plot_masks(sgs.report, plot, title=f"{args.model}: {happened}")
        written.append(args.out)
        save_masks(args.out, sgs.masks, model=sgs.model, constants=sgs.constants, metadata=meta)
    except (ReparamError, OSError, KeyboardInterrupt) as err:
        for path in written:  # nothing half-written is left behind
            if path in fresh and os.path.isfile(path):
                os.remove(path)
        if isinstance(err, KeyboardInterrupt):
            return fail("masks", "interrupted; nothing was written", status=INTERRUPTED)
        return fail("masks", err if isinstance(err, ReparamError) else f"cannot write {(written or [args.out])[-1]}: {err}")
    if model.reparam_report.converted:
        print(model.reparam_report.bn_summary())
    print(mask_groups_text(sgs.report))
    print(happened)
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))
    return 0

"""``reparam convert``: convert a model's convs to reparameterization blocks and write

- ``branched.safetensors``: the converted (branched) model's state dict,
- ``fused.safetensors``: the deploy model's state dict (every block fused to one conv),
- ``masks.safetensors``: the SGS masks (and constant kernels) of the plain model,
- ``report.json`` / ``report.md``: layers converted / skipped (with the reason), SGS
  exactness per layer, and the max output differences on a random probe in eval mode:
  fused vs branched on the model itself, branched vs original on a copy whose BatchNorm
  statistics/affine parameters and conv biases are randomized (a fresh torchvision BatchNorm
  is the identity, which would make that check pass whatever the conversion did).

The work is :func:`reparam.convert.workflow.convert_workflow`; this module parses and prints.

    reparam convert --model torchvision:resnet18 --block acb --bn after --out runs/r18
"""
from __future__ import annotations

import argparse
from typing import Any

from reparam.cli._common import INTERRUPTED, fail, output_folder_problem, printed_warnings
from reparam.cli._convert_common import add_model_arguments


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a model's convs to ACB/RepVGG/DBB blocks; write branched, fused, masks and a report",
        description="Convert every eligible conv (+ its BatchNorm) into a reparameterization block.",
    )
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--input-size", type=int, default=32, help="probe image size (default: 32)")
    parser.add_argument("--in-channels", type=int, default=None,
                        help="probe channels (default: the first conv's)")
    parser.add_argument("--batch", type=int, default=2, help="probe batch size, >= 1 (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe (default: 0)")
    parser.add_argument("--float64", action="store_true",
                        help="measure the output differences in float64 (default: the model's float32)")
    parser.add_argument("--fresh", action="store_true",
                        help="fresh block initialization (preserve=False) instead of preserving the function")
    parser.set_defaults(handler=run)


def _print_run(result: Any, files: dict[str, str]) -> None:
    summary = result.summary()
    print(result.report)
    print(f"\nfused vs branched (eval, {tuple(result.probe_shape)}): max |diff| = "
          f"{summary['max_abs_diff_fused_vs_branched']:.3g} (relative {summary['max_rel_diff_fused_vs_branched']:.3g})")
    if summary["branched_vs_original_on"]:
        print(f"branched vs original ({summary['branched_vs_original_on']}): max |diff| = "
              f"{summary['max_abs_diff_branched_vs_original']:.3g}")
    if result.sgs.report.approximate:
        print(f"SGS: {len(result.sgs.report.approximate)} of {len(result.sgs.report.layers)} layers approximate "
              "(see report)")
    print(f"wrote {', '.join(files.values())}")


def run(args: argparse.Namespace) -> int:
    from reparam.convert.workflow import ConvertOptions, convert_workflow, write_outputs
    from reparam.errors import ReparamError

    problem = output_folder_problem(args.out)
    if problem:
        return fail("convert", problem)
    options = ConvertOptions(
        model=args.model, block=args.block, bn=args.bn, include=args.include, exclude=args.exclude,
        input_size=args.input_size, in_channels=args.in_channels, batch=args.batch, seed=args.seed,
        float64=args.float64, fresh=args.fresh,
    )
    try:
        with printed_warnings("convert"):
            result = convert_workflow(options)
        files = write_outputs(result, args.out)
    except ReparamError as err:
        return fail("convert", err)
    except OSError as err:
        return fail("convert", f"cannot write to {args.out}: {err}")
    except KeyboardInterrupt:
        return fail("convert", f"interrupted; nothing was written to {args.out}", status=INTERRUPTED)
    _print_run(result, files)
    return 0

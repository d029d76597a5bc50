"""``reparam convert``: convert a model's convs to reparameterization blocks and write

- ``branched.safetensors``: the converted (branched) model's state dict,
- ``fused.safetensors``: the deploy model's state dict (every block fused to one conv),
- ``masks.safetensors``: the SGS masks (and constant kernels) of the plain model,
- ``report.json`` / ``report.md``: layers converted / skipped (with the reason), SGS
  exactness per layer, and the max output differences on a random probe in eval mode:
  fused vs branched on the model itself, branched vs original on a copy whose BatchNorm
  statistics/affine parameters and conv biases are randomized (a fresh torchvision BatchNorm
  is the identity, which would make that check pass whatever the conversion did).

    reparam convert --model torchvision:resnet18 --block acb --bn after --out runs/r18
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any

from reparam.cli._convert_common import add_model_arguments, fail, first_conv_channels

PRESERVE_CHECK = "on a copy with randomized BatchNorm statistics/affine parameters and conv biases, seed {seed}"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a model's convs to ACB/RepVGG/DBB blocks; write branched, fused, masks and a report",
        description="Convert every eligible conv (+ its BatchNorm) into a reparameterization block.",
    )
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--input-size", type=int, default=32, help="probe image size (default: 32)")
    parser.add_argument("--in-channels", type=int, default=None, help="probe channels (default: the first conv's)")
    parser.add_argument("--batch", type=int, default=2, help="probe batch size (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe (default: 0)")
    parser.add_argument("--float64", action="store_true",
                        help="measure the output differences in float64 (default: the model's float32)")
    parser.add_argument("--fresh", action="store_true",
                        help="fresh block initialization (preserve=False) instead of preserving the function")
    parser.set_defaults(handler=run)


def _save_state_dict(model, path: str, meta: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    try:
        save_file(state, path, metadata=meta)
    except Exception as err:  # noqa: BLE001 - OSError or the writer's own error type
        raise OSError(f"{path}: {err}") from None


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from reparam.cli._convert_common import prepare_output, printed_warnings, randomized_copy
    from reparam.convert import convert_model, fuse_model, load_model, max_output_difference, save_masks, to_sgs
    from reparam.convert.graph import error_line
    from reparam.errors import ReparamError

    problem = prepare_output(args.out, directory=True)
    if problem:
        return fail("convert", problem)
    try:
        original = load_model(args.model).eval()
        if args.float64:
            original = original.double()
        generator = torch.Generator().manual_seed(args.seed)
        channels = args.in_channels or first_conv_channels(original)
        probe = torch.randn(args.batch, channels, args.input_size, args.input_size, generator=generator)
        probe = probe.to(next(original.parameters()).dtype)
        try:
            with torch.no_grad():
                original(probe)
        except Exception as err:  # noqa: BLE001 - any failure of the model's forward on the probe
            return fail("convert", f"the model fails on a probe of shape {tuple(probe.shape)} ({error_line(err)}); "
                                   "set --input-size (e.g. 224 for a model with a fixed input size) or --in-channels")
        options = dict(include=args.include, exclude=args.exclude, preserve=not args.fresh, example_input=probe)
        with printed_warnings("convert"):
            model, report = convert_model(original, args.block, args.bn, return_report=True, **options)
        model.eval()
        with torch.no_grad():
            branched_out = model(probe)
        fused, fused_diff = fuse_model(model, probe=probe)
        scale = max(max_output_difference(branched_out, branched_out * 0), 1e-30)
        preserve_diff = None
        if not args.fresh:  # on a copy whose BatchNorms are not the identity, so the check can fail
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # already printed for the model itself
                _, check = convert_model(randomized_copy(original, args.seed), args.block, args.bn,
                                         inplace=True, return_report=True, **options)
            preserve_diff = check.max_abs_diff
        sgs = to_sgs(model, warn=False)
    except ReparamError as err:
        return fail("convert", err)
    files = {name: os.path.join(args.out, name) for name in
             ("branched.safetensors", "fused.safetensors", "masks.safetensors", "report.json", "report.md")}
    meta = {"model": args.model, "block": args.block, "bn": args.bn}
    summary = {
        **meta,
        "preserve": not args.fresh,
        "probe_shape": list(probe.shape),
        "dtype": str(probe.dtype).replace("torch.", ""),
        "max_abs_diff_fused_vs_branched": fused_diff,
        "max_rel_diff_fused_vs_branched": fused_diff / scale,
        "max_abs_diff_branched_vs_original": preserve_diff,
        "branched_vs_original_on": None if args.fresh else PRESERVE_CHECK.format(seed=args.seed),
        "converted": len(report.converted),
        "skipped": len(report.skipped),
        "sgs_approximate": len(sgs.report.approximate),
    }
    document = {"summary": summary, "conversion": report.to_dict(), "sgs": sgs.report.to_dict(), "files": files}
    layers = pd.DataFrame(report.rows())
    sgs_rows = pd.DataFrame([
        {"weight": l.weight, "block": l.block, "bn": l.bn, "sgs": "exact" if l.exact else "approximate",
         "why": "; ".join(l.reasons)} for l in sgs.report.layers
    ])
    lines = [f"# reparam convert: {args.model}", "", pd.DataFrame([summary]).T.rename(columns={0: "value"}).to_markdown(),
             "", "## Layers", "", layers.to_markdown(index=False) if len(layers) else "(no convs)"]
    if len(sgs_rows):
        lines += ["", "## SGS form", "", sgs_rows.to_markdown(index=False)]
    if not report.traced:
        lines += ["", f"Model not traceable by torch.fx ({report.trace_error}): no BatchNorm was absorbed."]
    try:
        _save_state_dict(model, files["branched.safetensors"], meta)
        _save_state_dict(fused, files["fused.safetensors"], meta)
        save_masks(files["masks.safetensors"], sgs.masks, model=sgs.model, constants=sgs.constants, metadata=meta)
        with open(files["report.json"], "w") as handle:
            json.dump(document, handle, indent=2)
        with open(files["report.md"], "w") as handle:
            handle.write("\n".join(lines) + "\n")
    except ReparamError as err:
        return fail("convert", err)
    except OSError as err:
        return fail("convert", f"cannot write to {args.out}: {err}")
    print(report)
    print(f"\nfused vs branched (eval, {tuple(probe.shape)}): max |diff| = {fused_diff:.3g} "
          f"(relative {fused_diff / scale:.3g})")
    if not args.fresh:
        print(f"branched vs original ({PRESERVE_CHECK.format(seed=args.seed)}): max |diff| = {preserve_diff:.3g}")
    if sgs.report.approximate:
        print(f"SGS: {len(sgs.report.approximate)} of {len(sgs.report.layers)} layers approximate (see report)")
    print(f"wrote {', '.join(files.values())}")
    return 0

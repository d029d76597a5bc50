"""``reparam convert``: convert a model's convs to reparameterization blocks and write

- ``branched.safetensors``: the converted (branched) model's state dict,
- ``fused.safetensors``: the deploy model's state dict (every block fused to one conv),
- ``masks.safetensors``: the SGS masks (and constant kernels) of the plain model,
- ``report.json`` / ``report.md``: layers converted / skipped (with the reason), SGS
  exactness per layer, and the max output differences on a random probe in eval mode.

    reparam convert --model torchvision:resnet18 --block acb --bn after --out runs/r18
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from reparam.cli._convert_common import add_model_arguments, fail, first_conv_channels


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


def _state_dict(model) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from reparam.convert import convert_model, fuse_model, load_model, max_output_difference, save_masks, to_sgs
    from reparam.errors import ReparamError

    try:
        original = load_model(args.model).eval()
        if args.float64:
            original = original.double()
        model, report = convert_model(
            original, args.block, args.bn, include=args.include, exclude=args.exclude,
            preserve=not args.fresh, return_report=True,
        )
        model.eval()
        generator = torch.Generator().manual_seed(args.seed)
        channels = args.in_channels or first_conv_channels(original)
        probe = torch.randn(args.batch, channels, args.input_size, args.input_size, generator=generator)
        probe = probe.to(next(original.parameters()).dtype)
        try:
            with torch.no_grad():
                reference = original(probe)
                branched_out = model(probe)
        except RuntimeError as err:
            return fail("convert", f"forward on a probe of shape {tuple(probe.shape)} failed ({err}); "
                                   "try another --input-size or --in-channels")
        fused, fused_diff = fuse_model(model, probe=probe)
        scale = max(max_output_difference(branched_out, branched_out * 0), 1e-30)
        preserve_diff = max_output_difference(reference, branched_out)
        sgs = to_sgs(model, warn=False)
        plain, masks, constants = sgs
        os.makedirs(args.out, exist_ok=True)
        files = {name: os.path.join(args.out, name) for name in
                 ("branched.safetensors", "fused.safetensors", "masks.safetensors", "report.json", "report.md")}
        meta = {"model": args.model, "block": args.block, "bn": args.bn}
        save_file(_state_dict(model), files["branched.safetensors"], metadata=meta)
        save_file(_state_dict(fused), files["fused.safetensors"], metadata=meta)
        save_masks(files["masks.safetensors"], masks, model=plain, constants=constants, metadata=meta)
    except ReparamError as err:
        return fail("convert", err)

    summary = {
        **meta,
        "preserve": not args.fresh,
        "probe_shape": list(probe.shape),
        "dtype": str(probe.dtype).replace("torch.", ""),
        "max_abs_diff_fused_vs_branched": fused_diff,
        "max_rel_diff_fused_vs_branched": fused_diff / scale,
        "max_abs_diff_branched_vs_original": preserve_diff if not args.fresh else None,
        "converted": len(report.converted),
        "skipped": len(report.skipped),
        "sgs_approximate": len(sgs.report.approximate),
    }
    document = {"summary": summary, "conversion": report.to_dict(), "sgs": sgs.report.to_dict(), "files": files}
    with open(files["report.json"], "w") as handle:
        json.dump(document, handle, indent=2)
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
    with open(files["report.md"], "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(report)
    print(f"\nfused vs branched (eval, {tuple(probe.shape)}): max |diff| = {fused_diff:.3g} "
          f"(relative {fused_diff / scale:.3g})")
    if not args.fresh:
        print(f"branched vs original: max |diff| = {preserve_diff:.3g}")
    if sgs.report.approximate:
        print(f"SGS: {len(sgs.report.approximate)} of {len(sgs.report.layers)} layers approximate (see report)")
    print(f"wrote {', '.join(files.values())}")
    return 0

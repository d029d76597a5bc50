"""``reparam verify``: run the default equivalence suite and write its reports."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from verification.tolerances import DEFAULT_STEPS, QUICK_STEPS

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def device_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as a torch device here (None if it can): an unknown device
    string, CUDA without a GPU, a device index out of range, ..."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        return f"{name!r} is not a torch device ({str(err).splitlines()[0]})"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{name!r} needs a CUDA GPU, but torch.cuda.is_available() is False here; use --device cpu"
    try:
        torch.zeros(1, device=device).cpu()  # allocate there and read back (fails for meta too)
    except Exception as err:  # noqa: BLE001 - any backend failure means the device is unusable
        return f"{name!r} is not usable here ({str(err).strip().splitlines()[0]})"
    return None


def register(subparsers: argparse._SubParsersAction) -> None:
    from reparam.blocks import BLOCKS, BN_PLACEMENTS
    from verification.suite import OPTIMIZER_NAMES

    parser = subparsers.add_parser(
        "verify",
        help="train branched blocks and their SGS counterparts side by side; check every verdict",
        description="Runs the default suite (blocks x BN placement x optimizers x {auto, wrong mode}) and the "
        "PowerGrad section; exit status 0 only if every observed verdict equals the expected one.",
    )
    parser.add_argument("--blocks", nargs="+", choices=list(BLOCKS), help="blocks to check (default: all)")
    parser.add_argument("--bn", nargs="+", choices=list(BN_PLACEMENTS), help="BN placements (default: all)")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZER_NAMES), help="optimizers (default: all)")
    parser.add_argument("--sections", nargs="+", choices=["sgs", "pgt"], default=["sgs", "pgt"])
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"training steps per case, >= 1 (default {DEFAULT_STEPS}; overrides --quick)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per case (unless --steps is given)")
    parser.add_argument("--out", type=Path, default=Path("reports/verify"), help="report folder (default reports/verify)")
    parser.set_defaults(handler=run)


def _sections(args: argparse.Namespace, dtype: torch.dtype, steps: int):
    if "sgs" in args.sections:
        from verification.suite import default_cases, run_sgs_section

        cases = default_cases(args.blocks, args.bn, args.optimizers)
        yield run_sgs_section(cases, steps=steps, dtype=dtype, device=args.device, seed=args.seed, progress=True)
    if "pgt" in args.sections:
        from verification.pgt import run_pgt_section

        # --quick is already in ``steps`` (QUICK_STEPS unless --steps is given)
        yield run_pgt_section(steps=steps, dtype=dtype, device=args.device, seed=args.seed, progress=True)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 every verdict as expected, 1 a verdict mismatched, 2 a usage error."""
    from verification.report import SUMMARY_COLUMNS, plot_deviation, verdict_grid, write_tables
    from verification.tolerances import full_precision

    problem = device_problem(args.device)
    if problem is not None:
        print(f"reparam verify: error: --device {problem}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    start = time.perf_counter()
    with full_precision():  # no TF32 on GPU, for every section
        parts = list(_sections(args, dtype, steps))
    summary = pd.concat([p[0] for p in parts], ignore_index=True)
    curves = pd.concat([p[1] for p in parts], ignore_index=True)
    elapsed = time.perf_counter() - start
    metadata = dict(steps=steps, dtype=args.dtype, device=args.device, seed=args.seed, torch=torch.__version__,
                    seconds=round(elapsed, 2), cases=len(summary), mismatches=int((~summary.match).sum()))
    paths = write_tables(summary, args.out, metadata=metadata)
    paths.append(plot_deviation(summary, curves, args.out / "verify.png", dtype))
    grid = verdict_grid(summary)
    if not grid.empty:
        print(grid.to_markdown())
    others = summary[summary.section != "sgs"]
    if not others.empty:
        print(others[SUMMARY_COLUMNS[:7]].to_markdown(index=False, floatfmt=".2e"))
    mismatches = summary[~summary.match]
    if not mismatches.empty:
        print("\nMISMATCHES (observed verdict != expected):")
        print(mismatches[SUMMARY_COLUMNS].to_markdown(index=False, floatfmt=".2e"))
    counts = summary.groupby(["expected", "observed"]).size().to_dict()
    print(f"\n{len(summary)} cases in {elapsed:.1f} s, {len(mismatches)} mismatches; "
          + ", ".join(f"{e}->{o}: {n}" for (e, o), n in counts.items()))
    print("reports: " + ", ".join(str(p) for p in paths))
    return 0 if mismatches.empty else 1

"""``reparam verify``: run the default equivalence suite and write its reports."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from reparam.blocks import BLOCKS, BN_PLACEMENTS
from reparam.cli._common import INTERRUPTED, fail, output_dir_problem, sigterm_as_interrupt
from reparam.cli._verify_model import add_model_arguments, run_model, wants_model
from verification.optimizers import OPTIMIZER_NAMES
from verification.tolerances import DEFAULT_STEPS, QUICK_STEPS, full_precision

# the suites, reports and pandas load only when `verify` runs (function-level imports below),
# so that `reparam --help` and the other commands start fast

DTYPES = {"float64": torch.float64, "float32": torch.float32}
SECTIONS = ("sgs", "pgt")
#: the SGS filters; given any of them (and no --sections), only the SGS section runs
FILTERS = ("blocks", "bn", "optimizers")
#: at most this many mismatching cases are listed on the terminal (all are in the reports)
SHOWN_MISMATCHES = 15


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
    parser = subparsers.add_parser(
        "verify",
        help="train branched blocks and their SGS counterparts side by side; check every verdict",
        description="Runs the default suite (blocks x BN placement x optimizers x {auto, wrong SGS mode}) and the "
        "PowerGrad section; exit status 0 only if every observed verdict equals the expected one, 1 on a "
        "mismatch, 2 on a usage error, 130 when interrupted (the finished cases are kept, marked partial).",
    )
    parser.add_argument("--blocks", nargs="+", choices=list(BLOCKS), help="blocks to check (default: all)")
    parser.add_argument("--bn", nargs="+", choices=list(BN_PLACEMENTS), help="BN placements (default: all)")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZER_NAMES), metavar="OPT",
                        help=f"optimizer cases (default: all): {', '.join(OPTIMIZER_NAMES)}")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=None,
                        help="sgs: blocks vs SGS; pgt: PowerGrad Transform vs its surrogate (default: both, "
                        "or only sgs when --blocks, --bn or --optimizers is given)")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"training steps per case, >= 1 (default {DEFAULT_STEPS}; overrides --quick)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float64",
                        help="precision of every trajectory; thresholds follow it (default: float64)")
    parser.add_argument("--device", default="cpu", help="torch device to train on, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data (default: 0)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per case (unless --steps is given)")
    parser.add_argument("--out", type=Path, default=Path("reports/verify"), metavar="DIR",
                        help="report folder, created if needed (default: reports/verify)")
    add_model_arguments(parser)
    parser.set_defaults(handler=run)


def chosen_sections(args: argparse.Namespace) -> list[str]:
    """``--sections`` if given; else only ``sgs`` when an SGS filter is given, else both."""
    if args.sections:
        return list(dict.fromkeys(args.sections))
    return ["sgs"] if any(getattr(args, name) for name in FILTERS) else list(SECTIONS)


def _results(args: argparse.Namespace, sections: list[str], dtype: torch.dtype, steps: int) -> Iterator:
    """``(summary row, curve)`` of every case, section by section, as each finishes."""
    if "sgs" in sections:
        from verification.suite import default_cases, iter_sgs_section

        cases = default_cases(args.blocks, args.bn, args.optimizers)
        yield from iter_sgs_section(cases, steps=steps, dtype=dtype, device=args.device, seed=args.seed, progress=True)
    if "pgt" in sections:
        from verification.pgt.suite import iter_pgt_section

        # --quick is already in ``steps`` (QUICK_STEPS unless --steps is given)
        yield from iter_pgt_section(steps=steps, dtype=dtype, device=args.device, seed=args.seed, progress=True)


def _collect(results: Iterator) -> tuple[list, bool]:
    """Every result until the end or Ctrl-C / SIGTERM; ``(results, interrupted)``."""
    done: list = []
    with sigterm_as_interrupt():
        try:
            with full_precision():  # no TF32 on GPU, for every section
                for item in results:
                    done.append(item)
        except KeyboardInterrupt:
            return done, True
    return done, False


def _write_reports(summary, curves, args: argparse.Namespace, metadata: dict, dtype: torch.dtype) -> list[Path]:
    from verification.report import plot_deviation, verdict_grid, write_tables

    note = f"PARTIAL: interrupted after {len(summary)} finished cases" if metadata["partial"] else ""
    paths = write_tables(summary, args.out, metadata=metadata, note=note)
    if not summary.empty:
        paths.append(plot_deviation(summary, curves, args.out / "verify.png", dtype))
        grid = verdict_grid(summary)
        if not grid.empty:
            paths.append(args.out / "verify_grid.md")
            paths[-1].write_text(
                "Observed verdicts (E exact, A approximate, D diverges, ? inconclusive; ! = not as expected)\n\n"
                + grid.to_markdown() + "\n")
    return paths


def _print_outcome(summary, dtype: torch.dtype, elapsed: float, paths: list[Path]) -> None:
    from verification.report import format_terminal_summary

    print(format_terminal_summary(summary, dtype))
    mismatches = summary[~summary.match]
    if not mismatches.empty:
        print(f"\nMISMATCHES (observed verdict != expected), {len(mismatches)}:")
        shown = mismatches.head(SHOWN_MISMATCHES)
        for row in shown.itertuples():
            print(f"  {row.case:<44} expected {row.expected:<11} observed {row.observed:<12} "
                  f"dev {row.max_rel_dev:.1e} moved {row.moved_rel:.1e}"[:100])
        if len(mismatches) > len(shown):
            print(f"  ... and {len(mismatches) - len(shown)} more (see verify.md)")
    print(f"\n{len(summary)} cases in {elapsed:.1f} s, {len(mismatches)} mismatches")
    print(f"reports in {paths[0].parent}:")
    print("  " + ", ".join(p.name for p in paths))


def _problem(args: argparse.Namespace) -> str | None:
    """Every usage error that can be found before running (one line), or None."""
    problem = device_problem(args.device)
    if problem is not None:
        return f"--device {problem}"
    return output_dir_problem(args.out)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 every verdict as expected, 1 a verdict mismatched, 2 a usage error,
    130 interrupted (partial reports written)."""
    from verification.schema import frames

    if wants_model(args):
        return run_model(args)
    problem = _problem(args)
    if problem is not None:
        return fail("verify", problem)
    dtype = DTYPES[args.dtype]
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    sections = chosen_sections(args)
    start = time.perf_counter()
    results, interrupted = _collect(_results(args, sections, dtype, steps))
    summary, curves = frames(results)
    elapsed = time.perf_counter() - start
    metadata = dict(steps=steps, dtype=args.dtype, device=args.device, seed=args.seed, sections=sections,
                    torch=torch.__version__, seconds=round(elapsed, 2), cases=len(summary),
                    mismatches=int((~summary.match.astype(bool)).sum()), partial=interrupted)
    try:
        paths = _write_reports(summary, curves, args, metadata, dtype)
    except OSError as err:
        return fail("verify", f"cannot write the reports to {args.out}: {err.strerror or err}")
    if interrupted:
        print(f"reparam verify: interrupted: kept {len(summary)} finished cases in {args.out} (marked partial)",
              file=sys.stderr)
        return INTERRUPTED
    _print_outcome(summary, dtype, elapsed, paths)
    return 0 if summary.match.all() else 1

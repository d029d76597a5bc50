"""``reparam verify --model SPEC``: measured equivalence of a whole model (branched vs plain SGS,
judged against the noise floor measured in the same run); see :func:`verification.verify_model`.

Exit status: 0 the overall verdict is the one theory expects, 1 it is not, 2 a usage error
(found before any training), 3 too ill-conditioned to judge (rounding alone reaches the
tolerance: not a failure of SGS; use a larger batch or image size, fewer steps or float64),
130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from reparam.blocks import BLOCKS
from reparam.cli._common import INTERRUPTED, MODEL_SPEC_HELP, fail, output_dir_problem, sigterm_as_interrupt

#: the exit status when the configuration is too ill-conditioned to judge
ILL_CONDITIONED_EXIT = 3
SHOWN_COLUMNS = ["layer", "expected", "observed", "max_rel_dev", "floor_rel_dev", "moved_rel"]
#: options that only mean something with --model (their defaults are filled in by run_model)
MODEL_ONLY = ("block", "optimizer", "schedule", "batch_size", "image_size", "floor")
DEFAULT_OPTIMIZER = "SGD(lr=0.1, momentum=0.9)"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``reparam verify --model`` (``--bn``, ``--steps``, ``--dtype``, ``--device``,
    ``--seed`` and ``--out`` are shared with the block suite)."""
    from verification.model import DEFAULT_BATCH, DEFAULT_IMAGE, DEFAULT_STEPS

    group = parser.add_argument_group(
        "whole model", "with --model: train the branched model and its plain SGS counterpart side by side and judge "
        "SGS against the noise floor measured in the same run (--bn takes one placement, default after; --steps "
        f"defaults to {DEFAULT_STEPS}; reports verify_model.* in --out; exit 3: too ill-conditioned to judge)")
    group.add_argument("--model", metavar="SPEC", default=None,
                       help=MODEL_SPEC_HELP + "; converted unless already branched")
    group.add_argument("--block", choices=list(BLOCKS), help="block each conv becomes (default: acb)")
    group.add_argument("--optimizer", metavar="SPEC",
                       help=f"any torch.optim optimizer with keyword literals (default: {DEFAULT_OPTIMIZER!r})")
    group.add_argument("--schedule", default=None, metavar="SPEC",
                       help="a torch.optim.lr_scheduler schedule, e.g. 'CosineAnnealingLR(T_max=10)' (default: none)")
    group.add_argument("--batch-size", type=int, help=f"batch size (default: {DEFAULT_BATCH})")
    group.add_argument("--image-size", type=int, help=f"side of the square random images (default: {DEFAULT_IMAGE})")
    group.add_argument("--floor", choices=("auto", "merged", "perturbed"),
                       help="rounding twin measuring the noise floor: merged-mode blocks, weights moved by one ulp, "
                       "or auto (merged where every block is linear)")


def wants_model(args: argparse.Namespace) -> bool:
    """True when ``--model`` or any option that only means something with it was given."""
    return args.model is not None or any(getattr(args, name) is not None for name in MODEL_ONLY)


def _fill_defaults(args: argparse.Namespace) -> None:
    from verification.model import DEFAULT_BATCH, DEFAULT_IMAGE

    defaults = dict(block="acb", optimizer=DEFAULT_OPTIMIZER, batch_size=DEFAULT_BATCH, image_size=DEFAULT_IMAGE,
                    floor="auto")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _problem(args: argparse.Namespace) -> str | None:
    """Every usage error found before building anything (one line), or None."""
    from reparam.cli.verify import device_problem  # here: reparam.cli.verify imports this module

    if args.model is None:
        given = [f"--{name.replace('_', '-')}" for name in MODEL_ONLY if getattr(args, name) is not None]
        return f"{', '.join(given)} only apply to a whole model: add --model SPEC (or drop them to run the block suite)"
    _fill_defaults(args)
    if args.bn is not None and len(args.bn) != 1:
        return f"--bn takes one placement with --model, got {' '.join(args.bn)}"
    for option, value in (("--batch-size", args.batch_size), ("--image-size", args.image_size)):
        if value < 1:
            return f"{option} must be an integer >= 1, got {value}"
    problem = device_problem(args.device)
    if problem is not None:
        return f"--device {problem}"
    return output_dir_problem(args.out)


def _print_outcome(result, paths) -> None:
    summary = result.summary
    print(summary[SHOWN_COLUMNS].to_markdown(index=False, floatfmt=".1e"))
    meta = result.metadata
    print(f"\n{meta['model']}: {meta['conversion']}; SGS mode {meta['applied_mode']!r}, {meta['optimizer']}, "
          f"{meta['steps']} steps, batch {meta['batch_size']} at {meta['image_size']} px, {meta['dtype']}, "
          f"noise floor from the {result.floor_side} twin, {meta['seconds']:.1f} s")
    print(f"verdict: {result.verdict} (expected {result.expected}): {result.reason}")
    print(f"reports in {paths[0].parent}: " + ", ".join(p.name for p in paths))


def run_model(args: argparse.Namespace) -> int:
    """Run ``reparam verify --model`` (call it when :func:`wants_model`); returns the exit status
    (see the module docstring)."""
    from reparam.cli.verify import DTYPES
    from reparam.errors import ReparamError
    from verification.model import DEFAULT_STEPS, ILL_CONDITIONED, verify_model
    from verification.optim_spec import parse_optimizer, parse_schedule

    problem = _problem(args)
    if problem is not None:
        return fail("verify", problem)
    try:
        optimizer = parse_optimizer(args.optimizer)
        schedule = parse_schedule(args.schedule) if args.schedule is not None else None
        with sigterm_as_interrupt(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = verify_model(
                args.model, block=args.block, bn=args.bn[0] if args.bn else "after", optimizer=optimizer,
                schedule=schedule, steps=args.steps or DEFAULT_STEPS, batch_size=args.batch_size,
                image_size=args.image_size, dtype=DTYPES[args.dtype], device=args.device, seed=args.seed,
                floor=args.floor, progress=True,
            )
        paths = result.write(args.out)
    except ReparamError as err:
        return fail("verify", str(err).splitlines()[0])
    except OSError as err:
        return fail("verify", f"cannot write the reports to {args.out}: {err.strerror or err}")
    except KeyboardInterrupt:
        print("reparam verify: interrupted; no report written", file=sys.stderr)
        return INTERRUPTED
    for warning in caught:  # one line each (conversion notes such as a BN that was not absorbed)
        print(f"reparam verify: warning: {str(warning.message).splitlines()[0]}"[:300], file=sys.stderr)
    _print_outcome(result, paths)
    if result.verdict == ILL_CONDITIONED:
        return ILL_CONDITIONED_EXIT
    return 0 if result.matches else 1

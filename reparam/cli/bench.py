"""``reparam bench``: training-cost benchmark of plain vs SGS vs multi-branch blocks.

    reparam bench --quick
    reparam bench --device cuda --models vgg16_bn resnet18 --image-size 32 224 --batch-size 128 64
    reparam bench --models mypkg.nets:tiny --image-size 16 --batch-size 2 --steps 2 --warmup 1

Every (model, image size) pair runs every variant (``plain``, ``sgs-grad``, ``sgs-update``,
``acb``/``repvgg``/``dbb`` with per-branch BN, ``-after`` and ``-merged`` forms); writes
``results.csv``, ``results.md``, ``results.json`` and ``ratios.png`` to ``--out``.
See docs/bench.md for the columns.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    from benchmarks.variants import VARIANTS

    parser = subparsers.add_parser(
        "bench",
        help="training-cost benchmark: ms/step, images/s and peak memory per variant",
        description="Measure one full training step of each variant (plain, SGS, branched blocks) "
        "and its ratio to plain on the same model in the same run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="variants: " + ", ".join(VARIANTS) + "\nmodels: torchvision names (random weights), "
        "torchvision:<name> or module:callable",
    )
    parser.add_argument("--models", nargs="+", default=None, metavar="SPEC",
                        help="models (default: vgg16_bn resnet18)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="variants to run (default: all); plain is always added as the reference")
    parser.add_argument("--image-size", type=int, nargs="+", default=None, metavar="PX",
                        help="input sizes (default: 32 224)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None, metavar="B",
                        help="batch size per image size, or one for all (default: 128 64)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter and input dtype (default: float32)")
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                        help="autocast mixed precision (fp16 adds a GradScaler); needs --dtype float32")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--tf32", default="default", choices=["default", "on", "off"],
                        help="TF32 for CUDA matmul and cuDNN conv (default: leave torch's setting; recorded)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (needs --warmup >= 1; dynamo is reset before every row)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default: 10)")
    parser.add_argument("--quick", action="store_true",
                        help="resnet18 at 32px batch 16, 2 warm-up + 5 steps, one thread, 120 s row timeout "
                        "(explicit options override)")
    parser.add_argument("--isolate", default="auto", choices=["auto", "always", "never"],
                        help="one subprocess per row: auto = on CPU (separate peak RSS) or with a row timeout, "
                        "always, never")
    parser.add_argument("--row-timeout", type=float, default=None, metavar="S",
                        help="kill a row after S seconds and record it as 'timeout'; rows then run in their own "
                        "process (ignored, with a warning, under --isolate never)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="start no row after S seconds; the rows left are recorded as 'skipped'")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for CPU runs (default: torch's; 1 with --quick)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: benchmarks/results/<device>-<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def options_from_args(args: argparse.Namespace):
    from benchmarks.run import DEFAULT_MODELS, DEFAULT_SIZES, QUICK, BenchOptions

    models = args.models or list(QUICK["models"] if args.quick else DEFAULT_MODELS)
    base_sizes = list(QUICK["sizes"] if args.quick else DEFAULT_SIZES)
    if args.image_size:
        sizes_px = args.image_size
        if args.batch_size:
            batches = args.batch_size
        else:  # default batch of the matching preset size, else the first preset's
            known = dict(base_sizes)
            batches = [known.get(s, base_sizes[0][1]) for s in sizes_px]
    else:
        sizes_px = [s for s, _ in base_sizes]
        batches = args.batch_size or [b for _, b in base_sizes]
    if len(batches) == 1:
        batches = batches * len(sizes_px)
    if len(batches) != len(sizes_px):
        raise ValueError(f"--batch-size takes one value or one per image size ({len(sizes_px)}), got {len(batches)}")
    if any(v <= 0 for v in [*sizes_px, *batches]):
        raise ValueError("image and batch sizes must be positive")
    steps = args.steps if args.steps is not None else (QUICK["steps"] if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (QUICK["warmup"] if args.quick else 10)
    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if args.compile and warmup < 1:
        raise ValueError("--compile needs --warmup >= 1: the first steps compile the model and must not be timed")
    if args.amp and args.dtype != "float32":
        raise ValueError("--amp needs --dtype float32 (autocast runs on float32 parameters)")
    row_timeout = args.row_timeout if args.row_timeout is not None else (QUICK["row_timeout"] if args.quick else None)
    if row_timeout is not None and row_timeout <= 0:
        raise ValueError("--row-timeout must be > 0 seconds")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError("--time-budget must be > 0 seconds")
    threads = args.threads if args.threads is not None else (QUICK["threads"] if args.quick else None)
    if threads is not None and threads < 1:
        raise ValueError("--threads must be >= 1")
    return BenchOptions(
        models=models, sizes=list(zip(sizes_px, batches)), variants=args.variants or ["all"],
        device=args.device, dtype=args.dtype, amp=args.amp, channels_last=args.channels_last,
        cudnn_benchmark=args.cudnn_benchmark, tf32=args.tf32, compile=args.compile, steps=steps,
        warmup=warmup, isolate=args.isolate, row_timeout=row_timeout, time_budget=args.time_budget, threads=threads,
        out=args.out,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from benchmarks.report import table_text
    from benchmarks.run import plan_benchmark, run_benchmark

    try:
        opts = options_from_args(args)
        plan = plan_benchmark(opts)  # device, variants, models, --out: all checked before any row runs
    except ValueError as exc:
        print(f"reparam bench: {exc}", file=sys.stderr)
        return 2
    result = run_benchmark(plan)
    env = result.environment
    print()
    print(f"{env['device_type'].upper()}: {env['device_name']} | torch {env['torch']} | "
          f"dtype {opts.dtype} amp {opts.amp or 'none'} | {opts.steps} steps after {opts.warmup} warm-up")
    print(table_text(result.rows))
    for kind, path in result.paths.items():
        print(f"{kind}: {path}")
    for warning in result.warnings:
        print(f"reparam bench: WARNING: {warning}", file=sys.stderr)
    if result.interrupted:
        print(f"interrupted: kept {len(result.rows)} finished rows", file=sys.stderr)
        return 130
    return 1 if any(r.status == "error" for r in result.rows) else 0

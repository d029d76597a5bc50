"""Orchestrate a benchmark: every (model, input size) x variant is one :class:`~benchmarks.row.Row`.

:func:`plan_benchmark` checks everything a run needs before any of it starts (device,
variants, model specs, output folder) and lists the rows; :func:`run_benchmark` measures
them. On CPU each row runs by default in a fresh subprocess
(:func:`benchmarks.execute.run_isolated`) so that its peak RSS is its own; on CUDA rows run
in-process, the peak being ``torch.cuda.max_memory_allocated`` after a reset, unless a row
timeout is set (only a subprocess can be killed when it runs over). In-process ``--compile``
rows reset dynamo first. The files are rewritten after every row (tables and chart), so an
interrupted run keeps what it finished; an out-of-memory row is recorded as ``OOM`` and the
run goes on; rows not started within ``time_budget`` seconds are recorded as ``skipped``.
"""
from __future__ import annotations

import datetime as _dt
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks import execute, report
from benchmarks.environment import apply_backend_flags, collect, usable_cores
from benchmarks.row import Row
from benchmarks.variants import BuildCache, resolve_variants
from reparam.convert import load_model
from reparam.errors import sigterm_as_interrupt

DEFAULT_MODELS = ("vgg16_bn", "resnet18")
DEFAULT_SIZES = ((32, 128), (224, 64))  # CIFAR and ImageNet: (image size, batch size)
QUICK = {"models": ("resnet18",), "sizes": ((32, 16),), "steps": 5, "warmup": 2, "row_timeout": 120.0, "threads": 1}


@dataclass
class BenchOptions:
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    sizes: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_SIZES))
    variants: list[str] = field(default_factory=lambda: ["all"])
    device: str = "cpu"
    dtype: str = "float32"
    amp: str | None = None
    channels_last: bool = False
    cudnn_benchmark: bool = False
    tf32: str = "default"
    compile: bool = False
    steps: int = 30
    warmup: int = 10
    isolate: str = "auto"  # auto (subprocess per row on CPU) | always | never
    row_timeout: float | None = None  # seconds per row; rows then run isolated (not with isolate=never)
    time_budget: float | None = None  # seconds; rows not started by then are recorded as skipped
    threads: int | None = None
    out: str | None = None
    progress: bool = True


@dataclass
class Plan:
    """A checked run: its options, device, variants, output folder and rows to measure."""

    opts: BenchOptions
    device: torch.device
    variants: list[str]
    isolate: bool
    out_dir: Path
    rows: list[Row]


@dataclass
class BenchResult:
    rows: list[Row]
    environment: dict
    paths: dict[str, Path]
    interrupted: bool
    warnings: list[str]


# -- checks, before any work ---------------------------------------------------------------
def check_device(name: str) -> torch.device:
    """``torch.device(name)`` if this machine can run it, else ValueError with a one-line reason."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {name!r} is not a device ({str(exc).splitlines()[0]})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu, cuda and cuda:N are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda or 'none'})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: only {count} CUDA device(s) are visible")
    return device


def check_out(path: Path) -> Path:
    """``path`` if it is, or can be created as, a writable folder; else a one-line ValueError."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: is a file; give a folder (created if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {path}: {existing} is a file, so the folder cannot be created")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot write in {existing} ({exc.strerror or exc}); "
                         "give a writable folder") from None
    return path


def check_model(name: str) -> None:
    """Resolve model ``name`` with :func:`reparam.convert.load_model`, on the meta device (no
    memory, no initialisation) and, if the model cannot be built there, for real; a ValueError
    naming ``--models`` and the problem otherwise."""
    spec = execute.model_spec(name)
    try:
        with torch.device("meta"):
            load_model(spec)
        return
    except ValueError as exc:  # ReparamError: an unknown model, a bad module:callable, no conv
        raise ValueError(f"--models {name}: {exc}") from None
    except Exception:  # noqa: BLE001 - some factories cannot build on meta: try for real
        pass
    try:
        load_model(spec)
    except Exception as exc:  # noqa: BLE001 - a user factory may raise anything
        raise ValueError(f"--models {name}: building the model raised {type(exc).__name__}: {exc}") from None


def isolate_rows(opts: BenchOptions) -> bool:
    """One subprocess per row? ``auto``: on CPU (each row's peak RSS is its own) and whenever
    a ``--row-timeout`` is set (only a subprocess can be killed when it runs over)."""
    if opts.isolate == "auto":
        return opts.device.split(":")[0] == "cpu" or opts.row_timeout is not None
    return opts.isolate == "always"


def default_out(device: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("benchmarks") / "results" / f"{device.split(':')[0]}-{stamp}"


def plan_benchmark(opts: BenchOptions) -> Plan:
    """Check every option a run needs (ValueError with a one-line message) and list its rows;
    nothing is written and nothing measured."""
    device = check_device(opts.device)
    variant_names = resolve_variants(opts.variants)
    out_dir = check_out(Path(opts.out) if opts.out else default_out(opts.device))
    for name in dict.fromkeys(opts.models):
        check_model(name)
    settings = dict(device=opts.device, dtype=opts.dtype, amp=opts.amp or "none", channels_last=opts.channels_last,
                    cudnn_benchmark=opts.cudnn_benchmark, tf32=opts.tf32, compile=opts.compile, steps=opts.steps,
                    warmup=opts.warmup, threads=opts.threads)
    rows = [Row(model, size, batch, variant, **settings)
            for model in opts.models for size, batch in opts.sizes for variant in variant_names]
    return Plan(opts, device, variant_names, isolate_rows(opts), out_dir, rows)


# -- running -------------------------------------------------------------------------------
def row_line(row: Row) -> str:
    """One terminal line per finished row."""
    line = f"{row.model:>10} {row.image_size:>4}px b{row.batch_size:<4} {row.variant:<13} {row.status:<5}"
    if row.ok:
        ratio = row.time_ratio if row.time_ratio is not None else float("nan")
        line += f" {row.median_ms:9.2f} ms/step  x{ratio:.3f}"
    if row.skipped_steps:
        line += f"  ({row.skipped_steps} of {row.steps} timed steps skipped optimizer.step)"
    if row.status in ("error", "skipped"):
        line += f"  {row.error or ''}"
    if row.warning:
        line += f"  WARNING {row.warning}"  # short by design: report.row_warnings
    return line


def _environment(plan: Plan) -> dict:
    opts = plan.opts
    if opts.threads:
        torch.set_num_threads(opts.threads)
    apply_backend_flags(plan.device, opts.cudnn_benchmark, opts.tf32)
    flags = asdict(opts)
    flags.update(variants=plan.variants, isolated_rows=plan.isolate)
    environment = collect(plan.device, flags)
    environment["interrupted"] = False
    return environment


def _measure(row: Row, plan: Plan, cache: BuildCache | None) -> Row:
    if plan.isolate:
        return execute.run_isolated(row, plan.opts.row_timeout)
    return execute.measure_row(row, cache)


def _save(rows: list[Row], environment: dict, plan: Plan) -> dict[str, Path]:
    """Ratios, tables and chart of the rows so far (after every row, and once at the end)."""
    report.add_ratios(rows)
    paths = report.write_tables(rows, environment, plan.out_dir)
    if rows:
        title = f"{environment['device_type'].upper()} {environment['device_name']} | {plan.opts.dtype}" + (
            f" amp {plan.opts.amp}" if plan.opts.amp else "")
        png = report.plot_ratios(rows, plan.out_dir / report.FILES["png"], title, report.run_warnings(rows, environment))
        if png is not None:
            paths["png"] = png
    return paths


def _progress(plan: Plan, echo: Callable[[str], None]):
    """``(write_line, advance, close)`` through a tqdm bar, or plain ``echo`` lines."""
    if not plan.opts.progress:
        return echo, lambda row: None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=len(plan.rows), unit="row", dynamic_ncols=True, file=sys.stderr)

    def advance(row: Row) -> None:
        bar.set_description(f"{row.model} {row.image_size}px b{row.batch_size} {row.variant}")
        bar.update(1)

    return bar.write, advance, bar.close


def run_benchmark(plan: Plan, echo: Callable[[str], None] = print, cache: BuildCache | None = None) -> BenchResult:
    """Measure every row of ``plan`` (:func:`plan_benchmark`). In-process rows on a GPU build
    each converted model once (``cache``, one is made if not given); CPU rows never share one."""
    if plan.opts.row_timeout is not None and not plan.isolate:
        print(f"reparam bench: warning: --row-timeout {plan.opts.row_timeout:g} s is ignored: it only applies to rows "
              "run in their own process, and --isolate never runs them in-process", file=sys.stderr)
    if cache is None and not plan.isolate and plan.device.type != "cpu":
        cache = BuildCache()
    environment = _environment(plan)
    cores = usable_cores()
    deadline = None if plan.opts.time_budget is None else time.monotonic() + plan.opts.time_budget
    rows: list[Row] = []
    write, advance, close = _progress(plan, echo)
    try:
        with sigterm_as_interrupt():  # `timeout` or a scheduler stops it like Ctrl-C: finished rows are kept
            for row in plan.rows:
                if deadline is not None and time.monotonic() > deadline:
                    budget = plan.opts.time_budget
                    rows.append(row.fail("skipped", f"not started: the --time-budget of {budget:g} s was spent"))
                else:
                    row = _measure(row, plan, cache)
                    row.warning = "; ".join(report.row_warnings(row, cores)) or None
                    rows.append(row)
                    _save(rows, environment, plan)
                    write(row_line(row))
                advance(row)
    except KeyboardInterrupt:
        environment["interrupted"] = True
    finally:
        close()
        paths = _save(rows, environment, plan)
    return BenchResult(rows, environment, paths, environment["interrupted"], report.run_warnings(rows, environment))

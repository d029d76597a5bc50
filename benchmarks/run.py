"""Orchestrate a benchmark: every (model, input size) x variant is one row.

On CPU each row runs by default in a fresh subprocess (``python -m benchmarks.run
--worker``) so that its peak RSS is its own; on CUDA rows run in-process, the peak being
``torch.cuda.max_memory_allocated`` after a reset, unless a row timeout is set (only a
subprocess can be killed when it runs over). In-process ``--compile`` rows reset dynamo
first. Rows are written to disk as soon as they finish, so an interrupted run keeps them;
an out-of-memory row is recorded as ``OOM`` and the run goes on.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: the memory baseline is taken before it is imported
    import torch

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DEFAULT_MODELS = ("vgg16_bn", "resnet18")
DEFAULT_SIZES = ((32, 128), (224, 64))  # CIFAR and ImageNet: (image size, batch size)
QUICK = {"models": ("resnet18",), "sizes": ((32, 16),), "steps": 5, "warmup": 2, "row_timeout": 120.0}


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
    threads: int | None = None
    out: str | None = None
    progress: bool = True


@dataclass
class RowSpec:
    model: str
    image_size: int
    batch_size: int
    variant: str
    device: str
    dtype: str
    amp: str | None
    channels_last: bool
    cudnn_benchmark: bool
    tf32: str
    compile: bool
    steps: int
    warmup: int
    threads: int | None


def model_spec(name: str) -> str:
    """``resnet18`` -> ``torchvision:resnet18``; ``pkg.mod:fn`` and ``torchvision:x`` stay."""
    return name if ":" in name else f"torchvision:{name}"


def _base_row(spec: RowSpec) -> dict:
    return {
        "model": spec.model, "image_size": spec.image_size, "batch_size": spec.batch_size,
        "variant": spec.variant, "steps": spec.steps, "warmup": spec.warmup, "device": spec.device,
        "dtype": spec.dtype, "amp": spec.amp or "none", "channels_last": spec.channels_last,
        "compile": spec.compile,
    }


def _num_classes(model, images, measure) -> int:
    from torch import nn

    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last.out_features if last is not None else measure.num_classes_of(model, images)


def measure_row(spec: RowSpec) -> dict:
    """Build the variant and time it, in this process (on the row's device, see
    :func:`benchmarks.measure.device_context`). Never raises for a row failure: the row's
    ``status`` is ``ok``, ``OOM`` or ``error``."""
    import torch

    from benchmarks import measure

    device = torch.device(spec.device)
    with measure.device_context(device):
        return _measure_row(spec, device)


def _measure_row(spec: RowSpec, device: torch.device) -> dict:
    import torch

    from benchmarks import measure, variants
    from benchmarks.environment import apply_backend_flags

    row = _base_row(spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    apply_backend_flags(device, spec.cudnn_benchmark, spec.tf32)
    cfg = measure.StepConfig(device, getattr(torch, spec.dtype), spec.amp, spec.channels_last, spec.compile)
    meter = measure.MemoryMeter(device)
    built = None
    try:
        source = model_spec(spec.model)
        variants.preload(source)  # imports are not part of the row's memory
        if spec.compile:
            measure.reset_compiler()
        torch.manual_seed(0)
        meter.start()
        built = variants.build_variant(
            spec.variant, lambda: variants.load_model(source), device, cfg.dtype, cfg.channels_last
        )
        meter.after_build()
        images, _ = measure.make_batch(spec.batch_size, spec.image_size, 1, cfg)
        num_classes = _num_classes(built.model, images, measure)
        images, labels = measure.make_batch(spec.batch_size, spec.image_size, num_classes, cfg)
        step = measure.make_step(built.model, built.optimizer, images, labels, cfg)
        result = measure.run_steps(step, built.optimizer, device, spec.warmup, spec.steps, spec.compile)
        peak = meter.peak_bytes()
        row.update(measure.summarize(result.times_ms, spec.batch_size), skipped_steps=result.skipped_steps)
        if result.cpu_times_ms:
            row["cpu_median_ms"] = measure.summarize(result.cpu_times_ms, spec.batch_size)["median_ms"]
        row.update(status="ok", peak_mem_mb=None if peak is None else peak / 2**20, mem_kind=meter.kind)
        if spec.compile:
            row["compiled_graphs"] = result.warmup_graphs + result.timed_graphs
            problem = measure.compile_problem(result)
            if problem:
                row.update(status="error", error=problem)
    except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the run goes on
        oom = measure.is_oom(exc)
        row.update(status="OOM" if oom else "error", error=f"{type(exc).__name__}: {exc}"[:500])
        if not oom:
            traceback.print_exc(file=sys.stderr)
    finally:
        if built is not None:
            info = built.info
            row.update(
                params=info.get("params"), trainable_params=info.get("trainable_params"), blocks=info.get("blocks"),
                masked_params=info.get("masked_params"), sgs_state_mb=info.get("sgs_state_bytes", 0) / 2**20,
            )
            if built.handle is not None:
                built.handle.remove()
        built = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _run_isolated(spec: RowSpec, timeout: float | None = None) -> dict:
    """Run :func:`measure_row` in a fresh Python process and read its row back; a row
    running longer than ``timeout`` seconds is killed and recorded as ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="reparam-bench-") as tmp:
        out = Path(tmp) / "row.json"
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "benchmarks.run", "--worker", json.dumps(asdict(spec)), str(out)]
        try:
            proc = subprocess.run(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            row = _base_row(spec)
            row.update(status="timeout", error=f"row took longer than --row-timeout {timeout:g} s", isolated=True)
            return row
        if out.exists():
            row = json.loads(out.read_text())
        else:
            row = _base_row(spec)
            if proc.returncode in (-signal.SIGKILL, 137):
                row.update(status="OOM", error="worker killed by SIGKILL (out of memory?)")
            elif proc.returncode in (-signal.SIGINT, 130):
                raise KeyboardInterrupt
            else:
                tail = (proc.stderr or "").strip().splitlines()[-3:]
                row.update(status="error", error=f"worker exit {proc.returncode}: {' | '.join(tail)}"[:500])
        row["isolated"] = True
        return row


def _worker_main(argv: list[str]) -> int:
    spec = RowSpec(**json.loads(argv[0]))
    row = measure_row(spec)
    Path(argv[1]).write_text(json.dumps(row, default=str))
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """Treat SIGTERM (e.g. ``timeout``) like Ctrl-C so finished rows and the chart are kept.
    Returns the previous handler, or None when not in the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` if this machine can run it, else ValueError with a one-line reason."""
    import torch

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


def isolate_rows(opts: BenchOptions) -> bool:
    """One subprocess per row? ``auto``: on CPU (each row's peak RSS is its own) and whenever
    a ``--row-timeout`` is set (only a subprocess can be killed when it runs over)."""
    if opts.isolate == "auto":
        return opts.device.split(":")[0] == "cpu" or opts.row_timeout is not None
    return opts.isolate == "always"


def default_out(device: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("benchmarks") / "results" / f"{device.split(':')[0]}-{stamp}"


def run_benchmark(opts: BenchOptions, echo=print) -> tuple[list[dict], dict, dict, bool]:
    """Run every row; returns ``(rows, environment, paths, interrupted)``."""
    import torch

    from benchmarks import report
    from benchmarks.environment import apply_backend_flags, collect
    from benchmarks.variants import resolve_variants

    device = check_device(opts.device)
    variant_names = resolve_variants(opts.variants)
    isolate = isolate_rows(opts)
    if opts.row_timeout is not None and not isolate:
        print(f"reparam bench: warning: --row-timeout {opts.row_timeout:g} s is ignored: it only applies to rows "
              "run in their own process, and --isolate never runs them in-process", file=sys.stderr)
    out_dir = Path(opts.out) if opts.out else default_out(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    apply_backend_flags(device, opts.cudnn_benchmark, opts.tf32)
    flags = asdict(opts)
    flags["variants"] = variant_names
    flags["isolated_rows"] = isolate
    environment = collect(device, flags)
    environment["interrupted"] = False

    specs = [
        RowSpec(model, size, batch, variant, opts.device, opts.dtype, opts.amp, opts.channels_last,
                opts.cudnn_benchmark, opts.tf32, opts.compile, opts.steps, opts.warmup, opts.threads)
        for model in opts.models for size, batch in opts.sizes for variant in variant_names
    ]
    rows: list[dict] = []
    paths: dict = {}
    interrupted = False
    bar = None
    previous_sigterm = _sigterm_as_interrupt()
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), unit="row", dynamic_ncols=True, file=sys.stderr)
    try:
        for spec in specs:
            if bar is not None:
                bar.set_description(f"{spec.model} {spec.image_size}px b{spec.batch_size} {spec.variant}")
            row = _run_isolated(spec, opts.row_timeout) if isolate else measure_row(spec)
            row.setdefault("isolated", False)
            rows.append(row)
            report.add_ratios(rows)
            paths = report.write_tables(rows, environment, out_dir)
            line = (f"{row['model']:>10} {row['image_size']:>4}px b{row['batch_size']:<4} {row['variant']:<13} "
                    f"{row['status']:<5}")
            if row["status"] == "ok":
                line += f" {row['median_ms']:9.2f} ms/step  x{(row.get('time_ratio') or float('nan')):.3f}"
            if row.get("skipped_steps"):
                line += f"  ({row['skipped_steps']} of {row['steps']} timed steps skipped optimizer.step)"
            if row["status"] == "error":
                line += f"  {row.get('error', '')}"
            (bar.write if bar is not None else echo)(line)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
        environment["interrupted"] = True
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if bar is not None:
            bar.close()
        report.add_ratios(rows)
        paths = report.write_tables(rows, environment, out_dir)
        if rows:
            title = f"{environment['device_type'].upper()} {environment['device_name']} | {opts.dtype}" + (
                f" amp {opts.amp}" if opts.amp else "")
            png = report.plot_ratios(rows, out_dir / report.FILES["png"], title)
            if png is not None:
                paths["png"] = png
    return rows, environment, paths, interrupted


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    from reparam.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))

"""Measure one :class:`~benchmarks.row.Row`: build its variant, time it, record its peak memory.

:func:`measure_row` runs in this process (on the row's device, see
:func:`benchmarks.measure.device_context`); :func:`run_isolated` runs it in a fresh
``python -m benchmarks.execute ROW_JSON OUT`` worker, so that the row's peak RSS is its own
and a row that runs over its timeout can be killed. Neither raises for a row failure: the
row's ``status`` becomes ``ok``, ``OOM``, ``timeout`` or ``error``.

A row imports everything it needs (:func:`benchmarks.variants.preload`) before its memory
baseline is taken, so that no import counts in its peak.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from benchmarks import measure, variants
from benchmarks.environment import apply_backend_flags, load_avg
from benchmarks.row import Row
from reparam.convert import load_model


def model_spec(name: str) -> str:
    """``resnet18`` -> ``torchvision:resnet18``; any ``source:name`` spec stays as it is."""
    return name if ":" in name else f"torchvision:{name}"


def measure_row(row: Row, cache: variants.BuildCache | None = None) -> Row:
    """Build the variant (from ``cache`` if given) and time it in this process; fills and
    returns ``row``."""
    device = torch.device(row.device)
    with measure.device_context(device):
        _measure(row, device, cache)
    row.load_avg_1m = load_avg()
    return row


def _step_config(row: Row, device: torch.device) -> measure.StepConfig:
    amp = None if row.amp == "none" else row.amp
    return measure.StepConfig(device, getattr(torch, row.dtype), amp, row.channels_last, row.compile)


def _build(
    row: Row, cfg: measure.StepConfig, meter: measure.MemoryMeter, cache: variants.BuildCache | None
) -> variants.Variant:
    """Import what the row needs, take the memory baseline, build the variant."""
    source = model_spec(row.model)
    variants.preload(source)  # imports are not part of the row's memory
    if row.compile:
        measure.reset_compiler()
    torch.manual_seed(0)
    meter.start()
    def factory():
        return load_model(source)

    converted = cache.converted(source, row.variant, factory) if cache is not None else None
    built = variants.build_variant(row.variant, factory, cfg.device, cfg.dtype, cfg.channels_last, converted)
    meter.after_build()
    return built


def _time(row: Row, built: variants.Variant, cfg: measure.StepConfig, meter: measure.MemoryMeter) -> None:
    images, _ = measure.make_batch(row.batch_size, row.image_size, 1, cfg)
    num_classes = measure.output_width(built.model, images)
    images, labels = measure.make_batch(row.batch_size, row.image_size, num_classes, cfg)
    step = measure.make_step(built.model, built.optimizer, images, labels, cfg)
    result = measure.run_steps(step, built.optimizer, cfg.device, row.warmup, row.steps, row.compile)
    peak = meter.peak_bytes()
    for name, value in measure.summarize(result.times_ms, row.batch_size).items():
        setattr(row, name, value)
    row.skipped_steps = result.skipped_steps
    if result.cpu_times_ms:
        row.cpu_median_ms = measure.summarize(result.cpu_times_ms, row.batch_size)["median_ms"]
    row.status = "ok"
    row.peak_mem_mb = None if peak is None else peak / 2**20
    row.mem_kind = meter.kind
    if row.compile:
        row.compiled_graphs = result.warmup_graphs + result.timed_graphs
        problem = measure.compile_problem(result)
        if problem:
            row.fail("error", problem)


def _describe(row: Row, built: variants.Variant) -> None:
    info = built.info
    row.params, row.trainable_params = info.get("params"), info.get("trainable_params")
    row.blocks, row.masked_params = info.get("blocks"), info.get("masked_params")
    row.sgs_state_mb = info.get("sgs_state_bytes", 0) / 2**20


def _measure(row: Row, device: torch.device, cache: variants.BuildCache | None) -> None:
    if row.threads:
        torch.set_num_threads(row.threads)
    apply_backend_flags(device, row.cudnn_benchmark, row.tf32)
    cfg = _step_config(row, device)
    meter = measure.MemoryMeter(device)
    built = None
    try:
        built = _build(row, cfg, meter, cache)
        _time(row, built, cfg, meter)
    except Exception as exc:  # noqa: BLE001 - a failed row is recorded, the run goes on
        oom = measure.is_oom(exc)
        row.fail("OOM" if oom else "error", f"{type(exc).__name__}: {exc}")
        if not oom:
            traceback.print_exc(file=sys.stderr)
    finally:
        if built is not None:
            _describe(row, built)
            if built.handle is not None:
                built.handle.remove()
        built = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# -- one row in its own process ------------------------------------------------------------
def _worker_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _failed_worker(row: Row, proc: subprocess.CompletedProcess) -> Row:
    if proc.returncode in (-signal.SIGKILL, 137):
        return row.fail("OOM", "worker killed by SIGKILL (out of memory?)")
    if proc.returncode in (-signal.SIGINT, 130):
        raise KeyboardInterrupt
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return row.fail("error", f"worker exit {proc.returncode}: {' | '.join(tail)}")


def run_isolated(row: Row, timeout: float | None = None) -> Row:
    """Run :func:`measure_row` in a fresh Python process and read its row back; a row
    running longer than ``timeout`` seconds is killed and recorded as ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="reparam-bench-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "benchmarks.execute", json.dumps(row.to_dict()), str(out)]
        try:
            proc = subprocess.run(cmd, env=_worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            row.fail("timeout", f"row took longer than --row-timeout {timeout:g} s")
        else:
            row = Row.from_dict(json.loads(out.read_text())) if out.exists() else _failed_worker(row, proc)
    row.isolated = True
    return row


def _worker_main(argv: list[str]) -> int:
    row = measure_row(Row.from_dict(json.loads(argv[0])))
    Path(argv[1]).write_text(json.dumps(row.to_dict(), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

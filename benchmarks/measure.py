"""Time one full training step (forward, loss, backward, optimizer step with SGS hooks)
and measure peak memory.

Timing: ``warmup`` untimed steps, then ``steps`` timed steps. On CUDA every step is
bracketed by CUDA events on the row device's current stream and the device is synchronized
before the first and after the last step (no per-step host sync, so launch overhead counts
as it does in real training); on CPU by ``time.perf_counter``. Reported: median and
inter-quartile range in ms/step. A row runs inside :func:`device_context`, so that events,
streams and memory statistics all refer to the row's GPU (``cuda:N``).

Also counted: timed steps in which ``optimizer.step`` did not run (an fp16 ``GradScaler``
skips it, and the SGS hooks with it, when gradients are inf/NaN) and, with
``torch.compile``, the graphs dynamo compiled during the warm-up and the timed steps.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
taken before the model is built, so the peak counts everything the row allocates
(weights, gradients, optimizer state, SGS masks/snapshots, the batch, activations).
On CPU: the peak resident set size of the process minus its resident size right before
the model was built, every module the row needs being imported before that baseline
(:func:`benchmarks.variants.preload`, :func:`reset_compiler`). On Linux the high-water
mark is reset through ``/proc/self/clear_refs`` and read from ``VmHWM``; elsewhere
``resource.getrusage``'s ``ru_maxrss`` (a process-lifetime high-water mark) is used. On
both devices the peak is reset again once the variant is built (keeping what stays
allocated), so transient model copies made by the converters do not count; with
``ru_maxrss`` that reset is impossible. On CPU, free heap pages are returned to the OS
(``malloc_trim``) before the baseline and before that reset. Memory the allocator keeps
from an earlier row would be reused without raising the RSS, so the runner measures each
CPU row in a fresh subprocess by default.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field

import torch
from torch import nn


# -- memory -------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # bytes on macOS, KiB on Linux


def _release_free_heap() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim``), so that memory freed while
    building a variant is not resident-but-reusable during training (which would hide the
    training peak from the RSS). No-op without glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - musl etc.
        pass


class MemoryMeter:
    """Peak memory above a baseline taken at :meth:`start`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""
        self._base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
            self._base = 0  # the peak counts all live allocations (baseline reported separately)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        _release_free_heap()
        rss = _proc_status_kb("VmRSS")
        reset = False
        if rss is not None:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
                reset = True
            except OSError:
                reset = False
        if reset:
            self.kind = "cpu_peak_rss_delta(VmHWM)"
            self._base = _proc_status_kb("VmRSS") * 1024
        else:
            self.kind = "cpu_peak_rss_delta(ru_maxrss)"
            self._base = (rss * 1024) if rss is not None else (_ru_maxrss_bytes() or 0)
        self.baseline = self._base

    def after_build(self) -> None:
        """Forget the peak of building the variant (model copies made by the converters),
        keeping what is still allocated: the peak then is the training peak."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind.endswith("(VmHWM)"):
            _release_free_heap()
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:  # pragma: no cover
                pass

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind.endswith("(VmHWM)"):
            hwm = _proc_status_kb("VmHWM")
            peak = hwm * 1024 if hwm is not None else None
        else:
            peak = _ru_maxrss_bytes()
        return None if peak is None else max(0, peak - self._base)


# -- the training step ---------------------------------------------------------------------
@dataclass
class StepConfig:
    device: torch.device
    dtype: torch.dtype = torch.float32
    amp: str | None = None  # None, "bf16" or "fp16"
    channels_last: bool = False
    compile: bool = False


def _grad_scaler(device: torch.device):
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        try:
            return amp.GradScaler(device.type)
        except (TypeError, RuntimeError):  # pragma: no cover - torch < 2.3
            pass
    return torch.cuda.amp.GradScaler()  # pragma: no cover


def make_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, cfg: StepConfig
) -> Callable[[], None]:
    """A closure running one training step; SGS hooks fire inside ``optimizer.step``
    (with fp16 the GradScaler calls it after unscaling the gradients)."""
    forward = torch.compile(model) if cfg.compile else model
    loss_fn = nn.CrossEntropyLoss()
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp or "")
    scaler = _grad_scaler(cfg.device) if cfg.amp == "fp16" else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=cfg.device.type, dtype=amp_dtype)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(forward(images), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return step


def make_batch(batch_size: int, image_size: int, num_classes: int, cfg: StepConfig, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    images = images.to(device=cfg.device, dtype=cfg.dtype)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(cfg.device)


def output_width(model: nn.Module, images: torch.Tensor) -> int:
    """Classes the model predicts: the last ``nn.Linear``'s ``out_features``, else the width of
    one forward pass on a single image (eval mode, no grad; the training flag is restored)."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is not None:
        return last.out_features
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    model.train(was)
    return int(out.shape[-1])


# -- timing --------------------------------------------------------------------------------
def device_context(device: torch.device) -> ContextManager:
    """Make ``device`` the current CUDA device (a no-op on CPU): streams, events and
    allocator calls without an explicit device then refer to it, not to ``cuda:0``."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def reset_compiler() -> None:
    """Forget dynamo's compiled code and guards. Without this, every row's freshly built
    model recompiles the same frame until ``recompile_limit`` is hit, after which dynamo
    silently runs later rows eagerly. Also imports inductor (the default backend), so that a
    memory baseline taken afterwards does not count the import."""
    import torch._dynamo
    import torch._inductor.compile_fx  # noqa: F401

    torch._dynamo.reset()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a monotonic counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class OptimizerStepCounter:
    """Counts the calls of ``optimizer.step`` that actually ran."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.count = 0
        self._handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def time_steps(
    step: Callable[[], None], device: torch.device, steps: int, cpu_times: list[float] | None = None
) -> list[float]:
    """Milliseconds of each of ``steps`` timed steps (run the warm-up before).

    On CPU, ``cpu_times`` (if given) receives each step's process CPU time in ms
    (``time.process_time``): with several threads it is the sum over threads, and it is
    much less sensitive than wall time to other processes competing for the cores."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        stream = torch.cuda.current_stream(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record(stream)
            step()
            end.record(stream)
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        if cpu_times is not None:
            cpu_times.append((time.process_time() - c0) * 1e3)
    return times


@dataclass
class StepRun:
    """What :func:`run_steps` measured."""

    times_ms: list[float]
    cpu_times_ms: list[float] = field(default_factory=list)
    skipped_steps: int = 0  # timed steps whose optimizer.step (and SGS hooks) did not run
    warmup_graphs: int | None = None  # graphs dynamo compiled during the warm-up (compile only)
    timed_graphs: int | None = None  # ... and during the timed steps: compilation in the timings


def run_steps(
    step: Callable[[], None], optimizer: torch.optim.Optimizer, device: torch.device, warmup: int, steps: int,
    compiled: bool = False,
) -> StepRun:
    """``warmup`` untimed steps, then ``steps`` timed ones (:func:`time_steps`)."""
    counter = OptimizerStepCounter(optimizer)
    try:
        graphs0 = compiled_graphs() if compiled else 0
        for _ in range(warmup):
            step()
        graphs1 = compiled_graphs() if compiled else 0
        ran = counter.count
        cpu_times: list[float] = []
        times = time_steps(step, device, steps, cpu_times)
        run = StepRun(times, cpu_times, skipped_steps=steps - (counter.count - ran))
        if compiled:
            run.warmup_graphs, run.timed_graphs = graphs1 - graphs0, compiled_graphs() - graphs1
        return run
    finally:
        counter.remove()


def compile_problem(run: StepRun) -> str | None:
    """Why a ``--compile`` row's timings are not of compiled code, or None."""
    if run.warmup_graphs == 0 and not run.timed_graphs:
        return "torch.compile compiled no graph: the model ran eagerly (dynamo fallback)"
    if run.timed_graphs:
        return f"torch.compile compiled {run.timed_graphs} graph(s) during the timed steps (recompilation); raise --warmup"
    return None


def summarize(times_ms: list[float], batch_size: int) -> dict:
    """Median, quartiles, IQR (ms/step) and images/s from the median."""
    xs = sorted(times_ms)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    median = statistics.median(xs)
    return {
        "median_ms": median,
        "p25_ms": q1,
        "p75_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": xs[0],
        "images_per_s": batch_size / (median / 1e3) if median > 0 else float("nan"),
    }


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


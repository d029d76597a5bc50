"""GPU evidence in one command: bench rows, ``reparam verify`` on CUDA and the SGS hooks' kernel
count, within a time budget (default 480 s), into ``benchmarks/results/cuda-<date>/``.

    PYTHONPATH=. python -m benchmarks.gpu_evidence            # or: benchmarks/gpu_evidence.sh
    PYTHONPATH=. python -m benchmarks.gpu_evidence --dry-run  # the same pipeline on CPU, tiny, seconds

Needs one CUDA GPU, torch and torchvision, and the source tree; nothing is downloaded. Parts, in
order, each with its own time limit (what a part leaves unused goes to the later ones):

1. ``reparam bench`` rows, in this process: resnet18 and vgg16_bn at 32x32 batch 128 and 224x224
   batch 64, fp32 with TF32 off and bf16 autocast, variants :data:`VARIANTS`. Rows not started
   within the part's budget are recorded as ``skipped``; a part past its hard limit is stopped
   like Ctrl-C (finished rows kept).
2. The kernels the SGS step hooks launch per step (:mod:`benchmarks.hook_kernels`), in this process.
3. ``python -m reparam verify --device cuda --dtype float32``, subprocess.

Writes ``evidence.md`` / ``evidence.json`` (device name, date, versions, every part's status and
time), each part's own files and logs; with ``$OUT`` set, packs the folder into one archive there.
``--dry-run`` runs the same parts on the CPU with a tiny CNN into ``cpu-dry-run-<date>`` (never GPU
evidence, ignored by git). Figures are what was measured: nothing is extrapolated or filled in.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks import hook_kernels, report
from benchmarks.environment import collect
from benchmarks.row import Row
from benchmarks.run import BenchOptions, plan_benchmark, run_benchmark
from benchmarks.variants import BuildCache

VARIANTS = ("plain", "sgs-grad", "sgs-update", "plain-adamw", "acb", "repvgg", "dbb",
            "acb-merged", "repvgg-merged", "dbb-merged")
PRECISIONS = {"fp32": None, "bf16": "bf16"}  # name -> autocast; fp32 runs with TF32 off (so does bf16)
ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 10.0  # a part past its limit gets this long to save its files after being interrupted
OPTIONAL_MODULES = ("matplotlib", "tabulate", "pandas")  # charts / tables / reparam verify; recorded when missing
RESERVE_S = 20.0  # kept at the end of the budget for the summary and the archive
DEFAULT_BUDGET_S = 465.0  # 8 minutes less start-up (imports) and margin; the part budgets below add up to 445 s


@dataclass
class Part:
    name: str
    budget_s: float
    kind: str  # bench | hooks | verify
    model: str = ""
    precision: str = ""
    status: str = "pending"  # ok | failed (exit status) | timeout | skipped | interrupted
    seconds: float = 0.0
    limit_s: float = 0.0
    note: str = ""


@dataclass
class Config:
    """What one evidence run measures (:func:`gpu_config` or :func:`dry_run_config`)."""

    device: str
    dry_run: bool
    models: list[str]
    sizes: list[tuple[int, int]]
    warmup: int
    steps: int
    threads: int | None
    hooks_args: list[str]
    verify_args: list[str]
    parts: list[Part] = field(default_factory=list)


def _bench_parts(models: list[str], budgets: dict[str, float]) -> list[Part]:
    return [Part(f"bench-{model.rpartition(':')[2]}-{precision}", budgets[model] * (0.55 if precision == "fp32" else 0.45),
                 "bench", model, precision) for model in models for precision in PRECISIONS]


def gpu_config() -> Config:
    """The full set on ``cuda``: 2 models x 2 sizes x 10 variants x 2 precisions."""
    models = ["resnet18", "vgg16_bn"]
    parts = _bench_parts(models, {"resnet18": 100.0, "vgg16_bn": 170.0})
    parts += [Part("hooks", 35.0, "hooks"), Part("verify", 140.0, "verify")]
    return Config("cuda", False, models, [(32, 128), (224, 64)], warmup=5, steps=20, threads=None,
                  hooks_args=["--model", "torchvision:resnet18", "--image-size", "32", "--batch-size", "32"],
                  verify_args=["--device", "cuda", "--dtype", "float32"], parts=parts)


def dry_run_config() -> Config:
    """The same pipeline on the CPU, tiny: checks the plumbing, measures nothing of interest."""
    models = ["benchmarks.tiny:tiny_net"]
    parts = _bench_parts(models, {models[0]: 200.0})
    parts += [Part("hooks", 110.0, "hooks"), Part("verify", 135.0, "verify")]
    return Config("cpu", True, models, [(16, 2)], warmup=1, steps=2, threads=1,
                  hooks_args=["--model", models[0], "--image-size", "16", "--batch-size", "2", "--steps", "2",
                              "--precisions", "fp32"],
                  verify_args=["--device", "cpu", "--dtype", "float32", "--quick", "--blocks", "acb", "--bn", "after",
                               "--optimizers", "sgd", "--sections", "sgs"],
                  parts=parts)


def results_dir(config: Config, base: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return base / (f"cpu-dry-run-{stamp}" if config.dry_run else f"cuda-{stamp}")


# -- running the parts ---------------------------------------------------------------------
class _Alarm:
    """Interrupt this process (as Ctrl-C would) after ``seconds``; remembers whether it fired."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.fired = seconds, False

    def _fire(self, signum, frame):
        self.fired = True
        raise KeyboardInterrupt

    def __enter__(self) -> _Alarm:
        self._previous = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 0.01))
        return self

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)


def _run_bench(part: Part, config: Config, out: Path, cache: BuildCache, log) -> None:
    opts = BenchOptions(
        models=[part.model], sizes=list(config.sizes), variants=list(VARIANTS), device=config.device,
        amp=PRECISIONS[part.precision], cudnn_benchmark=config.device == "cuda", tf32="off", steps=config.steps,
        warmup=config.warmup, threads=config.threads, isolate="never", time_budget=max(part.limit_s - STOP_GRACE_S, 1.0),
        out=str(out / "bench" / part.name), progress=False)
    plan = plan_benchmark(opts)
    result = None
    try:
        with _Alarm(part.limit_s) as alarm:
            result = run_benchmark(plan, echo=log, cache=cache)
    except KeyboardInterrupt:  # the alarm fired outside run_benchmark's own handling, or Ctrl-C
        if not alarm.fired:
            raise
    if result is None:
        part.status, part.note = "timeout", "stopped at its limit"
        return
    if result.interrupted and not alarm.fired:
        part.status = "interrupted"
        raise KeyboardInterrupt
    statuses = [r.status for r in result.rows]
    part.note = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses)) + f" of {len(plan.rows)} rows"
    part.status = "timeout" if alarm.fired else ("ok" if all(s == "ok" for s in statuses) else "partial")


def _subprocess(cmd: list[str], limit_s: float, log_path: Path, extra_env: dict[str, str]) -> tuple[int | None, bool]:
    """Run ``cmd`` (output to ``log_path``); past ``limit_s`` send SIGINT, then SIGKILL after a
    grace period. Returns ``(exit status, timed out)``."""
    env = {**os.environ, **extra_env}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=max(limit_s, 1.0)), False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                return proc.wait(timeout=STOP_GRACE_S), True
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(), True
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise


def _run_hooks(part: Part, config: Config, out: Path, log) -> None:
    """:mod:`benchmarks.hook_kernels` in this process, stopped like Ctrl-C past the part's limit."""
    args = ["--device", config.device, *config.hooks_args, "--out", str(out / "hooks")]
    try:
        with _Alarm(part.limit_s) as alarm:
            hook_kernels.main(args, echo=log)
    except KeyboardInterrupt:
        if not alarm.fired:
            raise
        part.status, part.note = "timeout", "stopped at its limit"
        return
    except Exception as exc:  # noqa: BLE001 - the other parts still run; the error is reported
        part.status, part.note = "failed", f"{type(exc).__name__}: {exc}"[:300]
        return
    part.status, part.note = "ok", "python -m benchmarks.hook_kernels " + " ".join(args)


def _run_verify(part: Part, config: Config, out: Path) -> None:
    cmd = [sys.executable, "-m", "reparam", "verify", *config.verify_args, "--out", str(out / "verify")]
    # float32 means float32: cuBLAS/cuDNN would otherwise use TF32 for convs (torch's default)
    extra_env = {"NVIDIA_TF32_OVERRIDE": "0"}
    rc, timed_out = _subprocess(cmd, part.limit_s, out / "logs" / f"{part.name}.log", extra_env)
    part.note = f"exit status {rc}; command: NVIDIA_TF32_OVERRIDE=0 {' '.join(cmd[1:])}"
    part.status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")


def _limit(config: Config, index: int, deadline: float) -> float:
    """Part ``index``'s hard limit: its budget plus what earlier parts left, never eating into
    the budgets of the parts after it."""
    return deadline - time.monotonic() - sum(p.budget_s for p in config.parts[index + 1:])


def run_parts(config: Config, out: Path, deadline: float, log) -> bool:
    """Run every part in order within ``deadline``; False if the user interrupted."""
    cache = BuildCache()
    for index, part in enumerate(config.parts):
        part.limit_s = round(_limit(config, index, deadline), 1)
        if part.limit_s < 5:
            part.status, part.note = "skipped", "no time left in the budget"
            continue
        log(f"== {part.name}: up to {part.limit_s:.0f} s")
        start = time.monotonic()
        try:
            if part.kind == "bench":
                _run_bench(part, config, out, cache, log)
            elif part.kind == "hooks":
                _run_hooks(part, config, out, log)
            else:
                _run_verify(part, config, out)
        except KeyboardInterrupt:
            part.status = "interrupted"
            return False
        except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others their evidence
            part.status, part.note = "failed", f"{type(exc).__name__}: {exc}"[:300]
            with open(out / "logs" / f"{part.name}.log", "a") as fh:
                traceback.print_exc(file=fh)
        finally:
            part.seconds = round(time.monotonic() - start, 1)
            log(f"   {part.name}: {part.status} in {part.seconds:.0f} s {part.note}")
    return True


# -- the summary ---------------------------------------------------------------------------
def _bench_tables(config: Config, out: Path) -> list[str]:
    lines = []
    for part in config.parts:
        path = out / "bench" / part.name / "results.json"
        if part.kind != "bench" or not path.is_file():
            continue
        payload = json.loads(path.read_text())
        rows = [Row.from_dict(r) for r in payload["rows"]]
        cols = ("model", "image_size", "batch_size", "variant", "status", "median_ms", "iqr_ms", "time_ratio",
                "peak_mem_mb", "mem_ratio", "sgs_state_mb")
        warnings = [f"- **WARNING**: {w}" for w in payload.get("warnings", [])]
        lines += [f"### {part.name}", "", *warnings, *([""] if warnings else []),
                  report.table_text(rows, cols, fmt="github"), ""]
    return lines


def write_summary(config: Config, out: Path, environment: dict, started: str, complete: bool) -> Path:
    """``evidence.json`` and ``evidence.md``: device, date, versions, parts and every bench table."""
    parts = [asdict(p) for p in config.parts]
    payload = {"dry_run": config.dry_run, "started_utc": started, "complete": complete,
               "environment": environment, "parts": parts}
    (out / "evidence.json").write_text(json.dumps(payload, indent=2, default=str))
    kind = "CPU DRY RUN - not GPU evidence" if config.dry_run else "GPU evidence"
    lines = [f"# {kind}: {environment.get('device_name')}", "",
             f"Started {started} (UTC); torch {environment.get('torch')}, CUDA {environment.get('cuda')}, "
             f"cuDNN {environment.get('cudnn')}, driver {environment.get('cuda_driver')}, "
             f"git {environment.get('git_commit')}."
             + (f" Not installed: {', '.join(environment['missing_modules'])}." if environment.get("missing_modules") else ""),
             "",
             "| part | status | seconds | limit (s) | note |", "|---|---|---|---|---|",
             *(f"| {p.name} | {p.status} | {p.seconds:g} | {p.limit_s:g} | {p.note} |" for p in config.parts), "",
             f"Bench: {config.warmup} warm-up + {config.steps} timed steps per row, TF32 off, "
             f"cuDNN benchmark {'on' if config.device == 'cuda' else 'off'}.", "", *_bench_tables(config, out)]
    hooks = out / "hooks" / "hook_kernels.md"
    if hooks.is_file():
        lines += ["## SGS hook kernels", "", hooks.read_text().split("\n", 2)[-1]]
    (out / "evidence.md").write_text("\n".join(lines) + "\n")
    return out / "evidence.md"


def pack(out: Path, target: Path) -> list[Path]:
    """One ``<folder>.tar.gz`` of ``out`` and a copy of ``evidence.md`` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    archive = target / f"{out.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    summary = target / "evidence.md"
    shutil.copyfile(out / "evidence.md", summary)
    return [archive, summary]


# -- the command ---------------------------------------------------------------------------
def _check_device(config: Config) -> None:
    if config.dry_run:
        return
    if not torch.cuda.is_available():
        raise ValueError(f"no CUDA GPU here (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
                         "run on a GPU machine, or use --dry-run to check the pipeline on the CPU")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_evidence", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the same pipeline on the CPU with a tiny CNN (seconds); results are not GPU evidence")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                        help=f"total seconds for every part (default {DEFAULT_BUDGET_S:g}); each part has its share")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), metavar="DIR",
                        help="folder that receives cuda-<date>/ (default benchmarks/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.monotonic()
    config = dry_run_config() if args.dry_run else gpu_config()
    try:
        _check_device(config)
        if args.budget <= RESERVE_S + 10:
            raise ValueError(f"--budget {args.budget:g}: needs more than {RESERVE_S + 10:g} s")
    except ValueError as exc:
        print(f"gpu_evidence: {exc}", file=sys.stderr)
        return 2
    for part in config.parts:  # every part keeps its share of the budget
        part.budget_s *= (args.budget - RESERVE_S) / DEFAULT_BUDGET_S
    out = results_dir(config, Path(args.results).resolve())  # absolute: subprocesses run in the repository root
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    environment = collect(torch.device(config.device), {"budget_s": args.budget, "dry_run": config.dry_run})
    environment["missing_modules"] = [m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is None]

    def log(line: str) -> None:
        print(line, flush=True)
        with open(out / "logs" / "evidence.log", "a") as fh:
            fh.write(line + "\n")

    log(f"{'CPU dry run' if config.dry_run else 'GPU evidence'} on {environment['device_name']} -> {out}")
    complete = run_parts(config, out, start + args.budget - RESERVE_S, log)
    summary = write_summary(config, out, environment, started, complete)
    log(f"summary: {summary} ({time.monotonic() - start:.0f} s)")
    if os.environ.get("OUT"):
        for path in pack(out, Path(os.environ["OUT"])):
            log(f"packed: {path}")
    return 0 if complete else 130


if __name__ == "__main__":
    sys.exit(main())

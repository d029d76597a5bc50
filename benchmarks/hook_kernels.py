"""Count the work the optimizer-step hooks (SGS) launch per training step, with torch.profiler.

:func:`count_hook_work` works for any optimizer and device: it labels every step pre/post hook
registered on the optimizer with a ``record_function`` range for the duration of the
measurement, profiles a few training steps, and counts what ran inside those ranges:

- ``kernels``: device kernels (CUDA: kernels, memcpy and memset) launched from inside the hooks;
- ``ops``: the aten operators the hooks called (top level: one ``aten::_foreach_mul_`` is one op);
- ``leaf_ops``: aten operators that call no other aten operator (on CPU, where nothing is a
  kernel, this shows whether a foreach op ran as one fused op or as a loop over tensors).

The same counts for the whole ``optimizer.step`` (hooks included) give the reference. A foreach
op on CUDA launches about one kernel per ~100 tensors on its fast path and at least one per
tensor when it falls back (e.g. for inputs it cannot fuse, such as stride-0 expanded masks), so
``kernels >= masked parameters`` in a hook says the fast path was not taken.

``python -m benchmarks.hook_kernels --device cuda --model torchvision:resnet18 --out DIR``
writes ``hook_kernels.json`` and ``hook_kernels.md`` for ``sgs-grad`` and ``sgs-update``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.autograd import DeviceType

from benchmarks import measure, variants
from benchmarks.report import table_text
from reparam.convert import load_model

HOOK_RANGE = "reparam.bench::step_hook"
STEP_RANGE = "Optimizer.step#"  # torch's own range around optimizer.step (hooks included)


@dataclass
class HookWork:
    """Per optimizer step: what the hooks, and the whole ``optimizer.step``, ran."""

    device: str
    steps: int  # profiled optimizer steps
    hooks: int  # step pre/post hooks labelled
    kernels: float
    ops: float
    leaf_ops: float
    step_kernels: float
    step_ops: float
    op_names: dict[str, float] = field(default_factory=dict)  # top-level aten op -> calls per step


def _labelled(hook: Callable, name: str) -> Callable:
    def labelled(*args, **kwargs):
        with torch.profiler.record_function(name):
            return hook(*args, **kwargs)

    return labelled


@contextlib.contextmanager
def labelled_step_hooks(optimizer: torch.optim.Optimizer) -> Iterator[int]:
    """Wrap every step pre/post hook registered on ``optimizer`` in a ``record_function``
    range named :data:`HOOK_RANGE` while the block runs; yields how many were wrapped, and
    puts the original hooks back on exit (hooks removed meanwhile stay removed)."""
    saved = []
    for kind, hooks in (("pre", optimizer._optimizer_step_pre_hooks), ("post", optimizer._optimizer_step_post_hooks)):
        for key, hook in list(hooks.items()):
            saved.append((hooks, key, hook))
            hooks[key] = _labelled(hook, f"{HOOK_RANGE}:{kind}")
    try:
        yield len(saved)
    finally:
        for hooks, key, hook in saved:
            if key in hooks:
                hooks[key] = hook


def _is_op(event) -> bool:
    return event.name.startswith("aten::")


def _tally(event, found: Counter, names: Counter, inside_op: bool = False) -> None:
    """Kernels, top-level and leaf aten ops below ``event`` (itself included)."""
    found["kernels"] += len(event.kernels)
    is_op = _is_op(event)
    if is_op and not inside_op:
        found["ops"] += 1
        names[event.name] += 1
    if is_op and not any(_is_op(c) for c in event.cpu_children):
        found["leaf_ops"] += 1
    for child in event.cpu_children:
        _tally(child, found, names, inside_op or is_op)


def summarize_profile(events, device: str, hooks: int) -> HookWork:
    """:class:`HookWork` from profiler ``events`` (``prof.events()``), per optimizer step."""
    hook, step, names = Counter(), Counter(), Counter()
    steps = 0
    for event in events:
        if event.device_type != DeviceType.CPU:
            continue
        if event.name.startswith(HOOK_RANGE):
            _tally(event, hook, names)
        elif event.name.startswith(STEP_RANGE):
            steps += 1
            _tally(event, step, Counter())
    per = max(steps, 1)
    return HookWork(device, steps, hooks, hook["kernels"] / per, hook["ops"] / per, hook["leaf_ops"] / per,
                    step["kernels"] / per, step["ops"] / per, {k: v / per for k, v in names.most_common(12)})


def count_hook_work(optimizer: torch.optim.Optimizer, step: Callable[[], None], device: torch.device,
                    steps: int = 3, warmup: int = 2) -> HookWork:
    """Run ``warmup`` training steps (``step()`` calls ``optimizer.step``), then profile ``steps``
    more and count what the optimizer's step hooks launched, per step."""
    for _ in range(warmup):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with labelled_step_hooks(optimizer) as hooks, torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return summarize_profile(prof.events(), str(device), hooks)


def measure_variant(spec: str, variant: str, device: torch.device, image_size: int, batch_size: int,
                    amp: str | None = None, steps: int = 3) -> dict:
    """Build ``variant`` of model ``spec`` and count its hooks' work; a flat dict for the tables."""
    torch.manual_seed(0)
    built = variants.build_variant(variant, lambda: load_model(spec), device)
    cfg = measure.StepConfig(device, torch.float32, amp)
    images, _ = measure.make_batch(batch_size, image_size, 1, cfg)
    images, labels = measure.make_batch(batch_size, image_size, measure.output_width(built.model, images), cfg)
    try:
        work = count_hook_work(built.optimizer, measure.make_step(built.model, built.optimizer, images, labels, cfg),
                               device, steps)
    finally:
        if built.handle is not None:
            built.handle.remove()
    masked = built.info["masked_params"]
    row = {"model": spec, "variant": variant, "amp": amp or "none", "masked_params": masked, **asdict(work)}
    row["fast_path"] = None if device.type != "cuda" or not masked else bool(work.kernels < masked)
    return row


def _markdown(rows: list[dict], meta: dict) -> str:
    cols = ("model", "variant", "amp", "masked_params", "hooks", "steps", "kernels", "ops", "leaf_ops",
            "step_kernels", "step_ops", "fast_path")
    lines = [f"# Work launched by the SGS optimizer-step hooks ({meta['device_name']})", "",
             f"Measured {meta['date_utc']} with torch {meta['torch']} on `{meta['device']}`; counts are per optimizer "
             "step. `kernels`: device kernels launched inside the hooks (0 on CPU); `ops`: top-level aten ops; "
             "`leaf_ops`: aten ops calling no other; `step_*`: the whole `optimizer.step`, hooks included; "
             "`fast_path`: CUDA only, fewer hook kernels than masked parameters (foreach fused them).", "",
             table_text(rows, cols, fmt="github"), "", "Top-level ops in the hooks:", ""]
    lines += [f"- {r['variant']}: " + ", ".join(f"{k} x{v:g}" for k, v in r["op_names"].items()) for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, echo: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hook_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="fp32 and/or bf16 autocast (default: both)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure_variant(args.model, v, device, args.image_size, args.batch_size, amp, args.steps)
            for amp in [{"fp32": None, "bf16": "bf16"}[p] for p in args.precisions] for v in variants.SGS_VARIANTS]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = {"device": str(device), "device_name": name, "torch": torch.__version__,
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hook_kernels.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "hook_kernels.md").write_text(_markdown(rows, meta))
    echo(_markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

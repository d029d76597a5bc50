"""One refresh of the SGS paper's data-driven masks: this library's streaming statistic vs a faithful
re-implementation of the official path, on the same CPU, one thread each.

The official path (``official``): one forward of all batches concatenated **with autograd on**, a hook
storing every qualifying conv's zero-padded input on the CPU, then per layer, channel and displacement
a C 2-D histogram (``fast_histogram``, as the official code; NumPy's bincount if it is not installed,
recorded in the results) - :func:`verification.mi_reference.reference_dependence`. Ours
(``streaming``): :func:`reparam.sgs.masks_from_data`. Each (model, batches, size, side) runs in a
fresh process, so that peak memory (RSS above the process's baseline) is its own.

Also, on the official side's stored maps: :func:`reparam.sgs.spatial_dependence` per layer vs the
official per-layer computation, time and max |dS|, |dG| (the "statistic" columns).

    python -m benchmarks.mi_refresh --configs resnet18:2:32,vgg16_bn:2:32 --out benchmarks/results/mi-cpu-DATE
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CONFIGS = "resnet18:2:32,vgg16_bn:2:32,resnet18:20:32,vgg16_bn:20:32,resnet18:2:64,vgg16_bn:2:64"
BATCH = 128


def natural_batches(n: int, size: int, batch: int = BATCH, seed: int = 0) -> list[torch.Tensor]:
    """Random crops (random flips) of the photographs scikit-image ships, CIFAR-normalised."""
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), np.stack([skdata.camera()] * 3, -1)]
    rng = np.random.default_rng(seed)
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.247, 0.243, 0.261])
    out = []
    for _ in range(n):
        crops = []
        for _ in range(batch):
            img = photos[rng.integers(len(photos))]
            y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
            crop = img[y:y + size, x:x + size] / 255.0
            crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
        arr = ((np.stack(crops) - mean) / std).transpose(0, 3, 1, 2)
        out.append(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
    return out


def build(model_name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, model_name)(num_classes=10)


def histogram_backend():
    try:
        from fast_histogram import histogram2d
    except ImportError:
        return None, "numpy-bincount"
    return (lambda x, y, rx, ry, b: histogram2d(x, y, range=[rx, ry], bins=b)), "fast_histogram"


def official_refresh(model: nn.Module, batches: list[torch.Tensor], histogram) -> tuple[dict, dict, float]:
    """The official path: stored padded maps (autograd on), then the per-layer NumPy/C computation.
    Returns (G by name, stored maps by name, seconds of the MI part)."""
    from reparam.sgs.streaming import qualifying_convs
    from verification.mi_reference import reference_dependence, reference_scaling

    maps: dict[str, torch.Tensor] = {}
    handles = []
    for name, convs in qualifying_convs(model).items():
        conv = convs[0]

        def hook(module, inputs, _out, name=name):
            p = module.padding
            maps[name] = F.pad(inputs[0], (p[0], p[0], p[1], p[1])).detach().cpu()  # official: square padding only

        handles.append(conv.register_forward_hook(hook))
    model.eval()
    model(torch.cat(batches))  # autograd on, as the official code
    for h in handles:
        h.remove()
    start = time.perf_counter()
    G = {}
    for name, fmap in maps.items():
        kernel = tuple(qualifying_convs(model)[name][0].kernel_size)
        G[name] = reference_scaling(reference_dependence(fmap.numpy(), kernel, histogram=histogram))
    return G, maps, time.perf_counter() - start


def run_one(model_name: str, n: int, size: int, side: str) -> dict:
    """One measurement in this process (called in a fresh subprocess by :func:`main`)."""
    from benchmarks.measure import MemoryMeter
    from reparam.sgs import masks_from_data, scaling_from_dependence, spatial_dependence

    torch.set_num_threads(1)
    model, batches = build(model_name), natural_batches(n, size)
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    row: dict = {"model": model_name, "batches": n, "batch_size": BATCH, "image_size": size, "side": side}
    start = time.perf_counter()
    if side == "official":
        histogram, row["histogram"] = histogram_backend()
        G, maps, row["mi_s"] = official_refresh(model, batches, histogram)
    else:
        G = masks_from_data(model, batches)
    row["refresh_s"] = time.perf_counter() - start
    row["peak_gb"] = (meter.peak_bytes() or 0) / 1e9
    row["layers"] = len(G)
    if side == "official":  # the statistic alone, on the same maps
        start = time.perf_counter()
        ours = {name: spatial_dependence(fmap, G[name].shape) for name, fmap in maps.items()}
        row["statistic_s"] = time.perf_counter() - start
        row["max_abs_dG"] = max(float(np.abs(scaling_from_dependence(S).numpy() - G[name]).max())
                                for name, S in ours.items())
    return row


def _subprocess(model_name: str, n: int, size: int, side: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.mi_refresh", "--one", f"{model_name}:{n}:{size}:{side}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"model": model_name, "batches": n, "image_size": size, "side": side, "error": f"timeout {timeout:.0f}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        return {"model": model_name, "batches": n, "image_size": size, "side": side, "error": tail[0][:200]}
    return json.loads(lines[-1])


def table(rows: list[dict]):
    """One row per (model, batches, size): both sides side by side, with the ratios."""
    import pandas as pd

    df = pd.DataFrame(rows)
    keys = ["model", "batches", "image_size"]
    off = df[df.side == "official"].set_index(keys)
    ours = df[df.side == "streaming"].set_index(keys)
    out = pd.DataFrame(index=off.index.union(ours.index))
    for col, src, name in [("refresh_s", off, "official_refresh_s"), ("mi_s", off, "official_mi_s"),
                           ("statistic_s", off, "ours_statistic_s"), ("refresh_s", ours, "ours_refresh_s"),
                           ("peak_gb", off, "official_peak_gb"), ("peak_gb", ours, "ours_peak_gb"),
                           ("max_abs_dG", off, "max_abs_dG"), ("histogram", off, "official_histogram")]:
        if col in src:
            out[name] = src[col]
    if {"official_mi_s", "ours_statistic_s"} <= set(out):
        out["statistic_speedup"] = out.official_mi_s / out.ours_statistic_s
    if {"official_refresh_s", "ours_refresh_s"} <= set(out):
        out["refresh_speedup"] = out.official_refresh_s / out.ours_refresh_s
    return out.reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="model:batches:image_size[:side], comma-separated (side: official or streaming; default both)")
    parser.add_argument("--sides", default="official,streaming")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.csv / results.md / environment.json")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        model_name, n, size, side = args.one.split(":")
        print(json.dumps(run_one(model_name, int(n), int(size), side)))
        return 0
    from tqdm.auto import tqdm

    from benchmarks.environment import collect

    env = collect(torch.device("cpu"), {"threads": 1, "batch_size": BATCH, "configs": args.configs})
    jobs = []
    for config in args.configs.split(","):  # model:batches:size[:side]
        parts = config.split(":")
        for side in (parts[3:] or args.sides.split(",")):
            jobs.append((parts[0], int(parts[1]), int(parts[2]), side))
    rows = _previous(args.out, jobs) if args.out else []
    for job in tqdm(jobs, desc="mi refresh"):
        rows.append(_subprocess(*job, timeout=args.timeout))
        tqdm.write(json.dumps(rows[-1]))
        if args.out:
            _write(rows, env, args.out)
    print(table(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


def _previous(out: Path, jobs: list[tuple]) -> list[dict]:
    """Rows already in ``out/raw.csv`` that this run does not re-measure (runs add up)."""
    import pandas as pd

    if not (out / "raw.csv").exists():
        return []
    old = pd.read_csv(out / "raw.csv").to_dict("records")
    again = {(m, n, size, side) for m, n, size, side in jobs}
    return [{k: v for k, v in r.items() if pd.notna(v)} for r in old
            if (r["model"], int(r["batches"]), int(r["image_size"]), r["side"]) not in again]


def _write(rows: list[dict], env: dict, out: Path) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "raw.csv", index=False)
    summary = table(rows)
    summary.to_csv(out / "results.csv", index=False)
    env = {**env, "load_avg_1m_end": round(__import__("os").getloadavg()[0], 2)}
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    md = ["# One MI refresh: streaming statistic vs the official path (CPU, one thread each)", "",
          f"Machine: {env['cpu']}, {env['cpu_count']} cores, {env['ram_gb']} GB; torch {env['torch']}; load average "
          f"{env['load_avg_1m']} at start, {env['load_avg_1m_end']} at the end (shared machine: absolute times are "
          "inflated, ratios are from the same moments).", "",
          summary.to_markdown(index=False, floatfmt=".3g"), ""]
    (out / "results.md").write_text("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())

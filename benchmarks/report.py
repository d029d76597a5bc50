"""Result tables (CSV, Markdown, JSON), the terminal table and the ratio bar chart."""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

# The schema of every row (CSV column order). See docs/bench.md for their meaning.
COLUMNS = (
    "model",
    "image_size",
    "batch_size",
    "variant",
    "status",
    "median_ms",
    "iqr_ms",
    "p25_ms",
    "p75_ms",
    "min_ms",
    "images_per_s",
    "time_ratio",
    "cpu_median_ms",
    "cpu_time_ratio",
    "peak_mem_mb",
    "mem_ratio",
    "mem_kind",
    "params",
    "params_ratio",
    "trainable_params",
    "blocks",
    "masked_params",
    "sgs_state_mb",
    "steps",
    "skipped_steps",
    "warmup",
    "device",
    "dtype",
    "amp",
    "channels_last",
    "compile",
    "compiled_graphs",
    "isolated",
    "error",
)
TERMINAL_COLUMNS = (
    "model", "image_size", "batch_size", "variant", "status", "median_ms", "iqr_ms",
    "images_per_s", "time_ratio", "cpu_time_ratio", "peak_mem_mb", "mem_ratio", "params",
)
FILES = {"csv": "results.csv", "md": "results.md", "json": "results.json", "png": "ratios.png"}


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def add_ratios(rows: list[dict]) -> None:
    """``time_ratio``, ``cpu_time_ratio``, ``mem_ratio``, ``params_ratio``: each row over ``plain`` of the
    same model, image size and batch size in this run (None when either is missing)."""
    plain = {(r["model"], r["image_size"], r["batch_size"]): r for r in rows if r["variant"] == "plain"}
    for row in rows:
        ref = plain.get((row["model"], row["image_size"], row["batch_size"]))
        for col, src in (("time_ratio", "median_ms"), ("cpu_time_ratio", "cpu_median_ms"),
                         ("mem_ratio", "peak_mem_mb"), ("params_ratio", "params")):
            a = row.get(src)
            b = ref.get(src) if ref is not None and ref.get("status") == "ok" and row.get("status") == "ok" else None
            row[col] = a / b if _ok(a) and _ok(b) and b > 0 else None


def normalize(row: dict) -> dict:
    return {c: row.get(c) for c in COLUMNS}


def _fmt(value, col: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if col.endswith("ratio"):
            return f"{value:.3f}"
        if col in ("images_per_s", "peak_mem_mb", "sgs_state_mb"):
            return f"{value:.1f}"
        return f"{value:.2f}"
    if col in ("params", "trainable_params") and isinstance(value, int):
        return f"{value / 1e6:.2f}M"
    return str(value)


def table_text(rows: Iterable[dict], columns: Iterable[str] = TERMINAL_COLUMNS, fmt: str = "simple") -> str:
    from tabulate import tabulate

    cols = list(columns)
    body = [[_fmt(r.get(c), c) for c in cols] for r in rows]
    return tabulate(body, headers=cols, tablefmt=fmt, disable_numparse=True)


def write_tables(rows: list[dict], environment: dict, out_dir: Path) -> dict[str, Path]:
    """Write CSV, Markdown and JSON (rows + environment); returns their paths."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [normalize(r) for r in rows]
    paths = {k: out_dir / FILES[k] for k in ("csv", "md", "json")}
    tmp = paths["csv"].with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    tmp.replace(paths["csv"])

    env_lines = [f"- **{k}**: {v}" for k, v in environment.items() if k != "flags"]
    flags = environment.get("flags", {})
    md = [
        f"# Training-cost benchmark ({environment.get('device_type', '?').upper()}: {environment.get('device_name', '?')})",
        "",
        "One full training step (forward, loss, backward, optimizer step incl. SGS hooks).",
        "Ratios are each row over `plain` of the same model and input size, same run.",
        "",
        table_text(rows, columns=TERMINAL_COLUMNS + ("sgs_state_mb", "mem_kind"), fmt="github"),
        "",
        "## Environment",
        "",
        *env_lines,
        f"- **flags**: `{json.dumps(flags, sort_keys=True)}`",
        "",
    ]
    paths["md"].write_text("\n".join(md))
    payload = {"environment": environment, "columns": list(COLUMNS), "rows": rows}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str, allow_nan=True))
    tmp.replace(paths["json"])
    return paths


def plot_ratios(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Bar chart: time and memory ratio to plain per variant, one panel per model/size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["image_size"], r["batch_size"]), []).append(r)
    if not groups:
        return None
    n = len(groups)
    fig, axes = plt.subplots(n, 1, figsize=(max(6.0, 0.75 * max(len(g) for g in groups.values()) + 2), 3.2 * n), squeeze=False)
    for ax, ((model, size, batch), group) in zip(axes[:, 0], groups.items()):
        names = [r["variant"] for r in group]
        x = list(range(len(names)))
        series = [("time_ratio", "wall time / plain"), ("cpu_time_ratio", "CPU time / plain"),
                  ("mem_ratio", "peak memory / plain")]
        series = [(c, label) for c, label in series if any(_ok(r.get(c)) for r in group)]
        width = 0.8 / max(1, len(series))
        for k, (col, label) in enumerate(series):
            values = [r.get(col) if _ok(r.get(col)) else 0.0 for r in group]
            offset = (k - (len(series) - 1) / 2) * width
            ax.bar([i + offset for i in x], values, width=width, label=label)
        for i, r in enumerate(group):
            if r.get("status") != "ok":
                ax.text(i, 0.05, str(r.get("status")), rotation=90, ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ratio to plain")
        ax.set_title(f"{model}  {size}x{size}  batch {batch}", fontsize=10)
        if series:
            ax.legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

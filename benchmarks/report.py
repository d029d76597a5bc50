"""Result tables (CSV, Markdown, JSON), the terminal table and the ratio bar chart."""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchmarks.row import COLUMNS, Row

TERMINAL_COLUMNS = (
    "model", "image_size", "batch_size", "variant", "status", "median_ms", "iqr_ms",
    "images_per_s", "time_ratio", "cpu_time_ratio", "peak_mem_mb", "mem_ratio", "params",
)
FILES = {"csv": "results.csv", "md": "results.md", "json": "results.json", "png": "ratios.png"}
NOISY_IQR_FRACTION = 0.25  # a timing whose inter-quartile range exceeds this fraction of its median is flagged


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def add_ratios(rows: list[Row]) -> None:
    """``time_ratio``, ``cpu_time_ratio``, ``mem_ratio``, ``params_ratio``: each row over ``plain`` of the
    same model, image size and batch size in this run (None when either is missing)."""
    plain = {r.key: r for r in rows if r.variant == "plain"}
    for row in rows:
        ref = plain.get(row.key)
        usable = ref is not None and ref.ok and row.ok
        for col, src in (("time_ratio", "median_ms"), ("cpu_time_ratio", "cpu_median_ms"),
                         ("mem_ratio", "peak_mem_mb"), ("params_ratio", "params")):
            a, b = getattr(row, src), getattr(ref, src) if usable else None
            setattr(row, col, a / b if _ok(a) and _ok(b) and b > 0 else None)


def row_warnings(row: Row, cores: int) -> list[str]:
    """Why ``row``'s timing may not be trusted: an IQR above :data:`NOISY_IQR_FRACTION` of the
    median, or a 1-minute load average above the usable cores when the row finished."""
    found = []
    if row.ok and _ok(row.iqr_ms) and _ok(row.median_ms) and row.iqr_ms > NOISY_IQR_FRACTION * row.median_ms > 0:
        found.append(f"noisy: IQR {row.iqr_ms / row.median_ms:.0%} of median > {NOISY_IQR_FRACTION:.0%}")
    if _ok(row.load_avg_1m) and row.load_avg_1m > cores:
        found.append(f"busy: load {row.load_avg_1m:.1f} > {cores} cores")
    return found


def run_warnings(rows: Sequence[Row], environment: dict) -> list[str]:
    """The warnings of a whole run, for the terminal, ``results.md`` and ``results.json``."""
    cores = environment.get("usable_cores") or environment.get("cpu_count") or 1
    found = []
    load = environment.get("load_avg_1m")
    if _ok(load) and load > cores:
        found.append(f"busy machine: load average {load:.1f} at the start, above the {cores} usable cores; "
                     "other work competes for the CPU, so times and ratios are unreliable (rerun on an idle machine)")
    busy = [r.variant for r in rows if _ok(r.load_avg_1m) and r.load_avg_1m > cores]
    if busy:
        found.append(f"{len(busy)} of {len(rows)} rows finished with the load average above {cores} cores")
    noisy = [f"{r.model}/{r.image_size}px/{r.variant}" for r in rows if r.warning and "noisy" in r.warning]
    if noisy:
        shown = ", ".join(noisy[:6]) + (", ..." if len(noisy) > 6 else "")
        found.append(f"{len(noisy)} of {len(rows)} rows have an IQR above {NOISY_IQR_FRACTION:.0%} of their median "
                     f"({shown}): their ratios are not trustworthy")
    return found


def format_count(n: int) -> str:
    """``11689512 -> '11.69M'``, ``3914 -> '3.914k'``: four significant digits, never ``0.00M``."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)


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
        return format_count(value)
    return str(value)


def _cell(row, col: str):
    return row.get(col) if isinstance(row, dict) else getattr(row, col)


def _plain_table(body: list[list[str]], headers: list[str]) -> str:
    """A GitHub-style table without tabulate (a bare GPU machine may lack it)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def table_text(rows: Iterable, columns: Iterable[str] = TERMINAL_COLUMNS, fmt: str = "simple") -> str:
    """``rows`` (:class:`Row` objects or dicts) as a text table of ``columns``."""
    cols = list(columns)
    body = [[_fmt(_cell(r, c), c) for c in cols] for r in rows]
    try:
        from tabulate import tabulate
    except ImportError:
        return _plain_table(body, cols)
    return tabulate(body, headers=cols, tablefmt=fmt, disable_numparse=True)


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _csv_text(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})
    return buffer.getvalue()


def _markdown(rows: Sequence[Row], environment: dict, warnings: list[str]) -> str:
    env_lines = [f"- **{k}**: {v}" for k, v in environment.items() if k != "flags"]
    flags = environment.get("flags", {})
    device = f"{environment.get('device_type', '?').upper()}: {environment.get('device_name', '?')}"
    warning_lines = ["## Warnings", "", *(f"- **WARNING**: {w}" for w in warnings), ""] if warnings else []
    return "\n".join([
        f"# Training-cost benchmark ({device})",
        "",
        *warning_lines,
        "One full training step (forward, loss, backward, optimizer step incl. SGS hooks).",
        "Ratios are each row over `plain` of the same model and input size, same run.",
        f"A row is flagged `noisy` when its IQR exceeds {NOISY_IQR_FRACTION:.0%} of its median, "
        "`busy` when the load average exceeded the usable cores.",
        "",
        table_text(rows, columns=TERMINAL_COLUMNS + ("sgs_state_mb", "mem_kind", "warning"), fmt="github"),
        "",
        "## Environment",
        "",
        *env_lines,
        f"- **flags**: `{json.dumps(flags, sort_keys=True)}`",
        "",
    ])


def write_tables(rows: Sequence[Row], environment: dict, out_dir: Path) -> dict[str, Path]:
    """Write CSV, Markdown and JSON (rows, environment, warnings); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / FILES[k] for k in ("csv", "md", "json")}
    warnings = run_warnings(rows, environment)
    _replace(paths["csv"], _csv_text(rows))
    _replace(paths["md"], _markdown(rows, environment, warnings))
    payload = {"environment": environment, "warnings": warnings, "columns": list(COLUMNS),
               "rows": [r.to_dict() for r in rows]}
    _replace(paths["json"], json.dumps(payload, indent=2, default=str, allow_nan=True))
    return paths


_SERIES = (("time_ratio", "wall time / plain (bar: IQR)"), ("cpu_time_ratio", "CPU time / plain"),
           ("mem_ratio", "peak memory / plain"))


def _time_ratio_iqr(row: Row) -> tuple[float, float]:
    """The row's quartiles as an error bar on its time ratio (the plain row's spread not included)."""
    if not (row.ok and _ok(row.time_ratio) and _ok(row.p25_ms) and _ok(row.p75_ms) and row.time_ratio > 0):
        return 0.0, 0.0
    plain_median = row.median_ms / row.time_ratio
    return (row.median_ms - row.p25_ms) / plain_median, (row.p75_ms - row.median_ms) / plain_median


def _panel(ax, group: list[Row], title: str) -> None:
    x = list(range(len(group)))
    series = [(c, label) for c, label in _SERIES if any(_ok(getattr(r, c)) for r in group)]
    width = 0.8 / max(1, len(series))
    for k, (col, label) in enumerate(series):
        values = [getattr(r, col) if _ok(getattr(r, col)) else 0.0 for r in group]
        offset = (k - (len(series) - 1) / 2) * width
        yerr = None
        if col == "time_ratio":
            low, high = zip(*(_time_ratio_iqr(r) for r in group))
            yerr = [list(low), list(high)]
        ax.bar([i + offset for i in x], values, width=width, label=label, yerr=yerr, capsize=2,
               error_kw={"linewidth": 0.8})
    for i, r in enumerate(group):
        if not r.ok:
            ax.text(i, 0.05, r.status, rotation=90, ha="center", va="bottom", fontsize=8)
        elif r.warning:
            flags = ", ".join(w.split(":")[0] for w in r.warning.split("; "))
            ax.text(i, 0.05, f"! {flags}", rotation=90, ha="center", va="bottom", fontsize=8, color="red",
                    fontweight="bold")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([r.variant for r in group], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ratio to plain")
    ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=8, loc="upper left")


def plot_ratios(rows: Sequence[Row], path: Path, title: str = "", warnings: Sequence[str] = ()) -> Path | None:
    """Bar chart: time (with IQR error bars), CPU time and memory ratio to plain per variant, one
    panel per model/size; red text marks a row with a warning (``! noisy``), a red heading a run warning.
    None when there is nothing to plot or matplotlib is not installed (the tables still are)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.key, []).append(r)
    if not groups:
        return None
    width = max(6.0, 0.75 * max(len(g) for g in groups.values()) + 2)
    fig, axes = plt.subplots(len(groups), 1, figsize=(width, 3.2 * len(groups) + 0.4 * bool(warnings)),
                             squeeze=False)
    for ax, ((model, size, batch), group) in zip(axes[:, 0], groups.items()):
        _panel(ax, group, f"{model}  {size}x{size}  batch {batch}")
    heading = [title] if title else []
    if warnings:
        heading.append(f"WARNING ({len(warnings)}, see results.md): {warnings[0].split(';')[0][:90]}")
    if heading:
        fig.suptitle("\n".join(heading), fontsize=9, color="red" if warnings else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

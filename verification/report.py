"""Writing verification reports: CSV, Markdown and JSON tables and a deviation-vs-step figure."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from verification.schema import SUMMARY_COLUMNS  # noqa: E402, F401 (re-exported)
from verification.verdicts import DIVERGENCE_FLOOR, EXACT_TOL  # noqa: E402

VERDICT_COLOURS = {"exact": "tab:green", "approximate": "tab:orange", "diverges": "tab:red", "inconclusive": "tab:purple"}
#: what each section's deviation is measured against (y-axis label)
REFERENCE_TRAINING = {"sgs": "branched training", "pgt": "surrogate training"}


def write_tables(
    summary: pd.DataFrame, out_dir: Path, stem: str = "verify", metadata: dict | None = None, note: str = ""
) -> list[Path]:
    """``<stem>.csv``, ``<stem>.md`` and ``<stem>.json`` (records plus metadata); ``note``
    (e.g. that the run was interrupted) heads the Markdown file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.csv", out_dir / f"{stem}.md", out_dir / f"{stem}.json"]
    summary.to_csv(paths[0], index=False)
    head = f"**{note}**\n\n" if note else ""
    paths[1].write_text(head + summary.to_markdown(index=False, floatfmt=".2e") + "\n")
    payload = {"metadata": metadata or {}, "cases": json.loads(summary.to_json(orient="records"))}
    paths[2].write_text(json.dumps(payload, indent=2) + "\n")
    return paths


def plot_deviation(summary: pd.DataFrame, curves: pd.DataFrame, path: Path, dtype=None) -> Path:
    """One panel per section: relative deviation of each case vs step (log scale), coloured by
    the verdict theory expects; exact cases hug machine epsilon, negative controls sit far above.
    Non-finite deviations (NaN/inf) are drawn as triangles clipped at the top of the axis."""
    sections = list(dict.fromkeys(summary.section))
    fig, axes = plt.subplots(1, len(sections), figsize=(6.5 * len(sections), 4.5), squeeze=False)
    expected = dict(zip(summary.case, summary.expected))
    for ax, section in zip(axes[0], sections):
        part = curves[curves.section == section]
        if "side" in part:
            part = part[part.side.fillna("sgs") == "sgs"]
        non_finite = []
        for case, frame in part.groupby("case", sort=False):
            colour = VERDICT_COLOURS.get(expected.get(case), "grey")
            ax.plot(frame.step, frame.rel_dev.clip(lower=1e-17), color=colour, alpha=0.35, linewidth=0.9)
            bad = ~frame.rel_dev.map(math.isfinite)
            non_finite += [(step, colour) for step in frame.step[bad]]
        if dtype is not None:
            ax.axhline(EXACT_TOL[dtype], color="black", linestyle="--", linewidth=0.8, label="exact tolerance")
            ax.axhline(DIVERGENCE_FLOOR[dtype], color="black", linestyle=":", linewidth=0.8, label="divergence floor")
        for verdict, colour in VERDICT_COLOURS.items():
            if verdict in set(summary[summary.section == section].expected):
                ax.plot([], [], color=colour, label=f"expected {verdict}")
        ax.set_yscale("log")
        if non_finite:
            top = ax.get_ylim()[1]
            steps, colours = zip(*non_finite)
            ax.scatter(steps, [top] * len(steps), c=list(colours), marker="^", s=28, clip_on=False, zorder=3,
                       label="non-finite (NaN/inf), clipped")
            ax.set_ylim(top=top)
        ax.set_xlabel("step")
        ax.set_ylabel(f"max relative deviation from {REFERENCE_TRAINING.get(section, 'reference training')}")
        ax.set_title(f"{section}: {len(summary[summary.section == section])} cases")
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def verdict_grid(summary: pd.DataFrame) -> pd.DataFrame:
    """A compact view of the SGS section: optimizer rows, block/bn/mode columns, observed
    verdict initials (E exact, A approximate, D diverges, ? inconclusive), ``!`` on a mismatch."""
    sgs = summary[summary.section == "sgs"].copy()
    if sgs.empty:
        return sgs
    sgs["cell"] = sgs.observed.str[0].str.upper().replace({"I": "?"}) + sgs.match.map({True: "", False: "!"})
    sgs["column"] = sgs.block + "/" + sgs.bn + "/" + sgs.applied
    return sgs.pivot(index="optimizer", columns="column", values="cell").reindex(list(dict.fromkeys(sgs.optimizer)))


#: what the columns of :func:`terminal_summary` mean (printed under it)
LEGEND = (
    "exact / approx / diverges / ?: observed verdicts (? = inconclusive, never a match); "
    "ok: observed == expected.",
    "worst exact: largest max relative deviation of a case expected exact (tolerance {tol:.0e}); "
    "least control: smallest deviation of a case expected approximate/diverges (floor {floor:.0e}); "
    "least moved: smallest relative movement from the start of an exact case (needs >= {moved:.0e}).",
)


def _group_key(summary: pd.DataFrame) -> pd.Series:
    """``block/bn`` for SGS cases, the section's name for the others."""
    if "block" not in summary:
        return summary.section
    sgs = summary.section == "sgs"
    return summary.section.where(~sgs, summary.block.astype(str) + "/" + summary.bn.astype(str))


def _counts(part: pd.DataFrame) -> dict:
    exact, controls = part[part.expected == "exact"], part[part.expected != "exact"]
    observed = part.observed.value_counts()
    return {
        "cases": len(part), "exact": observed.get("exact", 0), "approx": observed.get("approximate", 0),
        "diverges": observed.get("diverges", 0), "?": observed.get("inconclusive", 0),
        "ok": f"{int(part.match.sum())}/{len(part)}",
        "worst exact": exact.max_rel_dev.max() if len(exact) else float("nan"),
        "least control": controls.max_rel_dev.min() if len(controls) else float("nan"),
        "least moved": exact.moved_rel.min() if len(exact) else float("nan"),
    }


def terminal_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per SGS block x BN placement (and per other section): verdict counts, how many
    matched, the worst exact-case deviation, the least negative-control deviation and the least
    movement of an exact case. About 95 characters wide; the full grid is in the report files."""
    keys = _group_key(summary)
    rows = {key: _counts(part) for key, part in summary.groupby(keys, sort=False)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("group")


def format_terminal_summary(summary: pd.DataFrame, dtype) -> str:
    """:func:`terminal_summary` as text, with its legend (thresholds of ``dtype``)."""
    from verification.tolerances import min_movement

    table = terminal_summary(summary).reset_index().to_string(index=False, float_format=lambda v: f"{v:.1e}", na_rep="-")
    legend = [line.format(tol=EXACT_TOL[dtype], floor=DIVERGENCE_FLOOR[dtype], moved=min_movement(dtype))
              for line in LEGEND]
    return table + "\n" + "\n".join(textwrap.fill(line, 100) for line in legend)

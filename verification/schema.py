"""Column sets every verification section's frames share (one home for the report schema).

``moved_abs`` / ``moved_rel``: how far the compared sides moved from their start (the one that
moved less), the evidence that an ``exact`` verdict is not vacuous."""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

SUMMARY_COLUMNS = [
    "section", "case", "expected", "observed", "max_abs_dev", "max_rel_dev", "moved_abs", "moved_rel", "match", "detail",
]
CURVE_COLUMNS = ["section", "case", "step", "rel_dev"]


def frames(results: Iterable[tuple[dict, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(summary, curves)`` of ``(row, curve)`` pairs (empty frames with the shared columns for none)."""
    rows, curves = [], []
    for row, curve in results:
        rows.append(row)
        curves.append(curve)
    summary = pd.DataFrame(rows) if rows else pd.DataFrame(columns=SUMMARY_COLUMNS)
    return summary, pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=CURVE_COLUMNS)

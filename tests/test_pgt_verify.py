"""The PGT verification section: every verdict matches, the frames have the agreed shape."""
from __future__ import annotations

import math
import time

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from verification.pgt import CURVE_COLUMNS, SUMMARY_COLUMNS, reference_reconstruct_from_grad_hook, run_pgt_section
from verification.pgt.suite import QUICK_STEPS
from verification.tolerances import min_movement


@pytest.fixture(scope="module")
def full() -> tuple[pd.DataFrame, pd.DataFrame, float]:
    # CPU time of this process: robust to other jobs competing for the cores
    start = time.process_time()
    summary, curves = run_pgt_section()
    return summary, curves, time.process_time() - start


def test_all_verdicts_match(full):
    summary, _, _ = full
    bad = summary.loc[~summary["match"], ["case", "expected", "observed", "max_rel_dev"]]
    assert bad.empty, bad.to_string()
    assert set(summary["observed"]) == {"exact", "diverges"}


def test_frames_have_agreed_columns(full):
    summary, curves, _ = full
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(curves.columns) == CURVE_COLUMNS
    assert (summary["section"] == "pgt").all() and (curves["section"] == "pgt").all()
    assert summary["case"].is_unique
    assert summary["match"].dtype == bool
    assert len(curves) == 20 * len(summary)
    assert set(curves["step"]) == set(range(1, 21))


def test_exact_cases_are_exact_and_negatives_clearly_diverge(full):
    summary, _, _ = full
    exact = summary[summary["expected"] == "exact"]
    assert len(exact) >= 10
    assert (exact["max_rel_dev"] <= 1e-10).all()
    assert (exact["moved_rel"] >= min_movement(torch.float64)).all()  # exact and not vacuous
    negatives = summary[summary["expected"] == "diverges"]
    assert {"neg-pgt-a0.25-vs-ce", "neg-reference-hook-S1", "neg-reference-hook-S4B2"} <= set(negatives["case"])
    # double backward (gradient penalty) and explicit scale with ignored rows are exact
    assert {"loss-gradpenalty-a0.3", "logits-explicit-ignore-a0.3"} <= set(exact["case"])
    assert ((negatives["max_rel_dev"] > 1e-6) | ~negatives["max_rel_dev"].map(math.isfinite)).all()
    # the reference hook is right exactly at loss scale B**2 and NaN above it
    sanity = summary.set_index("case").loc["sanity-reference-hook-SB2"]
    assert sanity["observed"] == "exact"
    assert summary.set_index("case").loc["neg-reference-hook-S4B2", "max_rel_dev"] == math.inf


def test_section_runtime(full):
    _, _, seconds = full
    assert seconds <= 10.0
    start = time.process_time()
    summary, curves = run_pgt_section(quick=True)
    assert time.process_time() - start <= 3.0
    assert summary["match"].all()
    assert curves["step"].max() == QUICK_STEPS == 8  # what `reparam verify --quick` promises


def test_verify_cli_quick_help_matches_the_section():
    """`reparam verify --quick` says "8 steps per case"; the PGT section used to run 5."""
    import argparse

    from reparam.cli import verify as verify_cli

    parser = argparse.ArgumentParser()
    verify_cli.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["verify"]
    quick = next(a for a in sub._actions if "--quick" in a.option_strings)
    assert f"{QUICK_STEPS} steps" in quick.help


def test_plot_marks_non_finite_deviations_and_names_the_reference(tmp_path, monkeypatch):
    """The PGT panel's y-label names surrogate training (not "branched"), and the NaN/inf
    negative control is drawn, clipped at the top of the axis."""
    import matplotlib.pyplot as plt

    from verification import report

    figures, close = [], plt.close
    monkeypatch.setattr(report.plt, "close", lambda fig: figures.append(fig))
    summary, curves = run_pgt_section(steps=3)
    report.plot_deviation(summary, curves, tmp_path / "verify.png", torch.float64)
    (ax,) = figures[0].axes
    assert "surrogate" in ax.get_ylabel() and "branched" not in ax.get_ylabel()
    markers = [c for c in ax.collections if "non-finite" in str(c.get_label())]
    assert markers and len(markers[0].get_offsets()) == 3  # neg-reference-hook-S4B2: inf at every step
    top = ax.get_ylim()[1]
    assert all(y == top for _, y in markers[0].get_offsets())
    close(figures[0])


def test_float32_section_matches():
    summary, _ = run_pgt_section(steps=8, dtype=torch.float32)
    assert summary["match"].all(), summary.loc[~summary["match"]].to_string()


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        run_pgt_section(dtype=torch.float16)
    with pytest.raises(ValueError, match="steps"):
        run_pgt_section(steps=0)


def test_reference_hook_reconstruction_is_exact_only_at_scale_b_squared():
    torch.manual_seed(0)
    b, c, alpha = 4, 3, 0.5
    z0 = torch.randn(b, c, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    zz = z0.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(alpha * zz, y) / alpha, zz)
    for scale, ok in ((float(b * b), True), (1.0, False), (10.0, False)):
        z = z0.clone().requires_grad_()
        reference_reconstruct_from_grad_hook(z, y, alpha)
        (got,) = torch.autograd.grad(scale * F.cross_entropy(z, y), z)
        close = torch.allclose(got / scale, want, rtol=1e-12, atol=1e-15)
        assert close == ok, (scale, got / scale, want)


def test_a_pgt_case_that_does_not_move_is_inconclusive(monkeypatch):
    """lr = 0: both copies stay at the start, deviation 0; that is no evidence of exactness."""
    from verification.pgt import suite

    monkeypatch.setattr(suite, "_optimizer", lambda name, model: torch.optim.SGD(model.parameters(), lr=0.0))
    summary, _ = run_pgt_section(steps=2)
    exact = summary[summary["expected"] == "exact"]
    assert (exact["max_rel_dev"] == 0).all() and (exact["moved_rel"] == 0).all()
    assert (exact["observed"] == "inconclusive").all() and not exact["match"].any()

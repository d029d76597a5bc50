"""The default suite and the `reparam verify` command."""
import json

import pandas as pd
import pytest
import torch

from reparam.cli import main
from verification import suite as suite_module
from verification.suite import OPTIMIZERS, default_cases, run_sgs_section


def test_default_suite_every_verdict_as_expected():
    summary, curves = run_sgs_section(default_cases(), steps=8)
    assert len(summary) == 3 * 3 * len(OPTIMIZERS) * 2
    mismatches = summary[~summary.match]
    assert mismatches.empty, mismatches[["case", "expected", "observed", "max_rel_dev"]].to_string()
    exact = summary[summary.expected == "exact"]
    assert len(exact) > 0 and exact.max_rel_dev.max() < 1e-12
    negative = summary[summary.expected != "exact"]
    assert negative.max_rel_dev.min() > 1e-4
    # every case with a merged twin agrees with it to rounding
    merged = summary[summary.merged_observed != ""]
    assert (merged.merged_observed == "exact").all() and merged.merged_max_rel_dev.max() < 1e-12
    assert set(curves.columns) >= {"section", "case", "step", "rel_dev"}


def test_suite_notices_a_broken_transform(monkeypatch):
    """Negative control of the harness itself: if SGS silently did nothing, exact cases must fail."""
    import verification.engine as engine

    real = engine.attach_sgs

    def without_masks(optimizer, masks, **kwargs):
        return real(optimizer, {p: torch.ones(p.shape[-2:]) for p in masks}, **kwargs)

    monkeypatch.setattr(engine, "attach_sgs", without_masks)
    summary, _ = run_sgs_section(default_cases(["acb"], ["none"], ["sgd-momentum", "adam"]), steps=5)
    auto = summary[summary["mode"] == "auto"]
    assert (auto.observed == "diverges").all() and not auto.match.any()


def test_unknown_suite_names_are_rejected():
    with pytest.raises(ValueError, match="unknown optimizer"):
        default_cases(optimizers=["lion"])


def test_verify_cli_writes_reports(tmp_path, capsys):
    out = tmp_path / "reports"
    status = main(["verify", "--quick", "--sections", "sgs", "--blocks", "acb", "repvgg", "--bn", "none", "after",
                   "--optimizers", "sgd-nesterov-wd", "adamw", "--out", str(out)])
    assert status == 0
    for name in ("verify.csv", "verify.md", "verify.json", "verify.png"):
        assert (out / name).stat().st_size > 0
    frame = pd.read_csv(out / "verify.csv")
    assert len(frame) == 2 * 2 * 2 * 2 and frame.match.all()
    meta = json.loads((out / "verify.json").read_text())["metadata"]
    assert meta["mismatches"] == 0 and meta["steps"] == 8
    assert "0 mismatches" in capsys.readouterr().out


def test_verify_cli_exit_status_is_1_on_a_mismatch(tmp_path, monkeypatch):
    def wrong_expectation(*args, **kwargs):
        row, curves = real_run_case(*args, **kwargs)
        row["expected"], row["match"] = "exact", row["observed"] == "exact"
        return row, curves

    real_run_case = suite_module.run_case
    monkeypatch.setattr(suite_module, "run_case", wrong_expectation)
    status = main(["verify", "--quick", "--sections", "sgs", "--blocks", "acb", "--bn", "branch",
                   "--optimizers", "sgd", "--out", str(tmp_path)])
    assert status == 1

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
    auto = summary[summary.applied == "auto"]
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


def test_each_case_pair_runs_both_modes():
    """The deliberately wrong case applies the mode "auto" does not: for Adam with coupled decay
    (no exact mode, auto falls back to grad) that is the update-mode negative control."""
    cases = default_cases(["acb"], ["none"])
    summary, _ = run_sgs_section(cases, steps=4)
    for optimizer, rows in summary.groupby("optimizer"):
        assert sorted(rows.sgs_mode) == ["grad", "update"], optimizer
    coupled = summary[(summary.optimizer == "adam-coupled-wd") & (summary.sgs_mode == "update")]
    assert len(coupled) == 1 and coupled.expected.item() == coupled.observed.item() == "diverges"
    assert "coupled weight_decay" in coupled.detail.item()
    assert summary.match.all(), summary[["case", "expected", "observed"]]


def test_report_says_why_sgd_is_exact_in_both_modes():
    summary, _ = run_sgs_section(default_cases(["repvgg"], ["none"], ["sgd"]), steps=3)
    update = summary[summary.applied == "wrong"].iloc[0]
    assert update.sgs_mode == "update"
    assert update.expected == update.observed == "exact"
    assert "without weight decay" in update.detail and "linear" in update.detail
    auto = summary[summary.applied == "auto"].iloc[0]
    assert auto.sgs_mode == "grad" and "linear in the gradient" in auto.detail


@pytest.mark.parametrize("steps", [0, -2])
def test_suite_rejects_steps_below_one(steps):
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        run_sgs_section(default_cases(["acb"], ["none"], ["adam-coupled-wd"]), steps=steps)


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_verify_cli_rejects_bad_steps(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["verify", "--steps", value])
    assert info.value.code == 2
    assert "argument --steps: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("device, words", [
    ("bogus", "'bogus' is not a torch device"),
    ("meta", "'meta' is not usable"),
    pytest.param("cuda", "needs a CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
])
def test_verify_cli_unusable_device_is_a_one_line_usage_error(device, words, tmp_path, capsys):
    status = main(["verify", "--device", device, "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 2  # not 1, which means "a verdict mismatched"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reparam verify: error: --device") and words in lines[0]
    assert "Traceback" not in captured.err and not list(tmp_path.iterdir())


def test_verify_cli_explicit_steps_override_quick(tmp_path, monkeypatch):
    seen = []
    real = suite_module.run_sgs_section

    def spy(cases, steps, **kwargs):
        seen.append(steps)
        return real(cases[:1], steps=steps, **kwargs)

    monkeypatch.setattr(suite_module, "run_sgs_section", spy)
    base = ["verify", "--sections", "sgs", "--blocks", "acb", "--bn", "none", "--optimizers", "sgd"]
    assert main(base + ["--quick", "--steps", "11", "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--quick", "--out", str(tmp_path / "b")]) == 0
    assert seen == [11, 8]
    assert json.loads((tmp_path / "a" / "verify.json").read_text())["metadata"]["steps"] == 11

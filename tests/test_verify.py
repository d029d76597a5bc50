"""The default suite and the `reparam verify` command."""
import json

import pandas as pd
import pytest
import torch

from reparam.cli import build_parser, main
from verification import suite as suite_module
from verification.schema import SUMMARY_COLUMNS
from verification.suite import OPTIMIZERS, default_cases, run_sgs_section
from verification.tolerances import DIVERGENCE_FLOOR, EXACT_TOL, min_movement


@pytest.mark.parametrize("options", [
    ["--quick"],
    ["--dtype", "float32", "--quick"],
    ["--blocks", "acb", "--bn", "none"],
], ids=" ".join)
def test_documented_option_combinations_pass(options, tmp_path, capsys):
    """The README's option combinations all pass (``--dtype float32 --quick`` used to fail: two
    RAdam negative controls at 6e-4 / 9e-4, in float32's inconclusive band)."""
    dtype = torch.float32 if "float32" in options else torch.float64
    assert main(["verify", *options, "--out", str(tmp_path)]) == 0, capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "verify.csv", keep_default_na=False, na_values=[""])
    mismatches = summary[~summary.match]
    assert mismatches.empty, mismatches[["case", "expected", "observed", "max_rel_dev"]].to_string()
    sgs = summary[summary.section == "sgs"]
    assert len(sgs) == (26 if "acb" in options else 3 * 3 * len(OPTIMIZERS) * 2)
    assert set(summary.section) == ({"sgs"} if "--blocks" in options else {"sgs", "pgt"})
    exact = summary[summary.expected == "exact"]
    assert len(exact) > 0 and exact.max_rel_dev.max() <= EXACT_TOL[dtype]
    assert exact.moved_rel.min() >= min_movement(dtype)  # every exact verdict moved
    negative = summary[summary.expected != "exact"]
    assert negative.max_rel_dev.min() >= 3 * DIVERGENCE_FLOOR[dtype]  # a margin, not a coin toss
    # every case with a merged twin agrees with it to rounding
    merged = sgs[sgs.merged_observed.notna()]
    assert (merged.merged_observed == "exact").all() and merged.merged_max_rel_dev.max() <= EXACT_TOL[dtype]
    if dtype == torch.float64 and "--quick" in options:
        assert exact.max_rel_dev.max() < 1e-12 and negative.max_rel_dev.min() > 1e-4


def test_curves_have_the_shared_columns():
    summary, curves = run_sgs_section(default_cases(["repvgg"], ["after"], ["adam"]), steps=3)
    assert list(summary.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
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
    printed = capsys.readouterr().out
    assert "0 mismatches" in printed
    assert max(len(line) for line in printed.splitlines() if str(out) not in line) <= 100  # fits a terminal
    assert "worst exact:" in printed and "pgt" not in printed  # legend; no unrelated section


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
    real = suite_module.iter_sgs_section

    def spy(cases, steps, **kwargs):
        seen.append(steps)
        return real(cases[:1], steps=steps, **kwargs)

    monkeypatch.setattr(suite_module, "iter_sgs_section", spy)
    base = ["verify", "--sections", "sgs", "--blocks", "acb", "--bn", "none", "--optimizers", "sgd"]
    assert main(base + ["--quick", "--steps", "11", "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--quick", "--out", str(tmp_path / "b")]) == 0
    assert seen == [11, 8]
    assert json.loads((tmp_path / "a" / "verify.json").read_text())["metadata"]["steps"] == 11


@pytest.mark.parametrize("out, words", [
    ("a-file", "is a file, not a folder"),
    ("a-file/sub", "is not a writable folder"),
    ("/proc/reparam-verify-test", "is not a writable folder"),  # root ignores permission bits
])
def test_verify_cli_unusable_out_is_a_one_line_error_before_running(out, words, tmp_path, capsys, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("ran a case before checking --out")

    monkeypatch.setattr(suite_module, "run_case", must_not_run)
    (tmp_path / "a-file").write_text("")
    status = main(["verify", "--quick", "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("reparam verify: error: --out") and words in err and "Traceback" not in err


def test_verify_cli_ctrl_c_keeps_the_finished_cases_as_partial(tmp_path, capsys, monkeypatch):
    real, calls = suite_module.run_case, []

    def interrupted_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(suite_module, "run_case", interrupted_at_the_third)
    status = main(["verify", "--quick", "--blocks", "acb", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 130
    lines = [line for line in captured.err.splitlines() if line.strip() and "sgs equivalence" not in line]  # not the bar
    assert len(lines) == 1 and "interrupted: kept 2 finished cases" in lines[0] and "Traceback" not in captured.err
    meta = json.loads((tmp_path / "verify.json").read_text())["metadata"]
    assert meta["partial"] is True and meta["cases"] == 2
    assert len(pd.read_csv(tmp_path / "verify.csv")) == 2
    assert (tmp_path / "verify.md").read_text().startswith("**PARTIAL")


def test_sigterm_is_handled_like_ctrl_c_and_the_handler_restored():
    import os
    import signal

    from reparam.cli._common import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 1) if hasattr(signal, "sigtimedwait") else None
    assert signal.getsignal(signal.SIGTERM) is before


def test_filters_run_only_the_sgs_section_unless_asked():
    from reparam.cli.verify import chosen_sections

    parse = build_parser().parse_args
    assert chosen_sections(parse(["verify"])) == ["sgs", "pgt"]
    assert chosen_sections(parse(["verify", "--blocks", "acb"])) == ["sgs"]
    assert chosen_sections(parse(["verify", "--bn", "none", "--sections", "pgt", "sgs"])) == ["pgt", "sgs"]


def test_every_option_has_help_and_version_is_printed(capsys):
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("verify", "pgt"):
        for action in commands[name]._actions:
            assert action.help, f"reparam {name} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("reparam ")

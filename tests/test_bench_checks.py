"""``reparam bench``: bad input fails up front (one line, exit 2), and a run says when its
timings cannot be trusted. No row is really measured here (fake rows): fast."""
from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from benchmarks import execute, report, run
from benchmarks.row import COLUMNS, Row
from reparam.cli import main

TINY = ["--models", "benchmarks.tiny:tiny_net", "--image-size", "16", "--batch-size", "2",
        "--warmup", "1", "--steps", "2", "--no-progress", "--threads", "1", "--isolate", "never"]


def _one_line_error(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("reparam bench: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    for needle in needles:
        assert needle in captured.err, captured.err
    return captured.err


@pytest.fixture
def no_rows(monkeypatch):
    """Fail the test if any row is measured: the checks must come first."""
    def measured(*args, **kwargs):
        raise AssertionError("a row was measured before the bad input was reported")

    monkeypatch.setattr(execute, "measure_row", measured)
    monkeypatch.setattr(execute, "run_isolated", measured)


def test_out_that_is_a_file_fails_before_any_row(tmp_path, capsys, no_rows):
    target = tmp_path / "results.csv"
    target.write_text("keep me")
    assert main(["bench", *TINY, "--out", str(target)]) == 2
    _one_line_error(capsys, "--out", "is a file")
    assert target.read_text() == "keep me"
    assert main(["bench", *TINY, "--out", str(target / "sub")]) == 2
    _one_line_error(capsys, "cannot be created")


def test_unwritable_out_fails_before_any_row(tmp_path, capsys, no_rows, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run.tempfile, "TemporaryFile", refuse)
    assert main(["bench", *TINY, "--out", str(tmp_path / "new" / "dir")]) == 2
    _one_line_error(capsys, "cannot write in", "Permission denied")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("spec, needle", [
    ("resnet19", "torchvision has no classification model 'resnet19'"),
    ("benchmarks.no_such_module:net", "cannot import module"),
    ("benchmarks.tiny:no_such_net", "has no attribute"),
    ("benchmarks.tiny:", "incomplete"),
])
def test_bad_model_spec_fails_before_any_row(tmp_path, capsys, no_rows, spec, needle):
    out = tmp_path / "out"
    assert main(["bench", *TINY, "--models", "benchmarks.tiny:tiny_net", spec, "--out", str(out)]) == 2
    _one_line_error(capsys, f"--models {spec}:", needle)
    assert not out.exists()


def test_a_factory_that_raises_is_one_line(tmp_path, capsys, no_rows, monkeypatch):
    (tmp_path / "broken_nets.py").write_text("def net():\n    raise RuntimeError('no weights here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["bench", *TINY, "--models", "broken_nets:net", "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "--models broken_nets:net", "RuntimeError: no weights here")


def test_good_specs_pass_the_check_without_building_weights():
    run.check_model("benchmarks.tiny:tiny_net")
    run.check_model("resnet18")  # on the meta device: no memory, no initialisation


def test_quick_pins_one_thread():
    parser = __import__("reparam.cli", fromlist=["build_parser"]).build_parser()
    from reparam.cli.bench import options_from_args

    assert options_from_args(parser.parse_args(["bench", "--quick"])).threads == 1
    assert options_from_args(parser.parse_args(["bench", "--quick", "--threads", "2"])).threads == 2
    assert options_from_args(parser.parse_args(["bench"])).threads is None


# -- trust: warnings, error bars, counts ---------------------------------------------------
def _row(variant="acb", median=10.0, p25=9.0, p75=11.0, load=0.5, **kw) -> Row:
    return Row("m", 32, 4, variant, status="ok", median_ms=median, p25_ms=p25, p75_ms=p75, iqr_ms=p75 - p25,
               load_avg_1m=load, **kw)


def test_row_warnings_flag_noise_and_load():
    fraction = report.NOISY_IQR_FRACTION
    assert report.row_warnings(_row(p25=9.0, p75=9.0 + 10 * fraction * 0.9), cores=2) == []  # negative control
    noisy = report.row_warnings(_row(p25=9.0, p75=9.0 + 10 * fraction * 1.2), cores=2)
    assert len(noisy) == 1 and noisy[0] == "noisy: IQR 30% of median > 25%"
    busy = report.row_warnings(_row(load=2.5), cores=2)
    assert busy == ["busy: load 2.5 > 2 cores"]
    assert report.row_warnings(_row(load=2.0), cores=2) == []
    assert report.row_warnings(Row("m", 32, 4, "acb", status="OOM"), cores=2) == []


def test_run_warnings_and_report_files(tmp_path):
    env = {"device_type": "cpu", "device_name": "test", "usable_cores": 2, "load_avg_1m": 0.4, "flags": {}}
    quiet = [_row("plain"), _row("acb")]
    assert report.run_warnings(quiet, env) == []
    report.write_tables(quiet, env, tmp_path / "quiet")
    assert "Warnings" not in (tmp_path / "quiet" / "results.md").read_text()
    assert json.loads((tmp_path / "quiet" / "results.json").read_text())["warnings"] == []

    busy_env = {**env, "load_avg_1m": 7.5}
    rows = [_row("plain"), _row("acb", p75=14.0, warning="noisy: IQR 50% of median > 25%")]
    warnings = report.run_warnings(rows, busy_env)
    assert len(warnings) == 2 and "load average 7.5" in warnings[0] and "1 of 2 rows" in warnings[1]
    report.write_tables(rows, busy_env, tmp_path / "busy")
    md = (tmp_path / "busy" / "results.md").read_text()
    assert "## Warnings" in md and md.count("**WARNING**") == 2 and md.index("## Warnings") < md.index("| model")
    assert json.loads((tmp_path / "busy" / "results.json").read_text())["warnings"] == warnings
    assert list(pd.read_csv(tmp_path / "busy" / "results.csv").columns) == list(COLUMNS)


def test_time_ratio_error_bar_is_the_rows_iqr():
    row = _row(median=12.0, p25=11.0, p75=14.0, time_ratio=1.2)  # plain's median: 10 ms
    assert report._time_ratio_iqr(row) == pytest.approx((0.1, 0.2))
    assert report._time_ratio_iqr(Row("m", 32, 4, "acb", status="OOM")) == (0.0, 0.0)


def test_params_print_significant_digits():
    assert report.format_count(11_689_512) == "11.69M"
    assert report.format_count(138_365_992) == "138.4M"
    assert report.format_count(3_914) == "3.914k"
    assert report.format_count(912) == "912"
    assert report._fmt(3_914, "params") == "3.914k"


# -- the run loop with fake rows -----------------------------------------------------------
def _fake_rows(monkeypatch, seen_png: list[bool], out, delay: float = 0.0):
    def fake(row, cache=None):
        seen_png.append((out / "ratios.png").is_file())
        time.sleep(delay)
        row.status, row.median_ms, row.p25_ms, row.p75_ms = "ok", 10.0, 9.5, 10.5
        row.iqr_ms, row.params, row.peak_mem_mb = 1.0, 3914, 5.0
        return row

    monkeypatch.setattr(execute, "measure_row", fake)


def test_ratios_png_is_written_after_every_row(tmp_path, monkeypatch):
    out, seen = tmp_path / "out", []
    _fake_rows(monkeypatch, seen, out)
    assert main(["bench", *TINY, "--variants", "acb", "dbb", "--out", str(out)]) == 0
    assert seen == [False, True, True]  # the chart exists as soon as the first row is done
    assert (out / "ratios.png").stat().st_size > 0


def test_time_budget_skips_the_rows_left(tmp_path, monkeypatch, capsys):
    out, seen = tmp_path / "out", []
    _fake_rows(monkeypatch, seen, out, delay=0.3)
    assert main(["bench", *TINY, "--variants", "acb", "dbb", "--out", str(out), "--time-budget", "0.1"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 3 and table["status"].iloc[-1] == "skipped" and "time-budget" in table["error"].iloc[-1]
    assert len(seen) < 3
    assert main(["bench", *TINY, "--time-budget", "0"]) == 2


def test_busy_machine_warns_in_the_terminal(tmp_path, monkeypatch, capsys):
    out, seen = tmp_path / "out", []
    _fake_rows(monkeypatch, seen, out)
    monkeypatch.setattr(run, "usable_cores", lambda: 1)
    monkeypatch.setattr(run, "collect", lambda device, flags: {
        "device_type": "cpu", "device_name": "test", "torch": "x", "usable_cores": 1, "load_avg_1m": 9.0,
        "flags": flags})
    real = execute.measure_row

    def with_load(row, cache=None):
        row = real(row, cache)
        row.load_avg_1m = 9.0
        return row

    monkeypatch.setattr(execute, "measure_row", with_load)
    assert main(["bench", *TINY, "--variants", "acb", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "WARNING busy: load 9.0 > 1 cores" in captured.out
    assert "reparam bench: WARNING: busy machine: load average 9.0" in captured.err
    assert "## Warnings" in (out / "results.md").read_text()


def test_tables_and_chart_without_optional_packages(tmp_path, monkeypatch):
    """A bare GPU machine may lack tabulate and matplotlib: tables still print, the chart is skipped."""
    import sys

    monkeypatch.setitem(sys.modules, "tabulate", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rows = [_row("plain", params=3914)]
    text = report.table_text(rows, ("variant", "median_ms", "params"), fmt="github")
    assert text.splitlines() == ["| variant | median_ms | params |", "|---|---|---|", "| plain | 10.00 | 3.914k |"]
    assert report.plot_ratios(rows, tmp_path / "ratios.png") is None and not (tmp_path / "ratios.png").exists()

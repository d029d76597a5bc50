"""CPU smoke test of ``reparam bench`` and unit tests of the benchmark harness."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from benchmarks import measure, report, run
from benchmarks.variants import VARIANTS, parse_variant, resolve_variants
from reparam.cli import main

TINY = ["--models", "benchmarks.tiny:tiny_net", "--image-size", "16", "--batch-size", "2",
        "--warmup", "1", "--steps", "2", "--no-progress", "--threads", "1"]


def _bench(tmp_path, *extra):
    out = tmp_path / "out"
    code = main(["bench", *TINY, "--out", str(out), *extra])
    return code, out


def test_smoke_all_variants(tmp_path):
    code, out = _bench(tmp_path, "--isolate", "never")
    assert code == 0
    for name in report.FILES.values():
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "results.csv")
    assert tuple(table.columns) == report.COLUMNS
    assert list(table["variant"]) == list(VARIANTS)  # every variant produced a row, plain first
    assert set(table["status"]) == {"ok"}
    assert (table["median_ms"] > 0).all() and (table["images_per_s"] > 0).all()
    assert (table["iqr_ms"] >= 0).all() and (table["params"] > 0).all()
    plain = table[table["variant"] == "plain"].iloc[0]
    assert plain["time_ratio"] == pytest.approx(1.0) and plain["params_ratio"] == pytest.approx(1.0)
    assert table["time_ratio"].notna().all() and table["cpu_time_ratio"].notna().all()
    assert (table["cpu_median_ms"] > 0).all()
    assert table.set_index("variant").loc["plain-adamw", "params_ratio"] == pytest.approx(1.0)
    sgs = table[table["variant"].str.startswith("sgs")]
    assert (sgs["masked_params"] > 0).all()
    assert (sgs["blocks"] > 0).all()
    blocks = table[~table["variant"].isin(["plain", "plain-adamw", "sgs-grad", "sgs-update"])]
    assert (blocks["blocks"] > 0).all() and (blocks["params_ratio"] > 1).all()
    # update mode keeps a snapshot of the masked weights: more SGS state than grad mode
    state = dict(zip(sgs["variant"], sgs["sgs_state_mb"]))
    assert state["sgs-update"] > state["sgs-grad"] >= 0
    payload = json.loads((out / "results.json").read_text())
    env = payload["environment"]
    for key in ("date_utc", "device_name", "torch", "cuda", "cudnn", "tf32_matmul", "tf32_cudnn", "flags"):
        assert key in env
    assert env["flags"]["steps"] == 2 and env["interrupted"] is False
    assert payload["columns"] == list(report.COLUMNS) and len(payload["rows"]) == len(VARIANTS)
    md = (out / "results.md").read_text()
    assert "sgs-update" in md and "## Environment" in md


def test_isolated_row_measures_its_own_peak_rss(tmp_path):
    code, out = _bench(tmp_path, "--variants", "plain", "--isolate", "always")
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert list(table["variant"]) == ["plain"] and table["isolated"].all()
    assert table["peak_mem_mb"].iloc[0] > 0 and table["mem_kind"].iloc[0].startswith("cpu_peak_rss")


def test_oom_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = measure.time_steps
    calls = []

    def flaky(step, device, warmup, steps, cpu_times=None):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(step, device, warmup, steps, cpu_times)

    monkeypatch.setattr(measure, "time_steps", flaky)
    code, out = _bench(tmp_path, "--variants", "plain", "acb-merged", "repvgg", "--isolate", "never")
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert list(table["status"]) == ["ok", "OOM", "ok"]
    assert "out of memory" in table["error"].iloc[1]
    assert math.isnan(table["time_ratio"].iloc[1])


def test_interrupted_run_keeps_finished_rows(tmp_path, monkeypatch):
    def fake_row(spec):
        if spec.variant == "acb":
            raise KeyboardInterrupt
        row = run._base_row(spec)
        row.update(status="ok", median_ms=10.0 if spec.variant == "plain" else 12.0, params=100, peak_mem_mb=5.0)
        return row

    monkeypatch.setattr(run, "measure_row", fake_row)
    code, out = _bench(tmp_path, "--variants", "sgs-grad", "acb", "dbb", "--isolate", "never")
    assert code == 130
    table = pd.read_csv(out / "results.csv")
    assert list(table["variant"]) == ["plain", "sgs-grad"]
    assert table["time_ratio"].tolist() == pytest.approx([1.0, 1.2])
    assert json.loads((out / "results.json").read_text())["environment"]["interrupted"] is True
    assert (out / "ratios.png").is_file()


def test_summary_statistics():
    s = measure.summarize([4.0, 1.0, 3.0, 2.0, 100.0], batch_size=10)
    assert s["median_ms"] == 3.0 and s["p25_ms"] == 2.0 and s["p75_ms"] == 4.0 and s["iqr_ms"] == 2.0
    assert s["images_per_s"] == pytest.approx(10 / 0.003)
    assert measure.summarize([5.0], 1)["iqr_ms"] == 0.0


def test_ratios_are_per_model_and_size():
    rows = [
        {"model": "a", "image_size": 32, "batch_size": 4, "variant": "plain", "status": "ok", "median_ms": 2.0, "peak_mem_mb": 10.0, "params": 5},
        {"model": "a", "image_size": 32, "batch_size": 4, "variant": "acb", "status": "ok", "median_ms": 3.0, "peak_mem_mb": 15.0, "params": 10},
        {"model": "a", "image_size": 64, "batch_size": 4, "variant": "plain", "status": "OOM"},
        {"model": "a", "image_size": 64, "batch_size": 4, "variant": "acb", "status": "ok", "median_ms": 3.0, "peak_mem_mb": 1.0, "params": 10},
    ]
    report.add_ratios(rows)
    assert rows[1]["time_ratio"] == 1.5 and rows[1]["mem_ratio"] == 1.5 and rows[1]["params_ratio"] == 2.0
    assert rows[3]["time_ratio"] is None and rows[2]["time_ratio"] is None


def test_variant_names_and_options():
    assert parse_variant("plain") == ("plain", None, None)
    assert parse_variant("plain-adamw") == ("plain", None, "adamw")
    assert parse_variant("sgs-update") == ("sgs", "acb", "update")
    assert parse_variant("dbb-merged") == ("block", "dbb", "merged")
    assert parse_variant("repvgg") == ("block", "repvgg", "branch")
    with pytest.raises(ValueError):
        parse_variant("acb-fused")
    assert resolve_variants(["dbb", "plain", "dbb"]) == ["plain", "dbb"]
    assert main(["bench", "--variants", "nope", "--no-progress"]) == 2
    assert main(["bench", "--image-size", "32", "224", "--batch-size", "1", "2", "3"]) == 2
    assert main(["bench", "--dtype", "bfloat16", "--amp", "bf16"]) == 2
    assert run.model_spec("resnet18") == "torchvision:resnet18"
    assert run.model_spec("pkg.mod:fn") == "pkg.mod:fn"


def test_row_timeout_is_recorded(tmp_path):
    code, out = _bench(tmp_path, "--variants", "plain", "--isolate", "always", "--row-timeout", "0.2")
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert list(table["status"]) == ["timeout"] and "row-timeout" in table["error"].iloc[0]

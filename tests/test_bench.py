"""CPU smoke test of ``reparam bench`` and unit tests of the benchmark harness."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from benchmarks import execute, measure, report, run
from benchmarks.row import Row
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

    def flaky(step, device, steps, cpu_times=None):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(step, device, steps, cpu_times)

    monkeypatch.setattr(measure, "time_steps", flaky)
    code, out = _bench(tmp_path, "--variants", "plain", "acb-merged", "repvgg", "--isolate", "never")
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert list(table["status"]) == ["ok", "OOM", "ok"]
    assert "out of memory" in table["error"].iloc[1]
    assert math.isnan(table["time_ratio"].iloc[1])


def test_interrupted_run_keeps_finished_rows(tmp_path, monkeypatch):
    def fake_row(row, cache=None):
        if row.variant == "acb":
            raise KeyboardInterrupt
        row.status, row.median_ms = "ok", 10.0 if row.variant == "plain" else 12.0
        row.params, row.peak_mem_mb = 100, 5.0
        return row

    monkeypatch.setattr(execute, "measure_row", fake_row)
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
        Row("a", 32, 4, "plain", status="ok", median_ms=2.0, peak_mem_mb=10.0, params=5),
        Row("a", 32, 4, "acb", status="ok", median_ms=3.0, peak_mem_mb=15.0, params=10),
        Row("a", 64, 4, "plain", status="OOM"),
        Row("a", 64, 4, "acb", status="ok", median_ms=3.0, peak_mem_mb=1.0, params=10),
    ]
    report.add_ratios(rows)
    assert rows[1].time_ratio == 1.5 and rows[1].mem_ratio == 1.5 and rows[1].params_ratio == 2.0
    assert rows[3].time_ratio is None and rows[2].time_ratio is None


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
    assert execute.model_spec("resnet18") == "torchvision:resnet18"
    assert execute.model_spec("pkg.mod:fn") == "pkg.mod:fn"


def test_row_timeout_is_recorded(tmp_path):
    code, out = _bench(tmp_path, "--variants", "plain", "--isolate", "always", "--row-timeout", "0.2")
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert list(table["status"]) == ["timeout"] and "row-timeout" in table["error"].iloc[0]


# -- torch.compile in-process -------------------------------------------------------------
@pytest.fixture
def cheap_compile(monkeypatch):
    """torch.compile with dynamo's ``eager`` backend (same tracing, guards and recompile
    limit, no inductor code generation) and a recompile limit of 1."""
    import functools

    import torch._dynamo

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    with config.patch(**{limit: 1}):
        yield
    torch._dynamo.reset()


def test_in_process_compile_rows_each_compile_their_model(tmp_path, cheap_compile):
    """Without a dynamo reset per row the second model would hit the recompile limit and run eagerly."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    code, out = _bench(tmp_path, "--variants", "acb", "dbb-merged", "--isolate", "never", "--compile")
    assert code == 0
    assert counters["stats"]["unique_graphs"] - graphs >= 3  # each row compiled its model
    table = pd.read_csv(out / "results.csv")
    assert list(table["status"]) == ["ok"] * 3 and table["compile"].all()
    assert (table["compiled_graphs"] >= 1).all()


def test_compile_fallback_to_eager_is_an_error_row(tmp_path, cheap_compile, monkeypatch):
    monkeypatch.setattr(measure, "reset_compiler", lambda: None)  # as before the fix
    code, out = _bench(tmp_path, "--variants", "acb", "--isolate", "never", "--compile")
    assert code == 1
    table = pd.read_csv(out / "results.csv")
    assert list(table["status"]) == ["ok", "error"]
    assert table["compiled_graphs"].tolist() == [1, 0] and "ran eagerly" in table["error"].iloc[1]


def test_compile_problems():
    assert measure.compile_problem(measure.StepRun([1.0], warmup_graphs=2, timed_graphs=0)) is None
    assert "eagerly" in measure.compile_problem(measure.StepRun([1.0], warmup_graphs=0, timed_graphs=0))
    assert "timed steps" in measure.compile_problem(measure.StepRun([1.0], warmup_graphs=1, timed_graphs=1))


def test_compile_needs_a_warmup(tmp_path, capsys):
    assert _bench(tmp_path, "--variants", "plain", "--compile", "--warmup", "0")[0] == 2
    assert "--compile needs --warmup >= 1" in capsys.readouterr().err


# -- memory baseline ----------------------------------------------------------------------
_NEW_MODULES = """
import json, sys
from benchmarks import execute, measure
from benchmarks.row import Row
seen = {}
start, peak = measure.MemoryMeter.start, measure.MemoryMeter.peak_bytes
def recording_start(self):
    seen["before"] = set(sys.modules)
    start(self)
def recording_peak(self):
    seen["new"] = sorted(set(sys.modules) - seen["before"])
    return peak(self)
measure.MemoryMeter.start, measure.MemoryMeter.peak_bytes = recording_start, recording_peak
row = execute.measure_row(Row(sys.argv[1], 16, 2, sys.argv[2], steps=1, warmup=1, threads=1))
print(json.dumps({"status": row.status, "new": seen.get("new")}))
"""


@pytest.mark.parametrize("model, variant", [("torchvision:resnet18", "sgs-update"), ("benchmarks.tiny:tiny_net", "plain-adamw")])
def test_no_module_is_imported_after_the_memory_baseline(model, variant):
    """Imports after the baseline (reparam.convert, torchvision.models, torch._dynamo via the
    optimizer: ~150 MiB) would count in the row's peak RSS."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", _NEW_MODULES, model, variant], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"status": "ok", "new": []}


# -- devices ------------------------------------------------------------------------------
def test_unusable_device_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _bench(tmp_path, "--device", "cuda")[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("reparam bench: --device cuda: CUDA is not available") and err.count("\n") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _bench(tmp_path, "--device", "cuda:1")[0] == 2
    assert "only 1 CUDA device" in capsys.readouterr().err
    assert _bench(tmp_path, "--device", "gpu0")[0] == 2
    assert "is not a device" in capsys.readouterr().err


def test_cuda_row_runs_with_its_device_current(monkeypatch):
    """cuda:N: events, streams and allocator calls that take no device refer to the current
    device, which must be N for the whole row (not cuda:0)."""
    current: list[int | None] = [None]

    class FakeDeviceContext:
        def __init__(self, device):
            self.idx = torch.device(device).index

        def __enter__(self):
            self.prev, current[0] = current[0], self.idx

        def __exit__(self, *exc):
            current[0] = self.prev

    seen = []

    def stop(self):
        seen.append(current[0])
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)
    monkeypatch.setattr(measure.MemoryMeter, "start", stop)
    row = execute.measure_row(Row("benchmarks.tiny:tiny_net", 16, 2, "plain", device="cuda:1", steps=1, warmup=1))
    assert row.status == "error" and "stop here" in row.error
    assert seen == [1] and current == [None]


def test_cuda_events_record_on_the_row_device_stream(monkeypatch):
    recorded, synced = [], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            recorded.append(stream)

        def elapsed_time(self, end):
            return 2.0

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    device = torch.device("cuda:1")
    assert measure.time_steps(lambda: None, device, 3) == [2.0] * 3
    assert recorded == ["stream of cuda:1"] * 6 and synced == [device, device]


# -- row timeout --------------------------------------------------------------------------
def test_row_timeout_isolates_rows_or_warns(tmp_path, capsys):
    assert run.isolate_rows(run.BenchOptions(device="cuda", row_timeout=120.0))
    assert not run.isolate_rows(run.BenchOptions(device="cuda:1"))
    assert run.isolate_rows(run.BenchOptions(device="cpu"))
    assert not run.isolate_rows(run.BenchOptions(device="cpu", isolate="never", row_timeout=5.0))
    code, out = _bench(tmp_path, "--variants", "plain", "--isolate", "never", "--row-timeout", "60")
    assert code == 0
    assert "--row-timeout 60 s is ignored" in capsys.readouterr().err
    assert _bench(tmp_path, "--variants", "plain", "--row-timeout", "0")[0] == 2


# -- skipped optimizer steps --------------------------------------------------------------
CPU_GRAD_SCALER = pytest.mark.skipif(not hasattr(getattr(torch, "amp", None), "GradScaler"),
                                     reason="a CPU GradScaler needs torch >= 2.3")


@CPU_GRAD_SCALER
def test_skipped_optimizer_steps_are_counted(tmp_path, monkeypatch):
    """fp16 GradScaler: with inf/NaN gradients it skips optimizer.step (and the SGS hooks)."""
    real = measure.make_batch

    def nan_batch(*args, **kwargs):
        images, labels = real(*args, **kwargs)
        return images.fill_(float("nan")), labels

    monkeypatch.setattr(measure, "make_batch", nan_batch)
    code, out = _bench(tmp_path, "--variants", "sgs-grad", "--isolate", "never", "--amp", "fp16", "--steps", "3")
    assert code == 0
    table = pd.read_csv(out / "results.csv")
    assert table["skipped_steps"].tolist() == [3, 3]


@CPU_GRAD_SCALER
def test_no_skipped_steps_normally(tmp_path):
    code, out = _bench(tmp_path, "--variants", "sgs-update", "--isolate", "never", "--amp", "fp16")
    assert code == 0
    assert pd.read_csv(out / "results.csv")["skipped_steps"].tolist() == [0, 0]

"""The one-shot GPU evidence script, through its CPU ``--dry-run``, and the hook-work counter."""
from __future__ import annotations

import json
import tarfile
import time

import pytest
import torch
from torch import nn

from benchmarks import gpu_evidence, hook_kernels, measure, variants
from reparam.convert import load_model


# -- counting what the optimizer step hooks launch -----------------------------------------
def _sgd():
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)

    def step():
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    return model, optimizer, step


def test_counter_sees_exactly_the_ops_a_hook_runs():
    model, optimizer, step = _sgd()

    def two_ops(opt, args, kwargs):
        with torch.no_grad():
            model.weight.mul_(1.0)
            model.bias.add_(0.0)

    handle = optimizer.register_step_pre_hook(two_ops)
    original = dict(optimizer._optimizer_step_pre_hooks)
    work = hook_kernels.count_hook_work(optimizer, step, torch.device("cpu"), steps=3, warmup=1)
    assert work.steps == 3 and work.hooks == 1
    assert work.ops == 2 and work.op_names == {"aten::mul_": 1, "aten::add_": 1}
    assert work.kernels == 0  # CPU: nothing is a device kernel
    assert work.step_ops > work.ops  # the SGD update itself is counted in the step, not in the hook
    assert dict(optimizer._optimizer_step_pre_hooks) == original  # the labels are gone again
    handle.remove()


def test_counter_negative_control_without_hooks():
    _, optimizer, step = _sgd()
    work = hook_kernels.count_hook_work(optimizer, step, torch.device("cpu"), steps=2, warmup=0)
    assert work.hooks == 0 and work.ops == 0 and work.leaf_ops == 0 and work.step_ops > 0


def test_sgs_hooks_are_counted_on_cpu():
    cpu = torch.device("cpu")
    built = variants.build_variant("sgs-grad", lambda: load_model("benchmarks.tiny:tiny_net"), cpu)
    cfg = measure.StepConfig(cpu)
    images, labels = measure.make_batch(2, 16, 10, cfg)
    step = measure.make_step(built.model, built.optimizer, images, labels, cfg)
    work = hook_kernels.count_hook_work(built.optimizer, step, cpu, steps=2, warmup=1)
    built.handle.remove()
    assert work.hooks >= 1 and work.ops >= 1 and work.leaf_ops >= 1
    assert any("mul" in name for name in work.op_names)  # the mask product G * g


# -- the evidence script -------------------------------------------------------------------
def test_without_a_gpu_it_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_evidence.main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_evidence: no CUDA GPU here") and "--dry-run" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_unused_budget_rolls_to_later_parts():
    config = gpu_evidence.dry_run_config()
    deadline = time.monotonic() + 1000
    later = sum(p.budget_s for p in config.parts[1:])
    assert gpu_evidence._limit(config, 0, deadline) == pytest.approx(1000 - later, abs=1)
    assert gpu_evidence._limit(config, len(config.parts) - 1, deadline) == pytest.approx(1000, abs=1)


def test_gpu_config_covers_the_issue_matrix():
    config = gpu_evidence.gpu_config()
    assert config.device == "cuda" and not config.dry_run
    assert config.models == ["resnet18", "vgg16_bn"] and config.sizes == [(32, 128), (224, 64)]
    assert {p.precision for p in config.parts if p.kind == "bench"} == {"fp32", "bf16"}
    assert sum(p.budget_s for p in config.parts) + gpu_evidence.RESERVE_S <= gpu_evidence.DEFAULT_BUDGET_S <= 480
    assert config.verify_args[:4] == ["--device", "cuda", "--dtype", "float32"]


def test_dry_run_runs_every_part_and_packs_one_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_evidence, "VARIANTS", ("plain", "sgs-update", "dbb-merged"))  # fewer rows, same path
    monkeypatch.setenv("OUT", str(tmp_path / "OUT"))
    assert gpu_evidence.main(["--dry-run", "--results", str(tmp_path / "results"), "--budget", "900"]) == 0
    (out,) = (tmp_path / "results").iterdir()
    assert out.name.startswith("cpu-dry-run-")
    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["dry_run"] is True and evidence["complete"] is True
    assert evidence["environment"]["device_type"] == "cpu" and evidence["environment"]["date_utc"]
    assert {p["name"]: p["status"] for p in evidence["parts"]} == {
        "bench-tiny_net-fp32": "ok", "bench-tiny_net-bf16": "ok", "hooks": "ok", "verify": "ok"}
    rows = json.loads((out / "bench" / "bench-tiny_net-bf16" / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["plain", "sgs-update", "dbb-merged"] and {r["amp"] for r in rows} == {"bf16"}
    hooks = json.loads((out / "hooks" / "hook_kernels.json").read_text())["rows"]
    assert {r["variant"] for r in hooks} == set(variants.SGS_VARIANTS) and all(r["ops"] >= 1 for r in hooks)
    assert (out / "verify").is_dir() and "CPU DRY RUN" in (out / "evidence.md").read_text()
    assert {p.name for p in (tmp_path / "OUT").iterdir()} == {"evidence.md", f"{out.name}.tar.gz"}
    with tarfile.open(tmp_path / "OUT" / f"{out.name}.tar.gz") as tar:
        assert f"{out.name}/evidence.json" in tar.getnames()


def test_shell_entry_point_is_valid_bash():
    import subprocess

    script = gpu_evidence.ROOT / "benchmarks" / "gpu_evidence.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "benchmarks.gpu_evidence" in script.read_text()

"""Whole-model verification (`verification.verify_model`, `reparam verify --model`): exact cases,
an approximate one, negative controls, an ill-conditioned configuration reported as such, the
verdict rule, optimizer/schedule spec parsing and the CLI's exit codes."""
import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from reparam.blocks import ACBlock
from reparam.cli import main
from reparam.errors import ConfigError
from verification import verify_model
from verification.model import ILL_CONDITIONED, OTHER, OVERALL, judge
from verification.optim_spec import parse_optimizer, parse_schedule

TINY = dict(steps=4, batch_size=8, image_size=8)


def small_net() -> nn.Module:
    """A torchvision-like CNN: conv(+bias)-BN-ReLU, conv-BN-ReLU, pool, dropout, linear. The
    dropout must draw the same mask on every side (else nothing would ever look exact)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(8, 5),
    )


def deep_narrow_net(depth: int = 12, width: int = 4) -> nn.Module:
    """Many train-mode BatchNorms on 2x2 images: rounding is amplified at every step."""
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


def assert_exact(result, tol=1e-12):
    assert result.verdict == "exact" and result.expected == "exact" and result.matches, result.summary.to_string()
    assert (result.summary.observed == "exact").all()
    overall = result.overall
    assert overall.max_rel_dev < tol and overall.moved_rel > 1e-3  # something really moved


@pytest.mark.parametrize("optimizer", ["SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)", "AdamW(lr=1e-2, weight_decay=0.05)"])
def test_exact_with_bn_after(optimizer):
    result = verify_model(small_net(), block="acb", bn="after", optimizer=optimizer, **TINY)
    assert_exact(result)
    assert result.floor_side == "merged"
    assert result.metadata["applied_mode"] == ("grad" if optimizer.startswith("SGD") else "update")
    layers = set(result.summary.layer)
    assert {"0", "3", OTHER, OVERALL} <= layers  # both convs, the BN-free rest, the overall row
    per_step = result.per_step
    assert set(per_step.side) == {"branched", "merged", "sgs"} and per_step.step.max() == TINY["steps"]


def test_exact_repvgg_constant_kernel_with_schedule():
    """RepVGG without BN has a constant identity kernel: weight decay must pull toward it."""
    result = verify_model(small_net(), block="repvgg", bn="none", optimizer="SGD(lr=0.05, momentum=0.9, weight_decay=0.1)",
                          schedule="CosineAnnealingLR(T_max=4)", **TINY)
    assert_exact(result)


def test_already_branched_model_is_used_as_it_is():
    torch.manual_seed(0)
    model = nn.Sequential(ACBlock(3, 6, 3, bn="after"), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    result = verify_model(model, block="dbb", optimizer="Adam(lr=1e-2)", **TINY)
    assert_exact(result)
    assert "branched already" in result.metadata["conversion"]


def test_per_branch_bn_is_approximate_not_exact():
    result = verify_model(small_net(), bn="branch", optimizer="SGD(lr=0.1)", **TINY)
    assert result.verdict == "approximate" and result.expected == "approximate" and result.matches
    assert result.floor_side == "perturbed"  # no merged mode with BN inside the branches
    overall = result.overall
    assert overall.max_rel_dev > 1e-3 and overall.floor_rel_dev < 1e-12
    assert "BatchNorm inside each branch" in overall.theory


def test_negative_control_wrong_mask_diverges():
    """The same exact configuration with one plain-conv mask replaced by ones (plain training)."""
    wrong = verify_model(small_net(), bn="after", masks={"0.weight": torch.ones(3, 3)}, **TINY)
    assert wrong.verdict == "diverges" and wrong.expected == "diverges"
    assert wrong.overall.max_rel_dev > 1e-3
    assert wrong.metadata["injected_masks"] == ["0.weight"]
    with pytest.raises(ConfigError, match="no SGS mask"):
        verify_model(small_net(), masks={"9.weight": torch.ones(1, 1)}, **TINY)


def test_negative_control_broken_attach_is_caught(monkeypatch):
    """If SGS silently did nothing, the exact case must stop being exact."""
    import verification.model as model_module

    real = model_module.attach_sgs
    monkeypatch.setattr(model_module, "attach_sgs",
                        lambda opt, masks, **kw: real(opt, {n: torch.ones(m.shape) for n, m in masks.items()}, **kw))
    result = verify_model(small_net(), bn="after", optimizer="AdamW(lr=1e-2)", **TINY)
    assert result.verdict == "diverges" and not result.matches


def test_bad_models_and_arguments_are_config_errors_before_training():
    with pytest.raises(ConfigError, match=r"classifier returning \(batch, classes\) logits"):
        verify_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), **TINY)
    with pytest.raises(ConfigError, match="fails on a batch of shape"):
        verify_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), **TINY)
    with pytest.raises(ConfigError, match="batch_size must be"):
        verify_model(small_net(), steps=1, batch_size=0)
    with pytest.raises(ConfigError, match="floor="):
        verify_model(small_net(), floor="merged", bn="branch", **TINY)


def test_inexact_optimizer_is_expected_to_diverge():
    result = verify_model(small_net(), bn="after", optimizer="Adam(lr=1e-2, weight_decay=0.1)", **TINY)
    assert result.expected == "diverges" and result.verdict == "diverges" and result.matches
    assert "coupled weight_decay" in result.overall.theory


def test_nothing_moved_is_inconclusive():
    result = verify_model(small_net(), optimizer="SGD(lr=0.0)", **TINY)
    assert result.verdict == "inconclusive" and "moved only" in result.reason


def test_ill_conditioned_configuration_is_reported_as_such():
    """float32, 12 train-mode BNs on 2x2 images: the merged-mode twin (rounding only) reaches
    ~5e-5 within 4 steps, near the 1e-4 tolerance; SGS is not blamed and not cleared."""
    result = verify_model(deep_narrow_net(), bn="after", optimizer="SGD(lr=1.0, momentum=0.9)", steps=4, batch_size=2,
                          image_size=2, dtype=torch.float32)
    assert result.verdict == ILL_CONDITIONED, result.summary.to_string()
    overall = result.overall
    assert overall.floor_rel_dev > 1e-5 and "too ill-conditioned" in result.reason
    # the same network in float64 is judged (the floor stays far below the tolerance)
    assert_exact(verify_model(deep_narrow_net(), bn="after", optimizer="SGD(lr=1.0, momentum=0.9)", steps=4,
                              batch_size=2, image_size=2), tol=1e-10)


def test_torchvision_spec():
    result = verify_model("torchvision:squeezenet1_1", optimizer="SGD(lr=0.05, momentum=0.9)", steps=2, batch_size=2,
                          image_size=32)
    assert_exact(result)
    assert result.metadata["model"] == "torchvision:squeezenet1_1" and result.metadata["layers"] == 9


def timm_net(frozen_bn: bool) -> nn.Module:
    """Two timm RepVggBlocks (BN inside each branch); ``frozen_bn``: every BN in eval mode with
    frozen affine parameters, the linear variant that SGS reproduces exactly."""
    byobnet = pytest.importorskip("timm.models.byobnet")
    torch.manual_seed(0)
    model = nn.Sequential(byobnet.RepVggBlock(3, 8), byobnet.RepVggBlock(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    if frozen_bn:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval().requires_grad_(False)
    return model


@pytest.mark.parametrize("frozen_bn, verdict", [(False, "approximate"), (True, "exact")])
def test_timm_blocks_are_verified_as_they_are(frozen_bn, verdict):
    result = verify_model(timm_net(frozen_bn), optimizer="SGD(lr=0.1, momentum=0.9)", steps=3, batch_size=4, image_size=8)
    assert result.verdict == verdict and result.matches, result.summary.to_string()
    assert "2 recognised branched blocks (timm RepVggBlock)" in result.metadata["conversion"]  # not converted again
    assert result.floor_side == "perturbed"
    if frozen_bn:
        assert_exact(result)


@pytest.mark.parametrize(
    "dev, floor, moved, approximation, verdict",
    [
        (1e-14, 1e-15, 1.0, False, "exact"),
        (math.nan, 1e-15, 1.0, False, "diverges"),
        (1e-14, 1e-15, 1e-12, False, "inconclusive"),  # nothing moved
        (1e-2, 1e-15, 1e-12, False, "diverges"),  # one side stood still while the other moved
        (1e-2, 1e-15, 1.0, False, "diverges"),
        (1e-2, 1e-15, 1.0, True, "approximate"),
        (1e-8, 1e-15, 1.0, False, "inconclusive"),  # between tolerance and divergence floor
        (1e-11, 5e-11, 1.0, False, ILL_CONDITIONED),  # small, but so is rounding alone
        (1e-5, 1e-6, 1.0, False, ILL_CONDITIONED),  # within 100x of an amplified floor
        (1e-3, 1e-6, 1.0, False, "diverges"),  # 1000x above even an amplified floor
        (1e-14, math.inf, 1.0, False, ILL_CONDITIONED),  # the twin itself blew up
    ],
)
def test_verdict_rule(dev, floor, moved, approximation, verdict):
    assert judge(dev, floor, moved, torch.float64, approximation)[0] == verdict


# -- optimizer / schedule specs ------------------------------------------------------------------
def test_specs_parse_literals_only():
    spec = parse_optimizer("torch.optim.AdamW(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.05)")
    assert spec.cls is torch.optim.AdamW and spec.kwargs == {"lr": 1e-3, "betas": (0.8, 0.95), "weight_decay": 0.05}
    optimizer = spec.build([nn.Parameter(torch.zeros(2))])
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert parse_optimizer("Adagrad").kwargs == {}
    assert parse_schedule("StepLR(step_size=2, gamma=0.5)").cls is torch.optim.lr_scheduler.StepLR


@pytest.mark.parametrize(
    "text, message",
    [
        ("Lion(lr=1e-4)", "not in torch.optim"),
        ("Adamw(lr=1e-3)", "did you mean 'AdamW'"),
        ("SGD(lr=0.1, mom=0.9)", "takes no keyword 'mom'"),
        ("SGD(0.1)", "by keyword"),
        ("SGD(lr=__import__('os').getcwd())", "not a literal"),
        ("SGD(lr=-1)", "rejected by torch: Invalid learning rate"),
        ("SGD(lr=0.1", "not a call"),
        ("", "empty"),
        ("LBFGS(lr=1)", "needs a closure"),
        ("SGD(**{'lr': 1})", "'\\*\\*' is not supported"),
    ],
)
def test_bad_optimizer_specs_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_optimizer(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [("CosineAnnealing(T_max=3)", "not in torch.optim.lr_scheduler"), ("CosineAnnealingLR()", "T_max"),
     ("LambdaLR(lr_lambda=1)", "Python function"), ("StepLR(step=2)", "takes no keyword 'step'")],
)
def test_bad_schedule_specs_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_schedule(text)


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture
def nets_module(tmp_path, monkeypatch):
    """`tinynets:small` / `tinynets:deep` specs importable from the working directory."""
    (tmp_path / "tinynets.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def small():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_writes_reports_and_exits_0(nets_module, capsys):
    out = nets_module / "reports"
    status = main(["verify", "--model", "tinynets:small", "--bn", "after", "--optimizer", "AdamW(lr=1e-2, weight_decay=0.05)",
                   "--schedule", "CosineAnnealingLR(T_max=10)", "--steps", "3", "--batch-size", "4", "--image-size", "6",
                   "--out", str(out)])
    assert status == 0
    for name in ("verify_model.csv", "verify_model.md", "verify_model.json", "verify_model_steps.csv", "verify_model.png"):
        assert (out / name).stat().st_size > 0
    meta = json.loads((out / "verify_model.json").read_text())["metadata"]
    assert meta["verdict"] == "exact" and meta["model"] == "tinynets:small" and meta["schedule"] == "CosineAnnealingLR(T_max=10)"
    assert pd.read_csv(out / "verify_model.csv").layer.tolist()[-1] == OVERALL
    printed = capsys.readouterr().out
    assert "verdict: exact (expected exact)" in printed
    assert max(len(line) for line in printed.splitlines()) < 400


def test_cli_mismatch_exits_1(nets_module, monkeypatch):
    import verification.model as model_module

    real = model_module.attach_sgs
    monkeypatch.setattr(model_module, "attach_sgs",
                        lambda opt, masks, **kw: real(opt, {n: torch.ones(m.shape) for n, m in masks.items()}, **kw))
    assert main(["verify", "--model", "tinynets:small", "--steps", "2", "--image-size", "6", "--out", "r"]) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer", "Lion(lr=1)"], "not in torch.optim"),
        (["--schedule", "StepLR(step=1)"], "takes no keyword"),
        (["--bn", "after", "branch"], "--bn takes one placement"),
        (["--batch-size", "0"], "--batch-size must be"),
        (["--model", "torchvision:resnet19"], "no classification model"),
        (["--model", "tinynets:nothing"], "has no attribute"),
        (["--device", "cuda:7"], "--device"),
    ],
)
def test_cli_usage_errors_exit_2(nets_module, capsys, extra, message):
    args = ["verify", "--model", "tinynets:small", "--steps", "1", "--image-size", "4", "--out", "r", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_out_file_exits_2_before_work(nets_module, capsys):
    (nets_module / "taken").write_text("x")
    assert main(["verify", "--model", "tinynets:small", "--out", "taken"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_ill_conditioned_exits_3(nets_module, monkeypatch):
    import verification.model as model_module

    monkeypatch.setattr(model_module, "load_model", lambda spec: deep_narrow_net())
    status = main(["verify", "--model", "tinynets:small", "--optimizer", "SGD(lr=1.0, momentum=0.9)", "--steps", "4",
                   "--batch-size", "2", "--image-size", "2", "--dtype", "float32", "--out", "r"])
    assert status == 3

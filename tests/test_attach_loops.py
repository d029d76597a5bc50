"""attach_sgs in real training loops: checkpoint resume, hyper-parameters that change after
attaching, GradScaler with fused optimizers (scale-correct, skipped steps leave the weights
bit-identical), tensor learning rates, dtype changes, and masks replaced during training.

Every exact claim compares the SGS conv with a branched RepVGG block (3x3 + 1x1 + identity,
no BN: mask G and constant kernel C) trained on the same batches, in float64, and checks that
the trajectory moved (relative deviation <= 1e-10, movement >= 1e-3)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import reparam
from reparam import NotEquivalentWarning, attach_sgs
from reparam.errors import ConfigError

TOL = 1e-10
CH = 4


def pair(seed: int = 0):
    """A branched RepVGG block and its SGS conv, with the block's mask and constant kernel."""
    torch.manual_seed(seed)
    block = reparam.RepVGGBlock(CH, CH, 3, bn="none").double()
    conv = block.sgs_counterpart()
    return block, conv, block.sgs_mask().double(), block.constant_kernel().double()


def batch(step: int) -> torch.Tensor:
    return torch.randn(2, CH, 6, 6, generator=torch.Generator().manual_seed(100 + step), dtype=torch.float64)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    return torch.tanh(model(batch(step))).square().mean()


def deviation(block, conv) -> float:
    merged = block.merged_kernel(post_bn=False)[0].detach()
    return ((merged - conv.weight).abs().max() / merged.abs().max()).item()


def step(model, opt, i, scaler=None, poison=False, unscale_first=False) -> None:
    opt.zero_grad()
    loss = loss_of(model, i) * (float("inf") if poison else 1.0)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        if unscale_first:  # as before gradient clipping: the fused step then gets no grad_scale
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()


def assert_exact(block, conv, start: torch.Tensor) -> None:
    assert deviation(block, conv) <= TOL, deviation(block, conv)
    assert (conv.weight - start).abs().max() > 1e-3  # the trajectory moved


# -- the handle reads the live param groups ----------------------------------------------------------
def cosine_adamw(params):
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.2)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)


def test_checkpoint_resume_adamw_cosine_matches_the_branched_block():
    """Build, attach, then ``optimizer.load_state_dict(ckpt)`` (the usual order): the handle
    must read the loaded groups, whose lr the scheduler keeps moving."""
    block, conv, g, c = pair()
    start = conv.weight.detach().clone()
    opt_b, sched_b = cosine_adamw(block.parameters())
    opt_s, sched_s = cosine_adamw(conv.parameters())
    attach_sgs(opt_s, {conv.weight: g}, constant_kernels={conv.weight: c})
    for i in range(3):
        for model, opt, sched in ((block, opt_b, sched_b), (conv, opt_s, sched_s)):
            step(model, opt, i)
            sched.step()
    ckpt = copy.deepcopy({"model": conv.state_dict(), "opt": opt_s.state_dict(), "sched": sched_s.state_dict()})
    conv = block.sgs_counterpart()  # a fresh process: model, optimizer, attach, then load
    opt_s, sched_s = cosine_adamw(conv.parameters())
    attach_sgs(opt_s, {conv.weight: g}, constant_kernels={conv.weight: c})
    conv.load_state_dict(ckpt["model"])
    opt_s.load_state_dict(ckpt["opt"])
    sched_s.load_state_dict(ckpt["sched"])
    for i in range(3, 8):
        for model, opt, sched in ((block, opt_b, sched_b), (conv, opt_s, sched_s)):
            step(model, opt, i)
            sched.step()
    assert_exact(block, conv, start)


def test_param_group_added_then_checkpoint_loaded():
    """``add_param_group`` after attaching, then a checkpoint with a different weight decay:
    the masked parameter follows its live group."""
    block, conv, g, c = pair()
    start = conv.weight.detach().clone()
    opt_b = torch.optim.SGD([block.branches["kxk"].weight, block.branches["1x1"].weight], lr=0.1, momentum=0.9)
    opt_s = torch.optim.SGD([conv.weight], lr=0.1, momentum=0.9)
    attach_sgs(opt_s, {conv.weight: g}, constant_kernels={conv.weight: c})
    opt_b.add_param_group({"params": [block.bias], "lr": 0.05})
    opt_s.add_param_group({"params": [conv.bias], "lr": 0.05})
    state = opt_s.state_dict()
    state["param_groups"][0]["weight_decay"] = 0.3
    opt_s.load_state_dict(state)
    opt_b.param_groups[0]["weight_decay"] = 0.3
    for i in range(5):
        step(block, opt_b, i)
        step(conv, opt_s, i)
    assert_exact(block, conv, start)


def test_coupled_decay_set_after_attaching_is_rechecked():
    """Adam in update mode is exact without coupled decay; a schedule that raises it later must
    raise (strict) or warn once (strict=False) before the step, as attach_sgs would."""
    _, conv, g, _ = pair()
    opt = torch.optim.Adam(conv.parameters(), lr=0.01)
    attach_sgs(opt, {conv.weight: g})
    step(conv, opt, 0)
    opt.param_groups[0]["weight_decay"] = 0.1
    before = conv.weight.detach().clone()
    with pytest.raises(reparam.NotEquivalent, match="weight_decay"):
        step(conv, opt, 1)
    assert torch.equal(conv.weight, before)  # raised before anything moved
    opt.param_groups[0]["weight_decay"] = 0.0
    step(conv, opt, 2)  # fixed: steps again

    _, conv, g, _ = pair()
    opt = torch.optim.Adam(conv.parameters(), lr=0.01)
    attach_sgs(opt, {conv.weight: g}, strict=False)
    opt.param_groups[0]["weight_decay"] = 0.1
    with pytest.warns(NotEquivalentWarning, match="weight_decay") as caught:
        for i in range(3):
            step(conv, opt, i)
    assert len([w for w in caught if issubclass(w.category, NotEquivalentWarning)]) == 1


# -- GradScaler and fused optimizers -----------------------------------------------------------------
def fused_sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.2, fused=True)


def fused_adamw(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.2, fused=True)


@pytest.mark.parametrize("variant", ["exact", "unscaled-first", "without-C-control"])
@pytest.mark.parametrize("make_opt", [fused_sgd, fused_adamw], ids=["sgd", "adamw"])
def test_grad_scaler_with_fused_optimizer_matches_the_branched_block(make_opt, variant):
    """The fused kernel divides the gradient by the loss scale: the coupled ``-wd C``
    correction must be added scaled, and decoupled decay must not see the scale. Negative
    control: without the constant kernel the same loop drifts visibly."""
    block, conv, g, c = pair()
    start = conv.weight.detach().clone()
    opt_b, opt_s = make_opt(block.parameters()), make_opt(conv.parameters())
    control, unscale_first = variant == "without-C-control", variant == "unscaled-first"
    attach_sgs(opt_s, {conv.weight: g}, constant_kernels=None if control else {conv.weight: c})
    scalers = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for i in range(5):
        step(block, opt_b, i, scalers[0], unscale_first=unscale_first)
        step(conv, opt_s, i, scalers[1], unscale_first=unscale_first)
    if control:
        assert deviation(block, conv) > 1e-6
    else:
        assert_exact(block, conv, start)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("make_opt", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_skipped_scaler_step_leaves_every_weight_bit_identical(make_opt, fused):
    """An inf in the gradient: GradScaler skips the step (non-fused: step() is not called;
    fused: step() runs with ``found_inf``). Neither the update-mode lerp nor the pull toward C
    may move a weight; the run then continues exactly as the branched block."""
    block, conv, g, c = pair()
    start = conv.weight.detach().clone()
    kwargs = {"lr": 0.05, "weight_decay": 0.2, "fused": fused}
    opt_b, opt_s = make_opt(block.parameters(), **kwargs), make_opt(conv.parameters(), **kwargs)
    attach_sgs(opt_s, {conv.weight: g}, constant_kernels={conv.weight: c})
    scalers = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for i in range(5):
        before = [p.detach().clone() for p in conv.parameters()]
        step(block, opt_b, i, scalers[0], poison=i == 2)
        step(conv, opt_s, i, scalers[1], poison=i == 2)
        if i == 2:
            assert all(torch.equal(p, q) for p, q in zip(conv.parameters(), before))
    assert_exact(block, conv, start)


# -- tensor learning rates, dtype changes, validation ------------------------------------------------
@pytest.mark.parametrize("kind", [{"foreach": False}, {"fused": True}], ids=["for-loop", "fused"])
def test_float32_tensor_lr_with_float64_parameters_is_exact(kind):
    """torch computes ``1 - lr wd`` in the lr tensor's precision (its fused kernel: in the
    parameters' precision): so must the handle."""
    block, conv, g, c = pair()
    start = conv.weight.detach().clone()
    lr = torch.tensor(0.05, dtype=torch.float32)
    opt_b = torch.optim.AdamW(block.parameters(), lr=lr, weight_decay=0.3, **kind)
    opt_s = torch.optim.AdamW(conv.parameters(), lr=lr, weight_decay=0.3, **kind)
    attach_sgs(opt_s, {conv.weight: g}, constant_kernels={conv.weight: c})
    for i in range(5):
        step(block, opt_b, i)
        step(conv, opt_s, i)
    assert_exact(block, conv, start)


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1),
                                      lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)])
def test_model_float_after_attaching_follows_the_parameter(make_opt):
    """``model.float()`` after attaching: masks, constants and snapshots follow the parameter;
    the steps equal those of a handle attached to the float32 model."""
    _, conv, g, c = pair()
    twin = copy.deepcopy(conv).float()
    opt, opt_twin = make_opt(conv.parameters()), make_opt(twin.parameters())
    attach_sgs(opt, {conv.weight: g}, constant_kernels={conv.weight: c})
    attach_sgs(opt_twin, {twin.weight: g}, constant_kernels={twin.weight: c})
    conv.float()
    for i in range(3):
        x = batch(i).float()
        for model, o in ((conv, opt), (twin, opt_twin)):
            o.zero_grad()
            torch.tanh(model(x)).square().mean().backward()
            o.step()
    assert conv.weight.dtype == torch.float32
    assert torch.equal(conv.weight, twin.weight)


def test_preconditioner_follows_model_float_and_set_masks():
    """A non-diagonal P (grad mode) follows ``model.float()`` (its workspace too), and
    ``set_masks`` swaps it for a mask and back; ``masks`` shows what is applied."""
    _, conv, g, _ = pair()
    matrix = torch.diag(g.flatten()) + torch.full((9, 9), 1 / 81, dtype=torch.float64)
    p = reparam.SpatialPreconditioner(matrix)
    twin = copy.deepcopy(conv).float()
    opt, opt_twin = torch.optim.SGD(conv.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    handle = attach_sgs(opt, {conv.weight: p})
    attach_sgs(opt_twin, {twin.weight: p})
    conv.float()
    for model, o in ((conv, opt), (twin, opt_twin)):
        o.zero_grad()
        torch.tanh(model(batch(0).float())).square().mean().backward()
        o.step()
    assert torch.equal(conv.weight, twin.weight)
    assert isinstance(handle.masks[conv.weight], reparam.SpatialPreconditioner)
    handle.set_masks({conv.weight: g})
    assert torch.equal(handle.masks[conv.weight], g.float())
    handle.set_masks({conv.weight: p})
    assert handle.masks[conv.weight].matrix.dtype == torch.float32


def test_update_mode_snapshot_records_no_autograd_history():
    _, conv, g, _ = pair()
    opt = torch.optim.AdamW(conv.parameters(), lr=0.01)
    handle = attach_sgs(opt, {conv.weight: g})
    step(conv, opt, 0)
    assert not any(r.snapshot.requires_grad for r in handle._records)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_constant_kernel_rejected(bad):
    _, conv, g, c = pair()
    c = c.clone()
    c[0, 0, 1, 1] = bad
    with pytest.raises(ConfigError, match="constant kernel.*non-finite"):
        attach_sgs(torch.optim.SGD(conv.parameters(), lr=0.1), {conv.weight: g}, constant_kernels={conv.weight: c})


@pytest.mark.parametrize("which", ["mask", "constant"])
def test_complex_mask_or_constant_rejected_clearly(which):
    _, conv, g, c = pair()
    values = {"mask": g, "constant": c}
    values[which] = values[which].to(torch.complex128)
    with pytest.raises(ConfigError, match="complex"):
        attach_sgs(torch.optim.SGD(conv.parameters(), lr=0.1), {conv.weight: values["mask"]},
                   constant_kernels={conv.weight: values["constant"]})


def test_negative_mask_rejected():
    _, conv, g, _ = pair()
    with pytest.raises(ConfigError, match="negative"):
        attach_sgs(torch.optim.SGD(conv.parameters(), lr=0.1), {conv.weight: -g})


# -- set_masks -----------------------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_set_masks_to_ones_is_plain_training_bit_for_bit(name):
    _, conv, g, _ = pair()
    plain = copy.deepcopy(conv)
    opt, opt_plain = OPTIMIZERS[name](conv.parameters()), OPTIMIZERS[name](plain.parameters())
    handle = attach_sgs(opt, {conv.weight: g})
    handle.set_masks({conv.weight: torch.ones(3, 3)})
    assert torch.equal(handle.masks[conv.weight], torch.ones(3, 3, dtype=torch.float64))
    for i in range(3):
        step(conv, opt, i)
        step(plain, opt_plain, i)
    assert torch.equal(conv.weight, plain.weight) and not torch.equal(conv.weight, pair()[1].weight)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_set_masks_equals_a_fresh_attach_and_keeps_the_optimizer_state(name):
    """Masks replaced mid-run (by name) == remove() and attach again with the new masks."""
    _, conv, g, c = pair()
    twin = copy.deepcopy(conv)
    model = nn.Sequential(conv)
    opt, opt_twin = OPTIMIZERS[name](conv.parameters()), OPTIMIZERS[name](twin.parameters())
    handle = attach_sgs(opt, {conv.weight: torch.ones(3, 3)}, constant_kernels={conv.weight: c})
    first = attach_sgs(opt_twin, {twin.weight: torch.ones(3, 3)}, constant_kernels={twin.weight: c})
    for i in range(2):
        step(conv, opt, i)
        step(twin, opt_twin, i)
    state = copy.deepcopy(opt.state_dict())
    handle.set_masks({"0.weight": g}, model=model)
    first.remove()
    attach_sgs(opt_twin, {twin.weight: g}, constant_kernels={twin.weight: c})
    assert str(opt.state_dict()) == str(state)  # the optimizer's state untouched
    for i in range(2, 5):
        step(conv, opt, i)
        step(twin, opt_twin, i)
    assert torch.equal(conv.weight, twin.weight)
    assert torch.equal(handle.masks[conv.weight], g)


def test_set_masks_validates_like_attach_and_changes_nothing_on_error():
    _, conv, g, _ = pair()
    other = nn.Conv2d(CH, CH, 3).double()
    opt = torch.optim.SGD([*conv.parameters(), other.weight], lr=0.1)
    handle = attach_sgs(opt, {conv.weight: g})
    bad_nan = g.clone()
    bad_nan[0, 0] = float("nan")
    cases = [
        ({other.weight: g}, "not attached"),
        ({conv.weight: bad_nan}, "non-finite"),
        ({conv.weight: -g}, "negative"),
        ({conv.weight: torch.ones(5, 5)}, "broadcastable"),
        ({conv.weight: g.to(torch.complex128)}, "complex"),
    ]
    for masks, message in cases:
        with pytest.raises(ConfigError, match=message):
            handle.set_masks(masks)
    with pytest.raises(ConfigError, match="model="):
        handle.set_masks({"0.weight": g})
    with pytest.raises(ConfigError, match="not attached"):  # all-or-nothing: the good one is not applied
        handle.set_masks({conv.weight: torch.ones(3, 3), other.weight: g})
    assert torch.equal(handle.masks[conv.weight], g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.set_masks({conv.weight: 2 * g})
    assert torch.equal(handle.masks[conv.weight], 2 * g)

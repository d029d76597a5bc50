"""Unit tests of attach_sgs: what each mode does to one optimizer step, and its errors."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import reparam
from reparam import NotEquivalentWarning, SpatialPreconditioner, attach_sgs
from reparam.errors import ConfigError

G = torch.tensor([[1.0, 2.0, 1.0], [2.0, 3.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float64)


def make_conv(seed: int = 0, cin: int = 3, cout: int = 4, k: int = 3) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, padding=k // 2).double()


def backward(conv: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, conv.in_channels, 6, 6, generator=gen, dtype=torch.float64)
    conv.zero_grad(set_to_none=True)
    torch.tanh(conv(x)).pow(2).sum().backward()


def test_grad_mode_scales_the_gradient_exactly():
    conv = make_conv()
    opt = torch.optim.SGD(conv.parameters(), lr=1.0)
    handle = attach_sgs(opt, {conv.weight: G}, mode="grad")
    assert handle.mode == "grad"
    backward(conv)
    g = conv.weight.grad.clone()
    g_bias = conv.bias.grad.clone()
    before, bias_before = conv.weight.detach().clone(), conv.bias.detach().clone()
    opt.step()
    assert torch.equal(conv.weight.grad, G * g)
    assert torch.equal(conv.weight.detach(), before - G * g)  # dW = -G ⊙ g, bit for bit
    assert not torch.equal(G * g, g)
    assert torch.equal(conv.bias.detach(), bias_before - g_bias)  # unmasked parameters untouched


def test_auto_mode_choices():
    conv = make_conv()
    assert attach_sgs(torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.1), {conv.weight: G}).mode == "grad"
    assert attach_sgs(torch.optim.Adam(conv.parameters()), {conv.weight: G}).mode == "update"
    assert attach_sgs(torch.optim.AdamW(conv.parameters(), weight_decay=0.1), {conv.weight: G}).mode == "update"


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    ],
)
def test_update_mode_scales_the_update(make_opt):
    conv = make_conv()
    twin = copy.deepcopy(conv)
    opt, opt_twin = make_opt(conv.parameters()), make_opt(twin.parameters())
    attach_sgs(opt, {conv.weight: G}, mode="update")
    for step in range(3):
        before = conv.weight.detach().clone()
        twin.load_state_dict(conv.state_dict())
        backward(conv, seed=step)
        backward(twin, seed=step)
        assert torch.equal(conv.weight.grad, twin.weight.grad)  # the raw gradient is left alone
        opt.step()
        opt_twin.step()
        update = twin.weight.detach() - before
        assert update.abs().max() > 0
        torch.testing.assert_close(conv.weight.detach(), before + G * update, rtol=0, atol=1e-15)
        torch.testing.assert_close(conv.bias.detach(), twin.bias.detach(), rtol=0, atol=0)


def test_update_mode_keeps_decoupled_decay_unscaled_and_toward_c():
    conv = make_conv(cin=4, cout=4)
    twin = copy.deepcopy(conv)
    lr, wd = 0.01, 0.3
    c = reparam.RepVGGBlock(4, 4, 3, bn="none").constant_kernel().double()
    opt = torch.optim.AdamW(conv.parameters(), lr=lr, weight_decay=wd)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=wd)
    attach_sgs(opt, {conv.weight: G}, constant_kernels={conv.weight: c})
    before = conv.weight.detach().clone()
    backward(conv)
    backward(twin)
    opt.step()
    opt_twin.step()
    decayed = before * (1 - lr * wd)
    update = twin.weight.detach() - decayed
    expected = decayed + G * update + lr * wd * c
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("maximize", [False, True])
def test_grad_mode_constant_kernel_weight_decay(maximize):
    """Coupled decay on the branches pulls W toward C: dW = -lr (G g + wd (W - C))."""
    conv = make_conv(cin=4, cout=4)
    lr, wd = 0.1, 0.2
    c = reparam.RepVGGBlock(4, 4, 3, bn="none").constant_kernel().double()
    opt = torch.optim.SGD(conv.parameters(), lr=lr, weight_decay=wd, maximize=maximize)
    attach_sgs(opt, {conv.weight: G}, constant_kernels={conv.weight: c})
    backward(conv)
    g = conv.weight.grad.clone()
    before = conv.weight.detach().clone()
    opt.step()
    direction = (-g if maximize else g) * G
    expected = before - lr * (direction + wd * (before - c))
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=0, atol=1e-15)


def test_grad_mode_decoupled_decay_pulls_toward_c():
    """Decoupled decay in grad mode (RAdam's linear warm-up) decays ``W - C``, not ``W``:
    with a zero gradient the first RAdam step is pure decay, ``W <- C + (1 - lr wd)(W - C)``."""
    conv = make_conv(cin=4, cout=4)
    lr, wd = 0.1, 0.2
    c = reparam.RepVGGBlock(4, 4, 3, bn="none").constant_kernel().double()
    opt = torch.optim.RAdam([conv.weight], lr=lr, weight_decay=wd, decoupled_weight_decay=True)
    with pytest.warns(NotEquivalentWarning):  # grad mode is exact only for RAdam's warm-up
        attach_sgs(opt, {conv.weight: G}, mode="grad", strict=False, constant_kernels={conv.weight: c})
    before = conv.weight.detach().clone()
    conv.weight.grad = torch.zeros_like(conv.weight)
    opt.step()
    expected = c + (1 - lr * wd) * (before - c)
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=0, atol=1e-15)


def test_remove_restores_plain_behaviour():
    conv = make_conv()
    twin = copy.deepcopy(conv)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5, momentum=0.0)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.0)
    handle = attach_sgs(opt, {conv.weight: G})
    handle.remove()
    handle.remove()  # idempotent
    backward(conv)
    backward(twin)
    opt.step()
    opt_twin.step()
    assert torch.equal(conv.weight, twin.weight)


def test_context_manager_detaches():
    conv = make_conv()
    twin = copy.deepcopy(conv)
    opt = torch.optim.Adam(conv.parameters(), lr=0.1)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=0.1)
    with attach_sgs(opt, {conv.weight: G}) as handle:
        assert handle.parameters == [conv.weight]
    backward(conv)
    backward(twin)
    opt.step()
    opt_twin.step()
    assert torch.equal(conv.weight, twin.weight)


def test_name_keyed_masks_with_model():
    model = nn.Sequential(make_conv(), nn.ReLU(), make_conv(cin=4, cout=2))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    attach_sgs(opt, {"0.weight": G, "2.weight": torch.ones(3, 3)}, model=model)
    backward_model = lambda: torch.tanh(model(torch.randn(1, 3, 5, 5, dtype=torch.float64))).sum().backward()
    torch.manual_seed(3)
    backward_model()
    g0, g2 = model[0].weight.grad.clone(), model[2].weight.grad.clone()
    before0, before2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    opt.step()
    assert torch.equal(model[0].weight.detach(), before0 - G * g0)
    assert torch.equal(model[2].weight.detach(), before2 - g2)


def test_name_keys_need_model_and_must_exist():
    model = nn.Sequential(make_conv())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match="model="):
        attach_sgs(opt, {"0.weight": G})
    with pytest.raises(ConfigError, match="1.weight"):
        attach_sgs(opt, {"1.weight": G}, model=model)


def test_wrong_mask_shape_names_the_parameter():
    model = nn.Sequential(make_conv())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match=r"0\.weight") as info:
        attach_sgs(opt, {"0.weight": torch.ones(5, 5)}, model=model)
    assert "(5, 5)" in str(info.value) and "(3, 3)" in str(info.value)
    with pytest.raises(ConfigError, match=r"shape \(4, 3, 3, 3\)"):  # without model=: described by its shape
        attach_sgs(opt, {model[0].weight: torch.ones(2, 3, 3)})


def test_non_finite_mask_rejected():
    conv = make_conv()
    bad = G.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        attach_sgs(torch.optim.SGD(conv.parameters(), lr=1.0), {conv.weight: bad})


def test_parameter_not_in_optimizer():
    conv, other = make_conv(), make_conv()
    opt = torch.optim.SGD(conv.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match="not optimized"):
        attach_sgs(opt, {other.weight: G})


def test_constant_kernel_without_mask_rejected():
    conv = make_conv()
    opt = torch.optim.SGD(conv.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match="without a mask"):
        attach_sgs(opt, {}, constant_kernels={conv.weight: torch.zeros_like(conv.weight)})


def test_adam_coupled_weight_decay_is_not_equivalent():
    conv = make_conv()
    opt = torch.optim.Adam(conv.parameters(), lr=0.01, weight_decay=0.1)
    with pytest.raises(reparam.NotEquivalent, match="weight_decay"):
        attach_sgs(opt, {conv.weight: G})
    with pytest.warns(NotEquivalentWarning, match="weight_decay"):
        handle = attach_sgs(opt, {conv.weight: G}, strict=False)
    assert handle.mode == "grad"
    assert issubclass(reparam.NotEquivalent, ValueError)


def test_lbfgs_is_not_equivalent():
    conv = make_conv()
    with pytest.raises(reparam.NotEquivalent, match="LBFGS"):
        attach_sgs(torch.optim.LBFGS(conv.parameters()), {conv.weight: G})


@pytest.mark.parametrize(
    "make_opt, mode",
    [
        (lambda p: torch.optim.Adam(p, lr=0.01), "grad"),
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01), "update"),
        (lambda p: torch.optim.RMSprop(p, lr=0.01), "grad"),
    ],
)
def test_explicit_inexact_mode(make_opt, mode):
    conv = make_conv()
    with pytest.raises(reparam.NotEquivalent, match=f"mode='{mode}'"):
        attach_sgs(make_opt(conv.parameters()), {conv.weight: G}, mode=mode)
    with pytest.warns(NotEquivalentWarning):
        handle = attach_sgs(make_opt(conv.parameters()), {conv.weight: G}, mode=mode, strict=False)
    assert handle.mode == mode


def test_exact_explicit_mode_does_not_warn():
    conv = make_conv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_sgs(torch.optim.SGD(conv.parameters(), lr=0.1), {conv.weight: G}, mode="update")
        attach_sgs(torch.optim.Adam(conv.parameters(), lr=0.1), {conv.weight: G}, mode="update")


@pytest.mark.parametrize("mode", ["Grad", "both", "", "mask"])
def test_unknown_mode_string(mode):
    conv = make_conv()
    with pytest.raises(ConfigError, match="mode"):
        attach_sgs(torch.optim.SGD(conv.parameters(), lr=0.1), {conv.weight: G}, mode=mode)


def test_nondiagonal_preconditioner_grad_only():
    conv = make_conv()
    matrix = torch.diag(G.flatten()) + torch.full((9, 9), 1 / 81, dtype=torch.float64)
    p = SpatialPreconditioner(matrix)
    opt = torch.optim.SGD(conv.parameters(), lr=1.0)
    attach_sgs(opt, {conv.weight: p})
    backward(conv)
    g = conv.weight.grad.clone()
    before = conv.weight.detach().clone()
    opt.step()
    expected = before - (g.reshape(-1, 9) @ matrix.T).reshape(g.shape)
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=0, atol=1e-14)
    with pytest.raises(reparam.NotEquivalent, match="non-diagonal"):
        attach_sgs(torch.optim.Adam(conv.parameters()), {conv.weight: p})
    with pytest.raises(ConfigError, match="taps"):
        attach_sgs(opt, {conv.weight: SpatialPreconditioner(torch.eye(4, dtype=torch.float64))})

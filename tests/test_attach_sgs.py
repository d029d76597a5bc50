"""Unit tests of attach_sgs: what each mode does to one optimizer step, and its errors."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import reparam
import reparam.sgs.attach as attach_module
from reparam import NotEquivalentWarning, SpatialPreconditioner, attach_sgs
from reparam.errors import ConfigError
from verification.strategies import accepts

G = torch.tensor([[1.0, 2.0, 1.0], [2.0, 3.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float64)


def make_conv(seed: int = 0, cin: int = 3, cout: int = 4, k: int = 3) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, padding=k // 2).double()


def backward(conv: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, conv.in_channels, 6, 6, generator=gen, dtype=torch.float64)
    conv.zero_grad(set_to_none=True)
    torch.tanh(conv(x)).pow(2).sum().backward()


def raw_gradient_then_step(conv: nn.Module, opt: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward, then one step: returns the weight before it and the raw (unscaled) gradient."""
    backward(conv)
    g = conv.weight.grad.clone()
    before = conv.weight.detach().clone()
    opt.step()
    return before, g


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
    before, g = raw_gradient_then_step(conv, opt)
    direction = (-g if maximize else g) * G
    expected = before - lr * (direction + wd * (before - c))
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=0, atol=1e-15)


@pytest.mark.skipif(not accepts(torch.optim.RAdam, "decoupled_weight_decay"), reason="RAdam without decoupled decay")
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
    before, g = raw_gradient_then_step(conv, opt)
    expected = before - (g.reshape(-1, 9) @ matrix.T).reshape(g.shape)
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=0, atol=1e-14)
    with pytest.raises(reparam.NotEquivalent, match="non-diagonal"):
        attach_sgs(torch.optim.Adam(conv.parameters()), {conv.weight: p})
    with pytest.raises(ConfigError, match="taps"):
        attach_sgs(opt, {conv.weight: SpatialPreconditioner(torch.eye(4, dtype=torch.float64))})


# -- optimizer.step(closure) ---------------------------------------------------------------------
CLOSURE_CASES = [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1), "grad"),
    (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1, maximize=True), "grad"),
    (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.3), "update"),
    (lambda p: torch.optim.Adam(p, lr=0.01), "update"),
]


@pytest.mark.parametrize("make_opt, mode", CLOSURE_CASES)
@pytest.mark.parametrize("as_kwarg", [False, True])
def test_step_with_closure_equals_step_after_backward(make_opt, mode, as_kwarg):
    """``step(closure)`` computes the gradients inside the step, after the pre-step hook: SGS
    must still scale exactly those gradients (grad mode) / the update made from them (update
    mode), bit for bit as with ``backward(); step()``, and return the closure's loss."""
    conv = make_conv(cin=4, cout=4)
    twin = copy.deepcopy(conv)
    c = reparam.RepVGGBlock(4, 4, 3, bn="none").constant_kernel().double()
    opt, opt_twin = make_opt(conv.parameters()), make_opt(twin.parameters())
    handle = attach_sgs(opt, {conv.weight: G}, constant_kernels={conv.weight: c})
    attach_sgs(opt_twin, {twin.weight: G}, constant_kernels={twin.weight: c})
    assert handle.mode == mode
    start = conv.weight.detach().clone()
    for step in range(3):
        def closure():
            opt.zero_grad()
            backward(conv, seed=step)
            return torch.tensor(float(step))

        loss = opt.step(closure=closure) if as_kwarg else opt.step(closure)
        assert loss.item() == step
        backward(twin, seed=step)
        opt_twin.step()
        assert torch.equal(conv.weight, twin.weight) and torch.equal(conv.bias, twin.bias)
    assert not torch.equal(conv.weight, start)


def test_closure_step_is_scaled_not_stale():
    """The audit's repro: with a closure the step must be G times the plain step (it was 1x)."""
    conv = make_conv(cin=1, cout=1)
    plain = copy.deepcopy(conv)
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    three = torch.full((3, 3), 3.0, dtype=torch.float64)
    for make_opt in (lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.Adam(p, lr=0.1)):
        model, reference = copy.deepcopy(conv), copy.deepcopy(plain)
        opt, opt_ref = make_opt([model.weight]), make_opt([reference.weight])
        attach_sgs(opt, {model.weight: three})

        def closure():
            opt.zero_grad()
            loss = model(x).sum()
            loss.backward()
            return loss

        opt.step(closure)
        reference(x).sum().backward()
        opt_ref.step()
        step, plain_step = model.weight - conv.weight, reference.weight - conv.weight
        torch.testing.assert_close(step, 3 * plain_step, rtol=1e-12, atol=0)


# -- attaching twice, argument types, masks ------------------------------------------------------------
def test_attaching_twice_raises_naming_the_parameter_until_removed():
    model = nn.Sequential(make_conv())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = attach_sgs(opt, {"0.weight": G}, model=model)
    with pytest.raises(ConfigError, match=r"0\.weight already has SGS attached.*remove\(\)"):
        attach_sgs(opt, {"0.weight": G}, model=model)
    with pytest.raises(ConfigError, match=r"parameter #0 of shape \(4, 3, 3, 3\) already"):
        attach_sgs(opt, {model[0].weight: G})
    # another optimizer over the same parameter is independent
    attach_sgs(torch.optim.SGD(model.parameters(), lr=1.0), {model[0].weight: G})
    handle.remove()
    again = attach_sgs(opt, {model[0].weight: G})  # works once the first handle is gone
    backward(model[0])
    g = model[0].weight.grad.clone()
    before = model[0].weight.detach().clone()
    opt.step()
    assert torch.equal(model[0].weight.detach(), before - G * g)  # scaled once, not twice
    again.remove()


def test_same_parameter_by_name_and_by_object_rejected():
    model = nn.Sequential(make_conv())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match=r"0\.weight twice"):
        attach_sgs(opt, {"0.weight": G, model[0].weight: G}, model=model)


@pytest.mark.parametrize("argument", ["masks", "constant_kernels"])
def test_non_mapping_arguments_rejected_clearly(argument):
    conv = make_conv()
    opt = torch.optim.SGD(conv.parameters(), lr=1.0)
    kwargs = {"masks": {conv.weight: G}, "constant_kernels": None}
    kwargs[argument] = [conv.weight]
    with pytest.raises(ConfigError, match=f"{argument} must be a mapping.*list"):
        attach_sgs(opt, **kwargs)


@pytest.mark.parametrize("shape", [(1, 3), (3, 1), (3,), (1, 1, 3, 3), (4, 1, 1, 1), (1,), ()])
def test_masks_broadcastable_to_the_weight_are_accepted(shape):
    conv = make_conv()
    gen = torch.Generator().manual_seed(5)
    mask = 1 + torch.rand(shape, generator=gen, dtype=torch.float64)
    opt = torch.optim.SGD(conv.parameters(), lr=1.0)
    attach_sgs(opt, {conv.weight: mask})
    before, g = raw_gradient_then_step(conv, opt)
    assert torch.equal(conv.weight.detach(), before - mask * g)


@pytest.mark.parametrize("shape", [(2, 3), (5, 5), (3, 2), (2, 1, 1, 1)])
def test_non_broadcastable_masks_rejected(shape):
    model = nn.Sequential(make_conv())
    with pytest.raises(ConfigError, match=r"0\.weight: mask of shape .* not broadcastable .*\(4, 3, 3, 3\)"):
        attach_sgs(torch.optim.SGD(model.parameters(), lr=1.0), {"0.weight": torch.ones(shape)}, model=model)


class LarsLikeSGD(torch.optim.SGD):
    """A subclass that changes the update rule (a per-tensor trust ratio, as LARS does)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(p.norm() / (p.grad.norm() + 1e-12))
        return super().step(closure)


class LambLikeAdam(torch.optim.Adam):
    pass


@pytest.mark.parametrize("cls, base", [(LarsLikeSGD, "SGD"), (LambLikeAdam, "Adam")])
def test_optimizer_subclasses_are_not_claimed_exact(cls, base):
    conv = make_conv()
    with pytest.raises(reparam.NotEquivalent, match=f"{cls.__name__} is a subclass of {base}.*update rule"):
        attach_sgs(cls(conv.parameters(), lr=0.1), {conv.weight: G})
    with pytest.warns(NotEquivalentWarning, match="subclass"):
        attach_sgs(cls(conv.parameters(), lr=0.1), {conv.weight: G}, strict=False)
    assert reparam.sgs.exact_mode(cls(conv.parameters(), lr=0.1), [{}]) is None


def test_diagonal_preconditioner_is_the_mask_in_update_mode():
    """A diagonal P = diag(G) is the mask G, also in update mode (it used to be ignored there)."""
    conv = make_conv()
    twin = copy.deepcopy(conv)
    opt, opt_twin = torch.optim.Adam(conv.parameters(), lr=0.01), torch.optim.Adam(twin.parameters(), lr=0.01)
    attach_sgs(opt, {conv.weight: SpatialPreconditioner(torch.diag(G.flatten()))})
    attach_sgs(opt_twin, {twin.weight: G})
    for step in range(2):
        backward(conv, seed=step)
        backward(twin, seed=step)
        opt.step()
        opt_twin.step()
    assert torch.equal(conv.weight, twin.weight)


# -- passes and allocations per step --------------------------------------------------------------
class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__ + ("" if func._overloadname == "default" else "." + func._overloadname))
        return func(*args, **(kwargs or {}))


def hook_ops(handle, optimizer) -> list[str]:
    """The aten ops SGS runs around one step (the optimizer's own ops excluded)."""
    log = _OpLog()
    with log:
        handle._pre_step(optimizer, (optimizer,), {})
        handle._post_step(optimizer)
    return log.ops


@pytest.mark.parametrize(
    "make_opt, constant, expected",
    [
        (lambda p: torch.optim.Adam(p, lr=0.01), False, ["_foreach_copy_", "_foreach_lerp_.List"]),
        (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), True,
         ["_foreach_copy_", "_foreach_mul_.Scalar", "_foreach_lerp_.List", "_foreach_add_.List"]),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), False, ["_foreach_mul_.List"]),
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1), True, ["_foreach_mul_.List", "_foreach_add_.List"]),
    ],
)
def test_each_pass_is_one_foreach_over_all_masked_parameters(make_opt, constant, expected):
    """Update mode: copy before, one fused lerp after (plus the decoupled decay of the snapshot
    and the pull toward C when they apply); grad mode: one fused multiply. Three layers, so a
    per-parameter loop would show up as repeated ops."""
    fused = hasattr(torch, "_foreach_copy_") and attach_module._foreach_lerp_takes_tensor_weights()
    if not fused and any(op.startswith(("_foreach_copy_", "_foreach_lerp_")) for op in expected):
        pytest.skip("this torch lacks _foreach_copy_ / tensor-weight _foreach_lerp_: the per-tensor fallback runs")
    model = nn.Sequential(*[make_conv(seed=i, cin=4, cout=4) for i in range(3)])
    opt = make_opt(model.parameters())
    c = reparam.RepVGGBlock(4, 4, 3, bn="none").constant_kernel().double()
    handle = attach_sgs(opt, {m.weight: G for m in model}, constant_kernels={m.weight: c for m in model} if constant else None)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert hook_ops(handle, opt) == expected


def test_preconditioner_allocates_nothing_per_step():
    """``P g`` goes through a preallocated workspace (``mm.out``), not ``flat @ P^T``."""
    conv = make_conv()
    matrix = torch.diag(G.flatten()) + torch.full((9, 9), 1 / 81, dtype=torch.float64)
    opt = torch.optim.SGD(conv.parameters(), lr=1.0)
    handle = attach_sgs(opt, {conv.weight: SpatialPreconditioner(matrix)})
    backward(conv)
    expected = (conv.weight.grad.reshape(-1, 9) @ matrix.T).reshape(conv.weight.shape)
    log = _OpLog()
    with log:
        handle._pre_step(opt, (opt,), {})
    torch.testing.assert_close(conv.weight.grad, expected, rtol=0, atol=1e-14)
    assert "mm.out" in log.ops
    allowed = {"view", "permute", "t", "transpose", "mm", "copy_", "_reshape_alias"}
    assert all(op.split(".")[0] in allowed for op in log.ops), log.ops
    assert not any(op.startswith(("empty", "mm.default", "matmul.default")) for op in log.ops), log.ops


def test_update_mode_fallback_without_foreach_lerp_tensor_weights(monkeypatch):
    """Where ``torch._foreach_lerp_`` lacks the tensor-weights overload, a per-tensor
    ``lerp_`` gives the same result."""

    conv = make_conv(cin=4, cout=4)
    twin = copy.deepcopy(conv)
    c = reparam.RepVGGBlock(4, 4, 3, bn="none").constant_kernel().double()
    opt = torch.optim.AdamW(conv.parameters(), lr=0.01, weight_decay=0.3)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.3)
    attach_sgs(opt, {conv.weight: G}, constant_kernels={conv.weight: c})
    monkeypatch.setattr(attach_module, "_foreach_lerp_takes_tensor_weights", lambda: False)
    attach_sgs(opt_twin, {twin.weight: G}, constant_kernels={twin.weight: c})
    for step in range(2):
        backward(conv, seed=step)
        backward(twin, seed=step)
        opt_twin.step()
        monkeypatch.undo()
        opt.step()
        monkeypatch.setattr(attach_module, "_foreach_lerp_takes_tensor_weights", lambda: False)
    assert torch.equal(conv.weight, twin.weight)


@pytest.mark.parametrize(
    "make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.AdamW(p, lr=0.01)]
)
def test_masks_take_no_memory_in_proportion_to_the_model(make_opt):
    """A (kh, kw) mask stays (kh, kw): the hooks multiply with a stride-0 view, so SGS holds
    9 numbers per mask (update mode adds its snapshot of the masked weights, nothing more)."""
    conv = nn.Conv2d(64, 64, 3, bias=False).double()
    handle = attach_sgs(make_opt(conv.parameters()), {conv.weight: G})
    snapshot = conv.weight.numel() * 8 if handle.mode == "update" else 0
    assert handle.state_bytes == G.numel() * 8 + snapshot

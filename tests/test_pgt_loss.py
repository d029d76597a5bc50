"""PowerGrad cross-entropy, the logits transform and AGC against explicit references."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import surrogate_grad

from reparam.errors import PGTAssumptionError, ReparamError
from reparam.pgt import (
    PowerGradCrossEntropy,
    PowerGradLogits,
    adaptive_grad_clip_,
    power_grad_cross_entropy,
    power_grad_logits,
)

N, C = 7, 5
F64 = torch.float64


def _inputs(shape: tuple[int, ...] = (N, C), seed: int = 0, spread: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(*shape, generator=gen, dtype=F64)).requires_grad_()


def _hard_target(shape: tuple[int, ...], ignore: bool, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, C, shape, generator=gen)
    if ignore:
        flat = t.view(-1)
        flat[::3] = -100
    return t


def _soft_target(shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=gen, dtype=F64), dim=1)


def _grad(loss: torch.Tensor, z: torch.Tensor, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.rand(loss.shape, generator=gen, dtype=loss.dtype) + 0.5
    (g,) = torch.autograd.grad(loss, z, upstream)
    return g


OPTIONS = list(
    itertools.product(
        ["mean", "sum", "none"],  # reduction
        [0.0, 0.15],  # label smoothing
        [False, True],  # class weights
        ["hard", "ignore", "soft"],  # target kind
        [(N, C), (3, C, 2, 2), (C,)],  # logits shape
    )
)


def _case(reduction: str, smoothing: float, weighted: bool, kind: str, shape: tuple[int, ...]):
    z = _inputs(shape)
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if kind == "soft":
        target = _soft_target(shape) if len(shape) > 1 else _soft_target((1, C))[0]
    else:
        target = _hard_target(tshape, ignore=(kind == "ignore" and len(shape) > 1))
    weight = torch.linspace(0.3, 2.0, C, dtype=F64) if weighted else None
    kwargs = dict(reduction=reduction, label_smoothing=smoothing, weight=weight)
    return z, target, kwargs


@pytest.mark.parametrize("reduction,smoothing,weighted,kind,shape", OPTIONS)
def test_alpha_one_reproduces_cross_entropy(reduction, smoothing, weighted, kind, shape):
    z, target, kw = _case(reduction, smoothing, weighted, kind, shape)
    loss = power_grad_cross_entropy(z, target, 1.0, **kw)
    ref = F.cross_entropy(z, target, **kw)
    assert torch.equal(loss, ref), "forward must be exactly F.cross_entropy"
    g, g_ref = _grad(loss, z), _grad(ref, z)
    assert g.dtype == F64 and g.shape == z.shape
    assert torch.equal(g, g_ref), "alpha = 1 must be the ordinary gradient bit for bit"


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"weight": True}, {"reduction": "sum"}])
def test_alpha_one_is_bitwise_cross_entropy(dtype, kw):
    """Was a few ulp off (closed form instead of F.cross_entropy's own backward)."""
    gen = torch.Generator().manual_seed(5)
    z = (3 * torch.randn(64, 10, generator=gen, dtype=dtype)).requires_grad_()
    y = torch.randint(0, 10, (64,), generator=gen)
    if kw.get("weight"):
        kw = {"weight": torch.rand(10, generator=gen, dtype=dtype) + 0.5}
    (g,) = torch.autograd.grad(power_grad_cross_entropy(z, y, 1.0, **kw), z)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(z, y, **kw), z)
    assert torch.equal(g, g_ref)
    (g_mod,) = torch.autograd.grad(PowerGradCrossEntropy(1.0, **dict(kw.items()))(z, y), z)
    assert torch.equal(g_mod, g_ref)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.25, 0.6])
@pytest.mark.parametrize("reduction,smoothing,weighted,kind,shape", OPTIONS[::5])
def test_pgt_gradient_is_surrogate_gradient(alpha, reduction, smoothing, weighted, kind, shape):
    z, target, kw = _case(reduction, smoothing, weighted, kind, shape)
    g = _grad(power_grad_cross_entropy(z, target, alpha, **kw), z)
    if alpha > 0:
        g_ref = _grad(F.cross_entropy(alpha * z, target, **kw) / alpha, z)
    else:  # limit alpha -> 0: the CE gradient at zero logits (uniform prediction)
        zero = torch.zeros_like(z, requires_grad=True)
        g_ref = _grad(F.cross_entropy(zero, target, **kw), zero)
    assert (g - g_ref).abs().max().item() <= 1e-12
    if alpha < 1 and kind == "hard":
        g_plain = _grad(F.cross_entropy(z, target, **kw), z)
        assert (g - g_plain).abs().max().item() > 1e-3, "PGT must actually change the gradient"


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.7])
@pytest.mark.parametrize("reduction,smoothing,weighted,kind,shape", OPTIONS[::7])
def test_double_backward_equals_surrogate(alpha, reduction, smoothing, weighted, kind, shape):
    """create_graph=True: Hessian-vector products, and derivatives with respect to the incoming
    gradient, equal the surrogate's (was a graph-less gradient: @once_differentiable)."""
    z, target, kw = _case(reduction, smoothing, weighted, kind, shape)
    gen = torch.Generator().manual_seed(6)
    v = torch.randn(z.shape, generator=gen, dtype=F64)
    results = []
    for loss_fn in (lambda x: power_grad_cross_entropy(x, target, alpha, **kw),
                    lambda x: F.cross_entropy(alpha * x, target, **kw) / alpha):
        loss = loss_fn(z)
        up = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(7), dtype=F64) + 0.5).requires_grad_()
        (g,) = torch.autograd.grad(loss, z, up, create_graph=True)
        assert g.requires_grad
        hv, dup = torch.autograd.grad((g * v).sum(), (z, up))
        results.append((g.detach(), hv, dup))
    (g, hv, dup), (g_ref, hv_ref, dup_ref) = results
    assert (g - g_ref).abs().max().item() <= 1e-12
    assert (hv - hv_ref).abs().max().item() <= 1e-12 and hv_ref.abs().max() > 0
    assert (dup - dup_ref).abs().max().item() <= 1e-12


def test_double_backward_alpha_zero_is_the_limit():
    """At alpha = 0 the gradient is constant in z: its derivative is 0 (the limit of alpha J)."""
    z = _inputs()
    y = _hard_target((N,), ignore=True)
    (g,) = torch.autograd.grad(power_grad_cross_entropy(z, y, 0.0), z, create_graph=True)
    (h,) = torch.autograd.grad((g * torch.randn_like(g)).sum(), z, allow_unused=True)
    assert h is None or torch.equal(h, torch.zeros_like(h))


def test_gradient_penalty_training_matches_surrogate():
    """An input-gradient penalty through the loss (double backward into the parameters)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, C)).double()
    x = torch.randn(10, 6, dtype=F64, requires_grad=True)
    y = torch.randint(0, C, (10,))
    grads = []
    for loss_fn in (lambda z: power_grad_cross_entropy(z, y, 0.3), lambda z: F.cross_entropy(0.3 * z, y) / 0.3):
        net.zero_grad()
        loss = loss_fn(net(x))
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + gx.pow(2).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-13


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_alpha_zero_with_masked_logits(reduction):
    """-inf (masked) logits at alpha = 0: the alpha -> 0+ limit, uniform over the finite classes
    minus q, 0 on masked ones (was 0 * -inf = NaN); the logits form agrees."""
    z = _inputs((4, C)).detach()
    z[:, 3] = -math.inf
    z[1, 0] = -math.inf
    z.requires_grad_()
    y = torch.tensor([0, 1, 2, 4])
    (g,) = torch.autograd.grad(power_grad_cross_entropy(z, y, 0.0, reduction=reduction).sum(), z)
    finite = torch.isfinite(z.detach()).to(F64)
    expected = finite / finite.sum(1, keepdim=True) - F.one_hot(y, C).to(F64)
    if reduction == "mean":
        expected = expected / 4
    assert torch.equal(g, expected)
    (g_tiny,) = torch.autograd.grad(power_grad_cross_entropy(z, y, 1e-9, reduction=reduction).sum(), z)
    assert (g - g_tiny).abs().max().item() <= 1e-8  # continuous at alpha = 0
    zz = z.detach().clone().requires_grad_()
    F.cross_entropy(power_grad_logits(zz, 0.0), y, reduction=reduction).sum().backward()
    assert torch.allclose(zz.grad, expected, rtol=0, atol=1e-15)


def test_explicit_formula_hard_targets():
    """softmax(alpha z) - onehot, averaged over the batch, written out by hand."""
    z = _inputs()
    y = _hard_target((N,), ignore=False)
    loss = power_grad_cross_entropy(z, y, 0.25)
    (g,) = torch.autograd.grad(loss, z)
    e = torch.exp(0.25 * z.detach())
    p = e / e.sum(1, keepdim=True)
    expected = (p - F.one_hot(y, C).to(F64)) / N
    assert (g - expected).abs().max().item() <= 1e-15


@pytest.mark.parametrize("scale", [1.0, 1024.0, 65536.0 * 4, 1e-3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_scale_multiplies_gradient(scale, reduction):
    z = _inputs()
    y = _hard_target((N,), ignore=True)
    w = torch.linspace(0.5, 1.5, C, dtype=F64)
    loss = power_grad_cross_entropy(z, y, 0.3, weight=w, reduction=reduction, label_smoothing=0.1)
    loss = loss.sum()
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (gs,) = torch.autograd.grad(loss * scale, z)
    assert torch.allclose(gs, scale * g1, rtol=1e-13, atol=0)
    assert g1.abs().max() > 0


def test_all_rows_ignored_matches_cross_entropy():
    z = _inputs()
    y = torch.full((N,), -100)
    loss = power_grad_cross_entropy(z, y, 0.25)
    assert math.isnan(loss.item()) and math.isnan(F.cross_entropy(z, y).item())
    (g,) = torch.autograd.grad(loss, z)
    assert torch.equal(g, torch.zeros_like(g))


def test_custom_ignore_index():
    z = _inputs()
    y = torch.tensor([0, 1, 2, 3, 4, 2, 2])
    g = _grad(power_grad_cross_entropy(z, y, 0.4, ignore_index=2), z)
    g_ref = _grad(F.cross_entropy(0.4 * z, y, ignore_index=2) / 0.4, z)
    assert (g - g_ref).abs().max().item() <= 1e-12
    assert torch.equal(g[y == 2], torch.zeros_like(g[y == 2]))


def test_module_matches_functional_and_state_dict():
    w = torch.linspace(0.5, 1.5, C, dtype=F64)
    crit = PowerGradCrossEntropy(0.25, label_smoothing=0.1, weight=w, ignore_index=3)
    z = _inputs()
    y = _hard_target((N,), ignore=False)
    g_mod = _grad(crit(z, y), z)
    g_fun = _grad(power_grad_cross_entropy(z, y, 0.25, weight=w, label_smoothing=0.1, ignore_index=3), z)
    assert torch.equal(g_mod, g_fun)
    assert "weight" in crit.state_dict()
    assert "alpha=0.25" in repr(crit)


def test_autocast_bf16_uses_float32_math():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, C)
    x = torch.randn(N, 16)
    y = _hard_target((N,), ignore=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        logits.retain_grad()
        loss = power_grad_cross_entropy(logits, y, 0.25, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    ref_loss = F.cross_entropy(logits.detach().double(), y, label_smoothing=0.1)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    (loss * 512.0).backward()
    g = logits.grad
    assert g.dtype == torch.bfloat16
    z64 = logits.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(512.0 * F.cross_entropy(0.25 * z64, y, label_smoothing=0.1) / 0.25, z64)
    # only the final rounding to bfloat16 (2^-8 relative) may differ
    err = (g.double() - ref).abs()
    assert bool((err <= 2.0**-8 * ref.abs() + 1e-30).all()), err.max()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


def test_float32_inputs_stay_float32():
    z = _inputs().detach().float().requires_grad_()
    y = _hard_target((N,), ignore=False)
    loss = power_grad_cross_entropy(z, y, 0.5)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, z)
    assert g.dtype == torch.float32


@pytest.mark.parametrize(
    "alpha", [-0.1, 1.0001, 2, float("nan"), float("inf"), True, "x", "0.5", None, [0.5], torch.tensor([0.1, 0.2])]
)
def test_bad_alpha_rejected(alpha):
    z = _inputs()
    y = _hard_target((N,), ignore=False)
    with pytest.raises(ValueError, match="alpha"):
        power_grad_cross_entropy(z, y, alpha)
    with pytest.raises(ValueError, match="alpha"):
        PowerGradCrossEntropy(alpha)
    with pytest.raises(ValueError, match="alpha"):
        power_grad_logits(z, alpha)


def test_alpha_tensor_requiring_grad_rejected():
    """alpha would silently get no gradient: rejected with a clear message."""
    z = _inputs()
    y = _hard_target((N,), ignore=False)
    a = torch.tensor(0.3, requires_grad=True)
    for call in (lambda: power_grad_cross_entropy(z, y, a), lambda: PowerGradCrossEntropy(a),
                 lambda: power_grad_logits(z, a), lambda: PowerGradLogits(a)):
        with pytest.raises(ValueError, match="requires grad"):
            call()
    # accepted: plain reals, NumPy scalars, one-element tensors without grad
    import numpy as np

    for ok in (0.3, 1, np.float32(0.3), torch.tensor(0.3), torch.tensor([0.3])):
        assert PowerGradCrossEntropy(ok).alpha == pytest.approx(0.3 if ok != 1 else 1.0)


def test_bad_loss_arguments_rejected():
    z = _inputs()
    y = _hard_target((N,), ignore=False)
    with pytest.raises(ValueError, match="reduction"):
        power_grad_cross_entropy(z, y, 0.5, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        PowerGradCrossEntropy(0.5, label_smoothing=1.5)
    soft = _soft_target((N, C)).requires_grad_()
    with pytest.raises(ValueError, match="target"):
        power_grad_cross_entropy(z, soft, 0.5)
    with pytest.raises(ValueError, match="floating"):
        power_grad_cross_entropy(torch.ones(N, C, dtype=torch.long), y, 0.5)


# ----------------------------------------------------------------------- logits form
def _logits_grad(z, target, alpha, loss_scale=1.0, scale=None, **kw):
    z = z.detach().clone().requires_grad_()
    out = power_grad_logits(z, alpha, scale=scale)
    (g,) = torch.autograd.grad(loss_scale * F.cross_entropy(out, target, **kw), z)
    return g


@pytest.mark.parametrize("alpha", [0.05, 0.25, 0.7])
@pytest.mark.parametrize("loss_scale", [1.0, 1000.0, 2.0**20])
@pytest.mark.parametrize("weighted", [False, True])
def test_logits_transform_recovers_scale(alpha, loss_scale, weighted):
    z = _inputs(seed=4)
    y = _hard_target((N,), ignore=True)
    kw = {"weight": torch.linspace(0.3, 2.0, C, dtype=F64)} if weighted else {}
    g = _logits_grad(z, y, alpha, loss_scale, **kw)
    ref = surrogate_grad(z, y, alpha, loss_scale, **kw)
    assert (g - ref).abs().max().item() <= 1e-12 * loss_scale


def test_logits_transform_alpha_one_is_identity():
    z = _inputs()
    y = _soft_target((N, C))  # no assumption needed at alpha = 1
    g = _logits_grad(z, y, 1.0, label_smoothing=0.3)
    zz = z.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(F.cross_entropy(zz, y, label_smoothing=0.3), zz)
    assert torch.equal(g, ref)


def test_logits_transform_explicit_scale_with_soft_targets():
    z = _inputs()
    q = _soft_target((N, C))
    g = _logits_grad(z, q, 0.3, loss_scale=256.0, scale=256.0 / N, label_smoothing=0.1)
    ref = surrogate_grad(z, q, 0.3, loss_scale=256.0, label_smoothing=0.1)
    assert (g - ref).abs().max().item() <= 1e-12 * 256


def test_logits_transform_per_row_scale():
    z = _inputs()
    y = _hard_target((N,), ignore=False)
    w = torch.linspace(0.3, 2.0, C, dtype=F64)
    row_scale = w[y] / w[y].sum()  # weighted mean: s_n = w_{y_n} / sum_m w_{y_m}
    g = _logits_grad(z, y, 0.25, scale=row_scale, weight=w, label_smoothing=0.0)
    assert (g - surrogate_grad(z, y, 0.25, weight=w)).abs().max().item() <= 1e-12


def test_logits_transform_rejects_label_smoothing_without_scale():
    z = _inputs()
    y = _hard_target((N,), ignore=False)
    with pytest.raises(PGTAssumptionError, match="scale="):
        _logits_grad(z, y, 0.25, label_smoothing=0.1)


def test_logits_transform_rejects_non_cross_entropy_gradient():
    z = _inputs().detach().requires_grad_()
    out = power_grad_logits(z, 0.5)
    with pytest.raises(PGTAssumptionError):
        (out**2).sum().backward()
    z2 = _inputs().detach().requires_grad_()
    # a scale below the true one (1/N here) makes s*p - g negative somewhere: caught
    # (a too large scale is not detectable: s*p - g stays non-negative)
    with pytest.raises(PGTAssumptionError):
        out2 = power_grad_logits(z2, 0.5, scale=1e-3)
        F.cross_entropy(out2, _hard_target((N,), ignore=False)).backward()


def test_logits_transform_input_validation():
    with pytest.raises(PGTAssumptionError, match=r"\(N, C\)"):
        power_grad_logits(torch.randn(2, C, 3, requires_grad=True), 0.5)
    assert issubclass(PGTAssumptionError, ReparamError) and issubclass(PGTAssumptionError, ValueError)
    with pytest.raises(ValueError, match="scale"):
        power_grad_logits(torch.randn(N, C), 0.5, scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        power_grad_logits(torch.randn(N, C), 0.5, scale=torch.ones(N + 1))
    with pytest.raises(ValueError, match="logits"):
        power_grad_logits(torch.ones(N, C, dtype=torch.long), 0.5)


def test_logits_module_autocast_bf16():
    torch.manual_seed(1)
    layer = torch.nn.Linear(16, C)
    pgt = PowerGradLogits(0.25)
    x = torch.randn(N, 16)
    y = _hard_target((N,), ignore=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        logits.retain_grad()
        loss = F.cross_entropy(pgt(logits), y)
    (loss * 4096.0).backward()
    z64 = logits.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(4096.0 * F.cross_entropy(0.25 * z64, y) / 0.25, z64)
    g = logits.grad.double()
    # bf16 incoming gradient (2^-8 relative per entry) -> error bounded by a few ulps of |s|
    assert (g - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


# ----------------------------------------------------------------------- AGC
def test_agc_clips_unitwise():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    conv.weight.grad = torch.randn_like(conv.weight)
    conv.weight.grad[0] *= 1e-6  # a unit below the threshold stays untouched
    conv.bias.grad = torch.randn_like(conv.bias)
    w_before, g_before = conv.weight.detach().clone(), conv.weight.grad.clone()
    b_grad_before = conv.bias.grad.clone()
    adaptive_grad_clip_(conv.parameters(), clip_factor=0.01, eps=1e-3)
    w_norm = w_before.flatten(1).norm(dim=1).clamp_min(1e-3)
    g_norm = g_before.flatten(1).norm(dim=1)
    new_norm = conv.weight.grad.flatten(1).norm(dim=1)
    for i in range(4):
        limit = 0.01 * w_norm[i]
        if g_norm[i] > limit:
            assert abs(new_norm[i] - limit) <= 1e-6 * limit
            cos = F.cosine_similarity(conv.weight.grad[i].flatten(), g_before[i].flatten(), dim=0)
            assert cos > 1 - 1e-6
        else:
            assert torch.equal(conv.weight.grad[i], g_before[i])
    assert torch.equal(conv.weight.grad[0], g_before[0])
    bias_limit = 0.01 * max(conv.bias.detach().norm().item(), 1e-3)
    assert abs(conv.bias.grad.norm().item() - min(bias_limit, b_grad_before.norm().item())) <= 1e-6


def test_agc_float64_norms_in_float64():
    """Was computed in float32 for float64 parameters (clipped norm off by ~1e-8)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 5, dtype=F64))
    p.grad = torch.randn(4, 5, dtype=F64)
    adaptive_grad_clip_([p], clip_factor=0.01)
    assert p.grad.dtype == F64
    ratio = p.grad.norm(dim=1) / (0.01 * p.detach().norm(dim=1))
    assert (ratio - 1).abs().max().item() <= 1e-14
    h = torch.nn.Parameter(torch.randn(4, 5).half())  # half: still computed in float32
    h.grad = torch.randn(4, 5).half()
    adaptive_grad_clip_([h], clip_factor=0.01)
    assert h.grad.dtype == torch.float16 and torch.isfinite(h.grad).all()


def test_agc_eps_floor_and_validation():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.ones(2, 3)
    adaptive_grad_clip_([p], clip_factor=0.1, eps=1e-2)
    assert torch.allclose(p.grad.norm(dim=1), torch.full((2,), 1e-3))
    q = torch.nn.Parameter(torch.ones(3))  # no grad: skipped
    adaptive_grad_clip_(q)
    assert q.grad is None
    with pytest.raises(ValueError, match="clip_factor"):
        adaptive_grad_clip_([p], clip_factor=0.0)
    with pytest.raises(ValueError, match="eps"):
        adaptive_grad_clip_([p], eps=-1.0)

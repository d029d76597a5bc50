"""The logits transform ``power_grad_logits``: non-finite and zero rows, scale recovery at low
precision (recover within the stated tolerance, or raise), what explicit ``scale=`` checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import surrogate_grad

from reparam.errors import PGTAssumptionError
from reparam.pgt import power_grad_cross_entropy, power_grad_logits
from reparam.pgt.logits import _DEFAULT_RTOL

F64 = torch.float64


def _logits(n: int, c: int, seed: int = 0, dtype: torch.dtype = F64, margin: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, c, generator=gen, dtype=F64)
    y = torch.randint(0, c, (n,), generator=gen)
    z[torch.arange(n), y] += margin
    return z.to(dtype), y


def _transformed(z, loss_fn, alpha=0.3, upstream=None, **kw):
    """Gradient that ``loss_fn(power_grad_logits(z))`` sends to ``z``."""
    z = z.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(power_grad_logits(z, alpha, **kw)), z, upstream)
    return g


def _surrogate(z, y, alpha=0.3, loss_scale=1.0, **kw):
    return surrogate_grad(z, y, alpha, loss_scale, dtype=torch.float64, **kw)


# ------------------------------------------------------------------ non-finite rows
def test_non_finite_upstream_passes_through_float32():
    """An inf upstream gradient (overflow) used to raise 'residual nan'; it must pass through."""
    z, y = _logits(6, 5, dtype=torch.float32)
    g = _transformed(z, lambda o: F.cross_entropy(o, y), upstream=torch.tensor(math.inf))
    zz = z.clone().requires_grad_()
    (plain,) = torch.autograd.grad(F.cross_entropy(zz, y), zz, torch.tensor(math.inf))
    assert torch.equal(g.isnan(), plain.isnan()) and torch.equal(g[~g.isnan()], plain[~plain.isnan()])


def test_fp16_overflow_rows_pass_through_and_finite_rows_are_transformed():
    """GradScaler-style overflow in some rows of a float16 gradient: those rows come back
    untouched (so the scaler can skip the step), the others are transformed."""
    z, y = _logits(8, 6, seed=1)
    zh = z.half()
    upstream = torch.ones(8, dtype=torch.float32)
    upstream[[2, 5]] = math.inf  # per-row loss weights, two overflowing
    g = _transformed(zh, lambda o: (F.cross_entropy(o.float(), y, reduction="none") * upstream).sum())
    assert g.dtype == torch.float16
    assert not torch.isfinite(g[[2, 5]]).all(dim=1).any()
    keep = [0, 1, 3, 4, 6, 7]
    ref = _surrogate(zh, y, reduction="sum")  # the rows kept have weight 1
    assert torch.isfinite(g[keep]).all()
    assert (g[keep].double() - ref[keep]).abs().max().item() <= 2e-3


# ------------------------------------------------------------------ zero rows, explicit scale
def test_explicit_scale_ignored_rows_stay_zero():
    """With scale=S/(non-ignored rows), ignored rows used to get s (p' - p) != 0."""
    z, y = _logits(6, 5)
    y[:2] = -100
    g = _transformed(z, lambda o: F.cross_entropy(o, y, label_smoothing=0.1), scale=1.0 / 4)
    assert torch.equal(g[:2], torch.zeros_like(g[:2]))
    ref = _surrogate(z, y, label_smoothing=0.1)
    assert (g - ref).abs().max().item() <= 1e-15
    # a per-row scale with 0 on the ignored rows is the same
    row_scale = torch.tensor([0.0, 0.0, 0.25, 0.25, 0.25, 0.25], dtype=F64)
    g2 = _transformed(z, lambda o: F.cross_entropy(o, y, label_smoothing=0.1), scale=row_scale)
    assert torch.equal(g, g2)


# ------------------------------------------------------------------ scale recovery
def test_masked_class_and_confident_prediction_float32():
    """The true-class gradient rounds to exactly 0 and tied with a masked class: argmin picked
    the masked class and raised.  Now the target is found and the result is right."""
    z = torch.tensor([[-math.inf, 30.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    y = torch.tensor([1, 3])
    g = _transformed(z, lambda o: F.cross_entropy(o, y))
    assert (g.double() - _surrogate(z, y)).abs().max().item() <= 1e-6
    assert float(g[0, 0]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("margin", [0.0, 6.0, 10.0, 14.0, 22.0, 40.0])
@pytest.mark.parametrize("loss_scale", [1.0, 1024.0, 65536.0])
def test_low_precision_recovers_within_tolerance_or_raises(dtype, margin, loss_scale):
    """Autocast-like: low-precision logits, cross-entropy in float32, gradient cast back.
    Either the result is within the documented tolerance (rtol x the row scale, entry-wise,
    plus one rounding of the output) or PGTAssumptionError explains why it cannot be.
    float16 used to return 11 % errors silently (margin 10) or raise '|scale| 0' (margin 14)."""
    n, c, alpha = 256, 10, 0.3
    z, y = _logits(n, c, seed=2, dtype=torch.float32, margin=margin)
    zl = z.to(dtype)
    try:
        g = _transformed(zl, lambda o: loss_scale * F.cross_entropy(o.float(), y), alpha)
    except PGTAssumptionError as err:
        msg = str(err)
        # bfloat16 has float32's range; float16 with GradScaler's scale handles margins to 14
        must_work = dtype != torch.float16 or margin == 0.0 or (loss_scale == 65536.0 and margin <= 14.0)
        assert not must_work, msg
        assert ("cannot be recovered" in msg or "underflow" in msg) and "power_grad_cross_entropy" in msg
        return
    ref = _surrogate(zl, y, alpha, loss_scale)
    s = loss_scale / n
    err = (g.double() - ref).abs() - torch.finfo(dtype).eps * ref.abs()
    assert err.max().item() <= _DEFAULT_RTOL[dtype] * s


def test_fp16_underflowed_row_raises_with_a_clear_reason():
    """A confident row whose float16 gradient underflowed to exactly zero while its PGT gradient
    would not: unrecoverable (it looks like an ignored row), so it raises."""
    z, y = _logits(16, 10, seed=3, dtype=torch.float32)
    z[0, y[0]] += 40.0  # gradient of row 0 ~ e^-40 / 16: 0 in float16
    zh = z.half()
    with pytest.raises(PGTAssumptionError, match="exactly zero.*underflow.*power_grad_cross_entropy"):
        _transformed(zh, lambda o: F.cross_entropy(o.float(), y))
    # the loss form has no such limit
    zz = zh.clone().requires_grad_()
    (g,) = torch.autograd.grad(power_grad_cross_entropy(zz, y, 0.3), zz)
    assert float(g[0].abs().max()) > 0


def test_ignored_rows_are_not_mistaken_for_underflow():
    """Rows ignored via ignore_index are zero and stay zero when nothing suggests underflow."""
    z, y = _logits(8, 5, seed=4)
    y[[1, 4]] = -100
    g = _transformed(z, lambda o: 1000.0 * F.cross_entropy(o, y))
    assert torch.equal(g[[1, 4]], torch.zeros_like(g[[1, 4]]))
    assert (g - _surrogate(z, y, loss_scale=1000.0)).abs().max().item() <= 1e-12
    y[:] = -100  # a batch with every row ignored: zero in, zero out
    assert torch.equal(_transformed(z, lambda o: F.cross_entropy(o, y, reduction="sum")), torch.zeros_like(z))


# ------------------------------------------------------------------ what is checked
def test_auto_mode_accepts_losses_of_the_true_class_probability():
    """Focal loss has gradient s (p - e_y) with s = -l'(p_y) p_y: accepted, and the result is
    s (p' - e_y), the loss's own per-row weight times the PGT direction."""
    z, y = _logits(8, 5, seed=5)
    gamma, alpha = 2.0, 0.3

    def focal(o):
        py = F.softmax(o, 1).gather(1, y[:, None]).squeeze(1)
        return (-((1 - py) ** gamma) * py.log()).sum()

    g = _transformed(z, focal, alpha)
    p = torch.softmax(z, 1)
    py = p[torch.arange(8), y]
    s = (1 - py) ** gamma - gamma * (1 - py) ** (gamma - 1) * py * py.log()  # -l'(p_y) p_y
    expected = s[:, None] * (torch.softmax(alpha * z, 1) - F.one_hot(y, 5).to(F64))
    assert (g - expected).abs().max().item() <= 1e-12


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_auto_mode_rejects_other_losses(dtype):
    z, y = _logits(16, 10, seed=6, dtype=dtype)
    for loss_fn in (
        lambda o: F.cross_entropy(o / 2, y),  # temperature
        lambda o: F.cross_entropy(o, y, label_smoothing=1e-3),
        lambda o: F.mse_loss(F.softmax(o, 1), F.one_hot(y, 10).to(o.dtype)),
        lambda o: -F.cross_entropy(o, y),  # negative scale
        lambda o: F.cross_entropy(o, y) + 1e-4 * o.pow(2).mean(),
    ):
        with pytest.raises(PGTAssumptionError, match="does not fit"):
            _transformed(z, loss_fn)


def test_explicit_scale_recovers_q_and_checks_it_is_a_distribution():
    z, y = _logits(16, 10, seed=7)
    ce = lambda o: F.cross_entropy(o, y)  # noqa: E731
    # a too small scale makes q = p - g/s negative: caught
    with pytest.raises(PGTAssumptionError, match="implied q"):
        _transformed(z, ce, scale=0.5 / 16)
    # a gradient that does not sum to zero over classes: caught
    with pytest.raises(PGTAssumptionError, match="implied q"):
        _transformed(z, lambda o: F.binary_cross_entropy_with_logits(o, F.one_hot(y, 10).to(F64)), scale=1 / 16)
    # documented as undetectable: a too large scale (q is a mixture of p and e_y) and MSE on the
    # softmax (q = p - g/s is still a distribution); the result is s (p' - q) for that q
    for loss_fn, s in ((ce, 2.0 / 16), (lambda o: F.mse_loss(F.softmax(o, 1), F.one_hot(y, 10).to(F64)), 1 / 16)):
        zz = z.clone().requires_grad_()
        (g_in,) = torch.autograd.grad(loss_fn(zz), zz)
        q = torch.softmax(z, 1) - g_in / s
        assert bool((q >= 0).all()) and torch.allclose(q.sum(1), torch.ones(16, dtype=F64))
        g = _transformed(z, loss_fn, scale=s)
        assert (g - s * (torch.softmax(0.3 * z, 1) - q)).abs().max().item() <= 1e-15


def test_double_backward_raises_clearly():
    """The logits form's gradient cannot be differentiated: a clear error, never a silent one."""
    z, y = _logits(6, 5, seed=8)
    z.requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(power_grad_logits(z, 0.5), y), z, create_graph=True)
    assert torch.allclose(g, _surrogate(z, y, 0.5), rtol=0, atol=1e-15)
    with pytest.raises(RuntimeError, match="power_grad_logits does not support double backward"):
        torch.autograd.grad((g**2).sum(), z)
    net = torch.nn.Linear(4, 5).double()
    x = torch.randn(6, 4, dtype=F64, requires_grad=True)
    loss = F.cross_entropy(power_grad_logits(net(x), 0.5), y)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="power_grad_cross_entropy"):
        (loss + gx.pow(2).sum()).backward()

"""The paper's analytical claims (§3-§4.2) as properties over random distributions and alpha."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reparam.pgt import (
    logit_gradient_bounds,
    pgt_logit_gradient,
    power_grad_cross_entropy,
    power_transform,
    stationary_threshold,
)
from verification.pgt.strategies import alpha_pairs, alphas, distributions, distributions_with_label, open_alphas

MARGIN = 1e-6  # entries this close (relatively) to the threshold are not classified
TINY = torch.finfo(torch.float64).tiny  # below this (subnormals) only ~1 ulp of 5e-324 is resolvable
ETA = 4 * TINY * torch.finfo(torch.float64).eps  # a few subnormal ulps: absolute slack


def _direct_threshold(p: torch.Tensor, alpha: float) -> float:
    """Textbook evaluation of (sum over the support of p**alpha)**(1/(alpha-1)), valid away
    from alpha = 1."""
    return float(torch.sum(p[p > 0] ** alpha) ** (1.0 / (alpha - 1.0)))


def _entropy(p: torch.Tensor) -> float:
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


@given(distributions(), alphas(0.0, 0.95))
def test_threshold_matches_its_definition(p, alpha):
    t = float(stationary_threshold(p, alpha))
    assert math.isclose(t, _direct_threshold(p, alpha), rel_tol=1e-11)


@given(distributions())
def test_threshold_limit_at_alpha_one_is_exp_minus_entropy(p):
    t1 = float(stationary_threshold(p, 1.0))
    assert math.isclose(t1, math.exp(-_entropy(p)), rel_tol=1e-12)
    near = float(stationary_threshold(p, 1.0 - 1e-9))
    assert math.isclose(near, t1, rel_tol=1e-7)  # continuous, no cancellation blow-up


@given(distributions(), alphas())
def test_transform_is_a_distribution_equal_to_softmax_of_scaled_logits(p, alpha):
    q = power_transform(p, alpha)
    assert math.isclose(float(q.sum()), 1.0, rel_tol=1e-12)
    assert bool((q >= 0).all())
    if alpha > 0:
        direct = p**alpha / (p**alpha).sum()
        assert torch.allclose(q, direct, rtol=1e-10, atol=0)


@given(distributions(), open_alphas())
def test_lemma1_grows_iff_below_threshold(p, alpha):
    """Strictly, for entries resolvable in float64; zeros stay zero (0**alpha = 0)."""
    t = float(stationary_threshold(p, alpha))
    q = power_transform(p, alpha)
    for pi, qi in zip(p.tolist(), q.tolist()):
        if pi == 0.0:
            assert qi == 0.0
        elif pi < TINY:  # subnormal: only the non-strict inequality is representable
            assert qi >= pi - ETA
        elif abs(pi - t) <= MARGIN * t:
            continue
        elif pi < t:
            assert qi > pi
        else:
            assert qi < pi


@given(distributions(), alphas())
def test_transformed_value_lies_between_p_and_threshold(p, alpha):
    t = float(stationary_threshold(p, alpha))
    q = power_transform(p, alpha)
    tol = 1e-12
    lo = torch.minimum(p, torch.tensor(t, dtype=p.dtype))
    hi = torch.maximum(p, torch.tensor(t, dtype=p.dtype))
    assert bool((q >= lo * (1 - tol) - ETA).all()) and bool((q <= hi * (1 + tol) + ETA).all())


@given(distributions(), alphas())
def test_threshold_lies_within_the_distribution_range(p, alpha):
    t = float(stationary_threshold(p, alpha))
    assert float(p.min()) * (1 - 1e-12) <= t <= float(p.max()) * (1 + 1e-12)


@given(distributions())
def test_proposition1_alpha_zero_is_uniform_over_the_support(p):
    """alpha -> 0+: uniform over {p_i > 0} (1/C without zeros), threshold 1/|support|."""
    support = p > 0
    k = int(support.sum())
    expected = support.to(p.dtype) / k
    assert torch.allclose(power_transform(p, 0.0), expected, rtol=1e-14, atol=0)
    assert math.isclose(float(stationary_threshold(p, 0.0)), 1.0 / k, rel_tol=1e-12)
    # continuity: alpha = 1e-12 is already (numerically) the limit
    assert torch.allclose(power_transform(p, 1e-12), expected, rtol=1e-8, atol=0)
    assert math.isclose(float(stationary_threshold(p, 1e-12)), 1.0 / k, rel_tol=1e-8)


@given(distributions(), alpha_pairs())
def test_theorem1_threshold_non_decreasing_in_alpha(p, pair):
    a1, a2 = pair
    assert float(stationary_threshold(p, a1)) <= float(stationary_threshold(p, a2)) * (1 + 1e-10)


@given(distributions(), alpha_pairs())
def test_smoothing_entropy_non_increasing_in_alpha(p, pair):
    a1, a2 = pair
    assert _entropy(power_transform(p, a1)) >= _entropy(power_transform(p, a2)) - 1e-10


@given(distributions(), alphas())
def test_transform_preserves_order(p, alpha):
    q = power_transform(p, alpha)
    order = torch.argsort(p)
    sp, sq = p[order], q[order]
    assert bool((sq[1:] >= sq[:-1] * (1 - 1e-12)).all())
    if alpha >= 1e-3:  # strictly increasing where p is (clearly, and resolvably) increasing
        strict = (sp[1:] > sp[:-1] * (1 + 1e-9)) & (sp[:-1] >= TINY)
        assert bool((sq[1:][strict] > sq[:-1][strict]).all())


@given(distributions_with_label(), open_alphas())
def test_section_4_2_gradient_cases(p_y, alpha):
    """§4.2 with a one-hot label: |dL/dz| moves towards the threshold.

    true class below T (wrong prediction): |p'_y - 1| < |p_y - 1| (the near-1 derivative shrinks);
    true class above T: |p'_y - 1| > |p_y - 1| (the near-0 derivative grows);
    other class above T: p'_j < p_j; other class below T: p'_k > p_k (the near-0 one grows).
    """
    p, y = p_y
    t = float(stationary_threshold(p, alpha))
    q = F.one_hot(torch.tensor(y), p.shape[0]).to(p.dtype)
    g_old = (p - q).abs()
    g_new = pgt_logit_gradient(p, q, alpha).abs()
    p_new = power_transform(p, alpha)
    for i in range(p.shape[0]):
        pi = float(p[i])
        if pi < TINY:  # zeros stay zero, subnormals are not resolvable: non-strict only
            assert g_new[i] >= min(g_old[i], abs(t - float(q[i]))) - ETA
            continue
        if abs(pi - t) <= MARGIN * t:
            continue
        if i == y:  # |p'_y - 1| < |p_y - 1|  <=>  p'_y > p_y (resolvable in float near 1)
            assert (p_new[i] > p[i]) if pi < t else (p_new[i] < p[i])
        else:
            assert (g_new[i] < g_old[i]) if pi > t else (g_new[i] > g_old[i])


@given(distributions_with_label(), alphas())
def test_section_4_2_bounds_hold(p_y, alpha):
    p, y = p_y
    q = F.one_hot(torch.tensor(y), p.shape[0]).to(p.dtype)
    lower, upper = logit_gradient_bounds(p, q, alpha)
    g = pgt_logit_gradient(p, q, alpha).abs()
    tol = 1e-12
    assert bool((g >= lower - tol).all()) and bool((g <= upper + tol).all())
    assert bool((upper <= 1.0).all())


@settings(max_examples=10)
@given(distributions_with_label(max_classes=8), alphas())
def test_theory_gradient_equals_loss_backward(p_y, alpha):
    p, y = p_y
    z = p.log().clone().requires_grad_()
    loss = power_grad_cross_entropy(z.unsqueeze(0), torch.tensor([y]), alpha, reduction="sum")
    (g,) = torch.autograd.grad(loss, z)
    q = F.one_hot(torch.tensor(y), p.shape[0]).to(p.dtype)
    assert torch.allclose(g, pgt_logit_gradient(p, q, alpha), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [-0.5, 1.5, float("nan")])
def test_theory_rejects_bad_alpha(bad):
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha"):
        stationary_threshold(p, bad)
    with pytest.raises(ValueError, match="alpha"):
        power_transform(p, bad)


def test_theory_rejects_bad_distributions():
    with pytest.raises(ValueError, match="non-negative"):
        power_transform(torch.tensor([0.5, -0.1, 0.6]), 0.5)
    with pytest.raises(ValueError, match="class"):
        stationary_threshold(torch.tensor(0.5), 0.5)


def test_zero_probabilities():
    p = torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)
    assert float(power_transform(p, 0.5)[2]) == 0.0
    # alpha = 0 is the limit alpha -> 0+: the zero class stays 0, uniform over the support
    assert torch.equal(power_transform(p, 0.0), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert math.isclose(float(stationary_threshold(p, 0.5)), (0.6**0.5 + 0.4**0.5) ** -2, rel_tol=1e-12)
    assert math.isclose(float(stationary_threshold(p, 0.0)), 1 / 2, rel_tol=1e-12)


def test_alpha_zero_consistent_with_the_loss_on_masked_logits():
    """power_transform(softmax(z), 0) == the loss's alpha = 0 prediction on masked logits."""
    z = torch.tensor([[0.3, -1.0, -math.inf, 2.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(power_grad_cross_entropy(z, torch.tensor([0]), 0.0, reduction="sum"), z)
    q = F.one_hot(torch.tensor([0]), 4).to(torch.float64)
    expected = pgt_logit_gradient(torch.softmax(z.detach(), dim=1), q, 0.0)
    assert torch.equal(g, expected) and float(g[0, 2]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [0.0, 1e-12, 1e-6, 0.01, 0.3, 0.999999, 1.0])
def test_threshold_robust_to_zeros_subnormals_and_peaks(dtype, alpha):
    """Was 0 instead of ~1/C at small alpha for a subnormal entry (expm1 overflow)."""
    sub = torch.finfo(dtype).tiny / 8  # a subnormal of this dtype
    cases = [
        torch.tensor([1.0, sub, 0.0], dtype=dtype),
        torch.tensor([1.0 - 1e-7, 1e-7, sub], dtype=dtype),
        torch.softmax(torch.tensor([0.0, -700.0, -740.0, -800.0], dtype=torch.float64), 0).to(dtype),
        torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype),
    ]
    for p in cases:
        t = stationary_threshold(p, alpha)
        assert t.dtype == dtype and math.isfinite(float(t))
        pos = (p[p > 0].double() / p.double().sum()).tolist()
        if alpha <= 0.99:  # the definition, in float64 (no overflow for these inputs)
            ref = sum(math.exp(alpha * math.log(v)) for v in pos) ** (1.0 / (alpha - 1.0))
            assert math.isclose(float(t), ref, rel_tol=1e-6 if dtype == torch.float32 else 1e-12)
        else:  # the definition cancels near alpha = 1: compare with the limit exp(-H)
            ref = math.exp(sum(v * math.log(v) for v in pos))
            assert math.isclose(float(t), ref, rel_tol=1e-5)
        pn, q = p.double() / p.double().sum(), F.one_hot(torch.tensor(0), p.numel()).double()
        lower, upper = logit_gradient_bounds(pn, q, alpha)
        g = pgt_logit_gradient(pn, q, alpha).abs()
        assert bool((g >= lower - 1e-12).all()) and bool((g <= upper + 1e-12).all())


@given(st.integers(2, 30))
def test_uniform_is_a_fixed_point(c):
    p = torch.full((c,), 1.0 / c, dtype=torch.float64)
    for alpha in (0.0, 0.3, 1.0):
        assert torch.allclose(power_transform(p, alpha), p, rtol=1e-13, atol=0)
        assert math.isclose(float(stationary_threshold(p, alpha)), 1.0 / c, rel_tol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_threshold_normalizes_in_float64(alpha):
    """Unnormalized float16 weights whose sum overflows float16 (was NaN)."""
    t = stationary_threshold(torch.tensor([40000.0, 40000.0], dtype=torch.float16), alpha)
    assert t.dtype == torch.float16 and float(t) == 0.5

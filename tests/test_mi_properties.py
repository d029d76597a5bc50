"""Properties of the spatial dependence S and the scaling G (issue 12, section 5)."""
from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reparam.sgs import scaling_from_dependence, spatial_dependence
from verification.strategies import examples

kernels = st.sampled_from([3, 5, (3, 5), (5, 3)])


@st.composite
def maps(draw, dtype=np.float64):
    """A (N, C, H, W) map (Gaussian, ReLU'd or not, zero-padded or not), from a drawn seed."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(6, 11)), draw(st.integers(6, 11))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.standard_normal((n, c, h, w))
    if draw(st.booleans()):
        x = np.maximum(x, 0)
    if draw(st.booleans()):
        x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    return torch.from_numpy(x.astype(dtype))


def off_centre(S: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(S, dtype=torch.bool)
    mask[(S.shape[0] - 1) // 2, (S.shape[1] - 1) // 2] = False
    return S[mask]


@settings(max_examples=examples(15))
@given(maps(np.float32), kernels, st.booleans())
def test_symmetric_centred_and_bounded(fmap, kernel, diagonal_removal):
    S = spatial_dependence(fmap, kernel, diagonal_removal=diagonal_removal)
    assert torch.equal(S, torch.flip(S, (0, 1)))  # S(d) = S(-d), exactly
    assert S[(S.shape[0] - 1) // 2, (S.shape[1] - 1) // 2] == 1.0
    finite = S[torch.isfinite(S)]
    assert bool(((finite >= 0) & (finite <= 1)).all())  # before normalisation
    if torch.isfinite(S).all():
        assert math.isclose(float(scaling_from_dependence(S).mean()), 1.0, rel_tol=1e-12)


@settings(max_examples=examples(10))
@given(maps(), kernels, st.floats(0.1, 10.0), st.floats(-10.0, 10.0), st.integers(0, 2))
def test_invariant_to_a_positive_affine_map_of_a_channel(fmap, kernel, scale, shift, channel):
    """Ranges follow the data, so ``v -> a v + b`` (a > 0) on a channel of the (padded) map keeps
    every pixel in its bin: S is unchanged up to bin-edge rounding (float64 maps: none here)."""
    channel = channel % fmap.shape[1]
    moved = fmap.clone()
    moved[:, channel] = moved[:, channel] * scale + shift
    S, S_moved = spatial_dependence(fmap, kernel), spatial_dependence(moved, kernel)
    torch.testing.assert_close(S_moved, S, atol=1e-9, rtol=0, equal_nan=True)
    # diagonal removal drops zeros: invariant to a scale, not to a shift
    torch.testing.assert_close(spatial_dependence(fmap * scale, kernel, diagonal_removal=True),
                               spatial_dependence(fmap, kernel, diagonal_removal=True), atol=1e-9, rtol=0)


def test_independent_noise_gives_the_estimator_bias():
    """Independent pixels: the plug-in MI is biased upward by about (b - 1)^2 / (2 N ln 2) bits; off
    the centre S is that small, not 0 and far from the centre's 1."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((40, 2, 24, 24)))
    S = spatial_dependence(x, 3)
    n = 40 * 23 * 23
    b = 1 + math.ceil(math.log2(n))
    bias_nmi = (b - 1) ** 2 / (2 * n * math.log(2)) / (2 * math.log2(b))  # H(X, Y) ~ 2 log2 b (roughly)
    bias_s = 5 * bias_nmi  # k-transform near 0: S ~ k NMI
    assert bool((off_centre(S) > bias_s / 2).all()) and bool((off_centre(S) < 2 * bias_s).all()), (S, bias_s)


def test_a_copy_shifted_by_d_is_dependent_at_d():
    """X(p + (1, 1)) = X(p): S at tap (1, 1) (and its mirror) near 1, the other taps low."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((30, 1, 1, 40))
    h, w = 16, 16
    idx = np.arange(h)[:, None] - np.arange(w)[None, :] + w  # constant along the diagonal
    x = torch.from_numpy(z[..., idx.ravel()].reshape(30, 1, h, w))
    S = spatial_dependence(x, 3)
    assert S[2, 2] > 0.97 and S[0, 0] > 0.97
    assert float(S[1, 2]) < 0.3 and float(S[0, 2]) < 0.3


def _all_reduce(pair: list, phase: str) -> None:
    """What torch.distributed's all-reduce does to the statistics of two ranks, in-process."""
    ops = {"min": torch.minimum, "max": torch.maximum, "sum": torch.add}
    lists = [s.range_reductions() if phase == "ranges" else s.count_reductions() for s in pair]
    for (a, op), (b, _) in zip(*lists):
        combined = ops[op](a, b)
        a.copy_(combined)
        b.copy_(combined)
    if phase == "ranges":
        for s in pair:
            s.ranges_reduced()


@settings(max_examples=examples(10))
@given(maps(np.float32), st.integers(1, 5), kernels, st.booleans())
def test_split_batches_reduce_to_the_single_process_counts(fmap, cut, kernel, diagonal_removal):
    """Two 'ranks' with any split of the images, combined with MIN / MAX / SUM, count exactly what one
    process counts on all images (the algebra the distributed driver relies on)."""
    from reparam.sgs.dependence import make_statistic, run_passes

    cut = cut % fmap.shape[0]
    parts = [fmap[:cut], fmap[cut:]]
    ranks = [make_statistic(kernel, diagonal_removal=diagonal_removal) for _ in parts]
    for s, part in zip(ranks, parts):
        if part.shape[0]:
            s.observe_ranges(part)
        else:
            s.allocate_like(fmap.shape[1:], fmap.dtype, fmap.device)
    _all_reduce(ranks, "ranges")
    for s, part in zip(ranks, parts):
        s.freeze(fmap.device)
        s.observe(part)
    _all_reduce(ranks, "counts")
    single = make_statistic(kernel, diagonal_removal=diagonal_removal)
    run_passes(single, lambda: [fmap])
    for s in ranks:
        assert torch.equal(s.counts, single.counts)
        torch.testing.assert_close(s.dependence(), single.dependence(), rtol=0, atol=0, equal_nan=True)

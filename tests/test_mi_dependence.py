"""spatial_dependence against the NumPy re-implementation of the official per-layer computation
(verification/mi_reference.py): random and natural-image maps, every kernel the official code handles,
the float64 upper bound, the exclusive upper edge, dead channels, diagonal removal."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reparam.errors import ConfigError
from reparam.sgs import scaling_from_dependence, spatial_dependence
from reparam.sgs.dependence import Geometry, HistogramStatistic, make_statistic, run_passes, sturges_bins
from verification.mi_reference import reference_dependence, reference_scaling

TOL = 1e-6  # issue 12: absolute, on S and on G


def natural_map(n: int = 6, size: int = 20, seed: int = 0) -> np.ndarray:
    """Zero-padded random crops of the photographs scikit-image ships (no download), as a float32
    (n, 3, size + 2, size + 2) map normalised like an input layer."""
    skdata = pytest.importorskip("skimage.data")
    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        crops.append(img[y:y + size, x:x + size].transpose(2, 0, 1))
    maps = (np.stack(crops).astype(np.float32) / 255.0 - 0.45) / 0.25
    return np.pad(maps, ((0, 0), (0, 0), (1, 1), (1, 1))).astype(np.float32)


def random_map(shape=(5, 4, 12, 11), seed=0, relu=True, pad=1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x = np.maximum(x, 0) if relu else x
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))).astype(np.float32)


def check(fmap: np.ndarray, kernel, **kw) -> torch.Tensor:
    S = spatial_dependence(torch.from_numpy(fmap), kernel, **kw)
    ref = reference_dependence(fmap, kernel, k=kw.get("k", 5.0), diagonal_removal=kw.get("diagonal_removal", False),
                               dilation=kw.get("dilation", 1))
    assert S.dtype == torch.float64 and S.shape == ref.shape
    np.testing.assert_allclose(S.numpy(), ref, atol=TOL, rtol=0, equal_nan=True)
    if np.isfinite(ref).all():
        np.testing.assert_allclose(scaling_from_dependence(S).numpy(), reference_scaling(ref), atol=TOL, rtol=0)
    return S


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("diagonal_removal", [False, True])
def test_random_maps_match_official(kernel, diagonal_removal):
    S = check(random_map(seed=kernel), kernel, diagonal_removal=diagonal_removal)
    assert S[(kernel - 1) // 2, (kernel - 1) // 2] == 1.0


@pytest.mark.parametrize("diagonal_removal", [False, True])
@pytest.mark.parametrize("k", [2.0, 5.0])
def test_natural_images_match_official(diagonal_removal, k):
    S = check(natural_map(), 3, k=k, diagonal_removal=diagonal_removal)
    off = S.clone()
    off[1, 1] = float("nan")
    assert float(off.nanmean()) > 0.5  # natural images are strongly dependent between neighbours


@pytest.mark.parametrize("kernel,dilation", [((3, 5), 1), ((5, 3), 1), (3, 2), ((3, 3), (1, 3)), (4, 1), ((2, 3), 1)])
def test_beyond_official_kernels_match_the_definition(kernel, dilation):
    """Non-square, dilated and even kernels: the official code is wrong or crashes; the definition
    (the reference with the library's geometry) still holds."""
    check(random_map(seed=3), kernel, dilation=dilation)


def test_dilation_pairs_pixels_d_apart():
    """A map periodic with period 2 along W: neighbours 2 apart are equal (S = 1), 1 apart are not."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 2, 9, 1)).astype(np.float32)
    fmap = np.tile(np.concatenate([base, rng.standard_normal((6, 2, 9, 1)).astype(np.float32)], axis=3), (1, 1, 1, 5))
    S2 = spatial_dependence(torch.from_numpy(fmap), (1, 3), dilation=2)
    S1 = spatial_dependence(torch.from_numpy(fmap), (1, 3), dilation=1)
    assert S2[0, 0] == pytest.approx(1.0, abs=1e-12) and S1[0, 0] < 0.9


def test_float64_upper_bound_keeps_the_maximum():
    """Maxima near 1 in float32: ``max + 1e-12`` must be evaluated in float64, else (NumPy-2 accident)
    every maximum falls out of the histogram. All pairs are counted here."""
    fmap = torch.from_numpy(random_map(seed=4, relu=False))
    stat = HistogramStatistic(3)
    run_passes(stat, lambda: [fmap])
    n = torch.tensor([fmap.shape[0] * stat.geometry.rects(j, *fmap.shape[2:])[2] for j in range(4)])
    assert torch.equal(stat.counts[:, :, :-1, :-1].sum(dim=(2, 3)), n[:, None].expand(4, fmap.shape[1]))
    # negative control: a float32 upper bound would have dropped pairs (the maximum equals upper)
    assert float(np.float32(fmap.max()) + np.float32(1e-12)) == float(fmap.max())


def test_exclusive_upper_edge_drops_values_at_a_large_maximum():
    """Where ``max + 1e-12 == max`` even in float64 (|max| >= 2**14), values equal to the maximum
    are outside [min, upper): the official histogram drops them, and so do we."""
    fmap = random_map(seed=5, relu=True) * np.float32(1e5)
    fmap[0, :, 3, 3] = fmap.max()  # several pixels at the maximum
    S = check(fmap, 3)
    stat = HistogramStatistic(3)
    run_passes(stat, lambda: [torch.from_numpy(fmap)])
    counted = stat.counts[:, :, :-1, :-1].sum(dim=(2, 3))  # (displacement, channel)
    n = torch.tensor([fmap.shape[0] * stat.geometry.rects(j, *fmap.shape[2:])[2] for j in range(4)])
    assert bool((counted < n[:, None]).all())  # pairs were dropped in every channel (the test can fail)
    assert torch.isfinite(S).all()


def test_dead_channels_are_skipped_and_a_dead_map_is_nan():
    fmap = random_map(seed=6)
    fmap[:, 1] = 0.0  # one dead channel: NaN NMI, ignored by the channel mean
    S = check(fmap, 3)
    assert torch.isfinite(S).all()
    dead = np.zeros_like(fmap)
    S_dead = check(dead, 3)
    assert torch.isnan(S_dead).sum() == 8 and S_dead[1, 1] == 1.0
    S_diag = check(dead, 3, diagonal_removal=True)  # official: no pair left -> 0
    assert (S_diag == 0).sum() == 8


def test_constant_large_channel():
    """A constant channel at a large value: ``upper == min`` in float64, nothing counts, NaN (skipped)."""
    fmap = random_map(seed=7)
    fmap[:, 0] = 3e5
    check(fmap, 3)


def test_multi_batch_streaming_equals_one_map():
    fmap = torch.from_numpy(random_map(shape=(9, 3, 10, 10), seed=8))
    for diag in (False, True):
        stat = make_statistic(3, diagonal_removal=diag)
        run_passes(stat, lambda: list(fmap.split(2)))
        assert torch.equal(stat.dependence(), spatial_dependence(fmap, 3, diagonal_removal=diag))


def test_sturges_bins_exact():
    for n in [1, 2, 3, 4, 5, 7, 8, 9, 1023, 1024, 1025, 2**20, 2**20 + 1, 2**40 - 1, 2**40]:
        expected = int(1 + np.ceil(np.log2(n)))
        assert sturges_bins(n) == expected
        assert int(sturges_bins(torch.tensor([n]))[0]) == expected


def test_geometry_symmetry_and_centre():
    g = Geometry.of((3, 5))
    assert g.centre == (1, 2) and len(g.canonical) == 7
    assert all(len(cells) == 2 for cells in g.taps)
    assert len(Geometry.of(4).canonical) == 4 + 7  # even: 8 taps in mirrored pairs, 7 without a mirror


def test_bad_input_errors():
    with pytest.raises(ConfigError, match="N, C, H, W"):
        spatial_dependence(torch.zeros(3, 4, 4), 3)
    with pytest.raises(ConfigError, match="measure"):
        spatial_dependence(torch.zeros(1, 1, 4, 4), 3, measure="pearson")
    with pytest.raises(ConfigError, match="diagonal_removal"):
        spatial_dependence(torch.zeros(1, 1, 4, 4), 3, measure="autocorrelation", diagonal_removal=True)


def test_autocorrelation_measure():
    """|Pearson r| of shifted copies, k-transformed: 1 at the centre, in [0, 1], symmetric, and equal
    to numpy's corrcoef on the pairs."""
    fmap = torch.from_numpy(random_map(shape=(4, 2, 9, 9), seed=9, relu=False))
    S = spatial_dependence(fmap, 3, measure="autocorrelation", k=1.0)
    x = fmap.numpy()
    rs = [abs(np.corrcoef(x[:, c, :-1, :-1].ravel(), x[:, c, 1:, 1:].ravel())[0, 1]) for c in range(2)]
    assert float(S[2, 2]) == pytest.approx(np.mean(rs), abs=1e-10)
    assert torch.equal(S, torch.flip(S, (0, 1))) and S[1, 1] == 1.0


def test_reference_histogram_equals_fast_histogram():
    """The official code's C histogram (``fast_histogram``, optional here) counts exactly as the
    reference's float64 formula, ties and exclusive upper edges included."""
    fast_histogram = pytest.importorskip("fast_histogram")
    from verification.mi_reference import joint_counts

    rng = np.random.default_rng(0)
    for t in range(30):
        x = (rng.standard_normal(3000) * rng.uniform(0.01, 3e4)).astype(np.float32)
        y = np.maximum(rng.standard_normal(3000), 0).astype(np.float32)
        if t % 3 == 0:
            x = np.round(x * 8) / 8  # ties on bin edges
        bins = 13
        rx, ry = [np.float64(x.min()), np.float64(x.max()) + 1e-12], [np.float64(y.min()), np.float64(y.max()) + 1e-12]
        expected = fast_histogram.histogram2d(x, y, range=[rx, ry], bins=bins)
        np.testing.assert_array_equal(joint_counts(x, y, rx, ry, bins), expected)

"""A plain NumPy re-implementation of the official per-layer spatial-dependence computation of the
SGS paper's code (written from the definition in ``docs/mi.md`` / the project's notes, not from their
code): one channel and one displacement at a time, each pair subset materialised, as they do.

It is the oracle the streaming statistic (:func:`reparam.sgs.spatial_dependence`) is tested against,
and the "official path" of ``benchmarks/mi_refresh.py``. Square odd kernels are what the official code
handles; this reference also takes non-square / even kernels and dilation with the library's geometry
(centre ``(k - 1) // 2``, a tap ``d`` pairs pixels ``dilation * d`` apart), where the official code
is wrong or crashes, so that the library can be checked there against the same definition.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

__all__ = ["joint_counts", "reference_dependence", "reference_nmik", "reference_scaling"]


def _bins(n: int) -> int:
    """Sturges: 1 + ceil(log2 n)."""
    return int(1 + np.ceil(np.log2(n)))


def _bin_index(v: np.ndarray, lo: float, upper: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin of every value (float64 arithmetic, clamped to bins - 1) and whether it counts (lo <= v < upper)."""
    v = v.astype(np.float64)
    inside = (v >= lo) & (v < upper)
    with np.errstate(divide="ignore", invalid="ignore"):
        index = np.floor((v - lo) * (bins / (upper - lo)))
    index = np.minimum(np.where(inside, index, 0), bins - 1).astype(np.int64)
    return index, inside


def _entropy_bits(counts: np.ndarray) -> float:
    c = counts[counts != 0].astype(np.float64)
    c = c / c.sum()
    return float(-np.sum(c * np.log2(c)))


def joint_counts(x: np.ndarray, y: np.ndarray, range_x: list[float], range_y: list[float], bins: int) -> np.ndarray:
    """The official 2-D histogram: float64 ``floor((v - lo) * (bins / (upper - lo)))`` clamped to
    ``bins - 1``; a pair counts iff both values lie in ``[lo, upper)``. (The ``fast_histogram``
    package's ``histogram2d``, which the official code calls, gives the same counts.)"""
    ix, ok_x = _bin_index(x, range_x[0], range_x[1], bins)
    iy, ok_y = _bin_index(y, range_y[0], range_y[1], bins)
    ok = ok_x & ok_y
    return np.bincount(ix[ok] * bins + iy[ok], minlength=bins * bins).reshape(bins, bins).astype(np.float64)


Histogram = Callable[..., np.ndarray]


def reference_nmik(x: np.ndarray, y: np.ndarray, k: float, diagonal_removal: bool,
                   histogram: Histogram | None = None) -> float:
    """k-transformed NMI of two paired 1-D samples, one official histogram (``histogram(x, y, range_x,
    range_y, bins)``, default :func:`joint_counts`)."""
    bins = _bins(len(x))
    range_x = [np.float64(x.min()), np.float64(x.max()) + 1e-12]  # the upper bound in float64
    range_y = [np.float64(y.min()), np.float64(y.max()) + 1e-12]
    joint = (histogram or joint_counts)(x, y, range_x, range_y, bins)
    if diagonal_removal:
        joint[np.arange(bins), np.arange(bins)] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        hx, hy = _entropy_bits(joint.sum(axis=1)), _entropy_bits(joint.sum(axis=0))
        hxy = _entropy_bits(joint.ravel())
    nmi = (hx + hy - hxy) / hxy if hxy != 0 else math.nan  # hxy = 0 means one cell: hx = hy = 0, 0 / 0
    return k * nmi / ((k - 1) * nmi + 1)


def _pairs(channel: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """First and second pixel of every pair (p, p + (a, b)) inside a (N, H, W) channel, flattened."""
    _, H, W = channel.shape
    h, w = max(H - abs(a), 0), max(W - abs(b), 0)
    y0, x0 = max(0, -a), max(0, -b)
    first = channel[:, y0:y0 + h, x0:x0 + w]
    second = channel[:, y0 + a:y0 + a + h, x0 + b:x0 + b + w]
    return first.ravel(), second.ravel()


def reference_dependence(feature_map: np.ndarray, kernel_size: tuple[int, int] | int, k: float = 5.0,
                         diagonal_removal: bool = False, dilation: tuple[int, int] | int = 1,
                         histogram: Histogram | None = None) -> np.ndarray:
    """S (kh, kw) float64 of an already padded (N, C, H, W) map: per channel, half the displacements
    computed (the other half mirrored), NaN-aware mean over channels, centre exactly 1. ``histogram``
    swaps the 2-D histogram routine (the benchmark passes ``fast_histogram``'s, as the official code)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    ch, cw = (kh - 1) // 2, (kw - 1) // 2
    fmap = np.asarray(feature_map)
    C = fmap.shape[1]
    per_channel = np.full((C, kh, kw), np.nan)
    per_channel[:, ch, cw] = 1.0
    for c in range(C):
        done: set[tuple[int, int]] = set()
        for i in range(kh):
            for j in range(kw):
                d = (i - ch, j - cw)
                if d == (0, 0) or d in done:
                    continue
                x, y = _pairs(fmap[:, c], d[0] * dh, d[1] * dw)
                if diagonal_removal:
                    keep = (x != 0) & (y != 0)
                    x, y = x[keep], y[keep]
                    value = reference_nmik(x, y, k, True, histogram) if len(x) else 0.0
                    value = 0.0 if np.isnan(value) else value
                else:
                    value = reference_nmik(x, y, k, False, histogram) if len(x) else math.nan
                for cell in ((i, j), (2 * ch - i, 2 * cw - j)):  # d and -d, where -d is a tap
                    if 0 <= cell[0] < kh and 0 <= cell[1] < kw:
                        per_channel[c][cell] = value
                done.update({d, (-d[0], -d[1])})
    with warnings.catch_warnings():  # all-NaN taps (dead layers): NaN, without NumPy's warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_channel, axis=0)


def reference_scaling(S: np.ndarray) -> np.ndarray:
    """G = S / mean(S)."""
    return S / S.mean()

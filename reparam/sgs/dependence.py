"""Spatial dependence of a feature map (SGS paper, Section 3.3) and the scaling ``G`` it gives.

For a padded map ``X`` (N, C, H, W) and a kernel tap at displacement ``d`` from the kernel centre,
``S(d) = mean_c T_k(NMI(X_c(p), X_c(p + dilation * d)))`` over all positions ``p`` where both pixels lie
in the map, with ``NMI = (H(P) + H(Q) - H(P, Q)) / H(P, Q)`` from a 2-D histogram with Sturges' bins and
``T_k(s) = k s / ((k - 1) s + 1)``; the centre is 1 and ``G = S / mean(S)``. Histogram details
(ranges, float64 upper bound, exclusive edge, diagonal removal) follow the official implementation
exactly; see docs/mi.md.

The statistic is a streaming accumulator (:class:`HistogramStatistic`): pass 1 sees every batch and
keeps the element-wise min / max over images (memory: two maps of one image), from which every
(channel, displacement) range is exact; pass 2 accumulates integer joint-histogram counts. Both
reduce with MIN / MAX / SUM, so distributed ranks combine them exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from reparam.errors import ConfigError, DependenceWarning

__all__ = [
    "DEFAULT_K",
    "MEASURES",
    "CorrelationStatistic",
    "DependenceWarning",
    "HistogramStatistic",
    "k_transform",
    "make_statistic",
    "scaling_from_dependence",
    "spatial_dependence",
    "sturges_bins",
]

#: the k of every published configuration of the SGS paper
DEFAULT_K = 5.0
#: the dependence measures: the paper's normalised mutual information and its Section 4.3 ablation
MEASURES = ("nmi", "autocorrelation")
#: added to each histogram range's maximum, in float64 (the official code's NumPy-1 behaviour)
RANGE_EPSILON = 1e-12

Pair = tuple[int, int]
#: a reduction a distributed driver applies to a statistic's tensor across ranks: "min", "max", "sum"
Reduction = tuple[Tensor, str]


def sturges_bins(n: int | Tensor) -> int | Tensor:
    """Sturges' rule ``1 + ceil(log2 n)``, exact in integers (``n >= 1``; 1 for ``n <= 1``)."""
    if isinstance(n, Tensor):
        b = torch.ceil(torch.log2(n.clamp_min(1).double())).long()
        b = b - (torch.pow(2, (b - 1).clamp_min(0)) >= n).long() * (b > 0).long()  # exact near powers of 2
        b = b + (torch.pow(2, b) < n).long()
        return 1 + b
    return 1 + max(int(n) - 1, 0).bit_length()


def k_transform(s: Tensor, k: float) -> Tensor:
    """``T_k(s) = k s / ((k - 1) s + 1)``: maps [0, 1] onto [0, 1], concave for k > 1."""
    return k * s / ((k - 1) * s + 1)


def scaling_from_dependence(S: Tensor) -> Tensor:
    """``G = S / mean(S)`` (mean 1), the gradient scaling of one layer."""
    return S / S.mean(dim=(-2, -1), keepdim=True)


def _pair(value: int | Sequence[int], what: str) -> Pair:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ConfigError(f"{what} must be an int or a pair of ints, got {value!r}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Geometry:
    """Where the taps of a ``kernel_size`` kernel with ``dilation`` look. The centre tap is
    ``((kh - 1) // 2, (kw - 1) // 2)`` (torch's 'same' convention for even kernels); ``canonical``
    holds one of ``d`` / ``-d`` for each non-centre tap (NMI is symmetric in the pair, so ``S(d) =
    S(-d)`` exactly); ``taps[j]`` lists the kernel cells that take the value of ``canonical[j]``."""

    kernel_size: Pair
    dilation: Pair
    centre: Pair
    canonical: tuple[Pair, ...]
    taps: tuple[tuple[Pair, ...], ...]

    @classmethod
    def of(cls, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1) -> Geometry:
        kh, kw = _pair(kernel_size, "kernel_size")
        dil = _pair(dilation, "dilation")
        if kh < 1 or kw < 1 or min(dil) < 1:
            raise ConfigError(f"kernel_size and dilation must be positive, got {(kh, kw)} and {dil}")
        centre = ((kh - 1) // 2, (kw - 1) // 2)
        groups: dict[Pair, list[Pair]] = {}
        for i in range(kh):
            for j in range(kw):
                d = (i - centre[0], j - centre[1])
                if d != (0, 0):
                    groups.setdefault(max(d, (-d[0], -d[1])), []).append((i, j))
        canonical = tuple(groups)
        return cls((kh, kw), dil, centre, canonical, tuple(tuple(groups[d]) for d in canonical))

    def offset(self, j: int) -> Pair:
        """Pixel offset of canonical displacement ``j`` (dilation applied)."""
        return (self.canonical[j][0] * self.dilation[0], self.canonical[j][1] * self.dilation[1])

    def rects(self, j: int, height: int, width: int) -> tuple[tuple[slice, slice], tuple[slice, slice], int]:
        """Row / column slices of the first and the second pixel of every pair of displacement
        ``j`` in an ``height x width`` map, and the number of pairs per image."""
        (a, b) = self.offset(j)
        h, w = max(height - abs(a), 0), max(width - abs(b), 0)
        y0, x0 = max(0, -a), max(0, -b)
        first = (slice(y0, y0 + h), slice(x0, x0 + w))
        second = (slice(y0 + a, y0 + a + h), slice(x0 + b, x0 + b + w))
        return first, second, h * w

    def assemble(self, values: Tensor) -> Tensor:
        """A (kh, kw) float64 matrix from one value per canonical displacement, centre 1."""
        S = torch.ones(self.kernel_size, dtype=torch.float64)
        for j, cells in enumerate(self.taps):
            for cell in cells:
                S[cell] = values[j]
        return S


class _RangeMaps:
    """Pass 1 shared by every statistic: element-wise min / max over images of one layer's map
    (memory: two (C, H, W) maps, whatever the number of batches), and the number of images."""

    def __init__(self) -> None:
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.images = 0

    def observe(self, x: Tensor) -> None:
        if not x.shape[0]:
            return
        lo, hi = x.amin(dim=0), x.amax(dim=0)  # (torch.aminmax over dim 0 is ~3x slower on CPU)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            if lo.shape != self.lo.shape:
                raise ConfigError(
                    f"the map's shape changed between batches ({tuple(self.lo.shape)} then {tuple(lo.shape)} per image);"
                    " the statistic needs one input size per layer: crop or resize the images to one size"
                )
            torch.minimum(self.lo, lo, out=self.lo)
            torch.maximum(self.hi, hi, out=self.hi)
        self.images += x.shape[0]

    def finite(self) -> bool:
        return self.lo is not None and bool(torch.isfinite(self.lo).all() and torch.isfinite(self.hi).all())

    def rect_range(self, rect: tuple[slice, slice]) -> tuple[Tensor, Tensor]:
        """Per-channel float64 (min, max) of the map restricted to ``rect`` (over all images);
        (inf, -inf) for an empty rectangle."""
        if self.lo[:, rect[0], rect[1]].numel() == 0:
            C = self.lo.shape[0]
            return (torch.full((C,), math.inf, dtype=torch.float64, device=self.lo.device),
                    torch.full((C,), -math.inf, dtype=torch.float64, device=self.lo.device))
        return (self.lo[:, rect[0], rect[1]].amin(dim=(1, 2)).double(),
                self.hi[:, rect[0], rect[1]].amax(dim=(1, 2)).double())


class _Statistic:
    """Common driver interface: ``observe_ranges`` (pass 1), ``range_reductions`` (what a distributed
    driver all-reduces after pass 1), ``observe`` (pass 2), ``count_reductions``, ``dependence``."""

    def __init__(self, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1) -> None:
        self.geometry = Geometry.of(kernel_size, dilation)
        self.ranges = _RangeMaps()
        self._frozen = False

    def observe_ranges(self, x: Tensor) -> None:
        self.ranges.observe(x.detach())

    def allocate_like(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        """Identity elements for a rank that never saw this layer (distributed driver)."""
        self.ranges.lo = torch.full(tuple(shape), math.inf, dtype=dtype, device=device)
        self.ranges.hi = torch.full(tuple(shape), -math.inf, dtype=dtype, device=device)

    def range_reductions(self) -> list[Reduction]:
        """The pass-1 tensors and how ranks combine them (in place), health flag included: MIN / MAX
        need not propagate NaN, so each rank's own verdict is summed."""
        device = self.ranges.lo.device
        self._reduced = torch.tensor([self.ranges.images, int(self.seen and not self.ranges.finite())],
                                     dtype=torch.int64, device=device)
        return [(self.ranges.lo, "min"), (self.ranges.hi, "max"), (self._reduced, "sum")]

    def ranges_reduced(self) -> None:
        """Adopt the combined image count and health verdict after the all-reduce."""
        self.ranges.images = int(self._reduced[0].item())
        self._unhealthy = bool(self._reduced[1].item())

    @property
    def state_bytes(self) -> int:
        """Memory the statistic holds (range maps, counts or sums): independent of the number of batches."""
        tensors = [v for v in vars(self).values() if isinstance(v, Tensor)] + [self.ranges.lo, self.ranges.hi]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def seen(self) -> bool:
        return self.ranges.lo is not None and self.ranges.images > 0

    def per_channel(self, k: float) -> Tensor:  # pragma: no cover - defined by each statistic
        raise NotImplementedError

    def dependence(self, k: float = DEFAULT_K) -> Tensor:
        """S (kh, kw) float64 on the CPU: channel ``nanmean`` of the k-transformed measure, centre 1."""
        if not self._frozen:
            raise ConfigError("dependence() needs the counting pass: call observe() on every batch first")
        return self.geometry.assemble(self.per_channel(k).nanmean(dim=1).cpu())

    def problems(self) -> list[str]:
        """Why this layer's S cannot be used as is (empty when it can)."""
        if not self.seen:
            return ["it never ran"]
        if not self.healthy:
            return ["its input has NaN or inf values"]
        return []

    @property
    def healthy(self) -> bool:
        """Whether the map had only finite values (else the layer gets G = 1 with a warning)."""
        unhealthy = getattr(self, "_unhealthy", None)
        return self.ranges.finite() if unhealthy is None else not unhealthy


class HistogramStatistic(_Statistic):
    """Normalised mutual information of neighbouring pixels, streamed: integer joint-histogram
    counts per (canonical displacement, channel) over all batches.

    Ranges (official definition): per (channel, displacement) and per side of the pair, ``[min, max +
    1e-12]`` of that side's pixels, the upper bound in float64, exclusive; ``bins = 1 + ceil(log2 N)``
    with ``N`` the number of pairs. With ``diagonal_removal`` only pairs with both values non-zero count
    (ranges and ``N`` from those pairs), and the joint histogram's diagonal is zeroed."""

    def __init__(self, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1, *,
                 diagonal_removal: bool = False) -> None:
        super().__init__(kernel_size, dilation)
        self.diagonal_removal = diagonal_removal
        self.counts: Tensor | None = None
        self._nonzero: Tensor | None = None  # diagonal removal: (D, [count, xlo, xhi, ylo, yhi], C)

    # -- pass 1 ------------------------------------------------------------------------------
    def observe_ranges(self, x: Tensor) -> None:
        x = x.detach()
        super().observe_ranges(x)
        if self.diagonal_removal and x.shape[0]:
            self._observe_nonzero_ranges(x)

    def _observe_nonzero_ranges(self, x: Tensor) -> None:
        """Diagonal removal: ranges and N of the pairs whose two values are non-zero, per channel."""
        stats = []
        for j in range(len(self.geometry.canonical)):
            first, second, _ = self.geometry.rects(j, x.shape[2], x.shape[3])
            p, q = x[:, :, first[0], first[1]], x[:, :, second[0], second[1]]
            keep = (p != 0) & (q != 0)
            inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
            stats.append(torch.stack([
                keep.sum(dim=(0, 2, 3)).double(),
                torch.where(keep, p, inf).amin(dim=(0, 2, 3)).double(),
                torch.where(keep, p, -inf).amax(dim=(0, 2, 3)).double(),
                torch.where(keep, q, inf).amin(dim=(0, 2, 3)).double(),
                torch.where(keep, q, -inf).amax(dim=(0, 2, 3)).double(),
            ]))
        new = torch.stack(stats)  # (D, 5, C) float64 (counts exact below 2**53)
        self._merge_nonzero(new)

    def _merge_nonzero(self, new: Tensor) -> None:
        if self._nonzero is None:
            self._nonzero = new
            return
        old = self._nonzero
        self._nonzero = torch.stack([old[:, 0] + new[:, 0], torch.minimum(old[:, 1], new[:, 1]),
                                     torch.maximum(old[:, 2], new[:, 2]), torch.minimum(old[:, 3], new[:, 3]),
                                     torch.maximum(old[:, 4], new[:, 4])], dim=1)

    def allocate_like(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        super().allocate_like(shape, dtype, device)
        if self.diagonal_removal:
            D, C = len(self.geometry.canonical), shape[0]
            ident = torch.tensor([0.0, math.inf, -math.inf, math.inf, -math.inf], dtype=torch.float64, device=device)
            self._nonzero = ident[None, :, None].expand(D, 5, C).clone()

    def range_reductions(self) -> list[Reduction]:
        out = super().range_reductions()
        if self.diagonal_removal:
            nz = self._nonzero
            self._nz_parts = [nz[:, 0].contiguous(), nz[:, 1::2].contiguous(), nz[:, 2::2].contiguous()]
            out += [(self._nz_parts[0], "sum"), (self._nz_parts[1], "min"), (self._nz_parts[2], "max")]
        return out

    def ranges_reduced(self) -> None:
        super().ranges_reduced()
        if self.diagonal_removal and hasattr(self, "_nz_parts"):
            n, lows, highs = self._nz_parts
            self._nonzero = torch.stack([n, lows[:, 0], highs[:, 0], lows[:, 1], highs[:, 1]], dim=1)

    # -- between the passes --------------------------------------------------------------------
    def freeze(self, device: torch.device) -> None:
        """Between the passes: per (displacement, channel): ranges, scales and bins of both sides; the count layout."""
        g, (C, H, W) = self.geometry, self.ranges.lo.shape
        whole = None if self.diagonal_removal else self.ranges.rect_range((slice(None), slice(None)))
        sides, pairs = [], []
        for j in range(len(g.canonical)):
            first, second, per_image = g.rects(j, H, W)
            if self.diagonal_removal:
                n, xlo, xhi, ylo, yhi = self._nonzero[j]
                n = n.long()
            else:
                (xlo, xhi), (ylo, yhi) = self.ranges.rect_range(first), self.ranges.rect_range(second)
                n = torch.full((C,), self.ranges.images * per_image, dtype=torch.int64, device=xlo.device)
            bins = sturges_bins(n)
            sides.append((_Quantiser.of(xlo, xhi, bins, whole), _Quantiser.of(ylo, yhi, bins, whole)))
            pairs.append(n)
        self._sides, self._pairs = sides, torch.stack(pairs)  # pairs: (D, C) int64
        self.width = int(max(int(s[0].bins.max()) for s in sides)) + 1 if sides else 2  # + 1: the trash bin
        self.counts = torch.zeros((len(g.canonical), C, self.width, self.width), dtype=torch.int64, device=device)
        self._frozen = True

    # -- pass 2 ------------------------------------------------------------------------------
    def observe(self, x: Tensor) -> None:
        """Add one batch's joint-histogram counts (all channels and displacements, no channel loop),
        a chunk of images at a time so that the temporaries stay in cache."""
        x = x.detach().contiguous()
        if not self._frozen:
            self.freeze(x.device)
        if not x.shape[0] or not self.healthy:
            return
        C, B = x.shape[1], self.width
        offsets = (torch.arange(C, device=x.device, dtype=torch.int32) * (B * B)).view(1, C, 1, 1)
        for chunk in x.split(_chunk_images(x), dim=0):
            self._observe_chunk(chunk, offsets)

    def _observe_chunk(self, x: Tensor, offsets: Tensor) -> None:
        g, C, B = self.geometry, x.shape[1], self.width
        cache: dict[tuple[str, _Quantiser], Tensor] = {}
        for j in self._order():
            first, second, _ = g.rects(j, x.shape[2], x.shape[3])
            qx_side, qy_side = self._sides[j]
            for key in [key for key in cache if key[1] not in (qx_side, qy_side)]:
                del cache[key]
            q = _quantised(cache, qy_side, x, B, self.diagonal_removal)
            if ("row", qx_side) not in cache:  # first side as a row offset: channel * B^2 + bin * B
                cache[("row", qx_side)] = torch.add(offsets, _quantised(cache, qx_side, x, B, self.diagonal_removal),
                                                    alpha=B)
            joint = cache[("row", qx_side)][:, :, first[0], first[1]] + q[:, :, second[0], second[1]]
            self.counts[j] += torch.bincount(joint.reshape(-1), minlength=C * B * B).view(C, B, B)

    def _order(self) -> list[int]:
        """Displacements grouped by their quantisers, so a quantised map serves as many as it can."""
        return sorted(range(len(self._sides)), key=lambda j: (hash(self._sides[j][0]), hash(self._sides[j][1])))

    def count_reductions(self) -> list[Reduction]:
        return [(self.counts, "sum")]

    # -- result -------------------------------------------------------------------------------
    def nmi(self) -> Tensor:
        """Per (displacement, channel) NMI in float64 (NaN where no pair counted / zero joint entropy;
        with diagonal removal NaN -> 0 and no pair left -> 0, as the official code)."""
        joint = self.counts[:, :, :-1, :-1].double()  # drop the trash row and column
        if self.diagonal_removal:
            joint = joint * (1 - torch.eye(joint.shape[-1], dtype=joint.dtype, device=joint.device))
        hxy = _entropy(joint.flatten(-2))
        hx, hy = _entropy(joint.sum(-1)), _entropy(joint.sum(-2))
        nmi = (hx + hy - hxy) / hxy
        if self.diagonal_removal:
            nmi = torch.nan_to_num(nmi, nan=0.0)
        return nmi

    def per_channel(self, k: float) -> Tensor:
        """k-transformed NMI per (displacement, channel)."""
        s = k_transform(self.nmi(), k)
        return torch.nan_to_num(s, nan=0.0) if self.diagonal_removal else s

    def problems(self) -> list[str]:
        """Why this layer's S cannot be used as is (empty when it can)."""
        if super().problems():
            return super().problems()
        counted = self.counts[:, :, :-1, :-1].sum(dim=(1, 2, 3))
        if bool((counted == 0).any()):
            return ["no pixel pair could be counted for some displacement (dead layer, or every pair has a zero)"]
        return []


@dataclass(frozen=True, eq=False)
class _Quantiser:
    """One side of a pair for one displacement: per-channel ``lo``, exclusive float64 ``upper``,
    ``scale = bins / (upper - lo)`` and ``bins``. Equal quantisers (same values) share one quantised map."""

    lo: Tensor
    upper: Tensor
    scale: Tensor
    bins: Tensor
    top: Tensor  # bins - 1, float64
    may_fall_out: bool  # whether a pixel of the map can lie outside [lo, upper)
    _key: bytes

    @classmethod
    def of(cls, lo: Tensor, hi: Tensor, bins: Tensor, whole: tuple[Tensor, Tensor] | None = None) -> _Quantiser:
        """``whole``: the map's own per-channel (min, max); when the range is the map's and every
        ``upper > max``, no pixel falls out and the range check is skipped."""
        lo, hi = lo.double(), hi.double()
        upper = hi + RANGE_EPSILON
        scale = bins.double() / (upper - lo)
        inside = whole is not None and bool((lo == whole[0]).all() and (hi == whole[1]).all() and (upper > hi).all())
        key = b"".join(t.cpu().numpy().tobytes() for t in (lo, upper, bins))
        return cls(lo, upper, scale, bins, (bins - 1).double(), not inside, key)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Quantiser) and self._key == other._key

    def __call__(self, x: Tensor, trash: int, drop_zero: bool) -> Tensor:
        """int32 bin of every pixel: ``floor((v - lo) * scale)`` in float64 clamped to ``bins - 1``;
        ``trash`` for values outside ``[lo, upper)`` (and zeros when ``drop_zero``). Same-dtype
        in-place float64 ops (mixed-dtype broadcasting is several times slower on CPU)."""
        view = (1, -1, 1, 1)
        t = x.to(torch.float64, copy=True)
        bad = None
        if self.may_fall_out or drop_zero:
            bad = (t < self.lo.view(view)) | (t >= self.upper.view(view))
            if drop_zero:
                bad |= t == 0
        t.sub_(self.lo.view(view)).mul_(self.scale.view(view))  # >= 0 for every value in range
        torch.minimum(t, self.top.view(view), out=t)
        if bad is not None:
            t.masked_fill_(bad, trash)
        return t.to(torch.int32)  # truncation == floor on [0, bins)


#: pixels per chunk of images in the counting pass (float64 temporaries of about 2 MB)
CHUNK_PIXELS = 1 << 18


def _chunk_images(x: Tensor) -> int:
    return max(1, CHUNK_PIXELS // max(1, x[0].numel()))


def _quantised(cache: dict, side: _Quantiser, x: Tensor, width: int, drop_zero: bool) -> Tensor:
    if ("bin", side) not in cache:
        cache[("bin", side)] = side(x, width - 1, drop_zero)
    return cache[("bin", side)]


def _entropy(counts: Tensor) -> Tensor:
    """Shannon entropy in bits over the last dimension (zero cells dropped); NaN for an empty histogram."""
    total = counts.sum(-1, keepdim=True)
    p = counts / total
    terms = torch.where(counts > 0, p * torch.log2(torch.where(counts > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    h = -terms.sum(-1)
    return torch.where(total.squeeze(-1) > 0, h, torch.full_like(h, math.nan))


class CorrelationStatistic(_Statistic):
    """The autocorrelation measure of the paper's ablation (Section 4.3): per (channel, displacement)
    the absolute Pearson correlation ``|r|`` of the pair's two pixels (in [0, 1], NaN for a constant
    channel), from float64 sums centred on the channel's mid-range (pass 1), then the same k-transform,
    channel nanmean and centre 1 as the NMI."""

    def freeze(self, device: torch.device) -> None:
        """Between the passes: the per-channel shift (mid-range) and the zeroed sums."""
        C = self.ranges.lo.shape[0]
        self._shift = ((self.ranges.lo.amin(dim=(1, 2)).double() + self.ranges.hi.amax(dim=(1, 2)).double()) / 2)
        self.sums = torch.zeros((len(self.geometry.canonical), 5, C), dtype=torch.float64, device=device)
        self._frozen = True

    def observe(self, x: Tensor) -> None:
        x = x.detach()
        if not self._frozen:
            self.freeze(x.device)
        if not x.shape[0] or not self.healthy:
            return
        xc = x.double() - self._shift.view(1, -1, 1, 1)
        for j in range(len(self.geometry.canonical)):
            first, second, _ = self.geometry.rects(j, x.shape[2], x.shape[3])
            p, q = xc[:, :, first[0], first[1]], xc[:, :, second[0], second[1]]
            dims = (0, 2, 3)
            self.sums[j] += torch.stack([p.sum(dims), q.sum(dims), (p * p).sum(dims), (q * q).sum(dims),
                                         (p * q).sum(dims)])

    def count_reductions(self) -> list[Reduction]:
        return [(self.sums, "sum")]

    def per_channel(self, k: float) -> Tensor:
        n = torch.tensor([self.ranges.images * self.geometry.rects(j, *self.ranges.lo.shape[1:])[2]
                          for j in range(len(self.geometry.canonical))], dtype=torch.float64, device=self.sums.device)
        sx, sy, sxx, syy, sxy = (self.sums[:, i] for i in range(5))
        n = n.view(-1, 1)
        cov = sxy - sx * sy / n
        var = (sxx - sx * sx / n).clamp_min(0) * (syy - sy * sy / n).clamp_min(0)
        r = (cov / var.sqrt()).abs().clamp(max=1.0)
        return k_transform(r, k)


def make_statistic(kernel_size: int | Sequence[int], *, dilation: int | Sequence[int] = 1, diagonal_removal: bool = False,
                   measure: str = "nmi") -> HistogramStatistic | CorrelationStatistic:
    """The streaming accumulator for ``measure`` (one of :data:`MEASURES`)."""
    if measure == "nmi":
        return HistogramStatistic(kernel_size, dilation, diagonal_removal=diagonal_removal)
    if measure == "autocorrelation":
        if diagonal_removal:
            raise ConfigError("diagonal_removal applies to the 'nmi' measure only; drop it for 'autocorrelation'")
        return CorrelationStatistic(kernel_size, dilation)
    raise ConfigError(f"unknown measure {measure!r}; supported: {', '.join(MEASURES)}")


def run_passes(statistic: HistogramStatistic | CorrelationStatistic, batches: Callable[[], object]) -> None:
    """Feed ``statistic`` both passes from ``batches()`` (an iterable of maps, called twice)."""
    for x in batches():
        statistic.observe_ranges(x)
    for x in batches():
        statistic.observe(x)


def spatial_dependence(feature_map: Tensor, kernel_size: int | Sequence[int], *, k: float = DEFAULT_K,
                       diagonal_removal: bool = False, dilation: int | Sequence[int] = 1,
                       measure: str = "nmi") -> Tensor:
    """S (kh, kw), float64 on the CPU, of an already padded map (N, C, H, W): the channel mean of the
    k-transformed NMI between each pixel and its neighbour ``dilation * d`` away, centre 1 (the
    official per-layer definition; NaN where every channel is dead, as there)."""
    if feature_map.dim() != 4:
        raise ConfigError(f"feature_map must be (N, C, H, W), got shape {tuple(feature_map.shape)}")
    with torch.no_grad():
        statistic = make_statistic(kernel_size, dilation=dilation, diagonal_removal=diagonal_removal, measure=measure)
        run_passes(statistic, lambda: [feature_map])
        return statistic.dependence(k)

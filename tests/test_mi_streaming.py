"""masks_from_data: names, shared / transposed / unused convs, dead and non-finite layers, padding,
train/eval flags, the two passes over `batches`, and agreement with the official reference."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reparam.errors import ConfigError
from reparam.sgs import DependenceWarning, attach_sgs, masks_from_data, scaling_from_dependence, spatial_dependence
from verification.mi_reference import reference_dependence, reference_scaling


def batches(n=2, size=8, channels=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, channels, size, size, generator=g, dtype=dtype) for _ in range(n)]


class Net(nn.Module):
    """conv3x3 -> relu -> shared conv3x3 twice -> 1x3 conv -> transposed conv, plus a conv never run."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.row = nn.Conv2d(4, 4, (1, 3), padding=(0, 1))
        self.up = nn.ConvTranspose2d(4, 4, 3)
        self.unused = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.shared(torch.relu(self.shared(x)))
        return self.up(self.row(x))


def quiet_masks(model, data, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = masks_from_data(model, data, **kw)
    return masks, [str(w.message) for w in caught if issubclass(w.category, DependenceWarning)]


def test_names_shared_transposed_and_unused():
    torch.manual_seed(0)
    model, data = Net(), batches()
    masks, warned = quiet_masks(model, data)
    assert set(masks) == {"stem.weight", "shared.weight"}  # 1x3, transposed: skipped; unused: absent
    assert any("unused.weight" in w for w in warned)
    # the shared conv accumulates both calls: its statistic is that of the two inputs together
    inputs = []
    handle = model.shared.register_forward_pre_hook(lambda m, a: inputs.append(F.pad(a[0], (1, 1, 1, 1))))
    with torch.no_grad():
        for x in data:
            model(x)
    handle.remove()
    S = spatial_dependence(torch.cat(inputs), 3)
    torch.testing.assert_close(masks["shared.weight"], scaling_from_dependence(S).float(), atol=1e-6, rtol=0)
    # negative control: the first call alone gives something else
    assert not torch.allclose(masks["shared.weight"], scaling_from_dependence(spatial_dependence(inputs[0], 3)).float(),
                              atol=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_sgs(opt, masks, model=model).remove()  # ready for attach_sgs(..., model=)


def test_float64_model_matches_official_reference_and_batches_stream():
    conv = nn.Conv2d(3, 2, 3, padding=1).double()
    data = batches(n=3, dtype=torch.float64)
    G = masks_from_data(conv, data)["weight"]
    fmap = F.pad(torch.cat(data), (1, 1, 1, 1)).numpy()
    np.testing.assert_allclose(G.numpy(), reference_scaling(reference_dependence(fmap, 3)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("conv,pad", [
    (nn.Conv2d(2, 2, 3, padding=(1, 2)), (2, 2, 1, 1)),  # tuple: (H, W) -> F.pad's (left, right, top, bottom)
    (nn.Conv2d(2, 2, 3, padding="valid"), (0, 0, 0, 0)),
    (nn.Conv2d(2, 2, 4, padding="same"), (1, 2, 1, 2)),  # asymmetric: total 3, left 1, right 2
    (nn.Conv2d(2, 2, (3, 5), padding="same", dilation=(2, 1)), (2, 2, 2, 2)),
])
def test_zero_padding_variants(conv, pad):
    data = batches(channels=2)
    G = masks_from_data(conv, data)["weight"]
    S = spatial_dependence(F.pad(torch.cat(data), pad), conv.kernel_size, dilation=conv.dilation)
    torch.testing.assert_close(G, scaling_from_dependence(S).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode(mode):
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode=mode)
    data = batches(channels=2)
    G = masks_from_data(conv, data)["weight"]
    S = spatial_dependence(F.pad(torch.cat(data), (1, 1, 1, 1), mode=mode), 3)
    torch.testing.assert_close(G, scaling_from_dependence(S).float(), atol=1e-6, rtol=0)
    zero = scaling_from_dependence(spatial_dependence(F.pad(torch.cat(data), (1, 1, 1, 1)), 3)).float()
    assert not torch.allclose(G, zero, atol=1e-4)  # negative control: the mode matters


def test_exclude_padding():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    data = batches(channels=2)
    G = masks_from_data(conv, data, exclude_padding=True)["weight"]
    torch.testing.assert_close(G, scaling_from_dependence(spatial_dependence(torch.cat(data), 3)).float(),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("diagonal_removal", [False, True])
def test_dead_layer_gets_ones_with_a_warning(diagonal_removal):
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # relu -> all zero: a dead layer
    masks, warned = quiet_masks(model, batches(), diagonal_removal=diagonal_removal)
    assert torch.equal(masks["2.weight"], torch.ones(3, 3))
    assert any("2.weight" in w and "ones" in w for w in warned)
    assert not torch.equal(masks["0.weight"], torch.ones(3, 3))  # the live layer keeps its G


def test_nonfinite_input_gets_ones_with_a_warning():
    conv = nn.Conv2d(3, 2, 3, padding=1)
    data = batches()
    data[1][0, 0, 2, 2] = float("nan")
    masks, warned = quiet_masks(conv, data)
    assert torch.equal(masks["weight"], torch.ones(3, 3)) and any("NaN" in w for w in warned)


def test_flags_restored_and_no_grad():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3))
    model.train()
    model[1].eval()
    before = model[1].running_mean.clone()
    masks_from_data(model, batches())
    assert model.training and model[0].training and not model[1].training and model[2].training
    assert torch.equal(model[1].running_mean, before)  # ran in eval mode: BN statistics untouched
    assert all(p.grad is None for p in model.parameters())


def test_batches_read_twice_must_agree():
    conv = nn.Conv2d(3, 2, 3, padding=1)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        masks_from_data(conv, iter(batches()))

    class Shuffled:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(batches(seed=self.calls))

    with pytest.raises(ConfigError, match="differs between the two passes"):
        masks_from_data(conv, Shuffled())
    labelled = [(x, torch.zeros(4)) for x in batches()]
    torch.testing.assert_close(masks_from_data(conv, labelled)["weight"], masks_from_data(conv, batches())["weight"])


def test_autocorrelation_measure_runs():
    conv = nn.Conv2d(3, 2, 3, padding=1)
    G = masks_from_data(conv, batches(), measure="autocorrelation")["weight"]
    assert G.shape == (3, 3) and torch.isfinite(G).all() and G.mean().item() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="measure"):
        masks_from_data(conv, batches(), measure="mine")


@pytest.mark.parametrize("n", [1, 3])
def test_kept_batches_save_forwards_and_change_nothing(n):
    """Pass 2 skips the forwards of the batches whose layer inputs pass 1 kept: the last two when
    they fit in ``keep_bytes`` (2n - 2 forwards, n for n <= 2), only the last one with no budget
    (2n - 1), none with ``keep_last_batch=False`` (2n); the counts are the same every way."""
    from reparam.sgs.streaming import collect_statistics

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    data = batches(n=n)
    runs = {}
    for label, options, forwards in [("all", {}, n + max(n - 2, 0)), ("last", {"keep_bytes": 0}, 2 * n - 1),
                                     ("none", {"keep_last_batch": False}, 2 * n)]:
        calls.clear()
        runs[label] = collect_statistics(model, data, **options)
        assert len(calls) == forwards, label
    for name in runs["all"]:
        assert torch.equal(runs["all"][name].counts, runs["none"][name].counts)
        assert torch.equal(runs["last"][name].counts, runs["none"][name].counts)


def test_kept_batches_stay_within_the_budget():
    """With room for one and a half batches of layer inputs only the last batch is kept; with room
    for ten, still only the last two (memory constant in n): pass 2 runs n - 1, then n - 2 forwards."""
    from reparam.sgs.streaming import collect_statistics

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    data = batches(n=5)
    x = data[0][0] if isinstance(data[0], (tuple, list)) else data[0]
    one_batch = 4 * x.shape[0] * (3 + 4) * (x.shape[-2] + 2) * (x.shape[-1] + 2)  # both padded inputs, float32
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    collect_statistics(model, data, keep_bytes=3 * one_batch // 2)
    assert len(calls) == 5 + 4
    calls.clear()
    collect_statistics(model, data, keep_bytes=10 * one_batch)
    assert len(calls) == 5 + 3


@pytest.mark.parametrize("diagonal_removal", [False, True])
def test_state_does_not_grow_with_batches(diagonal_removal):
    """What a layer holds: two (C, H, W) range maps and (D, C, B, B) counts, B = Sturges' bins + 1
    (the only dependence on the number of batches: logarithmic, through the bins)."""
    from reparam.sgs.dependence import sturges_bins
    from reparam.sgs.streaming import collect_statistics

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 5, padding=2))
    for k in (1, 5):
        for s in collect_statistics(model, batches(n=k), diagonal_removal=diagonal_removal).values():
            (C, H, W), D = s.ranges.lo.shape, len(s.geometry.canonical)
            most_pairs = 4 * k * max(s.geometry.rects(j, H, W)[2] for j in range(D))
            B = s.width  # Sturges' bins + the trash bin
            assert diagonal_removal or sturges_bins(most_pairs) + 1 == s.width  # (diagonal removal: fewer pairs)
            extra = D * 5 * C * 8 if diagonal_removal else 0  # per-displacement non-zero ranges
            assert s.state_bytes == 2 * C * H * W * 4 + D * C * B * B * 8 + D * C * 8 + extra  # + pairs per (D, C)


def test_conv_subclass_with_its_own_forward_is_named():
    class PadInside(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    model = nn.Sequential(PadInside(3, 2, 3), nn.Conv2d(2, 2, 3, padding=1))
    masks, warned = quiet_masks(model, batches())
    assert set(masks) == {"0.weight", "1.weight"}
    assert any("0.weight" in w and "forward()" in w and "1.weight" not in w for w in warned)

"""convert_model / fuse_model on real torchvision models and on hand-made edge cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import F64_TOL, rel_err
from torch import nn

from reparam.blocks import ReparamBlock
from reparam.convert import UntraceableModelWarning, convert_model, find_conv_bn_pairs, fuse_model
from reparam.convert.workflow import randomized_copy
from reparam.errors import ConfigError


def randomized_reference(cls: type[nn.Module], size: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``cls()`` (seeded) with randomized BatchNorms (so that preservation can fail) in float64
    eval mode, an input batch ``(2, 3, size, size)`` and the model's output on it."""
    torch.manual_seed(0)
    original = randomized_copy(cls(), 0).double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        return original, x, original(x)


# model -> (second BN placement, options per block to keep DBB's wide 1x1->KxK merge cheap)
MODELS = {
    "resnet18": ("after", {"dbb": {"exclude": ["layer3.*", "layer4.*"]}}),
    "vgg11_bn": ("none", {"dbb": {"include": ["features.0", "features.4", "features.8"]}}),
    "mobilenet_v2": ("after", {}),  # depthwise
    "efficientnet_b0": ("none", {}),  # 5x5 depthwise, stride 2, BN eps 1e-3
    "regnet_x_400mf": ("after", {}),  # grouped convs
}
CASES = [
    (name, block, bn)
    for name, (other, _) in MODELS.items()
    for block in ("acb", "repvgg", "dbb")
    for bn in ("branch", other)
]

_cache: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}


def _original(name: str):
    if name not in _cache:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
        if name == "vgg11_bn":  # the 25088x4096 classifier is irrelevant to conv conversion
            model.classifier = nn.Linear(512 * 7 * 7, 10)
        model = randomized_copy(model, 0).double().eval()
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            _cache[name] = (model, x, model(x))
    return _cache[name]


@pytest.mark.parametrize("name,block,bn", CASES)
def test_torchvision_models_preserve_and_fuse(name, block, bn):
    original, x, reference = _original(name)
    options = MODELS[name][1].get(block, {})
    converted, report = convert_model(original, block, bn, return_report=True, **options)
    assert converted.reparam_report is report
    assert report.traced, report.trace_error
    assert len(report.converted) >= 3
    assert all(row.absorbed_bn for row in report.converted), [r.name for r in report.converted if not r.absorbed_bn]
    assert all(row.bn == bn for row in report.converted)
    blocks = [m for m in converted.modules() if isinstance(m, ReparamBlock)]
    assert len(blocks) == len(report.converted)
    assert not any(isinstance(m, ReparamBlock) for m in original.modules())  # the original is untouched
    converted.eval()
    with torch.no_grad():
        out = converted(x)
    assert rel_err(out, reference) <= F64_TOL
    fused, diff = fuse_model(converted, probe=x, return_report=True)
    assert not any(isinstance(m, ReparamBlock) for m in fused.modules())
    with torch.no_grad():
        fused_out = fused(x)
    assert rel_err(fused_out, out) <= F64_TOL
    assert diff <= F64_TOL * float(out.abs().max())


def test_resnet18_report_and_skips():
    original, _, _ = _original("resnet18")
    report = convert_model(original, "acb", "after").reparam_report
    assert {r.name for r in report.skipped} == {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}
    assert all("1x1" in r.reason for r in report.skipped)
    stem = report.layer("conv1")
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2) and stem.absorbed_bn == "bn1"
    assert report.layer("layer1.0.conv2").absorbed_bn == "layer1.0.bn2"
    text = str(report)
    assert "layer4.1.conv2" in text and "1x1 kernel" in text


def test_efficientnet_depthwise_5x5_stride2_converted():
    original, _, _ = _original("efficientnet_b0")
    converted = convert_model(original, "acb", "branch")
    rows = converted.reparam_report.converted
    assert any(r.kernel_size == (5, 5) and r.stride == (2, 2) and r.groups == r.in_channels > 1 for r in rows)


# -- hand-made edge cases -----------------------------------------------------------------
class EvenConv(nn.Conv2d):
    pass


class Edgy(nn.Module):
    """Conv with bias -> BN; conv without BN; conv whose output feeds BN *and* a residual;
    a BN that consumes a sum; a shared conv used twice; 1x1, even, reflect, subclass;
    dilation 2 with 'same'; padding 0 (the small branches crop)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(6, eps=1e-3, momentum=0.3)  # its eps must travel with it
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)  # no BN after it
        self.c3 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(6)  # consumes c3, but c3 also feeds the residual
        self.c4 = nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=3, bias=False)
        self.b4 = nn.BatchNorm2d(6)
        self.shared = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bs = nn.BatchNorm2d(6)
        self.pw = nn.Conv2d(6, 6, 1)
        self.even = nn.Conv2d(6, 6, 2, padding=1)
        self.reflect = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
        self.sub = EvenConv(6, 6, 3, padding=1)
        self.crop = nn.Conv2d(6, 8, 5, padding=0, stride=1, bias=False)
        self.bc = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = self.c2(x)
        y = self.c3(x)
        x = self.b3(y) + y
        x = F.relu(self.b4(self.c4(x)))
        x = self.bs(self.shared(self.shared(x)))
        x = self.pw(x)
        x = self.even(x)[..., 1:, 1:]
        x = self.sub(self.reflect(x))
        return self.bc(self.crop(x))


class Untraceable(Edgy):
    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            return super().forward(x)
        return x


@pytest.mark.parametrize("block", ["acb", "repvgg", "dbb"])
@pytest.mark.parametrize("bn", ["branch", "after", "none"])
@pytest.mark.parametrize("cls", [Edgy, Untraceable])
def test_edge_cases(cls, block, bn):
    original, x, reference = randomized_reference(cls, 12)
    if cls is Untraceable:
        with pytest.warns(UntraceableModelWarning, match="cannot trace Untraceable"):
            converted = convert_model(original, block, bn).eval()
    else:
        converted = convert_model(original, block, bn).eval()
    report = converted.reparam_report
    skipped = {r.name: r.reason for r in report.skipped}
    assert set(skipped) == {"pw", "even", "reflect", "sub"}
    assert "1x1" in skipped["pw"] and "even" in skipped["even"]
    assert "padding_mode" in skipped["reflect"] and "subclass" in skipped["sub"]
    rows = {r.name: r for r in report.converted}
    assert set(rows) == {"c1", "c2", "c3", "c4", "shared", "crop"}
    if cls is Edgy:
        assert report.traced
        absorbed = {n: r.absorbed_bn for n, r in rows.items() if r.absorbed_bn}
        assert absorbed == {"c1": "b1", "c4": "b4", "crop": "bc"}
        assert isinstance(converted.b1, nn.Identity) and isinstance(converted.b3, nn.BatchNorm2d)
        assert "2 users" in rows["c3"].note and "2 times" in rows["shared"].note
    else:
        assert not report.traced and report.trace_error
        assert not any(r.absorbed_bn for r in rows.values())
        assert "not traceable" in str(report)
    for _name, row in rows.items():
        assert row.bn == (bn if row.absorbed_bn else "none")
    if cls is Edgy and bn != "none":
        assert all(m.eps == 1e-3 and m.momentum == 0.3 for m in converted.c1.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        out = converted(x)
    assert rel_err(out, reference) <= F64_TOL
    fused, diff = fuse_model(converted, probe=x, return_report=True)
    with torch.no_grad():
        assert rel_err(fused(x), out) <= F64_TOL


def test_include_exclude_patterns():
    model = Edgy()
    report = convert_model(model, "acb", include=["c*"], exclude="c3").reparam_report
    assert {r.name for r in report.converted} == {"c1", "c2", "c4", "crop"}
    reasons = {r.name: r.reason for r in report.skipped}
    assert "exclude" in reasons["c3"] and "include" in reasons["shared"]


def test_direct_parameter_reads_are_skipped_and_frozen_convs_stay_frozen():
    class Standardized(nn.Module):
        def __init__(self):
            super().__init__()
            self.ws = nn.Conv2d(3, 4, 3, padding=1)
            self.frozen = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)

        def forward(self, x):
            w = self.ws.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
            return self.frozen(F.conv2d(x, w, self.ws.bias, padding=1))

    converted = convert_model(Standardized(), "acb")
    skipped = {r.name: r.reason for r in converted.reparam_report.skipped}
    assert set(skipped) == {"ws"} and "ws.weight" in skipped["ws"]
    assert not any(p.requires_grad for p in converted.frozen.parameters())
    converted(torch.randn(1, 3, 5, 5))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="block"):
        convert_model(Edgy(), "nope")
    with pytest.raises(ConfigError, match="bn"):
        convert_model(Edgy(), "acb", "sometimes")


def test_pairing_follows_dataflow_not_names():
    class Crossed(nn.Module):  # bn_a is declared next to conv_a but consumes conv_b
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
            self.bn_a = nn.BatchNorm2d(4)
            self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
            self.bn_b = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn_a(self.conv_b(F.relu(self.bn_b(self.conv_a(x)))))

    assert find_conv_bn_pairs(Crossed()).pairs == {"conv_a": "bn_b", "conv_b": "bn_a"}
    original = randomized_copy(Crossed(), 0).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    converted = convert_model(original, "repvgg", "after").eval()
    with torch.no_grad():
        assert rel_err(converted(x), original(x)) <= F64_TOL


@pytest.mark.parametrize("block", ["acb", "repvgg", "dbb"])
@pytest.mark.parametrize("bn", ["branch", "after", "none"])
def test_every_block_parameter_trains(block, bn):
    """preserve=True must not freeze branches: after two SGD steps every parameter moved."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    converted = convert_model(randomized_copy(original, 0).double(), block, bn).train()
    before = {n: p.detach().clone() for n, p in converted.named_parameters()}
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(converted(x), y).backward()
        opt.step()
    frozen = [n for n, p in converted.named_parameters() if torch.equal(p, before[n])]
    assert not frozen


def test_preserve_false_is_fresh():
    original = randomized_copy(Edgy(), 0).eval()
    converted = convert_model(original, "acb", "after", preserve=False)
    assert torch.equal(converted.c1.post_bn.running_mean, torch.zeros(6))
    assert not torch.equal(converted.c1.branches["square"].weight, original.c1.weight)


def test_inplace_and_fuse_keeps_training_flag():
    model = Edgy().train()
    same = convert_model(model, "acb", inplace=True)
    assert same is model and isinstance(model.c1, ReparamBlock)
    fused = fuse_model(model)
    assert fused is not model and fused.training and isinstance(fused.c1, nn.Conv2d)
    assert isinstance(model.c1, ReparamBlock)


def test_result_objects_and_the_deprecated_fuse_tuple():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    result = convert_model(model, "acb", "after", return_report=True)
    assert result.model.reparam_report is result.report and len(result.report.converted) == 1
    fused = fuse_model(result.model, probe=x, return_report=True)
    assert fused.report.fused == ["0"] and fused.report.max_abs_diff < 1e-12
    assert fuse_model(result.model, return_report=True).report.max_abs_diff is None
    with pytest.warns(DeprecationWarning, match="return_report=True"):
        deployed, diff = fuse_model(result.model, probe=x)
    assert isinstance(deployed[0], nn.Conv2d) and diff == fused.report.max_abs_diff

"""Conversion edge cases found by an audit: aliased modules through convert -> to_sgs -> fuse,
models torch.fx cannot trace, mask files for another model or with corrupted payloads,
model specs in the current directory, and clean CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file
from test_convert_models import randomized_reference  # tests/ is on sys.path (no __init__.py)
from torch import nn

from reparam.cli import main
from reparam.convert import (
    MaskFileWarning,
    UntraceableModelWarning,
    convert_model,
    fuse_model,
    load_masks,
    read_mask_file,
    save_masks,
    to_sgs,
)
from reparam.convert.maskfile import _checksum
from reparam.convert.workflow import randomized_copy
from reparam.errors import ConversionError, MaskFileError


# -- 1. aliases through convert -> to_sgs -> fuse ----------------------------------------------
class BNAlias(nn.Module):  # the BN is registered twice; the forward calls the second name
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.norm = self.bn

    def forward(self, x):
        return self.norm(self.conv(x))


class ConvAlias(nn.Module):  # the conv is registered twice
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.alias = self.conv
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.alias(x))


class BothAlias(BNAlias):  # both, and the BN aliased inside an aliased container too
    def __init__(self) -> None:
        super().__init__()
        self.alias = self.conv
        self.inner = nn.Sequential(self.bn)
        self.inner_alias = self.inner

    def forward(self, x):
        return self.inner_alias[0](self.alias(x))


class SharedBN(nn.Module):  # one BN after two convs: called twice, so never absorbed
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.norm = self.bn

    def forward(self, x):
        return self.norm(self.b(F.relu(self.bn(self.a(x)))))


@pytest.mark.parametrize("block,bn", [("acb", "after"), ("repvgg", "branch")])
@pytest.mark.parametrize("cls", [BNAlias, ConvAlias, BothAlias, SharedBN])
def test_aliases_survive_convert_to_sgs_and_fuse(cls, block, bn):
    original, x, reference = randomized_reference(cls, 8)
    branched = convert_model(original, block, bn).eval()
    plain, masks, _ = to_sgs(branched, warn=False)
    fused = fuse_model(branched)
    with torch.no_grad():
        for model in (branched, plain.eval(), fused):
            assert torch.allclose(model(x), reference, rtol=0, atol=1e-10)
    # the plain SGS model has the original architecture: the same module at every original name
    original_names = {n: type(m) for n, m in original.named_modules(remove_duplicate=False)}
    assert {n: type(m) for n, m in plain.named_modules(remove_duplicate=False)} == original_names
    assert set(masks) <= set(dict(original.named_parameters()))
    if hasattr(original, "norm"):
        assert plain.norm is plain.bn
    if hasattr(original, "alias"):
        assert plain.alias is plain.conv


def test_bn_alias_sgs_trajectory_equals_branched():
    torch.manual_seed(0)
    branched = convert_model(randomized_copy(BNAlias(), 0).double(), "acb", "after").train()
    plain, masks, constants = to_sgs(branched)
    from reparam.sgs import attach_sgs

    opt_b = torch.optim.SGD(branched.parameters(), lr=0.1, momentum=0.9)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    attach_sgs(opt_p, masks, constant_kernels=constants, model=plain)
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        for model, opt in ((branched, opt_b), (plain, opt_p)):
            opt.zero_grad()
            torch.tanh(model(x)).square().mean().backward()
            opt.step()
    merged, _ = branched.conv.merged_kernel(post_bn=False)
    assert torch.allclose(merged, plain.conv.weight, rtol=0, atol=1e-12)
    assert torch.allclose(branched.conv.post_bn.weight, plain.norm.weight, rtol=0, atol=1e-12)


# -- 7. models torch.fx cannot trace ---------------------------------------------------------
class DirectRead(nn.Module):
    """Untraceable (data-dependent branch) and reads ``ws.weight`` outside ``ws``'s forward."""

    def __init__(self) -> None:
        super().__init__()
        self.ws = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.mean() > 100:
            return x
        w = self.ws.weight
        w = w - w.mean((1, 2, 3), keepdim=True)
        return self.bn(self.c(F.conv2d(x, w, self.ws.bias, padding=1)))


def test_untraceable_model_warns_and_example_input_guards_direct_reads():
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(UntraceableModelWarning, match=r"cannot trace DirectRead .*bn='after' was asked.*example_input="):
        convert_model(DirectRead(), "acb", "after")
    with pytest.warns(UntraceableModelWarning, match=r"directly \(seen on example_input\) were left as they are: ws"):
        converted, report = convert_model(DirectRead(), "acb", "after", example_input=x, return_report=True)
    assert {r.name for r in report.converted} == {"c"}
    assert "ws.weight" in report.skipped[0].reason and report.max_abs_diff == 0.0
    assert isinstance(converted.ws, nn.Conv2d)
    converted(x)  # no AttributeError at the first forward


def test_example_input_failures_are_conversion_errors():
    class Broken(nn.Sequential):
        def forward(self, x):
            out = super().forward(x)
            return out if self[0].padding_mode == "zeros" else -out  # a block has no padding_mode

    model = Broken(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(ConversionError, match=r"the converted model fails on example_input of shape \(1, 3, 5, 5\)"):
        convert_model(model, example_input=torch.randn(1, 3, 5, 5))
    with pytest.raises(ConversionError, match=r"the model fails on example_input"):
        convert_model(model, example_input=torch.randn(1, 2, 5, 5))


def test_notes_say_what_consumes_the_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    notes = {r.name: r.note for r in convert_model(model, "acb", "after").reparam_report.converted}
    assert "SyncBatchNorm: absorbed" in notes["0"]  # issue 11: SyncBatchNorm is absorbed now, said per layer
    assert "'3' (ReLU)" in notes["2"] and "model's output" in notes["4"]
    assert not any("no BatchNorm consumes it" in note for note in notes.values())


# -- 4, 5, 6, 8. mask files ------------------------------------------------------------------
def _sgs_resnet(name: str, **options):
    torch.manual_seed(0)
    return to_sgs(convert_model(torchvision.models.get_model(name, num_classes=10), "repvgg", "after", **options))


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    plain, masks, constants = _sgs_resnet("resnet18")
    path = tmp_path_factory.mktemp("masks") / "r18.safetensors"
    save_masks(path, masks, model=plain, constants=constants)
    return path, plain, masks, constants


def test_file_for_a_smaller_model_is_rejected_naming_the_uncovered_layers(r18_file):
    path, plain, masks, _ = r18_file
    r34 = torchvision.models.resnet34(num_classes=10)
    with pytest.raises(MaskFileError, match=r"16 conv layer\(s\) of the model have no entry") as err:
        load_masks(path, r34, constants=False)
    assert "layer1.2.conv1.weight" in str(err.value) and "layer1.0.conv1.weight" not in str(err.value)
    with pytest.warns(MaskFileWarning, match=r"16 conv layer\(s\) of the model get no mask.*layer3.5.conv2.weight"):
        loaded = load_masks(path, r34, constants=False, allow_missing=True)
    assert loaded.keys() == masks.keys()
    # a file for part of a model (include=) still loads into that model: its other convs are recorded
    part, part_masks, _ = _sgs_resnet("resnet18", include="layer1.*")
    save_masks(path.parent / "part.safetensors", part_masks, model=part)
    assert set(load_masks(path.parent / "part.safetensors", plain)) == set(part_masks)


def test_constants_are_sparse_exact_and_not_dropped_silently(r18_file):
    path, plain, masks, constants = r18_file
    assert os.path.getsize(path) < 100_000  # the dense identity kernels alone are 37 MB
    with safe_open(path, "pt") as handle:
        assert handle.get_tensor("constant_value/layer1.0.conv1.weight").shape == (64,)
    with pytest.warns(MaskFileWarning, match="constant kernels for 13 layer"):
        load_masks(path, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_masks(path, plain, constants=False)
        _, loaded = load_masks(path, plain, constants=True)
    assert loaded.keys() == constants.keys()
    assert all(torch.equal(loaded[n], constants[n]) and loaded[n].dtype == constants[n].dtype for n in constants)


def _rewrite(path: Path, out: Path, edit_tensors=None, edit_meta=None, fix_checksums: bool = True) -> Path:
    with safe_open(path, "pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if fix_checksums:
        meta["reparam.checksums"] = json.dumps({k: _checksum(t) for k, t in tensors.items()})
    save_file(tensors, out, metadata=meta)
    return out


def _set(key: str, value: torch.Tensor):
    return lambda tensors: tensors.__setitem__(key, value)


def test_corrupted_payloads_and_negative_masks_are_rejected(r18_file, tmp_path):
    path, plain, masks, _ = r18_file
    key = "mask/layer1.0.conv1.weight"
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start = json.loads(data[8:8 + size])[key]["data_offsets"][0] + 8 + size
    data[start + 7] ^= 0x01  # 1.0 -> 0.25 in the payload, the header untouched
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(MaskFileError, match=r"'mask/layer1.0.conv1.weight': checksum mismatch"):
        load_masks(tmp_path / "flip.safetensors", plain, constants=False)
    mask = masks["layer1.0.conv1.weight"]
    scaled = _rewrite(path, tmp_path / "scaled.safetensors", _set(key, mask * 2), fix_checksums=False)
    with pytest.raises(MaskFileError, match="checksum mismatch"):
        read_mask_file(scaled)
    negative = _rewrite(path, tmp_path / "neg.safetensors", _set(key, -mask))
    with pytest.raises(MaskFileError, match=r"layer1.0.conv1.weight: negative mask values .*ascend"):
        read_mask_file(negative)
    with pytest.raises(MaskFileError, match=r"save_masks: layer1.0.conv1.weight: negative"):
        save_masks(tmp_path / "x.safetensors", {"layer1.0.conv1.weight": -torch.ones(3, 3)})
    real = torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) * 2  # non-negative real, e.g. MI-driven
    save_masks(tmp_path / "real.safetensors", {"layer1.0.conv1.weight": real})
    assert torch.equal(read_mask_file(tmp_path / "real.safetensors").masks["layer1.0.conv1.weight"], real)


def test_malformed_metadata_and_old_schema_are_clean_errors(r18_file, tmp_path):
    path, plain, *_ = r18_file

    def bad_entry(meta):
        layers = json.loads(meta["reparam.layers"])
        layers["layer1.0.conv1.weight"] = "x"
        meta["reparam.layers"] = json.dumps(layers)

    bad = _rewrite(path, tmp_path / "bad.safetensors", edit_meta=bad_entry)
    with pytest.raises(MaskFileError, match=r"layer entry 'layer1.0.conv1.weight' is str 'x'"):
        load_masks(bad, plain)
    old = _rewrite(path, tmp_path / "v1.safetensors", edit_meta=lambda meta: meta.update({"reparam.schema": "1"}))
    with pytest.raises(MaskFileError, match=r"schema version 1 was written by an older reparam.*re-create it"):
        load_masks(old, plain)


# -- 3. module:callable from the current directory, through the installed console script ------
def test_console_script_is_reparam_cli_main():
    scripts = [e for e in metadata.entry_points(group="console_scripts") if e.name == "reparam"]
    assert [e.value for e in scripts] == ["reparam.cli:main"]


def test_model_spec_in_the_current_directory_with_the_console_script(tmp_path):
    (tmp_path / "mynets_cwd.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny():
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    """))
    script = Path(sys.executable).with_name("reparam")
    # the console script does not put the current directory on sys.path; neither does python -I -c
    entry = "import sys; from reparam.cli import main; sys.exit(main())"
    command = [str(script)] if script.exists() else [sys.executable, "-I", "-c", entry]
    done = subprocess.run(command + ["masks", "--model", "mynets_cwd:tiny", "--out", "m.safetensors"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "0.weight" in read_mask_file(tmp_path / "m.safetensors").masks


# -- 6, 8. CLI errors and the meaningful preservation check -----------------------------------
FIXED_SIZE = textwrap.dedent("""
    from torch import nn

    class Fixed(nn.Sequential):
        def forward(self, x):
            assert x.shape[-1] == 20, "Wrong image size"
            return super().forward(x)

    def fixed():
        return Fixed(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def flat():  # traceable, also for 20x20 inputs only
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * 20 * 20, 2))
""")


@pytest.fixture()
def fixed_module(tmp_path, monkeypatch):
    (tmp_path / "reparam_fixed_size.py").write_text(FIXED_SIZE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "reparam_fixed_size:fixed"
    sys.modules.pop("reparam_fixed_size", None)


def test_cli_errors_are_one_line(fixed_module, tmp_path, capsys):
    assert main(["convert", "--model", fixed_module, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "AssertionError: Wrong image size" in err and "--input-size" in err and "Traceback" not in err
    assert main(["convert", "--model", fixed_module, "--out", str(tmp_path / "o"), "--input-size", "20"]) == 0
    capsys.readouterr()
    (tmp_path / "file").write_text("")
    for argv in (["masks", "--out", "/nonexistent/dir/m.safetensors"],
                 ["masks", "--out", str(tmp_path / "m.safetensors"), "--plot", str(tmp_path / "file" / "m.png")],
                 ["convert", "--out", str(tmp_path / "file" / "out")]):
        assert main(argv[:1] + ["--model", fixed_module] + argv[1:]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"reparam {argv[0]}: error: cannot "), err


def test_cli_preservation_check_uses_randomized_batchnorm(fixed_module, tmp_path, monkeypatch, capsys):
    import reparam.convert.model as model_module

    fresh = lambda source, shift: nn.BatchNorm2d(source.num_features).to(source.running_mean.dtype)  # noqa: E731
    monkeypatch.setattr(model_module, "_load_bn", fresh)  # a conversion bug: the BN is not loaded
    flat = fixed_module.replace(":fixed", ":flat")
    assert main(["convert", "--model", flat, "--bn", "after", "--out", str(tmp_path), "--input-size", "20"]) == 0
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary["max_abs_diff_branched_vs_original"] > 0.01  # fresh BNs are the identity: would read 0
    assert "randomized BatchNorm" in summary["branched_vs_original_on"]
    assert "randomized BatchNorm" in capsys.readouterr().out


def test_docs_convert_examples_run(tmp_path, monkeypatch):
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "convert.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/convert.md[python block {index}]", "exec"), {"__name__": "__docs__"})

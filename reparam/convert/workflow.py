"""The ``reparam convert`` workflow as a library call: resolve a model spec, convert it, fuse
it, derive its SGS form, measure the output differences on a probe, and write the files.

    result = convert_workflow(ConvertOptions("torchvision:resnet18", block="acb", bn="after"))
    paths = write_outputs(result, "runs/r18")

:func:`convert_workflow` checks every option before any work and raises a
:class:`~reparam.errors.ReparamError` (one line) for bad input; :func:`write_outputs` writes
every file into a temporary folder first and moves them into place only when all were
written, so an error or Ctrl-C never leaves a half-written run (nor an empty folder it made).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from reparam.blocks import BLOCKS, BN_PLACEMENTS
from reparam.convert.foreign import has_branched_blocks, outcome_line
from reparam.convert.loading import load_model
from reparam.convert.maskfile import save_masks
from reparam.convert.model import convert_model, eval_output, fuse_model, max_output_difference, to_sgs
from reparam.convert.randomize import randomize_batchnorms_
from reparam.convert.report import ConversionReport
from reparam.convert.results import FuseResult, SGSConversion
from reparam.errors import ConfigError, ConversionError, NothingToConvertWarning, error_line

PRESERVE_CHECK = "on a copy with randomized BatchNorm statistics/affine parameters and conv biases, seed {seed}"
FILES = ("branched.safetensors", "fused.safetensors", "masks.safetensors", "report.json", "report.md")


@dataclass
class ConvertOptions:
    """What ``reparam convert`` asks for (the CLI options, same names)."""

    model: str
    block: str = "acb"
    bn: str = "branch"
    include: list[str] | None = None
    exclude: list[str] | None = None
    input_size: int = 32
    in_channels: int | None = None
    batch: int = 2
    seed: int = 0
    float64: bool = False
    fresh: bool = False

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option (before any work)."""
        if self.block not in BLOCKS:
            raise ConfigError(f"--block {self.block!r} is not supported; choose one of {sorted(BLOCKS)}")
        if self.bn not in BN_PLACEMENTS:
            raise ConfigError(f"--bn {self.bn!r} is not supported; choose one of {list(BN_PLACEMENTS)}")
        for option, value in (("--batch", self.batch), ("--input-size", self.input_size),
                              ("--in-channels", self.in_channels)):
            if value is not None and value < 1:
                raise ConfigError(f"{option} {value}: must be a positive integer (the probe needs at least one element)")


@dataclass
class ConvertRun:
    """Everything :func:`convert_workflow` produced; :meth:`summary`, :meth:`document` and
    :meth:`markdown` are what ``report.json`` / ``report.md`` hold."""

    options: ConvertOptions
    model: nn.Module  # the branched (converted) model, eval mode
    report: ConversionReport
    fused: FuseResult
    sgs: SGSConversion
    probe_shape: tuple[int, ...]
    dtype: torch.dtype
    output_scale: float  # max |branched(probe)|, to make the fused difference relative
    preserve_diff: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    deploy: nn.Module | None = None  # what fused.safetensors holds (see deploy_model)
    deploy_layout: str = "fuse_model"  # "original": the original model's names; "fuse_model": fuse_model's
    deploy_diff: float | None = None  # max |deploy(probe) - branched(probe)| (eval mode)

    def summary(self) -> dict[str, Any]:
        o, fused_diff = self.options, self.fused.report.max_abs_diff
        return {
            **{k: v for k, v in self.metadata.items() if k != "bn_used"},  # per layer: the Layers table
            "preserve": not o.fresh,
            "probe_shape": list(self.probe_shape),
            "dtype": str(self.dtype).replace("torch.", ""),
            "max_abs_diff_fused_vs_branched": fused_diff,
            "max_rel_diff_fused_vs_branched": fused_diff / self.output_scale,
            "fused_file_layout": self.deploy_layout,
            "max_abs_diff_fused_file_vs_branched": self.deploy_diff,
            "max_abs_diff_branched_vs_original": self.preserve_diff,
            "branched_vs_original_on": None if o.fresh else PRESERVE_CHECK.format(seed=o.seed),
            "converted": len(self.report.converted),
            "skipped": len(self.report.skipped),
            "sgs_approximate": len(self.sgs.report.approximate),
        }

    def document(self, files: dict[str, str]) -> dict[str, Any]:
        return {"summary": self.summary(), "conversion": self.report.to_dict(), "sgs": self.sgs.report.to_dict(),
                "files": files}

    def markdown(self) -> str:
        import pandas as pd  # only for the report files: `import reparam` stays light

        layers = pd.DataFrame(self.report.rows())
        sgs_rows = pd.DataFrame(self.sgs.report.rows())
        summary = pd.DataFrame([self.summary()]).T.rename(columns={0: "value"})
        lines = [f"# reparam convert: {self.options.model}", "", summary.to_markdown(), "", "## Layers", "",
                 layers.to_markdown(index=False) if len(layers) else "(no convs)"]
        if len(sgs_rows):
            lines += ["", "## SGS form", "", sgs_rows.to_markdown(index=False)]
        if not self.report.traced:
            lines += ["", f"Model not traceable by torch.fx ({self.report.trace_error}): no BatchNorm was absorbed."]
        return "\n".join(lines) + "\n"


def first_conv_channels(model: nn.Module) -> int:
    """The input channels of the first ``nn.Conv2d`` (3 if there is none)."""
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)


@torch.no_grad()
def randomized_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics and affine parameters and conv
    biases are random (deterministic in ``seed``), so that a function-preservation check
    cannot pass by accident (torchvision's fresh BatchNorms are the identity in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    copied = randomize_batchnorms_(copy.deepcopy(model), gen, mean_scale=0.2, var_range=(0.5, 1.5),
                                   gamma_scale=0.3, beta_scale=0.2)
    with torch.no_grad():
        for module in copied.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.out_channels, generator=gen, dtype=torch.float64))
    return copied


def _probe(options: ConvertOptions, original: nn.Module) -> Tensor:
    """A random batch the model accepts; a model that fails on it is a one-line error with a hint."""
    generator = torch.Generator().manual_seed(options.seed)
    channels = options.in_channels or first_conv_channels(original)
    probe = torch.randn(options.batch, channels, options.input_size, options.input_size, generator=generator)
    probe = probe.to(next(original.parameters()).dtype)
    try:
        with torch.no_grad():
            original(probe)
    except Exception as err:  # noqa: BLE001 - any failure of the model's forward on the probe
        raise ConversionError(
            f"the model fails on a probe of shape {tuple(probe.shape)} ({error_line(err)}); set --input-size "
            "(e.g. 224 for a model with a fixed input size) or --in-channels"
        ) from None
    return probe


def deploy_model(original: nn.Module, fused: nn.Module, plain: nn.Module) -> tuple[nn.Module, str]:
    """What ``fused.safetensors`` holds: the plain model (:func:`to_sgs`: one conv per block, BNs
    back in their slots, eval-equal to the branched model) when its state dict has exactly the
    original model's names and shapes, so it loads strictly into the original architecture
    (``"original"``); else the :func:`fuse_model` model (``"fuse_model"``: it loads into
    ``fuse_model(convert_model(original, ...))``, e.g. after ``bn="none"`` folded a BN away)."""
    reference, state = original.state_dict(), plain.state_dict()
    if state.keys() == reference.keys() and all(state[k].shape == reference[k].shape for k in reference):
        return plain, "original"
    return fused, "fuse_model"


def _preservation_check(options: ConvertOptions, original: nn.Module, probe: Tensor) -> float | None:
    """``max |branched - original|`` on a copy whose BatchNorms are not the identity (so the check can fail)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already raised for the model itself
        check = convert_model(randomized_copy(original, options.seed), options.block, options.bn,
                              include=options.include, exclude=options.exclude, example_input=probe,
                              inplace=True, return_report=True)
    return check.report.max_abs_diff


def convert_workflow(options: ConvertOptions) -> ConvertRun:
    """Check ``options``, build the model, convert, fuse and derive the SGS form, and measure
    on a random probe (eval mode): fused vs branched, and branched vs original on a randomized
    copy (unless ``fresh``). Warnings of the conversion propagate; bad input raises a
    :class:`~reparam.errors.ReparamError`."""
    options.check()
    original = load_model(options.model).eval()
    if options.float64:
        original = original.double()
    probe = _probe(options, original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingToConvertWarning)  # raised below as a one-line error
        model, report = convert_model(original, options.block, options.bn, include=options.include,
                                      exclude=options.exclude, preserve=not options.fresh, example_input=probe,
                                      return_report=True)
    if not report.converted and not has_branched_blocks(model):
        raise ConversionError(f"nothing to convert in {options.model}: no eligible conv ({len(report.skipped)} "
                              "skipped, see --include/--exclude) and no branched block reparam recognises")
    model.eval()
    with torch.no_grad():
        branched_out = model(probe)
    run = ConvertRun(
        options=options, model=model, report=report, fused=fuse_model(model, probe=probe, return_report=True),
        sgs=to_sgs(model, warn=False), probe_shape=tuple(probe.shape), dtype=probe.dtype,
        output_scale=max(max_output_difference(branched_out, branched_out * 0), 1e-30),
        metadata={"model": options.model, "block": options.block, "bn": options.bn,
                  "bn_used": json.dumps(report.placements()), "bn_summary": report.bn_summary()},
    )
    run.deploy, run.deploy_layout = deploy_model(original, run.fused.model, run.sgs.model)
    run.deploy_diff = max_output_difference(branched_out, eval_output(run.deploy, probe))
    run.metadata["fused_layout"] = run.deploy_layout
    run.metadata["outcome"] = outcome_line(report, run.sgs.report)
    if not options.fresh:
        run.preserve_diff = _preservation_check(options, original, probe)
    return run


def _save_state_dict(model: nn.Module, path: str, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    try:
        save_file(state, path, metadata=meta)
    except Exception as err:  # noqa: BLE001 - OSError or the writer's own error type
        raise OSError(f"{path}: {err}") from None


def _write_all(run: ConvertRun, folder: str, files: dict[str, str]) -> None:
    here = {name: os.path.join(folder, name) for name in FILES}
    _save_state_dict(run.model, here["branched.safetensors"], run.metadata)
    _save_state_dict(run.deploy, here["fused.safetensors"], run.metadata)
    save_masks(here["masks.safetensors"], run.sgs.masks, model=run.sgs.model, constants=run.sgs.constants,
               metadata=run.metadata)
    with open(here["report.json"], "w") as handle:
        json.dump(run.document(files), handle, indent=2)
    with open(here["report.md"], "w") as handle:
        handle.write(run.markdown())


def write_outputs(run: ConvertRun, out: str | os.PathLike) -> dict[str, str]:
    """Write :data:`FILES` into ``out`` (created if needed); return ``{file name: path}``.

    All-or-nothing: the files are written into a temporary folder beside them and moved into
    ``out`` only once every one was written; on any error or ``KeyboardInterrupt`` the
    temporary folder is removed, and so is ``out`` if this call created it."""
    out = os.path.abspath(os.fspath(out))
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    files = {name: os.path.join(out, name) for name in FILES}
    staging = tempfile.mkdtemp(prefix=".partial-", dir=out)
    try:
        _write_all(run, staging, files)
        for name, path in files.items():
            os.replace(os.path.join(staging, name), path)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files

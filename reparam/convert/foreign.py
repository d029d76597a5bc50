"""Conversion of models whose branched blocks reparam did not build (timm's RepVGG / MobileOne /
large-kernel / RepMixer blocks): what :func:`convert_model`, :func:`fuse_model` and
:func:`to_sgs` do with them (see :mod:`reparam.adapters`), and the warning for a model with
nothing to convert."""
from __future__ import annotations

import warnings
from collections import Counter

from torch import nn

from reparam.adapters import find_blocks, fuse_foreign, inside_blocks, to_sgs_foreign
from reparam.adapters.analysis import BlockAnalysis
from reparam.convert.report import ConversionReport, SGSLayer, SGSReport
from reparam.convert.results import FuseReport, SGSConversion
from reparam.sgs.preconditioner import SpatialPreconditioner

#: SGSLayer.bn for a foreign block: BatchNorm inside its branches, and its mode
BN_LABELS = {"train": "branch", "eval": "branch (eval)", "none": "none"}


class NothingToConvertWarning(UserWarning):
    """The model has no conv to convert and no branched block to fuse or turn into SGS masks."""


def inside_reasons(model: nn.Module) -> dict[str, str]:
    """Qualified module name -> why a conv there is never converted (it is part of a recognised block)."""
    return {name: f"inside the branched block {block!r} ({kind}): never converted again"
            for name, (block, kind) in inside_blocks(model).items()}


def has_branched_blocks(model: nn.Module) -> bool:
    """True if ``model`` holds a recognised branched block (reparam's own included)."""
    return bool(find_blocks(model, include_native=True))


def warn_nothing(what: str, model: nn.Module, detail: str) -> None:
    warnings.warn(
        f"{what}: nothing to convert in {type(model).__name__}: {detail}, and it has no branched block reparam "
        "recognises (timm RepVggBlock / MobileOneBlock / ReparamLargeKernelConv / RepMixer or a reparam block); "
        "for your own block use reparam.adapters.analyse_block",
        NothingToConvertWarning, stacklevel=3,
    )


def fuse_foreign_blocks(target: nn.Module, report: FuseReport) -> None:
    """Fuse every recognised foreign block of ``target`` in place into its deploy form."""
    _, layers = fuse_foreign(target, inplace=True)
    report.fused += [layer.block_name for layer in layers]


def _shown_mask(analysis: BlockAnalysis) -> tuple[list[list[float]], str]:
    """The ``(kh, kw)`` mask a report shows, and the form SGS applies."""
    mask = analysis.mask
    if isinstance(mask, SpatialPreconditioner):
        kh, kw = analysis.weight.shape[-2:]
        return mask.matrix.diagonal().reshape(kh, kw).double().tolist(), "preconditioner P (diagonal shown)"
    if mask.ndim > 2:
        return mask.double().reshape(-1, *mask.shape[-2:]).mean(0).tolist(), "per-channel mask (channel mean shown)"
    return mask.double().tolist(), "mask"


def add_foreign_sgs(target: nn.Module, result: SGSConversion) -> None:
    """Turn every recognised foreign block of ``target`` (in place) into its deploy form, and add
    its masks (keyed by deploy names), constants and report rows to ``result``."""
    foreign = to_sgs_foreign(target, inplace=True)
    result.masks.update(foreign.masks)  # type: ignore[arg-type]
    result.constants.update(foreign.constants)
    for layer in foreign.layers:
        a = layer.analysis
        shown, form = _shown_mask(a)
        result.report.layers.append(SGSLayer(
            block_name=layer.block_name, weight=layer.weight, block=a.kind, bn=BN_LABELS[a.bn], mask=shown,
            exact=a.exact, reasons=list(a.reasons), has_constant=a.constant is not None,
            frozen=not target.get_parameter(layer.weight).requires_grad, form=form,
        ))


def outcome_line(conversion: ConversionReport, sgs: SGSReport) -> str:
    """What really happened, in one line: convs converted (with the BN placement each got),
    recognised blocks the model already had, and how many SGS layers are exact."""
    parts = []
    if conversion.converted:
        placements = Counter(row.bn for row in conversion.converted)
        bns = ", ".join(f"{bn} x{count}" for bn, count in placements.items())
        parts.append(f"{len(conversion.converted)} convs -> {conversion.block} (bn: {bns})")
    kinds = Counter(layer.block for layer in sgs.layers if conversion.layer(layer.block_name) is None)
    parts += [f"{count} {kind}" for kind, count in kinds.items()]
    status = Counter("frozen" if l.frozen else "exact" if l.exact else "approximate" for l in sgs.layers)
    sgs_part = ", ".join(f"{count} {name}" for name, count in status.items())
    return "; ".join(parts or ["nothing converted"]) + (f"; SGS: {sgs_part}" if sgs_part else "")


def layer_metadata(sgs: SGSReport) -> dict[str, dict[str, str]]:
    """Per trained weight: its block, the BatchNorm placement it really has, SGS status and why."""
    return {l.weight: {"block": l.block, "bn": l.bn,
                       "sgs": "frozen" if l.frozen else "exact" if l.exact else "approximate",
                       "why": "; ".join(([] if l.form == "mask" else [l.form]) + l.reasons)}
            for l in sgs.layers}

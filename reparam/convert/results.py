"""One result shape for every conversion: a small object with the product (``model`` or
``masks``) and the ``report`` of what was done.

Each result also unpacks (and indexes) as the tuple the function returned before this
convention, so ``model, report = convert_model(..., return_report=True)``,
``fused, diff = fuse_model(model, probe=x, return_report=True)``, ``plain, masks, constants =
to_sgs(model)`` and ``masks, constants = load_masks(path, model, constants=True)`` keep working.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from reparam.convert.report import ConversionReport, SGSReport


class _Unpacks:
    """Iterating or indexing gives :meth:`_legacy`, the tuple the function used to return."""

    def _legacy(self) -> tuple:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        return iter(self._legacy())

    def __getitem__(self, index: int) -> Any:
        return self._legacy()[index]

    def __len__(self) -> int:
        return len(self._legacy())


@dataclass
class ConvertResult(_Unpacks):
    """``convert_model(..., return_report=True)``: the converted model and its report
    (unpacks as ``(model, report)``)."""

    model: nn.Module
    report: ConversionReport

    def _legacy(self) -> tuple:
        return self.model, self.report


@dataclass
class FuseReport:
    """What :func:`fuse_model` did: the fused block names and, with a probe, the largest
    ``|fused(probe) - branched(probe)|`` (both in eval mode)."""

    fused: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None


@dataclass
class FuseResult(_Unpacks):
    """``fuse_model(..., return_report=True)``: the deploy model and its :class:`FuseReport`
    (unpacks as ``(model, max_abs_diff)``)."""

    model: nn.Module
    report: FuseReport

    def _legacy(self) -> tuple:
        return self.model, self.report.max_abs_diff


@dataclass
class SGSConversion(_Unpacks):
    """``to_sgs(model)``: the plain model, its :class:`SGSReport`, the masks and the constant
    kernels keyed by weight name (unpacks as ``(model, masks, constants)``)."""

    model: nn.Module
    report: SGSReport
    masks: dict[str, Tensor] = field(default_factory=dict)
    constants: dict[str, Tensor] = field(default_factory=dict)

    def _legacy(self) -> tuple:
        return self.model, self.masks, self.constants


@dataclass
class LoadedMasks(_Unpacks):
    """``load_masks(..., return_report=True)`` (or ``constants=True``): the masks and constant
    kernels, validated against ``model``, with the file's metadata and the model's conv
    layers the file has no entry for (unpacks as ``(masks, constants)``)."""

    model: nn.Module
    masks: dict[str, Tensor]
    constants: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    uncovered: list[str] = field(default_factory=list)

    @property
    def report(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "uncovered": self.uncovered, "layers": sorted(self.masks)}

    def _legacy(self) -> tuple:
        return self.masks, self.constants

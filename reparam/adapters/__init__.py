"""Branched blocks reparam did not build: recognised by class and structure (timm's RepVGG,
MobileOne, large-kernel and RepMixer blocks, reparam's own blocks), or any module that is a conv
of its input (:class:`GenericAdapter`). Never imports timm.

- :func:`recognise`: the adapter of a module, or None;
- :func:`analyse`: fused conv, exact ``P = J J^T`` reduced to a mask/preconditioner (or the
  mask-sum and why it is approximate), constant kernel;
- :func:`analyse_block`: both, for any module (generic path when not recognised);
- :func:`fuse_foreign` / :func:`to_sgs_foreign`: whole models, keyed by deploy names.
"""
from __future__ import annotations

from torch import nn

from reparam.adapters.analysis import BlockAnalysis, analyse
from reparam.adapters.base import Adapter, SumCore
from reparam.adapters.model import ForeignLayer, ForeignSGS, find_blocks, fuse_foreign, inside_blocks, to_sgs_foreign
from reparam.adapters.native import GenericAdapter, ReparamBlockAdapter
from reparam.adapters.registry import ADAPTERS, recognise
from reparam.blocks.geometry import ConvGeometry


def analyse_block(module: nn.Module, geometry: ConvGeometry | None = None) -> BlockAnalysis:
    """:func:`analyse` with the recognised adapter, or the generic one (``geometry`` optional)."""
    adapter = recognise(module) if geometry is None else None
    return analyse(adapter or GenericAdapter(module, geometry))


__all__ = [
    "ADAPTERS", "Adapter", "BlockAnalysis", "ForeignLayer", "ForeignSGS", "GenericAdapter", "ReparamBlockAdapter",
    "SumCore", "analyse", "analyse_block", "find_blocks", "fuse_foreign", "inside_blocks", "recognise",
    "to_sgs_foreign",
]

"""Which adapter knows a module."""
from __future__ import annotations

from torch import nn

from reparam.adapters.base import Adapter
from reparam.adapters.native import ReparamBlockAdapter
from reparam.adapters.timm import TIMM_ADAPTERS

#: tried in order; the first whose ``matches`` accepts a module adapts it
ADAPTERS: tuple[type[Adapter], ...] = (*TIMM_ADAPTERS, ReparamBlockAdapter)


def recognise(module: nn.Module) -> Adapter | None:
    """The adapter of a recognised branched block (still in training form), else None."""
    for cls in ADAPTERS:
        if cls.matches(module):
            return cls(module)
    return None

"""Multi-branch blocks with exact fuse-to-single-conv."""
from reparam.blocks.acb import ACBlock
from reparam.blocks.base import BN_PLACEMENTS, ReparamBlock
from reparam.blocks.dbb import DBB_BRANCHES, DBBlock
from reparam.blocks.geometry import ConvGeometry
from reparam.blocks.repvgg import RepVGGBlock

BLOCKS = {"acb": ACBlock, "repvgg": RepVGGBlock, "dbb": DBBlock}

__all__ = ["ACBlock", "BLOCKS", "BN_PLACEMENTS", "ConvGeometry", "DBBlock", "DBB_BRANCHES", "RepVGGBlock", "ReparamBlock"]

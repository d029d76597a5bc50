"""Convert real models: conv -> reparameterization block (and back), plain SGS form, mask files.

- :func:`convert_model`: every eligible ``nn.Conv2d`` (+ the BatchNorm that solely consumes
  it, found by torch.fx tracing) becomes an ACB / RepVGG / DBB block, function-preserving;
  convs inside branched blocks the model already has (timm's, reparam's) are never converted.
- :func:`fuse_model`: every block becomes its fused ``nn.Conv2d`` (deploy form); timm's blocks
  their ``reparameterize()`` form (``<block>.reparam_conv``).
- :func:`to_sgs`: every block becomes the plain conv SGS trains, with masks keyed by name
  (timm's blocks: their deploy names). Nothing to do: :class:`NothingToConvertWarning`.
- :func:`save_masks` / :func:`load_masks`: safetensors mask files (checksummed, with the
  saving model's conv layers recorded), validated against a model.
- :func:`load_model`: ``torchvision:<name>`` / ``timm:<name>[?k=v&...]`` / ``module:callable`` model specs.
"""
from reparam.convert.graph import (
    DataflowPairs,
    find_conv_bn_pairs,
    parameters_used_outside,
    reads_attributes_of,
)
from reparam.convert.loading import load_model
from reparam.convert.maskfile import (
    MaskFile,
    load_masks,
    read_mask_file,
    save_masks,
    validate_mask_file,
)
from reparam.convert.model import ConvBN, convert_model, fuse_model, max_output_difference, to_sgs
from reparam.convert.randomize import randomize_batchnorms_
from reparam.convert.report import ConversionReport, ConvertedLayer, SGSLayer, SGSReport, SkippedLayer
from reparam.convert.results import ConvertResult, FuseReport, FuseResult, LoadedMasks, SGSConversion
from reparam.errors import BatchNormNotAbsorbedWarning, MaskFileWarning, NothingToConvertWarning, UntraceableModelWarning

__all__ = [
    "randomize_batchnorms_",
    "BatchNormNotAbsorbedWarning",
    "ConvBN",
    "ConversionReport",
    "ConvertResult",
    "ConvertedLayer",
    "DataflowPairs",
    "FuseReport",
    "FuseResult",
    "LoadedMasks",
    "MaskFile",
    "MaskFileWarning",
    "NothingToConvertWarning",
    "SGSConversion",
    "SGSLayer",
    "SGSReport",
    "SkippedLayer",
    "UntraceableModelWarning",
    "convert_model",
    "find_conv_bn_pairs",
    "fuse_model",
    "load_masks",
    "load_model",
    "max_output_difference",
    "parameters_used_outside",
    "read_mask_file",
    "reads_attributes_of",
    "save_masks",
    "to_sgs",
    "validate_mask_file",
]

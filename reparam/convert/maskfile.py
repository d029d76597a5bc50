"""SGS masks (and constant kernels) on disk: a safetensors file, never pickle.

Layout: tensors ``mask/<parameter name>`` (and ``constant/<parameter name>``); metadata
(str -> str) ``reparam.format = "sgs-masks"``, ``reparam.schema = "1"`` and
``reparam.layers``, a JSON object ``{name: {"param_shape": [...] | null, "mask_shape": [...],
"constant": bool}}``, plus ``reparam.metadata`` (JSON of the user's metadata).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from reparam.errors import MaskFileError

FORMAT = "sgs-masks"
SCHEMA_VERSION = 1
MASK_PREFIX = "mask/"
CONSTANT_PREFIX = "constant/"


@dataclass
class MaskFile:
    """The content of a mask file (see :func:`read_mask_file`)."""

    masks: dict[str, Tensor]
    constants: dict[str, Tensor] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION


def _param_shapes(model: nn.Module | None) -> dict[str, tuple[int, ...]]:
    return {} if model is None else {n: tuple(p.shape) for n, p in model.named_parameters()}


def save_masks(
    path: str | os.PathLike,
    masks: Mapping[str, Tensor],
    model: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
    constants: Mapping[str, Tensor] | None = None,
) -> None:
    """Write ``masks`` (parameter name -> ``G``) and optional ``constants`` (parameter name ->
    ``C``) to a safetensors file. With ``model`` every name is checked against it and the
    parameter shapes are recorded, so :func:`load_masks` can reject a file made for another
    model. ``metadata`` must be JSON-serializable."""
    from safetensors.torch import save_file

    shapes = _param_shapes(model)
    constants = dict(constants or {})
    unknown = [n for n in constants if n not in masks]
    if unknown:
        raise MaskFileError(f"save_masks: constants given for names without a mask: {unknown}")
    if model is not None:
        missing = [n for n in masks if n not in shapes]
        if missing:
            raise MaskFileError(f"save_masks: the model has no parameter named {missing}")
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict] = {}
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise MaskFileError(f"save_masks: masks must be keyed by parameter name, got {type(name).__name__}")
        tensors[MASK_PREFIX + name] = torch.as_tensor(mask).detach().cpu().contiguous().clone()
        layers[name] = {
            "param_shape": list(shapes[name]) if name in shapes else None,
            "mask_shape": list(tensors[MASK_PREFIX + name].shape),
            "constant": name in constants,
        }
    for name, constant in constants.items():
        tensors[CONSTANT_PREFIX + name] = torch.as_tensor(constant).detach().cpu().contiguous().clone()
    try:
        user = json.dumps(dict(metadata or {}), sort_keys=True)
    except TypeError as err:
        raise MaskFileError(f"save_masks: metadata is not JSON-serializable: {err}") from None
    header = {
        "reparam.format": FORMAT,
        "reparam.schema": str(SCHEMA_VERSION),
        "reparam.layers": json.dumps(layers, sort_keys=True),
        "reparam.metadata": user,
    }
    save_file(tensors, os.fspath(path), metadata=header)


def read_mask_file(path: str | os.PathLike) -> MaskFile:
    """Read and check the structure of a mask file, without a model. Every failure
    (missing, corrupted, truncated, not a mask file, unknown schema) is a :class:`MaskFileError`."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise MaskFileError(f"{path}: no such mask file") from None
    except Exception as err:  # noqa: BLE001 - the parser's own errors are not part of our API
        raise MaskFileError(
            f"{path}: not a readable safetensors mask file (corrupted or truncated?): {type(err).__name__}: {err}"
        ) from None
    if header.get("reparam.format") != FORMAT:
        raise MaskFileError(f"{path}: not a reparam mask file (metadata 'reparam.format' is {header.get('reparam.format')!r})")
    try:
        schema = int(header.get("reparam.schema", ""))
    except ValueError:
        raise MaskFileError(f"{path}: missing or invalid schema version {header.get('reparam.schema')!r}") from None
    if schema != SCHEMA_VERSION:
        raise MaskFileError(f"{path}: schema version {schema} is not supported (this reparam reads {SCHEMA_VERSION})")
    try:
        layers = json.loads(header.get("reparam.layers", ""))
        user = json.loads(header.get("reparam.metadata", "{}"))
        if not isinstance(layers, dict):
            raise ValueError("reparam.layers is not a JSON object")
    except ValueError as err:
        raise MaskFileError(f"{path}: corrupted metadata: {err}") from None
    masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    constants = {k[len(CONSTANT_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONSTANT_PREFIX)}
    problems = []
    if set(masks) != set(layers):
        problems.append(f"tensors {sorted(set(masks) ^ set(layers))} do not match the metadata layer list")
    problems += [f"{n}: constant without a mask" for n in constants if n not in masks]
    for name, mask in masks.items():
        info = layers.get(name, {})
        if isinstance(info, dict) and list(mask.shape) != info.get("mask_shape"):
            problems.append(f"{name}: mask shape {list(mask.shape)} != recorded {info.get('mask_shape')}")
        if not torch.isfinite(mask).all():
            problems.append(f"{name}: non-finite mask values")
    if problems:
        raise MaskFileError(f"{path}: inconsistent mask file: " + "; ".join(problems))
    return MaskFile(masks=masks, constants=constants, layers=layers, metadata=user, schema=schema)


def validate_mask_file(content: MaskFile, model: nn.Module, path: str = "mask file") -> None:
    """Raise :class:`MaskFileError` naming every layer of ``content`` missing from ``model``
    or whose parameter shape (recorded, and the mask's kernel size) does not fit it."""
    shapes = _param_shapes(model)
    missing, mismatched = [], []
    for name, mask in content.masks.items():
        if name not in shapes:
            missing.append(name)
            continue
        shape = shapes[name]
        recorded = content.layers.get(name, {}).get("param_shape")
        if recorded is not None and tuple(recorded) != shape:
            mismatched.append(f"{name} (file {tuple(recorded)}, model {shape})")
        elif len(shape) != 4 or (mask.ndim == 2 and tuple(mask.shape) != shape[-2:]):
            mismatched.append(f"{name} (mask {tuple(mask.shape)} for a parameter of shape {shape})")
        elif name in content.constants and tuple(content.constants[name].shape) != shape:
            mismatched.append(f"{name} (constant {tuple(content.constants[name].shape)}, model {shape})")
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} layer(s) missing from the model: {', '.join(missing)}")
        if mismatched:
            parts.append(f"{len(mismatched)} layer(s) with mismatched shapes: {', '.join(mismatched)}")
        raise MaskFileError(f"{path} does not fit this model: " + "; ".join(parts))


def load_masks(path: str | os.PathLike, model: nn.Module, *, constants: bool = False):
    """Read masks saved by :func:`save_masks` and validate every name and shape against
    ``model``; returns ``{parameter name: G}`` (or ``(masks, constants)`` with
    ``constants=True``), ready for ``attach_sgs(..., model=model)``."""
    content = read_mask_file(path)
    validate_mask_file(content, model, os.fspath(path))
    return (content.masks, content.constants) if constants else content.masks

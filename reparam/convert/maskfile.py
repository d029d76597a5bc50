"""SGS masks (and constant kernels) on disk: a safetensors file, never pickle.

Schema 2 layout:

- tensors ``mask/<parameter name>`` (``G``); a constant kernel ``C`` is stored sparsely and
  rebuilt exactly on load: ``constant_index/<name>`` (int64 flat indices of its non-zero
  entries) and ``constant_value/<name>`` (their values);
- metadata (str -> str): ``reparam.format = "sgs-masks"``, ``reparam.schema = "2"``,
  ``reparam.layers`` (JSON ``{name: {"param_shape": [...] | null, "mask_shape": [...],
  "constant_shape": [...] | null}}``), ``reparam.kernels`` (JSON ``{name: shape}`` of every
  4-D parameter of the model the file was saved for, or ``null`` when saved without a model),
  ``reparam.checksums`` (JSON ``{tensor key: sha256 of dtype, shape and bytes}``) and
  ``reparam.metadata`` (JSON of the user's metadata).

Schema 1 files (no checksums, no kernel list) are rejected with a message saying to re-create
them with :func:`save_masks`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from reparam.convert.results import LoadedMasks
from reparam.errors import MaskFileError

FORMAT = "sgs-masks"
SCHEMA_VERSION = 2
MASK_PREFIX = "mask/"
INDEX_PREFIX = "constant_index/"
VALUE_PREFIX = "constant_value/"


class MaskFileWarning(UserWarning):
    """A mask file was applied only partly (``allow_missing=True``), or part of it (its
    constant kernels) was not returned."""


@dataclass
class MaskFile:
    """The content of a mask file (see :func:`read_mask_file`)."""

    masks: dict[str, Tensor]
    constants: dict[str, Tensor] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    kernels: dict[str, tuple[int, ...]] | None = None  # every 4-D parameter of the saving model; None: unknown


def _param_shapes(model: nn.Module | None) -> dict[str, tuple[int, ...]]:
    return {} if model is None else {n: tuple(p.shape) for n, p in model.named_parameters()}


def _kernel_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The 4-D entries (conv kernels) of ``shapes`` (:func:`_param_shapes`)."""
    return {n: s for n, s in shapes.items() if len(s) == 4}


def _checksum(tensor: Tensor) -> str:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{str(tensor.dtype).replace('torch.', '')}{list(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _real_problem(name: str, what: str, tensor: Tensor) -> str | None:
    if tensor.is_complex():
        return f"{name}: complex-valued {what} ({tensor.dtype}); SGS {what}s must be real"
    if tensor.dtype == torch.bool or not (tensor.is_floating_point() or tensor.dtype in _INTEGER_DTYPES):
        return f"{name}: {what} of dtype {tensor.dtype}; use a real floating-point tensor"
    return None


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _value_problem(name: str, mask: Tensor) -> str | None:
    """Masks must be real, finite and non-negative: a negative ``G`` makes SGD ascend on that tap."""
    problem = _real_problem(name, "mask", mask)
    if problem is not None:
        return problem
    if not torch.isfinite(mask).all():
        return f"{name}: non-finite mask values"
    if mask.numel() and float(mask.min()) < 0:
        return f"{name}: negative mask values (min {float(mask.min()):g}); a negative G makes SGD ascend on those taps"
    return None


def _names(names: Iterable[str], limit: int = 40) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _save_problems(masks: Mapping, constants: Mapping, model: nn.Module | None, params: Mapping) -> list[str]:
    problems = [f"masks must be keyed by parameter name, got {type(n).__name__}"
                for n in masks if not isinstance(n, str)]
    unknown = [n for n in constants if n not in masks]
    if unknown:
        problems.append(f"constants given for names without a mask: {unknown}")
    missing = [n for n in masks if model is not None and isinstance(n, str) and n not in params]
    if missing:
        problems.append(f"the model has no parameter named {missing}")
    return problems


def _encode(masks: Mapping[str, Tensor], constants: Mapping[str, Tensor], params: Mapping) -> tuple[dict, dict]:
    """``(tensors, layers)``: the file's tensors (constants sparse) and its per-layer metadata."""
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict] = {}
    for name, mask in masks.items():
        mask = torch.as_tensor(mask).detach().cpu().contiguous().clone()
        problem = _value_problem(name, mask)
        if problem is not None:
            raise MaskFileError(f"save_masks: {problem}")
        tensors[MASK_PREFIX + name] = mask
        constant = constants.get(name)
        if constant is not None:
            constant = torch.as_tensor(constant)
            problem = _real_problem(name, "constant kernel", constant)
            if problem is not None:
                raise MaskFileError(f"save_masks: {problem}")
            flat = constant.detach().cpu().reshape(-1)
            index = flat.nonzero().reshape(-1)
            tensors[INDEX_PREFIX + name] = index.to(torch.int64).contiguous()
            tensors[VALUE_PREFIX + name] = flat[index].contiguous().clone()
        layers[name] = {
            "param_shape": list(params[name]) if name in params else None,
            "mask_shape": list(mask.shape),
            "constant_shape": list(constant.shape) if constant is not None else None,
        }
    return tensors, layers


def save_masks(
    path: str | os.PathLike,
    masks: Mapping[str, Tensor],
    model: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
    constants: Mapping[str, Tensor] | None = None,
) -> None:
    """Write ``masks`` (parameter name -> ``G``, finite and non-negative) and optional
    ``constants`` (parameter name -> ``C``) to a safetensors file, with a sha256 checksum of
    every tensor. With ``model`` every name is checked against it, and the shapes of the
    model's parameters and of all its conv kernels (4-D parameters) are recorded, so
    :func:`load_masks` rejects a file made for another model, including one with conv layers
    the file has no entry for. ``metadata`` must be JSON-serializable. Every failure (bad
    input, unwritable path) is a :class:`MaskFileError`."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    params = _param_shapes(model)
    kernels = _kernel_shapes(params) if model is not None else None
    constants = dict(constants or {})
    problems = _save_problems(masks, constants, model, params)
    if problems:
        raise MaskFileError("save_masks: " + "; ".join(problems))
    tensors, layers = _encode(masks, constants, params)
    try:
        user = json.dumps(dict(metadata or {}), sort_keys=True)
    except (TypeError, ValueError, RecursionError) as err:
        raise MaskFileError(f"save_masks: metadata is not JSON-serializable: {type(err).__name__}: {err}") from None
    header = {
        "reparam.format": FORMAT,
        "reparam.schema": str(SCHEMA_VERSION),
        "reparam.layers": json.dumps(layers, sort_keys=True),
        "reparam.kernels": json.dumps({n: list(s) for n, s in kernels.items()} if kernels is not None else None),
        "reparam.checksums": json.dumps({k: _checksum(t) for k, t in tensors.items()}, sort_keys=True),
        "reparam.metadata": user,
    }
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise MaskFileError(f"cannot write {path}: directory {parent} does not exist")
    try:
        save_file(tensors, path, metadata=header)
    except Exception as err:  # noqa: BLE001 - OSError or the writer's own error type
        raise MaskFileError(f"cannot write {path}: {err}") from None


def _shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _layer_problem(name: str, info: Any) -> str | None:
    """Why a ``reparam.layers`` entry is malformed, or None."""
    if not isinstance(info, dict):
        return f"layer entry {name!r} is {type(info).__name__} {info!r}, not an object"
    if not _shape(info.get("mask_shape")):
        return f"layer entry {name!r}: mask_shape {info.get('mask_shape')!r} is not a list of sizes"
    for key in ("param_shape", "constant_shape"):
        if info.get(key) is not None and not _shape(info[key]):
            return f"layer entry {name!r}: {key} {info[key]!r} is not a list of sizes or null"
    return None


def _json(path: str, header: dict, key: str, default: str, kind: type | tuple) -> Any:
    try:
        value = json.loads(header.get(key, default))
    except ValueError as err:
        raise MaskFileError(f"{path}: corrupted metadata {key!r}: {err}") from None
    except RecursionError:
        raise MaskFileError(f"{path}: corrupted metadata {key!r}: JSON nested too deeply to read") from None
    if not isinstance(value, kind):
        raise MaskFileError(
            f"{path}: corrupted metadata {key!r}: a {type(value).__name__}, not the expected JSON object"
        )
    return value


def _rebuild_constant(path: str, name: str, shape: list[int], index: Tensor, value: Tensor) -> Tensor:
    numel = math.prod(shape)
    if index.dtype != torch.int64 or index.ndim != 1 or value.ndim != 1 or len(index) != len(value):
        raise MaskFileError(f"{path}: constant of {name}: malformed sparse encoding")
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise MaskFileError(f"{path}: constant of {name}: index out of range for shape {shape}")
    flat = torch.zeros(numel, dtype=value.dtype)
    flat[index] = value
    return flat.reshape(shape)


def _foreign_format(path: str) -> str | None:
    """What ``path`` is when its first bytes say it is not safetensors (read, never unpickled)."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(9)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return None
    if len(start) == 9 and start[8:] == b"{" and int.from_bytes(start[:8], "little") <= size - 8:
        return None  # a safetensors header: 8-byte little-endian length, then the JSON
    if len(start) >= 2 and start[0] == 0x80 and 1 <= start[1] <= 5:
        return "it looks like a Python pickle (pickle.dump / old torch.save), not a safetensors file"
    if start.startswith(b"PK\x03\x04"):
        return "it is a zip archive (torch.save's format), not a safetensors file"
    return None


def _open(path: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The safetensors metadata and tensors of ``path``; anything else is a :class:`MaskFileError`."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise MaskFileError(f"{path}: no such mask file")
    foreign = _foreign_format(path)
    if foreign is not None:
        raise MaskFileError(f"{path}: {foreign}; it is never unpickled - re-create the masks with save_masks")
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as err:  # noqa: BLE001 - the parser's own errors are not part of our API
        raise MaskFileError(
            f"{path}: not a readable safetensors mask file (corrupted or truncated?): {type(err).__name__}: {err}"
        ) from None
    return header, tensors


def _schema(path: str, header: dict[str, str]) -> int:
    if header.get("reparam.format") != FORMAT:
        raise MaskFileError(f"{path}: not a reparam mask file (metadata 'reparam.format' is {header.get('reparam.format')!r})")
    try:
        schema = int(header.get("reparam.schema", ""))
    except ValueError:
        raise MaskFileError(f"{path}: missing or invalid schema version {header.get('reparam.schema')!r}") from None
    if schema == 1:
        raise MaskFileError(
            f"{path}: schema version 1 was written by an older reparam (no checksums, no record of the model's "
            f"layers); re-create it with save_masks (schema {SCHEMA_VERSION})"
        )
    if schema != SCHEMA_VERSION:
        raise MaskFileError(f"{path}: schema version {schema} is not supported (this reparam reads {SCHEMA_VERSION})")
    return schema


def _tensor_problems(layers: dict, checksums: dict, tensors: dict[str, Tensor], with_constant: list[str]) -> list[str]:
    expected = {MASK_PREFIX + n for n in layers}
    expected |= {prefix + n for n in with_constant for prefix in (INDEX_PREFIX, VALUE_PREFIX)}
    problems = []
    if set(tensors) != expected:
        problems.append(f"tensors {sorted(set(tensors) ^ expected)} do not match the metadata layer list")
    if set(checksums) != set(tensors):
        problems.append(f"checksums missing or extra for tensors {sorted(set(checksums) ^ set(tensors))}")
    problems += [
        f"tensor {key!r}: checksum mismatch (the payload was altered or corrupted)"
        for key, tensor in tensors.items() if key in checksums and checksums[key] != _checksum(tensor)
    ]
    return problems


def read_mask_file(path: str | os.PathLike) -> MaskFile:
    """Read and check a mask file, without a model: structure, metadata, every tensor's
    checksum, real finite non-negative masks. Every failure (missing, corrupted, truncated,
    not a mask file - a pickle is named as such and never unpickled -, unsupported schema, bit
    flips, complex values, absurdly nested metadata) is a :class:`MaskFileError` naming it."""
    path = os.fspath(path)
    header, tensors = _open(path)
    schema = _schema(path, header)
    layers = _json(path, header, "reparam.layers", "", dict)
    kernels = _json(path, header, "reparam.kernels", "null", (dict, type(None)))
    checksums = _json(path, header, "reparam.checksums", "", dict)
    user = _json(path, header, "reparam.metadata", "{}", dict)
    problems = [p for p in (_layer_problem(n, info) for n, info in layers.items()) if p]
    if kernels is not None:
        problems += [f"kernel entry {n!r}: {s!r} is not a 4-D shape"
                     for n, s in kernels.items() if not (_shape(s) and len(s) == 4)]
    if problems:
        raise MaskFileError(f"{path}: corrupted metadata: " + "; ".join(problems))
    with_constant = [n for n, info in layers.items() if info.get("constant_shape") is not None]
    problems = _tensor_problems(layers, checksums, tensors, with_constant)
    if problems:
        raise MaskFileError(f"{path}: inconsistent mask file: " + "; ".join(problems))
    masks = {n: tensors[MASK_PREFIX + n] for n in layers}
    problems = [f"{n}: mask shape {list(m.shape)} != recorded {layers[n]['mask_shape']}"
                for n, m in masks.items() if list(m.shape) != layers[n]["mask_shape"]]
    problems += [p for p in (_value_problem(n, m) for n, m in masks.items()) if p]
    problems += [p for p in (_real_problem(n, "constant kernel", tensors[VALUE_PREFIX + n]) for n in with_constant) if p]
    if problems:
        raise MaskFileError(f"{path}: invalid masks: " + "; ".join(problems))
    constants = {
        n: _rebuild_constant(path, n, layers[n]["constant_shape"], tensors[INDEX_PREFIX + n], tensors[VALUE_PREFIX + n])
        for n in with_constant
    }
    return MaskFile(masks=masks, constants=constants, layers=layers, metadata=user, schema=schema,
                    kernels={n: tuple(s) for n, s in kernels.items()} if kernels is not None else None)


def validate_mask_file(
    content: MaskFile, model: nn.Module, path: str = "mask file", *, allow_missing: bool = False
) -> list[str]:
    """Check ``content`` against ``model``; return the model's conv kernels (4-D parameters
    with more than one tap) the file has no entry for although the model it was saved for
    had no such layer (these get no SGS).

    Raises :class:`MaskFileError` naming every layer of the file missing from ``model`` or
    whose shape (recorded, mask kernel size, constant) does not fit it, every recorded conv
    kernel whose shape changed, and - unless ``allow_missing`` - those unmasked model layers.
    A file saved without ``model=`` records no kernel list, so unmasked layers go unchecked."""
    params = _param_shapes(model)
    missing, mismatched = [], []
    for name, mask in content.masks.items():
        if name not in params:
            missing.append(name)
            continue
        shape = params[name]
        recorded = content.layers.get(name, {}).get("param_shape")
        if recorded is not None and tuple(recorded) != shape:
            mismatched.append(f"{name} (file {tuple(recorded)}, model {shape})")
        elif len(shape) != 4 or (mask.ndim == 2 and tuple(mask.shape) != shape[-2:]):
            mismatched.append(f"{name} (mask {tuple(mask.shape)} for a parameter of shape {shape})")
        elif name in content.constants and tuple(content.constants[name].shape) != shape:
            mismatched.append(f"{name} (constant {tuple(content.constants[name].shape)}, model {shape})")
    uncovered: list[str] = []
    if content.kernels is not None:
        for name, shape in _kernel_shapes(params).items():
            if name in content.masks:
                continue
            if name in content.kernels:
                if content.kernels[name] != shape:
                    mismatched.append(f"{name} (file's model {content.kernels[name]}, model {shape})")
            elif shape[-1] * shape[-2] > 1:
                uncovered.append(name)
    parts = []
    if missing:
        parts.append(f"{len(missing)} layer(s) missing from the model: {_names(missing)}")
    if mismatched:
        parts.append(f"{len(mismatched)} layer(s) with mismatched shapes: {_names(mismatched)}")
    if uncovered and not allow_missing:
        parts.append(
            f"{len(uncovered)} conv layer(s) of the model have no entry in the file (the model it was saved for "
            f"had no such layer, so they would get no SGS): {_names(uncovered)}; pass allow_missing=True to apply "
            "the file to the layers it covers"
        )
    if parts:
        raise MaskFileError(f"{path} does not fit this model: " + "; ".join(parts))
    return uncovered


def load_masks(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    constants: bool | None = None,
    allow_missing: bool = False,
    return_report: bool = False,
) -> dict[str, Tensor] | LoadedMasks:
    """Read masks saved by :func:`save_masks`, verify their checksums and validate every name
    and shape against ``model`` (see :func:`validate_mask_file`); returns ``{parameter name:
    G}``, ready for ``attach_sgs(..., model=model)``.

    - ``return_report=True`` (or ``constants=True``): returns a :class:`LoadedMasks`
      (``.masks``, ``.constants``, ``.metadata``, ``.uncovered``; unpacks as
      ``(masks, constants)``); pass the constants to ``attach_sgs(constant_kernels=...)`` so
      weight decay pulls toward ``C`` (exact for RepVGG). ``constants=None`` (default) with
      masks only warns (:class:`MaskFileWarning`) when the file holds constant kernels;
      ``constants=False`` drops them silently.
    - ``allow_missing=True``: a model with conv layers the file has no entry for (a larger
      model than the one the file was saved for) is accepted with a :class:`MaskFileWarning`
      naming the layers that get no mask, instead of a :class:`MaskFileError`.
    """
    path = os.fspath(path)
    content = read_mask_file(path)
    uncovered = validate_mask_file(content, model, path, allow_missing=allow_missing)
    if uncovered:
        warnings.warn(
            f"load_masks: {path} covers {len(content.masks)} layers; {len(uncovered)} conv layer(s) of the model get "
            f"no mask (allow_missing=True): {_names(uncovered)}",
            MaskFileWarning, stacklevel=2,
        )
    if constants or return_report:
        kept = content.constants if constants is not False else {}
        return LoadedMasks(model, content.masks, kept, metadata=content.metadata, uncovered=uncovered)
    if constants is None and content.constants:
        warnings.warn(
            f"load_masks: {path} holds constant kernels for {len(content.constants)} layer(s) (e.g. RepVGG's identity) "
            "that are not returned: pass constants=True and give them to attach_sgs(constant_kernels=...) so weight "
            "decay pulls toward them (exact), or constants=False to drop them",
            MaskFileWarning, stacklevel=2,
        )
    return content.masks

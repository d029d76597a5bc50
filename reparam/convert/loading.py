"""Resolve a model spec: ``torchvision:<name>`` / ``timm:<name>`` (random weights, never
downloads; ``timm:<name>?key=value&k2=v2`` passes model keyword arguments, values parsed as
Python literals, else strings) or ``module:callable`` (import ``module``, call ``callable()``
with no arguments). ``module`` is looked up in the current directory too, as ``python -m``
does, so the ``reparam`` console script finds ``./mynets.py``."""
from __future__ import annotations

import ast
import importlib
import os
import sys
from types import ModuleType

from torch import nn

from reparam.errors import ConversionError, error_line

SPEC_HELP = (
    "use 'torchvision:<name>' (e.g. torchvision:resnet18), 'timm:<name>[?key=value&...]' (e.g. timm:repvgg_a0) "
    "or 'module:callable' (e.g. mypkg.nets:make_net)"
)


def load_model(spec: str) -> nn.Module:
    """Build the model named by ``spec``; raise :class:`ConversionError` with a clear message
    for a malformed spec, an unknown torchvision model, an import error, a non-callable, or a
    callable that does not return an ``nn.Module`` with at least one ``nn.Conv2d``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConversionError(f"model spec {spec!r} is not understood; {SPEC_HELP}")
    source, _, name = spec.partition(":")
    if not source or not name:
        raise ConversionError(f"model spec {spec!r} is incomplete; {SPEC_HELP}")
    if source == "torchvision":
        model = _torchvision_model(name)
    elif source == "timm":
        model = _timm_model(name, spec)
    else:
        model = _callable_model(source, name, spec)
    if not isinstance(model, nn.Module):
        raise ConversionError(f"model spec {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ConversionError(f"model spec {spec!r}: the model has no nn.Conv2d to convert")
    return model


def _torchvision_model(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError as err:
        raise ConversionError(f"torchvision is not installed ({err})") from None
    available = set(torchvision.models.list_models(module=torchvision.models))
    if name not in available:
        close = sorted(n for n in available if n.startswith(name[:3]))[:8]
        hint = f"; did you mean one of {close}?" if close else ""
        raise ConversionError(f"torchvision has no classification model {name!r}{hint}")
    return torchvision.models.get_model(name, weights=None)


def _timm_kwargs(query: str, spec: str) -> dict:
    """``key=value&k2=v2`` -> ``{key: literal(value)}`` (a value that is no Python literal stays a string)."""
    kwargs = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ConversionError(f"model spec {spec!r}: {item!r} is not key=value (e.g. timm:repvgg_a0?num_classes=10)")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _timm_model(name: str, spec: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``: random weights, no download."""
    name, _, query = name.partition("?")
    kwargs = _timm_kwargs(query, spec)
    if "pretrained" in kwargs:
        raise ConversionError(f"model spec {spec!r}: pretrained weights are never downloaded; drop 'pretrained'")
    try:
        import timm
    except ImportError:
        raise ConversionError(
            f"model spec {spec!r} needs timm, which is not installed (pip install 'reparam[timm]' or pip install timm)"
        ) from None
    if not timm.is_model(name):
        close = timm.list_models(f"{name[:4]}*")[:8]
        hint = f"; did you mean one of {close}?" if close else ""
        raise ConversionError(f"timm has no model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise ConversionError(f"model spec {spec!r}: timm.create_model rejected the arguments {kwargs}: {err}") from None


def _import_with_cwd(module_name: str) -> ModuleType:
    """Import ``module_name`` with the current directory first on ``sys.path`` (as under
    ``python -m``) for the duration of the import, unless it is on the path already."""
    cwd = os.getcwd()
    added = not any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path)
    if added:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _callable_model(module_name: str, attr: str, spec: str) -> nn.Module:
    try:
        module = _import_with_cwd(module_name)
    except ImportError as err:
        raise ConversionError(f"model spec {spec!r}: cannot import module {module_name!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a module that fails while importing (SyntaxError, its own errors)
        raise ConversionError(f"model spec {spec!r}: importing {module_name!r} failed ({error_line(err)})") from None
    target = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConversionError(f"model spec {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise ConversionError(f"model spec {spec!r}: {attr!r} is not callable")
    try:
        return target()
    except Exception as err:  # noqa: BLE001 - whatever the user's factory raises is reported in one line
        raise ConversionError(f"model spec {spec!r}: calling {attr}() with no arguments failed ({error_line(err)})") from None

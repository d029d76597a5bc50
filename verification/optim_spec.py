"""Optimizer and LR-schedule specs written as one call: ``"AdamW(lr=1e-3, weight_decay=0.05)"``,
``"CosineAnnealingLR(T_max=10)"``.

The text is parsed with :mod:`ast` and only literals are accepted as argument values (numbers,
strings, booleans, None, tuples/lists of them), so a spec never runs code. The name must be a
``torch.optim`` optimizer (or a ``torch.optim.lr_scheduler`` schedule), the keywords must be ones
its constructor takes, and the spec is built once on a dummy parameter right away, so a bad value
is a one-line :class:`~reparam.errors.ConfigError` before any training starts.
"""
from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reparam.errors import ConfigError

#: optimizers a side-by-side comparison cannot drive with a plain ``step()``, and why
UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "it needs a closure that re-evaluates the loss several times per step",
    "SparseAdam": "it only accepts sparse gradients (nn.Embedding(sparse=True)), not conv weights",
    "Muon": "it only takes 2-D parameters, not conv kernels",
}
#: schedules whose arguments cannot be literals, or whose step() needs a metric
UNSUPPORTED_SCHEDULES = {
    "LambdaLR": "it takes a Python function, which a spec string cannot hold",
    "MultiplicativeLR": "it takes a Python function, which a spec string cannot hold",
    "SequentialLR": "it takes other schedulers, which a spec string cannot hold",
    "ChainedScheduler": "it takes other schedulers, which a spec string cannot hold",
    "ReduceLROnPlateau": "its step() needs a validation metric",
}


@dataclass(frozen=True)
class CallSpec:
    """A parsed ``Name(key=value, ...)``: ``cls`` the torch class it names, ``text`` as given."""

    text: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.__name__

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"


class OptimizerSpec(CallSpec):
    """An optimizer spec; ``build(params)`` makes a fresh optimizer."""

    def build(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return self.cls(params, **self.kwargs)


class ScheduleSpec(CallSpec):
    """An LR-schedule spec; ``build(optimizer)`` makes a fresh scheduler."""

    def build(self, optimizer: torch.optim.Optimizer) -> Any:
        return self.cls(optimizer, **self.kwargs)


def _literal(node: ast.expr, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ConfigError(
            f"{where}: {ast.unparse(node)!r} is not a literal; values must be numbers, strings, True/False/None "
            "or tuples of them (e.g. betas=(0.9, 0.999))"
        ) from None


def parse_call(text: str, what: str) -> tuple[str, dict[str, Any]]:
    """``"Name(a=1, b=(2, 3))"`` -> ``("Name", {"a": 1, "b": (2, 3)})``; a bare ``"Name"`` has no
    keywords. Only keyword arguments with literal values; anything else is a :class:`ConfigError`."""
    example = "e.g. 'AdamW(lr=1e-3, weight_decay=0.05)'" if what == "optimizer" else "e.g. 'CosineAnnealingLR(T_max=10)'"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what} spec {text!r} is empty; write Name(keyword=value, ...), {example}")
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        raise ConfigError(f"{what} spec {text!r} is not a call ({err.msg}); write Name(keyword=value, ...), {example}") from None
    if isinstance(node, ast.Name):
        return node.id, {}
    if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Name, ast.Attribute)):
        raise ConfigError(f"{what} spec {text!r} is not understood; write Name(keyword=value, ...), {example}")
    name = ast.unparse(node.func).rpartition(".")[2]  # torch.optim.AdamW(...) -> AdamW
    if node.args:
        raise ConfigError(f"{what} spec {text!r}: give arguments by keyword (positional arguments are ambiguous), {example}")
    kwargs = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ConfigError(f"{what} spec {text!r}: '**' is not supported; give every argument as keyword=value")
        kwargs[keyword.arg] = _literal(keyword.value, f"{what} spec {text!r}, argument {keyword.arg}")
    return name, kwargs


def _classes(module: Any, base: type) -> dict[str, type]:
    return {
        name: obj for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and not name.startswith("_")
    }


def _check_keywords(cls: type, kwargs: dict[str, Any], skip: str, what: str, text: str) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [n for n in parameters if n not in ("self", skip)]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ConfigError(f"{what} spec {text!r}: {cls.__name__} takes no keyword {unknown[0]!r}; it accepts {accepted}")


def _build_check(build: Callable[[], Any], what: str, text: str) -> None:
    """Build once on a dummy; turn the constructor's complaint into one line."""
    try:
        build()
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{what} spec {text!r} is rejected by torch: {message}") from None


def _resolve(text: str, what: str, module: str, classes: dict[str, type], unsupported: dict[str, str]) -> tuple[type, dict]:
    name, kwargs = parse_call(text, what)
    if name in unsupported:
        raise ConfigError(f"{what} {name} is not supported here: {unsupported[name]}")
    if name not in classes:
        lowered = {n.lower(): n for n in classes}
        hint = f" (did you mean {lowered[name.lower()]!r}?)" if name.lower() in lowered else ""
        known = sorted(n for n in classes if n not in unsupported)
        raise ConfigError(f"{what} {name!r} is not in {module}{hint}; choose one of {known}")
    return classes[name], kwargs


def parse_optimizer(text: str) -> OptimizerSpec:
    """Parse and check an optimizer spec such as ``"SGD(lr=0.1, momentum=0.9)"``."""
    cls, kwargs = _resolve(text, "optimizer", "torch.optim", _classes(torch.optim, torch.optim.Optimizer), UNSUPPORTED_OPTIMIZERS)
    _check_keywords(cls, kwargs, "params", "optimizer", text)
    spec = OptimizerSpec(text, cls, kwargs)
    _build_check(lambda: spec.build([nn.Parameter(torch.zeros(2, 2))]), "optimizer", text)
    return spec


def parse_schedule(text: str) -> ScheduleSpec:
    """Parse and check an LR-schedule spec such as ``"CosineAnnealingLR(T_max=10)"``."""
    classes = _classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
    cls, kwargs = _resolve(text, "schedule", "torch.optim.lr_scheduler", classes, UNSUPPORTED_SCHEDULES)
    _check_keywords(cls, kwargs, "optimizer", "schedule", text)
    spec = ScheduleSpec(text, cls, kwargs)
    _build_check(lambda: spec.build(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)), "schedule", text)
    return spec

"""Which BatchNorm consumes which conv, read from the model's real dataflow (torch.fx).

Pairing by attribute names or declaration order (``conv1`` -> ``bn1``, "the next BN")
breaks on any model whose forward does not follow its ``__init__``; here a BatchNorm is
paired with a conv only when the traced graph shows that

- the conv module is called exactly once and its output has exactly one user,
- that user is a call of a BatchNorm2d module with the conv output as its only input,
- the BatchNorm module is called exactly once, with ``num_features == out_channels``,
  affine parameters and running statistics (the eval-mode function is known).

A model that ``torch.fx.symbolic_trace`` cannot trace (data-dependent control flow, ...)
yields no pairs and the trace error; :func:`reparam.convert.convert_model` then converts
its convs without absorbing any BatchNorm (still function-preserving) and warns with an
:class:`UntraceableModelWarning`. Without a graph, direct reads of conv parameters
(``F.conv2d(x, self.conv.weight)``) are found by running the model once on an example input
(:func:`parameters_used_outside`).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode


class UntraceableModelWarning(UserWarning):
    """``convert_model`` could not trace the model with torch.fx and fell back to converting
    without absorbing any BatchNorm; the message says why and what the fallback did."""


@dataclass
class DataflowPairs:
    """Result of :func:`find_conv_bn_pairs`."""

    pairs: dict[str, str] = field(default_factory=dict)  # conv qualified name -> BN qualified name
    traced: bool = True
    error: str | None = None
    calls: Counter = field(default_factory=Counter)  # qualified module name -> call count in the graph
    why_not: dict[str, str] = field(default_factory=dict)  # conv name -> why its BN was not absorbed
    attributes: set = field(default_factory=set)  # qualified names of parameters/buffers read directly


def error_line(err: BaseException) -> str:
    """``Type: message`` of ``err``: its first line, at most 300 characters."""
    return f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]


def _describe_consumer(user: torch.fx.Node | None, modules: dict[str, nn.Module]) -> str:
    """Why the sole consumer of a conv's output is not an absorbable BatchNorm: what it is."""
    if user is None:
        return "its output is not used"
    if user.op == "call_module":
        module = modules.get(user.target)
        kind = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            sync = isinstance(module, nn.SyncBatchNorm)
            hint = " (convert before nn.SyncBatchNorm.convert_sync_batchnorm)" if sync else ""
            return f"its consumer {user.target!r} is a {kind}; only nn.BatchNorm2d is absorbed{hint}"
        return f"its consumer is {user.target!r} ({kind}), not a BatchNorm"
    if user.op == "output":
        return "its output is the model's output"
    target = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", str(user.target))
    return f"its consumer is {target}(), not a BatchNorm module"


def _absorbable_bn(bn: nn.Module, channels: int) -> str | None:
    if bn.num_features != channels:
        return f"the BatchNorm has {bn.num_features} features for {channels} channels"
    if not bn.affine:
        return "the BatchNorm has no affine parameters"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm has no running statistics"
    return None


def find_conv_bn_pairs(model: nn.Module) -> DataflowPairs:
    """Trace ``model`` with ``torch.fx.symbolic_trace`` and pair each ``nn.Conv2d`` with the
    BatchNorm2d that is the sole consumer of its output (see the module docstring)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any trace failure means "no dataflow"
        return DataflowPairs(traced=False, error=error_line(err))
    result = DataflowPairs()
    modules = dict(model.named_modules(remove_duplicate=False))
    for node in graph.nodes:
        if node.op == "call_module":
            result.calls[node.target] += 1
        elif node.op == "get_attr":
            result.attributes.add(str(node.target))
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        conv_name = node.target
        if result.calls[conv_name] != 1:
            result.why_not[conv_name] = f"the conv is called {result.calls[conv_name]} times in the forward"
            continue
        users = list(node.users)
        if len(users) > 1:
            result.why_not[conv_name] = f"the conv output has {len(users)} users"
            continue
        user = users[0] if users else None
        if user is None or user.op != "call_module" or not isinstance(modules.get(user.target), nn.BatchNorm2d):
            result.why_not[conv_name] = _describe_consumer(user, modules)
            continue
        if user.args != (node,) or user.kwargs:
            result.why_not[conv_name] = "the BatchNorm call has extra inputs"
            continue
        if result.calls[user.target] != 1:
            result.why_not[conv_name] = f"the BatchNorm {user.target!r} is called {result.calls[user.target]} times"
            continue
        reason = _absorbable_bn(modules[user.target], modules[conv_name].out_channels)
        if reason is not None:
            result.why_not[conv_name] = reason
            continue
        result.pairs[conv_name] = user.target
    return result


def reads_attributes_of(pairs: DataflowPairs, module_name: str) -> list[str]:
    """Parameters/buffers of ``module_name`` that the traced forward reads directly (e.g.
    ``self.conv.weight`` in a weight-standardized conv): replacing the module would break them."""
    prefix = f"{module_name}."
    return sorted(a for a in pairs.attributes if a.startswith(prefix))


# -- direct parameter use, found by running the model ------------------------------------------
def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


class _UseRecorder(TorchFunctionMode):
    """Records every torch op that takes one of the watched parameters outside the forward of
    the module owning it."""

    def __init__(self, owners: dict[int, tuple[str, str]]) -> None:
        super().__init__()
        self.owners = owners  # id(parameter) -> (owning module name, qualified parameter name)
        self.running: list[str] = []  # watched modules whose forward is running
        self.used: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in _leaves((args, kwargs)):
            owner = self.owners.get(id(value))
            if owner is not None and owner[0] not in self.running:
                self.used.add(owner[1])
        return func(*args, **kwargs)


@torch.no_grad()
def parameters_used_outside(model: nn.Module, args: tuple, module_type: type = nn.Conv2d) -> tuple[set[str], Any]:
    """Run ``model(*args)`` once in eval mode and return ``(names, output)``: the qualified
    names of the parameters of every ``module_type`` module that a torch op uses outside that
    module's own forward (``F.conv2d(x, self.conv.weight)``, weight standardization, ...) -
    what :attr:`DataflowPairs.attributes` holds for a traced model. Exceptions of the forward
    propagate."""
    watched = {name: m for name, m in model.named_modules() if isinstance(m, module_type)}
    owners = {
        id(p): (name, f"{name}.{pname}" if name else pname)
        for name, m in watched.items() for pname, p in m.named_parameters(recurse=False)
    }
    recorder = _UseRecorder(owners)
    handles = []
    for name, m in watched.items():
        handles.append(m.register_forward_pre_hook(lambda *_, n=name: recorder.running.append(n)))
        handles.append(m.register_forward_hook(lambda *_, n=name: recorder.running.remove(n)))
    was_training = model.training
    model.eval()
    try:
        with recorder:
            output = model(*args)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return recorder.used, output

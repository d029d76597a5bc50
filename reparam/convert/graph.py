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
its convs without absorbing any BatchNorm (still function-preserving) and says so.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx
from torch import nn


@dataclass
class DataflowPairs:
    """Result of :func:`find_conv_bn_pairs`."""

    pairs: dict[str, str] = field(default_factory=dict)  # conv qualified name -> BN qualified name
    traced: bool = True
    error: str | None = None
    calls: Counter = field(default_factory=Counter)  # qualified module name -> call count in the graph
    why_not: dict[str, str] = field(default_factory=dict)  # conv name -> why its BN was not absorbed
    attributes: set = field(default_factory=set)  # qualified names of parameters/buffers read directly


def _absorbable_bn(bn: nn.Module, channels: int) -> str | None:
    if not isinstance(bn, nn.BatchNorm2d):
        return f"its consumer is a {type(bn).__name__}, not a BatchNorm2d"
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
        message = f"{type(err).__name__}: {err}".strip()
        first_line = message.splitlines()[0] if message else type(err).__name__
        return DataflowPairs(traced=False, error=first_line[:300])
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
        if len(users) != 1:
            if users:
                result.why_not[conv_name] = f"the conv output has {len(users)} users"
            continue
        user = users[0]
        if user.op != "call_module" or not isinstance(modules.get(user.target), nn.BatchNorm2d):
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

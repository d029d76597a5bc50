"""Which BatchNorm consumes which conv, read from the model's real dataflow (torch.fx).

Pairing by attribute names or declaration order (``conv1`` -> ``bn1``, "the next BN")
breaks on any model whose forward does not follow its ``__init__``; here a BatchNorm is
paired with a conv only when the traced graph shows that

- the conv module is called exactly once and its output has exactly one user,
- that user is a call of a BatchNorm module with the conv output as its only input,
- the BatchNorm module is called exactly once, with ``num_features == out_channels``,
  affine parameters and running statistics (the eval-mode function is known).

BatchNorm kinds (:func:`norm_kind`): ``nn.BatchNorm2d``; ``nn.SyncBatchNorm`` (its eval function
is a BatchNorm's; it stays a SyncBatchNorm inside the block); frozen BatchNorms such as
torchvision's ``FrozenBatchNorm2d`` (buffers only: found by class or by its buffers, checked
numerically); and BatchNorm subclasses whose forward is the BatchNorm followed by their child
modules (timm's ``BatchNormAct2d``: BN, then drop, then act - checked numerically on a copy):
the BN part is absorbed and the children stay in the slot. Such modules are leaves of the
trace (torch.fx would otherwise trace into them and see the conv output "used 3 times").

A model that ``torch.fx.symbolic_trace`` cannot trace (data-dependent control flow, ...)
yields no pairs and the trace error; :func:`reparam.convert.convert_model` then converts
its convs without absorbing any BatchNorm (still function-preserving) and warns with an
:class:`UntraceableModelWarning`. Without a graph, direct reads of conv parameters
(``F.conv2d(x, self.conv.weight)``) are found by running the model once on an example input
(:func:`parameters_used_outside`).
"""
from __future__ import annotations

import copy
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


class BatchNormNotAbsorbedWarning(UserWarning):
    """``convert_model`` was asked for ``bn="branch"``/``"after"`` but some convs have no
    BatchNorm it can absorb; they became ``bn="none"`` blocks. The message names them and why."""


@dataclass
class DataflowPairs:
    """Result of :func:`find_conv_bn_pairs`."""

    pairs: dict[str, str] = field(default_factory=dict)  # conv qualified name -> BN qualified name
    traced: bool = True
    error: str | None = None
    calls: Counter = field(default_factory=Counter)  # qualified module name -> call count in the graph
    why_not: dict[str, str] = field(default_factory=dict)  # conv name -> why its BN was not absorbed
    attributes: set = field(default_factory=set)  # qualified names of parameters/buffers read directly
    kinds: dict[str, str] = field(default_factory=dict)  # BN qualified name -> norm_kind of an absorbed BN


def error_line(err: BaseException) -> str:
    """``Type: message`` of ``err``: its first line, at most 300 characters."""
    return f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]


#: the kinds :func:`norm_kind` returns for absorbable modules
PLAIN, SYNC, FROZEN, WITH_REST = "batchnorm", "sync", "frozen", "bn+rest"
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _bn_part_matches(module: nn.Module, frozen: bool) -> bool:
    """Whether ``module`` (a copy, eval, float64) computes its BN affine map then its children in order."""
    probe_module = copy.deepcopy(module).double().eval()
    channels = probe_module.running_mean.numel()
    x = torch.randn(2, channels, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scale = probe_module.weight / torch.sqrt(probe_module.running_var + probe_module.eps)
    expected = x * scale.reshape(1, -1, 1, 1) + (probe_module.bias - probe_module.running_mean * scale).reshape(1, -1, 1, 1)
    for child in ([] if frozen else list(probe_module.children())):
        expected = child(expected)
    with torch.no_grad():
        try:
            actual = probe_module(x.clone())
        except Exception:  # noqa: BLE001 - a module that cannot run on a probe is not absorbed
            return False
    return isinstance(actual, torch.Tensor) and actual.shape == expected.shape and bool(
        torch.allclose(actual, expected, rtol=1e-10, atol=1e-12))


def looks_frozen_norm(module: nn.Module) -> bool:
    """A module with BatchNorm buffers (weight, bias, running_mean, running_var, eps) and no
    parameters, such as torchvision's ``FrozenBatchNorm2d``."""
    buffers = dict(module.named_buffers(recurse=False))
    return (not any(True for _ in module.parameters()) and all(b in buffers for b in _FROZEN_BUFFERS)
            and isinstance(getattr(module, "eps", None), float) and buffers["running_mean"].ndim == 1)


def norm_kind(module: nn.Module) -> tuple[str | None, str]:
    """``(kind, note)`` of a module that may be an absorbable BatchNorm: ``kind`` is
    :data:`PLAIN`, :data:`SYNC`, :data:`FROZEN` or :data:`WITH_REST`, or None with why not."""
    name = type(module).__name__
    if type(module) is nn.BatchNorm2d:
        return PLAIN, ""
    if type(module) is nn.SyncBatchNorm:
        return SYNC, "a SyncBatchNorm: absorbed (a SyncBatchNorm inside the block, unless bn='none' folds it)"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not isinstance(module, nn.BatchNorm2d) and not isinstance(module, nn.SyncBatchNorm):
            return None, f"a {name} (not a 2-d BatchNorm)"
        if module.running_mean is None or not module.affine:
            return None, f"a {name} without running statistics or affine parameters"
        if _bn_part_matches(module, frozen=False):
            rest = ", ".join(n for n, _ in module.named_children()) or "nothing"
            return WITH_REST, f"a {name} (BatchNorm then {rest}): its BatchNorm is absorbed, {rest} stay in its slot"
        return None, f"a {name} whose forward is not its BatchNorm followed by its child modules"
    if looks_frozen_norm(module):
        if _bn_part_matches(module, frozen=True):
            return FROZEN, f"a {name} (frozen statistics and affine): absorbed frozen"
        return None, f"a {name} with BatchNorm buffers whose forward is not a BatchNorm's"
    return None, f"a {name}, not a BatchNorm"


class _NormLeafTracer(torch.fx.Tracer):
    """torch.fx tracer that keeps every BatchNorm-like module (:func:`norm_kind`) as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or looks_frozen_norm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _describe_consumer(user: torch.fx.Node | None, modules: dict[str, nn.Module]) -> str:
    """Why the sole consumer of a conv's output is not an absorbable BatchNorm: what it is."""
    if user is None:
        return "its output is not used"
    if user.op == "call_module":
        module = modules.get(user.target)
        kind, why = norm_kind(module) if module is not None else (None, "unknown")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or looks_frozen_norm(module):
            return f"its consumer {user.target!r} is {why}"
        return f"its consumer is {user.target!r} ({type(module).__name__}), not a BatchNorm"
    if user.op == "output":
        return "its output is the model's output"
    target = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", str(user.target))
    return f"its consumer is {target}(), not a BatchNorm module"


def _absorbable_bn(bn: nn.Module, channels: int) -> str | None:
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None or not getattr(
            bn, "track_running_stats", True):
        return "the BatchNorm has no running statistics"
    if bn.running_mean.numel() != channels:
        return f"the BatchNorm has {bn.running_mean.numel()} features for {channels} channels"
    if getattr(bn, "weight", None) is None or getattr(bn, "bias", None) is None:
        return "the BatchNorm has no affine parameters"
    return None


def find_conv_bn_pairs(model: nn.Module) -> DataflowPairs:
    """Trace ``model`` with ``torch.fx.symbolic_trace`` and pair each ``nn.Conv2d`` with the
    BatchNorm2d that is the sole consumer of its output (see the module docstring)."""
    try:
        graph = _NormLeafTracer().trace(model)
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
        kind = norm_kind(modules[user.target])[0] if user is not None and user.op == "call_module" else None
        if kind is None:
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
        result.kinds[user.target] = kind
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

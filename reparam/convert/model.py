"""Convert a real model's convs into reparameterization blocks, fuse them back, or turn them
into plain convs trained with SGS masks.

All three functions work on a deep copy by default (``inplace=False``) and never change the
model passed in; ``inplace=True`` edits it and returns it.
"""
from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

import torch
from torch import Tensor, nn

from reparam.blocks import BLOCKS, BN_PLACEMENTS, ReparamBlock
from reparam.blocks.branches import ConvBranch
from reparam.convert.foreign import (
    add_foreign_sgs,
    fuse_foreign_blocks,
    has_branched_blocks,
    inside_reasons,
    warn_nothing,
)
from reparam.convert.graph import (
    PLAIN,
    BatchNormNotAbsorbedWarning,
    DataflowPairs,
    UntraceableModelWarning,
    error_line,
    find_conv_bn_pairs,
    looks_frozen_norm,
    norm_kind,
    parameters_used_outside,
    reads_attributes_of,
)
from reparam.convert.norms import AbsorbedNorm, norm_part, slot_module
from reparam.convert.report import ConversionReport, ConvertedLayer, SGSLayer, SGSReport, SkippedLayer
from reparam.convert.results import ConvertResult, FuseReport, FuseResult, SGSConversion
from reparam.errors import ConfigError, ConversionError
from reparam.kernels import fold_batchnorm


# -- module-tree helpers ---------------------------------------------------------------------
def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        if name not in names[id(module)]:
            names[id(module)].append(name)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ConversionError("convert: the model itself is a conv; wrap it in a container to convert it")
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def _patterns(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


# -- eligibility -----------------------------------------------------------------------------
def _skip_reason(name: str, conv: nn.Module, include: list[str], exclude: list[str]) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is a subclass of nn.Conv2d: its forward may differ, left as is"
    if include and not any(fnmatch(name, pat) for pat in include):
        return f"not matched by include {include}"
    hit = next((pat for pat in exclude if fnmatch(name, pat)), None)
    if hit is not None:
        return f"matched by exclude {hit!r}"
    kernel = _pair(conv.kernel_size)
    if kernel == (1, 1):
        return "1x1 kernel: no smaller branch to add"
    if any(k % 2 == 0 for k in kernel):
        return f"even kernel {kernel[0]}x{kernel[1]}: branches can only be centred in odd kernels"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: only 'zeros' keeps every branch exactly fusable"
    return None


def _conv_padding(conv: nn.Conv2d) -> Any:
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        return None  # odd kernels: dilation * (k // 2) per side, what the block computes for None
    return conv.padding


# -- initialization --------------------------------------------------------------------------
def _main_branch(block: ReparamBlock) -> ConvBranch:
    main = next(iter(block.branches.values()))
    if not isinstance(main, ConvBranch) or tuple(main.window) != tuple(block.kernel_size):
        raise ConversionError(f"{type(block).__name__}: its first branch is not the full KxK conv")
    return main


def _load_bn(source: nn.Module, shift: Tensor) -> nn.Module:
    """A copy of the BatchNorm part ``source`` with ``copy(y) == source(y + shift)`` in eval mode
    (absorbs the conv bias ``shift``); class, eps, momentum, flags and mode are the source's."""
    target = copy.deepcopy(source)
    target.running_mean.sub_(shift.to(target.running_mean.dtype))
    return target


@torch.no_grad()
def _initialize(block: ReparamBlock, conv: nn.Conv2d, bn: nn.Module | None, preserve: bool) -> None:
    """Side branches silenced, the conv (+ the BatchNorm part ``bn``) loaded into the main branch."""
    if bn is not None:
        for module in _bn_modules(block):
            module.eps, module.momentum = bn.eps, getattr(bn, "momentum", module.momentum)
    if not preserve:
        return
    main = _main_branch(block)
    for branch in block.branches.values():
        if branch is not main:
            branch.silence()
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(weight[:, 0, 0, 0])
    constant = block.constant_kernel().to(weight.dtype)
    if block.bn == "branch":
        main.weight.copy_(weight)
        main.bn = _load_bn(bn, bias)
    elif block.bn == "after":
        main.weight.copy_(weight - constant)
        block.post_bn = _load_bn(bn, bias)
    else:
        if bn is not None:
            folded_w, folded_b = fold_batchnorm(weight.double(), bias.double(), bn)
            weight, bias = folded_w.to(weight.dtype), folded_b.to(weight.dtype)
        main.weight.copy_(weight - constant)
        block.bias.copy_(bias)


# -- what the user set: requires_grad per parameter, train/eval per module -------------------
def _trains(param: nn.Parameter | None) -> bool:
    return param is not None and param.requires_grad


def _bn_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) or looks_frozen_norm(m)]


def _bn_training(bn: nn.Module) -> bool:
    """Whether ``bn`` normalizes with batch statistics in its current mode (a frozen BN never does)."""
    return bn.training and isinstance(bn, nn.modules.batchnorm._BatchNorm)


def _kernel_parameters(block: ReparamBlock) -> list[nn.Parameter]:
    """The branch parameters outside BatchNorms: what the merged kernel is trained through."""
    in_bn = {id(p) for bn in _bn_modules(block) for p in bn.parameters()}
    return [p for p in block.branches.parameters() if id(p) not in in_bn]


def _copy_bn_flags(target: nn.Module, source: nn.Module, trains: bool = True) -> None:
    """``target`` takes ``source``'s train/eval mode and affine ``requires_grad`` (and'ed with ``trains``)."""
    target.train(_bn_training(source))
    for pname in ("weight", "bias"):
        param = getattr(target, pname, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(trains and _trains(getattr(source, pname, None)))


def _carry_flags(block: ReparamBlock, conv: nn.Conv2d, bn: nn.Module | None) -> None:
    """The block trains what the conv (+ absorbed BN) trained, in the modes they were in:
    kernel parameters follow ``conv.weight``; the bias follows the conv bias or BN shift (frozen
    at 0 for a bias-free conv that absorbed no BN, so it stays bias-free); the BN taking the
    absorbed BN's place copies its flags, the side-branch BNs too (and are frozen with a frozen conv)."""
    block.train(conv.training)
    kernel_trains = conv.weight.requires_grad
    for param in _kernel_parameters(block):
        param.requires_grad_(kernel_trains)
    if block.bias is not None:
        block.bias.requires_grad_(_trains(conv.bias) or (bn is not None and _trains(getattr(bn, "bias", None))))
    if bn is None:
        return
    owner = _block_bn(block)
    for module in _bn_modules(block):
        _copy_bn_flags(module, bn, trains=module is owner or kernel_trains)


# -- convert ---------------------------------------------------------------------------------
def _as_args(example_input: Any) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _shapes(args: tuple) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, Tensor) else type(a).__name__ for a in args)


def _run_example(model: nn.Module, args: tuple, what: str, watch: bool) -> tuple[Any, set[str]]:
    """``model(*args)`` in eval mode without grad (and, with ``watch``, the conv parameters the
    forward uses directly); a failing forward becomes a :class:`ConversionError`."""
    try:
        if watch:
            used, output = parameters_used_outside(model, args)
            return output, used
        return eval_output(model, *args), set()
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported as such
        raise ConversionError(
            f"convert_model: {what} fails on example_input of shape {_shapes(args)} ({error_line(err)})"
        ) from err


def _untraceable_warning(model: nn.Module, error: str | None, bn: str, checked: bool, direct: list[str]) -> str:
    asked = f" although bn={bn!r} was asked" if bn != "none" else ""
    text = (
        f"convert_model: torch.fx cannot trace {type(model).__name__} ({error}). Fallback: no BatchNorm was "
        f"absorbed; every converted conv became a bn='none' block{asked}, and the BatchNorms stay where they "
        "are (the function is preserved). "
    )
    if checked and direct:
        return text + (
            f"Convs whose parameters the forward uses directly (seen on example_input) were left as they are: "
            f"{', '.join(direct)}."
        )
    if checked:
        return text + "On example_input the forward uses no conv's parameters directly."
    return text + (
        "Without a graph, convs whose parameters the forward reads directly (e.g. F.conv2d(x, self.conv.weight)) "
        "cannot be seen, and such a model fails at its first forward: pass example_input= to check."
    )


DIRECT_READ = "the forward reads"  # how a skip reason for a directly read conv parameter starts


@dataclass
class ConvertJob:
    """One :func:`convert_model` call: the model being converted and what was asked."""

    target: nn.Module
    dataflow: DataflowPairs
    names: dict[int, list[str]]
    block: str
    bn: str
    include: list[str]
    exclude: list[str]
    preserve: bool
    inside: dict[str, str]  # convs inside recognised branched blocks -> why they are left alone

    @classmethod
    def start(cls, target: nn.Module, block: str, bn: str, include: str | Sequence[str] | None,
              exclude: str | Sequence[str] | None, preserve: bool) -> ConvertJob:
        """Check the arguments and trace ``target``'s dataflow."""
        if block not in BLOCKS:
            raise ConfigError(f"convert_model: block={block!r} is not supported; choose one of {sorted(BLOCKS)}")
        if bn not in BN_PLACEMENTS:
            raise ConfigError(f"convert_model: bn={bn!r} is not supported; choose one of {BN_PLACEMENTS}")
        return cls(target, find_conv_bn_pairs(target), _names_by_module(target), block, bn,
                   _patterns(include), _patterns(exclude), preserve, inside_reasons(target))


@dataclass
class LayerSwap:
    """A planned replacement: ``conv`` (every name it has) by ``block``, and the absorbed
    BatchNorm ``bn`` (every name it has) by ``slot`` (``nn.Identity``, or an
    :class:`~reparam.convert.norms.AbsorbedNorm` keeping what followed the BN)."""

    name: str
    conv: nn.Module
    block: nn.Module
    bn: nn.Module | None
    slot: nn.Module | None = None


def _bn_note(job: ConvertJob, name: str, absorbed: str | None, placement: str) -> str:
    if absorbed is not None:
        return norm_kind(job.target.get_submodule(absorbed))[1] if job.dataflow.kinds.get(absorbed, PLAIN) != PLAIN else ""
    if not job.dataflow.traced:
        return "no BatchNorm absorbed (model not traceable): bn='none' block"
    why = job.dataflow.why_not.get(name, "the conv is not called in the traced forward")
    return f"no BatchNorm absorbed ({why})" + (": bn='none' block" if placement != job.bn else "")


def _layer_row(job: ConvertJob, name: str, new: ReparamBlock, bn_name: str | None, note: str) -> ConvertedLayer:
    g = new.geometry
    bn_names = tuple(job.names[id(job.target.get_submodule(bn_name))]) if bn_name else ()
    return ConvertedLayer(
        name=name, block=type(new).__name__, bn=new.bn, absorbed_bn=bn_name, absorbed_bn_names=bn_names,
        in_channels=g.in_channels, out_channels=g.out_channels, kernel_size=g.kernel_size, stride=g.stride,
        padding=g.padding, dilation=g.dilation, groups=g.groups, branches=tuple(new.branches.keys()), note=note,
    )


def convert_layer(job: ConvertJob, name: str, conv: nn.Conv2d) -> tuple[ConvertedLayer, LayerSwap] | SkippedLayer:
    """Decide one conv: why it is skipped, or the block (initialized, flags carried over) that
    replaces it with the report row. Changes nothing in ``job.target``."""
    reason = job.inside.get(name) or _skip_reason(name, conv, job.include, job.exclude)
    direct = reads_attributes_of(job.dataflow, name) if reason is None else []
    if direct:
        reason = f"{DIRECT_READ} {', '.join(direct)} directly; a block has no such attribute"
    if reason is not None:
        return SkippedLayer(name, reason)
    bn_name = job.dataflow.pairs.get(name)
    bn_module = job.target.get_submodule(bn_name) if bn_name else None
    kind = job.dataflow.kinds.get(bn_name, PLAIN) if bn_name else None
    bn_part = norm_part(bn_module, kind) if bn_module is not None else None
    placement = job.bn if bn_module is not None else "none"
    try:
        new = BLOCKS[job.block](
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _conv_padding(conv),
            conv.dilation, conv.groups, bn=placement,
        )
    except ConfigError as err:
        return SkippedLayer(name, str(err))
    new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    _initialize(new, conv, bn_part, job.preserve)
    _carry_flags(new, conv, bn_part)
    row = _layer_row(job, name, new, bn_name, _bn_note(job, name, bn_name, placement))
    slot = slot_module(bn_module, kind) if bn_module is not None else None
    return row, LayerSwap(name, conv, new, bn_module, slot)


def swap_layers(target: nn.Module, names: dict[int, list[str]], swaps: Iterable[LayerSwap]) -> None:
    """Put every planned block at every name of its conv, ``nn.Identity`` at every name of the absorbed BN."""
    for swap in swaps:
        for alias in names[id(swap.conv)]:
            _set_module(target, alias, swap.block)
        if swap.bn is not None:
            for alias in names[id(swap.bn)]:
                _set_module(target, alias, swap.slot if swap.slot is not None else nn.Identity())


def _warn_not_absorbed(job: ConvertJob, report: ConversionReport) -> None:
    """One :class:`BatchNormNotAbsorbedWarning` per reason, naming every conv that got
    ``bn="none"`` although ``job.bn`` asked for a BatchNorm (an untraceable model has its own warning)."""
    if job.bn == "none" or not job.dataflow.traced:
        return
    by_reason: dict[str, list[str]] = defaultdict(list)
    for row in report.converted:
        if row.bn != job.bn:
            by_reason[job.dataflow.why_not.get(row.name, "the conv is not called in the traced forward")].append(row.name)
    for reason, layers in by_reason.items():
        shown = ", ".join(layers[:8]) + (f", ... ({len(layers) - 8} more)" if len(layers) > 8 else "")
        warnings.warn(f"convert_model: bn={job.bn!r} asked, but {len(layers)} conv(s) became bn='none' blocks because "
                      f"{reason}: {shown}", BatchNormNotAbsorbedWarning, stacklevel=3)


def convert_model(
    model: nn.Module,
    block: str = "acb",
    bn: str = "branch",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    preserve: bool = True,
    *,
    example_input: Tensor | tuple | None = None,
    inplace: bool = False,
    return_report: bool = False,
) -> nn.Module | ConvertResult:
    """Replace every eligible ``nn.Conv2d`` (and the BatchNorm that solely consumes it, found in
    the torch.fx dataflow: :func:`find_conv_bn_pairs`) by a ``block`` (``"acb"``, ``"repvgg"``,
    ``"dbb"``) with the same geometry and BN placement ``bn`` (``"branch"``, ``"after"``, ``"none"``);
    the absorbed BatchNorm's slot becomes ``nn.Identity``. docs/convert.md has the details.

    - A conv with no absorbed BatchNorm becomes a ``bn="none"`` block (adding a BatchNorm would
      change training); the report records the placement used per layer and why.
    - ``preserve=True``: the same function in eval mode (main branch = the conv, every other
      branch outputs exactly 0 via ``Branch.silence`` yet trains); ``preserve=False``: fresh blocks.
    - What the user set survives (:func:`_carry_flags`): ``requires_grad`` per parameter and
      train/eval mode per module, a bias-free conv stays bias-free (block bias frozen at 0).
    - Skipped with the reason: 1x1/even kernels, non-"zeros" padding, ``nn.Conv2d`` subclasses,
      ``include``/``exclude`` fnmatch patterns, geometries a block rejects, convs whose parameters
      the forward reads directly. An untraceable model absorbs no BN (:class:`UntraceableModelWarning`).
    - ``example_input``: run before and after in eval mode; ``report.max_abs_diff`` records
      ``max |converted - original|``; a failing forward raises :class:`ConversionError`.

    Works on a deep copy unless ``inplace=True``. The :class:`ConversionReport` is attached as
    ``model.reparam_report``; ``return_report=True`` returns a :class:`ConvertResult`
    (``.model``, ``.report``; unpacks as ``(model, report)``).
    """
    target = model if inplace else copy.deepcopy(model)
    job = ConvertJob.start(target, block, bn, include, exclude, preserve)
    args = _as_args(example_input) if example_input is not None else None
    if args is not None:
        reference, used = _run_example(target, args, "the model", watch=not job.dataflow.traced)
        job.dataflow.attributes |= used
    report = ConversionReport(block=block, bn=bn, preserve=preserve, traced=job.dataflow.traced,
                              trace_error=job.dataflow.error)
    swaps = []
    for name, conv in target.named_modules():
        if isinstance(conv, nn.Conv2d):
            outcome = convert_layer(job, name, conv)
            if isinstance(outcome, SkippedLayer):
                report.skipped.append(outcome)
            else:
                report.converted.append(outcome[0])
                swaps.append(outcome[1])
    swap_layers(target, job.names, swaps)
    _warn_not_absorbed(job, report)
    if not report.converted and not has_branched_blocks(target):
        warn_nothing("convert_model", target, f"no eligible nn.Conv2d ({len(report.skipped)} skipped, see the report)")
    if not job.dataflow.traced:
        direct = [s.name for s in report.skipped if s.reason.startswith(DIRECT_READ)]
        warnings.warn(_untraceable_warning(target, job.dataflow.error, bn, args is not None, direct),
                      UntraceableModelWarning, stacklevel=2)
    if args is not None:
        output, _ = _run_example(target, args, "the converted model", watch=False)
        report.max_abs_diff = max_output_difference(reference, output)
    target.reparam_report = report
    return ConvertResult(target, report) if return_report else target


# -- fuse ------------------------------------------------------------------------------------
def _blocks(model: nn.Module) -> list[tuple[str, ReparamBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ReparamBlock)]


def max_output_difference(a: Any, b: Any) -> float:
    """Largest absolute difference between two (possibly nested) model outputs."""
    if isinstance(a, Tensor):
        return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0
    if isinstance(a, Mapping):
        return max((max_output_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (tuple, list)):
        return max((max_output_difference(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0


@torch.no_grad()
def eval_output(model: nn.Module, *args: Any) -> Any:
    """``model(*args)`` in eval mode; every module's own train/eval flag is restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        return model(*args)
    finally:
        for module, mode in modes.items():
            module.training = mode


def fuse_block(block: ReparamBlock) -> nn.Conv2d:
    """``block.fuse()`` with the block's flags and mode: the weight trains iff a kernel parameter
    does (a frozen conv gives a frozen conv), the bias iff any parameter does."""
    fused = block.fuse()
    fused.train(block.training)
    fused.weight.requires_grad_(any(p.requires_grad for p in _kernel_parameters(block)))
    fused.bias.requires_grad_(any(p.requires_grad for p in block.parameters()))
    return fused


def fuse_model(
    model: nn.Module, probe: Tensor | None = None, *, inplace: bool = False, return_report: bool = False
) -> nn.Module | FuseResult | tuple[nn.Module, float]:
    """Replace every :class:`ReparamBlock` by its ``fuse()`` conv (the deploy form).

    The fused conv equals the block's **eval-mode** output (running BN statistics); a model
    in training mode computes something else until ``.eval()``. Works on a deep copy unless
    ``inplace=True``; every module keeps its train/eval flag and a frozen block gives a frozen
    conv (:func:`fuse_block`). ``return_report=True`` returns a :class:`FuseResult` (``.model``,
    ``.report.fused``, ``.report.max_abs_diff``: with ``probe``, an input batch,
    ``max |fused(probe) - branched(probe)|`` in eval mode; unpacks as ``(model, max_abs_diff)``).
    The older ``fuse_model(model, probe)`` without ``return_report`` still returns
    ``(model, max_abs_diff)`` with a ``DeprecationWarning``.
    """
    target = model if inplace else copy.deepcopy(model)
    reference = eval_output(target, probe) if probe is not None else None
    names = _names_by_module(target)
    report = FuseReport()
    for name, block in _blocks(target):
        fused = fuse_block(block)
        for alias in names[id(block)]:
            _set_module(target, alias, fused)
        report.fused.append(name)
    fuse_foreign_blocks(target, report)
    if not report.fused:
        warn_nothing("fuse_model", target, "no block to fuse")
    if probe is not None:
        report.max_abs_diff = max_output_difference(reference, eval_output(target, probe))
    if return_report:
        return FuseResult(target, report)
    if probe is not None:
        warnings.warn("fuse_model(model, probe) returning (model, diff) is deprecated: pass return_report=True "
                      "(the result unpacks the same way; the difference is .report.max_abs_diff)",
                      DeprecationWarning, stacklevel=2)
        return target, report.max_abs_diff
    return target


# -- SGS -------------------------------------------------------------------------------------
class ConvBN(nn.Sequential):
    """``conv`` then ``bn``: the plain SGS form of a block with BatchNorm, where the slot of
    the absorbed BatchNorm is unknown (weight name ``<block>.conv.weight``)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn


def _bn_slots(model: nn.Module, row: ConvertedLayer | None) -> tuple[str, ...]:
    """Every name the BatchNorm absorbed into ``row``'s block had, if all of them still hold
    the ``nn.Identity`` / :class:`AbsorbedNorm` convert_model put there; else ``()``."""
    if row is None or not row.absorbed_bn:
        return ()
    slots = row.absorbed_bn_names or (row.absorbed_bn,)
    for slot in slots:
        try:
            if type(model.get_submodule(slot)) not in (nn.Identity, AbsorbedNorm):
                return ()
        except AttributeError:
            return ()
    return tuple(slots)


def _block_bn(block: ReparamBlock) -> nn.Module | None:
    """The BN whose flags the plain form's BN takes: ``post_bn``, or the main branch's."""
    if block.post_bn is not None:
        return block.post_bn
    return _main_branch(block).bn if block.bn == "branch" else None


@torch.no_grad()
def plain_counterpart(block: ReparamBlock) -> tuple[nn.Conv2d, nn.Module | None]:
    """``block.sgs_counterpart()`` as ``(conv, bn or None)`` with the block's flags: the conv
    weight trains iff a kernel parameter does, a bias frozen at 0 is dropped (a bias-free conv
    stays bias-free), the BN takes the block BN's mode and ``requires_grad``."""
    counterpart = block.sgs_counterpart()
    conv, bn = (counterpart[0], counterpart[1]) if isinstance(counterpart, nn.Sequential) else (counterpart, None)
    conv.train(block.training)
    conv.weight.requires_grad_(any(p.requires_grad for p in _kernel_parameters(block)))
    if conv.bias is not None and block.bias is not None:
        if not block.bias.requires_grad and not bool(conv.bias.any()):
            conv.bias = None
        else:
            conv.bias.requires_grad_(block.bias.requires_grad)
    source = _block_bn(block)
    if bn is not None and source is not None:
        _copy_bn_flags(bn, source)
    return conv, bn


def _place_counterpart(target: nn.Module, name: str, aliases: list[str], block: ReparamBlock,
                       row: ConvertedLayer | None) -> tuple[str, nn.Conv2d]:
    """Put the plain form of ``block`` in ``target``; return its weight name and conv. The BN
    goes back to the absorbed BN's slots when they are intact, else a :class:`ConvBN` wraps it."""
    conv, bn = plain_counterpart(block)
    slots = _bn_slots(target, row) if bn is not None else ()
    placed: nn.Module = conv if bn is None or slots else ConvBN(conv, bn)
    if isinstance(placed, ConvBN):
        placed.training = block.training
    if slots:
        holder = target.get_submodule(slots[0])
        bn = holder.restore(bn) if isinstance(holder, AbsorbedNorm) else bn  # the original class, its children
    for alias in aliases:
        _set_module(target, alias, placed)
    for slot in slots:
        _set_module(target, slot, bn)
    return (f"{name}.conv.weight" if isinstance(placed, ConvBN) else f"{name}.weight"), conv


def _sgs_warning(report: SGSReport) -> str:
    first = report.approximate[0]
    return (f"to_sgs: {len(report.approximate)} of {len(report.layers)} layers are only approximately equivalent "
            f"under SGS (e.g. {first.weight}: {first.reasons[0]}); see the returned .report")


def to_sgs(model: nn.Module, *, inplace: bool = False, warn: bool = True) -> SGSConversion:
    """Replace every block by the plain layer SGS trains instead, initialized to the merged
    kernel; return an :class:`SGSConversion` (``.model``, ``.masks``, ``.constants``,
    ``.report``; unpacks as ``(plain_model, masks, constants)``).

    - ``bn="none"`` blocks become one ``nn.Conv2d`` with bias (without one when the block bias
      is frozen at 0, as :func:`convert_model` leaves it for a bias-free conv). ``bn="after"``
      blocks become a conv without bias followed by a copy of the post-sum BN; ``bn="branch"``
      blocks become a conv plus a BatchNorm whose eval output equals the block's (see
      ``ReparamBlock.sgs_counterpart``). When the block came from :func:`convert_model`, the
      conv takes every name of the block and the BN goes back to every name the absorbed
      BatchNorm had (aliases such as ``self.norm = self.bn`` included), so the plain model has
      the original architecture and parameter names (e.g. ``layer1.0.conv1.weight`` and
      ``layer1.0.bn1.weight``); otherwise (no conversion report, or a BN slot that is no
      longer the ``nn.Identity`` convert_model left) the block becomes a :class:`ConvBN`
      (weight ``<block>.conv.weight``) at every name.
    - Flags survive (:func:`plain_counterpart`): a frozen block gives a frozen conv, which gets
      **no** mask (``report`` lists it as frozen); BNs keep their train/eval mode.
    - ``masks`` maps each trained conv's weight name to ``G = block.sgs_mask()`` (kh, kw);
      ``constants`` maps it to the block's constant kernel ``C`` where ``C != 0`` (RepVGG's
      BN-free identity). Both feed ``attach_sgs(opt, masks, constant_kernels=constants,
      model=plain_model)``.
    - Blocks that SGS reproduces only approximately (BatchNorm inside the branches, DBB's
      non-mask branches) get ``sgs_mask(approximate=True)``; they are listed with the
      reasons in ``report.approximate`` and, with ``warn=True``, a ``NotEquivalentWarning``.

    Works on a deep copy unless ``inplace=True``.
    """
    from reparam.sgs import NotEquivalentWarning

    target = model if inplace else copy.deepcopy(model)
    conversion = getattr(target, "reparam_report", None)
    names = _names_by_module(target)
    result = SGSConversion(target, SGSReport())
    for name, block in _blocks(target):
        exact, reasons = block.sgs_exactness()
        constant = block.constant_kernel()
        mask = block.sgs_mask(approximate=not exact).to(constant.dtype)
        row = conversion.layer(name) if isinstance(conversion, ConversionReport) else None
        weight_name, conv = _place_counterpart(target, name, names[id(block)], block, row)
        trains = conv.weight.requires_grad
        has_constant = bool(constant.abs().sum() > 0)
        if trains:
            result.masks[weight_name] = mask
            if has_constant:
                result.constants[weight_name] = constant
        result.report.layers.append(SGSLayer(
            block_name=name, weight=weight_name, block=type(block).__name__, bn=block.bn,
            mask=mask.double().tolist(), exact=exact, reasons=reasons, has_constant=has_constant, frozen=not trains,
        ))
    add_foreign_sgs(target, result)
    if not result.report.layers:
        warn_nothing("to_sgs", target, "no block to turn into a plain conv with a mask")
    if warn and result.report.approximate:
        warnings.warn(_sgs_warning(result.report), NotEquivalentWarning, stacklevel=2)
    return result

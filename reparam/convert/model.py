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
from fnmatch import fnmatch
from typing import Any

import torch
from torch import Tensor, nn

from reparam.blocks import BLOCKS, BN_PLACEMENTS, ReparamBlock
from reparam.blocks.branches import AverageBranch, ConvBranch, IdentityBranch, SequentialBranch
from reparam.convert.graph import (
    UntraceableModelWarning,
    error_line,
    find_conv_bn_pairs,
    parameters_used_outside,
    reads_attributes_of,
)
from reparam.convert.report import ConversionReport, ConvertedLayer, SGSLayer, SGSReport, SkippedLayer
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


def _zero_bn_output(bn: nn.BatchNorm2d) -> None:
    # gamma = beta = 0: the branch outputs exactly 0 in train and eval mode; gamma gets a
    # gradient at the first step, after which the branch weights train too.
    bn.weight.zero_()
    bn.bias.zero_()


def _silence(branch: nn.Module, name: str) -> None:
    """Make a side branch output 0 while keeping all its parameters trainable."""
    if isinstance(branch, ConvBranch):
        if branch.bn is not None:
            _zero_bn_output(branch.bn)
        else:
            branch.weight.zero_()  # linear branch: a zero kernel still gets the full gradient
    elif isinstance(branch, IdentityBranch):
        if branch.bn is not None:
            _zero_bn_output(branch.bn)
        # without BN the identity is the constant kernel C, compensated in the main branch
    elif isinstance(branch, SequentialBranch):
        if branch.second_bn is not None:
            _zero_bn_output(branch.second_bn)
        else:
            branch.second.zero_()  # 1x1 stays the identity, so the KxK still gets a gradient
    elif isinstance(branch, AverageBranch):
        if branch.second_bn is not None:
            _zero_bn_output(branch.second_bn)
        else:
            branch.first.zero_()
    else:
        raise ConversionError(f"convert: do not know how to silence branch {name!r} ({type(branch).__name__})")


def _load_bn(target: nn.BatchNorm2d, source: nn.BatchNorm2d, shift: Tensor) -> None:
    """``target(y) == source(y + shift)`` in eval mode (absorbs the conv bias ``shift``)."""
    target.weight.copy_(source.weight)
    target.bias.copy_(source.bias)
    target.running_mean.copy_(source.running_mean - shift.to(source.running_mean.dtype))
    target.running_var.copy_(source.running_var)
    if source.num_batches_tracked is not None and target.num_batches_tracked is not None:
        target.num_batches_tracked.copy_(source.num_batches_tracked)


@torch.no_grad()
def _initialize(block: ReparamBlock, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, preserve: bool) -> None:
    if bn is not None:
        for module in block.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps, module.momentum = bn.eps, bn.momentum
    if not preserve:
        return
    main = _main_branch(block)
    for name, branch in block.branches.items():
        if branch is not main:
            _silence(branch, name)
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(weight[:, 0, 0, 0])
    constant = block.constant_kernel().to(weight.dtype)
    if block.bn == "branch":
        main.weight.copy_(weight)
        _load_bn(main.bn, bn, bias)
    elif block.bn == "after":
        main.weight.copy_(weight - constant)
        _load_bn(block.post_bn, bn, bias)
    else:
        if bn is not None:
            folded_w, folded_b = fold_batchnorm(weight.double(), bias.double(), bn)
            weight, bias = folded_w.to(weight.dtype), folded_b.to(weight.dtype)
        main.weight.copy_(weight - constant)
        block.bias.copy_(bias)


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
        return _eval_output(model, *args), set()
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
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace every eligible ``nn.Conv2d`` (and the BatchNorm that solely consumes it) by a
    reparameterization block with the same in/out channels, kernel, stride, padding,
    dilation and groups.

    - ``block``: ``"acb"``, ``"repvgg"`` or ``"dbb"``; ``bn``: ``"branch"``, ``"after"``, ``"none"``.
    - conv -> BN pairs come from the traced dataflow (:func:`find_conv_bn_pairs`). The absorbed
      BatchNorm is replaced by ``nn.Identity`` in the model. A model torch.fx cannot trace is
      still converted, but no BatchNorm is absorbed (the report says so).
    - A conv with no absorbed BatchNorm becomes a ``bn="none"`` block (its bias carries the conv
      bias) whatever ``bn`` asks: adding a BatchNorm the original did not have would change
      training. The report records the placement used per layer.
    - ``preserve=True``: the converted model computes the original function in eval mode. The
      main KxK branch gets the conv weight (minus RepVGG's constant identity kernel where that
      has no BN); with ``bn="branch"`` the main branch's BN gets the original BN (its running
      mean shifted by the conv bias) and every other branch's BN gets gamma = beta = 0 (exact 0
      output in train and eval; gamma is trained from the first step, then the branch weights);
      without BN inside the branches, side branches get zero kernels (DBB: the 1x1 of the
      1x1->KxK branch stays the identity and the KxK is 0, the 1x1 of the average branch is 0).
      ``bn="after"`` moves the original BN to ``post_bn``; ``bn="none"`` folds it into the
      kernel and bias. ``preserve=False``: the blocks' fresh initialization (BNs at defaults).
      Either way block BNs take the original BN's ``eps`` and ``momentum``.
    - ``include``/``exclude``: fnmatch patterns on qualified module names (``"layer1.*"``).
    - Skipped (with the reason in the report): 1x1 and even kernels, non-"zeros"
      padding_mode, subclasses of nn.Conv2d, name filters, geometries a block rejects, convs
      whose parameters the forward reads directly (``self.conv.weight``): seen in the traced
      graph, or, for a model torch.fx cannot trace, by running ``example_input``.
    - A model torch.fx cannot trace raises an :class:`UntraceableModelWarning` saying why and
      what the fallback did.
    - ``example_input`` (a tensor, or a tuple of forward arguments): the model is run on it
      in eval mode before and after the conversion; a forward that fails raises
      :class:`ConversionError`, and ``report.max_abs_diff`` records
      ``max |converted - original|`` on it.
    - A frozen conv (``weight.requires_grad=False``) gives a frozen block.

    Works on a deep copy unless ``inplace=True``. The :class:`ConversionReport` is attached as
    ``model.reparam_report``; ``return_report=True`` returns ``(model, report)``.
    """
    if block not in BLOCKS:
        raise ConfigError(f"convert_model: block={block!r} is not supported; choose one of {sorted(BLOCKS)}")
    if bn not in BN_PLACEMENTS:
        raise ConfigError(f"convert_model: bn={bn!r} is not supported; choose one of {BN_PLACEMENTS}")
    include_, exclude_ = _patterns(include), _patterns(exclude)
    target = model if inplace else copy.deepcopy(model)
    dataflow = find_conv_bn_pairs(target)
    args = _as_args(example_input) if example_input is not None else None
    if args is not None:
        reference, used = _run_example(target, args, "the model", watch=not dataflow.traced)
        dataflow.attributes |= used
    report = ConversionReport(block=block, bn=bn, preserve=preserve, traced=dataflow.traced, trace_error=dataflow.error)
    names = _names_by_module(target)
    block_cls = BLOCKS[block]
    plan = []
    direct_reads: list[str] = []
    for name, conv in target.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        reason = _skip_reason(name, conv, include_, exclude_)
        direct = reads_attributes_of(dataflow, name) if reason is None else []
        if direct:
            reason = f"the forward reads {', '.join(direct)} directly; a block has no such attribute"
            direct_reads.append(name)
        if reason is not None:
            report.skipped.append(SkippedLayer(name, reason))
            continue
        bn_name = dataflow.pairs.get(name)
        bn_module = target.get_submodule(bn_name) if bn_name else None
        placement = bn if bn_module is not None else "none"
        try:
            new = block_cls(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _conv_padding(conv),
                conv.dilation, conv.groups, bn=placement,
            )
        except ConfigError as err:
            report.skipped.append(SkippedLayer(name, str(err)))
            continue
        new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        _initialize(new, conv, bn_module, preserve)
        new.train(conv.training)
        if not conv.weight.requires_grad:
            new.requires_grad_(False)
        if bn_module is not None:
            note = ""
        elif not dataflow.traced:
            note = "no BatchNorm absorbed (model not traceable): bn='none' block"
        else:
            why = dataflow.why_not.get(name, "the conv is not called in the traced forward")
            note = f"no BatchNorm absorbed ({why})" + (": bn='none' block" if placement != bn else "")
        plan.append((name, conv, new, bn_name, bn_module))
        g = new.geometry
        report.converted.append(ConvertedLayer(
            name=name, block=type(new).__name__, bn=placement, absorbed_bn=bn_name,
            absorbed_bn_names=tuple(names[id(bn_module)]) if bn_module is not None else (),
            in_channels=g.in_channels, out_channels=g.out_channels, kernel_size=g.kernel_size, stride=g.stride,
            padding=g.padding, dilation=g.dilation, groups=g.groups, branches=tuple(new.branches.keys()), note=note,
        ))
    for _name, conv, new, _bn_name, bn_module in plan:
        for alias in names[id(conv)]:
            _set_module(target, alias, new)
        if bn_module is not None:
            for alias in names[id(bn_module)]:
                _set_module(target, alias, nn.Identity())
    if not dataflow.traced:
        warnings.warn(_untraceable_warning(target, dataflow.error, bn, args is not None, direct_reads),
                      UntraceableModelWarning, stacklevel=2)
    if args is not None:
        output, _ = _run_example(target, args, "the converted model", watch=False)
        report.max_abs_diff = max_output_difference(reference, output)
    target.reparam_report = report
    return (target, report) if return_report else target


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
def _eval_output(model: nn.Module, *args: Any) -> Any:
    was_training = model.training
    model.eval()
    try:
        return model(*args)
    finally:
        model.train(was_training)


def fuse_model(
    model: nn.Module, probe: Tensor | None = None, *, inplace: bool = False
) -> nn.Module | tuple[nn.Module, float]:
    """Replace every :class:`ReparamBlock` by its ``fuse()`` conv (the deploy form).

    The fused conv equals the block's **eval-mode** output (running BN statistics); a model
    in training mode computes something else until ``.eval()``. Works on a deep copy unless
    ``inplace=True``; the returned model keeps the input's train/eval flag. With ``probe``
    (an input batch) returns ``(fused_model, max |fused(probe) - branched(probe)|)``, both
    evaluated in eval mode.
    """
    target = model if inplace else copy.deepcopy(model)
    reference = _eval_output(target, probe) if probe is not None else None
    names = _names_by_module(target)
    for _, block in _blocks(target):
        fused = block.fuse()
        fused.train(block.training)
        for alias in names[id(block)]:
            _set_module(target, alias, fused)
    if probe is None:
        return target
    return target, max_output_difference(reference, _eval_output(target, probe))


# -- SGS -------------------------------------------------------------------------------------
class ConvBN(nn.Sequential):
    """``conv`` then ``bn``: the plain SGS form of a block with BatchNorm, where the slot of
    the absorbed BatchNorm is unknown (weight name ``<block>.conv.weight``)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn


class SGSConversion(tuple):
    """``(plain_model, masks, constants)`` with the :class:`SGSReport` as ``.report``."""

    report: SGSReport

    def __new__(cls, model: nn.Module, masks: dict, constants: dict, report: SGSReport) -> SGSConversion:
        self = super().__new__(cls, (model, masks, constants))
        self.report = report
        return self

    model = property(lambda self: self[0])
    masks = property(lambda self: self[1])
    constants = property(lambda self: self[2])


def _bn_slots(model: nn.Module, row: ConvertedLayer | None) -> tuple[str, ...]:
    """Every name the BatchNorm absorbed into ``row``'s block had, if all of them still hold
    the ``nn.Identity`` convert_model put there; else ``()``."""
    if row is None or not row.absorbed_bn:
        return ()
    slots = row.absorbed_bn_names or (row.absorbed_bn,)
    for slot in slots:
        try:
            if type(model.get_submodule(slot)) is not nn.Identity:
                return ()
        except AttributeError:
            return ()
    return tuple(slots)


def to_sgs(model: nn.Module, *, inplace: bool = False, warn: bool = True) -> SGSConversion:
    """Replace every block by the plain layer SGS trains instead, initialized to the merged
    kernel, and return ``(plain_model, masks, constants)`` (+ ``.report``).

    - ``bn="none"`` blocks become one ``nn.Conv2d`` with bias. ``bn="after"`` blocks become a
      conv without bias followed by a copy of the post-sum BN; ``bn="branch"`` blocks become
      a conv plus a BatchNorm whose eval output equals the block's (see
      ``ReparamBlock.sgs_counterpart``). When the block came from :func:`convert_model`, the
      conv takes every name of the block and the BN goes back to every name the absorbed
      BatchNorm had (aliases such as ``self.norm = self.bn`` included), so the plain model has
      the original architecture and parameter names (e.g. ``layer1.0.conv1.weight`` and
      ``layer1.0.bn1.weight``); otherwise (no conversion report, or a BN slot that is no
      longer the ``nn.Identity`` convert_model left) the block becomes a :class:`ConvBN`
      (weight ``<block>.conv.weight``) at every name.
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
    report = SGSReport()
    masks: dict[str, Tensor] = {}
    constants: dict[str, Tensor] = {}
    for name, block in _blocks(target):
        exact, reasons = block.sgs_exactness()
        mask = block.sgs_mask(approximate=not exact).to(block._reference().dtype)
        constant = block.constant_kernel()
        counterpart = block.sgs_counterpart()
        counterpart.train(block.training)
        weight_name = f"{name}.weight"
        aliases = names[id(block)]
        if isinstance(counterpart, nn.Sequential):
            conv, bn = counterpart[0], counterpart[1]
            row = conversion.layer(name) if isinstance(conversion, ConversionReport) else None
            slots = _bn_slots(target, row)
            if slots:
                for alias in aliases:
                    _set_module(target, alias, conv)
                for slot in slots:
                    _set_module(target, slot, bn)
                bn.train(block.training)
                conv.train(block.training)
            else:
                wrapped = ConvBN(conv, bn)
                wrapped.train(block.training)
                for alias in aliases:
                    _set_module(target, alias, wrapped)
                weight_name = f"{name}.conv.weight"
        else:
            for alias in aliases:
                _set_module(target, alias, counterpart)
        masks[weight_name] = mask
        has_constant = bool(constant.abs().sum() > 0)
        if has_constant:
            constants[weight_name] = constant
        report.layers.append(SGSLayer(
            block_name=name, weight=weight_name, block=type(block).__name__, bn=block.bn,
            mask=mask.double().tolist(), exact=exact, reasons=reasons, has_constant=has_constant,
        ))
    if warn and report.approximate:
        warnings.warn(
            f"to_sgs: {len(report.approximate)} of {len(report.layers)} layers are only approximately equivalent "
            f"under SGS (e.g. {report.approximate[0].weight}: {report.approximate[0].reasons[0]}); "
            "see the returned .report",
            NotEquivalentWarning,
            stacklevel=2,
        )
    return SGSConversion(target, masks, constants, report)

"""Measured equivalence of a whole model: train the branched model and its plain SGS counterpart
side by side on the same random batches and say, per layer and overall, whether SGS reproduces
branched training (``exact``), only approximates it, diverges, or cannot be judged because the
configuration amplifies rounding (``ill-conditioned``).

The noise floor is measured in the same run: a *rounding twin* of the branched model (the same
blocks in ``mode="merged"``, one conv on the differentiably merged kernel, where every block is
linear; otherwise the branched model with every weight moved by one unit in the last place)
trains beside it. Its deviation from the branched model is what rounding alone amounts to in
this configuration (deep nets with train-mode BatchNorm on tiny batches amplify it x10-x20 per
step). The verdict rule (:func:`judge`), with ``tol`` / ``floor_div`` the exact tolerance and
divergence floor of :mod:`verification.tolerances` and ``d`` / ``f`` the SGS / twin deviations:

1. ``d`` not finite: ``diverges``.
2. ``d >= max(floor_div, CHAOS_MARGIN * f)``: ``approximate`` where theory offers only an
   approximation (BatchNorm inside branches), else ``diverges``.
3. the weights moved less than ``min_movement(dtype)`` (relative) from their start, on either
   side: ``inconclusive`` (with no movement every parameterization looks exact).
4. ``f > tol / 10`` (rounding alone comes within 10x of the tolerance, or the twin blew up):
   ``ill-conditioned``: the tolerance cannot separate SGS from amplified rounding here.
5. ``d <= tol``: ``exact``.
6. otherwise ``inconclusive``.
"""
from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from reparam.adapters import find_blocks, recognise, to_sgs_foreign
from reparam.blocks import ReparamBlock
from reparam.convert import NothingToConvertWarning, convert_model, find_conv_bn_pairs, load_model, to_sgs
from reparam.errors import ConfigError, error_line
from reparam.kernels import fold_batchnorm
from reparam.sgs import NotEquivalentWarning, attach_sgs
from reparam.sgs.theory import inexact_reasons_for_steps, why_exact
from verification.lockstep import Side, deviation, movement, run_lockstep, snapshot, worst
from verification.optim_spec import OptimizerSpec, ScheduleSpec, parse_optimizer, parse_schedule
from verification.tolerances import (
    APPROXIMATE,
    DIVERGENCE_FLOOR,
    DIVERGES,
    EXACT,
    EXACT_TOL,
    INCONCLUSIVE,
    check_steps,
    full_precision,
    min_movement,
)

ILL_CONDITIONED = "ill-conditioned"
#: under a large noise floor, a deviation counts as real only this many times above it
CHAOS_MARGIN = 100.0
#: small defaults: a few-layer CNN verifies in about a second on a CPU; resnet18 takes minutes
#: on a busy 2-core CPU (most of it reading merged kernels of 512-channel layers every step)
DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_IMAGE = 6, 8, 32
OTHER = "(other parameters)"
OVERALL = "overall"


# -- the verdict rule --------------------------------------------------------------------------
def judge(dev: float, floor: float, moved: float, dtype: torch.dtype, approximation: bool) -> tuple[str, str]:
    """The verdict of an SGS deviation ``dev`` given the rounding twin's ``floor`` and how far the
    weights ``moved`` (all relative); see the module docstring for the rule."""
    tol, div = EXACT_TOL[dtype], DIVERGENCE_FLOOR[dtype]
    real = APPROXIMATE if approximation else DIVERGES
    if not math.isfinite(dev):
        return DIVERGES, "the SGS side went non-finite (NaN/inf)"
    threshold = max(div, CHAOS_MARGIN * floor) if math.isfinite(floor) else math.inf
    if dev >= threshold:
        return real, (f"deviation {dev:.1e} >= {threshold:.1e} (divergence floor {div:.0e}, "
                      f"{CHAOS_MARGIN:.0f} x noise floor {floor:.1e})")
    if not moved >= min_movement(dtype):
        return INCONCLUSIVE, (f"the weights moved only {moved:.1e} (relative) from their start, < {min_movement(dtype):.0e}: "
                              "any parameterization looks exact when nothing moves; raise the learning rate or --steps")
    if not floor <= tol / 10:
        return ILL_CONDITIONED, (f"rounding alone reaches {floor:.1e} here (the rounding twin), within 10x of the "
                                 f"tolerance {tol:.0e}, so SGS (deviation {dev:.1e}) cannot be told from amplified "
                                 "rounding: too ill-conditioned to judge; use a larger batch or image size, fewer steps"
                                 + (", a smaller learning rate or float64" if dtype != torch.float64 else
                                    " or a smaller learning rate"))
    if dev <= tol:
        return EXACT, f"deviation {dev:.1e} <= tolerance {tol:.0e} (noise floor {floor:.1e}, weights moved {moved:.1e})"
    return INCONCLUSIVE, f"deviation {dev:.1e} between the tolerance {tol:.0e} and the divergence floor {div:.0e}"


# -- the layers compared -------------------------------------------------------------------------
def block_tensors(block: nn.Module) -> list[Tensor]:
    """What a branched layer trains, as the plain layer sees it: the merged pre-BN kernel (and bias,
    and the post-sum BN's affine parameters); with BN inside the branches, the eval-mode fused
    kernel and bias (the only form both sides share)."""
    if not isinstance(block, ReparamBlock):
        raise ConfigError(f"verify_model: cannot read the merged kernel of a {type(block).__name__}")
    if block.bn == "branch":
        weight, bias = block.merged_kernel(post_bn=True)
        return [weight, bias]
    weight, bias = block.merged_kernel(post_bn=False)
    extra = [bias] if bias is not None else []
    if block.post_bn is not None:
        extra += [block.post_bn.weight, block.post_bn.bias]
    return [weight, *extra]


class PlainLayer:
    """A converted layer in the plain SGS model: its conv and the BN after it (``bn_style`` the
    block's placement); ``tensors()`` pairs with :func:`block_tensors`."""

    def __init__(self, bn_style: str, conv: nn.Conv2d, bn: nn.Module | None) -> None:
        self.bn_style, self.conv, self.bn = bn_style, conv, bn

    def tensors(self) -> list[Tensor]:
        if self.bn_style == "branch" and self.bn is not None:
            weight, bias = fold_batchnorm(self.conv.weight, self.conv.bias, self.bn)
            return [weight, bias]
        extra = [self.conv.bias] if self.conv.bias is not None else []
        if self.bn is not None:
            extra += [self.bn.weight, self.bn.bias]
        return [self.conv.weight, *extra]


View = Callable[[], list[Tensor]]


@dataclass
class LayerPair:
    """One converted layer on both sides: ``branched(model)`` reads it from a model with the
    branched structure (the branched side or its rounding twin), ``plain()`` from the plain SGS
    model; ``exact`` / ``reasons``: whether SGS reproduces it exactly, and why not."""

    block_name: str
    weight: str
    kind: str
    bn: str
    exact: bool
    reasons: list[str]
    branched: Callable[[nn.Module], list[Tensor]]
    plain: View


@dataclass
class Counterpart:
    """The plain SGS model of a branched model, what ``attach_sgs`` needs, and the layer pairs."""

    model: nn.Module
    masks: dict
    constants: dict
    layers: list[LayerPair]

    @property
    def approximate(self) -> list[LayerPair]:
        return [layer for layer in self.layers if not layer.exact]


def _native_view(name: str, model: nn.Module) -> list[Tensor]:
    return block_tensors(model.get_submodule(name))


def _foreign_view(name: str, model: nn.Module) -> list[Tensor]:
    """A recognised foreign block's eval-mode fused ``(weight, bias)`` (its deploy conv's)."""
    return list(recognise(model.get_submodule(name)).kernel_module()())


def _native_counterpart(branched: nn.Module) -> Counterpart:
    """``to_sgs`` of reparam's own blocks; the plain layers found by name and traced dataflow."""
    plain, masks, constants = conversion = to_sgs(branched, warn=False)
    pairs = find_conv_bn_pairs(plain).pairs
    layers = []
    for row in conversion.report.layers:
        conv_name = row.weight.rpartition(".")[0]
        bn_name = pairs.get(conv_name)
        bn = plain.get_submodule(bn_name) if bn_name and row.bn != "none" else None
        layer = PlainLayer(row.bn, plain.get_submodule(conv_name), bn)
        layers.append(LayerPair(row.block_name, row.weight, row.block, row.bn, row.exact, list(row.reasons),
                                functools.partial(_native_view, row.block_name), layer.tensors))
    return Counterpart(plain, dict(masks), dict(constants), layers)


def _foreign_counterpart(branched: nn.Module) -> Counterpart:
    """``to_sgs_foreign`` of recognised foreign blocks (timm's): deploy convs under deploy names."""
    result = to_sgs_foreign(branched)
    plain = result.model
    layers = [
        LayerPair(layer.block_name, layer.weight, layer.analysis.kind, layer.analysis.bn, layer.analysis.exact,
                  list(layer.analysis.reasons), functools.partial(_foreign_view, layer.block_name),
                  functools.partial(lambda names: [plain.get_parameter(n) for n in names], (layer.weight, layer.bias)))
        for layer in result.layers
    ]
    return Counterpart(plain, dict(result.masks), dict(result.constants), layers)


def _counterpart(branched: nn.Module) -> Counterpart:
    return _foreign_counterpart(branched) if find_blocks(branched) else _native_counterpart(branched)


def _other_parameters(reference: nn.Module, other: nn.Module, blocks: Iterable[str]) -> list[tuple[str, Tensor, Tensor]]:
    """Parameters outside the converted layers present under the same name and shape on both sides."""
    prefixes = tuple(f"{b}." for b in blocks)
    theirs = dict(other.named_parameters())
    return [(n, p, theirs[n]) for n, p in reference.named_parameters()
            if not n.startswith(prefixes) and n in theirs and theirs[n].shape == p.shape]


# -- sides and training ----------------------------------------------------------------------------
def _logits(output: object) -> Tensor:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]  # e.g. inception's (logits, aux)
    if not isinstance(output, Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ConfigError(f"verify_model needs a classifier returning (batch, classes) logits; the model returned {shape}")
    return output


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor, int]) -> Tensor:
    """Cross-entropy on random labels (non-linear, so the gradient depends on the weights). The
    forward runs under the batch's own seed, so random layers (dropout, stochastic depth) draw
    the same numbers on every side; the caller's RNG state is left as it was."""
    x, target, seed = batch
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return F.cross_entropy(_logits(model(x)), target)


@torch.no_grad()
def _probe(model: nn.Module, x: Tensor) -> Tensor:
    """The logits of ``model(x)`` in eval mode (no BN statistics updated); every module's own
    train/eval flag is restored afterwards."""
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        return _logits(model(x))
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]


def _in_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, ReparamBlock))), None)
    if first is None:
        raise ConfigError("verify_model: the model has no conv layer, so the input channels are unknown")
    return first.in_channels


def _batches(model: nn.Module, steps: int, batch_size: int, image_size: int, dtype, device, seed: int):
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (batch_size, _in_channels(model), image_size, image_size)
    try:
        classes = _probe(model, torch.randn(shape, generator=generator, dtype=dtype).to(device)).shape[1]
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported as such
        raise ConfigError(f"verify_model: the model fails on a batch of shape {shape} ({error_line(err)})") from None
    return [(torch.randn(shape, generator=generator, dtype=dtype).to(device),
             torch.randint(classes, (batch_size,), generator=generator).to(device), seed + 3 + step)
            for step in range(steps)], classes


# -- building the sides ----------------------------------------------------------------------------
def _load(model_or_spec: nn.Module | str, dtype: torch.dtype, device: str | torch.device, seed: int) -> tuple[nn.Module, str]:
    torch.manual_seed(seed)  # the random initialization of a spec's model
    if isinstance(model_or_spec, str):
        model, label = load_model(model_or_spec), model_or_spec
    elif isinstance(model_or_spec, nn.Module):
        model, label = copy.deepcopy(model_or_spec), type(model_or_spec).__name__
    else:
        raise ConfigError(f"verify_model: expected an nn.Module or a model spec string, got {type(model_or_spec).__name__}")
    return model.to(device=device, dtype=dtype), label


def _branched(model: nn.Module, block: str, bn: str) -> tuple[nn.Module, str]:
    """The model itself if it is branched already (recognised foreign blocks such as timm's, or
    reparam's own), else ``convert_model``'s."""
    foreign = find_blocks(model)
    if foreign:
        kinds = ", ".join(sorted({adapter.kind for _, adapter in foreign}))
        return model, f"{len(foreign)} recognised branched blocks ({kinds}): used as they are (block/bn ignored)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingToConvertWarning)  # only probing: a plain model is expected
        branched_already = bool(to_sgs(model, warn=False).masks)
    if branched_already:
        return model, "the model is branched already: used as it is (block/bn ignored)"
    converted, report = convert_model(model, block=block, bn=bn, inplace=True, return_report=True)
    if not report.converted:
        why = "; ".join(sorted({s.reason for s in report.skipped})[:3]) or "it has no nn.Conv2d"
        raise ConfigError(f"verify_model: no conv of the model became a {block} block ({why}); nothing to verify")
    placements = sorted({row.bn for row in report.converted})
    return converted, (f"converted {len(report.converted)} convs to {block} blocks (bn used: {', '.join(placements)}; "
                       f"{len(report.skipped)} left as they are)")


def _rounding_twin(branched: nn.Module, block_names: list[str], floor: str, seed: int) -> tuple[str, nn.Module]:
    """A copy of the branched model that differs from it only in rounding: ``"merged"`` (every block
    in merged mode; needs linear blocks) or ``"perturbed"`` (every weight moved by ~one ulp)."""
    blocks = [branched.get_submodule(name) for name in block_names]
    linear = all(isinstance(b, ReparamBlock) and b.bn != "branch" for b in blocks)
    if floor == "auto":
        floor = "merged" if linear else "perturbed"
    if floor == "merged" and not linear:
        raise ConfigError("verify_model: floor='merged' needs every block linear (bn 'none' or 'after'); use 'perturbed'")
    twin = copy.deepcopy(branched)
    with torch.no_grad():
        if floor == "merged":
            for name in block_names:
                twin.get_submodule(name).mode = "merged"
        else:
            generator = torch.Generator().manual_seed(seed + 2)
            for p in twin.parameters():
                if p.is_floating_point():
                    sign = torch.randint(0, 2, p.shape, generator=generator).to(device=p.device, dtype=p.dtype) * 2 - 1
                    p.mul_(1 + torch.finfo(p.dtype).eps * sign)
    return floor, twin


def _replace_masks(masks: dict[str, Tensor], override: Mapping[str, Tensor] | None) -> tuple[dict[str, Tensor], list[str]]:
    """``masks`` with the caller's replacements (a negative control); the names really changed."""
    if not override:
        return masks, []
    unknown = [name for name in override if name not in masks]
    if unknown:
        raise ConfigError(f"verify_model: masks given for {unknown}, which have no SGS mask; masked weights: {sorted(masks)}")
    changed = [n for n, m in override.items()
               if not (isinstance(masks[n], Tensor) and torch.equal(torch.as_tensor(m).to(masks[n]), masks[n]))]
    return {**masks, **{n: torch.as_tensor(m) for n, m in override.items()}}, changed


def _expectation(counterpart: Counterpart, optimizer: torch.optim.Optimizer, mode: str, steps: int,
                 injected: list[str]) -> tuple[str, str]:
    """The verdict theory predicts for the whole model, and why."""
    approximate = counterpart.approximate
    if approximate:
        first = approximate[0]
        count = f"{len(approximate)} of {len(counterpart.layers)} layers"
        return APPROXIMATE, f"{count} only approximate under SGS ({first.weight}: {first.reasons[0]})"
    if injected:
        return DIVERGES, f"masks replaced by the caller for {', '.join(injected)} (negative control)"
    reasons = inexact_reasons_for_steps(optimizer, optimizer.param_groups, steps)
    if reasons[mode] is not None:
        if all(reasons.values()):
            return DIVERGES, f"no SGS mode is exact here (ran {mode!r}): " + "; ".join(f"{m}: {r}" for m, r in reasons.items())
        return DIVERGES, reasons[mode]
    return EXACT, why_exact(optimizer, optimizer.param_groups, mode, steps)


# -- what is recorded every step ---------------------------------------------------------------
class _Recorder:
    """Per step, side and layer: deviation from the branched side, and how far the side moved."""

    def __init__(self, sides: list[Side], layers: list[LayerPair]) -> None:
        names = [layer.block_name for layer in layers]
        models = {side.name: side.model for side in sides}
        branched, plain = models["branched"], models["sgs"]
        self.views: dict[str, dict[str, View]] = {}
        for name, model in models.items():
            if name == "sgs":
                views = {layer.block_name: layer.plain for layer in layers}
                pairs = _other_parameters(branched, plain, names)
                views[OTHER] = lambda pairs=pairs: [theirs for _, _, theirs in pairs]
            else:
                views = {layer.block_name: functools.partial(layer.branched, model) for layer in layers}
                # only what the plain model also has, so every side compares the same "other" tensors
                pairs = _other_parameters(model, plain, names)
                views[OTHER] = lambda pairs=pairs: [mine for _, mine, _ in pairs]
            self.views[name] = views
        self.reference = self.views["branched"]
        self.start: dict[tuple[str, str], list[Tensor]] = {}

    @torch.no_grad()
    def observe(self, step: int) -> list[dict]:
        reference = {layer: view() for layer, view in self.reference.items()}
        rows = []
        for side, views in self.views.items():
            for layer, view in views.items():
                tensors = snapshot(reference[layer] if side == "branched" else view())
                if not tensors:
                    continue
                start = self.start.setdefault((side, layer), tensors)
                abs_dev, rel_dev = deviation(reference[layer], tensors, per_tensor=True)
                rows.append(dict(side=side, layer=layer, abs_dev=abs_dev, rel_dev=rel_dev, moved_rel=movement(start, tensors)[1]))
        return rows


def _summary(per_step: pd.DataFrame, floor_side: str, layers: dict[str, tuple[str, str]], expected: tuple[str, str],
             dtype: torch.dtype) -> pd.DataFrame:
    """One row per layer, one for the other parameters and one ``overall``."""
    approximation = expected[0] == APPROXIMATE
    rows = []
    for layer, frame in per_step.groupby("layer", sort=False):
        sgs, twin, ref = (frame[frame.side == s] for s in ("sgs", floor_side, "branched"))
        moved = min(worst(ref.moved_rel), worst(sgs.moved_rel))
        rows.append(dict(layer=layer, block=layers.get(layer, ("", ""))[0], bn=layers.get(layer, ("", ""))[1],
                         max_rel_dev=worst(sgs.rel_dev), max_abs_dev=worst(sgs.abs_dev),
                         floor_rel_dev=worst(twin.rel_dev), moved_rel=moved))
    summary = pd.DataFrame(rows)
    overall = dict(layer=OVERALL, block="", bn="", max_rel_dev=worst(summary.max_rel_dev),
                   max_abs_dev=worst(summary.max_abs_dev), floor_rel_dev=worst(summary.floor_rel_dev),
                   moved_rel=float(summary.moved_rel.max()))
    summary = pd.concat([summary, pd.DataFrame([overall])], ignore_index=True)
    judged = [judge(r.max_rel_dev, r.floor_rel_dev, r.moved_rel, dtype, approximation) for r in summary.itertuples()]
    summary["observed"] = [v for v, _ in judged]
    summary["expected"] = expected[0]
    summary["match"] = summary.observed == summary.expected
    summary["why"] = [w for _, w in judged]
    summary["theory"] = expected[1]
    return summary[["layer", "block", "bn", "expected", "observed", "match", "max_rel_dev", "max_abs_dev",
                    "floor_rel_dev", "moved_rel", "why", "theory"]]


# -- the result ------------------------------------------------------------------------------------
@dataclass
class ModelVerification:
    """What :func:`verify_model` measured. ``summary``: one row per converted layer, one for the
    other parameters, one ``overall``; ``per_step``: deviation from the branched side and movement
    from the start, per step, side and layer; ``verdict`` / ``expected`` / ``reason`` overall."""

    summary: pd.DataFrame
    per_step: pd.DataFrame
    verdict: str
    expected: str
    reason: str
    floor_side: str
    metadata: dict = field(default_factory=dict)

    @property
    def matches(self) -> bool:
        return self.verdict == self.expected

    @property
    def overall(self) -> pd.Series:
        return self.summary[self.summary.layer == OVERALL].iloc[0]

    def write(self, out_dir: Path | str, stem: str = "verify_model") -> list[Path]:
        """``<stem>.csv/.md/.json`` (the summary, metadata in the JSON), ``<stem>_steps.csv`` and
        ``<stem>.png`` (deviation vs step, the noise floor drawn)."""
        from verification.report import write_tables

        out_dir = Path(out_dir)
        paths = write_tables(self.summary, out_dir, stem=stem, metadata=self.metadata)
        steps_path = out_dir / f"{stem}_steps.csv"
        self.per_step.to_csv(steps_path, index=False)
        paths.append(steps_path)
        paths.append(plot_model_deviation(self, out_dir / f"{stem}.png"))
        return paths


def plot_model_deviation(result: ModelVerification, path: Path) -> Path:
    """Left: relative deviation of every SGS layer from the branched model vs step (worst layer
    bold), the rounding twin's (noise floor) and the thresholds. Right: how far the weights moved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from verification.report import VERDICT_COLOURS

    frame, dtype = result.per_step, getattr(torch, result.metadata.get("dtype", "float64"))
    sgs, twin = frame[frame.side == "sgs"], frame[frame.side == result.floor_side]
    worst = result.summary[result.summary.layer != OVERALL].sort_values("max_rel_dev").layer.iloc[-1]
    fig, (ax, ax_moved) = plt.subplots(1, 2, figsize=(12, 4.5))
    for layer, part in sgs.groupby("layer", sort=False):
        if layer != worst:
            ax.plot(part.step, part.rel_dev.clip(lower=1e-17), color="grey", alpha=0.35, linewidth=0.8)
    colour = {**VERDICT_COLOURS, ILL_CONDITIONED: "tab:brown"}.get(result.verdict, "black")
    part = sgs[sgs.layer == worst]
    ax.plot(part.step, part.rel_dev.clip(lower=1e-17), color=colour, linewidth=2, label=f"SGS, worst layer: {worst}")
    floor = twin.groupby("step").rel_dev.max()
    ax.plot(floor.index, floor.clip(lower=1e-17), color="black", linestyle="-.", linewidth=1.5,
            label=f"noise floor ({result.floor_side} twin, all layers)")
    ax.axhline(EXACT_TOL[dtype], color="black", linestyle="--", linewidth=0.8, label="exact tolerance")
    ax.axhline(DIVERGENCE_FLOOR[dtype], color="black", linestyle=":", linewidth=0.8, label="divergence floor")
    ax.plot([], [], color="grey", alpha=0.5, label="SGS, other layers")
    ax.set(yscale="log", xlabel="step", ylabel="max relative deviation from branched training",
           title=f"{result.metadata.get('model', '')}: {result.verdict} (expected {result.expected})")
    ax.legend(fontsize=7, loc="upper left")
    moved = frame[frame.side.isin(["branched", "sgs"]) & (frame.step > 0)].groupby(["side", "step"]).moved_rel.max()
    for side, style in (("branched", "-"), ("sgs", "--")):
        ax_moved.plot(moved[side].index, moved[side].clip(lower=1e-17), linestyle=style, label=side)
    ax_moved.axhline(min_movement(dtype), color="black", linestyle=":", linewidth=0.8,
                     label="needed for an exact verdict")
    ax_moved.set(yscale="log", xlabel="step", ylabel="max relative change from the start", title="weights moved")
    ax_moved.legend(fontsize=7)
    for axis in (ax, ax_moved):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the entry point -------------------------------------------------------------------------------
def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"verify_model: {what} must be an int >= 1, got {value!r}")
    return value


def _specs(optimizer: str | OptimizerSpec, schedule: str | ScheduleSpec | None) -> tuple[OptimizerSpec, ScheduleSpec | None]:
    opt = optimizer if isinstance(optimizer, OptimizerSpec) else parse_optimizer(optimizer)
    sched = schedule if schedule is None or isinstance(schedule, ScheduleSpec) else parse_schedule(schedule)
    return opt, sched


def _side(name: str, model: nn.Module, optimizer: OptimizerSpec, schedule: ScheduleSpec | None) -> Side:
    opt = optimizer.build(model.parameters())
    return Side(name, model, opt, schedule.build(opt) if schedule is not None else None)


def _attach(side: Side, masks: dict[str, Tensor], constants: dict[str, Tensor]):
    """SGS on the plain side, ``mode="auto"``, ``strict=False`` (an inexact configuration still
    runs; its expected verdict says why)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotEquivalentWarning)
        return attach_sgs(side.optimizer, masks, mode="auto", strict=False, constant_kernels=constants, model=side.model)


@full_precision()
def verify_model(
    model_or_spec: nn.Module | str,
    block: str = "acb",
    bn: str = "after",
    optimizer: str | OptimizerSpec = "SGD(lr=0.1, momentum=0.9)",
    schedule: str | ScheduleSpec | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    image_size: int = DEFAULT_IMAGE,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    floor: str = "auto",
    masks: Mapping[str, Tensor] | None = None,
    progress: bool = False,
) -> ModelVerification:
    """Train the branched model (``model_or_spec`` converted with ``convert_model(block, bn)``
    unless it is branched already), its plain SGS counterpart (``to_sgs`` + ``attach_sgs``) and a
    rounding twin (``floor``: ``"merged"``, ``"perturbed"`` or ``"auto"``) side by side on
    ``steps`` identical random batches (cross-entropy on random labels) and judge SGS against the
    measured noise floor (see the module docstring). ``optimizer`` / ``schedule``: specs such as
    ``"AdamW(lr=1e-3, weight_decay=0.05)"`` / ``"CosineAnnealingLR(T_max=10)"``. ``masks``
    replaces the SGS masks of the named plain weights (a negative control). Bad arguments raise
    :class:`~reparam.errors.ConfigError` before any training. TF32 is off throughout."""
    check_steps(steps, "verify_model")
    _positive(batch_size, "batch_size"), _positive(image_size, "image_size")
    if floor not in ("auto", "merged", "perturbed"):
        raise ConfigError(f"verify_model: floor={floor!r} is not supported; choose 'auto', 'merged' or 'perturbed'")
    opt_spec, sched_spec = _specs(optimizer, schedule)
    started = time.perf_counter()
    model, label = _load(model_or_spec, dtype, device, seed)
    branched, how = _branched(model, block, bn)
    counterpart = _counterpart(branched)
    sgs_masks, injected = _replace_masks(counterpart.masks, masks)
    names = [layer.block_name for layer in counterpart.layers]
    floor_side, twin = _rounding_twin(branched, names, floor, seed)
    batches, classes = _batches(branched, steps, batch_size, image_size, dtype, device, seed)
    sides = [_side(n, m, opt_spec, sched_spec)
             for n, m in (("branched", branched), (floor_side, twin), ("sgs", counterpart.model))]
    handle = _attach(sides[-1], sgs_masks, counterpart.constants)
    expected = _expectation(counterpart, sides[-1].optimizer, handle.mode, steps, injected)
    recorder = _Recorder(sides, counterpart.layers)
    try:
        with tqdm(total=steps, desc="verify --model", unit="step", disable=not progress, leave=False) as bar:
            observe = lambda step: (bar.update(step > 0), recorder.observe(step))[1]
            per_step = pd.DataFrame(run_lockstep(sides, batches, _loss, steps, observe, observe_start=True))
    finally:
        handle.remove()
    layers = {layer.block_name: (layer.kind, layer.bn) for layer in counterpart.layers}
    summary = _summary(per_step, floor_side, layers, expected, dtype)
    overall = summary.iloc[-1]
    metadata = dict(model=label, conversion=how, block=block, bn=bn, optimizer=str(opt_spec),
                    schedule=str(sched_spec) if sched_spec else None, applied_mode=handle.mode, steps=steps,
                    batch_size=batch_size, image_size=image_size, classes=classes, dtype=str(dtype).replace("torch.", ""),
                    device=str(device), seed=seed, floor_side=floor_side, layers=len(names), injected_masks=injected,
                    verdict=overall.observed, expected=expected[0], torch=torch.__version__,
                    seconds=round(time.perf_counter() - started, 2))
    return ModelVerification(summary, per_step, overall.observed, expected[0], overall.why, floor_side, metadata)

"""The trajectory-equivalence engine: train a branched block, its merged-mode twin and its
SGS counterpart side by side on identical data (:func:`verification.lockstep.run_lockstep`)
and measure how far they drift apart, and how far each moved."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn

from reparam.blocks import ReparamBlock
from reparam.kernels import fold_batchnorm
from reparam.sgs import NotEquivalentWarning, SpatialPreconditioner, attach_sgs
from verification.lockstep import Side, deviation, movement, run_lockstep, snapshot, worst
from verification.tolerances import check_steps, full_precision
from verification.verdicts import classify, expected_verdict, structural_exactness

#: ``() -> ReparamBlock`` (e.g. a :class:`verification.strategies.BlockFactory`)
MakeBlock = Callable[[], ReparamBlock]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], object]

#: the deviations recorded per step and side (each an ``_abs`` and a ``_rel`` column)
MEASURES = ("kernel", "bias", "params")


@dataclass(frozen=True)
class TrajectoryConfig:
    """How :func:`compare_trajectories` trains: ``steps`` (>= 1) of a non-linear loss on
    ``batch_size`` random inputs of ``input_size`` (``channels_last`` memory format), in
    ``dtype`` on ``device`` from ``seed``; SGS applied with ``mode`` and ``transform``
    (``"mask"``: ``G = sum M_n``, the paper's mask-sum where no exact mask exists;
    ``"preconditioner"``: ``P = J J^T``); every side under ``scheduler_factory`` if given."""

    steps: int = 20
    dtype: torch.dtype = torch.float64
    device: str | torch.device = "cpu"
    seed: int = 0
    mode: str = "auto"
    transform: str = "mask"
    scheduler_factory: SchedulerFactory | None = None
    batch_size: int = 4
    input_size: tuple[int, int] = (9, 9)
    channels_last: bool = False


@dataclass
class TrajectoryResult:
    """Per-step deviations of each side from the branched block, how far each side moved
    (``moved[side] = (abs, rel)``, ``"branched"`` included), and the verdicts."""

    frame: pd.DataFrame
    max_deviation: dict[str, float]
    verdicts: dict[str, str]
    expected: dict[str, str]
    reasons: dict[str, str] = field(default_factory=dict)
    sgs_mode: str = ""
    max_abs_deviation: dict[str, float] = field(default_factory=dict)
    moved: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """The SGS side's verdict (the headline of a case)."""
        return self.verdicts["sgs"]

    @property
    def matches(self) -> bool:
        return all(self.verdicts[side] == self.expected[side] for side in self.verdicts)

    def least_movement(self, side: str) -> tuple[float, float]:
        """``(abs, rel)`` movement of the side or the branched block, whichever moved less."""
        return min(self.moved[side], self.moved["branched"], key=lambda m: (m[1], m[0]))


def eval_kernel(module: nn.Module) -> tuple[Tensor, Tensor]:
    """The eval-mode ``(weight, bias)`` of a block, a conv, or ``Sequential(conv, BN)``."""
    if isinstance(module, ReparamBlock):
        weight, bias = module.merged_kernel(post_bn=True)
    else:
        conv, bn = (module[0], module[1]) if isinstance(module, nn.Sequential) else (module, None)
        weight, bias = conv.weight, conv.bias
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn)
    return weight, bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


def _comparable_parameters(block: ReparamBlock, side: nn.Module, name: str) -> list[tuple[Tensor, Tensor]]:
    """Pairs of optimizer-visible tensors that must agree between the block and a side."""
    if name == "merged":
        return list(zip(block.parameters(), side.parameters()))
    conv = side[0] if isinstance(side, nn.Sequential) else side
    pairs = []
    if block.bn != "branch":
        pairs.append((block.merged_kernel(post_bn=False)[0], conv.weight))
    if block.bias is not None:
        pairs.append((block.bias, conv.bias))
    if block.post_bn is not None:
        bn = side[1]
        pairs += [(block.post_bn.weight, bn.weight), (block.post_bn.bias, bn.bias)]
    return pairs


def _loss(output: Tensor, target: Tensor) -> Tensor:
    """A non-linear loss, so that the gradient depends on the weights."""
    return (torch.tanh(output) - target).pow(2).mean()


def _plain_conv(module: nn.Module) -> nn.Conv2d:
    return module[0] if isinstance(module, nn.Sequential) else module


@dataclass
class _Setup:
    """The block, its sides with their optimizers and schedulers, and the attached SGS handle."""

    block: ReparamBlock
    sides: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    handle: object
    exact_struct: bool


def _build(make_block: MakeBlock, optimizer_factory: OptimizerFactory, config: TrajectoryConfig) -> _Setup:
    """Build (a) the branched block, (b) its merged-mode twin (``bn`` "none"/"after"), (c) its
    plain SGS counterpart, one optimizer each, and attach SGS to (c)."""
    block = make_block().to(device=config.device, dtype=config.dtype).train()
    sides: dict[str, nn.Module] = {}
    if block.bn != "branch":
        sides["merged"] = copy.deepcopy(block)
        sides["merged"].mode = "merged"
    sides["sgs"] = block.sgs_counterpart().train()
    exact_struct, _ = structural_exactness(block, config.transform)
    if config.transform == "preconditioner":
        mask = SpatialPreconditioner(block.spatial_preconditioner())
    else:
        mask = block.sgs_mask(approximate=not exact_struct)
    constant = block.constant_kernel()
    optimizers = {"branched": optimizer_factory(block.parameters())}
    optimizers.update({name: optimizer_factory(module.parameters()) for name, module in sides.items()})
    weight = _plain_conv(sides["sgs"]).weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotEquivalentWarning)
        constants = {weight: constant} if constant.abs().sum() > 0 else None
        handle = attach_sgs(optimizers["sgs"], {weight: mask}, mode=config.mode, strict=False,
                            constant_kernels=constants)
    return _Setup(block, sides, optimizers, handle, exact_struct)


def _batches(setup: _Setup, config: TrajectoryConfig) -> Callable[[int], tuple[Tensor, Tensor]]:
    """``step -> (x, target)``: inputs then targets in ``[-0.8, 0.8]`` from one generator."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    conv = _plain_conv(setup.sides["sgs"])
    dtype, device = config.dtype, config.device

    def batch(step: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(config.batch_size, setup.block.in_channels, *config.input_size, generator=generator)
        x = x.to(device=device, dtype=dtype)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            shape = conv(x).shape  # the output shape (a plain conv: no running statistics to disturb)
        target = torch.rand(shape, generator=generator).to(device=device, dtype=dtype) * 1.6 - 0.8
        return x, target

    return batch


def _observer(setup: _Setup) -> Callable[[int], list[dict]]:
    """``step -> rows``: per side, the deviations of :data:`MEASURES` from the branched block
    (``max_abs``/``max_rel``: the worst applicable one, non-finite propagated) and how far
    the side and the branched block moved from their start."""
    block, sides = setup.block, setup.sides
    starts = {name: snapshot(opt_params(o)) for name, o in setup.optimizers.items()}

    def observe(step: int) -> list[dict]:
        rows = []
        with torch.no_grad():
            ref_w, ref_b = eval_kernel(block)
            ref_moved = movement(starts["branched"], opt_params(setup.optimizers["branched"]))
            for name, module in sides.items():
                w, b = eval_kernel(module)
                pairs = _comparable_parameters(block, module, name)
                measured = {"kernel": deviation([ref_w], [w]), "bias": deviation([ref_b], [b])}
                if pairs:
                    measured["params"] = deviation([a for a, _ in pairs], [o for _, o in pairs])
                row = {"side": name}
                for measure in MEASURES:
                    row[f"{measure}_abs"], row[f"{measure}_rel"] = measured.get(measure, (float("nan"),) * 2)
                row["max_abs"] = worst(v[0] for v in measured.values())
                row["max_rel"] = worst(v[1] for v in measured.values())
                row["moved_abs"], row["moved_rel"] = movement(starts[name], opt_params(setup.optimizers[name]))
                row["ref_moved_abs"], row["ref_moved_rel"] = ref_moved
                rows.append(row)
        return rows

    return observe


def opt_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter the optimizer trains, in group order (the live groups)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _result(setup: _Setup, frame: pd.DataFrame, config: TrajectoryConfig, expected_sgs: tuple[str, str]) -> TrajectoryResult:
    """Worst deviations and movements over all steps, and the verdicts they give."""
    by_side = {name: frame[frame.side == name] for name in setup.sides}
    max_dev = {name: worst(part.max_rel) for name, part in by_side.items()}
    max_abs = {name: worst(part.max_abs) for name, part in by_side.items()}
    moved = {name: (worst(part.moved_abs), worst(part.moved_rel)) for name, part in by_side.items()}
    first = next(iter(by_side.values()))
    moved["branched"] = (worst(first.ref_moved_abs), worst(first.ref_moved_rel))
    approximation = {"merged": False, "sgs": not setup.exact_struct}
    verdicts = {
        name: classify(max_dev[name], config.dtype, approximation[name],
                       moved=min(moved[name][1], moved["branched"][1]))
        for name in setup.sides
    }
    expected = {"sgs": expected_sgs[0]}
    reasons = {"sgs": expected_sgs[1]}
    if "merged" in setup.sides:
        expected["merged"] = "exact"
        reasons["merged"] = "the same parameters, one conv on the merged kernel"
    return TrajectoryResult(frame, max_dev, verdicts, expected, reasons, setup.handle.mode, max_abs, moved)


@full_precision()  # a fresh context for every call
def compare_trajectories(
    block_factory: MakeBlock,
    optimizer_factory: OptimizerFactory,
    config: TrajectoryConfig | None = None,
    **options: object,
) -> TrajectoryResult:
    """Train, on identical data, (a) the branched block, (b) the same block in ``"merged"``
    mode (when ``bn`` is "none"/"after"), (c) its plain SGS counterpart with
    :func:`reparam.attach_sgs`, and record after every step the max absolute and relative
    difference of the eval-mode merged kernel and bias and of the optimizer-visible
    parameters, relative to (a), and how far each side moved from its start.

    ``config`` is a :class:`TrajectoryConfig`; keyword ``options`` override its fields
    (``compare_trajectories(f, opt, steps=3, mode="grad")`` works without one). A side is
    ``exact`` only if it moved well beyond the tolerance (see :func:`verification.tolerances.classify`).
    TF32 is disabled in CUDA matmuls and convolutions during the comparison (see
    :func:`verification.tolerances.full_precision`).
    """
    config = dataclasses.replace(config or TrajectoryConfig(), **options)
    check_steps(config.steps, "compare_trajectories")
    torch.manual_seed(config.seed)
    setup = _build(block_factory, optimizer_factory, config)
    expected_sgs = expected_verdict(setup.block, setup.optimizers["sgs"], config.mode, config.transform, config.steps)
    schedule = config.scheduler_factory
    lockstep_sides = [
        Side(name, module, setup.optimizers[name], schedule(setup.optimizers[name]) if schedule else None)
        for name, module in {"branched": setup.block, **setup.sides}.items()
    ]
    try:
        rows = run_lockstep(lockstep_sides, _batches(setup, config), lambda model, batch: _loss(model(batch[0]), batch[1]),
                            config.steps, _observer(setup), observe_start=True)
    finally:
        setup.handle.remove()
    return _result(setup, pd.DataFrame(rows), config, expected_sgs)

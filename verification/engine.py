"""The trajectory-equivalence engine: train a branched block, its merged-mode twin and its
SGS counterpart side by side on identical data and measure how far they drift apart."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn

from reparam.blocks import ReparamBlock
from reparam.kernels import fold_batchnorm
from reparam.sgs import NotEquivalentWarning, SpatialPreconditioner, attach_sgs
from verification.tolerances import check_steps, full_precision
from verification.verdicts import classify, expected_verdict, structural_exactness

BlockFactory = Callable[[], ReparamBlock]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], object]


@dataclass
class TrajectoryResult:
    """Per-step deviations of each side from the branched block, and the verdicts."""

    frame: pd.DataFrame
    max_deviation: dict[str, float]
    verdicts: dict[str, str]
    expected: dict[str, str]
    reasons: dict[str, str] = field(default_factory=dict)
    sgs_mode: str = ""

    @property
    def verdict(self) -> str:
        """The SGS side's verdict (the headline of a case)."""
        return self.verdicts["sgs"]

    @property
    def matches(self) -> bool:
        return all(self.verdicts[side] == self.expected[side] for side in self.verdicts)


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


def _deviation(reference: list[Tensor], other: list[Tensor]) -> tuple[float, float]:
    if not reference:
        return float("nan"), float("nan")
    diff = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(reference, other))
    scale = max(a.detach().abs().max().item() for a in reference)
    return diff, diff / scale if scale > 0 else diff


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


@full_precision()  # a fresh context for every call
def compare_trajectories(
    block_factory: BlockFactory,
    optimizer_factory: OptimizerFactory,
    steps: int = 20,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    mode: str = "auto",
    transform: str = "mask",
    scheduler_factory: SchedulerFactory | None = None,
    batch_size: int = 4,
    input_size: tuple[int, int] = (9, 9),
    channels_last: bool = False,
) -> TrajectoryResult:
    """Train, on identical data, (a) the branched block, (b) the same block in ``"merged"``
    mode (when ``bn`` is "none"/"after"), (c) its plain SGS counterpart with
    :func:`reparam.attach_sgs` (``transform="mask"``: ``G = sum M_n``, the paper's mask-sum
    where no exact mask exists; ``"preconditioner"``: ``P = J J^T``), and record after every
    step the max absolute and relative difference of the eval-mode merged kernel and bias and
    of the optimizer-visible parameters, relative to (a).

    ``steps`` must be an int >= 1 (with no step every side trivially equals the start).
    TF32 is disabled in CUDA matmuls and convolutions during the comparison (see
    :func:`verification.tolerances.full_precision`).
    """
    check_steps(steps, "compare_trajectories")
    torch.manual_seed(seed)
    block = block_factory().to(device=device, dtype=dtype).train()
    sides: dict[str, nn.Module] = {}
    if block.bn != "branch":
        sides["merged"] = copy.deepcopy(block)
        sides["merged"].mode = "merged"
    sgs = block.sgs_counterpart().train()
    sides["sgs"] = sgs
    exact_struct, struct_reasons = structural_exactness(block, transform)
    conv = sgs[0] if isinstance(sgs, nn.Sequential) else sgs
    if transform == "preconditioner":
        mask = SpatialPreconditioner(block.spatial_preconditioner())
    else:
        mask = block.sgs_mask(approximate=not exact_struct)
    constant = block.constant_kernel()

    optimizers = {"branched": optimizer_factory(block.parameters())}
    optimizers.update({name: optimizer_factory(module.parameters()) for name, module in sides.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotEquivalentWarning)
        constants = {conv.weight: constant} if constant.abs().sum() > 0 else None
        handle = attach_sgs(optimizers["sgs"], {conv.weight: mask}, mode=mode, strict=False, constant_kernels=constants)
    schedulers = {n: scheduler_factory(o) for n, o in optimizers.items()} if scheduler_factory else {}
    expected_sgs, reason = expected_verdict(block, optimizers["sgs"], mode, transform, steps)

    generator = torch.Generator().manual_seed(seed + 1)
    modules = {"branched": block, **sides}
    rows = []

    def record(step: int, losses: dict[str, float]) -> None:
        with torch.no_grad():
            ref_w, ref_b = eval_kernel(block)
            for name, module in sides.items():
                w, b = eval_kernel(module)
                k_abs, k_rel = _deviation([ref_w], [w])
                b_abs, b_rel = _deviation([ref_b], [b])
                pairs = _comparable_parameters(block, module, name)
                p_abs, p_rel = _deviation([a for a, _ in pairs], [b for _, b in pairs])
                rows.append(dict(step=step, side=name, kernel_abs=k_abs, kernel_rel=k_rel, bias_abs=b_abs,
                                 bias_rel=b_rel, params_abs=p_abs, params_rel=p_rel,
                                 loss_branched=losses.get("branched", float("nan")),
                                 loss_side=losses.get(name, float("nan"))))

    record(0, {})
    for step in range(1, steps + 1):
        x = torch.randn(batch_size, block.in_channels, *input_size, generator=generator).to(device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = None
        losses = {}
        for name, module in modules.items():
            optimizer = optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            out = module(x)
            if target is None:
                target = torch.rand(out.shape, generator=generator).to(device=device, dtype=dtype) * 1.6 - 0.8
            loss = _loss(out, target)
            loss.backward()
            optimizer.step()
            if name in schedulers:
                schedulers[name].step()
            losses[name] = loss.item()
        record(step, losses)
    handle.remove()

    frame = pd.DataFrame(rows)
    frame["max_rel"] = frame[["kernel_rel", "bias_rel", "params_rel"]].max(axis=1, skipna=True)
    frame["max_abs"] = frame[["kernel_abs", "bias_abs", "params_abs"]].max(axis=1, skipna=True)
    max_dev = {name: float(frame.loc[frame.side == name, "max_rel"].max()) for name in sides}
    approximation = {"merged": False, "sgs": not exact_struct}
    verdicts = {name: classify(max_dev[name], dtype, approximation[name]) for name in sides}
    expected = {"sgs": expected_sgs}
    reasons = {"sgs": reason}
    if "merged" in sides:
        expected["merged"] = "exact"
        reasons["merged"] = "the same parameters, one conv on the merged kernel"
    return TrajectoryResult(frame, max_dev, verdicts, expected, reasons, handle.mode)

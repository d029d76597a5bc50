"""Hypothesis strategies for reparameterization properties.

Everything here is importable by users who want to property-test their own blocks or
training loops against :func:`verification.engine.compare_trajectories`:

- :func:`conv_configs` draws ``nn.Conv2d``-style geometries (:class:`ConvConfig`);
- :func:`blocks` draws ``(factory, config)`` pairs building ACB / RepVGG / DBB blocks;
- :func:`bn_states` draws a :class:`BNState`, a deterministic randomizer of BatchNorm
  running statistics, affine parameters and the block bias;
- :func:`sgd_optimizers`, :func:`adaptive_optimizers` draw optimizer factories
  (``params -> torch.optim.Optimizer``, ``functools.partial`` objects with a readable repr);
- :func:`lr_schedules` draws ``None`` or a scheduler factory (``optimizer -> scheduler``).

All draws are small (channels <= 8, spatial <= 11) so that float64 properties run fast.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

from reparam.blocks import BLOCKS, BN_PLACEMENTS, DBB_BRANCHES, ReparamBlock
from reparam.convert.randomize import randomize_batchnorms_
from verification.optimizers import ADAPTIVE_OPTIMIZERS  # the theory's element-wise adaptive classes

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "BASE_EXAMPLES",
    "BNState",
    "ConvConfig",
    "DECOUPLED_DECAY_OPTIMIZERS",
    "accepts",
    "adaptive_optimizers",
    "blocks",
    "bn_states",
    "conv_configs",
    "examples",
    "lr_schedules",
    "sgd_optimizers",
]



def accepts(optimizer_cls: type, option: str) -> bool:
    """Whether ``optimizer_cls(...)`` takes the keyword ``option`` in the installed torch.

    Feature detection for options newer than torch 2.1: ``decoupled_weight_decay`` (Adam:
    about 2.7; NAdam, RAdam: 2.1), ``maximize`` (NAdam, RAdam: about 2.4)."""
    try:
        return option in inspect.signature(optimizer_cls.__init__).parameters
    except (TypeError, ValueError):
        return False


#: the adaptive optimizers with a decoupled weight decay in the installed torch
DECOUPLED_DECAY_OPTIMIZERS = ("AdamW",) + tuple(
    n for n in ("Adam", "NAdam", "RAdam") if accepts(getattr(torch.optim, n), "decoupled_weight_decay")
)

#: the example budget the per-test counts of :func:`examples` are written for (the ``ci``
#: hypothesis profile of this project's tests)
BASE_EXAMPLES = 25


def examples(n: int) -> int:
    """A per-test ``max_examples`` that scales with the active hypothesis profile: ``n`` under a
    profile of :data:`BASE_EXAMPLES` examples, ``n * max_examples / BASE_EXAMPLES`` under a larger
    one (e.g. 120 instead of 10 under 300), never fewer than ``n``. Evaluated when the test is
    decorated, so load the profile first (the tests' ``conftest.py`` does)."""
    return max(n, n * settings.default.max_examples // BASE_EXAMPLES)


# --------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvConfig:
    """A conv geometry plus an input size that is valid for it.

    ``padding`` is ``None`` ("same" padding, ``dilation * (k // 2)``) or an explicit pair.
    ``input_size`` is at least the receptive field ``dilation * (k - 1) + 1`` on each axis,
    so the output is non-empty even without padding.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | None = None
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    input_size: tuple[int, int] = (9, 9)

    def kwargs(self) -> dict:
        """Constructor keyword arguments shared by every block and ``nn.Conv2d``."""
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )

    @property
    def receptive_field(self) -> tuple[int, int]:
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size))  # type: ignore[return-value]

    @property
    def output_size(self) -> tuple[int, int]:
        """Spatial size of the conv output for ``input_size``."""
        padding = self.padding if self.padding is not None else tuple(
            d * (k // 2) for d, k in zip(self.dilation, self.kernel_size)
        )
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - r) // s + 1 for n, p, r, s in zip(self.input_size, padding, self.receptive_field, self.stride)
        )

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_configs(
    draw: st.DrawFn,
    max_channels: int = 8,
    kernel_sizes: Sequence[int] = (1, 3, 5, 7),
    square: bool | None = None,
    strides: Sequence[int] = (1, 2),
    dilations: Sequence[int] = (1, 2),
    max_input: int = 11,
    same_channels: bool = False,
    stride_one: bool = False,
    explicit_padding: bool = True,
    over_padding: bool = False,
    min_kernel: int = 1,
) -> ConvConfig:
    """A valid conv geometry (see :class:`ConvConfig`).

    - channels in ``[1, max_channels]``; ``same_channels`` forces ``in == out``;
    - kernel sides odd from ``kernel_sizes`` (>= ``min_kernel``), square or not
      (``square=None`` draws both);
    - stride 1–2 (``stride_one`` forces 1), dilation 1–2 per axis, restricted so that the
      receptive field fits in ``max_input``;
    - groups: 1, a grouped divisor of both channel counts, or depthwise (``in == out == groups``);
    - padding ``None`` or an explicit pair in ``[0, dilation * (k // 2)]`` (``over_padding``:
      up to one more, which exercises positive branch padding but can give outputs that
      see only padding, e.g. a 1x1 kernel with stride 2 on a 1-wide input, so some weights
      get no gradient at all);
    - input size odd or even, from the receptive field up to ``max_input``.
    """
    sizes = [k for k in kernel_sizes if k % 2 == 1 and k >= min_kernel and k <= max_input]
    kind = draw(st.sampled_from(["depthwise", "grouped", "dense"]))
    if kind == "depthwise":
        c = draw(st.integers(2, max_channels))
        cin = cout = groups = c
    else:
        cin = draw(st.integers(1, max_channels))
        cout = cin if same_channels else draw(st.integers(1, max_channels))
        common = [d for d in _divisors(math.gcd(cin, cout)) if d > 1]
        groups = draw(st.sampled_from(common)) if kind == "grouped" and common else 1
    kh = draw(st.sampled_from(sizes))
    is_square = draw(st.booleans()) if square is None else square
    kw = kh if is_square else draw(st.sampled_from(sizes))
    dilation = tuple(
        draw(st.sampled_from([d for d in dilations if d * (k - 1) + 1 <= max_input] or [1])) for k in (kh, kw)
    )
    stride = (1, 1) if stride_one else (draw(st.sampled_from(strides)), draw(st.sampled_from(strides)))
    padding = None
    if explicit_padding and draw(st.booleans()):
        extra = 1 if over_padding else 0
        padding = tuple(draw(st.integers(0, d * (k // 2) + extra)) for d, k in zip(dilation, (kh, kw)))
    input_size = tuple(draw(st.integers(d * (k - 1) + 1, max_input)) for d, k in zip(dilation, (kh, kw)))
    return ConvConfig(cin, cout, (kh, kw), stride, padding, dilation, groups, input_size)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# blocks and BatchNorm state
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BNState:
    """Deterministically randomizes a block's BatchNorm state (running mean/var, gamma,
    beta, every BN in the block) and its bias (``bn="none"``). Call it on a block; it
    returns the block. ``eps`` of every BN is set too (a non-default eps catches fusions
    that hard-code 1e-5)."""

    seed: int
    mean_scale: float = 1.0
    var_range: tuple[float, float] = (0.2, 3.0)
    affine_scale: float = 1.0
    eps: float = 1e-5

    @torch.no_grad()
    def __call__(self, block: nn.Module) -> nn.Module:
        gen = torch.Generator().manual_seed(self.seed)
        randomize_batchnorms_(block, gen, self.mean_scale, self.var_range, 0.5 * self.affine_scale, self.affine_scale, self.eps)
        bias = getattr(block, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape, generator=gen, dtype=torch.float64).to(bias.dtype) * self.affine_scale)
        return block


def bn_states() -> st.SearchStrategy[BNState]:
    """A :class:`BNState`: random seed, mean scale, variance range, affine scale and eps."""
    return st.builds(
        BNState,
        seed=st.integers(0, 2**31 - 1),
        mean_scale=st.sampled_from([0.1, 1.0, 3.0]),
        var_range=st.sampled_from([(0.2, 3.0), (0.01, 0.5), (1.0, 10.0)]),
        affine_scale=st.sampled_from([0.5, 1.0, 2.0]),
        eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    )


@dataclass(frozen=True)
class BlockFactory:
    """``factory()`` builds a fresh block (parameters drawn from torch's global RNG, so
    ``torch.manual_seed`` before the call makes it reproducible), then applies ``state``
    (a :class:`BNState`) if given. Picklable, with a readable repr for hypothesis output."""

    block_type: str
    config: ConvConfig
    bn: str
    mode: str = "branched"
    dbb_branches: tuple[str, ...] = DBB_BRANCHES
    state: BNState | None = None

    @property
    def cls(self) -> type[ReparamBlock]:
        return BLOCKS[self.block_type]

    def __call__(self) -> ReparamBlock:
        extra = {"branches": self.dbb_branches} if self.block_type == "dbb" else {}
        block = self.cls(**self.config.kwargs(), bn=self.bn, mode=self.mode, **extra)
        if self.state is not None:
            self.state(block)
        return block


@st.composite
def blocks(
    draw: st.DrawFn,
    block_types: Sequence[str] = tuple(BLOCKS),
    bn: Sequence[str] = BN_PLACEMENTS,
    configs: st.SearchStrategy[ConvConfig] | None = None,
    dbb_branches: Sequence[tuple[str, ...]] | None = None,
    states: st.SearchStrategy[BNState | None] | None = None,
) -> tuple[BlockFactory, ConvConfig]:
    """``(factory, config)``: a :class:`BlockFactory` for a drawn block type, BN placement
    and geometry (default :func:`conv_configs`).

    ``dbb_branches``: the DBB branch subsets to draw from (default: all four branches).
    ``states``: a strategy of :class:`BNState` (or None) applied after construction
    (default: no randomization; pass ``bn_states()``).
    """
    config = draw(configs if configs is not None else conv_configs())
    block_type = draw(st.sampled_from(list(block_types)))
    placement = draw(st.sampled_from(list(bn)))
    branches = DBB_BRANCHES
    if block_type == "dbb" and dbb_branches:
        branches = tuple(draw(st.sampled_from(list(dbb_branches))))
    state = draw(states) if states is not None else None
    return BlockFactory(block_type, config, placement, "branched", branches, state), config


# --------------------------------------------------------------------------------------
# optimizers and schedules
# --------------------------------------------------------------------------------------
_lrs = st.sampled_from([1e-3, 1e-2, 0.05, 0.1, 0.3])


@st.composite
def sgd_optimizers(
    draw: st.DrawFn, weight_decay: bool | None = None, lr: st.SearchStrategy[float] | None = None
) -> functools.partial:
    """``functools.partial(torch.optim.SGD, ...)``: lr, momentum (0 or in (0, 0.95]),
    dampening, Nesterov (only with momentum > 0 and dampening 0), weight decay
    (``weight_decay=True`` forces > 0, ``False`` forces 0), maximize."""
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9, 0.95]))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov or momentum == 0 else draw(st.sampled_from([0.0, 0.1, 0.5]))
    if weight_decay is None:
        wd = draw(st.sampled_from([0.0, 1e-3, 1e-2, 0.1]))
    else:
        wd = draw(st.sampled_from([1e-2, 0.05, 0.1])) if weight_decay else 0.0
    return functools.partial(
        torch.optim.SGD,
        lr=draw(lr if lr is not None else _lrs),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=wd,
        maximize=draw(st.booleans()),
    )


_betas = st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99), (0.95, 0.95)])
_eps = st.sampled_from([1e-8, 1e-6, 1e-3])
_small_lrs = st.sampled_from([1e-3, 1e-2, 0.05])


def _own_hyperparameters(draw: st.DrawFn, name: str, eps_st: st.SearchStrategy[float], strongly_adaptive: bool) -> dict:
    """The hyperparameters specific to the adaptive optimizer ``name`` (see :func:`adaptive_optimizers`)."""
    kw: dict = {}
    if name in ("Adam", "AdamW"):
        kw.update(betas=draw(_betas), eps=draw(eps_st), amsgrad=draw(st.booleans()))
    elif name == "Adamax":
        kw.update(betas=draw(_betas), eps=draw(eps_st))
    elif name == "NAdam":
        kw.update(betas=draw(_betas), eps=draw(eps_st), momentum_decay=draw(st.sampled_from([4e-3, 1e-2])))
    elif name == "RAdam":
        kw.update(betas=draw(_betas), eps=draw(eps_st))
    elif name == "Adagrad":
        kw.update(
            lr_decay=draw(st.sampled_from([0.0, 0.1])),
            initial_accumulator_value=0.0 if strongly_adaptive else draw(st.sampled_from([0.0, 0.1])),
            eps=draw(eps_st if strongly_adaptive else st.sampled_from([1e-10, 1e-6])),
        )
    elif name == "RMSprop":
        kw.update(
            alpha=draw(st.sampled_from([0.99, 0.9])),
            eps=draw(eps_st),
            centered=draw(st.booleans()),
            momentum=draw(st.sampled_from([0.0, 0.5, 0.9])),
        )
    elif name == "Adadelta":
        kw.update(lr=draw(st.sampled_from([0.5, 1.0])), rho=draw(st.sampled_from([0.9, 0.5])), eps=draw(eps_st))
    return kw


@st.composite
def adaptive_optimizers(
    draw: st.DrawFn,
    names: Sequence[str] = ADAPTIVE_OPTIMIZERS,
    weight_decay: bool | None = None,
    coupled_weight_decay: bool = False,
    lr: st.SearchStrategy[float] | None = None,
    strongly_adaptive: bool = False,
) -> functools.partial:
    """A factory for one of the element-wise adaptive optimizers with drawn hyperparameters.

    By default (``coupled_weight_decay=False``) the only weight decay is decoupled: AdamW's,
    and Adam / NAdam / RAdam with ``decoupled_weight_decay=True`` where the installed torch
    has it (:data:`DECOUPLED_DECAY_OPTIMIZERS`); the others get none. ``maximize`` is drawn
    where the optimizer takes it (:func:`accepts`). With
    ``coupled_weight_decay=True`` the optimizer is restricted to those with an L2 option and
    gets a coupled ``weight_decay > 0`` (a negative control: no SGS mode is exact).
    ``weight_decay=True/False`` forces decoupled decay on / off where it exists.

    ``strongly_adaptive=True`` keeps every optimizer far from its linear regime (tiny
    ``eps``, no Adagrad initial accumulator): with a large ``eps`` (or accumulator) relative
    to the gradients an adaptive step is almost ``lr * g / eps``, i.e. almost SGD, and the
    negative controls would hardly diverge. ``lr`` overrides the learning-rate strategy
    (Adadelta's lr is always drawn from {0.5, 1}).
    """
    if coupled_weight_decay:
        names = [n for n in names if n != "AdamW"]
    name = draw(st.sampled_from(list(names)))
    lr = draw(lr if lr is not None else _small_lrs)
    eps_st = st.sampled_from([1e-10, 1e-12]) if strongly_adaptive else _eps
    if weight_decay is None:
        wd = draw(st.sampled_from([0.0, 1e-2, 0.1]))
    else:
        wd = draw(st.sampled_from([1e-2, 0.1])) if weight_decay else 0.0
    cls = getattr(torch.optim, name)
    kw: dict = {"lr": lr}
    if accepts(cls, "maximize"):
        kw["maximize"] = draw(st.booleans())
    kw.update(_own_hyperparameters(draw, name, eps_st, strongly_adaptive))
    if coupled_weight_decay:
        kw["weight_decay"] = draw(st.sampled_from([0.05, 0.1, 0.3]))
    elif name == "AdamW":
        kw["weight_decay"] = wd
    elif name in ("Adam", "NAdam", "RAdam") and wd and accepts(cls, "decoupled_weight_decay"):
        kw.update(weight_decay=wd, decoupled_weight_decay=True)
    return functools.partial(getattr(torch.optim, name), **kw)


@dataclass(frozen=True)
class _PolyDecay:
    """``lr_lambda`` for LambdaLR: ``(1 + step)^-power`` (picklable, readable repr)."""

    power: float

    def __call__(self, step: int) -> float:
        return (1.0 + step) ** -self.power


@dataclass(frozen=True)
class SchedulerFactory:
    """``factory(optimizer)`` builds ``cls(optimizer, **kwargs)``; readable repr."""

    cls: type
    kwargs: dict = field(default_factory=dict, hash=False)

    def __call__(self, optimizer: torch.optim.Optimizer):
        return self.cls(optimizer, **self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}({args})"


def lr_schedules(allow_none: bool = True) -> st.SearchStrategy[Callable | None]:
    """``None`` or a scheduler factory: StepLR, ExponentialLR, CosineAnnealingLR, LambdaLR."""
    sched = torch.optim.lr_scheduler
    options = [
        st.builds(
            lambda s, g: SchedulerFactory(sched.StepLR, {"step_size": s, "gamma": g}),
            st.integers(1, 4),
            st.sampled_from([0.1, 0.5, 0.9]),
        ),
        st.builds(lambda g: SchedulerFactory(sched.ExponentialLR, {"gamma": g}), st.sampled_from([0.5, 0.8, 0.99])),
        st.builds(
            lambda t, m: SchedulerFactory(sched.CosineAnnealingLR, {"T_max": t, "eta_min": m}),
            st.integers(2, 10),
            st.sampled_from([0.0, 1e-4]),
        ),
        st.builds(
            lambda p: SchedulerFactory(sched.LambdaLR, {"lr_lambda": _PolyDecay(p)}), st.sampled_from([0.5, 1.0])
        ),
    ]
    if allow_none:
        options.insert(0, st.none())
    return st.one_of(*options)

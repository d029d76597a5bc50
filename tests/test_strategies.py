"""The hypothesis strategies run on every torch the project supports (>= 2.1) and the
per-test example counts follow the hypothesis profile."""
from __future__ import annotations

import inspect
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verification.strategies import BASE_EXAMPLES, accepts, adaptive_optimizers, examples, sgd_optimizers

#: keywords that torch 2.1 does not have yet (newer: Adam's decoupled decay, NAdam / RAdam maximize)
MISSING_IN_TORCH_2_1 = {"Adam": ("decoupled_weight_decay",), "NAdam": ("maximize",), "RAdam": ("maximize",)}


def as_in_older_torch(cls: type, missing: tuple[str, ...]) -> type:
    """``cls`` with the constructor signature of an older torch: ``missing`` keywords raise
    ``TypeError`` as an unknown keyword does, and ``inspect.signature`` does not show them."""
    signature = inspect.signature(cls.__init__)

    def __init__(self, params, **kwargs):
        unknown = [k for k in kwargs if k in missing]
        if unknown:
            raise TypeError(f"__init__() got an unexpected keyword argument {unknown[0]!r}")
        cls.__init__(self, params, **kwargs)

    __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in signature.parameters.items() if name not in missing]
    )
    return type(cls.__name__, (cls,), {"__init__": __init__})


def test_accepts_detects_constructor_keywords():
    assert accepts(torch.optim.SGD, "maximize") and accepts(torch.optim.AdamW, "weight_decay")
    assert not accepts(torch.optim.Adagrad, "decoupled_weight_decay")
    assert not accepts(as_in_older_torch(torch.optim.NAdam, ("maximize",)), "maximize")


@pytest.mark.parametrize("weight_decay", [None, True])
def test_optimizer_strategies_only_use_options_the_installed_torch_has(monkeypatch, weight_decay):
    for name, missing in MISSING_IN_TORCH_2_1.items():
        monkeypatch.setattr(torch.optim, name, as_in_older_torch(getattr(torch.optim, name), missing))

    @given(factory=st.one_of(adaptive_optimizers(weight_decay=weight_decay), sgd_optimizers()))
    @settings(max_examples=examples(40))
    def build(factory):
        optimizer = factory([torch.nn.Parameter(torch.zeros(2))])
        if type(optimizer).__name__ == "Adam":
            assert not optimizer.param_groups[0].get("decoupled_weight_decay", False)

    build()


def test_examples_scale_with_the_profile():
    assert examples(10) >= 10
    ratio = settings.default.max_examples / BASE_EXAMPLES
    assert examples(10) == max(10, int(10 * ratio))
    settings.register_profile("_examples_probe", max_examples=300)  # as the "thorough" profile
    settings.load_profile("_examples_probe")
    try:
        assert examples(10) == 120 and examples(15) == 180
    finally:
        settings.load_profile(os.environ.get("REPARAM_HYPOTHESIS_PROFILE", "ci"))
    assert examples(10) == max(10, int(10 * ratio))


def test_one_table_of_optimizer_cases_agrees_with_the_theory():
    """The suite's cases, the strategies' names and the verdict theory share one source."""
    from reparam.sgs.theory import ELEMENTWISE_ADAPTIVE, SGD_FAMILY
    from verification import strategies
    from verification.optimizers import ELEMENTWISE, LINEAR, OPTIMIZERS

    assert tuple(c.__name__ for c in ELEMENTWISE_ADAPTIVE) == strategies.ADAPTIVE_OPTIMIZERS
    covered = {case.cls for case in OPTIMIZERS}
    assert covered >= set(SGD_FAMILY) | set(ELEMENTWISE_ADAPTIVE)  # every theory class is exercised
    for case in OPTIMIZERS:
        assert case.theory_class == (LINEAR if case.cls in SGD_FAMILY else ELEMENTWISE), case.name


def test_block_names_come_from_the_blocks_registry():
    from reparam.blocks import BLOCKS
    from verification import engine, strategies

    assert not hasattr(strategies, "BLOCK_TYPES")
    factory = strategies.BlockFactory("repvgg", strategies.ConvConfig(2, 2, (3, 3)), "none")
    assert factory.cls is BLOCKS["repvgg"]
    assert not hasattr(engine, "BlockFactory")  # the engine's type alias has its own name
    assert not hasattr(strategies.ConvConfig, "has_identity") and not hasattr(strategies.BlockFactory, "with_state")

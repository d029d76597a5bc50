"""The core equivalence properties, checked on whole training trajectories.

A block trained branch by branch and its single conv trained with SGS (``attach_sgs``) must
follow the same trajectory (verdict "exact": max relative deviation <= ``EXACT_TOL`` in float64,
every side moved >= ``min_movement``) wherever theory says so, and must visibly drift apart
(deviation >= ``DIVERGENCE_FLOOR``) in the negative controls. The merged-mode twin (same
parameters, one conv) is always exact.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verification.engine import compare_trajectories
from verification.strategies import (
    DECOUPLED_DECAY_OPTIMIZERS,
    BlockFactory,
    ConvConfig,
    accepts,
    adaptive_optimizers,
    blocks,
    bn_states,
    conv_configs,
    examples,
    lr_schedules,
    sgd_optimizers,
)
from verification.verdicts import DIVERGENCE_FLOOR, EXACT_TOL, min_movement

TOL = EXACT_TOL[torch.float64]
FLOOR = DIVERGENCE_FLOOR[torch.float64]
MOVED = min_movement(torch.float64)
assert TOL <= 1e-10 and FLOOR >= 1e-6

def well_conditioned(config) -> bool:
    """Training-mode BatchNorm over very few values (batch 2 x a 1x1 output: outputs +-1 with a
    gradient ~ 1 / |x1 - x2|) amplifies rounding chaotically, so even the merged twin drifts
    past 1e-10. Keep at least 4 output positions (>= 8 values per channel)."""
    h, w = config.output_size
    return h * w >= 4


small_configs = conv_configs(max_channels=4, max_input=9).filter(well_conditioned)
# DBB's average branch is a plain mask when the kernel is 1x1; keep it a real KxK window.
dbb_configs = conv_configs(max_channels=4, max_input=9, min_kernel=3).filter(well_conditioned)
identity_configs = conv_configs(max_channels=4, max_input=9, same_channels=True, stride_one=True).filter(
    well_conditioned
)
mask_blocks = blocks(block_types=("acb", "repvgg"), bn=("none", "after"), configs=small_configs, states=bn_states())
steps_st = st.integers(2, 8)
batch_st = st.integers(2, 3)  # training-mode BatchNorm needs > 1 value per channel (1x1 outputs)


def run(factory: BlockFactory, optimizer, steps: int, batch: int = 2, **kwargs):
    return compare_trajectories(
        factory, optimizer, steps=steps, dtype=torch.float64, batch_size=batch,
        input_size=factory.config.input_size, **kwargs,
    )


def negative_steps(optimizer, steps: int) -> int:
    """RAdam's first steps (rho_t <= 5, steps 1-6 for every beta2) are its un-rectified,
    SGD-with-momentum form, which *is* linear in the gradient: the grad-mode controls
    only diverge once the rectified, adaptive update starts."""
    return max(steps, 8) if optimizer.func is torch.optim.RAdam else steps


def assert_merged_exact(result) -> None:
    if "merged" in result.verdicts:
        assert result.verdicts["merged"] == "exact"
        assert result.max_deviation["merged"] <= TOL


def assert_exact(result) -> None:
    assert result.expected["sgs"] == "exact", result.reasons
    assert result.verdicts["sgs"] == "exact", (result.max_deviation, result.reasons)
    assert result.max_deviation["sgs"] <= TOL
    assert_merged_exact(result)
    assert result.matches
    # the trajectory really moved: every compared side left its start by far more than the
    # tolerance, so the comparison is not vacuous
    first = result.frame[(result.frame.side == "sgs") & (result.frame.step == 1)]
    assert len(first) == 1 and len(result.frame) == len(result.verdicts) * (result.frame.step.max() + 1)
    for side in (*result.verdicts, "branched"):
        assert result.moved[side][1] >= MOVED, (side, result.moved)


def assert_not_exact(result, verdict: str) -> None:
    assert result.expected["sgs"] == verdict, result.reasons
    assert result.verdicts["sgs"] == verdict, result.max_deviation
    assert result.max_deviation["sgs"] >= FLOOR
    assert_merged_exact(result)
    assert result.matches


# -- positive properties -------------------------------------------------------------------------
@given(drawn=mask_blocks, optimizer=sgd_optimizers(), schedule=lr_schedules(), steps=steps_st, batch=batch_st,
       seed=st.integers(0, 1000))
def test_sgd_family_is_exact(drawn, optimizer, schedule, steps, batch, seed):
    factory, _ = drawn
    result = run(factory, optimizer, steps, batch, seed=seed, scheduler_factory=schedule)
    assert_exact(result)


@given(drawn=mask_blocks, optimizer=adaptive_optimizers(), schedule=lr_schedules(), steps=steps_st, batch=batch_st,
       seed=st.integers(0, 1000))
def test_adaptive_optimizers_are_exact_in_update_mode(drawn, optimizer, schedule, steps, batch, seed):
    factory, _ = drawn
    result = run(factory, optimizer, steps, batch, seed=seed, scheduler_factory=schedule)
    assert_exact(result)


@given(
    drawn=blocks(block_types=("repvgg",), bn=("none", "after"), configs=identity_configs, states=bn_states()),
    optimizer=st.one_of(
        sgd_optimizers(weight_decay=True),
        adaptive_optimizers(names=[n for n in DECOUPLED_DECAY_OPTIMIZERS if n != "Adam"], weight_decay=True),
    ),
    schedule=lr_schedules(),
    steps=steps_st,
)
def test_repvgg_identity_with_weight_decay_is_exact(drawn, optimizer, schedule, steps):
    """Weight decay on the branches pulls W toward the identity kernel C, not toward 0."""
    factory, _ = drawn
    block = factory()
    assert "identity" in block.branches and block.constant_kernel().abs().sum() > 0
    assert optimizer.keywords["weight_decay"] > 0
    result = run(factory, optimizer, steps, scheduler_factory=schedule)
    assert_exact(result)


@given(drawn=blocks(block_types=("acb", "repvgg"), bn=("none", "after"), configs=small_configs),
       optimizer=st.one_of(sgd_optimizers(), adaptive_optimizers()))
@settings(max_examples=examples(10))
def test_channels_last_is_exact(drawn, optimizer):
    factory, _ = drawn
    assert_exact(run(factory, optimizer, 4, channels_last=True))


@given(
    config=small_configs,
    bn=st.sampled_from(["none", "after"]),
    optimizer=sgd_optimizers(),
    schedule=lr_schedules(),
    steps=steps_st,
)
def test_dbb_linear_preconditioner_is_exact(config, bn, optimizer, schedule, steps):
    factory = BlockFactory("dbb", config, bn, dbb_branches=("kxk", "1x1", "1x1_avg"))
    result = run(factory, optimizer, steps, transform="preconditioner", scheduler_factory=schedule)
    assert_exact(result)


# -- negative controls ------------------------------------------------------------------------------
big_lrs = st.sampled_from([0.05, 0.1, 0.3])
#: adaptive optimizers away from their near-linear regime (see adaptive_optimizers)
strongly_adaptive = functools.partial(adaptive_optimizers, lr=st.sampled_from([1e-2, 0.05]), strongly_adaptive=True)


@given(drawn=mask_blocks, optimizer=strongly_adaptive(), steps=steps_st)
def test_adaptive_optimizers_in_grad_mode_diverge(drawn, optimizer, steps):
    """The SGS paper's order (scale the gradient, then the adaptive step) is not exact."""
    factory, _ = drawn
    assert_not_exact(run(factory, optimizer, negative_steps(optimizer, steps), mode="grad"), "diverges")


@given(drawn=mask_blocks, optimizer=sgd_optimizers(weight_decay=True, lr=big_lrs), steps=steps_st)
def test_sgd_with_weight_decay_in_update_mode_diverges(drawn, optimizer, steps):
    factory, _ = drawn
    assert_not_exact(run(factory, optimizer, steps, mode="update"), "diverges")


@given(drawn=mask_blocks, optimizer=strongly_adaptive(coupled_weight_decay=True), steps=steps_st)
def test_adaptive_with_coupled_weight_decay_diverges(drawn, optimizer, steps):
    """No mode is exact; "auto" falls back to grad mode (strict=False)."""
    factory, _ = drawn
    assert optimizer.keywords["weight_decay"] > 0
    assert_not_exact(run(factory, optimizer, negative_steps(optimizer, steps), mode="auto"), "diverges")


@given(
    drawn=mask_blocks,
    # Adadelta's first steps are ~sqrt(eps) small, so the decay mismatch stays below the
    # divergence floor for a few steps; it is covered by the grad-mode control above.
    optimizer=strongly_adaptive(names=("Adam", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop"),
                                coupled_weight_decay=True),
    steps=st.integers(6, 8),
)
def test_adaptive_with_coupled_weight_decay_diverges_in_update_mode(drawn, optimizer, steps):
    """Update mode alone would be exact; the coupled L2 term inside the adaptive step is not.
    The first step of the Adam family is ``lr * sign(g + wd theta_n)``, the same for every
    branch unless the decay flips a sign, so the mismatch needs a few steps to show."""
    factory, _ = drawn
    assert_not_exact(run(factory, optimizer, steps, mode="update"), "diverges")


@given(
    drawn=blocks(bn=("branch",), configs=small_configs, states=bn_states()),
    optimizer=st.one_of(sgd_optimizers(lr=big_lrs), strongly_adaptive()),
    steps=steps_st,
)
@settings(max_examples=examples(15))
def test_batchnorm_inside_branches_is_approximate(drawn, optimizer, steps):
    factory, _ = drawn
    result = run(factory, optimizer, steps)
    assert "merged" not in result.verdicts
    assert_not_exact(result, "approximate")


@given(
    config=dbb_configs,
    bn=st.sampled_from(["none", "after"]),
    branches=st.sampled_from([("kxk", "1x1", "1x1_kxk", "1x1_avg"), ("kxk", "1x1_kxk"), ("kxk", "1x1", "1x1_avg")]),
    optimizer=st.one_of(sgd_optimizers(lr=big_lrs), strongly_adaptive()),
    steps=steps_st,
)
@settings(max_examples=examples(15))
def test_dbb_mask_sum_is_approximate(config, bn, branches, optimizer, steps):
    """The SGS paper's mask-sum for DBB (non-mask branches counted as full windows)."""
    factory = BlockFactory("dbb", config, bn, dbb_branches=branches)
    assert_not_exact(run(factory, optimizer, steps), "approximate")


@given(config=dbb_configs, optimizer=sgd_optimizers(lr=big_lrs), steps=steps_st)
@settings(max_examples=examples(15))
def test_dbb_preconditioner_beats_mask_sum(config, optimizer, steps):
    """Same DBB (no sequential branch), same SGD: P = J J^T is exact, the mask-sum is not."""
    factory = BlockFactory("dbb", config, "none", dbb_branches=("kxk", "1x1", "1x1_avg"))
    exact = run(factory, optimizer, steps, transform="preconditioner")
    approx = run(factory, optimizer, steps, transform="mask")
    assert_exact(exact)
    assert_not_exact(approx, "approximate")
    assert approx.max_deviation["sgs"] > 1e4 * exact.max_deviation["sgs"]


@given(config=dbb_configs, optimizer=strongly_adaptive(), steps=steps_st)
@settings(max_examples=examples(10))
def test_dbb_preconditioner_with_adaptive_optimizer_diverges(config, optimizer, steps):
    """A non-diagonal P has no element-wise update form: adaptive optimizers are not exact."""
    factory = BlockFactory("dbb", config, "none", dbb_branches=("kxk", "1x1", "1x1_avg"))
    steps = negative_steps(optimizer, steps)
    assert_not_exact(run(factory, optimizer, steps, transform="preconditioner"), "diverges")


# -- fixed regression anchors (the numbers of the notes, at small scale) ------------------------------
def test_acb_adam_grad_vs_update_anchor():
    factory = BlockFactory("acb", ConvConfig(4, 4, (3, 3), input_size=(7, 7)), "none")
    opt = functools.partial(torch.optim.Adam, lr=0.01)
    exact = run(factory, opt, 8, mode="update")
    wrong = run(factory, opt, 8, mode="grad")
    assert_exact(exact)
    assert_not_exact(wrong, "diverges")
    assert wrong.max_deviation["sgs"] > 1e-2


def test_repvgg_identity_weight_decay_anchor():
    factory = BlockFactory("repvgg", ConvConfig(4, 4, (3, 3), input_size=(7, 7)), "none")
    opt = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.05)
    result = run(factory, opt, 8)
    assert_exact(result)


@pytest.mark.parametrize("cls", ["acb", "repvgg"])
def test_channels_last_anchor(cls):
    factory = BlockFactory(cls, ConvConfig(4, 4, (3, 3), input_size=(8, 8)), "after")
    opt = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    assert_exact(run(factory, opt, 6, channels_last=True))


# -- RAdam's warm-up and DBB's 1x1 average branch ----------------------------------------------------
@given(drawn=mask_blocks, optimizer=strongly_adaptive(names=("RAdam",), weight_decay=False), steps=st.integers(1, 5))
@settings(max_examples=examples(10))
def test_radam_warmup_is_exact_in_grad_mode(drawn, optimizer, steps):
    """RAdam's first steps (rho_t <= 5: t <= 5 for every beta2 drawn) are its un-rectified,
    SGD-with-momentum form, linear in the gradient: the SGS paper's order is exact there."""
    factory, _ = drawn
    assert_exact(run(factory, optimizer, steps, mode="grad"))


def test_dbb_1x1_kernel_average_branch_is_a_mask():
    """With a 1x1 kernel the 1x1 -> average branch is a 1x1 mask: SGS with the mask is exact."""
    factory = BlockFactory("dbb", ConvConfig(4, 4, (1, 1), input_size=(5, 5)), "none", dbb_branches=("kxk", "1x1", "1x1_avg"))
    block = factory()
    assert torch.equal(block.sgs_mask(), torch.tensor([[3.0]]))
    assert_exact(run(factory, functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), 4))


# -- RAdam's un-rectified warm-up (rho_t <= 5) is linear in the decayed gradient -----------------
def test_radam_warmup_with_coupled_weight_decay_is_exact_in_grad_mode():
    """Warm-up steps are bias-corrected momentum of ``G g + wd (W - C)``, as for SGD; the
    rectified steps that follow are adaptive, and the same grad mode then diverges."""
    factory = BlockFactory("acb", ConvConfig(4, 4, (3, 3), input_size=(7, 7)), "none")
    optimizer = functools.partial(torch.optim.RAdam, lr=0.01, weight_decay=0.1)
    assert_exact(run(factory, optimizer, 5, mode="grad"))
    later = run(factory, optimizer, 10, mode="grad")
    assert later.expected["sgs"] == later.verdicts["sgs"] == "diverges", later.max_deviation
    assert later.max_deviation["sgs"] >= FLOOR


@pytest.mark.skipif(not accepts(torch.optim.RAdam, "decoupled_weight_decay"), reason="RAdam without decoupled decay")
def test_radam_warmup_decoupled_decay_pulls_toward_constant_kernel():
    """RepVGG's identity (C != 0) under decoupled decay in grad mode: the branches decay
    ``W - C``, so the SGS conv must too (without the correction: ~3e-3 after 3 steps)."""
    factory = BlockFactory("repvgg", ConvConfig(4, 4, (3, 3), input_size=(7, 7)), "none")
    optimizer = functools.partial(torch.optim.RAdam, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    assert_exact(run(factory, optimizer, 3, mode="grad"))


# -- the engine's own guards ------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [0, -1, True, 2.0])
def test_steps_must_be_at_least_one(steps):
    """With no step every side equals its start: a negative control would read "exact"."""
    factory = BlockFactory("acb", ConvConfig(2, 2, (3, 3), input_size=(5, 5)), "none")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        compare_trajectories(factory, functools.partial(torch.optim.Adam, lr=0.01), steps=steps, mode="grad")


def test_comparison_disables_tf32_and_restores_it():
    """TF32 (CUDA matmul and cuDNN conv) rounds at ~1e-3: the engine turns it off itself for
    the duration of a comparison, whoever calls it, and restores the caller's settings."""
    seen = []
    inner = BlockFactory("acb", ConvConfig(2, 2, (3, 3), input_size=(5, 5)), "none")

    def factory():
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return inner()

    previous = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    try:
        compare_trajectories(factory, functools.partial(torch.optim.SGD, lr=0.1), steps=1)
        assert seen == [(False, False)]
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
        with pytest.raises(ZeroDivisionError):  # restored when the comparison fails, too
            compare_trajectories(lambda: 1 / 0, functools.partial(torch.optim.SGD, lr=0.1), steps=1)
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


# -- evidence, not vacuity: non-finite steps and trajectories that never moved -----------------------
def test_a_nan_at_one_step_is_never_exact():
    """The SGS side goes NaN at step 7 of 12: steps 1-6 were exact, but the verdict must not be
    (pandas' NaN-skipping max used to drop the NaN steps and report "exact")."""
    made = []

    def poisoned_sgd(params):
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        made.append(optimizer)
        if len(made) == 3:  # branched, merged, then the SGS conv's optimizer

            def poison(opt, args, kwargs):
                if opt.state_dict()["state"] and len(poison.calls) == 6:
                    with torch.no_grad():
                        opt.param_groups[0]["params"][0].view(-1)[0] = float("nan")
                poison.calls.append(1)

            poison.calls = []
            optimizer.register_step_post_hook(poison)
        return optimizer

    factory = BlockFactory("acb", ConvConfig(4, 4, (3, 3), input_size=(7, 7)), "none")
    result = compare_trajectories(factory, poisoned_sgd, steps=12)
    sgs = result.frame[result.frame.side == "sgs"].set_index("step")
    assert sgs.loc[6, "max_rel"] <= TOL and sgs.loc[7, "max_rel"] == float("inf")
    assert result.max_deviation["sgs"] == float("inf")
    assert result.verdicts["sgs"] == "diverges" and not result.matches
    assert result.verdicts["merged"] == "exact"


@pytest.mark.parametrize("optimizer", [
    functools.partial(torch.optim.SGD, lr=0.0, momentum=0.9),
    functools.partial(torch.optim.Adam, lr=0.0),
    functools.partial(torch.optim.SGD, lr=1e-13),
])
def test_a_trajectory_that_did_not_move_is_inconclusive(optimizer):
    """With lr = 0 (or too small to move beyond the tolerance) every mask looks exact: the
    verdict is "inconclusive" (it never matches), and the movement is reported."""
    factory = BlockFactory("acb", ConvConfig(4, 4, (3, 3), input_size=(7, 7)), "none")
    result = compare_trajectories(factory, optimizer, steps=4)
    assert result.max_deviation["sgs"] <= TOL
    assert result.verdicts == {"merged": "inconclusive", "sgs": "inconclusive"} and not result.matches
    assert result.moved["sgs"][1] < MOVED and result.moved["branched"][1] < MOVED
    assert {"moved_abs", "moved_rel", "ref_moved_abs", "ref_moved_rel"} <= set(result.frame.columns)


def test_the_old_call_form_and_the_config_object_agree():
    from verification.engine import TrajectoryConfig

    factory = BlockFactory("repvgg", ConvConfig(4, 4, (3, 3), input_size=(7, 7)), "after")
    optimizer = functools.partial(torch.optim.Adam, lr=0.01)
    old = compare_trajectories(factory, optimizer, steps=3, mode="update", seed=2)
    config = TrajectoryConfig(steps=3, mode="update", seed=2)
    new = compare_trajectories(factory, optimizer, config)
    assert old.max_deviation == new.max_deviation and old.verdicts == new.verdicts == {"merged": "exact", "sgs": "exact"}
    assert compare_trajectories(factory, optimizer, config, steps=4).frame.step.max() == 4

"""The one lock-step comparer and its deviation / movement measures."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from verification.lockstep import Side, deviation, movement, run_lockstep, snapshot, worst


def test_worst_propagates_non_finite_values():
    assert worst([1.0, 3.0, 2.0]) == 3.0 and worst([]) == 0.0
    assert worst([1.0, math.nan, 2.0]) == math.inf  # max() and pandas' max would give 2.0
    assert worst([math.nan]) == math.inf and worst([2.0, -math.inf]) == math.inf


def test_deviation_is_max_abs_and_relative_and_never_finite_on_nan():
    a, b = [torch.tensor([1.0, -4.0]), torch.tensor([0.5])], [torch.tensor([1.5, -4.0]), torch.tensor([0.25])]
    assert deviation(a, b) == (0.5, 0.5 / 4.0)
    assert deviation(a, b, per_tensor=True) == (0.5, 0.5)  # 0.25 / 0.5 on the small tensor
    for bad in (math.nan, math.inf):
        assert deviation(a, [b[0], torch.tensor([bad])]) == (math.inf, math.inf)
        assert deviation([a[0], torch.tensor([bad])], [a[0], torch.tensor([bad])]) == (math.inf, math.inf)
    assert deviation([torch.zeros(2)], [torch.tensor([0.0, 0.5])]) == (0.5, 0.5)  # zero scale counts as 1
    with pytest.raises(ValueError, match="non-empty"):
        deviation([], [])


def _side(name: str, lr: float, **kwargs) -> Side:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    return Side(name, model, torch.optim.SGD(model.parameters(), lr=lr), **kwargs)


def test_run_lockstep_trains_each_side_on_the_same_batches_and_records_every_step():
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(2)]
    sides = [_side("a", 0.1), _side("b", 0.1, loss_scale=1024.0)]
    start = snapshot(sides[0].model.parameters())

    def loss(model, batch):
        return (model(batch[0]) - batch[1]).pow(2).mean()

    def observe(step):
        return {"rel": deviation(list(sides[0].model.parameters()), list(sides[1].model.parameters()))[1],
                "moved": movement(start, list(sides[0].model.parameters()))[1]}

    rows = run_lockstep(sides, batches, loss, 5, observe, observe_start=True)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[0]["moved"] == 0.0 and math.isnan(rows[0]["loss_a"])
    assert all(r["rel"] < 1e-14 for r in rows) and rows[-1]["moved"] > 1e-2  # static loss scale is exact
    assert rows[3]["loss_a"] == rows[3]["loss_b"]


def test_run_lockstep_records_non_finite_losses_and_still_steps():
    side = _side("a", 0.1)

    def loss(model, batch):
        return model(batch).sum() * (math.nan if batch.sum() > 100 else 1.0)

    batches = [torch.ones(1, 3, dtype=torch.float64) * v for v in (1.0, 50.0, 1.0)]
    rows = run_lockstep([side], batches, loss, 3,
                        lambda step: {"finite": bool(torch.isfinite(side.model.weight).all())})
    assert math.isnan(rows[1]["loss_a"]) and not rows[1]["finite"] and len(rows) == 3


def test_run_lockstep_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        run_lockstep([_side("a", 0.1)], [1], None, 0, lambda s: {})
    with pytest.raises(ValueError, match="distinct"):
        run_lockstep([_side("a", 0.1), _side("a", 0.1)], [1], None, 1, lambda s: {})
    with pytest.raises(ValueError, match="every side needs its own"):
        run_lockstep([_side("a", 0.1)], [1], None, 1, lambda s: {})

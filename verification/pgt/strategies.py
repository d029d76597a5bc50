"""Hypothesis strategies for PGT properties: probability vectors and alpha values."""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

__all__ = ["alphas", "open_alphas", "alpha_pairs", "distributions", "distributions_with_label", "SHAPES"]


def alphas(min_value: float = 0.0, max_value: float = 1.0) -> st.SearchStrategy[float]:
    """alpha in ``[min_value, max_value]`` (both ends included as explicit examples)."""
    special = sorted(
        {v for v in (min_value, max_value, 0.25, 0.5, 1e-12, 1.0 - 1e-12) if min_value <= v <= max_value}
    )
    return st.one_of(st.sampled_from(special), st.floats(min_value, max_value, allow_nan=False))


def open_alphas() -> st.SearchStrategy[float]:
    """alpha strictly inside ``(0, 1)``, away from the ends by 1e-3."""
    return st.floats(1e-3, 1.0 - 1e-3, allow_nan=False)


def alpha_pairs() -> st.SearchStrategy[tuple[float, float]]:
    """``(a1, a2)`` with ``0 <= a1 <= a2 <= 1``."""
    return st.tuples(alphas(), alphas()).map(lambda ab: (min(ab), max(ab)))


#: shapes of probability vector :func:`distributions` draws (``extreme=True``)
SHAPES = ("smooth", "peaked", "masked", "subnormal", "one-hot")


@st.composite
def distributions(
    draw: st.DrawFn, min_classes: int = 2, max_classes: int = 12, spread: float = 12.0, extreme: bool = True
) -> torch.Tensor:
    """A float64 probability vector ``softmax(z)`` of logits in ``[-1, 1]`` times a random
    temperature, sometimes with a tie between two classes.

    With ``extreme=True`` (default) one of :data:`SHAPES` is drawn first:

    * ``smooth``: temperature in ``[0, spread]`` (nearly uniform to moderately peaked, all > 0);
    * ``peaked``: temperature up to 1500, so small entries reach subnormals or exactly 0;
    * ``masked``: some (not all) logits set to ``-inf``: exact zeros;
    * ``subnormal``: one entry placed 709-742 nats below the largest logit (a subnormal float64);
    * ``one-hot``: a single class holds all the mass.
    """
    c = draw(st.integers(min_classes, max_classes))
    logits = draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=c, max_size=c))
    shape = draw(st.sampled_from(SHAPES)) if extreme else "smooth"
    low, high = (spread, 1500.0) if shape == "peaked" else (0.0, spread)
    temperature = draw(st.floats(low, high, allow_nan=False))
    z = torch.tensor(logits, dtype=torch.float64) * temperature
    if draw(st.booleans()) and c > 2:  # force a tie between two classes
        z[1] = z[0]
    if shape == "masked":
        masked = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c - 1, unique=True))
        z[masked] = -math.inf
    elif shape == "subnormal":
        z[draw(st.integers(0, c - 1))] = z.max() - draw(st.floats(709.0, 742.0))
    elif shape == "one-hot":
        z = torch.full((c,), -math.inf, dtype=torch.float64)
        z[draw(st.integers(0, c - 1))] = 0.0
    return torch.softmax(z, dim=0)


@st.composite
def distributions_with_label(draw: st.DrawFn, **kwargs: object) -> tuple[torch.Tensor, int]:
    """A distribution (see :func:`distributions`) and a true-class index."""
    p = draw(distributions(**kwargs))
    y = draw(st.integers(0, p.shape[0] - 1))
    return p, y

"""Hypothesis strategies for PGT properties: probability vectors and alpha values."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

__all__ = ["alphas", "open_alphas", "alpha_pairs", "distributions", "distributions_with_label"]


def alphas(min_value: float = 0.0, max_value: float = 1.0) -> st.SearchStrategy[float]:
    """alpha in ``[min_value, max_value]`` (both ends included as explicit examples)."""
    special = sorted({v for v in (min_value, max_value, 0.25, 0.5) if min_value <= v <= max_value})
    return st.one_of(st.sampled_from(special), st.floats(min_value, max_value, allow_nan=False))


def open_alphas() -> st.SearchStrategy[float]:
    """alpha strictly inside ``(0, 1)``, away from the ends by 1e-3."""
    return st.floats(1e-3, 1.0 - 1e-3, allow_nan=False)


def alpha_pairs() -> st.SearchStrategy[tuple[float, float]]:
    """``(a1, a2)`` with ``0 <= a1 <= a2 <= 1``."""
    return st.tuples(alphas(), alphas()).map(lambda ab: (min(ab), max(ab)))


@st.composite
def distributions(draw: st.DrawFn, min_classes: int = 2, max_classes: int = 12, spread: float = 12.0) -> torch.Tensor:
    """A strictly positive float64 probability vector, built as ``softmax(z)`` of logits drawn
    with a random temperature (from nearly uniform to very peaked), sometimes with ties."""
    c = draw(st.integers(min_classes, max_classes))
    logits = draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=c, max_size=c))
    temperature = draw(st.floats(0.0, spread, allow_nan=False))
    z = torch.tensor(logits, dtype=torch.float64) * temperature
    if draw(st.booleans()) and c > 2:  # force a tie between two classes
        z[1] = z[0]
    return torch.softmax(z, dim=0)


@st.composite
def distributions_with_label(draw: st.DrawFn, **kwargs: object) -> tuple[torch.Tensor, int]:
    """A distribution (see :func:`distributions`) and a true-class index."""
    p = draw(distributions(**kwargs))
    y = draw(st.integers(0, p.shape[0] - 1))
    return p, y

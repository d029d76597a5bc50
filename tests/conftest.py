"""Hypothesis profiles: ``ci`` (default: bounded, derandomized, no deadline) and
``thorough`` (many more examples); choose with REPARAM_HYPOTHESIS_PROFILE.

A test that needs fewer examples than the profile writes
``@settings(max_examples=examples(n))`` (:func:`verification.strategies.examples`): ``n`` under
``ci`` (25 examples, :data:`~verification.strategies.BASE_EXAMPLES`), proportionally more under
``thorough``, so the thorough run reaches every property test."""
import os
import sys
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings

from verification.tolerances import EXACT_TOL

settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("REPARAM_HYPOTHESIS_PROFILE", "ci"))

# Tiny tensors on 2 cores: extra intra-op threads only add overhead.
torch.set_num_threads(1)


# -- helpers shared by the tests (``from conftest import rel_err``) ----------------------------
#: float64 "exact": the verification engine's own tolerance, never restated as a literal
F64_TOL = EXACT_TOL[torch.float64]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (a zero reference divides by 1e-300)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def surrogate_grad(z: torch.Tensor, target: torch.Tensor, alpha: float, loss_scale: float = 1.0, dtype=None, **kw):
    """Gradient of PGT's surrogate ``loss_scale · CE(alpha·z, target) / alpha`` w.r.t. ``z``
    (computed in ``dtype``, default the dtype of ``z``)."""
    z = z.detach().to(dtype or z.dtype).clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_scale * F.cross_entropy(alpha * z, target, **kw) / alpha, z)
    return grad


@pytest.fixture()
def model_module(tmp_path, monkeypatch) -> Iterator[Callable[[str], str]]:
    """``model_module(source) -> name``: write ``source`` as an importable module with a name
    unique to the test (for ``module:callable`` model specs), and forget it afterwards."""
    names: list[str] = []

    def write(source: str) -> str:
        name = f"reparam_test_models_{tmp_path.name.replace('-', '_')}_{len(names)}"
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield write
    for name in names:
        sys.modules.pop(name, None)

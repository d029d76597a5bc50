"""Hypothesis profiles: ``ci`` (default: bounded, derandomized, no deadline) and
``thorough`` (many more examples); choose with REPARAM_HYPOTHESIS_PROFILE.

A test that needs fewer examples than the profile writes
``@settings(max_examples=examples(n))`` (:func:`verification.strategies.examples`): ``n`` under
``ci`` (25 examples, :data:`~verification.strategies.BASE_EXAMPLES`), proportionally more under
``thorough``, so the thorough run reaches every property test."""
import os

import torch
from hypothesis import HealthCheck, settings

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

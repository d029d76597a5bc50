"""Random BatchNorm state, so that a function-preservation or fusion check cannot pass by
accident (a fresh BatchNorm is the identity in eval mode: mean 0, variance 1, gamma 1, beta 0)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_batchnorms_(
    model: nn.Module,
    generator: torch.Generator,
    mean_scale: float = 1.0,
    var_range: tuple[float, float] = (0.2, 3.0),
    gamma_scale: float = 0.5,
    beta_scale: float = 1.0,
    eps: float | None = None,
) -> nn.Module:
    """In place, for every BatchNorm of ``model``: ``running_mean ~ mean_scale·N(0, 1)``,
    ``running_var ~ U(var_range)``, ``gamma ~ 1 + gamma_scale·N(0, 1)``, ``beta ~ beta_scale·N(0, 1)``
    (drawn in float64 from ``generator``, then cast), and ``eps`` when given. Returns ``model``."""
    lo, hi = var_range

    def draw(sampler, like: torch.Tensor) -> torch.Tensor:
        return sampler(like.shape, generator=generator, dtype=torch.float64).to(like.dtype)

    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if eps is not None:
            module.eps = eps
        if module.running_mean is not None:
            module.running_mean.copy_(draw(torch.randn, module.running_mean) * mean_scale)
            module.running_var.copy_(lo + (hi - lo) * draw(torch.rand, module.running_var))
        if module.weight is not None:
            module.weight.copy_(1.0 + draw(torch.randn, module.weight) * gamma_scale)
            module.bias.copy_(draw(torch.randn, module.bias) * beta_scale)
    return model

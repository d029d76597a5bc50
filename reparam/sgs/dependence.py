"""TEMPORARY STUB (branch mitrain) until branch mistats lands: same signature, crude statistic."""
from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def masks_from_data(model: nn.Module, batches, *, k: float = 5.0, diagonal_removal: bool = False,
                    exclude_padding: bool = False, measure: str = "nmi", process_group=None,
                    progress: bool = False) -> dict[str, Tensor]:
    convs = {m: n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1 and m.kernel_size[1] > 1}
    sums: dict[nn.Module, Tensor] = {}

    def hook(module, inputs, output):
        x = nn.functional.pad(inputs[0].double(), [module.padding[1]] * 2 + [module.padding[0]] * 2)
        kh, kw = module.kernel_size
        s = torch.zeros(kh, kw, dtype=torch.float64)
        for i in range(kh):
            for j in range(kw):
                dy, dx = i - kh // 2, j - kw // 2
                a = x[..., max(dy, 0):x.shape[-2] + min(dy, 0), max(dx, 0):x.shape[-1] + min(dx, 0)]
                b = x[..., max(-dy, 0):x.shape[-2] + min(-dy, 0), max(-dx, 0):x.shape[-1] + min(-dx, 0)]
                s[i, j] = (a * b).sum() / (a * a).sum().sqrt().clamp_min(1e-12) / (b * b).sum().sqrt().clamp_min(1e-12)
        sums[module] = sums.get(module, 0) + s

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(hook) for m in convs]
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for m, s in sums.items():
        if process_group is not None:
            torch.distributed.all_reduce(s, group=process_group)
        s = s.abs() / s.abs().max()
        s = k * s / ((k - 1) * s + 1)
        out[convs[m] + ".weight"] = (s / s.mean()).float()
    return out

"""A tiny CNN for smoke tests: ``reparam bench --models benchmarks.tiny:tiny_net``."""
from __future__ import annotations

from torch import nn


def tiny_net(num_classes: int = 10) -> nn.Module:
    """conv3x3-BN-ReLU x3 (one strided, one 1x1 conv), global pool, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )

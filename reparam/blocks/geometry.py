"""Normalized conv geometry of a block and the alignment rule for smaller branches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from reparam.errors import ConfigError

IntPair = Union[int, tuple[int, int]]


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")


@dataclass(frozen=True)
class ConvGeometry:
    """Everything a branch needs to know about the conv it is part of."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def from_args(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair | str | None = None,
        dilation: IntPair = 1,
        groups: int = 1,
        block: str = "block",
    ) -> "ConvGeometry":
        """Validate ``nn.Conv2d``-style arguments; ``padding=None`` or ``"same"`` means
        ``dilation * (k // 2)`` per side (same size output at stride 1)."""
        kernel = _pair(kernel_size, "kernel_size")
        stride_ = _pair(stride, "stride")
        dilation_ = _pair(dilation, "dilation")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{block}: {name} must be a positive int, got {value!r}")
        if any(k < 1 or k % 2 == 0 for k in kernel):
            raise ConfigError(
                f"{block}: kernel_size {kernel} has an even side; branches can only be centred in odd kernels"
            )
        if any(s < 1 for s in stride_) or any(d < 1 for d in dilation_):
            raise ConfigError(f"{block}: stride and dilation must be >= 1, got {stride_} and {dilation_}")
        if in_channels % groups or out_channels % groups:
            raise ConfigError(
                f"{block}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        if padding is None or padding == "same":
            padding_ = (dilation_[0] * (kernel[0] // 2), dilation_[1] * (kernel[1] // 2))
        elif isinstance(padding, str):
            raise ConfigError(f"{block}: padding {padding!r} is not supported; use an int, a pair, None or 'same'")
        else:
            padding_ = _pair(padding, "padding")
            if any(p < 0 for p in padding_):
                raise ConfigError(f"{block}: padding must be >= 0, got {padding_}")
        return cls(in_channels, out_channels, kernel, stride_, padding_, dilation_, groups)

    def branch_padding(self, window: tuple[int, int]) -> tuple[int, int]:
        """Padding that aligns a centred ``window`` branch with the full kernel:
        ``p - d * (K // 2 - k // 2)`` per axis; negative means crop the input."""
        return tuple(  # type: ignore[return-value]
            p - d * (k // 2 - w // 2) for p, d, k, w in zip(self.padding, self.dilation, self.kernel_size, window)
        )

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

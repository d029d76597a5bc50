"""Normalized conv geometry of a block and the alignment rule for smaller branches."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Union

from reparam.errors import ConfigError

IntPair = Union[int, tuple[int, int]]
PADDING_STRINGS = ("same", "valid")


def _int(value: object) -> int | None:
    """``value`` as an int if it is an integer (``int``, ``numpy.int64``, anything with
    ``__index__``) but not a bool, else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _pair(value: object, name: str, block: str = "block") -> tuple[int, int]:
    """An integer or a pair of integers as a pair of ints; a clear error naming ``block`` and
    the argument otherwise (bools and floats are rejected, as ``nn.Conv2d`` does)."""
    items = list(value) if isinstance(value, (tuple, list)) and len(value) == 2 else [value, value]
    ints = [_int(v) for v in items]
    if None in ints:
        raise ConfigError(f"{block}: {name} must be an int or a pair of ints, got {value!r}")
    return ints[0], ints[1]  # type: ignore[return-value]


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
    ) -> ConvGeometry:
        """Validate ``nn.Conv2d``-style arguments.

        ``padding=None`` means ``dilation * (k // 2)`` per side (same size output at stride 1,
        for any stride); ``"same"`` means the same but, like ``nn.Conv2d``, only at stride 1;
        ``"valid"`` means 0 (every branch is still aligned exactly: smaller ones crop the input).
        """
        kernel = _pair(kernel_size, "kernel_size", block)
        stride_ = _pair(stride, "stride", block)
        dilation_ = _pair(dilation, "dilation", block)
        counts = {}
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            number = _int(value)
            if number is None or number < 1:
                raise ConfigError(f"{block}: {name} must be a positive int, got {value!r}")
            counts[name] = number
        cin, cout, groups_ = counts["in_channels"], counts["out_channels"], counts["groups"]
        if any(k < 1 for k in kernel):
            raise ConfigError(f"{block}: kernel_size must be positive, got {kernel}")
        if any(k % 2 == 0 for k in kernel):
            raise ConfigError(
                f"{block}: kernel_size {kernel} has an even side; branches can only be centred in odd kernels"
            )
        if any(s < 1 for s in stride_) or any(d < 1 for d in dilation_):
            raise ConfigError(f"{block}: stride and dilation must be >= 1, got {stride_} and {dilation_}")
        if cin % groups_ or cout % groups_:
            raise ConfigError(f"{block}: groups={groups_} must divide in_channels={cin} and out_channels={cout}")
        if isinstance(padding, str):
            if padding not in PADDING_STRINGS:
                raise ConfigError(
                    f"{block}: padding={padding!r} is not supported; use an int, a pair, None, 'same' or 'valid'"
                )
            if padding == "same" and stride_ != (1, 1):
                raise ConfigError(
                    f"{block}: padding='same' is not supported for strided convolutions (stride={stride_}), as in "
                    "nn.Conv2d; give an explicit padding (e.g. padding=None for dilation * (k // 2))"
                )
            padding = None if padding == "same" else 0
        if padding is None:
            padding_ = (dilation_[0] * (kernel[0] // 2), dilation_[1] * (kernel[1] // 2))
        else:
            padding_ = _pair(padding, "padding", block)
            if any(p < 0 for p in padding_):
                raise ConfigError(f"{block}: padding must be >= 0, got {padding_}")
        return cls(cin, cout, kernel, stride_, padding_, dilation_, groups_)

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

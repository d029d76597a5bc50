"""Kernel algebra: one function per algebraic identity used to fuse branches.

Every function is differentiable with respect to its tensor arguments and works on
kernels of shape ``(out, in / groups, kh, kw)``.
"""
from reparam.kernels.batchnorm import fold_batchnorm
from reparam.kernels.constant import average_kernel, identity_kernel
from reparam.kernels.padding import centre_pad, window_mask
from reparam.kernels.sequential import merge_1x1_then_kxk

__all__ = [
    "average_kernel",
    "centre_pad",
    "fold_batchnorm",
    "identity_kernel",
    "merge_1x1_then_kxk",
    "window_mask",
]

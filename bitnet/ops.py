"""Inference linear on packed weights: picks the Triton kernels or the exact torch path.

Choice, most specific first: the module's `kernel` argument, then the environment variable
BITNET_KERNEL ("triton" or "torch"), then automatic: Triton for CUDA tensors, torch otherwise.
Under TRITON_INTERPRET=1, BITNET_KERNEL=triton runs the Triton kernels on CPU tensors (that is how
CI proves them correct).
"""

from __future__ import annotations

import os

import torch

from .packing import packed_linear_reference

KERNELS = ("triton", "torch")


def choose_kernel(x: torch.Tensor, kernel: str | None = None) -> str:
    choice = kernel or os.environ.get("BITNET_KERNEL") or ("triton" if x.is_cuda else "torch")
    if choice not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} (argument or BITNET_KERNEL), got {choice!r}")
    if choice == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 to run on the CPU")
    return choice


# The torch path: unpack (the weights stay packed in memory between calls), exact int matmul.
# It lives on the ground floor (bitnet.packing), where the kernels' references can reach it too.
torch_bitlinear = packed_linear_reference


def bitlinear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    fmt: str,
    bias: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """y = (x_q @ W_q^T) * scale / a + bias for x (..., K), packed (R, K) uint8, scale float32 (1,)."""
    if choose_kernel(x, kernel) == "triton":
        from .kernels import bitlinear as triton_bitlinear

        return triton_bitlinear(x, packed, scale, n, fmt, bias)
    return torch_bitlinear(x, packed, scale, n, fmt, bias)

"""Inference linear on packed weights: picks the Triton kernels, the native CPU kernels or the
exact torch path.

Choice, most specific first: the module's `kernel` argument, then the environment variable
BITNET_KERNEL ("triton", "cpu" or "torch"), then automatic: Triton for CUDA tensors, the native
CPU kernels (bitnet.kernels.cpu) for CPU tensors when they could be built, torch otherwise. All
three compute the same integers and apply the scales with the same float32 operations, so their
outputs are equal. Under TRITON_INTERPRET=1, BITNET_KERNEL=triton runs the Triton kernels on CPU
tensors (that is how CI proves them correct).
"""

from __future__ import annotations

import os

import torch

from .kernels import cpu as native
from .packing import packed_linear_reference

KERNELS = ("triton", "cpu", "torch")


def choose_kernel(x: torch.Tensor, kernel: str | None = None) -> str:
    choice = kernel or os.environ.get("BITNET_KERNEL") or default_kernel(x.device)
    if choice not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} (argument or BITNET_KERNEL), got {choice!r}")
    if choice == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 to run on the CPU")
    if choice == "cpu" and x.device.type != "cpu":
        raise RuntimeError(f"the native CPU kernels need a CPU tensor, got one on {x.device}")
    if choice == "cpu" and not native.available():
        raise RuntimeError(f"BITNET_KERNEL=cpu, but the native CPU kernels are not available: {native.error()}")
    return choice


def default_kernel(device: torch.device | str) -> str:
    """The backend a packed layer uses on `device` when nothing is asked for."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and native.available():
        return "cpu"
    return "torch"


def describe_cpu_backend() -> str:
    """One line for `bitnet info`: what a packed layer on this machine's CPU runs on."""
    forced = os.environ.get("BITNET_KERNEL")
    if native.available():
        line = f"native C++ kernels, {native.isa()} (this CPU: {native.detected_isa()}), {torch.get_num_threads()} threads"
    else:
        line = f"torch path (native kernels unavailable: {native.error()})"
    if forced:
        line += f"; BITNET_KERNEL={forced} overrides it"
    return line


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
    choice = choose_kernel(x, kernel)
    if choice == "cpu":
        return native.linear(x, packed, scale, n, fmt, bias)
    if choice == "triton":
        from .kernels import bitlinear as triton_bitlinear

        return triton_bitlinear(x, packed, scale, n, fmt, bias)
    return torch_bitlinear(x, packed, scale, n, fmt, bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (weight * scale)^T (+ bias) for int8 rows with float32 row scales (an int8 lm_head).

    Few rows on the CPU (decode): the native kernel streams the int8 bytes once. Otherwise the rows
    are dequantized to x's dtype for F.linear (prefill, evaluation, GPUs)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type == "cpu" and rows <= 16 and os.environ.get("BITNET_KERNEL") != "torch" and native.available():
        return native.int8_linear(x, weight, scale, bias)
    w = (weight.float() * scale.float()[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

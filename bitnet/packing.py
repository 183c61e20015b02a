"""Packing of quantized weights into bytes, in torch. The Triton kernels decode the same layouts.

All three formats pack along the output dimension (dim 0) in strided blocks, the layout of
transformers' `pack_weights` and of the real BitNet checkpoints:

    W: (N, K) with values in the format's alphabet, P values per byte, R = ceil(N / P)
    byte[r, j] holds rows r, r + R, r + 2R, ..., r + (P-1)R of column j
    packed: uint8 (R, K), row-major

| format        | P | code of a value       | byte                              | bits/weight |
|---------------|---|-----------------------|-----------------------------------|-------------|
| "2bit"        | 4 | c = w + 1 in {0,1,2}  | sum_i c_i << 2i  (bits 2i..2i+1)  | 2           |
| "1.6bit"      | 5 | c = w + 1 in {0,1,2}  | sum_i c_i * 3^i  (< 243)          | 1.6         |
| "1bit"        | 8 | c = 1 if w > 0 else 0 | sum_i c_i << i                    | 1           |

"2bit" is the checkpoint format (bit-identical with transformers for N % 4 == 0); "1.6bit" is
a denser in-memory format for ternary weights (3^5 = 243 <= 256); "1bit" holds binary
{-1, +1} weights of the original BitNet.

N not a multiple of P: the rows are padded to R * P with the code of 0 (ternary) or of -1
(binary) and the padding is dropped on unpack, which takes the true N. transformers itself
can only hold N % 4 == 0 (its buffers are (N // 4, K)), so a checkpoint with such a layer loads
in this package only.
"""

from __future__ import annotations

import math

import torch

from .quant import quantized_linear

FORMATS = {"2bit": 4, "1.6bit": 5, "1bit": 8}
TERNARY_FORMATS = ("2bit", "1.6bit")


def values_per_byte(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown packed format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def packed_rows(n: int, fmt: str) -> int:
    """Rows of the packed uint8 matrix that holds n weight rows."""
    return math.ceil(n / values_per_byte(fmt))


def _codes(w: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "1bit":
        if not bool(((w == 1) | (w == -1)).all()):
            raise ValueError("1bit packing takes binary weights in {-1, +1}")
        return (w > 0).to(torch.int32)
    if not bool(((w >= -1) & (w <= 1)).all()):
        raise ValueError(f"{fmt} packing takes ternary weights in {{-1, 0, 1}}")
    return (w.to(torch.int32) + 1)


def pack(w: torch.Tensor, fmt: str = "2bit") -> torch.Tensor:
    """Quantized weights (N, K) (int8 or any integer-valued dtype) -> packed uint8 (R, K)."""
    if w.dim() != 2:
        raise ValueError(f"pack takes a 2-D weight, got shape {tuple(w.shape)}")
    p = values_per_byte(fmt)
    n, k = w.shape
    r = math.ceil(n / p)
    codes = _codes(w, fmt)
    pad_code = 0 if fmt == "1bit" else 1
    padded = torch.full((r * p, k), pad_code, dtype=torch.int32, device=w.device)
    padded[:n] = codes
    blocks = padded.view(p, r, k)  # (P, R, K): block i holds rows i*R .. i*R + R-1
    if fmt == "1.6bit":
        weights = 3 ** torch.arange(p, device=w.device, dtype=torch.int32)
    else:
        bits = 8 // p
        weights = 2 ** (bits * torch.arange(p, device=w.device, dtype=torch.int32))
    return (blocks * weights.view(p, 1, 1)).sum(0).to(torch.uint8)  # (R, K)


def unpack(packed: torch.Tensor, n: int, fmt: str = "2bit", dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Packed uint8 (R, K) -> weights (n, K) in `dtype`, values in {-1, 0, 1} or {-1, 1}."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack takes a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    p = values_per_byte(fmt)
    r, k = packed.shape
    if not (r - 1) * p < n <= r * p:
        raise ValueError(f"{fmt} packed rows {r} cannot hold {n} weight rows (needs {math.ceil(n / p)})")
    # byte arithmetic on uint8 (no int32 copy of the matrix): codes (P, R, K) in {0, 1, 2} or {0, 1}
    if fmt == "1.6bit":
        digits, v = [], packed
        for _ in range(p):
            digits.append(v % 3)
            v = v // 3
        codes = torch.stack(digits)
    else:
        bits = 8 // p
        mask = (1 << bits) - 1
        codes = torch.stack([(packed >> (bits * i)) & mask for i in range(p)])
    values = codes.view(torch.int8)  # codes <= 2: the same bits as int8
    values = values * 2 - 1 if fmt == "1bit" else values - 1
    return values.reshape(p * r, k)[:n].to(dtype)


def repack(packed: torch.Tensor, n: int, src: str, dst: str) -> torch.Tensor:
    """Convert between packed formats of the same alphabet (2bit <-> 1.6bit)."""
    if src == dst:
        return packed
    return pack(unpack(packed, n, src), dst)


def packed_linear_reference(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int, fmt: str, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The torch reference of a linear layer on packed weights: unpack (the weights stay packed in
    memory between calls), then the exact integer matmul of bitnet.quant.quantized_linear."""
    return quantized_linear(x, unpack(packed, n, fmt), scale, bias)

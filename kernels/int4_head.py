"""4-bit grouped GEMV against int8 activations: the int4 lm_head (bitnet.Int4Linear) on the GPU.

    x_q, a = quantize_activation(x)                                   per-row int8 (act_quant)
    y[m, n] = (sum_g d[n, g] * sum_{k in g} (c[n, k] - 8) * x_q[m, k]) / a[m] (+ bias[n])

groups g of 32 weights along K, c the 4-bit codes (Int4Linear: block b of 64 weights in bytes
32b .. 32b + 31 of a row, weight 64b + i in the low nibble of byte i, 64b + 32 + i in its high
nibble), d the group's float32 scale. Each group's sum is an exact int32; the sum over groups is
float32, one rounding to x's dtype at the end: the formula of the native CPU op
(bitnet_cpu::int4_linear), whose float32 sums run in another order.

Why: Int4Linear elsewhere dequantizes its whole weight to float32 every call (2B-4T's 128256 x
2560 head: 1.3 GB written and read back per decode step) for a float GEMM. Here each program
streams BLOCK_N rows of codes and scales once, 0.625 bytes a weight (205 MB at 2B-4T, against
656 MB for the bf16 head). For few rows (M <= 16: decode, a prefill's last position).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import act_quant
from .common import autotune, cdiv, few_rows

GROUP = 32
_GROUP = tl.constexpr(GROUP)  # what a @triton.jit function may read of a global
CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_B": bb}, num_warps=w)
           for bn, bb, w in [(16, 4, 4), (32, 2, 4), (32, 4, 8), (64, 2, 8), (8, 8, 4)]]
MAX_ROWS = 16


@autotune(CONFIGS, key=["N", "NB"], interpret_config=triton.Config({"BLOCK_N": 8, "BLOCK_B": 2}))
@triton.jit
def _int4_linear_kernel(
    # pointers
    xq_ptr, a_ptr, codes_ptr, scales_ptr, bias_ptr, y_ptr,
    # sizes (K: x_q's columns; NB: 64-weight blocks a row, Kp = 64 NB >= K)
    N, K, NB,
    # strides (unit stride along K for x_q and the codes, along N for y)
    stride_xm, stride_cn, stride_sn, stride_ym,
    # constexpr
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Program (p, m): outputs n = p*BLOCK_N .. of row m, BLOCK_B blocks of 64 weights a step.

    xq_ptr: (M, K) int8; a_ptr: (M,) float32; codes_ptr: (N, 32 NB) uint8; scales_ptr: (N, 2 NB)
    float32; bias_ptr: (N,) any float dtype, read if HAS_BIAS; y_ptr: (M, N) float32 / bf16 / fp16.
    """
    m = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.arange(0, BLOCK_B)
    i = tl.arange(0, _GROUP)
    n_ok = n < N
    c_ptrs = codes_ptr + n[:, None, None].to(tl.int64) * stride_cn + b[None, :, None] * _GROUP + i[None, None, :]
    d_ptrs = scales_ptr + n[:, None].to(tl.int64) * stride_sn + 2 * b[None, :]
    # x_q as [BLOCK_N, BLOCK_B, 32] tiles, every row the same k: the codes' own register layout (the
    # repeated rows hit L1), the low nibbles' k and the high nibbles' 32 further
    k_lo = b[None, :, None] * (2 * _GROUP) + i[None, None, :] + 0 * n[:, None, None]
    x_row = xq_ptr + m * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_B], tl.float32)
    for b0 in range(0, NB, BLOCK_B):
        b_ok = (b0 + b < NB)[None, :]
        c = tl.load(c_ptrs + b0 * _GROUP, mask=n_ok[:, None, None] & b_ok[:, :, None], other=0x88).to(tl.int32)
        k0 = b0 * 2 * _GROUP + k_lo
        x_lo = tl.load(x_row + k0, mask=k0 < K, other=0).to(tl.int32)
        x_hi = tl.load(x_row + k0 + _GROUP, mask=k0 + _GROUP < K, other=0).to(tl.int32)
        s_lo = tl.sum(((c & 15) - 8) * x_lo, 2)  # (BLOCK_N, BLOCK_B): each group's exact sum
        s_hi = tl.sum(((c >> 4) - 8) * x_hi, 2)
        d_lo = tl.load(d_ptrs + 2 * b0, mask=n_ok[:, None] & b_ok, other=0.0)
        d_hi = tl.load(d_ptrs + 2 * b0 + 1, mask=n_ok[:, None] & b_ok, other=0.0)
        acc += d_lo * s_lo.to(tl.float32) + d_hi * s_hi.to(tl.float32)
    total = tl.sum(acc, 1)
    y = tl.math.div_rn(total, tl.load(a_ptr + m) + 0.0 * total)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float32 / bf16 / fp16 with at most MAX_ROWS rows, codes uint8 (N, Kp / 2) and
    scales float32 (N, Kp / 32) in Int4Linear's layout (Kp a multiple of 64, >= K) -> y (..., N)
    in x's dtype."""
    N, K = out_features, x.shape[-1]
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[0] != N or codes.shape[1] % GROUP \
            or 2 * codes.shape[1] < K:
        raise ValueError(f"int4_linear: codes must be uint8 ({N}, Kp / 2) with Kp a multiple of 64 and >= {K}, got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    nb = codes.shape[1] // GROUP
    if tuple(scales.shape) != (N, 2 * nb) or (bias is not None and bias.numel() != N):
        raise ValueError(f"int4_linear: scales must be ({N}, {2 * nb}) for these codes (and bias ({N},)), got "
                         f"{tuple(scales.shape)}{'' if bias is None else f' and {bias.numel()}'}")
    x2 = few_rows(x, K, "int4_linear", MAX_ROWS)
    M = x2.shape[0]
    x_q, a, _ = act_quant(x2)
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    if scales.dtype != torch.float32 or scales.stride(-1) != 1:
        scales = scales.float().contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M > 0:
        _int4_linear_kernel[lambda meta: (cdiv(N, meta["BLOCK_N"]), M)](
            x_q, a, codes, scales, bias, y, N, K, nb, x_q.stride(0), codes.stride(0), scales.stride(0), y.stride(0),
            HAS_BIAS=bias is not None,  # FMA contraction on: no torch result to match bit for bit here
        )
    return y.reshape(*x.shape[:-1], N)


def reference_int4_linear(x, codes, scales, out_features, bias=None) -> torch.Tensor:
    """float64: sum_g d_g sum_{k in g} (c - 8) x_q / a (+ bias), x_q and a from quantize_activation."""
    from bitnet.quant import quantize_activation

    x_q, a = quantize_activation(x.reshape(-1, x.shape[-1]))
    N, K = out_features, x.shape[-1]
    c = codes.view(N, -1, GROUP).to(torch.int16)
    c = torch.stack([c & 15, c >> 4], dim=2).reshape(N, -1)[:, :K].double() - 8  # (N, K) in weight order
    w = c * scales.double().repeat_interleave(GROUP, 1)[:, :K]
    y = (x_q.double() @ w.t()) / a.double()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], N)

"""Weight-only int8 GEMV: the int8 lm_head (bitnet.Int8Linear) of a packed model on the GPU.

    y[m, n] = (sum_k x[m, k] * W_q[n, k]) * s[n] (+ bias[n])    float32 sums, one rounding to x's dtype

the arithmetic of the native CPU op (bitnet_cpu::int8_linear). At decode the head is the largest
single read of a step: 2B-4T's 128256 x 2560 head is 656 MB in bf16, more than all thirty layers'
packed weights (~0.5 GB); in int8 it is half that. Dequantizing to bf16 and calling F.linear (what
runs elsewhere) reads the int8 bytes, writes and re-reads a bf16 copy: three times the bf16 head's
traffic. Here each program streams BLOCK_N rows of int8 weights once, 16-byte loads, products
accumulated in float32 registers and reduced over K once at the end. For few rows (M <= 16:
decode, the last position of a prefill); larger M (evaluation) dequantizes and runs a GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune, cdiv, few_rows, pdl, pdl_start, pdl_wait

CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
           for bn, bk, w in [(16, 512, 4), (32, 256, 4), (32, 512, 8), (64, 256, 8), (8, 1024, 4)]]
MAX_ROWS = 16  # the GEMV's limit: it reads the weights once per activation row (from L2 after the first)


@autotune(CONFIGS, key=["N", "K"], interpret_config=triton.Config({"BLOCK_N": 8, "BLOCK_K": 32}))
@triton.jit
def _int8_linear_kernel(
    # pointers
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr,
    # sizes
    N, K,
    # strides (unit stride along K for x and w, along N for y)
    stride_xm, stride_wn, stride_ym,
    # constexpr
    HAS_BIAS: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (p, m): outputs n = p*BLOCK_N .. of row m.

    x_ptr: (M, K) float32 / bf16 / fp16; w_ptr: (N, K) int8; scale_ptr: (N,) float32;
    bias_ptr: (N,) any float dtype, read if HAS_BIAS; y_ptr: (M, N) in x's dtype.
    PDL: launched as a dependent (common.pdl).
    """
    pdl_start(PDL)
    pdl_wait(PDL)
    m = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    n_ok = n < N
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :]
    # x as a [BLOCK_N, BLOCK_K] tile, every row the same k: the weights' own register layout (a
    # [BLOCK_K] vector broadcast over the rows costs a shared-memory exchange and barriers a step);
    # the repeated rows hit L1
    x_ptrs = x_ptr + m * stride_xm + k[None, :] + 0 * n[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + k < K)[None, :]
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok, other=0)
        x = tl.load(x_ptrs + k0, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)
    y = tl.sum(acc, 1) * tl.load(scale_ptr + n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float32 / bf16 / fp16 with at most MAX_ROWS rows, weight int8 (N, K), scale (N,)
    -> y (..., N) in x's dtype."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"int8_linear: x (..., {x.shape[-1]}) and an int8 (N, K) weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    if scale.numel() != N or (bias is not None and bias.numel() != N):
        raise ValueError(f"int8_linear: {N} rows need {N} scales (and biases), got {scale.numel()}"
                         f"{'' if bias is None else f' and {bias.numel()}'}")
    x2 = few_rows(x, K, "int8_linear", MAX_ROWS)
    M = x2.shape[0]
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    scale = scale.reshape(-1)
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.float().contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M > 0:
        _int8_linear_kernel[lambda meta: (cdiv(N, meta["BLOCK_N"]), M)](
            x2, w, scale, bias, y, N, K, x2.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, **pdl(x2),  # FMA contraction on: no torch result to match bit for bit here
        )
    return y.reshape(*x.shape[:-1], N)


def reference_int8_linear(x, weight, scale, bias=None) -> torch.Tensor:
    """float64: (x @ W_q^T) * s (+ bias)."""
    y = (x.double() @ weight.double().t()) * scale.double()
    return y if bias is None else y + bias.double()

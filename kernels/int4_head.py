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

The codes are read as int32 words, x_q too (zero-padded to whole blocks): a nibble c moved to
the top of its byte with the top bit flipped is the int8 16 (c - 8), so one mask, an XOR (and a
shift for the low nibbles) and one signed dp4a multiply four weights; a group's eight words lie in
two threads, four each, and each half group is scaled on its own (no exchange between threads in
the loop). sm_90 SASS of the loop: 1.7 instructions a weight (10.6 when each byte was extracted
and multiplied on its own), so that at 2B-4T the ~17 us of integer issue stay under the ~60 us
of the codes' HBM time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import act_quant
from .common import autotune, cdiv, few_rows, pdl, pdl_start, pdl_wait, ptx
from .gemv import mac

GROUP = 32
_GROUP = tl.constexpr(GROUP)  # what a @triton.jit function may read of a global
_HIGH_NIBBLES = tl.constexpr(-0x0F0F0F10)  # 0xF0F0F0F0 as an int32
_BYTE_SIGNS = tl.constexpr(-0x7F7F7F80)  # 0x80808080
# (BLOCK_N rows, BLOCK_B 64-weight blocks a step, warps): 8 words of codes a block and row
CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_B": bb}, num_warps=w)
           for bn, bb, w in [(16, 8, 4), (32, 4, 4), (32, 8, 8), (64, 4, 8), (8, 16, 4)]]
MAX_ROWS = 16


@autotune(CONFIGS, key=["N", "NB"], interpret_config=triton.Config({"BLOCK_N": 8, "BLOCK_B": 2}))
@triton.jit
def _int4_linear_kernel(
    # pointers
    xq_ptr, a_ptr, codes_ptr, scales_ptr, bias_ptr, y_ptr,
    # sizes (NB: 64-weight blocks a row; x_q has 64 NB columns, zero past K)
    N, NB,
    # strides (unit stride along K for x_q and the codes, along N for y; stride_xm and stride_cn in
    # int32 words)
    stride_xm, stride_cn, stride_sn, stride_ym,
    # constexpr
    HAS_BIAS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Program (p, m): outputs n = p*BLOCK_N .. of row m, BLOCK_B blocks of 64 weights a step.

    xq_ptr: (M, 64 NB) int8, read as int32 words; a_ptr: (M,) float32; codes_ptr: (N, 32 NB) uint8
    read as int32 words (word j of block b: the low nibbles are weights 64b + 4j .. 64b + 4j + 3,
    the high ones 32 further); scales_ptr: (N, 2 NB) float32; bias_ptr: (N,) any float dtype, read
    if HAS_BIAS; y_ptr: (M, N) float32 / bf16 / fp16.
    Each group's sum is an exact int32 (of 16 (c - 8) x_q, divided back by 16).
    PDL: launched as a dependent (common.pdl).
    """
    pdl_start(PDL)
    pdl_wait(PDL)
    m = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, 8)
    n_ok = n < N
    # Loads without masks: rows past N read row N - 1 and blocks past NB block NB - 1, their sums
    # weighted by a zero scale (the scales' loads are masked) and their outputs not stored.
    n_in = tl.minimum(n, N - 1).to(tl.int64)
    codes_ptr = codes_ptr.to(tl.pointer_type(tl.int32))
    xq_ptr = xq_ptr.to(tl.pointer_type(tl.int32))
    c_rows = codes_ptr + n_in[:, None, None] * stride_cn + j[None, None, :]
    # x_q words as [BLOCK_N, BLOCK_B, 8] tiles, every row the same words: the codes' own register
    # layout (the repeated rows hit L1); the low nibbles' words and, 8 words on, the high ones'
    x_row = xq_ptr + m * stride_xm + j[None, None, :] + 0 * n[:, None, None]
    # the scales as [BLOCK_N, BLOCK_B, 2] (each group's, once for each half of its eight words)
    d_rows = scales_ptr + n_in[:, None, None] * stride_sn + 0 * tl.arange(0, 2)[None, None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_B, 2], tl.float32)
    for b0 in range(0, NB, BLOCK_B):
        blk = tl.minimum(b0 + b, NB - 1)[None, :, None]
        w = tl.load(c_rows + blk * 8)
        x_lo = tl.load(x_row + blk * 16)
        x_hi = tl.load(x_row + blk * 16 + 8)
        # a nibble c moved to the top of its byte with its top bit flipped is the int8 16 (c - 8):
        # one mask (and a shift for the low nibbles), one signed dp4a; sums divided back by 16 (exact)
        lo = mac(((w << 4) & _HIGH_NIBBLES) ^ _BYTE_SIGNS, x_lo, tl.zeros_like(w), 4, ASM, SIGNED=True)
        hi = mac((w & _HIGH_NIBBLES) ^ _BYTE_SIGNS, x_hi, tl.zeros_like(w), 4, ASM, SIGNED=True)
        # each half group's sum (four words, in one thread's registers), scaled: no exchange between threads
        s_lo = tl.sum(tl.reshape(lo, (BLOCK_N, BLOCK_B, 2, 4)), 3) >> 4
        s_hi = tl.sum(tl.reshape(hi, (BLOCK_N, BLOCK_B, 2, 4)), 3) >> 4
        d_ok = n_ok[:, None, None] & (b0 + b < NB)[None, :, None]
        d_lo = tl.load(d_rows + 2 * blk, mask=d_ok, other=0.0)
        d_hi = tl.load(d_rows + 2 * blk + 1, mask=d_ok, other=0.0)
        acc += d_lo * s_lo.to(tl.float32) + d_hi * s_hi.to(tl.float32)
    total = tl.sum(tl.sum(acc, 2), 1)
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
    if K != 64 * nb:  # whole blocks of x_q words: zeros past K (codes there multiply nothing)
        x_q = torch.nn.functional.pad(x_q, (0, 64 * nb - K))
    if codes.stride(-1) != 1 or codes.stride(0) % 4 or codes.storage_offset() % 4:  # read as int32 words
        codes = codes.clone(memory_format=torch.contiguous_format)
    if scales.dtype != torch.float32 or scales.stride(-1) != 1:
        scales = scales.float().contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M > 0:
        _int4_linear_kernel[lambda meta: (cdiv(N, meta["BLOCK_N"]), M)](
            x_q, a, codes, scales, bias, y, N, nb, x_q.stride(0) // 4, codes.stride(0) // 4, scales.stride(0),
            y.stride(0), HAS_BIAS=bias is not None, ASM=ptx(x), **pdl(x),
            # FMA contraction on: no torch result to match bit for bit here
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

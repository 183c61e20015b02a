"""Decode GEMV (one activation row per program row): y[m] = (x_q[m] . W_q^T) * s / a[m] (+ bias),
with the activation quantization fused in, so that a decode step is one launch.

Memory-bound at M = 1: the kernel must stream the packed weight near HBM speed, and the integer
work per weight must stay below what the SMs can issue in that time (about one instruction per
weight at 2 bits on an H100). Hence:
- Weights are read as int32 words (K % 4 == 0, as in every real model): a word holds four
  consecutive k of one packed row, so one shift and one mask give the codes of one slice at four
  k in four byte lanes, the operand of dp4a (four int8 products and a sum in one instruction)
  against four packed activations: about 0.7 instructions per 2-bit weight, 1.2 with the rest of
  the loop (sm_90 SASS of the main loop, BLOCK_R = 8). Base 3 takes about twice that (layout.py).
  Other K take a byte path: one code and one multiply-add per weight.
- The P slices of a tile are tl.join-ed into a trailing dimension, kept in each thread's registers
  (no shuffles through shared memory in the loop), and reduced over K once, after the loop.
- Each program owns BLOCK_R packed rows (P * BLOCK_R outputs) and all of K: no split-K partial
  sums and no second pass. Small BLOCK_R keeps enough programs in flight at N = 2560 (R = 640).
- The activation row is read once for its absmax (K floats from L2, in long steps, while the
  first weight tile is already on its way) and quantized chunk by chunk with act_quant's
  arithmetic: bit-identical x_q.
The dp4a is PTX inline assembly on CUDA; the interpreter, which cannot run assembly, computes the
same sum of four lane products in plain Triton (mac below).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet.packing import packed_linear_reference

from .activations import quantize, row_scale
from .common import INTERPRET, LAUNCH, autotune, matmul_output, store_output
from .layout import check_packed, decode, joined_codes, values_per_byte

# BLOCK_R: packed rows per program (P * BLOCK_R outputs); small ones give the programs to fill
# 132 SMs at N = 2560, large ones spread the activation work over more weights. BLOCK_U: units
# (int32 words, or bytes on the byte path) per row and step. num_stages is moot: the loop is
# pipelined by hand.
CONFIGS = [
    triton.Config({"BLOCK_R": br, "BLOCK_U": bu}, num_warps=w)
    for br, bu, w in [
        (1, 512, 4), (2, 256, 4), (4, 128, 4), (4, 256, 4), (4, 256, 8), (8, 128, 4),
        (8, 256, 8), (16, 64, 4), (16, 128, 4), (16, 128, 8), (32, 64, 8),
    ]
]


@triton.jit
def mac(c, x, acc, LANES: tl.constexpr, ASM: tl.constexpr):
    """acc + c * x for units: plain int32 (LANES == 1), or the sum over four signed int8 byte
    lanes of int32 words (LANES == 4): dp4a, by inline PTX if ASM, else in plain Triton."""
    if LANES == 1:
        acc += c * x
    elif ASM:
        acc = tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [c, tl.broadcast_to(x, c.shape), acc],
            dtype=tl.int32, is_pure=True, pack=1)
    else:
        for lane in tl.static_range(4):
            acc += ((c << (24 - 8 * lane)) >> 24) * ((x << (24 - 8 * lane)) >> 24)
    return acc


@triton.jit
def x_offsets(u0, LANES: tl.constexpr, BLOCK_U: tl.constexpr):
    """Positions k of the activations that meet units u0 + [0, BLOCK_U): (BLOCK_U, LANES)."""
    return (u0 + tl.arange(0, BLOCK_U))[:, None] * LANES + tl.arange(0, LANES)[None, :]


@triton.jit
def x_units(x, a, QUANTIZE_X: tl.constexpr, LANES: tl.constexpr):
    """Activations x (BLOCK_U, LANES), raw -> (int32 units, four int8 lanes little-endian when
    LANES == 4; the sum of each unit's x_q)."""
    q = quantize(x.to(tl.float32), a) if QUANTIZE_X else x.to(tl.int32)
    if LANES == 4:
        units = tl.sum((q & 0xFF) << (8 * tl.arange(0, 4))[None, :], 1)  # disjoint bytes: sum == or
    else:
        units = tl.reshape(q, (q.shape[0],))
    return units, tl.sum(q, 1)


@autotune(CONFIGS, key=["N", "K", "P", "QUANTIZE_X"], interpret_config=triton.Config({"BLOCK_R": 4, "BLOCK_U": 16}))
@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr, a_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr,
    # sizes
    N, K, R,
    # strides (unit stride along K and N; stride_wr in units of w_ptr's dtype)
    stride_xm, stride_wr, stride_ym,
    # constexpr
    P: tl.constexpr, QUANTIZE_X: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
    LANES: tl.constexpr, ASM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """y[m, i*R + r] = (SC * sum_k code_i(w[r, k]) * x_q[m, k] - sum_k x_q[m, k]) * s / a[m] + bias.

    x_ptr: (M, K) float (fp32/bf16/fp16) if QUANTIZE_X, else int8 x_q (M, K) with a_ptr float32 (M,).
    w_ptr: the packed layout of layout.py, (R, K) uint8 read as is, R = ceil(N / P); with
        LANES == 4 the same bytes viewed as int32 (R, K / 4), one word = 4 consecutive k.
    scale_ptr: float32 (1,), s = mean|W|; bias_ptr: (N,) any float dtype, read if HAS_BIAS.
    y_ptr: (M, N) in the output dtype, or int32 x_q . W_q^T itself if OUT_INT32 (a, s unused).
    ASM: dp4a by inline PTX (CUDA); else its plain Triton twin (interpreter).
    BLOCK_A: activations per step of the absmax pass (few, long steps: it waits on L2 each step).
    Grid: (cdiv(R, BLOCK_R), M); program (p, m) writes rows i*R + p*BLOCK_R + [0, BLOCK_R).
    """
    PA: tl.constexpr = 8 if P == 8 else 4
    PB: tl.constexpr = P - PA
    SC: tl.constexpr = 2 if P == 8 else 1
    m = tl.program_id(1)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    x_row = x_ptr + m * stride_xm

    # Software pipelining by hand (Triton pipelines only loads that feed a dot): each tile's
    # loads are issued one step ahead of its math; the first ones before the absmax pass.
    K_UNITS = K // LANES
    offs_u = tl.arange(0, BLOCK_U)
    row_ok = (offs_r < R)[:, None]
    w_ptrs = w_ptr + offs_r[:, None] * stride_wr + offs_u[None, :]
    w_next = tl.load(w_ptrs, mask=row_ok & (offs_u < K_UNITS)[None, :], other=0)
    x_next = tl.load(x_row + x_offsets(0, LANES, BLOCK_U), mask=x_offsets(0, LANES, BLOCK_U) < K, other=0)
    if QUANTIZE_X:
        a = row_scale(x_row, K, BLOCK_A)
    elif not OUT_INT32:
        a = tl.load(a_ptr + m)
    else:
        a = 1.0

    acc = tl.zeros([BLOCK_R, BLOCK_U, PA], tl.int32)
    if PB > 0:
        acc_b = tl.zeros([BLOCK_R, BLOCK_U], tl.int32)
    xsum = tl.zeros([BLOCK_U], tl.int32)
    for u0 in range(0, K_UNITS, BLOCK_U):
        w = w_next.to(tl.int32)
        x = x_next
        u1 = u0 + BLOCK_U
        w_next = tl.load(w_ptrs + u1, mask=row_ok & (u1 + offs_u < K_UNITS)[None, :], other=0)
        x_next = tl.load(x_row + x_offsets(u1, LANES, BLOCK_U), mask=x_offsets(u1, LANES, BLOCK_U) < K, other=0)
        xu, xs = x_units(x, a, QUANTIZE_X, LANES)
        acc = mac(joined_codes(w, P, LANES, False), xu[None, :, None], acc, LANES, ASM)  # (BR, BU, PA)
        if PB > 0:
            acc_b = mac(decode(w, PA, P, LANES), xu[None, :], acc_b, LANES, ASM)
        xsum += xs

    total = tl.sum(xsum, 0)
    factor = tl.math.div_rn(tl.load(scale_ptr), a) if not OUT_INT32 else 0.0
    y_row = y_ptr + m * stride_ym
    n = tl.arange(0, PA)[None, :] * R + offs_r[:, None]  # (BR, PA)
    store_output(y_row, bias_ptr, n, n, (offs_r < R)[:, None] & (n < N), tl.sum(acc, 1), total, factor,
                 SC, HAS_BIAS, OUT_INT32)
    if PB > 0:
        n = PA * R + offs_r
        store_output(y_row, bias_ptr, n, n, (offs_r < R) & (n < N), tl.sum(acc_b, 1), total, factor,
                     SC, HAS_BIAS, OUT_INT32)


def gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    fmt: str,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x (M, K) @ W^T -> y (M, n), one program row per activation row (meant for M = 1).

    x float: quantized in the kernel (a must be None). x int8: x_q, with its a (M,) float32.
    out_dtype: x's dtype for float x; torch.int32 returns x_q . W_q^T, unscaled (scale unused).
    """
    quantize_x = x.is_floating_point()
    out_dtype = out_dtype or (x.dtype if quantize_x else None)
    y, a, scale = matmul_output(x, a, scale, bias, n, out_dtype, quantized_in_kernel=quantize_x)
    m, k = x.shape
    p = values_per_byte(fmt)
    packed = check_packed(packed, n, k, fmt)
    # Words need 4-byte aligned rows; other K take the byte path.
    lanes = 4 if k % 4 == 0 and packed.storage_offset() % 4 == 0 else 1
    w = packed.view(torch.int32) if lanes == 4 else packed
    grid = lambda meta: (triton.cdiv(packed.shape[0], meta["BLOCK_R"]), m)  # noqa: E731
    if m > 0:
        _gemv_kernel[grid](
            x, a, w, scale, bias, y,
            n, k, packed.shape[0],
            x.stride(0), w.stride(0), y.stride(0),
            P=p, QUANTIZE_X=quantize_x, HAS_BIAS=bias is not None, OUT_INT32=out_dtype == torch.int32,
            LANES=lanes, ASM=not INTERPRET and x.is_cuda and torch.version.hip is None,
            BLOCK_A=min(triton.next_power_of_2(k), 64 if INTERPRET else 4096), **LAUNCH,
        )
    return y


def reference_gemv(x, packed, scale, n, fmt, bias=None):
    """The torch reference: bitnet.packing.packed_linear_reference (unpack, exact integer matmul),
    the torch path of bitnet.ops (torch_bitlinear)."""
    return packed_linear_reference(x, packed, scale, n, fmt, bias)

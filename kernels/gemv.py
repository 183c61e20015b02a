"""Decode GEMV (one activation row per program row): y[m] = (x_q[m] . W_q^T) * s / a[m] (+ bias).

Memory-bound at M = 1: a 2560 x 6912 layer is 4.4 MB of packed weights, 1.1 us of HBM time on an
H200, against 18 us for cuBLAS's bf16 GEMV. What keeps a kernel from that floor is latency, not
arithmetic (benchmarks/gpu_notes.md): each SM needs ~30 KB of loads in flight (Little's law at
4 TB/s over 132 SMs), and a loop that waits on its loads step after step, or on a barrier, never
gets there. Hence:
- One program owns BLOCK_R packed rows (P * BLOCK_R outputs) over a K stretch of BLOCK_U units and
  issues all of that tile's loads at once: at real widths one tile is the whole row (BLOCK_U up to
  2048 int32 words = 8192 k), so most programs run no loop at all; 2-4 x 16-byte loads per thread,
  and ~5 programs an SM at N = 2560 (640 packed rows), ~35 KB in flight per SM. Longer rows take
  more steps, each tile's loads issued one step ahead of its math.
- Weights are read as int32 words (K % 4 == 0, as in every real model): a word holds four
  consecutive k of one packed row. For bits, one mask (no shift) leaves slice i's codes in place
  in four byte lanes, 2^(BITS i) times their value (at most 128), the unsigned operand of dp4a
  (four byte products and a sum, one instruction) against four packed activations; the epilogue
  shifts each exact sum back (the CPU VNNI kernel's trick). For base 3 the loop multiplies the
  bytes' quotients q_i = floor(v / 3^i) instead of their digits c_i = q_i - 3 q_(i+1) (one IMAD
  and a byte permute a quotient, two bytes at a time), and the epilogue takes the differences:
  sm_90 SASS of the loop, per weight, 1.02 instructions for "2bit" (1.19 with shifts), 0.76 for
  "1bit" (0.95), 1.67 for "1.6bit" (2.86 with digits). Other K take a byte path: one code and
  one multiply-add per weight.
- The activations arrive as int32 words too, with no re-packing through shared memory (which cost
  two barriers a step): int8 x_q (act_quant's, or rmsnorm_act_quant's: the model quantizes once
  per RMSNorm for all the projections it feeds) is read as words; float x is loaded as four
  k-strided vectors in the words' own register layout, quantized and shifted into bytes in place,
  once per program for all the rows of its tile (its row's absmax comes first, one pass over the
  row from L2). The row sum of x_q comes from one more dp4a per word (against 0x01010101).
- The P slices are tl.join-ed into a trailing dimension held in each thread's registers and
  reduced over K once, after the loop: no split-K partial sums, exact int32 throughout.
The dp4a and the byte permutes (prmt) are PTX inline assembly on CUDA; the interpreter, which
cannot run assembly, computes the same in plain Triton (mac below; layout.high_bytes, interleave_high).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet.packing import packed_linear_reference

from .activations import quantize, row_scale
from .common import (INTERPRET, LAUNCH, autotune, cat_biases, cdiv, matmul_args, next_power_of_2, norm_args, pdl,
                     pdl_start, pdl_wait, ptx, SEGMENT_STARTS, segment_starts, store_output)
from .layout import base3_quotients, check_packed, join_slices, values_per_byte
from .rmsnorm_quant import norm_input, normed, row_norm_scale, sum_block

# (BLOCK_R, BLOCK_U, num_warps): packed rows and units per tile, 4-8 units (1-2 16-byte loads) a
# thread and row. Wide tiles cover a whole row in one step (no loop); narrow ones give programs
# enough to fill 132 SMs where rows are short (N = 6912, K = 2560: 640 words a row).
TILES = [
    (1, 2048, 8), (1, 1024, 4), (1, 1024, 8), (1, 512, 4), (2, 1024, 8), (2, 512, 4), (4, 512, 8),
    (4, 256, 4), (8, 256, 8), (8, 128, 4), (16, 128, 8),
]
CONFIGS = [triton.Config({"BLOCK_R": br, "BLOCK_U": bu}, num_warps=w) for br, bu, w in TILES]


def _prune(configs, named_args, **kwargs):
    """Tiles no wider than the row needs (a wider one only loads masked-off lanes)."""
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    units = args["K"] // args.get("LANES", 1)
    fit = [c for c in configs if c.kwargs["BLOCK_U"] <= max(128, next_power_of_2(units))]
    return fit or configs


@triton.jit
def mac(c, x, acc, LANES: tl.constexpr, ASM: tl.constexpr, SIGNED: tl.constexpr = False):
    """acc + c * x for units: plain int32 (LANES == 1), or the sum over four byte lanes of int32
    words (LANES == 4), c's lanes unsigned (0 .. 255: the scaled codes and base-3 quotients below;
    signed if SIGNED), x's signed (int8 x_q): dp4a.u32.s32 (.s32.s32), by inline PTX if ASM, else
    in plain Triton."""
    if LANES == 1:
        acc += c * x
    elif ASM:
        acc = tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;" if SIGNED else "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r",
            [c, tl.broadcast_to(x, c.shape), acc], dtype=tl.int32, is_pure=True, pack=1)
    else:
        for lane in tl.static_range(4):
            if SIGNED:
                c_lane = (c << (24 - 8 * lane)) >> 24
            else:
                c_lane = (c >> (8 * lane)) & 0xFF
            acc += c_lane * ((x << (24 - 8 * lane)) >> 24)
    return acc


# The largest K whose sums stay exact in int32: the top slice's scaled codes (128) times x_q (-128)
# reach -2^31 there, and a shift back is exact only without wrap-around. (Base 3 needs no bound: its
# quotient sums may wrap, being used only in differences, the code sums, that fit; int32 wraps.)
MAX_K = 131072


@triton.jit
def scaled_slice(w, i: tl.constexpr, P: tl.constexpr, LANES: tl.constexpr):
    """2^(BITS i) * code_i of each unit ("2bit", "1bit"): slice i's bits masked in place, not
    shifted down (one instruction a slice instead of two; the epilogue divides the exact sums by
    2^(BITS i)). In byte lanes the top slice reaches 128: unsigned dp4a operands."""
    BITS: tl.constexpr = 8 // P
    MASK: tl.constexpr = ((1 << BITS) - 1) * (0x01010101 if LANES == 4 else 1)
    return w & (tl.full([], MASK, tl.int32) << (BITS * i))


@triton.jit
def slice_units(w, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """What the loop multiplies with x for the units w [A, B]: [A, B, PA] with slice i at [..., i],
    and [A, B] for the fifth base-3 slice (P == 5; else w, unused). "2bit" / "1bit": each slice's
    codes scaled by 2^(BITS i); "1.6bit": the quotients q_0 = v .. q_3 and q_4 (base3_quotients).
    code_sums turns the sums of these into the sums of the codes."""
    if P == 5:
        q1, q2, q3, q4 = base3_quotients(w, LANES, ASM)
        c = join_slices(w, q1, q2, q3)
        c_b = q4
    else:
        c = join_slices(scaled_slice(w, 0, P, LANES), scaled_slice(w, 1, P, LANES),
                        scaled_slice(w, 2, P, LANES), scaled_slice(w, 3, P, LANES))
        if P == 8:
            hi = join_slices(scaled_slice(w, 4, P, LANES), scaled_slice(w, 5, P, LANES),
                             scaled_slice(w, 6, P, LANES), scaled_slice(w, 7, P, LANES))
            c = tl.permute(tl.join(c, hi), (0, 1, 3, 2))  # [..., j, h] -> [..., h, j]: slice 4h + j
            c = tl.reshape(c, (c.shape[0], c.shape[1], 8))
        c_b = w
    return c, c_b


@triton.jit
def code_sums(d, d_b, P: tl.constexpr):
    """sum_k code_i * x_q for slices 0 .. PA-1 ([BR, PA]) and the fifth base-3 slice ([BR]) from
    the loop's sums d, d_b of slice_units' values: d_i >> BITS i for bits; for base 3,
    c_i = q_i - 3 q_(i+1) makes sum c_i x = d_i - 3 d_(i+1) (i < 4) and sum c_4 x = d_4. Exact
    for K <= MAX_K (the shifts), and the differences modulo 2^32 even where d_0 wraps."""
    if P == 5:
        even, odd = tl.split(tl.reshape(d, (d.shape[0], 2, 2)))  # [d_0, d_2], [d_1, d_3]
        d0, d2 = tl.split(even)
        d1, d3 = tl.split(odd)
        s = tl.join(tl.join(d0 - 3 * d1, d2 - 3 * d3), tl.join(d1 - 3 * d2, d3 - 3 * d_b))
        s = tl.reshape(s, (d.shape[0], 4))
    else:
        s = d >> ((8 // P) * tl.arange(0, d.shape[1]))[None, :]
    return s, d_b


@triton.jit
def x_value(x_row, u_row, w_ptr, rstd, offs, mask, NORM: tl.constexpr, GATED: tl.constexpr):
    """Float x at offs as float32: x itself, or with NORM its RMSNorm h (weight w_ptr, the row's
    rstd; u_row: the up projection's row if GATED): rmsnorm_quant.norm_input and normed, the fused
    norm kernel's arithmetic."""
    if NORM:
        v = normed(norm_input(x_row, u_row, offs, mask, GATED), w_ptr, offs, mask, rstd, x_row.dtype.element_ty)
    else:
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def x_units(x_row, u, mask, a, u_row, nw_ptr, rstd, QUANTIZE_X: tl.constexpr, LANES: tl.constexpr,
            ASM: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr):
    """The activations' units at unit offsets u (any shape): int32 words of four int8 x_q
    (little-endian, k = 4u .. 4u + 3) when LANES == 4, single x_q when LANES == 1; and the sum of
    each unit's x_q.

    QUANTIZE_X: x_row points at float x, quantized here with the row's scale a (after its RMSNorm
    with NORM: x_value); the four k of a word are loaded as four vectors of u's shape, so the word
    is assembled in registers. Else x_row points at x_q: as int32 words when LANES == 4, as int8
    when LANES == 1.
    """
    if QUANTIZE_X:
        if LANES == 4:
            q0 = quantize(x_value(x_row, u_row, nw_ptr, rstd, 4 * u, mask, NORM, GATED), a)
            q1 = quantize(x_value(x_row, u_row, nw_ptr, rstd, 4 * u + 1, mask, NORM, GATED), a)
            q2 = quantize(x_value(x_row, u_row, nw_ptr, rstd, 4 * u + 2, mask, NORM, GATED), a)
            q3 = quantize(x_value(x_row, u_row, nw_ptr, rstd, 4 * u + 3, mask, NORM, GATED), a)
            units = (q0 & 0xFF) | ((q1 & 0xFF) << 8) | ((q2 & 0xFF) << 16) | (q3 << 24)
            sums = (q0 + q1) + (q2 + q3)
        else:
            units = quantize(x_value(x_row, u_row, nw_ptr, rstd, u, mask, NORM, GATED), a)
            sums = units
    else:
        units = tl.load(x_row + u, mask=mask, other=0).to(tl.int32)
        if LANES == 4:
            sums = mac(tl.full(units.shape, 0x01010101, tl.int32), units, tl.zeros(units.shape, tl.int32), LANES, ASM)
        else:
            sums = units
    return units, sums


@triton.jit
def quarters(t):
    """t [A, B] -> four [A, B / 4]: units 4j, 4j + 2, 4j + 1, 4j + 3 (each thread's four
    consecutive units, the lanes of one 16-byte load, become one unit of each quarter: no data
    moves between threads)."""
    t = tl.reshape(t, (t.shape[0], t.shape[1] // 4, 2, 2))
    even, odd = tl.split(t)
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t2, t1, t3


@triton.jit
def mac_quarter(w, xu, acc, acc_b, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """acc [A, B, PA] += slice_units of w [A, B] times xu [A, B]; acc_b [A, B] for the fifth base-3 slice."""
    c, c_b = slice_units(w, P, LANES, ASM)
    acc = mac(c, xu[:, :, None], acc, LANES, ASM)
    if P == 5:
        acc_b = mac(c_b, xu, acc_b, LANES, ASM)
    return acc, acc_b


@triton.jit
def mac_tile(w, xu, acc, acc_b, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """acc [BR, BU / 4, PA] += slice_units of w [BR, BU] times xu [BR, BU], four units into each
    accumulator (so that a thread keeps PA accumulators per four units it loads, not per unit);
    acc_b [BR, BU / 4] likewise for the fifth base-3 slice."""
    w0, w1, w2, w3 = quarters(w)
    x0, x1, x2, x3 = quarters(xu)
    acc, acc_b = mac_quarter(w0, x0, acc, acc_b, P, LANES, ASM)
    acc, acc_b = mac_quarter(w1, x1, acc, acc_b, P, LANES, ASM)
    acc, acc_b = mac_quarter(w2, x2, acc, acc_b, P, LANES, ASM)
    acc, acc_b = mac_quarter(w3, x3, acc, acc_b, P, LANES, ASM)
    return acc, acc_b


@triton.jit
def segment_of(rows, R, R1, SEGMENTS: tl.constexpr):
    """Which of up to three matrices stacked along the packed rows each row belongs to: (in the
    second or later, in the third) as two masks; rows R .. R + R1 - 1 are the second's."""
    later = rows >= R
    if SEGMENTS == 3:
        third = rows >= R + R1
    else:
        third = rows < 0
    return later, third


@triton.jit
def by_segment(later, third, v0, v1, v2):
    """v0, v1 or v2 for each element by its matrix (segment_of's two masks)."""
    return tl.where(third, v2, tl.where(later, v1, v0))


# The interpreter's tile: 16 rows a program, as the tallest real tile (the interpreter's time goes by
# programs: 4 rows took a CPU test suite's decode steps 2.4x as long); 16 units, so that K > 64 loops.
@autotune(CONFIGS, key=["N", "K", "P", "QUANTIZE_X", "SEGMENTS", "N1", "N2", "NORM", "GATED"], prune=_prune,
          interpret_config=triton.Config({"BLOCK_R": 16, "BLOCK_U": 16}))
@triton.jit(do_not_specialize=SEGMENT_STARTS)
def _gemv_kernel(
    # pointers (scale1_ptr .. bias2_ptr: the second and third matrices', read if SEGMENTS > 1, > 2;
    # res_ptr: the residual stream, read if HAS_RES; nw_ptr, u_ptr: the RMSNorm's weight and the
    # gated MLP's up projection, read if NORM, GATED)
    x_ptr, a_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, scale1_ptr, bias1_ptr, scale2_ptr, bias2_ptr, res_ptr,
    nw_ptr, u_ptr, xq_ptr,
    # sizes (N1, R1, N2, R2: of the second and third matrices; W1, W2: where their packed weights
    # start, from w_ptr, in units of 16 units: 64 bytes on the word path, 16 on the byte path)
    N, K, R, N1, R1, N2, R2, W1, W2, eps,
    # strides (unit stride along K and N; stride_wr, and stride_xm of x_q, in units: words or bytes)
    stride_xm, stride_wr, stride_ym, stride_rm, stride_um,
    # constexpr
    P: tl.constexpr, QUANTIZE_X: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
    LANES: tl.constexpr, ASM: tl.constexpr, SEGMENTS: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, XQ_OUT: tl.constexpr, SUM_BLOCK: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """y[m, i*R + r] = (SC * sum_k code_i(w[r, k]) * x_q[m, k] - sum_k x_q[m, k]) * s / a[m] + bias.

    x_ptr: (M, K) float (fp32/bf16/fp16) if QUANTIZE_X; else int8 x_q (M, K), read as int32 words
        when LANES == 4, with a_ptr float32 (M,).
    w_ptr: the packed layout of layout.py, (R, K) uint8 read as is, R = ceil(N / P); with
        LANES == 4 read as int32 (R, K / 4), one word = 4 consecutive k. (The launcher passes the
        tensors as they are and the kernel casts the pointers: no host-side views, which cost
        two torch dispatches each on every call.)
    scale_ptr: float32 (1,), s = mean|W|; bias_ptr: (N,) any float dtype, read if HAS_BIAS.
    y_ptr: (M, N) in the output dtype, or int32 x_q . W_q^T itself if OUT_INT32 (a, s unused).
    SEGMENTS > 1: as many matrices of the same K and format in one launch (q / k / v, gate / up),
        each with its own packed weight (same row stride, at w_ptr + W1 and w_ptr + W2: offsets,
        not pointers, keep the loads 16 bytes wide), scale and bias; their packed rows are
        numbered one after the other (R, then R1, then R2) and their outputs side by side,
        y (M, N + N1 + N2).
    HAS_RES (SEGMENTS == 1): y = residual + y, res_ptr (M, N) of y's dtype (common.store_output).
    NORM (with QUANTIZE_X): x is the input of an RMSNorm (weight nw_ptr (K,), eps) whose output the
        kernel quantizes, the fused norm kernel's arithmetic (rmsnorm_quant.row_norm_scale: one pass
        over the row from L2 before the loop up to K = 4096, two beyond); with GATED the norm's
        input is relu(x)^2 * u, u_ptr (M, K) of x's dtype (row stride stride_um): the relu2 MLP.
        SUM_BLOCK = rmsnorm_quant.sum_block(K): the sum of squares in the norm kernel's order, so
        that every program, and rmsnorm_act_quant, computes the same rstd and a, bit for bit.
    XQ_OUT (with QUANTIZE_X; for tests): the first program of each row also stores the x_q it
        multiplied, xq_ptr int8 (M, K) contiguous, and its a at a_ptr (M,).
    ASM: dp4a by inline PTX (CUDA); else its plain Triton twin (interpreter).
    BLOCK_A: activations per step of the absmax pass (few, long steps: it waits on L2 each step).
    PDL: launched as a dependent (common.pdl): the first tile of weights is loaded before the wait
        for the previous kernel, everything else after it.
    Grid: (cdiv(R + R1 + R2, BLOCK_R), M); program (p, m) takes packed rows p*BLOCK_R + [0, BLOCK_R).
    """
    PA: tl.constexpr = 8 if P == 8 else 4
    PB: tl.constexpr = P - PA
    SC: tl.constexpr = 2 if P == 8 else 1
    pdl_start(PDL)
    m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if LANES == 4:
        w_ptr = w_ptr.to(tl.pointer_type(tl.int32))
        if not QUANTIZE_X:
            x_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    x_row = x_ptr + m * stride_xm

    # Each row's matrix: its base pointer, local row, packed rows, outputs and first output column.
    if SEGMENTS == 1:
        w_base = w_ptr
        offs_r = rows
        rows_in = R + 0 * rows
        cols = N + 0 * rows
        col0 = 0 * rows
        row_ok = rows < R
    else:
        later, third = segment_of(rows, R, R1, SEGMENTS)
        # offsets from w_ptr, scaled after the select: the compiler then knows every row starts on a
        # 16-element boundary and keeps the loads 16 bytes wide (a select of unscaled offsets loses it)
        w_base = by_segment(later, third, 0, W1, W2).to(tl.int64) * 16
        offs_r = rows - by_segment(later, third, 0, R, R + R1)
        rows_in = by_segment(later, third, R, R1, R2)
        cols = by_segment(later, third, N, N1, N2)
        col0 = by_segment(later, third, 0, N, N + N1)
        row_ok = rows < R + R1 + R2

    # Every load of a tile is issued before the math that needs the previous one: the first
    # tile's before the absmax pass, the next tile's before this one's dp4a.
    K_UNITS = K // LANES
    offs_u = tl.arange(0, BLOCK_U)
    if SEGMENTS == 1:
        w_ptrs = w_base + offs_r[:, None] * stride_wr + offs_u[None, :]
    else:
        w_ptrs = w_ptr + w_base[:, None] + offs_r[:, None] * stride_wr + offs_u[None, :]
    w_next = tl.load(w_ptrs, mask=row_ok[:, None] & (offs_u < K_UNITS)[None, :], other=0)
    pdl_wait(PDL)  # the weights are no kernel's output; the activations are the previous one's
    u_row = u_ptr + m * stride_um if GATED else u_ptr
    rstd = 1.0
    if QUANTIZE_X and NORM:
        rstd, a = row_norm_scale(x_row, u_row, nw_ptr, K, eps, GATED, x_ptr.dtype.element_ty, SUM_BLOCK, BLOCK_A)
    elif QUANTIZE_X:
        a = row_scale(x_row, K, BLOCK_A)
    elif not OUT_INT32:
        a = tl.load(a_ptr + m)
    else:
        a = 1.0

    acc = tl.zeros([BLOCK_R, BLOCK_U // 4, PA], tl.int32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_U // 4], tl.int32)  # used if PB > 0
    xsum = tl.zeros([BLOCK_R, BLOCK_U], tl.int32)
    # x_q as a [BLOCK_R, BLOCK_U] tile, every row the same units: the weights' own register layout,
    # so the dp4a operands meet in registers (a [1, BLOCK_U] row of 16-byte word loads, broadcast
    # over the rows, costs a shared-memory exchange and two barriers a step); rows past the first
    # hit L1. Float x, loaded element by element, is quantized as one [1, BLOCK_U] row that the
    # rows share: Triton lays it out as the weights, no exchange, and a tile of BLOCK_R rows
    # quantizes x once, not BLOCK_R times (sm_90, 2bit: 3.3 -> 1.16 instructions a weight at 8 rows).
    if QUANTIZE_X:
        x_offs = offs_u[None, :]
    else:
        x_offs = offs_u[None, :] + 0 * rows[:, None]
    x_next, s_next = x_units(x_row, x_offs, x_offs < K_UNITS, a, u_row, nw_ptr, rstd, QUANTIZE_X, LANES, ASM,
                             NORM, GATED)
    if XQ_OUT:
        xq_row = xq_ptr.to(tl.pointer_type(tl.int32)) + m * K_UNITS if LANES == 4 else xq_ptr + m * K_UNITS
        if tl.program_id(0) == 0:
            tl.store(a_ptr + m, a)
    for u0 in range(0, K_UNITS, BLOCK_U):
        w = w_next.to(tl.int32)
        xu = x_next
        if XQ_OUT:
            if tl.program_id(0) == 0:
                tl.store(xq_row + u0 + x_offs, xu.to(xq_row.dtype.element_ty), mask=u0 + x_offs < K_UNITS)
        xsum += s_next
        u1 = u0 + BLOCK_U
        if u1 < K_UNITS:
            w_next = tl.load(w_ptrs + u1, mask=row_ok[:, None] & (u1 + offs_u < K_UNITS)[None, :], other=0)
            x_next, s_next = x_units(x_row, u1 + x_offs, u1 + x_offs < K_UNITS, a, u_row, nw_ptr, rstd, QUANTIZE_X,
                                     LANES, ASM, NORM, GATED)
        acc, acc_b = mac_tile(w, xu, acc, acc_b, P, LANES, ASM)

    total = tl.sum(xsum, 1)  # (BR,): every row's is sum_k x_q[m, k]
    y_row = y_ptr + m * stride_ym
    r_row = res_ptr + m * stride_rm if HAS_RES else res_ptr
    if OUT_INT32:
        factor = 0.0 * total  # (BR,), unused
    elif SEGMENTS == 1:
        factor = tl.math.div_rn(tl.load(scale_ptr) + 0.0 * total, a)
    else:
        s = by_segment(later, third, tl.load(scale_ptr), tl.load(scale1_ptr), tl.load(scale2_ptr))
        factor = tl.math.div_rn(s, a)
    if not HAS_BIAS:
        bias_rows = bias_ptr  # None: store_output reads no bias
        bias_tile = bias_ptr
    elif SEGMENTS == 1:
        bias_rows = bias_ptr + 0 * rows
        bias_tile = bias_rows[:, None]
    else:
        bias_rows = by_segment(later, third, bias_ptr, bias1_ptr, bias2_ptr)
        bias_tile = bias_rows[:, None]
    sums, sums_b = code_sums(tl.sum(acc, 1), tl.sum(acc_b, 1), P)
    n = tl.arange(0, PA)[None, :] * rows_in[:, None] + offs_r[:, None]  # (BR, PA): outputs within their matrix
    store_output(y_row, bias_tile, n + col0[:, None], n, row_ok[:, None] & (n < cols[:, None]),
                 sums, total[:, None], factor[:, None], SC, HAS_BIAS, OUT_INT32, r_row, HAS_RES)
    if PB > 0:
        n = PA * rows_in + offs_r
        store_output(y_row, bias_rows, n + col0, n, row_ok & (n < cols), sums_b, total, factor,
                     SC, HAS_BIAS, OUT_INT32, r_row, HAS_RES)


def gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    fmt: str,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (M, K) @ W^T -> y (M, n), one program row per activation row (meant for M = 1).

    x float: quantized in the kernel (a must be None). x int8: x_q, with its a (M,) float32.
    out_dtype: x's dtype for float x; torch.int32 returns x_q . W_q^T, unscaled (scale unused).
    residual (M, n) of out_dtype: y = residual + (x @ W^T), the add in the epilogue.
    """
    return gemv_cat(x, [packed], [n], fmt, [scale], [bias], a, out_dtype, residual)


def gemv_cat(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    ns: list[int],
    fmt: str,
    scales: list[torch.Tensor | None],
    biases: list[torch.Tensor | None] | None = None,
    a: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    up: torch.Tensor | None = None,
    quantized_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Up to three matrices of one input in one launch: y (M, sum(ns)), matrix j's outputs in
    columns sum(ns[:j]) .. sum(ns[:j+1]) - 1, each equal to gemv() of that matrix alone (the same
    integers, the same epilogue). The matrices share K and the format; biases all or none.
    residual: one matrix only, as gemv's.

    norm_weight (K,): x (float) is an RMSNorm's input; its output, not x, is quantized and
    multiplied: rmsnorm_act_quant(x, norm_weight, eps) then the GEMV, in one launch (every program
    normalizes the row itself before its loop: rmsnorm_quant.row_norm_scale). With up (M, K) of x's dtype,
    unit stride along K: the norm's input is relu(x)^2 * up (the relu2 MLP's gate and up). Same
    arithmetic as rmsnorm_act_quant, the same summation order: the same x_q and a, bit for bit.

    quantized_out (float x; for tests): (x_q int8 (M, K), a float32 (M,)), contiguous, filled with
    the activations the kernel quantized and multiplied (after its norm, with norm_weight)."""
    biases = cat_biases("gemv_cat", packed, ns, scales, biases)
    quantize_x = x.is_floating_point()
    norm_weight = norm_args("GEMV", x, norm_weight, up)
    xq_out = None
    if quantized_out is not None:
        xq_out, a_out = quantized_out
        if not quantize_x or xq_out.dtype != torch.int8 or xq_out.shape != x.shape or not xq_out.is_contiguous() \
                or a_out.dtype != torch.float32 or a_out.numel() != x.shape[0] or not a_out.is_contiguous():
            raise ValueError("quantized_out must be (x_q int8 of x's shape, a float32 (M,)), contiguous, for float x")
    out_dtype = out_dtype or (x.dtype if quantize_x else None)
    m, k = x.shape
    if k > MAX_K:
        raise ValueError(f"gemv: K = {k} is above MAX_K = {MAX_K}, where its int32 sums stay exact; use gemm")
    if residual is not None and (len(packed) != 1 or residual.shape != (m, ns[0]) or residual.dtype != out_dtype
                                 or residual.stride(-1) != 1):
        raise ValueError(f"residual must be ({m}, {ns[0]}) {out_dtype} with unit stride along N, for one matrix; got "
                         f"{tuple(residual.shape)} {residual.dtype} for {len(packed)}")
    scales = list(scales)
    a, scales[0] = matmul_args(x, a, scales[0], biases[0], ns[0], out_dtype, quantized_in_kernel=quantize_x)
    if xq_out is not None:
        a = a_out  # written, not read
    for j in range(1, len(packed)):  # the activations are checked once; the other matrices' own arguments
        scales[j] = matmul_args(x, None, scales[j], biases[j], ns[j], out_dtype, quantized_in_kernel=True)[1]
    p = values_per_byte(fmt)
    packed = [check_packed(w, n, k, fmt) for w, n in zip(packed, ns)]
    # Words need 4-byte aligned rows; other K take the byte path. int8 activations are read as
    # words too (a fresh copy where their rows are not 4-byte aligned).
    lanes = 4 if k % 4 == 0 and all(w.storage_offset() % 4 == 0 for w in packed) else 1
    starts = segment_starts(packed, lanes)
    if starts is None:
        return torch.cat([gemv_cat(x, [w], [n], fmt, [s], [b], a, out_dtype, norm_weight=norm_weight, eps=eps, up=up,
                                   quantized_out=quantized_out) for w, n, s, b in zip(packed, ns, scales, biases)], 1)
    if lanes == 4 and not quantize_x and (x.storage_offset() % 4 or x.stride(0) % 4):
        x = x.clone(memory_format=torch.contiguous_format)
    y = torch.empty(m, sum(ns), dtype=out_dtype, device=x.device)
    rows = [w.shape[0] for w in packed]
    seg = len(packed)
    # Unused segments: the first one's pointers (never read) and no rows.
    scales, biases = (v + [v[0]] * (3 - seg) for v in (scales, biases))
    rows, ns = rows + [0] * (3 - seg), list(ns) + [0] * (3 - seg)
    grid = lambda meta: (cdiv(rows[0] + rows[1] + rows[2], meta["BLOCK_R"]), m)  # noqa: E731
    if m > 0:
        _gemv_kernel[grid](
            x, a, packed[0], scales[0], biases[0], y, scales[1], biases[1], scales[2], biases[2], residual,
            norm_weight, up, xq_out,
            ns[0], k, rows[0], ns[1], rows[1], ns[2], rows[2], starts[1], starts[2], float(eps),
            x.stride(0) // (1 if quantize_x else lanes), packed[0].stride(0) // lanes, y.stride(0),
            residual.stride(0) if residual is not None else 0, up.stride(0) if up is not None else 0,
            P=p, QUANTIZE_X=quantize_x, HAS_BIAS=biases[0] is not None, OUT_INT32=out_dtype == torch.int32,
            LANES=lanes, ASM=ptx(x), SEGMENTS=seg,
            HAS_RES=residual is not None, NORM=norm_weight is not None, GATED=up is not None, XQ_OUT=xq_out is not None,
            SUM_BLOCK=sum_block(k) if norm_weight is not None else 1,
            BLOCK_A=min(next_power_of_2(k), 64 if INTERPRET else 4096), **LAUNCH, **pdl(x),
        )
    return y


def reference_gemv(x, packed, scale, n, fmt, bias=None):
    """The torch reference: bitnet.packing.packed_linear_reference (unpack, exact integer matmul),
    the torch path of bitnet.ops (torch_bitlinear)."""
    return packed_linear_reference(x, packed, scale, n, fmt, bias)

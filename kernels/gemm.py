"""Tiled GEMM on int8 tensor cores: y = (x_q . W_q^T) * s / a (+ bias), for M > 1 (prefill, batches).

Each program computes a [BLOCK_M, BLOCK_N] output tile, BLOCK_N = PA * BLOCK_R features in PA
row-blocks R apart (layout.py). Per K step it loads an int8 activation tile [BLOCK_M, BLOCK_K] and
the packed tile [BLOCK_R, BLOCK_K] (as int32 words where K % 4 == 0), decodes it in registers into
the stacked int8 code tile [BLOCK_N, BLOCK_K] (one shift and one mask per four codes) and
accumulates one int8 x int8 -> int32 tl.dot (plus a [BLOCK_M, BLOCK_R] dot for the fifth base-3
slice of "1.6bit"). Exact: every partial sum is an integer of magnitude below 2^31.

Two regimes share the kernel; the autotuning key m_bucket (M rounded up to a power of two, so
that a new prompt length does not retune) picks the configs (_prune):
- small M (<= 64), memory-bound like the GEMV: BLOCK_M 16-64, long K steps, and split-K when the
  output tiles alone cannot fill the GPU (M = 16, N = 8192: 64 tiles of 128 features for 132
  SMs). Split programs add their int32 partial sums atomically into a zeroed workspace (exact and
  order-independent: integer addition; relaxed adds, fire and forget: Triton's default acq_rel
  fenced each, 16-64 round trips to L2 a thread one after another); the last to arrive at a tile,
  counted by an acq_rel counter after a barrier, applies the epilogue. Each weight is decoded once
  per program, for all its M rows.
- large M, compute-bound: 128 x 128/256 tiles, 3-4 pipeline stages, grouped program order so
  that programs sharing weight tiles run together and hit L2.

From M = UNPACK_M on (BITNET_UNPACK_GEMM_M, default 512; 0: never) the weights are unpacked first
(layout.unpack_cat: int8 (N, K), a temporary of N * K bytes) and a plain int8 GEMM runs on them
(_gemm_int8_kernel: both operands straight from memory into Triton's pipelined shared-memory
buffers). Why: in the kernel above the decoded tile goes from registers to shared memory every K
step, and Triton then waits for each step's wgmma before the next decode (sm_90 SASS of the
128 x 128 x 128 config: STS.128 x 4, three BAR.SYNC and WARPGROUP.DEPBAR.LE gsb0, 0x0 per step:
decode and tensor cores never overlap); at large M the unpack's extra traffic (N * K bytes written
and read back, ~10 us for 2560 x 6912 on an H200) is small beside the GEMM. A prediction from the
SASS, to be checked on a GPU (benchmarks/gpu_notes.md); the threshold is the knob. gemm_cat's
matrices (a prefill's q / k / v, gate / up) are unpacked into one buffer by one launch, rows one
after the other, and one launch multiplies them all (SEGMENTS: each output column takes its matrix's scale
and bias): a lone k_proj at M = 512 has 5 x 4 tiles of 128 x 128 for 132 SMs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from bitnet.packing import packed_rows
from bitnet.quant import int_matmul

from .activations import quantize
from .common import (INTERPRET, LAUNCH, autotune, cat_biases, cdiv, matmul_args, mma_sync, next_power_of_2, norm_args,
                     pdl, pdl_start, pdl_wait, ptx, SEGMENT_STARTS, segment_starts, shared_limit, store_output)
from .gemv import by_segment, segment_of
from .layout import check_packed, reference_unpack, row_block, unpack_checked, values_per_byte, weight_operand
from .rmsnorm_quant import norm_input, normed, normed_rows_scale, rmsnorm_act_quant, rows_rstd, sum_block

SMALL_M = 64


def _config(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_warps=warps, num_stages=stages)


# Tile shapes whose sm_90 code decodes in the fewest instructions per weight (1.2-1.5 for "2bit"),
# read off the SASS of the main loop, without register spills (also with split-K): narrower
# BLOCK_N spends more on layout shuffles than it saves.
NORM_TILE = _config(16, 128, 256, 4, 3)  # (also the norm-fused GEMM's first tile: below)
SMALL_M_CONFIGS = [
    _config(16, 128, 128, 4, 4), NORM_TILE, _config(16, 256, 128, 4, 3), _config(16, 256, 64, 4, 4),
    _config(32, 128, 128, 4, 4), _config(32, 256, 128, 4, 3), _config(64, 128, 256, 8, 3), _config(64, 256, 128, 8, 3),
]
LARGE_M_CONFIGS = [
    _config(128, 128, 128, 8, 3), _config(128, 256, 64, 8, 3), _config(128, 256, 128, 8, 3), _config(64, 256, 128, 8, 3),
    _config(128, 128, 64, 4, 4), _config(256, 128, 64, 8, 3),
]
INTERPRET_CONFIG = _config(16, 32, 32, 4, 1, group=2)


# With the RMSNorm inside (NORM), the loop's x tiles are float (and GATED's up tiles too): two
# tiles, 16 rows and 256-deep K steps, the only small-M tiles whose loop both supported Tritons keep
# short and free of spills (sm_90, 2B-4T's q/k/v and gated down flag sets, bf16). With K steps of
# 128 Triton 3.6 (the GPU machines') spills inside the loop (2946-7595 instructions a step, up to
# 1654 spill loads and stores); 32-row tiles spill 400-22000 bytes a thread under both.
# - NORM_TILE, 16 x 128 x 256 (3 stages): 2-bit q/k/v and down, 612-680 instructions a step with
#   Triton 3.9, 609-779 with 3.6, 195-228 registers; the tile every GPU fits (fp32 x gated: 116 KB
#   of shared memory, within sm_80's 163) and the one a lone config runs (BITNET_AUTOTUNE=first).
# - NORM_WIDE, 16 x 256 x 256 (2 stages): the x tile's normalization and quantization serve twice
#   the weights: 776-868 / 773-965 instructions a step, 37% fewer a weight in 2-bit, 22% in
#   1.6-bit, 3.2x fewer in 1-bit; 197-249 registers, no spill with 16-bit x (float32 x spills
#   150-450 B a thread on either tile).
#   Half the tiles along N, so half the programs where split-K is already at its cap (short K,
#   small N: 2B-4T's q/k/v and o): the autotuner times both.
NORM_WIDE = _config(16, 256, 256, 4, 2)
NORM_ONLY_CONFIGS = [NORM_WIDE]  # (small-M tiles for the norm-fused GEMM alone)


def norm_configs() -> list[triton.Config]:
    """The norm-fused GEMM's configs, NORM_TILE first."""
    return [NORM_TILE, NORM_WIDE]


@functools.cache
def norm_tile_shared(itemsize: int, gated: bool, wide: bool = False) -> int:
    """An upper bound of the shared memory (bytes) a norm-fused tile (NORM_TILE, or NORM_WIDE if
    `wide`) asks for with float x of `itemsize` bytes (and the gate's up tile), in any format: each
    stage's float x tiles and packed weights (at most a byte per 4 codes), the float tiles once more
    and the int8 x_q tile for the dot (measured: the same in every format since layout.weight_operand).
    The compile guard holds every variant it compiles to this bound. NORM_TILE: 16-bit x 60 KB,
    gated 92 KB (compiled: 52 and 68); float32 x 92 KB, gated 156 KB (compiled: 84 and 116), past
    the 99 KB of an A10, L4, L40S or RTX 30xx-50xx. NORM_WIDE (two stages): 16-bit x 60 KB, gated
    84 KB (compiled: 36 and 44); float32 x 84 KB, gated 132 KB (compiled: 52 and 68)."""
    config = NORM_WIDE if wide else NORM_TILE
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    x = bm * bk * itemsize * (2 if gated else 1)
    return config.num_stages * (x + bn * bk // 4) + x + bm * bk


def norm_tile_fits(x: torch.Tensor, gated: bool, wide: bool = False) -> bool:
    """Whether a norm-fused tile (NORM_TILE; NORM_WIDE if `wide`) fits the shared memory of x's
    device (common.shared_limit); where NORM_TILE does not, gemm_cat runs rmsnorm_act_quant first
    (the same bits), and where NORM_WIDE does not, the autotuner gets NORM_TILE alone."""
    limit = shared_limit(x.device)
    return limit is None or norm_tile_shared(x.dtype.itemsize, gated, wide) <= limit


def _prune(configs, named_args, **kwargs):
    """The configs of M's regime; at least 16-wide dots (1.6bit's fifth slice is BLOCK_N / 4); with
    the norm inside, its tiles that fit the device's shared memory (NORM_TILE first)."""
    if len(configs) == 1:
        return configs
    if kwargs.get("NORM"):
        x = named_args["x_ptr"]
        return [c for c in norm_configs() if c is NORM_TILE or norm_tile_fits(x, kwargs.get("GATED", False), True)]
    small = named_args["m_bucket"] <= SMALL_M
    pool = SMALL_M_CONFIGS if small else LARGE_M_CONFIGS
    return [c for c in pool if not small or c.kwargs["BLOCK_M"] <= max(16, named_args["m_bucket"])]


@triton.jit
def grouped_tile(num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program_id(0) in grouped order: GROUP_M row tiles walk the
    column (weight) tiles together, so that programs sharing weight tiles run together (L2 reuse)."""
    pid = tl.program_id(0)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % group_size, (pid % (GROUP_M * num_n)) // group_size


@triton.jit
def segment_epilogue(later, third, a_rows, scale_ptr, scale1_ptr, scale2_ptr, bias_ptr, bias1_ptr,
                     bias2_ptr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr):
    """(factor, bias) of store_output for output columns of several matrices (later, third: each
    column's matrix, (BLOCK,)): s / a[m] of the column's matrix (a_rows: the tile's a, (BLOCK_M,)),
    rounded as that matrix alone rounds it ([BLOCK_M, BLOCK] float32; 0.0 if OUT_INT32), and its
    bias pointers ([1, BLOCK])."""
    factor = 0.0
    if not OUT_INT32:
        a = a_rows[:, None]
        s = by_segment(later, third, tl.load(scale_ptr), tl.load(scale1_ptr), tl.load(scale2_ptr))
        factor = tl.math.div_rn(s[None, :] + 0.0 * a, a)
    bias = 0  # unread without HAS_BIAS (bias_ptr is None there: a None in a returned tuple does not compile)
    if HAS_BIAS:
        bias = by_segment(later, third, bias_ptr, bias1_ptr, bias2_ptr)[None, :]
    return factor, bias


@autotune(SMALL_M_CONFIGS + LARGE_M_CONFIGS + NORM_ONLY_CONFIGS,
          key=["m_bucket", "N", "K", "P", "SPLIT_K", "SEGMENTS", "N1", "N2", "NORM", "GATED"], prune=_prune,
          interpret_config=INTERPRET_CONFIG)
@triton.jit(do_not_specialize=SEGMENT_STARTS)
def _gemm_kernel(
    # pointers (scale1_ptr .. bias2_ptr: the second and third matrices', read if SEGMENTS > 1, > 2)
    x_ptr, a_ptr, xsum_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, scale1_ptr, bias1_ptr, scale2_ptr,
    bias2_ptr, res_ptr, nw_ptr, u_ptr,
    # sizes (m_bucket: autotuning key only; N1, R1, N2, R2, W1, W2 as in gemv._gemv_kernel)
    M, N, K, R, m_bucket, N1, R1, N2, R2, W1, W2, eps,
    # strides (unit stride along K and N; stride_wr in units of w_ptr's dtype)
    stride_xm, stride_wr, stride_ym, stride_rm, stride_um,
    # constexpr
    P: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr, LANES: tl.constexpr, SPLIT_K: tl.constexpr,
    SEGMENTS: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
    SUM_BLOCK: tl.constexpr, MMA_SYNC: tl.constexpr, ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, i*R + r] = (SC * sum_k x_q[m, k] * code_i(w[r, k]) - xsum[m]) * s / a[m] + bias.

    x_ptr: int8 (M, K) x_q; a_ptr: float32 (M,); xsum_ptr: int32 (M,) = sum_k x_q[m, k].
    w_ptr: the packed layout of layout.py, (R, K) uint8 read as is, R = ceil(N / P); with
        LANES == 4 the same bytes viewed as int32 (R, K / 4), one word = 4 consecutive k.
    scale_ptr: float32 (1,), s = mean|W|; bias_ptr: (N,) any float dtype, read if HAS_BIAS.
    y_ptr: (M, N) in the output dtype, or int32 x_q . W_q^T itself if OUT_INT32 (a, s unused).
    ws_ptr: int32 (M, N), count_ptr: int32 (one per tile), both zero, and left zero: used if SPLIT_K > 1.
    HAS_RES (SEGMENTS == 1): y = residual + y, res_ptr (M, N) of y's dtype with row stride stride_rm,
        unit stride along N (common.store_output): a batched decode step's or a prefill's skip connection.
    SEGMENTS > 1: as many matrices of one input in one launch (q / k / v, gate / up at a batched
        decode step), as gemv._gemv_kernel takes them: packed rows numbered R, then R1, then R2 (a
        tile may straddle two matrices: each row and output column finds its own), the second and
        third weights at w_ptr + 16 * W1 and + 16 * W2 units, outputs side by side in y (M, N + N1 + N2).
    NORM (a batched decode step, M <= SMALL_M): x_ptr is the float (M, K) input of an RMSNorm
        (weight nw_ptr (K,), eps; with GATED of relu(x)^2 * u, u_ptr (M, K) of x's dtype, row stride
        stride_um) whose output is quantized here, as gemv._gemv_kernel's NORM does at M = 1: every
        program first takes its rows' rstd and a (rmsnorm_quant.rows_rstd, normed_rows_scale: the
        norm kernel's arithmetic and summation order, SUM_BLOCK = sum_block(K)), then quantizes
        each x tile in its loop; a_ptr and xsum_ptr are unused (the row sums of x_q are taken
        in the loop and folded into the accumulator before the split-K sums).
    MMA_SYNC: the GPU runs every tile's dots on mma.sync (common.mma_sync): the order of "1.6bit"'s
        two dots (FIFTH_FIRST below); any value computes the same.
    ASM: the decode's byte permutes (base 3) and top bit slice by inline PTX (common.ptx; layout.decode).
    Grid: (cdiv(M, BLOCK_M) * cdiv(R + R1 + R2, BLOCK_N // PA), SPLIT_K), tiles grouped by GROUP_M
    along M; program (t, s) sums K steps [s * steps / SPLIT_K, (s + 1) * steps / SPLIT_K).
    """
    PA: tl.constexpr = 8 if P == 8 else 4
    PB: tl.constexpr = P - PA
    SC: tl.constexpr = 2 if P == 8 else 1
    BLOCK_R: tl.constexpr = BLOCK_N // PA
    BLOCK_U: tl.constexpr = BLOCK_K // LANES
    # "1.6bit"'s fifth slice has a dot of its own, and the order of the two dots in the loop decides
    # how often each weight is decoded. Under 64 rows the dots run on mma.sync (every GPU; sm_90's
    # wgmma takes 64 rows a warp group), whose operands Triton decodes in registers in the dot
    # operand's layout, and with two dots in a loop it lays the warps out by the first one it
    # lowers, the last in the loop: the fifth slice's [BLOCK_M, BLOCK_R] dot last put every warp on
    # M, and each warp decoded the whole tile (4 copies at 32 x 128 x 128: 2453 instructions a K
    # step on sm_90 with Triton 3.9, 2749 with 3.6; one copy: 681 and 815). The stacked dot last
    # puts the warps on N, one copy of each weight (compile_check.weight_tile_copies). From 64 rows
    # sm_90 runs wgmma from shared memory, one copy in either order; the old one kept its registers
    # (97 against 167 at 64 x 128 x 256). GPUs that run every tile on mma.sync (MMA_SYNC: sm_80, 86,
    # 89, 120) take the fifth slice first wherever the stacked dot is wider than it is tall (sm_80,
    # 64 x 128 x 256: 9653 instructions a step and 5.7 KB spilled a thread, against 1585 and none);
    # tiles as tall as wide (128 x 128, 256 x 128) put every warp on M in either order.
    FIFTH_FIRST: tl.constexpr = BLOCK_M < 64 or (MMA_SYNC and BLOCK_M < BLOCK_N)
    pdl_start(PDL)  # (common.pdl; the wait is below, before the first load)

    pid_m, pid_r = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(R + R1 + R2, BLOCK_R), GROUP_M)
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = tl.program_id(1) * steps * BLOCK_K
    k_hi = min(K, k_lo + steps * BLOCK_K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm
    if SEGMENTS == 1:
        w_ptrs = w_ptr + offs_r[:, None] * stride_wr
        row_ok = offs_r < R
    else:
        # each row's matrix: offsets from w_ptr scaled after the select (16-unit grains), as the GEMV does
        later, third = segment_of(offs_r, R, R1, SEGMENTS)
        w_base = by_segment(later, third, 0, W1, W2).to(tl.int64) * 16
        local = offs_r - by_segment(later, third, 0, R, R + R1)
        w_ptrs = w_ptr + w_base[:, None] + local[:, None] * stride_wr
        row_ok = offs_r < R + R1 + R2
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    if PB > 0:
        acc_b = tl.zeros([BLOCK_M, BLOCK_R], tl.int32)
    pdl_wait(PDL)
    if NORM:  # the rows' RMSNorm: rstd, then the normalized rows' scale a (two passes over them from L2)
        u_rows = u_ptr + offs_m[:, None] * stride_um if GATED else u_ptr
        rows_ok = (offs_m < M)[:, None]
        rstd = rows_rstd(x_ptrs, u_rows, rows_ok, K, eps, GATED, SUM_BLOCK)[:, None]
        a = normed_rows_scale(x_ptrs, u_rows, nw_ptr, rows_ok, K, rstd, GATED, x_ptr.dtype.element_ty, 256)
        xs = tl.zeros([BLOCK_M], tl.int32)  # sum_k x_q[m, k] over this program's k
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_u = k0 // LANES + tl.arange(0, BLOCK_U)
        x_mask = (offs_m < M)[:, None] & (offs_k < k_hi)[None, :]
        if NORM:
            h = normed(norm_input(x_ptrs, u_rows, offs_k[None, :], x_mask, GATED), nw_ptr, offs_k[None, :], x_mask, rstd,
                       x_ptr.dtype.element_ty)
            q = quantize(h, a[:, None])
            xs += tl.sum(q, 1)
            x = q.to(tl.int8)
        else:
            x = tl.load(x_ptrs + offs_k[None, :], mask=x_mask, other=0)
        w_mask = row_ok[:, None] & (offs_u < k_hi // LANES)[None, :]
        w = tl.load(w_ptrs + offs_u[None, :], mask=w_mask, other=0).to(tl.int32)
        if PB > 0 and FIFTH_FIRST:
            acc_b = tl.dot(x, tl.trans(weight_operand(w, k0, True, P, LANES, ASM)), acc_b, out_dtype=tl.int32)
        acc_a = tl.dot(x, tl.trans(weight_operand(w, k0, False, P, LANES, ASM)), acc_a, out_dtype=tl.int32)
        if PB > 0 and not FIFTH_FIRST:
            acc_b = tl.dot(x, tl.trans(weight_operand(w, k0, True, P, LANES, ASM)), acc_b, out_dtype=tl.int32)

    # Epilogue: accumulator column j of acc_a is feature (j // BLOCK_R) * R + pid_r * BLOCK_R + j % BLOCK_R
    # (with segments: of the matrix of that packed row, R its rows, its outputs from column col0 on).
    mask_m = offs_m < M
    j = tl.arange(0, BLOCK_N)
    r = pid_r * BLOCK_R + j % BLOCK_R
    if SEGMENTS == 1:
        n_a = (j // BLOCK_R) * R + r
        mask_a = mask_m[:, None] & ((r < R) & (n_a < N))[None, :]
        offs_a = offs_m[:, None] * stride_ym + n_a[None, :]
        n_b = PA * R + offs_r
        mask_b = mask_m[:, None] & ((offs_r < R) & (n_b < N))[None, :]
        offs_b = offs_m[:, None] * stride_ym + n_b[None, :]
    else:
        later_a, third_a = segment_of(r, R, R1, SEGMENTS)
        n_a = (j // BLOCK_R) * by_segment(later_a, third_a, R, R1, R2) + r \
            - by_segment(later_a, third_a, 0, R, R + R1)
        mask_a = mask_m[:, None] & ((r < R + R1 + R2) & (n_a < by_segment(later_a, third_a, N, N1, N2)))[None, :]
        offs_a = offs_m[:, None] * stride_ym + (n_a + by_segment(later_a, third_a, 0, N, N + N1))[None, :]
        n_b = PA * by_segment(later, third, R, R1, R2) + local
        mask_b = mask_m[:, None] & (row_ok & (n_b < by_segment(later, third, N, N1, N2)))[None, :]
        offs_b = offs_m[:, None] * stride_ym + (n_b + by_segment(later, third, 0, N, N + N1))[None, :]
    SCO: tl.constexpr = 1 if NORM else SC  # (store_output's: with NORM, the row sums are in the accumulators)
    if NORM:  # this program's share of SC * sum codes * x_q - sum x_q: its k's (exact, added up like the rest)
        acc_a = SC * acc_a - xs[:, None]
        if PB > 0:
            acc_b = SC * acc_b - xs[:, None]
    last = True
    if SPLIT_K > 1:
        # Partial sums into the workspace; the program that arrives last at this tile finishes it.
        # The adds order nothing (relaxed: REDs in flight together); the counter's release, after
        # the barrier, publishes every thread's adds, and its acquire orders the last program's
        # reads (the PTX memory model's cumulativity; compile_check.ORDERED_LIMIT holds it to one).
        tl.atomic_add(ws_ptr + offs_a, acc_a, mask=mask_a, sem="relaxed")
        if PB > 0:
            tl.atomic_add(ws_ptr + offs_b, acc_b, mask=mask_b, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the tile counts as arrived
        last = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        if SPLIT_K > 1:
            # Read the sums and leave the workspace and counter zero again: the autotuner reruns
            # the kernel on the same buffers.
            acc_a = tl.load(ws_ptr + offs_a, mask=mask_a, other=0, cache_modifier=".cg")
            tl.store(ws_ptr + offs_a, tl.zeros_like(acc_a), mask=mask_a)
            if PB > 0:
                acc_b = tl.load(ws_ptr + offs_b, mask=mask_b, other=0, cache_modifier=".cg")
                tl.store(ws_ptr + offs_b, tl.zeros_like(acc_b), mask=mask_b)
            tl.store(count_ptr + tl.program_id(0), 0)
        xsum = 0
        a_rows = 1.0  # (unread with OUT_INT32, where a_ptr is None)
        if NORM:
            a_rows = a
        else:
            xsum = tl.load(xsum_ptr + offs_m, mask=mask_m, other=0)[:, None]
            if not OUT_INT32:
                a_rows = tl.load(a_ptr + offs_m, mask=mask_m, other=1.0)
        if SEGMENTS == 1:
            if OUT_INT32:
                factor = 0.0
            else:
                factor = tl.math.div_rn(tl.load(scale_ptr), a_rows)[:, None]
            r_rows = res_ptr
            if HAS_RES:  # store_output reads res_ptr + y's offsets: rows of the residual's own stride
                r_rows = res_ptr + (offs_m * (stride_rm - stride_ym))[:, None]
            store_output(y_ptr, bias_ptr, offs_a, n_a[None, :], mask_a, acc_a, xsum, factor, SCO, HAS_BIAS, OUT_INT32,
                         r_rows, HAS_RES)
            if PB > 0:
                store_output(y_ptr, bias_ptr, offs_b, n_b[None, :], mask_b, acc_b, xsum, factor, SCO, HAS_BIAS, OUT_INT32,
                             r_rows, HAS_RES)
        else:  # per column: its matrix's scale and bias
            factor_a, bias_a = segment_epilogue(later_a, third_a, a_rows, scale_ptr, scale1_ptr, scale2_ptr,
                                                bias_ptr, bias1_ptr, bias2_ptr, HAS_BIAS, OUT_INT32)
            store_output(y_ptr, bias_a, offs_a, n_a[None, :], mask_a, acc_a, xsum, factor_a, SCO, HAS_BIAS, OUT_INT32)
            if PB > 0:
                factor_b, bias_b = segment_epilogue(later, third, a_rows, scale_ptr, scale1_ptr, scale2_ptr,
                                                    bias_ptr, bias1_ptr, bias2_ptr, HAS_BIAS, OUT_INT32)
                store_output(y_ptr, bias_b, offs_b, n_b[None, :], mask_b, acc_b, xsum, factor_b, SCO, HAS_BIAS, OUT_INT32)


UNPACK_M = int(os.environ.get("BITNET_UNPACK_GEMM_M", "512"))  # read at import, like INTERPRET
# Up to this M, rmsnorm_packed_matmul_cat runs the RMSNorm inside the GEMM (NORM; at most SMALL_M;
# 0: never, one rmsnorm_act_quant launch first). The trade, from the sm_90 SASS at 16 x 128 x 128:
# the loop quantizes its float x tiles (564 instructions a step against 180), once per column tile
# of the launch, and each program reads its rows twice from L2 before it, against a norm launch of
# its own (one read of each row up to K = 4096, three passes beyond) and its boundary;
# BITNET_GEMM_NORM_M=0 is the A/B on a GPU.
GEMM_NORM_M = min(SMALL_M, int(os.environ.get("BITNET_GEMM_NORM_M", str(SMALL_M))))

# BLOCK_K 256 in two stages: twice the tensor-core work per loop step for the same loop overhead
# (_gemm_int8_kernel's loop comment), 128 KB of shared memory (sm_80 allows 163 KB).
INT8_CONFIGS = [
    _config(128, 128, 128, 8, 3), _config(128, 256, 128, 8, 3), _config(128, 128, 256, 8, 2), _config(256, 128, 128, 8, 3),
    _config(128, 128, 64, 4, 4), _config(128, 256, 64, 8, 4), _config(64, 128, 128, 4, 4),
]


@autotune(INT8_CONFIGS, key=["m_bucket", "N", "K", "SEGMENTS", "N1", "N2"], interpret_config=INTERPRET_CONFIG)
@triton.jit
def _gemm_int8_kernel(
    # pointers (scale1_ptr .. bias2_ptr: the second and third matrices', read if SEGMENTS > 1, > 2)
    x_ptr, a_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, scale1_ptr, bias1_ptr, scale2_ptr, bias2_ptr, res_ptr,
    # sizes (m_bucket: autotuning key only; N1, N2: the second and third matrices' rows)
    M, N, K, m_bucket, N1, N2,
    # strides (unit stride along K and N)
    stride_xm, stride_wn, stride_ym, stride_rm,
    # constexpr
    HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr, SEGMENTS: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * s / a[m] + bias[n]: the unpacked weights' GEMM.

    x_ptr: int8 (M, K) x_q; a_ptr: float32 (M,); w_ptr: int8 (N + N1 + N2, K) W_q itself
    (layout.unpack_cat), the matrices' rows one after the other; scale_ptr, bias_ptr, y_ptr, and
    res_ptr, stride_rm, HAS_RES (one matrix) as in _gemm_kernel. SEGMENTS > 1: output column n
    belongs to the matrix whose rows hold it, and takes that matrix's scale and bias (q / k / v in
    one launch at a prefill: k and v alone fill a fraction of the SMs). Grid: cdiv(M, BLOCK_M) * cdiv(N + N1 + N2, BLOCK_N) programs, grouped
    by GROUP_M along M. PDL: launched as a dependent (common.pdl), it reads nothing before the wait:
    x_q and the unpacked weights are the kernel before's output.
    """
    pdl_start(PDL)
    NT = N + N1 + N2
    pid_m, pid_n = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(NT, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Unmasked loads in the loop: a tile's rows past M (columns past NT) read row m % M (n % NT),
    # whose products are never stored, and the loop runs over whole K tiles, the rest after it.
    # Triton waits for each step's int32-accumulating wgmma before the next (only float32
    # accumulators are left in flight), so the loop's own instructions are tensor-core idle time:
    # the masks' selects and compares were a third of them (sm_90 SASS, benchmarks/gpu_notes.md).
    rows_m = offs_m % M
    rows_n = offs_n % NT
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    k_whole = K - K % BLOCK_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    pdl_wait(PDL)
    for _ in range(0, k_whole, BLOCK_K):
        acc = tl.dot(tl.load(x_ptrs), tl.trans(tl.load(w_ptrs)), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if k_whole < K:  # the last, partial K tile (pointers made afresh: the loop's, kept live, would spill)
        offs_k = k_whole + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :], mask=(offs_k < K)[None, :], other=0)
        w = tl.load(w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :], mask=(offs_k < K)[None, :], other=0)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)

    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_n < NT)[None, :]
    offs_y = offs_m[:, None] * stride_ym + offs_n[None, :]
    # weights, not codes: SC = 1 and no row sum to subtract
    if SEGMENTS == 1:
        if OUT_INT32:
            factor = 0.0
        else:
            factor = tl.math.div_rn(tl.load(scale_ptr), tl.load(a_ptr + offs_m, mask=mask_m, other=1.0))[:, None]
        r_rows = res_ptr
        if HAS_RES:  # store_output reads res_ptr + y's offsets: rows of the residual's own stride
            r_rows = res_ptr + (offs_m * (stride_rm - stride_ym))[:, None]
        store_output(y_ptr, bias_ptr, offs_y, offs_n[None, :], mask, acc, 0, factor, 1, HAS_BIAS, OUT_INT32, r_rows, HAS_RES)
    else:  # per column: its matrix's scale and bias, the bias indexed by the column within its matrix
        later, third = segment_of(offs_n, N, N1, SEGMENTS)
        a_rows = 1.0  # (unread with OUT_INT32, where a_ptr is None)
        if not OUT_INT32:
            a_rows = tl.load(a_ptr + offs_m, mask=mask_m, other=1.0)
        factor, bias = segment_epilogue(later, third, a_rows, scale_ptr, scale1_ptr, scale2_ptr,
                                        bias_ptr, bias1_ptr, bias2_ptr, HAS_BIAS, OUT_INT32)
        local = offs_n - by_segment(later, third, 0, N, N + N1)
        store_output(y_ptr, bias, offs_y, local[None, :], mask, acc, 0, factor, 1, HAS_BIAS, OUT_INT32)


def gemm_unpacked(x_q: torch.Tensor, packed: list[torch.Tensor], ns: list[int], fmt: str, y: torch.Tensor,
                  a: torch.Tensor | None, scales: list, biases: list, residual: torch.Tensor | None = None,
                  unpacked: torch.Tensor | None = None) -> torch.Tensor:
    """y = x_q @ unpack(packed)^T with gemm's epilogue (+ residual), into y (M, sum(ns)) (checked by
    gemm_cat): up to three matrices unpacked into one int8 (sum(ns), K) buffer by one launch, one
    GEMM launch over all (unpacked: the buffer unpack_cat would give, made by the caller)."""
    m, k = x_q.shape
    total = sum(ns)
    w = unpack_checked(packed, ns, fmt) if unpacked is None else unpacked  # (gemm_cat checked them)
    seg = len(packed)
    sizes = list(ns) + [0] * (3 - seg)
    scales, biases = (list(v) + [v[0]] * (3 - seg) for v in (scales, biases))  # unused segments: the first's pointers
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(total, meta["BLOCK_N"]),)  # noqa: E731
    _gemm_int8_kernel[grid](
        x_q, a, w, scales[0], biases[0], y, scales[1], biases[1], scales[2], biases[2], residual,
        m, sizes[0], k, next_power_of_2(m), sizes[1], sizes[2],
        x_q.stride(0), w.stride(0), y.stride(0), 0 if residual is None else residual.stride(0),
        HAS_BIAS=biases[0] is not None, OUT_INT32=y.dtype == torch.int32, SEGMENTS=seg, HAS_RES=residual is not None,
        **LAUNCH, **pdl(x_q),
    )
    return y


_WORKSPACES: dict = {}


def zeroed_workspace(size: int, device: torch.device) -> torch.Tensor:
    """An int32 buffer of `size` zeros for split-K's partial sums and counters. The kernel leaves
    every element it touches zero again, so one buffer per device and stream is reused from call to
    call (no memset launch per GEMM: a batched decode step runs dozens of small-M GEMMs). While a
    CUDA graph is being captured a fresh zeroed buffer is made instead (the graph owns it; a cached
    one could be replaced, growing, under a graph that still points at it)."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(size, dtype=torch.int32, device=device)
        key = (device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device, None)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 1 << 16), dtype=torch.int32, device=device)
        _WORKSPACES[key] = buf
    return buf[:size]


# At most this many splits along K (BITNET_GEMM_SPLIT_K, read at import; 1: never split): the knob of
# bench_kernels' "one split" rows, the GPU's A/B of split_k's rule.
SPLIT_K_MAX = int(os.environ.get("BITNET_GEMM_SPLIT_K", "64"))


def multiprocessors(device: torch.device) -> int:
    """The SMs split_k fills on `device`: the GPU's; 4 on a CPU and under the interpreter (a stand-in
    driver's compiles put a GPU's count here: benchmarks/warm_triton_cache.py)."""
    return 4 if INTERPRET or device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def split_k(m: int, r: int, k: int, pa: int, device: torch.device) -> int:
    """How many programs share each output tile along K (a power of two, at most SPLIT_K_MAX):
    enough for one program per SM with the smallest small-M tile (16 x 128), each with at least
    512 of K. The interpreter plays a 4-SM device with splits of 32, so that CI's small shapes
    split too."""
    if m > SMALL_M:
        return 1
    sms = multiprocessors(device)
    min_k = 32 if INTERPRET else 512
    tiles = cdiv(m, 16) * cdiv(r * pa, 128)
    split = 1
    while tiles * split < sms and split * 2 <= SPLIT_K_MAX and k // (split * 2) >= min_k:
        split *= 2
    return split


def splits(m: int, n: int, k: int, fmt: str, device: torch.device) -> int:
    """The splits along K that gemm launches one n x k matrix in fmt with at M = m."""
    return split_k(m, packed_rows(n, fmt), k, row_block(values_per_byte(fmt)), device)


def gemm(
    x_q: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    fmt: str,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    xsum: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_q (M, K) int8 @ W^T -> y (M, n) in out_dtype; torch.int32 gives x_q . W_q^T unscaled.

    a (M,) float32 is needed for a scaled output; xsum (M,) int32 = x_q.sum(-1) is computed here
    when not given (act_quant gives it for free). out: where to write y, (M, n) of out_dtype with
    unit stride along n (e.g. a column block of a wider output); a new tensor if None. residual
    (M, n) of out_dtype, unit stride along n: y = residual + y, added in the epilogue as torch adds
    (a decoder layer's skip connection: no launch of its own).
    """
    return gemm_cat(x_q, [packed], [n], fmt, [scale], [bias], a, xsum, out_dtype, out, residual)


def gemm_cat(
    x_q: torch.Tensor,
    packed: list[torch.Tensor],
    ns: list[int],
    fmt: str,
    scales: list[torch.Tensor | None],
    biases: list[torch.Tensor | None] | None = None,
    a: torch.Tensor | None = None,
    xsum: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    unpacked: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    up: torch.Tensor | None = None,
) -> torch.Tensor:
    """Up to three matrices of one input in one launch: y (M, sum(ns)), matrix j's outputs in
    columns sum(ns[:j]) .. sum(ns[:j+1]) - 1, each equal to gemm() of that matrix alone (the same
    integers, the same epilogue). The matrices share K and the format; biases all or none. Below
    UNPACK_M, matrices whose packed weights do not sit on 16-unit grains of the first's run one
    launch each; from UNPACK_M on they are unpacked into one buffer (gemm_unpacked) and need not.
    residual (one matrix): as gemm's. unpacked (from UNPACK_M on): that buffer, int8 (sum(ns), K)
    as unpack_cat gives it, already made (rmsnorm_quant.rmsnorm_act_quant_unpack: in the launch that
    quantized x_q); ignored below UNPACK_M.

    norm_weight (K,) (a batched decode step, M <= SMALL_M): x_q is then the float input of an
    RMSNorm (eps; with up (M, K) of its dtype, unit stride along K, of relu(x)^2 * up) whose
    output is quantized and multiplied, as gemv_cat's norm_weight does at M = 1: every program
    normalizes and quantizes its rows itself (the norm kernel's arithmetic and summation order:
    rmsnorm_act_quant's x_q and a, bit for bit), a and xsum unused."""
    norm_weight = norm_args("GEMM", x_q, norm_weight, up)
    norm = norm_weight is not None
    m, k = x_q.shape
    if norm and (out_dtype == torch.int32 or m > SMALL_M or 0 < UNPACK_M <= m):
        raise ValueError(f"an RMSNorm in the GEMM is for a float output and M <= {SMALL_M} (below "
                         f"BITNET_UNPACK_GEMM_M = {UNPACK_M}), got {out_dtype} and M = {m}: "
                         f"rmsnorm_act_quant, then the GEMM")
    if norm and not norm_tile_fits(x_q, up is not None):  # (less shared memory: norm apart)
        x_q, a, xsum = rmsnorm_act_quant(x_q, norm_weight, eps, up)
        xsum, norm_weight, up, norm = xsum.reshape(-1), None, None, False
    if not norm and x_q.dtype != torch.int8:
        raise ValueError(f"gemm takes int8 activations, got {x_q.dtype}")
    biases = cat_biases("gemm_cat", packed, ns, scales, biases)
    total = sum(ns)
    a, scale0 = matmul_args(x_q, a, scales[0], biases[0], ns[0], out_dtype, quantized_in_kernel=norm)
    scales = [scale0] + [matmul_args(x_q, a, s, b, n, out_dtype, quantized_in_kernel=norm)[1]
                         for s, b, n in zip(scales[1:], biases[1:], ns[1:])]
    if out is None:
        y = torch.empty(x_q.shape[0], total, dtype=out_dtype, device=x_q.device)
    else:
        if out.shape != (x_q.shape[0], total) or out.dtype != out_dtype or (total > 1 and out.stride(1) != 1):
            raise ValueError(f"out must be ({x_q.shape[0]}, {total}) {out_dtype} with unit stride along n, "
                             f"got {tuple(out.shape)} {out.dtype} {out.stride()}")
        y = out
    if residual is not None and (len(packed) != 1 or out_dtype == torch.int32 or residual.dtype != out_dtype
                                 or residual.shape != y.shape or (total > 1 and residual.stride(1) != 1)):
        raise ValueError(f"residual must be ({x_q.shape[0]}, {total}) {out_dtype} with unit stride along n, one matrix "
                         f"and a float output; got {len(packed)} matrices, {out_dtype} output, residual "
                         f"{tuple(residual.shape)} {residual.dtype} {residual.stride()}")
    if residual is not None and (residual.device != x_q.device or residual.data_ptr() == y.data_ptr()):
        raise ValueError(f"residual must be on {x_q.device} and apart from the output (autotuning reruns the kernel), "
                         f"got {residual.device}{' and the output itself' if residual.data_ptr() == y.data_ptr() else ''}")
    if 0 < UNPACK_M <= m and unpacked is not None:  # (the packed weights are not read: checked by whoever unpacked them)
        if unpacked.shape != (total, k) or unpacked.dtype != torch.int8 or not unpacked.is_contiguous():
            raise ValueError(f"unpacked must be the contiguous int8 ({total}, {k}) weights, got {unpacked.dtype} "
                             f"{tuple(unpacked.shape)} {unpacked.stride()}")
        return gemm_unpacked(x_q, packed, ns, fmt, y, a, scales, biases, residual, unpacked)
    packed = [check_packed(w, n, k, fmt) for w, n in zip(packed, ns)]
    if m == 0:
        return y
    if 0 < UNPACK_M <= m:
        return gemm_unpacked(x_q, packed, ns, fmt, y, a, scales, biases, residual)
    lanes = 4 if k % 4 == 0 and all(w.storage_offset() % 4 == 0 for w in packed) else 1
    starts = segment_starts(packed, lanes)
    if starts is None and len(packed) > 1:
        col = 0  # one launch a matrix, into its columns of y
        for w, n, s, b in zip(packed, ns, scales, biases):
            gemm_cat(x_q, [w], [n], fmt, [s], [b], a, xsum, out_dtype, y[:, col:col + n], norm_weight=norm_weight, eps=eps,
                     up=up)
            col += n
        return y
    if xsum is None and not norm:
        xsum = x_q.sum(-1, dtype=torch.int32)
    p = values_per_byte(fmt)
    pa = row_block(p)
    seg = len(packed)
    rows = [w.shape[0] for w in packed] + [0] * (3 - seg)
    sizes = list(ns) + [0] * (3 - seg)
    scales, biases = (v + [v[0]] * (3 - seg) for v in (scales, biases))  # unused segments: the first's pointers
    w = packed[0].view(torch.int32) if lanes == 4 else packed[0]
    r = sum(rows)
    splits = split_k(m, r, k, pa, x_q.device)
    ws = count = None
    if splits > 1:
        # One zeroed buffer: the (M, N) partial sums, indexed as y is (its row stride: a column
        # block of a wider output has a longer one), then a counter for every possible tile
        # (BLOCK_M >= 16 and BLOCK_N // PA >= 4 in every config).
        tiles = cdiv(m, 16) * cdiv(r, 4)
        size = (m - 1) * y.stride(0) + total
        buf = zeroed_workspace(size + tiles, x_q.device)
        ws, count = buf[:size], buf[size:]
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(r, meta["BLOCK_N"] // pa), splits)  # noqa: E731
    _gemm_kernel[grid](
        x_q, a, xsum, w, scales[0], biases[0], y, ws, count, scales[1], biases[1], scales[2], biases[2], residual,
        norm_weight, up,
        m, sizes[0], k, rows[0], next_power_of_2(m), sizes[1], rows[1], sizes[2], rows[2], starts[1], starts[2], float(eps),
        x_q.stride(0), w.stride(0), y.stride(0), 0 if residual is None else residual.stride(0),
        0 if up is None else up.stride(0),
        P=p, HAS_BIAS=biases[0] is not None, OUT_INT32=out_dtype == torch.int32, LANES=lanes, SPLIT_K=splits,
        SEGMENTS=seg, HAS_RES=residual is not None, NORM=norm, GATED=up is not None,
        SUM_BLOCK=sum_block(k) if norm else 1, ASM=ptx(x_q), **LAUNCH, **pdl(x_q), **mma_sync(x_q),
    )
    return y


def reference_gemm(x_q, packed, n, fmt, scale=None, a=None, bias=None, out_dtype=torch.float32):
    """The torch reference: unpack, exact integer matmul (bitnet.quant.int_matmul: exact on any
    device; int64 has no CUDA matmul), the same float32 epilogue."""
    acc = int_matmul(x_q, reference_unpack(packed, n, fmt))
    if out_dtype == torch.int32:
        return acc
    y = (acc.float() * (scale.float().reshape(()) / a.reshape(-1, 1).float())).to(out_dtype)
    return y if bias is None else y + bias.to(out_dtype)

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
  consecutive k of one packed row, so one shift and one mask give the codes of one slice at four
  k in four byte lanes, the operand of dp4a (four int8 products and a sum, one instruction)
  against four packed activations. Base 3 takes about twice that (layout.py). Other K take a
  byte path: one code and one multiply-add per weight.
- The activations arrive as int32 words too, with no re-packing through shared memory (which cost
  two barriers a step): int8 x_q (act_quant's, or rmsnorm_act_quant's: the model quantizes once
  per RMSNorm for all the projections it feeds) is read as words; float x is loaded as four
  k-strided vectors in the words' own register layout, quantized and shifted into bytes in place
  (its row's absmax comes first, one pass over the row from L2). The row sum of x_q comes from one
  more dp4a per word (against 0x01010101).
- The P slices are tl.join-ed into a trailing dimension held in each thread's registers and
  reduced over K once, after the loop: no split-K partial sums, exact int32 throughout.
The dp4a is PTX inline assembly on CUDA; the interpreter, which cannot run assembly, computes the
same sum of four lane products in plain Triton (mac below).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet.packing import packed_linear_reference

from .activations import quantize, row_scale
from .common import INTERPRET, LAUNCH, autotune, cdiv, matmul_output, next_power_of_2, store_output
from .layout import check_packed, decode, joined_codes, values_per_byte

# (BLOCK_R, BLOCK_U, num_warps): packed rows and units per tile, 4-8 units (1-2 16-byte loads) a
# thread and row. Wide tiles cover a whole row in one step (no loop); narrow ones give programs
# enough to fill 132 SMs where rows are short (N = 6912, K = 2560: 640 words a row).
TILES = [
    (1, 2048, 8), (1, 1024, 4), (1, 1024, 8), (2, 1024, 8), (2, 512, 4), (4, 512, 8),
    (4, 256, 4), (8, 256, 8), (8, 128, 4), (16, 128, 8),
]
CONFIGS = [triton.Config({"BLOCK_R": br, "BLOCK_U": bu}, num_warps=w) for br, bu, w in TILES]


def _prune(configs, named_args, **kwargs):
    """Tiles no wider than the row needs (a wider one only loads masked-off lanes); one packed row
    a program where the kernel quantizes x (each row of a tile would quantize it again)."""
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    units = args["K"] // args.get("LANES", 1)
    fit = [c for c in configs if c.kwargs["BLOCK_U"] <= max(128, next_power_of_2(units))
           and (c.kwargs["BLOCK_R"] == 1 or not args.get("QUANTIZE_X", False))]
    return fit or configs


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
def x_units(x_row, u, mask, a, QUANTIZE_X: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """The activations' units at unit offsets u (any shape): int32 words of four int8 x_q
    (little-endian, k = 4u .. 4u + 3) when LANES == 4, single x_q when LANES == 1; and the sum of
    each unit's x_q.

    QUANTIZE_X: x_row points at float x, quantized here with the row's scale a; the four k of a
    word are loaded as four vectors of u's shape, so the word is assembled in registers.
    Else x_row points at x_q: as int32 words when LANES == 4, as int8 when LANES == 1.
    """
    if QUANTIZE_X:
        if LANES == 4:
            q0 = quantize(tl.load(x_row + 4 * u, mask=mask, other=0.0).to(tl.float32), a)
            q1 = quantize(tl.load(x_row + 4 * u + 1, mask=mask, other=0.0).to(tl.float32), a)
            q2 = quantize(tl.load(x_row + 4 * u + 2, mask=mask, other=0.0).to(tl.float32), a)
            q3 = quantize(tl.load(x_row + 4 * u + 3, mask=mask, other=0.0).to(tl.float32), a)
            units = (q0 & 0xFF) | ((q1 & 0xFF) << 8) | ((q2 & 0xFF) << 16) | (q3 << 24)
            sums = (q0 + q1) + (q2 + q3)
        else:
            units = quantize(tl.load(x_row + u, mask=mask, other=0.0).to(tl.float32), a)
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
def mac_tile(w, xu, acc, acc_b, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """acc [BR, BU / 4, PA] += the codes of slices 0..PA-1 of w [BR, BU] times xu [BR, BU], four
    units into each accumulator (so that a thread keeps PA accumulators per four units it loads,
    not per unit); acc_b [BR, BU / 4] likewise for the fifth base-3 slice."""
    PA: tl.constexpr = 8 if P == 8 else 4
    PB: tl.constexpr = P - PA
    w0, w1, w2, w3 = quarters(w)
    x0, x1, x2, x3 = quarters(xu)
    acc = mac(joined_codes(w0, P, LANES, False), x0[:, :, None], acc, LANES, ASM)
    acc = mac(joined_codes(w1, P, LANES, False), x1[:, :, None], acc, LANES, ASM)
    acc = mac(joined_codes(w2, P, LANES, False), x2[:, :, None], acc, LANES, ASM)
    acc = mac(joined_codes(w3, P, LANES, False), x3[:, :, None], acc, LANES, ASM)
    if PB > 0:
        acc_b = mac(decode(w0, PA, P, LANES), x0, acc_b, LANES, ASM)
        acc_b = mac(decode(w1, PA, P, LANES), x1, acc_b, LANES, ASM)
        acc_b = mac(decode(w2, PA, P, LANES), x2, acc_b, LANES, ASM)
        acc_b = mac(decode(w3, PA, P, LANES), x3, acc_b, LANES, ASM)
    return acc, acc_b


@autotune(CONFIGS, key=["N", "K", "P", "QUANTIZE_X"], prune=_prune,
          interpret_config=triton.Config({"BLOCK_R": 4, "BLOCK_U": 16}))
@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr, a_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr,
    # sizes
    N, K, R,
    # strides (unit stride along K and N; stride_xm and stride_wr in units of their pointers' dtypes)
    stride_xm, stride_wr, stride_ym,
    # constexpr
    P: tl.constexpr, QUANTIZE_X: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
    LANES: tl.constexpr, ASM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """y[m, i*R + r] = (SC * sum_k code_i(w[r, k]) * x_q[m, k] - sum_k x_q[m, k]) * s / a[m] + bias.

    x_ptr: (M, K) float (fp32/bf16/fp16) if QUANTIZE_X; else x_q, as int32 words (M, K / 4) when
        LANES == 4, as int8 (M, K) when LANES == 1, with a_ptr float32 (M,).
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

    # Every load of a tile is issued before the math that needs the previous one: the first
    # tile's before the absmax pass, the next tile's before this one's dp4a.
    K_UNITS = K // LANES
    offs_u = tl.arange(0, BLOCK_U)
    row_ok = (offs_r < R)[:, None]
    w_ptrs = w_ptr + offs_r[:, None] * stride_wr + offs_u[None, :]
    w_next = tl.load(w_ptrs, mask=row_ok & (offs_u < K_UNITS)[None, :], other=0)
    if QUANTIZE_X:
        a = row_scale(x_row, K, BLOCK_A)
    elif not OUT_INT32:
        a = tl.load(a_ptr + m)
    else:
        a = 1.0

    acc = tl.zeros([BLOCK_R, BLOCK_U // 4, PA], tl.int32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_U // 4], tl.int32)  # used if PB > 0
    xsum = tl.zeros([BLOCK_R, BLOCK_U], tl.int32)
    # The activations as a [BLOCK_R, BLOCK_U] tile, every row the same units: the weights' own
    # register layout, so the dp4a operands meet in registers (a [BLOCK_U] vector broadcast over
    # the rows costs a shared-memory exchange and two barriers a step); rows past the first hit L1.
    x_offs = offs_u[None, :] + 0 * offs_r[:, None]
    x_next, s_next = x_units(x_row, x_offs, x_offs < K_UNITS, a, QUANTIZE_X, LANES, ASM)
    for u0 in range(0, K_UNITS, BLOCK_U):
        w = w_next.to(tl.int32)
        xu = x_next
        xsum += s_next
        u1 = u0 + BLOCK_U
        if u1 < K_UNITS:
            w_next = tl.load(w_ptrs + u1, mask=row_ok & (u1 + offs_u < K_UNITS)[None, :], other=0)
            x_next, s_next = x_units(x_row, u1 + x_offs, u1 + x_offs < K_UNITS, a, QUANTIZE_X, LANES, ASM)
        acc, acc_b = mac_tile(w, xu, acc, acc_b, P, LANES, ASM)

    total = tl.sum(xsum, 1)  # (BR,): every row's is sum_k x_q[m, k]
    factor = tl.math.div_rn(tl.load(scale_ptr), a) if not OUT_INT32 else 0.0
    y_row = y_ptr + m * stride_ym
    n = tl.arange(0, PA)[None, :] * R + offs_r[:, None]  # (BR, PA)
    store_output(y_row, bias_ptr, n, n, (offs_r < R)[:, None] & (n < N), tl.sum(acc, 1), total[:, None], factor,
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
    # Words need 4-byte aligned rows; other K take the byte path. int8 activations are read as
    # words too (a fresh copy where their rows are not 4-byte aligned).
    lanes = 4 if k % 4 == 0 and packed.storage_offset() % 4 == 0 else 1
    w = packed.view(torch.int32) if lanes == 4 else packed
    if lanes == 4 and not quantize_x:
        if x.storage_offset() % 4 or x.stride(0) % 4:
            x = x.clone(memory_format=torch.contiguous_format)
        x = x.view(torch.int32)
    grid = lambda meta: (cdiv(packed.shape[0], meta["BLOCK_R"]), m)  # noqa: E731
    if m > 0:
        _gemv_kernel[grid](
            x, a, w, scale, bias, y,
            n, k, packed.shape[0],
            x.stride(0), w.stride(0), y.stride(0),
            P=p, QUANTIZE_X=quantize_x, HAS_BIAS=bias is not None, OUT_INT32=out_dtype == torch.int32,
            LANES=lanes, ASM=not INTERPRET and x.is_cuda and torch.version.hip is None,
            BLOCK_A=min(next_power_of_2(k), 64 if INTERPRET else 4096), **LAUNCH,
        )
    return y


def reference_gemv(x, packed, scale, n, fmt, bias=None):
    """The torch reference: bitnet.packing.packed_linear_reference (unpack, exact integer matmul),
    the torch path of bitnet.ops (torch_bitlinear)."""
    return packed_linear_reference(x, packed, scale, n, fmt, bias)

"""The packed weight layout the kernels read, its decoding in Triton, and a Triton unpack kernel.

Layout: the checkpoint layout itself (bitnet.packing), read in place, with no conversion at load.

    W_q: (N, K) in {-1, 0, 1} ("2bit", "1.6bit") or {-1, 1} ("1bit"); P values per byte
    packed: uint8 (R, K), row-major, R = ceil(N / P); rows N..R*P-1 are padding
    byte[r, k] holds the codes of rows r, r + R, ..., r + (P-1)R of column k:
        "2bit"   P=4  c = w + 1 in {0,1,2}  byte = sum_i c_i << 2i
        "1.6bit" P=5  c = w + 1 in {0,1,2}  byte = sum_i c_i * 3^i   (< 243)
        "1bit"   P=8  c = (w + 1) / 2       byte = sum_i c_i << i

Why this layout is already the kernel layout (and no other is made at load time):
- It is contiguous along K, the reduction dimension: a [BLOCK_R, BLOCK_K] tile is BLOCK_R
  coalesced row segments (16-byte loads when K % 16 == 0, as in every real model), and K-major
  is the operand order of int8 MMA.
- Read as int32 words (K % 4 == 0), a word holds four consecutive k of one packed row, and one
  shift and one mask give the codes of one slice at those four k in four byte lanes,
  "2bit": (w >> 2i) & 0x03030303: the operand of dp4a and the int8 register layout of an MMA
  operand. That is what bitnet.cpp permutes its layout to get; here the checkpoint has it.
  Other K take the same path a byte at a time.
- One tile decodes into P code tiles [BLOCK_R, BLOCK_K] for P output row-blocks R apart.
  Stacked, they make one [P * BLOCK_R, BLOCK_K] operand: one dot, one accumulator; the epilogue
  maps accumulator column j to output row (j // BLOCK_R) * R + r0 + j % BLOCK_R. Every byte is
  read once.
- The module keeps one copy of its weights: nothing to convert at freeze or load, nothing to keep
  in sync with state_dict and save_pretrained, and the three formats share the kernels.

Codes, not weights, meet the activations: w = SC * c - 1 with SC = 1 (ternary) or 2 (binary), so
    x_q . w = SC * (x_q . c) - sum_k x_q
and the inner loop saves a subtraction per weight; the row sums come with the activations.

Triton blocks are powers of two, and P = 5 is not: "1.6bit" decodes slices 0-3 as the stacked
block (PA = 4) and slice 4 as a block of its own (PB = 1) with its own accumulator. Base-3 digits
come without division, from the quotients q_i = floor(v / 3^i) (base3_quotients):
    c_i = q_i - 3 * q_(i+1),  q_0 = b,  q_(i+1) = floor(q_i / 3) = ((q_i + 1) * 85) >> 8,
the quotients of two bytes at a time in the 16-bit lanes of an int32 word and put back into byte
lanes by byte permutes (PTX prmt), each digit one multiply-add for the word's four bytes (the
GEMM's and the unpack's decode here: sm_90's 1.6-bit GEMM loop at 16 x 128 x 128 takes 269
instructions a K step, 2-bit's 132; with a division chain per byte pair it took 654). The GEMV
multiplies the quotients q_i themselves and takes the differences after the loop (gemv.py), at
1.6 times the instructions a weight of "2bit" there: 20% fewer bytes, ~60% more integer work.

Every kernel takes the format as the constexpr P and derives PA = 8 if P == 8 else 4,
PB = P - PA, SC = 2 if P == 8 else 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet.packing import FORMATS, packed_rows, unpack

from .common import ptx
from .launch import fast_launch

reference_unpack = unpack  # the torch reference of unpack_triton below


def values_per_byte(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown packed format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def row_block(p: int) -> int:
    """PA: the codes of a packed byte that one row block holds, for P codes a byte (the host's
    copy of what every kernel derives from its constexpr P)."""
    return 8 if p == 8 else 4


def check_packed(packed: torch.Tensor, n: int, k: int, fmt: str) -> torch.Tensor:
    """The packed weight of an (n, k) matrix in `fmt`, row-major (copied only if it is not)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed weights must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    r = packed_rows(n, fmt)
    if tuple(packed.shape) != (r, k):
        raise ValueError(f"{fmt} packed weight of a ({n}, {k}) matrix has shape ({r}, {k}), got {tuple(packed.shape)}")
    return packed if packed.stride(1) == 1 else packed.contiguous()


# PTX `prmt.b32 d, a, b, sel`: byte i of d is byte (sel >> 4i) & 7 of the eight bytes a.0 .. a.3,
# b.0 .. b.3 (b = 0 here for zeros). tests/test_kernels.py checks these against that definition.
HIGH_BYTES = 0x4341  # (a.1, 0, a.3, 0): (a >> 8) & 0x00FF00FF
INTERLEAVE_HIGH = 0x7351  # (a.1, b.1, a.3, b.3)
_HIGH_BYTES_ASM = tl.constexpr(f"prmt.b32 $0, $1, 0, {HIGH_BYTES:#x};")
_INTERLEAVE_HIGH_ASM = tl.constexpr(f"prmt.b32 $0, $1, $2, {INTERLEAVE_HIGH:#x};")
# The top bit slice of a word in its four byte lanes, (w >> 6) & 0x03030303 and (w >> 7) & 0x01010101
_TOP_SLICE_2BIT_ASM = tl.constexpr("{ .reg .b32 t; shr.u32 t, $1, 6; and.b32 $0, t, 0x03030303; }")
_TOP_SLICE_1BIT_ASM = tl.constexpr("{ .reg .b32 t; shr.u32 t, $1, 7; and.b32 $0, t, 0x01010101; }")


@triton.jit
def high_bytes(t, ASM: tl.constexpr):
    """(t >> 8) & 0x00FF00FF: bytes 1 and 3 of each word moved to bytes 0 and 2, the others zero
    (one PRMT by inline PTX if ASM; a shift and a mask otherwise)."""
    if ASM:
        r = tl.inline_asm_elementwise(_HIGH_BYTES_ASM, "=r,r", [t], dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = (t >> 8) & 0x00FF00FF
    return r


@triton.jit
def interleave_high(te, to, ASM: tl.constexpr):
    """Bytes (te.1, to.1, te.3, to.3) from bytes 0 .. 3: the high bytes of the 16-bit lanes of two
    words, interleaved (one PRMT if ASM)."""
    if ASM:
        r = tl.inline_asm_elementwise(_INTERLEAVE_HIGH_ASM, "=r,r,r", [te, to], dtype=tl.int32, is_pure=True,
                                      pack=1)
    else:
        r = high_bytes(te, ASM) | (high_bytes(to, ASM) << 8)
    return r


@triton.jit
def third(e, o, ASM: tl.constexpr):
    """One base-3 step on the four bytes of words split into 16-bit lanes (e: bytes 0 and 2, o:
    bytes 1 and 3, values < 243): (v + 1) * 85 >> 8 = floor(v / 3) for every v < 243, and without
    the shift the quotient is already the high byte of v's lane (the low byte a fraction, dropped).
    Returns the quotients of all four bytes in byte lanes, and split into 16-bit lanes again."""
    te = e * 85 + 0x00550055
    to = o * 85 + 0x00550055
    return interleave_high(te, to, ASM), high_bytes(te, ASM), high_bytes(to, ASM)


@triton.jit
def base3_quotients(w, LANES: tl.constexpr, ASM: tl.constexpr):
    """q_i = floor(v / 3^i), i = 1 .. 4, of every packed byte v < 243 (its five base-3 codes are
    c_i = q_i - 3 q_(i+1), c_4 = q_4): in the byte lanes of words (LANES == 4: two IMAD and one
    PRMT a step for four bytes, and two PRMT to split them for the next step), or per byte."""
    if LANES == 4:
        e = w & 0x00FF00FF
        o = high_bytes(w, ASM)
        q1, e, o = third(e, o, ASM)
        q2, e, o = third(e, o, ASM)
        q3, e, o = third(e, o, ASM)
        q4, e, o = third(e, o, ASM)
    else:
        q1 = (w * 171) >> 9
        q2 = (q1 * 171) >> 9
        q3 = (q2 * 171) >> 9
        q4 = (q3 * 171) >> 9
    return q1, q2, q3, q4


@triton.jit
def decode(b, i: tl.constexpr, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """Code of slice i (rows i*R + r) of the packed units b (int32, any shape).

    LANES == 1: each unit is one byte. LANES == 4: each unit is an int32 word of four bytes
    (four consecutive k), and the codes come out in the same four byte lanes: one shift and one
    mask for bits (the top slice's by inline PTX if ASM); for base 3, c_i = q_i - 3 q_(i+1) from
    the quotients (base3_quotients, PRMT by inline PTX if ASM), one IMAD for the four bytes of a
    word: each byte's digit is 0 .. 2 and 3 q_(i+1) <= q_i < 243 in each byte, so nothing carries
    or borrows across bytes (the quotients are shared by the compiler across the five calls).
    """
    if P == 5:
        q1, q2, q3, q4 = base3_quotients(b, LANES, ASM)
        if i == 0:
            c = b - 3 * q1
        elif i == 1:
            c = q1 - 3 * q2
        elif i == 2:
            c = q2 - 3 * q3
        elif i == 3:
            c = q3 - 3 * q4
        else:
            c = q4
    else:
        BITS: tl.constexpr = 8 // P
        MASK: tl.constexpr = ((1 << BITS) - 1) * (0x01010101 if LANES == 4 else 1)
        if ASM and LANES == 4 and i == P - 1:
            # The top slice's top byte is also w >> (32 - BITS), unmasked: LLVM takes the slice
            # apart byte by byte that way and packs it back with byte permutes for the GEMM's int8
            # operand (13 instructions a word for "2bit"'s four slices on sm_90, not 7). Opaque
            # to LLVM, the shift and the mask stay two instructions.
            c = tl.inline_asm_elementwise(_TOP_SLICE_2BIT_ASM if P == 4 else _TOP_SLICE_1BIT_ASM, "=r,r", [b],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            c = (b >> (BITS * i)) & MASK
    return c


@triton.jit
def join_slices(c0, c1, c2, c3):
    """Four [A, B] tiles -> [A, B, 4] with c_i at [..., i] (tl.join keeps the new trailing
    dimension in each thread's registers; join(a, b) puts a at 0, b at 1)."""
    c = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    return tl.reshape(c, (c0.shape[0], c0.shape[1], 4))


@triton.jit
def int8_codes(w, i: tl.constexpr, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """int8 codes [BR, BU * LANES] of slice i from units w [BR, BU]: k = LANES * unit + lane."""
    c = decode(w, i, P, LANES, ASM)
    if LANES == 4:
        c = join_slices(c, c >> 8, c >> 16, c >> 24)  # byte lanes, little-endian
        c = tl.reshape(c, (w.shape[0], 4 * w.shape[1]))
    return c.to(tl.int8)


@triton.jit
def joined_codes(w, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """int8 codes of slices 0..PA-1 of the units w [BR, BU]: [BR, BU * LANES, PA], slice i at
    [..., i] of a trailing dimension held in registers."""
    c = join_slices(int8_codes(w, 0, P, LANES, ASM), int8_codes(w, 1, P, LANES, ASM),
                    int8_codes(w, 2, P, LANES, ASM), int8_codes(w, 3, P, LANES, ASM))
    if P == 8:
        hi = join_slices(int8_codes(w, 4, P, LANES, ASM), int8_codes(w, 5, P, LANES, ASM),
                         int8_codes(w, 6, P, LANES, ASM), int8_codes(w, 7, P, LANES, ASM))
        c = tl.permute(tl.join(c, hi), (0, 1, 3, 2))  # [..., j, h] -> [..., h, j]: slice 4h + j
        c = tl.reshape(c, (c.shape[0], c.shape[1], 8))
    return c


@triton.jit
def decode_stacked(w, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """Units w [BR, BU] -> int8 codes [PA * BR, BU * LANES] of slices 0..PA-1, stacked: row j
    holds slice j // BR, packed row j % BR (the order of the output features i*R + r)."""
    c = tl.permute(joined_codes(w, P, LANES, ASM), (2, 0, 1))  # (PA, BR, BK)
    return tl.reshape(c, (c.shape[0] * c.shape[1], c.shape[2]))


@triton.jit
def weight_operand(w, live, FIFTH: tl.constexpr, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    """The GEMM's int8 weight operand from the units w [BR, BU]: decode_stacked's [PA * BR, BK]
    (slices 0 .. PA-1), or with FIFTH the fifth base-3 slice's [BR, BK] ("1.6bit").

    Decoded behind a branch that is always taken ((live | 1) != 0 for any integer live), for Triton's
    choice of the dot's operand layout: it reads the narrowest load on each operand's way back from
    the dot (here x's int8 and the weights' int32: 8 bits, kWidth 4) and halves it when a tl.join is
    on that way (the codes' byte lanes and stacked slices are joins), as if the join split a wider
    load: with Triton 3.6 the operands got kWidth 8, x was read from shared memory 8 bytes at a
    time in an order mma.sync cannot take, and ptxas moved registers before every IMMA (2-bit 16 x
    128 x 128: 183 instructions a K step instead of 132); Triton 3.9 kept kWidth 4 there but staged
    1-bit's 16-packed-row operand through shared memory a byte at a time (606 instead of 440). The
    search stops at the branch (scf.if), which LLVM removes (the condition is always true by its
    known bits), so the decode stays interleaved with the IMMAs as before."""
    if (live | 1) != 0:
        if FIFTH:
            c = int8_codes(w, 4, P, LANES, ASM)
        else:
            c = decode_stacked(w, P, LANES, ASM)
    else:
        PA: tl.constexpr = 1 if FIFTH else (8 if P == 8 else 4)
        c = tl.zeros([PA * w.shape[0], w.shape[1] * LANES], tl.int8)
    return c


@fast_launch
@triton.jit
def _unpack_kernel(
    # pointers (w1_ptr, w2_ptr: the second and third matrices', read if SEGMENTS > 1, > 2)
    w_ptr, w1_ptr, w2_ptr, out_ptr,
    # sizes (N1, R1, N2, R2: the second and third matrices'; K in units: bytes, or words with LANES == 4)
    N, R, N1, R1, N2, R2, K,
    # constexpr
    P: tl.constexpr, SEGMENTS: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[row0 + i*R + r, k] = SC * code_i(packed[r, k]) - 1 for rows < N of each matrix, row0 the
    rows of the matrices before it (up to three in one launch: a prefill's q / k / v, gate / up).

    w_ptr, w1_ptr, w2_ptr: uint8 (R, K), (R1, K), (R2, K) row-major, the layout above; out_ptr:
    int8 (N + N1 + N2, K) row-major. LANES == 4: both read and written through int32 pointers, words
    of four k (K of them a row), four codes decoded and written a word at a time: per byte lane
    v = SC * code in 0 .. 2, (v + 0x7F) ^ 0x80 is v - 1 as int8 without a carry into the next lane. Grid: (cdiv(R, BLOCK_R)
    + cdiv(R1, BLOCK_R) + cdiv(R2, BLOCK_R), cdiv(K, BLOCK_K)): the row blocks of the first matrix,
    then of the second, then of the third. ASM: decode's inline PTX (common.ptx).
    """
    unpack_tile(w_ptr, w1_ptr, w2_ptr, out_ptr, N, R, N1, R1, N2, R2, K, tl.program_id(0), tl.program_id(1),
                P, SEGMENTS, LANES, ASM, BLOCK_R, BLOCK_K)


@triton.jit
def unpack_tile(w_ptr, w1_ptr, w2_ptr, out_ptr, N, R, N1, R1, N2, R2, K, pid, pid_k,
                P: tl.constexpr, SEGMENTS: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """_unpack_kernel's program (pid, pid_k): row block pid of the matrices' blocks in order, units
    pid_k * BLOCK_K ... of K (also rmsnorm_quant's fused launch)."""
    SC: tl.constexpr = 2 if P == 8 else 1
    w_seg, n_seg, r_seg, row0, block = w_ptr, N, R, 0, pid
    if SEGMENTS > 1:  # selects, not branches: an argument of 1 is specialized to a constant
        b0 = tl.cdiv(R, BLOCK_R)
        later = pid >= b0
        third = pid >= b0 + tl.cdiv(R1, BLOCK_R)  # never with two (the grid ends there)
        w_seg = tl.where(third, w2_ptr, tl.where(later, w1_ptr, w_ptr))
        n_seg = tl.where(third, N2, tl.where(later, N1, N))
        r_seg = tl.where(third, R2, tl.where(later, R1, R))
        row0 = tl.where(third, N + N1, tl.where(later, N, 0))
        block = pid - tl.where(third, b0 + tl.cdiv(R1, BLOCK_R), tl.where(later, b0, 0))
    if LANES == 4:
        w_seg = w_seg.to(tl.pointer_type(tl.int32))
        out_ptr = out_ptr.to(tl.pointer_type(tl.int32))
    offs_r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_r < r_seg)[:, None] & (offs_k < K)[None, :]
    b = tl.load(w_seg + offs_r[:, None] * K + offs_k[None, :], mask=mask, other=0).to(tl.int32)
    for i in tl.static_range(P):
        rows = i * r_seg + offs_r
        if LANES == 4:
            w = (SC * decode(b, i, P, LANES, ASM) + 0x7F7F7F7F) ^ -0x7F7F7F80  # (-0x7F7F7F80: 0x80808080 as int32)
        else:
            w = (SC * decode(b, i, P, LANES, ASM) - 1).to(tl.int8)
        tl.store(out_ptr + (row0 + rows)[:, None].to(tl.int64) * K + offs_k[None, :], w,
                 mask=mask & (rows < n_seg)[:, None])


UNPACK_BLOCK_R = 16
UNPACK_BLOCK_K = 64  # units a program's rows cover along K: 64 bytes, or 64 words (256 bytes)


def unpack_cat(packed: list[torch.Tensor], ns: list[int], fmt: str = "2bit", out: torch.Tensor | None = None) -> torch.Tensor:
    """Up to three packed matrices of one K -> int8 (sum(ns), K), their rows one after the other, in
    one launch: each matrix's rows equal unpack_triton's (and bitnet.packing.unpack's); into `out`
    (a contiguous int8 (sum(ns), K)) if given."""
    if not 1 <= len(packed) <= 3 or len(ns) != len(packed):
        raise ValueError(f"unpack_cat takes one to three matrices and as many row counts, got {len(packed)} and {len(ns)}")
    k = packed[0].shape[1]
    packed = [check_packed(w, n, k, fmt) for w, n in zip(packed, ns)]
    total = sum(ns)
    if out is not None and (out.shape != (total, k) or out.dtype != torch.int8 or not out.is_contiguous()
                            or out.device != packed[0].device):
        raise ValueError(f"out must be a contiguous int8 ({total}, {k}) tensor on {packed[0].device}, got {out.dtype} "
                         f"{tuple(out.shape)} {out.stride()} on {out.device}")
    return unpack_checked(packed, ns, fmt, out)


def unpack_checked(packed: list[torch.Tensor], ns: list[int], fmt: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """unpack_cat of matrices its caller has checked as it does (check_packed's, one K; `out` as it
    takes it): gemm_cat's prefill, which checked them already."""
    k = packed[0].shape[1]
    total = sum(ns)
    if out is None:
        out = torch.empty(total, k, dtype=torch.int8, device=packed[0].device)
    if total == 0 or k == 0:
        return out
    args, grid, constexprs = unpack_arguments(packed, ns, fmt, out)
    _unpack_kernel[grid](*args, **constexprs)
    return out


def unpack_arguments(packed: list[torch.Tensor], ns: list[int], fmt: str, out: torch.Tensor) -> tuple[tuple, tuple, dict]:
    """What an unpack of checked matrices (K > 0) into `out` launches: (_unpack_kernel's arguments
    in order, its grid (row blocks, K blocks), its constexprs); rmsnorm_quant's fused launch too."""
    k = packed[0].shape[1]
    seg = len(packed)
    ws = [w if w.is_contiguous() else w.contiguous() for w in packed]
    # int32 words of four k where every row starts on one (a word's codes decoded and stored at once)
    lanes = 4 if k % 4 == 0 and all(t.storage_offset() % 4 == 0 for t in ws + [out]) else 1
    units = k // lanes  # (the kernel reads and writes words through int32 pointers)
    ws += [ws[0]] * (3 - seg)  # unused segments: the first's pointer
    sizes = [(n, w.shape[0]) for n, w in zip(ns, packed)] + [(0, 0)] * (3 - seg)
    blocks = sum(-(-r // UNPACK_BLOCK_R) for _, r in sizes)
    args = (*ws, out, *(v for nr in sizes for v in nr), units)
    constexprs = dict(P=values_per_byte(fmt), SEGMENTS=seg, LANES=lanes, ASM=ptx(out), BLOCK_R=UNPACK_BLOCK_R,
                      BLOCK_K=UNPACK_BLOCK_K)
    return args, (blocks, -(-units // UNPACK_BLOCK_K)), constexprs


def unpack_triton(packed: torch.Tensor, n: int, fmt: str = "2bit", out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed uint8 (R, K) -> int8 (n, K): the Triton twin of bitnet.packing.unpack; into `out`
    (a contiguous int8 (n, K), e.g. rows of a larger buffer) if given."""
    return unpack_cat([packed], [n], fmt, out)

"""Decode attention: one query token per sequence against its KV-cache row, grouped-query aware.

    y[n, h] = sum_s p[s] v[row, h / G, s]     p = softmax_s(q[n, h] . k[row, h / G, s] / sqrt(D))
    over the visible slots s <= pos[n] with key_mask[n, s] (the query's own slot always visible)

the contract of the native CPU op (bitnet_cpu::decode_attention), for the GPU. Why a kernel: at a
decode step torch's SDPA with a key mask and grouped heads (enable_gqa) has no fused backend on
CUDA (flash takes no mask, memory-efficient no grouped heads, cuDNN ranks after math in torch's
default order) and falls back to the math path:
K and V repeated to every query head over the whole static cache, a masked softmax, two batched
matmuls, ~10 launches a layer and the cache read four times over at 2B-4T (20 query heads on 5
KV heads). Here one program reads one KV head's slots once for all G query heads sharing it
(flash-decoding): scores by tensor-core dot (the G heads padded to 16 rows), an online softmax in
float32, P kept in float32 against V (a TF32 dot: 10 bits of P's mantissa where flash attention's
bf16 P keeps 7), float32 accumulators; y within an ulp of its dtype of the float64 reference.

Slots past pos[n] are not read (the loop stops there): the work follows the live length, not the
static cache's. A block's K, V and key mask load together, K and V staged ahead by Triton's
software pipelining (cp.async), so a split waits on memory about once, not once for the mask, once
for K and once for V a block; masked-off slots (left padding) are read and their values zeroed. A
cache longer than CHUNK slots is split over programs (CHUNK slots each); the live ones (holding a
slot <= pos) each write their partial softmax, the program that finishes last for a (query, KV
head), counted by an atomic counter (as the split-K GEMM's tiles are), merges them in split order
and writes y: one launch however long the cache, where a merge kernel of its own was one more a
layer. A query whose slots fit one split writes y directly, however long its cache row (a server's
rows are the model's context): the splits past pos store nothing and are not merged.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import INTERPRET, LAUNCH, cdiv, next_power_of_2, pdl, pdl_start, pdl_wait, shared_limit
from .gemm import zeroed_workspace
from .launch import fast_launch
from .rope import _rotated

BLOCK_S = 16 if INTERPRET else 64  # slots per step: a [64, 128] bf16 tile of K and of V (16 KB each)
# Slots per split: a fixed number, so that a query's result does not depend on the batch around it
# (a server's batched decode equals each sequence's lone decode bit for bit). At 2B-4T (5 KV heads)
# a 2048-slot cache is 16 splits: 80 programs for one sequence, 640 for eight.
CHUNK = 2 * BLOCK_S
# 8 warps: half the instructions a warp a block (2B-4T with the RoPE, sm_90: ~500, ~730 in the block
# holding pos) where 4 warps each issued 1188 alone on their scheduler; no aligned variant spills
NUM_WARPS = 8
_LOG2E = 1.4426950408889634


def shared_bytes(block_s: int, block_d: int, block_g: int, itemsize: int, stages: int) -> int:
    """An upper bound of the shared memory (bytes) a program asks for: each stage's K and V tiles
    [block_s, block_d], and the queries' [block_g, block_d] float32 tile (the compile guard holds
    every variant it compiles to this bound, for sm_80, sm_86 and sm_90)."""
    return stages * 2 * block_s * block_d * itemsize + block_g * block_d * 4


@functools.cache
def tile(dtype: torch.dtype, block_d: int = 128, block_g: int = 16, limit: int | None = None) -> tuple[int, int]:
    """(slots a step, software-pipelining stages) for a cache of dtype. With stages, Triton loads the
    next blocks' K and V (cp.async into shared memory) while this block's dots run: a split's two
    blocks wait on memory about once. A float32 cache's [64, 128] tiles would not fit sm_80's shared
    memory staged, nor its registers both at once (they load together): 32 slots a step, unstaged.
    limit (common.shared_limit of the device): fewer stages where three would ask for more shared
    memory than a program may have: at head size 128 three 16-bit stages are 104 KB, over the 99 KB
    of an A10, L4, L40S or RTX 30xx-50xx (two: 72 KB)."""
    if dtype == torch.float32 and not INTERPRET:
        return BLOCK_S // 2, 1
    stages = 3
    while limit is not None and stages > 1 and shared_bytes(BLOCK_S, block_d, block_g, dtype.itemsize, stages) > limit:
        stages -= 1
    return BLOCK_S, stages


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation: tensor cores in a and b's dtype (float32 ones as TF32),
    float32 at full precision (IEEE), or both converted to float32 first (UPCAST; exact products of
    bf16 / fp16 values)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@fast_launch
@triton.jit
def _decode_attention_kernel(
    # pointers (part_ptr: the splits' float32 partials, m and l then acc, and count_ptr: int32 arrival
    # counters, one a program row, zero before and after; both used if SPLITS > 1)
    q_ptr, k_ptr, v_ptr, pos_ptr, row_ptr, mask_ptr, y_ptr, part_ptr, count_ptr,
    # the new token's key and value, and its RoPE's cos / sin (read if ROPE)
    kn_ptr, vn_ptr, cos_ptr, sin_ptr,
    # sizes (CHUNK: slots per split, a multiple of BLOCK_S)
    NKV, CHUNK, SPLITS, qk_scale,
    # strides (q as (N, H, D), the caches as (rows, NKV, S, D), y as (N, H * D); unit along D; with
    # ROPE the new key and value as (N, NKV, D), cos / sin as (N, D), stride_cn 0: one for all)
    stride_qn, stride_qh, stride_kr, stride_kh, stride_ks, stride_vr, stride_vh, stride_vs, stride_pos, stride_mn,
    stride_yn, stride_knn, stride_knh, stride_vnn, stride_vnh, stride_cn,
    # constexpr
    G: tl.constexpr, D: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, PDL: tl.constexpr, ROPE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (n * NKV + j, split): query n's heads j*G .. j*G + G - 1 over the slots
    [split * CHUNK, (split + 1) * CHUNK) of KV head j of its cache row.

    q_ptr: (N, H, D), H = NKV * G, the cache's dtype. k_ptr, v_ptr: (rows, NKV, S, D).
    pos_ptr: int (N,) (stride_pos 0: one position for all), the query's slot; row_ptr: int (N,),
    its cache row if HAS_ROWS, else row n. mask_ptr: (N, >= pos + 1) bool or integer, read if
    HAS_MASK (nonzero: visible). qk_scale: log2(e) / sqrt(D) (exp2 below).
    y_ptr: (N, H * D) in q's dtype. SPLITS > 1: part_ptr holds, per (program, split), BLOCK_G
    running maxima m (log2 units), BLOCK_G sums l, then BLOCK_G x BLOCK_D accumulators; the last
    live split program of a row to arrive (count_ptr) merges them: y = sum_k 2^(m_k - M) acc_k /
    sum_k 2^(m_k - M) l_k over the live splits k (those starting at or before pos) in order, M the
    largest m_k (a split whose slots are all masked off has m = -inf, l = 0), and leaves its counter
    zero again.
    IEEE: float32 dots in full precision (a float32 cache), not TF32. UPCAST: the dots' operands
    converted to float32 first (the interpreter, whose bf16 dot is not one), the same products.
    ROPE: the decode step's RoPE and cache write folded in (rope.py's arithmetic, `_rotated`): q_ptr
    holds the query before its rotation, kn_ptr / vn_ptr the new key (before it) and value of slot
    pos; every program rotates its q, the one whose split holds slot pos rotates the key, writes
    both into the cache and uses them for that slot from registers (no other program reads it).
    """
    pdl_start(PDL)  # (common.pdl)
    pdl_wait(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // NKV
    j = pid % NKV
    pos = tl.load(pos_ptr + n * stride_pos)
    row = tl.load(row_ptr + n) if HAS_ROWS else n
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, pos + 1)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_rows = q_ptr + n * stride_qn + (j * G + g)[:, None] * stride_qh
    q_mask = (g < G)[:, None] & d_ok[None, :]
    k_head = k_ptr + row.to(tl.int64) * stride_kr + j * stride_kh
    v_head = v_ptr + row.to(tl.int64) * stride_vr + j * stride_vh
    if ROPE:
        HALF: tl.constexpr = D // 2
        first_half = d < HALF
        rot = tl.where(first_half, d + HALF, d - HALF)
        c = tl.load(cos_ptr + n * stride_cn + d, mask=d_ok, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + n * stride_cn + d, mask=d_ok, other=0.0).to(tl.float32)
        q = _rotated(q_rows, d[None, :], rot[None, :], q_mask, first_half[None, :], c[None, :], sn[None, :],
                     q_ptr.dtype.element_ty)  # (BLOCK_G, BLOCK_D)
        holds_pos = (start <= pos) & (pos < start + CHUNK)
        k_new = _rotated(kn_ptr + n * stride_knn + j * stride_knh, d, rot, d_ok, first_half, c, sn,
                         kn_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty)
        v_new = tl.load(vn_ptr + n * stride_vnn + j * stride_vnh + d, mask=d_ok, other=0.0).to(v_ptr.dtype.element_ty)
        if holds_pos:  # this split holds slot pos: it writes the new key and value (later steps read them)
            tl.store(k_head + pos * stride_ks + d, k_new, mask=d_ok)
            tl.store(v_head + pos * stride_vs + d, v_new, mask=d_ok)
    else:
        q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)  # (BLOCK_G, BLOCK_D)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        # K, V and the mask of a block load together: nothing decides whether to read them, so one
        # memory latency a step (a load waiting on the mask's, then V's on the scores, were three)
        s = s0 + tl.arange(0, BLOCK_S)
        visible = s < stop
        kv_mask = visible[:, None] & d_ok[None, :]
        k = tl.load(k_head + s[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_S, BLOCK_D)
        v = tl.load(v_head + s[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        if HAS_MASK:
            keep = tl.load(mask_ptr + n * stride_mn + s, mask=visible, other=0) != 0
            visible = visible & (keep | (s == pos))
            v = tl.where(visible[:, None], v, 0.0)  # a masked-off slot may hold anything (never written)
        if ROPE:  # slot pos from registers (its store above may not be visible to this program's loads)
            if (s0 <= pos) & (pos < s0 + BLOCK_S):  # (one block of the split holding pos: others skip the selects)
                k = tl.where((s == pos)[:, None], k_new[None, :], k)
                v = tl.where((s == pos)[:, None], v_new[None, :], v)
        qk = _dot(q, tl.trans(k), IEEE, UPCAST)  # (BLOCK_G, BLOCK_S) float32
        qk = tl.where(visible[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # -inf while no slot so far was visible (left padding): then p = 0 and alpha = 0, where
        # m_new itself would make them NaN; a block with no visible slot changes nothing
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v.to(tl.float32), IEEE, UPCAST)
        m_i = m_new

    # The live splits: those holding a slot <= pos. A split past pos has nothing to give (m = -inf,
    # l = 0: its weight in the merge is exactly 0), so it stores nothing and does not count; the
    # merge reads the live splits only, and a query whose slots fit one split writes y directly:
    # the same bits as merging every split, at any cache length (a server's cache row is the
    # model's context; its live length is the conversation's).
    live = tl.minimum((pos + CHUNK) // CHUNK, SPLITS)
    last = split < live
    if (live > 1) & last:
        PART: tl.constexpr = BLOCK_G * (2 + BLOCK_D)
        row_parts = part_ptr + pid.to(tl.int64) * SPLITS * PART
        base = row_parts + split * PART
        tl.store(base + g, m_i)
        tl.store(base + BLOCK_G + g, l_i)
        tl.store(base + 2 * BLOCK_G + g[:, None] * BLOCK_D + d[None, :], acc)
        tl.debug_barrier()  # every thread's stores are issued before this split counts as arrived
        last = tl.atomic_add(count_ptr + pid, 1) == live - 1
        if last:
            tl.store(count_ptr + pid, 0)  # zero again for the next call (and the next CUDA-graph replay)
            top = tl.full([BLOCK_G], float("-inf"), tl.float32)
            for k in range(0, live):
                top = tl.maximum(top, tl.load(row_parts + k * PART + g, cache_modifier=".cg"))
            top = tl.where(top > float("-inf"), top, 0.0)
            l_i = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            # staged (cp.async): the parts of the next two splits load while this one adds up, where
            # each split waited on L2 in turn (16 splits at 2048 slots). The acquire above orders
            # these loads and drops the SM's L1 (CCTL.IVALL), so the 4-byte ones' .cg, which
            # cp.async cannot keep, is not needed for them to see the other splits' parts.
            for k in tl.range(0, live, num_stages=3):
                part = row_parts + k * PART
                m_k = tl.load(part + g, cache_modifier=".cg")
                w = tl.where(m_k > float("-inf"), tl.math.exp2(m_k - top), 0.0)
                l_i += w * tl.load(part + BLOCK_G + g, cache_modifier=".cg")
                acc += w[:, None] * tl.load(part + 2 * BLOCK_G + g[:, None] * BLOCK_D + d[None, :], cache_modifier=".cg")
    if last:
        y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        y_offs = n * stride_yn + (j * G + g)[:, None] * D + d[None, :]
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=(g < G)[:, None] & d_ok[None, :])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     rows: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                     splits: int | None = None, rope: tuple | None = None) -> torch.Tensor:
    """q (N, H, D) (unit stride along D), caches (rows, NKV, S, D) of q's dtype (H a multiple of
    NKV; unit stride along D), pos (N,) or (1,) integer slots (query n sits at pos[n] and sees
    slots 0 .. pos[n]), rows (N,) integer cache rows (default: row n), key_mask (N, >= max pos + 1)
    bool or integer (zero: a padding slot, skipped; the query's own slot never is) -> y (N, H * D)
    in q's dtype. splits: how many programs share one cache row's slots (default: one per CHUNK
    slots, whatever N: each query's result is the same in any batch).

    rope = (k, v, cos, sin): the decode step's RoPE and cache write in the same launch (what
    rope_cache, then this, computes): q before its rotation, k / v (N, NKV, D) the new token's key
    (before it) and value, all of the caches' dtype, cos / sin (N or 1, D) of q's dtype (unit
    stride along D); k' and v are written into slot pos[n] of each query's cache row (the caches
    change in place). The query's own slot must be its cache row's alone in this call."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: q must be (N, H, D) and the caches (rows, NKV, S, D), got q "
                         f"{tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    N, H, D = q.shape
    _, nkv, S, _ = k_cache.shape
    if k_cache.shape[-1] != D or nkv == 0 or H % nkv:
        raise ValueError(f"decode_attention: {H} query heads of {D} do not fit a cache of {nkv} heads of {k_cache.shape[-1]}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode_attention: the caches ({k_cache.dtype}, {v_cache.dtype}) must have q's dtype {q.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: q and the caches need unit stride along the head dimension")
    if pos.dim() != 1 or pos.shape[0] not in (1, N) or pos.is_floating_point():
        raise ValueError(f"decode_attention: pos must be integer (N,) or (1,), got {pos.dtype} {tuple(pos.shape)}")
    if rows is not None and (rows.shape != (N,) or rows.is_floating_point()):
        raise ValueError(f"decode_attention: rows must be integer ({N},), got {rows.dtype} {tuple(rows.shape)}")
    if key_mask is not None and (key_mask.dim() != 2 or key_mask.shape[0] != N or key_mask.stride(-1) != 1
                                 or key_mask.is_floating_point()):
        raise ValueError(f"decode_attention: key_mask must be bool or integer ({N}, S) with unit stride along S, "
                         f"got {key_mask.dtype} {tuple(key_mask.shape)}")
    if rope is not None:
        k_new, v_new, cos, sin = rope
        if k_new.shape != (N, nkv, D) or v_new.shape != (N, nkv, D) or k_new.dtype != q.dtype or v_new.dtype != q.dtype \
                or k_new.stride(-1) != 1 or v_new.stride(-1) != 1 or D % 2:
            raise ValueError(f"decode_attention: the new key and value must be ({N}, {nkv}, {D}) {q.dtype} with unit "
                             f"stride along D (D even), got {tuple(k_new.shape)} {k_new.dtype}, {tuple(v_new.shape)} "
                             f"{v_new.dtype}")
        cos, sin = cos.reshape(-1, D), sin.reshape(-1, D)
        if cos.shape[0] not in (1, N) or sin.shape != cos.shape or cos.dtype != q.dtype or sin.dtype != q.dtype:
            raise ValueError(f"decode_attention: cos / sin must be (1 or {N}, {D}) of {q.dtype}")
        if cos.stride() != sin.stride() or cos.stride(-1) != 1:
            cos, sin = cos.contiguous(), sin.contiguous()
    G = H // nkv
    y = torch.empty(N, H * D, dtype=q.dtype, device=q.device)
    if N == 0:
        return y
    blocks = cdiv(S, BLOCK_S)
    splits = max(1, min(cdiv(S, CHUNK) if splits is None else splits, blocks))
    chunk = cdiv(blocks, splits) * BLOCK_S
    splits = cdiv(S, chunk)
    block_g, block_d = max(16, next_power_of_2(G)), max(16, next_power_of_2(D))
    block_s, stages = tile(q.dtype, block_d, block_g, shared_limit(q.device))
    part, count = y, pos  # unused with one split
    if splits > 1:
        part = torch.empty(N * nkv * splits * block_g * (2 + block_d), dtype=torch.float32, device=q.device)
        count = zeroed_workspace(N * nkv, q.device)
    k_new, v_new, cos, sin = rope if rope is not None else (q, q, q, q)  # (unread without ROPE)
    _decode_attention_kernel[(N * nkv, splits)](
        q, k_cache, v_cache, pos, rows if rows is not None else pos, key_mask if key_mask is not None else pos, y, part,
        count, k_new, v_new, cos, sin,
        nkv, chunk, splits, _LOG2E / D ** 0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), pos.stride(0) if pos.shape[0] == N and N > 1 else 0,
        key_mask.stride(0) if key_mask is not None else 0, y.stride(0), k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1), cos.stride(0) if rope is not None and cos.shape[0] == N and N > 1 else 0,
        G=G, D=D, HAS_ROWS=rows is not None, HAS_MASK=key_mask is not None, IEEE=q.dtype == torch.float32, UPCAST=INTERPRET,
        ROPE=rope is not None, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=NUM_WARPS,
        num_stages=stages, **LAUNCH, **pdl(q),
    )
    return y


def reference_decode_attention(q, k_cache, v_cache, pos, rows=None, key_mask=None) -> torch.Tensor:
    """The float64 reference: each query's visible slots gathered, softmax(q k^T / sqrt(D)) v."""
    N, H, D = q.shape
    nkv = k_cache.shape[1]
    y = torch.empty(N, H, D, dtype=torch.float64, device=q.device)
    for n in range(N):
        p = int(pos[n if pos.shape[0] == N else 0])
        r = int(rows[n]) if rows is not None else n
        slots = torch.arange(p + 1, device=q.device)
        if key_mask is not None:
            slots = slots[(key_mask[n, :p + 1] != 0) | (slots == p)]
        k = k_cache[r, :, slots].double().repeat_interleave(H // nkv, 0)  # (H, s, D)
        v = v_cache[r, :, slots].double().repeat_interleave(H // nkv, 0)
        w = torch.softmax((q[n].double()[:, None, :] @ k.transpose(1, 2)) / D ** 0.5, -1)  # (H, 1, s)
        y[n] = (w @ v)[:, 0]
    return y.reshape(N, H * D)

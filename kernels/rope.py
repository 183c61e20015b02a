"""RoPE of the queries and keys and the KV-cache write of an attention layer, in one launch.

    q' = q * cos + rotate_half(q) * sin          rotate_half(x) = cat(-x[hd/2:], x[:hd/2])
    k' = k * cos + rotate_half(k) * sin          (bitnet.ops.rope: in x's dtype, each op rounded)
    cache_k[b, h, input_pos[t]] = k'[b, h, t]     cache_v[b, h, input_pos[t]] = v[b, h, t]

In eager PyTorch that is ten elementwise kernels (a negation, a concatenation, two products and a
sum, for q and for k) and two index_copy: at decode, a dozen launches a layer whose work is a few
kilobytes. Here one program rotates one head vector of one token and writes it where attention
reads it: q' as (B, nh, T, hd) contiguous, k' and v into the cache at their slots (or, with no
cache, into (B, nkv, T, hd) tensors). The same float operations in the same order as torch, each
product and the sum rounded to the input's dtype, fp fusion off: bit for bit torch's result where
the float32 -> bf16/fp16 conversion rounds as torch's does (on a GPU; Triton's interpreter
truncates it, so there bf16 may be an ulp off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LAUNCH, next_power_of_2, pdl, pdl_start, pdl_wait
from .launch import fast_launch


@triton.jit
def _rotated(src, d, rot, mask, first_half, c, s, OUT_TY: tl.constexpr):
    """x * cos + rotate_half(x) * sin at the head vector `src`, each step rounded to OUT_TY."""
    x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    xr = tl.load(src + rot, mask=mask, other=0.0).to(tl.float32)
    xr = tl.where(first_half, -xr, xr)
    a = (x * c).to(OUT_TY).to(tl.float32)
    b = (xr * s).to(OUT_TY).to(tl.float32)
    return (a + b).to(OUT_TY)


@fast_launch
@triton.jit
def _rope_cache_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr, pos_ptr, row_ptr,
    # sizes (S: the cache's slots, or T without a cache)
    T, NH, NKV, S,
    # strides of q, k, v seen as (B, T, heads, hd) (unit along hd), and of cos / sin as (B, T, hd)
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ct,
    # constexpr
    HD: tl.constexpr, CACHE: tl.constexpr, TOKEN_ROWS: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (b * T + t, h): query head h < NH, else key / value head h - NH, of token t of row b.

    qo_ptr: (B, NH, T, HD) contiguous, the rotated queries (q's dtype).
    ko_ptr, vo_ptr: the cache (rows, NKV, S, HD) when CACHE (token t of row b to slot pos_ptr[t] of
    cache row b, or of cache row row_ptr[t] if TOKEN_ROWS: a server's batch of sequences side by
    side in one row of tokens), else (B, NKV, T, HD) contiguous; their own dtype (the values
    converted to it, as index_copy does).
    """
    pdl_start(PDL)  # (common.pdl)
    pdl_wait(PDL)
    bt = tl.program_id(0)
    h = tl.program_id(1)
    b = bt // T
    t = bt % T
    d = tl.arange(0, BLOCK)
    mask = d < HD
    half: tl.constexpr = HD // 2
    first_half = d < half
    rot = tl.where(first_half, d + half, d - half)
    c = tl.load(cos_ptr + b * stride_cb + t * stride_ct + d, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + b * stride_cb + t * stride_ct + d, mask=mask, other=0.0).to(tl.float32)
    if h < NH:
        src = q_ptr + b * stride_qb + t * stride_qt + h * stride_qh
        out = _rotated(src, d, rot, mask, first_half, c, s, qo_ptr.dtype.element_ty)
        tl.store(qo_ptr + ((b * NH + h) * T + t) * HD + d, out, mask=mask)
    else:
        j = h - NH
        slot = tl.load(pos_ptr + t) if CACHE else t
        cache_row = tl.load(row_ptr + t) if TOKEN_ROWS else b
        row = ((cache_row * NKV + j) * S + slot) * HD
        src = k_ptr + b * stride_kb + t * stride_kt + j * stride_kh
        out = _rotated(src, d, rot, mask, first_half, c, s, k_ptr.dtype.element_ty)
        tl.store(ko_ptr + row + d, out.to(ko_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + b * stride_vb + t * stride_vt + j * stride_vh + d, mask=mask, other=0.0)
        tl.store(vo_ptr + row + d, v.to(vo_ptr.dtype.element_ty), mask=mask)


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache_k: torch.Tensor | None = None, cache_v: torch.Tensor | None = None,
               input_pos: torch.Tensor | None = None,
               cache_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, T, nh, hd), k / v (B, T, nkv, hd) (unit stride along hd; e.g. views of the q / k / v
    projections' outputs), cos / sin (B or 1, 1, T, hd) in q's dtype -> (q' (B, nh, T, hd), K, V):
    with a cache (B, nkv, S, hd) and input_pos (T,), k' and v are written into it at those slots
    and K, V are the caches; without, K = k' and V = v as new (B, nkv, T, hd) tensors.
    cache_rows (T,), with B = 1: token t goes to cache row cache_rows[t] (a server's step, one
    token row holding several sequences), input_pos then the slot of each token in its row."""
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    if hd % 2 or k.shape != (B, T, nkv, hd) or v.shape != k.shape or k.dtype != q.dtype:
        raise ValueError(f"rope_cache: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("rope_cache: q, k, v need unit stride along the head dimension")
    if cos.dtype != q.dtype or sin.dtype != q.dtype or cos.shape[-1] != hd or cos.shape[-2] != T:
        raise ValueError(f"rope_cache: cos / sin must be (B or 1, 1, {T}, {hd}) in {q.dtype}")
    cos2, sin2 = cos.reshape(-1, T, hd), sin.reshape(-1, T, hd)
    if cos2.stride() != sin2.stride() or cos2.stride(-1) != 1:
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    stride_cb = 0 if cos2.shape[0] == 1 else cos2.stride(0)
    q_out = torch.empty(B, nh, T, hd, dtype=q.dtype, device=q.device)
    cached = cache_k is not None
    if cached:
        rows_ok = cache_rows is None and cache_k.shape[0] == B or cache_rows is not None and B == 1 \
            and cache_rows.shape == (T,)
        if input_pos is None or cache_v is None or not rows_ok or cache_k.shape[1:2] != (nkv,) or cache_k.shape[-1] != hd \
                or not cache_k.is_contiguous() or not cache_v.is_contiguous() or cache_v.shape != cache_k.shape:
            raise ValueError("rope_cache: the cache must be two contiguous (B, nkv, S, hd) tensors, with input_pos "
                             "(and cache_rows (T,) only with B = 1)")
        k_out, v_out, slots = cache_k, cache_v, cache_k.shape[2]
    else:
        k_out = torch.empty(B, nkv, T, hd, dtype=q.dtype, device=q.device)
        v_out = torch.empty(B, nkv, T, hd, dtype=v.dtype, device=q.device)
        slots = T
    if B * T > 0:
        _rope_cache_kernel[(B * T, nh + nkv)](
            q, k, v, cos2, sin2, q_out, k_out, v_out, input_pos if cached else q_out,
            cache_rows if cache_rows is not None else q_out,
            T, nh, nkv, slots,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), stride_cb, cos2.stride(1),
            HD=hd, CACHE=cached, TOKEN_ROWS=cached and cache_rows is not None, BLOCK=next_power_of_2(hd), **LAUNCH, **pdl(q),
        )
    return q_out, k_out, v_out


def reference_rope_cache(q, k, v, cos, sin, cache_k=None, cache_v=None, input_pos=None, cache_rows=None):
    """The torch reference: bitnet.ops.rope's formula and KVCache.update's index_copy (the serve
    runner's flat index_copy with cache_rows)."""
    def rope(x):  # x (B, H, T, hd)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    q2, k2 = rope(q.transpose(1, 2)), rope(k.transpose(1, 2))
    v2 = v.transpose(1, 2)
    if cache_k is None:
        return q2.contiguous(), k2.contiguous(), v2.contiguous()
    if cache_rows is None:
        cache_k.index_copy_(2, input_pos, k2.to(cache_k.dtype))
        cache_v.index_copy_(2, input_pos, v2.to(cache_v.dtype))
        return q2.contiguous(), cache_k, cache_v
    nkv, S, hd = cache_k.shape[1:]
    at = ((cache_rows[:, None] * nkv + torch.arange(nkv, device=q.device)[None, :]) * S + input_pos[:, None]).flatten()
    cache_k.view(-1, hd).index_copy_(0, at, k2[0].transpose(0, 1).reshape(-1, hd).to(cache_k.dtype))
    cache_v.view(-1, hd).index_copy_(0, at, v2[0].transpose(0, 1).reshape(-1, hd).to(cache_v.dtype))
    return q2.contiguous(), cache_k, cache_v

"""RMSNorm fused with the per-token int8 quantization that follows it: one read of x per pass,
no normalized activation written to memory.

    h   = weight * (x * rsqrt(mean_k x^2 + eps)).to(x.dtype)   (bitnet.quant.rms_norm: normalize
                                                               in float32, scale in the input dtype)
    x_q, a = act_quant(h)                                      (activations.py, same arithmetic)

One read of a row of up to 4096 (kept in registers for the sum of squares, the absmax of h and
the quantization; block_norm); a longer row three passes (the later two from L2).
Bit-identical to torch where the sum of squares is: its summation order differs from torch's,
so the normalized values may differ by an ulp, and x_q by one where h * a lies that close to a
rounding boundary (the tests bound both). The order is a function of K alone (row_rstd), not of
the launch's config: the decode GEMV, which runs this norm itself at M = 1 (gemv.py, NORM),
gets the same bits.

Wiring: on the Triton path the model calls it (bitnet::rmsnorm_act_quant) once for every RMSNorm
in front of frozen BitLinear and hands x_q, a to their packed_matmul_cat (bitnet.model.projections
-> bitnet.bitlinear.normed_projections -> bitnet.ops.rms_norm_bitlinear_many): the normalized
activation never reaches memory, q/k/v (gate/up) share one quantization, and at decode one GEMV
launch. A frozen BitLinear with its own rms_norm (use_rms_norm checkpoints) uses it too, for its
own input (BitLinear.forward -> normed_projections(..., own_norm=True)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet.quant import quantize_activation, rms_norm

from .activations import CONFIGS, act_quant, act_quant_row, activation_scale, quantize, quantize_rows, rows_of
from .common import LAUNCH, autotune, next_power_of_2, pdl, pdl_start, pdl_wait
from .layout import check_packed, unpack_arguments, unpack_tile


@triton.jit
def norm_input(x_row, u_row, offs, mask, GATED: tl.constexpr):
    """The norm's input at offs as float32 holding values of x's dtype: x itself, or with GATED
    relu(x)^2 * u (x the gate, u the up projection), rounded to x's dtype after the square and
    after the product, as torch's F.relu(gate).square() * up rounds them."""
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    if GATED:
        u = tl.load(u_row + offs, mask=mask, other=0.0)
        r = tl.maximum(x.to(tl.float32), 0.0)
        sq = (r * r).to(x.dtype).to(tl.float32)
        return (sq * u.to(tl.float32)).to(x.dtype).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def normed(v, w_ptr, offs, mask, rstd, DT: tl.constexpr):
    """h at offs from the norm's input v (float32 holding DT values), as float32, rounded as torch
    rounds it (DT, then the product's)."""
    return normed_by(v, tl.load(w_ptr + offs, mask=mask, other=0.0), rstd, DT)


@triton.jit
def normed_by(v, w, rstd, DT: tl.constexpr):
    """normed, with the norm's weights w at v's offsets already loaded."""
    h = w.to(tl.float32) * (v * rstd).to(DT).to(tl.float32)  # exact in float32
    if w.dtype == DT:
        h = h.to(DT).to(tl.float32)  # torch: bf16 * bf16 is a bf16; mixed dtypes give float32
    return h


def sum_block(k: int) -> int:
    """The width of the sum of squares for rows of k: a function of k alone, so that every kernel
    that normalizes a row (this one, the GEMV's fused norm) sums it in the same order."""
    return min(4096, next_power_of_2(k))  # (common's: plain Python; triton's is a jit function, ~5 us a call)


@triton.jit
def pairwise_sum(v, N: tl.constexpr):
    """The sum of v [N] (N a power of 2) as a fixed tree, adjacent pairs first: the same float32
    result however the kernel lays v out over its threads (tl.sum's order follows the layout:
    num_warps, the block)."""
    for i in tl.static_range(12):
        if (N >> i) > 1:
            v = tl.sum(tl.reshape(v, (N >> (i + 1), 2)), 1)
    return tl.sum(v, 0)


@triton.jit
def pairwise_rows(v, N: tl.constexpr):
    """pairwise_sum of each row of v [BM, N]: (BM,)."""
    for i in tl.static_range(12):
        if (N >> i) > 1:
            v = tl.sum(tl.reshape(v, (v.shape[0], N >> (i + 1), 2)), 2)
    return tl.sum(v, 1)


@triton.jit
def row_rstd(x_row, u_row, K, eps, GATED: tl.constexpr, SUM_BLOCK: tl.constexpr):
    """1 / sqrt(mean_k v^2 + eps) of the norm's input v over the row (one pass; norm_input). The
    squares are summed in an order fixed by K alone (SUM_BLOCK = sum_block(K): lane j sums k = j
    mod SUM_BLOCK in order, then pairwise_sum), so every kernel gets the same bits (launch with fp
    fusion off: an FMA would round v * v + sq once)."""
    sq = tl.zeros([SUM_BLOCK], tl.float32)
    for k0 in range(0, K, SUM_BLOCK):
        offs = k0 + tl.arange(0, SUM_BLOCK)
        v = norm_input(x_row, u_row, offs, offs < K, GATED)
        sq += v * v
    return rstd_of(pairwise_sum(sq, SUM_BLOCK), K, eps)


@triton.jit
def rstd_of(sum_sq, K, eps):
    """1 / sqrt(sum_sq / K + eps), as torch.rsqrt(mean + eps) on a CPU (1 / sqrt)."""
    mean = tl.math.div_rn(sum_sq, K.to(tl.float32))
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + eps))


@triton.jit
def block_norm(x_row, u_row, w_ptr, K, eps, GATED: tl.constexpr, DT: tl.constexpr, SUM_BLOCK: tl.constexpr):
    """A row of K <= SUM_BLOCK read once, the norm's weights loaded beside it: (h (SUM_BLOCK,) the
    normalized row, 0 past K; rstd; a), row_rstd's and normed_row_scale's bits (row_rstd's
    0 + v * v is v * v; a max in any order)."""
    offs = tl.arange(0, SUM_BLOCK)
    mask = offs < K
    v = norm_input(x_row, u_row, offs, mask, GATED)
    rstd = rstd_of(pairwise_sum(v * v, SUM_BLOCK), K, eps)
    h = normed_by(v, tl.load(w_ptr + offs, mask=mask, other=0.0), rstd, DT)
    return h, rstd, activation_scale(tl.max(tl.abs(h), 0))


@triton.jit
def row_norm_scale(x_row, u_row, w_ptr, K, eps, GATED: tl.constexpr, DT: tl.constexpr, SUM_BLOCK: tl.constexpr,
                   BLOCK: tl.constexpr):
    """(rstd, a) of the row: row_rstd, then normed_row_scale (BLOCK wide), the same bits. A row of
    at most SUM_BLOCK (every width up to 4096) is read once (block_norm), where the two passes wait
    on L2 twice (the weights the second time)."""
    if K <= SUM_BLOCK:
        _, rstd, a = block_norm(x_row, u_row, w_ptr, K, eps, GATED, DT, SUM_BLOCK)
    else:
        rstd = row_rstd(x_row, u_row, K, eps, GATED, SUM_BLOCK)
        a = normed_row_scale(x_row, u_row, w_ptr, K, rstd, GATED, DT, BLOCK)
    return rstd, a


@triton.jit
def normed_row_scale(x_row, u_row, w_ptr, K, rstd, GATED: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr):
    """a = 127 / max_k |h_k| of the normalized row h (one more pass; activations.activation_scale)."""
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(normed(norm_input(x_row, u_row, offs, offs < K, GATED), w_ptr, offs, offs < K,
                                              rstd, DT)))
    return activation_scale(tl.max(amax, 0))


@triton.jit
def rows_rstd(x_rows, u_rows, rows_ok, K, eps, GATED: tl.constexpr, SUM_BLOCK: tl.constexpr):
    """row_rstd of a tile of rows (x_rows, u_rows: [BM, 1] row pointers; rows_ok [BM, 1]): (BM,),
    the same bits. The SUM_BLOCK lanes are taken CHUNK at a time (a [BM, SUM_BLOCK] tile would not
    fit in registers): lane j still sums k = j mod SUM_BLOCK in order, each chunk's lanes are a
    whole subtree of pairwise_sum's tree (CHUNK a power of 2, chunks aligned), and the chunks' sums
    are added up by the rest of that tree."""
    CHUNK: tl.constexpr = 256 if SUM_BLOCK > 256 else SUM_BLOCK
    NC: tl.constexpr = SUM_BLOCK // CHUNK
    lanes = tl.arange(0, CHUNK)[None, :]
    chunk = tl.arange(0, NC)[None, :]
    parts = tl.zeros([x_rows.shape[0], NC], tl.float32)
    for c in range(0, NC):
        sq = tl.zeros([x_rows.shape[0], CHUNK], tl.float32)
        for k0 in range(c * CHUNK, K, SUM_BLOCK):
            offs = k0 + lanes
            v = norm_input(x_rows, u_rows, offs, rows_ok & (offs < K), GATED)
            sq += v * v
        parts = tl.where(chunk == c, pairwise_rows(sq, CHUNK)[:, None], parts)
    # (rows not ok, a tile's rows past M, as if of mean square 1: not 1 / sqrt(eps), inf with eps 0)
    sums = tl.where(tl.reshape(rows_ok, (x_rows.shape[0],)), pairwise_rows(parts, NC), K.to(tl.float32))
    return rstd_of(sums, K, eps)


@triton.jit
def normed_rows_scale(x_rows, u_rows, w_ptr, rows_ok, K, rstd, GATED: tl.constexpr, DT: tl.constexpr,
                      BLOCK: tl.constexpr):
    """normed_row_scale of a tile of rows (as rows_rstd's; rstd [BM, 1]): a, (BM,)."""
    amax = tl.zeros([x_rows.shape[0], BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)[None, :]
        mask = rows_ok & (offs < K)
        amax = tl.maximum(amax, tl.abs(normed(norm_input(x_rows, u_rows, offs, mask, GATED), w_ptr, offs, mask, rstd, DT)))
    return activation_scale(tl.max(amax, 1))


@autotune(CONFIGS, key=["K", "GATED"], interpret_config=triton.Config({"BLOCK_K": 64}))
@triton.jit
def _rmsnorm_act_quant_kernel(
    # pointers
    x_ptr, u_ptr, w_ptr, xq_ptr, a_ptr, xsum_ptr,
    # sizes
    K, eps,
    # strides
    stride_xm, stride_um, stride_qm,
    # constexpr
    GATED: tl.constexpr, PDL: tl.constexpr, SUM_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row m.

    x_ptr: (M, K) float, unit stride along K; w_ptr: (K,) float, the RMSNorm weight.
    u_ptr: (M, K) of x's dtype, read if GATED: the norm's input is then relu(x)^2 * u (norm_input).
    xq_ptr: int8 (M, K); a_ptr: float32 (M,); xsum_ptr: int32 (M,) = sum_k x_q[m, k].
    PDL: launched as a dependent (common.pdl). SUM_BLOCK: sum_block(K) (row_rstd).
    """
    pdl_start(PDL)
    pdl_wait(PDL)
    rmsnorm_quant_row(tl.program_id(0), x_ptr, u_ptr, w_ptr, xq_ptr, a_ptr, xsum_ptr, K, eps, stride_xm, stride_um,
                      stride_qm, GATED, SUM_BLOCK, BLOCK_K)


@triton.jit
def rmsnorm_quant_row(m, x_ptr, u_ptr, w_ptr, xq_ptr, a_ptr, xsum_ptr, K, eps, stride_xm, stride_um, stride_qm,
                      GATED: tl.constexpr, SUM_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """_rmsnorm_act_quant_kernel's program m: row m normalized, quantized, stored with a and xsum
    (a row of at most SUM_BLOCK read once: block_norm; a longer one three times, BLOCK_K at a time)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    x_row = x_ptr + m * stride_xm
    u_row = u_ptr + m * stride_um if GATED else u_ptr
    if K <= SUM_BLOCK:
        h, _, a = block_norm(x_row, u_row, w_ptr, K, eps, GATED, DT, SUM_BLOCK)
        offs = tl.arange(0, SUM_BLOCK)
        q = quantize(h, a)
        tl.store(xq_ptr + m * stride_qm + offs, q.to(tl.int8), mask=offs < K)
        total = tl.sum(q, 0)  # (0 past K)
    else:
        rstd = row_rstd(x_row, u_row, K, eps, GATED, SUM_BLOCK)
        a = normed_row_scale(x_row, u_row, w_ptr, K, rstd, GATED, DT, BLOCK_K)
        xsum = tl.zeros([BLOCK_K], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            q = quantize(normed(norm_input(x_row, u_row, offs, offs < K, GATED), w_ptr, offs, offs < K, rstd, DT), a)
            tl.store(xq_ptr + m * stride_qm + offs, q.to(tl.int8), mask=offs < K)
            xsum += q
        total = tl.sum(xsum, 0)
    tl.store(a_ptr + m, a)
    tl.store(xsum_ptr + m, total)


@autotune(CONFIGS, key=["K", "NORM", "GATED", "P", "SEGMENTS"], interpret_config=triton.Config({"BLOCK_K": 64}))
@triton.jit
def _rmsnorm_quant_unpack_kernel(
    # pointers: the norm's (as _rmsnorm_act_quant_kernel's), then the unpack's (as layout._unpack_kernel's)
    x_ptr, u_ptr, w_ptr, xq_ptr, a_ptr, xsum_ptr, pw_ptr, pw1_ptr, pw2_ptr, out_ptr,
    # sizes (M rows to normalize; N .. R2, KU as _unpack_kernel's N .. K; KB: its K blocks)
    M, K, eps, N, R, N1, R1, N2, R2, KU, KB,
    # strides
    stride_xm, stride_um, stride_qm,
    # constexpr (P .. UNPACK_K: _unpack_kernel's P, SEGMENTS, LANES, ASM, BLOCK_R, BLOCK_K)
    NORM: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr, SUM_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    P: tl.constexpr, SEGMENTS: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr, UNPACK_R: tl.constexpr,
    UNPACK_K: tl.constexpr,
):
    """A prefill's two independent steps before its int8 GEMM in one launch: programs 0 .. M - 1
    normalize and quantize a row each (_rmsnorm_act_quant_kernel's; without NORM quantize it as it
    is, _act_quant_kernel's: a bitlinear layer from float x, u_ptr and w_ptr unread), the rest
    unpack the weights (layout._unpack_kernel's, its 2-D grid in rows of KB). One launch fewer a
    projection group. Every program waits for the kernel before it (PDL) before it writes: the
    unpacked weights' buffer may be memory that kernel still reads."""
    pdl_start(PDL)
    pdl_wait(PDL)
    pid = tl.program_id(0)
    if pid < M:
        if NORM:
            rmsnorm_quant_row(pid, x_ptr, u_ptr, w_ptr, xq_ptr, a_ptr, xsum_ptr, K, eps, stride_xm, stride_um, stride_qm,
                              GATED, SUM_BLOCK, BLOCK_K)
        else:
            act_quant_row(pid, x_ptr, xq_ptr, a_ptr, xsum_ptr, K, stride_xm, stride_qm, BLOCK_K)
    else:
        b = pid - M
        unpack_tile(pw_ptr, pw1_ptr, pw2_ptr, out_ptr, N, R, N1, R1, N2, R2, KU, b // KB, b % KB,
                    P, SEGMENTS, LANES, ASM, UNPACK_R, UNPACK_K)


def rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., K) -> (x_q int8 (..., K), a float32 (..., 1), xsum int32 (...)) of RMSNorm(x), or with
    `up` (x's shape and dtype) of RMSNorm(relu(x)^2 * up): the gated MLP's activation folded in
    (x the gate projection's output; BitNet b1.58's relu2 MLP before its ffn_sub_norm)."""
    _check_norm(x, weight, up)
    weight = weight.contiguous()
    up2 = rows_of(up) if up is not None else None

    def launch(x2, x_q, a, xsum):
        u, stride_u = (up2, up2.stride(0)) if up2 is not None else (x2, 0)
        _rmsnorm_act_quant_kernel[(x2.shape[0],)](x2, u, weight, x_q, a, xsum, x2.shape[1], eps, x2.stride(0), stride_u,
                                                  x2.shape[1], GATED=up2 is not None, SUM_BLOCK=sum_block(x2.shape[1]),
                                                  **LAUNCH, **pdl(x2))

    return quantize_rows(x, launch)


def rmsnorm_act_quant_unpack(x: torch.Tensor, weight: torch.Tensor | None, eps: float, packed: list[torch.Tensor],
                             ns: list[int], fmt: str, up: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(x_q, a, xsum) of rmsnorm_act_quant(x, weight, eps, up) and the int8 weights of
    layout.unpack_cat(packed, ns, fmt) in one launch (a prefill's projection group before its int8
    GEMM): the same bits as the two launches (packed: up to three matrices of x's K). weight None:
    no norm, (x_q, a, xsum) of act_quant(x) (a bitlinear layer from float x at large M)."""
    if weight is not None:
        _check_norm(x, weight, up)
    elif up is not None:
        raise ValueError("up (the gated MLP's up projection) goes with an RMSNorm: pass its weight")
    elif not x.is_floating_point():
        raise ValueError(f"act_quant takes a float tensor, got {x.dtype}")
    k = x.shape[-1]
    packed = [check_packed(p, n, k, fmt) for p, n in zip(packed, ns)]
    w = torch.empty(sum(ns), k, dtype=torch.int8, device=packed[0].device)
    if k == 0 or not w.numel():  # (nothing to unpack)
        return (*(rmsnorm_act_quant(x, weight, eps, up) if weight is not None else act_quant(x)), w)
    norm = weight is not None
    if norm:
        weight = weight.contiguous()
    up2 = rows_of(up) if up is not None else None
    unpack, (row_blocks, k_blocks), constexprs = unpack_arguments(packed, ns, fmt, w)

    def launch(x2, x_q, a, xsum):
        u, stride_u = (up2, up2.stride(0)) if up2 is not None else (x2, 0)
        m = x2.shape[0]
        _rmsnorm_quant_unpack_kernel[(m + row_blocks * k_blocks,)](
            x2, u, weight if norm else x2, x_q, a, xsum, *unpack[:4], m, x2.shape[1], eps, *unpack[4:], k_blocks,
            x2.stride(0), stride_u, x2.shape[1], NORM=norm, GATED=up2 is not None,
            SUM_BLOCK=sum_block(x2.shape[1]), P=constexprs["P"], SEGMENTS=constexprs["SEGMENTS"], LANES=constexprs["LANES"],
            ASM=constexprs["ASM"], UNPACK_R=constexprs["BLOCK_R"], UNPACK_K=constexprs["BLOCK_K"], **LAUNCH, **pdl(x2))

    x_q, a, xsum = quantize_rows(x, launch)
    return x_q, a, xsum, w


def _check_norm(x: torch.Tensor, weight: torch.Tensor, up: torch.Tensor | None) -> None:
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"RMSNorm weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype):
        raise ValueError(f"up must have the gate's shape and dtype {tuple(x.shape)} {x.dtype}, got {tuple(up.shape)} {up.dtype}")


def reference_rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float,
                                up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference: bitnet.quant.rms_norm (what bitnet.RMSNorm computes), then
    bitnet.quant.quantize_activation; with up, of F.relu(x).square() * up (the relu2 MLP)."""
    with torch.no_grad():
        h = x if up is None else torch.nn.functional.relu(x).square() * up
        return quantize_activation(rms_norm(h, weight.to(x.device), eps))

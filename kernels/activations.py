"""Per-token absmax int8 quantization of activations, bit-identical to bitnet.quant.quantize_activation.

    a   = 127 / max(max_k |x[m, k]|, 1e-5)          float32
    x_q = clamp(round_half_even(x * a), -128, 127)  int8, x * a in float32

`127 / t` in torch is t.__rtruediv__(127), which torch computes as t.reciprocal() * 127: two
roundings, not one correctly rounded quotient (they differ in about a quarter of all inputs).
The kernel does the same: a = div_rn(1, m) * 127.

Rounding: torch.round rounds half to even, and so does this kernel, with no libdevice call: the
float add v + 1.5 * 2^23 rounds v to an integer (nearest, ties to even) and the bits of the sum
hold it (round_half_even). The common floor(v + 0.5) is wrong twice: on ties (2.5 -> 3) and just
below one half (0.49999997 + 0.5 rounds to 1.0 in float32). All launches turn fp fusion off: an
FMA would round x * a + 1.5 * 2^23 once instead of twice and break exact ties. The reciprocal is div_rn
because Triton's `/` on float32 is not correctly rounded on NVIDIA GPUs; one ulp off in `a` moves
x * a across a rounding boundary now and then, and the int8 activations would no longer match.

The kernel also writes xsum[m] = sum_k x_q[m, k] (int32), which the matmul kernels subtract
(layout.py: they accumulate weight codes, not weights).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet.quant import EPS, QMAX, QMIN, quantize_activation

from .common import LAUNCH, autotune, pdl, pdl_start, pdl_wait

# Globals a @triton.jit function reads must be constexpr.
_QMAX = tl.constexpr(QMAX)
_QMIN = tl.constexpr(QMIN)
_EPS = tl.constexpr(EPS)
_ROUND = tl.constexpr(1.5 * 2**23)
_ROUND_BITS = tl.constexpr(0x4B400000)  # the bits of 1.5 * 2^23

CONFIGS = [triton.Config({"BLOCK_K": bk}, num_warps=w) for bk in (1024, 4096) for w in (4, 8)]


@triton.jit
def round_half_even(v):
    """torch.round(v) as int32, for float32 |v| < 2^22.

    Adding 1.5 * 2^23 leaves no bits for a fraction, so the float add itself rounds to nearest,
    ties to even, and the integer lands in the low mantissa bits. Launch with fp fusion off
    (common.LAUNCH): an FMA would fold a preceding product into this add, unrounded.
    """
    return (v + _ROUND).to(tl.int32, bitcast=True) - _ROUND_BITS


@triton.jit
def activation_scale(absmax):
    """a = 127 / max(absmax, 1e-5) as torch evaluates `127 / t`: (1 / t) * 127, two roundings."""
    return tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, _EPS)) * 127.0


@triton.jit
def quantize(x, a):
    """x (float32 tile) -> round_half_even(x * a) clamped to int8 range, as int32."""
    return tl.minimum(tl.maximum(round_half_even(x * a), _QMIN), _QMAX)


@triton.jit
def row_scale(x_ptr, K, BLOCK_K: tl.constexpr):
    """a of the row x_ptr[0:K] (any float dtype): one pass over the row."""
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    return activation_scale(tl.max(amax, 0))


@autotune(CONFIGS, key=["K"], interpret_config=triton.Config({"BLOCK_K": 64}))
@triton.jit
def _act_quant_kernel(
    # pointers
    x_ptr, xq_ptr, a_ptr, xsum_ptr,
    # sizes
    K,
    # strides
    stride_xm, stride_qm,
    # constexpr
    PDL: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row m.

    x_ptr: (M, K) float (fp32/bf16/fp16), unit stride along K.
    xq_ptr: int8 (M, K); a_ptr: float32 (M,); xsum_ptr: int32 (M,) = sum_k x_q[m, k].
    PDL: launched as a dependent (common.pdl).
    """
    pdl_start(PDL)
    pdl_wait(PDL)
    act_quant_row(tl.program_id(0), x_ptr, xq_ptr, a_ptr, xsum_ptr, K, stride_xm, stride_qm, BLOCK_K)


@triton.jit
def act_quant_row(m, x_ptr, xq_ptr, a_ptr, xsum_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    """_act_quant_kernel's program m: row m quantized, stored with a and xsum."""
    x_row = x_ptr + m * stride_xm
    a = row_scale(x_row, K, BLOCK_K)
    xsum = tl.zeros([BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        q = quantize(tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32), a)
        tl.store(xq_ptr + m * stride_qm + offs, q.to(tl.int8), mask=mask)
        xsum += q
    tl.store(a_ptr + m, a)
    tl.store(xsum_ptr + m, tl.sum(xsum, 0))


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> (M, K) view with unit stride along K (copied only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def quantize_rows(x: torch.Tensor, launch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a per-row quantization kernel: x (..., K) -> (x_q int8 (..., K), a float32 (..., 1),
    xsum int32 (...)). launch(x2, x_q, a, xsum) gets x as (M, K) rows and the outputs to fill,
    contiguous in their final shapes (x_q's row stride is K)."""
    x2 = rows_of(x)
    lead = x.shape[:-1]
    # made in their final shapes (contiguous: row m of x_q at m * K, a[m] and xsum[m] at m)
    x_q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    a = torch.empty((*lead, 1), dtype=torch.float32, device=x.device)
    xsum = torch.empty(lead, dtype=torch.int32, device=x.device)
    if x2.shape[0] > 0:
        launch(x2, x_q, a, xsum)
    return x_q, a, xsum


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., K) float -> (x_q int8 (..., K), a float32 (..., 1), xsum int32 (...))."""
    if not x.is_floating_point():
        raise ValueError(f"act_quant takes a float tensor, got {x.dtype}")

    def launch(x2, x_q, a, xsum):
        _act_quant_kernel[(x2.shape[0],)](x2, x_q, a, xsum, x2.shape[1], x2.stride(0), x2.shape[1], **LAUNCH, **pdl(x2))

    return quantize_rows(x, launch)


def reference_act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch reference: bitnet.quant.quantize_activation and the row sums of x_q."""
    x_q, a = quantize_activation(x)
    return x_q, a, x_q.sum(-1, dtype=torch.int32)

"""RMSNorm fused with the per-token int8 quantization that follows it: one read of x per pass,
no normalized activation written to memory.

    h   = weight * (x * rsqrt(mean_k x^2 + eps)).to(x.dtype)   (bitnet.quant.rms_norm: normalize
                                                               in float32, scale in the input dtype)
    x_q, a = act_quant(h)                                      (activations.py, same arithmetic)

Three passes over the row (sum of squares; absmax of h; quantize h), the later two from L2.
Bit-identical to torch where the sum of squares is: its summation order differs from torch's,
so the normalized values may differ by an ulp, and x_q by one where h * a lies that close to a
rounding boundary (the tests bound both).

Wiring: on the Triton path the model calls it (bitnet::rmsnorm_act_quant) once for every RMSNorm
in front of frozen BitLinear and hands x_q, a to their packed_matmul_cat (bitnet.model.projections
-> bitnet.bitlinear.normed_projections -> bitnet.ops.rms_norm_bitlinear_many): the normalized
activation never reaches memory, q/k/v (gate/up) share one quantization, and at decode one GEMV
launch. A BitLinear with its own rms_norm (use_rms_norm checkpoints) does not use it yet:
rms_norm, then act_quant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitnet.quant import quantize_activation, rms_norm

from .activations import CONFIGS, activation_scale, quantize, quantize_rows
from .common import LAUNCH, autotune


@triton.jit
def _normed(x_row, w_ptr, offs, mask, rstd):
    """h at offs, as float32, rounded as torch rounds it (x's dtype, then the product's)."""
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    h = w.to(tl.float32) * (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)  # exact in float32
    if w.dtype == x.dtype:
        h = h.to(x.dtype).to(tl.float32)  # torch: bf16 * bf16 is a bf16; mixed dtypes give float32
    return h


@autotune(CONFIGS, key=["K"], interpret_config=triton.Config({"BLOCK_K": 64}))
@triton.jit
def _rmsnorm_act_quant_kernel(
    # pointers
    x_ptr, w_ptr, xq_ptr, a_ptr, xsum_ptr,
    # sizes
    K, eps,
    # strides
    stride_xm, stride_qm,
    # constexpr
    BLOCK_K: tl.constexpr,
):
    """One program per row m.

    x_ptr: (M, K) float, unit stride along K; w_ptr: (K,) float, the RMSNorm weight.
    xq_ptr: int8 (M, K); a_ptr: float32 (M,); xsum_ptr: int32 (M,) = sum_k x_q[m, k].
    """
    m = tl.program_id(0)
    x_row = x_ptr + m * stride_xm
    sq = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        sq += x * x
    mean = tl.math.div_rn(tl.sum(sq, 0), K.to(tl.float32))
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + eps))  # torch.rsqrt is 1 / sqrt on CPU

    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(_normed(x_row, w_ptr, offs, offs < K, rstd)))
    a = activation_scale(tl.max(amax, 0))

    xsum = tl.zeros([BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        q = quantize(_normed(x_row, w_ptr, offs, offs < K, rstd), a)
        tl.store(xq_ptr + m * stride_qm + offs, q.to(tl.int8), mask=offs < K)
        xsum += q
    tl.store(a_ptr + m, a)
    tl.store(xsum_ptr + m, tl.sum(xsum, 0))


def rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., K) -> (x_q int8 (..., K), a float32 (..., 1), xsum int32 (...)) of RMSNorm(x)."""
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"RMSNorm weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    weight = weight.contiguous()

    def launch(x2, x_q, a, xsum):
        _rmsnorm_act_quant_kernel[(x2.shape[0],)](x2, weight, x_q, a, xsum, x2.shape[1], eps, x2.stride(0), x2.shape[1],
                                                  **LAUNCH)

    return quantize_rows(x, launch)


def reference_rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference: bitnet.quant.rms_norm (what bitnet.RMSNorm computes), then
    bitnet.quant.quantize_activation."""
    with torch.no_grad():
        return quantize_activation(rms_norm(x, weight.to(x.device), eps))

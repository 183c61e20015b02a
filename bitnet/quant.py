"""Quantization math of BitNet b1.58 (ternary) and the original BitNet (binary). Torch only.

Every formula is the one in the papers and in Microsoft's training FAQ; all of it runs in float32
whatever the input dtype, so that bf16 inputs round the same way as fp32 ones.

Ternary weights, one scale per matrix (BitNet b1.58, arXiv 2402.17764, eq. 1-3):
    s   = mean(|W|).clamp(min=1e-5)
    W_q = round(W / s).clamp(-1, 1)                 # in {-1, 0, +1}; W ~ W_q * s

Binary weights (BitNet, Wang et al. 2023, arXiv 2310.11453, eq. 1-4):
    alpha = mean(W)
    W_b   = Sign(W - alpha)                          # in {-1, +1}: +1 where > 0, -1 where <= 0 (eq. 2)
    beta  = mean(|W|).clamp(min=1e-5)                # W ~ W_b * beta  (beta = ||W||_1 / nm, eq. 4)

Activations, int8 per token (absmax over the last dimension):
    a   = 127 / max(|x|, dim=-1).clamp(min=1e-5)
    x_q = round(x * a).clamp(-128, 127)              # x ~ x_q / a

Linear layer:  y = (x_q @ W_q^T) * s / a   — the integer accumulation is exact, the scales are
applied once at the end.

Rounding: torch.round rounds half to even. Every path in this package (the Triton kernels too)
rounds the same way, so that the int8 activations are bit-identical across paths.

Training uses the straight-through estimator: the forward pass sees the quantized value, the
backward pass treats quantization as the identity, `x + (q(x) - x).detach()`.
"""

from __future__ import annotations

import torch

EPS = 1e-5
QMAX = 127
QMIN = -128


def ternary_scale(w: torch.Tensor) -> torch.Tensor:
    """s = mean(|W|) clamped at 1e-5, a float32 scalar tensor."""
    return w.detach().float().abs().mean().clamp(min=EPS)


def quantize_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) any float dtype -> (W_q int8 (N, K) in {-1, 0, 1}, s float32 scalar)."""
    s = ternary_scale(w)
    w_q = (w.detach().float() / s).round().clamp(-1, 1).to(torch.int8)
    return w_q, s


def binary_scale(w: torch.Tensor) -> torch.Tensor:
    """beta = mean(|W|) clamped at 1e-5, a float32 scalar tensor."""
    return w.detach().float().abs().mean().clamp(min=EPS)


def quantize_binary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> (W_b int8 (N, K) in {-1, +1}, beta float32 scalar).

    Sign(0) is -1, as the paper's Sign function defines it: a constant matrix (W - mean(W) == 0
    everywhere) becomes all -1, scaled by beta = |c|; a zero matrix becomes all -1 scaled by 1e-5.
    """
    w32 = w.detach().float()
    # W > alpha rather than W - alpha > 0, with alpha summed in float64: the mean of equal values
    # is then exactly that value, so a constant matrix is all -1 rather than rounding noise.
    alpha = w32.mean(dtype=torch.float64).float()
    w_b = torch.where(w32 > alpha, 1, -1).to(torch.int8)
    return w_b, binary_scale(w32)


def quantize_weight(w: torch.Tensor, bits: str = "ternary") -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on the weight format: "ternary" (b1.58) or "binary" (original BitNet)."""
    if bits == "ternary":
        return quantize_ternary(w)
    if bits == "binary":
        return quantize_binary(w)
    raise ValueError(f"unknown weight format {bits!r}; expected 'ternary' or 'binary'")


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (x_q int8 (..., K), a float32 (..., 1)) with x ~ x_q / a.

    An all-zero row gets a = 127 / 1e-5 and x_q = 0: no NaN, no inf.
    """
    x32 = x.detach().float()
    a = QMAX / x32.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    x_q = (x32 * a).round().clamp(QMIN, QMAX).to(torch.int8)
    return x_q, a


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as in Llama and transformers' BitNet: normalize in float32, scale in x's dtype,
    weight * (x * rsqrt(mean(x^2, dim=-1) + eps)).to(x.dtype) (bitnet.RMSNorm's forward)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _ste(x: torch.Tensor, q: torch.Tensor, strength: torch.Tensor | None) -> torch.Tensor:
    """x + lambda * (q - x).detach(): forward q (lambda = 1) or a blend, gradient of the identity."""
    delta = (q - x).detach()
    return x + (delta if strength is None else strength.to(delta.dtype) * delta)


def fake_quant_weight(w: torch.Tensor, bits: str = "ternary", strength: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantized weight W_q * s in w's dtype, with the straight-through gradient.

    strength: None (full quantization) or a 0-dim tensor lambda in [0, 1] for a quantization
    warm-up, w + lambda * (q(w) - w).detach().
    """
    w_q, s = quantize_weight(w, bits)
    return _ste(w, (w_q.float() * s).to(w.dtype), strength)


def fake_quant_activation(x: torch.Tensor, strength: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantized activation x_q / a in x's dtype, with the straight-through gradient."""
    x_q, a = quantize_activation(x)
    return _ste(x, (x_q.float() / a).to(x.dtype), strength)


def int_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact integer x_q (M, K) @ w_q (N, K)^T -> int32 (M, N), for int8 inputs on any device.

    On the CPU, torch's int8 GEMM (`torch._int_mm`, oneDNN: VNNI or AMX where the CPU has them)
    accumulates in int32, exactly (K >= 16 and N >= 16: for K = 1 its (K, N) view has ambiguous
    strides). Elsewhere (CUDA, small CPU shapes) a float64 GEMM: every product is an integer and
    every partial sum is bounded by 128 * K < 2^53, so it is exact whatever order it sums in, for
    any K, whatever precision settings are on (they apply to float32 GEMMs only).
    Not float32: exact only below K = 2^17, and `torch.backends.cuda.matmul.allow_tf32` or
    `torch.set_float32_matmul_precision("high")` hand float32 GEMMs to TF32 or bf16 tensor cores:
    int8 values survive their operand rounding, but exactness would then rest on how the tensor
    cores accumulate, which is not documented as IEEE float32. Not int64: no int64 GEMM on CUDA.
    (The cost: GPUs without fast float64, consumer ones, run this torch path far slower; the
    Triton kernels are the path for speed there.)
    """
    k = x_q.shape[-1]
    if x_q.device.type == "cpu" and k >= 16 and w_q.shape[0] >= 16 and hasattr(torch, "_int_mm"):
        return torch._int_mm(x_q.to(torch.int8).contiguous(), w_q.to(torch.int8).contiguous().t())
    return (x_q.double() @ w_q.double().t()).to(torch.int32)


def quantized_linear(
    x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference inference linear: y = (x_q @ W_q^T) * s / a (+ bias), in x's dtype.

    x: (..., K) float; w_q: (N, K) int8 (ternary or binary values); scale: float32 scalar or (1,).
    """
    x_q, a = quantize_activation(x)  # (..., K) int8, (..., 1) float32
    acc = int_matmul(x_q.reshape(-1, x_q.shape[-1]), w_q)  # (M, N) int32, exact
    y = acc.float() * (scale.float().reshape(()) / a.reshape(-1, 1))
    y = y.reshape(*x.shape[:-1], w_q.shape[0]).to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)

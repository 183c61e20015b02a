"""The int8 lm_head's GEMV (kernels/int8_head.py) against float64, and its wiring: a quantized head
on the Triton path runs it for few rows (no bf16 copy of the weights), the dequantizing GEMM else."""

from __future__ import annotations

import pytest
import torch

from bitnet import BitNetConfig, BitNetForCausalLM, freeze, kernels, ops
from bitnet.kernels.int8_head import MAX_ROWS, reference_int8_linear


def head(device, n=300, k=96, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 1e-2 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    return w.to(device), s.to(device), None if b is None else b.to(device)


# every dtype at one row and three; the most rows the GEMV takes once (the rows share the kernel's code,
# the dtype only its loads and stores)
@pytest.mark.parametrize("m, bias, dtype", [(m, bias, dtype) for m, bias in [(1, False), (3, True)]
                                            for dtype in (torch.float32, torch.bfloat16, torch.float16)]
                         + [(MAX_ROWS, False, torch.float16)])
def test_int8_linear_matches_float64(m, bias, dtype, triton_device):
    """float32 sums of x * W_q, times s (plus bias), one rounding to x's dtype: within a float32
    summation's error and that rounding (an ulp; the interpreter truncates to bf16 / fp16)."""
    w, s, b = head(triton_device, bias=bias)
    x = torch.randn(m, w.shape[1]).to(dtype).to(triton_device)
    y = kernels.int8_linear(x, w, s, None if b is None else b.to(dtype))
    assert y.shape == (m, w.shape[0]) and y.dtype == dtype
    ref = reference_int8_linear(x.cpu(), w.cpu(), s.cpu(), None if b is None else b.to(dtype).cpu())
    scale = (x.cpu().double().abs() @ w.cpu().double().abs().t()) * s.cpu().double()  # sum of |terms|
    tol = torch.finfo(dtype).eps * ref.abs() + 1e-6 * scale + 1e-6
    assert ((y.cpu().double() - ref).abs() <= tol).all()


def test_leading_dimensions_and_bad_inputs(triton_device):
    w, s, _ = head(triton_device)
    x = torch.randn(2, 1, w.shape[1], device=triton_device)
    assert kernels.int8_linear(x, w, s).shape == (2, 1, w.shape[0])
    with pytest.raises(ValueError, match="at most 16 rows"):
        kernels.int8_linear(torch.randn(MAX_ROWS + 1, w.shape[1], device=triton_device), w, s)
    with pytest.raises(ValueError, match="int8 \\(N, K\\) weight"):
        kernels.int8_linear(x, w.float(), s)
    with pytest.raises(ValueError, match="300 rows need 300 scales"):
        kernels.int8_linear(x, w, s[:-1])


def quantized_head_calls(bits: int, impl: str, monkeypatch, device):
    """A tiny frozen model with quantize_lm_head(bits) on the Triton path (its float parts in torch
    on a CPU), its GEMV implementation custom_ops.<impl> watched: (model, the shapes it was called
    with, the last position's logits alone, the full logits) over more rows than the GEMV takes."""
    torch.manual_seed(0)
    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny", num_hidden_layers=1)).eval())
    model.quantize_lm_head(bits)
    model.to(device)
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    monkeypatch.setenv("BITNET_CPU_FLOAT_OPS", "torch")  # on a CPU: the Triton path, not the native op
    calls = []
    from bitnet.kernels import custom_ops

    real = getattr(custom_ops, impl)
    monkeypatch.setattr(custom_ops, impl, lambda *a: calls.append(a[0].shape) or real(*a))
    ids = torch.arange(3, 3 + MAX_ROWS + 4, device=device)[None]  # more rows than the GEMV takes
    with torch.no_grad():
        last = model(ids, logits_to_keep=1).logits
        full = model(ids).logits
    return model, calls, last, full


def test_a_quantized_head_runs_the_gemv_for_few_rows(monkeypatch, triton_device):
    """quantize_lm_head(8) on the Triton path: decode's one row (and a prefill's last position) go
    through the GEMV, equal to the native CPU kernel's arithmetic within float32 summation order;
    evaluation's many rows dequantize and run F.linear as before."""
    model, calls, last, full = quantized_head_calls(8, "_int8_linear_impl", monkeypatch, triton_device)
    assert calls == [torch.Size([1, 1, model.config.hidden_size])]  # the one row; the full logits: F.linear
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    h = model.lm_head
    x = torch.randn(1, model.config.hidden_size, device=triton_device)
    ref = reference_int8_linear(x.cpu(), h.weight.cpu(), h.weight_scale.cpu())
    torch.testing.assert_close(ops.int8_linear(x, h.weight, h.weight_scale).cpu().double(), ref, rtol=1e-5, atol=1e-6)

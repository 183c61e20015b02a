"""The int4 lm_head's GEMV (kernels/int4_head.py) against float64, and its wiring: an Int4Linear on
the Triton path runs it for few rows (no float32 copy of the weights), the dequantized GEMM else."""

from __future__ import annotations

import pytest
import torch

from bitnet import Int4Linear, kernels, ops
from bitnet.kernels.int4_head import MAX_ROWS, reference_int4_linear
from test_int8_head import quantized_head_calls


def head(device, n=300, k=100, bias=False, seed=0):
    """An Int4Linear (N, K) from random float weights (K = 100: padded to 128, a ragged last block)."""
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        linear.weight[3] = 0  # an all-zero row: scale 0
        if bias:
            linear.bias.copy_(torch.randn(n, generator=g))
    return Int4Linear.from_linear(linear).to(device)


def tolerance(x, h, ref, dtype):
    """float32 sums over the groups of d_g * (exact group sum) / a, one rounding to dtype."""
    from bitnet.quant import quantize_activation

    x_q, a = quantize_activation(x.reshape(-1, x.shape[-1]))
    w = h.dequantized().cpu().double()
    scale = ((x_q.double().abs() @ w.abs().t()) / a.double()).reshape(ref.shape)  # sum of |terms|
    return torch.finfo(dtype).eps * ref.abs() + 1e-6 * scale + 1e-6


# every dtype at one row and three; the most rows the GEMV takes once (the rows share the kernel's code,
# the dtype only its loads and stores: 11 s an interpreted case)
@pytest.mark.parametrize("m, k, bias, dtype", [(m, k, bias, dtype) for m, k, bias in [(1, 100, False), (3, 192, True)]
                                               for dtype in (torch.float32, torch.bfloat16, torch.float16)]
                         + [(MAX_ROWS, 64, False, torch.bfloat16)])
def test_int4_linear_matches_float64(m, k, bias, dtype, triton_device):
    h = head(triton_device, k=k, bias=bias)
    x = (torch.randn(m, k) * 3).to(dtype)
    b = None if h.bias is None else h.bias.to(dtype)
    y = kernels.int4_linear(x.to(triton_device), h.codes, h.scales, h.out_features, b)
    assert y.shape == (m, h.out_features) and y.dtype == dtype
    ref = reference_int4_linear(x, h.codes.cpu(), h.scales.cpu(), h.out_features, None if b is None else b.cpu())
    assert ((y.cpu().double() - ref).abs() <= tolerance(x, h, ref, dtype)).all()
    assert not y[:, 3].any() or bias  # the all-zero row


def test_every_code_byte_in_every_word_lane_at_extreme_activations(triton_device):
    """The GEMV reads the codes as int32 words and turns each nibble c into the int8 16 (c - 8) in
    place (its low nibbles shifted up): every byte 0 .. 255 in every lane of a word, against
    activations whose x_q are -127 and 127 (alternating, and one sign), with unit scales: the
    group sums are exact integers, so the float32 result is the float64 one to a few ulps."""
    n, k = 64, 256  # 4 blocks of 64 weights; 128 bytes a row
    idx = (torch.arange(n)[:, None] * 37 + torch.arange(k // 2)[None, :]) % 256
    codes = idx.to(torch.uint8)
    scales = torch.ones(n, k // 32)
    for x in (torch.ones(1, k), -torch.ones(1, k), torch.tensor([[(1.0, -1.0)[i % 2] for i in range(k)]])):
        y = kernels.int4_linear(x.to(triton_device), codes.to(triton_device), scales.to(triton_device), n)
        ref = reference_int4_linear(x, codes, scales, n)
        torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-6, atol=1e-6)


def test_the_reference_is_the_modules_own_formula():
    """reference_int4_linear (the kernel's float64 yardstick) against Int4Linear's torch path."""
    h = head("cpu", k=100, bias=True)
    x = torch.randn(20, 100)  # more rows than the kernels take: Int4Linear's dequantized GEMM
    torch.testing.assert_close(h(x).double(), reference_int4_linear(x, h.codes, h.scales, h.out_features, h.bias),
                               rtol=1e-5, atol=1e-5)


def test_leading_dimensions_and_bad_inputs(triton_device):
    h = head(triton_device)
    x = torch.randn(2, 1, 100, device=triton_device)
    assert kernels.int4_linear(x, h.codes, h.scales, h.out_features).shape == (2, 1, h.out_features)
    with pytest.raises(ValueError, match="at most 16 rows"):
        kernels.int4_linear(torch.randn(MAX_ROWS + 1, 100, device=triton_device), h.codes, h.scales, h.out_features)
    with pytest.raises(ValueError, match="codes must be uint8"):
        kernels.int4_linear(x, h.codes.to(torch.int16), h.scales, h.out_features)
    with pytest.raises(ValueError, match="codes must be uint8 .* >= 200"):
        kernels.int4_linear(torch.randn(1, 200, device=triton_device), h.codes, h.scales, h.out_features)
    with pytest.raises(ValueError, match="scales must be \\(300, 4\\)"):
        kernels.int4_linear(x, h.codes, h.scales[:, :2], h.out_features)


def test_the_op_passes_opcheck(triton_device):
    h = head(triton_device, bias=True)
    x = torch.randn(3, 100, device=triton_device)
    torch.library.opcheck(torch.ops.bitnet.int4_linear.default, (x, h.codes, h.scales, h.out_features, h.bias),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_a_4bit_head_runs_the_gemv_for_few_rows(monkeypatch, triton_device):
    """quantize_lm_head(4) on the Triton path: decode's one row (a prefill's last position) through
    the GEMV; evaluation's many rows dequantize as before; the two agree on the last position."""
    model, calls, last, full = quantized_head_calls(4, "_int4_linear_impl", monkeypatch, triton_device)
    assert calls == [torch.Size([1, 1, model.config.hidden_size])]  # the one row; the full logits: dequantized
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
    h = model.lm_head
    x = torch.randn(1, model.config.hidden_size, device=triton_device)
    got = ops.int4_linear(x, h.codes, h.scales, h.out_features)
    ref = reference_int4_linear(x.cpu(), h.codes.cpu(), h.scales.cpu(), h.out_features)
    assert ((got.cpu().double() - ref).abs() <= tolerance(x.cpu(), h, ref, torch.float32)).all()

"""bitnet.quant against float64 and exact-integer references."""

import pytest
import torch

from bitnet.quant import (
    fake_quant_activation,
    fake_quant_weight,
    int_matmul,
    quantize_activation,
    quantize_ternary,
    quantized_linear,
)


def test_ternary_matches_float64_formula():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * 0.3
    w_q, s = quantize_ternary(w)
    s64 = w.double().abs().mean()
    assert w_q.dtype == torch.int8 and set(w_q.unique().tolist()) <= {-1, 0, 1}
    torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=0)
    assert torch.equal(w_q, (w.double() / s64).round().clamp(-1, 1).to(torch.int8))


def test_ternary_zero_matrix_gives_zeros_not_nan():
    w_q, s = quantize_ternary(torch.zeros(8, 8))
    assert torch.equal(w_q, torch.zeros(8, 8, dtype=torch.int8))
    assert s.item() == pytest.approx(1e-5)


def test_ternary_bf16_rounds_like_fp32():
    torch.manual_seed(1)
    w = (torch.randn(32, 32) * 0.1).bfloat16()
    assert torch.equal(quantize_ternary(w)[0], quantize_ternary(w.float())[0])


def test_activation_matches_float64_formula_and_rows_are_independent():
    torch.manual_seed(2)
    x = torch.randn(5, 7, 64) * torch.tensor([0.01, 1.0, 100.0, 3.0, 0.5, 2.0, 7.0]).view(1, 7, 1)
    x_q, a = quantize_activation(x)
    a64 = 127 / x.double().abs().amax(-1, keepdim=True)
    torch.testing.assert_close(a.double(), a64, rtol=1e-6, atol=0)
    ref = (x.double() * a64).round().clamp(-128, 127)
    # float32 and float64 may round differently only at an exact tie
    assert (x_q.double() - ref).abs().max() <= 1
    assert (x_q.double() != ref).float().mean() < 1e-3
    assert x_q.abs().amax(-1).eq(127).all()  # the absmax element of every token maps to +-127


def test_activation_zero_rows():
    x = torch.zeros(3, 16)
    x[1] = torch.linspace(-1, 1, 16)
    x_q, a = quantize_activation(x)
    assert torch.isfinite(a).all()
    assert torch.equal(x_q[0], torch.zeros(16, dtype=torch.int8)) and torch.equal(x_q[2], x_q[0])


def test_activation_rounds_half_to_even():
    # absmax 127 makes a = 1 exactly, so x * a hits the ties 0.5, 1.5, 2.5, -0.5, -2.5 exactly
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5]])
    x_q, a = quantize_activation(x)
    assert a.item() == 1.0
    assert x_q.tolist() == [[127, 0, 2, 2, 0, -2, 4]]


def test_straight_through_gradients_are_identity():
    torch.manual_seed(3)
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(16, 16)
    (fake_quant_weight(w) * g).sum().backward()
    assert torch.equal(w.grad, g)
    gx = torch.randn(4, 16)
    (fake_quant_activation(x) * gx).sum().backward()
    assert torch.equal(x.grad, gx)


@pytest.mark.parametrize("k", [64, 200_000])
def test_int_matmul_is_exact(k):
    torch.manual_seed(4)
    x_q = torch.randint(-128, 128, (3, k), dtype=torch.int8)
    x_q[0] = 127  # the worst case: every product at its largest
    w_q = torch.randint(-1, 2, (5, k), dtype=torch.int8)
    w_q[0] = 1
    ref = x_q.long() @ w_q.long().t()
    assert torch.equal(int_matmul(x_q, w_q).long(), ref)


def test_quantized_linear_matches_float64_formula():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 96)
    w_q = torch.randint(-1, 2, (40, 96), dtype=torch.int8)
    s = torch.tensor(0.037)
    bias = torch.randn(40)
    y = quantized_linear(x, w_q, s, bias)
    x_q, a = quantize_activation(x)
    ref = (x_q.double() @ w_q.double().t()) * s.double() / a.double() + bias.double()
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)

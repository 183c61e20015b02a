"""bitnet.kernels (Triton) against exact integer and float64 references, and against the torch path.

The small-shape tier: N and K that are multiples of no block size, K = 37 (the byte path) and
K = 100 (int32 words), M in {1, 3, 16, 33}, all-zero rows, the three packed formats. Its kernels
run where conftest.py's `triton_device` says: in Triton's interpreter on CPU tensors without a GPU
(TRITON_INTERPRET=1, what CPU CI runs), compiled on CUDA tensors with one. With a GPU the
interpreter tier is also rerun, in a subprocess that sees none (test_interpreter_tier_reruns_beside_a_gpu).
Tests marked `cuda` repeat the checks at real shapes on a GPU. Every exact reference (the integer
products, reference_gemm, the torch path) of the small-shape tier runs on the CPU, and kernel
outputs are compared there; the frozen model's two paths run side by side on the kernels' device,
and the real shapes' references on the GPU (float64 GEMMs: exact, and minutes on a CPU).

Tolerances, where equality is not asserted:
- fp32 outputs equal the torch path bit for bit, and are within 1e-6 (relative, plus 1e-6 absolute)
  of the float64 formula: one rounding of s / a, one of acc * (s / a), one of the bias add.
- bf16 outputs: the interpreter truncates float32 -> bf16 (a GPU rounds to nearest even, as torch
  does), so there they may differ from torch by one bf16 ulp per rounding (two with a bias);
  within 2^-6 relative of the float64 formula. The small tier asserts that bound on a GPU too (it
  was written and checked under the interpreter); equality with the torch path on a GPU is what
  the cuda tier asserts (bf16, no bias).
- logits of a frozen tiny model through both paths: within 1e-5. The Triton path fuses each
  RMSNorm into its output's quantization (rmsnorm_act_quant), whose sum of squares runs in another
  order than torch's: a row's scale a may be an ulp off the torch path's, and an x_q could be one
  step off where h * a lies that close to a rounding boundary (none does at this seed; the bound
  on such a step is tests/test_fused_norm_quant.py's).
- the fused RMSNorm + quantization: its sum of squares runs in another order than torch's, so x_q
  may differ by one on a few elements (fp32: at most 1, on under 1%).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

import bitnet
from bitnet import kernels
from bitnet.kernels.activations import act_quant as act_quant_launch, reference_act_quant
from bitnet.kernels.common import INTERPRET
from bitnet.kernels.gemm import gemm, gemm_cat, reference_gemm
from bitnet.kernels.gemv import gemv, gemv_cat
from bitnet.kernels.layout import unpack_cat, unpack_triton
from bitnet.kernels.rmsnorm_quant import reference_rmsnorm_act_quant
from bitnet.ops import torch_bitlinear
from bitnet.packing import pack, unpack
from bitnet.quant import quantize_activation
from reference import assert_close_but_for_ties

FORMATS = ["2bit", "1.6bit", "1bit"]
M_VALUES = [1, 3, 16, 33]
N = 50  # packed rows 13 / 10 / 7: padding in "2bit" and "1bit", none in "1.6bit"


def random_weights(n: int, k: int, fmt: str, seed: int = 0, device="cpu") -> torch.Tensor:
    """Quantized weights (n, k) int8 of `fmt`'s alphabet; ternary ones get an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    if fmt == "1bit":
        w = torch.randint(0, 2, (n, k), generator=g, dtype=torch.int8) * 2 - 1
    else:
        w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        w[3] = 0
    return w.to(device)


def random_activations(m: int, k: int, seed: int = 1, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """(m, k) with rows of very different magnitudes and an all-zero first row (a = 127 / 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 10 ** torch.empty(m, 1).uniform_(-3, 3, generator=g)
    x[0] = 0
    return x.to(dtype=dtype, device=device)


def exact(x_q: torch.Tensor, w_q: torch.Tensor, device="cpu") -> torch.Tensor:
    """x_q @ w_q^T as int32, in float64 on `device` (the CPU unless a cuda-tier shape needs the GPU's
    speed): every product is an integer and every partial sum an integer below 128 * K < 2^53, so
    any summation order gives the exact sum. (int64 would be as exact, but torch has no int64 GEMM
    on CUDA and only a slow one on the CPU: minutes at the cuda tier's shapes.)"""
    return (x_q.to(device).double() @ w_q.to(device).double().t()).to(torch.int32)


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_act_quant_is_bit_identical_to_torch(dtype, triton_device):
    x = random_activations(64, 100, dtype=dtype).reshape(4, 16, 100)
    x_q, a, xsum = (t.cpu() for t in act_quant_launch(x.to(triton_device)))
    r_q, r_a, r_sum = reference_act_quant(x)
    assert x_q.dtype == torch.int8 and a.dtype == torch.float32
    assert torch.equal(x_q, r_q) and torch.equal(a, r_a) and torch.equal(xsum, r_sum)
    assert a[0, 0].item() == pytest.approx(127 / 1e-5) and not x_q[0, 0].any()  # the all-zero row


def test_act_quant_rounds_ties_to_even(triton_device):
    # Row absmax 127 makes a = 1 exactly, so x * a is x: exact ties, and values just below a tie.
    row = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.49999997, 1.4999999, 3.5000002]
    x = torch.tensor([row, [-v for v in row]])
    x_q, a = (t.cpu() for t in kernels.act_quant(x.to(triton_device)))
    assert torch.equal(a, torch.ones(2, 1))
    expected = [127, 0, 2, 2, 0, -2, -2, 126, -126, 0, 1, 4]
    assert x_q[0].tolist() == expected and x_q[1].tolist() == [-v for v in expected]
    assert torch.equal(x_q, quantize_activation(x)[0])


def test_fused_rmsnorm_act_quant_matches_torch(triton_device):
    x = random_activations(32, 100)[1:]
    weight = torch.rand(100) + 0.5
    x_q, a = (t.cpu() for t in kernels.rmsnorm_act_quant(x.to(triton_device), weight.to(triton_device), 1e-5))
    r_q, r_a = reference_rmsnorm_act_quant(x, weight, 1e-5)
    torch.testing.assert_close(a, r_a, rtol=1e-6, atol=0)
    diff = (x_q.int() - r_q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_fused_rmsnorm_act_quant_bf16_dequantizes_to_rmsnorm(triton_device):
    x = random_activations(16, 100, dtype=torch.bfloat16)[1:]
    weight = (torch.rand(100) + 0.5).bfloat16()
    x_q, a = (t.cpu() for t in kernels.rmsnorm_act_quant(x.to(triton_device), weight.to(triton_device), 1e-5))
    norm = bitnet.RMSNorm(100, 1e-5, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(weight)
        h = norm(x).float()
    # Half a quantization step, plus the bf16 roundings of h: two of them, each up to one ulp
    # under the interpreter (truncation), half an ulp on a GPU.
    assert ((x_q.float() / a - h).abs() <= 0.5 / a + 2**-5 * h.abs()).all()


def test_fused_rmsnorm_act_quant_with_the_relu2_gate(triton_device):
    """up given: the norm's input is relu(gate)^2 * up, rounded as torch rounds it (the relu2 MLP's
    activation before its ffn_sub_norm), against the reference on F.relu(gate).square() * up; as
    close as the plain fused norm is to its reference; the row sums are x_q's."""
    gate, up = random_activations(17, 100, seed=4)[1:], random_activations(17, 100, seed=5)[1:]
    weight = torch.rand(100) + 0.5
    x_q, a, xsum = (t.cpu() for t in kernels.rmsnorm_act_quant(gate.to(triton_device), weight.to(triton_device), 1e-5,
                                                              with_sum=True, up=up.to(triton_device)))
    r_q, r_a = reference_rmsnorm_act_quant(gate, weight, 1e-5, up=up)
    torch.testing.assert_close(a, r_a, rtol=1e-6, atol=0)
    diff = (x_q.int() - r_q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert torch.equal(xsum, x_q.int().sum(-1))
    plain = kernels.rmsnorm_act_quant(gate.to(triton_device), weight.to(triton_device), 1e-5)[0].cpu()
    assert not torch.equal(plain, x_q)  # the gate is applied, not ignored


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_unpack_equals_torch_unpack_on_every_byte(fmt, triton_device):
    top = 243 if fmt == "1.6bit" else 256  # base-3 bytes stop at 3^5 - 1
    packed = torch.arange(top, dtype=torch.int32).remainder(top).to(torch.uint8).reshape(-1, 1).repeat(1, 3)
    n = packed.shape[0] * {"2bit": 4, "1.6bit": 5, "1bit": 8}[fmt] - 2  # two padding rows dropped
    if fmt == "2bit":
        packed = packed & 0x55 | (packed & 0xAA & ~((packed & 0x55) << 1))  # codes 0..2 only
    assert torch.equal(unpack_triton(packed.to(triton_device), n, fmt).cpu(), unpack(packed, n, fmt))
    # K a multiple of 4: int32 words of four codes at a time; every valid byte in every lane of a word
    packed = every_byte_matrix(fmt, 8)
    n = packed.shape[0] * {"2bit": 4, "1.6bit": 5, "1bit": 8}[fmt] - 3
    assert torch.equal(unpack_triton(packed.to(triton_device), n, fmt).cpu(), unpack(packed, n, fmt))
    buf = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device=triton_device)
    shifted = buf[1:].view(packed.shape)  # one byte into its storage: not on a word, the byte path
    shifted.copy_(packed.to(triton_device))
    assert torch.equal(unpack_triton(shifted, n, fmt).cpu(), unpack(packed, n, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [70, 72])
def test_one_unpack_launch_for_several_matrices(fmt, k, triton_device):
    """unpack_cat (a prefill's q / k / v, gate / up before the int8 GEMM): up to three matrices in one
    launch, each matrix's rows equal to bitnet.packing.unpack's, one after the other; row counts that
    leave a ragged last block of packed rows and padding rows in the last packed row; bytes (K = 70)
    and int32 words of four codes (K = 72)."""
    ns = [90, 21, 7]  # packed rows: several 16-row blocks, then ragged ones
    ws = [random_weights(n, k, fmt, seed=40 + i) for i, n in enumerate(ns)]
    packed = [pack(w, fmt) for w in ws]
    for count in (3, 2, 1):
        out = unpack_cat([p.to(triton_device) for p in packed[:count]], ns[:count], fmt).cpu()
        assert torch.equal(out, torch.cat([unpack(p, n, fmt) for p, n in zip(packed[:count], ns[:count])]))
        assert torch.equal(out, torch.cat(ws[:count]).to(torch.int8))
    with pytest.raises(ValueError, match="one to three matrices"):
        unpack_cat([packed[0].to(triton_device)] * 4, ns + [1], fmt)
    with pytest.raises(ValueError, match="out must be a contiguous int8"):
        unpack_cat([packed[0].to(triton_device)], ns[:1], fmt, out=torch.empty(ns[0], k + 1, dtype=torch.int8,
                                                                                  device=triton_device))


# ----------------------------------------------------------------------------- matmul: exact integers
@pytest.mark.parametrize("k", [37, 100])
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_int32_accumulator_is_exact(fmt, m, k, triton_device):
    w_q = random_weights(N, k, fmt)
    x_q, _ = quantize_activation(random_activations(m, k))
    x_q[-1] = 127  # the largest products: no int8 saturation of anything
    ref = exact(x_q, w_q)
    packed, x_q = pack(w_q, fmt).to(triton_device), x_q.to(triton_device)
    assert torch.equal(kernels.packed_matmul_int32(x_q, packed, N, fmt).cpu(), ref)
    # Both kernels, whatever the dispatch would pick: the GEMM at every M, the GEMV (one program
    # row per activation row, slow in the interpreter) up to M = 3.
    assert torch.equal(gemm(x_q, packed, N, fmt, out_dtype=torch.int32).cpu(), ref)
    if m <= 3:
        assert torch.equal(gemv(x_q, packed, N, fmt, out_dtype=torch.int32).cpu(), ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_int32_split_k_long_rows(fmt, triton_device):
    """Several K steps per program and split-K at small M: K = 512 in the interpreter (8-way), 2048
    on a GPU (4-way: a GPU splits only from K = 1024 on, gemm.split_k)."""
    from bitnet.kernels import gemm as gemm_module

    K = 2048 if triton_device == "cuda" else 512
    w_q = random_weights(40, K, fmt, seed=2)
    packed = pack(w_q, fmt).to(triton_device)
    for m in (2, 33):
        assert gemm_module.splits(m, 40, K, fmt, torch.device(triton_device)) > 1
        x_q, _ = quantize_activation(random_activations(m, K, seed=3))
        for _ in range(2):  # the second call reuses the split-K workspace the first left
            assert torch.equal(gemm(x_q.to(triton_device), packed, 40, fmt, out_dtype=torch.int32).cpu(), exact(x_q, w_q))
    workspaces = gemm_module._WORKSPACES
    assert workspaces and all(not buf.any() for buf in workspaces.values())  # left zero for the next call


def test_split_k_is_capped_by_its_knob_and_stays_exact(monkeypatch, triton_device):
    """gemm.splits (what bench_kernels' "one split" A/B asks) is what the launch uses, and
    SPLIT_K_MAX (BITNET_GEMM_SPLIT_K) caps it: at 2 and at 1 the same product, exact. K = 2048 at
    M = 2 splits in four on a GPU (>= 512 of K each) and in the interpreter (its 4 SMs)."""
    from bitnet.kernels import gemm as gemm_module

    w_q = random_weights(40, 2048, "2bit", seed=2)
    packed = pack(w_q, "2bit").to(triton_device)
    x_q, _ = quantize_activation(random_activations(2, 2048, seed=3))
    launched = []
    real = gemm_module.split_k
    monkeypatch.setattr(gemm_module, "split_k", lambda *a: launched.append(real(*a)) or launched[-1])
    asked = []
    for cap in (64, 2, 1):
        monkeypatch.setattr(gemm_module, "SPLIT_K_MAX", cap)
        asked.append(gemm_module.splits(2, 40, 2048, "2bit", torch.device(triton_device)))
        assert torch.equal(gemm(x_q.to(triton_device), packed, 40, "2bit", out_dtype=torch.int32).cpu(), exact(x_q, w_q))
    assert asked == [4, 2, 1] and launched == [4, 4, 2, 2, 1, 1]  # each: splits' call, then the launch's


def every_byte_matrix(fmt: str, k: int) -> torch.Tensor:
    """Packed (R, k) uint8 in which every valid byte of `fmt` (0 .. 242 for base 3; 2-bit bytes
    of codes 0 .. 2) sits in every byte lane of a word (column k % 4) of some row."""
    if fmt == "1.6bit":
        valid = torch.arange(243)
    else:
        b = torch.arange(256)
        valid = b[(b & 3 < 3) & (b >> 2 & 3 < 3) & (b >> 4 & 3 < 3) & (b >> 6 < 3)] if fmt == "2bit" else b
    rows = -(-valid.numel() // k) + 4
    idx = (torch.arange(rows)[:, None] * 5 + torch.arange(k)[None, :] * 7) % valid.numel()  # shifted per row
    return valid[idx].to(torch.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_every_byte_in_every_lane_at_extreme_activations(fmt, triton_device):
    """The GEMV multiplies what it derives from the packed bytes (codes scaled in place for bits,
    base-3 quotients for "1.6bit", combined after the loop): every valid byte in every lane of a
    word, against x_q of -128 and 127 (the int8 extremes, also where they alternate), exact."""
    k = 128
    packed = every_byte_matrix(fmt, k)
    n = packed.shape[0] * {"2bit": 4, "1.6bit": 5, "1bit": 8}[fmt]
    w_q = unpack(packed, n, fmt)
    x_q = torch.tensor([[-128] * k, [127] * k, [(-128, 127)[i % 2] for i in range(k)],
                        [(127, -128, 5, -1)[i % 4] for i in range(k)]], dtype=torch.int8)
    for row in x_q:
        y = gemv(row[None].to(triton_device), packed.to(triton_device), n, fmt, out_dtype=torch.int32)
        assert torch.equal(y.cpu(), exact(row[None], w_q))


@pytest.mark.parametrize("k", [128, 126])  # int32 words, bytes
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_every_byte_in_every_lane_at_extreme_activations(fmt, k, triton_device):
    """The GEMM's decode in its loop (base-3 digits from the quotients, one multiply-add for the
    four bytes of a word: no carry or borrow across bytes may reach a neighbour) on every valid
    byte in every lane of a word, and on the byte path, against x_q rows of the int8 extremes, exact."""
    packed = every_byte_matrix(fmt, k)
    n = packed.shape[0] * {"2bit": 4, "1.6bit": 5, "1bit": 8}[fmt]
    w_q = unpack(packed, n, fmt)
    x_q = torch.tensor([[-128] * k, [127] * k, [(-128, 127)[i % 2] for i in range(k)],
                        [(127, -128, 5, -1)[i % 4] for i in range(k)]], dtype=torch.int8)
    y = gemm(x_q.to(triton_device), packed.to(triton_device), n, fmt, out_dtype=torch.int32)
    assert torch.equal(y.cpu(), exact(x_q, w_q))


def prmt(a: int, b: int, selector: int) -> int:
    """PTX `prmt.b32 d, a, b, c` (default mode), from the ISA's definition: byte i of d is byte
    c[4i + 2 : 4i] of {b, a} (bytes 0-3 a's, 4-7 b's), or that byte's sign replicated if c[4i + 3]."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    d = 0
    for i in range(4):
        nibble = (selector >> 4 * i) & 0xF
        byte = src[nibble & 7]
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        d |= byte << 8 * i
    return d


def test_base3_byte_permutes_and_step_are_what_the_plain_path_computes():
    """On a GPU the base-3 decode (the GEMV's, the GEMM's, the unpack's: layout.base3_quotients)
    moves bytes with PTX `prmt` (inline assembly the interpreter cannot run; its plain-Triton twin
    is what CPU CI checks for exactness): its selectors, by the ISA's definition, against the twin's
    shifts and masks; the base-3 step (v + 1) * 85 >> 8 = floor(v / 3) for every byte value
    v < 243, its product inside a 16-bit lane; and the top bit slice's shift and mask in PTX."""
    from bitnet.kernels import layout as g

    rng = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2 ** 32, (2000, 2), generator=rng, dtype=torch.int64).tolist()
    words += [[0, 0xFFFFFFFF], [0x80808080, 0x7F7F7F7F], [0x00FF00FF, 0xFF00FF00]]
    for a, b in words:
        assert prmt(a, 0, g.HIGH_BYTES) == (a >> 8) & 0x00FF00FF
        assert prmt(a, b, g.INTERLEAVE_HIGH) == ((a >> 8) & 0x00FF00FF) | (((b >> 8) & 0x00FF00FF) << 8)
    assert f"{g.HIGH_BYTES:#x}" in g._HIGH_BYTES_ASM.value and f"{g.INTERLEAVE_HIGH:#x}" in g._INTERLEAVE_HIGH_ASM.value
    for v in range(243):
        assert (v + 1) * 85 >> 8 == v // 3 and (v + 1) * 85 < 2 ** 15
    # the top bit slice in byte lanes (layout.decode on words with ASM): its shift and mask, read
    # off the PTX, are those of the slice's bits in every byte
    for asm, bits in ((g._TOP_SLICE_2BIT_ASM, 2), (g._TOP_SLICE_1BIT_ASM, 1)):
        shift, mask = re.fullmatch(r"\{ \.reg \.b32 t; shr\.u32 t, \$1, (\d+); and\.b32 \$0, t, (0x[0-9a-f]+); \}",
                                   asm.value).groups()
        top = 8 // bits - 1
        assert int(shift) == bits * top and int(mask, 16) == sum(((1 << bits) - 1) << 8 * j for j in range(4))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_sums_stay_exact_up_to_max_k(fmt, monkeypatch, triton_device):
    """The largest sums the GEMV's int32 accumulators meet: K = MAX_K (131072), the largest bytes
    (every code 2, or 1 for "1bit") against x_q = -128 everywhere: the top bit slice's scaled sum
    is -2^31 itself; the base-3 sum of bytes times x_q (-242 * 128 * 2^17) wraps around, and the
    code sums, its differences, come out exact. (One wide tile pinned: 16 steps, not the
    interpreter's 2048.) Beyond MAX_K the GEMV refuses, and the dispatch takes the GEMM at M = 1."""
    import triton

    from bitnet.kernels import custom_ops, gemv as gemv_module

    monkeypatch.setattr(gemv_module._gemv_kernel, "configs", [triton.Config({"BLOCK_R": 1, "BLOCK_U": 2048}, num_warps=8)])
    k, p = gemv_module.MAX_K, {"2bit": 4, "1.6bit": 5, "1bit": 8}[fmt]
    packed = torch.full((1, k), {"2bit": 0xAA, "1.6bit": 242, "1bit": 0xFF}[fmt], dtype=torch.uint8)
    x_q = torch.full((1, k), -128, dtype=torch.int8)
    y = gemv(x_q.to(triton_device), packed.to(triton_device), p, fmt, out_dtype=torch.int32).cpu()
    assert torch.equal(y, torch.full((1, p), -128 * k, dtype=torch.int32))
    with pytest.raises(ValueError, match="MAX_K"):
        gemv(torch.zeros(1, k + 4, dtype=torch.int8, device=triton_device),
             torch.zeros(1, k + 4, dtype=torch.uint8, device=triton_device), p, fmt, out_dtype=torch.int32)
    # the dispatch past the GEMV's K (its bound lowered here, as a GEMM at K = 2^17 is slow to interpret)
    monkeypatch.setattr(custom_ops, "GEMV_MAX_K", 64)
    monkeypatch.setattr(custom_ops, "gemv", None)  # would fail if called
    w_q = random_weights(N, 100, fmt, seed=8)
    x_q, _ = quantize_activation(random_activations(2, 100, seed=9)[1:])  # (row 0 is all zero)
    y = kernels.packed_matmul_int32(x_q.to(triton_device), pack(w_q, fmt).to(triton_device), N, fmt)
    assert torch.equal(y.cpu(), exact(x_q, w_q))


# ----------------------------------------------------------------------------- matmul: scaled output
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [37, 100])
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bitlinear_matches_float64_formula_and_torch_path(fmt, m, k, dtype, triton_device):
    w_q = random_weights(N, k, fmt)
    packed, scale = pack(w_q, fmt), torch.tensor([0.037])
    bias = torch.randn(N).to(dtype) if m != 3 else None
    x = random_activations(m, k, dtype=dtype)
    y = kernels.bitlinear(x.to(triton_device), packed.to(triton_device), scale.to(triton_device), N, fmt,
                          None if bias is None else bias.to(triton_device)).cpu()
    assert y.dtype == dtype and y.shape == (m, N)

    x_q, a = quantize_activation(x)
    main = (x_q.double() @ w_q.double().t()) * scale.double() / a.double()
    y64 = main + (bias.double() if bias is not None else 0)
    ref = torch_bitlinear(x, packed, scale, N, fmt, bias)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-6)
        assert torch.equal(y, ref)
    else:
        # One bf16 rounding of the product, one of the sum with the bias: an ulp each (2^-7
        # relative) under the interpreter's truncation, of the magnitudes that were rounded. A
        # GPU rounds to nearest even and should equal ref; this tier holds it to the bound only.
        bound = 2**-6 * (main.abs() + (bias.double().abs() if bias is not None else 0))
        assert ((y.double() - y64).abs() <= bound).all()
        assert ((y.double() - ref.double()).abs() <= bound).all()


def test_packed_matmul_from_int8_activations(triton_device):
    w_q = random_weights(N, 100, "2bit")
    packed, scale = pack(w_q, "2bit"), torch.tensor([0.5])
    for m in (1, 16):
        x_q, a = kernels.act_quant(random_activations(m, 100).to(triton_device))
        y = kernels.packed_matmul(x_q, a, packed.to(triton_device), scale.to(triton_device), N, "2bit",
                                  out_dtype=torch.float32)
        assert torch.equal(y.cpu(), reference_gemm(x_q.cpu(), packed, N, "2bit", scale, a.cpu()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_reads_unaligned_int8_activations(fmt, triton_device):
    """The GEMV reads x_q as int32 words: rows that do not start on a 4-byte boundary (a column
    slice of a wider tensor) are copied first, not misread. K = 100: 25 words, two tile steps in
    the interpreter (16 words a step)."""
    w_q = random_weights(N, 100, fmt, seed=3)
    x_q, a = quantize_activation(random_activations(2, 100, seed=4))
    wide = torch.zeros(2, 103, dtype=torch.int8)
    wide[:, 1:101] = x_q
    view = wide.to(triton_device)[:, 1:101]  # storage offset 1, row stride 103
    packed, scale = pack(w_q, fmt).to(triton_device), torch.tensor([0.25], device=triton_device)
    assert torch.equal(gemv(view, packed, N, fmt, out_dtype=torch.int32).cpu(), exact(x_q, w_q))
    y = gemv(view, packed, N, fmt, scale=scale, a=a.to(triton_device), out_dtype=torch.float32)
    assert torch.equal(y.cpu(), reference_gemm(x_q, pack(w_q, fmt), N, fmt, scale.cpu(), a))


def three_matrices(fmt, k, device, seed):
    """Three matrices of one input for the *_cat launchers, q / k / v-like (N 50, 20, 13: rows that do
    not fill a tile): (ns, ternary weights, packed, scales, biases)."""
    ns = [50, 20, 13]
    ws = [random_weights(n, k, fmt, seed=seed + i) for i, n in enumerate(ns)]
    packed = [pack(w, fmt).to(device) for w in ws]
    scales = [torch.tensor([s], device=device) for s in (0.5, 0.03, 2.0)]
    biases = [torch.randn(n, generator=torch.Generator().manual_seed(i)).to(device) for i, n in enumerate(ns)]
    return ns, ws, packed, scales, biases


def check_cat_int32(cat, x_q, ws, packed, ns, fmt, device):
    """cat's int32 output exact for three and two matrices (no third segment's rows), and for a
    weight 4 bytes into its buffer: word-aligned, not on the 16-element grain of the one-launch path
    (cat then launches each matrix on its own)."""
    for count in (3, 2):
        acc = cat(x_q, packed[:count], ns[:count], fmt, [None] * count, out_dtype=torch.int32)
        assert torch.equal(acc.cpu(), torch.cat([exact(x_q, w) for w in ws[:count]], 1))
    buf = torch.zeros(packed[1].numel() + 4, dtype=torch.uint8, device=device)
    shifted = buf[4:].view(packed[1].shape)
    shifted.copy_(packed[1])
    acc = cat(x_q, [packed[0], shifted], ns[:2], fmt, [None] * 2, out_dtype=torch.int32)
    assert torch.equal(acc.cpu(), torch.cat([exact(x_q, w) for w in ws[:2]], 1))


@pytest.mark.parametrize("fmt, k", [("2bit", 37), ("2bit", 100), ("1.6bit", 100), ("1bit", 100)])
def test_gemv_cat_equals_each_matrix_alone(fmt, k, triton_device):
    """Three (and two) matrices of one input in one launch, of different N (q / k / v-like, rows
    that do not fill a tile), each with its own scale and bias: every column block equal to that
    matrix's own GEMV, bit for bit, from float x and from int8 x_q; int32 exact."""
    ns, ws, packed, scales, biases = three_matrices(fmt, k, triton_device, seed=10)
    x = random_activations(2, k, seed=5).to(triton_device)
    x_q, a = quantize_activation(x.cpu())
    x_q, a = x_q.to(triton_device), a.to(triton_device)
    cols = [0, 50, 70, 83]
    y = gemv_cat(x, packed, ns, fmt, scales, biases)
    yq = gemv_cat(x_q, packed, ns, fmt, scales, a=a, out_dtype=torch.float32)
    assert y.shape == (2, 83) and yq.shape == (2, 83)
    for j in range(3):
        block = slice(cols[j], cols[j + 1])
        assert torch.equal(y[:, block], gemv(x, packed[j], ns[j], fmt, scales[j], biases[j]))
        assert torch.equal(yq[:, block], gemv(x_q, packed[j], ns[j], fmt, scales[j], a=a, out_dtype=torch.float32))
    check_cat_int32(gemv_cat, x_q, ws, packed, ns, fmt, triton_device)
    with pytest.raises(ValueError, match="bias for every matrix or for none"):
        gemv_cat(x, packed, ns, fmt, scales, [biases[0], None, None])


@pytest.mark.parametrize("fmt, k, m, unpacked", [
    (fmt, k, m, False) for fmt, k in [("2bit", 37), ("2bit", 100), ("1.6bit", 100), ("1bit", 100)] for m in (3, 70)
] + [("2bit", 37, 70, True), ("1.6bit", 100, 70, True)])  # the unpacked path: its format only in the unpack
def test_gemm_cat_equals_each_matrix_alone(fmt, k, m, unpacked, monkeypatch, triton_device):
    """gemv_cat's contract for M > 1 (a batched decode step's q / k / v, small-M tiles with split-K;
    and the large-M tiles): three and two matrices of one input in one GEMM launch, tiles
    straddling two matrices, each column block equal to that matrix's own GEMM bit for bit, with
    its own scale and bias; int32 exact; weights off the 16-unit grain launch one by one. From
    UNPACK_M on (a prefill; forced here), the matrices are unpacked into one int8 buffer and one
    int8 GEMM launch covers them all, the same contract (the grain does not matter there)."""
    import bitnet.kernels.gemm as gemm_module

    if unpacked:
        monkeypatch.setattr(gemm_module, "UNPACK_M", 1)
        launches = []
        kernel = gemm_module._gemm_int8_kernel
        monkeypatch.setattr(gemm_module, "_gemm_int8_kernel", CountLaunches(kernel, launches))
    ns, ws, packed, scales, biases = three_matrices(fmt, k, triton_device, seed=30)
    x_q, a = quantize_activation(random_activations(m, k, seed=6))
    x_q, a = x_q.to(triton_device), a.to(triton_device)
    cols = [0, 50, 70, 83]
    for bias in (biases, None):
        y = gemm_cat(x_q, packed, ns, fmt, scales, bias, a=a, out_dtype=torch.float32)
        assert y.shape == (m, 83)
        for j in range(3):
            alone = gemm(x_q, packed[j], ns[j], fmt, scales[j], bias[j] if bias else None, a, out_dtype=torch.float32)
            assert torch.equal(y[:, cols[j]:cols[j + 1]], alone)
    check_cat_int32(gemm_cat, x_q, ws, packed, ns, fmt, triton_device)
    with pytest.raises(ValueError, match="bias for every matrix or for none"):
        gemm_cat(x_q, packed, ns, fmt, scales, [biases[0], None, None], a=a)
    if unpacked:  # one launch per call: (a cat of 3, each alone) twice above, then check_cat_int32's 3, 2, 2
        assert launches == [3, 1, 1, 1] * 2 + [3, 2, 2]


class CountLaunches:
    """Wraps an autotuned kernel: kernel[grid](...) runs it and appends its SEGMENTS to `launches`."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs["SEGMENTS"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("fmt", FORMATS)
def test_large_m_unpacked_gemm_is_exact_and_equals_the_fused_one(fmt, monkeypatch, triton_device):
    """From M = UNPACK_M on the GEMM unpacks the weights and runs a plain int8 GEMM: the same
    integers (exact) and the same epilogue as the decode-in-the-loop GEMM, bit for bit."""
    import bitnet.kernels.gemm as gemm_module

    k = 100
    w_q = random_weights(N, k, fmt, seed=7)
    packed, scale = pack(w_q, fmt).to(triton_device), torch.tensor([0.3], device=triton_device)
    bias = torch.randn(N).to(triton_device)
    x_q, a = quantize_activation(random_activations(33, k, seed=8))
    x_q, a = x_q.to(triton_device), a.to(triton_device)
    fused = gemm(x_q, packed, N, fmt, scale, bias, a, out_dtype=torch.float32)
    monkeypatch.setattr(gemm_module, "UNPACK_M", 3)
    assert torch.equal(gemm(x_q, packed, N, fmt, out_dtype=torch.int32).cpu(), exact(x_q, w_q))
    assert torch.equal(gemm(x_q, packed, N, fmt, scale, bias, a, out_dtype=torch.float32), fused)
    assert torch.equal(gemm(x_q[:2], packed, N, fmt, out_dtype=torch.int32).cpu(), exact(x_q[:2], w_q))  # below


@pytest.mark.parametrize("fmt, k", [("2bit", 100), ("1.6bit", 203), ("1bit", 128)])
def test_a_large_m_layer_quantizes_and_unpacks_in_one_launch(fmt, k, monkeypatch, triton_device):
    """bitlinear from float x from M = UNPACK_M on (forced here): x's quantization and the weights'
    unpack in one launch (rmsnorm_quant.rmsnorm_act_quant_unpack without a norm), then the int8
    GEMM: no act_quant or unpack launch of its own; x_q, a and xsum those of act_quant, the weights
    those of bitnet.packing.unpack; the output exactly the torch reference's integers (int32 via
    the same launches) and, in float32, equal to the path below UNPACK_M bit for bit."""
    import bitnet.kernels.gemm as gemm_module
    from bitnet.kernels import activations, layout
    from bitnet.kernels.rmsnorm_quant import rmsnorm_act_quant_unpack

    d = triton_device
    w_q = random_weights(N, k, fmt, seed=k)
    packed, scale = pack(w_q, fmt).to(d), torch.tensor([0.3], device=d)
    bias = torch.randn(N).to(d)
    x = random_activations(6, k, seed=k + 1).to(d)
    below = kernels.bitlinear(x, packed, scale, N, fmt, bias)
    launches = []
    for module, name in ((activations, "_act_quant_kernel"), (layout, "_unpack_kernel")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, type("Spy", (), {"__getitem__": lambda self, grid, _r=real, _n=name: (
            launches.append(_n), _r[grid])[1]})())
    monkeypatch.setattr(gemm_module, "UNPACK_M", 4)
    assert torch.equal(kernels.bitlinear(x, packed, scale, N, fmt, bias), below) and launches == []
    x_q, a, xsum, w = rmsnorm_act_quant_unpack(x, None, 0.0, [packed], [N], fmt)
    r_q, r_a = quantize_activation(x.cpu())
    assert torch.equal(x_q.cpu(), r_q) and torch.equal(a.cpu(), r_a)
    assert torch.equal(xsum.cpu(), r_q.sum(-1, dtype=torch.int32))
    assert torch.equal(w.cpu(), unpack(pack(w_q, fmt), N, fmt))
    y = gemm_module.gemm_cat(x_q, [packed], [N], fmt, [None], None, out_dtype=torch.int32, unpacked=w)
    assert torch.equal(y.cpu(), exact(r_q, w_q))
    with pytest.raises(ValueError, match="goes with an RMSNorm"):
        rmsnorm_act_quant_unpack(x, None, 0.0, [packed], [N], fmt, up=x)


@pytest.mark.parametrize("fmt, m, unpacked", [("2bit", 2, False), ("1.6bit", 33, False), ("1bit", 3, False),
                                               ("2bit", 5, True), ("1.6bit", 5, True)])
def test_gemm_adds_the_residual_as_torch_adds(fmt, m, unpacked, monkeypatch, triton_device):
    """residual + y in the GEMM's epilogue (a batched decode step's or a prefill's skip connection:
    o_proj, down_proj): float32 equal to torch's add of the exact reference's output, with split-K (K =
    512: the last program to arrive adds it) and on the unpacked path (UNPACK_M forced); a residual
    and an output with row strides of their own (column blocks of wider tensors); bf16 equal to
    torch's add on a GPU, within the interpreter's truncation (it truncates float32 -> bf16 where a
    GPU rounds) on the CPU. Refused where it cannot be added: several matrices, int32 output, the
    output itself."""
    import bitnet.kernels.gemm as gemm_module

    if unpacked:
        monkeypatch.setattr(gemm_module, "UNPACK_M", 4)
    k, n = 512, 40
    w_q = random_weights(n, k, fmt, seed=11)
    packed, scale = pack(w_q, fmt).to(triton_device), torch.tensor([0.7], device=triton_device)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(12)).to(triton_device)
    x_q, a = quantize_activation(random_activations(m, k, seed=13))
    x_q, a = x_q.to(triton_device), a.to(triton_device)
    wide = torch.randn(m, n + 9, generator=torch.Generator().manual_seed(14)) * 4
    residual = wide[:, 5:5 + n].to(triton_device)  # row stride n + 9
    ref = reference_gemm(x_q.cpu(), packed.cpu(), n, fmt, scale.cpu(), a.cpu(), bias.cpu(), torch.float32)
    out = torch.zeros(m, n + 3, device=triton_device)
    y = gemm(x_q, packed, n, fmt, scale, bias, a, out_dtype=torch.float32, out=out[:, 3:], residual=residual)
    assert torch.equal(y.cpu(), residual.cpu() + ref) and not torch.equal(y.cpu(), ref)
    r16 = residual.to(torch.bfloat16)
    y16 = gemm(x_q, packed, n, fmt, scale, bias.to(torch.bfloat16), a, out_dtype=torch.bfloat16, residual=r16).cpu()
    ref16 = r16.cpu() + gemm(x_q, packed, n, fmt, scale, bias.to(torch.bfloat16), a, out_dtype=torch.bfloat16).cpu()
    if triton_device == "cuda":
        assert torch.equal(y16, ref16)
    else:
        assert ((y16.float() - ref16.float()).abs() <= ref16.float().abs() * 2**-7).all()
    with pytest.raises(ValueError, match="residual must be"):
        gemm(x_q, packed, n, fmt, out_dtype=torch.int32, residual=residual.int())
    with pytest.raises(ValueError, match="residual must be"):
        gemm_cat(x_q, [packed, packed], [n, n], fmt, [scale, scale], a=a, residual=torch.zeros(m, 2 * n, device=triton_device))
    with pytest.raises(ValueError, match="apart from the output"):
        gemm(x_q, packed, n, fmt, scale, a=a, out=residual, residual=residual)


@pytest.mark.parametrize("m", [1, 3])
def test_packed_matmul_cat_adds_a_residual_no_epilogue_takes(m, triton_device):
    """bitnet.kernels.packed_matmul_cat's residual where no kernel's epilogue adds it (several
    matrices in one launch; matrices launched one by one, their biases mixed; one matrix with a
    residual of non-unit stride along N): one add after, float32 equal to torch's add of the exact
    reference's outputs side by side, at M = 1 (GEMVs) and M = 3 (GEMMs)."""
    fmt, k, ns = "2bit", 256, [40, 24]
    g = torch.Generator().manual_seed(21)
    packed = [pack(random_weights(n, k, fmt, seed=22 + i), fmt).to(triton_device) for i, n in enumerate(ns)]
    scales = [torch.tensor([0.7], device=triton_device), torch.tensor([1.3], device=triton_device)]
    bias = torch.randn(ns[0], generator=g).to(triton_device)
    x_q, a = quantize_activation(random_activations(m, k, seed=23))
    x_q, a = x_q.to(triton_device), a.to(triton_device)
    wide = torch.randn(m, 2 * sum(ns) + 7, generator=g) * 4

    def ref(mats, biases):  # the exact reference of each matrix, side by side
        return torch.cat([reference_gemm(x_q.cpu(), packed[j].cpu(), ns[j], fmt, scales[j].cpu(), a.cpu(),
                                         None if biases[j] is None else biases[j].cpu()) for j in mats], dim=1)

    cases = [([0, 1], [None, None]), ([0, 1], [bias, None])]  # (M = 3) one launch for both; one launch each
    for mats, biases in cases:
        residual = wide[:, :sum(ns)].to(triton_device)  # a row stride of its own
        y = kernels.packed_matmul_cat(x_q, a, packed, scales, ns, fmt, biases=biases, residual=residual)
        want = residual.cpu() + ref(mats, biases)
        assert torch.equal(y.cpu(), want) and not torch.equal(y.cpu(), ref(mats, biases)), (mats, biases)
    strided = wide.to(triton_device)[:, 0:2 * ns[0]:2]  # every other column: stride 2 along N
    y = kernels.packed_matmul_cat(x_q, a, packed[:1], scales[:1], ns[:1], fmt, biases=[bias], residual=strided)
    assert torch.equal(y.cpu(), strided.cpu() + ref([0], [bias]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd, per_row_cos", [(16, False), (24, True)])
def test_rope_cache_equals_rope_and_index_copy(dtype, hd, per_row_cos, triton_device):
    """RoPE of q and k and the cache write in one launch against bitnet.ops.rope's formula and
    KVCache.update's index_copy: q / k / v as strided views of one projection output (GQA: 4 query,
    2 key heads), cos / sin shared by the rows or per row, a head size that is not a power of two;
    equal in float32, within one bf16 rounding per step in bf16 (the interpreter truncates where
    torch rounds; on a GPU equal)."""
    from bitnet.kernels.rope import reference_rope_cache, rope_cache

    g = torch.Generator().manual_seed(hd)
    B, T, nh, nkv, S = 2, 3, 4, 2, 8
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hd, generator=g).to(dtype).to(triton_device)
    q = qkv[..., :nh * hd].view(B, T, nh, hd)
    k = qkv[..., nh * hd:(nh + nkv) * hd].view(B, T, nkv, hd)
    v = qkv[..., (nh + nkv) * hd:].view(B, T, nkv, hd)
    angles = torch.randn(B if per_row_cos else 1, 1, T, hd, generator=g).to(triton_device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    pos = torch.tensor([5, 1, 6], device=triton_device)
    caches = [torch.zeros(B, nkv, S, hd, dtype=dtype, device=triton_device) for _ in range(4)]
    got = rope_cache(q, k, v, cos, sin, caches[0], caches[1], pos)
    ref = reference_rope_cache(q, k, v, cos, sin, caches[2], caches[3], pos)
    got += rope_cache(q, k, v, cos, sin)
    ref += reference_rope_cache(q, k, v, cos, sin)
    # a server's step: one row of tokens from several sequences, each into its own cache row
    rows = torch.tensor([1, 0, 1], device=triton_device)
    caches += [torch.zeros(B, nkv, S, hd, dtype=dtype, device=triton_device) for _ in range(4)]
    one = (q[:1], k[:1], v[:1], cos[:1], sin[:1])
    got += rope_cache(*one, caches[4], caches[5], pos, cache_rows=rows)
    ref += reference_rope_cache(*one, caches[6], caches[7], pos, cache_rows=rows)
    # in bf16 under the interpreter: each of the three roundings (two products, the sum) off by under
    # one bf16 ulp (2^-7 relative), so |error| < 2^-7 (|x cos| + |rotate_half(x) sin| + |result|) <= 2^-5 max|x|
    bound = 2 ** -5 * qkv.abs().max().item()
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        if dtype == torch.float32 or not INTERPRET:
            assert torch.equal(a, b)
        else:
            assert (a.float() - b.float()).abs().max().item() <= bound
    assert all(torch.equal(got[i], ref[i]) for i in (2, 5, 8))  # the values are copied, not computed
    assert not caches[0][:, :, [0, 2, 3, 4, 7]].any()  # only the three slots written


def test_packed_model_uses_the_fused_rope_and_the_twin_does_not(monkeypatch, triton_device):
    from bitnet import BitNetConfig, BitNetForCausalLM, freeze
    from bitnet.kernels import custom_ops

    calls = []
    real = custom_ops._rope_cache_impl
    monkeypatch.setattr(custom_ops, "_rope_cache_impl", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    ids = torch.tensor([[3, 1, 4]], device=triton_device)
    for linear, expected in (("bitnet", 2), ("bf16", 0)):
        torch.manual_seed(0)
        model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", num_hidden_layers=2, linear=linear)).eval()
        model = (freeze(model) if linear == "bitnet" else model).to(triton_device)
        model.setup_cache(1, 8)
        calls.clear()
        with torch.no_grad():
            model(ids, input_pos=torch.arange(3, device=triton_device))
        assert len(calls) == expected  # one a layer, packed only


def test_packed_matmul_cat_equals_each_packed_matmul(triton_device):
    """The op behind the model's q / k / v and gate / up: one GEMV launch at M = 1, one GEMM launch
    at M > 1 (split-K at K = 512 in the interpreter: its workspace indexed with the wide output's
    row stride); with biases for some only, one launch per matrix into its column block."""
    ns, k = [40, 12, 12], 512
    packed = [pack(random_weights(n, k, "2bit", seed=20 + i), "2bit").to(triton_device) for i, n in enumerate(ns)]
    scales = [torch.tensor([s], device=triton_device) for s in (0.1, 0.2, 0.3)]
    bias = [torch.randn(n).to(triton_device) for n in ns]
    for m, biases in ((1, bias), (1, [bias[0], None, bias[2]]), (3, None), (3, [None, bias[1], None])):
        x_q, a = kernels.act_quant(random_activations(m, k, seed=m).to(triton_device))
        y = kernels.packed_matmul_cat(x_q, a, packed, scales, ns, "2bit", biases, out_dtype=torch.float32)
        each = [kernels.packed_matmul(x_q, a, p, s, n, "2bit", b, out_dtype=torch.float32)
                for p, s, n, b in zip(packed, scales, ns, biases or [None] * 3)]
        assert torch.equal(y, torch.cat(each, -1))


@pytest.mark.parametrize("shape", [(100,), (1, 100), (2, 3, 100), (0, 100)])
def test_bitlinear_takes_any_leading_shape(shape, triton_device):
    packed, scale = pack(random_weights(N, 100, "2bit"), "2bit"), torch.tensor([0.1])
    x = torch.randn(shape)
    y = kernels.bitlinear(x.to(triton_device), packed.to(triton_device), scale.to(triton_device), N, "2bit").cpu()
    assert y.shape == (*shape[:-1], N)
    assert torch.equal(y, torch_bitlinear(x, packed, scale, N, "2bit"))


def test_bad_arguments_are_refused(triton_device):
    # Everything on the kernels' device, so that each call gets as far as the check it means.
    packed = pack(random_weights(N, 100, "2bit"), "2bit").to(triton_device)
    scale = torch.tensor([1.0], device=triton_device)
    with pytest.raises(ValueError, match="shape"):
        kernels.bitlinear(torch.randn(2, 99, device=triton_device), packed, scale, N, "2bit")
    with pytest.raises(ValueError, match="unknown packed format"):
        kernels.bitlinear(torch.randn(2, 100, device=triton_device), packed, scale, N, "3bit")
    with pytest.raises(ValueError, match="bias"):
        kernels.bitlinear(torch.randn(2, 100, device=triton_device), packed, scale, N, "2bit",
                          torch.zeros(N + 1, device=triton_device))


# ----------------------------------------------------------------------------- integration
def _frozen_tiny(linear: str, packing: str | None) -> bitnet.BitNetForCausalLM:
    torch.manual_seed(0)
    model = bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny").replace(linear=linear))
    return bitnet.freeze(model, packing).eval()


@pytest.mark.usefixtures("gpu_gemm_tile")  # a whole model (conftest.py)
@pytest.mark.parametrize("linear, packing", [("bitnet", "2bit"), ("bitnet", "1.6bit"), ("bitnet1", None)])
def test_frozen_model_logits_equal_through_both_paths(linear, packing, monkeypatch, triton_device):
    """Both paths on the kernels' device: the float parts around the projections (attention) run
    the same ops; the packed matmuls differ, and the norms before them (fused with the activations'
    quantization on the Triton path). Equal to 1e-5 where both runs fed their matmuls the same int8
    codes; a rounding tie moved by a norm's last bit loosens it (reference.assert_close_but_for_ties:
    a 1-ulp change of the torch norm's scale does it at this seed), so each run's codes are kept."""
    from bitnet import ops

    model = _frozen_tiny(linear, packing).to(triton_device)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    ids = ids.to(triton_device)
    real = ops.rms_norm_bitlinear_many
    codes = {"torch": [], "triton": []}

    def fused(x, weight, eps, *args, **kw):  # each norm before projections: the codes its run feeds them
        out = real(x, weight, eps, *args, **kw)
        up = args[6] if len(args) > 6 else kw.get("up")
        if out is not None:
            codes["triton"].append(kernels.rmsnorm_act_quant(x, weight, eps, up=up)[0])
        elif up is None:  # the torch path runs the norm, then quantizes (bitnet.ops.torch_bitlinear);
            # (with up it asks again with relu(x)^2 * up as x)
            codes["torch"].append(quantize_activation(ops.rms_norm(x, weight, eps))[0])
        return out

    monkeypatch.setattr(ops, "rms_norm_bitlinear_many", fused)
    logits = {}
    for kernel in ("torch", "triton"):
        monkeypatch.setenv("BITNET_KERNEL", kernel)
        with torch.no_grad():
            logits[kernel] = (model(ids).logits, model(ids[:1, :1]).logits)  # prefill; one decode token
    assert len(codes["torch"]) == len(codes["triton"]) == 2 * 4 * len(model.model.layers)
    for got, ref in zip(logits["triton"], logits["torch"]):
        assert_close_but_for_ties(got, ref, codes["triton"], codes["torch"])


def test_kernel_choice_argument_over_environment(monkeypatch, triton_device):
    calls = []
    monkeypatch.setattr(kernels, "bitlinear", lambda *a: calls.append("triton") or torch_bitlinear(*a))
    layer = bitnet.BitLinear(100, N).freeze().to(triton_device)
    x = torch.randn(2, 100, device=triton_device)  # bitnet.ops refuses "triton" where the kernels cannot run
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    layer(x)
    layer.kernel = "torch"
    layer(x)
    monkeypatch.setenv("BITNET_KERNEL", "torch")
    layer.kernel = "triton"
    layer(x)
    assert calls == ["triton", "triton"]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_through_the_custom_ops(backend, triton_device):
    torch._dynamo.reset()
    layer = bitnet.BitLinear(100, N, kernel="triton").freeze().to(triton_device)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    with torch.no_grad():
        for shape in [(1, 100), (2, 5, 100)]:
            x = torch.randn(shape, device=triton_device)
            assert torch.equal(compiled(x), layer(x))


def test_custom_ops_pass_opcheck(triton_device):
    packed = pack(random_weights(N, 100, "1bit"), "1bit").to(triton_device)
    scale = torch.tensor([0.1], device=triton_device)
    x = torch.randn(3, 100, device=triton_device)
    x_q, a = kernels.act_quant(x)
    cases = [
        (torch.ops.bitnet.bitlinear.default, (x, packed, scale, torch.randn(N, device=triton_device), N, "1bit")),
        (torch.ops.bitnet.packed_matmul.default, (x_q, a, packed, scale, None, N, "1bit", torch.bfloat16)),
        (torch.ops.bitnet.packed_matmul_int32.default, (x_q, packed, N, "1bit")),
        (torch.ops.bitnet.packed_matmul_cat.default,
         (x_q[:1], a[:1], [packed, packed], [scale, scale], [None, torch.randn(N, device=triton_device)], [N, N],
          "1bit", torch.float32)),
        (torch.ops.bitnet.act_quant.default, (x,)),
        (torch.ops.bitnet.rope.default, (x.view(1, 3, 5, 20)[:, :, :4], x.view(1, 3, 5, 20)[:, :, 4:],
                                         x.view(1, 3, 5, 20)[:, :, 4:], torch.ones(1, 1, 3, 20, device=triton_device),
                                         torch.zeros(1, 1, 3, 20, device=triton_device))),
        (torch.ops.bitnet.rope_cache_.default, (x.view(1, 3, 5, 20)[:, :, :4], x.view(1, 3, 5, 20)[:, :, 4:],
                                                x.view(1, 3, 5, 20)[:, :, 4:], torch.ones(1, 1, 3, 20, device=triton_device),
                                                torch.zeros(1, 1, 3, 20, device=triton_device),
                                                torch.zeros(1, 1, 6, 20, device=triton_device),
                                                torch.zeros(1, 1, 6, 20, device=triton_device),
                                                torch.tensor([0, 2, 4], device=triton_device))),
        (torch.ops.bitnet.rmsnorm_act_quant.default, (x, torch.rand(100, device=triton_device), 1e-5)),
        (torch.ops.bitnet.decode_attention.default,
         (x.view(3, 5, 20)[:, :4], torch.randn(3, 2, 6, 20, device=triton_device),
          torch.randn(3, 2, 6, 20, device=triton_device), torch.tensor([1, 5, 3], device=triton_device))),
        (torch.ops.bitnet.int8_linear.default,
         (x, torch.randint(-127, 128, (7, 100), dtype=torch.int8, device=triton_device), torch.rand(7, device=triton_device))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------- the interpreter tier beside a GPU
INTERPRETER_RERUN = "BITNET_TEST_INTERPRETER_RERUN"  # set in the rerun, which therefore starts no other
# The test files that drive the Triton kernels through the interpreter (test_gpu_check: the kernel
# benchmark at M = 1); their default tier is what the rerun runs.
INTERPRETER_TIER = ["tests/test_kernels.py", "tests/test_gpu_check.py", "tests/test_attention.py", "tests/test_int8_head.py",
                    "tests/test_int4_head.py"]
RERUN_SECONDS = 300
# pytest-timeout (benchmarks/gpu_check.sh runs the suite with --timeout 60): the rerun is some hundred
# tests in one, a minute of CPU time serially; it gets its own limit where the plugin is installed.
_rerun_timeout = (pytest.mark.timeout(RERUN_SECONDS + 30) if importlib.util.find_spec("pytest_timeout")
                  else (lambda f: f))


@_rerun_timeout
def test_interpreter_tier_reruns_beside_a_gpu(triton_device):
    """With a GPU the tests above run the compiled kernels; the interpreter (what CPU CI runs, with
    its own small blocks and split-K) would go untested on a GPU machine. So the interpreter tier
    runs again here, in a subprocess that sees no GPU, under TRITON_INTERPRET=1 (on 4 xdist workers
    where pytest-xdist is installed), and must pass."""
    if os.environ.get(INTERPRETER_RERUN):
        pytest.skip("this is the interpreter rerun: it starts no other")
    if triton_device == "cpu":
        pytest.skip("this session already runs the kernels in the interpreter (TRITON_INTERPRET=1)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "BITNET_KERNEL"}
    env.update({"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", INTERPRETER_RERUN: "1"})
    workers = ["-n", "4"] if importlib.util.find_spec("xdist") else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, "-m", "not cuda and not slow",
           *INTERPRETER_TIER]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=RERUN_SECONDS)
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    assert proc.returncode == 0 and " passed" in summary, (
        f"the interpreter rerun ({' '.join(cmd)}) exited {proc.returncode}:\n"
        f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")


def _bench_module():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_kernels.py")
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_benchmark_without_gpu_says_so_and_exits_cleanly(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    bench = _bench_module()
    assert bench.cli(["--device", "cuda"]) == 0
    assert "no GPU" in capsys.readouterr().out


def test_cpu_benchmark_measures_and_reports(tmp_path, monkeypatch):
    """The CPU mode's measuring, table and JSON code on a tiny shape (bandwidth stubbed, no
    transformers layer: its compiled epilogue would take longer than the whole test)."""
    bench = _bench_module()
    monkeypatch.setattr(bench, "measured_cpu_bandwidth", lambda: {"read_gbps": 10.0, "copy_gbps": 10.0, "threads": 1, "bytes": 0})
    monkeypatch.setattr(bench, "hf_bitlinear", lambda *a: None)
    monkeypatch.setattr(bench, "copies_for", lambda nbytes: 2)
    args = bench.BenchArgs(device="cpu", m=[1, 3], shapes=["40x64"], formats=["2bit", "1bit"], warmup=1, iters=1,
                           out_dir=str(tmp_path), name="cpu_smoke")
    assert bench.main(args) == 0
    text = (tmp_path / "cpu_smoke.md").read_text()
    assert "| 40x64 | 3 | native 1bit |" in text and "| 40x64 | 1 | fp32 F.linear |" in text


@pytest.mark.skipif(not INTERPRET, reason="drives the benchmark through the interpreter")
def test_benchmark_measures_reports_and_plots(tmp_path, monkeypatch):
    bench = _bench_module()
    monkeypatch.setattr(bench, "L2Flusher", lambda device: None)
    monkeypatch.setattr(bench, "measured_hbm_bandwidth", lambda: 1.0)
    monkeypatch.setattr(bench, "time_cuda", lambda fn, warmup, iters, flush: (fn(), 2.0)[1])
    monkeypatch.setattr(bench, "time_cuda_graph", lambda fn, warmup, iters, flush: (fn(), 1.0)[1])
    args = bench.BenchArgs(m=[1, 2], shapes=["40x64"], formats=["2bit", "1bit"], out_dir=str(tmp_path))
    result = bench.measure(args, device="cpu")
    assert [(r["m"], r["format"]) for r in result["rows"]] == [(1, f) for f in ("bf16", "2bit", "1bit", "2bit act_quant + GEMV")] + [
        (2, f) for f in ("bf16", "2bit", "1bit", "2bit one split")]  # (M = 1: also two launches; M = 2 splits K in two)
    assert "| 40x64 | 2 | 1bit |" in bench.report(result) and "| 40x64 | 1 | 2bit act_quant + GEMV |" in bench.report(result)
    bench.plot(result, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_attention_benchmark_compares_like_with_like(monkeypatch, triton_device):
    """--attention: both callables compute the same attention (the kernel and the SDPA call the
    model made before it), over a full cache and over a few live slots of a long one (a server's
    row), so the table compares like with like; each cache length gets its rows; the table renders."""
    bench = _bench_module()
    ours, sdpa, kv_bytes = bench.attention_case(2, 40, triton_device, dtype=torch.float32, heads=(4, 2, 16))
    assert kv_bytes == 2 * 2 * 2 * 40 * 16 * 4
    torch.testing.assert_close(ours(), sdpa(), rtol=1e-5, atol=1e-5)
    ours, sdpa, kv_bytes = bench.attention_case(2, 100, triton_device, dtype=torch.float32, heads=(4, 2, 16), live=7)
    assert kv_bytes == 2 * 2 * 2 * 7 * 16 * 4
    torch.testing.assert_close(ours(), sdpa(), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(bench, "L2Flusher", lambda device: None)
    monkeypatch.setattr(bench, "time_cuda", lambda fn, warmup, iters, flush: (fn(), 2.0)[1])
    monkeypatch.setattr(bench, "time_cuda_graph", lambda fn, warmup, iters, flush: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "attention_case", lambda b, s, d, live: (ours, sdpa, kv_bytes))
    rows = bench.measure_attention(bench.BenchArgs(attention_batch=[1], attention_cache=[40, 200], attention_live=[60]),
                                   device=triton_device)
    assert [(r["slots"], r["live"]) for r in rows] == [(40, 40), (200, 200), (200, 60)]
    assert rows[0]["speedup"] == 1.0 and "| 1 | 200 | 60 |" in bench.report({"rows": [], "attention": rows})


def test_head_benchmark_times_three_heads_of_one_linear(monkeypatch, triton_device):
    """--heads: bf16 F.linear, the int8 and the int4 head made from the same nn.Linear compute the
    same logits up to their quantization; each row has its bytes and its speed against the bf16 row
    of its M; the table renders."""
    bench = _bench_module()
    cases = bench.head_cases(96, 128, triton_device)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(triton_device)
    ref = cases["bf16"][0](x).float().flatten()
    for name, least in (("int8", 0.999), ("int4", 0.98)):
        got = cases[name][0](x).float().flatten()
        assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > least, name
    monkeypatch.setattr(bench, "L2Flusher", lambda device: None)
    times = iter([1.0, 2.0, 0.5, 2.0, 0.25, 2.0] * 2)  # (graph, eager) per head: bf16 1 ms, int8 0.5, int4 0.25
    monkeypatch.setattr(bench, "time_cuda_graph", lambda fn, warmup, iters, flush: (fn(), next(times))[1])
    monkeypatch.setattr(bench, "time_cuda", lambda fn, warmup, iters, flush: (fn(), next(times))[1])
    rows = bench.measure_heads(bench.BenchArgs(head_rows=[1, 2]), device=triton_device, shape=(96, 128))
    assert [(r["m"], r["format"]) for r in rows] == [(m, h) for m in (1, 2) for h in ("bf16", "int8", "int4")]
    assert [r["speedup"] for r in rows[:3]] == [1.0, 2.0, 4.0]
    assert [round(r["mb"] * 1e6) for r in rows[:3]] == [2 * 96 * 128, 96 * 128 + 4 * 96, 96 * 64 + 4 * 96 * 4]
    assert "| 96x128 | 2 | int4 |" in bench.report({"rows": [], "heads": rows})


# ----------------------------------------------------------------------------- GPU, real shapes
REAL_SHAPES = [(2560, 2560), (2560, 6912), (6912, 2560), (8192, 8192), (28672, 8192)]
REAL_M = (1, 4, 16, 64, 512, 2048)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n, k", REAL_SHAPES)
def test_cuda_real_shapes_exact_and_equal_to_torch(n, k, fmt):
    """Issue 27's shapes and M (every path: GEMV, small-M GEMM with split-K, the unpacked GEMM).
    The references run on the GPU here, both independent of the kernels: exact() as a float64
    GEMM (cuBLAS; exact for these integers in any summation order), and the torch path, whose
    integer GEMM is that same float64 one on CUDA (bitnet.quant.int_matmul); on the CPU they would
    take minutes at 28672 x 8192."""
    w_q = random_weights(n, k, fmt, device="cuda")
    packed, scale = pack(w_q, fmt), torch.tensor([0.02], device="cuda")
    for m in REAL_M:
        x = random_activations(m, k, dtype=torch.bfloat16, device="cuda")
        x_q, _ = quantize_activation(x)
        assert torch.equal(kernels.packed_matmul_int32(x_q, packed, n, fmt), exact(x_q, w_q, device="cuda")), m
        assert torch.equal(kernels.bitlinear(x, packed, scale, n, fmt), torch_bitlinear(x, packed, scale, n, fmt)), m


@pytest.mark.cuda
def test_cuda_split_k_sums_are_exact_launch_after_launch():
    """The split-K epilogue's ordering (relaxed partial adds, then one acq_rel arrival counter after
    a barrier: gemm._gemm_kernel) is a claim about the GPU's memory model that the interpreter, which
    runs programs one after another, cannot test. Here a tile's split programs race at 2560 x 6912,
    M = 16 (8 splits on 132 SMs), 200 launches back to back (each reusing the workspace the last
    left zero, the next one's programs started early by PDL), every int32 result equal to the exact
    product: a partial sum read before it landed would show as a wrong element."""
    from bitnet.kernels import gemm as gemm_module

    n, k, m = 2560, 6912, 16
    w_q = random_weights(n, k, "2bit", device="cuda")
    packed = pack(w_q, "2bit")
    x_q, _ = quantize_activation(random_activations(m, k, dtype=torch.bfloat16, device="cuda"))
    assert gemm_module.splits(m, n, k, "2bit", x_q.device) > 1
    want = exact(x_q, w_q, device="cuda")
    outs = [kernels.packed_matmul_int32(x_q, packed, n, "2bit") for _ in range(200)]
    bad = [i for i, y in enumerate(outs) if not torch.equal(y, want)]
    assert not bad, f"{len(bad)} of 200 launches wrong, first {bad[0]}: {int((outs[bad[0]] != want).sum())} elements"


@pytest.mark.cuda
def test_cuda_graph_replays_the_decode_and_prefill_ops():
    packed, scale = pack(random_weights(2560, 2560, "2bit", device="cuda"), "2bit"), torch.tensor([0.02], device="cuda")
    for m in (1, 16):
        x = torch.randn(m, 2560, dtype=torch.bfloat16, device="cuda")
        y = kernels.bitlinear(x, packed, scale, 2560, "2bit")  # autotunes outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = kernels.bitlinear(x, packed, scale, 2560, "2bit")
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(y_graph, kernels.bitlinear(x, packed, scale, 2560, "2bit"))
        assert not torch.equal(y_graph, y)

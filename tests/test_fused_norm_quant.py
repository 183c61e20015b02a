"""RMSNorm + activation quantization fused into the model's projections on the Triton path
(bitnet.model.projections / prenormed, bitnet.bitlinear.frozen_projections / normed_projections,
bitnet.ops.bitlinear_many / rms_norm_bitlinear_many).

What is asserted, and with which tolerance:
- Projections of one input (q / k / v) quantize it once (one act_quant, a packed_matmul each) and
  give each layer's own output bit for bit: the same x_q and a, the same epilogue.
- The fused RMSNorm (rmsnorm_act_quant) sums the squares in another order than the norm it stands
  for (bitnet.ops.rms_norm: the native one-pass norm on the CPU, torch's on a GPU), so its a may
  be an ulp off and x_q one step off where the normalized value sits on a rounding boundary. So:
  rows whose (x_q, a) equal norm(x)'s give outputs equal bit for bit; every output is exactly the
  packed matmul of the fused (x_q, a), and within s * |W_q| . |x_q / a - x_q' / a'| (the only
  change) of the unfused one, plus a few ulps of rounding.
- A tiny model (fp32) on the Triton path, prefill (M > 1) and cached greedy decode (M = 1): equal
  bit for bit to the torch path fed the fused kernel's (x_q, a) (the wiring); against the torch
  path itself, greedy tokens equal and logits within 1e-5 where only scales a changed (an ulp of a
  is an ulp of a projection's output), within 1e-2 of the logits' scale if some x_q flipped (a
  step of x_q moves a projection's output by s / a, up to 1/127 of its input's absmax).
- Where the fusion must not apply (hooks, an unfrozen model, the native CPU kernels, the torch
  path, autograd) it does not, and the native CPU path's logits are those of the unfused layers.
- torch.compile(fullgraph=True) traces the fused layer through the custom ops' fake kernels.
The Triton kernels run where conftest.py's `triton_device` says (the interpreter on a CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

import bitnet
import bitnet.model as bm
from bitnet import BitLinear, BitNetConfig, BitNetForCausalLM, freeze, kernels, ops
from bitnet.bitlinear import RMSNorm, frozen_projections, normed_projections
from bitnet.kernels import cpu as native
from bitnet.kernels.gemm import reference_gemm
from bitnet.quant import quantize_activation
from reference import assert_close_but_for_ties

K = 64
KERNEL_OPS = ("rmsnorm_act_quant", "rmsnorm_packed_matmul_cat", "act_quant", "packed_matmul", "packed_matmul_cat",
              "bitlinear")


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Count the calls of bitnet.kernels' public ops (bitnet.ops imports them at each call)."""
    calls = dict.fromkeys(KERNEL_OPS, 0)
    for name in KERNEL_OPS:
        real = getattr(kernels, name)

        def spy(*args, _name=name, _real=real, **kw):
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    return calls


def qkv(device, dtype=torch.float32, fmt="2bit", bias=True, kernel="triton"):
    """Three frozen BitLinear of one input, GQA-like widths (q 48, k / v 16)."""
    torch.manual_seed(0)
    bits = "binary" if fmt == "1bit" else "ternary"
    return [BitLinear(K, n, bias=bias, weight_bits=bits, kernel=kernel).freeze(fmt).to(device, dtype)
            for n in (48, 16, 16)]


def activations(m: int, seed: int = 1, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """(m, K) rows of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g) * 10 ** torch.empty(m, 1).uniform_(-2, 2, generator=g)
    return x.to(device, dtype)


def tiny(layers: int = 2, **kw) -> BitNetForCausalLM:
    """The tiny preset, packed; std 0.05 weights so that greedy output is not one repeated token."""
    torch.manual_seed(0)
    config = BitNetConfig.from_preset("tiny", num_hidden_layers=layers, initializer_range=0.05, **kw)
    return freeze(BitNetForCausalLM(config).eval())


# ----------------------------------------------------------------------------- one quantization for q / k / v
@pytest.mark.parametrize("fmt, m, dtype, bias", [("2bit", 1, torch.float32, True), ("1.6bit", 4, torch.bfloat16, False),
                                                 ("1bit", 1, torch.bfloat16, True)])
def test_projections_of_one_input_quantize_it_once(fmt, m, dtype, bias, monkeypatch, triton_device):
    layers = qkv(triton_device, dtype, fmt, bias)
    x = activations(m, device=triton_device, dtype=dtype)
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        shared = frozen_projections(x, layers)
        assert calls == {"rmsnorm_act_quant": 0, "rmsnorm_packed_matmul_cat": 0, "act_quant": 1, "packed_matmul": 0,
                         "packed_matmul_cat": 1, "bitlinear": 0}
        alone = [layer(x) for layer in layers]  # bitnet::bitlinear each (M = 1: the GEMV quantizes x itself)
    for y, ref in zip(shared, alone):
        assert y.dtype == dtype and torch.equal(y, ref)


def test_fused_norm_differs_only_through_x_q_and_a(triton_device):
    layers = qkv(triton_device)
    norm = RMSNorm(K).to(triton_device)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(K, generator=torch.Generator().manual_seed(2)) + 0.5)
        x = activations(48, device=triton_device)
        fused = normed_projections(x, norm, layers)
        unfused = [layer(norm(x)) for layer in layers]
        x_q, a = (t.cpu() for t in kernels.rmsnorm_act_quant(x, norm.weight, norm.eps))
        r_q, r_a = (t.cpu() for t in quantize_activation(norm(x)))
    assert (x_q.int() - r_q.int()).abs().max() <= 1
    same = (x_q == r_q).all(-1) & (a == r_a).squeeze(-1)  # (M,) rows the fusion did not change
    delta = (x_q.double() / a.double() - r_q.double() / r_a.double()).abs()  # (M, K)
    for layer, y, ref in zip(layers, fused, unfused):
        y, ref = y.cpu(), ref.cpu()
        w_q, s = (t.cpu() for t in layer.quantized_weight())
        exact = reference_gemm(x_q, layer.weight.cpu(), layer.out_features, layer.packing, s, a, layer.bias.cpu(),
                               torch.float32)
        assert torch.equal(y, exact)  # the packed matmul of the fused (x_q, a), nothing else
        assert torch.equal(y[same], ref[same])
        bound = float(s) * (delta @ w_q.abs().double().t()) + 4 * torch.finfo(torch.float32).eps * ref.abs().double()
        assert ((y.double() - ref.double()).abs() <= bound).all(), f"{int((~same).sum())} rows changed"


# ----------------------------------------------------------------------------- a BitLinear's own RMSNorm
@pytest.mark.parametrize("m", [1, 5])
def test_a_bitlinears_own_norm_fuses_into_its_quantization(m, monkeypatch, triton_device):
    """use_rms_norm checkpoints (an RMSNorm inside every BitLinear): frozen on the Triton kernels the
    layer runs rmsnorm_packed_matmul_cat (at M = 1 one GEMV normalizing x itself; else
    rmsnorm_act_quant, then its packed matmul), no separate norm: exactly the packed matmul of
    rmsnorm_act_quant's (x_q, a) (the GEMV's norm sums in the same order), and within the
    fusion's bound of norm-then-quantize."""
    torch.manual_seed(0)
    layer = BitLinear(K, 24, bias=True, rms_norm_eps=1e-6, kernel="triton").freeze().to(triton_device)
    with torch.no_grad():
        layer.rms_norm.weight.uniform_(0.5, 1.5)
    x = activations(m, device=triton_device)
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        y = layer(x)
    assert calls["rmsnorm_packed_matmul_cat"] == 1 and calls["bitlinear"] == 0
    x_q, a = kernels.rmsnorm_act_quant(x, layer.rms_norm.weight, 1e-6)
    exact = reference_gemm(x_q.cpu(), layer.weight.cpu(), 24, layer.packing, layer.weight_scale.cpu(), a.cpu(),
                           layer.bias.cpu(), torch.float32)
    assert torch.equal(y.cpu(), exact)
    with torch.no_grad():
        unfused = ops.torch_bitlinear(layer.rms_norm(x).cpu(), layer.weight.cpu(), layer.weight_scale.cpu(), 24,
                                      layer.packing, layer.bias.cpu())
    torch.testing.assert_close(y.cpu(), unfused, rtol=2e-2, atol=2e-2 * float(unfused.abs().max()))
    before = dict(calls)
    hooked = layer.rms_norm.register_forward_hook(lambda *a: None)  # a hook on the norm: it runs as a module
    with torch.no_grad():
        layer(x)
    hooked.remove()
    assert calls["rmsnorm_packed_matmul_cat"] == before["rmsnorm_packed_matmul_cat"]
    assert calls["bitlinear"] == before["bitlinear"] + 1


# ----------------------------------------------------------------------------- the norm inside the decode GEMV
def mean_square_four(k: int, seed: int) -> torch.Tensor:
    """(1, k) integers in -4 .. 4 whose squares sum to exactly 4 k: +-2 everywhere, and groups of
    eight turned into (3, 3, 3, 1, 1, 1, 1, 1) or (4, 4, 0, ..., 0) (32 each), shuffled, random
    signs. With eps = 0 every summation order and every rsqrt give rstd = 1/2 exactly."""
    g = torch.Generator().manual_seed(seed)
    v = torch.full((k,), 2.0)
    patterns = [torch.tensor([3.0, 3, 3, 1, 1, 1, 1, 1]), torch.tensor([4.0, 4, 0, 0, 0, 0, 0, 0])]
    for j in range(k // 8):
        choice = int(torch.randint(3, (1,), generator=g))
        if choice < 2:
            v[8 * j:8 * j + 8] = patterns[choice]
    signs = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    return (v * signs)[torch.randperm(k, generator=g)][None]


def gated_pair(v: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) with relu(gate)^2 * up = v exactly: gate 1 or 2 (up v or v / 4) where v != 0, a
    gate of 0 or below (which relu must zero) beside a nonzero up where v == 0."""
    g = torch.Generator().manual_seed(seed)
    two = torch.rand(v.shape, generator=g) < 0.5
    gate = torch.where(two, 2.0, 1.0)
    up = torch.where(two, v / 4, v)
    off = v == 0
    gate = torch.where(off, -torch.randint(0, 3, v.shape, generator=g).float(), gate)
    up = torch.where(off, torch.randn(v.shape, generator=g), up)
    return gate, up


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fmt, gated, k", [("2bit", False, 200), ("2bit", True, 203), ("1.6bit", True, 200),
                                           ("1.6bit", False, 203), ("1bit", False, 200), ("1bit", True, 203)])
def test_the_decode_step_runs_the_norm_exactly(fmt, gated, k, m, monkeypatch, triton_device):
    """rmsnorm_packed_matmul_cat at a decode step (M = 1: one GEMV launch normalizing x itself; a
    batch, M = 3: one GEMM launch whose programs normalize their rows), on rows built so that
    RMSNorm has one exact answer (mean square 4, eps 0): equal bit for bit to torch's RMSNorm,
    quantize_activation and the exact integer matmul on the CPU, for q / k / v in one launch and
    for one matrix with a bias and the residual added (o_proj, down_proj); words and bytes (odd K);
    no norm kernel launched. float32: the interpreter's bfloat16 casts truncate (bf16 is checked
    against rmsnorm_act_quant below)."""
    from bitnet.kernels import rmsnorm_quant

    d = triton_device
    rows = [mean_square_four(k, seed=k + j) for j in range(m)]
    pairs = [gated_pair(v, seed=k + 1 + j) for j, v in enumerate(rows)] if gated else None
    x = torch.cat([p[0] for p in pairs]) if gated else torch.cat(rows)
    up = torch.cat([p[1] for p in pairs]) if gated else None
    weight = 0.5 + torch.randint(0, 7, (k,), generator=torch.Generator().manual_seed(3)).float() / 4
    x_q, a = quantize_activation(bitnet.quant.rms_norm(torch.cat(rows), weight, 0.0))  # the reference, on the CPU
    torch.manual_seed(k)
    bits = "binary" if fmt == "1bit" else "ternary"
    norm_launches = []
    real_norm = rmsnorm_quant._rmsnorm_act_quant_kernel
    monkeypatch.setattr(rmsnorm_quant, "_rmsnorm_act_quant_kernel", type("Spy", (), {"__getitem__": lambda self, grid: (
        norm_launches.append(grid), real_norm[grid])[1]})())
    for ns, bias, residual in (([48, 16, 16], False, False), ([40], True, True)):
        layers = [BitLinear(k, n, bias=bias, weight_bits=bits).freeze(fmt) for n in ns]
        res = torch.randn(m, ns[0]) if residual else None
        y = kernels.rmsnorm_packed_matmul_cat(
            x.to(d), weight.to(d), 0.0, [layer.weight.to(d) for layer in layers],
            [layer.weight_scale.to(d) for layer in layers], ns, fmt,
            [layer.bias.to(d) if bias else None for layer in layers], up=None if up is None else up.to(d),
            residual=None if res is None else res.to(d)).cpu()
        ref = torch.cat([reference_gemm(x_q, layer.weight, n, fmt, layer.weight_scale, a, layer.bias if bias else None)
                         for layer, n in zip(layers, ns)], 1)
        assert torch.equal(y, ref if res is None else res + ref), (ns, (y - ref).abs().max())
    assert norm_launches == []


@pytest.mark.parametrize("fmt, gated, k", [("2bit", False, 200), ("1.6bit", True, 203), ("1bit", True, 200),
                                           ("2bit", True, 203)])
def test_a_prefill_normalizes_and_unpacks_in_one_launch(fmt, gated, k, monkeypatch, triton_device):
    """From UNPACK_M rows on (forced to 1 here) rmsnorm_packed_matmul_cat normalizes and quantizes the
    rows and unpacks the weights in one launch (rmsnorm_quant.rmsnorm_act_quant_unpack), then runs one
    int8 GEMM on them: on rows where RMSNorm has one exact answer, equal bit for bit to torch's
    RMSNorm, quantize_activation and the exact integer matmul on the CPU, for q / k / v and for one
    matrix with a bias and the residual; the weights unpacked equal to bitnet.packing.unpack's, the
    launcher's x_q, a and xsum to rmsnorm_act_quant's; words and bytes (odd K); no unpack launch of
    its own."""
    from bitnet.kernels import gemm as gemm_module, layout
    from bitnet.kernels.rmsnorm_quant import rmsnorm_act_quant_unpack
    from bitnet.packing import unpack

    monkeypatch.setattr(gemm_module, "UNPACK_M", 1)
    d = triton_device
    rows = [mean_square_four(k, seed=k + j) for j in range(3)]
    pairs = [gated_pair(v, seed=j) for j, v in enumerate(rows)] if gated else None
    x = torch.cat([p[0] for p in pairs] if gated else rows)
    up = torch.cat([p[1] for p in pairs]) if gated else None
    weight = 0.5 + torch.randint(0, 7, (k,), generator=torch.Generator().manual_seed(3)).float() / 4
    x_q, a = quantize_activation(bitnet.quant.rms_norm(torch.cat(rows), weight, 0.0))  # the reference, on the CPU
    torch.manual_seed(k)
    bits = "binary" if fmt == "1bit" else "ternary"
    unpack_launches = []
    real_unpack = layout._unpack_kernel
    monkeypatch.setattr(layout, "_unpack_kernel", type("Spy", (), {"__getitem__": lambda self, grid: (
        unpack_launches.append(grid), real_unpack[grid])[1]})())
    for ns, bias, residual in (([48, 16, 16], False, False), ([40], True, True)):
        layers = [BitLinear(k, n, bias=bias, weight_bits=bits).freeze(fmt) for n in ns]
        packed = [m.weight.to(d) for m in layers]
        res = torch.randn(3, ns[0]) if residual else None
        y = kernels.rmsnorm_packed_matmul_cat(
            x.to(d), weight.to(d), 0.0, packed, [m.weight_scale.to(d) for m in layers], ns, fmt,
            [m.bias.to(d) if bias else None for m in layers], up=None if up is None else up.to(d),
            residual=None if res is None else res.to(d)).cpu()
        ref = torch.cat([reference_gemm(x_q, m.weight, n, fmt, m.weight_scale, a, m.bias if bias else None)
                         for m, n in zip(layers, ns)], 1)
        assert torch.equal(y, ref if res is None else res + ref), (ns, (y - ref).abs().max())
        q, qa, qsum, w = rmsnorm_act_quant_unpack(x.to(d), weight.to(d), 0.0, packed, ns, fmt,
                                                  None if up is None else up.to(d))
        assert torch.equal(w.cpu(), torch.cat([unpack(m.weight, n, fmt) for m, n in zip(layers, ns)]))
        r_q, r_a, r_sum = kernels.rmsnorm_act_quant(x.to(d), weight.to(d), 0.0, with_sum=True,
                                                    up=None if up is None else up.to(d))
        assert torch.equal(q, r_q) and torch.equal(qa, r_a) and torch.equal(qsum, r_sum) and torch.equal(q.cpu(), x_q)
    assert unpack_launches == []


@pytest.mark.parametrize("dtype, gated, k", [(torch.float32, False, 256), (torch.bfloat16, True, 256),
                                             (torch.bfloat16, False, 4100), (torch.float32, True, 4100)])
def test_the_decode_gemv_quantizes_as_the_norm_kernel(dtype, gated, k, triton_device):
    """On any row (eps 1e-5; K past one 4096-wide step of the sum of squares) the GEMV's norm gives
    the x_q and a of rmsnorm_act_quant bit for bit, whatever each kernel's tile and warps (both sum
    the squares in an order fixed by K: rmsnorm_quant.row_rstd), and its output is exactly the
    packed matmul of them."""
    from bitnet.kernels.gemv import gemv_cat

    d = triton_device
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(1, k, generator=g) * 3).to(d, dtype)
    up = torch.randn(1, k, generator=g).to(d, dtype) if gated else None
    weight = (torch.rand(k, generator=g) + 0.5).to(d, dtype)
    layers = [BitLinear(k, n, bias=False).freeze("2bit").to(d) for n in (24, 8)]
    packed, scales = [m.weight for m in layers], [m.weight_scale for m in layers]
    x_q, a = torch.empty(1, k, dtype=torch.int8, device=d), torch.empty(1, device=d)
    y = gemv_cat(x, packed, [24, 8], "2bit", scales, norm_weight=weight, eps=1e-5, up=up, quantized_out=(x_q, a))
    r_q, r_a = kernels.rmsnorm_act_quant(x, weight, 1e-5, up=up)
    assert torch.equal(x_q, r_q) and torch.equal(a, r_a.reshape(-1))
    assert torch.equal(y, kernels.packed_matmul_cat(r_q, r_a, packed, scales, [24, 8], "2bit", out_dtype=dtype))
    if dtype == torch.float32:  # and the exact integer matmul of them (the interpreter's bf16 casts truncate)
        ref = torch.cat([reference_gemm(x_q.cpu(), p.cpu(), n, "2bit", s.cpu(), a.cpu()) for p, s, n in
                         zip(packed, scales, (24, 8))], 1)
        assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("fmt, dtype, gated, k, m", [("2bit", torch.bfloat16, True, 4100, 2),
                                                     ("1.6bit", torch.float32, False, 200, 5),
                                                     ("1bit", torch.float16, True, 256, 17)])
def test_the_batched_gemm_quantizes_as_the_norm_kernel(fmt, dtype, gated, k, m, triton_device):
    """On any rows (eps 1e-5; K past one 4096-wide step of the sum of squares; several row tiles at
    M = 17) the GEMM's norm (gemm_cat with norm_weight, split-K here as on a GPU's small shapes)
    gives exactly rmsnorm_act_quant, then the GEMM of its x_q and a (gemm_cat from int8, itself held
    to the exact integer matmul in test_kernels.py and its epilogue to torch's in the skip
    connection's tests), for q / k / v in one launch and for one matrix with the residual added:
    the programs' rstd and a are the norm kernel's bit for bit."""
    from bitnet.kernels.gemm import gemm_cat

    d = triton_device
    g = torch.Generator().manual_seed(k + m)
    x = (torch.randn(m, k, generator=g) * 3).to(d, dtype)
    up = torch.randn(m, k, generator=g).to(d, dtype) if gated else None
    weight = (torch.rand(k, generator=g) + 0.5).to(d, dtype)
    r_q, r_a = kernels.rmsnorm_act_quant(x, weight, 1e-5, up=up)
    bits = "binary" if fmt == "1bit" else "ternary"
    torch.manual_seed(k)
    for ns, residual in (([48, 16, 16], False), ([40], True)):
        layers = [BitLinear(k, n, bias=False, weight_bits=bits).freeze(fmt).to(d) for n in ns]
        packed, scales = [layer.weight for layer in layers], [layer.weight_scale for layer in layers]
        res = torch.randn(m, ns[0], generator=g).to(d, dtype) if residual else None
        y = gemm_cat(x, packed, ns, fmt, scales, out_dtype=dtype, residual=res, norm_weight=weight, eps=1e-5, up=up)
        ref = gemm_cat(r_q, packed, ns, fmt, scales, a=r_a.reshape(-1), out_dtype=dtype, residual=res)
        assert torch.equal(y, ref), (ns, (y - ref).abs().max())


def test_the_batched_norms_launch_apart_with_the_knob_off(monkeypatch, triton_device):
    """BITNET_GEMM_NORM_M=0 (gemm.GEMM_NORM_M, the GPU's A/B): a batched decode step's norm is one
    rmsnorm_act_quant launch before the GEMM again, and the output is the same, bit for bit."""
    from bitnet.kernels import gemm, rmsnorm_quant

    d = triton_device
    x, weight = activations(3, device=d), torch.rand(K, device=d) + 0.5
    layers = [layer.to(d) for layer in qkv(d, bias=False)]
    args = (x, weight, 1e-5, [m.weight for m in layers], [m.weight_scale for m in layers], [48, 16, 16], "2bit")
    fused = kernels.rmsnorm_packed_matmul_cat(*args)
    launches = []
    real_norm = rmsnorm_quant._rmsnorm_act_quant_kernel
    monkeypatch.setattr(rmsnorm_quant, "_rmsnorm_act_quant_kernel", type("Spy", (), {"__getitem__": lambda self, grid: (
        launches.append(grid), real_norm[grid])[1]})())
    monkeypatch.setattr(gemm, "GEMM_NORM_M", 0)
    assert torch.equal(kernels.rmsnorm_packed_matmul_cat(*args), fused) and len(launches) == 1


@pytest.mark.parametrize("dtype, gated, fused", [(torch.float32, True, False), (torch.bfloat16, True, True),
                                                  (torch.float32, False, True)])
def test_a_gpu_with_less_shared_memory_runs_the_norm_apart_where_the_tile_does_not_fit(dtype, gated, fused, monkeypatch,
                                                                                        triton_device):
    """On a GPU that lets a program have 99 KB of shared memory (an A10, L4, L40S or RTX 30xx-50xx:
    common.shared_limit) the norm-fused tile with float32 gated input (~116 KB compiled, bound 156
    KB: gemm.norm_tile_shared) would not launch: gemm_cat runs rmsnorm_act_quant first, the same
    bits; 16-bit gated input (92 KB) and float32 without the gate (92 KB) stay in the one launch."""
    from bitnet.kernels import gemm, rmsnorm_quant

    d = triton_device
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, K, generator=g) * 3).to(d, dtype)
    up = torch.randn(3, K, generator=g).to(d, dtype) if gated else None
    weight = (torch.rand(K, generator=g) + 0.5).to(d, dtype)
    layers = [layer.to(d) for layer in qkv(d, bias=False)]
    args = (x, [m.weight for m in layers], [48, 16, 16], "2bit", [m.weight_scale for m in layers])
    want = gemm.gemm_cat(*args, out_dtype=dtype, norm_weight=weight, eps=1e-5, up=up)
    launches, real_norm = [], rmsnorm_quant._rmsnorm_act_quant_kernel
    monkeypatch.setattr(rmsnorm_quant, "_rmsnorm_act_quant_kernel", type("Spy", (), {"__getitem__": lambda self, grid: (
        launches.append(grid), real_norm[grid])[1]})())
    monkeypatch.setattr(gemm, "shared_limit", lambda device: 101376)
    assert gemm.norm_tile_fits(x, gated) == fused
    assert torch.equal(gemm.gemm_cat(*args, out_dtype=dtype, norm_weight=weight, eps=1e-5, up=up), want)
    assert len(launches) == (0 if fused else 1)


def test_the_batched_gemm_refuses_a_norm_it_cannot_run(triton_device):
    from bitnet.kernels.gemm import gemm_cat

    d = triton_device
    layer = BitLinear(64, 8, bias=False).freeze("2bit").to(d)
    args = ([layer.weight], [8], "2bit", [layer.weight_scale])
    x, w = torch.randn(3, 64, device=d), torch.ones(64, device=d)
    with pytest.raises(ValueError, match="weight of shape \\(64,\\)"):
        gemm_cat(x, *args, norm_weight=torch.ones(63, device=d))
    with pytest.raises(ValueError, match="is for a float output"):
        gemm_cat(x, *args, out_dtype=torch.int32, norm_weight=w)
    with pytest.raises(ValueError, match="M <= 64"):
        gemm_cat(torch.randn(65, 64, device=d), *args, norm_weight=w)
    with pytest.raises(ValueError, match="up must have the gate's shape"):
        gemm_cat(x, *args, norm_weight=w, up=torch.ones(3, 32, device=d))
    with pytest.raises(ValueError, match="pass norm_weight"):
        gemm_cat(x, *args, up=torch.ones(3, 64, device=d))
    with pytest.raises(ValueError, match="int8 activations"):
        gemm_cat(x, *args, a=torch.ones(3, device=d))


def test_the_decode_gemv_refuses_a_norm_it_cannot_run(triton_device):
    from bitnet.kernels.gemv import gemv_cat

    d = triton_device
    layer = BitLinear(64, 8, bias=False).freeze("2bit").to(d)
    args = ([layer.weight], [8], "2bit", [layer.weight_scale])
    x = torch.randn(1, 64, device=d)
    with pytest.raises(ValueError, match="weight of shape \\(64,\\)"):
        gemv_cat(x, *args, norm_weight=torch.ones(63, device=d))
    with pytest.raises(ValueError, match="float x"):
        gemv_cat(torch.ones(1, 64, dtype=torch.int8, device=d), *args, a=torch.ones(1, device=d),
                 out_dtype=torch.float32, norm_weight=torch.ones(64, device=d))
    with pytest.raises(ValueError, match="up must have the gate's shape"):
        gemv_cat(x, *args, norm_weight=torch.ones(64, device=d), up=torch.ones(1, 32, device=d))
    with pytest.raises(ValueError, match="pass norm_weight"):
        gemv_cat(x, *args, up=torch.ones(1, 64, device=d))


# ----------------------------------------------------------------------------- the skip connection in the epilogue
@pytest.mark.parametrize("fmt, dtype, bias", [("2bit", torch.bfloat16, False), ("1.6bit", torch.float32, True),
                                              ("1bit", torch.bfloat16, True)])
@pytest.mark.parametrize("m", [1, 3])
def test_the_skip_connection_adds_as_torch_adds(fmt, dtype, bias, m, triton_device):
    """residual + o_proj(norm(x)) with the add in the GEMV's (M = 1) or the GEMM's (M > 1) epilogue:
    bit for bit torch's add of the same output, which the fused path gives without it (in bf16
    under the interpreter, which truncates float32 -> bf16 where a GPU rounds: within its ulp)."""
    layer = qkv(triton_device, dtype, fmt, bias)[0]
    norm = RMSNorm(K).to(triton_device, dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = activations(m, device=triton_device, dtype=dtype)[:, None]  # (m, 1, K)
        residual = torch.randn(m, 1, layer.out_features, device=triton_device).to(dtype) * 4
        (y,) = normed_projections(x, norm, [layer])
        (fused,) = normed_projections(x, norm, [layer], residual=residual)
    assert fused.shape == residual.shape and fused.dtype == dtype
    ref = (residual + y).cpu()
    if dtype == torch.float32 or triton_device == "cuda":
        assert torch.equal(fused.cpu(), ref)
    else:
        assert ((fused.cpu().float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()
    assert not torch.equal(fused.cpu(), y.cpu())


def test_the_skip_connection_is_refused_where_it_cannot_fuse(triton_device):
    layers = qkv(triton_device)
    x = activations(1, device=triton_device)
    with pytest.raises(ValueError, match="residual must be"):
        kernels.packed_matmul_cat(*kernels.act_quant(x), [m.weight for m in layers[:1]], [layers[0].weight_scale], [48],
                                  "2bit", residual=torch.zeros(1, 47, device=triton_device))
    norm = RMSNorm(K).to(triton_device)
    with torch.no_grad():  # several layers, or another dtype: the caller adds in torch
        assert normed_projections(x, norm, layers, residual=torch.zeros(1, 80, device=triton_device)) is None
        assert normed_projections(x, norm, layers[:1], residual=torch.zeros(1, 48, device=triton_device).double()) is None


@pytest.mark.usefixtures("gpu_gemm_tile")  # a whole model (conftest.py)
def test_no_skip_connection_is_added_in_torch(monkeypatch, triton_device):
    """On the Triton path the tiny model issues no torch add, at a prefill, a decode step or a
    batched one: both skip connections of each layer ride the o_proj and down_proj GEMVs' or
    GEMMs' epilogues. (The prefill's SDPA is not counted: where no fused backend takes its inputs,
    float32 with grouped heads on a GPU, torch's math backend adds the causal mask.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Adds(TorchDispatchMode):
        n = inside_sdpa = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Adds.n += not Adds.inside_sdpa and func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
            return func(*args, **(kwargs or {}))

    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        Adds.inside_sdpa += 1
        try:
            return real_sdpa(*args, **kwargs)
        finally:
            Adds.inside_sdpa -= 1

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    model = tiny().to(triton_device)
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    for batch in (1, 2):
        model.setup_cache(batch, 8)
        prompt = torch.tensor([[5, 77, 3]] * batch, device=triton_device)
        with torch.no_grad(), Adds():
            model(prompt, input_pos=torch.arange(3, device=triton_device))
            model(torch.tensor([[9]] * batch, device=triton_device), input_pos=torch.tensor([3], device=triton_device))
        model.clear_cache()
    assert Adds.n == 0


# ----------------------------------------------------------------------------- the model on the fused path
@pytest.mark.usefixtures("gpu_gemm_tile")  # a whole model (conftest.py)
def test_tiny_model_on_the_fused_path_matches_the_torch_path(monkeypatch, triton_device):
    model = tiny().to(triton_device)
    prompt = torch.tensor([[5, 77, 3, 120, 45]], device=triton_device)
    T, steps = prompt.shape[1], 3

    fused = []  # the inputs of each fused call
    codes = []  # the torch path's int8 codes, norm by norm
    real = ops.rms_norm_bitlinear_many

    def spy(x, weight, eps, *args, **kw):
        out = real(x, weight, eps, *args, **kw)
        up = args[6] if len(args) > 6 else kw.get("up")  # the relu2 MLP's up (its norm's input: relu(x)^2 * up)
        if out is not None:
            fused.append((x.detach().clone(), weight, eps, None if up is None else up.detach().clone()))
        elif up is None:  # not the Triton path: the norm runs unfused, then the quantization (with up: asked again)
            codes.append(quantize_activation(ops.rms_norm(x, weight, eps))[0].cpu())
        return out

    monkeypatch.setattr(ops, "rms_norm_bitlinear_many", spy)

    def run(kernel):
        """Prefill (M = T), then greedy decode with the cache (M = 1): logits (T + steps, vocab), tokens."""
        monkeypatch.setenv("BITNET_KERNEL", kernel)
        model.setup_cache(1, 16)
        with torch.no_grad():
            logits = [model(prompt, input_pos=torch.arange(T, device=triton_device)).logits[0]]
            tokens = [int(logits[-1][-1].argmax())]
            for i in range(steps):
                step = torch.tensor([[tokens[-1]]], device=triton_device)
                logits.append(model(step, input_pos=torch.tensor([T + i], device=triton_device)).logits[0])
                tokens.append(int(logits[-1][-1].argmax()))
        model.clear_cache()
        return torch.cat(logits).cpu(), tokens

    ref, ref_tokens = run("torch")  # the reference: each norm, then the projections, in torch
    assert not fused
    got, tokens = run("triton")
    assert len(fused) == len(codes) == 4 * 2 * (1 + steps)  # 4 norms x 2 layers, each forward
    assert tokens == ref_tokens

    # The wiring, bit for bit: the torch path fed the fused kernel's (x_q, a) gives the same logits.
    def torch_from_fused_quant(x, weight, eps, packed, scales, ns, fmt, biases, kernel=None, up=None, residual=None):
        x_q, a = kernels.rmsnorm_act_quant(x, weight, eps, up=up)
        rows, lead = x_q.reshape(-1, x.shape[-1]), x.shape[:-1]
        out = [reference_gemm(rows, p, n, fmt, s, a, b, x.dtype).reshape(*lead, n)
               for p, s, n, b in zip(packed, scales, ns, biases)]
        return out if residual is None else [residual + out[0]]  # the skip connection, in torch

    monkeypatch.setattr(ops, "rms_norm_bitlinear_many", torch_from_fused_quant)
    # and the decode steps' attention the Triton path's (its own tests: tests/test_attention.py)
    monkeypatch.setattr(bm, "decode_attention",
                        lambda q, k, v, pos, rows=None, key_mask=None, kernel=None: kernels.decode_attention(q, k, v, pos,
                                                                                                            rows, key_mask))
    wired, _ = run("torch")
    assert torch.equal(got, wired)

    # Against the torch path: the codes the two runs fed their matmuls, norm by norm, set the tolerance.
    fused_codes = [kernels.rmsnorm_act_quant(x, weight, eps, up=up)[0] for x, weight, eps, up in fused]
    assert_close_but_for_ties(got, ref, fused_codes, codes)


# ----------------------------------------------------------------------------- where it applies, where not
def one_forward(model, device) -> torch.Tensor:
    """A one-token forward (M = 1) of a one-layer model."""
    with torch.no_grad():
        return model(torch.tensor([[7]], device=device)).logits


def test_fused_path_is_taken_on_the_triton_kernels(monkeypatch, triton_device):
    model = tiny(layers=1).to(triton_device)
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    calls = count_kernel_calls(monkeypatch)
    one_forward(model, triton_device)
    # the four norms fused into the GEMV of the projections they feed (q / k / v, o, gate / up, down):
    # 4 calls, 4 launches, no bitnet::bitlinear
    assert calls == {"rmsnorm_act_quant": 0, "rmsnorm_packed_matmul_cat": 4, "act_quant": 0, "packed_matmul": 0,
                     "packed_matmul_cat": 0, "bitlinear": 0}


@pytest.mark.usefixtures("gpu_gemm_tile")  # a whole model (conftest.py)
def test_relu2_gate_is_folded_into_the_sub_norm(monkeypatch, triton_device):
    """The MLP's relu(gate)^2 * up goes into ffn_sub_norm's kernel (up passed), once a layer; with a
    hook on down_proj it runs in torch and the norm is not fused at all."""
    model = tiny(layers=2).to(triton_device)
    assert model.config.hidden_act == "relu2" and model.config.sub_norms
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    gated = []
    real = kernels.rmsnorm_packed_matmul_cat
    monkeypatch.setattr(kernels, "rmsnorm_packed_matmul_cat",
                        lambda *a, up=None, **kw: gated.append(up is not None) or real(*a, up=up, **kw))
    one_forward(model, triton_device)
    assert sorted(gated) == [False] * 6 + [True] * 2
    gated.clear()
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: None)
    one_forward(model, triton_device)
    assert sorted(gated) == [False] * 6 + [True]


@pytest.mark.parametrize("hooked, expected", [
    # q / k / v each alone (a hook on one of them), their norm unfused; the other three norms fused
    ("self_attn.q_proj", {"rmsnorm_act_quant": 0, "rmsnorm_packed_matmul_cat": 3, "act_quant": 0, "packed_matmul": 0,
                          "packed_matmul_cat": 0, "bitlinear": 3}),
    # the input norm runs as a module; q / k / v still share one act_quant
    ("input_layernorm", {"rmsnorm_act_quant": 0, "rmsnorm_packed_matmul_cat": 3, "act_quant": 1, "packed_matmul": 0,
                         "packed_matmul_cat": 1, "bitlinear": 0}),
    # the attention block gets its input normed (the hook sees it so), then as above
    ("self_attn", {"rmsnorm_act_quant": 0, "rmsnorm_packed_matmul_cat": 3, "act_quant": 1, "packed_matmul": 0,
                   "packed_matmul_cat": 1, "bitlinear": 0}),
])
def test_hooks_keep_the_modules_they_watch(hooked, expected, monkeypatch, triton_device):
    model = tiny(layers=1).to(triton_device)
    layer = model.model.layers[0]
    seen = []
    layer.get_submodule(hooked).register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    calls = count_kernel_calls(monkeypatch)
    one_forward(model, triton_device)
    assert calls == expected and len(seen) == 1
    if hooked != "input_layernorm":  # a projection or the block: its input is the normed residual stream
        with torch.no_grad():
            x = model.model.embed_tokens(torch.tensor([[7]], device=triton_device))
            assert torch.equal(seen[0], layer.input_layernorm(x))


def test_no_fusion_off_the_triton_path(monkeypatch, triton_device):
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    calls = count_kernel_calls(monkeypatch)
    training = tiny(layers=1).to(triton_device)
    bitnet.unfreeze(training)
    one_forward(training, triton_device)  # unfrozen BitLinear: fake quantization in torch
    frozen = tiny(layers=1).to(triton_device)
    frozen(torch.tensor([[7]], device=triton_device))  # autograd on (the norms' weights): the fused op has no backward
    # no norm fused; q / k / v and gate / up still share one act_quant each, o / down run alone
    assert calls == {"rmsnorm_act_quant": 0, "rmsnorm_packed_matmul_cat": 0, "act_quant": 2, "packed_matmul": 0,
                     "packed_matmul_cat": 2, "bitlinear": 2}
    monkeypatch.setenv("BITNET_KERNEL", "torch")
    calls.update(dict.fromkeys(calls, 0))
    one_forward(frozen, triton_device)
    assert calls == dict.fromkeys(KERNEL_OPS, 0)


@pytest.mark.skipif(not native.available(), reason="the native CPU kernels could not be built")
def test_native_cpu_path_is_the_unfused_one(monkeypatch):
    """BITNET_KERNEL=cpu: no Triton op, and logits (prefill, then cached decode: the native decode
    layer) equal bit for bit to the layers run as before this change (norm, then projections)."""
    model = tiny()
    monkeypatch.setenv("BITNET_KERNEL", "cpu")
    calls = count_kernel_calls(monkeypatch)

    def logits():
        model.setup_cache(1, 8)
        with torch.no_grad():
            out = [model(torch.tensor([[5, 77, 3]]), input_pos=torch.arange(3)).logits,
                   model(torch.tensor([[9]]), input_pos=torch.tensor([3])).logits]
        model.clear_cache()
        return out

    new = logits()
    assert calls == dict.fromkeys(KERNEL_OPS, 0)
    def unfused(block, norm, x, *args, skip=False):
        out = block(norm(x), *args)
        return x + out if skip else out

    monkeypatch.setattr(bm, "prenormed", unfused)
    monkeypatch.setattr(bm, "normed_projections", lambda x, norm, layers, up=None, residual=None: None)
    for got, ref in zip(new, logits()):
        assert torch.equal(got, ref)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.usefixtures("gpu_gemm_tile")  # a whole model (conftest.py)
def test_fused_layer_compiles_as_one_graph(triton_device):
    native.available()  # load the native extension first: its one-time load (a lock) cannot be traced
    torch._dynamo.reset()
    model = tiny(layers=1).to(triton_device)
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.kernel = "triton"
    layer = model.model.layers[0]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)  # the fake kernels trace it

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    with torch.no_grad():
        for T in (1, 3):
            x = torch.randn(1, T, model.config.hidden_size, device=triton_device)
            cos, sin = model.model.rotary(torch.arange(T, device=triton_device)[None], x.dtype)
            assert torch.equal(compiled(x, cos, sin, None, None), layer(x, cos, sin, None, None))
    for graph in graphs:  # T = 1 (one GEMV launch each at run time) and T = 3 (the norm kernel, then the GEMM)
        ops_in_graph = [n.target for n in graph.graph.nodes if n.op == "call_function"]
        assert ops_in_graph.count(torch.ops.bitnet.rmsnorm_packed_matmul_cat) == 4
        assert torch.ops.bitnet.packed_matmul_cat not in ops_in_graph


def test_host_overhead_benchmark_counts_a_layers_launches(tmp_path, triton_device):
    """benchmarks/host_overhead.py on the tiny preset (launches stubbed): a decode layer on the
    Triton path issues four GEMVs (q/k/v, o, gate/up, down; each runs the RMSNorm in front of it)
    and the decode attention with the RoPE and the cache write in it (one split: a short cache),
    nothing else; a batched decode layer four norms, four GEMMs (the skip connections in o_proj's
    and down_proj's epilogues) and the attention; a prefill layer four norms, four GEMMs and the
    RoPE with the cache write (its attention is SDPA's); a server step's layer in pieces launches its
    prompt's attention alone from the host; the stubs come off."""
    if triton_device != "cpu":
        pytest.skip("stubs the kernels of a CPU (interpreter) run")
    import importlib.util
    import sys

    from bitnet.kernels import gemv

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "host_overhead.py")
    spec = importlib.util.spec_from_file_location("host_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    kernel = gemv._gemv_kernel
    # (a prefill of more rows than a batched decode's: its norms launch apart, gemm.GEMM_NORM_M)
    rows = bench.measure(bench.HostArgs(preset="tiny", layers=1, iters=2, dtype="float32", batch=3, prefill=80,
                                        serve_batch=3, serve_prompt=4, launches="stub", out_dir=str(tmp_path)))
    serve, rows = rows[3:], rows[:3]
    assert [(r["case"], r["triton_launches"]) for r in rows] == [("decode 1 x 1", 5), ("decode 3 x 1", 5),
                                                                ("prefill 1 x 80", 9)]
    assert all(r["torch_ops"] > 0 for r in rows)
    # no torch op of a layer launches a GPU kernel but the prefill's SDPA (the rest are views and allocations)
    assert [r["gpu_kernels"] for r in rows] == [5, 5, 10]
    # a server step, a 4-token prompt beside 2 decode tokens: eager, four GEMMs (their norms inside: 6 rows),
    # the RoPE with the cache writes, the decode attention; in pieces, the host launches the prompt's SDPA
    # and its copy into the pieces' tensor, and replays one graph (the decode attention is in it)
    assert [(r["case"], r["triton_launches"], r["replays"]) for r in serve] == [("serve 3 x 4", 6, 0),
                                                                               ("serve pieces 3 x 4", 0, 1)]
    assert serve[1]["gpu_kernels"] == 2 and serve[1]["torch_ops"] < serve[0]["torch_ops"] / 3
    assert gemv._gemv_kernel is kernel
    # the bf16 twin's layer beside it: no Triton launch, its prefill over twin_prefill tokens, its
    # F.linear back as it was (and a ratio only where both sides were measured)
    linear = torch.nn.functional.linear
    twin = bench.measure(bench.HostArgs(preset="tiny", layers=1, iters=2, dtype="float32", batch=3, prefill=16,
                                        launches="twin", twin_prefill=2, out_dir=str(tmp_path)), "twin")
    assert [(r["launches"], r["case"], r["triton_launches"]) for r in twin] == [
        ("twin (bf16)", "decode 1 x 1", 0), ("twin (bf16)", "decode 3 x 1", 0), ("twin (bf16)", "prefill 1 x 2", 0)]
    assert all(r["torch_ops"] > 0 and r["gpu_kernels"] >= 7 for r in twin)  # its seven F.linear at least
    assert torch.nn.functional.linear is linear
    assert bench.host_ratios(rows + twin) == {} and set(bench.host_ratios(
        [dict(r, launches="direct") for r in rows] + twin)) == {"decode 1 x 1", "decode 3 x 1", "prefill 1 x 80"}


@pytest.mark.usefixtures("gpu_gemm_tile")  # a whole model (conftest.py)
def test_compiled_decode_step_on_the_triton_path_equals_eager(monkeypatch, triton_device):
    """torch.compile (aot_eager: functionalized, as inductor sees it) of a whole decode step on the
    Triton path, the cache-writing RoPE op (bitnet::rope_cache_, which mutates the cache) included:
    no graph break, the same cache as eager and the same logits up to the attention's summation
    order (eager on a CPU reads only the live cache window, a traced step the whole static cache
    under a mask: bitnet.model._set_cache_window)."""
    from bitnet.generation import decode_step

    monkeypatch.setenv("BITNET_KERNEL", "triton")
    model = tiny(layers=1).to(triton_device)
    args = (torch.tensor([[3]], device=triton_device), torch.tensor([4], device=triton_device),
            torch.tensor([[4]], device=triton_device), torch.ones(1, 16, dtype=torch.bool, device=triton_device))
    results = []
    for step in (decode_step, torch.compile(decode_step, backend="aot_eager", fullgraph=True)):
        model.setup_cache(1, 16)
        with torch.no_grad():
            logits = step(model, *args)
        cache = model.model.layers[0].self_attn.kv_cache
        results.append((logits, cache.k.clone(), cache.v.clone()))
    model.clear_cache()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[1][1], results[0][1]) and torch.equal(results[1][2], results[0][2])
    assert results[0][1][:, :, 4].abs().sum() > 0 and not results[0][1][:, :, 5:].any()  # slot 4 written, no other

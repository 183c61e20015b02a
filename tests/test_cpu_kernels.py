"""Native CPU kernels (bitnet.kernels.cpu): exact against integer arithmetic, bit-identical to the
torch reference, on every instruction set this CPU has, both paths (GEMV, decoded int8 GEMM), 1 and
2 threads; the no-compiler fallback warns and stays correct."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bitnet.kernels import cpu
from bitnet.packing import pack
from bitnet.quant import quantize_activation, quantized_linear

FORMATS = ("2bit", "1.6bit", "1bit")
SHAPES = [(37, 45), (64, 64), (129, 200), (5, 1), (40, 1027)]  # (N, K): off every vector width
MS = (1, 3, 16, 33, 128)


def setup_module():
    # CI has a compiler: a build failure is a failure here, not a skip
    assert cpu.load(), f"native CPU kernels did not build: {cpu.error()}"


def isas():
    """The instruction sets this CPU can run; the ones it lacks are reported as skips."""
    have = cpu.ISAS.index(cpu.detected_isa())
    return [pytest.param(n, marks=[] if i <= have else pytest.mark.skip(reason=f"this CPU lacks {n}"))
            for i, n in enumerate(cpu.ISAS)]


def weights(n, k, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fmt == "1bit":
        return torch.randint(0, 2, (n, k), generator=g, dtype=torch.int8) * 2 - 1
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


def exact(x_q, w):
    """x_q @ w^T in int64, the arithmetic's definition."""
    return (x_q.long() @ w.long().t()).to(torch.int32)


@pytest.fixture(autouse=True)
def restore():
    threads = torch.get_num_threads()
    yield
    cpu.set_isa(os.environ.get("BITNET_CPU_ISA", cpu.ISAS[-1]))  # the session's cap, as loaded
    cpu.set_large_m(cpu.LARGE_M)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_int32_accumulation_is_exact(isa, fmt, path):
    cpu.set_isa(isa)
    cpu.set_large_m(10**9 if path == "gemv" else 1)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n, k in SHAPES:
            w = weights(n, k, fmt, seed=n * k)
            packed = pack(w, fmt)
            for m in MS:
                x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
                got = cpu.matmul_int32(x_q, packed, n, fmt)
                assert torch.equal(got, exact(x_q, w)), (isa, fmt, path, threads, n, k, m)


@pytest.mark.parametrize("isa", isas())
def test_extreme_activations_and_long_rows(isa):
    """All -128 / +127 activations against all-+1 / all--1 weights, over K long enough that a
    16-bit partial sum would overflow: the int32 results must still be exact. One row (the decode
    kernel, whose 2bit / 1bit sums run scaled by up to 4^3 and split K beyond 65536) and three."""
    cpu.set_isa(isa)
    for k in (4160, 70001):
        for fmt in FORMATS:
            for sign in (1, -1):
                w = torch.full((12, k), sign, dtype=torch.int8)
                packed = pack(w, fmt)
                for v in (-128, 127):
                    for m in (1, 3) if k < 10000 else (1,):
                        x_q = torch.full((m, k), v, dtype=torch.int8)
                        assert torch.equal(cpu.matmul_int32(x_q, packed, 12, fmt), exact(x_q, w)), (fmt, k, m, sign, v)


@pytest.mark.parametrize("isa", isas())
def test_activation_quantization_is_bit_identical(isa):
    cpu.set_isa(isa)
    torch.manual_seed(0)
    x = torch.randn(7, 300) * 4
    x[1] = 0  # all-zero row: a = 127 / 1e-5, x_q = 0
    x[2, :] = torch.arange(300) / 299 * 127 / 2  # many exact halves after scaling: ties to even
    x[3, 5] = 1e6  # one huge value
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype) if dtype != torch.float16 else (x / 1e3).to(dtype)
        x_q, a, s = cpu.quantize(xd)
        r_q, r_a = quantize_activation(xd)
        assert torch.equal(x_q, r_q) and torch.equal(a, r_a) and torch.equal(s, r_q.int().sum(-1))
    ties = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0]])  # a = 1: x * a is each value itself
    assert cpu.quantize(ties)[0].tolist() == [[0, 2, 2, 0, -2, 127]]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_is_bit_identical_to_the_torch_reference(isa, fmt):
    cpu.set_isa(isa)
    torch.manual_seed(1)
    for n, k in [(37, 45), (130, 257)]:
        w = weights(n, k, fmt)
        packed, scale = pack(w, fmt), torch.tensor([0.0371])
        for m in (1, 3, 16, 33, 128):
            for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                x = torch.randn(m, k).to(dtype)
                bias = torch.randn(n).to(dtype)
                for b in (None, bias):
                    assert torch.equal(cpu.linear(x, packed, scale, n, fmt, b), quantized_linear(x, w, scale, b))
    x = torch.randn(2, 3, 45)  # leading dimensions are kept
    assert cpu.linear(x, pack(weights(37, 45, fmt), fmt), scale, 37, fmt).shape == (2, 3, 37)
    cpu.set_large_m(10**9)  # many rows on the GEMV path: int32 sums past the 4 MB a thread keeps
    w = weights(4100, 64, fmt)
    x = torch.randn(260, 64).to(torch.bfloat16)
    assert torch.equal(cpu.linear(x, pack(w, fmt), scale, 4100, fmt), quantized_linear(x, w, scale))


def test_bad_input_is_named():
    packed = pack(weights(8, 16, "2bit"))
    with pytest.raises(RuntimeError, match="columns but the input has K = 15"):
        cpu.linear(torch.randn(2, 15), packed, torch.ones(1), 8, "2bit")
    with pytest.raises(RuntimeError, match="cannot hold 9 weight rows"):
        cpu.linear(torch.randn(2, 16), packed, torch.ones(1), 9, "2bit")
    with pytest.raises(RuntimeError, match="unknown packed format"):
        cpu.linear(torch.randn(2, 16), packed, torch.ones(1), 8, "3bit")
    with pytest.raises(RuntimeError, match="2-D uint8"):
        cpu.linear(torch.randn(2, 16), packed.to(torch.int8), torch.ones(1), 8, "2bit")
    with pytest.raises(RuntimeError, match="input dtype"):
        cpu.linear(torch.randint(0, 5, (2, 16)), packed, torch.ones(1), 8, "2bit")
    with pytest.raises(ValueError, match="BITNET_CPU_ISA"):
        cpu.set_isa("sse2")


def test_isa_cap_from_the_environment():
    code = "from bitnet.kernels import cpu; assert cpu.load(); print(cpu.isa())"
    env = dict(os.environ, BITNET_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_no_compiler_warns_and_the_torch_path_stays_correct(tmp_path):
    """A fresh extension cache and no compiler on PATH: one warning naming the cause, then the
    frozen layer computes through the torch path, equal to the reference."""
    code = textwrap.dedent("""
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from bitnet.kernels import cpu
            ok = cpu.load()
            cpu.load()  # a second call does not warn again
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print("ok", ok, "warnings", len(msgs))
        print(msgs[0] if msgs else "")
        from bitnet import BitLinear
        from bitnet.ops import choose_kernel
        from bitnet.quant import quantized_linear
        layer = BitLinear(45, 37, bias=True).freeze()
        x = torch.randn(3, 45)
        w_q, s = layer.quantized_weight()
        print("kernel", choose_kernel(x), torch.equal(layer(x), quantized_linear(x, w_q, s, layer.bias)))
    """)
    env = dict(os.environ, CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path), PATH="/nonexistent")
    env.pop("BITNET_KERNEL", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "ok False warnings 1", out.stdout
    assert "no C++ compiler" in lines[1] and "torch path" in lines[1]
    assert lines[2] == "kernel torch True"


def test_torch_compile_traces_through_the_op():
    """The op has a fake implementation: fullgraph compilation works and gives the same output."""
    from bitnet.kernels.cpu import linear

    w = weights(24, 64, "2bit")
    packed, scale = pack(w), torch.tensor([0.5])

    def f(x):
        return linear(x * 2, packed, scale, 24, "2bit") + 1

    x = torch.randn(3, 64)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))
    torch.library.opcheck(torch.ops.bitnet_cpu.linear.default, (x, packed, scale, 24, "2bit", None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("linear, packing", [("bitnet", "2bit"), ("bitnet", "1.6bit"), ("bitnet1", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_model_logits_equal_through_native_and_torch_paths(linear, packing, dtype, monkeypatch):
    """The same integers and the same float32 epilogue: the logits are equal, not close, whether the
    packed layers run on the native kernels or on the torch reference (prefill and one decode)."""
    import bitnet

    torch.manual_seed(0)
    model = bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny", linear=linear))
    model = bitnet.freeze(model.to(dtype), packing).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kernel in ("torch", "cpu"):
        monkeypatch.setenv("BITNET_KERNEL", kernel)
        with torch.no_grad():
            logits[kernel] = (model(ids).logits, model(ids[:1, :1]).logits)  # M = 140 (GEMM path) and M = 1
    for got, ref in zip(logits["cpu"], logits["torch"]):
        assert torch.equal(got, ref)


def test_generation_uses_the_native_kernels_and_compiles(monkeypatch):
    """generate on a frozen model runs the native op (counted), and compile=True traces through it
    on the CPU with the same greedy tokens."""
    import bitnet
    from bitnet import ops

    monkeypatch.delenv("BITNET_KERNEL", raising=False)
    torch.manual_seed(0)
    model = bitnet.freeze(bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny", initializer_range=0.05))).eval()
    calls = []
    real = ops.native.linear
    monkeypatch.setattr(ops.native, "linear", lambda *a: calls.append(1) or real(*a))
    prompt = torch.tensor([[1, 5, 77, 3, 9]])
    eager = model.generate(prompt, 6)
    assert calls, "the packed layers did not run on the native kernels"
    torch._dynamo.reset()
    compiled = model.generate(prompt, 6, compile=True)
    assert torch.equal(eager, compiled)


def test_native_kernels_read_the_checkpoint_layout_in_place(tmp_path):
    """No CPU-private layout: after native forwards, the layer still holds transformers' own packed
    bytes, and save -> load round-trips them bit for bit with equal logits."""
    import bitnet
    from transformers.integrations.bitnet import pack_weights

    torch.manual_seed(0)
    model = bitnet.freeze(bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny"))).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        logits = model(ids).logits
    layer = model.model.layers[0].mlp.down_proj
    w_q, _ = layer.quantized_weight()
    assert torch.equal(layer.weight, pack_weights(w_q.float()))
    model.save_pretrained(tmp_path / "m")
    loaded = bitnet.BitNetForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


HARNESS = os.path.join(os.path.dirname(__file__), "native", "kernels_test.cpp")
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "csrc")


def run_harness(compiler, tmp_path, runner=(), extra=()):
    exe = tmp_path / "kernels_test"
    subprocess.run([compiler, "-O3", "-std=c++17", "-ffp-contract=off", *extra, "-I", CSRC, HARNESS, "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)
    out = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()


def test_native_simd_paths_equal_the_portable_one_without_torch(tmp_path):
    """tests/native/kernels_test.cpp, built here with the system compiler: every SIMD level this CPU
    has against the scalar path (quantization bit for bit, dot products and decode exactly)."""
    import shutil

    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    words = run_harness(cxx, tmp_path)  # "ok <level> <cases>" per level above scalar
    levels = cpu.ISAS.index(cpu.detected_isa())
    if levels == 0:
        assert words == ["ok", "0", "0"]
        pytest.skip("this CPU has no SIMD level above the portable one")
    assert words[0::3] == ["ok"] * levels and [int(w) for w in words[1::3]] == list(range(1, levels + 1))
    assert all(int(w) > 0 for w in words[2::3]), words


def test_neon_path_under_qemu(tmp_path):
    """The AArch64 NEON (sdot) path, cross-compiled and run under qemu-aarch64 (-cpu max has the
    dot-product extension), against the portable path. Needs g++-aarch64-linux-gnu and
    qemu-user (.ci/run installs them where apt can)."""
    import shutil

    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.skip("no aarch64-linux-gnu-g++ or qemu-aarch64 (apt install g++-aarch64-linux-gnu qemu-user)")
    words = run_harness(cxx, tmp_path, runner=(qemu, "-cpu", "max"), extra=("-static",))
    assert words[:2] == ["ok", "1"] and int(words[2]) > 0, words


@pytest.mark.parametrize("isa", isas())
def test_int8_lm_head_against_float64(isa):
    """Int8Linear: native rows (decode) and the dequantized path (many rows) both equal the float64
    product of the int8 weights and their scales within float32 rounding; quantization error of
    the rows themselves is bounded by half a step."""
    import bitnet

    cpu.set_isa(isa)
    torch.manual_seed(0)
    lin = torch.nn.Linear(257, 1003, bias=False)
    head = bitnet.Int8Linear.from_linear(lin)
    w = head.weight.double() * head.weight_scale.double()[:, None]
    assert (w - lin.weight.double()).abs().max() <= head.weight_scale.max() / 2 + 1e-7
    for m in (1, 3, 40):
        x = torch.randn(2, m, 257)
        ref = x.double() @ w.t()
        y = head(x)
        assert y.shape == (2, m, 1003) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    state = head.state_dict()  # an ordinary checkpoint tensor: the dequantized rows in bf16
    assert list(state) == ["weight"] and state["weight"].dtype == torch.bfloat16


def test_quantize_lm_head_keeps_greedy_decoding_close():
    import bitnet

    torch.manual_seed(0)
    model = bitnet.freeze(bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny", initializer_range=0.05))).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        model.quantize_lm_head()
        after = model(ids).logits
    assert isinstance(model.lm_head, bitnet.Int8Linear)
    assert (after - before).abs().max() < 0.02 * before.abs().max()
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("isa", isas())
def test_int4_lm_head_against_float64(isa):
    """Int4Linear: native rows (decode) equal the float64 value of its function (per-row int8
    activations against 4-bit weights in groups of 32, K off the 64-wide blocks) within float32
    summation, each row independent of the others; many rows (the torch path) agree with them; the
    weights' own rounding is at most half a step of their group; the state dict is an ordinary
    bf16 weight; the quantize_lm_head switch and its refusals."""
    import bitnet
    from bitnet.quant import quantize_activation

    cpu.set_isa(isa)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(259, 1003)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=g)
        lin.bias.normal_(0, 0.02, generator=g)
    head = bitnet.Int4Linear.from_linear(lin)
    w = head.dequantized().double()
    step = head.scales.double().repeat_interleave(32, 1)[:, :259]
    assert ((w - lin.weight.double()).abs() <= step / 2 + 1e-9).all()
    assert head.codes.shape == (1003, 160) and head.scales.shape == (1003, 10)
    x = torch.randn(5, 259, generator=g)
    x_q, a = quantize_activation(x)
    ref = (x_q.double() @ w.t()) / a.double() + lin.bias.double()
    bound = (x_q.double().abs() @ w.abs().t()) / a.double() * 1e-6 + 1e-7
    with torch.no_grad():
        y = head(x)
        assert ((y.double() - ref).abs() <= bound).all()
        assert torch.equal(torch.cat([head(x[i:i + 1]) for i in range(5)]), y)
        many = head(torch.cat([x] * 4))  # 20 rows: the torch path
    assert (many[:5].double() - ref).abs().max() <= bound.max() * 10
    state = head.state_dict()
    assert sorted(state) == ["bias", "weight"] and state["weight"].dtype == torch.bfloat16
    model = bitnet.freeze(bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny", initializer_range=0.05))).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=g)
    with torch.no_grad():
        before = model(ids).logits
        after = model.quantize_lm_head(bits=4)(ids).logits
    assert isinstance(model.lm_head, bitnet.Int4Linear)
    # 4-bit rounding of random N(0, 0.05) rows: about 10% of the logits' norm (a wrong nibble
    # order or scale gives over 100%); what it costs a trained model is measured in perplexity
    assert (after - before).norm() < 0.15 * before.norm()
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize_lm_head(bits=8)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        model.quantize_lm_head(bits=6)


# ----------------------------------------------------------------------------- float parts of inference
@pytest.mark.parametrize("isa", isas())
def test_bf16_head_against_float64(isa):
    """The native bf16 head (decode's few rows) equals the float64 product of the same bf16 weights
    within float32 summation error (bias included, K off every vector width; bf16 activations go
    to the AMX-BF16 tiles where the CPU has them, else to VDPBF16PS where it has AVX512-BF16), each
    row independent of the others; a frozen model's head
    takes it on the CPU in inference and falls back to F.linear for many rows or with autograd."""
    import bitnet
    from bitnet import ops

    cpu.set_isa(isa)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1003, 259, generator=g).to(torch.bfloat16)
    b = torch.randn(1003, generator=g).to(torch.bfloat16)
    for m in (1, 3):
        x = torch.randn(2, m, 259, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            y = cpu.bf16_linear(xd, w, b)
            ref = xd.double() @ w.double().t() + b.double()
            bound = (xd.double().abs() @ w.double().abs().t()) * 1e-6 + ref.abs() * (2**-8 if dtype == torch.bfloat16 else 1e-6)
            assert y.shape == (2, m, 1003) and y.dtype == dtype
            assert ((y.double() - ref).abs() <= bound + 1e-6).all()
    # each row's outputs do not depend on the others (a batch of decode rows = each row alone);
    # 17 rows: the AMX-BF16 kernel's two blocks of rows
    x = torch.randn(17, 259, generator=g).to(torch.bfloat16)
    assert torch.equal(cpu.bf16_linear(x, w, b), torch.cat([cpu.bf16_linear(x[i:i + 1], w, b) for i in range(17)]))
    lin = bitnet.StreamedLinear.adopt(torch.nn.Linear(259, 1003, bias=False).to(torch.bfloat16))
    calls = {"n": 0}
    real = cpu.bf16_linear

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    try:
        cpu.bf16_linear = counted
        with torch.no_grad():
            lin(torch.randn(1, 259).to(torch.bfloat16))  # decode: native
            lin(torch.randn(ops.HEAD_ROWS + 1, 259).to(torch.bfloat16))  # many rows: F.linear
        y = lin(torch.randn(1, 259, dtype=torch.bfloat16, requires_grad=True))  # autograd: F.linear
        y.float().sum().backward()
    finally:
        cpu.bf16_linear = real
    assert calls["n"] == 1 and lin.weight.grad is not None


def test_freeze_streams_the_float_head_and_keeps_the_checkpoint():
    """freeze() turns a plain nn.Linear lm_head into a StreamedLinear in place: the same parameter
    (ties kept), the same state dict; the twin (no BitLinear) is left alone."""
    import bitnet

    torch.manual_seed(0)
    cfg = bitnet.BitNetConfig.from_preset("tiny", tie_word_embeddings=True)
    model = bitnet.BitNetForCausalLM(cfg).to(torch.bfloat16)
    weight = model.lm_head.weight
    bitnet.freeze(model)
    assert type(model.lm_head) is bitnet.StreamedLinear and model.lm_head.weight is weight
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = model.state_dict()
    model.lm_head.__class__ = torch.nn.Linear  # what freeze() would have left without the swap
    plain = model.state_dict()
    assert list(state) == list(plain) and all(torch.equal(state[k], plain[k]) for k in state)
    twin = bitnet.freeze(bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny", linear="bf16")))
    assert type(twin.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("isa", isas())
def test_native_rms_norm_against_the_reference(dtype, isa):
    """Native RMSNorm equals bitnet.quant.rms_norm up to the one reduction: its float32 mean of
    squares may round differently (the native one sums in float64), so outputs agree within one
    float32 rounding of the scale, then the rounding to x's dtype: at most one unit in the last
    place of x's dtype; most values are equal."""
    from bitnet.quant import rms_norm

    cpu.set_isa(isa)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 1537, generator=g) * 3).to(dtype)
    w = torch.randn(1537, generator=g).to(dtype)
    got, ref = cpu.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    ulp = {torch.float32: 2**-23, torch.float64: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert ((got.double() - ref.double()).abs() <= 2 * ulp * ref.double().abs() + 1e-30).all()
    assert (got == ref).float().mean() > 0.5
    x64 = x.float().double()  # float64 reference of the formula, for float32 inputs
    if dtype == torch.float32:
        ref64 = w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
        assert (got.double() - ref64).abs().max() <= (ref64.abs() * 4 * ulp).max()
    with pytest.raises(RuntimeError, match="rms_norm weight"):
        cpu.rms_norm(x, w[:-1], 1e-5)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_rope_is_bit_identical(dtype, isa):
    """x * cos + rotate_half(x) * sin: the native op equals torch's three elementwise ops bit for
    bit (signed zeros included), for a transposed (non-contiguous) x and cos / sin per batch row or
    broadcast, head sizes on and off the vector width."""
    from bitnet.ops import rotate_half

    cpu.set_isa(isa)
    g = torch.Generator().manual_seed(0)
    for D in (64, 36):
        x = torch.randn(2, 5, 3, D, generator=g).to(dtype)
        x[0, 0, 0, :D // 2] = 0.0
        x[0, 0, 1] = -0.0
        x = x.transpose(1, 2)  # (B, H, T, D), strided
        for cb in (2, 1):
            cos, sin = (torch.randn(cb, 1, 5, D, generator=g).to(dtype) for _ in range(2))
            sin[..., 1] = 0.0
            got, ref = cpu.rope(x, cos, sin), x * cos + rotate_half(x) * sin
            assert torch.equal(got, ref) and torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                                         ref.contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32))
    with pytest.raises(RuntimeError, match="cos / sin"):
        cpu.rope(x, cos[..., :32], sin[..., :32])


def test_decode_reads_only_the_live_cache():
    """Eager CPU decode reads the cache up to the last written slot: the same greedy tokens and,
    within float32 rounding of attention's sums, the same logits as a cache of exactly the needed
    length, however long the preallocated one is."""
    import bitnet
    from bitnet.generation import generate

    torch.manual_seed(0)
    model = bitnet.freeze(bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny", initializer_range=0.05))).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    out = {}
    for length in (9 + 6, 256):
        model.setup_cache(2, length)
        out[length] = generate(model, ids, 6)
        with torch.no_grad():
            logits = model(ids, input_pos=torch.arange(9)).logits
            step = model(ids[:, -1:], input_pos=torch.tensor([9])).logits
        assert model.model.layers[0].self_attn.kv_cache.window.live == 10  # slots 0..9, not `length`
        out[length, "logits"] = (logits, step)
        model.clear_cache()
    assert torch.equal(out[15], out[256])
    for a, b in zip(out[15, "logits"], out[256, "logits"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_many_equals_one_call_per_matrix(isa, fmt):
    """linear_many (q / k / v, gate / up in one call) gives each matrix's linear() bit for bit, on
    both paths (GEMV and the decoded GEMM), with and without bias, 1 and 2 threads; bad arguments
    are named."""
    cpu.set_isa(isa)
    g = torch.Generator().manual_seed(1)
    K = 200
    shapes = [37, 129, 5]
    packed = [pack(weights(n, K, fmt, seed=n), fmt) for n in shapes]
    scales = [torch.rand(1, generator=g) + 0.1 for _ in shapes]
    biases = [torch.randn(37, generator=g), None, torch.randn(5, generator=g)]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for m in (1, 3, 16, 64):
            x = torch.randn(m, K, generator=g).to(torch.bfloat16)
            got = cpu.linear_many(x, packed, scales, shapes, fmt, biases)
            for y, p, s, n, b in zip(got, packed, scales, shapes, biases):
                assert torch.equal(y, cpu.linear(x, p, s, n, fmt, b))
    with pytest.raises(RuntimeError, match="as many scales"):
        cpu.linear_many(x, packed, scales[:2], shapes, fmt, biases)
    with pytest.raises(RuntimeError, match="cannot hold"):
        cpu.linear_many(x, packed, scales, [37, 129, 500], fmt, biases)


def test_frozen_model_fuses_its_projections(monkeypatch):
    """A frozen model on the native kernels runs q / k / v and gate / up as one linear_many call
    each (two a layer); on the torch path none."""
    import bitnet

    monkeypatch.delenv("BITNET_KERNEL", raising=False)
    model = bitnet.freeze(bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny"))).eval()
    calls = {"n": 0}
    real = cpu.linear_many

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(cpu, "linear_many", counted)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        model(ids)
        assert calls["n"] == 2 * model.config.num_hidden_layers
        monkeypatch.setenv("BITNET_KERNEL", "torch")
        model(ids)
    assert calls["n"] == 2 * model.config.num_hidden_layers


# ----------------------------------------------------------------------------- decode: attention and whole layers
def attention_reference(q, k_cache, v_cache, rows, pos, key_mask=None):
    """float64 softmax attention of each query (N, H, D) over slots 0..pos[n] of cache row rows[n]
    (the keys key_mask allows, and the query's own slot)."""
    N, H, D = q.shape
    rep = H // k_cache.shape[1]
    y = torch.empty(N, H, D, dtype=torch.float64)
    for n in range(N):
        L = int(pos[n]) + 1
        allowed = torch.ones(L, dtype=torch.bool) if key_mask is None else key_mask[n, :L].clone()
        allowed[L - 1] = True
        for h in range(H):
            k, v = k_cache[rows[n], h // rep, :L].double(), v_cache[rows[n], h // rep, :L].double()
            s = (k @ q[n, h].double()) / math.sqrt(D)
            y[n, h] = torch.softmax(s.masked_fill(~allowed, -math.inf), 0) @ v
    return y


@pytest.mark.parametrize("isa", isas())
def test_decode_attention_against_float64(isa):
    """One query per sequence over its own cache row, any position, GQA, masked keys, head sizes off
    the vector widths, 1 and 2 threads; a query at slot 0 sees one key: its output is that value.
    The query heads of a KV head run as one group (attend_part): groups of 1 to 5 heads and of 18
    (blocks of 4, 3, 2, 1 heads), head sizes over 128 (several passes of 64 outputs), and a long
    context cut in parts of 512 slots and merged (one of them wholly masked), the same bits on any
    number of threads."""
    cpu.set_isa(isa)
    g = torch.Generator().manual_seed(0)
    for H, G, D, S, positions in [(8, 8, 64, 50, None), (8, 2, 64, 50, None), (4, 1, 36, 50, None),
                                  (3, 3, 128, 50, None), (6, 2, 64, 50, None), (4, 2, 32, 50, None),
                                  (10, 2, 48, 50, None), (18, 1, 16, 50, None), (2, 1, 200, 50, None),
                                  (8, 2, 128, 700, [0, 699, 350, 517, 3])]:
        B = 4
        k_cache, v_cache = torch.randn(B, G, S, D, generator=g), torch.randn(B, G, S, D, generator=g)
        rows, pos = torch.tensor([2, 0, 3, 1, 2]), torch.tensor(positions or [0, 7, 49, 20, 33])
        q = torch.randn(5, H, D, generator=g) * 3
        key_mask = torch.rand(5, S, generator=g) > 0.3
        if S > 600:
            key_mask[1, :512] = False  # a whole part (attend_part's 512 slots) masked: it weighs nothing
        ys = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for mask in (None, key_mask):
                y = cpu.decode_attention(q, k_cache, v_cache, rows, pos, mask)
                ref = attention_reference(q, k_cache, v_cache, rows, pos, mask)
                assert (y.double() - ref).abs().max() < 1e-5, (isa, H, G, D, threads, mask is None)
                assert torch.equal(y[0], v_cache[2].repeat_interleave(H // G, 0)[:, 0])
                ys.append(y)
        assert torch.equal(ys[0], ys[2]) and torch.equal(ys[1], ys[3])  # the same bits on 1 and 2 threads


@pytest.mark.parametrize("isa", isas())
def test_decode_attention_reads_a_bf16_cache_as_the_float32_one(isa):
    """A bf16 cache (what a packed bf16 model keeps: its keys and values are bf16 already) gives
    the same bits as a float32 cache holding the same values: every head grouping, head sizes off
    the vector widths, masked keys, a context in several parts."""
    cpu.set_isa(isa)
    g = torch.Generator().manual_seed(1)
    for H, G, D, S in [(8, 2, 64, 700), (20, 5, 128, 1100), (6, 6, 40, 33), (4, 1, 36, 70), (18, 1, 16, 50)]:
        k32 = torch.randn(3, G, S, D, generator=g).bfloat16().float()
        v32 = torch.randn(3, G, S, D, generator=g).bfloat16().float()
        q = torch.randn(3, H, D, generator=g)
        rows, pos = torch.tensor([2, 0, 1]), torch.tensor([S - 1, S // 2, 5])
        for mask in (None, torch.rand(3, S, generator=g) > 0.3):
            want = cpu.decode_attention(q, k32, v32, rows, pos, mask)
            assert torch.equal(cpu.decode_attention(q, k32.bfloat16(), v32.bfloat16(), rows, pos, mask), want), (H, G, D, S)
            ref = attention_reference(q, k32, v32, rows, pos, mask)
            assert (want.double() - ref).abs().max() < 1e-5


def test_decode_attention_rejects_bad_input():
    k = torch.zeros(2, 4, 10, 16)
    q, rows = torch.zeros(1, 4, 16), torch.tensor([0])
    for args, words in [((q, k, k, rows, torch.tensor([10])), "position 10"),
                        ((q, k, k, torch.tensor([2]), torch.tensor([0])), "cache row 2"),
                        ((q, k.half(), k.half(), rows, torch.tensor([0])), "float32 or bfloat16"),
                        ((q, k, k.bfloat16(), rows, torch.tensor([0])), "must match the key cache"),
                        ((torch.zeros(1, 3, 16), k, k, rows, torch.tensor([0])), "3 query heads")]:
        with pytest.raises(RuntimeError, match=words):
            cpu.decode_attention(*args)


def decode_model(dtype, packing="2bit", **overrides):
    from bitnet import BitNetConfig
    from bitnet.bench import random_model

    config = BitNetConfig.from_preset("tiny", **overrides)
    return random_model(config, dtype, packing=packing if config.linear == "bitnet" else None)


def decode_logits(model, ids, start, monkeypatch, native_layers: bool, attention_mask=None, position_ids=None):
    """Logits of one forward of ids (B, T) at cache slots start.. (a decode step for T = 1), with the
    layers in native decode_layer calls or eager (native_layers=False: the native path turned off)."""
    import bitnet.model as bm

    if not native_layers:
        monkeypatch.setattr(bm.BitNetForCausalLM, "_native_decode", lambda self, x, *rest: x)
    with torch.no_grad():
        out = model(ids, input_pos=torch.arange(start, start + ids.shape[1]), attention_mask=attention_mask,
                    position_ids=position_ids).logits
    monkeypatch.undo()
    return out


LAYER_VARIANTS = [
    dict(dtype=torch.float32),
    dict(dtype=torch.bfloat16),
    dict(dtype=torch.bfloat16, packing="1.6bit"),
    dict(dtype=torch.float32, linear="bitnet1"),
    dict(dtype=torch.float32, model_type="llama", hidden_act="relu", num_key_value_heads=1, attention_bias=True,
         mlp_bias=True),
    dict(dtype=torch.float16, num_key_value_heads=2),
]


@pytest.mark.parametrize("variant", LAYER_VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_decode_layer_equals_the_eager_layers(variant, monkeypatch):
    """bitnet_cpu::decode_layer is the eager layer's own ops in one call, bar the attention kernel:
    at slot 0 (one key: attention returns the value, exactly, in both) the logits are equal bit for
    bit, at every instruction-set level; later, within the attention kernels' rounding. Formats, dtypes, sub-norms or none, relu2 /
    relu, GQA, biases; the native calls are counted (one per layer and step)."""
    variant = dict(variant)
    dtype, packing = variant.pop("dtype"), variant.pop("packing", "2bit")
    model = decode_model(dtype, packing, **variant)
    model.setup_cache(2, 32)
    calls = []
    real = cpu.decode_layer
    monkeypatch.setattr(cpu, "decode_layer", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)
    first = torch.randint(0, model.config.vocab_size, (2, 1), generator=g)
    fused = decode_logits(model, first, 0, monkeypatch, True)
    assert len(calls) == model.config.num_hidden_layers
    eager = decode_logits(model, first, 0, monkeypatch, False)
    assert torch.equal(fused, eager)
    for isa in cpu.ISAS[:cpu.ISAS.index(cpu.detected_isa()) + 1]:  # every SIMD level's elementwise steps
        cpu.set_isa(isa)
        assert torch.equal(decode_logits(model, first, 0, monkeypatch, True), decode_logits(model, first, 0, monkeypatch, False)), isa
    cpu.set_isa(cpu.detected_isa())
    prompt = torch.randint(0, model.config.vocab_size, (2, 11), generator=g)
    decode_logits(model, prompt, 1, monkeypatch, False)  # slots 1..11
    nxt = torch.randint(0, model.config.vocab_size, (2, 1), generator=g)
    fused = decode_logits(model, nxt, 12, monkeypatch, True).float()
    eager = decode_logits(model, nxt, 12, monkeypatch, False).float()
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    assert (fused - eager).abs().max() <= tol * eager.abs().max(), (fused - eager).abs().max()


def decode_layer_in_parts(x, norms, eps, packed, scales, biases, ns, fmt, act, k_cache, v_cache, rows, pos, cos, sin,
                          key_mask, n_head, n_kv):
    """decode_layer's steps as the separate native ops (each tested against its own reference
    above) and torch's own conversions and elementwise ops, for decode_layer's arguments."""
    N, D = x.shape[0], ns[0] // n_head
    dt = x.dtype
    q, k, v = cpu.linear_many(cpu.rms_norm(x, norms[0], eps[0]), packed[:3], scales[:3], ns[:3], fmt, biases[:3])
    q = cpu.rope(q.view(N, n_head, 1, D), cos.view(N, 1, 1, D), sin.view(N, 1, 1, D)).view(N, n_head, D)
    k = cpu.rope(k.view(N, n_kv, 1, D), cos.view(N, 1, 1, D), sin.view(N, 1, 1, D)).view(N, n_kv, D)
    k_cache[rows, :, pos], v_cache[rows, :, pos] = k.to(k_cache.dtype), v.view(N, n_kv, D).to(v_cache.dtype)
    y = cpu.decode_attention(q.float(), k_cache, v_cache, rows, pos, key_mask).to(dt).view(N, n_head * D)
    if norms[1] is not None:
        y = cpu.rms_norm(y, norms[1], eps[1])
    h = x + cpu.linear(y, packed[3], scales[3], ns[3], fmt, biases[3])
    g, u = cpu.linear_many(cpu.rms_norm(h, norms[2], eps[2]), packed[4:6], scales[4:6], ns[4:6], fmt, biases[4:6])
    a = torch.relu(g).square() * u if act == "relu2" else torch.relu(g) * u
    if norms[3] is not None:
        a = cpu.rms_norm(a, norms[3], eps[3])
    return h + cpu.linear(a, packed[6], scales[6], ns[6], fmt, biases[6])


@pytest.mark.parametrize("variant", LAYER_VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_decode_layer_equals_its_parts_at_a_real_attention_step(variant, cache_dtype):
    """Past slot 0 (the attention's output no longer a cached value, so its rounding back to the
    model's dtype is at stake), several sequences at different positions with masked keys:
    decode_layer's output and the cache it writes equal, bit for bit, the same step run as the
    separate native ops and torch's own conversions (decode_layer_in_parts), at every
    instruction-set level, on 1 and 2 threads, with a float32 or a bf16 cache (bf16: copied from a
    bf16 model's keys, rounded as torch's .to() rounds from the others')."""
    import bitnet.model as bm

    variant = dict(variant)
    dtype, packing = variant.pop("dtype"), variant.pop("packing", "2bit")
    model = decode_model(dtype, packing, **variant)
    model.setup_cache(4, 24, dtype=cache_dtype)
    g = torch.Generator().manual_seed(5)
    layer = model.model.layers[0]
    cache = layer.self_attn.kv_cache
    C, N = model.config.hidden_size, 3
    x = (torch.randn(N, C, generator=g) * 2).to(dtype)
    a = bm.native_decode_args(layer, x[:, None], model.config.hidden_act)
    assert a is not None
    rows, pos = torch.tensor([2, 0, 3]), torch.tensor([5, 17, 11])
    angle = torch.randn(N, cache.k.shape[-1], generator=g) * 3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    key_mask = torch.rand(N, 24, generator=g) > 0.25
    for isa in cpu.ISAS[:cpu.ISAS.index(cpu.detected_isa()) + 1]:  # (the restore fixture resets ISA and threads)
        cpu.set_isa(isa)
        for threads, mask in [(1, None), (2, key_mask)]:
            torch.set_num_threads(threads)
            base_k, base_v = torch.randn(cache.k.shape, generator=g), torch.randn(cache.v.shape, generator=g)
            cache.k.copy_(base_k), cache.v.copy_(base_v)
            out = cpu.decode_layer(x, *a[:10], rows, pos, cos, sin, mask, *a[10:])
            got_k, got_v = cache.k.clone(), cache.v.clone()
            cache.k.copy_(base_k), cache.v.copy_(base_v)
            ref = decode_layer_in_parts(x, *a[:10], rows, pos, cos, sin, mask, *a[10:])
            assert out.dtype == dtype and torch.equal(out, ref), (isa, threads, (out.double() - ref.double()).abs().max())
            assert torch.equal(got_k, cache.k) and torch.equal(got_v, cache.v), isa
            assert not torch.equal(got_k, base_k)  # the step wrote its keys


def test_generate_reads_the_layers_arguments_once_a_call(monkeypatch):
    """generate() reads each layer's native arguments (native_decode_args) at its first decode step
    and keeps them for the call (BitNetForCausalLM.keep_decode_args): once a layer a call, not once
    a layer a step, with the same tokens as a run that reads them at every step and as the eager
    modules (no native layer); nothing is kept
    after the call, so a projection swapped between calls is the one the next call's native layer
    is handed."""
    import contextlib

    import bitnet.model as bm
    from bitnet.generation import generate

    model = decode_model(torch.float32)
    L = model.config.num_hidden_layers
    reads, handed = [], []
    real_args, real_layer = bm.native_decode_args, cpu.decode_layer
    monkeypatch.setattr(bm, "native_decode_args", lambda *a: reads.append(1) or real_args(*a))
    monkeypatch.setattr(cpu, "decode_layer", lambda *a: handed.append(a[3]) or real_layer(*a))  # a[3]: the 7 packed
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    kept = generate(model, prompt, 7)  # the prefill's token, then 6 decode steps
    assert len(handed) == 6 * L and len(reads) == L
    assert model.__dict__.get("_kept_decode_args") is None
    with monkeypatch.context() as m:  # read at every step, as outside generate
        m.setattr(bm.BitNetForCausalLM, "keep_decode_args", lambda self: contextlib.nullcontext())
        reads.clear()
        every = generate(model, prompt, 7)
    assert len(reads) == 6 * L and torch.equal(kept, every)
    with monkeypatch.context() as m:  # the reference: the eager modules (no native layer)
        m.setattr(bm.BitNetForCausalLM, "_native_decode", lambda self, x, *rest: x)
        handed.clear()
        eager = generate(model, prompt, 7)
    assert not handed and torch.equal(kept, eager)
    mlp0 = model.model.layers[0].mlp
    old = mlp0.down_proj.weight
    mlp0.down_proj = model.model.layers[1].mlp.down_proj  # another layer's packed matrix, same shape
    handed.clear()
    generate(model, prompt, 3)
    assert handed[0][6] is model.model.layers[1].mlp.down_proj.weight and handed[0][6] is not old
    assert all(h[6] is handed[0][6] for h in handed[::L])  # every step of that call: layer 0's new down_proj


def test_decode_layer_with_left_padding(monkeypatch):
    """A left-padded batch: the padded slots are masked in the native attention as in the eager
    mask; a decode step's logits agree with the eager layers'."""
    model = decode_model(torch.float32)
    model.setup_cache(2, 16)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    decode_logits(model, ids, 0, monkeypatch, False, attention_mask=mask, position_ids=positions)
    nxt = torch.randint(0, model.config.vocab_size, (2, 1), generator=g)
    mask7 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    pos7 = positions[:, -1:] + 1
    fused = decode_logits(model, nxt, 6, monkeypatch, True, attention_mask=mask7, position_ids=pos7)
    eager = decode_logits(model, nxt, 6, monkeypatch, False, attention_mask=mask7, position_ids=pos7)
    assert (fused - eager).abs().max() <= 1e-4 * eager.abs().max()
    # the padding matters: garbage in the padded slots changes nothing
    for layer in model.model.layers:
        layer.self_attn.kv_cache.k[0, :, :3] = 1e3
    again = decode_logits(model, nxt, 6, monkeypatch, True, attention_mask=mask7, position_ids=pos7)
    assert torch.equal(again[0], fused[0])


def test_decode_layer_only_where_it_is_exact(monkeypatch):
    """The native layer runs only where it computes what the module does: not for a silu MLP, a
    layer with a forward hook or a global module hook (which must still fire), or
    BITNET_KERNEL=torch; those decode eagerly."""
    calls = []
    real = cpu.decode_layer
    monkeypatch.setattr(cpu, "decode_layer", lambda *a: calls.append(1) or real(*a))
    ids = torch.tensor([[3]])
    model = decode_model(torch.float32, hidden_act="silu")
    model.setup_cache(1, 8)
    with torch.no_grad():
        model(ids, input_pos=torch.tensor([0]))
    assert not calls
    model = decode_model(torch.float32)
    model.setup_cache(1, 8)
    fired = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        model(ids, input_pos=torch.tensor([0]))
    assert not calls and fired
    handle.remove()
    fired.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: fired.append(1))  # a global hook
    with torch.no_grad():
        model(ids, input_pos=torch.tensor([0]))
    handle.remove()
    assert not calls and fired
    monkeypatch.setenv("BITNET_KERNEL", "torch")
    with torch.no_grad():
        model(ids, input_pos=torch.tensor([0]))
    assert not calls
    monkeypatch.delenv("BITNET_KERNEL")
    with torch.no_grad():
        model(ids, input_pos=torch.tensor([0]))
    assert len(calls) == model.config.num_hidden_layers

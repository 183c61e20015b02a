"""Every autotune config of every Triton kernel, each pinned in turn, against the exact references.

Autotuning times every config that fits a shape and checks the output of none: a config with a
masking or tiling bug stays hidden until some GPU, at some shape, finds it fastest. Here each
config runs alone (`kernel.configs = [config]`, which skips tuning and pruning) at shapes that
give it more than one tile, a ragged last one and several K steps, and its output is compared with
the exact integer (float64) reference or the torch path bit for bit. Under the interpreter (CPU
CI) this proves each config's semantics; on a GPU the compiled code's (the compile guard,
bitnet.kernels.compile_check, proves that each one compiles). The rest of the suite runs on a GPU
with BITNET_AUTOTUNE=first (conftest.py): one config a shape, no timing; the last test here runs
full autotuning once, to show that timing every config (the GEMM's split-K workspace rerun many
times) leaves the result exact.
"""

from __future__ import annotations

import json

import pytest
import torch
import triton
import triton.language as tl

from bitnet.kernels import activations, gemm as gemm_module, gemv as gemv_module, int4_head, int8_head, rmsnorm_quant
from bitnet.kernels.activations import act_quant, reference_act_quant
from bitnet.kernels.common import AUTOTUNE_ENV, INTERPRET, autotune_policy
from bitnet.kernels.gemm import gemm, gemm_cat
from bitnet.kernels.gemv import gemv, gemv_cat
from bitnet.kernels.int4_head import int4_linear, reference_int4_linear
from bitnet.kernels.int8_head import int8_linear, reference_int8_linear
from bitnet.kernels.rmsnorm_quant import reference_rmsnorm_act_quant, rmsnorm_act_quant
from bitnet.ops import torch_bitlinear
from bitnet.packing import pack
from bitnet.quant import quantize_activation
from reference import pinned
from test_kernels import exact, random_activations, random_weights


def config_id(config) -> str:
    return str(config).replace(" ", "")


def to_run(configs) -> list:
    """The configs a test runs: every one where the kernels compile; under the interpreter, which
    runs a program the same at any num_warps and num_stages, one of each set of block sizes."""
    if not INTERPRET:
        return configs
    kept = {}
    for c in configs:
        kept.setdefault(tuple(sorted(c.kwargs.items())), c)
    return list(kept.values())


# ----------------------------------------------------------------------------- GEMV (M = 1 path)
def other_format(config, configs) -> str:
    """1.6bit or 1bit, alternating over a kernel's configs: each config meets 2-bit and one other
    format, each format about half the configs (the compile guard's covering idea, at half the
    interpreter time of every format for every config)."""
    return ("1.6bit", "1bit")[configs.index(config) % 2]


def gemv_shapes(config):
    """(n, k) for 2-bit and the config's other format, each path: rows for several tiles of BLOCK_R
    (2-bit; the other one ragged tile), and three K steps of BLOCK_U, the last ragged: int32 words
    (K % 4 == 0) and the byte path (odd K)."""
    bu = config.kwargs["BLOCK_U"]
    for fmt, n in (("2bit", rows_2bit(config)), (other_format(config, gemv_module.CONFIGS), 27)):
        yield fmt, n, 4 * (2 * bu + 25)
        yield fmt, n, 2 * bu + 37


def rows_2bit(config) -> int:
    """N of a 2-bit matrix with 2 * BLOCK_R + 3 packed rows: three row tiles, the last ragged."""
    return 4 * (2 * config.kwargs["BLOCK_R"] + 3) - 1


@pytest.mark.parametrize("config", to_run(gemv_module.CONFIGS), ids=config_id)
def test_every_gemv_config_is_exact(config, triton_device):
    with pinned(gemv_module._gemv_kernel, config):
        for fmt, n, k in gemv_shapes(config):
            w_q = random_weights(n, k, fmt, seed=k)
            x_q, a = quantize_activation(random_activations(1, k, seed=k + 1))
            packed = pack(w_q, fmt)
            y = gemv(x_q.to(triton_device), packed.to(triton_device), n, fmt, out_dtype=torch.int32)
            assert torch.equal(y.cpu(), exact(x_q, w_q)), (fmt, n, k)
        # two rows of float input quantized in the kernel, a bias and the residual in the epilogue
        # (fp32: equal to the torch path bit for bit, under the interpreter too)
        n, k = rows_2bit(config), 4 * (2 * config.kwargs["BLOCK_U"] + 25)
        w_q = random_weights(n, k, "2bit", seed=5)
        packed, scale, bias = pack(w_q, "2bit"), torch.tensor([0.031]), torch.randn(n)
        x, res = random_activations(2, k, seed=6), torch.randn(2, n)
        d = triton_device
        y = gemv(x.to(d), packed.to(d), n, "2bit", scale.to(d), bias.to(d), residual=res.to(d)).cpu()
        assert torch.equal(y, res + torch_bitlinear(x, packed, scale, n, "2bit", bias))


@pytest.mark.parametrize("config", to_run(gemv_module.CONFIGS), ids=config_id)
def test_every_gemv_config_runs_three_matrices_in_one_launch(config, triton_device):
    """q / k / v in one launch: matrix boundaries fall inside tiles of every BLOCK_R."""
    ns, k = [75, 21, 21], 1028
    w_qs = [random_weights(n, k, "2bit", seed=j) for j, n in enumerate(ns)]
    x_q, _ = quantize_activation(random_activations(1, k, seed=9))
    packed = [pack(w, "2bit").to(triton_device) for w in w_qs]
    with pinned(gemv_module._gemv_kernel, config):
        y = gemv_cat(x_q.to(triton_device), packed, ns, "2bit", [None] * 3, out_dtype=torch.int32).cpu()
    assert torch.equal(y, torch.cat([exact(x_q, w) for w in w_qs], 1))


# ----------------------------------------------------------------------------- GEMM (M > 1)
GEMM_CONFIGS = gemm_module.SMALL_M_CONFIGS + gemm_module.LARGE_M_CONFIGS
N_GEMM = 200  # 50 / 40 / 25 packed rows: 1-2 column tiles of BLOCK_N 128-256, ragged
K_GEMM = 612  # 153 words: three steps of BLOCK_K 64, two of 128, one and a half of 256


@pytest.mark.parametrize("config", to_run(GEMM_CONFIGS), ids=config_id)
def test_every_gemm_config_is_exact(config, triton_device):
    """2-bit and the config's other format at M = 33 (split-K at the interpreter's 4 SMs) on the word
    path, 2-bit at M = 70 on the byte path (K - 1); an fp32 output with a bias equal to the torch
    path at M = 70."""
    other = other_format(config, GEMM_CONFIGS)
    with pinned(gemm_module._gemm_kernel, config):
        for fmt, m, k, calls in [("2bit", 33, K_GEMM, 2), (other, 33, K_GEMM, 2), ("2bit", 70, K_GEMM - 1, 1)]:
            w_q = random_weights(N_GEMM, k, fmt, seed=m)
            x_q, _ = quantize_activation(random_activations(m, k, seed=m + 1))
            packed = pack(w_q, fmt).to(triton_device)
            for _ in range(calls):  # a second split-K call reuses the workspace the first left
                y = gemm(x_q.to(triton_device), packed, N_GEMM, fmt, out_dtype=torch.int32)
                assert torch.equal(y.cpu(), exact(x_q, w_q)), (fmt, m, k)
        w_q = random_weights(N_GEMM, K_GEMM, "2bit", seed=7)
        packed, scale, bias = pack(w_q, "2bit"), torch.tensor([0.021]), torch.randn(N_GEMM)
        x = random_activations(70, K_GEMM, seed=8)
        x_q, a = quantize_activation(x)
        d = triton_device
        y = gemm(x_q.to(d), packed.to(d), N_GEMM, "2bit", scale.to(d), bias.to(d), a.reshape(-1).to(d)).cpu()
        assert torch.equal(y, torch_bitlinear(x, packed, scale, N_GEMM, "2bit", bias))


@pytest.mark.parametrize("config", to_run(GEMM_CONFIGS), ids=config_id)
def test_every_gemm_config_runs_three_matrices_in_one_launch(config, triton_device):
    ns, k, m = [300, 76, 76], 516, 20
    w_qs = [random_weights(n, k, "1.6bit", seed=j) for j, n in enumerate(ns)]
    x_q, _ = quantize_activation(random_activations(m, k, seed=10))
    packed = [pack(w, "1.6bit").to(triton_device) for w in w_qs]
    with pinned(gemm_module._gemm_kernel, config):
        y = gemm_cat(x_q.to(triton_device), packed, ns, "1.6bit", [None] * 3, out_dtype=torch.int32).cpu()
    assert torch.equal(y, torch.cat([exact(x_q, w) for w in w_qs], 1))


@pytest.mark.parametrize("config", to_run(gemm_module.INT8_CONFIGS), ids=config_id)
def test_every_unpacked_gemm_config_is_exact(config, monkeypatch, triton_device):
    """The large-M path (weights unpacked to int8, then _gemm_int8_kernel), forced at M = 300."""
    monkeypatch.setattr(gemm_module, "UNPACK_M", 1)
    m = 300  # 2-3 row tiles of BLOCK_M 128-256
    w_q = random_weights(N_GEMM, K_GEMM, "2bit", seed=11)
    x = random_activations(m, K_GEMM, seed=12)
    x_q, a = quantize_activation(x)
    packed, scale, bias = pack(w_q, "2bit"), torch.tensor([0.017]), torch.randn(N_GEMM)
    d = triton_device
    with pinned(gemm_module._gemm_int8_kernel, config):
        y = gemm(x_q.to(d), packed.to(d), N_GEMM, "2bit", out_dtype=torch.int32).cpu()
        assert torch.equal(y, exact(x_q, w_q))
        y = gemm(x_q.to(d), packed.to(d), N_GEMM, "2bit", scale.to(d), bias.to(d), a.reshape(-1).to(d)).cpu()
        assert torch.equal(y, torch_bitlinear(x, packed, scale, N_GEMM, "2bit", bias))
        # q / k / v-like matrices in one launch: tiles straddle them
        ns = [200, 76, 76]
        w_qs = [random_weights(n, K_GEMM, "1.6bit", seed=j) for j, n in enumerate(ns)]
        cat = [pack(w, "1.6bit").to(d) for w in w_qs]
        y = gemm_cat(x_q.to(d), cat, ns, "1.6bit", [None] * 3, out_dtype=torch.int32).cpu()
        assert torch.equal(y, torch.cat([exact(x_q, w) for w in w_qs], 1))
        # K a whole number of tiles (every BLOCK_K divides 512): the loop alone, no partial tile after it
        x_q = x_q[:, :512].contiguous()
        w_q = random_weights(N_GEMM, 512, "2bit", seed=13)
        y = gemm(x_q.to(d), pack(w_q, "2bit").to(d), N_GEMM, "2bit", out_dtype=torch.int32).cpu()
        assert torch.equal(y, exact(x_q, w_q))


@pytest.mark.parametrize("config", gemm_module.norm_configs(), ids=config_id)
@pytest.mark.parametrize("fmt, dtype, gated, k, m", [("2bit", torch.bfloat16, True, 612, 9),
                                                     ("1.6bit", torch.float32, False, 517, 17)])
def test_the_norm_tile_quantizes_as_the_norm_kernel(fmt, dtype, gated, k, m, config, triton_device):
    """The norm-fused GEMM's tiles (gemm.NORM_TILE and NORM_WIDE: what a GPU runs at a batched
    decode step), each pinned: two and a half K steps of 256 on the word path (bf16, gated) and the
    byte path (odd K, fp32, two row tiles), q / k / v-like matrices in one launch and one with the
    residual, each equal bit for bit to rmsnorm_act_quant then the GEMM from its x_q and a (both held
    to torch and to the exact integers elsewhere)."""
    d = triton_device
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=g) * 3).to(d, dtype)
    up = torch.randn(m, k, generator=g).to(d, dtype) if gated else None
    weight = (torch.rand(k, generator=g) + 0.5).to(d, dtype)
    r_q, r_a = rmsnorm_act_quant(x, weight, 1e-5, up)[:2]
    for ns, residual in (([200, 76, 76], False), ([40], True)):
        w_qs = [random_weights(n, k, fmt, seed=n) for n in ns]
        packed = [pack(w, fmt).to(d) for w in w_qs]
        scales = [torch.tensor([0.02 + 0.001 * j], device=d) for j in range(len(ns))]
        res = torch.randn(m, ns[0], generator=g).to(d, dtype) if residual else None
        with pinned(gemm_module._gemm_kernel, config):
            y = gemm_cat(x, packed, ns, fmt, scales, out_dtype=dtype, residual=res, norm_weight=weight, eps=1e-5, up=up)
            ref = gemm_cat(r_q, packed, ns, fmt, scales, a=r_a.reshape(-1), out_dtype=dtype, residual=res)
        assert torch.equal(y, ref), (ns, (y - ref).abs().max())


# ----------------------------------------------------------------------------- quantization, head
K_ROW = 5000  # one ragged step of BLOCK_K 4096, five of 1024


@pytest.mark.parametrize("config", to_run(activations.CONFIGS), ids=config_id)
def test_every_act_quant_config_is_bit_identical_to_torch(config, triton_device):
    with pinned(activations._act_quant_kernel, config):
        for dtype in (torch.float32, torch.bfloat16):
            x = random_activations(3, K_ROW, seed=13, dtype=dtype)
            got = [t.cpu() for t in act_quant(x.to(triton_device))]
            for g, r in zip(got, reference_act_quant(x)):
                assert torch.equal(g, r), dtype


@pytest.mark.parametrize("config", to_run(activations.CONFIGS), ids=config_id)
def test_every_rmsnorm_act_quant_config_matches_torch(config, triton_device):
    """As tests/test_kernels.py holds the fused norm (its sum of squares in its own order: a within
    an ulp, x_q at most one step off on under 1% of elements), plain and gated."""
    x, up = random_activations(4, K_ROW, seed=14)[1:], random_activations(4, K_ROW, seed=15)[1:]
    weight = torch.rand(K_ROW) + 0.5
    d = triton_device
    with pinned(rmsnorm_quant._rmsnorm_act_quant_kernel, config):
        for gate_up in (None, up):
            x_q, a, xsum = (t.cpu() for t in rmsnorm_act_quant(x.to(d), weight.to(d), 1e-5,
                                                              None if gate_up is None else gate_up.to(d)))
            r_q, r_a = reference_rmsnorm_act_quant(x, weight, 1e-5, up=gate_up)
            torch.testing.assert_close(a, r_a, rtol=1e-6, atol=0)
            diff = (x_q.int() - r_q.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
            assert torch.equal(xsum, x_q.int().sum(-1))


@pytest.mark.parametrize("config", to_run(activations.CONFIGS), ids=config_id)
def test_every_norm_and_unpack_config_is_the_two_kernels(config, triton_device):
    """The prefill's norm-and-unpack launch (rmsnorm_quant.rmsnorm_act_quant_unpack) pinned to each
    config: its weights equal bitnet.packing.unpack's (words, K = 5000; bytes, K = 4999), its x_q, a
    and xsum those of rmsnorm_act_quant pinned alike (held to torch above), plain and gated."""
    d = triton_device
    for k in (K_ROW, K_ROW - 1):
        x, up = random_activations(3, k, seed=16), random_activations(3, k, seed=17)
        weight = torch.rand(k) + 0.5
        ns = [40, 24]
        w_qs = [random_weights(n, k, "1.6bit", seed=18 + n) for n in ns]
        packed = [pack(w, "1.6bit").to(d) for w in w_qs]
        for gate_up in (None, up.to(d)):
            with pinned(rmsnorm_quant._rmsnorm_quant_unpack_kernel, config):
                x_q, a, xsum, w = rmsnorm_quant.rmsnorm_act_quant_unpack(x.to(d), weight.to(d), 1e-5, packed, ns,
                                                                         "1.6bit", gate_up)
            with pinned(rmsnorm_quant._rmsnorm_act_quant_kernel, config):
                r = rmsnorm_act_quant(x.to(d), weight.to(d), 1e-5, gate_up)
            assert torch.equal(w.cpu(), torch.cat(w_qs))
            assert all(torch.equal(g, e) for g, e in zip((x_q, a, xsum), r))


@pytest.mark.parametrize("config", to_run(int8_head.CONFIGS), ids=config_id)
def test_every_int8_head_config_matches_float64(config, triton_device):
    n, k = 300, 1100  # ragged along both N and K for every (BLOCK_N, BLOCK_K)
    g = torch.Generator().manual_seed(16)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s, b = torch.rand(n, generator=g) * 1e-2 + 1e-3, torch.randn(n, generator=g)
    x = torch.randn(3, k, generator=g)
    with pinned(int8_head._int8_linear_kernel, config):
        y = int8_linear(x.to(triton_device), w.to(triton_device), s.to(triton_device), b.to(triton_device)).cpu()
    ref = reference_int8_linear(x, w, s, b)
    scale = (x.double().abs() @ w.double().abs().t()) * s.double()
    assert ((y.double() - ref).abs() <= 1e-6 * scale + 1e-6 + torch.finfo(torch.float32).eps * ref.abs()).all()


@pytest.mark.parametrize("config", to_run(int4_head.CONFIGS), ids=config_id)
def test_every_int4_head_config_matches_float64(config, triton_device):
    """Ragged along N and along the 64-weight blocks (K = 1100: 18 blocks, the last one padded)."""
    from test_int4_head import head, tolerance

    h = head(triton_device, n=300, k=1100, bias=True, seed=19)
    x = torch.randn(3, 1100, generator=torch.Generator().manual_seed(20)) * 2
    with pinned(int4_head._int4_linear_kernel, config):
        y = int4_linear(x.to(triton_device), h.codes, h.scales, h.out_features, h.bias).cpu()
    ref = reference_int4_linear(x, h.codes.cpu(), h.scales.cpu(), h.out_features, h.bias.cpu())
    assert ((y.double() - ref).abs() <= tolerance(x, h, ref, torch.float32)).all()


# ----------------------------------------------------------------------------- the policy itself
def test_autotune_policy_is_read_and_checked(monkeypatch):
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    assert autotune_policy() == "full"
    monkeypatch.setenv(AUTOTUNE_ENV, " First ")
    assert autotune_policy() == "first"
    monkeypatch.setenv(AUTOTUNE_ENV, "retune")
    assert autotune_policy() == "retune"
    monkeypatch.setenv(AUTOTUNE_ENV, "compile")
    assert autotune_policy() == "compile"
    monkeypatch.setenv(AUTOTUNE_ENV, "fast")
    with pytest.raises(ValueError, match="BITNET_AUTOTUNE='fast': expected one of full, retune, first, compile"):
        autotune_policy()


@triton.jit
def _noop_kernel(x_ptr, K, B: tl.constexpr):
    pass


def test_the_gpu_autotuner_follows_the_policy(monkeypatch):
    """The autotuner a GPU gets (built here with the interpreter flag off; nothing runs): `full`
    keeps every config the kernel's pruning keeps and times each; `first` keeps the first of them
    and calls it once, untimed."""
    from bitnet.kernels import common

    monkeypatch.setattr(common, "INTERPRET", False)
    configs = [triton.Config({"B": b}) for b in (8, 16, 32, 64)]
    tuner = common.autotune(configs, key=["K"], interpret_config=configs[0],
                            prune=lambda cs, nargs, **kw: [c for c in cs if c.kwargs["B"] <= nargs["K"]])(_noop_kernel)
    tuner.nargs = {"x_ptr": None, "K": 20}
    calls = []
    monkeypatch.setenv(AUTOTUNE_ENV, "full")
    assert [c.kwargs["B"] for c in tuner.prune_configs({})] == [8, 16]
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, quantiles: calls.append((warmup, rep)) or [1.0] * 3)
    assert tuner.do_bench(lambda: calls.append("call"), quantiles=(0.5, 0.2, 0.8)) == [1.0] * 3
    assert calls == [(common.TUNE_WARMUP_MS, common.TUNE_REP_MS)]
    monkeypatch.setenv(AUTOTUNE_ENV, "first")
    assert [c.kwargs["B"] for c in tuner.prune_configs({})] == [8]
    calls.clear()
    assert tuner.do_bench(lambda: calls.append("call"), quantiles=(0.5, 0.2, 0.8)) == [0.0] * 3
    assert calls == ["call"]


@pytest.mark.cuda
def test_cuda_full_autotuning_leaves_results_exact(monkeypatch, tmp_path):
    """Full tuning on fresh keys (shapes no other test uses): every config timed, the GEMM's split-K
    among them, each rerun hundreds of times on one workspace; then the chosen one's output; and
    each choice kept in this GPU model's table (kernels/tuning.py). One format (the tuning does
    not depend on it; every config of every format is pinned and checked above), its configs
    compiled by 4 processes (inside one test worker of a suite that keeps every core busy)."""
    from bitnet.kernels import tuning

    monkeypatch.setenv(AUTOTUNE_ENV, "retune")
    monkeypatch.setenv(tuning.TUNING_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("BITNET_PRECOMPILE", "4")
    n, k = 2560 + 48, 2560 + 64
    fmt = "2bit"
    tuned = len(gemm_module._gemm_kernel.cache), len(gemv_module._gemv_kernel.cache)  # keys tuned so far
    w_q = random_weights(n, k, fmt, seed=17)
    packed = pack(w_q, fmt).cuda()
    for m in (1, 9, 40):
        x_q, _ = quantize_activation(random_activations(m, k, seed=18, dtype=torch.bfloat16))
        y = gemm(x_q.cuda(), packed, n, fmt, out_dtype=torch.int32) if m > 1 else \
            gemv(x_q.cuda(), packed, n, fmt, out_dtype=torch.int32)
        assert torch.equal(y.cpu(), exact(x_q, w_q)), (fmt, m)
    # new keys: the GEMM at M = 9 and 40 (small-M and large-M configs), the GEMV
    assert (len(gemm_module._gemm_kernel.cache) - tuned[0], len(gemv_module._gemv_kernel.cache) - tuned[1]) == (2, 1)
    table = json.loads((tmp_path / tuning.table_name(torch.cuda.get_device_name())).read_text())
    kept = {key.split()[0] for key in table["entries"]}
    assert {"_gemm_kernel", "_gemv_kernel"} <= kept, sorted(table["entries"])

"""Every Triton launch of a real run, compiled for one architecture through Triton's own launch
path, without a GPU (bitnet.kernels.precompile.launches_compiled): a tiny model with and without
biases through generate (one sequence; two, padded), the server's runner (prefill, a batched
decode, a mixed step, a pure decode step padded to a bucket) and its int8 / int4 heads, and the launcher paths that model does not take
(a layer from float x, int32 outputs, the unpacked GEMM of a long prefill, the norm kernel before
a GEMM of more rows than a batched decode's) in every format.

    python tests/launch_check.py 90      (without TRITON_INTERPRET; exit status 1 on any failure)

The compile guard's variants give pointer arguments pointer types; a launch with None (no bias, no
residual) specializes them as constexprs, and code that the variants compile can fail there: a
None in a tuple a helper returns did not compile for every bias-free multi-matrix GEMM, which the
guard and the interpreter both passed. tests/test_compile_guard.py runs this.
"""

import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "import the kernels as real JITFunctions: unset TRITON_INTERPRET"
import torch

from bitnet.kernels import custom_ops, gemm, precompile

os.environ["TRITON_INTERPRET"] = "1"  # from here on only so that bitnet.ops takes the Triton path for CPU tensors
os.environ["BITNET_KERNEL"] = "triton"
os.environ["BITNET_CPU_DISABLE"] = "1"
import bitnet.generation as generation  # noqa: E402
import bitnet.model as bm  # noqa: E402
import bitnet.serve.runner as runner  # noqa: E402
from bitnet import BitNetConfig, BitNetForCausalLM, freeze  # noqa: E402
from bitnet.generation import generate, left_pad  # noqa: E402
from bitnet.packing import pack  # noqa: E402

# Where the package branches on the device type, a GPU's choices: the cache in the model's dtype and
# read whole (static shapes); no CUDA graphs (nothing runs here).
bm.attention_dtype = runner.attention_dtype = generation.attention_dtype = lambda x, device=None: x.dtype
bm.BitNetForCausalLM._set_cache_window = lambda self, pos: setattr(self.model.layers[0].self_attn.kv_cache.window,
                                                                    "live", None)
failed = []


def attempt(name, f):
    try:
        f()
    except Exception as e:  # noqa: BLE001
        failed.append(name)
        print(f"FAIL {name}: {type(e).__name__}")


def weights(n, k, fmt):
    values = torch.randint(0, 2, (n, k), dtype=torch.int8) * 2 - 1 if fmt == "1bit" else torch.randint(-1, 2, (n, k),
                                                                                                      dtype=torch.int8)
    return pack(values, fmt)


def tiny(config, head_bits=None):
    torch.manual_seed(0)
    model = freeze(BitNetForCausalLM(config).to(torch.bfloat16).eval())
    return model.quantize_lm_head(head_bits) if head_bits else model


def main(arch: int) -> int:
    start = time.time()
    with precompile.launches_compiled(arch) as log:
        for bias in (False, True):  # the 2B-4T layout has none; Llama-style conversions may
            config = BitNetConfig.from_preset("tiny", attention_bias=bias, mlp_bias=bias)
            model = tiny(config)
            ids, mask = left_pad([[5, 6, 7, 8, 9], [3, 4]])
            attempt(f"generate, bias={bias}", lambda: generate(model, ids[:1], 3, cuda_graph=False))
            attempt(f"generate two padded, bias={bias}", lambda: generate(model, ids, 3, attention_mask=mask,
                                                                          cuda_graph=False))
            r = runner.ModelRunner(model, max_batch=4, max_seq_len=64, decode_graphs=False)
            attempt(f"serve prefill, bias={bias}", lambda: r.prefill(0, [1, 2, 3, 4], 0))
            attempt(f"serve decode of three, bias={bias}", lambda: r.decode([0, 1, 2], [5, 6, 7], [4, 4, 4]))
            attempt(f"serve mixed step, bias={bias}", lambda: r.step([runner.Segment(0, [1], 5),
                                                                     runner.Segment(1, [2, 3, 4], 0)]))
            r.close()
            # a pure decode step from tensors (a GPU's, padded to a bucket): RoPE, cache writes, attention in one launch
            r = runner.ModelRunner(model, max_batch=4, max_seq_len=64, decode_graphs=True)
            attempt(f"serve padded decode of three, bias={bias}", lambda: r.decode([0, 1, 2], [5, 6, 7], [4, 4, 4]))
            r.close()
            for bits in (8, 4):
                head = tiny(config, bits)
                attempt(f"generate, int{bits} head, bias={bias}", lambda: generate(head, ids[:1], 2, cuda_graph=False))
        s = torch.tensor([0.02])
        for fmt in ("2bit", "1.6bit", "1bit"):
            x = torch.randn(1, 256, dtype=torch.bfloat16)
            attempt(f"bitlinear M=1 {fmt}", lambda: custom_ops.bitlinear(x, weights(40, 256, fmt), s, 40, fmt))
            attempt(f"bitlinear M=1 with bias {fmt}", lambda: custom_ops.bitlinear(
                x, weights(40, 256, fmt), s, 40, fmt, torch.randn(40, dtype=torch.bfloat16)))
            for m in (1, 3):
                x_q = torch.randint(-128, 128, (m, 256), dtype=torch.int8)
                attempt(f"int32 M={m} {fmt}", lambda: custom_ops.packed_matmul_int32(x_q, weights(40, 256, fmt), 40, fmt))
            m = gemm.UNPACK_M or 512
            x_q, a = torch.randint(-128, 128, (m, 256), dtype=torch.int8), torch.rand(m) + 1
            for b in (None, [torch.randn(64, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16)]):
                attempt(f"unpacked GEMM of two matrices, bias={b is not None} {fmt}", lambda: gemm.gemm_cat(
                    x_q, [weights(64, 256, fmt), weights(32, 256, fmt)], [64, 32], fmt, [s, s], b, a, None,
                    torch.bfloat16))
            # a prefill's groups: the norm and the unpack in one launch, then the int8 GEMM (gate / up; down_proj
            # with the relu2 gate folded in and the skip connection added)
            xf, up = (torch.randn(m, 256, dtype=torch.bfloat16) for _ in range(2))
            nw = torch.rand(256, dtype=torch.bfloat16) + 0.5
            attempt(f"prefill norm and unpack of two, then the GEMM {fmt}", lambda: custom_ops.rmsnorm_packed_matmul_cat(
                xf, nw, 1e-5, [weights(64, 256, fmt), weights(32, 256, fmt)], [s, s], [64, 32], fmt))
            attempt(f"prefill gated norm and unpack, the GEMM with the residual {fmt}",
                    lambda: custom_ops.rmsnorm_packed_matmul_cat(xf, nw, 1e-5, [weights(40, 256, fmt)], [s], [40], fmt,
                                                                 up=up, residual=torch.randn(m, 40, dtype=torch.bfloat16)))
            attempt(f"bitlinear M={m}: the quantization and the unpack in one launch, then the GEMM {fmt}",
                    lambda: custom_ops.bitlinear(xf, weights(40, 256, fmt), s, 40, fmt,
                                                 torch.randn(40, dtype=torch.bfloat16)))
            # between the batched GEMM's norm (M <= GEMM_NORM_M) and a prefill's (M >= UNPACK_M): the norm
            # kernel, then the GEMM from int8
            m = gemm.GEMM_NORM_M + 1
            xf, up = (torch.randn(m, 256, dtype=torch.bfloat16) for _ in range(2))
            attempt(f"gated norm, then the GEMM with the residual, M={m} {fmt}",
                    lambda: custom_ops.rmsnorm_packed_matmul_cat(xf, nw, 1e-5, [weights(40, 256, fmt)], [s], [40], fmt,
                                                                 up=up, residual=torch.randn(m, 40, dtype=torch.bfloat16)))
    print(f"compiled {sum(log.compiled.values())} launches of {len(log.compiled)} kernels for sm_{arch} in "
          f"{time.time() - start:.0f} s: {dict(sorted(log.compiled.items()))}")
    for kernel, flags, message in log.failures:
        print(f"\ncompile failure: {kernel} {flags}\n{message}")
    return 1 if failed or log.failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))

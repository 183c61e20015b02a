"""Kernels for packed ternary (and binary) weights, installed as bitnet.kernels: native C++ for
CPUs (cpu.py over csrc/) and Triton for NVIDIA GPUs.

    cpu.py            the native CPU backend: builds csrc/ with torch.utils.cpp_extension on first
                      use, the bitnet_cpu ops (linear, matmul_int32, quantize, int8_linear), the
                      instruction-set cap (BITNET_CPU_ISA)
    csrc/             bitnet_kernels.h (torch-free kernels: scalar, AVX2, AVX-512 VNNI, NEON),
                      bitnet_cpu.cpp (torch bindings, threads, the int8-GEMM path for large M)

Triton, one kernel strategy per file, each with its torch reference:
    layout.py         the packed layout the kernels read (the checkpoint layout, in place) and
                      its decoding; a Triton unpack
    activations.py    act_quant: per-token absmax int8 activations, bit-identical to bitnet.quant
    rmsnorm_quant.py  RMSNorm fused with act_quant (at M = 1 the GEMV runs it itself; at a
                      prefill one launch also unpacks the weights for the int8 GEMM)
    rope.py           RoPE of q and k with the KV-cache write, one launch
    attention.py      decode attention: one query per sequence over its cache row (flash-decoding)
    int8_head.py      weight-only int8 GEMV (an int8 lm_head), few rows
    gemv.py           M = 1: dp4a GEMV with the activation quantization fused in
    gemm.py           M > 1: int8 tensor-core GEMM, split-K for small M
    custom_ops.py     the torch.library ops ("bitnet::...") and the dispatch by M
All three packed formats ("2bit", "1.6bit", "1bit") run through the same kernels; the format is
a constexpr of the decode. Without a GPU they run under TRITON_INTERPRET=1 (set it before the
first of them is imported).

Layering: the backends here import the math below them (bitnet.quant, bitnet.packing) and each
other, never bitnet.ops, bitnet.bitlinear, the model or checkpoint code (tests/test_layering.py).
The names below load their Triton modules on first access, so that importing another backend of
this package (a sibling module) does not import triton.
"""

__all__ = ["act_quant", "bitlinear", "decode_attention", "int4_linear", "int8_linear", "packed_matmul", "packed_matmul_cat", "packed_matmul_int32", "rmsnorm_act_quant",
           "rmsnorm_packed_matmul_cat", "rope_cache", "rope_decode_attention", "unpack_triton"]


def __getattr__(name: str):
    if name == "unpack_triton":
        from . import layout as module
    elif name in __all__:
        from . import custom_ops as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later accesses find it without this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _hand_over_to_the_pypi_package() -> None:
    """This folder installs as bitnet.kernels. It is imported as a top-level `kernels` only where a
    checkout's root is the first entry of the import path (`python -m pytest` or `python -m bitnet`
    run there), and there it shadows the PyPI package `kernels`, which transformers (a dependency
    from 5.25) imports. Load that package, found by its installed metadata, in this module's place,
    so that `import kernels` means in a checkout what it means everywhere else; with no such package
    installed, leave things as they are."""
    import importlib.metadata
    import importlib.util
    import os
    import sys

    try:
        init = str(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        return
    if not os.path.isfile(init) or os.path.samefile(init, __file__):
        return
    spec = importlib.util.spec_from_file_location("kernels", init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import that found this file returns sys.modules["kernels"]
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_to_the_pypi_package()

"""Native CPU backend for packed ternary / binary weights: the C++ kernels of csrc/ (bitnet_kernels.h,
bound to torch by bitnet_cpu.cpp).

The kernels read the checkpoint layout in place (bitnet/packing.py; no conversion at load), take
float32 / bfloat16 / float16 inputs, quantize activations bit-identically to
`bitnet.quant.quantize_activation`, accumulate exactly in int32 and apply the scales once, the
same float32 operations as the torch reference, so outputs are bit-identical to it.

Build: compiled with the system C++ compiler by `torch.utils.cpp_extension` on first use and
cached (under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/<python>_<accelerator>, keyed
by the source's hash); 12-20 s once on a 2-core CPU, then a load of well under a second. A build
that is not cached yet says so on stderr before it starts (what, why, about how long, where it is
cached) and when it ends; callers that report a speed build first (`load()`) and time after. No
compiler, or a failed build: one warning naming the cause, and callers fall back to the torch
path (`available()` is False).

Instruction sets, chosen at run time from what the CPU has, capped by BITNET_CPU_ISA
("scalar" | "avx2" | "avx512" | "amx" on x86-64, "scalar" | "neon" on AArch64; read at load) or
`set_isa(...)` (tests use it to cover every path on one machine): "amx" = "avx512" with the packed
matmuls on the AMX-INT8 tile unit (Sapphire Rapids and later, where Linux grants the process the
tile data), "avx512" = AVX-512 F/BW/VL with VNNI dot products (vpdpbusd), "avx2" = AVX2 maddubs,
"neon" = NEON with the dot-product extension (sdot), "scalar" = portable C++. Threads: torch's
intra-op threads (torch.set_num_threads).

Ops (torch.library, namespace bitnet_cpu, with fake implementations for torch.compile):
    linear(x, packed, scale, n, fmt, bias=None) -> y          x (..., K) -> y (..., n), x's dtype
    linear_many(x, packed[], scale[], n[], fmt, bias[]) -> y[]  several matrices of one input (q/k/v,
                                                               gate/up): x quantized once, one pass
    matmul_int32(x_q, packed, n, fmt) -> int32 (M, n)         exact x_q @ W_q^T
    quantize(x) -> (x_q int8, a float32 (..., 1), sum int32)  per-row int8 activations
    int8_linear(x, weight, scale, bias=None) -> y             weight-only int8 rows (an int8 lm_head)
    bf16_linear(x, weight, bias=None) -> y                    bf16 rows streamed once (a bf16 lm_head)
    int4_linear(x, codes, scales, n, bias=None) -> y          4-bit grouped rows x int8 activations (Int4Linear)
    rms_norm(x, weight, eps) -> y                             RMSNorm in one pass (inference)
    rope(x, cos, sin) -> y                                    x * cos + rotate_half(x) * sin, bit for bit
    decode_attention(q, k_cache, v_cache, rows, pos, key_mask) one query token per sequence over its
                                                               float32 cache row (csrc/bitnet_attention.h)
    decode_layer(x, norms, eps, packed[7], ...) -> x           a decoder layer at decode in one call: the
                                                               eager layer's own ops, bar the attention
M >= gemm_rows() (by level: 257 on AMX, 48 on AVX-512, 513 on AVX2; set_large_m overrides it)
decodes the weights to int8 once per call and runs ATen's int8 GEMM (`torch._int_mm`: oneDNN, with
VNNI or AMX where present); smaller M runs the packed kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings

import torch

# instruction-set levels, lowest first (the C++ enum Isa): x86-64 and AArch64 name them differently
ISAS = ("scalar", "neon") if platform.machine().lower() in ("aarch64", "arm64") else ("scalar", "avx2", "avx512", "amx")
LARGE_M = 0  # set_large_m's default: automatic by level (AMX 257 rows, AVX-512 48, AVX2 513, else 48)
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCE = os.path.join(CSRC, "bitnet_cpu.cpp")
HEADERS = [os.path.join(CSRC, "bitnet_kernels.h"), os.path.join(CSRC, "bitnet_attention.h")]

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "error": str


BUILD_SECONDS = "12-20 s"  # a fresh build of csrc/ on the 2-core CPUs measured (g++ 12, -O3)


def _build_directory(name: str) -> str:
    """Where torch.utils.cpp_extension builds and caches the extension `name`."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # a private helper: if it moves, the documented default
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        return os.path.join(root, name)


def _announce(message: str) -> None:
    print(f"bitnet: {message}", file=sys.stderr, flush=True)


def _build() -> None:
    from torch.utils import cpp_extension

    h = hashlib.sha256()
    for path in [SOURCE, *HEADERS]:
        with open(path, "rb") as f:
            h.update(f.read())
    digest = h.hexdigest()[:12]
    name = f"bitnet_cpu_{digest}"
    where = _build_directory(name)
    fresh = not os.path.isfile(os.path.join(where, f"{name}.so"))
    if fresh:  # the only slow first use: say what is happening instead of stalling silently
        _announce(f"building the native CPU kernels (kernels/csrc, C++, with torch.utils.cpp_extension) once for "
                  f"this source and torch version: about {BUILD_SECONDS} on two idle cores; cached in {where} "
                  "(TORCH_EXTENSIONS_DIR), later runs load them at once; no reported speed includes it "
                  "(BITNET_CPU_DISABLE=1 skips it)")
    t0 = time.perf_counter()
    try:
        cpp_extension.load(
            name=name,
            sources=[SOURCE],
            extra_include_paths=[CSRC],
            extra_cflags=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("BITNET_CPU_VERBOSE") == "1",
        )
    except Exception as e:
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)") from e
        raise
    if fresh:
        _announce(f"native CPU kernels built in {time.perf_counter() - t0:.1f} s")


def load() -> bool:
    """Build (once, cached) and load the extension; False, after one warning, if it cannot be."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        if os.environ.get("BITNET_CPU_DISABLE") == "1":
            _state.update(ok=False, error="disabled by BITNET_CPU_DISABLE=1")
            return False
        try:
            _build()
            _register_fakes()
            torch.ops.bitnet_cpu.configure(-1, LARGE_M)
            cap = os.environ.get("BITNET_CPU_ISA")
            if cap:
                set_isa(cap)
            _state["ok"] = True
        except Exception as e:  # no compiler, a failed build or load: the torch path takes over
            lines = str(e).strip().splitlines()
            errors = [ln.strip() for ln in lines if "error" in ln.lower() and "ninja" not in ln.lower()]
            _state.update(ok=False, error=(errors or lines or [type(e).__name__])[0][:500])
            warnings.warn(
                f"bitnet: the native CPU kernels could not be built ({_state['error']}); packed layers on the CPU "
                "use the slower torch path",
                RuntimeWarning,
                stacklevel=2,
            )
        return _state["ok"]


def available() -> bool:
    return load()


def error() -> str | None:
    """Why the extension is not available (None if it is, or was not tried)."""
    return _state.get("error")


def _register_fakes() -> None:
    @torch.library.register_fake("bitnet_cpu::linear")
    def _(x, packed, scale, n, fmt, bias=None):
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.register_fake("bitnet_cpu::linear_many")
    def _(x, packed, scale, n, fmt, bias):
        return [x.new_empty((*x.shape[:-1], k)) for k in n]

    @torch.library.register_fake("bitnet_cpu::matmul_int32")
    def _(x_q, packed, n, fmt):
        return x_q.new_empty((x_q.shape[0], n), dtype=torch.int32)

    @torch.library.register_fake("bitnet_cpu::int8_linear")
    def _(x, weight, scale, bias=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("bitnet_cpu::bf16_linear")
    def _(x, weight, bias=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("bitnet_cpu::int4_linear")
    def _(x, codes, scales, n, bias=None):
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.register_fake("bitnet_cpu::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("bitnet_cpu::rope")
    def _(x, cos, sin):
        return x.new_empty(x.shape)

    @torch.library.register_fake("bitnet_cpu::decode_attention")
    def _(q, k_cache, v_cache, rows, pos, key_mask):
        return q.new_empty(q.shape)

    @torch.library.register_fake("bitnet_cpu::decode_layer")
    def _(x, norms, eps, packed, scales, biases, ns, fmt, act, k_cache, v_cache, rows, pos, cos, sin, key_mask, n_head, n_kv):
        return x.new_empty(x.shape)

    @torch.library.register_fake("bitnet_cpu::quantize")
    def _(x):
        return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
                x.new_empty(x.shape[:-1], dtype=torch.int32))


def _isa_index(name: str) -> int:
    if name not in ISAS:
        raise ValueError(f"BITNET_CPU_ISA / set_isa takes one of {ISAS}, got {name!r}")
    return ISAS.index(name)


def detected_isa() -> str:
    """The best instruction set this CPU has (of ISAS)."""
    return ISAS[torch.ops.bitnet_cpu.detected()] if load() else "none"


def isa() -> str:
    """The instruction set the kernels use now: the CPU's best, capped."""
    return ISAS[torch.ops.bitnet_cpu.configure(-1, -1)] if load() else "none"


def set_isa(name: str) -> str:
    """Cap the instruction set (the kernels use min(cap, what the CPU has)); returns the active one."""
    return ISAS[torch.ops.bitnet_cpu.configure(_isa_index(name), -1)]


@contextlib.contextmanager
def isa_cap(name: str):
    """Run a block with the instruction set capped at `name`, then restore the previous cap."""
    before = isa()
    set_isa(name)
    try:
        yield isa()
    finally:
        set_isa(before if before != "none" else ISAS[-1])


def set_large_m(m: int) -> None:
    """Rows from which the int8 GEMM path (decode once, torch._int_mm) replaces the packed kernels;
    0: automatic (gemm_rows)."""
    torch.ops.bitnet_cpu.configure(-1, int(m))


def gemm_rows() -> int:
    """The rows from which the int8 GEMM path runs now, for the active instruction set."""
    return torch.ops.bitnet_cpu.gemm_rows()


def linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int, fmt: str,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x_q @ W_q^T) * scale / a (+ bias) for x (..., K), packed (R, K) uint8, in x's dtype."""
    return torch.ops.bitnet_cpu.linear(x, packed, scale, n, fmt, bias)


def linear_many(x: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor], ns: list[int], fmt: str,
                biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """[linear(x, packed[i], scales[i], ns[i], fmt, biases[i]) for each i], bit for bit, in one call."""
    return torch.ops.bitnet_cpu.linear_many(x, packed, scales, ns, fmt, biases)


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, n: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.bitnet_cpu.int4_linear(x, codes, scales, n, bias)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                     pos: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.bitnet_cpu.decode_attention(q, k_cache, v_cache, rows, pos, key_mask)


def decode_layer(x, norms, eps, packed, scales, biases, ns, fmt, act, k_cache, v_cache, rows, pos, cos, sin, key_mask,
                 n_head, n_kv) -> torch.Tensor:
    return torch.ops.bitnet_cpu.decode_layer(x, norms, eps, packed, scales, biases, ns, fmt, act, k_cache, v_cache, rows,
                                             pos, cos, sin, key_mask, n_head, n_kv)


def matmul_int32(x_q: torch.Tensor, packed: torch.Tensor, n: int, fmt: str) -> torch.Tensor:
    return torch.ops.bitnet_cpu.matmul_int32(x_q, packed, n, fmt)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x @ weight^T) * scale (+ bias) for an int8 (N, K) weight with float32 row scales (N,)."""
    return torch.ops.bitnet_cpu.int8_linear(x, weight, scale, bias)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T (+ bias) for a bfloat16 (N, K) weight, float32 sums, y in x's dtype."""
    return torch.ops.bitnet_cpu.bf16_linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """bitnet.quant.rms_norm in one pass (no autograd): equal to it but for the last bit where its
    float32 mean of squares rounds differently (this one sums in float64)."""
    return torch.ops.bitnet_cpu.rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x (B, H, T, D), cos / sin (B, 1, T, D): bit for bit."""
    return torch.ops.bitnet_cpu.rope(x, cos, sin)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.bitnet_cpu.quantize(x)

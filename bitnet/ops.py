"""Inference linear on packed weights: picks the Triton kernels, the native CPU kernels or the
exact torch path.

Choice, most specific first: the module's `kernel` argument, then the environment variable
BITNET_KERNEL ("triton", "cpu" or "torch"), then automatic: Triton for CUDA tensors (on a GPU of
compute capability 8.0 or later, TRITON_MIN_CAPABILITY, with Triton 3.6 or later; torch on a V100
or T4, or with an older Triton), the native CPU kernels (bitnet.kernels.cpu) for CPU tensors when
they could be built, torch otherwise. All three compute the same integers and apply the scales
with the same float32 operations, so their outputs are equal. Under TRITON_INTERPRET=1,
BITNET_KERNEL=triton runs the Triton kernels on CPU tensors (that is how CI proves them correct).

The float parts of inference on the CPU (RMSNorm, rotary embeddings, a bf16 lm_head of a packed
model) have native one-pass versions too (`rms_norm`, `rope`, `float_head`): each op of eager torch
costs microseconds of dispatch, and a decode step of a small model is hundreds of them. They run
wherever the extension is built and nothing needs autograd, whatever BITNET_KERNEL says (it picks
the packed matmul only), so the native and torch matmul paths still see the same float inputs.
BITNET_CPU_FLOAT_OPS=torch keeps torch's own float ops (RMSNorm's mean of squares then rounds as
torch's does: bit-for-bit parity with a pure torch model, e.g. transformers' patched by
bitnet.patch); BITNET_CPU_DISABLE=1 turns every native op off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from . import kernels as triton_kernels  # (its Triton names load on first use: kernels/__init__.py)
from .kernels import cpu as native
from .packing import packed_linear_reference
from .quant import rms_norm as torch_rms_norm

KERNELS = ("triton", "cpu", "torch")

# The Triton kernels' floor on NVIDIA GPUs: int8 tensor-core dots (and bf16), compute capability 8.0
# (A100, A10, L4, L40S, H100, RTX 30xx and later). Triton does not compile an int8 dot for an older
# GPU (sm_75, a T4: "'arith.extf' op operand #0 must be floating-point-like"), so a packed layer on
# a V100 or T4 takes the exact torch path unless asked otherwise, and BITNET_KERNEL=triton says why
# it cannot be.
TRITON_MIN_CAPABILITY = (8, 0)
_TRITON_GPUS: dict[int, tuple[int, int] | None] = {}  # device index -> its capability if below the floor
# The oldest Triton the kernels are checked with (pyproject.toml's floor; CI compiles every kernel
# with it). torch's CUDA wheels pin their Triton (torch 2.8: 3.4, 2.9: 3.5, 2.10 and 2.11: 3.6);
# an older one installed anyway (pip --no-deps, a conda environment) compiles the kernels, but the
# launch path reads Triton internals it lacks, so the packed layers on a GPU take the exact torch
# path there, saying why once.
TRITON_MIN_VERSION = (3, 6)
_TRITON_VERSION: list = []  # [the installed Triton's version where it is below the floor, else None]


def _old_gpu(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of an NVIDIA GPU below TRITON_MIN_CAPABILITY, else None."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TRITON_GPUS:
        capability = tuple(torch.cuda.get_device_capability(index))
        _TRITON_GPUS[index] = capability if torch.version.hip is None and capability < TRITON_MIN_CAPABILITY else None
    return _TRITON_GPUS[index]


def _old_triton() -> str | None:
    """The installed Triton's version where it is older than TRITON_MIN_VERSION on an NVIDIA build
    of torch, else None."""
    if not _TRITON_VERSION:
        import re

        import triton

        m = re.match(r"(\d+)\.(\d+)", triton.__version__)
        old = torch.version.hip is None and m is not None and (int(m[1]), int(m[2])) < TRITON_MIN_VERSION
        _TRITON_VERSION.append(triton.__version__ if old else None)
        if old:
            logging.getLogger(__name__).warning("%s; until then packed layers on a GPU run the exact torch path",
                                                _old_triton_says())
    return _TRITON_VERSION[0]


def _old_triton_says() -> str:
    floor = ".".join(map(str, TRITON_MIN_VERSION))
    return (f"the Triton kernels need Triton {floor} or later, which torch 2.10 and later install; this environment "
            f"has Triton {_TRITON_VERSION[0]} with torch {torch.__version__}")


def _no_triton_on(device: torch.device) -> bool:
    """Whether the Triton kernels cannot run on this CUDA device (its GPU, or this Triton)."""
    return _old_gpu(device) is not None or _old_triton() is not None


def choose_kernel(x: torch.Tensor, kernel: str | None = None) -> str:
    choice = kernel or os.environ.get("BITNET_KERNEL") or default_kernel(x.device)
    if choice not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} (argument or BITNET_KERNEL), got {choice!r}")
    if choice == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 to run on the CPU")
    if choice == "triton" and x.is_cuda and (old := _old_gpu(x.device)) is not None:
        raise RuntimeError(f"the Triton kernels need an NVIDIA GPU of compute capability "
                           f"{'.'.join(map(str, TRITON_MIN_CAPABILITY))} or later (int8 tensor-core dots); "
                           f"{torch.cuda.get_device_name(x.device)} is {old[0]}.{old[1]}: kernel='torch' "
                           f"(BITNET_KERNEL=torch) runs the exact torch path on it")
    if choice == "triton" and x.is_cuda and _old_triton() is not None:
        raise RuntimeError(f"{_old_triton_says()}; kernel='torch' (BITNET_KERNEL=torch) runs the exact torch path")
    if choice == "cpu" and x.device.type != "cpu":
        raise RuntimeError(f"the native CPU kernels need a CPU tensor, got one on {x.device}")
    if choice == "cpu" and not native.available():
        raise RuntimeError(f"BITNET_KERNEL=cpu, but the native CPU kernels are not available: {native.error()}")
    return choice


def triton_applies(x: torch.Tensor, kernel: str | None = None) -> bool:
    """Whether the Triton kernels are the choice for x (choose_kernel's answer, without its errors):
    for the float parts that have a Triton kernel and a torch fallback (decode attention, an int8
    head), which follow the choice where it can be honoured and fall back where it cannot (say
    BITNET_KERNEL=cpu with a float model on a GPU)."""
    choice = kernel or os.environ.get("BITNET_KERNEL") or default_kernel(x.device)
    if choice != "triton":
        return False
    return (x.is_cuda and not _no_triton_on(x.device)) or (not x.is_cuda and os.environ.get("TRITON_INTERPRET") == "1")


def default_kernel(device: torch.device | str) -> str:
    """The backend a packed layer uses on `device` when nothing is asked for."""
    device = torch.device(device)
    if device.type == "cuda":
        return "torch" if _no_triton_on(device) else "triton"
    if device.type == "cpu" and native.available():
        return "cpu"
    return "torch"


def describe_cpu_backend() -> str:
    """One line for `bitnet info`: what a packed layer on this machine's CPU runs on."""
    forced = os.environ.get("BITNET_KERNEL")
    if native.available():
        line = f"native C++ kernels, {native.isa()} (this CPU: {native.detected_isa()}), {torch.get_num_threads()} threads"
    else:
        line = f"torch path (native kernels unavailable: {native.error()})"
    if forced:
        line += f"; BITNET_KERNEL={forced} overrides it"
    return line


def describe_gpu_backend(device: torch.device | str) -> str:
    """One line for `bitnet info` and `bitnet serve`: a GPU (its name, compute capability, SMs, the
    shared memory a program may have) and what a packed layer on it runs on: the Triton kernels
    (launched as programmatic dependents from sm_90 on, BITNET_PDL=0 aside; the package's autotuning
    table for this GPU model, if it ships one), or the torch path below compute capability 8.0 or
    with a Triton older than TRITON_MIN_VERSION."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    p = torch.cuda.get_device_properties(index)
    line = f"cuda:{index} {p.name} (compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs"
    if _old_gpu(torch.device("cuda", index)) is not None:
        line += f"): torch path (the Triton kernels need compute capability {'.'.join(map(str, TRITON_MIN_CAPABILITY))} or later)"
    elif _old_triton() is not None:
        line += f"): torch path ({_old_triton_says()})"
    else:
        import triton

        from .kernels import common, tuning

        table = tuning.SHIPPED_DIR / tuning.table_name(p.name)
        line += (f", {common.gpu_shared_limit(index) // 1024} KB of shared memory a program): Triton {triton.__version__} "
                 f"kernels, {'programmatic dependent launches' if common.PDL_ENABLED and (p.major, p.minor) >= (9, 0) else 'serialized launches'}, "
                 f"autotuning {'from the package table ' + table.name if table.is_file() else 'on first use (no package table for this GPU model)'}")
    forced = os.environ.get("BITNET_KERNEL")
    return line + (f"; BITNET_KERNEL={forced} overrides it" if forced else "")


# The torch path: unpack (the weights stay packed in memory between calls), exact int matmul.
# It lives on the ground floor (bitnet.packing), where the kernels' references can reach it too.
torch_bitlinear = packed_linear_reference


def bitlinear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    fmt: str,
    bias: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """y = (x_q @ W_q^T) * scale / a + bias for x (..., K), packed (R, K) uint8, scale float32 (1,)."""
    choice = choose_kernel(x, kernel)
    if choice == "cpu":
        return native.linear(x, packed, scale, n, fmt, bias)
    if choice == "triton":
        return triton_kernels.bitlinear(x, packed, scale, n, fmt, bias)
    return torch_bitlinear(x, packed, scale, n, fmt, bias)


def bitlinear_many(x: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor], ns: list[int], fmt: str,
                   biases: list[torch.Tensor | None], kernel: str | None = None) -> list[torch.Tensor] | None:
    """[bitlinear(x, packed[i], scales[i], ns[i], fmt, biases[i], kernel) for each i] with x quantized
    once: one native call on the CPU (one pass over all the rows), one act_quant and one
    packed_matmul_cat on the Triton kernels (the outputs are views of its columns); each output
    equal to its own bitlinear bit for bit (the same x_q and a, the same epilogue). None on the
    torch path: the caller then runs them one by one."""
    choice = choose_kernel(x, kernel)
    if choice == "cpu":
        return native.linear_many(x, packed, scales, ns, fmt, biases)
    if choice == "triton":
        return _packed_many(*triton_kernels.act_quant(x, with_sum=True), packed, scales, ns, fmt, biases, x.dtype)
    return None


def rms_norm_bitlinear_many(x: torch.Tensor, weight: torch.Tensor, eps: float, packed: list[torch.Tensor],
                            scales: list[torch.Tensor], ns: list[int], fmt: str, biases: list[torch.Tensor | None],
                            kernel: str | None = None, up: torch.Tensor | None = None,
                            residual: torch.Tensor | None = None) -> list[torch.Tensor] | None:
    """bitlinear_many(rms_norm(x, weight, eps), ...) with the RMSNorm fused into the activation
    quantization on the Triton kernels: rmsnorm_packed_matmul_cat, one GEMV launch at decode (M = 1;
    the norm inside it), else one rmsnorm_act_quant, then one packed_matmul_cat (the normalized
    activations never reach memory either way). None on the other backends: the caller then runs
    the norm, then bitlinear_many. weight must have x's dtype (the outputs do too). With up (x's
    shape and dtype), the norm's input is relu(x)^2 * up, each step rounded as torch rounds it.
    residual (one matrix; the output's shape and dtype): its output is residual + y, the add in
    the GEMV's epilogue at decode (the decoder layer's skip connection without a launch).

    Not bit-identical to the unfused path: the kernel sums the squares in another order than torch
    (or the native rms_norm), so a normalized value may differ by an ulp; then a (127 / its row's
    absmax) may differ by an ulp, and x_q by one where it lies that close to a rounding boundary
    (kernels/rmsnorm_quant.py). The unfused torch and CPU paths stay the references."""
    if choose_kernel(x, kernel) != "triton":
        return None
    return _split(triton_kernels.rmsnorm_packed_matmul_cat(x, weight, eps, packed, scales, ns, fmt, biases, up=up, residual=residual), ns)


def _packed_many(x_q, a, xsum, packed, scales, ns, fmt, biases, out_dtype, residual=None) -> list[torch.Tensor]:
    """The Triton packed_matmul of each matrix from one quantized input x_q (..., K), a (..., 1) and
    its row sums xsum (...): one packed_matmul_cat (at decode, q / k / v or gate / up in one GEMV
    launch), its output split into one view per matrix; residual + it with a residual (one matrix)."""
    return _split(triton_kernels.packed_matmul_cat(x_q, a, packed, scales, ns, fmt, biases, out_dtype, xsum, residual), ns)


def _split(y: torch.Tensor, ns: list[int]) -> list[torch.Tensor]:
    """The outputs of matrices side by side in y, one view each."""
    return [y] if len(ns) == 1 else list(y.split_with_sizes(ns, -1))


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (weight * scale)^T (+ bias) for int8 rows with float32 row scales (an int8 lm_head).

    Few rows (decode, a prefill's last position): the native kernel on the CPU, the Triton GEMV on
    the GPU (bitnet.kernels.int8_linear), each streaming the int8 bytes once, float32 sums times
    the row scale. Otherwise (evaluation) the rows are dequantized to x's dtype for F.linear."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows <= 16 and native_inference(x):
        return native.int8_linear(x, weight, scale, bias)
    if rows <= 16 and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_applies(x) \
            and not (torch.is_grad_enabled() and x.requires_grad):
        return triton_kernels.int8_linear(x, weight, scale, bias)
    w = (weight.float() * scale.float()[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """An Int4Linear's y (bitnet.Int4Linear: 4-bit weights in groups of 32, int8 activations) for few
    rows (decode, a prefill's last position): the native kernel on the CPU, the Triton GEMV on the
    GPU (bitnet.kernels.int4_linear), each streaming the codes and scales once. None otherwise: the
    caller dequantizes."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > 16:
        return None
    if native_inference(x):
        return native.int4_linear(x, codes, scales, out_features, bias)
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_applies(x) \
            and not (torch.is_grad_enabled() and x.requires_grad):
        return triton_kernels.int4_linear(x, codes, scales, out_features, bias)
    return None


# ----------------------------------------------------------------------------- float parts, native on the CPU
HEAD_ROWS = 4  # up to this many rows, the native bf16 head beats torch's bf16 GEMM on the CPUs measured


def native_inference(*tensors: torch.Tensor) -> bool:
    """True where a native float op may stand in for a torch composite: plain CPU tensors (no
    DTensor or other subclass), no autograd to record, and the extension built."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    mode = os.environ.get("BITNET_CPU_FLOAT_OPS", "native")
    if mode != "native":
        if mode != "torch":
            raise ValueError(f"BITNET_CPU_FLOAT_OPS must be 'native' or 'torch', got {mode!r}")
        return False
    dist = sys.modules.get("torch.distributed.tensor")  # only imported modules can have made a DTensor
    for t in tensors:
        if t.device.type != "cpu" or (dist is not None and isinstance(t, dist.DTensor)):
            return False
    return native.available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """bitnet.quant.rms_norm; one native pass on the CPU in inference (its float32 mean of squares
    summed in float64: the last bit can differ from torch's own sum)."""
    if weight.dtype == x.dtype and native_inference(x, weight):
        return native.rms_norm(x, weight, eps)
    return torch_rms_norm(x, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x (B, H, T, D), cos / sin (B or 1, 1, T, D) in x's dtype;
    the native op on the CPU in inference, bit for bit the same."""
    if x.dim() == 4 and cos.dtype == x.dtype and sin.dtype == x.dtype and native_inference(x, cos, sin):
        return native.rope(x, cos, sin)
    return x * cos + rotate_half(x) * sin


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache=None, input_pos: torch.Tensor | None = None, kernel: str | None = None,
               cache_rows: torch.Tensor | None = None) -> tuple | None:
    """The attention layer's RoPE and cache write in one Triton launch (bitnet.kernels.rope_cache):
    q (B, T, nh, hd), k / v (B, T, nkv, hd) -> (q' (B, nh, T, hd), K, V) with K, V the cache's
    tensors (k' and v written at input_pos) when `cache` (a KVCache) is given, else k', v; the
    same numbers as rope() and KVCache.update (cache_rows: the serve runner's per-token cache rows,
    B = 1). None where the Triton kernels are not the choice
    (the CPU has its native rope) or autograd is recording: the caller then runs those."""
    if choose_kernel(q, kernel) != "triton" or cos.dtype != q.dtype or sin.dtype != q.dtype or q.shape[-1] % 2:
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if cache is None:
        return triton_kernels.rope_cache(q, k, v, cos, sin)
    return triton_kernels.rope_cache(q, k, v, cos, sin, cache.k, cache.v, input_pos, cache_rows)


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          cache, input_pos: torch.Tensor, key_mask: torch.Tensor | None = None,
                          kernel: str | None = None, rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """A decode step's RoPE, KV-cache write and attention in one Triton launch
    (bitnet.kernels.rope_decode_attention): q (B, 1, nh, hd), k / v (B, 1, nkv, hd), cos / sin (B or
    1, 1, 1, hd) or a view of that many rows, `cache` a KVCache of q's dtype, input_pos (1,) or (B,)
    the token's slot, key_mask (B, S), rows (B,) each token's cache row (the server's; default: row
    b) -> y (B, nh * hd), k' and v written into the cache: what rope_cache then decode_attention
    give, bit for bit. None where the Triton kernels are not the choice, autograd is recording, or
    the dtypes differ (the CPU attends in float32 over a float32 or bf16 cache): the caller runs those two."""
    if choose_kernel(q, kernel) != "triton" or q.shape[1] != 1 or q.shape[-1] % 2 or q.shape[-1] > 256:
        return None
    if not (cos.dtype == sin.dtype == k.dtype == v.dtype == cache.k.dtype == cache.v.dtype == q.dtype):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    # (cos / sin as they are: the launcher views them as (B or 1, hd))
    return triton_kernels.rope_decode_attention(q[:, 0], k[:, 0], v[:, 0], cos, sin, cache.k, cache.v, input_pos, rows, key_mask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     rows: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                     kernel: str | None = None) -> torch.Tensor | None:
    """Attention of one query token per sequence over its cache row in one Triton launch
    (bitnet.kernels.decode_attention): q (N, H, D), caches (rows, NKV, S, D), pos (N,)
    or (1,) the query's slot (it sees slots 0 .. pos), rows (N,) its cache row (default n),
    key_mask (N, S) (zero: padding) -> y (N, H * D). None where the Triton kernels are not the
    choice, autograd is recording, or q and the caches differ in dtype: the caller runs SDPA."""
    if not triton_applies(q, kernel) or not k_cache.dtype == v_cache.dtype == q.dtype or q.shape[-1] > 256:
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        return None
    return triton_kernels.decode_attention(q, k_cache, v_cache, pos, rows, key_mask)


def float_head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for the float head of a packed model: a bf16 weight and few rows on the CPU (decode)
    stream the weight once through the native kernel, float32 sums; else F.linear."""
    rows = x.numel() // max(x.shape[-1], 1)
    if weight.dtype == torch.bfloat16 and rows <= HEAD_ROWS and native_inference(x, weight, *([bias] if bias is not None else [])):
        return native.bf16_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


T = TypeVar("T")
log = logging.getLogger(__name__)


def on_device(device: torch.device | str) -> contextlib.AbstractContextManager:
    """torch.cuda.device(device) for a CUDA device, else a context that does nothing. What runs on a
    model's GPU but not through torch's ops runs on the current device: Triton's launches (the
    package's follow their tensors: kernels/launch.py), a CUDA graph's recording and replay (the
    current device's stream). generate and the serving engine run within it: a model on cuda:1 while
    cuda:0 is current records and replays its graphs on cuda:1."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def capture_cuda_graph(fn: Callable[[], T], undo: Callable[[], None] | None = None, pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, output) of fn() recorded as a CUDA graph once: fn runs eagerly first on a side
    stream (as torch.cuda.graphs advises: lazy initialization, and the Triton kernels tune there),
    then undo() if given (also when fn fails: what the eager run changed, put back), then fn is
    recorded (into `pool`, a graph_pool_handle, if given). capture_error_mode "thread_local": CUDA
    calls of other threads (a server's) do not invalidate the recording."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            fn()
    finally:
        torch.cuda.current_stream().wait_stream(side)
        if undo is not None:
            undo()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = fn()
    return graph, output


def record_cuda_graph(record: Callable[[], T], what: str, device: torch.device | str | None = None) -> T:
    """record() (a CUDA graph's recording of `what`). Where it fails while the Triton kernels launch
    with programmatic dependent launch (bitnet.kernels.common.pdl; a driver that cannot record it),
    record() runs once more with PDL off; where that succeeds PDL stays off for the process, as
    BITNET_PDL=0 would, with a warning. A second failure (then not PDL's: PDL is turned back on),
    or one where no dependent launches are in use (on `device`, or on any device if None), is the
    caller's (who then runs eagerly)."""
    try:
        return record()
    except Exception:
        from .kernels import common

        if not common.pdl_in_use(device):
            raise
        common.PDL_ENABLED = False
        try:
            graph = record()
        except Exception:
            common.PDL_ENABLED = True  # it fails without PDL too: something else is wrong
            raise
        log.warning("recording %s as a CUDA graph with programmatic dependent launch failed, and without it "
                    "succeeded: PDL is off (as BITNET_PDL=0) for the rest of this process", what, exc_info=True)
        return graph

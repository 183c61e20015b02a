"""What the kernel files share: interpreter detection, autotuning, and the dequantizing epilogue.

The epilogue is where every path turns the exact integer accumulator into the output, with the
same float32 operations as the torch reference (bitnet.quant.quantized_linear), in the same order:

    dot  = SC * acc - xsum                     # int32, = x_q . W_q exactly (see layout.py)
    y    = dot.to(f32) * (s / a)               # s / a with IEEE division, one rounding per step
    y    = y.to(out_dtype)
    y    = (y.to(f32) + bias.to(out_dtype).to(f32)).to(out_dtype)   # torch's low-precision add
    y    = (residual.to(f32) + y.to(f32)).to(out_dtype)                 # optional: x + o_proj(...)

so a Triton output equals the torch path's bit for bit whenever the int8 activations do.
"""

from __future__ import annotations

import os
import time

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import tuning
from .launch import SHARED_LIMIT, fast_launch, mma_sync_arch

# Read once, when the kernels are decorated: triton.jit itself decides the same way at that moment.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_scalars_compat() -> None:
    """Triton's interpreter turns a scalar (a one-element array) into a Python int for range() and
    indexing with int() of the array; NumPy 2.4 refuses that for an array of one dimension ("only
    0-dimensional arrays can be converted to Python scalars"), so with Triton 3.6's interpreter
    every loop over a runtime bound failed (3.9's squeezes the array first). Where NumPy refuses it,
    the interpreter's patched tensors get 3.9's conversion: the same int, on any Triton."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:  # (no NumPy: no interpreter either)
        return
    try:
        int(np.ones(1))
        return  # this NumPy converts: nothing to mend
    except TypeError:
        pass
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "bitnet_compat", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.bitnet_compat = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _interpreter_scalars_compat()

# Launch options of every kernel here. Without FMA contraction each float operation rounds
# once, as in torch: x * a + c or acc * f + bias fused into one FMA would round differently.
LAUNCH = {"enable_fp_fusion": False}


# Programmatic dependent launch (Hopper and later; BITNET_PDL=0 turns it off): a decode step is
# hundreds of small dependent kernels, and each would otherwise start only once the previous one has
# drained, then pay its launch and the latency of its first loads. Launched with it, a kernel may
# start as soon as every program of the previous kernel has begun: it loads what no kernel writes
# (packed weights) and waits (pdl_wait, griddepcontrol.wait) before it reads anything a previous
# kernel wrote or writes anything at all. Every program of such a kernel passes that wait, so that
# it completes only after its predecessor, and the chain stays ordered.
PDL_ENV = "BITNET_PDL"
PDL_ENABLED = os.environ.get(PDL_ENV, "1").strip() != "0"
_PDL_DEVICES: dict[int, bool] = {}


def pdl(t: torch.Tensor) -> dict:
    """Launch arguments for the kernels that take PDL: {"PDL": True, "launch_pdl": True} for a CUDA
    tensor on a device of compute capability 9.0 or later while PDL_ENABLED and where pdl_probe
    passed, else {"PDL": False}."""
    if not (PDL_ENABLED and t.is_cuda) or INTERPRET or torch.version.hip is not None:
        return _NO_PDL
    index = t.get_device()
    ok = _PDL_DEVICES.get(index)
    if ok is None:
        if torch.cuda.is_current_stream_capturing():  # no probe inside a recording: launch serialized
            return _NO_PDL
        ok = _PDL_DEVICES[index] = torch.cuda.get_device_capability(index) >= (9, 0) and pdl_probe(index)
    return _WITH_PDL if ok else _NO_PDL


_NO_PDL = {"PDL": False}
_WITH_PDL = {"PDL": True, "launch_pdl": True}


def ptx(t: torch.Tensor) -> bool:
    """Whether a kernel reading t may use inline PTX (its ASM constexpr: dp4a, prmt): a CUDA tensor
    off the interpreter and off ROCm; elsewhere the kernels compute the same in plain Triton."""
    return t.is_cuda and not INTERPRET and torch.version.hip is None


_MMA_SYNC: dict[int, dict] = {}
_NO_MMA_SYNC = {"MMA_SYNC": False}


def mma_sync(t: torch.Tensor) -> dict:
    """The GEMM's launch argument {"MMA_SYNC": mma_sync_arch(the capability of t's GPU)}; False off
    CUDA (the interpreter, ROCm)."""
    if not t.is_cuda or INTERPRET or torch.version.hip is not None:
        return _NO_MMA_SYNC
    index = t.get_device()
    found = _MMA_SYNC.get(index)
    if found is None:
        major, minor = torch.cuda.get_device_capability(index)
        found = _MMA_SYNC[index] = {"MMA_SYNC": mma_sync_arch(10 * major + minor)}
    return found


_SHARED_LIMITS: dict[int, int] = {}


def shared_limit(device: torch.device | str) -> int | None:
    """The shared memory (bytes) one program may ask for on `device`; None where nothing limits it
    (a CPU device, the interpreter). Launchers whose one tile would ask for more on a GPU (decode
    attention's pipelined stages, the norm-fused GEMM tile) pick a smaller one by this; autotuned
    configs that do not fit are dropped by Triton's autotuner when it times them."""
    if INTERPRET:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return gpu_shared_limit(device.index if device.index is not None else torch.cuda.current_device())


def gpu_shared_limit(index: int) -> int:
    """The shared memory (bytes) one program may ask for on CUDA device `index` (read once)."""
    limit = _SHARED_LIMITS.get(index)
    if limit is None:
        props = torch.cuda.get_device_properties(index)
        limit = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
        if limit <= 0:  # (a torch without the field: by compute capability, else the smallest listed)
            limit = SHARED_LIMIT.get(10 * props.major + props.minor, min(SHARED_LIMIT.values()))
        _SHARED_LIMITS[index] = limit
    return limit


def pdl_in_use(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels launch as dependents on `device` (a CUDA device on which one has
    launched since PDL was probed), or on any device when None."""
    if not PDL_ENABLED:
        return False
    if device is None:
        return any(_PDL_DEVICES.values())
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return bool(_PDL_DEVICES.get(device.index if device.index is not None else torch.cuda.current_device()))


def pdl_probe(index: int) -> bool:
    """Whether device `index` runs and records dependent launches: two dependent increments of one
    counter, launched eagerly and then recorded in a CUDA graph and replayed, must count 4. Once a
    device, at the first launch; False (PDL off for the device, with a warning) on any failure, so
    that no later recording (generate's graphs, torch.compile's) meets one that cannot work."""
    import logging

    try:
        with torch.cuda.device(index):
            counter = torch.zeros(1, dtype=torch.int32, device="cuda")
            for _ in range(2):
                _pdl_probe_kernel[(1,)](counter, **_WITH_PDL)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # (a server's other threads)
                for _ in range(2):
                    _pdl_probe_kernel[(1,)](counter, **_WITH_PDL)
            graph.replay()
            if int(counter.item()) != 4:
                raise RuntimeError(f"two dependent increments, eagerly and replayed, counted {int(counter.item())}, not 4")
        return True
    except Exception:  # noqa: BLE001: any failure means serialized launches, which always work
        logging.getLogger(__name__).warning("programmatic dependent launch does not work on cuda:%d here; the Triton "
                                            "kernels launch serialized (as BITNET_PDL=0)", index, exc_info=True)
        return False


@triton.jit
def _pdl_probe_kernel(counter_ptr, PDL: tl.constexpr):
    pdl_start(PDL)
    pdl_wait(PDL)
    tl.store(counter_ptr, tl.load(counter_ptr) + 1)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Let the next kernel in the stream launch now (it waits in its pdl_wait for this one)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel has completed and its writes are visible (no-op without PDL)."""
    if PDL:
        gdc_wait()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launchers: plain Python (triton.cdiv is a constexpr function, ~5 us a call
    from host code, and a decode step launches hundreds of kernels)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for launchers (like cdiv: no triton.* call)."""
    return 1 << (n - 1).bit_length()


# How a kernel picks its config for a new key (shape, format, flags), read at that moment:
#   full    the config kept for that key on this GPU model (tuning.py: this machine's table, then
#           the package's), else time every config that fits (after the kernel's pruning), keep
#           the fastest and record it in this machine's table (default)
#   retune  time every config that fits and record the fastest, whatever the tables hold
#   first   no timing, no table: the first config that fits (the lists are ordered by expected
#           speed); what the test suite uses on a GPU, where hundreds of small shapes would each
#           be tuned, while tests/test_configs.py runs every config of every kernel against the
#           exact references
#   compile every config that fits compiled (and run once), none timed, no table, the first kept:
#           what fills a Triton cache with every config a GPU run would tune (a stand-in driver's
#           compiles, precompile.launches_compiled(every_config=True): benchmarks/warm_triton_cache.py)
AUTOTUNE_ENV = "BITNET_AUTOTUNE"
AUTOTUNE_POLICIES = ("full", "retune", "first", "compile")
UNTIMED_POLICIES = tuning.UNTIMED_POLICIES  # (nothing timed, no table read or written)
# Timing budget of one config (ms): Triton's default is 25 ms of warm-up and 100 of repetitions, a
# second and a half a key for 11 configs; a few hundred repetitions of microsecond kernels rank
# them as well (the L2 is flushed between repetitions either way).
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25


def autotune_policy() -> str:
    policy = os.environ.get(AUTOTUNE_ENV, "full").strip().lower() or "full"
    if policy not in AUTOTUNE_POLICIES:
        raise ValueError(f"{AUTOTUNE_ENV}={os.environ[AUTOTUNE_ENV]!r}: expected one of {', '.join(AUTOTUNE_POLICIES)}")
    return policy


# What tuning cost in this process (the benchmarks stamp it, bitnet.bench.environment): configs timed
# and the seconds that took, compiles included (~1 s a config compiled here, ~0.03 s one loaded
# from the cache precompile.py filled).
TUNE_STATS = {"configs": 0, "seconds": 0.0}


def _time_config(kernel_call, quantiles):
    """The autotuner's benchmark of one config: a short do_bench, or one call (which compiles the
    config, as the real launch would) when the policy times nothing (`first`, `compile`)."""
    if autotune_policy() in UNTIMED_POLICIES:
        kernel_call()
        return [0.0, 0.0, 0.0]
    start = time.perf_counter()
    try:
        return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)
    finally:
        TUNE_STATS["configs"] += 1
        TUNE_STATS["seconds"] += time.perf_counter() - start


def few_rows(x: torch.Tensor, k: int, name: str, max_rows: int) -> torch.Tensor:
    """x (..., k) float32 / bf16 / fp16 as (M, k) rows with unit stride along k, M <= max_rows: the
    input of a head GEMV (int8_head, int4_head), checked."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: x must be float32, bfloat16 or float16, got {x.dtype}")
    x2 = x.reshape(-1, k)
    if x2.shape[0] > max_rows:
        raise ValueError(f"{name}: the GEMV takes at most {max_rows} rows, got {x2.shape[0]}")
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def autotune(configs: list[triton.Config], key: list[str], interpret_config: triton.Config, prune=None):
    """triton.autotune over `configs` on a GPU, pruned by `prune(configs, named_args, **kwargs)`, as
    the BITNET_AUTOTUNE policy says (above). Under the interpreter only `interpret_config` (small
    blocks, no benchmarking): autotuning there would time every config on the CPU for nothing.
    `kernel.configs = [config]` pins one config (tests/test_configs.py). A new key's config comes
    from the tuning tables where they hold it (tuning.py); otherwise its configs are first compiled
    side by side in worker processes (precompile.py, BITNET_PRECOMPILE=0 turns it off), then timed:
    Triton would compile them one by one. Launched through launch.Launcher: a call signature seen
    before skips Triton's Python launch path."""
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=key)

    def decorate(fn):
        pending = {}  # the launch being tuned: its arguments, for precompile (early_prune, then before_choice)

        def early_prune(configs, named_args, **kwargs):
            fitting = prune(configs, named_args, **kwargs) if prune else configs
            if autotune_policy() == "first":
                return fitting[:1]
            if len(fitting) > 1:
                pending["args"] = (named_args, kwargs)
            return fitting

        def before_choice(fitting, timed):
            named_args, kwargs = pending.pop("args", (None, None))  # (not kept: it holds the launch's tensors)
            device = next((v.device for v in (named_args or {}).values() if isinstance(v, torch.Tensor) and v.is_cuda),
                          None)
            if timed and device is not None and len(fitting) > 1:  # compile them side by side first (precompile.py)
                from .precompile import precompile

                major, minor = torch.cuda.get_device_capability(device)
                precompile(fn, fitting, named_args, kwargs, 10 * major + minor)

        tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": early_prune},
                                do_bench=_time_config)(fn)
        tuning.attach(tuner, autotune_policy, before_choice)
        return fast_launch(tuner)

    return decorate


@triton.jit
def store_output(
    # pointers (res_ptr: read if HAS_RES, at y_offs like y)
    y_ptr, bias_ptr,
    # tiles (broadcastable to one shape)
    y_offs, n_offs, mask, acc, xsum, factor,
    # constexpr
    SC: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr, res_ptr=None, HAS_RES: tl.constexpr = False,
):
    """Store y[y_offs] from the code accumulator acc = sum_k codes * x_q (int32).

    n_offs: the output feature of each element (indexes bias); xsum: sum_k x_q of the row;
    factor: s / a of the row (float32, unused when OUT_INT32, which stores x_q . W_q itself).
    HAS_RES: y = residual + y, a residual stream of y's dtype (torch's low-precision add, as for
    the bias): the decoder layer's `x + o_proj(...)` in the epilogue instead of a launch of its own.
    """
    dot = SC * acc - xsum
    if OUT_INT32:
        tl.store(y_ptr + y_offs, dot, mask=mask)
    else:
        out_ty = y_ptr.dtype.element_ty
        y = (dot.to(tl.float32) * factor).to(out_ty)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + n_offs, mask=mask, other=0).to(out_ty)
            y = (y.to(tl.float32) + bias.to(tl.float32)).to(out_ty)
        if HAS_RES:
            r = tl.load(res_ptr + y_offs, mask=mask, other=0).to(tl.float32)
            y = (r + y.to(tl.float32)).to(out_ty)
        tl.store(y_ptr + y_offs, y, mask=mask)


def matmul_args(
    x: torch.Tensor,
    a: torch.Tensor | None,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    n: int,
    out_dtype: torch.dtype | None,
    quantized_in_kernel: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check what every matmul launcher takes; returns (a, scale) with a as float32 (M,) and scale
    as float32 (1,), each None where the kernel reads neither."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"activations must be (M, K) with unit stride along K, got {tuple(x.shape)} {x.stride()}")
    if out_dtype is None:
        raise ValueError("int8 activations need an explicit out_dtype")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if out_dtype == torch.int32:
        return None, None
    if scale is None or scale.numel() != 1:
        raise ValueError("a scaled output needs the weight scale, a tensor of one element")
    if scale.dtype != torch.float32:  # (the kernels read element 0; no dispatch when it is as they want it)
        scale = scale.reshape(1).float()
    if quantized_in_kernel:
        a = None
    elif a is None or a.numel() != x.shape[0]:
        raise ValueError(f"int8 activations need their scales a, {x.shape[0]} of them")
    elif a.dtype != torch.float32 or not a.is_contiguous():  # the kernels read a[m] at offset m
        a = a.reshape(-1).float().contiguous()
    return a, scale


def norm_args(name: str, x: torch.Tensor, norm_weight: torch.Tensor | None,
              up: torch.Tensor | None) -> torch.Tensor | None:
    """Check the RMSNorm a matmul launcher (`name`: GEMV, GEMM) runs inside it: float x (M, K), a
    weight (K,) (returned contiguous; None: no norm), up (the relu2 MLP's) of x's shape and dtype
    with unit stride along K, only with a norm."""
    if norm_weight is None:
        if up is not None:
            raise ValueError("up (the gated MLP's up projection) goes with an RMSNorm: pass norm_weight")
        return None
    if not x.is_floating_point() or tuple(norm_weight.shape) != (x.shape[-1],):
        raise ValueError(f"an RMSNorm in the {name} needs float x and a weight of shape ({x.shape[-1]},), got x "
                         f"{x.dtype} and weight {tuple(norm_weight.shape)}")
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype or up.stride(-1) != 1):
        raise ValueError(f"up must have the gate's shape and dtype {tuple(x.shape)} {x.dtype} and unit stride "
                         f"along K, got {tuple(up.shape)} {up.dtype} stride {up.stride()}")
    return norm_weight.contiguous()


def cat_biases(name: str, packed: list, ns: list, scales: list, biases: list | None) -> list:
    """The checks of gemv_cat / gemm_cat (`name`) on their matrices; the biases as a list (None
    for each matrix where none are given)."""
    if not 1 <= len(packed) <= 3 or not len(packed) == len(ns) == len(scales):
        raise ValueError(f"{name} takes 1 to 3 matrices with one n and one scale each, got {len(packed)}, "
                         f"{len(ns)}, {len(scales)}")
    biases = list(biases) if biases else [None] * len(packed)
    if len({b is None for b in biases}) > 1:
        raise ValueError(f"{name} needs a bias for every matrix or for none")
    return biases


# W1 / W2 come from where the weights were allocated: specialized on (divisible by 16, equal to 1)
# they would make a kernel's cache key depend on the allocator (a run in another process compiling
# variants a carried cache lacks) for no gain in the code (the kernels scale them by 16 units). The
# segmented kernels take them unspecialized.
SEGMENT_STARTS = ("W1", "W2")


def segment_starts(packed: list[torch.Tensor], lanes: int) -> list[int] | None:
    """Where each matrix's packed weight starts, from the first's, in grains of 16 units (int32 words
    when lanes == 4, bytes else): the W1 / W2 of a segmented launch, padded to three. None where one
    does not sit on that grain (not the caching allocator's 512-byte blocks): the caller then
    launches one matrix at a time."""
    grain = 16 * lanes
    offsets = [w.data_ptr() - packed[0].data_ptr() for w in packed]
    if any(o % grain for o in offsets):
        return None
    return [o // grain for o in offsets] + [0] * (3 - len(packed))

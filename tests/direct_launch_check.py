"""Direct launches (kernels/launch.py) pass a kernel's launcher exactly what Triton's own launch path
passes it, checked without a GPU: a stand-in driver for sm_90 whose launcher records its arguments
(nothing runs); each launcher of the package is called twice with one call signature, the first
call through Triton (which compiles for sm_90 and launches), the second directly; the two recorded
launches must be equal (grid, stream, function, metadata, hooks, every argument in order, tensors
by dtype, shape and strides). A third call with a tensor off its 16-byte alignment must go through
Triton again and get the other specialization's compiled kernel. With a launch hook registered (an
enter or an exit hook), both pass the same launch metadata (what the hooks are given). A pinned config (`kernel.configs = [config]`, as
tests/test_configs.py pins them, one after another) is a signature of its own, launched with that
config. A debug knob set between two calls is a signature of its own. A launch whose tensors are
on another GPU than the current one runs with theirs made current, on either path.

    python tests/direct_launch_check.py      (without TRITON_INTERPRET; exit status 1 on any failure)
"""

import hashlib
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "import the kernels as real JITFunctions: unset TRITON_INTERPRET"
os.environ["BITNET_AUTOTUNE"] = "first"
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bitnet.kernels import activations, attention, gemm, gemv, int8_head, layout, precompile, rmsnorm_quant, rope  # noqa: E402
from bitnet.packing import pack  # noqa: E402


class Recording(precompile._FakeDriver):
    """sm_90's stand-in whose launcher records what it is given; each binary its own function."""

    def __init__(self):
        super().__init__(90)
        self.calls = []
        self.utils.load_binary = lambda name, kernel, shared, device: (
            "module", (name, hashlib.sha1(kernel).hexdigest()), 0, 0, 1024)

    def launcher_cls(self, src, metadata):
        return lambda *args: self.calls.append(args)


def comparable(call):
    """A recorded launch with tensors as (dtype, shape, strides) and launch metadata as its dict."""
    out = []
    for i, v in enumerate(call):
        if isinstance(v, torch.Tensor):
            v = ("tensor", v.dtype, tuple(v.shape), v.stride(), v.data_ptr() % 16)
        elif i == 6 and v is not None:
            v = {k: x for k, x in v.get().items() if k != "stream"}
        out.append(v)
    return out


def weights(n, k, fmt="2bit"):
    return pack(torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n + k)), fmt)


def scenarios():
    """(name, the Launcher it launches, a call of one launch, the same call with a misaligned tensor)."""
    s, k = torch.tensor([0.02]), 256
    x = torch.randn(2, k + 1, dtype=torch.bfloat16)
    x1 = x[:1, :k]
    off = lambda t: torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)  # noqa: E731 (t, 2-4 bytes off 16)
    xq = torch.randint(-128, 128, (3, k + 16), dtype=torch.int8)
    xq3, xq3_off = xq[:, :k], xq[:, 1:k + 1]
    a = torch.rand(3) + 1
    w1, w2 = weights(64, k), weights(32, k)
    nw = torch.rand(k, dtype=torch.bfloat16) + 0.5
    xf3 = torch.randn(3, k, dtype=torch.bfloat16)
    q, kk, v = (torch.randn(1, 1, h, 64, dtype=torch.bfloat16) for h in (4, 2, 2))
    cos, sin = torch.randn(1, 1, 64, dtype=torch.bfloat16), torch.randn(1, 1, 64, dtype=torch.bfloat16)
    cache_k, cache_v = torch.zeros(1, 2, 160, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 160, 64, dtype=torch.bfloat16)
    pos = torch.tensor([7])
    head = torch.randint(-127, 128, (96, k), dtype=torch.int8)
    return [
        ("gemv_cat, float x, two matrices, bias", gemv._gemv_kernel,
         lambda: gemv.gemv_cat(x1, [w1, w2], [64, 32], "2bit", [s, s], [torch.randn(64), torch.randn(32)]),
         lambda: gemv.gemv_cat(x1, [w1, w2], [64, 32], "2bit", [s, s], [off(torch.randn(64)), torch.randn(32)])),
        ("gemv with the RMSNorm and the residual", gemv._gemv_kernel,
         lambda: gemv.gemv_cat(x1, [w1], [64], "2bit", [s], [None], norm_weight=nw, eps=1e-5,
                               residual=torch.zeros(1, 64, dtype=torch.bfloat16)),
         lambda: gemv.gemv_cat(x1, [w1], [64], "2bit", [s], [None], norm_weight=nw, eps=1e-5,
                               residual=off(torch.zeros(1, 64, dtype=torch.bfloat16)))),
        ("gemm_cat, split-K, M = 3", gemm._gemm_kernel,
         lambda: gemm.gemm_cat(xq3, [w1, w2], [64, 32], "2bit", [s, s], None, a, None, torch.bfloat16),
         lambda: gemm.gemm_cat(xq3_off, [w1, w2], [64, 32], "2bit", [s, s], None, a, None, torch.bfloat16)),
        ("gemm_cat with the gated RMSNorm, M = 3", gemm._gemm_kernel,
         lambda: gemm.gemm_cat(xf3, [w1, w2], [64, 32], "2bit", [s, s], out_dtype=torch.bfloat16, norm_weight=nw,
                               eps=1e-5, up=xf3),
         lambda: gemm.gemm_cat(off(xf3), [w1, w2], [64, 32], "2bit", [s, s], out_dtype=torch.bfloat16, norm_weight=nw,
                               eps=1e-5, up=xf3)),
        ("gemm with the residual", gemm._gemm_kernel,
         lambda: gemm.gemm(xq3, w1, 64, "2bit", s, None, a, out_dtype=torch.bfloat16,
                           residual=torch.zeros(3, 64, dtype=torch.bfloat16)),
         lambda: gemm.gemm(xq3_off, w1, 64, "2bit", s, None, a, out_dtype=torch.bfloat16,
                           residual=torch.zeros(3, 64, dtype=torch.bfloat16))),
        ("act_quant", activations._act_quant_kernel, lambda: activations.act_quant(x1),
         lambda: activations.act_quant(off(x1))),
        ("rmsnorm_act_quant", rmsnorm_quant._rmsnorm_act_quant_kernel,
         lambda: rmsnorm_quant.rmsnorm_act_quant(x1, nw, 1e-5), lambda: rmsnorm_quant.rmsnorm_act_quant(off(x1), nw, 1e-5)),
        ("unpack_cat of two", layout._unpack_kernel, lambda: layout.unpack_cat([w1, w2], [64, 32], "2bit"),
         lambda: layout.unpack_cat([off(w1), w2], [64, 32], "2bit")),
        ("rmsnorm_act_quant with the unpack of two", rmsnorm_quant._rmsnorm_quant_unpack_kernel,
         lambda: rmsnorm_quant.rmsnorm_act_quant_unpack(x[:, :k], nw, 1e-5, [w1, w2], [64, 32], "2bit"),
         lambda: rmsnorm_quant.rmsnorm_act_quant_unpack(off(x[:, :k]), nw, 1e-5, [w1, w2], [64, 32], "2bit")),
        ("act_quant with the unpack of one", rmsnorm_quant._rmsnorm_quant_unpack_kernel,
         lambda: rmsnorm_quant.rmsnorm_act_quant_unpack(x[:, :k], None, 0.0, [w1], [64], "2bit"),
         lambda: rmsnorm_quant.rmsnorm_act_quant_unpack(off(x[:, :k]), None, 0.0, [w1], [64], "2bit")),
        ("rope_cache", rope._rope_cache_kernel,
         lambda: rope.rope_cache(q, kk, v, cos, sin, cache_k, cache_v, pos),
         lambda: rope.rope_cache(off(q), kk, v, cos, sin, cache_k, cache_v, pos)),
        ("decode attention with the RoPE", attention._decode_attention_kernel,
         lambda: attention.decode_attention(q[:, 0], cache_k, cache_v, pos, rope=(kk[:, 0], v[:, 0], cos[:, 0], sin[:, 0])),
         lambda: attention.decode_attention(off(q[:, 0]), cache_k, cache_v, pos,
                                            rope=(kk[:, 0], v[:, 0], cos[:, 0], sin[:, 0]))),
        ("int8 head", int8_head._int8_linear_kernel, lambda: int8_head.int8_linear(x1, head, torch.rand(96)),
         lambda: int8_head.int8_linear(off(x1), head, torch.rand(96))),
    ]


def main() -> int:
    rec = Recording()
    driver.set_active(rec)
    failed = []
    runtime = triton.knobs.runtime
    for hooks in ("enter", "exit", None):  # (a launcher calls them; this one records what it is given)
        runtime.launch_enter_hook.calls.clear()
        runtime.launch_exit_hook.calls.clear()
        if hooks:
            getattr(runtime, f"launch_{hooks}_hook").add(lambda metadata: None)
        hooked = hooks is not None
        for name, kernel, call, misaligned in scenarios():
            name = f"{name}{f' ({hooks} hook)' if hooked else ''}"
            try:
                call()  # a new autotuning key: Triton 3.6 times even a lone config (one more launch)
                kernel._entries.clear()
                rec.calls.clear()
                call()
                entries = len(kernel._entries)
                call()
                if len(rec.calls) != 2 or entries != 1 or len(kernel._entries) != 1:
                    raise AssertionError(f"{len(rec.calls)} launches, {entries} then {len(kernel._entries)} signatures kept")
                first, direct = comparable(rec.calls[0]), comparable(rec.calls[1])
                if not hooked:  # Triton makes launch metadata for an empty hook chain too; nothing reads it
                    first[6] = direct[6] = None
                if first != direct:
                    diff = [i for i, (p, d) in enumerate(zip(first, direct)) if p != d]
                    raise AssertionError(f"launcher arguments differ at {diff}: {[first[i] for i in diff]} "
                                         f"vs {[direct[i] for i in diff]}")
                misaligned()
                kept = list(kernel._entries.values())
                if len(rec.calls) != 3 or len(kept) != 2 or kept[0].compiled is kept[1].compiled:
                    raise AssertionError(f"a misaligned tensor did not take Triton's path to its own specialization: "
                                         f"{len(rec.calls)} launches, {len(kept)} signatures kept")
                print(f"ok {name}")
            except Exception as e:  # noqa: BLE001
                failed.append(name)
                print(f"FAIL {name}: {type(e).__name__}: {e}")
    try:  # a pinned config (tests/test_configs.py: kernel.configs = [config]) is a new signature, launched as pinned
        name, kernel, call, _ = scenarios()[0]
        saved = kernel.configs
        names = kernel.fn.arg_names
        kernel._entries.clear()
        for pinned in gemv.CONFIGS[-3:]:  # one after another, each list dropped after use, as test_configs does
            kernel.configs = [pinned]
            rec.calls.clear()
            call()
            call()
            launched = [{k: c[9 + names.index(k)] for k in pinned.kwargs} for c in rec.calls]
            if launched != [pinned.kwargs] * 2:
                raise AssertionError(f"pinned {pinned.kwargs}, launched {launched}")
            kernel.configs = saved  # (the pin's list freed just before the next is made: CPython may reuse its address)
        call()
        if len(kernel._entries) != 4:
            raise AssertionError(f"{len(kernel._entries)} signatures kept for three pins and the full list")
        print("ok pinned configs")
    except Exception as e:  # noqa: BLE001
        failed.append("pinned configs")
        print(f"FAIL pinned configs: {type(e).__name__}: {e}")
    try:  # a knob Triton reads at every launch and compiles for (debug) is part of the signature
        name, kernel, call, _ = scenarios()[4]
        kernel._entries.clear()
        call()
        runtime.debug = True
        try:
            call()
        finally:
            runtime.debug = False
        call()
        if len(kernel._entries) != 2 or len(set(id(e.compiled) for e in kernel._entries.values())) != 2:
            raise AssertionError(f"{len(kernel._entries)} signatures kept with debug off and on")
        print("ok the debug knob")
    except Exception as e:  # noqa: BLE001
        failed.append("the debug knob")
        print(f"FAIL the debug knob: {type(e).__name__}: {e}")
    try:  # tensors on another GPU than the current one: the launch runs with theirs current, either path
        launched = other_gpu()
        if launched != [1, 1, 0, 0]:
            raise AssertionError(f"current device at each launch: {launched}, not [1, 1, 0, 0]")
        print("ok tensors on another GPU")
    except Exception as e:  # noqa: BLE001
        failed.append("tensors on another GPU")
        print(f"FAIL tensors on another GPU: {type(e).__name__}: {e}")
    print(f"direct launches: {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: triton.language.constexpr):
    offs = triton.language.arange(0, BLOCK)
    triton.language.store(y_ptr + offs, triton.language.load(x_ptr + offs, mask=offs < n), mask=offs < n)


class OnGpu(torch.Tensor):
    """A CPU tensor that says it is on cuda:<index> (what the launcher asks a tensor: get_device)."""

    index = 1

    def get_device(self):
        return OnGpu.index


def other_gpu() -> list[int]:
    """The device current at each of four launches of one kernel: twice (Triton's path, then the
    direct one) with tensors on cuda:1 while cuda:0 is current, twice with cuda:0's. The driver's
    current device and torch.cuda's device() context are stood in for (no GPU here)."""
    import contextlib

    from bitnet.kernels.launch import Launcher

    state, launched = {"current": 0}, []

    @contextlib.contextmanager
    def device(index):
        before, state["current"] = state["current"], index
        try:
            yield
        finally:
            state["current"] = before

    saved, run, through_triton = torch.cuda.device, triton.runtime.jit.JITFunction.run, []
    torch.cuda.device = device
    triton.runtime.jit.JITFunction.run = lambda self, *a, **k: (through_triton.append(1), run(self, *a, **k))[1]
    rec = Recording()
    rec.get_current_device = lambda: state["current"]
    rec.launcher_cls = lambda src, metadata: (lambda *args: launched.append(state["current"]))
    driver.set_active(rec)
    try:
        kernel = Launcher(_copy_kernel)
        x, y = torch.ones(64).as_subclass(OnGpu), torch.zeros(64).as_subclass(OnGpu)
        for index in (1, 1, 0, 0):  # (one call signature: only the tensors' device differs)
            OnGpu.index = index
            kernel[(1,)](x, y, 64, BLOCK=64)
    finally:
        torch.cuda.device, triton.runtime.jit.JITFunction.run = saved, run
        OnGpu.index = 1
    if len(through_triton) != 2 or len(kernel._entries) != 2:  # (the second launch on each device: direct)
        raise AssertionError(f"{len(through_triton)} launches through Triton's path, {len(kernel._entries)} signatures "
                             f"kept: not one each a device")
    return launched


if __name__ == "__main__":
    sys.exit(main())

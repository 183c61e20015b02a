"""Launching a compiled Triton kernel again without Triton's Python launch path.

Every `kernel[grid](*args, **kwargs)` through Triton binds the arguments, specializes each one
(dtype and 16-byte alignment of a tensor, integers of 1 and multiples of 16), builds the
autotuner's key (a dict of all arguments, the dtype of each tensor), looks both up and reads a
few knobs: about 45 us of host time a launch on a 2-core Xeon (benchmarks/host_overhead.py),
against a few microseconds of GPU work for a decode GEMV and ~3-10 us for a prefill's kernels. An
eager prefill of 2B-4T issues 9 launches a layer, an eager decode step 5: both were bound by
that host time, not by the GPU.

`Launcher` wraps an autotuned (triton.autotune) or plain (triton.jit) kernel. The first launch
with a given call signature goes through Triton as before (tuning, compiling, launching) and
keeps what Triton chose: the compiled kernel and the config. Later launches with the same
signature call that compiled kernel's launcher directly, with the arguments Triton would pass it
(every parameter in order, the config's constexprs included). The signature is finer than
anything Triton specializes or tunes on: each tensor's dtype and 16-byte alignment, every other
argument's type and exact value (so the autotuner's key, which holds shapes, is in it), the
keyword arguments (constexprs, launch options), the device, the identity of the autotuner's
config list (tests pin configs by replacing it; an entry keeps its list alive, so no later list
gets its address) and the knobs Triton reads at every launch and compiles for (debug,
instrumentation). A signature never seen is never guessed: it takes Triton's path, as does every
launch while Triton has pre-run hooks or a stage-inspection hook, a call passing a runtime
parameter by keyword or in a tuple, and everything on ROCm (whose backend specializes tensors on
more). Under CUDA graphs nothing changes (the same launches are recorded). Not re-checked on a
direct launch: Triton's test that the globals a kernel read have not changed since it compiled.
Every launch, by either path, runs on its tensors' GPU (tensor_device), as torch's ops do; Triton's
own path launches on the current device.

The first launch that would take the fast path on a device checks it once (`_verify`: a probe
kernel launched by Triton and then directly, both outputs compared); on any failure the process
keeps Triton's path, with a warning (the check synchronizes the device once; a CUDA graph being
recorded in another thread's global capture mode at that moment would fail, as with common.pdl_probe).
`BITNET_FAST_LAUNCH=0` turns it off. Launch hooks (triton.knobs.runtime.launch_enter_hook and
launch_exit_hook, e.g. Proton's) get the launch metadata Triton would make.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

FAST_LAUNCH_ENV = "BITNET_FAST_LAUNCH"
# (off on ROCm: its backend specializes tensors on more than dtype and alignment)
_STATE = {"enabled": os.environ.get(FAST_LAUNCH_ENV, "1").strip() != "0" and torch.version.hip is None,
          "verified": set()}
MAX_ENTRIES = 4096  # signatures kept per kernel (a server sees many prompt lengths): then it starts over

# The most shared memory one program (CTA) may ask for, in bytes: CUDA's opt-in per-block limit by
# compute capability, what torch reports as shared_memory_per_block_optin (read from the device
# where torch has it). The data-center parts (A100 8.0, Orin 8.7, H100 / H200 9.0, B200 10.0) allow
# 163-227 KB; the workstation and inference parts (A10 / A10G / A40 / RTX 30xx 8.6, L4 / L40S /
# RTX 40xx 8.9, RTX 50xx 12.0) 99 KB. A launch asking for more fails ("out of resources").
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def mma_sync_arch(arch: int) -> bool:
    """Whether Triton runs every tile's tensor-core dots on mma.sync for compute capability `arch`
    (major * 10 + minor): below 9.0 (A100, A10, L4, RTX 30xx / 40xx) and 12.x (RTX 50xx). sm_90
    runs tiles of 64 rows and more on wgmma, sm_100 on tcgen05. The GEMM orders its two dots of
    "1.6bit" by it (gemm.py, FIFTH_FIRST)."""
    return arch < 90 or arch // 10 == 12


def fast_launch_enabled() -> bool:
    return _STATE["enabled"]


def fast_launch(kernel):
    """A Launcher around a compiled kernel (triton.jit or triton.autotune); the kernel itself under
    Triton's interpreter (TRITON_INTERPRET=1 when it is decorated), where nothing is compiled."""
    return kernel if os.environ.get("TRITON_INTERPRET") == "1" else Launcher(kernel)


def triton_kernel(kernel):
    """The Autotuner or JITFunction behind a Launcher (itself for anything else)."""
    return kernel.kernel if isinstance(kernel, Launcher) else kernel


def _picker(positions: list[int]):
    """args -> the tuple of args at `positions` (operator.itemgetter, which returns a lone item bare)."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def _split_of(types: tuple) -> tuple:
    """(picker of the tensors, picker of the other arguments) for arguments of these types."""
    tensor = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
    return _picker(tensor), _picker([i for i in range(len(types)) if i not in tensor])


_SPLITS: dict = {}  # argument types -> _split_of(them) (a few per kernel: which optional pointers are None)


class _Meta(Mapping):
    """What a grid callable is given: every argument by name, the config's constexprs over them (a
    dict of them, as Triton's, made only for the names the grid reads)."""
    __slots__ = ("_index", "_args", "_meta")

    def __init__(self, index: dict, args: tuple, meta: dict):
        self._index, self._args, self._meta = index, args, meta

    def __getitem__(self, name):
        if name in self._meta:
            return self._meta[name]
        i = self._index[name]
        if i >= len(self._args):
            raise KeyError(name)
        return self._args[i]

    def __iter__(self):
        return iter({**dict(zip(self._index, self._args)), **self._meta})

    def __len__(self):
        return len({**dict(zip(self._index, self._args)), **self._meta})


class _Entry:
    # configs: the autotuner's config list the signature names by id, kept alive so that no other
    # list (a test's next pinned config) can be given its address
    __slots__ = ("compiled", "tail", "meta", "configs")

    def __init__(self, compiled, tail: tuple, meta: dict, configs):
        self.compiled, self.tail, self.meta, self.configs = compiled, tail, meta, configs


class Launcher:
    """kernel[grid](*args, **kwargs), as Triton launches it; attributes are the wrapped kernel's
    (`configs`, `fn`, ...), and setting `configs` sets the autotuner's."""

    def __init__(self, kernel):
        object.__setattr__(self, "kernel", kernel)
        jit = kernel
        while not isinstance(jit, triton.runtime.jit.JITFunction):
            jit = jit.fn
        object.__setattr__(self, "_jit", jit)
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(jit.arg_names)})  # argument name -> position
        # parameters that are not constexpr: a call passing one by keyword is not kept (its type and
        # value would have to be in the signature), nor one that leaves one to its default
        object.__setattr__(self, "_runtime", {p.name for p in jit.params if not p.is_constexpr})
        object.__setattr__(self, "_entries", {})
        object.__setattr__(self, "_tuned", hasattr(kernel, "configs"))

    def __getattr__(self, name):
        if name == "kernel" or name.startswith("__"):  # (copy / pickle probe these before __init__ ran)
            raise AttributeError(name)
        return getattr(self.kernel, name)

    def __setattr__(self, name, value):
        setattr(self.kernel, name, value)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _signature(self, args: tuple, kwargs: dict, device: int) -> tuple:
        # The arguments' types, then each tensor's dtype and 16-byte alignment and every other
        # argument's value (its type is in the first part: 1, 1.0 and True hash alike), each part
        # picked out at C speed by the split its types call for.
        types = tuple(map(type, args))
        split = _SPLITS.get(types)
        if split is None:
            split = _SPLITS[types] = _split_of(types)
        sig = (types, split[1](args), tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in split[0](args)]))
        # what JITFunction.run reads on every launch and compiles for (debug, instrumentation)
        knobs = triton.knobs
        compilation = knobs.compilation
        flags = (knobs.runtime.debug, compilation.instrumentation_mode, getattr(compilation, "fpsan_homomorphic_casts", None))
        return sig, tuple(kwargs.items()), device, id(self.kernel.configs) if self._tuned else None, flags

    def launch(self, grid, args: tuple, kwargs: dict):
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        index = tensor_device(args)
        if index >= 0 and index != device:  # (Triton launches on the current device, torch's ops on their tensors')
            with torch.cuda.device(index):
                return self._launch(grid, args, kwargs, driver, index)
        return self._launch(grid, args, kwargs, driver, device)

    def _launch(self, grid, args: tuple, kwargs: dict, driver, device: int):
        if not _STATE["enabled"] or self._jit.pre_run_hooks or getattr(triton.knobs.runtime,
                                                                       "add_stages_inspection_hook", None):
            return self.kernel[grid](*args, **kwargs)  # (hooks Triton runs or compiles for at every launch)
        try:
            key = self._signature(args, kwargs, device)
            entry = self._entries.get(key)
        except TypeError:  # an unhashable argument: Triton's path, always
            return self.kernel[grid](*args, **kwargs)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)  # Triton's path: tune, compile, launch
            self._keep(key, compiled, args, kwargs)
            return compiled
        if device not in _STATE["verified"] and (_capturing() or not _verify(device)):
            return self.kernel[grid](*args, **kwargs)  # (checked at the first eager launch, not inside a recording)
        compiled = entry.compiled
        if callable(grid):
            grid = grid(_Meta(self._index, args, entry.meta))
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = driver.get_current_stream(device)
        knobs = triton.knobs.runtime
        enter, leave = knobs.launch_enter_hook, knobs.launch_exit_hook
        all_args = args + entry.tail
        # (what the hooks read, made where Triton makes it; hook chains with no hook registered read nothing)
        unread = getattr(enter, "calls", True) == [] and getattr(leave, "calls", True) == []
        metadata = None if enter is None or unread else compiled.launch_metadata(grid, stream, *all_args)
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave,
                     *all_args)
        return compiled

    def _keep(self, key, compiled, args: tuple, kwargs: dict) -> None:
        """Remember what Triton launched for this signature: the compiled kernel and the values of
        the parameters after the positional ones (keyword constexprs, the config's, those left to
        their defaults: all in the compiled kernel's constants), in the order Triton passes them
        to the kernel's launcher. Nothing is kept where that cannot be told for certain."""
        constants = getattr(getattr(compiled, "src", None), "constants", None)  # {(index,): value} of its constexprs
        if constants is None or any(n in self._runtime for n in kwargs) or \
                any(isinstance(a, (tuple, list)) for a in args):  # (tensors in a tuple would be kept alive)
            return
        # (the config's constexprs from the compiled kernel itself, not from the autotuner's best_config,
        # which another thread's launch may have changed since)
        names = list(self._index)[len(args):]
        tail = []
        for i, n in enumerate(names, start=len(args)):
            if n in kwargs:
                tail.append(kwargs[n])
            elif (i,) in constants:
                tail.append(constants[(i,)])
            else:  # a runtime parameter left to its default (or set by a config): Triton's path, always
                return
        tail = tuple(tail)
        meta = dict(zip(names, tail))
        compiled._init_handles()  # (Triton does it at its first launch; here before any direct one)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = _Entry(compiled, tail, meta, self.kernel.configs if self._tuned else None)


def tensor_device(args: tuple) -> int:
    """The CUDA device of a launch's first tensor argument (-1: a CPU tensor, or none). Triton
    launches on the current device's stream, whatever device the tensors are on (a model on cuda:1
    while cuda:0 is current would be launched on cuda:0 with cuda:1's pointers); torch's own ops
    follow their tensors, and so does every launch here: where this device is not the current one,
    it is made current for the launch."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.get_device()
    return -1


@triton.jit
def _launch_probe_kernel(out_ptr, value, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.zeros([BLOCK], tl.float32) + value, mask=offs < n)


_probe = None


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _verify(device: int) -> bool:
    """Whether a direct launch does what Triton's does on `device`: the probe kernel launched by
    Triton (first signature) and then directly (same signature, another output) writes the same.
    Once a device; on failure the fast path is off for the process (warned)."""
    global _probe
    if getattr(triton.runtime.driver.active, "stand_in", False):  # precompile's driver: nothing runs
        _STATE["verified"].add(device)
        return True
    try:
        if _probe is None:
            _probe = Launcher(_launch_probe_kernel)
        with torch.cuda.device(device):
            outs = [torch.zeros(48, device="cuda") for _ in range(2)]
            _STATE["verified"].add(device)  # (the second probe launch takes the direct path)
            for out in outs:
                _probe[(1,)](out, 2.5, 40, BLOCK=64)
            torch.cuda.synchronize(device)
            expected = torch.zeros(48)
            expected[:40] = 2.5
            if not all(torch.equal(out.cpu(), expected) for out in outs):
                raise RuntimeError(f"the direct launch wrote {outs[1].cpu().tolist()}, Triton's {outs[0].cpu().tolist()}")
        return True
    except Exception:  # noqa: BLE001: Triton's own path always works
        _STATE["verified"].discard(device)
        _STATE["enabled"] = False
        logging.getLogger(__name__).warning("direct Triton launches do not work here (cuda:%d); the kernels launch "
                                            "through Triton's own path (as %s=0)", device, FAST_LAUNCH_ENV, exc_info=True)
        return False

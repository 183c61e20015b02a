"""Compiling what a GPU run launches, without running it: the stand-in driver that makes Triton's
own launch path compile for an architecture instead of launching (launches_compiled: the launch
check of tests/launch_check.py), and the worker processes that compile an autotuning key's configs
side by side into Triton's cache before the autotuner times them (precompile: common.autotune on a
GPU with BITNET_AUTOTUNE=full).

Imports no kernel module at its top (common.py imports it; the workers import the kernels they
compile by name).

    python -m bitnet.kernels.precompile      a worker: compile jobs, one JSON line each on stdin
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field


def _message(e: BaseException) -> str:
    """The compiler's message: the source excerpt it points at (its last lines, where the caret
    is), then every exception in the chain beneath it (a CompilationError's cause is the real
    reason, e.g. the TypeError of two return types)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    lines = f"{type(chain[0]).__name__}: {chain[0]}".strip().splitlines()
    out = lines[:1] + (["    ..."] if len(lines) > 13 else []) + lines[max(1, len(lines) - 12):]
    for cause in chain[1:]:
        text = " ".join(f"{cause}".split())
        out.append(f"caused by {type(cause).__name__}: {text if cause is chain[-1] else text[:160] + ' ...'}")
    return "\n".join(out)


class _FakeUtils:
    """What a compiled kernel asks of the driver's utils when it is made launchable (nothing loads)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        from .launch import SHARED_LIMIT

        return {"max_shared_mem": SHARED_LIMIT.get(self.arch, 232448 if self.arch >= 90 else 166912),
                "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return "stand-in module", "stand-in function", 0, 0, 1024  # (module, function, regs, spills, max threads)


def _no_launch(*args):
    return None


class _FakeDriver:
    """What Triton's launch path asks of the active driver before it compiles, and what a compiled
    kernel asks to be made launchable (launch.Launcher's direct launches): its launcher launches nothing."""

    stand_in = True  # (launch._verify: nothing to check)

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _FakeUtils(arch)
        self.device_name = f"stand-in sm_{arch}"  # (the GPU model of tuning.py's tables)

    def launcher_cls(self, src, metadata):
        return _no_launch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@dataclass
class LaunchLog:
    """What launches_compiled saw: compiles per kernel, and each failure as (kernel, its upper-case
    constexprs, the compiler's message)."""

    compiled: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, dict, str]] = field(default_factory=list)


@contextlib.contextmanager
def launches_compiled(arch: int = 90, as_cuda: bool = True, every_config: bool = False, pdl: bool | None = None):
    """Within it, every Triton launch the package makes on CPU tensors is compiled for sm_<arch>
    through Triton's own launch path instead of run: its real arguments specialized as on a GPU
    (None, 16-byte alignment, integers of 1 become constexprs: what variants() cannot see), with
    ASM, PDL and MMA_SYNC as a CUDA launch on sm_<arch> sets them (pdl: PDL's value instead, False
    as with BITNET_PDL=0), autotuning on its first config (BITNET_AUTOTUNE=first), or with
    every_config on every config that fits, as a GPU's autotuner compiles them for a new key
    (BITNET_AUTOTUNE=compile: the cache a GPU run would fill). Nothing runs: outputs are left as
    allocated. Yields a LaunchLog; each failure is also raised in the caller. as_cuda=False leaves
    ASM, PDL and MMA_SYNC as the launch passes them (precompile's jobs, taken from real CUDA
    launches). The kernels must have been imported without TRITON_INTERPRET; a caller that wants
    the package to pick the Triton path for CPU tensors sets TRITON_INTERPRET=1 after that import
    (bitnet.ops reads it per call). Triton's driver and JITFunction.run are restored on exit."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from .launch import mma_sync_arch

    log = LaunchLog()
    original = JITFunction.run
    policy = os.environ.get("BITNET_AUTOTUNE")

    def run(self, *args, grid, warmup, **kwargs):
        if "ASM" in kwargs and as_cuda:
            kwargs["ASM"] = True
        if "MMA_SYNC" in kwargs and as_cuda:
            kwargs["MMA_SYNC"] = mma_sync_arch(arch)
        if "PDL" in kwargs and as_cuda:
            kwargs["PDL"] = arch >= 90 if pdl is None else pdl and arch >= 90
            if kwargs["PDL"]:
                kwargs["launch_pdl"] = True
        try:
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:
            log.failures.append((self.fn.__name__, {k: v for k, v in kwargs.items() if k.isupper()}, _message(e)))
            raise
        log.compiled[self.fn.__name__] = log.compiled.get(self.fn.__name__, 0) + 1
        return kernel

    previous = driver._active  # (a CPU machine has no driver to reset to)
    driver.set_active(_FakeDriver(arch))
    JITFunction.run = run
    os.environ["BITNET_AUTOTUNE"] = "compile" if every_config else "first"
    try:
        yield log
    finally:
        JITFunction.run = original
        driver._active = previous
        if policy is None:
            os.environ.pop("BITNET_AUTOTUNE", None)
        else:
            os.environ["BITNET_AUTOTUNE"] = policy


# ----------------------------------------------------------------------------- compiling a key's configs in parallel
def _stand_in(spec):
    """A launch argument rebuilt from precompile's description of it: what Triton specializes a
    kernel on (a tensor's dtype and 16-byte alignment; ints and floats by value; None), on the CPU."""
    import torch

    if isinstance(spec, tuple) and spec and spec[0] == "tensor":
        _, dtype, aligned = spec
        t = torch.empty(64, dtype=getattr(torch, dtype))
        return t if aligned else t[1:]  # one element off a 64-byte boundary
    return spec


def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"precompile: cannot describe an argument of type {type(value).__name__}")


def _compile_job(job) -> str | None:
    """One config of one kernel compiled (into Triton's cache on disk, shared with the process that
    asked): None, or the compiler's message."""
    import importlib

    from triton.runtime.jit import JITFunction

    module, name, arg_specs, kwargs, arch = job
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    args = [_stand_in(tuple(spec) if isinstance(spec, list) else spec) for spec in arg_specs]
    try:
        with launches_compiled(arch, as_cuda=False):
            fn.run(*args, grid=(1,), warmup=True, **kwargs)
    except Exception as e:  # the autotuner compiles it again and reports it
        return _message(e)
    return None


def _compile_worker() -> int:
    """A worker's loop: compile jobs (one JSON line each on stdin), answer one JSON line each."""
    import json

    for line in sys.stdin:
        print(json.dumps(_compile_job(json.loads(line))), flush=True)
    return 0


class _Compilers:
    """Worker processes (`python -m bitnet.kernels.precompile`), started once:
    subprocesses rather than multiprocessing's, which would run the caller's main script again in
    each of them."""

    def __init__(self, n: int):
        import atexit
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.procs = [subprocess.Popen([sys.executable, "-m", "bitnet.kernels.precompile"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                      for _ in range(n)]
        atexit.register(self.close)

    def run(self, jobs: list, timeout: float = 180.0) -> None:
        """Compile the jobs, the workers taking them as they finish the last; what fails to compile,
        or is left after `timeout` seconds, the autotuner compiles itself (and reports). A worker
        still busy then is stopped: its pipe would answer the next call's jobs with this one's."""
        import json
        import queue
        import threading
        import time

        todo: queue.Queue = queue.Queue()
        for job in jobs:
            todo.put(job)

        def feed(proc):
            while True:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    proc.stdin.write(json.dumps(job) + "\n")
                    proc.stdin.flush()
                    json.loads(proc.stdout.readline())  # its answer: done (None) or the compiler's message
                except (OSError, ValueError):  # a worker that died
                    return

        threads = [threading.Thread(target=feed, args=(p,), daemon=True) for p in self.procs]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [p for p, t in zip(self.procs, threads) if t.is_alive()]
        for p in stuck:
            p.kill()
        self.procs = [p for p in self.procs if p not in stuck]

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001 (exiting anyway)
                p.kill()


_COMPILERS: _Compilers | None = None
_DONE: set = set()
# What precompile did in this process (the benchmarks stamp it): rounds (one a new autotuning key),
# configs compiled, the seconds the caller waited, the workers.
STATS = {"rounds": 0, "configs": 0, "seconds": 0.0, "workers": 0}


def precompile_workers() -> int:
    """How many processes compile a new autotuning key's configs side by side (BITNET_PRECOMPILE;
    default: the CPUs but two, at most 16, none below 4 CPUs)."""
    value = os.environ.get("BITNET_PRECOMPILE")
    if value is not None and value.strip():
        return max(0, int(value))
    cpus = os.cpu_count() or 1
    return min(16, cpus - 2) if cpus >= 4 else 0


def precompile(fn, configs: list, named_args: dict, kwargs: dict, arch: int, workers: int | None = None) -> int:
    """Compile `configs` of the JITFunction `fn` for a launch with these arguments in `workers`
    processes at once, into Triton's cache on disk, before the autotuner compiles and times them
    one by one (then each is a cache load): Triton compiles serially, ~1 s a config, and a new shape
    of the GEMM tunes 6-8 configs, the GEMV 11. The workers compile from stand-ins that specialize
    as the real arguments do (dtype and alignment of each tensor, the integers' values) through
    Triton's launch path with a stand-in driver for sm_<arch> (launches_compiled), so the cache keys
    are the real launch's. Returns how many configs were compiled (already compiled ones skipped)."""
    global _COMPILERS
    workers = precompile_workers() if workers is None else workers
    if workers < 1:
        return 0
    launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    try:
        arg_specs = [_describe(v) for v in named_args.values()]
        for v in launch.values():
            _describe(v)
    except TypeError:  # an argument no stand-in can replace: the autotuner compiles as it would
        return 0
    base = (fn.fn.__module__, fn.fn.__name__, tuple(arg_specs), tuple(sorted(launch.items())), arch)
    jobs = []
    for config in configs:
        key = base + (str(config),)
        if key not in _DONE:
            _DONE.add(key)
            jobs.append((fn.fn.__module__, fn.fn.__name__, arg_specs, {**launch, **config.all_kwargs()}, arch))
    if not jobs:
        return 0
    import time

    start = time.perf_counter()
    if _COMPILERS is None:
        try:
            _COMPILERS = _Compilers(workers)
        except OSError:  # no processes to be had: compile as Triton would
            os.environ["BITNET_PRECOMPILE"] = "0"
            return 0
    _COMPILERS.run(jobs)
    STATS.update(rounds=STATS["rounds"] + 1, configs=STATS["configs"] + len(jobs), workers=len(_COMPILERS.procs),
                 seconds=STATS["seconds"] + time.perf_counter() - start)
    return len(jobs)


if __name__ == "__main__":
    sys.exit(_compile_worker())

"""Measurement helpers shared by the benchmarks: timing, L2 flushing, stamps, result files.

Benchmarks are scripts apart from the tests (benchmarks/bench_*.py); what they share lives here so
that each is a thin script. Every result file carries `environment()`: device, versions, commit.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
from torch import nn

from .atomic import atomic_write_bytes
from .bitlinear import BitLinear, RMSNorm
from .config import BitNetConfig
from .convert import freeze
from .model import BitNetForCausalLM
from .ops import capture_cuda_graph, record_cuda_graph
from .packing import pack

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve")


def cpu_flags() -> list[str]:
    """The instruction-set flags that matter to the kernels, as /proc/cpuinfo lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in CPU_FLAGS if x in have]
    except OSError:
        pass
    return []


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now (the OS's pick): a benchmark's server, or a
    test's server or torchrun rendezvous beside another test's (pytest-xdist)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url: str, what: str, log_path: str, timeout: float = 600) -> None:
    """Return once `url`/health answers 200 (a server a benchmark started as `proc`); RuntimeError,
    naming `what` and its log, if the process exits first or nothing answers within timeout s."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; its log: {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{what} did not come up within {timeout} s; its log: {log_path}")


def stop_server(proc, timeout: float = 60) -> None:
    """End a server a benchmark started: SIGTERM, then SIGKILL if it has not exited within timeout s."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_script(path: str, name: str | None = None):
    """The Python file at `path` as a module, loaded once a process: how one benchmark script uses
    another (benchmarks/ is no package) or a peer's own Python file. Registered in sys.modules under
    `name` (default: the file's stem) before it runs, as dataclasses look their module up there."""
    import importlib.util
    import sys

    name = name or os.path.splitext(os.path.basename(path))[0]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def environment() -> dict:
    """Where and with what a measurement was taken."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   device_capability=f"{p.major}.{p.minor}")
        try:  # how the Triton kernels launch and tune (bitnet.kernels.common)
            from bitnet.kernels import common, launch, precompile, tuning

            env.update(bitnet_pdl=bool(common.pdl(torch.empty(0, device="cuda"))["PDL"]),
                       bitnet_fast_launch=launch.fast_launch_enabled(),  # (False if the first direct launch failed)
                       bitnet_autotune=common.autotune_policy(),
                       bitnet_tuning={**{k: round(v, 2) for k, v in common.TUNE_STATS.items()},
                                      "precompiled": {k: round(v, 2) for k, v in precompile.STATS.items()},
                                      "tables": {**tuning.STATS, "dir": str(tuning.user_dir())}})
        except Exception as e:  # noqa: BLE001: a stamp never fails a benchmark
            env["bitnet_pdl"] = f"unknown ({type(e).__name__})"
    else:
        env["device"] = f"CPU: {env['cpu']}"
    return env


def save_results(name: str, payload: dict, markdown: str | None = None, out_dir: str | None = None,
                 env: dict | None = None) -> str:
    """Write {environment, **payload} to out_dir/name.json (and name.md); returns the JSON path.
    env: the stamp, where not this process's environment() (a report made from other results)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    # (the stamp before the file is replaced: a changed committed result would stamp the tree dirty;
    # atomic writes: a run stopped mid-write leaves the last complete results, not half a file)
    env = environment() if env is None else env
    atomic_write_bytes(path, (json.dumps({"environment": env, **payload}, indent=2) + "\n").encode())
    if markdown is not None:
        atomic_write_bytes(os.path.join(out_dir, f"{name}.md"), (markdown.rstrip() + "\n").encode())
    return path


class L2Flusher:
    """Writes a buffer larger than the GPU's L2 between timed calls, so that every call reads its
    weights from HBM (an H100's 50 MB L2 holds a packed 2B-class matrix, not its bf16 twin)."""

    def __init__(self, nbytes: int = 256 * 2**20, device: str = "cuda"):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def time_cuda(fn: Callable[[], object], warmup: int = 10, iters: int = 50, flush: L2Flusher | None = None) -> float:
    """Median milliseconds of fn() on the GPU, measured with CUDA events, L2 flushed before each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _median_between_events(fn, iters, flush)


def time_cuda_graph(fn: Callable[[], object], warmup: int = 10, iters: int = 50, flush: L2Flusher | None = None) -> float:
    """Median milliseconds of fn()'s GPU work alone: fn is captured once into a CUDA graph (after
    `warmup` eager calls, where autotuning happens), and each timed replay follows an L2 flush.

    time_cuda times an eager call, and where the host needs longer to issue fn's kernels (Python,
    torch.library dispatch, Triton's launcher) than the GPU needs to run them, its events measure
    the host. A replay issues the whole graph in one call, enqueued while the flush still runs,
    so the events bracket the kernels and the gaps between them on the GPU, nothing else: what a
    model captured in CUDA graphs (torch.compile's "reduce-overhead") pays per call."""
    for _ in range(warmup):
        fn()
    # (where the driver cannot record the kernels' dependent launches, recorded again without PDL)
    graph, _ = record_cuda_graph(lambda: capture_cuda_graph(fn), "a timed call")
    torch.cuda.synchronize()
    return _median_between_events(graph.replay, iters, flush)


def _median_between_events(launch: Callable[[], object], iters: int, flush: L2Flusher | None) -> float:
    """Median milliseconds between CUDA events recorded around launch(), the L2 flushed before each."""
    times = []
    for _ in range(iters):
        if flush is not None:
            flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_ops(fn: Callable[[], object], device: torch.device | str) -> dict[str, list[float]]:
    """{name: [calls, microseconds]} of one call of fn() under torch.profiler: the GPU kernels and
    their time on the GPU (each kernel's own interval, CUDA-graph replays included) where device is
    CUDA; else the CPU ops and their self time. fn should be warm (compiled, tuned)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    ops: dict[str, list[float]] = {}
    for evt in prof.events():
        on_gpu = evt.device_type == torch.autograd.DeviceType.CUDA
        if on_gpu != cuda:
            continue
        if cuda:
            us = evt.time_range.elapsed_us()
        else:
            us = evt.self_cpu_time_total
        row = ops.setdefault(evt.name, [0, 0.0])
        row[0] += 1
        row[1] += us
    return ops


def step_profile(run: Callable[[int], object], steps: int, device: torch.device | str, top: int = 15) -> dict:
    """What one decode step spends, by kernel (GPU) or op (CPU): run(n) generates n tokens, so the
    profile of run(steps + 1) minus that of run(1) (the prefill and the first token), divided by
    steps, is the decode steps' alone, through the real generate loop (CUDA graphs included).

    Returns {"steps", "busy_us" (the kernels' summed time a step: the floor a CUDA graph can
    approach; on a CPU the ops' self time), "launches" (kernels or ops a step), "rows": the `top`
    costliest, each {name, calls (a step), us (a step), share}, "calls": {name: calls a step} of
    every kernel or op (what ran does not depend on the timings' ranking)}."""
    run(steps + 1)  # warm: both lengths compiled and tuned
    base, full = profile_ops(lambda: run(1), device), profile_ops(lambda: run(steps + 1), device)
    rows = []
    for name, (calls, us) in full.items():
        b_calls, b_us = base.get(name, (0, 0.0))
        c, t = (calls - b_calls) / steps, (us - b_us) / steps
        if c > 0:  # what the decode steps launch (the prefill's own kernels cancel, up to its noise)
            rows.append({"name": name, "calls": c, "us": max(t, 0.0)})
    busy = sum(r["us"] for r in rows)
    rows.sort(key=lambda r: -r["us"])
    for r in rows:
        r["share"] = r["us"] / busy if busy else 0.0
    return {"steps": steps, "busy_us": busy, "launches": sum(r["calls"] for r in rows), "rows": rows[:top],
            "calls": {r["name"]: r["calls"] for r in rows}}


def time_cpu(fn: Callable[[], object], warmup: int = 2, iters: int = 10) -> float:
    """Median milliseconds of fn() on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_cpu_cycled(fn: Callable[[int], object], copies: int, warmup: int = 1, iters: int = 5) -> float:
    """Median milliseconds of one call of fn(i) on the CPU, i cycling over `copies` weight copies:
    every call reads weights that the last-level cache does not hold (a whole model's worth of
    copies, one a layer, as decode reads them), not the ones the previous call left there."""
    for i in range(warmup * copies):
        fn(i % copies)
    times = []
    for _ in range(iters):
        for i in range(copies):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copies_for(nbytes: int, total: int = 512 * 2**20, most: int = 256) -> int:
    """How many copies of an nbytes weight make `total` bytes (at least 2): far more than any L3."""
    return max(2, min(most, -(-total // max(nbytes, 1))))


def measured_cpu_bandwidth(nbytes: int = 2**30, reps: int = 5) -> dict:
    """Memory read bandwidth of this CPU in GB/s with torch's threads: the best of `reps` sums over
    an nbytes float32 buffer (written first, so its pages are real), and the same for a copy
    (read + write counted)."""
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    read, copy = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        read.append(nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        y.copy_(x)
        copy.append(2 * nbytes / (time.perf_counter() - t0) / 1e9)
    return {"read_gbps": max(read), "copy_gbps": max(copy), "threads": torch.get_num_threads(), "bytes": nbytes}


def measured_hbm_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """GB/s of a device-to-device copy of `nbytes` (read + write counted), the roofline we compare to."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def train_step_time(config, micro_batch: int, seq_len: int, device: str = "cpu", bf16: bool = False,
                    compile: bool = False, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of one training step (forward, backward, AdamW) of a fresh model."""
    from .model import BitNetForCausalLM

    torch.manual_seed(0)
    model = BitNetForCausalLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    fwd = torch.compile(model) if compile else model
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len), device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if torch.device(device).type == "cuda":
        return time_cuda(step, warmup=warmup, iters=iters)
    return time_cpu(step, warmup=warmup, iters=iters)


def random_model(config: BitNetConfig, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0,
                 packing: str | None = None) -> BitNetForCausalLM:
    """A model of `config` with random weights, made on the meta device and materialized in place
    in its final dtype, as a checkpoint load would be (no float copy of a packed projection ever
    exists): ternary codes drawn uniformly (binary for "1bit"), scales of N(0, 0.02), unit norms,
    N(0, 0.02) biases, embeddings and float linears."""
    device = torch.device(device)
    with torch.device("meta"):
        model = BitNetForCausalLM(config).to(dtype)
    if config.linear != "bf16":
        freeze(model, packing)  # uint8 packed weights and float32 scales, still without memory
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BitLinear):
                w_q = torch.randint(-1, 2, (m.out_features, m.in_features), generator=g, device=device, dtype=torch.int8)
                if m.packing == "1bit":
                    w_q = torch.where(w_q >= 0, 1, -1).to(torch.int8)  # binary {-1, +1}
                m.weight.copy_(pack(w_q, m.packing))
                m.weight_scale.fill_(0.02 * math.sqrt(2 / math.pi))  # mean|W| of N(0, 0.02)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02, generator=g)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02, generator=g)
    model.model.rotary.reset(device)
    return model.eval()

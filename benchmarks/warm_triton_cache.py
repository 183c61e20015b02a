"""A Triton cache for the GPU machine, made on a CPU: what the device script's benchmarks compile,
compiled beforehand and carried, so that a lent GPU's minutes go to timing instead of compiling.

    python benchmarks/warm_triton_cache.py                      # -> .tcache/triton-cache-sm90.tar.xz

On a GPU, each new autotuning key compiles every config that fits (~1 s each with Triton 3.6): the
device script's kernel benchmark has ~40 keys of 4-14 configs, its generate stage ~20 more, all
inside stages of 55-130 s. Here every one of those launches is made on CPU tensors through Triton's
own launch path with a stand-in driver for sm_90 (bitnet.kernels.precompile.launches_compiled,
every_config: BITNET_AUTOTUNE=compile), so each lands in Triton's cache under the key the GPU's
launch computes: the same kernel source, constexprs, argument specialization (dtypes, 16-byte
alignment, integers of 1 and multiples of 16), target and compiler options. What it runs: the
kernel stage's bench_kernels rows (the shapes, M, formats, attention and heads of gpu_check.sh's
command; bf16 F.linear and the timings left out) and the generate stage's packed models
(bench_generate's own measure: the tiny warm-up model, then 2B-4T at batch 1 and 8, the prompt,
decode steps and the 512-token prefill; the serial model with PDL off, the norm-apart one with
BITNET_GEMM_NORM_M=0) and the peer stage's side of this package (peer_transformers: 2B-4T in bf16
and float32, a 32-token prompt's logits and greedy decoding), with split-K sized for the GPU's SMs.
The bf16 twin's kernels are torch.compile's (Inductor needs the GPU), and the test suite's are not
made here.

A cache entry is valid only for the Triton build that made it (Triton hashes its own files into
every key) and the libtriton of one Python version: run this with the GPU machine's Python and
Triton (3.12 and 3.6.0, the device tool's KINDS.md), e.g. in a venv of torch==2.11.0 (which pins
triton==3.6.0) on Python 3.12. Triton's group files hold absolute paths, so the cache is built in
the directory the GPU machine uses (CACHE_DIR, /tmp/bitnet-triton-cache; gpu_check.sh unpacks it
there and points TRITON_CACHE_DIR at it). The archive keeps each entry's metadata and cubin (its
IR files dropped: nothing at run time reads them) and a manifest (Triton, its key, Python, the
launches compiled); gpu_check's stamp says whether this machine's Triton matches it and its summary
how many kernels the call still compiled.

Carry `.tcache` with `.whl` and `.peers` (git-ignored: `/.tcache/` in .git/info/exclude).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

CACHE_DIR = "/tmp/bitnet-triton-cache"  # (gpu_check.sh's TCACHE: the same path on both machines)
ARCHIVE = "triton-cache-sm{arch}.tar.xz"
MANIFEST = "manifest.json"
GPU_MACHINE = {"python": (3, 12), "triton": "3.6.0"}  # the device tool's KINDS.md
KERNEL_STAGE = dict(shapes=["2560x6912", "6912x2560", "8192x8192", "28672x8192"], m=[1, 16, 2048], formats=["2bit"],
                    m1_formats=["1.6bit", "1bit"], attention=True, heads=True)  # (gpu_check.sh's kernels stage)
GENERATE_MODELS = ["bitnet", "bitnet-serial", "bitnet-norm-apart"]  # (call 2's packed models; call 1 runs "bitnet")
PARTS = ["kernels", "generate", "peer"]  # (gpu_check's stages whose launches are made here)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".tcache",
                   help="folder of the archive (default .tcache, carried to the GPU machine)")
    p.add_argument("--cache-dir", default=CACHE_DIR,
                   help=f"the cache built (and its path on the GPU machine; default {CACHE_DIR})")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    p.add_argument("--models", nargs="+", default=GENERATE_MODELS, help="bench_generate's packed models to run")
    p.add_argument("--arch", type=int, default=90, help="compute capability as one number (default 90: H100, H200)")
    p.add_argument("--sms", type=int, default=132,
                   help="the GPU's SMs, for split-K's splits (default 132: H100 SXM, H200)")
    p.add_argument("--preset", default="2b4t", help="the generate stage's model (default 2b4t)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps a generate run (the stage's 32)")
    p.add_argument("--shapes", nargs="+", default=KERNEL_STAGE["shapes"], help="the kernel stage's N x K shapes")
    p.add_argument("--m", nargs="+", type=int, default=KERNEL_STAGE["m"], help="the kernel stage's rows")
    p.add_argument("--m1-formats", nargs="*", default=KERNEL_STAGE["m1_formats"],
                   help="the kernel stage's M = 1-only formats")
    p.add_argument("--no-heads", action="store_true", help="leave out the lm_head GEMVs (128256 x 2560)")
    p.add_argument("--no-attention", action="store_true", help="leave out the decode attention's cases")
    p.add_argument("--reuse", action="store_true",
                   help="keep what the cache already holds (e.g. an archive unpacked into it) and say how many "
                        "kernels this run still compiled: 0 where every launch found its entry")
    p.add_argument("--any-version", action="store_true",
                   help="build with this Python and Triton although they are not the GPU machine's "
                        "(a cache for this machine)")
    return p.parse_args(argv)


def check_versions(args: argparse.Namespace) -> None:
    import triton

    here = {"python": sys.version_info[:2], "triton": triton.__version__}
    if here != GPU_MACHINE and not args.any_version:
        sys.exit(f"warm_triton_cache: this is Python {'.'.join(map(str, here['python']))} with Triton "
                 f"{here['triton']}; the GPU machine runs Python {'.'.join(map(str, GPU_MACHINE['python']))} with "
                 f"Triton {GPU_MACHINE['triton']}, and a Triton cache serves only the Triton (and libtriton) that "
                 f"made it: "
                 f"run this in such an environment (e.g. a Python 3.12 venv with torch==2.11.0), or pass --any-version")


def sibling(name: str):
    """The benchmark script benchmarks/<name>.py as a module (loaded once): its own launch sequences."""
    from bitnet.bench import load_script

    return load_script(str(Path(__file__).resolve().parent / f"{name}.py"))


def stand_in_gpu(sms: int) -> None:
    """Where the package decides by the device, a GPU's decisions for CPU tensors: split-K for `sms`
    SMs; the KV cache in the model's dtype, read whole (as tests/launch_check.py)."""
    import bitnet.generation as generation
    import bitnet.model as bm
    import bitnet.serve.runner as runner
    from bitnet.kernels import gemm

    gemm.multiprocessors = lambda device: sms
    bm.attention_dtype = runner.attention_dtype = generation.attention_dtype = lambda x, device=None: x.dtype
    bm.BitNetForCausalLM._set_cache_window = lambda self, pos: setattr(self.model.layers[0].self_attn.kv_cache.window,
                                                                        "live", None)


def kernel_stage(args: argparse.Namespace) -> None:
    """bench_kernels' rows as the kernel stage runs them, each layer called once, nothing timed."""
    import types

    import torch

    bk = sibling("bench_kernels")
    once = lambda fn, *a, **k: (fn(), 1.0)[1]  # noqa: E731 (a "timing": one call, which compiles)
    bk.time_cuda_graph = bk.time_cuda = once
    bk.L2Flusher = lambda **k: None
    bk.measured_hbm_bandwidth = lambda: 1.0
    functional = bk.F

    class F(types.ModuleType):  # torch.nn.functional with bf16 F.linear left out (cuBLAS's side of a row)
        linear = staticmethod(lambda x, w: x.new_empty(*x.shape[:-1], w.shape[0]))

        def __getattr__(self, name):
            return getattr(functional, name)

    bk.F = F("F")
    bench = bk.BenchArgs(device="cpu", shapes=args.shapes, m=args.m, formats=KERNEL_STAGE["formats"],
                         m1_formats=args.m1_formats, attention=not args.no_attention, heads=not args.no_heads, warmup=0,
                         iters=1)
    with torch.no_grad():
        if bench.attention:
            bk.measure_attention(bench, "cpu")
        if bench.heads:
            bk.measure_heads(bench, "cpu")
        bk.measure(bench, "cpu")


def generate_stage(args: argparse.Namespace, model: str) -> None:
    """bench_generate's measure of one packed model as the generate stage runs it (eager here: the
    compiled decode step launches the same kernels), nothing timed."""
    bg = sibling("bench_generate")
    clock = itertools.count(1)  # (a "timing" per run: one call, which compiles; later runs "take longer": no 0 ms step)
    bg.time_cpu = lambda fn, warmup, iters: (fn(), float(next(clock)))[1]
    run = bg.Args(device="cpu", preset=args.preset, models=[model], batch=[1, 8], prompt_len=128, prefill_len=512,
                  new_tokens=args.new_tokens, compile=False, prefill_graph=False, warmup=0, iters=1, rounds=1,
                  profile_steps=0, isolate=False)
    bg.measure(run, model)


def source_commit() -> str | None:
    """The checkout's commit (with "+changes" where its kernels differ from it): a kernel changed
    since leaves its old entries unused."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "kernels"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def entries(cache: Path) -> list[str]:
    """The cache's compiled kernels: its entries holding a binary."""
    return [p.name for p in cache.iterdir() if p.is_dir() and any(p.glob("*.cubin"))]


def peer_stage(args: argparse.Namespace) -> None:
    """peer_transformers' side of this package as the peer stage runs it: 2B-4T in bf16 and in
    float32, the logits over a 32-token prompt (batch 1) and a greedy generate of 32 tokens."""
    import torch

    from bitnet import BitNetConfig
    from bitnet.bench import random_model

    peer = sibling("peer_transformers")
    run = peer.PeerArgs(device="cpu", preset=args.preset).resolved()
    config = BitNetConfig.from_preset(args.preset)
    ids = torch.randint(3, config.vocab_size, (1, run.prompt_len), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float32):
        model = random_model(config, dtype, "cpu")
        peer.logits_ours(model, ids)
        peer.greedy_ours(model, ids, args.new_tokens)
        model.setup_cache(1, run.prompt_len + args.new_tokens)
        peer.greedy_ours(model, ids, args.new_tokens)
        del model


def pack_cache(cache: Path, out: Path, arch: int, manifest: dict) -> Path:
    """The cache as an archive of each entry's metadata and binary (paths relative to the cache),
    the group files naming only those, and the manifest."""
    keep = (".json", ".cubin", ".hsaco")
    for entry in sorted(p for p in cache.iterdir() if p.is_dir()):
        for f in entry.iterdir():
            if f.is_file() and not f.name.endswith(keep) or f.name == "lock":
                f.unlink()
        for grp in entry.glob("__grp__*.json"):
            data = json.loads(grp.read_text())
            data["child_paths"] = {k: v for k, v in data.get("child_paths", {}).items() if Path(v).exists()}
            grp.write_text(json.dumps(data))
    manifest["entries"] = len(entries(cache))
    (cache / MANIFEST).write_text(json.dumps(manifest, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    path = out / ARCHIVE.format(arch=arch)
    tmp = path.with_suffix(".part")
    with tarfile.open(tmp, "w:xz") as tar:
        for p in sorted(cache.iterdir()):
            tar.add(p, arcname=p.name)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cache = Path(args.cache_dir)
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # (before Triton reads it)
    os.environ.pop("TRITON_INTERPRET", None)
    check_versions(args)
    if cache.exists() and not args.reuse:
        shutil.rmtree(cache)  # only this run's compiles go in the archive
    cache.mkdir(parents=True, exist_ok=True)
    before = set(entries(cache))

    import importlib
    import pkgutil

    import bitnet.kernels
    from bitnet.kernels import precompile

    # every kernel a real JITFunction (not the interpreter's): imported before TRITON_INTERPRET is set
    for module in pkgutil.iter_modules(bitnet.kernels.__path__):
        if module.name not in ("compile_check", "cpu"):
            importlib.import_module(f"bitnet.kernels.{module.name}")

    # from here on only so that bitnet.ops takes the Triton path for CPU tensors
    os.environ.update(TRITON_INTERPRET="1", BITNET_KERNEL="triton", BITNET_CPU_DISABLE="1")
    stand_in_gpu(args.sms)
    start = time.perf_counter()
    compiled: dict[str, int] = {}
    failures: list = []
    parts = [("kernels", None)] * ("kernels" in args.parts) + [("generate", m) for m in args.models] * (
        "generate" in args.parts) + [("peer", None)] * ("peer" in args.parts)
    for part, model in parts:
        pdl = False if model is not None and not sibling("bench_generate").MODELS[model].pdl else None
        t0 = time.perf_counter()
        with precompile.launches_compiled(args.arch, every_config=True, pdl=pdl) as log:
            try:
                {"kernels": lambda: kernel_stage(args), "generate": lambda: generate_stage(args, model),
                 "peer": lambda: peer_stage(args)}[part]()
            except Exception as e:  # noqa: BLE001 (the compiles so far stay in the cache)
                failures.append(f"{part} {model or ''}: {type(e).__name__}: {e}")
        for name, n in log.compiled.items():
            compiled[name] = compiled.get(name, 0) + n
        failures += [f"{k} {c}: {m.splitlines()[0]}" for k, c, m in log.failures]
        print(f"{part}{' ' + model if model else ''}: {sum(log.compiled.values())} launches compiled in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    import triton
    from triton.runtime.cache import triton_key

    new = len(set(entries(cache)) - before)
    run = {"parts": args.parts, "models": args.models if "generate" in args.parts else [], "launches": compiled,
           "failures": failures, "compiled": new, "seconds": round(time.perf_counter() - start)}
    earlier = cache / MANIFEST
    runs = json.loads(earlier.read_text()).get("runs", []) if args.reuse and earlier.exists() else []
    manifest = {"triton": triton.__version__, "triton_key": triton_key(),
                "python": ".".join(map(str, sys.version_info[:2])), "arch": args.arch, "sms": args.sms,
                "cache_dir": str(cache), "commit": source_commit(), "runs": runs + [run]}
    path = pack_cache(cache, Path(args.out), args.arch, manifest)
    print(f"{manifest['entries']} kernels for sm_{args.arch} with Triton {triton.__version__} "
          f"(Python {manifest['python']}): {len(before)} found in the cache, {new} compiled, in {run['seconds']} s "
          f"-> {path} ({path.stat().st_size / 1e6:.1f} MB)")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

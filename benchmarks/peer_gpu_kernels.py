"""Our packed 2-bit layer against its GPU peers, bitnet.cpp W2A8, gemlite and bf16 cuBLAS, in one run.

Issue 27: bitnet.cpp's W2A8 GEMV, gemlite's A8W158 layer and bf16 F.linear (cuBLAS) beside ours, on
one CUDA device, in one process.

    python benchmarks/peer_gpu_kernels.py --prepare --bitnet-git PATH   # with pip and a git of microsoft/BitNet
    python benchmarks/peer_gpu_kernels.py                               # on the GPU machine (no network), < 90 s
    python benchmarks/peer_gpu_kernels.py --shapes 2560x6912 --m 1 --peers bf16 ours bitnet.cpp

Nothing of a peer is committed. --prepare (run where pip and a git of microsoft/BitNet are; measures
nothing) puts what the GPU call needs into git-ignored folders that travel with it:
- .peers/bitnet-gpu/gpu: bitnet.cpp's gpu/ folder exported with `git archive` (less its 2 MB
  tokenizer.model), its commit in .peers/bitnet-gpu/COMMIT;
- .whl/gemlite-<version>-py3-none-any.whl: gemlite publishes an sdist only, so it is built here
  into a pure-Python wheel (`pip wheel --no-deps`). 0.6.0.post2 requires triton >= 3.6 (and numpy,
  tqdm): the GPU machine's triton 3.6 / torch 2.11 meet it. benchmarks/gpu_check.sh's install stage
  installs .whl/*.whl into /tmp/site, which must be on PYTHONPATH.

On the GPU, for every (shape N x K = out x in, M) of the plan, with the same random ternary weights
and bf16 activations for every system, each system is first checked against the exact reference
(weights unpacked, the integer product x_q W_q^T in float64, times the scales, with the int8
activations that system itself computes), then timed as bench_kernels.py times, with bitnet.bench's
helpers, the L2 flushed before every timed call, median of --iters calls after --warmup: its GPU
work alone (time_cuda_graph: the call captured in a CUDA graph and replayed; the headline and the
ratios) and the eager call (time_cuda, where the host's time to issue the kernels counts wherever it
is the longer: Python, ctypes, gemlite's custom op):
- bf16 F.linear: cuBLAS on W_q * s in bf16, the common yardstick.
- ours: bitnet.kernels.bitlinear(x, packed, scale, n, "2bit"), bf16 x -> bf16 y, activation
  quantization inside; and at M = 1 "ours, int8 x given": packed_matmul from act_quant's x_q
  (quantization not timed), the counterpart of bitnet.cpp's kernel alone.
- bitnet.cpp W2A8 (microsoft/BitNet gpu/, built here with nvcc as its compile.sh builds it, into a
  shared library called through ctypes on torch's current stream): its ladder_int8xint2_kernel, a
  GEMV for M = 1 at the (N, K) its dispatch hard-codes. "int8 x given": the kernel alone, from int8
  x and its bf16 scale prepared outside (activation quantization not timed, as in its README's
  table); "+ act_quant": this package's act_quant (one Triton kernel), the scale cast to bf16, the
  output allocation and the kernel, i.e. the layer from bf16 x. With --instantiate (default) its
  kernel template is also instantiated by us, unchanged, at the shapes its dispatch lacks, and
  launched as its dispatch launches it; those rows say "instantiated here". Before any timing its
  output is checked exactly too: with unit scales it must equal bf16(x_q W_q^T) bit for bit.
- gemlite A8W158_INT_dynamic (pure Triton): its layer from bf16 x, its own per-token int8
  quantization (x / (absmax / 127), rounded half away from zero: a few values may differ from ours
  by one, so its reference uses its own x_q), its output zeroing and its kernel (GEMV_REVSPLITK at
  M = 1, GEMM_SPLITK for small M, GEMM from M = 64), with bf16 atomic adds across the K split.
  Autotuning: gemlite's own default ("fast": up to 17 candidate configs) for its M = 1 GEMV, its
  "default" list (2 configs) for GEMM_SPLITK and GEMM, so that the run fits its time
  (--gemlite-autotune); it ships no tuned configs for INT8 x 2-bit on any GPU, nor any for an H200.
Each system's packed layout is made by its own code from the same int8 W_q: ours bitnet.packing.pack,
bitnet.cpp its gpu/pack_weight.py (convert_weight_int8_to_int2), gemlite its from_weights; both
peers' layouts are also decoded back (the decoders below, written from their kernels' source) and
compared with W_q before their first call. A peer that fails to build, import or run, or is wrong
(relative RMS error over --tolerance, or the exact check fails), gets a row saying so, and the run
goes on. The plan, most wanted first: --shapes at M = 1, then --m1-shapes at M = 1, then --shapes at
every other M. Autotuning from cold caches (ours and gemlite's, every shape and M) costs far more than
the timing, so nothing new starts after --budget-s seconds: what is left is listed as skipped, with
the command lines that run it. Results, saved after every cell: benchmarks/results/
peer_gpu_kernels_cuda.{json,md}; the markdown is printed at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import glob
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bitnet.bench import (RESULTS_DIR, L2Flusher, load_script, measured_hbm_bandwidth, save_results, time_cpu, time_cuda,
                          time_cuda_graph)
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.packing import pack, packed_rows
from bitnet.quant import int_matmul, quantize_activation
from bitnet.report import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.path.join(ROOT, ".peers")
WHEEL_DIR = os.path.join(ROOT, ".whl")
BITNETCPP_SRC = os.path.join(PEERS_DIR, "bitnet-gpu", "gpu")
GEMLITE_VERSION = "0.6.0.post2"
SHAPES = ["2560x6912", "6912x2560", "8192x8192", "28672x8192"]  # issue 27's (2B-4T MLP, 8B-class)
# bitnet.cpp's README table cites these two with 2560x6912; its dispatch lists more (--m1-shapes)
M1_SHAPES = ["13824x2560", "20480x3200"]
PEERS = ["bf16", "ours", "bitnet.cpp", "gemlite"]
GEMLITE_AUTOTUNE = ["GEMV_REVSPLITK=fast", "GEMM_SPLITK=default", "GEMM=default"]
TOLERANCE = 0.1  # ||y - ref|| / ||ref||: bf16 rounding and gemlite's bf16 atomics stay far below, a wrong layout is ~1


@dataclasses.dataclass
class PeerArgs:
    shapes: list[str] = arg(SHAPES, help="weight shapes N x K (out x in features), timed at every --m")
    m1_shapes: list[str] = arg(M1_SHAPES, help="more shapes, timed at M = 1 only (bitnet.cpp's; its dispatch "
                               "also has 2560x2560 3840x2560 3200x3200 4800x3200 3200x10240 5120x27648 55296x5120)")
    m: list[int] = arg([1, 16, 2048], help="activation rows M (tokens)")
    peers: list[str] = arg(PEERS, choices=PEERS, help="systems to time")
    src: str = arg(BITNETCPP_SRC, help="bitnet.cpp's gpu/ folder (microsoft/BitNet), as --prepare exports it")
    build_dir: str | None = arg(None, help="where bitnet.cpp is built (default: ~/.cache/bitnet-peers/bitnet-gpu-<hash "
                                "of sources and flags>, reused when there)")
    instantiate: bool = arg(True, help="also time bitnet.cpp's kernel template instantiated at the shapes its "
                            "dispatch lacks (rows marked 'instantiated here')")
    gemlite_autotune: list[str] = arg(GEMLITE_AUTOTUNE, help="gemlite.set_autotune per matmul type, TYPE=fast|default|max")
    tolerance: float = arg(TOLERANCE, help="largest ||y - ref|| / ||ref|| of a correct system")
    warmup: int = arg(10, help="untimed calls before timing (after the check call, which autotunes)")
    iters: int = arg(50, help="timed calls; the median is reported")
    budget_s: float = arg(70.0, help="nothing new starts after this many seconds (from the setup on); what is left "
                          "is listed as skipped, with the command that runs it")
    seed: int = arg(0)
    out_dir: str = arg(RESULTS_DIR, help="where the JSON and markdown go")
    name: str = arg("peer_gpu_kernels_cuda", help="file name of the results, without extension")
    prepare: bool = arg(False, help="export bitnet.cpp's gpu/ into .peers/ and build gemlite's wheel into .whl/ "
                        "(needs pip's index and --bitnet-git); measures nothing")
    bitnet_git: str | None = arg(None, help="with --prepare: a clone, or a bare git directory, of microsoft/BitNet")
    gemlite_version: str = arg(GEMLITE_VERSION, help="with --prepare: the gemlite release to build a wheel of")


def parse_shape(s: str) -> tuple[int, int]:
    n, k = (int(v) for v in s.lower().split("x"))
    return n, k


def plan(shapes: list[str], m1_shapes: list[str], ms: list[int]) -> list[tuple[str, int]]:
    """The (shape, M) cells in the order they run: what matters most first, so that a run cut short by
    its time budget still has it (M = 1 at the issue's shapes, bitnet.cpp's shapes, then larger M)."""
    cells = ([(s, 1) for s in shapes] + [(s, 1) for s in m1_shapes]) if 1 in ms else []
    cells += [(s, m) for m in ms if m != 1 for s in shapes]
    return list(dict.fromkeys(cells))


# ----------------------------------------------------------------------------- the checks
def compare(y: torch.Tensor, ref: torch.Tensor) -> dict:
    """Errors of y against the float64 reference: relative RMS (the pass criterion) and max."""
    d = y.double() - ref
    scale = ref.abs().max().clamp(min=1e-30)
    return {"rel_rms": (d.norm() / ref.norm().clamp(min=1e-30)).item(), "rel_max": (d.abs().max() / scale).item(),
            "max_abs": d.abs().max().item()}


def exact_mismatches(y_bf16: torch.Tensor, acc: torch.Tensor) -> int:
    """Elements where y differs from bf16(float32(acc)), the output of a kernel that converts its exact
    int32 sum to float and to bf16 (round to nearest even) with unit scales."""
    want = acc.to(torch.float32).to(torch.bfloat16)
    return int((y_bf16.view(torch.int16) != want.view(torch.int16)).sum().item())


def verdict(err: dict | None, tolerance: float, mismatches: int | None = None) -> str | None:
    """None where the output is right, else why it is wrong."""
    if mismatches:
        return f"wrong: {mismatches} outputs differ from bf16(x_q W_q^T) with unit scales"
    if err is not None and not err["rel_rms"] <= tolerance:  # NaN is wrong too
        return f"wrong: relative error {err['rel_rms']:.3g} > {tolerance}"
    return None


# ----------------------------------------------------------------------------- bitnet.cpp
DISPATCH = re.compile(r"M\s*==\s*1\s*&&\s*N\s*==\s*(\d+)\s*&&\s*K\s*==\s*(\d+)")
WS = 8  # entries of the weight-scale array the kernel indexes (its dispatch uses ws_num <= 6)


def bitnetcpp_shapes(cu_source: str) -> list[tuple[int, int]]:
    """The (N, K) its dispatch (bitlinear_int8xint2 in bitnet_kernels.cu) launches a kernel for, M = 1."""
    return [(int(n), int(k)) for n, k in DISPATCH.findall(cu_source)]


def instantiable(n: int, k: int) -> bool:
    """Shapes the kernel template can run: blocks of 16 output rows, K in steps of 8 threads x 16 bytes."""
    return n % 16 == 0 and k % 128 == 0


def instantiation_source(shapes: list[tuple[int, int]]) -> str:
    """A .cu that instantiates bitnet.cpp's kernel template (bitnet_kernels.h, unchanged) at `shapes`,
    each launched as its own dispatch launches its shapes (ws_num 1, N / 16 blocks of 8 x 16 threads)."""
    lines = ["// Written by benchmarks/peer_gpu_kernels.py: bitnet.cpp's ladder_int8xint2_kernel (bitnet_kernels.h,",
             "// unchanged) at shapes its dispatch (bitnet_kernels.cu) does not list.",
             '#include "bitnet_kernels.h"', "",
             'extern "C" int bitlinear_int8xint2_at(int8_t* input0, int8_t* input1, __nv_bfloat16* output0, '
             "__nv_bfloat16* s, __nv_bfloat16* ws, int M, int N, int K, cudaStream_t stream) {"]
    for n, k in shapes:
        if not instantiable(n, k):
            raise ValueError(f"bitnet.cpp's kernel needs N % 16 == 0 and K % 128 == 0, not {n}x{k}")
        lines += [f"    if (M == 1 && N == {n} && K == {k}) {{",
                  f"        ladder_int8xint2_kernel<1, {n}, {k}, 1, 8, 16>"
                  f"<<<dim3({n // 16}, 1, 1), dim3(8, 16, 1), 0, stream>>>(input0, input1, output0, s, ws);",
                  "        return 0;", "    }"]
    return "\n".join(lines + ["    return -1;", "}", ""])


def nvcc_command(nvcc: str, source: str, out: str, sm: int, include: str | None = None) -> list[str]:
    """bitnet.cpp's compile.sh, `nvcc -std=c++17 -Xcudafe --diag_suppress=177 --compiler-options -fPIC
    -lineinfo --shared bitnet_kernels.cu -lcuda -gencode=arch=compute_80,code=compute_80 -o libbitnet.so`,
    with two changes: no -lcuda (the source calls no driver API; the library would only fail to link
    where libcuda.so has no development link), and the SASS of this GPU made from the same compute_80
    PTX ahead of time (what the driver's JIT would make of that PTX at the first call)."""
    cmd = [nvcc, "-std=c++17", "-Xcudafe", "--diag_suppress=177", "--compiler-options", "-fPIC", "-lineinfo", "--shared",
           source]
    if include:
        cmd += ["-I", include]
    return cmd + ["-gencode=arch=compute_80,code=compute_80", f"-gencode=arch=compute_80,code=sm_{sm}", "-o", out]


def find_nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    for c in (os.environ.get("NVCC"), shutil.which("nvcc"), CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"),
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class BitnetCppBuild:
    """Its library and, with instantiated shapes, ours over its header: two nvcc runs started side by side
    in the background (the first timings run meanwhile), each cached in build_dir."""

    def __init__(self, src: str, build_dir: str | None, sm: int, extra: list[tuple[int, int]]):
        kernels = os.path.join(src, "bitnet_kernels")
        cu, header = os.path.join(kernels, "bitnet_kernels.cu"), os.path.join(kernels, "bitnet_kernels.h")
        self.nvcc, self.error, self.procs = find_nvcc(), None, {}
        self.info = {"extra_shapes": [f"{n}x{k}" for n, k in extra]}
        if not os.path.isfile(cu):
            self.error = f"no bitnet.cpp source at {cu} (run --prepare where pip and git are, and carry .peers)"
            return
        with open(cu) as f:
            cu_text = f.read()
        if self.nvcc is None:
            self.error = "no nvcc found (PATH, $NVCC, $CUDA_HOME, /usr/local/cuda)"
            return
        with open(header) as f:
            key = hashlib.sha256((cu_text + f.read() + repr((sm, extra, self.nvcc))).encode()).hexdigest()[:12]
        self.dir = build_dir or os.path.join(os.path.expanduser("~"), ".cache", "bitnet-peers", f"bitnet-gpu-{key}")
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError:  # an unwritable home: a fresh folder (no reuse)
            self.dir = tempfile.mkdtemp(prefix=f"bitnet-gpu-{key}-")
        jobs = {"libbitnet.so": nvcc_command(self.nvcc, cu, os.path.join(self.dir, "libbitnet.so"), sm)}
        if extra:
            at = os.path.join(self.dir, "bitnet_kernels_at.cu")
            with open(at, "w") as f:
                f.write(instantiation_source(extra))
            jobs["libbitnet_at.so"] = nvcc_command(self.nvcc, at, os.path.join(self.dir, "libbitnet_at.so"), sm, kernels)
        self.info.update(dir=self.dir, nvcc=self.nvcc, nvcc_version=_nvcc_version(self.nvcc),
                         commands={k: " ".join(c) for k, c in jobs.items()})
        self.t0 = time.perf_counter()
        for lib, cmd in jobs.items():
            if os.path.isfile(os.path.join(self.dir, lib)):
                continue
            log = open(os.path.join(self.dir, lib + ".log"), "w")
            try:
                self.procs[lib] = (subprocess.Popen(cmd, cwd=kernels, stdout=log, stderr=subprocess.STDOUT), log)
            except OSError as e:
                self.error = f"cannot start nvcc: {e}"
                return

    def kernel(self, lib: str) -> Callable[..., torch.Tensor]:
        """kernel(x_q, b, out, s, ws, n, k) -> out: y = (x_q W^T) / s[0] * ws[...] into out (1, n) bf16,
        from x_q (1, k) int8, b (n, k / 4) int8 in its layout, s and ws bf16, on torch's current stream;
        once its build has finished (raises with nvcc's output if it failed)."""
        if self.error:
            raise RuntimeError(self.error)
        if lib in self.procs:
            proc, log = self.procs.pop(lib)
            rc = proc.wait(timeout=600)
            log.close()
            self.info[f"{lib}_build_s"] = round(time.perf_counter() - self.t0, 1)
            if rc != 0:
                with open(log.name) as f:
                    raise RuntimeError(f"nvcc exited {rc}: {f.read()[-1500:]}")
        h = ctypes.CDLL(os.path.join(self.dir, lib))
        fn = h.bitlinear_int8xint2 if lib == "libbitnet.so" else h.bitlinear_int8xint2_at
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        fn.restype = None if lib == "libbitnet.so" else ctypes.c_int

        def call(x_q, b, out, s, ws, n, k):
            rc = fn(x_q.data_ptr(), b.data_ptr(), out.data_ptr(), s.data_ptr(), ws.data_ptr(), 1, n, k,
                    torch.cuda.current_stream().cuda_stream)
            if rc not in (None, 0):
                raise RuntimeError(f"no kernel for {n}x{k} in {lib} (returned {rc})")
            return out

        return call


def _nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[-1] if out.strip() else None


def bitnetcpp_pack(src: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Its own converter: gpu/pack_weight.py convert_weight_int8_to_int2, W_q (N, K) int8 in {-1, 0, 1}
    on the CPU -> (N, K / 4) int8 in its kernel's layout."""
    return load_script(os.path.join(src, "pack_weight.py"), "bitnetcpp_pack_weight").convert_weight_int8_to_int2


def decode_bitnetcpp(b: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The weights bitnet.cpp's ladder_int8xint2_kernel reads, as W (n, k) int8, from its packed
    (n, k / 4) int8 bytes; written from bitnet_kernels.h, not from its packing code:
    block bx (16 output rows), step k0 (128 inputs), thread (tx < 8, ty < 16) loads the int32 word at
    byte bx*16*k/4 + k0*512 + (tx>>1)*128 + (ty>>3)*64 + (tx&1)*32 + (ty&7)*4 and decodes its 16
    values: value t (t < 16) is bits 2*(t//4) + 8*(t%4) .. +1, minus 2 (decode_i2s_to_i8s); it
    weighs activation k0*128 + tx*16 + t of output row bx*16 + ty (the dp4a loop)."""
    dev = b.device
    words = b.contiguous().view(torch.int32).reshape(-1)
    bx = torch.arange(n // 16, device=dev).view(-1, 1, 1, 1)
    k0 = torch.arange(k // 128, device=dev).view(1, -1, 1, 1)
    tx = torch.arange(8, device=dev).view(1, 1, -1, 1)
    ty = torch.arange(16, device=dev).view(1, 1, 1, -1)
    offset = bx * 16 * k // 4 + k0 * 512 + (tx >> 1) * 128 + (ty >> 3) * 64 + (tx & 1) * 32 + (ty & 7) * 4
    word = words[offset // 4]  # (n/16, k/128, 8, 16)
    t = torch.arange(16, device=dev)
    codes = (word.unsqueeze(-1) >> (2 * (t // 4) + 8 * (t % 4)).to(torch.int32)) & 3  # (bx, k0, tx, ty, t)
    w = (codes - 2).to(torch.int8).permute(0, 3, 1, 2, 4)  # (bx, ty, k0, tx, t): row bx*16+ty, col k0*128+tx*16+t
    return w.reshape(n, k)


# ----------------------------------------------------------------------------- gemlite
def decode_gemlite(w_q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The weights gemlite's INT kernels read from its packed W_q (k / 16, n) int32, as W (n, k) int8
    (gemv_revsplitK_kernels.py: b_ptrs at (k // 16, n), q_shift (k % 16) * 2, & 3, minus the zero 1)."""
    kk = torch.arange(k, device=w_q.device)
    words = w_q[kk // 16]  # (k, n)
    codes = (words >> ((kk % 16) * 2).to(torch.int32).unsqueeze(1)) & 3
    return (codes - 1).to(torch.int8).t()


def import_gemlite(autotune: list[str]):
    import gemlite

    settings = dict(s.split("=", 1) for s in autotune)
    gemlite.set_autotune(settings)  # reloads its kernel modules with these candidate lists
    return gemlite


def gemlite_best_config(m: int) -> str | None:
    """The config gemlite's autotuner picked last for the kernel M rows go to (None if not readable)."""
    from gemlite.core import get_matmul_type

    modules = {"GEMV_REVSPLITK": ("gemv_revsplitK_kernels", "gemv_INT_revsplitK_kernel"),
               "GEMM_SPLITK": ("gemm_splitK_kernels", "gemm_splitK_INT_kernel"),
               "GEMM": ("gemm_kernels", "gemm_INT_kernel")}
    kind = get_matmul_type(m, 2)
    module, kernel = modules.get(kind, (None, None))
    k = getattr(sys.modules.get(f"gemlite.triton_kernels.{module}"), kernel or "", None)
    best = getattr(k, "best_config", None)
    return f"{kind}: {best}" if best is not None else kind


# ----------------------------------------------------------------------------- preparation (no GPU)
def prepare(bitnet_git: str, gemlite_version: str = GEMLITE_VERSION, peers_dir: str = PEERS_DIR,
            wheel_dir: str = WHEEL_DIR, gemlite: bool = True) -> dict:
    """Export bitnet.cpp's gpu/ from a git of microsoft/BitNet into peers_dir/bitnet-gpu and put a
    gemlite wheel into wheel_dir; returns what was written."""
    commit = subprocess.run(["git", "-C", bitnet_git, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    tar = subprocess.run(["git", "-C", bitnet_git, "archive", "--format=tar", commit, "gpu",
                          ":(exclude)gpu/tokenizer.model"], capture_output=True, check=True).stdout
    dest = os.path.join(peers_dir, "bitnet-gpu")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    with open(os.path.join(dest, "COMMIT"), "w") as f:
        f.write(commit + "\n")
    with open(os.path.join(dest, "gpu", "bitnet_kernels", "bitnet_kernels.cu")) as f:
        shapes = bitnetcpp_shapes(f.read())
    out = {"bitnet_cpp": dest, "commit": commit, "dispatch_shapes": [f"{n}x{k}" for n, k in shapes],
           "bitnet_cpp_bytes": _tree_bytes(dest)}
    if gemlite:
        out["gemlite_wheel"] = gemlite_wheel(gemlite_version, wheel_dir)
        out["requires"] = wheel_requires(out["gemlite_wheel"])
    return out


def gemlite_wheel(version: str, wheel_dir: str) -> str:
    """A wheel of gemlite==version in wheel_dir: PyPI's own for CPython 3.12 / any platform where there
    is one, else built from its sdist (pure Python). Older gemlite wheels there are removed."""
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(pip + ["download", f"gemlite=={version}", "--no-deps", "--only-binary=:all:",
                                    "--python-version", "3.12", "--implementation", "cp",
                                    "--platform", "manylinux_2_28_x86_64", "--platform", "any", "-d", tmp],
                             capture_output=True, text=True)
        if got.returncode != 0:  # no wheel published: build one from the sdist
            subprocess.run(pip + ["download", f"gemlite=={version}", "--no-deps", "--no-binary=:all:", "-d", tmp],
                           check=True, capture_output=True, text=True)
            sdist = glob.glob(os.path.join(tmp, "gemlite-*.tar.gz"))[0]
            subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", sdist, "-w", tmp],
                           check=True, capture_output=True, text=True)
        wheel = glob.glob(os.path.join(tmp, "gemlite-*.whl"))[0]
        os.makedirs(wheel_dir, exist_ok=True)
        for old in glob.glob(os.path.join(wheel_dir, "gemlite-*.whl")):
            os.remove(old)
        dest = os.path.join(wheel_dir, os.path.basename(wheel))
        shutil.copy(wheel, dest)
    return dest


def wheel_requires(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Layer:
    """One weight shape in every system's layout, made on first use."""
    n: int
    k: int
    w_q: torch.Tensor  # (N, K) int8 in {-1, 0, 1}
    scale: torch.Tensor  # (1,) float32
    packed: torch.Tensor  # ours: (N / 4, K) uint8
    w16: torch.Tensor  # (N, K) bf16, W_q * s
    peer: dict = dataclasses.field(default_factory=dict)


class Run:
    """The systems, set up once (bitnet.cpp's build, gemlite's import), and the rows measured so far.
    device "cpu" is for the tests: the same loop, timed with time_cpu, ours under Triton's interpreter."""

    def __init__(self, args: PeerArgs, device: str = "cuda"):
        self.args, self.device, self.t0, self.rows, self.layers = args, device, time.perf_counter(), [], {}
        self.info: dict = {"tolerance": args.tolerance}
        self.bitnetcpp = self.gemlite = None
        if "bitnet.cpp" in args.peers:  # first: its nvcc runs in the background from here on
            dispatch = self._dispatch_shapes()
            extra = [parse_shape(s) for s in args.shapes + args.m1_shapes] if args.instantiate else []
            extra = [s for s in dict.fromkeys(extra) if s not in dispatch and instantiable(*s)]
            major, minor = torch.cuda.get_device_capability() if device == "cuda" else (9, 0)
            self.bitnetcpp = BitnetCppBuild(args.src, args.build_dir, 10 * major + minor, extra)
            self.info["bitnet_cpp"] = {"src": args.src, "commit": _read(os.path.join(os.path.dirname(args.src), "COMMIT")),
                                       "dispatch_shapes": [f"{n}x{k}" for n, k in dispatch], **self.bitnetcpp.info}
        if "gemlite" in args.peers:
            try:
                self.gemlite = import_gemlite(args.gemlite_autotune)
                self.info["gemlite"] = {"version": self.gemlite.__version__, "file": self.gemlite.__file__,
                                        "autotune": args.gemlite_autotune}
            except Exception as e:  # noqa: BLE001 (any failure of a peer is a row, not the end of the run)
                self.gemlite = _error(e, "import gemlite")
                self.info["gemlite"] = {"error": self.gemlite}
        self.flush = L2Flusher() if device == "cuda" else None
        self.hbm = measured_hbm_bandwidth() if device == "cuda" else None
        bitnetcpp = "-" if self.bitnetcpp is None else self.bitnetcpp.error or f"nvcc into {self.bitnetcpp.info.get('dir')}"
        gemlite = self.info.get("gemlite", {})
        gemlite = gemlite.get("error") or gemlite.get("version", "-")
        print(f"setup ({self.elapsed():.0f} s): bitnet.cpp {bitnetcpp}; gemlite {gemlite}; "
              f"copy bandwidth {self.hbm or 0:.0f} GB/s", flush=True)

    def run(self, on_cell: Callable[[dict], object] | None = None) -> dict:
        """Every cell of the plan (after the budget: a 'skipped' row); on_cell(result so far) after each."""
        args = self.args
        for shape, m in plan(args.shapes, args.m1_shapes, args.m):
            if self.elapsed() > args.budget_s:
                n, k = parse_shape(shape)
                self.rows.append({"shape": shape, "n": n, "k": k, "m": m, "system": "(all)",
                                  "status": f"skipped: time budget {args.budget_s:.0f} s spent"})
                continue
            try:
                self.cell(shape, m)
            except Exception as e:  # noqa: BLE001 (the weights, the reference: a cell that cannot start)
                n, k = parse_shape(shape)
                self.rows.append({"shape": shape, "n": n, "k": k, "m": m, "system": "(all)",
                                  "status": "failed: " + _error(e)})
            done = [r for r in self.rows if r["shape"] == shape and r["m"] == m]
            print(f"{shape} M={m} ({self.elapsed():.0f} s): " + "; ".join(
                f"{r['system']} {r['ms'] * 1e3:.1f} us (setup {r['setup_s']:.1f} s)" if "ms" in r
                else f"{r['system']} {r['status'][:80]}" for r in done), flush=True)
            if on_cell is not None:
                on_cell(self.result(complete=False))
        return self.result(complete=True)

    def result(self, complete: bool) -> dict:
        device = torch.cuda.get_device_name(0) if self.device == "cuda" else f"{self.device} (a test run)"
        return {"args": dataclasses.asdict(self.args), "complete": complete, "device": device, "hbm_gbps": self.hbm,
                "timing": "cuda_graph" if self.device == "cuda" else "eager", "warmup": self.args.warmup,
                "iters": self.args.iters, "info": self.info, "elapsed_s": round(self.elapsed(), 1), "rows": self.rows}

    def _dispatch_shapes(self) -> list[tuple[int, int]]:
        try:
            with open(os.path.join(self.args.src, "bitnet_kernels", "bitnet_kernels.cu")) as f:
                return bitnetcpp_shapes(f.read())
        except OSError:
            return []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def layer(self, shape: str) -> Layer:
        if shape not in self.layers:
            n, k = parse_shape(shape)
            g = torch.Generator(device=self.device).manual_seed(self.args.seed)
            w_q = torch.randint(-1, 2, (n, k), generator=g, device=self.device, dtype=torch.int8)
            scale = torch.full((1,), 0.02, dtype=torch.float32, device=self.device)
            w16 = w_q.to(torch.bfloat16) * scale.to(torch.bfloat16)
            self.layers[shape] = Layer(n, k, w_q, scale, pack(w_q, "2bit"), w16)
        return self.layers[shape]

    # one (shape, M): every selected system, bf16 first (the yardstick of the others' ratio)
    def cell(self, shape: str, m: int) -> None:
        L = self.layer(shape)
        g = torch.Generator(device=self.device).manual_seed(self.args.seed + m)
        x = torch.randn(m, L.k, generator=g, device=self.device, dtype=torch.bfloat16)
        x_q, a = quantize_activation(x)  # (M, K) int8, (M, 1) float32: bitnet.quant, bit-identical to act_quant
        acc = int_matmul(x_q, L.w_q)  # (M, N) int32, exact
        ref = acc.double() * L.scale.double() / a.double()  # (M, N) float64
        base = {"shape": shape, "n": L.n, "k": L.k, "m": m}
        io = 2 * m * L.k + 2 * m * L.n  # bf16 activations in, bf16 output out
        packed_bytes = packed_rows(L.n, "2bit") * L.k
        self.bf16 = (None, None)  # bf16 F.linear's (GPU time, eager call) in ms, the yardstick of this cell
        if "bf16" in self.args.peers:
            self.measure(base, "bf16 F.linear (cuBLAS)", None, lambda: F.linear(x, L.w16), None, 2 * L.n * L.k + io)
        if "ours" in self.args.peers:
            from bitnet.kernels import act_quant, bitlinear, packed_matmul

            self.measure(base, "ours bitlinear 2bit", True, lambda: bitlinear(x, L.packed, L.scale, L.n, "2bit"), ref,
                         packed_bytes + io)
            if m == 1 and "bitnet.cpp" in self.args.peers:  # the counterpart of bitnet.cpp's kernel alone
                xq_ours, a_ours = act_quant(x)
                self.measure(base, "ours packed_matmul (int8 x given)", False,
                             lambda: packed_matmul(xq_ours, a_ours, L.packed, L.scale, L.n, "2bit",
                                                   out_dtype=torch.bfloat16),
                             ref, packed_bytes + m * L.k + 4 * m + 2 * m * L.n)
        if "bitnet.cpp" in self.args.peers:
            self.bitnetcpp_rows(base, L, x, x_q, a, acc, ref, packed_bytes, io)
        if "gemlite" in self.args.peers:
            self.gemlite_rows(base, L, x, ref, packed_bytes + io)

    def measure(self, base: dict, system: str, act_quant: bool | None, fn: Callable[[], torch.Tensor],
                ref: torch.Tensor | None, nbytes: int, mismatches: int | None = None, **extra) -> None:
        """Check fn() against ref (its first call: compile and autotune happen here, timed as setup_s),
        then time it; a failure or a wrong output is a row of its own. act_quant: whether the int8
        quantization of x is in the timed call (None: there is none, bf16)."""
        quant = {True: "timed", False: "not timed", None: "none"}[act_quant]
        row = {**base, "system": system, "act_quant": quant, **extra}
        if self.elapsed() > self.args.budget_s:
            self.rows.append({**row, "status": f"skipped: time budget {self.args.budget_s:.0f} s spent"})
            return
        t = time.perf_counter()
        try:
            y = fn()
            if self.device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            self.rows.append({**row, "status": "failed: " + _error(e)})
            return
        row["setup_s"] = round(time.perf_counter() - t, 2)
        err = compare(y, ref) if ref is not None else None
        if err is not None:
            row.update(err=err["rel_rms"], err_max=err["rel_max"])
        if mismatches is not None:
            row["exact_mismatches"] = mismatches
        wrong = verdict(err, self.args.tolerance, mismatches)
        if wrong:
            self.rows.append({**row, "status": wrong})
            return
        try:
            if self.device == "cuda":
                eager_ms = time_cuda(fn, self.args.warmup, self.args.iters, self.flush)
            else:
                eager_ms = time_cpu(fn, self.args.warmup, self.args.iters)
        except Exception as e:  # noqa: BLE001
            self.rows.append({**row, "status": "failed while timing: " + _error(e)})
            return
        ms, status = self.graph_time(fn), "ok" + (" (exact)" if mismatches == 0 else "")
        if ms is None:
            ms = eager_ms
            if self.graph_error:
                row["graph_error"] = self.graph_error
                status += " (GPU time = eager call: no CUDA graph)"
        if system.startswith("bf16"):
            self.bf16 = (ms, eager_ms)
        bf16_ms, bf16_eager = self.bf16
        gbps = nbytes / (ms * 1e-3) / 1e9
        self.rows.append({**row, "status": status, "ms": ms, "speedup": bf16_ms / ms if bf16_ms else None,
                          "eager_ms": eager_ms, "eager_speedup": bf16_eager / eager_ms if bf16_eager else None,
                          "gbps": gbps, "hbm_share": gbps / self.hbm if self.hbm else None})

    def graph_time(self, fn: Callable[[], torch.Tensor]) -> float | None:
        """fn's GPU work alone, replayed from a CUDA graph (bitnet.bench.time_cuda_graph, as bench_kernels
        times): None on the CPU, or where capture fails (self.graph_error says why)."""
        self.graph_error = None
        if self.device != "cuda":
            return None
        try:
            return time_cuda_graph(fn, self.args.warmup, self.args.iters, self.flush)
        except Exception as e:  # noqa: BLE001
            self.graph_error = "CUDA graph: " + _error(e)
            return None

    def unsupported(self, base: dict, system: str, why: str) -> None:
        self.rows.append({**base, "system": system, "status": f"not supported: {why}"})

    def bitnetcpp_rows(self, base, L, x, x_q, a, acc, ref, packed_bytes, io) -> None:
        name = "bitnet.cpp W2A8"
        if base["m"] != 1:
            return self.unsupported(base, name, "its kernel is a GEMV, M = 1 only")
        if self.bitnetcpp.error:
            return self.rows.append({**base, "system": name, "status": "failed: " + self.bitnetcpp.error})
        shape = (L.n, L.k)
        dispatch = self._dispatch_shapes()
        extra = [parse_shape(s) for s in self.bitnetcpp.info["extra_shapes"]]
        if shape in dispatch:
            lib, label = "libbitnet.so", name
        elif shape in extra:
            lib, label = "libbitnet_at.so", name + " (instantiated here)"
        else:
            return self.unsupported(base, name, "shape not in its dispatch" + ("" if instantiable(*shape) else
                                                                                 " (and not N % 16 == 0, K % 128 == 0)"))
        try:
            kernel = self.bitnetcpp.kernel(lib)
            if "bitnet.cpp" not in L.peer:
                b = bitnetcpp_pack(self.args.src)(L.w_q.cpu()).to(self.device)  # its own converter, on the CPU
                if not torch.equal(decode_bitnetcpp(b, L.n, L.k), L.w_q):
                    raise RuntimeError("its packed layout does not decode to W_q (decode_bitnetcpp)")
                L.peer["bitnet.cpp"] = b
        except Exception as e:  # noqa: BLE001
            return self.rows.append({**base, "system": label, "status": "failed: " + _error(e)})
        b = L.peer["bitnet.cpp"]
        from bitnet.kernels import act_quant

        def call(xq, s, ws, out):
            return kernel(xq, b, out, s, ws, L.n, L.k)

        one = torch.ones(WS, dtype=torch.bfloat16, device=self.device)
        out = torch.empty(1, L.n, dtype=torch.bfloat16, device=self.device)
        try:  # the exact check: unit scales, so its output is bf16 of the integer sum
            mismatches = exact_mismatches(call(x_q, one, one, out.clone()), acc)
        except Exception as e:  # noqa: BLE001
            return self.rows.append({**base, "system": label, "status": "failed: " + _error(e)})
        s = a.reshape(1).to(torch.bfloat16)  # its activation scale: y = acc / s * ws, in bf16
        ws = L.scale.to(torch.bfloat16).expand(WS).contiguous()
        self.measure(base, label + " (int8 x given)", False, lambda: call(x_q, s, ws, out), ref,
                     L.n * L.k // 4 + L.k + 2 * L.n, mismatches)

        def layer():
            xq, a_ = act_quant(x)
            y = torch.empty(1, L.n, dtype=torch.bfloat16, device=self.device)
            return call(xq, a_.reshape(1).to(torch.bfloat16), ws, y)

        self.measure(base, label + " + act_quant", True, layer, ref, L.n * L.k // 4 + io, mismatches)

    def gemlite_rows(self, base, L, x, ref_ours, nbytes) -> None:
        name = "gemlite A8W158_INT_dynamic"
        if isinstance(self.gemlite, str):
            return self.rows.append({**base, "system": name, "status": "failed: " + self.gemlite})
        try:
            if "gemlite" not in L.peer:
                from gemlite.helper import A8W158_INT_dynamic

                proc = A8W158_INT_dynamic(device=f"cuda:{torch.cuda.current_device()}", dtype=torch.bfloat16)
                layer = proc.from_weights(weight=L.w_q.to(torch.bfloat16), weight_scale=L.scale)  # its own packing
                if not torch.equal(decode_gemlite(layer.W_q.data, L.n, L.k), L.w_q):
                    raise RuntimeError("its packed W_q does not decode to W_q (decode_gemlite)")
                L.peer["gemlite"] = layer
            layer = L.peer["gemlite"]
            from gemlite.quant_utils import scale_activations_per_token

            xq_g, sx = scale_activations_per_token(x, w_dtype=torch.int8)  # its own activation quantization
            ref = int_matmul(xq_g, L.w_q).double() * sx.double() * L.scale.double()
            x_q, _ = quantize_activation(x)
            differ = int((xq_g != x_q).sum().item())  # its int8 activations against ours
        except Exception as e:  # noqa: BLE001
            return self.rows.append({**base, "system": name, "status": "failed: " + _error(e)})
        self.measure(base, name, True, lambda: layer(x), ref, nbytes, act_values_differ=differ)
        if self.rows[-1]["status"].startswith("ok"):
            self.rows[-1].update(kernel=gemlite_best_config(base["m"]),
                                 err_vs_our_quant=compare(layer(x), ref_ours)["rel_rms"])


def _error(e: BaseException, where: str = "") -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return (f"{where}: " if where else "") + (text[:400] + " ..." if len(text) > 400 else text)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# ----------------------------------------------------------------------------- report
COLUMNS = [("shape", "N x K", ""), ("m", "M", ""), ("system", "system", ""), ("act_quant", "act. quant", ""),
           ("us", "GPU time (us)", ".1f"), ("speedup", "vs bf16", ".2f"), ("gbps", "GB/s", ".0f"),
           ("hbm_pct", "% HBM", ".0f"), ("eager_us", "eager call (us)", ".1f"), ("eager_speedup", "eager vs bf16", ".2f"),
           ("err", "error", ".1e"), ("status", "status", "")]


def report(result: dict) -> str:
    rows = [{**r, "us": r["ms"] * 1e3 if "ms" in r else None, "eager_us": r["eager_ms"] * 1e3 if "eager_ms" in r else None,
             "hbm_pct": 100 * r["hbm_share"] if r.get("hbm_share") is not None else None} for r in result["rows"]]
    info = result.get("info", {})
    b, g = info.get("bitnet_cpp", {}), info.get("gemlite", {})
    timing = ("GPU time: each call captured in a CUDA graph and replayed (bitnet.bench.time_cuda_graph: the "
              "kernels and the gaps between them, without the host's time to issue them); eager call: "
              "bitnet.bench.time_cuda (the host's issue time counts where it is the longer)"
              if result.get("timing") == "cuda_graph" else "GPU time: the eager call (bitnet.bench.time_cuda)")
    head = (f"Packed 2-bit layers on {result.get('device', '?')}, one run (issue 27): medians of {result['iters']} timed "
            f"calls after {result['warmup']} warm-up calls, the L2 flushed before each. {timing}. The same random "
            "ternary weights (N x K = out x in) and bf16 activations for every system. 'vs bf16': bf16 F.linear's "
            "time over the row's; GB/s (from the GPU time): the weight bytes the system reads plus its activations in "
            "and output out; % HBM: of the copy bandwidth measured in this run "
            f"({result['hbm_gbps'] or float('nan'):.0f} GB/s). 'error': ||y - ref|| / ||ref|| against the exact "
            "reference (ternary weights, integer product in float64, the system's own int8 activations), checked "
            f"before timing; over {info.get('tolerance', TOLERANCE)} a row is marked wrong and not timed.")
    notes = ["", "- **act. quant timed**: the row's time includes the per-token int8 quantization of bf16 x; "
             "'not timed': int8 x and its scale were made outside the timed call (bitnet.cpp's README numbers are such).",
             "- **bf16 F.linear**: cuBLAS on W_q * s in bf16 (no quantization), the yardstick.",
             "- **ours**: `bitnet.kernels.bitlinear(x, packed, scale, n, \"2bit\")`, bf16 x to bf16 y; at M = 1 also "
             "'packed_matmul (int8 x given)': the matmul from act_quant's output, beside bitnet.cpp's kernel alone.",
             f"- **bitnet.cpp** (microsoft/BitNet gpu/, commit {(b.get('commit') or '?')[:12]}, built with "
             f"{b.get('nvcc_version') or 'nvcc'}: compile.sh's flags less -lcuda, SASS for this GPU from its compute_80 "
             "PTX): its GEMV, M = 1 only, at the shapes its dispatch hard-codes: "
             f"{', '.join(b.get('dispatch_shapes', [])) or '?'}. '+ act_quant': this package's act_quant kernel, the "
             "scale cast to bf16, the output allocation, then its kernel (its own model.py quantizes with torch ops "
             "under torch.compile instead). '(exact)': with unit scales its output was bf16 of the exact integer sum, "
             "bit for bit; its error column is its bf16 scales' rounding. 'instantiated here': its kernel template, "
             "unchanged, compiled by this script at a shape its dispatch lacks.",
             f"- **gemlite** {g.get('version', '?')} (`A8W158_INT_dynamic().from_weights`): its layer from bf16 x, with "
             "its own int8 quantization (x / (absmax/127), rounded half away from zero; its reference uses its own "
             "int8 values), its output zeroing, bf16 atomics across its K split. Autotune: "
             f"{', '.join(g.get('autotune', [])) or '?'} (gemlite's own default is 'fast' everywhere; 'default' is its "
             "2-config list, taken for M > 1 to fit the run's time, so those rows may understate it)."]
    skipped = [r for r in result["rows"] if r["status"].startswith("skipped")]
    if skipped:
        cells = list(dict.fromkeys(f"{r['shape']} M={r['m']}" for r in skipped))
        notes.append(f"- **skipped** (time budget): {', '.join(cells)}. To run them: "
                     + "; ".join(f"`{c}`" for c in rerun_commands(skipped, result["args"])) + ".")
    return head + "\n\n" + table(rows, COLUMNS, markdown=True) + "\n" + "\n".join(notes)


def rerun_commands(skipped: list[dict], args: dict) -> list[str]:
    """One command line per M for the cells that `skipped` rows name (their own results file each)."""
    by_m: dict[int, list[str]] = {}
    for r in skipped:
        by_m.setdefault(r["m"], [])
        if r["shape"] not in by_m[r["m"]]:
            by_m[r["m"]].append(r["shape"])
    peers = " ".join(args.get("peers", PEERS))
    return [f"python benchmarks/peer_gpu_kernels.py --shapes {' '.join(shapes)} --m1-shapes {shapes[0]} --m {m} "
            f"--peers {peers} --name {args.get('name', 'peer_gpu_kernels_cuda')}_m{m}" for m, shapes in by_m.items()]


# ----------------------------------------------------------------------------- main
def main(args: PeerArgs) -> int:
    if args.prepare:
        if not args.bitnet_git:
            print("peer_gpu_kernels: --prepare needs --bitnet-git (a clone or bare git of microsoft/BitNet)",
                  file=sys.stderr)
            return 2
        done = prepare(args.bitnet_git, args.gemlite_version)
        for key, value in done.items():
            print(f"{key}: {value}")
        return 0
    if not torch.cuda.is_available():
        print("peer_gpu_kernels: no CUDA device here, nothing to measure (it times GPU kernels; --prepare needs none)",
              file=sys.stderr)
        return 2
    run = Run(args)

    def save(result: dict) -> str:
        return save_results(args.name, result, report(result), args.out_dir)

    path = save(run.run(on_cell=save))
    with open(path.replace(".json", ".md")) as f:
        print(f.read())
    print(f"{run.elapsed():.0f} s; results in {path}")
    return 0


def cli_args(argv: list[str] | None = None) -> PeerArgs:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="See the module docstring for the protocol.")
    add_dataclass_arguments(parser, PeerArgs)
    return PeerArgs(**vars(parser.parse_args(argv)))


def cli(argv: list[str] | None = None) -> int:
    return main(cli_args(argv))


if __name__ == "__main__":
    sys.exit(cli())

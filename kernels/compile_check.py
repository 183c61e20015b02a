"""The compile guard: every Triton kernel of this package compiled for real GPUs, on a CPU.

The interpreter (TRITON_INTERPRET=1, what CPU CI runs the kernels in) proves what they compute,
not that they compile: it never type-checks what Triton's compiler does (two returns of different
types in constexpr branches passed the interpreter for weeks and failed every GEMM on the first
H200). This module runs the compiler itself, with no GPU and no driver:

    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))

through every stage (TTIR, TTGIR, LLVM IR, PTX, and ptxas to a cubin), for sm_90 (H100/H200) and
sm_80 (A100), and checks the shared memory each variant asks for against the architecture's
per-block limit (a launch would fail with "out of resources" on the GPU) and, for the launchers
that choose a tile by the device's shared memory (the decode attention's stages, the norm-fused GEMM
tile: SHARED_BOUNDS), against the bound they choose by. `--arch 86` (or 89, 120: 99 KB a program)
compiles what such a GPU is given (as_launched); an autotuned config over its limit is counted as
passed over (Triton's autotuner does, when it times it), unless BITNET_AUTOTUNE=first launches it
untimed (droppable). And it checks the memory operations with acquire or release semantics in its
PTX against ORDERED_LIMIT (each one a MEMBAR.ALL.GPU: a split-K epilogue that waited on L2 sixteen
times a thread compiled, ran and was exact). Each variant's registers and spills (bytes of local
memory a thread) are read off its cubin and reported per kernel (--verbose: per variant), so that a
tile that spills is seen before a GPU times it. A GEMM variant on the word path under 64 rows (its
dots on mma.sync on every GPU) fails if more than one warp decodes each packed weight
(weight_tile_copies, read off its TTGIR: 1.6-bit's two dots in the other order had 4 decode it).

Variants: what each launcher can produce. Axes per kernel (launcher in brackets):

    _gemv_kernel [gemv.gemv]        tile: CONFIGS; format P; LANES 4 (int32 words) or 1 (bytes);
                                    input: float x quantized in the kernel (fp32/bf16/fp16, y in
                                    x's dtype; after an RMSNorm, gated or not, x_q written out or
                                    not) or int8 x_q with y fp32/bf16/fp16 or int32 (every tile
                                    with both); one to three matrices (SEGMENTS, gemv.gemv_cat);
                                    bias or not; a residual added in the epilogue or not;
                                    BLOCK_A 4096 (K >= 4096) or smaller
    _gemm_kernel [gemm.gemm]        tile: SMALL_M_CONFIGS x SPLIT_K (1, or > 1: the workspace and
                                    counter epilogue) + LARGE_M_CONFIGS (SPLIT_K 1); format; LANES;
                                    y fp32/bf16/fp16 with bias or not, or int32; one to three
                                    matrices (SEGMENTS, gemm.gemm_cat); a residual added or not;
                                    the RMSNorm inside (small-M tiles, gated or not; float x)
    _gemm_int8_kernel [gemm.gemm,   INT8_CONFIGS (the unpacked weights' GEMM, M >= UNPACK_M); y
      M >= UNPACK_M]                fp32/bf16/fp16 with bias or not, or int32; one to three
                                    matrices (SEGMENTS, gemm.gemm_cat); a residual added or not
    _act_quant_kernel               CONFIGS; x fp32/bf16/fp16
    _rmsnorm_act_quant_kernel       CONFIGS; x fp32/bf16/fp16; weight of x's dtype or fp32; the relu2
                                    gate (GATED) or not
    _unpack_kernel [unpack_cat]     format x LANES (int32 words or bytes) x one to three matrices
    _rmsnorm_quant_unpack_kernel    the two above in one launch (a prefill): CONFIGS; x and weight
      [rmsnorm_act_quant_unpack]    dtypes, GATED as the norm's, or no norm (act_quant's rows: a
                                    bitlinear layer at large M); format x LANES x matrices as the unpack's
    _rope_cache_kernel [rope_cache] q/k/v fp32/bf16/fp16, a cache of their dtype or fp32 (rows per
                                    sequence or per token), or none; head sizes 64, 96, 128
    _decode_attention_kernel        q and cache fp32/bf16/fp16; head sizes 64-256; 1-8 query
      [decode_attention]            heads per KV head; cache rows per query or not; a bool, an
                                    integer or no key mask; one split or several (the last merges);
                                    each with the RoPE and cache write folded in (ROPE) or not
    _int8_linear_kernel             CONFIGS; x fp32/bf16/fp16; bias or not
      [int8_linear]
    _int4_linear_kernel             CONFIGS; y fp32/bf16/fp16 (int8 x_q in, read as words); bias or not
      [int4_linear]
    every kernel                    arguments 16-byte aligned (what real shapes give: Triton then
                                    vectorizes) or not (K = 37 and the like)
    kernels launched as dependents  PDL (PDL_KERNELS): on for sm_90 (launched as dependents,
                                    common.pdl; griddepcontrol needs sm_90), off for sm_80

A covering set, not the full product (which is thousands of compiles): for each kernel, every
tile config is compiled, and every combination of the other axes, walked round-robin beside the
configs, so that each config meets a flag combination and each flag combination a config. For
sm_90 (EVERY_FORMAT) each such pair of the GEMV and the GEMM is compiled in every format, on one
path or the other in turn (int32 words, bytes), so that every config and every flag combination
is compiled in every format and on each path, and every format on each path (every value of every
axis is compiled, and every pair of a format or a path with a config, a flag combination, or each
other); for sm_80 each pair in one format and path, the six in turn (every value of every axis,
and every format on each path: what differs from sm_90 is a tile's lowering, its MMA and shared
memory, which each config's compile shows). 446 compiles for the two (--every-format 90 80: 540,
a CPU CI's 2 cores took 5 minutes for them; the full product of formats and paths 814; CPU CI
compiles both as sm_80, `--every-format` with no architecture: 352); --jobs spreads them over
processes.

    python -m bitnet.kernels.compile_check                   # sm_90 and sm_80, every kernel
    python -m bitnet.kernels.compile_check --arch 90 --every-format    # sm_90, each config in one format
    python -m bitnet.kernels.compile_check --arch 90 --kernel _gemm_kernel --jobs 8
    python -m bitnet.kernels.compile_check --pdl-order       # the PDL contract, read off the SASS
    python -m bitnet.kernels.compile_check --sass --kernel _gemv_kernel --set P=5 BLOCK_U=2048 ...
                                                            # instructions a loop (benchmarks/gpu_notes.md)

Exit status 1 if any variant fails; each failure names the kernel, its constexprs and launch
options, the architecture and the compiler's message. Run it without TRITON_INTERPRET (the
interpreter replaces the kernels by Python functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import itertools
import os
import sys
import time
from dataclasses import dataclass, field

from .common import mma_sync_arch
from .launch import SHARED_LIMIT, triton_kernel  # (SHARED_LIMIT: the most shared memory a program may ask for)
from .precompile import _message

ARCHS = (90, 80)
FORMATS = {"2bit": 4, "1.6bit": 5, "1bit": 8}  # format -> P (bitnet.packing.FORMATS)
TYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "int8": "*i8", "int32": "*i32", "uint8": "*u8"}
FLOAT_BYTES = {"*fp32": 4, "*bf16": 2, "*fp16": 2}  # a float pointer's element size


@dataclass
class Variant:
    """One compile: a kernel, its constexprs, the types of its pointer and scalar arguments, the
    launch options, whether its arguments are 16-byte aligned, and the target architecture."""

    kernel: str
    constexprs: dict
    types: dict  # argument name -> Triton type string, for pointers and float scalars; ints are i32
    num_warps: int = 4
    num_stages: int = 3
    fp_fusion: bool = False  # common.LAUNCH turns FMA contraction off in every launcher that passes it
    aligned: bool = True
    arch: int = 90
    note: str = ""

    def describe(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs.items())
        types = " ".join(f"{k}:{v.lstrip('*')}" for k, v in self.types.items() if v.startswith("*"))
        return (f"{self.kernel} sm_{self.arch} [{consts}] num_warps={self.num_warps} num_stages={self.num_stages}"
                f" {'aligned' if self.aligned else 'unaligned'} ({types}){' ' + self.note if self.note else ''}")


@dataclass
class Result:
    variant: Variant
    ok: bool
    seconds: float
    shared: int = 0
    error: str = ""
    registers: int = 0  # a thread's, from the cubin (cuobjdump -res-usage)
    spill: int = 0  # bytes of local memory a thread (stack and local: register spills), from the cubin
    ordered: int = 0  # memory operations with acquire / release semantics and fences in the PTX (ordered_ops)
    copies: int | None = None  # warps that decode each packed weight (weight_tile_copies; GEMM word-path variants)
    dropped: bool = False  # an autotuned config over a smaller GPU's shared memory: timed, it fails and is passed over


def _jit_functions() -> dict:
    """name -> the JITFunction of every kernel (under autotune: the function it wraps)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile guard compiles the kernels: run it without TRITON_INTERPRET=1")
    from . import activations, attention, common, gemm, gemv, int4_head, int8_head, launch, layout, rmsnorm_quant, rope

    kernels = {
        "_decode_attention_kernel": attention._decode_attention_kernel,
        "_int8_linear_kernel": int8_head._int8_linear_kernel, "_int4_linear_kernel": int4_head._int4_linear_kernel,
        "_gemv_kernel": gemv._gemv_kernel, "_gemm_kernel": gemm._gemm_kernel, "_gemm_int8_kernel": gemm._gemm_int8_kernel,
        "_act_quant_kernel": activations._act_quant_kernel,
        "_rmsnorm_act_quant_kernel": rmsnorm_quant._rmsnorm_act_quant_kernel,
        "_unpack_kernel": layout._unpack_kernel, "_rope_cache_kernel": rope._rope_cache_kernel,
        "_rmsnorm_quant_unpack_kernel": rmsnorm_quant._rmsnorm_quant_unpack_kernel,
        "_pdl_probe_kernel": common._pdl_probe_kernel, "_launch_probe_kernel": launch._launch_probe_kernel,
    }
    # an autotuned kernel is an Autotuner over the JITFunction (its .fn); a plain one is the JITFunction
    kernels = {name: triton_kernel(k) for name, k in kernels.items()}  # (launch.Launcher's)
    return {name: k.fn if hasattr(k, "configs") else k for name, k in kernels.items()}


def kernel_names_in_sources() -> set[str]:
    """Names of the @triton.jit kernels (`_..._kernel`) defined in the Triton files of this folder,
    read from the source: a new kernel that the guard does not know about shows up here."""
    import ast

    here = os.path.dirname(os.path.abspath(__file__))
    names = set()
    for file in sorted(os.listdir(here)):
        if not file.endswith(".py") or file in ("cpu.py", "compile_check.py"):
            continue
        tree = ast.parse(open(os.path.join(here, file)).read())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def _round_robin(configs: list, flags: list) -> list[tuple]:
    """Pairs that put every config beside some flag combination and every flag combination beside
    some config: max(len) pairs, the shorter list cycled."""
    n = max(len(configs), len(flags))
    return [(configs[i % len(configs)], flags[i % len(flags)]) for i in range(n)]


# (P, LANES): every format on each path (int32 words, bytes)
FORMAT_PATHS = [(p, lanes) for p in FORMATS.values() for lanes in (4, 1)]


def _formats_and_paths(i: int, every_format: bool) -> list[tuple[int, int]]:
    """(P, LANES) for the i-th (config, flags) pair of a packed kernel. every_format: every format,
    and both paths in turn, starting with the other one at the next pair, so that every config and
    flag combination is compiled in every format and on each path, and every format on each path.
    Otherwise one format and path, the six in turn, shifted by one every six pairs (the pair's
    alignment follows i % 3: within 18 pairs each format and path meets both alignments)."""
    if not every_format:
        return [FORMAT_PATHS[(i + i // len(FORMAT_PATHS)) % len(FORMAT_PATHS)]]
    paths = (4, 1) if i % 2 == 0 else (1, 4)
    return [(p, paths[j % 2]) for j, p in enumerate(FORMATS.values())]


def _gemv_variants(every_format: bool = True) -> list[Variant]:
    from .gemv import CONFIGS

    flags = []
    for q_in, bias in itertools.product(["fp32", "bf16", "fp16"], [False, True]):
        # BLOCK_A = min(next_power_of_2(K), 4096): 4096 at real widths, small for small K
        flags.append(dict(QUANTIZE_X=True, x=q_in, y=q_in, HAS_BIAS=bias, BLOCK_A=64 if q_in == "fp16" else 4096))
    for out, bias in itertools.product(["fp32", "bf16", "fp16"], [False, True]):
        flags.append(dict(QUANTIZE_X=False, x="int8", y=out, HAS_BIAS=bias, BLOCK_A=4096))
    flags.append(dict(QUANTIZE_X=False, x="int8", y="int32", HAS_BIAS=False, BLOCK_A=4096))
    flags = [dict(f, SEGMENTS=1 + i % 3) for i, f in enumerate(flags)]  # one to three matrices (gemv_cat)
    # the residual added in the epilogue (one matrix, a float output): the decoder layer's skip connection
    flags += [dict(f, SEGMENTS=1, HAS_RES=True) for f in flags if f["y"] in ("bf16", "fp32") and not f["HAS_BIAS"]]
    # the RMSNorm in the GEMV (rmsnorm_packed_matmul_cat at decode): q / k / v, o and down (the residual
    # added; down's norm gated by up), gate / up; XQ_OUT: the tests' view of what it quantized
    norm = dict(QUANTIZE_X=True, HAS_BIAS=False, NORM=True, BLOCK_A=4096)
    flags += [dict(norm, x="bf16", y="bf16", SEGMENTS=3), dict(norm, x="bf16", y="bf16", SEGMENTS=1, HAS_RES=True),
              dict(norm, x="bf16", y="bf16", SEGMENTS=1, HAS_RES=True, GATED=True),
              dict(norm, x="fp16", y="fp16", SEGMENTS=2, HAS_BIAS=True),
              dict(norm, x="fp32", y="fp32", SEGMENTS=2, GATED=True, XQ_OUT=True, BLOCK_A=64)]
    # every tile beside float x (quantized once for all the tile's rows) and beside int8 x_q
    pairs = [pair for q in (True, False) for pair in _round_robin(CONFIGS, [f for f in flags if f["QUANTIZE_X"] == q])]
    out = []
    for i, (cfg, f) in enumerate(pairs):
        for p, lanes in _formats_and_paths(i, every_format):
            consts = dict(P=p, QUANTIZE_X=f["QUANTIZE_X"], HAS_BIAS=f["HAS_BIAS"], OUT_INT32=f["y"] == "int32",
                          LANES=lanes, ASM=True, SEGMENTS=f["SEGMENTS"], HAS_RES=f.get("HAS_RES", False),
                          NORM=f.get("NORM", False), GATED=f.get("GATED", False), XQ_OUT=f.get("XQ_OUT", False),
                          SUM_BLOCK=f["BLOCK_A"] if f.get("NORM") else 1, BLOCK_A=f["BLOCK_A"], **cfg.kwargs)
            bias = TYPES["bf16" if f["y"] == "int32" else f["y"]]  # (the kernel reads words through cast pointers)
            types = dict(x_ptr=TYPES[f["x"]], a_ptr="*fp32", w_ptr="*u8", scale_ptr="*fp32", bias_ptr=bias, y_ptr=TYPES[f["y"]],
                         scale1_ptr="*fp32", bias1_ptr=bias, scale2_ptr="*fp32", bias2_ptr=bias, W1="i64", W2="i64",
                         res_ptr=bias, nw_ptr=TYPES[f["x"]] if f.get("NORM") else "*fp32",
                         u_ptr=TYPES[f["x"]] if f.get("GATED") else "*fp32", xq_ptr="*i8", eps="fp32")
            out.append(Variant("_gemv_kernel", consts, types, cfg.num_warps, cfg.num_stages, aligned=i % 3 != 2))
    return out


def _gemm_variants(every_format: bool = True) -> list[Variant]:
    from .gemm import LARGE_M_CONFIGS, SMALL_M_CONFIGS, norm_configs

    tiles = [(c, s) for c in SMALL_M_CONFIGS for s in (1, 2)] + [(c, 1) for c in LARGE_M_CONFIGS]
    flags = [dict(y=y, HAS_BIAS=b) for y, b in itertools.product(["bf16", "fp32", "fp16"], [True, False])]
    flags.append(dict(y="int32", HAS_BIAS=False))
    # one to three matrices (gemm_cat), every output dtype and bias beside each count
    flags = [dict(f, SEGMENTS=s) for f in flags for s in (1, 2, 3)]
    # the residual added in the epilogue (one matrix, a float output): a batched decode's skip connection
    flags += [dict(y="bf16", HAS_BIAS=False, SEGMENTS=1, HAS_RES=True), dict(y="fp32", HAS_BIAS=True, SEGMENTS=1, HAS_RES=True)]
    pairs = _round_robin(tiles, flags)
    # the RMSNorm in the GEMM (rmsnorm_packed_matmul_cat at a batched decode step, its two tiles,
    # gemm.NORM_TILE and NORM_WIDE): q / k / v, o and down (the residual added; down's norm gated by
    # up), gate / up: NORM_TILE with each flag set, NORM_WIDE with three (its own code is the width),
    # between them every format on each path and each tile in every format and on each path, split
    # along K and not; 1-bit NORM_TILE (16 packed rows: its operand was staged in shared memory
    # before layout.weight_operand) with the gate
    norm = [dict(x="bf16", y="bf16", HAS_BIAS=False, SEGMENTS=3), dict(x="bf16", y="bf16", HAS_BIAS=False, SEGMENTS=1,
                                                                      HAS_RES=True),
            dict(x="bf16", y="bf16", HAS_BIAS=False, SEGMENTS=1, HAS_RES=True, GATED=True),
            dict(x="fp16", y="fp16", HAS_BIAS=True, SEGMENTS=2), dict(x="fp32", y="fp32", HAS_BIAS=False, SEGMENTS=2,
                                                                     GATED=True, SUM_BLOCK=256)]
    tile, wide = norm_configs()
    normed = [(tile, 0, 4, 4, 1), (tile, 1, 8, 1, 2), (tile, 2, 8, 4, 1), (tile, 3, 5, 1, 2), (tile, 4, 5, 4, 2),
              (wide, 0, 8, 4, 2), (wide, 1, 5, 4, 1), (wide, 2, 4, 1, 1)]  # (tile, flag set, P, LANES, SPLIT_K)
    rows = [(i, p, lanes, pair) for i, pair in enumerate(pairs) for p, lanes in _formats_and_paths(i, every_format)]
    rows += [(len(pairs) + k, p, lanes, ((t, split), dict(norm[f], NORM=True)))
             for k, (t, f, p, lanes, split) in enumerate(normed)]
    out = []
    for i, p, lanes, ((cfg, split), f) in rows:
        consts = dict(P=p, HAS_BIAS=f["HAS_BIAS"], OUT_INT32=f["y"] == "int32", LANES=lanes, ASM=True, SPLIT_K=split,
                      SEGMENTS=f["SEGMENTS"], HAS_RES=f.get("HAS_RES", False), NORM=f.get("NORM", False),
                      GATED=f.get("GATED", False), SUM_BLOCK=f.get("SUM_BLOCK", 4096) if f.get("NORM") else 1,
                      **cfg.kwargs)
        bias = TYPES["bf16" if f["y"] == "int32" else f["y"]]
        x = TYPES[f["x"]] if f.get("NORM") else "*i8"
        types = dict(x_ptr=x, a_ptr="*fp32", xsum_ptr="*i32", w_ptr="*i32" if lanes == 4 else "*u8",
                     scale_ptr="*fp32", bias_ptr=bias, y_ptr=TYPES[f["y"]], ws_ptr="*i32", count_ptr="*i32",
                     scale1_ptr="*fp32", bias1_ptr=bias, scale2_ptr="*fp32", bias2_ptr=bias, W1="i64", W2="i64",
                     res_ptr=bias, nw_ptr=x if f.get("NORM") else "*fp32", u_ptr=x if f.get("GATED") else "*fp32",
                     eps="fp32")
        out.append(Variant("_gemm_kernel", consts, types, cfg.num_warps, cfg.num_stages, aligned=i % 3 != 2))
    return out


def _gemm_int8_variants() -> list[Variant]:
    from .gemm import INT8_CONFIGS

    flags = [dict(y=y, HAS_BIAS=b) for y, b in itertools.product(["bf16", "fp32", "fp16"], [True, False])]
    flags.append(dict(y="int32", HAS_BIAS=False))
    # one to three matrices (gemm_cat at a prefill), every output dtype and bias beside each count
    flags = [dict(f, SEGMENTS=s) for f in flags for s in (1, 2, 3)]
    # the residual added in the epilogue (one matrix, a float output): a prefill's skip connection
    flags += [dict(y="bf16", HAS_BIAS=False, SEGMENTS=1, HAS_RES=True), dict(y="fp32", HAS_BIAS=True, SEGMENTS=1, HAS_RES=True)]
    out = []
    for i, (cfg, f) in enumerate(_round_robin(INT8_CONFIGS, flags)):
        consts = dict(HAS_BIAS=f["HAS_BIAS"], OUT_INT32=f["y"] == "int32", SEGMENTS=f["SEGMENTS"],
                      HAS_RES=f.get("HAS_RES", False), **cfg.kwargs)
        bias = TYPES["bf16" if f["y"] == "int32" else f["y"]]
        types = dict(x_ptr="*i8", a_ptr="*fp32", w_ptr="*i8", scale_ptr="*fp32", bias_ptr=bias, y_ptr=TYPES[f["y"]],
                     scale1_ptr="*fp32", bias1_ptr=bias, scale2_ptr="*fp32", bias2_ptr=bias, res_ptr=bias)
        out.append(Variant("_gemm_int8_kernel", consts, types, cfg.num_warps, cfg.num_stages, aligned=i % 3 != 2))
    return out


def _act_quant_variants() -> list[Variant]:
    from .activations import CONFIGS

    out = []
    for i, (cfg, dtype) in enumerate(itertools.product(CONFIGS, ["fp32", "bf16", "fp16"])):
        types = dict(x_ptr=TYPES[dtype], xq_ptr="*i8", a_ptr="*fp32", xsum_ptr="*i32")
        out.append(Variant("_act_quant_kernel", dict(cfg.kwargs), types, cfg.num_warps, cfg.num_stages,
                           aligned=i % 2 == 0))
    return out


def _rmsnorm_variants() -> list[Variant]:
    from .activations import CONFIGS

    dtypes = [("fp32", "fp32", False), ("bf16", "bf16", True), ("fp16", "fp16", False), ("bf16", "fp32", False),
              ("fp16", "fp32", True), ("bf16", "bf16", False), ("fp32", "fp32", True)]
    out = []
    for i, (cfg, (x, w, gated)) in enumerate(_round_robin(CONFIGS, dtypes)):
        types = dict(x_ptr=TYPES[x], u_ptr=TYPES[x], w_ptr=TYPES[w], xq_ptr="*i8", a_ptr="*fp32", xsum_ptr="*i32", eps="fp32")
        # SUM_BLOCK = rmsnorm_quant.sum_block(K): 4096 from K = 2048 on (every real width), smaller below
        consts = dict(GATED=gated, SUM_BLOCK=4096 if i % 3 else 256, **cfg.kwargs)
        out.append(Variant("_rmsnorm_act_quant_kernel", consts, types, cfg.num_warps,
                           cfg.num_stages, aligned=i % 2 == 0))
    return out


def _rmsnorm_unpack_variants() -> list[Variant]:
    # the norm's dtypes and GATED beside the unpack's format, LANES and matrix count (a prefill's
    # q / k / v, gate / up, o_proj, down_proj), each config of CONFIGS at least once
    from .activations import CONFIGS
    from .layout import UNPACK_BLOCK_K, UNPACK_BLOCK_R

    # (w None: no norm, a bitlinear layer's act_quant from float x at large M; its w_ptr is x, unread)
    norms = [("bf16", "bf16", False), ("bf16", "bf16", True), ("fp32", "fp32", False), ("fp16", "fp32", True),
             ("bf16", None, False), ("fp16", None, False)]
    unpacks = [(p, lanes, seg) for p in FORMATS.values() for lanes in (4, 1) for seg in (1, 2, 3)]
    # every unpack beside a norm (each norm thrice), and the unnormed rows on the word path too
    pairs = _round_robin(unpacks, norms) + [(unpacks[1], norms[4]), (unpacks[14], norms[5])]
    out = []
    for i, ((p, lanes, seg), (x, w, gated)) in enumerate(pairs):
        cfg = CONFIGS[i % len(CONFIGS)]
        types = dict(x_ptr=TYPES[x], u_ptr=TYPES[x], w_ptr=TYPES[w or x], xq_ptr="*i8", a_ptr="*fp32", xsum_ptr="*i32",
                     pw_ptr="*u8", pw1_ptr="*u8", pw2_ptr="*u8", out_ptr="*i8", eps="fp32")
        consts = dict(NORM=w is not None, GATED=gated, SUM_BLOCK=4096 if i % 3 else 256, P=p, SEGMENTS=seg, LANES=lanes,
                      ASM=True, UNPACK_R=UNPACK_BLOCK_R, UNPACK_K=UNPACK_BLOCK_K, **cfg.kwargs)
        out.append(Variant("_rmsnorm_quant_unpack_kernel", consts, types, cfg.num_warps, cfg.num_stages,
                           aligned=i % 2 == 0))
    return out


def _rope_variants() -> list[Variant]:
    # rope.rope_cache launches with LAUNCH (4 warps); the cache may hold another dtype than q / k / v
    out = []
    for i, (dtype, cache_dtype, cached, rows, hd) in enumerate([
            ("bf16", "bf16", True, False, 128), ("bf16", "bf16", False, False, 128), ("fp16", "fp16", True, True, 64),
            ("fp32", "fp32", False, False, 64), ("bf16", "fp32", True, False, 96), ("fp32", "fp32", True, True, 128),
            ("bf16", "bf16", True, True, 128)]):
        types = dict(q_ptr=TYPES[dtype], k_ptr=TYPES[dtype], v_ptr=TYPES[dtype], cos_ptr=TYPES[dtype], sin_ptr=TYPES[dtype],
                     qo_ptr=TYPES[dtype], ko_ptr=TYPES[cache_dtype], vo_ptr=TYPES[cache_dtype],
                     pos_ptr="*i64" if cached else TYPES[dtype], row_ptr="*i64" if rows else TYPES[dtype])
        consts = dict(HD=hd, CACHE=cached, TOKEN_ROWS=rows, BLOCK=1 << (hd - 1).bit_length())
        out.append(Variant("_rope_cache_kernel", consts, types, aligned=i % 2 == 0))
    return out


# attention.decode_attention: q and the caches of one dtype (a float32 one: IEEE dots), head sizes
# 64 / 96 / 128 / 256 (the most ops.decode_attention sends: fewer stages below sm_90's shared memory),
# grouped heads 1 / 2 / 4 / 8 (BLOCK_G 16), per-query cache rows, a key mask (bool, or the integer
# attention_mask), one split (y written by the kernel) or several (partials, merged); an odd number
# of cases, so that each meets both alignments (with the RoPE folded in and without)
_ATTENTION_CASES = [("bf16", 128, 4, False, "i1", 1), ("bf16", 128, 4, False, "i1", 4), ("fp16", 64, 1, True, None, 2),
                    ("fp32", 64, 8, True, "i64", 1), ("bf16", 96, 8, False, None, 3), ("fp32", 128, 4, False, "i1", 2),
                    ("fp16", 128, 2, True, "i1", 1), ("bf16", 256, 2, False, "i1", 2), ("fp16", 256, 1, True, None, 1)]


def _attention_variants() -> list[Variant]:
    import torch

    from .attention import NUM_WARPS, tile

    out = []
    # every case as it is, and with the decode step's RoPE and cache write folded in (ROPE)
    cases = [(c, rope) for rope in (False, True) for c in _ATTENTION_CASES]
    for i, ((dtype, hd, g, rows, mask, splits), rope) in enumerate(cases):
        types = dict(q_ptr=TYPES[dtype], k_ptr=TYPES[dtype], v_ptr=TYPES[dtype], pos_ptr="*i64", row_ptr="*i64",
                     mask_ptr=f"*{mask}" if mask else "*i64", y_ptr=TYPES[dtype],
                     part_ptr="*fp32" if splits > 1 else TYPES[dtype], count_ptr="*i32" if splits > 1 else "*i64",
                     kn_ptr=TYPES[dtype], vn_ptr=TYPES[dtype], cos_ptr=TYPES[dtype], sin_ptr=TYPES[dtype],
                     qk_scale="fp32")
        block_s, stages = tile({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
        consts = dict(G=g, D=hd, HAS_ROWS=rows, HAS_MASK=mask is not None, IEEE=dtype == "fp32", UPCAST=False,
                      ROPE=rope, BLOCK_G=max(16, g), BLOCK_D=1 << (hd - 1).bit_length(), BLOCK_S=block_s)
        out.append(Variant("_decode_attention_kernel", consts, types, NUM_WARPS, stages, aligned=i % 2 == 0,
                           note=f"splits={splits}"))
    return out


def _int8_linear_variants() -> list[Variant]:
    from .int8_head import CONFIGS

    flags = [dict(x=x, HAS_BIAS=b) for x, b in itertools.product(["bf16", "fp32", "fp16"], [False, True])]
    out = []
    for i, (cfg, f) in enumerate(_round_robin(CONFIGS, flags)):
        types = dict(x_ptr=TYPES[f["x"]], w_ptr="*i8", scale_ptr="*fp32", bias_ptr=TYPES[f["x"]], y_ptr=TYPES[f["x"]])
        out.append(Variant("_int8_linear_kernel", dict(HAS_BIAS=f["HAS_BIAS"], **cfg.kwargs), types, cfg.num_warps,
                           cfg.num_stages, fp_fusion=True, aligned=i % 3 != 2))  # launched without LAUNCH
    return out


def _int4_linear_variants() -> list[Variant]:
    from .int4_head import CONFIGS

    flags = [dict(y=y, HAS_BIAS=b) for y, b in itertools.product(["bf16", "fp32", "fp16"], [False, True])]
    out = []
    for i, (cfg, f) in enumerate(_round_robin(CONFIGS, flags)):
        types = dict(xq_ptr="*i8", a_ptr="*fp32", codes_ptr="*u8", scales_ptr="*fp32", bias_ptr=TYPES[f["y"]],
                     y_ptr=TYPES[f["y"]])
        out.append(Variant("_int4_linear_kernel", dict(HAS_BIAS=f["HAS_BIAS"], ASM=True, **cfg.kwargs), types, cfg.num_warps,
                           cfg.num_stages, fp_fusion=True, aligned=i % 3 != 2))  # launched without LAUNCH
    return out


def _unpack_variants() -> list[Variant]:
    # unpack_cat launches with Triton's default options (no LAUNCH): 4 warps, 3 stages, fusion on; one to
    # three matrices (a prefill's q / k / v, gate / up), each count beside each format
    from .layout import UNPACK_BLOCK_K, UNPACK_BLOCK_R

    out = []
    for p, lanes in itertools.product(FORMATS.values(), (4, 1)):
        for seg in (1, 2, 3):  # (words through int32 pointers cast in the kernel)
            out.append(Variant("_unpack_kernel", dict(P=p, SEGMENTS=seg, LANES=lanes, ASM=True,
                                                      BLOCK_R=UNPACK_BLOCK_R, BLOCK_K=UNPACK_BLOCK_K),
                               dict(w_ptr="*u8", w1_ptr="*u8", w2_ptr="*u8", out_ptr="*i8"), fp_fusion=True,
                               aligned=seg != 2))
    return out


def _launch_probe_variants() -> list[Variant]:
    # launch._verify launches it through a Launcher with Triton's default options
    return [Variant("_launch_probe_kernel", dict(BLOCK=64), dict(out_ptr="*fp32", value="fp32"), fp_fusion=True)]


def _pdl_probe_variants() -> list[Variant]:
    # common.pdl_probe launches it with Triton's default options (PDL set per architecture below)
    return [Variant("_pdl_probe_kernel", {}, dict(counter_ptr="*i32"), fp_fusion=True)]


VARIANTS = {
    "_gemv_kernel": _gemv_variants, "_gemm_kernel": _gemm_variants, "_gemm_int8_kernel": _gemm_int8_variants,
    "_act_quant_kernel": _act_quant_variants,
    "_rmsnorm_act_quant_kernel": _rmsnorm_variants, "_unpack_kernel": _unpack_variants,
    "_rmsnorm_quant_unpack_kernel": _rmsnorm_unpack_variants,
    "_rope_cache_kernel": _rope_variants, "_decode_attention_kernel": _attention_variants,
"_int8_linear_kernel": _int8_linear_variants,
    "_int4_linear_kernel": _int4_linear_variants, "_pdl_probe_kernel": _pdl_probe_variants,
    "_launch_probe_kernel": _launch_probe_variants,
}


# The kernels with a PDL constexpr (common.pdl): what their launchers pass, True from sm_90 on.
PDL_KERNELS = {"_gemv_kernel", "_gemm_kernel", "_act_quant_kernel", "_rmsnorm_act_quant_kernel", "_rope_cache_kernel",
               "_decode_attention_kernel", "_int8_linear_kernel", "_int4_linear_kernel", "_pdl_probe_kernel",
               "_rmsnorm_quant_unpack_kernel", "_gemm_int8_kernel"}


# The architectures whose GEMV and GEMM pairs (a config beside a flag combination) are compiled in
# every format (sm_90: the GPU machines', and where the kernels were tuned); elsewhere each pair in
# one format and path, in turn (every config, flag combination, format and path still compiled, and
# every format on each path): what differs between architectures is the lowering of a tile (its MMA,
# its shared memory), which each config's compile there shows.
EVERY_FORMAT = (90,)
_PER_FORMAT = {"_gemv_kernel", "_gemm_kernel"}  # (the makers that take every_format)


def variants(archs=ARCHS, kernels: list[str] | None = None, every_format=EVERY_FORMAT) -> list[Variant]:
    """The variants of `kernels` (default: all) for `archs`, as each architecture launches them;
    the packed kernels' pairs in every format for the architectures in `every_format`."""
    unknown = set(kernels or []) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; the guard knows {sorted(VARIANTS)}")
    out = []
    for name, make in VARIANTS.items():
        if kernels and name not in kernels:
            continue
        for arch in archs:
            for v in (make(arch in every_format) if name in _PER_FORMAT else make()):
                consts = dict(v.constexprs, PDL=arch >= 90) if name in PDL_KERNELS else v.constexprs
                if name == "_gemm_kernel":  # (what common.mma_sync passes on that architecture)
                    consts = dict(consts, MMA_SYNC=mma_sync_arch(arch))
                v = as_launched(dataclasses.replace(v, arch=arch, constexprs=consts))
                if v is not None:
                    out.append(v)
    return out


def as_launched(v: Variant) -> Variant | None:
    """v as its launcher launches it on a GPU of v.arch with that architecture's shared memory
    (SHARED_LIMIT): the decode attention with the stages attention.tile gives there; a norm-fused
    GEMM tile that gemm.norm_tile_fits turns down is not launched there (None: the norm runs apart)."""
    import torch

    limit = SHARED_LIMIT.get(v.arch)
    if v.kernel == "_decode_attention_kernel":
        from .attention import tile

        c = v.constexprs
        dtype = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16}[v.types["k_ptr"]]
        return dataclasses.replace(v, num_stages=tile(dtype, c["BLOCK_D"], c["BLOCK_G"], limit)[1])
    if v.kernel == "_gemm_kernel" and v.constexprs.get("NORM"):
        bound = _norm_tile_bound(v)
        return v if limit is None or bound is None or bound <= limit else None
    return v


def _compile(v: Variant, fn=None):
    """triton.compile of one variant (raises what the compiler raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = fn or _jit_functions()[v.kernel]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in v.constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = v.types.get(name, "i32")
        if v.aligned and (signature[name].startswith("*") or signature[name] in ("i32", "i64")):
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the launcher's specialization gives
    missing = set(v.constexprs) - set(fn.arg_names)
    if missing:
        raise TypeError(f"constexprs {sorted(missing)} are not arguments of {v.kernel}")
    if "PDL" in fn.arg_names and "PDL" not in v.constexprs:
        raise TypeError(f"{v.kernel} takes PDL: add it to compile_check.PDL_KERNELS")
    source = ASTSource(fn=fn, signature=signature, constexprs=v.constexprs, attrs=attrs)
    options = dict(num_warps=v.num_warps, num_stages=v.num_stages, enable_fp_fusion=v.fp_fusion)
    return triton.compile(source, target=GPUTarget("cuda", v.arch, 32), options=options)


def compile_variant(v: Variant, fn=None) -> Result:
    """Compile one variant to a cubin; a failure is a Result carrying the compiler's message.
    fn: the JITFunction to compile (default: the package's kernel named v.kernel)."""
    start = time.perf_counter()
    try:
        compiled = _compile(v, fn)
        shared = int(compiled.metadata.shared)
        if not compiled.asm.get("cubin"):
            raise RuntimeError("the compiler returned no cubin")
        registers, spill = resources(compiled)
        ordered = ordered_ops(compiled.asm["ptx"])
        copies = weight_tile_copies(compiled) if v.kernel == "_gemm_kernel" and v.constexprs["LANES"] == 4 else None
    except Exception as e:  # noqa: BLE001: every compiler failure is reported, with its type
        return Result(v, False, time.perf_counter() - start, error=_message(e))
    limit = SHARED_LIMIT.get(v.arch)
    bound = shared_bound(v)
    error = ""
    if limit is not None and shared > limit and v.arch not in ARCHS and droppable(v):
        return Result(v, True, time.perf_counter() - start, shared, "", registers, spill, ordered, copies, dropped=True)
    if limit is not None and shared > limit:
        error = f"needs {shared} bytes of shared memory per program; sm_{v.arch} allows {limit}"
    elif bound is not None and shared > bound:
        error = (f"needs {shared} bytes of shared memory per program, more than its launcher's bound of {bound} "
                 f"(what decides whether the tile fits a GPU with less: {SHARED_BOUNDS[v.kernel][0]}); raise the bound")
    elif ordered > ORDERED_LIMIT:
        error = (f"{ordered} memory operations with acquire or release semantics (each a MEMBAR.ALL.GPU in the SASS, "
                 f"an acquire also drops the SM's L1: the thread waits on L2 for each); at most {ORDERED_LIMIT} a "
                 f"program (a split's arrival counter): pass sem=\"relaxed\" to atomics that order nothing")
    elif copies and copies > 1 and v.constexprs["BLOCK_M"] < 64:
        error = (f"each packed weight is decoded by {copies} warps (weight_tile_copies: the TTGIR's layout of the "
                 f"loop's weight tile); a tile under 64 rows runs on mma.sync on every GPU, where one warp a weight "
                 f"is possible (gemm.py, FIFTH_FIRST)")
    return Result(v, not error, time.perf_counter() - start, shared, error, registers, spill, ordered, copies)


def droppable(v: Variant) -> bool:
    """Whether a variant that asks a GPU for more shared memory than it has is passed over rather
    than launched there: a config of an autotuned kernel (Triton's autotuner times every fitting
    config, and one that fails with "out of resources" is not chosen), but not the config that
    BITNET_AUTOTUNE=first launches untimed (each regime's first). The target architectures (ARCHS)
    drop nothing: every config there must fit."""
    from . import activations, gemm, gemv, int4_head, int8_head

    untimed = {"_gemm_kernel": [gemm.SMALL_M_CONFIGS[0], gemm.LARGE_M_CONFIGS[0]], "_gemm_int8_kernel": [gemm.INT8_CONFIGS[0]],
               "_gemv_kernel": [gemv.CONFIGS[0]], "_act_quant_kernel": [activations.CONFIGS[0]],
               "_rmsnorm_act_quant_kernel": [activations.CONFIGS[0]], "_rmsnorm_quant_unpack_kernel": [activations.CONFIGS[0]],
               "_int8_linear_kernel": [int8_head.CONFIGS[0]], "_int4_linear_kernel": [int4_head.CONFIGS[0]]}
    if v.kernel not in untimed or v.constexprs.get("NORM"):  # (the norm-fused tile is the launcher's one choice)
        return False
    return not any(all(v.constexprs.get(k) == value for k, value in c.kwargs.items()) and v.num_warps == c.num_warps
                   and v.num_stages == c.num_stages for c in untimed[v.kernel])


def _attention_bound(v: Variant) -> int:
    from .attention import shared_bytes

    c = v.constexprs
    return shared_bytes(c["BLOCK_S"], c["BLOCK_D"], c["BLOCK_G"], FLOAT_BYTES[v.types["k_ptr"]], v.num_stages)


def _norm_tile_bound(v: Variant) -> int | None:
    from .gemm import norm_configs, norm_tile_shared

    c = v.constexprs
    blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    tiles = [i for i, t in enumerate(norm_configs()) if all(c[k] == t.kwargs[k] for k in blocks)]
    if not c.get("NORM") or not tiles:
        return None  # (off the norm tiles: no launcher launches it; a test compiles one to see it spill)
    return norm_tile_shared(FLOAT_BYTES[v.types["x_ptr"]], c["GATED"], tiles[0] == 1)


# The kernels whose launchers choose a tile by the device's shared memory (common.shared_limit)
# from a bound of what it asks for: the compiled size must not pass the bound, on any architecture.
# (The autotuned kernels need none: Triton's autotuner drops a config that does not fit when it
# times it.)
SHARED_BOUNDS = {"_decode_attention_kernel": ("attention.shared_bytes", _attention_bound),
                 "_gemm_kernel": ("gemm.norm_tile_shared", _norm_tile_bound)}


def shared_bound(v: Variant) -> int | None:
    """The launcher's bound of the shared memory v asks for, None where its launcher has none."""
    entry = SHARED_BOUNDS.get(v.kernel)
    return entry[1](v) if entry else None


# Triton's atomics are acq_rel unless told otherwise (sem=): on sm_90 each compiles to MEMBAR.ALL.GPU,
# the atomic returning, then CCTL.IVALL, so a split-K tile's 16 partial adds a thread were 16 round
# trips to L2 one after another. A program needs one ordered operation at most: the counter by which
# the last split to arrive at a tile knows it is last (after a barrier, its release covers every
# thread's relaxed adds: the PTX memory model's cumulativity, CUTLASS's split-K semaphore).
ORDERED_LIMIT = 1


def ordered_ops(ptx: str) -> int:
    """How many instructions of a kernel's PTX order memory: fences (not proxy fences: shared memory
    handed to TMA or wgmma), and atomics, reductions, loads and stores with acquire, release, acq_rel
    or sc semantics (a relaxed red is fire and forget)."""
    import re

    pattern = (r"^\s*(?:@!?%p\w+\s+)?(?:membar\.|fence\.(?:sc|acq_rel|acquire|release)\b"
               r"|(?:atom|red|ld|st)\.\S*\.(?:acquire|release|acq_rel|sc)\b)")
    return len(re.findall(pattern, ptx, re.MULTILINE))


def resources(compiled) -> tuple[int, int]:
    """(registers a thread, bytes of local memory a thread) of a compiled kernel's cubin, as the
    cuobjdump in Triton's wheel reads them (-res-usage: REG, and STACK + LOCAL, where ptxas puts
    the registers it spills)."""
    import re

    usage = _cuobjdump("-res-usage", compiled)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[-300:]!r}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def weight_tile_copies(compiled) -> int | None:
    """How many warps of a GEMM program hold each word of its packed weight tile as the loop decodes
    it (the int32 tile it reads from shared memory: LANES == 4 variants): 2 ** the zero warp bases
    of the tile's layout in the TTGIR (a linear layout), or the warps' coverage over the tile's
    shape (a blocked one). 1: each weight is decoded once a program; more: every copy decodes it
    (gemm.py's order of the two dots of "1.6bit")."""
    import re

    ttgir = compiled.asm["ttgir"]
    layouts = dict(re.findall(r"^(#[\w]+) = (#ttg\.\w+<.*>)$", ttgir, re.M))
    copies = []
    for shape, layout in re.findall(r"ttg\.local_load .*memdesc<(\d+x\d+)xi32.*-> tensor<\d+x\d+xi32, (#\w+)>", ttgir):
        rows, cols = map(int, shape.split("x"))
        text = layouts[layout]
        if text.startswith("#ttg.linear"):
            warp = re.search(r"warp = \[(.*?)\]\], block", text) or re.search(r"warp = \[\]", text)
            bases = re.findall(r"\[(-?\d+), (-?\d+)\]", warp.group(0))
            copies.append(2 ** sum(b == ("0", "0") for b in bases))
        elif text.startswith("#ttg.blocked"):
            field = {k: list(map(int, v.split(","))) for k, v in re.findall(r"(\w+) = \[([\d, ]+)\]", text)}
            per_warp = [s * t for s, t in zip(field["sizePerThread"], field["threadsPerWarp"])]
            copies.append(max(1, field["warpsPerCTA"][0] * per_warp[0] // max(rows, per_warp[0]))
                          * max(1, field["warpsPerCTA"][1] * per_warp[1] // max(cols, per_warp[1])))
        else:
            raise ValueError(f"weight tile layout {layout} = {text[:80]}: neither linear nor blocked")
    return max(copies) if copies else None  # (None: no int32 tile read from shared memory, e.g. one stage)


def _cuobjdump(flag: str, compiled) -> str:
    """cuobjdump `flag` of a compiled kernel's cubin (the cuobjdump in Triton's wheel)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


# Kernels whose programs may load before the PDL wait: the GEMV's first tile of packed weights (no
# kernel writes them), one 16-byte load a thread for each 16 bytes of it.
PDL_PRELOADS = {"_gemv_kernel"}


_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}  # an LDG.E's suffix -> bytes (none: 4)


def weight_tile_loads_only(early: list[str], tile: int, threads: int) -> bool:
    """The memory instructions a GEMV program issues before its PDL wait are the loads of its
    weight tile: plain global loads (LDG.E) of one width (16 bytes a thread on the word path, 8 on
    the byte path for 2048 bytes over 256 threads), no more of them than the tile needs (one a
    thread at least). A load of x (written by the kernel before) would come on top."""
    widths = {_LOAD_BYTES.get(op.split(".")[-1], 4) if op.split(".")[:2] == ["LDG", "E"] else 0 for op in early}
    if not widths:
        return True
    width = widths.pop()
    return not widths and width > 0 and len(early) * width * threads <= max(tile, width * threads)


def pdl_order(v: Variant, fn=None) -> list[str]:
    """What breaks programmatic dependent launch's contract (common.pdl) in the SASS of a PDL=True
    variant (cuobjdump from Triton's wheel): no `griddepcontrol.launch_dependents` (PREEXIT) or
    `.wait` (ACQBULK), a store or atomic before the wait, or a load before it other than the
    GEMV's weight tile. Empty when the variant keeps it. (fn: as compile_variant's.)"""
    ops = [op for _, op, _ in sass_ops(_compile(v, fn))]
    problems = [f"no {name} ({ptx})" for name, ptx in (("PREEXIT", "launch_dependents"), ("ACQBULK", "wait"))
                if name not in ops]
    if problems:
        return problems
    early = [op for op in ops[:ops.index("ACQBULK")] if op.split(".")[0] in
             ("LDG", "STG", "LD", "ST", "LDS", "STS", "ATOM", "ATOMG", "ATOMS", "RED", "REDG", "LDGSTS")]
    if v.kernel in PDL_PRELOADS:
        c = v.constexprs
        tile = c["BLOCK_R"] * c["BLOCK_U"] * (4 if c.get("LANES", 4) == 4 else 1)
        if not weight_tile_loads_only(early, tile, 32 * v.num_warps):
            problems.append(f"before the wait: {early} (the weight tile is {tile} bytes)")
    elif early:
        problems.append(f"memory instructions before the wait: {early}")
    return problems


def sass_ops(compiled) -> list[tuple[int, str, str]]:
    """(address, opcode, line) of every instruction of a compiled kernel's cubin, disassembled by the
    cuobjdump in Triton's wheel."""
    import re

    sass = _cuobjdump("-sass", compiled)
    pattern = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*)$")
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(pattern.match, sass.splitlines()) if m]


def sass_loops(ops: list[tuple[int, str, str]]) -> list[tuple[int, int, collections.Counter]]:
    """Each loop of a kernel's SASS (sass_ops), a backward branch: its first and last address and its
    instructions by opcode (without modifiers)."""
    import re

    loops = []
    for addr, op, rest in ops:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            loops.append((start, addr, collections.Counter(o.split(".")[0] for a, o, _ in ops if start <= a <= addr)))
    return loops


def main_loop(compiled) -> collections.Counter:
    """The instructions by opcode of a compiled kernel's longest loop (a GEMM's K loop), empty if none."""
    loops = sass_loops(sass_ops(compiled))
    return max((body for _, _, body in loops), key=lambda body: sum(body.values()), default=collections.Counter())


def sass_summary(v: Variant) -> str:
    """A variant's sm SASS in brief: instructions, registers-free counts by opcode, and each loop (a
    backward branch) with its instructions by opcode: what gpu_notes.md quotes (per weight: a loop's
    count over the weights a thread multiplies a step)."""
    compiled = _compile(v)
    ops = sass_ops(compiled)
    lines = [f"{v.describe()}: {len(ops)} instructions, shared memory {int(compiled.metadata.shared)} B"]
    for start, end, body in sass_loops(ops):
        top = ", ".join(f"{o} {n}" for o, n in body.most_common(12))
        lines.append(f"  loop {start:#x}-{end:#x}: {sum(body.values())} instructions: {top}")
    return "\n".join(lines)


def pdl_samples() -> list[Variant]:
    """The variants --pdl-order reads: per PDL kernel its first aligned sm_90 variant, and for the
    GEMV also its first one with int8 activations (the model's decode path)."""
    out, seen = [], set()
    for v in variants(archs=(90,), kernels=sorted(PDL_KERNELS)):
        key = (v.kernel, v.constexprs.get("QUANTIZE_X"))
        if v.aligned and key not in seen:
            seen.add(key)
            out.append(v)
    return out


def run(archs=ARCHS, kernels: list[str] | None = None, jobs: int | None = None, progress=None,
        every_format=EVERY_FORMAT) -> list[Result]:
    """Compile every variant, `jobs` processes at a time (default: one per CPU)."""
    todo = variants(archs, kernels, every_format)
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        results = []
        for v in todo:
            results.append(compile_variant(v))
            if progress:
                progress(results[-1])
        return results
    import multiprocessing

    # fork: the workers inherit the imported modules (and the kernels' source as this process read it)
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        results = []
        for r in pool.map(compile_variant, todo, chunksize=1):
            results.append(r)
            if progress:
                progress(r)
    return results


def report(results: list[Result], seconds: float) -> str:
    import triton

    fails = [r for r in results if not r.ok]
    by_kernel: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        by_kernel.setdefault((r.variant.kernel, r.variant.arch), []).append(r)
    lines = [f"{len(results)} compiles with Triton {triton.__version__}, {len(fails)} failed, {seconds:.0f} s"]
    for (name, arch), rs in sorted(by_kernel.items()):
        spills = [r.spill for r in rs if r.spill and r.variant.aligned]  # (unaligned variants: K = 37 and the like)
        dropped = sum(r.dropped for r in rs)
        kept = [r for r in rs if not r.dropped] or rs
        lines.append(f"  {name} sm_{arch}: {len(rs)} variants, {sum(not r.ok for r in rs)} failed, largest shared memory "
                     f"{max(r.shared for r in kept)} B, registers up to {max(r.registers for r in rs)}, {len(spills)} "
                     f"aligned spill{f' (up to {max(spills)} B a thread)' if spills else ''}, ordered memory "
                     f"operations up to {max(r.ordered for r in rs)}"
                     + (f", each weight decoded by at most {max(copies)} warp{'s' if max(copies) > 1 else ''}"
                        if (copies := [r.copies for r in rs if r.copies]) else "")
                     + (f"; {dropped} over sm_{arch}'s shared memory, passed over by the autotuner" if dropped else ""))
    for r in fails:
        lines += ["", f"FAILED {r.variant.describe()}", *("    " + line for line in r.error.splitlines())]
    return "\n".join(lines)


@dataclass
class Args:
    arch: list[int] = field(default_factory=lambda: list(ARCHS))
    kernel: list[str] | None = None
    jobs: int | None = None
    verbose: bool = False
    every_format: list[int] = field(default_factory=lambda: list(EVERY_FORMAT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitnet.kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (default: 90 80)")
    p.add_argument("--kernel", nargs="+", choices=sorted(VARIANTS), help="only these kernels (default: all)")
    p.add_argument("--jobs", type=int, default=None, help="compiler processes (default: one per CPU)")
    p.add_argument("--verbose", action="store_true", help="one line per compile")
    p.add_argument("--every-format", type=int, nargs="*", default=list(EVERY_FORMAT), metavar="ARCH",
                   help="the architectures whose GEMV and GEMM configs and flag combinations are each compiled in "
                        "every format (default: 90; none: each in one format, in turn)")
    p.add_argument("--pdl-order", action="store_true",
                   help="instead: read the sm_90 SASS of a sample of each PDL kernel (pdl_samples) for the wait "
                        "before anything another kernel writes (pdl_order)")
    p.add_argument("--sass", action="store_true",
                   help="instead: the SASS in brief (instructions, loops by opcode) of the first variant of each "
                        "--kernel for the first --arch, changed by --set")
    p.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                   help="with --sass: constexprs (P=4 QUANTIZE_X=False), pointer types (x_ptr=*i8), num_warps, num_stages")
    ns = p.parse_args(argv)
    if ns.sass:
        for name in ns.kernel or sorted(VARIANTS):
            v = variants(archs=ns.arch[:1], kernels=[name])[0]
            consts, types, opts = dict(v.constexprs), dict(v.types), {}
            for item in ns.set:
                key, _, value = item.partition("=")
                parsed = {"True": True, "False": False}.get(value, int(value) if value.lstrip("-").isdigit() else value)
                if key in ("num_warps", "num_stages"):
                    opts[key] = parsed
                elif isinstance(parsed, str) and parsed.startswith("*"):
                    types[key] = parsed
                else:
                    consts[key] = parsed
            print(sass_summary(dataclasses.replace(v, constexprs=consts, types=types, aligned=True, **opts)))
        return 0
    del ns.sass, ns.set
    if ns.pdl_order:
        bad, samples = 0, pdl_samples()
        for v in samples:
            problems = pdl_order(v)
            bad += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {v.describe()}" + "".join(f"\n    {x}" for x in problems))
        print(f"PDL order: {len(samples)} variants read, {bad} failed")
        return int(bad > 0)
    del ns.pdl_order
    args = Args(**vars(ns))
    unguarded = kernel_names_in_sources() - set(VARIANTS)
    if unguarded:
        print(f"kernels the guard does not know how to launch: {sorted(unguarded)} (add them to VARIANTS)")
        return 1
    import triton

    todo = len(variants(args.arch, args.kernel, args.every_format))
    print(f"Triton {triton.__version__}: compiling {todo} variants for "
          f"{', '.join(f'sm_{a}' + (' (every format)' if a in args.every_format else '') for a in args.arch)}, "
          f"{args.jobs or os.cpu_count()} processes", flush=True)
    start = time.perf_counter()

    def progress(r: Result):
        if args.verbose or not r.ok:
            usage = (f" ({r.registers} registers, {r.spill} B spilled, {r.ordered} ordered"
                     f"{f', decoded by {r.copies} warps' if r.copies else ''})" if r.ok else "")
            mark = "drop" if r.dropped else "ok  " if r.ok else "FAIL"
            print(f"{mark} {r.seconds:5.1f}s {r.variant.describe()}{usage}", flush=True)

    results = run(args.arch, args.kernel, args.jobs, progress, args.every_format)
    print(report(results, time.perf_counter() - start))
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

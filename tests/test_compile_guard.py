"""The compile guard (bitnet.kernels.compile_check): every Triton kernel compiled for sm_90 and
sm_80 by Triton's own compiler, on a CPU, with no GPU.

The rest of the suite runs the kernels in the interpreter, which proves what they compute but
never type-checks them: a GEMM that the interpreter ran correctly for weeks did not compile on the
first GPU. These tests run the compiler in a subprocess (this process has TRITON_INTERPRET=1 when
there is no GPU, and the interpreter replaces every kernel by Python).

- default tier: every kernel with the Triton installed here (CI's), both architectures;
- default tier: the guard fails, naming the kernel and the cause, on the bug it exists for, and on
  a split-K epilogue that fences every partial sum;
- default tier: every launch of a run (tests/launch_check.py: generate, the server's steps, the
  heads, with and without biases) compiled for sm_90 with its real arguments, which the variants
  approximate (a None argument is a constexpr there, a pointer in a variant); and a kernel that
  compiles as a variant and not as launched, named by it;
- slow tier: the guard and the launch check with the oldest Triton that pyproject.toml allows (the
  floor; 3.6 is the GPU machines' version), installed once into ~/.cache/bitnet-test (CI runs it
  as a step).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bitnet.kernels import compile_check

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def _guard(*args: str, env: dict | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitnet.kernels.compile_check", *args], env=env or _env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_guard_knows_every_kernel_in_the_sources():
    found = compile_check.kernel_names_in_sources()
    assert {"_gemv_kernel", "_gemm_kernel", "_act_quant_kernel", "_rmsnorm_act_quant_kernel", "_unpack_kernel"} <= found
    assert found <= set(compile_check.VARIANTS), f"kernels without compile variants: {found - set(compile_check.VARIANTS)}"


def _tile(blocks: dict, num_warps: int, num_stages: int) -> tuple:
    """A GEMM tile as a config or a variant gives it: block sizes, warps, stages."""
    return tuple(blocks[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (num_warps, num_stages)


def _check_cover(vs: list, arch: int, every_format: bool) -> None:
    """The covering set's promise for one architecture (read off the variants, not recomputed the
    same way): every tile config and every flag combination of the GEMV and the GEMM compiled, in
    every format and on each path where every_format, and every format on each path, aligned and
    not, with the norm inside the GEMM in each."""
    from bitnet.kernels.gemm import LARGE_M_CONFIGS, NORM_ONLY_CONFIGS, SMALL_M_CONFIGS
    from bitnet.kernels.gemv import CONFIGS as GEMV_CONFIGS

    tiles = lambda v: _tile(v.constexprs, v.num_warps, v.num_stages)  # noqa: E731
    want = {_tile(c.kwargs, c.num_warps, c.num_stages) for c in SMALL_M_CONFIGS + LARGE_M_CONFIGS + NORM_ONLY_CONFIGS}
    outputs = {("*bf16", True), ("*bf16", False), ("*fp32", True), ("*fp32", False), ("*fp16", True), ("*fp16", False),
               ("*i32", False)}
    gemm_all = [v for v in vs if v.kernel == "_gemm_kernel" and v.arch == arch]
    gemv_all = [v for v in vs if v.kernel == "_gemv_kernel" and v.arch == arch]
    # each format and each path (where every_format), or all of them together
    groups = [(axis, value) for axis, values in (("P", (4, 5, 8)), ("LANES", (4, 1))) for value in values]
    for axis, value in groups if every_format else [("P", None)]:
        gemm = [v for v in gemm_all if value is None or v.constexprs[axis] == value]
        assert {tiles(v) for v in gemm} == want, (arch, axis, value)
        assert {(v.constexprs["SPLIT_K"] > 1) for v in gemm} == {False, True}
        assert {(v.types["y_ptr"], v.constexprs["HAS_BIAS"]) for v in gemm} == outputs
        assert {(v.constexprs["SEGMENTS"], v.constexprs["HAS_RES"], v.constexprs["NORM"]) for v in gemm} >= {
            (1, False, False), (2, False, False), (3, False, False), (1, True, False)}
        gemv = [v for v in gemv_all if value is None or v.constexprs[axis] == value]
        # every tile from float x (quantized in the kernel) and from int8 x_q
        assert {(v.constexprs["BLOCK_R"], v.constexprs["BLOCK_U"], v.num_warps, v.constexprs["QUANTIZE_X"])
                for v in gemv} == {(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_U"], c.num_warps, q)
                                   for c in GEMV_CONFIGS for q in (True, False)}
        assert {(v.types["x_ptr"], v.types["y_ptr"], v.constexprs["HAS_BIAS"]) for v in gemv} >= {
            ("*fp32", "*fp32", True), ("*bf16", "*bf16", False), ("*fp16", "*fp16", True),
            ("*i8", "*i32", False), ("*i8", "*bf16", True), ("*i8", "*fp32", False)}
    # every format on each path, aligned and not; the norm inside the GEMM somewhere on each
    for p in (4, 5, 8):
        for lanes in (4, 1):
            for kernel in (gemm_all, gemv_all):
                both = [v for v in kernel if v.constexprs["P"] == p and v.constexprs["LANES"] == lanes]
                assert {v.aligned for v in both} == {True, False}, (arch, p, lanes)
    assert {(v.constexprs["P"], v.constexprs["LANES"]) for v in gemm_all if v.constexprs["NORM"]} == {
        (p, lanes) for p in (4, 5, 8) for lanes in (4, 1)}
    assert all(v.constexprs["ASM"] for v in gemv_all)  # what gemv() launches on CUDA


def test_variants_cover_every_config_format_path_and_flag():
    """sm_90's GEMV and GEMM: every tile config and every flag combination compiled in every format
    and on each path (int32 words, bytes); sm_80's: each of them in one format, and every format on
    each path; either in every format when asked."""
    vs = compile_check.variants(archs=(90, 80))
    assert {v.arch for v in vs} == {90, 80} and compile_check.EVERY_FORMAT == (90,)
    _check_cover(vs, 90, every_format=True)
    _check_cover(vs, 80, every_format=False)
    packed = {arch: [v for v in vs if v.kernel in ("_gemm_kernel", "_gemv_kernel") and v.arch == arch] for arch in (90, 80)}
    assert len(packed[80]) < len(packed[90]) / 2  # (what makes the other architectures cheaper)
    with pytest.raises(AssertionError):  # where every format is not compiled, the stronger promise fails
        _check_cover(vs, 80, every_format=True)
    everywhere = compile_check.variants(archs=(90, 80), every_format=(90, 80))
    _check_cover(everywhere, 80, every_format=True)
    nowhere = compile_check.variants(archs=(90,), every_format=())
    _check_cover(nowhere, 90, every_format=False)
    # launched as dependents (common.pdl) from sm_90 on, where griddepcontrol exists
    for v in vs:
        assert v.constexprs.get("PDL", v.arch >= 90) == (v.arch >= 90) and (("PDL" in v.constexprs)
                                                                             == (v.kernel in compile_check.PDL_KERNELS))
    assert {v.kernel for v in vs if "PDL" in v.constexprs} == compile_check.PDL_KERNELS


def test_every_kernel_compiles_for_sm90_and_sm80():
    """Every kernel's variants, sm_90 and sm_80. On a CPU (CI: two cores) each config and flag
    combination of the GEMV and the GEMM in one format and path, in turn, for both (every config,
    flag combination, format and path compiled, every format on each path); where a GPU is present
    (the GPU machines: their Triton, 16 cores), sm_90's in every format, as
    `python -m bitnet.kernels.compile_check` compiles them."""
    import torch

    every_format = torch.cuda.is_available()
    r = _guard("--arch", "90", "80", *([] if every_format else ["--every-format"]))
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert ("sm_90 (every format)" in r.stdout.splitlines()[0]) == every_format, r.stdout[:500]
    assert r.returncode == 0, f"the compile guard failed:\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    summary = r.stdout.splitlines()
    counts = [line for line in summary if line.startswith("  _") and " variants, " in line]
    assert len(counts) == 2 * len(compile_check.VARIANTS)
    assert all(" 0 failed" in line for line in counts)


BROKEN = '''
import triton
import triton.language as tl
from bitnet.kernels import compile_check


@triton.jit
def _codes(w, INT8: tl.constexpr):
    # the bug the guard was written for: two returns of different types in constexpr branches
    if INT8:
        return w.to(tl.int8)
    return w


@triton.jit
def _broken_kernel(w_ptr, y_ptr, INT8: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    c = _codes(tl.load(w_ptr + offs), INT8)
    tl.store(y_ptr + offs, c.to(tl.int32))


v = compile_check.Variant("_broken_kernel", dict(INT8=True, BLOCK=64), dict(w_ptr="*i32", y_ptr="*i32"))
r = compile_check.compile_variant(v, fn=_broken_kernel)
print("OK" if r.ok else "FAILED " + v.describe())
print(r.error)
'''


def test_guard_fails_on_two_return_types_and_names_the_cause(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(textwrap.dedent(BROKEN))
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("FAILED _broken_kernel sm_90 [INT8=True BLOCK=64]"), out
    assert re.search(r"return type", out, re.IGNORECASE) and "_codes" in out, out


def test_pdl_kernels_wait_before_reading_what_another_kernel_wrote():
    """Programmatic dependent launch (common.pdl) is correct only if each kernel reads nothing a
    previous kernel wrote, and writes nothing, before its griddepcontrol.wait: read off the sm_90
    SASS of a sample of every PDL kernel (the GEMV may load its weight tile first, nothing else)."""
    r = _guard("--pdl-order", timeout=600)
    assert r.returncode == 0, f"{r.stdout[-5000:]}\n{r.stderr[-3000:]}"
    assert f"{len(compile_check.PDL_KERNELS) + 1} variants read, 0 failed" in r.stdout


def test_sass_summary_counts_a_kernels_loop():
    """--sass: what benchmarks/gpu_notes.md quotes, the instructions of a variant's loops by opcode
    (here the model's decode GEMV, 2-bit, from int8 x_q: dp4a in its loop, and no shift: the
    codes are masked in place, scaled, and shifted back once after the loop)."""
    r = _guard("--sass", "--arch", "90", "--kernel", "_gemv_kernel", "--set", "P=4", "LANES=4", "QUANTIZE_X=False",
               "OUT_INT32=False", "BLOCK_R=1", "BLOCK_U=2048", "num_warps=8", "x_ptr=*i8", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    head, *loops = r.stdout.strip().splitlines()
    assert head.startswith("_gemv_kernel sm_90 [P=4") and "BLOCK_U=2048" in head and "instructions" in head
    assert len(loops) == 1 and re.search(r"loop 0x[0-9a-f]+-0x[0-9a-f]+: \d+ instructions: .*IDP \d+", loops[0]), r.stdout
    assert not re.search(r"\bSHF \d+", loops[0]), loops[0]  # the codes are masked in place, never shifted down


def test_float_x_is_quantized_once_for_all_rows_of_a_tile():
    """The GEMV from float x (a bitlinear layer at M = 1) quantizes x as one row that the tile's 8
    packed rows share, in registers: no barrier in the loop, and ~1.2 instructions a weight
    (sm_90 SASS; 8 rows each quantizing x again took 3.3, as one row a program does)."""
    r = _guard("--sass", "--arch", "90", "--kernel", "_gemv_kernel", "--set", "P=4", "LANES=4", "QUANTIZE_X=True",
               "OUT_INT32=False", "BLOCK_R=8", "BLOCK_U=256", "num_warps=8", "x_ptr=*bf16", "y_ptr=*bf16",
               "bias_ptr=*bf16", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    head, *loops = r.stdout.strip().splitlines()
    assert "QUANTIZE_X=True" in head and "BLOCK_R=8" in head
    main = max(loops, key=lambda line: int(re.search(r": (\d+) instructions", line).group(1)))  # (the other: x's absmax)
    assert "IDP" in main and not re.search(r"\bBAR \d+", main), main
    weights = 4 * 4 * 8 * 256 // (8 * 32)  # P outputs x 4 k a word, 8 rows x 256 words over 256 threads
    assert int(re.search(r": (\d+) instructions", main).group(1)) < 1.5 * weights, main


NORM_TILES = '''
import dataclasses
import torch
import triton
from bitnet.kernels import compile_check
from bitnet.kernels.gemm import SMALL_M_CONFIGS, _prune

base = next(v for v in compile_check.variants(archs=(90,), kernels=["_gemm_kernel"]) if v.constexprs["NORM"])
kept = _prune(SMALL_M_CONFIGS, dict(m_bucket=64, x_ptr=torch.empty(0, dtype=torch.bfloat16)), NORM=True, P=4)
tall = [c for c in SMALL_M_CONFIGS if c.kwargs["BLOCK_M"] == 32 and c.kwargs["BLOCK_K"] == 128][:1]
bf16 = dict(x_ptr="*bf16", nw_ptr="*bf16", y_ptr="*bf16", bias_ptr="*bf16", bias1_ptr="*bf16", bias2_ptr="*bf16",
            res_ptr="*bf16")
layer = {"q/k/v": dict(SEGMENTS=3, HAS_RES=False, GATED=False), "down": dict(SEGMENTS=1, HAS_RES=True, GATED=True)}
print("triton", triton.__version__)
for which, configs in (("kept", kept), ("tall", tall)):
    for cfg in configs:
        for name, flags in layer.items() if which == "kept" else [("q/k/v", layer["q/k/v"])]:  # (a control: one)
            v = dataclasses.replace(base, constexprs=dict(base.constexprs, P=4, LANES=4, SPLIT_K=2, HAS_BIAS=False,
                                                          OUT_INT32=False, SUM_BLOCK=4096, **flags, **cfg.kwargs),
                                    types=dict(base.types, **bf16, u_ptr="*bf16" if flags["GATED"] else "*fp32"),
                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, aligned=True)
            r = compile_check.compile_variant(v)
            print(which, name, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], r.ok, r.registers, r.spill)
'''


def _norm_tiles(tmp_path: Path, env: dict) -> tuple[str, list[list[str]]]:
    """The batched decode's norm-fused GEMM (2B-4T's heaviest flag sets: q/k/v, and down with its
    gate and residual; bf16, 2-bit words, split-K) compiled for sm_90 in the tiles the autotuner
    keeps and a 32-row one: (Triton's version, rows of which / flags / tile / ok / registers / spill)."""
    script = tmp_path / "norm_tiles.py"
    script.write_text(NORM_TILES)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    head, *rows = r.stdout.splitlines()
    return head.split()[1], [row.split() for row in rows]


def _check_norm_tiles(rows: list[list[str]]) -> None:
    kept = [row for row in rows if row[0] == "kept"]
    assert [row[1:5] for row in kept] == [["q/k/v", "16", "128", "256"], ["down", "16", "128", "256"],
                                          ["q/k/v", "16", "256", "256"], ["down", "16", "256", "256"]], rows
    assert all(row[5] == "True" and int(row[6]) <= 255 and row[7] == "0" for row in kept), rows  # no spill
    tall = [row for row in rows if row[0] == "tall"]
    assert tall and all(row[5] == "True" and int(row[7]) >= 128 for row in tall), rows  # what the check sees


def test_a_batched_steps_norm_tile_does_not_spill(tmp_path):
    """The norm-fused GEMM's two tiles (gemm.NORM_TILE, NORM_WIDE) compile for sm_90 without
    spilling a register on either flag set, read off the cubin; a 32-row tile, which the autotuner
    never gets, spills hundreds of bytes a thread (the check can fail)."""
    _check_norm_tiles(_norm_tiles(tmp_path, _env())[1])


COPIES = """
import dataclasses
from bitnet.kernels import compile_check
from bitnet.kernels.common import mma_sync_arch
from bitnet.kernels.gemm import LARGE_M_CONFIGS, SMALL_M_CONFIGS

base = next(v for v in compile_check.variants(archs=(90,), kernels=["_gemm_kernel"])
            if v.aligned and v.constexprs["LANES"] == 4 and not v.constexprs["NORM"])
cases = [(90, p, c) for c in SMALL_M_CONFIGS if c.kwargs["BLOCK_M"] == 32 for p in (4, 5, 8)]
tile = lambda m, n, warps: next(c for c in LARGE_M_CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (m, n, warps))
cases += [(80, 5, tile(64, 256, 8)), (80, 5, tile(128, 128, 4))]  # (the second: as tall as wide, the control)
for arch, p, c in cases:
    consts = dict(base.constexprs, P=p, SPLIT_K=1, PDL=arch >= 90, MMA_SYNC=mma_sync_arch(arch),
                  **c.kwargs)
    v = dataclasses.replace(base, arch=arch, constexprs=consts, num_warps=c.num_warps, num_stages=c.num_stages)
    print(arch, p, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], compile_check.weight_tile_copies(compile_check._compile(v)))
"""


def test_the_gemm_decodes_each_weight_once_on_its_mma_sync_tiles(tmp_path):
    """Tiles under 64 rows run on mma.sync on every GPU (sm_90's wgmma takes 64 rows), and every
    tile on sm_80 / 86 / 89 / 120; Triton decodes their weight operand in registers. The 32-row
    tiles on sm_90 decode each weight in one warp in every format, and sm_80's 64 x 256 tile in
    1.6-bit (the layout of the packed tile in the TTGIR, compile_check.weight_tile_copies):
    1.6-bit's two dots in the other order put every warp on M, each decoding the whole tile (sm_90,
    32 x 128 x 128: 4 copies, 2453 instructions a K step against 681; sm_80's 64-row tiles: 8,
    spilling 5.6 KB a thread). The control, sm_80's 128 x 128 x 64 tile (as tall as wide: every warp
    on M in either order), reads 4 (the check can fail)."""
    script = tmp_path / "copies.py"
    script.write_text(COPIES)
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [tuple(map(int, line.split())) for line in r.stdout.splitlines()]
    small = [row for row in rows if row[0] == 90]
    assert len(small) == 6 and {row[1] for row in small} == {4, 5, 8}, rows
    assert all(row[4] == 1 for row in small), rows
    assert [row for row in rows if row[0] == 80] == [(80, 5, 64, 256, 1), (80, 5, 128, 128, 4)], rows


OPERAND = """
import dataclasses
import re
import sys
import triton
import triton.language as tl
from bitnet.kernels import compile_check, gemm
from bitnet.kernels.layout import decode_stacked, int8_codes


@triton.jit
def uncut(w, live, FIFTH: tl.constexpr, P: tl.constexpr, LANES: tl.constexpr, ASM: tl.constexpr):
    # layout.weight_operand without its branch: the joins of the decode in the dot operand's slice
    if FIFTH:
        c = int8_codes(w, 4, P, LANES, ASM)
    else:
        c = decode_stacked(w, P, LANES, ASM)
    return c


if sys.argv[1] == "uncut":
    gemm.weight_operand = uncut  # (Triton reads the kernel's globals when it compiles)
base = next(v for v in compile_check.variants(archs=(90,), kernels=["_gemm_kernel"])
            if v.aligned and v.constexprs["LANES"] == 4 and not v.constexprs["NORM"])
for p in map(int, sys.argv[2:]):
    consts = dict(base.constexprs, P=p, SPLIT_K=1, SEGMENTS=1, HAS_RES=False, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128)
    compiled = compile_check._compile(dataclasses.replace(base, constexprs=consts, num_warps=4, num_stages=4))
    widths = sorted(set(re.findall(r"kWidth = (\\d+)", compiled.asm["ttgir"])))
    loop = compile_check.main_loop(compiled)
    print(triton.__version__, sys.argv[1], p, ",".join(widths), sum(loop.values()), loop["IMAD"], loop["STS"])
"""


def _operands(tmp_path, env: dict) -> tuple[str, dict]:
    """(Triton's version, {(cut or uncut, P): (kWidths, loop instructions, IMAD, STS)}) of the 16 x 128 x
    128 GEMM tile for sm_90, with layout.weight_operand and with the decode straight into the dot."""
    script = tmp_path / "operand.py"
    script.write_text(OPERAND)
    rows, version = {}, None
    for which, formats in (("cut", ("4", "5", "8")), ("uncut", ("4", "8"))):
        r = subprocess.run([sys.executable, str(script), which, *formats], env=env, capture_output=True, text=True,
                           timeout=900, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        for line in r.stdout.splitlines():
            version, kind, p, widths, *counts = line.split()
            rows[kind, int(p)] = (widths, *map(int, counts))
    return version, rows


def _check_operands(rows: dict, version: str):
    """Every dot operand of the tile kWidth 4 (x read by ldmatrix in mma.sync's order); the uncut
    decode worse in 2-bit or 1-bit, by its operand width or its loop's length, or Triton no longer
    needs the branch (the check can fail)."""
    cut = {p: rows["cut", p] for p in (4, 5, 8)}
    assert all(widths == "4" for widths, *_ in cut.values()), cut
    assert any(rows["uncut", p][0] != "4" or rows["uncut", p][1] > cut[p][1] for p in (4, 8)), \
        f"Triton {version} compiles the uncut decode as well: layout.weight_operand's branch may go ({rows})"


def test_the_gemm_operands_are_read_four_bytes_a_lane(tmp_path):
    """layout.weight_operand: the decode behind a branch always taken. Without it, the joins that put
    the codes in byte lanes and stack the slices sit between the dot and the loads, and Triton
    (AccelerateMatmul's computeOrigBitWidth) halves the operands' bit width for them: Triton 3.6
    gives kWidth 8 (x read 8 bytes at a time, registers moved before every IMMA: 2-bit 183
    instructions a K step instead of 132), and Triton 3.9 stages 1-bit's 16-packed-row operand
    through shared memory a byte at a time (128 STS and 132 LDS, 606 instructions a K step; with
    the branch 8 STS.128 and 8 ldmatrix, 440). With the Triton installed here; the slow tier with
    the GPU machines'."""
    version, rows = _operands(tmp_path, _env())
    _check_operands(rows, version)
    if version.startswith("3.9"):
        assert rows["uncut", 8][3] > 8 * rows["cut", 8][3] and rows["uncut", 8][1] > rows["cut", 8][1], rows


ATTENTION = '''
import dataclasses
import sys
import triton
from bitnet.kernels import compile_check


def loops(ops):
    """(first, last) address of each loop (a backward branch), longest first."""
    return sorted(((first, last) for first, last, _ in compile_check.sass_loops(ops)), key=lambda span: span[0] - span[1])


def ops_in(ops, span):
    return [op for addr, op, _ in ops if span[0] <= addr <= span[1]]


print("triton", triton.__version__)
variants = compile_check.variants(archs=[int(a) for a in sys.argv[1:]], kernels=["_decode_attention_kernel"])
for v in variants:
    r = compile_check.compile_variant(v)
    print("variant", v.arch, v.types["q_ptr"], v.constexprs["D"], v.constexprs["ROPE"], v.aligned, r.ok, r.registers,
          r.spill)
base = next(v for v in variants if v.arch == 90 and v.types["q_ptr"] == "*bf16" and v.constexprs["D"] == 128)
for stages in (base.num_stages, 1):  # as launched, and unstaged (what the check must see)
    for rope in (False, True):
        v = dataclasses.replace(base, constexprs=dict(base.constexprs, ROPE=rope, HAS_MASK=True), num_stages=stages,
                                types=dict(base.types, mask_ptr="*i1", part_ptr="*fp32", count_ptr="*i32"))
        ops = compile_check.sass_ops(compile_check._compile(v))
        spans = loops(ops)
        main, merge = ops_in(ops, spans[0]), ops_in(ops, max(spans, key=lambda span: span[0]))
        print("loops", stages, rope, sum(op == "LDG.E.128" for op in main), sum(op.startswith("LDGSTS") for op in main),
              sum(op.startswith("LDGSTS") for op in merge))
'''


def _attention(tmp_path: Path, env: dict, archs=(90, 80)) -> tuple[str, list[list[str]], list[list[str]]]:
    script = tmp_path / "attention.py"
    script.write_text(ATTENTION)
    r = subprocess.run([sys.executable, str(script), *map(str, archs)], env=env, capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    head, *rows = [line.split() for line in r.stdout.splitlines()]
    return head[1], [row[1:] for row in rows if row[0] == "variant"], [row[1:] for row in rows if row[0] == "loops"]


def _check_attention(variants: list[list[str]], loops: list[list[str]], archs=(90, 80)) -> None:
    assert len(variants) == len(archs) * len(compile_check._attention_variants()), variants
    assert {int(row[0]) for row in variants} == set(archs), variants
    assert all(row[5] == "True" for row in variants), variants  # compiled
    aligned = [row for row in variants if row[4] == "True"]  # (16-byte aligned: a cache torch allocated)
    assert aligned and all(row[7] == "0" for row in aligned if int(row[2]) <= 128), aligned  # no register spilled
    assert all(int(row[7]) <= 64 for row in aligned), aligned  # head size 256: Triton 3.9 spills 16 B (fp16, sm_90)
    staged = [row for row in loops if row[0] != "1"]
    assert len(staged) == 2 and all(row[2] == "0" and int(row[3]) >= 8 and int(row[4]) > 0 for row in staged), loops
    unstaged = [row for row in loops if row[0] == "1"]
    assert unstaged and all(int(row[2]) >= 8 and row[3] == "0" for row in unstaged), loops  # what the check sees


def test_the_decode_attention_stages_its_loads_and_spills_nothing(tmp_path):
    """The decode attention (sm_90 SASS, 2B-4T's heads, bf16, key mask, with and without the RoPE):
    its slot loop takes K and V by cp.async only (LDGSTS, loads staged ahead by Triton's pipelining;
    no plain 16-byte load left to wait on in the loop), and its merge loop too; unstaged, the same
    loop loads K and V plainly (the check can fail). Every variant compiles for sm_90 and sm_80, and
    every aligned one (a cache torch allocated) up to head size 128 spills nothing (8 warps: at 4, 3
    of the 14 did, up to 288 bytes a thread); at 256, a few bytes at most."""
    _, variants, loops = _attention(tmp_path, _env())
    _check_attention(variants, loops)


SMALL_SHARED = """
import dataclasses
import torch
from bitnet.kernels import attention, compile_check as cc, gemm

limit = cc.SHARED_LIMIT[86]
print("tiles", attention.tile(torch.bfloat16, 128, 16, limit), attention.tile(torch.bfloat16, 128, 16, None),
      attention.tile(torch.float16, 64, 16, limit), attention.tile(torch.float32, 128, 16, limit))
# the tiles chosen by the launchers, and the autotuned configs BITNET_AUTOTUNE=first launches untimed
vs = [v for v in cc.variants([86], ["_decode_attention_kernel", "_gemm_kernel", "_gemm_int8_kernel"], every_format=[86])
      if v.kernel == "_decode_attention_kernel" or v.constexprs.get("NORM") or not cc.droppable(v)]
print("norm tiles", sorted({(v.types["x_ptr"], v.constexprs["GATED"]) for v in vs if v.constexprs.get("NORM")}))
results = [cc.compile_variant(v) for v in vs]
print("compiled", len(results), "failed", sum(not r.ok for r in results), "dropped", sum(r.dropped for r in results),
      "largest", max(r.shared for r in results))
for r in results:
    if not r.ok:
        print("FAILED", r.variant.describe(), r.error)
big = next(v for v in cc.variants([86], ["_gemm_kernel"], every_format=[86])
           if v.constexprs["BLOCK_N"] == 256 and v.constexprs["BLOCK_M"] == 128 and v.constexprs["BLOCK_K"] == 128 and v.constexprs["P"] == 5 and v.constexprs["LANES"] == 1)
r = cc.compile_variant(big)
print("large tile", r.ok, r.dropped, r.shared)
# the same tile with its dots in sm_90's order (MMA_SYNC off): over the limit, as an autotuned config may be
over = dataclasses.replace(big, constexprs=dict(big.constexprs, MMA_SYNC=False))
r = cc.compile_variant(over)
print("over the limit", r.ok, r.dropped, r.shared)
v = next(v for v in vs if v.kernel == "_decode_attention_kernel" and v.constexprs["D"] == 128 and v.aligned
         and v.types["k_ptr"] == "*bf16" and v.constexprs["G"] == 4)
print("chosen", v.num_stages, cc.compile_variant(v).shared)
r = cc.compile_variant(dataclasses.replace(v, num_stages=3))  # what the launcher gave every GPU before
print("three stages", r.ok, r.error)
cc.SHARED_BOUNDS["_decode_attention_kernel"] = ("a test's bound", lambda v: 1024)
r = cc.compile_variant(v)
print("bound", r.ok, r.error)
"""


def test_a_gpu_with_99_kb_of_shared_memory_is_given_tiles_that_fit(tmp_path):
    """An A10 / A40 / RTX 30xx (sm_86), L4 / L40S / RTX 40xx (sm_89) or RTX 50xx (sm_120) lets a
    program have 99 KB of shared memory, against 163 KB on an A100 and 227 KB on an H100. The two
    launchers that pick one tile for every GPU pick it by the device's limit (common.shared_limit):
    the decode attention stages two K / V tiles where three would not fit (head size 128 in bf16:
    104 KB, which failed every decode step there), and the norm-fused GEMM tile with float32 gated
    input (~116 KB) gives way to the norm kernel first. Compiled for sm_86 as launched there, every
    variant fits and stays within its launcher's bound (which the guard checks on every
    architecture), and so does each autotuned regime's first config (BITNET_AUTOTUNE=first launches
    it untimed), and every other GEMM config (the large-M 128 x 256 x 128 tile in 1.6-bit bytes
    too: 48 KB with its dots in mma.sync's order). A config over the limit (that tile with its dots
    in sm_90's order: 128 KB) compiles, and the guard counts it as passed over, as Triton's autotuner
    does when it times it. The three-stage attention does not fit (the check can fail), nor does a
    variant past its launcher's bound.
    `python -m bitnet.kernels.compile_check --arch 86` sweeps every variant (CI sweeps 90 and 80)."""
    script = tmp_path / "small_shared.py"
    script.write_text(SMALL_SHARED)
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "tiles (64, 2) (64, 3) (64, 3) (32, 1)" in out, out
    assert "norm tiles [('*bf16', False), ('*bf16', True), ('*fp16', False)]" in out, out  # float32 gated: apart
    assert re.search(r"compiled \d+ failed 0 dropped 0 largest (\d+)", out), out
    assert re.search(r"large tile True False \d+", out), out  # 1.6-bit bytes, 128 x 256 x 128: fits
    assert "over the limit True True 131072" in out, out  # passed over by the autotuner on sm_86
    assert int(re.search(r"largest (\d+)", out).group(1)) <= compile_check.SHARED_LIMIT[86]
    assert re.search(r"chosen 2 \d+", out), out
    assert "three stages False needs 106496 bytes of shared memory per program; sm_86 allows 101376" in out, out
    assert "bound False needs" in out and "more than its launcher's bound of 1024 (what decides whether the tile " \
                                           "fits a GPU with less: a test's bound)" in out, out


FENCED = '''
import triton
import triton.language as tl
from bitnet.kernels import compile_check


@triton.jit
def _split_kernel(p_ptr, ws_ptr, count_ptr, y_ptr, RELAXED: tl.constexpr, BLOCK: tl.constexpr):
    # a split-K epilogue: partial sums added into a workspace, the last program to arrive reads them
    offs = tl.arange(0, BLOCK)
    part = tl.load(p_ptr + tl.program_id(0) * BLOCK + offs)
    if RELAXED:
        tl.atomic_add(ws_ptr + offs, part, sem="relaxed")
    else:
        tl.atomic_add(ws_ptr + offs, part)  # Triton's default: acq_rel, a fence for every add
    tl.debug_barrier()
    if tl.atomic_add(count_ptr, 1) == tl.num_programs(0) - 1:
        tl.store(y_ptr + offs, tl.load(ws_ptr + offs, cache_modifier=".cg"))


for relaxed in (False, True):
    v = compile_check.Variant("_split_kernel", dict(RELAXED=relaxed, BLOCK=1024),
                              dict(p_ptr="*i32", ws_ptr="*i32", count_ptr="*i32", y_ptr="*i32"))
    r = compile_check.compile_variant(v, fn=_split_kernel)
    sass = compile_check._cuobjdump("-sass", compile_check._compile(v, fn=_split_kernel))
    print(relaxed, r.ok, r.ordered, sass.count("MEMBAR"), r.error)
'''


def test_guard_fails_on_an_acquire_or_release_per_partial_sum(tmp_path):
    """A split-K epilogue with Triton's default atomics (acq_rel) fences every add (MEMBAR.ALL.GPU
    in the SASS: 8 a thread here, one after another); the guard fails it, naming the count and the
    fix, and passes the relaxed adds, whose one ordered operation is the arrival counter."""
    script = tmp_path / "fenced.py"
    script.write_text(textwrap.dedent(FENCED))
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fenced, relaxed = (line.split(maxsplit=4) for line in r.stdout.splitlines())
    assert fenced[:4] == ["False", "False", "9", "9"], r.stdout  # 1024 adds over 128 threads, and the counter
    assert "9 memory operations with acquire or release semantics" in fenced[4] and 'sem="relaxed"' in fenced[4]
    assert relaxed[:4] == ["True", "True", "1", "1"], r.stdout


TWO_DOTS = """
import triton
import triton.language as tl
from bitnet.kernels import compile_check
from bitnet.kernels.layout import decode_stacked, int8_codes


@triton.jit
def _two_dots(x_ptr, w_ptr, y_ptr, z_ptr, K, FIRST: tl.constexpr, LANES: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # 1.6-bit's loop in brief: int8 x against the codes of int32 words, four slices stacked in one
    # dot and the fifth in a narrow one, the narrow one first or last
    R: tl.constexpr = BLOCK_N // 4
    offs_m, offs_r = tl.arange(0, BLOCK_M), tl.arange(0, R)
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    acc_b = tl.zeros([BLOCK_M, R], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :])
        w = tl.load(w_ptr + offs_r[:, None] * (K // 4) + k0 // 4 + tl.arange(0, BLOCK_K // 4)[None, :])
        if FIRST:
            acc_b = tl.dot(x, tl.trans(int8_codes(w, 4, 5, LANES, True)), acc_b, out_dtype=tl.int32)
        acc_a = tl.dot(x, tl.trans(decode_stacked(w, 5, LANES, True)), acc_a, out_dtype=tl.int32)
        if not FIRST:
            acc_b = tl.dot(x, tl.trans(int8_codes(w, 4, 5, LANES, True)), acc_b, out_dtype=tl.int32)
    tl.store(y_ptr + offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], acc_a)
    tl.store(z_ptr + offs_m[:, None] * R + offs_r[None, :], acc_b)


for first in (False, True):
    v = compile_check.Variant("_gemm_kernel", dict(FIRST=first, LANES=4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128),
                              dict(x_ptr="*i8", w_ptr="*i32", y_ptr="*i32", z_ptr="*i32", K="i32"), num_warps=4,
                              num_stages=3)
    r = compile_check.compile_variant(v, fn=_two_dots)
    print(first, r.ok, r.copies, r.error)
"""


def test_guard_fails_a_gemm_tile_under_64_rows_that_decodes_a_weight_in_several_warps(tmp_path):
    """The guard's check of every GEMM variant on the word path under 64 rows, on a stand-in of
    1.6-bit's loop (sm_90, 32 x 128 x 128, 4 warps): the narrow dot last, each weight decoded by
    the 4 warps, fails, naming the count and where the order is set; first, one warp, passes."""
    script = tmp_path / "two_dots.py"
    script.write_text(TWO_DOTS)
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    last, first = (line.split(maxsplit=3) for line in r.stdout.splitlines())
    assert last[:3] == ["False", "False", "4"], r.stdout
    assert "each packed weight is decoded by 4 warps" in last[3] and "FIRST" in last[3], r.stdout
    assert first == ["True", "True", "1"], r.stdout


BROKEN_PDL = '''
import triton
import triton.language as tl
from bitnet.kernels import compile_check
from bitnet.kernels.common import pdl_start, pdl_wait


@triton.jit
def _early_kernel(x_ptr, y_ptr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    pdl_start(PDL)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)  # read before the wait: maybe what the previous kernel has not written yet
    pdl_wait(PDL)
    tl.store(y_ptr + offs, x + 1)


@triton.jit
def _no_wait_kernel(x_ptr, y_ptr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) + 1)


for fn in (_early_kernel, _no_wait_kernel):
    v = compile_check.Variant(fn.__name__, dict(PDL=True, BLOCK=128), dict(x_ptr="*fp32", y_ptr="*fp32"))
    print(fn.__name__, compile_check.pdl_order(v, fn=fn))
'''


def test_pdl_order_check_catches_a_read_before_the_wait(tmp_path):
    script = tmp_path / "broken_pdl.py"
    script.write_text(textwrap.dedent(BROKEN_PDL))
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    early, no_wait = r.stdout.splitlines()[-2:]
    assert early.startswith("_early_kernel [") and "memory instructions before the wait: ['LDG" in early, r.stdout
    assert "no PREEXIT" in no_wait and "no ACQBULK" in no_wait, r.stdout


def test_a_gemv_loads_nothing_but_its_weight_tile_before_the_wait():
    """The rule --pdl-order holds the GEMV's SASS to (its early weight loads): 16-byte loads of a
    word-path tile and 8-byte loads of a byte-path one pass; a load more (x, an int8 byte), a store,
    or more bytes than the tile holds fail."""
    ok = compile_check.weight_tile_loads_only
    assert ok(["LDG.E.128"], 8192, 256) and ok(["LDG.E.128", "LDG.E.128"], 8192, 256)
    assert ok(["LDG.E.64"], 2048, 256) and ok([], 2048, 256)
    assert not ok(["LDG.E.64", "LDG.E.S8"], 2048, 256)
    assert not ok(["LDG.E.128", "LDG.E.128", "LDG.E.128"], 8192, 256)
    assert not ok(["LDG.E.64"] * 3, 1024, 64) and not ok(["LDG.E.128", "STG.E"], 8192, 256)
    assert not ok(["LDGSTS.E.128"], 8192, 256)


# ----------------------------------------------------------------------------- a run's launches, as a GPU compiles them
LAUNCHED_KERNELS = {"_gemv_kernel", "_gemm_kernel", "_gemm_int8_kernel", "_unpack_kernel", "_act_quant_kernel",
                    "_rmsnorm_act_quant_kernel", "_rope_cache_kernel", "_decode_attention_kernel", "_int8_linear_kernel",
                    "_int4_linear_kernel"}


def _launch_check(arch: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "launch_check.py"), arch], env=env or _env(),
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)


def test_every_launch_of_a_run_compiles_for_sm90():
    """tests/launch_check.py: generate, the server's steps, the quantized heads and the launcher
    paths a tiny model does not take, every Triton launch compiled for sm_90 with its real
    arguments (None specialized as on a GPU), ASM and PDL on."""
    r = _launch_check("90")
    assert r.returncode == 0, f"{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    summary = next(line for line in r.stdout.splitlines() if line.startswith("compiled "))
    assert {name for name in LAUNCHED_KERNELS if f"'{name}'" in summary} == LAUNCHED_KERNELS, summary


def _direct_launch_check(env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "direct_launch_check.py")], env=env or _env(),
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)


def test_direct_launches_pass_the_launcher_what_triton_passes():
    """tests/direct_launch_check.py: each launcher called twice with one call signature, through
    Triton's launch path (the reference: sm_90, a stand-in driver whose launcher records) and then
    directly (kernels/launch.py); the recorded launches are equal, a misaligned tensor goes back to
    Triton for its own specialization, and a launch hook gets the same metadata."""
    r = _direct_launch_check()
    assert r.returncode == 0 and "direct launches: 0 failed" in r.stdout, f"{r.stdout[-20000:]}\n{r.stderr[-5000:]}"


NONE_IN_A_TUPLE = '''
import torch
import triton
import triton.language as tl
from bitnet.kernels import compile_check, precompile


@triton.jit
def pick(bias_ptr, HAS_BIAS: tl.constexpr):
    bias = bias_ptr  # None when the launcher passes none: a None in the returned tuple does not compile
    if HAS_BIAS:
        bias = bias_ptr + 1
    return 1.0, bias


@triton.jit
def _none_kernel(y_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    factor, bias = pick(bias_ptr, HAS_BIAS)
    tl.store(y_ptr, factor)


v = compile_check.Variant("_none_kernel", dict(HAS_BIAS=False), dict(y_ptr="*fp32", bias_ptr="*fp32"))
print("variant:", compile_check.compile_variant(v, fn=_none_kernel).ok)
with precompile.launches_compiled(90) as log:
    _none_kernel[(1,)](torch.zeros(1), torch.zeros(1), HAS_BIAS=True)
    try:
        _none_kernel[(1,)](torch.zeros(1), None, HAS_BIAS=False)
    except Exception:
        pass
print("compiled:", log.compiled)
print("failed:", [(kernel, flags) for kernel, flags, _ in log.failures])
'''


def test_the_launch_check_sees_what_the_variants_cannot(tmp_path):
    """The bug the launch check exists for, in miniature: compiled as a variant (a pointer type) the
    kernel is fine; launched with None, as the launchers pass a missing bias, it does not compile,
    and the check names the kernel."""
    script = tmp_path / "none_in_a_tuple.py"
    script.write_text(textwrap.dedent(NONE_IN_A_TUPLE))
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "variant: True" in r.stdout and "compiled: {'_none_kernel': 1}" in r.stdout, r.stdout
    assert "failed: [('_none_kernel', {'HAS_BIAS': False})]" in r.stdout, r.stdout


PRECOMPILE = '''
import glob
import os

import torch

from bitnet.kernels import gemv, precompile
from bitnet.packing import pack

cache = os.environ["TRITON_CACHE_DIR"]
cubins = lambda: len(glob.glob(os.path.join(cache, "*", "*.cubin")))  # noqa: E731
jit = gemv._gemv_kernel.fn
k, n = 2048, 256  # the model's decode GEMV from int8 x_q, as gemv_cat launches it
x, w = torch.randint(-128, 128, (1, k), dtype=torch.int8), pack(torch.randint(-1, 2, (n, k), dtype=torch.int8), "2bit")
a, s, y = torch.rand(1), torch.tensor([0.02]), torch.empty(1, n, dtype=torch.bfloat16)
named = dict(zip(jit.arg_names, [x, a, w, s, None, y, s, None, s, None, None, None, None, None,
                                 n, k, n // 4, 0, 0, 0, 0, 0, 0, 1e-6, k // 4, k // 4, n, 0, 0]))
kwargs = dict(P=4, QUANTIZE_X=False, HAS_BIAS=False, OUT_INT32=False, LANES=4, ASM=True, SEGMENTS=1, HAS_RES=False,
              PDL=True, launch_pdl=True, NORM=False, GATED=False, XQ_OUT=False, SUM_BLOCK=1, BLOCK_A=2048,
              enable_fp_fusion=False, grid=(1,), warmup=False)
configs = gemv._prune(gemv.CONFIGS, named, **kwargs)
print("precompiled", precompile.precompile(jit, configs, named, kwargs, 90, workers=2), "of", len(configs),
      "cubins", cubins())
before = cubins()
launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
with precompile.launches_compiled(90, as_cuda=False) as log:
    for c in configs:
        jit.run(*named.values(), grid=(1,), warmup=False, **launch, **c.all_kwargs())
print("launched", sum(log.compiled.values()), "new cubins", cubins() - before)
print("again", precompile.precompile(jit, configs, named, kwargs, 90, workers=2))
print("stats", precompile.STATS["rounds"], precompile.STATS["configs"], precompile.STATS["workers"])
'''


SEGMENT_STARTS = '''
import glob
import os

import torch

os.environ.pop("TRITON_INTERPRET", None)
from bitnet.kernels import gemm, gemv, precompile
from bitnet.packing import pack

os.environ["TRITON_INTERPRET"] = "1"  # (the Triton path for CPU tensors; the kernels are real JITFunctions)
cache = os.environ["TRITON_CACHE_DIR"]
cubins = lambda: len(glob.glob(os.path.join(cache, "*", "*.cubin")))  # noqa: E731
k, ns = 256, [128, 64]  # two matrices of one input, packed 2-bit: (32, 256) and (16, 256) bytes
buf = torch.zeros(1 << 16, dtype=torch.uint8)
packed = [pack(torch.randint(-1, 2, (n, k), dtype=torch.int8), "2bit") for n in ns]


def placed(grains):  # the second matrix `grains` 64-byte grains after the first: W1 = grains
    second = buf[64 * grains:64 * grains + packed[1].numel()]
    views = [buf[:packed[0].numel()].view(packed[0].shape), second.view(packed[1].shape)]
    for v, p in zip(views, packed):
        v.copy_(p)
    return views


scales = [torch.tensor([0.02]), torch.tensor([0.03])]
seen = []
with precompile.launches_compiled(90) as log:
    for grains in (16, 17, 1):  # divisible by 16, not, and one (which Triton would make a constant)
        w = placed(grains)
        gemv.gemv_cat(torch.randn(1, k, dtype=torch.bfloat16), w, ns, "2bit", scales)
        gemm.gemm_cat(torch.randint(-127, 128, (16, k), dtype=torch.int8), w, ns, "2bit", scales,
                      a=torch.rand(16) + 0.5, out_dtype=torch.bfloat16)
        seen.append(cubins())
print("cubins", seen, "launches", log.compiled)
'''


def test_segmented_kernels_compile_once_wherever_the_weights_sit(tmp_path):
    """W1 / W2 (where the second and third matrices of a segmented GEMV or GEMM start, from the
    allocator) are not specialized on: matrices 16, 17 and 1 grains apart launch the kernels
    compiled for the first placement (no new cubin), so that a cache made in one process (a carried
    one: benchmarks/warm_triton_cache.py) serves another whose allocator put the weights elsewhere.
    Specialized, 17 (not divisible by 16) and 1 (a constant) would each compile anew."""
    script = tmp_path / "segment_starts.py"
    script.write_text(textwrap.dedent(SEGMENT_STARTS))
    r = subprocess.run([sys.executable, str(script)], env=_env(TRITON_CACHE_DIR=str(tmp_path / "cache")),
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = re.search(r"cubins \[(\d+), (\d+), (\d+)\]", r.stdout).groups()
    assert int(seen[0]) == 2 and len(set(seen)) == 1, r.stdout  # (the GEMV quantizing x itself, the GEMM)


def test_precompile_fills_the_cache_the_launches_read(tmp_path):
    """precompile.precompile (what autotuning with BITNET_AUTOTUNE=full does first for a new key
    on a GPU): two worker processes compile the GEMV's fitting configs from stand-in arguments into
    Triton's cache; the launches of those configs with the real arguments then compile nothing new
    (their cache keys are the workers'), and a second call has nothing left to do."""
    script = tmp_path / "precompile_gemv.py"
    script.write_text(textwrap.dedent(PRECOMPILE))
    r = subprocess.run([sys.executable, str(script)], env=_env(TRITON_CACHE_DIR=str(tmp_path / "cache")),
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pre, launched, again, stats = r.stdout.strip().splitlines()[-4:]
    total = int(pre.split()[3])
    assert total > 1 and pre == f"precompiled {total} of {total} cubins {total}", r.stdout
    assert launched == f"launched {total} new cubins 0" and again == "again 0", r.stdout
    assert stats == f"stats 1 {total} 2", r.stdout  # what the benchmarks stamp (bitnet_tuning)


def _tuning_check(tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "tuning_check.py"), str(tmp_path)], env=env or _env(),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_tuning_tables_through_tritons_own_autotuner(tmp_path):
    """tests/tuning_check.py: act_quant launched as on a GPU (a stand-in driver and a stand-in
    timer) through Triton's Autotuner.run: a new key timed and its fastest config kept in this
    machine's table; the next process's launch takes it from there with nothing timed; retune,
    another kernel source, the package's table (any source; a config no longer in the list
    ignored), BITNET_TUNING_DIR=off, an unreadable table, and `first` each as tuning.py says; and
    on a stand-in sm_86 (99 KB of shared memory a program), a config that asks for more is passed
    over when timed (Triton's "out of resources" at its launch) and kept in the table as not run;
    the same key on a second GPU of another model (a stand-in sm_90) is timed there, not given the
    sm_86's choice from Triton's memory, which the sm_86 keeps."""
    r = _tuning_check(tmp_path)
    assert r.returncode == 0 and "tuning tables: 0 failed" in r.stdout, f"{r.stdout[-5000:]}\n{r.stderr[-5000:]}"


def _triton_floor() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"triton>=([0-9.]+)', text)
    assert m, "pyproject.toml names no triton floor"
    return m.group(1)


def _floor_env() -> tuple[str, dict]:
    """The oldest Triton pyproject.toml allows, installed (once, cached) into its own folder, and an
    environment that puts it first on a process's path."""
    floor = _triton_floor()
    version = floor if floor.count(".") == 2 else floor + ".0"
    target = Path(os.environ.get("BITNET_TEST_CACHE", Path.home() / ".cache" / "bitnet-test")) / f"triton-{version}"
    if not (target / "triton" / "__init__.py").exists():
        install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                                  f"triton=={version}"], capture_output=True, text=True, timeout=900)
        assert install.returncode == 0, f"could not install triton=={version}:\n{install.stderr[-3000:]}"
    return version, _env(PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


@pytest.mark.slow
def test_the_norm_tile_does_not_spill_with_the_oldest_supported_triton(tmp_path):
    """As test_a_batched_steps_norm_tile_does_not_spill, with the GPU machines' Triton (3.6), which
    spills inside the loop of every other small-M tile with the norm (K steps of 128: up to 1654
    spill loads and stores a step): the reason the norm tiles are 16 x 256 deep."""
    version, env = _floor_env()
    got, rows = _norm_tiles(tmp_path, env)
    assert got == version, f"ran with Triton {got}, not {version}"
    _check_norm_tiles(rows)


@pytest.mark.slow
def test_the_gemm_operands_are_read_four_bytes_a_lane_with_the_oldest_supported_triton(tmp_path):
    """As test_the_gemm_operands_are_read_four_bytes_a_lane, with the GPU machines' Triton (3.6):
    without the branch its 2-bit operands are kWidth 8 (measured: 183 instructions a K step, 50 of
    them IMAD register moves; with it 132 and 6)."""
    version, env = _floor_env()
    got, rows = _operands(tmp_path, env)
    assert got == version, f"ran with Triton {got}, not {version}"
    _check_operands(rows, got)
    assert rows["uncut", 4][0] == "8" and rows["cut", 4][2] < rows["uncut", 4][2], rows


@pytest.mark.slow
def test_the_decode_attention_stages_its_loads_with_the_oldest_supported_triton(tmp_path):
    """As test_the_decode_attention_stages_its_loads_and_spills_nothing, with the GPU machines'
    Triton (3.6), for their architecture (sm_90)."""
    version, env = _floor_env()
    got, variants, loops = _attention(tmp_path, env, archs=(90,))
    assert got == version, f"ran with Triton {got}, not {version}"
    _check_attention(variants, loops, archs=(90,))


@pytest.mark.slow
@pytest.mark.parametrize("every_format", [False, True], ids=["each-config", "every-format"])
def test_every_kernel_compiles_with_the_oldest_supported_triton(every_format):
    """The floor in pyproject.toml is the Triton checked here: it is installed (once, cached) into
    its own folder and put first on the path of the guard's process, for sm_90 (the GPU machines').
    each-config (what CI runs beside the suite): every config and flag combination of the GEMV and
    the GEMM in one format, in turn, every format on each path; every-format: each of them in every
    format, as the default tier of a GPU machine's suite does (whose Triton is this one)."""
    version, env = _floor_env()
    r = _guard("--arch", "90", "--every-format", *(["90"] if every_format else []), env=env, timeout=1800)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.startswith(f"Triton {version}:"), f"the guard did not run with Triton {version}:\n{r.stdout[:500]}"
    assert ("(every format)" in r.stdout.splitlines()[0]) == every_format, r.stdout[:500]
    assert r.returncode == 0, f"the compile guard failed with Triton {version}:\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}"


INTERPRETED = """
import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def row_sum(x_ptr, y_ptr, K, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):  # a loop over a runtime bound
        offs = k0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < K, other=0.0)
    tl.store(y_ptr, tl.sum(acc, 0))


x, y = torch.arange(100, dtype=torch.float32), torch.zeros(1)
try:
    int(np.ones(1))
    print("numpy converts")
except TypeError:
    print("numpy refuses")
try:
    row_sum[(1,)](x, y, 100, BLOCK=32)
    print("plain", "ran" if y.item() == 4950 else f"wrong {y.item()}")
except Exception as e:
    print("plain failed:", repr(e)[:200])

from bitnet.kernels.activations import act_quant  # (imports common: its mend for this interpreter)
from bitnet.kernels.gemm import gemm
from bitnet.packing import pack
from bitnet.quant import int_matmul, quantize_activation

row_sum[(1,)](x, y, 100, BLOCK=32)
print("mended", "ran" if y.item() == 4950 else f"wrong {y.item()}")
torch.manual_seed(0)
a = torch.randn(3, 96)
x_q, scale, _ = act_quant(a)
ref_q, ref_scale = quantize_activation(a)
w = torch.randint(-1, 2, (40, 96), dtype=torch.int8)
exact = torch.equal(x_q, ref_q) and torch.equal(scale, ref_scale) and torch.equal(
    gemm(x_q, pack(w, "2bit"), 40, "2bit", out_dtype=torch.int32), int_matmul(x_q, w))
print("kernels", "exact" if exact else "differ")
"""


@pytest.mark.slow
def test_the_interpreter_runs_the_kernels_with_the_oldest_supported_triton(tmp_path):
    """TRITON_INTERPRET=1 with the floor's Triton (3.6, what the GPU machines rerun the interpreter
    tier with): its interpreter converts a loop bound with int() of a one-element array, which NumPy
    2.4 refuses, so every kernel with a runtime-bounded loop failed there; bitnet.kernels mends
    that interpreter on import (common._interpreter_scalars_compat). Shown on a plain kernel before
    and after the import (where this NumPy refuses, the plain one fails first), then act_quant and
    the GEMM against the torch reference and the exact integer matmul."""
    version, env = _floor_env()
    script = tmp_path / "interpreted.py"
    script.write_text(INTERPRETED)
    r = subprocess.run([sys.executable, str(script)], env={**env, "TRITON_INTERPRET": "1"}, capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    numpy, plain, mended, kernels = r.stdout.strip().splitlines()[-4:]
    if numpy == "numpy refuses":
        assert plain.startswith("plain failed:") and "0-dimensional" in plain, r.stdout
    else:
        assert plain == "plain ran", r.stdout
    assert (mended, kernels) == ("mended ran", "kernels exact"), r.stdout


@pytest.mark.slow
def test_every_launch_of_a_run_compiles_with_the_oldest_supported_triton():
    """tests/launch_check.py with the floor's Triton (the GPU machines' 3.6), for sm_90."""
    version, env = _floor_env()
    probe = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == version, probe.stdout + probe.stderr
    r = _launch_check("90", env=env)
    assert r.returncode == 0, f"{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    r = _direct_launch_check(env=env)  # the launcher's arguments as Triton 3.6 passes them
    assert r.returncode == 0 and "direct launches: 0 failed" in r.stdout, f"{r.stdout[-20000:]}\n{r.stderr[-5000:]}"


@pytest.mark.slow
def test_tuning_tables_through_the_oldest_supported_tritons_autotuner(tmp_path):
    """tests/tuning_check.py with the floor's Triton (the GPU machines' 3.6: its autotuner times
    even a lone config, and calls the tables' hook for it)."""
    version, env = _floor_env()
    r = _tuning_check(tmp_path, env=env)
    assert r.returncode == 0 and "tuning tables: 0 failed" in r.stdout, f"{r.stdout[-5000:]}\n{r.stderr[-5000:]}"

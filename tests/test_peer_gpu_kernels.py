"""benchmarks/peer_gpu_kernels.py without a GPU: the peers' packed layouts decoded back (decoders written
from their kernels' source, against their own packing code where it is here), the checks that keep a
wrong peer out of the table, the nvcc command and the build plumbing (a stand-in nvcc), the whole
measuring loop on the CPU with bitnet.cpp's kernel emulated, the preparation from a local git, and
the message without a GPU. The peers' sources and wheel are git-ignored (`--prepare` makes them): the
tests that read them skip where they are absent."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from bitnet.quant import int_matmul

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("peer_gpu_kernels", os.path.join(ROOT, "benchmarks", "peer_gpu_kernels.py"))
peer = importlib.util.module_from_spec(_spec)
sys.modules["peer_gpu_kernels"] = peer  # its dataclasses look their module up
_spec.loader.exec_module(peer)

SRC = peer.BITNETCPP_SRC
HAVE_SRC = os.path.isfile(os.path.join(SRC, "pack_weight.py"))
NO_SRC = "bitnet.cpp's gpu/ sources are not here (python benchmarks/peer_gpu_kernels.py --prepare ...)"
WHEELS = sorted(glob.glob(os.path.join(peer.WHEEL_DIR, "gemlite-*.whl")))


def ternary(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


# ----------------------------------------------------------------------------- plan and checks
def test_plan_puts_m1_first_then_bitnetcpp_shapes_then_larger_m():
    cells = peer.plan(["a", "b"], ["c", "a"], [16, 1, 2048])
    assert cells == [("a", 1), ("b", 1), ("c", 1), ("a", 16), ("b", 16), ("a", 2048), ("b", 2048)]
    assert peer.plan(["a"], ["c"], [16]) == [("a", 16)]  # M = 1 shapes only where M = 1 is asked for


def test_checks_flag_a_wrong_output():
    torch.manual_seed(0)
    ref = torch.randn(4, 256, dtype=torch.float64)
    good = ref.to(torch.bfloat16)  # bf16 rounding only
    assert peer.verdict(peer.compare(good, ref), peer.TOLERANCE) is None
    assert peer.compare(good, ref)["rel_rms"] < 3e-3
    for wrong in (ref.flip(1), -ref, ref + 0.3 * ref.abs().max(), torch.zeros_like(ref), torch.full_like(ref, float("nan"))):
        why = peer.verdict(peer.compare(wrong.to(torch.bfloat16), ref), peer.TOLERANCE)
        assert why is not None and why.startswith("wrong"), why
    acc = torch.randint(-3000, 3000, (1, 64), dtype=torch.int32)
    y = acc.float().to(torch.bfloat16)
    assert peer.exact_mismatches(y, acc) == 0
    y.view(torch.int16)[0, 5] += 1  # one bf16 ulp off
    y[0, 7] += 64
    assert peer.exact_mismatches(y, acc) == 2
    assert peer.verdict(None, peer.TOLERANCE, 2).startswith("wrong: 2 outputs differ")


# ----------------------------------------------------------------------------- bitnet.cpp
def test_dispatch_shapes_read_from_the_source():
    text = """
    if (M == 1 && N == 3840 && K == 2560){ ... }
    else if(M == 1 && N == 2560 && K == 6912){ ... }
    else if (M == 4 && N == 1 && K == 2) {}"""
    assert peer.bitnetcpp_shapes(text) == [(3840, 2560), (2560, 6912)]
    if not HAVE_SRC:
        pytest.skip(NO_SRC)
    with open(os.path.join(SRC, "bitnet_kernels", "bitnet_kernels.cu")) as f:
        shapes = peer.bitnetcpp_shapes(f.read())
    assert {(2560, 6912), (13824, 2560), (20480, 3200), (2560, 2560)} <= set(shapes)  # its README's table
    assert all(peer.instantiable(n, k) for n, k in shapes)  # the template's own constraints hold for its shapes
    for s in peer.M1_SHAPES:
        assert peer.parse_shape(s) in shapes


def encode_bitnetcpp(w: torch.Tensor) -> torch.Tensor:
    """decode_bitnetcpp's inverse (codes w + 2 at the bits and bytes the kernel reads them from), a
    stand-in for bitnet.cpp's converter where its sources are not here."""
    n, k = w.shape
    codes = (w.to(torch.int32) + 2).reshape(n // 16, 16, k // 128, 8, 16).permute(0, 2, 3, 1, 4)  # (bx, k0, tx, ty, t)
    t = torch.arange(16)
    word = (codes << (2 * (t // 4) + 8 * (t % 4)).to(torch.int32)).sum(-1, dtype=torch.int32)  # disjoint bits
    bx, k0, tx, ty = (torch.arange(d).view([-1 if i == j else 1 for j in range(4)])
                      for i, d in enumerate((n // 16, k // 128, 8, 16)))
    offset = bx * 16 * k // 4 + k0 * 512 + (tx >> 1) * 128 + (ty >> 3) * 64 + (tx & 1) * 32 + (ty & 7) * 4
    words = torch.zeros(n * k // 16, dtype=torch.int32)
    words[(offset // 4).reshape(-1)] = word.reshape(-1)
    return words.view(torch.int8).reshape(n, k // 4)


@pytest.mark.parametrize("n,k", [(16, 128), (48, 384)])
def test_the_stand_in_encoder_inverts_the_decoder(n, k):
    w = ternary(n, k, seed=7)
    b = encode_bitnetcpp(w)
    assert torch.equal(peer.decode_bitnetcpp(b, n, k), w)
    if HAVE_SRC:  # and it is bitnet.cpp's converter, byte for byte
        assert torch.equal(b, peer.bitnetcpp_pack(SRC)(w))


@pytest.mark.skipif(not HAVE_SRC, reason=NO_SRC)
@pytest.mark.parametrize("n,k", [(16, 128), (48, 384), (2560, 2560)])
def test_bitnetcpp_layout_from_its_converter_decodes_to_the_weights(n, k):
    w = ternary(n, k, seed=n)
    b = peer.bitnetcpp_pack(SRC)(w)  # its gpu/pack_weight.py
    assert b.dtype == torch.int8 and b.shape == (n, k // 4)
    assert torch.equal(peer.decode_bitnetcpp(b, n, k), w)
    # the decoder reads what the kernel reads: moving one int32 word moves 16 weights
    words = b.view(torch.int32).reshape(-1).clone()
    words[[0, 1]] = words[[1, 0]]
    moved = peer.decode_bitnetcpp(words.view(torch.int8).reshape(n, k // 4), n, k)
    assert 0 < int((moved != w).sum()) <= 32


def test_instantiation_source_launches_as_its_dispatch_does():
    text = peer.instantiation_source([(6912, 2560), (28672, 8192)])
    assert '#include "bitnet_kernels.h"' in text
    assert 'extern "C" int bitlinear_int8xint2_at(' in text
    assert ("ladder_int8xint2_kernel<1, 6912, 2560, 1, 8, 16><<<dim3(432, 1, 1), dim3(8, 16, 1), 0, stream>>>"
            "(input0, input1, output0, s, ws);") in text
    assert "ladder_int8xint2_kernel<1, 28672, 8192, 1, 8, 16><<<dim3(1792, 1, 1)" in text
    assert text.rstrip().endswith("return -1;\n}")
    with pytest.raises(ValueError, match="K % 128"):
        peer.instantiation_source([(2560, 2560 + 64)])
    assert peer.instantiable(6912, 2560) and not peer.instantiable(2568, 2560)


def test_nvcc_command_is_its_compile_sh_less_lcuda_plus_this_gpus_sass():
    cmd = peer.nvcc_command("/usr/local/cuda/bin/nvcc", "/s/bitnet_kernels.cu", "/b/libbitnet.so", 90)
    assert cmd == ["/usr/local/cuda/bin/nvcc", "-std=c++17", "-Xcudafe", "--diag_suppress=177", "--compiler-options",
                   "-fPIC", "-lineinfo", "--shared", "/s/bitnet_kernels.cu", "-gencode=arch=compute_80,code=compute_80",
                   "-gencode=arch=compute_80,code=sm_90", "-o", "/b/libbitnet.so"]
    with_include = peer.nvcc_command("nvcc", "at.cu", "at.so", 100, include="/s")
    assert with_include[with_include.index("-I") + 1] == "/s" and "-gencode=arch=compute_80,code=sm_100" in with_include
    if HAVE_SRC:  # the flags are compile.sh's, less -lcuda
        with open(os.path.join(SRC, "bitnet_kernels", "compile.sh")) as f:
            theirs = f.read().split()
        assert set(cmd[1:8]) <= set(theirs) and "-lcuda" in theirs and "-lcuda" not in cmd
        assert "-gencode=arch=compute_80,code=compute_80" in theirs


FAKE_NVCC = """#!/usr/bin/env python3
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_NVCC_LOG"], "a") as f:
    f.write(" ".join(args) + "\\n")
if os.environ.get("FAKE_NVCC_FAIL"):
    print("bitnet_kernels.cu(1): error: a stand-in failure")
    sys.exit(1)
stub = os.path.join(os.path.dirname(args[args.index("-o") + 1]), "stub.c")
with open(stub, "w") as f:
    f.write("void bitlinear_int8xint2(void) {}\\nint bitlinear_int8xint2_at(void) { return -1; }\\n")
sys.exit(subprocess.call(["gcc", "-shared", "-fPIC", stub, "-o", args[args.index("-o") + 1]]))
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc for the stand-in nvcc")
def test_build_runs_nvcc_per_library_and_reports_its_failure(tmp_path, monkeypatch):
    src = tmp_path / "gpu"
    (src / "bitnet_kernels").mkdir(parents=True)
    (src / "bitnet_kernels" / "bitnet_kernels.cu").write_text("if (M == 1 && N == 2560 && K == 6912){}")
    (src / "bitnet_kernels" / "bitnet_kernels.h").write_text("// the kernel template")
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    log = tmp_path / "nvcc.log"
    monkeypatch.setenv("NVCC", str(nvcc))
    monkeypatch.setenv("FAKE_NVCC_LOG", str(log))
    build = peer.BitnetCppBuild(str(src), str(tmp_path / "build"), 90, [(6912, 2560)])
    assert build.error is None
    for lib in ("libbitnet.so", "libbitnet_at.so"):
        assert callable(build.kernel(lib))  # built, loaded, its symbol found
    lines = [line for line in log.read_text().splitlines() if line != "--version"]
    assert len(lines) == 2 and all("-gencode=arch=compute_80,code=sm_90" in line for line in lines)
    assert any(line.split()[7].endswith("bitnet_kernels_at.cu") and "-I" in line for line in lines)
    assert "<1, 6912, 2560, 1, 8, 16>" in (tmp_path / "build" / "bitnet_kernels_at.cu").read_text()
    assert peer.BitnetCppBuild(str(src), str(tmp_path / "build"), 90, [(6912, 2560)]).procs == {}  # reused

    monkeypatch.setenv("FAKE_NVCC_FAIL", "1")
    failed = peer.BitnetCppBuild(str(src), str(tmp_path / "other"), 90, [])
    with pytest.raises(RuntimeError, match="nvcc exited 1: .*a stand-in failure"):
        failed.kernel("libbitnet.so")
    monkeypatch.setenv("NVCC", str(tmp_path / "absent"))
    monkeypatch.setenv("PATH", str(tmp_path / "build"))  # no nvcc there
    monkeypatch.setattr("torch.utils.cpp_extension.CUDA_HOME", None)
    if not os.path.exists("/usr/local/cuda/bin/nvcc"):
        assert "no nvcc" in peer.BitnetCppBuild(str(src), None, 90, []).error
    assert "no bitnet.cpp source" in peer.BitnetCppBuild(str(tmp_path / "none"), None, 90, []).error


# ----------------------------------------------------------------------------- gemlite
def _gemlite_bitpack(wheel: str, tmp_path):
    """gemlite's bitpack.py (and the dtypes.py it imports) out of its wheel, without gemlite/__init__.py,
    whose import asks torch.cuda for the device."""
    pkg = tmp_path / "gemlite_cpu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    with zipfile.ZipFile(wheel) as z:
        for name in ("dtypes.py", "bitpack.py"):
            (pkg / name).write_bytes(z.read(f"gemlite/{name}"))
    spec = importlib.util.spec_from_file_location("gemlite_cpu", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    sys.modules["gemlite_cpu"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["gemlite_cpu"])
    return importlib.import_module("gemlite_cpu.bitpack")


@pytest.mark.skipif(not WHEELS, reason="no gemlite wheel in .whl (python benchmarks/peer_gpu_kernels.py --prepare ...)")
def test_gemlite_packing_decodes_to_the_weights(tmp_path):
    bitpack = _gemlite_bitpack(WHEELS[-1], tmp_path)
    n, k = 48, 256
    w = ternary(n, k, seed=3)
    # what A8W158_INT_dynamic.from_weights does with W_q, then GemLiteLinearTriton.pack on a CPU tensor
    packed, per = bitpack.pack_weights_over_cols_torch((w.to(torch.bfloat16) + 1).to(torch.uint8).view(n, k),
                                                       W_nbits=2, packing_bitwidth=32, transpose=True)
    assert per == 16 and packed.dtype == torch.int32 and packed.shape == (k // 16, n)
    assert torch.equal(peer.decode_gemlite(packed.contiguous(), n, k), w)
    assert not torch.equal(peer.decode_gemlite(packed.flip(1).contiguous(), n, k), w)


@pytest.mark.skipif(not WHEELS, reason="no gemlite wheel in .whl")
def test_the_gemlite_wheel_fits_the_gpu_machine():
    """Pure Python, for the GPU machine's triton 3.6 (its only floor is triton >= 3.6.0)."""
    assert WHEELS[-1].endswith("-py3-none-any.whl")
    requires = peer.wheel_requires(WHEELS[-1])
    assert "triton>=3.6.0" in [r.replace(" ", "") for r in requires]
    assert not any(r.lower().startswith("torch") for r in requires)


# ----------------------------------------------------------------------------- the loop, on the CPU
def emulated_kernel(zero: int = 2):
    """bitnet.cpp's kernel in torch, from the decoder: y = bf16(float(x_q W^T) / s[0] * ws[0]); with
    zero=1, a kernel that takes the wrong zero point (codes - 1)."""

    class Build:
        def __init__(self, src, build_dir, sm, extra):
            self.error, self.info = None, {"extra_shapes": [f"{n}x{k}" for n, k in extra]}

        def kernel(self, lib):
            def call(x_q, b, out, s, ws, n, k):
                acc = int_matmul(x_q, peer.decode_bitnetcpp(b, n, k) + (2 - zero))
                return out.copy_((acc.float() / s[0].float() * ws[0].float()).to(torch.bfloat16))
            return call

    return Build


def fake_src(tmp_path, monkeypatch, dispatch: str) -> str:
    """A gpu/ folder whose dispatch lists `dispatch`, with bitnet.cpp's converter (or the stand-in)."""
    src = tmp_path / "gpu"
    (src / "bitnet_kernels").mkdir(parents=True)
    if HAVE_SRC:
        shutil.copy(os.path.join(SRC, "pack_weight.py"), src / "pack_weight.py")
    else:
        monkeypatch.setattr(peer, "bitnetcpp_pack", lambda _: encode_bitnetcpp)
    (src / "bitnet_kernels" / "bitnet_kernels.cu").write_text(dispatch)
    return str(src)


def test_the_loop_checks_times_and_reports_every_system(tmp_path, monkeypatch, triton_device):
    if triton_device != "cpu":
        pytest.skip("the CPU run of the loop (the GPU runs the script itself)")
    monkeypatch.setattr(peer, "BitnetCppBuild", emulated_kernel())
    monkeypatch.setitem(sys.modules, "gemlite", None)  # as on a machine without it: its rows say so
    src = fake_src(tmp_path, monkeypatch, "M == 1 && N == 64 && K == 256")
    args = peer.PeerArgs(shapes=["64x256"], m1_shapes=["32x128"], m=[1, 2], src=src, warmup=0, iters=1, budget_s=600)
    result = peer.Run(args, device="cpu").run()
    rows = {(r["shape"], r["m"], r["system"]): r for r in result["rows"]}
    for system in ("bf16 F.linear (cuBLAS)", "ours bitlinear 2bit", "ours packed_matmul (int8 x given)",
                   "bitnet.cpp W2A8 (int8 x given)", "bitnet.cpp W2A8 + act_quant"):
        r = rows[("64x256", 1, system)]
        assert r["status"] == ("ok (exact)" if "bitnet.cpp" in system else "ok") and r["ms"] > 0, r
        assert system.startswith("bf16") or r["err"] < 0.01, r
    assert rows[("64x256", 1, "bitnet.cpp W2A8 (int8 x given)")]["exact_mismatches"] == 0
    assert rows[("64x256", 1, "bitnet.cpp W2A8 + act_quant")]["act_quant"] == "timed"
    inst = rows[("32x128", 1, "bitnet.cpp W2A8 (instantiated here) (int8 x given)")]  # a shape not in its dispatch
    assert inst["status"] == "ok (exact)"
    assert rows[("64x256", 2, "bitnet.cpp W2A8")]["status"] == "not supported: its kernel is a GEMV, M = 1 only"
    assert rows[("64x256", 1, "gemlite A8W158_INT_dynamic")]["status"].startswith("failed: import gemlite")
    md = peer.report(result)
    assert "| 64x256 | 2 | bitnet.cpp W2A8 |" in md and "not supported" in md and "instantiated here" in md
    # the goals' scorecard pairs each peer with ours doing the same work (quantization timed, or not)
    spec = importlib.util.spec_from_file_location("gpu_goals", os.path.join(ROOT, "benchmarks", "gpu_goals.py"))
    goals = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = goals  # (its dataclass looks its module up there)
    spec.loader.exec_module(goals)
    card = {r["goal"]: r for r in goals.peer_kernel_goals(result)}
    for shape, ours, theirs in (("64x256", "ours packed_matmul (int8 x given)", "bitnet.cpp W2A8 (int8 x given)"),
                                ("64x256", "ours bitlinear 2bit", "bitnet.cpp W2A8 + act_quant"),
                                ("32x128", "ours bitlinear 2bit", "bitnet.cpp W2A8 (instantiated here) + act_quant")):
        got = card.pop(f"{shape}, M = 1: ahead of {theirs}")
        assert got["value"] == pytest.approx(rows[(shape, 1, theirs)]["ms"] / rows[(shape, 1, ours)]["ms"]), got
    gemlite = card.pop("64x256, M = 1: ahead of gemlite A8W158_INT_dynamic")
    assert gemlite["status"] == "not measured" and gemlite["note"].startswith("failed: import gemlite")
    assert all("gemlite" in g or "instantiated" in g for g in card), card  # (not supported at M = 2: no goal)

    monkeypatch.setattr(peer, "BitnetCppBuild", emulated_kernel(zero=1))  # a peer that reads every weight + 1
    args = peer.PeerArgs(shapes=["64x256"], m1_shapes=[], m=[1], peers=["bitnet.cpp"], instantiate=False,
                         src=args.src, warmup=0, iters=1)
    rows = peer.Run(args, device="cpu").run()["rows"]
    assert len(rows) == 2 and all(re.fullmatch(r"wrong: \d+ outputs differ from bf16\(x_q W_q\^T\) with unit scales",
                                               r["status"]) for r in rows), rows
    assert rows[0]["exact_mismatches"] > 48 and rows[0]["err"] > 0.3
    assert all("ms" not in r for r in rows)  # a wrong peer is not timed


def test_past_the_budget_nothing_is_measured():
    args = peer.PeerArgs(shapes=["64x256"], m1_shapes=["32x128"], m=[1, 16], peers=["bf16"], budget_s=-1)
    result = peer.Run(args, device="cpu").run()
    assert [(r["shape"], r["m"]) for r in result["rows"]] == [("64x256", 1), ("32x128", 1), ("64x256", 16)]
    assert all(r["status"].startswith("skipped: time budget") for r in result["rows"])
    md = peer.report(result)
    assert "**skipped** (time budget): 64x256 M=1, 32x128 M=1, 64x256 M=16" in md
    commands = peer.rerun_commands(result["rows"], result["args"])
    assert commands == ["python benchmarks/peer_gpu_kernels.py --shapes 64x256 32x128 --m1-shapes 64x256 --m 1 "
                        "--peers bf16 --name peer_gpu_kernels_cuda_m1",
                        "python benchmarks/peer_gpu_kernels.py --shapes 64x256 --m1-shapes 64x256 --m 16 "
                        "--peers bf16 --name peer_gpu_kernels_cuda_m16"]
    assert all(f"`{c}`" in md for c in commands)
    for c in commands:  # each runs exactly the cells it names
        a = peer.cli_args(c.split()[2:])
        cells = peer.plan(a.shapes, a.m1_shapes, a.m)
        assert all(any(r["shape"] == s and r["m"] == m for r in result["rows"]) for s, m in cells)


# ----------------------------------------------------------------------------- entry points
def test_without_a_gpu_it_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert peer.main(peer.PeerArgs()) == 2
    assert "no CUDA device here, nothing to measure" in capsys.readouterr().err
    assert peer.main(peer.PeerArgs(prepare=True)) == 2
    assert "--prepare needs --bitnet-git" in capsys.readouterr().err


def test_prepare_exports_the_gpu_folder_from_a_git(tmp_path):
    repo = tmp_path / "BitNet"
    (repo / "gpu" / "bitnet_kernels").mkdir(parents=True)
    (repo / "gpu" / "bitnet_kernels" / "bitnet_kernels.cu").write_text("if (M == 1 && N == 2560 && K == 6912){}\n")
    (repo / "gpu" / "pack_weight.py").write_text("# its converter\n")
    (repo / "gpu" / "tokenizer.model").write_bytes(b"\0" * 1000)
    (repo / "src").mkdir()
    (repo / "src" / "other.cpp").write_text("// not the GPU kernels\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    out = peer.prepare(str(repo), peers_dir=str(tmp_path / ".peers"), gemlite=False)
    dest = tmp_path / ".peers" / "bitnet-gpu"
    assert (dest / "gpu" / "bitnet_kernels" / "bitnet_kernels.cu").is_file() and (dest / "gpu" / "pack_weight.py").is_file()
    assert not (dest / "gpu" / "tokenizer.model").exists() and not (dest / "src").exists()
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert (dest / "COMMIT").read_text().strip() == head == out["commit"]
    assert out["dispatch_shapes"] == ["2560x6912"]


def test_help():
    with pytest.raises(SystemExit) as e:
        peer.cli(["--help"])
    assert e.value.code == 0

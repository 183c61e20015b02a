"""benchmarks/gpu_check.sh and what it runs, as far as a CPU can check them: the script's syntax,
its plan (--dry-run), its stage machinery (timeouts, failures, the results folder of at most 8
files) with a stub in place of python3, the transformers peer end to end on a tiny preset, and
the kernel benchmark's M = 1-only formats through Triton's interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["install", "stamp", "tests", "kernels", "generate", "peer"]


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    knobs = {"OUT", "TOTAL", "GRACE", "PACK_RESERVE", "BENCH_OUT", "PYTHON", "TEST_TIMEOUT", "GIT_COMMIT"}
    full = {k: v for k, v in os.environ.items() if k not in knobs and not k.startswith("BUDGET_")}
    full.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def test_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dry_run_prints_every_stage_within_six_minutes(tmp_path):
    r = run_script(str(tmp_path / "results"), "--dry-run")
    assert r.returncode == 0, r.stderr
    budgets = {s: int(b) for s, b in re.findall(r"^stage (\w+): budget (\d+)s$", r.stdout, re.M)}
    assert list(budgets) == STAGES
    total = int(re.search(r"sum of the selected budgets .*: (\d+)s of (\d+)s", r.stdout).group(2))
    assert sum(budgets.values()) <= total <= 360  # one call of at most 6 minutes
    assert "pytest -q -n" in r.stdout and "--timeout" in r.stdout
    for script in ("bench_kernels.py", "bench_generate.py", "peer_transformers.py"):
        assert f"benchmarks/{script} --device cuda" in r.stdout
    assert not (tmp_path / "results").exists()  # a dry run writes nothing

    r = run_script("--dry-run", "--stages", "tests,peer")
    assert "stage kernels: not selected" in r.stdout and "stage peer: budget" in r.stdout
    assert run_script("--dry-run", "--stages", "tests,nonsense").returncode == 2


STUB = """#!/usr/bin/env bash
case "$*" in
  "-m pytest "*) for w in 1 2; do echo "WARNING bitnet.kernels.launch: direct Triton launches do not work here (cuda:0); the kernels launch through Triton's own path"; done
                echo "FAILED tests/test_x.py::test_y - AssertionError: boom"; echo "1 failed, 2 passed in 0.50s"; exit 1 ;;
  *bench_kernels*) echo "autotuning forever"; sleep 30 ;;
  *bench_generate*) echo '{"complete": true}' > "$BENCH_OUT/generate_cuda.json"; echo '# generate table' > "$BENCH_OUT/generate_cuda.md"
                    mkdir -p "$BITNET_TUNING_DIR" && echo '{"format": 1}' > "$BITNET_TUNING_DIR/Stub_GPU.json" ;;
  *peer_transformers*) echo "DISAGREE"; exit 1 ;;
esac
"""


def stub_env(tmp_path: Path, **budgets: int) -> dict:
    stub = tmp_path / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    bench_out = tmp_path / "bench_out"
    bench_out.mkdir(exist_ok=True)
    env = {"PYTHON": str(stub), "BENCH_OUT": str(bench_out), "GRACE": "1", "PACK_RESERVE": "1"}
    env.update({k: str(v) for k, v in budgets.items()})
    return env


def test_stages_time_out_fail_and_go_on_into_at_most_eight_files(tmp_path):
    env = stub_env(tmp_path, TOTAL=10, BUDGET_KERNELS=3, BUDGET_GENERATE=3, BUDGET_PEER=2)
    stale = tmp_path / "bench_out" / "peer_transformers_cuda.json"  # an earlier run's: not this run's result
    stale.write_text("{}")
    os.utime(stale, (1e9, 1e9))
    results = tmp_path / "results"
    r = run_script(str(results), "--stages", "kernels,generate,peer", env=env)
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.rindex("stage     status"):]
    assert re.search(r"^kernels\s+TIMEOUT", table, re.M), table
    assert re.search(r"^generate\s+ok", table, re.M), table
    assert re.search(r"^peer\s+FAIL \(rc 1\)", table, re.M), table
    assert "# generate table" in r.stdout  # result tables are printed before the stage table
    files = sorted(os.listdir(results))
    assert files == ["generate_cuda.md", "logs.tar.gz", "results.tar.gz", "summary.md"]
    with tarfile.open(results / "results.tar.gz") as tar:  # this run's results only (not the stale JSON)
        assert sorted(tar.getnames()) == ["results", "results/generate_cuda.json", "results/generate_cuda.md",
                                          "results/tuning", "results/tuning/Stub_GPU.json"]  # (its autotuning table)
    with tarfile.open(results / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"logs/kernels.log", "logs/generate.log", "logs/peer.log", "logs/summary.md"} <= names
        assert b"autotuning forever" in tar.extractfile("logs/kernels.log").read()
    summary = (results / "summary.md").read_text()
    assert "| kernels | TIMEOUT |" in summary and "| peer | FAIL (rc 1) |" in summary


def test_test_stage_summary_failures_and_fallbacks_are_extracted(tmp_path):
    env = stub_env(tmp_path, TOTAL=8, BUDGET_TESTS=6)
    results = tmp_path / "results"
    r = run_script(str(results), "--stages", "tests", env=env)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^tests\s+FAIL \(rc 1\)\s+\S+\s+\S+\s+1 failed, 2 passed in 0.50s", r.stdout, re.M), r.stdout
    assert "FAILED tests/test_x.py::test_y - AssertionError: boom" in r.stdout
    summary = (results / "summary.md").read_text()
    assert "Tests: 1 failed, 2 passed in 0.50s" in summary and "- FAILED tests/test_x.py::test_y" in summary
    assert re.search(r"Fallbacks logged.*\n```\n\s+2 direct Triton launches do not work here", summary, re.S), summary
    assert sorted(os.listdir(results)) == ["logs.tar.gz", "summary.md"]


def test_peer_transformers_agrees_on_a_tiny_preset(tmp_path):
    """The peer end to end on the CPU: one random tiny checkpoint, ours and transformers' logits
    within the stated tolerance, the same greedy tokens in bf16 and in float32."""
    peer = bench_module("peer_transformers")
    # (warm and a median of three: a first call's costs or one noisy timing could make generate(6)
    # time shorter than generate(1), which the peer refuses)
    args = peer.PeerArgs(preset="tiny", device="cpu", new_tokens=6, prompt_len=12, warmup=1, iters=3,
                         out_dir=str(tmp_path), name="peer_smoke")
    assert peer.main(args) == 0
    res = json.loads((tmp_path / "peer_smoke.json").read_text())
    assert res["environment"]["torch"] == torch.__version__
    assert res["logits_within_tolerance"]
    d, tol = res["diffs"], res["tolerance"]
    assert 0 < d["bf16"]["max"] <= tol["max"] and d["bf16"]["mean"] <= tol["mean"]
    assert d["fp32"]["max"] < 1e-4 * d["fp32"]["ref_max_abs"]  # float32: the same function (no int8 tie at this seed)
    assert res["greedy"]["bf16"]["identical"] and res["greedy"]["fp32"]["identical"]
    assert len(res["greedy"]["bf16"]["ours"]) == 6
    assert set(res["speed"]) == {"transformers", "ours"}  # no compiled run on a CPU by default
    assert all(s["decode_tok_s"] > 0 for s in res["speed"].values())
    md = (tmp_path / "peer_smoke.md").read_text()
    assert "| ours bf16 vs transformers bf16 |" in md and "Within: yes" in md and "| bf16: ours vs transformers | yes |" in md


def test_peer_first_difference():
    peer = bench_module("peer_transformers")
    a = torch.tensor([[5, 6, 1, 2, 3]])
    assert peer.first_difference(a, a.clone(), 2) is None
    assert peer.first_difference(a, torch.tensor([[5, 6, 1, 9, 3]]), 2) == 1
    assert peer.first_difference(a, torch.tensor([[5, 6, 1]]), 2) == 1  # one side stopped early


def test_kernel_benchmark_times_m1_formats_at_m1_only_and_saves_shape_by_shape(tmp_path, monkeypatch, triton_device):
    if triton_device != "cpu":
        pytest.skip("drives the benchmark's CPU measuring code through Triton's interpreter (rerun beside a GPU)")
    bench = bench_module("bench_kernels")
    monkeypatch.setattr(bench, "L2Flusher", lambda device: None)
    monkeypatch.setattr(bench, "measured_hbm_bandwidth", lambda: 1000.0)
    monkeypatch.setattr(bench, "time_cuda", lambda fn, warmup, iters, flush: (fn(), 0.02)[1])
    monkeypatch.setattr(bench, "time_cuda_graph", lambda fn, warmup, iters, flush: (fn(), 0.01)[1])
    args = bench.BenchArgs(m=[1, 3], shapes=["40x64", "8x32"], formats=["2bit"], m1_formats=["1bit", "2bit"],
                           warmup=1, iters=1)
    seen = []
    result = bench.measure(args, device="cpu", on_shape=lambda partial: seen.append(len(partial["rows"])))
    got = [(r["shape"], r["m"], r["format"]) for r in result["rows"]]
    two = "2bit act_quant + GEMV"  # at M = 1 also the layer as two launches, for the first format
    assert got == [("40x64", 1, "bf16"), ("40x64", 1, "2bit"), ("40x64", 1, "1bit"), ("40x64", 1, two), ("40x64", 3, "bf16"),
                   ("40x64", 3, "2bit"), ("8x32", 1, "bf16"), ("8x32", 1, "2bit"), ("8x32", 1, "1bit"), ("8x32", 1, two),
                   ("8x32", 3, "bf16"), ("8x32", 3, "2bit")]
    assert seen == [6, 12]
    assert all(r["hbm_share"] > 0 for r in result["rows"])
    assert "| 40x64 | 1 | 1bit |" in bench.report(result)
    assert all(r["ms"] == 0.01 and r["eager_ms"] == 0.02 for r in result["rows"])  # GPU time and eager call, apart

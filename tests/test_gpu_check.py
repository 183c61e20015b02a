"""benchmarks/gpu_check.sh and what it runs, as far as a CPU can check them: the script's syntax,
its plan (--dry-run), its stage machinery (timeouts, failures, the results folder of at most 8
files) with a stub in place of python3, the transformers peer end to end on a tiny preset, and
the kernel benchmark's M = 1-only formats through Triton's interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
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
    knobs = {"OUT", "TOTAL", "GRACE", "PACK_RESERVE", "BENCH_OUT", "PYTHON", "TEST_TIMEOUT", "GIT_COMMIT",
             "GPU_CHECK_KEEP", "GPU_CHECK_TCACHE", "GPU_CHECK_TCACHE_ARCHIVE", "TRITON_CACHE_DIR"}
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
    assert "-rfs" in r.stdout and "benchmarks/gpu_wheels.py --check" in r.stdout  # skip reasons; what fails to import
    for script in ("bench_kernels.py", "bench_generate.py", "peer_transformers.py"):
        assert f"benchmarks/{script} --device cuda" in r.stdout
    assert not (tmp_path / "results").exists()  # a dry run writes nothing

    r = run_script("--dry-run", "--stages", "tests,peer")
    assert "stage kernels: not selected" in r.stdout and "stage peer: budget" in r.stdout
    assert run_script("--dry-run", "--stages", "tests,nonsense").returncode == 2


STUB = """#!/usr/bin/env bash
case "$*" in
  "-m pytest "*) for a in "$@"; do case $a in --junitxml=*) echo '<testsuites/>' > "${a#--junitxml=}" ;; esac; done
                for w in 1 2; do echo "WARNING bitnet.kernels.launch: direct Triton launches do not work here (cuda:0); the kernels launch through Triton's own path"; done
                echo "FAILED tests/test_x.py::test_y - AssertionError: boom"
                echo "SKIPPED [3] tests/test_serve.py:23: needs the serve extra and its test clients"
                echo "1 failed, 2 passed, 3 skipped in 0.50s"; exit 1 ;;
  *bench_kernels*) echo "autotuning forever"; sleep 30 ;;
  *bench_generate*) echo '{"complete": true}' > "$BENCH_OUT/generate_cuda.json"; echo '# generate table' > "$BENCH_OUT/generate_cuda.md"
                    mkdir -p "$BITNET_TUNING_DIR" && echo '{"format": 1}' > "$BITNET_TUNING_DIR/Stub_GPU.json" ;;
  *peer_transformers*) echo "DISAGREE"; exit 1 ;;
  *gpu_goals*) echo "$*" > "$BENCH_OUT/goals_args"; echo '# the goals' > "$BENCH_OUT/gpu_goals_cuda.md"
               echo '{}' > "$BENCH_OUT/gpu_goals_cuda.json" ;;
esac
"""


def stub_env(tmp_path: Path, **budgets: int) -> dict:
    stub = tmp_path / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    bench_out = tmp_path / "bench_out"
    bench_out.mkdir(exist_ok=True)
    env = {"PYTHON": str(stub), "BENCH_OUT": str(bench_out), "GRACE": "1", "PACK_RESERVE": "1",
           "GPU_CHECK_KEEP": str(tmp_path / "keep"),
           "GPU_CHECK_TCACHE_ARCHIVE": str(tmp_path / "none.tar.xz")}  # (not a Triton cache a session left in .tcache)
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
    # result tables, then the goals, are printed before the stage table
    assert r.stdout.index("# generate table") < r.stdout.index("# the goals") < r.stdout.index("stage     status")
    files = sorted(os.listdir(results))
    assert files == ["generate_cuda.md", "gpu_goals_cuda.md", "logs.tar.gz", "results.tar.gz", "summary.md"]
    with tarfile.open(results / "results.tar.gz") as tar:  # this run's results only (not the stale JSON)
        assert sorted(tar.getnames()) == ["results", "results/generate_cuda.json", "results/generate_cuda.md",
                                          "results/gpu_goals_cuda.json", "results/gpu_goals_cuda.md",
                                          "results/tuning", "results/tuning/Stub_GPU.json"]  # (its autotuning table)
    # the goals read the results this call gathered (no tests stage: no --junit)
    goals_args = (tmp_path / "bench_out" / "goals_args").read_text().split()
    assert goals_args[:2] == ["benchmarks/gpu_goals.py", "--results"] and goals_args[2].endswith("/results")
    assert "--junit" not in goals_args
    with tarfile.open(results / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"logs/kernels.log", "logs/generate.log", "logs/peer.log", "logs/summary.md"} <= names
        assert b"autotuning forever" in tar.extractfile("logs/kernels.log").read()
    summary = (results / "summary.md").read_text()
    assert "| kernels | TIMEOUT |" in summary and "| peer | FAIL (rc 1) |" in summary


def test_a_later_call_on_the_machine_starts_from_the_earlier_calls_tuning(tmp_path):
    """Call 2 on the warm machine finds call 1's autotuning choices (GPU_CHECK_KEEP) in its fresh
    tuning folder before its first stage, and packs them with its own; `off` keeps none."""
    env = stub_env(tmp_path, TOTAL=8, BUDGET_GENERATE=3, BUDGET_PEER=2)
    stub = Path(env["PYTHON"])  # the stub says what its first run in a call (the stage's) finds in the tuning folder
    seen_file = Path(env["BENCH_OUT"]) / "seen"
    stub.write_text(STUB.replace('case "$*" in', f'[ -e {seen_file} ] || ls "$BITNET_TUNING_DIR" > {seen_file}\ncase "$*" in', 1))

    def call(results, stages, **extra):
        seen_file.unlink(missing_ok=True)
        r = run_script(str(tmp_path / results), "--stages", stages, env={**env, **extra})
        assert r.returncode == 0, r.stderr
        seen = seen_file.read_text().split()
        with tarfile.open(tmp_path / results / "results.tar.gz") as tar:
            packed = sorted(n for n in tar.getnames() if n.startswith("results/tuning/"))
        return r.stdout, seen, packed

    out, seen, packed = call("one", "generate")  # the stub's generate tunes: Stub_GPU.json
    assert seen == [] and "earlier call" not in out and packed == ["results/tuning/Stub_GPU.json"]
    assert (tmp_path / "keep" / "Stub_GPU.json").exists()
    out, seen, packed = call("two", "peer")  # tunes nothing itself
    assert seen == ["Stub_GPU.json"] and "autotuning choices of an earlier call on this machine: Stub_GPU.json" in out
    assert packed == ["results/tuning/Stub_GPU.json"]
    out, seen, _ = call("three", "peer", GPU_CHECK_KEEP="off")
    assert seen == [] and "earlier call" not in out


def test_the_install_stage_unpacks_a_carried_triton_cache_that_every_stage_then_uses(tmp_path):
    """A carried Triton cache (benchmarks/warm_triton_cache.py's archive) is unpacked by the install
    stage where it was built, every later stage gets it as TRITON_CACHE_DIR, and the summary counts
    the kernels the call compiled all the same (the stub's generate stage compiles one)."""
    tcache, built = tmp_path / "tcache", tmp_path / "built"
    entry = built / "ENTRYKEY"
    entry.mkdir(parents=True)
    (entry / "k.cubin").write_bytes(b"\x7fELF")
    (entry / "k.json").write_text("{}")
    group = {n: str(tcache / "ENTRYKEY" / n) for n in ("k.json", "k.cubin")}  # (where it is unpacked)
    (entry / "__grp__k.json").write_text(json.dumps({"child_paths": group}))
    (built / "manifest.json").write_text(json.dumps({"entries": 1}))
    archive = tmp_path / "triton-cache-sm90.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for p in built.iterdir():
            tar.add(p, arcname=p.name)
    env = stub_env(tmp_path, TOTAL=12, BUDGET_INSTALL=4, BUDGET_GENERATE=3)
    stub = Path(env["PYTHON"])
    stub.write_text(STUB.replace('  *bench_generate*) ', '  *tarfile*) exec ' + sys.executable + ' "$@" ;;\n'
                                 '  *bench_generate*) mkdir -p "$TRITON_CACHE_DIR/NEW" && '
                                 'touch "$TRITON_CACHE_DIR/NEW/x.cubin"; ', 1))
    r = run_script(str(tmp_path / "results"), "--stages", "install,generate",
                   env={**env, "GPU_CHECK_TCACHE": str(tcache), "GPU_CHECK_TCACHE_ARCHIVE": str(archive)})
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tcache)) == ["ENTRYKEY", "NEW", "manifest.json"]
    assert (tcache / "ENTRYKEY" / "k.cubin").read_bytes() == b"\x7fELF"
    with tarfile.open(tmp_path / "results" / "logs.tar.gz") as tar:
        assert f"Triton cache carried: 1 entries into {tcache}" in tar.extractfile("logs/install.log").read().decode()
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "Triton cache (kernels): 1 carried, 1 compiled by this call" in summary
    r = run_script(str(tmp_path / "results2"), "--stages", "stamp,generate",
                   env={**env, "GPU_CHECK_TCACHE": str(tmp_path / "no-tcache")})
    assert r.returncode == 0 and "Triton cache" not in (tmp_path / "results2" / "summary.md").read_text()  # none
    assert re.search(r"^stamp\s+ok", r.stdout, re.M), r.stdout  # (the stamp's cache line is optional, not a failure)


def test_warm_triton_cache_compiles_what_the_same_launches_then_find_in_it(tmp_path):
    """benchmarks/warm_triton_cache.py compiles the kernel stage's launches (here one small shape,
    M = 1 and 16: the GEMV's and the split-K GEMM's configs, act_quant) for sm_90 into a Triton
    cache and packs each entry's metadata and binary with a manifest. Unpacked into a fresh
    directory at the same path, the same launches in another process find every kernel there and
    compile none; with one entry taken out, exactly that one is compiled again."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "warm_triton_cache.py"), "--any-version", "--parts", "kernels",
           "--shapes", "256x1024", "--m", "1", "16", "--m1-formats", "--no-heads", "--no-attention",
           "--cache-dir", str(cache), "--out", str(out)]

    def run(*extra):
        r = subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        found, compiled = re.search(r": (\d+) found in the cache, (\d+) compiled", r.stdout).groups()
        return int(found), int(compiled)

    assert run()[0] == 0
    archive = out / "triton-cache-sm90.tar.xz"
    with tarfile.open(archive) as tar:
        files = [m.name for m in tar.getmembers() if m.isfile()]
        manifest = json.loads(tar.extractfile("manifest.json").read())
    from triton.runtime.cache import triton_key

    (made,) = manifest["runs"]
    assert manifest["triton_key"] == triton_key() and manifest["sms"] == 132 and made["failures"] == []
    assert {"_gemv_kernel", "_gemm_kernel", "_act_quant_kernel"} <= set(made["launches"])
    # every config that fits, as a GPU's autotuner compiles them (not the first alone): at M = 16 the
    # GEMM's 16-row tiles, for the key split along K for 132 SMs and for its "one split" row
    from bitnet.kernels import gemm

    tiles = [c for c in gemm.SMALL_M_CONFIGS if c.kwargs["BLOCK_M"] <= 16]
    assert len(list(cache.glob("*/_gemm_kernel.cubin"))) == 2 * len(tiles) >= 8
    n = manifest["entries"]
    assert n >= 4 and sum(f.endswith(".cubin") for f in files) == n
    assert all(f.endswith((".json", ".cubin")) for f in files)  # (the IR files left out)
    for grp in (p for p in cache.rglob("__grp__*.json")):  # each group names only what was kept
        paths = [Path(v) for v in json.loads(grp.read_text())["child_paths"].values()]
        assert paths and all(p.exists() and p.parent == grp.parent for p in paths)
    shutil.rmtree(cache)
    cache.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    assert run("--reuse") == (n, 0)
    shutil.rmtree(next(p for p in cache.iterdir() if p.is_dir()))
    assert run("--reuse") == (n - 1, 1)


def test_warm_triton_cache_refuses_another_triton_before_it_touches_the_cache(tmp_path):
    """A cache made by another Triton (or Python) than the GPU machine's would never be found
    there: without --any-version the script says which versions it has and which it needs, and
    leaves the cache folder as it was."""
    cache = tmp_path / "cache"
    (cache / "kept").mkdir(parents=True)
    script = ROOT / "benchmarks" / "warm_triton_cache.py"
    spec = importlib.util.spec_from_file_location("warm_triton_cache", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import triton

    if (sys.version_info[:2], triton.__version__) == (module.GPU_MACHINE["python"], module.GPU_MACHINE["triton"]):
        pytest.skip("this is the GPU machine's Python and Triton: nothing to refuse")
    r = subprocess.run([sys.executable, str(script), "--cache-dir", str(cache), "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"with Triton {triton.__version__}" in r.stderr and "runs Python 3.12 with Triton 3.6.0" in r.stderr
    assert sorted(os.listdir(cache)) == ["kept"] and not (tmp_path / "out").exists()


def test_test_stage_summary_failures_and_fallbacks_are_extracted(tmp_path):
    env = stub_env(tmp_path, TOTAL=8, BUDGET_TESTS=6)
    results = tmp_path / "results"
    r = run_script(str(results), "--stages", "tests", env=env)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^tests\s+FAIL \(rc 1\)\s+\S+\s+\S+\s+1 failed, 2 passed, 3 skipped in 0.50s", r.stdout, re.M), r.stdout
    assert "FAILED tests/test_x.py::test_y - AssertionError: boom" in r.stdout
    summary = (results / "summary.md").read_text()
    assert "Tests: 1 failed, 2 passed, 3 skipped in 0.50s" in summary and "- FAILED tests/test_x.py::test_y" in summary
    # why tests skipped, as pytest -rs grouped them (a module of the suite missing there skips whole)
    assert "Skipped, by reason:\n- SKIPPED [3] tests/test_serve.py:23: needs the serve extra" in summary, summary
    assert re.search(r"Fallbacks logged.*\n```\n\s+2 direct Triton launches do not work here", summary, re.S), summary
    assert sorted(os.listdir(results)) == ["gpu_goals_cuda.md", "logs.tar.gz", "results.tar.gz", "summary.md"]
    goals_args = (tmp_path / "bench_out" / "goals_args").read_text().split()
    assert goals_args[goals_args.index("--junit") + 1].endswith("/logs/tests.xml")  # the tests' verdict goes in


def test_peer_transformers_agrees_on_a_tiny_preset(tmp_path):
    """The peer end to end on the CPU: one random tiny checkpoint, ours and transformers' logits
    within the stated tolerance, the same greedy tokens in bf16 and in float32."""
    peer = bench_module("peer_transformers")
    # (warm, a median of three, and 32 tokens: the tiny model's decode steps take ~0.6 ms here, so
    # that 5 of them were within the noise of a ~2-7 ms generate(1) on a loaded machine, and the peer
    # refuses a generate(n) timed no longer than generate(1): seen once under xdist with torch 2.11)
    args = peer.PeerArgs(preset="tiny", device="cpu", new_tokens=32, prompt_len=12, warmup=1, iters=3,
                         out_dir=str(tmp_path), name="peer_smoke")
    assert peer.main(args) == 0
    res = json.loads((tmp_path / "peer_smoke.json").read_text())
    assert res["environment"]["torch"] == torch.__version__
    assert res["logits_within_tolerance"]
    d, tol = res["diffs"], res["tolerance"]
    assert 0 < d["bf16"]["max"] <= tol["max"] and d["bf16"]["mean"] <= tol["mean"]
    assert d["fp32"]["max"] < 1e-4 * d["fp32"]["ref_max_abs"]  # float32: the same function (no int8 tie at this seed)
    assert res["greedy"]["bf16"]["identical"] and res["greedy"]["fp32"]["identical"]
    assert len(res["greedy"]["bf16"]["ours"]) == 32
    assert set(res["speed"]) == {"transformers", "ours"}  # no compiled run on a CPU by default
    assert all(s["decode_tok_s"] > 0 for s in res["speed"].values())
    md = (tmp_path / "peer_smoke.md").read_text()
    assert "| ours bf16 vs transformers bf16 |" in md and "Within: yes" in md and "| bf16: ours vs transformers | yes |" in md
    # the goals' scorecard reads this file's fields (its preset aside: the goal is 2B-4T's)
    rows = bench_module("gpu_goals").peer_transformers_goals({**res, "args": {**res["args"], "preset": "2b4t"}})
    assert rows[0]["value"] == pytest.approx(res["speed"]["ours"]["decode_tok_s"] / res["speed"]["transformers"]["decode_tok_s"])
    assert rows[1]["status"] == "met" and rows[1]["measured"] == "equal (32 tokens)"


def test_peer_first_difference():
    peer = bench_module("peer_transformers")
    a = torch.tensor([[5, 6, 1, 2, 3]])
    assert peer.first_difference(a, a.clone(), 2) is None
    assert peer.first_difference(a, torch.tensor([[5, 6, 1, 9, 3]]), 2) == 1
    assert peer.first_difference(a, torch.tensor([[5, 6, 1]]), 2) == 1  # one side stopped early


def kernel_bench(monkeypatch, triton_device):
    """bench_kernels with its timers stubbed (GPU time 0.01 ms, eager call 0.02 ms) and a copy
    bandwidth of 1000 GB/s: the kernels run through Triton's interpreter."""
    if triton_device != "cpu":
        pytest.skip("drives the benchmark's CPU measuring code through Triton's interpreter (rerun beside a GPU)")
    bench = bench_module("bench_kernels")
    monkeypatch.setattr(bench, "L2Flusher", lambda device: None)
    monkeypatch.setattr(bench, "measured_hbm_bandwidth", lambda: 1000.0)
    monkeypatch.setattr(bench, "time_cuda", lambda fn, warmup, iters, flush: (fn(), 0.02)[1])
    monkeypatch.setattr(bench, "time_cuda_graph", lambda fn, warmup, iters, flush: (fn(), 0.01)[1])
    return bench


def test_kernel_benchmark_times_m1_formats_at_m1_only_and_saves_shape_by_shape(tmp_path, monkeypatch, triton_device):
    bench = kernel_bench(monkeypatch, triton_device)
    args = bench.BenchArgs(m=[1, 3], shapes=["40x64", "8x32"], formats=["2bit"], m1_formats=["1bit", "2bit"],
                           warmup=1, iters=1)
    seen = []
    result = bench.measure(args, device="cpu", on_shape=lambda partial: seen.append(len(partial["rows"])))
    got = [(r["shape"], r["m"], r["format"]) for r in result["rows"]]
    two = "2bit act_quant + GEMV"  # at M = 1 also the layer as two launches, for the first format
    one = "2bit one split"  # where the GEMM splits K (the interpreter's 4 SMs: K = 64 in two, K = 32 not), also unsplit
    assert got == [("40x64", 1, "bf16"), ("40x64", 1, "2bit"), ("40x64", 1, "1bit"), ("40x64", 1, two), ("40x64", 3, "bf16"),
                   ("40x64", 3, "2bit"), ("40x64", 3, one), ("8x32", 1, "bf16"), ("8x32", 1, "2bit"), ("8x32", 1, "1bit"),
                   ("8x32", 1, two), ("8x32", 3, "bf16"), ("8x32", 3, "2bit")]
    assert seen == [7, 13]
    assert all(r["hbm_share"] > 0 for r in result["rows"])
    assert "| 40x64 | 1 | 1bit |" in bench.report(result)
    assert all(r["ms"] == 0.01 and r["eager_ms"] == 0.02 for r in result["rows"])  # GPU time and eager call, apart


# ----------------------------------------------------------------------------- the goals' scorecard
def test_goals_take_the_kernel_rows_ratios_from_their_times(monkeypatch, triton_device):
    """The kernel benchmark's own rows (its timers stubbed), their GPU times then set by hand: each
    goal's ratio is recomputed from the times and held to its target, the boundary counting as met."""
    bench, goals = kernel_bench(monkeypatch, triton_device), bench_module("gpu_goals")
    args = bench.BenchArgs(m=[1, 3], shapes=["40x64"], formats=["2bit"], m1_formats=["1.6bit", "1bit"], warmup=1, iters=1)
    result = {**bench.measure(args, device="cpu"), "complete": True}
    ms = {(1, "bf16"): 0.05, (1, "2bit"): 0.0125, (1, "1.6bit"): 0.0175, (1, "1bit"): 0.0125, (3, "bf16"): 0.03,
          (3, "2bit"): 0.02}
    for r in result["rows"]:
        r["ms"] = ms.get((r["m"], r["format"]), r["ms"])
        r["speedup"] = 99.0  # a file's own ratio column is not what the goals read
    rows = goals.kernel_goals(result, speedups=[("40x64", 1, 4.0), ("40x64", 3, 2.0), ("8x32", 1, 1.0)],
                              bandwidth=[("40x64", 5e-5)], formats=[("40x64", "1.6bit", 1.3), ("40x64", "1bit", 1.0)])
    got = [(r["goal"].split(": ", 1)[0], r["status"], r["value"]) for r in rows]
    # 40 rows of 64 weights at 2 bits: 10 packed rows of 64 bytes, read in 12.5 us, of 1000 GB/s
    share = 640 / 12.5e-6 / 1e9 / 1000.0
    assert got == [("40x64, M = 1", "met", pytest.approx(4.0)), ("40x64, M = 3", "MISSED", pytest.approx(1.5)),
                   ("8x32, M = 1", "not measured", None), ("40x64, M = 1", "met", pytest.approx(share)),
                   ("40x64, M = 1", "MISSED", pytest.approx(1.4)), ("40x64, M = 1", "met", pytest.approx(1.0))]
    assert rows[2]["note"] == "no row for 8x32 M = 1 bf16, 8x32 M = 1 2bit"
    assert rows[0]["measured"] == "4.00x (12.5 vs 50.0 us)"
    # the M = 1 dispatch's A/B from the same rows: the two launches timed at 0.01 ms (the stub's), the
    # GEMV that quantizes x itself at 0.0125: the other way faster, and the knob named
    # and split-K's at M = 3 (one split at the stub's 0.01 ms against 0.02 set for the split GEMM)
    ab = [d for d in goals.decisions(result, None) if d["source"] == "bench_kernels_cuda"]
    assert [(d["what"].split(":")[0], d["other_over_default"]) for d in ab] == [("40x64, M = 1", pytest.approx(0.8)),
                                                                             ("40x64, M = 3", pytest.approx(0.5))]
    assert ab[0]["verdict"] == "the other way is 25% faster: bitlinear's M = 1 dispatch"
    assert ab[1]["verdict"] == "the other way is 100% faster: BITNET_GEMM_SPLIT_K=1"
    result["complete"] = False  # a stage cut short: what is there counts, what is not says why
    assert goals.kernel_goals(result, speedups=[("8x32", 1, 1.0)], bandwidth=[], formats=[])[0]["note"].endswith(
        "(a run cut short)")
    assert goals.kernel_goals(None, "no bench_kernels_cuda.json")[0]["note"] == "no bench_kernels_cuda.json"


def generate_result(bitnet: dict, bf16: dict, **args) -> dict:
    """A bench_generate JSON of two models, batch 1 and 8 (the fields the goals read)."""
    def rows(model):
        return [{"batch": b, "prefill_long_len": 512, **model[b]} for b in (1, 8)]
    return {"complete": True, "args": {"preset": "2b4t", "compile": True, **args},
            "results": {"bitnet": {"rows": rows(bitnet)}, "bf16": {"rows": rows(bf16)}}}


def test_goals_hold_generate_and_the_transformers_peer_to_their_targets():
    goals = bench_module("gpu_goals")
    ours = {1: {"decode_tok_s": 1400.0, "prefill_long_tok_s": 45000.0, "prefill_long_graph_tok_s": 90000.0},
            8: {"decode_tok_s": 4800.0, "prefill_long_tok_s": 1.0}}
    twin = {1: {"decode_tok_s": 400.0, "prefill_long_tok_s": 50000.0, "prefill_long_graph_tok_s": 60000.0},
            8: {"decode_tok_s": 2000.0, "prefill_long_tok_s": 1.0}}
    rows = goals.generate_goals(generate_result(ours, twin))
    assert [(r["status"], r["value"]) for r in rows] == [("met", pytest.approx(3.5)), ("MISSED", pytest.approx(2.4)),
                                                         ("met", pytest.approx(1.5))]
    assert rows[2]["note"] == "eager: 0.90x"
    # the A/Bs: PDL off slower at batch 1 (the default right), the norms apart faster at batch 8
    run = generate_result(ours, twin)
    run["results"]["bitnet"]["rows"][0]["decode_ms_per_step"] = 2.0
    run["results"]["bitnet"]["rows"][1]["decode_ms_per_step"] = 3.0
    run["results"]["bitnet-norm-apart"] = {"rows": [{"batch": 1, "decode_ms_per_step": 2.0},
                                                    {"batch": 8, "decode_ms_per_step": 2.4}]}
    run["results"]["bitnet-serial"] = {"rows": [{"batch": 1, "decode_ms_per_step": 2.5},
                                                {"batch": 8, "decode_ms_per_step": 3.0}]}
    ab = {d["what"]: d for d in goals.decisions(None, run)}
    assert len(ab) == 3 and all(d["source"] == "generate_cuda" for d in ab.values())
    pdl1, pdl8, norm8 = ab.values()
    assert pdl1["other_over_default"] == pytest.approx(1.25) and pdl1["verdict"] == "the default is faster"
    assert pdl8["verdict"] == "the default is faster"  # (a tie keeps the default)
    assert norm8["verdict"] == "the other way is 25% faster: BITNET_GEMM_NORM_M=0"
    assert [d["verdict"] for d in goals.decisions(None, generate_result(ours, twin))] == [
        "no bitnet-serial in the run", "no bitnet-serial in the run", "no bitnet-norm-apart in the run"]
    # a partial run (rounds only, the latest figure of each model), an eager-only one, another preset
    partial = {"complete": False, "args": {"preset": "2b4t", "compile": True},
               "rounds": [{"bitnet": generate_result(ours, twin)["results"]["bitnet"]}]}
    assert [r["note"] for r in goals.generate_goals(partial)][:2] == ["no bf16 row at batch 1 (a run cut short)",
                                                                      "no bf16 row at batch 8 (a run cut short)"]
    assert goals.generate_goals(generate_result(ours, twin, compile=False))[0]["note"] == (
        "not the goal's conditions: decode timed without CUDA graphs (--compile off)")
    assert {r["status"] for r in goals.generate_goals(generate_result(ours, twin, preset="small"))} == {"not measured"}
    del ours[1]["prefill_long_graph_tok_s"]
    ours[1]["prefill_long_graph_error"] = "RuntimeError: a host sync"
    assert goals.generate_goals(generate_result(ours, twin))[2]["note"] == "packed: RuntimeError: a host sync"

    peer = {"args": {"preset": "2b4t"}, "speed": {"ours": {"decode_tok_s": 30.0}, "transformers": {"decode_tok_s": 40.0}},
            "greedy": {"bf16": {"identical": False, "first_difference": 5, "near_tie": True, "ours": [1] * 32}}}
    rows = goals.peer_transformers_goals(peer)
    assert [(r["status"], r["measured"]) for r in rows] == [("MISSED", "0.75x (30.0 vs 40.0 tok/s)"),
                                                            ("MISSED", "differ (32 tokens)")]
    assert rows[1]["note"] == "first difference at new token 5 (a near-tie)"


def test_goals_read_the_suite_from_pytests_own_junit(tmp_path):
    """A JUnit file written by pytest itself: a pass, a failure, a skip, and the exactness test's
    cases; the suite is red, the exactness goal met, and every case skipped is not a pass."""
    goals = bench_module("gpu_goals")
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "@pytest.mark.skip(reason='no GPU')\n"
        "def test_skipped(): pass\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_cuda_real_shapes_exact_and_equal_to_torch(n): pass\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "@pytest.mark.skip(reason='no GPU')\n"
        "def test_exact_elsewhere(n): pass\n")
    xml = tmp_path / "tests.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "test_fake.py"],
                   cwd=tmp_path, capture_output=True, timeout=120)
    rows = goals.test_goals(str(xml))
    assert [(r["issue"], r["status"], r["measured"]) for r in rows] == [
        (26, "MISSED", "3 passed, 1 failed, 3 skipped"), (26, "met", f"{rows[1]['value']:.0f} s"), (27, "met", "2 of 2 passed")]
    assert goals.test_goals(str(xml), exact_test="test_exact_elsewhere")[2]["note"] == (
        "test_exact_elsewhere: every case skipped (no GPU?)")
    assert goals.test_goals(str(xml), suite_seconds=0)[1]["status"] == "MISSED"
    assert {r["status"] for r in goals.test_goals(None)} == {"not measured"}
    (tmp_path / "broken.xml").write_text("<testsuites")
    assert "unreadable (ParseError" in goals.test_goals(str(tmp_path / "broken.xml"))[0]["note"]


def test_goals_scorecard_names_its_sources_and_saves(tmp_path, capsys):
    goals = bench_module("gpu_goals")
    results = tmp_path / "results"
    results.mkdir()
    stamp = {"device": "NVIDIA H100 80GB HBM3", "commit": "0123456789abcdef", "dirty": False, "date": "2026-12-05"}
    ours = {b: {"decode_tok_s": 1000.0, "prefill_long_tok_s": 1.0, "prefill_long_graph_tok_s": 2.0} for b in (1, 8)}
    twin = {b: {"decode_tok_s": 200.0, "prefill_long_tok_s": 1.0, "prefill_long_graph_tok_s": 1.0} for b in (1, 8)}
    (results / "generate_cuda.json").write_text(json.dumps({"environment": stamp, **generate_result(ours, twin)}))
    (results / "peer_transformers_cuda.json").write_text("{not json")
    assert goals.cli(["--results", str(results), "--out-dir", str(tmp_path / "out")]) == 0
    card = json.loads((tmp_path / "out" / "gpu_goals_cuda.json").read_text())
    assert card["counts"] == {"met": 3, "MISSED": 0, "not measured": len(card["goals"]) - 3}
    assert card["sources"]["generate_cuda"]["device"] == "NVIDIA H100 80GB HBM3"
    assert card["sources"]["bench_kernels_cuda"] == {"absent": "no bench_kernels_cuda.json"}
    assert card["sources"]["peer_transformers_cuda"]["absent"].startswith("peer_transformers_cuda.json unreadable")
    assert set(card["environment"]) == {"date"}  # not this machine's: the figures were taken elsewhere
    md = (tmp_path / "out" / "gpu_goals_cuda.md").read_text()
    assert md.startswith("# Issue 26 / 27 goals against the GPU results: 3 met, 0 missed,")
    assert "- generate_cuda: NVIDIA H100 80GB HBM3, commit 0123456789, 2026-12-05" in md
    assert "| 27 | 2B-4T decode, batch 1: packed over the bf16 twin (CUDA graphs) | >= 3.5x | 5.00x (1000 vs 200 tok/s) | met |" in md
    assert "| 2B-4T decode, batch 8: a batched step's norms inside its GEMMs / norms launched apart |  |  | no " in md
    assert md in capsys.readouterr().out


class FakeDist:
    """importlib.metadata's view of an installed distribution: its version and Requires-Dist."""

    def __init__(self, version: str, requires: list[str]):
        self.version, self.requires = version, requires


FAKE_DISTS = {  # a requirement graph of its own, independent of what this environment installs
    "bitnet-b158": FakeDist("0.1.0", ["a>=1", "b; extra == 'dev'", "c; extra == 'other'", "w; python_version < '3.0'",
                                      "torch>=2", "zz>=1; extra == 'serve'", "q[extra1]; extra == 'serve'"]),
    "a": FakeDist("1.5", ["d"]),
    "b": FakeDist("0.3", ["e>=2"]),
    "c": FakeDist("1", []),
    "d": FakeDist("2", []),
    "e": FakeDist("1.0", []),
    "q": FakeDist("4", ["r; extra == 'extra1'", "s; extra == 'extra2'"]),
    "r": FakeDist("5", []),
    "s": FakeDist("6", []),
    "torch": FakeDist("2.11.0", ["nvidia-x; platform_system == 'Linux'"]),
    "nvidia-x": FakeDist("13", []),
}


def fake_distribution(name):
    from importlib import metadata

    try:
        return FAKE_DISTS[name.lower().replace("_", "-")]
    except KeyError:
        raise metadata.PackageNotFoundError(name) from None


def test_gpu_wheels_reads_the_image_list_from_kinds_md_or_pip(tmp_path):
    gw = bench_module("gpu_wheels")
    kinds = tmp_path / "KINDS.md"
    kinds.write_text("# kinds\n\n## Python packages already there\n\nnvidia-h200: their image holds these. Packages: "
                     "absl-py, Accelerate, typing_extensions, zope.interface, zipp.\n")
    assert gw.image_packages(str(kinds)) == {"absl-py", "accelerate", "typing-extensions", "zope-interface", "zipp"}
    listing = tmp_path / "pip.txt"
    listing.write_text("Package        Version\n-------------- -------\ntorch          2.11.0\nSSE_Starlette  3.7.1\n")
    assert gw.image_packages(str(listing)) == {"torch", "sse-starlette"}
    listing.write_text("fastapi==0.165.0\npydantic_core==2.46.4\n")
    assert gw.image_packages(str(listing)) == {"fastapi", "pydantic-core"}
    assert gw.image_packages(str(tmp_path / "absent.md")) is None and gw.image_packages(None) is None
    # without the image's list it refuses (carrying everything would shadow the image's own versions)
    with pytest.raises(SystemExit) as e:
        gw.main(["--dry-run", "--have", str(tmp_path / "absent.md")])
    assert e.value.code == 2


def test_gpu_wheels_carries_what_the_image_lacks_at_the_versions_installed_here(monkeypatch):
    gw = bench_module("gpu_wheels")
    monkeypatch.setattr(gw.metadata, "distribution", fake_distribution)
    found, unmet = gw.closure()
    # the dev and serve extras' requirements, transitively, with the extras a requirement names (q[extra1]
    # brings r, not s); not another extra's (c) nor one whose marker the GPU machine fails (w)
    # (torch is the image's, its requirements too: nvidia-x is not walked to)
    assert found == {"a": "1.5", "b": "0.3", "d": "2", "e": "1.0", "q": "4", "r": "5", "torch": "2.11.0"}
    assert unmet == ["e 1.0 (wanted e>=2)", "zz (not installed; zz>=1 wanted)"]
    # the image's torch and NVIDIA libraries are never carried; what the image has is not carried either
    assert gw.plan(found, None) == [("a", "1.5"), ("b", "0.3"), ("d", "2"), ("e", "1.0"), ("q", "4"), ("r", "5")]
    assert gw.plan({**found, "nvidia-x": "13", "triton": "3.6.0"}, None) == gw.plan(found, None)
    assert gw.plan(found, {"a", "q", "r"}) == [("b", "0.3"), ("d", "2"), ("e", "1.0")]
    # a package the image holds is not walked: its requirements are the image's own (d goes with a)
    found, _ = gw.closure(have={"a"})
    assert "a" in found and "d" not in found
    assert gw.plan(found, {"a"}) == [("b", "0.3"), ("e", "1.0"), ("q", "4"), ("r", "5")]


def test_gpu_wheels_finds_other_versions_of_what_it_downloads(tmp_path):
    gw = bench_module("gpu_wheels")
    for name in ("pydantic_core-2.40.0-cp312-cp312-manylinux_2_17_x86_64.whl", "pydantic_core-2.46.4-cp312-cp312-"
                 "manylinux_2_17_x86_64.whl", "fastapi-0.165.0-py3-none-any.whl", "gemlite-0.6.0.post2-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    stale = gw.other_versions(tmp_path, [("pydantic-core", "2.46.4"), ("fastapi", "0.165.0")])
    assert [p.name for p in stale] == ["pydantic_core-2.40.0-cp312-cp312-manylinux_2_17_x86_64.whl"]


def test_gpu_wheels_check_names_what_does_not_import_and_what_is_not_met(monkeypatch, capsys):
    gw = bench_module("gpu_wheels")
    monkeypatch.setattr(gw.metadata, "distribution", fake_distribution)
    monkeypatch.setattr(gw, "OPTIONAL_MODULES", ("json", "bitnet_no_such_module", "csv", "bitnet_no_such_package"))
    monkeypatch.setattr(gw, "LOCATED", ("csv", "bitnet_no_such_package"))  # located, not imported
    assert gw.check() == 1
    out = capsys.readouterr().out
    assert "NOT met: e 1.0 (wanted e>=2); zz (not installed; zz>=1 wanted)" in out
    assert "NOT importable, their tests skip: bitnet_no_such_module (ModuleNotFoundError" in out and "json" not in out
    assert "bitnet_no_such_package (ModuleNotFoundError" in out and "csv" not in out
    monkeypatch.setitem(FAKE_DISTS, "e", FakeDist("2.1", []))
    monkeypatch.setitem(FAKE_DISTS, "zz", FakeDist("1", []))
    monkeypatch.setattr(gw, "OPTIONAL_MODULES", ("json",))
    assert gw.check() == 0
    assert capsys.readouterr().out.splitlines() == ["requirements of bitnet-b158[dev,serve]: all met",
                                                    "the suite's optional modules: all import"]

"""benchmarks/bench_generate.py end to end on the CPU at the tiny preset: the timings' table and the
decode step's profile (what the device script's generate stage records per kernel on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from bitnet import BitNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name: str = "bench_generate"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_decode_step_profile_counts_what_one_step_runs(tmp_path):
    """The profile of generate(steps + 1) minus generate(1), per step: a packed model's native decode
    runs one bitnet_cpu::decode_layer a layer and one head (bf16_linear) a step, exactly; the
    twin's float projections are 7 aten::mm a layer plus the head's."""
    layers = BitNetConfig.from_preset("tiny").num_hidden_layers
    assert _bench().main(["--device", "cpu", "--preset", "tiny", "--models", "bitnet", "bf16", "--batch", "1",
                          "--new-tokens", "6", "--prompt-len", "8", "--prefill-len", "16", "--iters", "1",
                          "--warmup", "1", "--rounds", "1", "--no-isolate", "--profile-steps", "3",
                          "--out-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "generate_cpu.json").read_text())
    prof = {k: saved["results"][k]["rows"][0]["profile"] for k in ("bitnet", "bf16")}
    calls = {k: p["calls"] for k, p in prof.items()}  # (every op: the rows are only the costliest few)
    assert calls["bitnet"]["bitnet_cpu::decode_layer"] == layers and calls["bitnet"]["bitnet_cpu::bf16_linear"] == 1
    assert calls["bf16"]["aten::mm"] == 7 * layers + 1
    # (the rows are the costliest by time, which varies; ops seen once a run count a third a step)
    assert all(p["steps"] == 3 and p["busy_us"] > 0 and p["launches"] >= sum(r["calls"] for r in p["rows"])
               for p in prof.values())
    md = (tmp_path / "generate_cpu.md").read_text()
    assert "one decode step by op (self CPU time), from 3 profiled steps" in md and "| bitnet_cpu::decode_layer | 2.0 |" in md
    # the goals' scorecard reads this file's fields (held to the goal's conditions: 2B-4T, CUDA graphs)
    goals = _bench("gpu_goals")
    rows = goals.generate_goals(saved, decode=[(1, 0.0)], prefill=(16, 0.0))
    assert rows[0]["note"] == "not the goal's conditions: preset tiny, not 2b4t"
    rows = goals.generate_goals({**saved, "args": {**saved["args"], "preset": "2b4t", "compile": True}},
                                decode=[(1, 0.0)], prefill=(16, 0.0))
    r = {k: saved["results"][k]["rows"][0] for k in ("bitnet", "bf16")}
    assert rows[0]["value"] == pytest.approx(r["bitnet"]["decode_tok_s"] / r["bf16"]["decode_tok_s"])
    assert rows[1]["note"] == "packed: not recorded; twin: not recorded"  # (no CUDA graph on a CPU)
    # and its A/Bs read the decode step's time (here the twin standing in for the serialized run)
    ab = goals.decisions(None, {**saved, "results": {**saved["results"], "bitnet-serial": saved["results"]["bf16"]}})
    assert ab[0]["other_over_default"] == pytest.approx(r["bf16"]["decode_ms_per_step"] / r["bitnet"]["decode_ms_per_step"])


def test_the_ab_models_measure_with_their_knob_off_and_restore_it(monkeypatch):
    """bitnet-serial, the A/B of programmatic dependent launch: measured with the Triton kernels'
    dependent launches off (as BITNET_PDL=0); bitnet-norm-apart, the A/B of the norm inside the
    batched GEMM: with the norms launched apart (as BITNET_GEMM_NORM_M=0); the process's settings
    restored after each (--no-isolate measures every model in one process); the other models
    measure with the settings as they are."""
    from bitnet.kernels import common, gemm

    bench = _bench()
    seen = []
    monkeypatch.setattr(bench, "_measure",
                        lambda args, key: seen.append((key, common.PDL_ENABLED, gemm.GEMM_NORM_M)) or {})
    monkeypatch.setattr(common, "PDL_ENABLED", True)
    monkeypatch.setattr(gemm, "GEMM_NORM_M", 64)
    for key in ("bitnet", "bitnet-serial", "bitnet-norm-apart", "bitnet"):
        bench.measure(None, key)
    assert seen == [("bitnet", True, 64), ("bitnet-serial", False, 64), ("bitnet-norm-apart", True, 0),
                    ("bitnet", True, 64)] and common.PDL_ENABLED and gemm.GEMM_NORM_M == 64
    assert bench.MODELS["bitnet-serial"].packing == bench.MODELS["bitnet-norm-apart"].packing == "2bit"


def test_the_recorded_prefill_columns_and_their_failures():
    """The GPU's recorded-prefill figures (bench_generate.recorded_prefill, CUDA only) through the
    rounds' medians, the ratios over the faster twin and the tables, from results built here: a
    round where a side has no figure (its recording failed) gives no ratio rather than a wrong one,
    and the table says what failed. On a CPU the option is refused with the reason."""
    import pytest

    bench = _bench()
    args = bench.Args(device="cuda", models=["bitnet", "bf16"], batch=[1], prompt_len=8, new_tokens=4,
                      prefill_len=512, prefill_graph=True, compile=True, rounds=2).resolved()

    def result(key, graph_ms, busy_ms, **extra):
        row = {"model": key, "batch": 1, "prefill_ms": 2.0, "prefill_tok_s": 4e3, "generate_ms": 8.0,
               "decode_ms_per_step": 2.0, "decode_tok_s": 500.0 if key == "bitnet" else 250.0,
               "decode_weight_gb_s": 1.0, "prefill_long_ms": 4.0, "prefill_long_tok_s": 128e3,
               "prefill_long_busy_ms": busy_ms, "peak_memory_bytes": 1 << 20, **extra}
        if graph_ms is not None:
            row.update(prefill_long_graph_ms=graph_ms, prefill_long_graph_tok_s=512 / graph_ms * 1e3)
        return {"model": key, "label": key, "weight_bytes": {"total": 1 << 20, "linear": 1 << 19},
                "peak_rss_over_start_bytes": 0, "rows": [row]}

    rounds = [{"bitnet": result("bitnet", 1.0, 0.9), "bf16": result("bf16", 2.0, 1.9)},
              {"bitnet": result("bitnet", 1.0, 0.9), "bf16": result("bf16", 3.0, 2.9)}]
    merged = bench.merge_rounds(rounds)
    assert merged["bf16"]["rows"][0]["prefill_long_graph_ms"] == 2.5
    md, summary = bench.report(args, merged, rounds)
    ratio = summary["by_batch"][0]
    assert ratio["prefill_long_graph_speedup"] == 2.5 and ratio["prefill_long_graph_speedup_range"] == "2.00-3.00"
    assert "prefill tok/s (512, CUDA graph)" in md and "| 2.50 |" in md
    error = "RuntimeError: operation not permitted when stream is capturing"
    rounds[1]["bf16"] = result("bf16", None, 2.9, prefill_long_graph_error=error)
    merged = bench.merge_rounds(rounds)
    assert merged["bf16"]["rows"][0]["prefill_long_graph_ms"] is None
    md, summary = bench.report(args, merged, rounds)
    assert summary["by_batch"][0]["prefill_long_graph_speedup"] is None
    assert f"**bf16**, batch 1: recording the prefill as a CUDA graph failed: {error}" in md
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--prefill-graph"])

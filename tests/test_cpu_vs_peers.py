"""benchmarks/cpu_vs_peers.py without measuring: its arguments and plan, the tables and ratios built
from recorded samples, the markdown, and (tiny preset only) that our tg protocol is 64 forwards of
one token at positions 0..63 and pp one forward over the prompt. peer_ik_llamacpp.py's --gguf-only."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cvp = _load("cpu_vs_peers")


def m(round_, system, decode, prefill, shape="700m", isa="native", threads=2, **kw):
    return {"round": round_, "shape": shape, "isa": isa, "threads": threads, "system": system,
            "decode_tok_s": decode, "prefill_tok_s": prefill, "other_cpu_s_per_wall_s": 0.01, **kw}


# two rounds of one group, recorded-style numbers (tok/s)
SAMPLES = [
    m(1, "ours", 50.0, 300.0), m(1, "twin", 6.0, 150.0), m(1, "ik-f16", 40.0, 250.0), m(1, "ik-default", 45.0, 240.0),
    m(2, "ik-default", 36.0, 200.0), m(2, "ik-f16", 32.0, 200.0), m(2, "twin", 5.0, 100.0), m(2, "ours", 44.0, 260.0),
    m(1, "ours", 25.0, 150.0, threads=1),  # a group without peers in it: in the table, no ratio row
]


def test_arguments_defaults_and_quick():
    a = cvp.parse_args([])
    assert (a.shapes, a.threads, a.isas, a.rounds, a.systems) == (["700m"], [1, 2], ["native", "avx2"], 2, list(cvp.DEFAULT_SYSTEMS))
    assert a.shape_threads == {"2b4t": [2]} and a.shape_isas == {"2b4t": ["native"]}
    assert (a.reps, a.twin_reps, a.ik_reps, a.prompt, a.gen, a.lock) == (5, 3, 5, 128, 64, "/tmp/bench.lock")
    q = cvp.parse_args(["--quick", "--lock", ""])
    assert (q.rounds, q.reps, q.twin_reps, q.ik_reps, q.lock) == (1, 3, 1, 3, None)
    a = cvp.parse_args(["--shapes", "700m,2b4t", "--threads", "2", "--isas", "native", "--shape-isas", "2b4t=native/avx2",
                        "--systems", "ours,ik-f16"])
    assert a.shapes == ["700m", "2b4t"] and a.shape_isas == {"2b4t": ["native", "avx2"]} and a.systems == ["ours", "ik-f16"]


@pytest.mark.parametrize("bad", [["--threads", "0"], ["--threads", "x"], ["--isas", "sse"], ["--systems", "vllm"],
                                 ["--rounds", "0"], ["--shape-threads", "2b4t"], ["--shape-isas", "2b4t=avx9"],
                                 ["--reps", "0"], ["--warmup", "-1"], ["--shapes", ""], ["--depth", "-1"]])
def test_arguments_refused(bad):
    with pytest.raises(SystemExit):
        cvp.parse_args(bad)


def test_plan_and_round_order():
    a = cvp.parse_args(["--shapes", "700m,2b4t"])
    plan = cvp.cells(a)
    small = [c for c in plan if c["shape"] == "700m"]
    big = [c for c in plan if c["shape"] == "2b4t"]
    # 700m: 2 ISAs x 2 thread counts x (3 ik/ours + the twin at native only); 2b4t: native, 2 threads, 4 systems
    assert len(small) == 2 * 2 * 3 + 2 and len(big) == 4
    assert {(c["isa"], c["threads"]) for c in big} == {("native", 2)}
    assert not any(c["system"] == "twin" and c["isa"] == "avx2" for c in plan)
    # a group's systems back to back
    assert [c["system"] for c in plan[:4]] == list(cvp.DEFAULT_SYSTEMS) and plan[0]["threads"] == 1
    assert cvp.round_order(plan, 0) == plan and cvp.round_order(plan, 1) == plan[::-1]
    # avx2-kernels: ours-only cells, ik measured under "avx2"
    a = cvp.parse_args(["--isas", "avx2-kernels", "--threads", "2", "--twin-isas", "avx2-kernels"])
    assert [c["system"] for c in cvp.cells(a)] == ["ours", "twin"]


def test_summarize_and_ratios_from_samples():
    rows = {(r["threads"], r["system"]): r for r in cvp.summarize(SAMPLES)}
    ours = rows[(2, "ours")]
    assert ours["decode"] == {"median": 47.0, "min": 44.0, "max": 50.0, "per_round": [50.0, 44.0]}
    assert ours["prefill"]["median"] == 280.0 and rows[(1, "ours")]["decode"]["per_round"] == [25.0]
    (r,) = cvp.ratios(SAMPLES)  # the 1-thread group has no second system
    assert (r["shape"], r["isa"], r["threads"]) == ("700m", "native", 2)
    # within each round, then the median over rounds: decode vs ik F16 50/40 = 1.25, 44/32 = 1.375
    assert r["decode_vs_ik_f16"]["per_round"] == [1.25, 1.375]
    assert r["decode_vs_ik_f16"]["median"] == pytest.approx(1.3125)
    assert r["decode_vs_ik_default"]["min"] == pytest.approx(50 / 45) and r["decode_vs_ik_default"]["max"] == pytest.approx(44 / 36)
    assert r["prefill_vs_ik_f16"]["per_round"] == [1.2, 1.3]
    assert r["decode_vs_twin"]["per_round"] == [50 / 6, 44 / 5] and r["prefill_vs_twin"]["per_round"] == [2.0, 2.6]
    # a ratio is only taken where both sides were measured in the same round
    partial = [x for x in SAMPLES if not (x["round"] == 2 and x["system"] == "twin")]
    (r,) = cvp.ratios(partial)
    assert r["decode_vs_twin"]["per_round"] == [50 / 6] and len(r["decode_vs_ik_f16"]["per_round"]) == 2
    assert r["decode_int8_vs_ik_default"] is None  # ours-int8 not measured (not in the default systems)
    (r,) = cvp.ratios(SAMPLES + [m(1, "ours-int8", 54.0, 290.0), m(2, "ours-int8", 45.0, 250.0), m(2, "ours-int4", 40.0, 250.0)])
    assert r["decode_int8_vs_ik_default"]["per_round"] == [54 / 45, 45 / 36]
    assert r["decode_int4_vs_ik_default"]["per_round"] == [40 / 36]


def test_markdown_from_samples():
    env = {"device": "CPU: test", "cpu": "Test CPU", "cpu_flags": ["avx2", "amx_tile"], "cpu_count": 2, "date": "now",
           "commit": "abc"}
    a = vars(cvp.parse_args([]))
    files = {"700m": {"f16": {"types": {"token_embd": "F16", "output": "F16"}, "bytes": 2**20},
                      "default": {"types": {"token_embd": "IQ4_NL", "output": "Q6_K"}, "bytes": 2**20}}}
    samples = SAMPLES + [m(2, "ours", 20.0, 140.0, threads=1, attempts=2, other_cpu_s_per_wall_s=0.5)]
    text = cvp.markdown({"environment": env, "args": a, "measurements": samples, "complete": True, "ik_commit": "8337e4cd3861",
                         "snapshot": {"commit": "abc", "dirty": True, "digest": "f" * 64}, "ik_files": files,
                         "bandwidth": [{"round": 1, "read_gbps": 20.0, "threads": 2}, {"round": 2, "read_gbps": 15.5, "threads": 2}]})
    assert "| 700m | native | 2 | ours: packed 2-bit, bf16 head | 47.0 (44.0-50.0) | 280 (260-300) | 50.0 / 300; 44.0 / 260 |" in text
    assert "ik_llama.cpp IQ2_BN, default head (output Q6_K, token_embd IQ4_NL)" in text
    assert "| 700m | native | 2 | 1.31 (1.25-1.38) |" in text
    assert "round 2: 15.5" in text and "plus uncommitted changes" in text
    assert "1 measurement(s) run again" in text and "1 kept above it" in text
    a["depth"] = 512  # decode after a prompt: llama-bench -gp's test, named as it names it
    deep = cvp.markdown({"environment": env, "args": a, "measurements": samples, "complete": True, "ik_commit": "8337e4cd3861"})
    assert "decode tok/s (tg64@pp512)" in deep and "positions 512..575 after a 512-token prompt" in deep
    assert "llama-bench -gp 512,64" in deep
    # tied heads (2b4t) name the embedding
    assert "tied: token_embd Q6_K" in cvp.system_label("ik-default", {"default": {"types": {"token_embd": "Q6_K", "output": None}}})


def test_peer_gguf_only_arguments():
    peer = _load("peer_ik_llamacpp")
    a = peer.parse_args(["--src", "/x", "--preset", "2b4t", "--gguf-only"])
    assert a.gguf_only and a.preset == "2b4t"
    assert peer.parse_args(["--src", "/x", "--no-bench", "--gguf-only"]).gguf_only
    with pytest.raises(SystemExit):
        peer.parse_args(["--src", "/x", "--gguf-only", "--server"])


def test_tg_and_pp_protocol_on_tiny(monkeypatch):
    """generate(model, 1-token prompt, N) runs N forwards of one token at positions 0..N-1, and
    generate(model, P-token prompt, 1) one forward of P tokens: what the child times as tg / pp."""
    from bitnet import BitNetConfig
    from bitnet.bench import random_model
    from bitnet.generation import generate

    model = random_model(BitNetConfig.from_preset("tiny"), torch.bfloat16, "cpu", packing="2bit")
    calls = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    model.setup_cache(1, 9)
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 8)
    assert out.shape == (1, 9) and len(calls) == 8 and all(c[-2] == 1 for c in calls if len(c) == 3)
    model.clear_cache()
    calls.clear()
    model.setup_cache(1, 17)
    generate(model, torch.zeros(1, 16, dtype=torch.long), 1)
    assert len(calls) == 1  # one forward; the head over the last token only
    # --depth: generate(model, D-token prompt, N + 1) timed from the prompt's token (on_token's first
    # call): N forwards of one token, at positions D..D+N-1, after the clock starts
    model.clear_cache()
    calls.clear()
    model.setup_cache(1, 16 + 4 + 1)
    after = []
    generate(model, torch.zeros(1, 16, dtype=torch.long), 4 + 1, on_token=lambda ids: after.append(len(calls)))
    assert after[0] == 1 and len(calls) - after[0] == 4 and all(c[-2] == 1 for c in calls[1:])
    hook.remove()
    res = cvp.timed_calls(lambda: None, warmup=1, reps=3)
    assert len(res["seconds"]) == 3 and res["other_cpu_s_per_wall_s"] >= 0
    assert cvp.timed_calls(lambda: 0.25, warmup=0, reps=2, part=True)["seconds"] == [0.25, 0.25]  # the part fn timed
    assert cvp.timed_calls(lambda: torch.zeros(3), warmup=0, reps=1)["seconds"][0] < 0.25  # a result is not a time

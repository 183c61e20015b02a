"""benchmarks/peer_ik_llamacpp.py without ik_llama.cpp: its arguments, its CMake flags, its reading of
llama-bench's JSON (a recorded sample) and llama-quantize's log, and the GGUF it writes (tiny shape)
read back with the `gguf` package. Nothing is built or run."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("peer_ik_llamacpp", os.path.join(ROOT, "benchmarks", "peer_ik_llamacpp.py"))
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

# Recorded from `llama-bench -m ...IQ2_BN-head_f16.gguf -t 2 -p 128 -n 64 -r 5 -o json` (ik_llama.cpp
# 8337e4cd3861, native build, this repository's random 700m model), some fields left out.
BENCH_SAMPLE = """[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "model_filename": "/root/.cache/bitnet-peers/ik-gguf-700m-seed0/bitnet-700m-bitnet-b1.58-IQ2_BN-head_f16.gguf",
    "model_type": "?B IQ2_BN - 2.00 bpw Bitnet",
    "model_size": 378634240,
    "model_n_params": 728895488,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "flash_attn": true,
    "repack": false,
    "n_prompt": 128,
    "n_gen": 0,
    "test_time": "2026-08-15T18:20:00Z",
    "avg_ns": 512000000,
    "stddev_ns": 3000000,
    "avg_ts": 250.0,
    "stddev_ts": 1.5,
    "test": "pp128",
    "samples_ns": [ 510000000, 514000000 ],
    "samples_ts": [ 250.98, 249.02 ]
  },
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "model_type": "?B IQ2_BN - 2.00 bpw Bitnet",
    "model_size": 378634240,
    "model_n_params": 728895488,
    "n_threads": 2,
    "n_prompt": 0,
    "n_gen": 64,
    "avg_ns": 1600000000,
    "stddev_ns": 10000000,
    "avg_ts": 40.0,
    "stddev_ts": 0.25,
    "test": "tg64",
    "samples_ns": [ 1590000000, 1610000000 ],
    "samples_ts": [ 40.25, 39.75 ]
  }
]
"""

QUANTIZE_SAMPLE = """\
[   1/ 219]                    token_embd.weight - [ 1536, 32000,     1,     1], type =    f16, converting to iq4_nl .. size =    93.75 MiB ->    26.37 MiB
[   2/ 219]               blk.0.attn_norm.weight - [ 1536,     1,     1,     1], type =    f32, size =    0.006 MB
[   5/ 219]                  blk.0.attn_q.weight - [ 1536,  1536,     1,     1], type =    f16, converting to iq2_bn .. size =     4.50 MiB ->     0.56 MiB
[ 219/ 219]                        output.weight - [ 1536, 32000,     1,     1], type =    f16, size =   93.750 MB
"""


def test_arguments():
    a = peer.parse_args(["--src", "/x"])
    assert (a.threads, a.reps, a.prompt, a.gen, a.isa, a.heads) == ([1, 2], 5, 128, 64, "native", ["f16", "default"])
    assert a.clients == [1, 4, 16] and a.lock is None and not a.server
    a = peer.parse_args(["--src", "/x", "--threads", "2", "--isa", "avx2", "--heads", "default", "--lock", "/tmp/l"])
    assert (a.threads, a.isa, a.heads, a.lock) == ([2], "avx2", ["default"], "/tmp/l")
    for bad in (["--threads", "0"], ["--threads", "a"], ["--heads", "q8"], ["--isa", "sse"], ["--reps", "0"],
                ["--no-bench"], ["--server", "--server-ctx", "512"]):
        with pytest.raises(SystemExit):
            peer.parse_args(["--src", "/x", *bad])
    with pytest.raises(SystemExit):
        peer.parse_args([])  # --src is required


def test_cmake_flags_and_commands():
    native, avx2 = peer.cmake_args("native"), peer.cmake_args("avx2")
    assert "-DGGML_NATIVE=ON" in native and "-DCMAKE_BUILD_TYPE=Release" in native
    assert "-DGGML_NATIVE=OFF" in avx2 and "-DGGML_AVX2=ON" in avx2
    assert all(f"-D{o}=OFF" in avx2 for o in ("GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVXVNNI"))
    assert peer.build_targets(False) == ["llama-bench", "llama-quantize"]
    assert peer.build_targets(True)[-1] == "llama-server"
    assert peer.default_build_dir("8337e4cd3861406fc04e", "avx2").endswith(os.path.join("ik_llama.cpp-8337e4cd3861", "avx2"))
    a = peer.parse_args(["--src", "/x", "--lock", "/tmp/bench.lock", "--reps", "3"])
    cmd = peer.bench_command("/b", "/m.gguf", 2, a)
    assert cmd == ["/b/llama-bench", "-m", "/m.gguf", "-t", "2", "-p", "128", "-n", "64", "-r", "3", "-o", "json"]
    a.depth = 512  # cpu_vs_peers --depth: the generation after a prompt (-gp), not from an empty cache
    assert peer.bench_command("/b", "/m.gguf", 2, a)[7:11] == ["-n", "0", "-gp", "512,64"]
    assert a.lock == "/tmp/bench.lock" and a.max_other == 0.1 and a.retries == 3
    assert peer.source_commit("/nowhere", "abc") == "abc"


def test_parse_bench_json():
    r = peer.parse_bench_json(BENCH_SAMPLE)
    assert (r["prefill_tokens"], r["prefill_tok_s"], r["prefill_tok_s_stddev"]) == (128, 250.0, 1.5)
    assert (r["decode_tokens"], r["decode_tok_s"], r["decode_tok_s_stddev"]) == (64, 40.0, 0.25)
    assert r["n_threads"] == 2 and r["model_size"] == 378634240 and r["flash_attn"] is True
    assert r["decode_samples_tok_s"] == [40.25, 39.75]
    with pytest.raises(ValueError):
        peer.parse_bench_json("[]")
    import json
    tests = json.loads(BENCH_SAMPLE)
    gp = dict(tests[1], n_prompt=512, test="tg64@pp512")  # -gp 512,64: the generation timed alone
    r = peer.parse_bench_json(json.dumps([tests[0], gp]))
    assert (r["decode_tokens"], r["decode_depth"], r["decode_tok_s"]) == (64, 512, 40.0) and r["prefill_tokens"] == 128
    pg = dict(tests[1], n_prompt=512, test="pp512+tg64")  # -pg: prompt and generation timed together: neither
    assert "decode_tokens" not in peer.parse_bench_json(json.dumps([tests[0], pg]))


def test_quantize_log():
    types = peer.quantized_types(QUANTIZE_SAMPLE)
    assert types == {"token_embd.weight": "IQ4_NL", "blk.0.attn_norm.weight": "F32", "blk.0.attn_q.weight": "IQ2_BN",
                     "output.weight": "F16"}
    s = peer.type_summary(types)
    assert (s["token_embd"], s["output"], s["projections"], s["norms"]) == ("IQ4_NL", "F16", ["IQ2_BN"], ["F32"])


def test_lock_is_flock(tmp_path):
    import fcntl

    lock = str(tmp_path / "bench.lock")
    with peer.Lock(lock):
        with open(lock) as other:  # a second open file description: flock(2) conflicts with the held lock
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    with peer.Lock(None):
        pass


def test_merge_rows():
    old = [{"isa": "native", "threads": 1}, {"isa": "avx2", "threads": 1}]
    new = [{"isa": "avx2", "threads": 2}]
    assert peer.merge_rows(old, new, "avx2") == [{"isa": "native", "threads": 1}, {"isa": "avx2", "threads": 2}]


def test_tokenizer_words_are_single_tokens():
    from tokenizers import Tokenizer

    assert [peer.word(n) for n in (1, 26, 27, 52, 703)] == ["a", "z", "aa", "az", "aaa"]
    tok = Tokenizer.from_str(peer.ik_tokenizer_json(600).decode())
    assert tok.get_vocab_size() == 600
    ids = [0, 7, 340, 339]
    text = peer.prompt_text(ids, 600)
    enc = tok.encode(text).ids
    assert enc == [131 + i % (600 - 131) for i in ids]  # one token a word, no BOS
    assert tok.decode(enc) == text
    # every token is ASCII text: a random model's greedy output is valid UTF-8, whatever it picks
    pieces = [bytes(tok.decode([i]), "utf-8") if tok.decode([i]) else b"" for i in range(3, 600)]
    assert all(p.isascii() for p in pieces) and sum(len(p) == 1 for p in pieces) == 128


def test_gguf_for_ik(tmp_path):
    from bitnet import BitNetConfig
    from bitnet.bench import random_model

    config = BitNetConfig.from_preset("tiny", tie_word_embeddings=False, hidden_size=128, intermediate_size=256)
    model = random_model(config, torch.bfloat16, "cpu", 0)
    model.tokenizer_files["tokenizer.json"] = peer.ik_tokenizer_json(config.vocab_size)
    path = str(tmp_path / "m.gguf")
    info = peer.write_ik_gguf(model, path)
    assert info["architecture"] == "bitnet-b1.58" and info["bytes"] == os.path.getsize(path)
    assert not [p for p in os.listdir(tmp_path) if p != "m.gguf"]  # nothing else left behind

    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "bitnet-b1.58"
    assert not [k for k in r.fields if k.startswith("bitnet.")]
    assert r.fields["bitnet-b1.58.block_count"].contents() == config.num_hidden_layers
    assert r.fields["bitnet-b1.58.feed_forward_length"].contents() == config.intermediate_size
    assert r.fields["bitnet-b1.58.rope.dimension_count"].contents() == config.dim_head
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == config.vocab_size
    assert set(r.fields["tokenizer.ggml.token_type"].contents()) == {1, 3}  # normal words, control specials

    tensors = {t.name: t for t in r.tensors}
    per_layer = ["attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm", "attn_q", "attn_k", "attn_v",
                 "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(config.num_hidden_layers) for n in per_layer}
    assert set(tensors) == expected  # no .scale tensors: ik's bitnet-b1.58 loader takes none
    for name, t in tensors.items():
        want = gguf.GGMLQuantizationType.F32 if name.endswith("norm.weight") else gguf.GGMLQuantizationType.F16
        assert t.tensor_type == want, name

    # the values: our ternary codes times fp16(scale), our head, our embeddings
    sd = model.state_dict()
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data),
                                  sd["lm_head.weight"].float().numpy().astype(np.float16))
    np.testing.assert_array_equal(np.asarray(tensors["token_embd.weight"].data),
                                  sd["model.embed_tokens.weight"].float().numpy().astype(np.float16))
    layer = model.model.layers[1].mlp.down_proj
    q, s = layer.quantized_weight()
    want = (q.float() * s.float().half().float()).numpy().astype(np.float16)
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data), want)
    assert set(np.unique(np.abs(want.astype(np.float32)))) <= {0.0, float(np.float16(s.item()))}


def test_compile_arch_flags(tmp_path):
    (tmp_path / "build.ninja").write_text(
        "  FLAGS = -O3 -DNDEBUG -std=gnu++17 -mf16c -mfma -mavx -mavx2 -fopenmp -Wall\n"
        "  FLAGS = -O3 -march=native -fopenmp -Wmissing-declarations\n")
    assert peer.compile_arch_flags(str(tmp_path)) == ["-march=native", "-mavx", "-mavx2", "-mf16c", "-mfma"]
    assert peer.count_zmm(str(tmp_path / "missing")) is None

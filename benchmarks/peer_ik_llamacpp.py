"""The ik_llama.cpp peer: its llama-bench (and, with --server, its llama-server) on the same random
700m-shape ternary model that our benchmarks use, on this CPU.

    python benchmarks/peer_ik_llamacpp.py --src PATH/ik_llama.cpp [--isa native|avx2] [--threads 1,2]
        [--reps 5] [--lock /tmp/bench.lock] [--server] [--chat]
    python benchmarks/peer_ik_llamacpp.py --src PATH --preset 2b4t --gguf-only   # the files only (cpu_vs_peers.py)

Nothing is downloaded and no binary is committed: --src is a source checkout of ik_llama.cpp
(https://github.com/ikawrakow/ik_llama.cpp; its commit is read with git, or given with --commit when
the tree is an export without .git).

1. Build: CMake (Ninja if there), Release, into --build-dir (default
   ~/.cache/bitnet-peers/ik_llama.cpp-<commit[:12]>/<isa>), only the targets llama-bench and
   llama-quantize (and llama-server with --server or --chat); an existing build is reused (configured again
   only when its flags differ). --isa native: -DGGML_NATIVE=ON (-march=native: AVX-512, VNNI, BF16
   here); --isa avx2: -DGGML_NATIVE=OFF with AVX, AVX2, FMA, F16C on and every AVX-512 option and
   AVX-VNNI off (-mavx -mavx2 -mfma -mf16c), for rows beside our AVX2-capped ones. Both with
   GGML_IQK_FA_ALL_QUANTS=OFF (ik's flash-attention kernels for quantized KV caches only; the cache
   here is f16, whose kernels are built either way) to halve the compile, and without tests/curl.
   The commit, the compiler and the flags go into the results.
2. The model: `bitnet.bench.random_model(BitNetConfig.from_preset("700m"), torch.bfloat16, "cpu",
   seed=0)`, the weights of bench_generate / bench_serve, written by our exporter
   (`bitnet.gguf_export.export_gguf(..., gguf_type="f16", scale="fold")`: every projection as F16
   values W_q * fp16(mean|W|), embeddings and head F16, norms F32) and quantized by ik's
   llama-quantize to IQ2_BN twice: head and embedding kept F16 (--token-embedding-type f16
   --output-tensor-type f16), and with ik's defaults for IQ2_BN (head Q6_K, embedding IQ4_NL).
   IQ2_BN keeps one float scale per row and codes |x| > max/2 as +-1: each row of W_q * s comes
   back exactly.
   The architecture: the 700m preset is model_type "bitnet" (the 2B-4T block: relu^2 MLP, sub-norms
   before o_proj and down_proj, NeoX RoPE) with an untied head. llama.cpp's (and ik's) "bitnet"
   graph is the older 1bitLLM one (SiLU gate, the head read from token_embd); ik's "bitnet-b1.58"
   architecture (LLM_ARCH_BITNET_B158, the graph of microsoft/bitnet-b1.58-2B-4T) is this block
   exactly: relu^2 gate (LLM_FFN_RELU_SQR, parallel), attn_sub_norm before wo, ffn_sub_norm before
   ffn_down, NeoX RoPE, and an optional output.weight. The exporter writes it so
   (`architecture="bitnet-b1.58"`; until 2026-12-07 this script renamed an export of architecture
   "bitnet" by hand, the same tensors and keys). With scale="fold" there are no .scale tensors (ik's
   bitnet-b1.58 loader would count them as unexpected). (`bitnet convert --to gguf --gguf-type
   iq2_bn` writes IQ2_BN itself, the same codes as ik's llama-quantize makes here: tests/test_gguf.py.)
   The tokenizer: a byte-level BPE of the
   model's 32000 ids (3 specials, the byte symbols of ASCII, then words " a", " b", ..., " aa", ...
   each one token, merges included), so that every id is a normal token with text and any output
   is valid UTF-8.
3. llama-bench -m FILE -t T -p 128 -n 64 -r REPS -o json, per file and thread count (ik's defaults
   otherwise: flash attention on, f16 KV cache, batch 2048/ubatch 512, no run-time repacking), each
   run holding flock(2) on --lock when given (the lock `flock /tmp/bench.lock CMD` takes, so that no
   other timing shares the cores), started once the machine has been idle for 3 s (other processes
   under --max-other cores), and run again (up to --retries times) when other processes took more
   than --max-other cores while it ran (from /proc/stat less llama-bench's own CPU time); the row
   keeps the least disturbed run and says how many there were. Prefill (pp128) and decode (tg64)
   tok/s: llama-bench's mean over REPS after its warm-up, with its stddev.
   Results: benchmarks/results/peer_ik_llamacpp_cpu.{json,md}; a run with another --isa keeps the
   other ISA's rows (the table holds both).
   --gguf-only stops after steps 1-2 and prints the build's and the files' facts as JSON (no timing,
   no results file): benchmarks/cpu_vs_peers.py makes its files so, e.g. for --preset 2b4t (tied head:
   no output.weight, ik reads the head from token_embd, F16 or, by ik's default, Q6_K; F16 file 4.8 GB).
4. --server: ik's llama-server -m FILE -t 2 -np 16 -cb -c 2048 (128 positions a slot, as our server's
   --max-seq-len 128) on 127.0.0.1, measured with bench_serve.py's protocol (its summarize() and
   percentile(), loaded by path): 1, 4 and 16 concurrent streaming clients (one AsyncOpenAI each),
   4 requests per client back to back, prompt 16 tokens (16 words of the vocabulary above, exactly 16
   tokens, no BOS), 32 tokens per request, greedy, ignore_eos (no request ends early, as bench_serve's
   model has no EOS); two untimed requests first; the whole run holds --lock, each level starts on an
   idle machine and records the CPU that other processes took meanwhile. Results: benchmarks/results/peer_ik_llamacpp_serve_cpu.{json,md}.
5. --chat: ik's llama-server -np 4 (-c: 1024 positions a slot) under bench_prefix_cache.py's
   multi-turn workload (4 chats at once, 4 turns, a shared 256-token system prompt, 64-token
   messages, 32-token greedy replies, ignore_eos, each turn resending the conversation), each
   request with cache_prompt true (its default: a slot keeps its last prompt and reply, a request
   takes the free slot whose cache shares the most with it and prefills after the common part; a
   RAM cache of earlier prompts besides) or false, --chat-rounds rounds alternating; prompt tokens
   run counted by the server (timings.prompt_n). Results: benchmarks/results/peer_ik_llamacpp_prefix_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from bitnet.gguf_export import IK_ARCH  # ik's architecture of the 2B-4T block

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "bitnet-peers")
HEADS = {  # head type label -> llama-quantize arguments
    "f16": ["--token-embedding-type", "f16", "--output-tensor-type", "f16"],
    "default": [],
}
COMMON_CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_IQK_FA_ALL_QUANTS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_CURL=OFF", "-DGGML_CCACHE=OFF", "-DBUILD_SHARED_LIBS=OFF"]
ISA_CMAKE = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_AVXVNNI=OFF", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF",
             "-DGGML_AVX512_BF16=OFF"],
}
ISA_LABEL = {"native": "native (-march=native)", "avx2": "AVX2 build (-mavx2 -mfma -mf16c, no AVX-512)"}


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="See the module docstring for the protocol.")
    ap.add_argument("--src", required=True, help="ik_llama.cpp source checkout")
    ap.add_argument("--commit", help="its commit, where --src is not a git checkout")
    ap.add_argument("--isa", choices=sorted(ISA_CMAKE), default="native")
    ap.add_argument("--build-dir", help="default: ~/.cache/bitnet-peers/ik_llama.cpp-<commit>/<isa>")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    ap.add_argument("--nice", type=int, default=19, help="niceness of the compile and the quantization")
    ap.add_argument("--preset", default="700m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where the GGUF files go (default: ~/.cache/bitnet-peers/ik-gguf-<preset>-seed<seed>)")
    ap.add_argument("--force-gguf", action="store_true", help="write the GGUF files again even if they exist")
    ap.add_argument("--heads", default="f16,default", help=f"head types, of {','.join(HEADS)}")
    ap.add_argument("--threads", default="1,2", help="llama-bench thread counts")
    ap.add_argument("--reps", type=int, default=5, help="llama-bench -r")
    ap.add_argument("--prompt", type=int, default=128, help="llama-bench -p")
    ap.add_argument("--gen", type=int, default=64, help="llama-bench -n")
    ap.add_argument("--lock", help="hold flock(2) on this file (e.g. /tmp/bench.lock) during every timing")
    ap.add_argument("--max-other", type=float, default=0.1,
                    help="cores other processes may use while llama-bench runs; more: run it again")
    ap.add_argument("--retries", type=int, default=3, help="reruns of a llama-bench disturbed by other processes")
    ap.add_argument("--no-bench", action="store_true", help="skip llama-bench (e.g. with --server)")
    ap.add_argument("--gguf-only", action="store_true",
                    help="build and write the GGUF files (F16, then IQ2_BN per --heads), print their facts as JSON on "
                         "stdout, measure nothing and write no results file (e.g. --preset 2b4t for cpu_vs_peers.py)")
    ap.add_argument("--server", action="store_true", help="also build and load-test llama-server")
    ap.add_argument("--chat", action="store_true",
                    help="also run bench_prefix_cache.py's multi-turn chats against llama-server, its prompt cache "
                         "(cache_prompt, its default) on and off (results: --chat-name)")
    ap.add_argument("--chat-rounds", type=int, default=2, help="--chat: rounds, each both settings, order alternating")
    ap.add_argument("--chat-name", default="peer_ik_llamacpp_prefix_cpu")
    ap.add_argument("--server-threads", type=int, default=2)
    ap.add_argument("--server-slots", type=int, default=16, help="llama-server -np")
    ap.add_argument("--server-ctx", type=int, default=2048, help="llama-server -c (all slots together)")
    ap.add_argument("--server-head", default="f16", choices=sorted(HEADS), help="which file llama-server serves")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds per level at most")
    ap.add_argument("--name", default="peer_ik_llamacpp_cpu")
    ap.add_argument("--serve-name", default="peer_ik_llamacpp_serve_cpu")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    args.threads = int_list(ap, args.threads, "--threads")
    args.clients = int_list(ap, args.clients, "--clients")
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    bad = [h for h in args.heads if h not in HEADS]
    if bad or not args.heads:
        ap.error(f"--heads: unknown {bad or 'empty'}; choose from {','.join(HEADS)}")
    for name in ("reps", "prompt", "gen", "jobs", "server_threads", "server_slots", "requests_per_client",
                 "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    per_slot = args.server_ctx // args.server_slots
    if args.server and per_slot < args.prompt_len + args.max_tokens + 1:
        ap.error(f"--server-ctx {args.server_ctx} / --server-slots {args.server_slots} = {per_slot} positions a "
                 f"slot, fewer than the prompt + tokens ({args.prompt_len + args.max_tokens})")
    if args.no_bench and not args.server and not args.chat and not args.gguf_only:
        ap.error("--no-bench without --server or --chat leaves nothing to do")
    if args.chat_rounds < 1:
        ap.error("--chat-rounds must be at least 1")
    if args.gguf_only and args.server:
        ap.error("--gguf-only measures nothing: not with --server")
    return args


def int_list(ap: argparse.ArgumentParser, text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{what}: a comma-separated list of integers, got {text!r}")
    if not values or min(values) < 1:
        ap.error(f"{what}: positive integers, got {text!r}")
    return values


# ----------------------------------------------------------------------------- the build
def source_commit(src: str, given: str | None = None) -> str:
    if given:
        return given
    r = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip()
    raise SystemExit(f"{src} is not a git checkout: give its commit with --commit")


def cmake_args(isa: str) -> list[str]:
    return COMMON_CMAKE + ISA_CMAKE[isa]


def build_targets(server: bool) -> list[str]:
    return ["llama-bench", "llama-quantize"] + (["llama-server"] if server else [])


def default_build_dir(commit: str, isa: str) -> str:
    return os.path.join(DEFAULT_CACHE, f"ik_llama.cpp-{commit[:12]}", isa)


def build(args: argparse.Namespace, commit: str) -> dict:
    """Configure (unless an existing build has the same flags) and build the targets; returns facts."""
    bdir = args.build_dir or default_build_dir(commit, args.isa)
    os.makedirs(bdir, exist_ok=True)
    flags = cmake_args(args.isa)
    stamp = os.path.join(bdir, "bitnet-peer-flags.json")
    want = {"src": os.path.abspath(args.src), "commit": commit, "cmake_args": flags}
    nice = ["nice", "-n", str(args.nice)] if shutil.which("nice") else []
    have = None
    if os.path.exists(stamp) and os.path.exists(os.path.join(bdir, "CMakeCache.txt")):
        with open(stamp) as f:
            have = json.load(f)
    if have != want:
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        cmd = nice + ["cmake", "-S", args.src, "-B", bdir, *gen, *flags]
        print("configure:", " ".join(cmd), file=sys.stderr, flush=True)
        run_logged(cmd, os.path.join(bdir, "configure.log"))
        with open(stamp, "w") as f:
            json.dump(want, f, indent=1)
    t0 = time.time()
    cmd = nice + ["cmake", "--build", bdir, "--target", *build_targets(args.server or args.chat), "-j", str(args.jobs)]
    print("build:", " ".join(cmd), file=sys.stderr, flush=True)
    run_logged(cmd, os.path.join(bdir, "build.log"))
    cache = read_cmake_cache(os.path.join(bdir, "CMakeCache.txt"))
    cxx = cache.get("CMAKE_CXX_COMPILER", "c++")
    return {"isa": args.isa, "build_dir": bdir, "commit": commit, "cmake_args": flags,
            "arch_flags": " ".join(compile_arch_flags(bdir)),
            "march_native": march_native(cxx) if args.isa == "native" else None,
            "zmm_instructions_in_llama_bench": count_zmm(os.path.join(bdir, "bin", "llama-bench")),
            "compiler": first_line([cxx, "--version"]), "compiler_path": cxx,
            "cxx_flags_release": cache.get("CMAKE_CXX_FLAGS_RELEASE"),
            "generator": cache.get("CMAKE_GENERATOR"), "build_s": round(time.time() - t0, 1),
            "bin": os.path.join(bdir, "bin")}


def run_logged(cmd: list[str], log_path: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    with open(log_path, "w") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout + r.stderr


ARCH_FLAG = re.compile(r"(?<!\S)(-march=\S+|-mtune=\S+|-m(?:avx|fma|f16c|bmi|sse|amx)\S*)")


def compile_arch_flags(bdir: str) -> list[str]:
    """The -march / -m<isa> flags the build's compile commands carry (build.ninja, or the Makefiles' flags.make)."""
    texts = []
    if os.path.exists(os.path.join(bdir, "build.ninja")):
        texts.append(open(os.path.join(bdir, "build.ninja")).read())
    else:
        for dirpath, _, files in os.walk(bdir):
            if "flags.make" in files:
                texts.append(open(os.path.join(dirpath, "flags.make")).read())
    return sorted({m.group(1) for t in texts for m in ARCH_FLAG.finditer(t)})


def count_zmm(binary: str) -> int | None:
    """Instructions on 512-bit registers in a binary (objdump), to show what an AVX2 build holds."""
    if not shutil.which("objdump") or not os.path.exists(binary):
        return None
    r = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True)
    return sum("%zmm" in line for line in r.stdout.splitlines()) if r.returncode == 0 else None


def read_cmake_cache(path: str) -> dict[str, str]:
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                m = re.match(r"([A-Za-z0-9_]+):[A-Z]+=(.*)", line.rstrip("\n"))
                if m:
                    out[m.group(1)] = m.group(2)
    return out


def first_line(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def march_native(cxx: str) -> str | None:
    """What -march=native means to this compiler on this CPU (gcc: -Q --help=target)."""
    try:
        r = subprocess.run([cxx, "-march=native", "-Q", "--help=target"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^\s*-march=\s*(\S+)", r.stdout, re.M)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- the GGUF
def word(n: int) -> str:
    """Bijective base 26: 1 -> a, 26 -> z, 27 -> aa, ...; every prefix of word(n) is word(m) for some m < n."""
    s = ""
    while n > 0:
        n -= 1
        s = chr(ord("a") + n % 26) + s
        n //= 26
    return s


def ascii_byte_symbols() -> list[str]:
    """Byte-level BPE's symbols of the bytes 0..127 (GPT-2's bytes_to_unicode: printable bytes
    stand for themselves, the others for chr(256 + i) in order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    symbol, n = {}, 0
    for b in range(256):
        if b in printable:
            symbol[b] = chr(b)
        else:
            symbol[b], n = chr(256 + n), n + 1
    return [symbol[b] for b in range(128)]


ALPHABET = 128  # byte symbols in the peer's vocabulary: ASCII only


def ik_tokenizer_json(vocab_size: int) -> bytes:
    """tokenizer.json of a byte-level BPE over exactly vocab_size ids: <unk>, <s>, </s>, the byte
    symbols of ASCII, then the words " a", " b", ..., " aa", ... (one token each: the merges build
    every word from its prefix), so that every id is a normal token with text. ASCII only: a random
    model's greedy output is then always valid UTF-8 (with all 256 byte symbols a lone byte from 0x80
    up came out, and llama-server answered 500 `invalid UTF-8 byte` or dropped the stream)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    alphabet = ascii_byte_symbols()
    if vocab_size <= len(specials) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for words")
    space = "\u0120"  # the byte-level symbol of " "
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    merges = []
    n = 0
    while len(vocab) < vocab_size:
        n += 1
        w = word(n)
        left = space + w[:-1] if len(w) > 1 else space
        merges.append((left, w[-1]))
        vocab[space + w] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str().encode()


def prompt_text(ids: list[int], vocab_size: int) -> str:
    """Text whose tokens (by ik_tokenizer_json's tokenizer) are the word tokens with these indices
    (taken modulo the number of words)."""
    n_words = vocab_size - 3 - ALPHABET
    return "".join(" " + word(1 + i % n_words) for i in ids)


def make_model(preset: str, seed: int):
    import torch

    from bitnet import BitNetConfig
    from bitnet.bench import random_model

    config = BitNetConfig.from_preset(preset)
    model = random_model(config, torch.bfloat16, "cpu", seed)
    model.tokenizer_files["tokenizer.json"] = ik_tokenizer_json(config.vocab_size)
    return model


def write_ik_gguf(model, path: str, name: str | None = None) -> dict:
    """Our exporter's F16 GGUF of `model` for ik's architecture "bitnet-b1.58" (scales folded, the
    model's own output.weight when its head is untied; see the module docstring, step 2)."""
    from bitnet.gguf_export import export_gguf

    c = model.config
    if c.model_type != "bitnet":
        raise ValueError(f"model_type {c.model_type!r}: this peer writes the bitnet (2B-4T) block only")
    report = export_gguf(model, path, gguf_type="f16", scale="fold", float_type="f16", architecture=IK_ARCH,
                         name=name or f"bitnet-random-{c.num_hidden_layers}x{c.hidden_size}")
    return {"path": path, "bytes": os.path.getsize(path), "exporter": report.summary().splitlines()[0].split(": ", 1)[1],
            "architecture": IK_ARCH, "head": "untied (output.weight F16)" if not c.tie_word_embeddings else "tied"}


QUANT_LINE = re.compile(r"\]\s+([\w.]+)\s+-\s+\[[^\]]*\],\s+type =\s+(\w+),\s+(?:converting to (\w+)|size)")


def quantized_types(log: str) -> dict[str, str]:
    """tensor name -> type after llama-quantize, from its log ("converting to X", or the type kept)."""
    out = {}
    for m in QUANT_LINE.finditer(log):
        out[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return out


def type_summary(types: dict[str, str]) -> dict:
    proj = sorted({t for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")})
    return {"token_embd": types.get("token_embd.weight"), "output": types.get("output.weight"), "projections": proj,
            "norms": sorted({t for n, t in types.items() if n.endswith("norm.weight")})}


def quantize(bin_dir: str, src: str, dst: str, head: str, nice: int, threads: int) -> dict:
    cmd = ["nice", "-n", str(nice), os.path.join(bin_dir, "llama-quantize"), *HEADS[head], src, dst, "IQ2_BN",
           str(threads)]
    print("quantize:", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    with open(dst + ".quantize.log", "w") as f:
        f.write(log)
    if r.returncode:
        raise SystemExit(f"llama-quantize failed ({r.returncode}):\n{log[-3000:]}")
    types = quantized_types(log)
    return {"path": dst, "bytes": os.path.getsize(dst), "command": " ".join(cmd[3:]), "types": type_summary(types)}


# ----------------------------------------------------------------------------- llama-bench
def bench_command(bin_dir: str, model: str, threads: int, args: argparse.Namespace) -> list[str]:
    """llama-bench's pp and tg tests; with args.depth > 0 the tg test after a prompt of that many
    tokens (-gp DEPTH,GEN: only the generation is timed) instead of from an empty cache."""
    depth = getattr(args, "depth", 0)
    gen = ["-n", "0", "-gp", f"{depth},{args.gen}"] if depth else ["-n", str(args.gen)]
    return [os.path.join(bin_dir, "llama-bench"), "-m", model, "-t", str(threads), "-p", str(args.prompt),
            *gen, "-r", str(args.reps), "-o", "json"]


def parse_bench_json(text: str) -> dict:
    """llama-bench -o json output (a list of tests) -> prefill and decode tok/s, and what ran."""
    tests = json.loads(text)
    out = {}
    for t in tests:
        after_prompt = t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) > 0 and "@pp" in str(t.get("test", ""))  # -gp
        kind = "prefill" if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0 else \
               "decode" if t.get("n_gen", 0) > 0 and (t.get("n_prompt", 0) == 0 or after_prompt) else None
        if kind is None:
            continue
        n = t["n_prompt"] if kind == "prefill" else t["n_gen"]
        if kind == "decode":
            out["decode_depth"] = t["n_prompt"] if after_prompt else 0
        out[f"{kind}_tokens"] = n
        out[f"{kind}_tok_s"] = t["avg_ts"]
        out[f"{kind}_tok_s_stddev"] = t["stddev_ts"]
        out[f"{kind}_samples_tok_s"] = t.get("samples_ts")
        for k in ("build_commit", "cpu_info", "model_type", "model_size", "model_n_params", "n_threads", "n_batch",
                  "n_ubatch", "type_k", "type_v", "flash_attn", "repack", "use_mmap"):
            if k in t:
                out.setdefault(k, t[k])
    if "prefill_tok_s" not in out and "decode_tok_s" not in out:
        raise ValueError("llama-bench's JSON holds neither a prompt (pp) nor a generation (tg) test")
    return out


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting on I/O), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_cores: float, seconds: int = 3, timeout: float = 900) -> float:
    """Wait until the machine has used less than max_cores for `seconds` one-second windows in a row
    (or timeout); returns the seconds waited."""
    t0 = time.monotonic()
    calm = 0
    while calm < seconds and time.monotonic() - t0 < timeout:
        b0 = busy_cpu_seconds()
        time.sleep(1.0)
        calm = calm + 1 if busy_cpu_seconds() - b0 < max_cores else 0
    return round(time.monotonic() - t0, 1)


class Lock:
    """flock(2) on a file, as `flock FILE command` takes it (the same lock as util-linux's flock)."""

    def __init__(self, path: str | None):
        self.path, self.f = path, None

    def __enter__(self):
        if self.path:
            import fcntl

            self.f = open(self.path, "a")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f:
            self.f.close()  # releases the lock


def run_bench(bin_dir: str, model: str, threads: int, args: argparse.Namespace) -> dict:
    """llama-bench once (under the lock, on an idle machine); again, up to --retries times, when other
    processes took more than --max-other cores while it ran."""
    cmd = bench_command(bin_dir, model, threads, args)
    tries = []
    for attempt in range(args.retries + 1):
        with Lock(args.lock):
            waited = wait_idle(args.max_other)
            print(f"bench{f' (under flock {args.lock})' if args.lock else ''}:", " ".join(cmd), file=sys.stderr,
                  flush=True)
            load0, busy0, ru0, w0 = os.getloadavg(), busy_cpu_seconds(), os.times(), time.monotonic()
            r = subprocess.run(cmd, capture_output=True, text=True)
            ru1, busy1, wall = os.times(), busy_cpu_seconds(), time.monotonic() - w0
        if r.returncode:
            raise SystemExit(f"llama-bench failed ({r.returncode}):\n{r.stderr[-3000:]}")
        ours = (ru1.children_user - ru0.children_user) + (ru1.children_system - ru0.children_system)
        res = parse_bench_json(r.stdout)
        res.update(command=" ".join(cmd), lock=args.lock, waited_for_idle_s=waited, wall_s=round(wall, 1),
                   llama_bench_cpu_s_per_wall_s=round(ours / wall, 2),
                   other_cpu_s_per_wall_s=round(max(0.0, (busy1 - busy0) - ours) / wall, 2),
                   loadavg_before=[round(x, 2) for x in load0], loadavg_after=[round(x, 2) for x in os.getloadavg()])
        tries.append(res)
        if res["other_cpu_s_per_wall_s"] <= args.max_other:
            break
        print(f"  other processes took {res['other_cpu_s_per_wall_s']} cores meanwhile: again", file=sys.stderr)
    best = min(tries, key=lambda x: x["other_cpu_s_per_wall_s"])
    best["attempts"] = len(tries)
    if len(tries) > 1:
        best["discarded"] = [{k: t[k] for k in ("decode_tok_s", "prefill_tok_s", "other_cpu_s_per_wall_s")}
                             for t in tries if t is not best]
    return best


# ----------------------------------------------------------------------------- results
def merge_rows(old: list[dict], new: list[dict], isa: str) -> list[dict]:
    """The rows of a previous results file measured with another ISA build, then the new ones."""
    return [r for r in old if r.get("isa") != isa] + new


def bench_markdown(payload: dict, env: dict) -> str:
    from bitnet.report import table

    rows = [dict(r) for r in payload["rows"]]
    for r in rows:
        r["head_label"] = f"{r['head']} ({r['head_types']})"
        r["decode"] = f"{r['decode_tok_s']:.1f} ± {r['decode_tok_s_stddev']:.1f}"
        r["prefill"] = f"{r['prefill_tok_s']:.1f} ± {r['prefill_tok_s_stddev']:.1f}"
        r["size"] = f"{r['model_size'] / 2**20:.0f} MiB"
    lines = [
        f"# ik_llama.cpp (llama-bench) on the random `{payload['preset']}` model: {env['device']}",
        "",
        f"CPU flags {', '.join(env['cpu_flags'])}; {env['cpu_count']} cores; load average at the end {env['loadavg']}. "
        f"ik_llama.cpp commit {payload['builds'][rows[-1]['isa']]['commit'][:12]}; llama-bench -p {payload['prompt']} "
        f"-n {payload['gen']} -r {payload['reps']} (its defaults otherwise: flash attention on, f16 KV cache, "
        "no run-time repacking); the mean of the repetitions after llama-bench's warm-up, ± their stddev. "
        "The same weights as bench_generate (random_model, seed "
        f"{payload['seed']}), exported by bitnet.gguf_export as F16 and quantized by ik's llama-quantize to IQ2_BN; "
        f"GGUF architecture `{IK_ARCH}` (relu², sub-norms, untied head). Protocol: benchmarks/peer_ik_llamacpp.py.",
        "",
        table(rows, [("system", "system", ""), ("head_label", "head type", ""), ("threads", "threads", ""),
                     ("decode", f"decode tok/s (tg{payload['gen']})", ""),
                     ("prefill", f"prefill {payload['prompt']} tok/s (pp{payload['prompt']})", ""),
                     ("size", "file", "")], markdown=True),
        "",
        "Builds:",
        "",
    ]
    for isa, b in payload["builds"].items():
        lines.append(f"- {isa}: {b['compiler']}; compile flags `{b['arch_flags']}`"
                     + (f" (-march=native = {b['march_native']})" if b.get("march_native") else "")
                     + (f"; {b['zmm_instructions_in_llama_bench']} instructions on zmm registers in llama-bench"
                        if b.get("zmm_instructions_in_llama_bench") is not None else "")
                     + f"; cmake {' '.join(b['cmake_args'])}")
    lines += ["", "Files (IQ2_BN projections in every row):", ""]
    for head, q in payload["files"].items():
        lines.append(f"- head `{head}`: token_embd {q['types']['token_embd']}, output {q['types']['output']}, "
                     f"projections {', '.join(q['types']['projections'])}; "
                     f"`{' '.join(os.path.basename(x) for x in q['command'].split())}`")
    lines += ["", "Ours: benchmarks/results/generate_cpu.md (decode, prefill 128); compare rows measured on the same CPU "
                  "(each file names its CPU)."]
    return "\n".join(lines)


def load_previous(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


# ----------------------------------------------------------------------------- the server
def load_bench_serve():
    from bitnet.bench import load_script

    return load_script(os.path.join(HERE, "bench_serve.py"))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_command(bin_dir: str, model: str, port: int, args: argparse.Namespace) -> list[str]:
    return [os.path.join(bin_dir, "llama-server"), "-m", model, "-t", str(args.server_threads),
            "-np", str(args.server_slots), "-cb", "-c", str(args.server_ctx), "--host", "127.0.0.1",
            "--port", str(port)]


IK_EXTRA = {"ignore_eos": True}  # our served model has no EOS; this file's vocabulary has one


def serve(args: argparse.Namespace, build_info: dict, model_path: str, vocab_size: int) -> dict:
    import random

    bs = load_bench_serve()
    port = bs.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(build_info["bin"], model_path, port, args)
    log_path = os.path.join(os.path.dirname(model_path), f"llama-server-{args.isa}.log")
    rng = random.Random(args.seed)

    def prompts(n):
        return [prompt_text([rng.randrange(vocab_size) for _ in range(args.prompt_len)], vocab_size) for _ in range(n)]

    from bitnet.bench import stop_server, wait_healthy

    rows, raw = [], {}
    with open(log_path, "w+") as log, Lock(args.lock):
        print("server:", " ".join(cmd), file=sys.stderr, flush=True)
        # in the GGUF folder: ik's common code writes llama.log into the working directory
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(model_path))
        try:
            wait_healthy(proc, url, "llama-server", log_path)
            asyncio.run(bs.level(args, url, "ik", 1, prompts(2), IK_EXTRA))  # warm-up, untimed (bench_serve's clients)
            for c in args.clients:
                waited = wait_idle(args.max_other)
                print(f"{c} client(s) ...", file=sys.stderr, flush=True)
                busy0, cpu0, self0, w0 = busy_cpu_seconds(), process_cpu_seconds(proc.pid), os.times(), time.monotonic()
                runs = asyncio.run(bs.level(args, url, "ik", c, prompts(c * args.requests_per_client), IK_EXTRA))
                busy1, cpu1, self1, wall = busy_cpu_seconds(), process_cpu_seconds(proc.pid), os.times(), time.monotonic() - w0
                client = (self1.user - self0.user) + (self1.system - self0.system)
                raw[c] = runs
                for r in runs:  # where the server sends no usage, count the streamed tokens
                    r["text_chunks"] = len(r["token_times"])
                    if r["completion_tokens"] is None:
                        r["completion_tokens"] = r["text_chunks"]
                row = bs.summarize(c, runs, args.max_tokens)
                # ik's server ends every stream with finish_reason "stop", also at max_tokens
                # (server-context.cpp: `res->stop = true; // to do: set value`): complete = all tokens came
                row["complete"] = sum(r["completion_tokens"] == args.max_tokens for r in runs)
                row.update(text_chunks=sum(r["text_chunks"] for r in runs), waited_for_idle_s=waited,
                           server_cpu_s_per_wall_s=round((cpu1 - cpu0) / wall, 2),
                           client_cpu_s_per_wall_s=round(client / wall, 2),
                           other_cpu_s_per_wall_s=round(max(0.0, busy1 - busy0 - (cpu1 - cpu0) - client) / wall, 2))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            stop_server(proc)
            log.seek(0)
            tail = log.read()[-4000:]
    return {"command": " ".join(cmd), "levels": rows, "server_log_tail": tail,
            "requests": {str(c): [{"ttft_s": r["token_times"][0] - r["sent"] if r["token_times"] else None,
                                   "tokens": r["completion_tokens"], "text_chunks": r["text_chunks"],
                                   "finish_reason": r["finish_reason"]} for r in runs] for c, runs in raw.items()}}


CHAT_SETTINGS = {"prompt cache": {"cache_prompt": True}, "no prompt cache": {"cache_prompt": False}}


def chats(args: argparse.Namespace, build_info: dict, model_path: str, vocab_size: int) -> dict:
    """bench_prefix_cache.py's workload (its defaults: 4 chats at once, 4 turns, a shared 256-token
    system prompt, 64-token messages, 32-token greedy replies) against llama-server -np <chats>, each
    request with cache_prompt true (llama-server's default: a slot keeps its last prompt and reply,
    a request takes the free slot whose cache shares the most with its prompt, and prefills after
    the common part) or false, rounds alternating; texts of the vocabulary's words (one token each)."""
    import random

    from bitnet.bench import free_port, load_script, stop_server, wait_healthy

    bpc = load_script(os.path.join(HERE, "bench_prefix_cache.py"))
    bargs = bpc.Args()
    # positions a slot: the longest conversation (and a BOS), rounded up to a power of two (1024 by default)
    slot_ctx = 1 << (bargs.system_len + bargs.turns * (bargs.user_len + bargs.max_tokens) + 16).bit_length()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [os.path.join(build_info["bin"], "llama-server"), "-m", model_path, "-t", str(args.server_threads),
           "-np", str(bargs.conversations), "-cb", "-c", str(bargs.conversations * slot_ctx), "--host", "127.0.0.1",
           "--port", str(port)]
    rng = random.Random(args.seed + 1)
    draw = lambda n: prompt_text([rng.randrange(vocab_size) for _ in range(n)], vocab_size).strip()  # noqa: E731
    warm = [draw(bargs.system_len) for _ in range(2)]
    texts = [{"system": draw(bargs.system_len),
              "users": [[draw(bargs.user_len) for _ in range(bargs.turns)] for _ in range(bargs.conversations)]}
             for _ in range(args.chat_rounds)]
    runs: dict[str, list[dict]] = {name: [] for name in CHAT_SETTINGS}
    log_path = os.path.join(os.path.dirname(model_path), "llama-server-chat.log")
    bs = load_bench_serve()
    with open(log_path, "w+") as log, Lock(args.lock):
        print("server:", " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(model_path))
        try:
            wait_healthy(proc, url, "llama-server", log_path)
            warm_args = argparse.Namespace(max_tokens=4, time_limit=600)
            asyncio.run(bs.level(warm_args, url, "ik", 1, warm, IK_EXTRA))  # untimed
            for r in range(args.chat_rounds):
                for name in (list(CHAT_SETTINGS) if r % 2 == 0 else list(CHAT_SETTINGS)[::-1]):
                    print(f"round {r + 1}: {name} ...", file=sys.stderr, flush=True)
                    run = asyncio.run(bpc.workload(url, "ik", texts[r], bargs.max_tokens, {**IK_EXTRA, **CHAT_SETTINGS[name]}))
                    run.update(round=r + 1, max_tokens=bargs.max_tokens)
                    runs[name].append(run)
        finally:
            stop_server(proc)
    rows = []
    for name, rs in runs.items():
        per = []
        for run in rs:
            turns = [t for c in run["chats"] for t in c]
            per.append({"wall_s": run["wall_s"],
                        "ttft_first_p50_ms": statistics.median(c[0]["ttft_s"] for c in run["chats"]) * 1e3,
                        "ttft_later_p50_ms": statistics.median(t["ttft_s"] for c in run["chats"] for t in c[1:]) * 1e3,
                        "prompt_tokens": sum(t["prompt_tokens"] or 0 for t in turns),
                        "prompt_run": sum(t["prompt_run"] or 0 for t in turns),
                        "complete": sum(t["completion_tokens"] == bargs.max_tokens for t in turns), "turns": len(turns)})
        rows.append({"system": f"ik_llama.cpp llama-server, {name}",
                     **{k: statistics.median(x[k] for x in per) for k in ("wall_s", "ttft_first_p50_ms",
                                                                        "ttft_later_p50_ms", "prompt_tokens", "prompt_run")},
                     "complete": f"{sum(x['complete'] for x in per)}/{sum(x['turns'] for x in per)}",
                     "per_round_wall_s": [round(x["wall_s"], 2) for x in per]})
    for row in rows:
        row["speedup"] = rows[1]["wall_s"] / row["wall_s"]
    return {"command": " ".join(cmd), "build": build_info, "workload": dataclasses.asdict(bargs), "rows": rows,
            "runs": runs}


def chat_markdown(payload: dict, env: dict) -> str:
    from bitnet.report import table

    w = payload["workload"]
    return "\n".join([
        f"# ik_llama.cpp llama-server, multi-turn chats with and without its prompt cache: the random `700m` model on "
        f"{env['device']}", "",
        f"CPU flags {', '.join(env['cpu_flags'])}; ik_llama.cpp commit {payload['build']['commit'][:12]}; {env['date']}. "
        f"Server: `{os.path.basename(payload['command'].split()[0])} {' '.join(payload['command'].split()[1:])}`. "
        f"bench_prefix_cache.py's workload: {w['conversations']} chats at once, {w['turns']} turns each, a shared "
        f"{w['system_len']}-token system prompt, {w['user_len']}-token messages, {w['max_tokens']}-token greedy replies "
        "(ignore_eos), each turn resending the conversation; per request cache_prompt true (llama-server's default) or "
        "false, rounds alternating; cells: median over rounds. Prompt tokens run: llama-server's own count "
        "(timings.prompt_n). Protocol: benchmarks/peer_ik_llamacpp.py --chat.", "",
        table(payload["rows"], [("system", "server", ""), ("wall_s", "workload s", ".2f"), ("speedup", "x no cache", ".2f"),
                                ("ttft_first_p50_ms", "TTFT first turn p50 ms", ".0f"),
                                ("ttft_later_p50_ms", "TTFT later turns p50 ms", ".0f"),
                                ("prompt_tokens", "prompt tokens sent", ".0f"),
                                ("prompt_run", "run through the model", ".0f"), ("complete", "replies complete", ""),
                                ("per_round_wall_s", "workload s per round", "")], markdown=True),
        "", "Ours under the same workload: benchmarks/results/prefix_cache_cpu.md.",
    ])


def serve_markdown(payload: dict, env: dict) -> str:
    from bitnet.report import table

    rows = [dict(r) for r in payload["levels"]]
    one = next((r for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["vs_one"] = r["tok_s"] / one["tok_s"] if one else None
        for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"):
            r[k.replace("_s", "_ms")] = None if r[k] is None else r[k] * 1e3
        r["complete_of"] = f"{r['complete']}/{r['requests']}"
    a = payload["args"]
    return "\n".join([
        f"# ik_llama.cpp llama-server under load: the random `{a['preset']}` model (IQ2_BN, head {a['server_head']}) "
        f"on {env['device']}",
        "",
        f"CPU flags {', '.join(env['cpu_flags'])}; load average at the end {env['loadavg']}; ik_llama.cpp commit "
        f"{payload['build']['commit'][:12]} ({payload['build']['isa']} build, {payload['build']['compiler']}). "
        f"Server: `{os.path.basename(payload['command'].split()[0])} {' '.join(payload['command'].split()[1:])}`. "
        f"Requests: prompt {a['prompt_len']} tokens, {a['max_tokens']} tokens generated, greedy, ignore_eos, "
        f"streamed, the openai client on loopback; {a['requests_per_client']} requests per client back to back "
        "(bench_serve.py's protocol and summary). Protocol: benchmarks/peer_ik_llamacpp.py. A request is complete "
        f"when its usage says {a['max_tokens']} tokens (ik's server ends every stream with finish_reason \"stop\", "
        "even at max_tokens).",
        "",
        table(rows, [("clients", "clients", ""), ("tok_s", "aggregate tok/s", ".1f"), ("vs_one", "x one client", ".2f"),
                     ("stream_tok_s_median", "per-stream tok/s", ".1f"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
                     ("ttft_p99_ms", "TTFT p99 ms", ".0f"), ("itl_p50_ms", "ITL p50 ms", ".0f"),
                     ("itl_p99_ms", "ITL p99 ms", ".0f"), ("complete_of", "requests complete", ""),
                     ("server_cpu_s_per_wall_s", "server cores busy", ".2f"),
                     ("other_cpu_s_per_wall_s", "other processes' cores", ".2f")], markdown=True),
        "",
        "Ours under the same protocol: benchmarks/results/serve_cpu.md.",
    ])


def prepare_files(args: argparse.Namespace, info: dict, heads: list[str]) -> tuple[dict, dict, int]:
    """The F16 GGUF of the random --preset model (written once, kept in --workdir) and its IQ2_BN
    quantizations, one per head type (made again when older than the F16 file): (export facts,
    {head: quantize facts}, vocab size)."""
    work = args.workdir or os.path.join(DEFAULT_CACHE, f"ik-gguf-{args.preset}-seed{args.seed}-ascii")  # (the vocabulary)
    os.makedirs(work, exist_ok=True)
    f16_path = os.path.join(work, f"bitnet-{args.preset}-{IK_ARCH}-F16.gguf")
    model = None
    if args.force_gguf or not os.path.exists(f16_path):
        print(f"writing {f16_path} ...", file=sys.stderr, flush=True)
        model = make_model(args.preset, args.seed)
        export = write_ik_gguf(model, f16_path)
        with open(f16_path + ".json", "w") as f:
            json.dump(export, f, indent=1)
    with open(f16_path + ".json") as f:
        export = json.load(f)
    from bitnet import BitNetConfig

    vocab_size = BitNetConfig.from_preset(args.preset).vocab_size
    del model
    files = {}
    for head in heads:
        q_path = os.path.join(work, f"bitnet-{args.preset}-{IK_ARCH}-IQ2_BN-head_{head}.gguf")
        stamp = q_path + ".json"
        if args.force_gguf or not os.path.exists(stamp) or os.path.getmtime(stamp) < os.path.getmtime(f16_path):
            q = quantize(info["bin"], f16_path, q_path, head, args.nice, os.cpu_count() or 1)
            with open(stamp, "w") as f:
                json.dump(q, f, indent=1)
        with open(stamp) as f:
            files[head] = json.load(f)
    return export, files, vocab_size


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bitnet.bench import environment, save_results

    commit = source_commit(args.src, args.commit)
    info = build(args, commit)
    heads = sorted(set(args.heads) | ({args.server_head} if args.server else set()), key=list(HEADS).index)
    export, files, vocab_size = prepare_files(args, info, heads)
    if args.gguf_only:
        print(json.dumps({"preset": args.preset, "seed": args.seed, "build": info, "export": export, "files": files},
                         indent=1))
        return 0

    if not args.no_bench:
        rows = []
        for head in args.heads:
            for t in args.threads:
                res = run_bench(info["bin"], files[head]["path"], t, args)
                rows.append({"system": f"ik_llama.cpp IQ2_BN, {ISA_LABEL[args.isa]}", "isa": args.isa, "head": head,
                             "head_types": f"output {files[head]['types']['output']}, "
                                           f"token_embd {files[head]['types']['token_embd']}",
                             "threads": t, **res})
                print(json.dumps({k: rows[-1][k] for k in ("isa", "head", "threads", "decode_tok_s", "prefill_tok_s")}),
                      file=sys.stderr, flush=True)
        prev = load_previous(os.path.join(args.out_dir, f"{args.name}.json"))
        builds = {k: v for k, v in (prev.get("builds") or {}).items() if k != args.isa}
        builds[args.isa] = info
        payload = {"preset": args.preset, "seed": args.seed, "prompt": args.prompt, "gen": args.gen, "reps": args.reps,
                   "lock": args.lock, "architecture": IK_ARCH, "export": export, "files": files, "builds": builds,
                   "rows": merge_rows(prev.get("rows") or [], rows, args.isa)}
        if prev and (prev.get("preset"), prev.get("prompt"), prev.get("gen")) != (args.preset, args.prompt, args.gen):
            payload["rows"] = rows  # another protocol: the old rows do not belong in this table
            payload["builds"] = {args.isa: info}
        env = environment()
        path = save_results(args.name, payload, bench_markdown(payload, env), args.out_dir)
        print(f"saved {path}", file=sys.stderr)

    if args.chat:
        payload = chats(args, info, files[args.server_head]["path"], vocab_size)
        env = environment()
        path = save_results(args.chat_name, payload, chat_markdown(payload, env), args.out_dir)
        print(f"saved {path}", file=sys.stderr)

    if args.server:
        res = serve(args, info, files[args.server_head]["path"], vocab_size)
        sargs = {k: getattr(args, k) for k in ("preset", "seed", "server_threads", "server_slots", "server_ctx",
                                               "server_head", "clients", "requests_per_client", "prompt_len",
                                               "max_tokens", "time_limit")}
        payload = {"args": sargs, "build": info, "file": files[args.server_head], "export": export, **res}
        env = environment()
        path = save_results(args.serve_name, payload, serve_markdown(payload, env), args.out_dir)
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

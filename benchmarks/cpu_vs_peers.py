"""One sitting, one table: our CPU decode / prefill vs ik_llama.cpp (IQ2_BN) vs the bf16 twin, on
the same random weights, systems alternating round by round.

    python benchmarks/cpu_vs_peers.py --ik-src /tmp/ik_src --ik-commit 8337e4cd3861406fc04e0854b1409cd1b027fbc9 \\
        [--shapes 700m,2b4t] [--threads 1,2] [--isas native,avx2] [--rounds 2] [--quick]

Why one sitting: this machine's memory bandwidth drifts a lot between minutes, so numbers taken in
different sessions (generate_cpu.md, peer_ik_llamacpp_cpu.md) do not compare. Here every round
measures every cell, the cells of one (shape, ISA, threads) group back to back, the order of the
whole list reversed every other round; a ratio is taken within a round, then its median and
min-max over rounds are reported, so that a drift moves both sides of a ratio alike.

Systems, per (shape, ISA, threads):
- ours: bench_generate's `bitnet` model: `random_model(BitNetConfig.from_preset(shape), bfloat16,
  seed=0, packing="2bit")`: packed 2-bit projections on the native kernels, embeddings, norms and
  the lm_head bf16 (the head on the bf16 kernel);
- ours-int8 / ours-int4 (`--systems` names them; not in the default): the same with the lm_head
  quantized to int8 rows / 4-bit groups of 32 (`model.quantize_lm_head(bits)`, bench_generate's
  `bitnet-int8head` / `bitnet-int4head`; test perplexity +0.02% / +0.39%, lm_head_ppl.md), beside
  ik's default head, which quantizes the head to Q6_K (6.56 bits a weight);
- twin: bench_generate's `bf16` model, the same shape with nn.Linear bf16 projections (F.linear);
- ik-f16 / ik-default: ik_llama.cpp's llama-bench on the GGUF that benchmarks/peer_ik_llamacpp.py
  writes from the same random_model weights (seed 0), quantized to IQ2_BN with the head and
  embedding kept F16, and with ik's default types for IQ2_BN (head Q6_K, embedding IQ4_NL), made by
  `peer_ik_llamacpp.py --gguf-only` (once; kept in ~/.cache/bitnet-peers).

What is timed (llama-bench -p 128 -n 64's protocol, ours replaying it with bitnet.generation.generate):
- decode (tg64): llama-bench clears the KV cache and times 64 llama_decode calls of one token each at
  positions 0..63 (a random token each, no sampling), after one untimed 1-token warm-up; tok/s = 64 /
  time. Ours: `generate(model, 1-token prompt, 64)` (greedy) into a KV cache set up beforehand
  (model.setup_cache(1, 65), reused by every call): 64 forwards of one token at positions 0..63 (the
  prompt's forward, then 63 decode steps), each with the argmax over the logits that llama-bench
  replaces by a random token; tok/s = 64 / time of the call.
- decode at depth (`--depth D`, tgN@ppD): llama-bench -gp D,N clears the cache, runs a D-token prompt
  untimed and times the N single-token llama_decode calls after it (positions D..D+N-1). Ours:
  `generate(model, D-token prompt, N + 1)` into a cache of D + N + 1 slots, timed from the prompt's
  token (on_token's first call) to the end: its N decode steps. Where the context is long the KV
  cache is read as much as the weights: this is the figure a chat with a long history sees.
- prefill (pp128): llama-bench clears the cache and times one llama_decode of 128 tokens (logits of
  the last one only); tok/s = 128 / time. Ours: `generate(model, 128-token prompt, 1)`: one forward
  over 128 tokens (the head on the last token), and its argmax; tok/s = 128 / time.
- ours and the twin: --warmup untimed calls of each, then --reps timed calls (the twin --twin-reps:
  64 decode steps of a bf16 model take ~10-40 s); the median is the sample of a round. ik: llama-bench
  -r --ik-reps (its own warm-up); the median of its per-repetition samples (samples_ts) is the sample
  of a round (its mean and stddev are kept in the JSON too).
Differences that stay: our KV cache is bf16 for the packed models (float32 before 2026-12-07; the
twin's float32) and attention eager; ik's cache is f16 with flash attention (llama-bench's defaults). Thread counts: ours and the twin torch.set_num_threads(T) (and
OMP_NUM_THREADS=T), ik -t T.

ISA: `native`: ours with every instruction set the CPU has (our kernels' best, e.g. AMX for the
packed matmuls; torch / oneDNN likewise), ik's -march=native build. `avx2`: ours and the twin with
BITNET_CPU_ISA=avx2 (our kernels), ATEN_CPU_CAPABILITY=avx2 (torch's own vectorized ops) and
ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN: the int8 GEMM of our prefill, the twin's matmuls), so that nothing
of ours runs AVX-512 or AMX, as in ik's AVX2 build (-mavx -mavx2 -mfma -mf16c, no AVX-512, no
AVX-VNNI). `avx2-kernels` (not in the default): ours with BITNET_CPU_ISA=avx2 only.

Isolation and disturbance: each of our / the twin's measurements runs in a fresh Python process
(the ISA caps are read at load; memory clean) from a snapshot of bitnet/ and kernels/ (and of this
script) taken at the start of the sitting (PYTHONPATH; --no-snapshot measures the live tree), so that edits to the tree
during the sitting do not change what is measured; the snapshot's digest, the commit and whether the
tree differed from it are recorded. Every measurement holds flock(2) on --lock (default
/tmp/bench.lock, as `flock /tmp/bench.lock CMD`), starts once the machine has been idle for 3 s
(other processes under --max-other cores), and records the CPU that other processes took while it
ran (/proc/stat less the measuring process's own CPU: over the timed calls for ours, over the whole
llama-bench run for ik); a measurement where that exceeds --max-other is run again (up to --retries
times) and the least disturbed one kept, with the count of attempts. Each round starts with a read
bandwidth probe (bitnet.bench.measured_cpu_bandwidth, 512 MiB, the largest thread count) that shows
the drift.

Results: benchmarks/results/cpu_vs_peers.{json,md} (--name), the JSON rewritten after every
measurement (a sitting cut short keeps what it measured, "complete": false).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYSTEMS = ("ours", "twin", "ik-f16", "ik-default", "ours-int8", "ours-int4")
DEFAULT_SYSTEMS = SYSTEMS[:4]
HEAD_BITS = {"ours-int8": 8, "ours-int4": 4}  # ours with model.quantize_lm_head(bits)
LABELS = {"ours": "ours: packed 2-bit, bf16 head", "ours-int8": "ours: packed 2-bit, int8 head",
          "ours-int4": "ours: packed 2-bit, int4 head",
          "twin": "bf16 twin (nn.Linear)",
          "ik-f16": "ik_llama.cpp IQ2_BN, F16 head", "ik-default": "ik_llama.cpp IQ2_BN, default head"}
IK_HEAD = {"ik-f16": "f16", "ik-default": "default"}
# what our systems' KV cache holds (bitnet.model.cache_dtype), recorded in each result (older results: float32)
OURS_KV_CACHE = "a bf16 cache for the packed models (the same bits as float32), float32 for the twin"
ISA_ENV = {  # our processes' environment per ISA label; ik: the build of that name
    "native": {},
    "avx2": {"BITNET_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx2-kernels": {"BITNET_CPU_ISA": "avx2"},
}
IK_BUILD = {"native": "native", "avx2": "avx2", "avx2-kernels": "avx2"}
RATIOS = [  # (key, numerator system, denominator system, metric, column title)
    ("decode_vs_ik_f16", "ours", "ik-f16", "decode", "decode ours / ik F16 head"),
    ("decode_vs_ik_default", "ours", "ik-default", "decode", "decode ours / ik default head"),
    ("prefill_vs_ik_f16", "ours", "ik-f16", "prefill", "prefill ours / ik F16 head"),
    ("prefill_vs_ik_default", "ours", "ik-default", "prefill", "prefill ours / ik default head"),
    ("decode_int8_vs_ik_default", "ours-int8", "ik-default", "decode", "decode ours int8 head / ik default head"),
    ("decode_int4_vs_ik_default", "ours-int4", "ik-default", "decode", "decode ours int4 head / ik default head"),
    ("decode_vs_twin", "ours", "twin", "decode", "decode ours / twin"),
    ("prefill_vs_twin", "ours", "twin", "prefill", "prefill ours / twin"),
]


# ----------------------------------------------------------------------------- arguments
def csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def per_shape(ap: argparse.ArgumentParser, items: list[str], what: str, convert) -> dict[str, list]:
    """`SHAPE=V1/V2` items (e.g. 2b4t=2 or 2b4t=native/avx2) -> {shape: [values]}."""
    out = {}
    for item in items:
        if "=" not in item:
            ap.error(f"{what}: SHAPE=VALUE[/VALUE...], got {item!r}")
        shape, values = item.split("=", 1)
        try:
            out[shape.strip()] = [convert(v) for v in values.split("/") if v.strip()]
        except ValueError:
            ap.error(f"{what}: bad value in {item!r}")
        if not out[shape.strip()]:
            ap.error(f"{what}: no value in {item!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See the module docstring for the protocol.")
    ap.add_argument("--shapes", default="700m", help="presets, comma-separated (e.g. 700m,2b4t)")
    ap.add_argument("--threads", default="1,2", help="thread counts (every shape without a --shape-threads entry)")
    ap.add_argument("--isas", default="native,avx2", help=f"of {','.join(ISA_ENV)} (every shape without --shape-isas)")
    ap.add_argument("--shape-threads", default="2b4t=2", help="per-shape thread counts: SHAPE=T[/T...],...")
    ap.add_argument("--shape-isas", default="2b4t=native", help="per-shape ISAs: SHAPE=ISA[/ISA...],...")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help=f"of {','.join(SYSTEMS)} (ours-int8 / ours-int4: ours with the lm_head quantized to int8 / "
                    "int4, beside ik's default head, which quantizes it to Q6_K)")
    ap.add_argument("--twin-isas", default="native",
                    help="ISAs the twin is measured at (its 64 decode steps take ~10-40 s a call; avx2 adds ~5 min a round)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed calls of ours per metric (median)")
    ap.add_argument("--twin-reps", type=int, default=3, help="timed calls of the twin per metric (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of ours / the twin per metric first")
    ap.add_argument("--ik-reps", type=int, default=5, help="llama-bench -r")
    ap.add_argument("--prompt", type=int, default=128, help="prefill tokens (llama-bench -p)")
    ap.add_argument("--gen", type=int, default=64, help="decode tokens (llama-bench -n)")
    ap.add_argument("--depth", type=int, default=0,
                    help="decode after a prompt of this many tokens, only the decode timed (llama-bench -gp DEPTH,GEN); "
                    "0: from an empty cache (-n GEN)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="1 round, --reps 3, --twin-reps 1, --ik-reps 3 (a check of the whole, not a result)")
    ap.add_argument("--lock", default="/tmp/bench.lock", help="flock(2) held during every measurement ('' for none)")
    ap.add_argument("--max-other", type=float, default=0.1, help="cores other processes may take while measuring")
    ap.add_argument("--retries", type=int, default=2, help="reruns of a disturbed measurement")
    ap.add_argument("--ik-src", default="/tmp/ik_src", help="ik_llama.cpp source tree (peer_ik_llamacpp.py --src)")
    ap.add_argument("--ik-commit", help="its commit, when --ik-src is not a git checkout")
    ap.add_argument("--no-snapshot", action="store_true", help="run ours from the live tree, not a snapshot")
    ap.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "bitnet-peers", "cpu_vs_peers"))
    ap.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth probe at each round's start")
    ap.add_argument("--name", default="cpu_vs_peers")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement of ours / the twin (JSON spec)
    args = ap.parse_args(argv)
    if args.child:
        return args
    if args.quick:
        args.rounds, args.reps, args.twin_reps, args.ik_reps = 1, 3, 1, 3
    args.shapes = csv(args.shapes)
    args.systems = csv(args.systems)
    args.isas, args.twin_isas = csv(args.isas), csv(args.twin_isas)
    try:
        args.threads = [int(x) for x in csv(args.threads)]
    except ValueError:
        ap.error(f"--threads: comma-separated integers, got {args.threads!r}")
    args.shape_threads = per_shape(ap, csv(args.shape_threads), "--shape-threads", int)
    args.shape_isas = per_shape(ap, csv(args.shape_isas), "--shape-isas", str)
    if not args.shapes:
        ap.error("--shapes: empty")
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad or not args.systems:
        ap.error(f"--systems: unknown {bad or 'empty'}; choose from {','.join(SYSTEMS)}")
    isas = args.isas + args.twin_isas + [i for v in args.shape_isas.values() for i in v]
    bad = [i for i in isas if i not in ISA_ENV]
    if bad or not args.isas:
        ap.error(f"ISA: unknown {bad or 'empty'}; choose from {','.join(ISA_ENV)}")
    threads = args.threads + [t for v in args.shape_threads.values() for t in v]
    if not args.threads or min(threads) < 1:
        ap.error("thread counts must be positive")
    for name in ("rounds", "reps", "twin_reps", "ik_reps", "prompt", "gen"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.retries < 0 or args.depth < 0:
        ap.error("--warmup, --retries and --depth must be at least 0")
    args.lock = args.lock or None
    return args


def cells(args: argparse.Namespace) -> list[dict]:
    """The measurements of one round, in order: per shape, ISA and thread count, the systems back to back."""
    out = []
    for shape in args.shapes:
        for isa in args.shape_isas.get(shape, args.isas):
            for t in args.shape_threads.get(shape, args.threads):
                for system in args.systems:
                    if system == "twin" and isa not in args.twin_isas:
                        continue
                    if system.startswith("ik") and isa == "avx2-kernels":
                        continue  # ik's avx2 rows are the "avx2" cells
                    out.append({"shape": shape, "isa": isa, "threads": t, "system": system})
    return out


def round_order(plan: list[dict], r: int) -> list[dict]:
    """Round r (0-based): the plan, reversed on odd rounds."""
    return list(plan) if r % 2 == 0 else list(reversed(plan))


# ----------------------------------------------------------------------------- tables (pure)
def group_key(m: dict) -> tuple:
    return (m["shape"], m["isa"], m["threads"])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_round": values}


def summarize(measurements: list[dict]) -> list[dict]:
    """One row per (shape, ISA, threads, system): decode and prefill tok/s, median (min-max) over
    the rounds of each round's sample."""
    rows: dict[tuple, dict] = {}
    for m in sorted(measurements, key=lambda m: m["round"]):
        key = (*group_key(m), m["system"])
        row = rows.setdefault(key, {"shape": m["shape"], "isa": m["isa"], "threads": m["threads"],
                                    "system": m["system"], "decode": [], "prefill": [], "rounds": [],
                                    "attempts": [], "other_cpu": []})
        row["decode"].append(m["decode_tok_s"])
        row["prefill"].append(m["prefill_tok_s"])
        row["rounds"].append(m["round"])
        row["attempts"].append(m.get("attempts", 1))
        row["other_cpu"].append(m.get("other_cpu_s_per_wall_s"))
    out = []
    for row in rows.values():
        row["decode"], row["prefill"] = spread(row["decode"]), spread(row["prefill"])
        out.append(row)
    return out


def ratios(measurements: list[dict]) -> list[dict]:
    """Per (shape, ISA, threads): each ratio of RATIOS taken within each round where both sides were
    measured, then median (min-max) over those rounds."""
    by = {}
    for m in measurements:
        by[(*group_key(m), m["system"], m["round"])] = m
    groups = sorted({group_key(m) for m in measurements}, key=lambda g: [str(x) for x in g])
    rounds = sorted({m["round"] for m in measurements})
    out = []
    for g in groups:
        row = {"shape": g[0], "isa": g[1], "threads": g[2]}
        for key, num, den, metric, _ in RATIOS:
            values = [by[(*g, num, r)][f"{metric}_tok_s"] / by[(*g, den, r)][f"{metric}_tok_s"]
                      for r in rounds if (*g, num, r) in by and (*g, den, r) in by]
            row[key] = spread(values) if values else None
        if any(row[k] for k, *_ in RATIOS):
            out.append(row)
    return out


def fmt_spread(s: dict | None, spec: str) -> str:
    if not s:
        return ""
    if len(s["per_round"]) == 1:
        return format(s["median"], spec)
    return f"{format(s['median'], spec)} ({format(s['min'], spec)}-{format(s['max'], spec)})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


SYSTEM_ORDER = {s: i for i, s in enumerate(SYSTEMS)}


def row_order(r: dict) -> tuple:
    return (r["shape"], r["isa"] != "native", r["isa"], r["threads"], SYSTEM_ORDER.get(r.get("system"), 0))


def system_label(system: str, files: dict | None = None) -> str:
    label = LABELS[system]
    head = IK_HEAD.get(system)
    if files and head and head in files:
        t = files[head]["types"]
        label += (f" (output {t['output']}, token_embd {t['token_embd']})" if t.get("output")
                  else f" (tied: token_embd {t['token_embd']})")
    return label


def markdown(payload: dict) -> str:
    env = payload["environment"]
    a = payload["args"]
    shapes = {s: i for i, s in enumerate(a["shapes"])}  # the order given, then the ISA and threads

    def order(r):
        return (shapes.get(r["shape"], len(shapes)), *row_order(r))

    rows = sorted(summarize(payload["measurements"]), key=order)
    rats = sorted(ratios(payload["measurements"]), key=order)
    n_rounds = len({m["round"] for m in payload["measurements"]})
    depth = a.get("depth", 0)
    tg = f"tg{a['gen']}@pp{depth}" if depth else f"tg{a['gen']}"
    if depth:
        decode_protocol = (f"Decode: {tg}: {a['gen']} single-token forwards at positions {depth}..{depth + a['gen'] - 1} "
                           f"after a {depth}-token prompt, only they timed (ours: generate(model, {depth}-token prompt, "
                           f"{a['gen'] + 1}), greedy, timed from the prompt's token to the end; llama-bench -gp {depth},{a['gen']})")
    else:
        decode_protocol = (f"Decode: {tg}: {a['gen']} single-token forwards at positions 0..{a['gen'] - 1} from an empty "
                           f"KV cache (ours: generate(model, 1-token prompt, {a['gen']}), greedy; llama-bench -n {a['gen']})")
    t1 = markdown_table(
        ["shape", "ISA", "threads", "system", f"decode tok/s ({tg})", f"prefill {a['prompt']} tok/s (pp{a['prompt']})",
         "per round: decode / prefill"],
        [[r["shape"], r["isa"], str(r["threads"]), system_label(r["system"], (payload.get("ik_files") or {}).get(r["shape"])),
          fmt_spread(r["decode"], ".1f"), fmt_spread(r["prefill"], ".0f"),
          "; ".join(f"{d:.1f} / {p:.0f}" for d, p in zip(r["decode"]["per_round"], r["prefill"]["per_round"]))]
         for r in rows])
    t2 = markdown_table(
        ["shape", "ISA", "threads"] + [title for *_, title in RATIOS],
        [[r["shape"], r["isa"], str(r["threads"])] + [fmt_spread(r[k], ".2f") for k, *_ in RATIOS] for r in rats])
    per_round = markdown_table(
        ["shape", "ISA", "threads"] + [title for *_, title in RATIOS],
        [[r["shape"], r["isa"], str(r["threads"])] + [", ".join(f"{v:.2f}" for v in r[k]["per_round"]) if r[k] else ""
                                                       for k, *_ in RATIOS] for r in rats])
    bw = payload.get("bandwidth") or []
    snap = payload.get("snapshot") or {}
    disturbed = [m for m in payload["measurements"] if (m.get("other_cpu_s_per_wall_s") or 0) > a["max_other"]]
    retried = [m for m in payload["measurements"] if m.get("attempts", 1) > 1]
    lines = [
        f"# Ours vs ik_llama.cpp vs the bf16 twin, one sitting: {env['device']}",
        "",
        f"CPU `{env['cpu']}`, flags {', '.join(env['cpu_flags'])}; {env['cpu_count']} cores. "
        f"{n_rounds} round(s){' (incomplete)' if not payload.get('complete') else ''}, "
        f"{payload.get('started', '')} to {payload.get('finished', env['date'])}; every cell in every round, the systems "
        "of a (shape, ISA, threads) group back to back, the order reversed every other round. Random weights "
        f"(bitnet.bench.random_model, seed {a['seed']}), the same in every system (ik's GGUF written from them by "
        "peer_ik_llamacpp.py). Ours from commit "
        f"{(snap.get('commit') or env.get('commit') or '?')[:12]}"
        + (" plus uncommitted changes" if snap.get("dirty") else "")
        + (f" (snapshot of bitnet/ and kernels/, digest {snap['digest'][:12]})" if snap.get("digest") else "")
        + f"; ik_llama.cpp {payload.get('ik_commit', '?')[:12]}.",
        "",
        decode_protocol + f"; prefill: one forward over {a['prompt']} tokens (ours: generate(model, {a['prompt']}-token prompt, 1); llama-bench -p {a['prompt']}). "
        f"A round's sample: the median of {a['reps']} timed calls after {a['warmup']} untimed (twin: {a['twin_reps']}), ik "
        f"the median of llama-bench -r {a['ik_reps']}'s samples. Cells: median over rounds (min-max). "
        "ISA avx2: ours and the twin with BITNET_CPU_ISA=avx2, ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2; ik its "
        "AVX2 build (no AVX-512). Ours / the twin: each measurement a fresh process, torch threads = T; ik -t T, "
        f"flash attention, f16 KV cache (ours: {payload.get('ours_kv_cache', 'float32 cache')}). Protocol: "
        "benchmarks/cpu_vs_peers.py.",
        "",
        t1,
        "",
        "Ratios, taken within each round, median (min-max) over rounds:",
        "",
        t2,
        "",
        "Per round:",
        "",
        per_round,
    ]
    if bw:
        lines += ["", "Read bandwidth at each round's start (GB/s, 512 MiB, best of 5, "
                  f"{bw[0].get('threads', '?')} threads): " + ", ".join(
                      f"round {b['round']}: {b['read_gbps']:.1f}" for b in bw) + "."]
    lines += ["", f"Disturbance: {len(retried)} measurement(s) run again (other processes above {a['max_other']} cores); "
              f"{len(disturbed)} kept above it" + (": " + ", ".join(
                  f"{m['shape']}/{m['isa']}/t{m['threads']}/{m['system']} round {m['round']} "
                  f"({m['other_cpu_s_per_wall_s']} cores)" for m in disturbed) if disturbed else "") + "."]
    files = payload.get("ik_files") or {}
    if files:
        lines += ["", "ik files (IQ2_BN projections):", ""]
        for shape, fs in files.items():
            for head, q in fs.items():
                lines.append(f"- {shape}, head `{head}`: token_embd {q['types']['token_embd']}, output "
                             f"{q['types']['output'] or '(tied: token_embd)'}; {q['bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one measurement of ours / the twin
def busy_cpu_seconds() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def kernel_digest() -> str | None:
    """The digest the native kernels' build is keyed by (kernels/cpu.py: sha256 of its sources)."""
    import bitnet.kernels.cpu as native

    h = hashlib.sha256()
    for path in [native.SOURCE, *native.HEADERS]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def timed_calls(fn, warmup: int, reps: int, part: bool = False) -> dict:
    """fn() `warmup` times untimed, then `reps` times timed: seconds per call (part: what fn returns,
    the seconds of the part of the call to time), and the cores other processes took meanwhile
    (machine busy CPU less this process's CPU, over the timed calls' wall)."""
    for _ in range(warmup):
        fn()
    b0, o0, w0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        seconds = fn()
        times.append(float(seconds) if part else time.perf_counter() - t0)
    wall = time.perf_counter() - w0
    other = max(0.0, (busy_cpu_seconds() - b0) - (own_cpu_seconds() - o0)) / wall
    return {"seconds": times, "other_cpu_s_per_wall_s": round(other, 3), "wall_s": round(wall, 2)}


def child_measure(spec: dict) -> dict:
    """One system at one shape, ISA (from the environment) and thread count: tg and pp as the
    module docstring says."""
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    import bitnet
    import bitnet.kernels.cpu as native
    from bitnet import BitNetConfig, weight_bytes
    from bitnet.bench import random_model
    from bitnet.generation import generate

    linear, packing = ("bitnet", "2bit") if spec["system"].startswith("ours") else ("bf16", None)
    native.load()  # a build, if any, before the clock
    # page in torch's and our code paths on the tiny preset first (as bench_generate)
    warm = random_model(BitNetConfig.from_preset("tiny", linear=linear), torch.bfloat16, "cpu", packing=packing)
    generate(warm, torch.zeros(1, 8, dtype=torch.long), 2)
    del warm
    t0 = time.perf_counter()
    config = BitNetConfig.from_preset(spec["shape"], linear=linear)
    model = random_model(config, torch.bfloat16, "cpu", seed=spec["seed"], packing=packing)
    if spec["system"] in HEAD_BITS:
        model.quantize_lm_head(HEAD_BITS[spec["system"]])
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(spec["seed"])
    P, N = spec["prompt"], spec["gen"]
    one = torch.randint(0, config.vocab_size, (1, 1), generator=g)
    long = torch.randint(0, config.vocab_size, (1, P), generator=g)
    reps, warmup = spec["reps"], spec["warmup"]

    model.setup_cache(1, P + 1)
    pp = timed_calls(lambda: generate(model, long, 1), warmup, reps)
    model.clear_cache()
    depth = spec.get("depth", 0)
    if depth:  # llama-bench -gp: the N decode steps after a prompt of `depth` tokens, the prompt untimed
        deep = torch.randint(0, config.vocab_size, (1, depth), generator=g)
        model.setup_cache(1, depth + N + 1)

        def after_prompt():
            first = []  # the clock when the prompt's forward has given its token
            generate(model, deep, N + 1, on_token=lambda ids: first or first.append(time.perf_counter()))
            return time.perf_counter() - first[0]

        tg = timed_calls(after_prompt, warmup, reps, part=True)
    else:
        model.setup_cache(1, N + 1)
        tg = timed_calls(lambda: generate(model, one, N), warmup, reps)
    model.clear_cache()
    sizes = weight_bytes(model)
    decode = [N / s for s in tg["seconds"]]
    prefill = [P / s for s in pp["seconds"]]
    return {
        "decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill),
        "decode_samples_tok_s": decode, "prefill_samples_tok_s": prefill,
        "decode_other_cpu": tg["other_cpu_s_per_wall_s"], "prefill_other_cpu": pp["other_cpu_s_per_wall_s"],
        "other_cpu_s_per_wall_s": max(tg["other_cpu_s_per_wall_s"], pp["other_cpu_s_per_wall_s"]),
        "timed_wall_s": round(tg["wall_s"] + pp["wall_s"], 1), "model_build_s": round(build_s, 1),
        "weight_bytes": sizes, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch_threads": torch.get_num_threads(), "kernels_isa": native.isa(), "kernels_detected_isa": native.detected_isa(),
        "kernel_digest": kernel_digest(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bitnet_path": os.path.dirname(bitnet.__file__),
        "env": {k: os.environ.get(k) for k in ("BITNET_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")},
    }


def child_bandwidth(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from bitnet.bench import measured_cpu_bandwidth

    return measured_cpu_bandwidth(512 * 2**20, reps=5)


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    out = child_bandwidth(spec) if spec.get("mode") == "bandwidth" else child_measure(spec)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ----------------------------------------------------------------------------- the sitting
def load_peer():
    from bitnet.bench import load_script

    return load_script(os.path.join(HERE, "peer_ik_llamacpp.py"))


def git(*a: str) -> str | None:
    r = subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def snapshot(dest: str) -> dict:
    """Copy bitnet/ and kernels/ (as bitnet/kernels, the editable install's mapping) to dest; returns
    the commit, whether those folders differed from it, and a digest of the copied files."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(os.path.join(ROOT, "bitnet"), os.path.join(dest, "bitnet"), ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(dest, "bitnet", "kernels"), ignore=ignore)
    shutil.copy2(os.path.abspath(__file__), os.path.join(dest, "cpu_vs_peers.py"))  # the children's code too
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(dest)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, dest).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    status = git("status", "--porcelain", "--", "bitnet", "kernels") or ""
    return {"path": dest, "commit": git("rev-parse", "HEAD"), "dirty": bool(status.strip()),
            "changed_files": [line[3:] for line in status.splitlines()], "digest": h.hexdigest()}


def run_child(spec: dict, isa: str, snap: str | None) -> dict:
    env = dict(os.environ)
    for k in ("BITNET_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        env.pop(k, None)
    env.update(ISA_ENV[isa])
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    # the snapshot's copy of this script: Python puts its folder first on sys.path, so the child
    # imports the snapshot's bitnet (and bitnet.kernels) ahead of the editable install
    script = os.path.join(snap, "cpu_vs_peers.py") if snap else os.path.abspath(__file__)
    cmd = [sys.executable, script, "--child", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=snap or ROOT, timeout=3600)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"measurement {spec} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def measure_ours(cell: dict, args: argparse.Namespace, peer, snap: str | None) -> dict:
    spec = {"shape": cell["shape"], "system": cell["system"], "threads": cell["threads"], "seed": args.seed,
            "prompt": args.prompt, "gen": args.gen, "depth": args.depth, "warmup": args.warmup,
            "reps": args.twin_reps if cell["system"] == "twin" else args.reps}
    tries = []
    for _ in range(args.retries + 1):
        with peer.Lock(args.lock):
            waited = peer.wait_idle(args.max_other)
            load0 = os.getloadavg()
            res = run_child(spec, cell["isa"], snap)
        res.update(waited_for_idle_s=waited, loadavg_before=[round(x, 2) for x in load0])
        tries.append(res)
        if res["other_cpu_s_per_wall_s"] <= args.max_other:
            break
        print(f"  other processes took {res['other_cpu_s_per_wall_s']} cores meanwhile: again", file=sys.stderr, flush=True)
    return keep_best(tries)


def keep_best(tries: list[dict]) -> dict:
    best = min(tries, key=lambda x: x["other_cpu_s_per_wall_s"])
    best["attempts"] = len(tries)
    if len(tries) > 1:
        best["discarded"] = [{k: t.get(k) for k in ("decode_tok_s", "prefill_tok_s", "other_cpu_s_per_wall_s")}
                             for t in tries if t is not best]
    return best


def measure_ik(cell: dict, args: argparse.Namespace, peer, ik: dict) -> dict:
    b = ik["builds"][IK_BUILD[cell["isa"]]]
    path = ik["files"][cell["shape"]][IK_HEAD[cell["system"]]]["path"]
    ns = argparse.Namespace(prompt=args.prompt, gen=args.gen, depth=args.depth, reps=args.ik_reps, lock=args.lock,
                            max_other=args.max_other, retries=args.retries)
    res = peer.run_bench(b["bin"], path, cell["threads"], ns)
    res["decode_tok_s_mean"], res["prefill_tok_s_mean"] = res["decode_tok_s"], res["prefill_tok_s"]
    res["decode_tok_s"] = statistics.median(res["decode_samples_tok_s"])
    res["prefill_tok_s"] = statistics.median(res["prefill_samples_tok_s"])
    return res


def prepare_ik(args: argparse.Namespace, plan: list[dict]) -> dict:
    """Builds (reused) and GGUF files (made once) through peer_ik_llamacpp.py --gguf-only."""
    need = sorted({(c["shape"], IK_BUILD[c["isa"]]) for c in plan if c["system"].startswith("ik")})
    heads = sorted({IK_HEAD[c["system"]] for c in plan if c["system"].startswith("ik")})
    out = {"builds": {}, "files": {}, "exports": {}}
    for shape, build in need:
        cmd = [sys.executable, os.path.join(HERE, "peer_ik_llamacpp.py"), "--src", args.ik_src, "--isa", build,
               "--preset", shape, "--seed", str(args.seed), "--heads", ",".join(heads), "--gguf-only"]
        if args.ik_commit:
            cmd += ["--commit", args.ik_commit]
        print("ik:", " ".join(cmd), file=sys.stderr, flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"peer_ik_llamacpp.py --gguf-only failed:\n{r.stderr[-3000:]}")
        facts = json.loads(r.stdout)
        out["builds"][build] = facts["build"]
        out["files"].setdefault(shape, {}).update(facts["files"])
        out["exports"][shape] = facts["export"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    from bitnet.bench import environment, save_results

    peer = load_peer()
    plan = cells(args)
    print(f"{len(plan)} cells a round, {args.rounds} round(s)", file=sys.stderr, flush=True)
    ik = prepare_ik(args, plan) if any(c["system"].startswith("ik") for c in plan) else {"builds": {}, "files": {}}
    snap = None if args.no_snapshot else snapshot(os.path.join(args.workdir, "snapshot"))
    ik_commit = next(iter(ik["builds"].values()), {}).get("commit", "")
    payload = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "complete": False,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "snapshot": snap, "ik_commit": ik_commit,
               "ours_kv_cache": OURS_KV_CACHE,
               "ik_builds": ik["builds"], "ik_files": ik["files"], "ik_exports": ik.get("exports"),
               "isa_env": ISA_ENV, "plan": plan, "bandwidth": [], "measurements": []}

    def save():
        payload["environment"] = environment()
        md = markdown(payload) if payload["measurements"] else None
        return save_results(args.name, payload, md, args.out_dir)

    for r in range(args.rounds):
        if not args.no_bandwidth:
            t = max(max(v) for v in [args.threads, *args.shape_threads.values()])
            with peer.Lock(args.lock):
                peer.wait_idle(args.max_other)
                bw = run_child({"mode": "bandwidth", "threads": t}, "native", snap["path"] if snap else None)
            payload["bandwidth"].append({"round": r + 1, **bw, "time": time.strftime("%H:%M:%S")})
            print(f"round {r + 1}: read bandwidth {bw['read_gbps']:.1f} GB/s", file=sys.stderr, flush=True)
        for cell in round_order(plan, r):
            t0 = time.time()
            if cell["system"].startswith("ik"):
                res = measure_ik(cell, args, peer, ik)
            else:
                res = measure_ours(cell, args, peer, snap["path"] if snap else None)
            m = {**cell, "round": r + 1, "time": time.strftime("%H:%M:%S"), "elapsed_s": round(time.time() - t0, 1), **res}
            payload["measurements"].append(m)
            print(f"round {r + 1} {cell['shape']} {cell['isa']} t{cell['threads']} {cell['system']}: decode "
                  f"{m['decode_tok_s']:.1f} tok/s, prefill {m['prefill_tok_s']:.0f} tok/s (other cores "
                  f"{m['other_cpu_s_per_wall_s']}, {m['elapsed_s']} s)", file=sys.stderr, flush=True)
            save()
    payload["complete"] = True
    payload["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    payload["summary"] = {"rows": summarize(payload["measurements"]), "ratios": ratios(payload["measurements"])}
    path = save()
    print(markdown({**payload, "environment": environment()}))
    print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

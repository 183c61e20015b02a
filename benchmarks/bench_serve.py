"""Load benchmark of `bitnet serve`: aggregate throughput, time to first token and inter-token
latency at 1, 4 and 16 concurrent streaming clients, on loopback, with the official openai client.

    python benchmarks/bench_serve.py                                  # 700m, packed 2-bit, on the CPU
    python benchmarks/bench_serve.py --clients 1 4 --requests-per-client 2 --max-tokens 16
    python benchmarks/bench_serve.py --device cuda --preset 2b4t [--no-run-ahead] [--no-prompt-graphs]
                                                         # serve_cuda[_no_run_ahead][_no_prompt_graphs]

Protocol (the issue's for the peers: 2 threads, 32 tokens per request, streamed, the openai client):
- the model: the preset with random weights (ternary codes drawn uniformly, N(0, 0.02) embeddings
  and head, bf16 float parts), packed, saved as a checkpoint folder, with a word-level tokenizer
  of the model's vocabulary ("t0" .. "t31999", so that every prompt is exactly --prompt-len tokens
  and every token streams as one chunk) and no EOS (no request ends early);
- the server: `bitnet serve` in its own process (torch's default threads: the cores), --max-batch
  the largest client count, greedy requests (temperature 0) of --max-tokens tokens each, every
  prompt different (drawn from a seeded generator);
- per level of concurrency c: c clients (asyncio tasks, one AsyncOpenAI each) send requests back
  to back, --requests-per-client each (so the batch refills as streams end), within --time-limit;
  two untimed requests warm the server up first (the first forward pages weights in; on a GPU
  the server has recorded the CUDA graphs of every step size before it listens);
- reported per level: aggregate tokens/s = completion tokens of the level / its wall time (first
  request sent to last stream ended); per-request TTFT (sent -> first token chunk) and ITL (gaps
  between token chunks), p50 and p99; per-stream decode tokens/s (median); and whether every request
  got all its tokens (finish_reason "length", usage = --max-tokens).
The peers: ik_llama.cpp's llama-server is measured by benchmarks/peer_ik_llamacpp.py --server
under this protocol; its last result file, if present, is printed beside ours; the issue's own
figures (llama-cpp-python's server too) follow, labelled as such. Results: benchmarks/results/serve_cpu.{json,md},
stamped with the machine (bitnet.bench.environment) and whether kernels/ differs from the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from bitnet import BitNetConfig
from bitnet.bench import RESULTS_DIR, environment, free_port, random_model, save_results, stop_server, wait_healthy
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.report import table

# The measurements of the peers on this Xeon type (2 threads, 700m GGUFs of the same shape,
# 32 tokens per request, streamed, the openai client). Not measured by this script.
PEERS = [
    {"system": "ik_llama.cpp llama-server -np 16 -cb (IQ2_BN)", "clients": 1, "tok_s": 51.2},
    {"system": "ik_llama.cpp llama-server -np 16 -cb (IQ2_BN)", "clients": 4, "tok_s": 89.7},
    {"system": "ik_llama.cpp llama-server -np 16 -cb (IQ2_BN)", "clients": 16, "tok_s": 100.2, "ttft_p50_s": 1.9},
    {"system": "llama-cpp-python llama_cpp.server (TQ2_0)", "clients": 1, "tok_s": 35.1,
     "note": "at 4 and 16 clients each new request interrupts the running one (36 of 128 and 48 of 512 tokens came back)"},
]


@dataclass
class Args:
    preset: str = arg("700m", help="model shape")
    packing: str = arg("2bit", help="packed format of the projections", choices=["2bit", "1.6bit"])
    clients: list[int] = arg([1, 4, 16], help="concurrency levels")
    requests_per_client: int = arg(4, help="requests each client sends, back to back, per level")
    prompt_len: int = arg(16, help="prompt tokens per request")
    max_tokens: int = arg(32, help="tokens generated per request")
    max_batch: int | None = arg(None, help="the server's --max-batch (default: the largest client count)")
    max_seq_len: int = arg(128, help="the server's --max-seq-len")
    prefill_chunk: int = arg(256, help="the server's --prefill-chunk")
    time_limit: float = arg(900.0, help="seconds per level at most: no request starts after it")
    seed: int = arg(0, help="weights and prompts")
    device: str = arg("cpu", help="the server's --device", choices=["cpu", "cuda"])
    run_ahead: bool | None = arg(None, help="the server's --run-ahead / --no-run-ahead (cuda: a decode step "
                                 "queued before the last one's tokens are read; default: the server's, on there)")
    prompt_graphs: bool | None = arg(None, help="the server's --prompt-graphs / --no-prompt-graphs (cuda: the steps "
                                     "with a prompt in pieces of CUDA graphs; default: the server's, on there)")
    name: str | None = arg(None, help="results file name (default: serve_<device>, _no_run_ahead with --no-run-ahead, "
                           "_no_prompt_graphs with --no-prompt-graphs)")
    peer_name: str = arg("peer_ik_llamacpp_serve_cpu", help="the results file of peer_ik_llamacpp.py --server "
                         "(its --serve-name) printed beside ours, where it was measured on this CPU")
    out_dir: str = arg(RESULTS_DIR, help="where the JSON and markdown go")


# ----------------------------------------------------------------------------- the model folder
def word_tokenizer(vocab_size: int) -> bytes:
    """tokenizer.json of a word-level tokenizer over "t0" .. "t{vocab_size - 1}", split on spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok.to_str().encode()


def write_folder(args: Args, path: str) -> BitNetConfig:
    config = BitNetConfig.from_preset(args.preset, eos_token_id=None)  # no EOS: every request runs to max_tokens
    model = random_model(config, torch.bfloat16, "cpu", args.seed, packing=args.packing)
    model.tokenizer_files["tokenizer.json"] = word_tokenizer(config.vocab_size)
    model.save_pretrained(path)
    return config


# ----------------------------------------------------------------------------- the server
def start_server(args: Args, folder: str, port: int, log, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`bitnet serve` on the folder in a process of its own (extra: more of its flags), once healthy."""
    cmd = [sys.executable, "-m", "bitnet", "serve", folder, "--port", str(port), "--max-batch",
           str(args.max_batch), "--max-seq-len", str(args.max_seq_len), "--prefill-chunk", str(args.prefill_chunk),
           "--max-queue", str(4 * args.max_batch), "--device", args.device, "--log-level", "warning", *extra]
    if args.run_ahead is not None:
        cmd.append("--run-ahead" if args.run_ahead else "--no-run-ahead")
    if args.prompt_graphs is not None:
        cmd.append("--prompt-graphs" if args.prompt_graphs else "--no-prompt-graphs")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "BITNET_API_KEY": ""})
    wait_healthy(proc, f"http://127.0.0.1:{port}", "bitnet serve", log.name)
    return proc


# ----------------------------------------------------------------------------- the clients
async def one_request(client, model: str, prompt: str, max_tokens: int, extra_body: dict | None = None) -> dict:
    """One streamed greedy completion (extra_body: server-specific fields, e.g. a peer's ignore_eos)."""
    sent = time.perf_counter()
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             **({"extra_body": extra_body} if extra_body else {}))
    times, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].text:
                times.append(time.perf_counter())
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return {"sent": sent, "token_times": times, "finish_reason": finish, "completion_tokens": usage}


async def level(args, url: str, model: str, clients: int, prompts: list[str], extra_body: dict | None = None) -> list[dict]:
    """`clients` streaming clients sending `prompts` back to back (args: max_tokens, time_limit)."""
    import openai

    queue = list(prompts)
    deadline = time.perf_counter() + args.time_limit
    done: list[dict] = []

    async def worker():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
        try:
            while queue and time.perf_counter() < deadline:
                done.append(await one_request(client, model, queue.pop(), args.max_tokens, extra_body))
        finally:
            await client.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return done


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    x = (len(v) - 1) * q
    lo, hi = math.floor(x), math.ceil(x)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def summarize(clients: int, runs: list[dict], max_tokens: int) -> dict:
    ttft = [r["token_times"][0] - r["sent"] for r in runs if r["token_times"]]
    itl = [b - a for r in runs for a, b in zip(r["token_times"], r["token_times"][1:])]
    per_stream = [(len(r["token_times"]) - 1) / (r["token_times"][-1] - r["token_times"][0])
                  for r in runs if len(r["token_times"]) > 1]
    tokens = sum(r["completion_tokens"] or 0 for r in runs)
    wall = max(r["token_times"][-1] for r in runs if r["token_times"]) - min(r["sent"] for r in runs)
    complete = sum(r["finish_reason"] == "length" and r["completion_tokens"] == max_tokens for r in runs)
    return {"clients": clients, "requests": len(runs), "complete": complete, "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_s": percentile(itl, 0.5), "itl_p99_s": percentile(itl, 0.99),
            "stream_tok_s_median": statistics.median(per_stream) if per_stream else None}


def step_stats(url: str) -> dict[str, float]:
    """The server's step histograms from /metrics: {kind_count, kind_sum} for decode / prefill / mixed."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name in ("bitnet_step_seconds_count", "bitnet_step_seconds_sum"):
                out[f"{s.labels['kind']}_{s.name.rsplit('_', 1)[1]}"] = s.value
    return out


def step_summary(before: dict, after: dict) -> dict:
    """Steps of one level by kind (decode only / prefill only / both): count and mean ms."""
    out = {}
    for kind in ("decode", "prefill", "mixed"):
        n = after.get(f"{kind}_count", 0) - before.get(f"{kind}_count", 0)
        t = after.get(f"{kind}_sum", 0) - before.get(f"{kind}_sum", 0)
        out[f"{kind}_steps"] = int(n)
        out[f"{kind}_step_ms"] = t / n * 1e3 if n else None
    return out


def kernels_state() -> dict:
    """Whether kernels/ (the native kernels' source) differs from the commit the results name."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["git", "status", "--porcelain", "--", "kernels"], cwd=root, capture_output=True, text=True)
    return {"kernels_dirty": bool(r.stdout.strip()) if r.returncode == 0 else None}


# ----------------------------------------------------------------------------- report
def report(args: Args, rows: list[dict], env: dict) -> str:
    one = next((r for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["vs_one"] = r["tok_s"] / one["tok_s"] if one else None
        for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"):
            r[k.replace("_s", "_ms")] = None if r[k] is None else r[k] * 1e3
        r["complete_of"] = f"{r['complete']}/{r['requests']}"
    md = [
        f"# `bitnet serve` under load: preset `{args.preset}` (packed {args.packing}, random weights) on {env['device']}",
        "",
        f"CPU flags {', '.join(env['cpu_flags'])}; server with {env['cpu_threads']} torch threads; load average at the "
        f"end {env['loadavg']}; commit {str(env['commit'])[:10]}{' (dirty tree' if env['dirty'] else ''}"
        f"{', kernels/ changed' if env.get('kernels_dirty') else ''}{')' if env['dirty'] else ''}. Requests: prompt "
        f"{args.prompt_len} tokens, {args.max_tokens} tokens generated, greedy, streamed, the openai client on loopback; "
        f"{args.requests_per_client} requests per client back to back; server --max-batch {args.max_batch}, "
        f"--max-seq-len {args.max_seq_len}"
        f"{'' if args.run_ahead is None else ' --run-ahead' if args.run_ahead else ' --no-run-ahead'}"
        f"{'' if args.prompt_graphs is None else ' --prompt-graphs' if args.prompt_graphs else ' --no-prompt-graphs'}. "
        "Protocol: benchmarks/bench_serve.py.",
        "",
        "## Ours (measured by this script)",
        "",
        table(rows, [("clients", "clients", ""), ("tok_s", "aggregate tok/s", ".1f"), ("vs_one", "x one client", ".2f"),
                     ("stream_tok_s_median", "per-stream tok/s", ".1f"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
                     ("ttft_p99_ms", "TTFT p99 ms", ".0f"), ("itl_p50_ms", "ITL p50 ms", ".0f"),
                     ("itl_p99_ms", "ITL p99 ms", ".0f"), ("complete_of", "requests complete", "")], markdown=True),
        "",
        "The server's steps (one forward each; from its /metrics): decode-only steps, and steps that also "
        "prefill newcomers' prompts (mixed) or only prefill:",
        "",
        table(rows, [("clients", "clients", ""), ("decode_steps", "decode steps", ""),
                     ("decode_step_ms", "ms / decode step", ".1f"), ("mixed_steps", "mixed steps", ""),
                     ("mixed_step_ms", "ms / mixed step", ".1f"), ("prefill_steps", "prefill steps", ""),
                     ("prefill_step_ms", "ms / prefill step", ".1f")], markdown=True),
        "",
    ]
    top = max(rows, key=lambda r: r["clients"])
    if one and top is not one:
        peer = next((p for p in PEERS if p["clients"] == top["clients"] and p["system"].startswith("ik_llama")
                     and args.device == "cpu"), None)
        md += [
            f"At {top['clients']} clients: {top['vs_one']:.2f}x the aggregate of one client (the issue's target: >= 5x); "
            + (f"a decode step of {top['clients']} sequences takes {top['decode_step_ms'] / one['decode_step_ms']:.2f}x "
               f"the time of one ({top['decode_step_ms']:.1f} vs {one['decode_step_ms']:.1f} ms); "
               if top.get("decode_step_ms") and one.get("decode_step_ms") else "")
            + (f"{top['tok_s'] / peer['tok_s']:.2f}x the issue's ik_llama.cpp figure at {top['clients']} clients "
               f"({top['tok_s']:.1f} vs {peer['tok_s']} tok/s, theirs measured elsewhere)." if peer else ""),
            "",
        ]
    if args.device != "cpu":  # the peers below are CPU servers
        return "\n".join(md)
    measured = measured_peer(args.peer_name)
    if measured and measured["environment"].get("cpu") != environment()["cpu"]:
        measured = None  # another machine's: not beside ours
    if measured:
        env = measured["environment"]
        md += [
            "## ik_llama.cpp's llama-server, measured in this repository",
            "",
            f"`benchmarks/peer_ik_llamacpp.py --server` ({env['date'][:16]}, {env['cpu']}, ik {measured['build']['commit'][:12]}, "
            f"{measured['file']['types']['projections'][0]} with {measured['file']['types']['output']} head, "
            f"`{' '.join(measured['command'].split()[-11:-4])}`), the same protocol; ours above, at their concurrency levels:",
            "",
            table([{"clients": lv["clients"], "ik": lv["tok_s"], "ttft": 1000 * lv["ttft_p50_s"], "itl": 1000 * lv["itl_p50_s"],
                    "ours": next((r["tok_s"] for r in rows if r["clients"] == lv["clients"]), None),
                    "ratio": next((r["tok_s"] / lv["tok_s"] for r in rows if r["clients"] == lv["clients"]), None)}
                   for lv in measured["levels"]],
                  [("clients", "clients", ""), ("ik", "ik_llama.cpp tok/s", ".1f"), ("ttft", "its TTFT p50 ms", ".0f"),
                   ("itl", "its ITL p50 ms", ".0f"), ("ours", "ours tok/s", ".1f"), ("ratio", "ours / ik", ".2f")],
                  markdown=True),
            "",
        ]
    md += [
        "## The peers: the issue's figures, not measured here",
        "",
        "Measured elsewhere on a 2-core Xeon (AMX), the issue's machine type (2 threads, 700m GGUFs of the same "
        "shape, 32 tokens per request, "
        "streamed, the openai client), as the issue reports them:",
        "",
        table([{**p, "ttft": "" if "ttft_p50_s" not in p else f"{p['ttft_p50_s']:.1f} s", "note": p.get("note", "")}
               for p in PEERS],
              [("system", "system (issue's figures)", ""), ("clients", "clients", ""), ("tok_s", "aggregate tok/s", ".1f"),
               ("ttft", "TTFT p50", ""), ("note", "note", "")], markdown=True),
    ]
    return "\n".join(md)


def measured_peer(name: str) -> dict | None:
    """benchmarks/results/<name>.json (peer_ik_llamacpp.py --server --serve-name <name>), if measured here."""
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, Args)
    ns = parser.parse_args(argv)
    args = Args(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Args)})
    args = dataclasses.replace(args, max_batch=args.max_batch or max(args.clients),
                               name=args.name or f"serve_{args.device}" + ("_no_run_ahead" if args.run_ahead is False else "")
                               + ("_no_prompt_graphs" if args.prompt_graphs is False else ""))
    if (args.run_ahead is not None or args.prompt_graphs is not None) and args.device != "cuda":
        parser.error("--run-ahead / --no-run-ahead and --prompt-graphs / --no-prompt-graphs choose how a GPU server "
                     "steps: they need --device cuda")
    if args.prompt_len + args.max_tokens > args.max_seq_len:
        parser.error("--prompt-len + --max-tokens must fit --max-seq-len")
    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        folder = os.path.join(tmp, "model")
        print(f"writing a random {args.preset} ({args.packing}) to {folder} ...", file=sys.stderr, flush=True)
        config = write_folder(args, folder)
        port = free_port()
        with open(os.path.join(tmp, "server.log"), "w+") as log:
            proc = start_server(args, folder, port, log)
            try:
                url = f"http://127.0.0.1:{port}"
                g = torch.Generator().manual_seed(args.seed)

                def prompts(n):
                    ids = torch.randint(0, config.vocab_size, (n, args.prompt_len), generator=g).tolist()
                    return [" ".join(f"t{i}" for i in p) for p in ids]

                asyncio.run(level(args, url, folder, 1, prompts(2)))  # warm-up, untimed
                for c in args.clients:
                    print(f"{c} client(s) ...", file=sys.stderr, flush=True)
                    before = step_stats(url)
                    runs = asyncio.run(level(args, url, folder, c, prompts(c * args.requests_per_client)))
                    raw[c] = runs
                    rows.append({**summarize(c, runs, args.max_tokens), **step_summary(before, step_stats(url))})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            finally:
                stop_server(proc)
                log.seek(0)
                server_log = log.read()[-4000:]
    env = {**environment(), **kernels_state()}
    markdown = report(args, rows, env)
    path = save_results(args.name, {"args": dataclasses.asdict(args), **kernels_state(), "levels": rows,
                                    "peers_from_the_issue": PEERS, "server_log_tail": server_log,
                                    "requests": {str(c): [{"ttft_s": r["token_times"][0] - r["sent"] if r["token_times"]
                                                           else None, "tokens": r["completion_tokens"],
                                                           "finish_reason": r["finish_reason"]} for r in runs]
                                                 for c, runs in raw.items()}},
                        markdown, args.out_dir)
    print(markdown)
    print(f"\nsaved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

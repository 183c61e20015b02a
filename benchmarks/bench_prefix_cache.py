"""Prefix caching in `bitnet serve`: multi-turn chats with a shared system prompt, the same server
with the cache (its default) and without (--no-prefix-cache), side by side.

    python benchmarks/bench_prefix_cache.py                         # 700m, packed 2-bit, on the CPU
    python benchmarks/bench_prefix_cache.py --conversations 2 --turns 3 --rounds 1

Protocol:
- the model and tokenizer of benchmarks/bench_serve.py (the preset with random weights, packed,
  a word-level tokenizer: a prompt of n words is n tokens, a reply's text re-tokenizes into its
  own tokens), no EOS;
- the workload: --conversations chats at once (one client each, streaming), --turns turns each.
  Every chat starts with the same --system-len-token system prompt (an application's); turn k
  sends the whole conversation so far (system prompt, then each earlier turn's --user-len-token
  message and the reply the server gave) and a new user message, as every chat client does, and
  asks for --max-tokens tokens (greedy). Prompts grow by user-len + max-tokens a turn;
- the systems: `bitnet serve` with --max-batch = --conversations and the same flags but
  --no-prefix-cache for the second, each in a process of its own, one at a time, their order
  alternating by round (A B, B A, ...); a server's first conversation set is preceded by two
  untimed requests (pages the weights in) with prompts of their own;
- reported per system (median over rounds of each round's figure): wall time of the whole
  workload, time to first token (sent -> first token) p50 of the first turns and of the later
  ones, the prompt tokens the server ran (its bitnet_prefill_tokens_total) and those it read from
  the cache (usage.prompt_tokens_details.cached_tokens summed), and whether the two systems'
  replies are the same text (greedy; on the CPU a prompt after a cached prefix gets its whole
  prefill's logits bit for bit, so all should be; on a GPU within float rounding).
Results: benchmarks/results/prefix_cache_<device>.{json,md}, stamped (bitnet.bench.environment).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from bitnet.bench import RESULTS_DIR, environment, free_port, load_script, save_results, stop_server
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.report import table

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = {"prefix cache": (), "no prefix cache": ("--no-prefix-cache",)}


@dataclass
class Args:
    preset: str = arg("700m", help="model shape")
    packing: str = arg("2bit", help="packed format of the projections", choices=["2bit", "1.6bit"])
    conversations: int = arg(4, help="chats at once (the server's --max-batch)")
    turns: int = arg(4, help="turns of each chat")
    system_len: int = arg(256, help="tokens of the system prompt every chat starts with")
    user_len: int = arg(64, help="tokens of each user message")
    max_tokens: int = arg(32, help="tokens of each reply")
    prefill_chunk: int = arg(256, help="the server's --prefill-chunk")
    rounds: int = arg(2, help="rounds; each runs both systems, in alternating order")
    seed: int = arg(0, help="weights and texts")
    device: str = arg("cpu", help="the server's --device", choices=["cpu", "cuda"])
    name: str | None = arg(None, help="results file name (default: prefix_cache_<device>)")
    out_dir: str = arg(RESULTS_DIR, help="where the JSON and markdown go")


def words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


async def chat(client, model: str, system: str, users: list[str], max_tokens: int,
               extra_body: dict | None = None) -> list[dict]:
    """One conversation, turn by turn: each turn's prompt is the conversation so far and its new
    message; per turn the time to first token, the reply and the usage (extra_body: a peer
    server's own fields; where it sends no usage, the streamed chunks are counted and llama-server's
    `timings.prompt_n`, the prompt tokens it ran, is kept)."""
    history, turns = system, []
    for user in users:
        prompt = f"{history} {user}"
        sent = time.perf_counter()
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 **({"extra_body": extra_body} if extra_body else {}))
        first, text, usage, timings = None, [], None, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage
            timings = (chunk.model_extra or {}).get("timings") or timings
        reply = "".join(text).strip()
        details = usage.prompt_tokens_details if usage is not None else None
        turns.append({"ttft_s": first - sent, "end_s": time.perf_counter(), "reply": reply,
                      "prompt_tokens": usage.prompt_tokens if usage is not None else None,
                      "completion_tokens": usage.completion_tokens if usage is not None else len(text),
                      "cached_tokens": details.cached_tokens if details else 0,
                      "prompt_run": timings.get("prompt_n") if timings else None})
        history = f"{prompt} {reply}"
    return turns


async def workload(url: str, model: str, texts: dict, max_tokens: int, extra_body: dict | None = None) -> dict:
    import httpx
    import openai

    # a connection a request (no keep-alive): llama-server closed a kept connection under a turn that
    # followed another at once ("Server disconnected without sending a response"); loopback connects cost ~0.1 ms
    clients = [openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600,
                                  http_client=httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0),
                                                                timeout=3600))
               for _ in texts["users"]]
    t0 = time.perf_counter()
    try:
        chats = await asyncio.gather(*(chat(c, model, texts["system"], users, max_tokens, extra_body)
                                       for c, users in zip(clients, texts["users"])))
    finally:
        for c in clients:
            await c.close()
    return {"wall_s": time.perf_counter() - t0, "chats": chats}


def prefill_tokens(url: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "bitnet_prefill_tokens_total":
                return s.value
    raise RuntimeError("bitnet_prefill_tokens_total missing from /metrics")


def summary(run: dict) -> dict:
    turns = [t for c in run["chats"] for t in c]
    first = [c[0]["ttft_s"] for c in run["chats"]]
    later = [t["ttft_s"] for c in run["chats"] for t in c[1:]]
    return {"wall_s": run["wall_s"], "ttft_first_p50_ms": statistics.median(first) * 1e3,
            "ttft_later_p50_ms": statistics.median(later) * 1e3 if later else None,
            "prompt_tokens": sum(t["prompt_tokens"] for t in turns), "cached_tokens": sum(t["cached_tokens"] for t in turns),
            "prefilled_tokens": run["prefilled"], "complete": sum(t["completion_tokens"] == run["max_tokens"] for t in turns),
            "turns": len(turns)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, Args)
    ns = parser.parse_args(argv)
    args = Args(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Args)})
    args = dataclasses.replace(args, name=args.name or f"prefix_cache_{args.device}")
    serve = load_script(os.path.join(HERE, "bench_serve.py"))
    longest = args.system_len + args.turns * (args.user_len + args.max_tokens)
    sargs = serve.Args(preset=args.preset, packing=args.packing, max_batch=args.conversations,
                       max_seq_len=longest + 16, prefill_chunk=args.prefill_chunk, seed=args.seed, device=args.device)
    runs: dict[str, list[dict]] = {name: [] for name in SYSTEMS}
    with tempfile.TemporaryDirectory(prefix="bench_prefix_cache_") as tmp:
        folder = os.path.join(tmp, "model")
        print(f"writing a random {args.preset} ({args.packing}) to {folder} ...", file=sys.stderr, flush=True)
        config = serve.write_folder(sargs, folder)
        g = torch.Generator().manual_seed(args.seed + 1)
        draw = lambda n: words(torch.randint(0, config.vocab_size, (n,), generator=g).tolist())  # noqa: E731
        warm = [draw(args.system_len) for _ in range(2)]
        texts = [{"system": draw(args.system_len),
                  "users": [[draw(args.user_len) for _ in range(args.turns)] for _ in range(args.conversations)]}
                 for _ in range(args.rounds)]
        for r in range(args.rounds):
            for name in (list(SYSTEMS) if r % 2 == 0 else list(SYSTEMS)[::-1]):
                port = free_port()
                with open(os.path.join(tmp, f"server_{r}_{len(runs[name])}.log"), "w+") as log:
                    proc = serve.start_server(sargs, folder, port, log, SYSTEMS[name])
                    try:
                        url = f"http://127.0.0.1:{port}"
                        asyncio.run(serve.level(dataclasses.replace(sargs, max_tokens=4), url, folder, 1, warm))
                        before = prefill_tokens(url)
                        print(f"round {r + 1}: {name} ...", file=sys.stderr, flush=True)
                        run = asyncio.run(workload(url, folder, texts[r], args.max_tokens))
                        run.update(prefilled=prefill_tokens(url) - before, max_tokens=args.max_tokens, round=r + 1)
                        runs[name].append(run)
                        print(f"  {summary(run)}", file=sys.stderr, flush=True)
                    finally:
                        stop_server(proc)
    rows = []
    for name, rs in runs.items():
        s = [summary(run) for run in rs]
        row = {"system": name, **{k: statistics.median(x[k] for x in s) for k in
                                  ("wall_s", "ttft_first_p50_ms", "ttft_later_p50_ms", "prompt_tokens", "cached_tokens",
                                   "prefilled_tokens")},
               "complete": f"{sum(x['complete'] for x in s)}/{sum(x['turns'] for x in s)}",
               "per_round_wall_s": [round(x["wall_s"], 2) for x in s]}
        rows.append(row)
    base = rows[1]
    for row in rows:
        row["speedup"] = base["wall_s"] / row["wall_s"]
        row["ttft_later_vs"] = base["ttft_later_p50_ms"] / row["ttft_later_p50_ms"] if row["ttft_later_p50_ms"] else None
    same = sum(a["reply"] == b["reply"] for ra, rb in zip(*runs.values()) for ca, cb in zip(ra["chats"], rb["chats"])
               for a, b in zip(ca, cb))
    total = sum(len(c) for run in runs["prefix cache"] for c in run["chats"])
    env = environment()
    md = [f"# Prefix caching in `bitnet serve`: multi-turn chats, preset `{args.preset}` (packed {args.packing}, random "
          f"weights) on {env['device']}", "",
          f"CPU flags {', '.join(env['cpu_flags'])}; server with {env['cpu_threads']} torch threads; commit "
          f"{str(env['commit'])[:10]}{' (dirty tree)' if env['dirty'] else ''}; {env['date']}. {args.conversations} "
          f"chats at once, {args.turns} turns each: a shared {args.system_len}-token system prompt, then per turn a "
          f"{args.user_len}-token message and a {args.max_tokens}-token greedy reply; each turn sends the whole "
          f"conversation (prompts {args.system_len + args.user_len} to {longest - args.max_tokens} tokens). Server "
          f"--max-batch {args.conversations} --prefill-chunk {args.prefill_chunk}, the one with --no-prefix-cache. "
          f"{args.rounds} round(s), the systems' order alternating; cells: median over rounds. Protocol: "
          "benchmarks/bench_prefix_cache.py.", "",
          table(rows, [("system", "server", ""), ("wall_s", "workload s", ".2f"), ("speedup", "x no cache", ".2f"),
                       ("ttft_first_p50_ms", "TTFT first turn p50 ms", ".0f"),
                       ("ttft_later_p50_ms", "TTFT later turns p50 ms", ".0f"),
                       ("ttft_later_vs", "later-turn TTFT, x no cache", ".2f"),
                       ("prompt_tokens", "prompt tokens sent", ".0f"), ("cached_tokens", "read from the cache", ".0f"),
                       ("prefilled_tokens", "run through the model", ".0f"), ("complete", "replies complete", ""),
                       ("per_round_wall_s", "workload s per round", "")]), "",
          f"Replies equal between the two servers: {same} of {total} (greedy; "
          + ("on the CPU a prompt after a cached prefix gets its whole prefill's logits bit for bit, so every reply "
             "should be equal)." if args.device == "cpu" else "on a GPU a prompt after a cached prefix gets its whole "
             "prefill's logits within float rounding: a near tie may differ).")]
    markdown = "\n".join(md)
    path = save_results(args.name, {"args": dataclasses.asdict(args), "rows": rows, "same_replies": [same, total],
                                    "runs": runs}, markdown, args.out_dir)
    print(markdown)
    print(f"\nsaved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

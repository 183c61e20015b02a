"""End-to-end generation: BitNet b1.58 on packed 2-bit weights vs its BF16 twin, same shapes.

    python benchmarks/bench_generate.py                      # GPU: 2b4t shape; CPU: "small"
    python benchmarks/bench_generate.py --preset base --batch 1 8 --new-tokens 64

For each model (the packed BitNet, then the twin with nn.Linear in bf16), each batch size:
- prefill tokens/s: `generate(prompt, 1)` (one forward over B x T prompt tokens into the cache),
- decode tokens/s: B * (N - 1) / (time of `generate(prompt, N)` - time of `generate(prompt, 1)`),
  the real generate loop (sampling, cache writes, `compile` on GPU: CUDA graphs) minus prefill,
- weights streamed per decode step / step time (GB/s): the projections and lm_head,
- peak memory: torch.cuda.max_memory_allocated on GPU (weights + cache + activations); on CPU
  the peak RSS of the process that measured that model, less its RSS before building it (after
  a warm-up on the tiny preset, so that torch's own code pages and pools are not counted).
Weights are random (ternary codes drawn uniformly, N(0, 0.02) embeddings), built on the meta
device and materialized in their final dtype as a checkpoint load would be, so that no float copy
of the BitNet projections ever exists. Each model is measured in a fresh process (`--isolate`),
so that one model's memory does not count toward the other's. Median of `--iters` timed runs
after `--warmup` runs (which also compile). Results: benchmarks/results/generate_{cpu,cuda}.json
and .md, stamped with device, versions and commit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import multiprocessing
import resource
import sys
from dataclasses import dataclass

import torch
from torch import nn

from bitnet import BitLinear, BitNetConfig, BitNetForCausalLM, RMSNorm, freeze, weight_bytes
from bitnet.bench import L2Flusher, environment, save_results, time_cpu, time_cuda
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.generation import generate
from bitnet.packing import pack
from bitnet.report import human_bytes, table

MODELS = [("bitnet", "BitNet b1.58 (packed 2-bit)"), ("bf16", "BF16 twin")]


@dataclass
class Args:
    preset: str | None = arg(None, help="model shape (default: 2b4t on a GPU, small on a CPU)")
    device: str | None = arg(None, help="cuda or cpu (default: cuda when available)")
    batch: list[int] = arg([1, 8], help="batch sizes")
    prompt_len: int | None = arg(None, help="prompt tokens per sequence (default: 128 on a GPU, 64 on a CPU)")
    new_tokens: int | None = arg(None, help="tokens generated per sequence (default: 128 on a GPU, 32 on a CPU)")
    compile: bool | None = arg(None, help="compile the decode step (default: on a GPU only)")
    warmup: int = arg(2, help="untimed runs first (compiling happens here)")
    iters: int = arg(5, help="timed runs; the median is reported")
    isolate: bool = arg(True, help="measure each model in a fresh process (clean peak memory)")
    name: str | None = arg(None, help="results file name (default: generate_cpu or generate_cuda)")

    def resolved(self) -> "Args":
        gpu = (self.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        return dataclasses.replace(
            self, device=self.device or ("cuda" if gpu else "cpu"), preset=self.preset or ("2b4t" if gpu else "small"),
            prompt_len=self.prompt_len or (128 if gpu else 64), new_tokens=self.new_tokens or (128 if gpu else 32),
            compile=gpu if self.compile is None else self.compile, name=self.name or f"generate_{'cuda' if gpu else 'cpu'}")


def random_model(config: BitNetConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> BitNetForCausalLM:
    """A model of `config` with random weights, made on the meta device and materialized in place."""
    with torch.device("meta"):
        model = BitNetForCausalLM(config).to(dtype)
    if config.linear != "bf16":
        freeze(model)  # uint8 packed weights and float32 scales, still without memory
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BitLinear):
                w_q = torch.randint(-1, 2, (m.out_features, m.in_features), generator=g, device=device, dtype=torch.int8)
                m.weight.copy_(pack(w_q, m.packing))
                m.weight_scale.fill_(0.02 * math.sqrt(2 / math.pi))  # mean|W| of N(0, 0.02)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02, generator=g)
    model.model.rotary.reset(device)
    return model.eval()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args: Args, linear: str) -> dict:
    """Build one model and time prefill and decode at every batch size."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # The first run of any code path pages in hundreds of MB of torch's own code and fills its
    # allocator pools; run the same path once on the tiny preset so that RSS counts the model.
    warm = random_model(BitNetConfig.from_preset("tiny", linear=linear), torch.bfloat16, device)
    generate(warm, torch.zeros(max(args.batch), 8, dtype=torch.long, device=device), 2)
    del warm
    rss_before = rss_bytes()
    config = BitNetConfig.from_preset(args.preset, linear=linear)
    model = random_model(config, torch.bfloat16, device)
    sizes = weight_bytes(model)
    streamed = sizes["linear"] + model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    flush = L2Flusher(device=device) if cuda else None
    T, N = args.prompt_len, args.new_tokens
    rows = []
    for B in args.batch:
        prompt = torch.randint(0, config.vocab_size, (B, T), device=device, generator=torch.Generator(device).manual_seed(B))
        model.setup_cache(B, T + N)  # held by us: every generate call reuses it (and its CUDA graphs)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def run(n: int) -> torch.Tensor:
            return generate(model, prompt, n, compile=args.compile)

        def timed(fn) -> float:
            if cuda:
                return time_cuda(fn, warmup=args.warmup, iters=args.iters, flush=flush)
            return time_cpu(fn, warmup=args.warmup, iters=args.iters)

        prefill_ms = timed(lambda: run(1))
        total_ms = timed(lambda: run(N))
        step_ms = (total_ms - prefill_ms) / (N - 1)
        rows.append({
            "linear": linear, "batch": B, "prompt_len": T, "new_tokens": N,
            "prefill_ms": prefill_ms, "prefill_tok_s": B * T / prefill_ms * 1e3,
            "generate_ms": total_ms, "decode_ms_per_step": step_ms, "decode_tok_s": B / step_ms * 1e3,
            "decode_weight_gb_s": streamed / (step_ms * 1e-3) / 1e9,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        })
        model.clear_cache()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"linear": linear, "weight_bytes": sizes, "decode_streamed_bytes": streamed,
            "peak_rss_over_start_bytes": peak_rss - rss_before, "rows": rows}


def measure_isolated(args: Args, linear: str) -> dict:
    if not args.isolate:
        return measure(args, linear)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no memory or CUDA state carried over
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(measure, args, linear).result()


def report(args: Args, results: dict[str, dict]) -> tuple[str, dict]:
    """Markdown table and summary ratios (BitNet over twin)."""
    names = dict(MODELS)
    bit, twin = results["bitnet"], results["bf16"]
    rows = []
    for r in bit["rows"] + twin["rows"]:
        res = results[r["linear"]]
        mem = r["peak_memory_bytes"] if r["peak_memory_bytes"] is not None else res["peak_rss_over_start_bytes"]
        rows.append({**r, "model": names[r["linear"]], "weights": human_bytes(res["weight_bytes"]["total"]),
                     "memory": human_bytes(mem)})
    ratios = []
    for a, b in zip(bit["rows"], twin["rows"]):
        ratios.append({"batch": a["batch"], "decode_speedup": a["decode_tok_s"] / b["decode_tok_s"],
                       "prefill_speedup": a["prefill_tok_s"] / b["prefill_tok_s"]})
    summary = {
        "weights_smaller_total": twin["weight_bytes"]["total"] / bit["weight_bytes"]["total"],
        "weights_smaller_linear": twin["weight_bytes"]["linear"] / bit["weight_bytes"]["linear"],
        "by_batch": ratios,
    }
    memory = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak RSS of its process over its RSS before the build (after a warm-up on the tiny preset)"
    md = [
        f"# Generation, BitNet packed vs BF16 twin: preset `{args.preset}` on {environment()['device']}",
        "",
        f"Prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, compile={args.compile}, bf16 "
        f"activations; median of {args.iters}. Memory: {memory}.",
        "",
        table(rows, [("model", "model", ""), ("batch", "batch", ""), ("prefill_tok_s", "prefill tok/s", ".0f"),
                     ("decode_tok_s", "decode tok/s", ".1f"), ("decode_ms_per_step", "ms/step", ".2f"),
                     ("decode_weight_gb_s", "weights GB/s", ".2f"), ("memory", "peak memory", ""),
                     ("weights", "weight bytes", "")], markdown=True),
        "",
        f"Weights {summary['weights_smaller_total']:.2f}x smaller in total "
        f"({human_bytes(bit['weight_bytes']['total'])} vs {human_bytes(twin['weight_bytes']['total'])}), "
        f"{summary['weights_smaller_linear']:.2f}x on the projections.",
        "",
        table(ratios, [("batch", "batch", ""), ("decode_speedup", "decode speed, BitNet / twin", ".2f"),
                       ("prefill_speedup", "prefill speed, BitNet / twin", ".2f")], markdown=True),
    ]
    return "\n".join(md), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, Args)
    ns = parser.parse_args(argv)
    args = Args(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Args)}).resolved()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode is timed as N tokens minus the first)")
    results = {}
    for linear, label in MODELS:
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        results[linear] = measure_isolated(args, linear)
    markdown, summary = report(args, results)
    path = save_results(args.name, {"args": dataclasses.asdict(args), "results": results, "summary": summary}, markdown)
    print(markdown)
    print(f"\nsaved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

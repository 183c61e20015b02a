"""End-to-end generation: BitNet b1.58 on packed weights vs its twin (nn.Linear), same shapes.

    python benchmarks/bench_generate.py                      # GPU: 2b4t shape; CPU: "700m"
    python benchmarks/bench_generate.py --preset base --batch 1 8 --new-tokens 64

Models: on a GPU the packed 2-bit BitNet and the BF16 twin; on a CPU also the 1.6-bit and the
binary 1-bit packings and the twin in fp32 (CPU users run either; ratios are taken against the
faster of the two). Float parts (embeddings, norms, lm_head) are bf16 in the packed models too.
For each model, each batch size:
- prefill tokens/s: `generate(prompt, 1)` (one forward over B x T prompt tokens into the cache),
  eager as generate runs it; for the longer prefill also (GPU, `--prefill-graph`) the same forward
  recorded once as a CUDA graph and replayed (CUDA graphs on both sides: the kernels' time without
  the host's), and the kernels' summed time of one eager prefill ("busy", from the profiler: well
  under the eager time, the eager prefill waits on the host),
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
after `--warmup` runs (which also compile); `--rounds` passes over all the models (CPU default 3,
in alternating order), timings the median over rounds, each ratio taken within a round (median
and min-max reported), since a VM's speed drifts over the minutes a pass takes. Results: benchmarks/results/generate_{cpu,cuda}.json
and .md, stamped with device, versions and commit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import resource
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitnet import BitNetConfig, weight_bytes
from bitnet.bench import (RESULTS_DIR, L2Flusher, environment, profile_ops, random_model, save_results, step_profile,
                          time_cpu, time_cuda)
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.generation import CapturedForward, generate, prefill
from bitnet.ops import default_kernel, record_cuda_graph
from bitnet.report import human_bytes, table

@dataclass(frozen=True)
class Model:
    key: str
    linear: str  # BitNetConfig.linear
    packing: str | None
    dtype: torch.dtype
    label: str
    head_bits: int | None = None  # a quantized lm_head (model.quantize_lm_head(bits)), else the float one
    pdl: bool = True  # False: the Triton kernels launch serialized (BITNET_PDL=0), the A/B of common.pdl
    norm_in_gemm: bool = True  # False: a batched step's norms launch apart (BITNET_GEMM_NORM_M=0), the A/B of NORM


MODELS = {m.key: m for m in [
    Model("bitnet", "bitnet", "2bit", torch.bfloat16, "BitNet b1.58 (packed 2-bit)"),
    Model("bitnet-1.6bit", "bitnet", "1.6bit", torch.bfloat16, "BitNet b1.58 (packed 1.6-bit)"),
    Model("bitnet1", "bitnet1", "1bit", torch.bfloat16, "BitNet binary (packed 1-bit)"),
    Model("bitnet-int8head", "bitnet", "2bit", torch.bfloat16, "BitNet b1.58 (2-bit, int8 lm_head)", head_bits=8),
    Model("bitnet-int4head", "bitnet", "2bit", torch.bfloat16, "BitNet b1.58 (2-bit, int4 lm_head)", head_bits=4),
    Model("bitnet-serial", "bitnet", "2bit", torch.bfloat16, "BitNet b1.58 (packed 2-bit, launches serialized)",
          pdl=False),
    Model("bitnet-norm-apart", "bitnet", "2bit", torch.bfloat16, "BitNet b1.58 (packed 2-bit, batched norms apart)",
          norm_in_gemm=False),
    Model("bf16", "bf16", None, torch.bfloat16, "BF16 twin"),
    Model("fp32", "bf16", None, torch.float32, "twin in fp32"),
]}
GPU_MODELS = ["bitnet", "bf16"]
CPU_MODELS = ["bitnet", "bitnet-1.6bit", "bitnet1", "bitnet-int8head", "bf16", "fp32"]
TWINS = ("bf16", "fp32")


@dataclass
class Args:
    preset: str | None = arg(None, help="model shape (default: 2b4t on a GPU, 700m on a CPU)")
    device: str | None = arg(None, help="cuda or cpu (default: cuda when available)")
    models: list[str] | None = arg(None, help=f"models to measure, of {', '.join(MODELS)} (default: GPU {' '.join(GPU_MODELS)}, "
                                   f"CPU {' '.join(CPU_MODELS)})")
    batch: list[int] | None = arg(None, help="batch sizes (default: 1 8 on a GPU, 1 on a CPU)")
    prompt_len: int | None = arg(None, help="prompt tokens per sequence (default: 128 on a GPU, 16 on a CPU)")
    prefill_len: int | None = arg(None, help="tokens of a separate, longer prefill timing (default: 512 on a GPU, 128 on a CPU)")
    new_tokens: int | None = arg(None, help="tokens generated per sequence (default: 128 on a GPU, 32 on a CPU)")
    compile: bool | None = arg(None, help="compile the decode step (default: on a GPU only)")
    prefill_graph: bool | None = arg(None, help="GPU: also time the longer prefill recorded as a CUDA graph and replayed, "
                                     "and its kernels' busy time (default: on a GPU)")
    cuda_graph: bool = arg(False, help="GPU: record the eager decode step as a CUDA graph and replay it (no compiler; "
                           "instead of --compile)")
    warmup: int = arg(2, help="untimed runs first (compiling happens here)")
    iters: int = arg(5, help="timed runs; the median is reported")
    rounds: int | None = arg(None, help="rounds over all the models, in alternating order; medians over rounds, ratios "
                             "taken round by round (min-max reported): a machine whose speed drifts over minutes "
                             "moves both sides of a ratio alike (default: 3 on a CPU, 1 on a GPU)")
    profile_steps: int | None = arg(None, help="decode steps profiled kernel by kernel (op by op on a CPU) at the first "
                                    "batch size, after the timings (default: 8 on a GPU, 0: none, on a CPU)")
    isolate: bool = arg(True, help="measure each model in a fresh process (clean peak memory)")
    name: str | None = arg(None, help="results file name (default: generate_cpu or generate_cuda)")
    out_dir: str = arg(RESULTS_DIR, help="where the JSON and markdown go")

    def resolved(self) -> "Args":
        gpu = (self.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        return dataclasses.replace(
            self, device=self.device or ("cuda" if gpu else "cpu"), preset=self.preset or ("2b4t" if gpu else "700m"),
            models=self.models or (GPU_MODELS if gpu else CPU_MODELS), batch=self.batch or ([1, 8] if gpu else [1]),
            prompt_len=self.prompt_len or (128 if gpu else 16), new_tokens=self.new_tokens or (128 if gpu else 32),
            prefill_len=self.prefill_len or (512 if gpu else 128),
            prefill_graph=gpu if self.prefill_graph is None else self.prefill_graph,
            compile=(gpu and not self.cuda_graph) if self.compile is None else self.compile,
            name=self.name or f"generate_{'cuda' if gpu else 'cpu'}",
            rounds=self.rounds or (1 if gpu else 3),
            profile_steps=(8 if gpu else 0) if self.profile_steps is None else self.profile_steps)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args: Args, key: str) -> dict:
    """Build one model and time prefill and decode at every batch size (a model with pdl=False with
    the Triton kernels' dependent launches off, as BITNET_PDL=0; with norm_in_gemm=False with a
    batched decode's norms launched apart, as BITNET_GEMM_NORM_M=0; each as it was again after)."""
    from bitnet.kernels import common, gemm

    spec, knobs = MODELS[key], []
    if not spec.pdl:
        knobs.append((common, "PDL_ENABLED", False))
    if not spec.norm_in_gemm:
        knobs.append((gemm, "GEMM_NORM_M", 0))
    saved = [(module, name, getattr(module, name)) for module, name, _ in knobs]
    for module, name, value in knobs:
        setattr(module, name, value)
    try:
        return _measure(args, key)
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _measure(args: Args, key: str) -> dict:
    spec = MODELS[key]
    linear = spec.linear
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # The first run of any code path pages in hundreds of MB of torch's own code and fills its
    # allocator pools; run the same path once on the tiny preset so that RSS counts the model.
    warm = random_model(BitNetConfig.from_preset("tiny", linear=linear), spec.dtype, device, packing=spec.packing)
    generate(warm, torch.zeros(max(args.batch), 8, dtype=torch.long, device=device), 2)
    del warm
    rss_before = rss_bytes()
    config = BitNetConfig.from_preset(args.preset, linear=linear)
    model = random_model(config, spec.dtype, device, packing=spec.packing)
    if spec.head_bits:
        model.quantize_lm_head(spec.head_bits)
    sizes = weight_bytes(model)
    streamed = sizes["linear"] + sum(t.numel() * t.element_size() for t in model.lm_head.buffers() if t is not None)
    if not spec.head_bits:
        streamed += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    flush = L2Flusher(device=device) if cuda else None
    T, N = args.prompt_len, args.new_tokens
    rows = []
    for B in args.batch:
        prompt = torch.randint(0, config.vocab_size, (B, T), device=device, generator=torch.Generator(device).manual_seed(B))
        model.setup_cache(B, T + N)  # held by us: every generate call reuses it (and its CUDA graphs)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def run(n: int) -> torch.Tensor:
            return generate(model, prompt, n, compile=args.compile, cuda_graph=args.cuda_graph)

        def timed(fn) -> float:
            if cuda:
                return time_cuda(fn, warmup=args.warmup, iters=args.iters, flush=flush)
            return time_cpu(fn, warmup=args.warmup, iters=args.iters)

        prefill_ms = timed(lambda: run(1))
        total_ms = timed(lambda: run(N))
        step_ms = (total_ms - prefill_ms) / (N - 1)
        profile = None
        if args.profile_steps and B == args.batch[0]:  # where a decode step's time goes
            try:
                profile = step_profile(run, min(args.profile_steps, N - 1), device)
            except Exception as e:  # the profiler is a diagnostic: a failure there keeps the timings
                profile = {"error": f"{type(e).__name__}: {e}"}
        model.clear_cache()
        # a longer prompt: prefill alone (large M: the int8 GEMM path of the packed kernels)
        TL = args.prefill_len
        long_prompt = torch.randint(0, config.vocab_size, (B, TL), device=device, generator=torch.Generator(device).manual_seed(B))
        model.setup_cache(B, TL + 1)
        long_ms = timed(lambda: generate(model, long_prompt, 1, compile=args.compile, cuda_graph=args.cuda_graph))
        graphed = recorded_prefill(model, long_prompt, timed) if args.prefill_graph else {}
        rows.append({
            "model": key, "linear": linear, "batch": B, "prompt_len": T, "new_tokens": N,
            "prefill_long_len": TL, "prefill_long_ms": long_ms, "prefill_long_tok_s": B * TL / long_ms * 1e3,
            **graphed, "prefill_ms": prefill_ms, "prefill_tok_s": B * T / prefill_ms * 1e3,
            "generate_ms": total_ms, "decode_ms_per_step": step_ms, "decode_tok_s": B / step_ms * 1e3,
            "decode_weight_gb_s": streamed / (step_ms * 1e-3) / 1e9,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            **({"profile": profile} if profile else {}),
        })
        model.clear_cache()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"model": key, "label": spec.label, "linear": linear, "packing": spec.packing, "dtype": str(spec.dtype),
            "kernel": default_kernel(device) if linear != "bf16" else "F.linear", "weight_bytes": sizes, "decode_streamed_bytes": streamed,
            "peak_rss_over_start_bytes": peak_rss - rss_before, "rows": rows}


def recorded_prefill(model, prompt: torch.Tensor, timed: Callable) -> dict:
    """The prefill of `prompt` (B, T) into the model's cache: recorded as a CUDA graph and replayed
    (bitnet.generation.CapturedForward, with causal_prefix: the prompt has no padding), timed; and
    one eager prefill's kernels summed from the profiler (busy). Each part that fails says why in
    the row instead of a figure (the eager timings stand)."""
    B, T = prompt.shape
    key_mask = torch.ones(B, model.model.layers[0].self_attn.kv_cache.k.shape[2], dtype=torch.bool, device=prompt.device)
    pos = torch.arange(T, device=prompt.device).expand(B, T)
    out = {}
    try:
        ops = profile_ops(lambda: prefill(model, prompt, key_mask, pos), prompt.device)
        out["prefill_long_busy_ms"] = sum(us for _, us in ops.values()) / 1e3
    except Exception as e:
        out["prefill_long_busy_error"] = f"{type(e).__name__}: {e}"
    try:
        forward = functools.partial(prefill, causal_prefix=True)
        graph = record_cuda_graph(lambda: CapturedForward(forward, model, prompt, key_mask, pos), "the prefill", prompt.device)
        ms = timed(lambda: graph(model, prompt, key_mask, pos))
        out.update(prefill_long_graph_ms=ms, prefill_long_graph_tok_s=B * T / ms * 1e3)
    except Exception as e:
        out["prefill_long_graph_error"] = f"{type(e).__name__}: {e}"
    return out


def measure_isolated(args: Args, key: str) -> dict:
    if not args.isolate:
        return measure(args, key)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no memory or CUDA state carried over
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(measure, args, key).result()


TIMINGS = ("prefill_ms", "prefill_tok_s", "generate_ms", "decode_ms_per_step", "decode_tok_s", "decode_weight_gb_s",
           "prefill_long_ms", "prefill_long_tok_s", "prefill_long_graph_ms", "prefill_long_graph_tok_s",
           "prefill_long_busy_ms")
SPEEDUPS = ("decode_speedup", "prefill_speedup", "prefill_long_speedup", "prefill_long_graph_speedup")


def median_or_none(values: list) -> float | None:
    """The median, or None where a round has no figure (not measured, or failed: the row says why)."""
    return None if any(v is None for v in values) else statistics.median(values)


def merge_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """One result per model: each timing the median over rounds (None where a round has none), peak
    memory the largest, what failed in any round said."""
    merged = {}
    for key, first in rounds[0].items():
        res = {**first, "rows": [], "peak_rss_over_start_bytes": max(r[key]["peak_rss_over_start_bytes"] for r in rounds)}
        for i, row in enumerate(first["rows"]):
            rows = [r[key]["rows"][i] for r in rounds]
            errors = {f: v for later in rows[::-1] for f, v in later.items() if f.endswith("_error")}  # any round's
            res["rows"].append({**row, **errors, **{f: median_or_none([r.get(f) for r in rows]) for f in TIMINGS}})
        merged[key] = res
    return merged


def speedups(args: Args, results: dict[str, dict]) -> list[dict]:
    """Each packed model over the faster twin, batch by batch, within one set of results."""
    twins = [k for k in TWINS if k in results]
    packed = [k for k in results if k not in TWINS]
    ratios = []
    for i, B in enumerate(args.batch):
        if not twins:
            break
        best = max(twins, key=lambda k: results[k]["rows"][i]["decode_tok_s"])
        t = results[best]["rows"][i]

        def over_twins(r, f):  # r's figure over the faster twin's (None where either side has none)
            theirs = [results[w]["rows"][i].get(f) for w in twins]
            return None if r.get(f) is None or None in theirs else r[f] / max(theirs)

        for k in packed:
            r = results[k]["rows"][i]
            ratios.append({"batch": B, "model": results[k]["label"], "twin": results[best]["label"],
                           "decode_speedup": r["decode_tok_s"] / t["decode_tok_s"],
                           "prefill_speedup": over_twins(r, "prefill_tok_s"),
                           "prefill_long_speedup": over_twins(r, "prefill_long_tok_s"),
                           "prefill_long_graph_speedup": over_twins(r, "prefill_long_graph_tok_s")})
    return ratios


def report(args: Args, results: dict[str, dict], rounds: list[dict[str, dict]] | None = None) -> tuple[str, dict]:
    """Markdown tables and summary ratios (each packed model over the faster twin, batch by batch:
    the median of the round-by-round ratios, with their min-max)."""
    rows = []
    for res in results.values():
        for r in res["rows"]:
            mem = r["peak_memory_bytes"] if r["peak_memory_bytes"] is not None else res["peak_rss_over_start_bytes"]
            rows.append({**r, "label": res["label"], "weights": human_bytes(res["weight_bytes"]["total"]),
                         "memory": human_bytes(mem)})
    twins = [k for k in TWINS if k in results]
    per_round = [speedups(args, r) for r in (rounds or [results])]
    ratios = []
    for j, first in enumerate(per_round[0]):
        row = dict(first)
        for f in SPEEDUPS:
            values = [r[j][f] for r in per_round]
            row[f] = median_or_none(values)
            row[f + "_range"] = None if row[f] is None else f"{min(values):.2f}-{max(values):.2f}"
        ratios.append(row)
    summary = {"by_batch": ratios, "rounds": len(per_round)}
    if "bitnet" in results and twins:
        twin = results[twins[0]]
        summary["weights_smaller_total"] = twin["weight_bytes"]["total"] / results["bitnet"]["weight_bytes"]["total"]
        summary["weights_smaller_linear"] = twin["weight_bytes"]["linear"] / results["bitnet"]["weight_bytes"]["linear"]
        for k in ("bitnet-1.6bit", "bitnet1"):
            if k in results:
                summary[f"{k}_step_time_over_2bit"] = [a["decode_ms_per_step"] / b["decode_ms_per_step"]
                                                       for a, b in zip(results[k]["rows"], results["bitnet"]["rows"])]
    rounds_note = (f"{len(per_round)} rounds over the models in alternating order (each model in a fresh process); "
                   "timings are medians over rounds, ratios are taken round by round: median (min-max)")
    memory = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak RSS of its process over its RSS before the build (after a warm-up on the tiny preset)"
    env = environment()
    md = [
        f"# Generation, packed BitNet vs its twin: preset `{args.preset}` on {env['device']}",
        "",
        f"CPU flags {', '.join(env['cpu_flags'])}; {env['cpu_threads']} threads; load average at the end {env['loadavg']}. "
        f"Prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, compile={args.compile}, "
        f"cuda_graph={args.cuda_graph}; "
        f"a separate prefill of {args.prefill_len} tokens; median of {args.iters} runs; {rounds_note}. Memory: {memory}.",
        "",
        table(rows, [("label", "model", ""), ("batch", "batch", ""), ("prefill_tok_s", f"prefill tok/s ({args.prompt_len})", ".0f"),
                     ("prefill_long_tok_s", f"prefill tok/s ({args.prefill_len})", ".0f"),
                     *([("prefill_long_graph_tok_s", f"prefill tok/s ({args.prefill_len}, CUDA graph)", ".0f"),
                        ("prefill_long_ms", f"prefill ms ({args.prefill_len})", ".2f"),
                        ("prefill_long_busy_ms", "of which kernels busy", ".2f")] if args.prefill_graph else []),
                     ("decode_tok_s", "decode tok/s", ".1f"), ("decode_ms_per_step", "ms/step", ".2f"),
                     ("decode_weight_gb_s", "weights GB/s", ".2f"), ("memory", "peak memory", ""),
                     ("weights", "weight bytes", "")], markdown=True),
        "",
    ]
    for res in results.values():
        for r in res["rows"]:
            for f, what in (("prefill_long_graph_error", "recording the prefill as a CUDA graph"),
                            ("prefill_long_busy_error", "profiling the prefill")):
                if f in r:
                    md += [f"**{res['label']}**, batch {r['batch']}: {what} failed: {r[f]}", ""]
    if "weights_smaller_total" in summary:
        md += [f"Packed 2-bit weights {summary['weights_smaller_total']:.2f}x smaller in total than the bf16 twin, "
               f"{summary['weights_smaller_linear']:.2f}x on the projections.", ""]
    if ratios:
        md += [table(ratios, [("batch", "batch", ""), ("model", "model", ""), ("twin", "faster twin (decode)", ""),
                              ("decode_speedup", "decode speed / twin", ".2f"), ("decode_speedup_range", "(min-max)", ""),
                              ("prefill_speedup", f"prefill ({args.prompt_len}) / faster twin", ".2f"),
                              ("prefill_long_speedup", f"prefill ({args.prefill_len}) / faster twin", ".2f"),
                              ("prefill_long_speedup_range", "(min-max)", ""),
                              *([("prefill_long_graph_speedup", f"prefill ({args.prefill_len}, CUDA graphs) / faster twin",
                                  ".2f")] if args.prefill_graph else [])], markdown=True)]
    for k in ("bitnet-1.6bit", "bitnet1"):
        if f"{k}_step_time_over_2bit" in summary:
            md += ["", f"{MODELS[k].label}: decode step time / 2-bit's = "
                   + ", ".join(f"{v:.2f}" for v in summary[f"{k}_step_time_over_2bit"])]
    md += profile_tables(args, results)
    return "\n".join(md), summary


def short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def profile_tables(args: Args, results: dict[str, dict]) -> list[str]:
    """Markdown: each profiled model's decode step by kernel (GPU) or op (CPU), the costliest first."""
    gpu = args.device.startswith("cuda")
    md = []
    for res in results.values():
        for r in res["rows"]:
            prof = r.get("profile")
            if not prof:
                continue
            if "error" in prof:
                md += ["", f"**{res['label']}**, batch {r['batch']}: the decode step profile failed: {prof['error']}"]
                continue
            what = "kernel" if gpu else "op (self CPU time)"
            md += ["", f"**{res['label']}**, batch {r['batch']}: one decode step by {what}, from {prof['steps']} profiled "
                   f"steps: {prof['busy_us']:.0f} us busy, {prof['launches']:.0f} launches, of a "
                   f"{r['decode_ms_per_step'] * 1e3:.0f} us step"
                   + (" (the rest: gaps between kernels, and the host where it is not captured)" if gpu else ""), ""]
            rows = [{**row, "name": short(row["name"].replace("|", "/"))} for row in prof["rows"]]
            md.append(table(rows, [("name", what, ""), ("calls", "calls a step", ".1f"), ("us", "us a step", ".1f"),
                                   ("share", "share", ".0%")], markdown=True))
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, Args)
    ns = parser.parse_args(argv)
    args = Args(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Args)}).resolved()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode is timed as N tokens minus the first)")
    if args.prefill_graph and not args.device.startswith("cuda"):
        parser.error("--prefill-graph records CUDA graphs: it needs --device cuda")
    unknown = [k for k in args.models if k not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
    rounds = []
    for r in range(args.rounds):
        order = args.models if r % 2 == 0 else args.models[::-1]
        rounds.append({})
        for key in order:
            print(f"round {r + 1}/{args.rounds}: measuring {MODELS[key].label} ...", file=sys.stderr, flush=True)
            rounds[-1][key] = measure_isolated(args, key)
            # what is measured so far, raw (JSON only): a run cut short keeps it
            save_results(args.name, {"args": dataclasses.asdict(args), "complete": False, "rounds": rounds},
                         out_dir=args.out_dir)
    rounds = [{key: rnd[key] for key in args.models} for rnd in rounds]
    results = merge_rounds(rounds)
    markdown, summary = report(args, results, rounds)
    path = save_results(args.name, {"args": dataclasses.asdict(args), "complete": True, "results": results,
                                    "rounds": rounds, "summary": summary}, markdown, args.out_dir)
    print(markdown)
    print(f"\nsaved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Packed ternary / binary linear layers (bitnet.kernels) against torch's F.linear, on a GPU or a CPU.

On a GPU (the Triton kernels):
For every weight shape N x K (nn.Linear's weight: out x in features), every M and every packed
format: the median time of the whole layer, y = bitlinear(x) from bf16 x to bf16 y (activation
quantization included), and of the matmul alone from int8 x_q (from M = BITNET_UNPACK_GEMM_M on,
the dispatch's unpack + int8 GEMM and, labelled "decode-in-loop", the GEMM that decodes the
packed weights in its K loop, both; at M = 1, for the first format, also the layer as two
launches, act_quant then the int8 GEMV, beside the dispatch's one GEMV that quantizes x itself;
where the GEMM splits K, for the first format, also "one split", as BITNET_GEMM_SPLIT_K=1 would run it);
the L2 is flushed before every
timed call; bf16 F.linear is timed in the same run, the same ways. Each is timed twice: its GPU
work alone (captured in a CUDA graph and replayed: the kernels and the gaps between them, what a
model run under CUDA graphs pays; the headline and the speedups) and as an eager call (which
also counts the host's time to issue the kernels wherever that is longer: Python, torch.library
dispatch, Triton's launcher). Reported: speedup over bf16, achieved GB/s (packed weight +
activations in + output out) and its share of the HBM bandwidth measured by a device-to-device
copy. Writes benchmarks/results/bench_kernels.{json,md,png}.
--heads adds the lm_head GEMVs at 2B-4T's head (128256 x 2560): bf16 F.linear, the int8 head and
the int4 head (quantize_lm_head(8), (4)), from bf16 x, GPU time and eager call, and the bytes each reads.
--attention adds the decode attention at 2B-4T's heads (20 query heads on 5 KV heads of 128,
bf16): bitnet.kernels.decode_attention against the call the model made before it, torch's SDPA
with the static cache's key mask and enable_gqa (its math path on CUDA), for batches and cache
lengths (--attention-cache), full and with 160 live slots (--attention-live: a server's rows hold
the model's context), GPU time and eager call as above, and the live K and V bytes.

On a CPU (the native C++ kernels, bitnet.kernels.cpu), for every shape, M and format: the
median time of one whole layer call (int8 activation quantization included) from bf16 x to bf16
y, next to F.linear in fp32 and in bf16, transformers' own BitLinear (it unpacks the 2-bit weights
to bf16 at every call, then F.linear) and this package's torch fallback, all in the same run.
Every system cycles through its own copies of the weights (512 MB of them, one a layer, as a
model's decode reads them), so that no side is timed from a last-level cache that a whole model
would not fit in. GB/s counts the weight bytes each system reads; its share of this machine's
measured memory read bandwidth (torch sum over 1 GiB, same threads) is reported for the packed
kernels. CPU model, flags, threads and load average are stamped into the results
(benchmarks/results/bench_kernels_cpu.{json,md}).

    python benchmarks/bench_kernels.py                       # everything (a few minutes)
    python benchmarks/bench_kernels.py --m 1 16 --shapes 8192x8192 --formats 2bit
    python benchmarks/bench_kernels.py --device cpu --m 1 128 --shapes 2560x6912
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bitnet.bench import (RESULTS_DIR, L2Flusher, copies_for, environment, loadavg, measured_cpu_bandwidth,
                          measured_hbm_bandwidth, save_results, time_cpu_cycled, time_cuda, time_cuda_graph)
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.packing import pack, packed_rows
from bitnet.report import table

SHAPES = ["2560x2560", "2560x6912", "6912x2560", "8192x8192", "28672x8192"]
CPU_SHAPES = ["2560x6912", "6912x2560", "1536x1536", "4096x1536"]  # the shapes; 700m's


@dataclasses.dataclass
class BenchArgs:
    device: str | None = arg(None, help="cuda or cpu (default: cuda when available)")
    m: list[int] | None = arg(None, help="activation rows M (tokens); default GPU 1 4 16 64 512 2048, CPU 1 4 16 64 128 512")
    shapes: list[str] | None = arg(None, help="weight shapes N x K (out x in features); default by device")
    formats: list[str] = arg(["2bit", "1.6bit", "1bit"], help="packed formats")
    m1_formats: list[str] | None = arg(None, help="more packed formats timed at M = 1 only, the decode shape (GPU; "
                                       "e.g. --formats 2bit --m1-formats 1.6bit 1bit: each format autotunes its own kernels)")
    warmup: int = arg(10, help="untimed calls before timing (autotuning happens in the first); CPU: passes over the copies")
    iters: int = arg(50, help="timed calls; the median is reported; CPU: passes over the copies (default 3)")
    out_dir: str = arg(RESULTS_DIR, help="where the JSON, markdown and PNG go")
    name: str | None = arg(None, help="file name of the results, without extension (default bench_kernels[_cpu])")
    attention: bool = arg(False, help="also time the decode attention (GPU) against SDPA, at 2B-4T's heads")
    attention_batch: list[int] = arg([1, 8], help="sequences per decode step, for --attention")
    attention_cache: list[int] = arg([160, 1024, 4096], help="static cache lengths (every slot live), for --attention")
    attention_live: list[int] = arg([160], help="also: this many live slots in each longer cache (a server's rows "
                                                "hold the model's context), for --attention")
    heads: bool = arg(False, help="also time the lm_head GEMVs (GPU) at 2B-4T's head, 128256 x 2560: bf16 F.linear, "
                      "the int8 head and the int4 head (quantize_lm_head(8), (4))")
    head_rows: list[int] = arg([1, 8], help="activation rows for --heads (decode: one a sequence)")


def parse_shape(s: str) -> tuple[int, int]:
    n, k = (int(v) for v in s.lower().split("x"))
    return n, k


def random_packed(n: int, k: int, fmt: str, device: str) -> torch.Tensor:
    low = -1 if fmt != "1bit" else 0
    w = torch.randint(low, 2, (n, k), dtype=torch.int8, device=device)
    if fmt == "1bit":
        w = 2 * w - 1  # {-1, +1}
    return pack(w, fmt)


def measure(args: BenchArgs, device: str = "cuda", on_shape: Callable[[dict], None] | None = None) -> dict:
    """Time every (shape, M, format); returns {"hbm_gbps", "rows"}. on_shape(result so far) is
    called after each shape (the results are saved as they come: a run cut short keeps them)."""
    from bitnet.kernels import act_quant, bitlinear, packed_matmul
    from bitnet.kernels import gemm as gemm_module

    flush = L2Flusher(device=device)
    hbm = measured_hbm_bandwidth()
    rows = []
    m1_formats = [f for f in args.m1_formats or [] if f not in args.formats]
    for shape in args.shapes:
        n, k = parse_shape(shape)
        w16 = torch.randn(n, k, dtype=torch.bfloat16, device=device)
        scale = torch.full((1,), 0.02, dtype=torch.float32, device=device)
        all_packed = {fmt: random_packed(n, k, fmt, device) for fmt in [*args.formats, *m1_formats]}
        for m in args.m:
            packed = {f: p for f, p in all_packed.items() if f in args.formats or m == 1}
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            io_bytes = 2 * m * k + 2 * m * n  # bf16 activations in, bf16 output out
            first = len(rows)  # this M's rows, printed below

            def timed(fn):  # (GPU work alone, eager call) in ms
                return (time_cuda_graph(fn, args.warmup, args.iters, flush),
                        time_cuda(fn, args.warmup, args.iters, flush))

            bf16_ms, bf16_eager = timed(lambda: F.linear(x, w16))
            base = {"shape": shape, "n": n, "k": k, "m": m}
            rows.append({**base, "format": "bf16", "ms": bf16_ms, "eager_ms": bf16_eager, "speedup": 1.0,
                         "gbps": (2 * n * k + io_bytes) / (bf16_ms * 1e-3) / 1e9})
            x_q, a = act_quant(x)
            # (format, packed, label, the gemm module's settings while timed): the dispatch's path, then A/Bs
            variants = [(fmt, p, fmt, {}) for fmt, p in packed.items()]
            if 0 < gemm_module.UNPACK_M <= m:  # the decode-in-the-loop GEMM beside the dispatch's unpacked one
                variants += [(fmt, p, f"{fmt} decode-in-loop", {"UNPACK_M": 0}) for fmt, p in packed.items()]
            fmt, p = next(iter(packed.items()))
            if m > 1 and gemm_module.splits(m, n, k, fmt, x.device) > 1:  # (M = 1 runs the GEMV)
                variants.append((fmt, p, f"{fmt} one split", {"SPLIT_K_MAX": 1}))  # split_k's rule against none
            for fmt, p, label, settings in variants:
                saved = {name: getattr(gemm_module, name) for name in settings}
                for name, value in settings.items():
                    setattr(gemm_module, name, value)
                try:
                    ms, eager_ms = timed(lambda: bitlinear(x, p, scale, n, fmt))
                    matmul_ms, _ = timed(lambda: packed_matmul(x_q, a, p, scale, n, fmt, out_dtype=torch.bfloat16))
                finally:
                    for name, value in saved.items():
                        setattr(gemm_module, name, value)
                nbytes = packed_rows(n, fmt) * k + io_bytes
                rows.append({**base, "format": label, "ms": ms, "eager_ms": eager_ms, "matmul_ms": matmul_ms,
                             "speedup": bf16_ms / ms, "eager_speedup": bf16_eager / eager_ms,
                             "gbps": nbytes / (ms * 1e-3) / 1e9})
            if m == 1:  # the layer as two launches, act_quant then the int8 GEMV (PDL overlaps them from sm_90 on),
                # beside the dispatch's one GEMV that quantizes x itself: which is faster decides the dispatch
                fmt, p = next(iter(packed.items()))  # the first format (2bit by default)
                ms, eager_ms = timed(lambda: packed_matmul(*act_quant(x)[:2], p, scale, n, fmt, out_dtype=torch.bfloat16))
                rows.append({**base, "format": f"{fmt} act_quant + GEMV", "ms": ms, "eager_ms": eager_ms,
                             "speedup": bf16_ms / ms, "eager_speedup": bf16_eager / eager_ms,
                             "gbps": (packed_rows(n, fmt) * k + io_bytes) / (ms * 1e-3) / 1e9})
            print(f"{shape} M={m}: " + ", ".join(f"{r['format']} {r['ms'] * 1e3:.1f} us" for r in rows[first:]), flush=True)
        del w16, packed, all_packed
        if on_shape is not None:
            on_shape(with_shares(hbm, rows))
    return with_shares(hbm, rows)


ATTENTION_HEADS = (20, 5, 128)  # 2B-4T: query heads, KV heads, head size


def attention_case(batch: int, slots: int, device: str, dtype=torch.bfloat16, heads=ATTENTION_HEADS,
                   live: int | None = None):
    """One decode step's attention over a static cache of `slots`, the query at slot live - 1
    (default: the last), both ways: (ours, sdpa, the live K and V bytes). ours:
    bitnet.kernels.decode_attention -> (B, H * D); sdpa: the model's former call, SDPA over the
    whole cache with the (B, 1, 1, S) key mask (the live slots) and enable_gqa -> (B, H * D)."""
    from bitnet.kernels import decode_attention

    H, G, D = heads
    live = slots if live is None else live
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, H, D, generator=g, device=device).to(dtype)
    k = torch.randn(batch, G, slots, D, generator=g, device=device).to(dtype)
    v = torch.randn(batch, G, slots, D, generator=g, device=device).to(dtype)
    pos = torch.tensor([live - 1], device=device)
    mask = (torch.arange(slots, device=device) < live).expand(batch, 1, 1, slots)

    def ours():
        return decode_attention(q, k, v, pos, key_mask=mask[:, 0, 0])

    def sdpa():
        y = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(batch, H * D)

    return ours, sdpa, 2 * batch * G * live * D * k.element_size()


HEAD_SHAPE = (128256, 2560)  # 2B-4T's lm_head: vocabulary x hidden


def head_cases(n: int, k: int, device: str) -> dict:
    """One random bf16 (n, k) head three ways, name -> (head(x), bytes it reads): bf16 F.linear,
    bitnet.Int8Linear's GEMV, bitnet.Int4Linear's GEMV (both made from that linear)."""
    from bitnet import Int4Linear, Int8Linear
    from bitnet.kernels import int4_linear, int8_linear

    linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():  # made on the device (at 2B-4T's head, 328 M values)
        g = torch.Generator(device=device).manual_seed(0)
        linear.weight.copy_(torch.randn(n, k, generator=g, device=device) * 0.02)
    h8, h4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear)
    return {"bf16": (lambda x: F.linear(x, linear.weight), 2 * n * k),
            "int8": (lambda x: int8_linear(x, h8.weight, h8.weight_scale), h8.weight.numel() + 4 * n),
            "int4": (lambda x: int4_linear(x, h4.codes, h4.scales, n), h4.codes.numel() + 4 * h4.scales.numel())}


def measure_heads(args: BenchArgs, device: str = "cuda", shape: tuple[int, int] = HEAD_SHAPE) -> list[dict]:
    """GPU time and eager call of the lm_head three ways (head_cases), from bf16 x (the int8 and
    int4 heads' quantization included), with the bytes each reads."""
    n, k = shape
    flush = L2Flusher(device=device)
    heads = head_cases(n, k, device)
    rows = []
    for m in args.head_rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        for name, (head, nbytes) in heads.items():
            ms = (time_cuda_graph(lambda: head(x), args.warmup, args.iters, flush),
                  time_cuda(lambda: head(x), args.warmup, args.iters, flush))
            rows.append({"shape": f"{n}x{k}", "m": m, "format": name, "us": ms[0] * 1e3, "eager_us": ms[1] * 1e3,
                         "mb": nbytes / 1e6, "gbps": nbytes / (ms[0] * 1e-3) / 1e9})
            rows[-1]["speedup"] = rows[-1 - list(heads).index(name)]["us"] / rows[-1]["us"]
        print(f"lm_head M={m}: " + ", ".join(f"{r['format']} {r['us']:.1f} us" for r in rows[-len(heads):]), flush=True)
    return rows


HEAD_COLUMNS = [("shape", "N x K", ""), ("m", "M", ""), ("format", "head", ""), ("mb", "MB read", ".0f"),
                ("us", "GPU time (us)", ".1f"), ("speedup", "vs bf16", ".2f"), ("gbps", "GB/s", ".0f"),
                ("eager_us", "eager call (us)", ".1f")]


def measure_attention(args: BenchArgs, device: str = "cuda") -> list[dict]:
    """GPU time and eager call of both attentions for every (batch, cache length, live slots)."""
    flush = L2Flusher(device=device)
    rows = []
    cases = [(slots, live) for slots in args.attention_cache
             for live in [slots] + sorted(n for n in set(args.attention_live) if 0 < n < slots)]
    for batch in args.attention_batch:
        for slots, live in cases:
            ours, sdpa, kv_bytes = attention_case(batch, slots, device, live=live)
            sdpa_ms = (time_cuda_graph(sdpa, args.warmup, args.iters, flush), time_cuda(sdpa, args.warmup, args.iters, flush))
            ours_ms = (time_cuda_graph(ours, args.warmup, args.iters, flush), time_cuda(ours, args.warmup, args.iters, flush))
            rows.append({"batch": batch, "slots": slots, "live": live, "kv_mb": kv_bytes / 1e6, "sdpa_us": sdpa_ms[0] * 1e3,
                         "ours_us": ours_ms[0] * 1e3, "speedup": sdpa_ms[0] / ours_ms[0],
                         "sdpa_eager_us": sdpa_ms[1] * 1e3, "ours_eager_us": ours_ms[1] * 1e3,
                         "gbps": kv_bytes / (ours_ms[0] * 1e-3) / 1e9})
            print(f"attention B={batch} S={slots} live {live}: SDPA {rows[-1]['sdpa_us']:.1f} us, ours {rows[-1]['ours_us']:.1f} us",
                  flush=True)
    return rows


ATTENTION_COLUMNS = [("batch", "batch", ""), ("slots", "cache slots", ""), ("live", "live slots", ""),
                     ("kv_mb", "live K+V MB", ".1f"),
                     ("sdpa_us", "SDPA (us)", ".1f"), ("ours_us", "decode_attention (us)", ".1f"),
                     ("speedup", "vs SDPA", ".2f"), ("gbps", "GB/s", ".0f"), ("sdpa_eager_us", "SDPA eager (us)", ".1f"),
                     ("ours_eager_us", "ours eager (us)", ".1f")]


def with_shares(hbm: float, rows: list[dict]) -> dict:
    return {"hbm_gbps": hbm, "rows": [{**r, "hbm_share": r["gbps"] / hbm} for r in rows]}


COLUMNS = [("shape", "N x K", ""), ("m", "M", ""), ("format", "format", ""), ("us", "GPU time (us)", ".1f"),
           ("matmul_us", "matmul only (us)", ".1f"), ("speedup", "vs bf16", ".2f"), ("gbps", "GB/s", ".0f"),
           ("hbm_pct", "% HBM", ".0f"), ("eager_us", "eager call (us)", ".1f"), ("eager_speedup", "eager vs bf16", ".2f")]


def report(result: dict) -> str:
    rows = [{**r, "us": r["ms"] * 1e3, "matmul_us": r.get("matmul_ms", 0) * 1e3 or None, "hbm_pct": 100 * r["hbm_share"],
             "eager_us": r["eager_ms"] * 1e3 if r.get("eager_ms") else None} for r in result["rows"]]
    text = table(rows, COLUMNS, markdown=True)
    if result.get("attention"):
        text += ("\n\nDecode attention, 2B-4T heads (20 on 5 KV heads of 128), bf16, every cache slot live, L2 "
                 "flushed: GPU time (CUDA graph replay) and eager call\n\n"
                 + table(result["attention"], ATTENTION_COLUMNS, markdown=True))
    if result.get("heads"):
        text += ("\n\nlm_head GEMVs, from bf16 x (the int8 / int4 heads' quantization included), L2 flushed: GPU "
                 "time (CUDA graph replay) and eager call\n\n" + table(result["heads"], HEAD_COLUMNS, markdown=True))
    return text


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["format"] != "bf16"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    formats = list(dict.fromkeys(r["format"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for fmt in formats:
            pts = [(r["m"], r["speedup"]) for r in rows if r["shape"] == shape and r["format"] == fmt]
            ax.plot(*zip(*pts), marker="o", label=fmt)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} (N x K)")
        ax.set_xlabel("M (tokens)")
    axes[0][0].set_ylabel("speedup over bf16 F.linear")
    axes[0][-1].legend()
    env = environment()
    fig.suptitle(f"bitnet.kernels on {env.get('device')}, L2 flushed, median of timed calls")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: BenchArgs) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return main_cpu(args)
    if not torch.cuda.is_available():
        print("no GPU: nothing to measure on cuda (bench_kernels --device cpu times the native CPU kernels)")
        return 0
    args = dataclasses.replace(args, m=args.m or [1, 4, 16, 64, 512, 2048], shapes=args.shapes or SHAPES,
                               name=args.name or "bench_kernels")

    def save(result: dict, complete: bool) -> str:
        return save_results(args.name, {"args": dataclasses.asdict(args), "complete": complete, **result},
                            report(result), args.out_dir)

    # the attention and the heads first: a few configs to tune, where the shapes' rows tune ~100 (a
    # device script's stage that runs out of time then cuts the last shape's rows, not these tables)
    extra = {}
    if args.attention:
        extra["attention"] = measure_attention(args)
        save({"rows": [], **extra}, complete=False)
    if args.heads:
        extra["heads"] = measure_heads(args)
        save({"rows": [], **extra}, complete=False)
    result = {**measure(args, on_shape=lambda partial: save({**partial, **extra}, complete=False)), **extra}
    markdown = report(result)
    print(markdown)
    path = save(result, complete=True)
    plot(result, os.path.join(os.path.dirname(path), f"{args.name}.png"))
    print(f"measured HBM bandwidth {result['hbm_gbps']:.0f} GB/s; results in {path}")
    return 0


# ----------------------------------------------------------------------------- CPU
def hf_bitlinear(n: int, k: int, packed: torch.Tensor) -> torch.nn.Module:
    """transformers' own BitLinear over the same packed bytes (it unpacks them at every call)."""
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    layer = HFBitLinear(k, n, bias=False, dtype=torch.bfloat16)
    layer.weight = packed
    layer.weight_scale = torch.full((1,), 50.0, dtype=torch.bfloat16)  # its convention: divides by it
    return layer


def measure_cpu(args: BenchArgs) -> dict:
    """Time every (shape, M, system) on the CPU, each cycling over its own weight copies."""
    from bitnet.kernels import cpu
    from bitnet.ops import torch_bitlinear

    if not cpu.available():
        raise RuntimeError(f"the native CPU kernels are not available: {cpu.error()}")
    bw = measured_cpu_bandwidth()
    warmup, iters = max(1, min(args.warmup, 2)), args.iters if args.iters != 50 else 3
    rows = []
    for shape in args.shapes:
        n, k = parse_shape(shape)
        scale = torch.full((1,), 0.02, dtype=torch.float32)
        w32 = [torch.randn(n, k) for _ in range(copies_for(4 * n * k))]
        w16 = [w.bfloat16() for w in w32[:copies_for(2 * n * k)]]
        packed = {fmt: random_packed(n, k, fmt, "cpu") for fmt in args.formats}
        copies = {fmt: [p.clone() for _ in range(copies_for(p.numel()))] for fmt, p in packed.items()}
        # one transformers module whose weight buffer is swapped per call: its torch.compile'd epilogue
        # would recompile for every module instance
        hf = hf_bitlinear(n, k, copies["2bit"][0]) if "2bit" in copies else None
        for m in args.m:
            x32 = torch.randn(m, k)
            x = x32.bfloat16()
            base = {"shape": shape, "n": n, "k": k, "m": m, "loadavg": loadavg()}

            def timed(fn, n_copies):
                return time_cpu_cycled(fn, n_copies, warmup=warmup, iters=iters)

            with torch.no_grad():
                fp32_ms = timed(lambda i: F.linear(x32, w32[i]), len(w32))
                bf16_ms = timed(lambda i: F.linear(x, w16[i]), len(w16))
                systems = [("fp32 F.linear", fp32_ms, 4 * n * k), ("bf16 F.linear", bf16_ms, 2 * n * k)]
                if hf is not None:
                    p2 = copies["2bit"]

                    def hf_call(i):
                        hf.weight = p2[i]
                        return hf(x)

                    # its unpack at every call costs far more than reading the bytes: a few copies suffice
                    systems.append(("transformers BitLinear (2bit)", timed(hf_call, min(4, len(p2))), p2[0].numel()))
                    systems.append(("torch path (2bit)", timed(lambda i: torch_bitlinear(x, p2[i], scale, n, "2bit"), len(p2)),
                                    p2[0].numel()))
                for fmt, ps in copies.items():
                    ms = timed(lambda i: cpu.linear(x, ps[i], scale, n, fmt), len(ps))
                    systems.append((f"native {fmt}", ms, ps[0].numel()))
            for name, ms, nbytes in systems:
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append({**base, "system": name, "ms": ms, "vs_fp32": fp32_ms / ms, "vs_bf16": bf16_ms / ms,
                             "weight_bytes": nbytes, "gbps": gbps, "bw_share": gbps / bw["read_gbps"]})
            print(f"{shape} M={m}: " + ", ".join(f"{r['system']} {r['ms'] * 1e3:.0f} us" for r in rows[-len(systems):]),
                  flush=True)
        del w32, w16, packed, copies, hf
    return {"bandwidth": bw, "isa": cpu.isa(), "threads": torch.get_num_threads(), "rows": rows}


CPU_COLUMNS = [("shape", "N x K", ""), ("m", "M", ""), ("system", "system", ""), ("us", "time (us)", ".0f"),
               ("vs_fp32", "vs fp32", ".2f"), ("vs_bf16", "vs bf16", ".2f"), ("gbps", "weight GB/s", ".1f"),
               ("bw_pct", "% of read bw", ".0f")]


def report_cpu(result: dict) -> str:
    rows = [{**r, "us": r["ms"] * 1e3, "bw_pct": 100 * r["bw_share"] if r["system"].startswith("native") else None}
            for r in result["rows"]]
    env = environment()
    bw = result["bandwidth"]
    head = (f"CPU: {env['cpu']} ({', '.join(env['cpu_flags'])}), {result['threads']} threads, native ISA "
            f"{result['isa']}; measured read bandwidth {bw['read_gbps']:.1f} GB/s. Median of every call, each system "
            "cycling over its own weight copies (512 MB of them); bf16 x in, bf16 y out (fp32 for fp32 F.linear); "
            "weight GB/s counts the bytes of the weights each system reads.")
    return head + "\n\n" + table(rows, CPU_COLUMNS, markdown=True)


def main_cpu(args: BenchArgs) -> int:
    args = dataclasses.replace(args, m=args.m or [1, 4, 16, 64, 128, 512], shapes=args.shapes or CPU_SHAPES,
                               name=args.name or "bench_kernels_cpu")
    result = measure_cpu(args)
    markdown = report_cpu(result)
    print(markdown)
    path = save_results(args.name, {"args": dataclasses.asdict(args), **result}, markdown, args.out_dir)
    print(f"results in {path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, BenchArgs)
    ns = parser.parse_args(argv)
    return main(BenchArgs(**vars(ns)))


if __name__ == "__main__":
    sys.exit(cli())

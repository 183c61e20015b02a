"""Packed ternary / binary linear layers (bitnet.kernels) against torch's bf16 F.linear, on a GPU.

For every weight shape N x K (nn.Linear's weight: out x in features), every M and every packed
format: the median time of the whole layer, y = bitlinear(x) from bf16 x to bf16 y (activation
quantization included), and of the matmul alone from int8 x_q; the L2 is flushed before every
timed call; bf16 F.linear is timed in the same run. Reported: speedup over bf16, achieved GB/s
(packed weight + activations in + output out) and its share of the HBM bandwidth measured by a
device-to-device copy. Writes benchmarks/results/bench_kernels.{json,md,png}.

    python benchmarks/bench_kernels.py                       # everything (a few minutes)
    python benchmarks/bench_kernels.py --m 1 16 --shapes 8192x8192 --formats 2bit
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

from bitnet.bench import RESULTS_DIR, L2Flusher, environment, measured_hbm_bandwidth, save_results, time_cuda
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.packing import pack, packed_rows
from bitnet.report import table

SHAPES = ["2560x2560", "2560x6912", "6912x2560", "8192x8192", "28672x8192"]


@dataclasses.dataclass
class BenchArgs:
    m: list[int] = arg([1, 4, 16, 64, 512, 2048], help="activation rows M (tokens)")
    shapes: list[str] = arg(SHAPES, help="weight shapes N x K (out x in features)")
    formats: list[str] = arg(["2bit", "1.6bit", "1bit"], help="packed formats")
    warmup: int = arg(10, help="untimed calls before timing (autotuning happens in the first)")
    iters: int = arg(50, help="timed calls; the median is reported")
    out_dir: str = arg(RESULTS_DIR, help="where the JSON, markdown and PNG go")
    name: str = arg("bench_kernels", help="file name of the results, without extension")


def parse_shape(s: str) -> tuple[int, int]:
    n, k = (int(v) for v in s.lower().split("x"))
    return n, k


def random_packed(n: int, k: int, fmt: str, device: str) -> torch.Tensor:
    low = -1 if fmt != "1bit" else 0
    w = torch.randint(low, 2, (n, k), dtype=torch.int8, device=device)
    if fmt == "1bit":
        w = 2 * w - 1  # {-1, +1}
    return pack(w, fmt)


def measure(args: BenchArgs, device: str = "cuda") -> dict:
    """Time every (shape, M, format); returns {"hbm_gbps", "rows"}."""
    from bitnet.kernels import act_quant, bitlinear, packed_matmul

    flush = L2Flusher(device=device)
    hbm = measured_hbm_bandwidth()
    rows = []
    for shape in args.shapes:
        n, k = parse_shape(shape)
        w16 = torch.randn(n, k, dtype=torch.bfloat16, device=device)
        scale = torch.full((1,), 0.02, dtype=torch.float32, device=device)
        packed = {fmt: random_packed(n, k, fmt, device) for fmt in args.formats}
        for m in args.m:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            io_bytes = 2 * m * k + 2 * m * n  # bf16 activations in, bf16 output out
            bf16_ms = time_cuda(lambda: F.linear(x, w16), args.warmup, args.iters, flush)
            base = {"shape": shape, "n": n, "k": k, "m": m}
            rows.append({**base, "format": "bf16", "ms": bf16_ms, "speedup": 1.0,
                         "gbps": (2 * n * k + io_bytes) / (bf16_ms * 1e-3) / 1e9})
            x_q, a = act_quant(x)
            for fmt, p in packed.items():
                ms = time_cuda(lambda: bitlinear(x, p, scale, n, fmt), args.warmup, args.iters, flush)
                matmul_ms = time_cuda(lambda: packed_matmul(x_q, a, p, scale, n, fmt, out_dtype=torch.bfloat16),
                                      args.warmup, args.iters, flush)
                nbytes = packed_rows(n, fmt) * k + io_bytes
                rows.append({**base, "format": fmt, "ms": ms, "matmul_ms": matmul_ms, "speedup": bf16_ms / ms,
                             "gbps": nbytes / (ms * 1e-3) / 1e9})
            print(f"{shape} M={m}: " + ", ".join(f"{r['format']} {r['ms'] * 1e3:.1f} us" for r in rows[-1 - len(packed):]),
                  flush=True)
        del w16, packed
    for r in rows:
        r["hbm_share"] = r["gbps"] / hbm
    return {"hbm_gbps": hbm, "rows": rows}


COLUMNS = [("shape", "N x K", ""), ("m", "M", ""), ("format", "format", ""), ("us", "time (us)", ".1f"),
           ("matmul_us", "matmul only (us)", ".1f"), ("speedup", "vs bf16", ".2f"), ("gbps", "GB/s", ".0f"),
           ("hbm_pct", "% HBM", ".0f")]


def report(result: dict) -> str:
    rows = [{**r, "us": r["ms"] * 1e3, "matmul_us": r.get("matmul_ms", 0) * 1e3 or None, "hbm_pct": 100 * r["hbm_share"]}
            for r in result["rows"]]
    return table(rows, COLUMNS, markdown=True)


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
    if not torch.cuda.is_available():
        print("no GPU: nothing to measure (bench_kernels times CUDA kernels against bf16 F.linear)")
        return 0
    result = measure(args)
    markdown = report(result)
    print(markdown)
    path = save_results(args.name, {"args": dataclasses.asdict(args), **result}, markdown, args.out_dir)
    plot(result, os.path.join(os.path.dirname(path), f"{args.name}.png"))
    print(f"measured HBM bandwidth {result['hbm_gbps']:.0f} GB/s; results in {path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, BenchArgs)
    ns = parser.parse_args(argv)
    return main(BenchArgs(**vars(ns)))


if __name__ == "__main__":
    sys.exit(cli())

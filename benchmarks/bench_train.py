"""Training step time and tokens/s: BitNet (ternary), binary BitNet and the bf16 twin, same shape,
same run. Prints a table; saves benchmarks/results/train_{cpu,cuda}.{json,md}.

    python benchmarks/bench_train.py                      # CPU: preset small; GPU: preset 700m, bf16 autocast
    python benchmarks/bench_train.py --preset base --compile
"""

from __future__ import annotations

import argparse

import torch

from bitnet import BitNetConfig
from bitnet.bench import save_results, train_step_time
from bitnet.report import table


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="700m" if cuda else "small")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024 if cuda else 256)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd steps (default: on GPU and CPU)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if cuda else "cpu"
    modes = [False, True] if args.compile in (None, True) else [False]
    rows = []
    for compiled in modes:
        base = None
        for linear in ("bf16", "bitnet", "bitnet1"):
            config = BitNetConfig.from_preset(args.preset, linear=linear)
            ms = train_step_time(config, args.micro_batch, args.seq_len, device, bf16=cuda, compile=compiled,
                                 iters=args.iters)
            base = base or ms
            rows.append({"linear": linear, "compile": compiled, "step_ms": ms,
                         "tokens_per_s": args.micro_batch * args.seq_len / (ms / 1e3), "vs_twin": ms / base})
            print(f"{linear:8s} compile={compiled!s:5s} {ms:9.1f} ms/step  {rows[-1]['vs_twin']:.2f}x the twin's time",
                  flush=True)
    md = table(rows, [("linear", "linear", ""), ("compile", "compiled", ""), ("step_ms", "step (ms)", ".1f"),
                      ("tokens_per_s", "tokens/s", ",.0f"), ("vs_twin", "time vs twin", ".2f")], markdown=True)
    setup = {"preset": args.preset, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
             "dtype": "bf16 autocast" if cuda else "fp32", "optimizer": "AdamW"}
    path = save_results(f"train_{device}", {"setup": setup, "rows": rows}, markdown=md)
    print(md)
    print(f"saved {path}")


if __name__ == "__main__":
    main()

"""What a quantized lm_head costs in perplexity: a model folder evaluated with its own head, then
with `model.quantize_lm_head(bits)` for each of --bits (8: int8 rows, float32 row scales, float
activations; 4: 4-bit groups of 32 against int8 activations), on the same text, same protocol,
the model loaded afresh for each head.

    python benchmarks/lm_head_ppl.py FOLDER --data TEXT [--bits 8 4] [--max-length 256 --stride 128]

Writes benchmarks/results/lm_head_ppl.{json,md}.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bitnet.bench import save_results
from bitnet.evaluate import bos_id, load_model, load_text_ids, perplexity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--data", required=True)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--name", default="lm_head_ppl")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    rows = []
    for bits in [None, *a.bits]:
        model = load_model(a.folder, dtype=dtype)
        ids = load_text_ids(a.folder, a.data)
        head = "float" if bits is None else f"int{bits}"
        if bits is not None:
            model.quantize_lm_head(bits)
        r = perplexity(model, ids, a.max_length, a.stride, "sliding", bos_id(model), 4)
        rows.append({"lm_head": head, "ppl": r.ppl, "tokens": r.tokens,
                     "relative_change": r.ppl / rows[0]["ppl"] - 1 if rows else 0.0})
        print(f"lm_head {head}: ppl {r.ppl:.4f} over {r.tokens} tokens", flush=True)
    md = (f"Quantized lm_head on `{a.folder}` ({a.dtype} float parts), `{a.data}`, sliding window "
          f"{a.max_length}/{a.stride}, {rows[0]['tokens']} tokens:\n\n| lm_head | ppl | change |\n|---|---|---|\n"
          + "".join(f"| {r['lm_head']} | {r['ppl']:.4f} | {100 * r['relative_change']:+.3f}% |\n" for r in rows))
    print(md)
    save_results(a.name, {"args": vars(a), "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

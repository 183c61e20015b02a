"""What an int8 lm_head costs in perplexity: a model folder evaluated with its own head, then with
`model.quantize_lm_head()` (int8 rows, float32 row scales), on the same text, same protocol.

    python benchmarks/lm_head_int8_ppl.py FOLDER --data TEXT [--max-length 256 --stride 128]

Writes benchmarks/results/lm_head_int8_ppl.{json,md}.
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
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--name", default="lm_head_int8_ppl")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    model = load_model(a.folder, dtype=dtype)
    ids = load_text_ids(a.folder, a.data)
    rows = []
    for head in ("float", "int8"):
        if head == "int8":
            model.quantize_lm_head()
        r = perplexity(model, ids, a.max_length, a.stride, "sliding", bos_id(model), 4)
        rows.append({"lm_head": head, "ppl": r.ppl, "tokens": r.tokens})
        print(f"lm_head {head}: ppl {r.ppl:.4f} over {r.tokens} tokens", flush=True)
    rel = rows[1]["ppl"] / rows[0]["ppl"] - 1
    md = (f"int8 lm_head on `{a.folder}` ({a.dtype} float parts), `{a.data}`, sliding window {a.max_length}/{a.stride}: "
          f"ppl {rows[0]['ppl']:.4f} (own head) -> {rows[1]['ppl']:.4f} (int8 rows), {100 * rel:+.3f}%")
    print(md)
    save_results(a.name, {"args": vars(a), "rows": rows, "relative_change": rel}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The perplexity comparison of the README: BitNet b1.58, binary BitNet and the bf16 twin at two
sizes on two real corpora, each system with its own learning rate chosen on a dev split.

    python benchmarks/compare_ppl.py --shared ../shared/data --jobs 2        # hours on a 2-core CPU

Runs live in runs/ppl/<corpus>/ (complete runs are reused, interrupted ones resumed), results in
benchmarks/results/ppl_compare.{json,md,png}, stamped with machine, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from bitnet.bench import RESULTS_DIR, save_results
from bitnet.experiment import CompareArgs, planned_runs, run_comparison, train_runs

# The learning-rate sweeps (each system its own), the steps and the sizes per corpus: what two cores
# can train in about two hours (a base run is ~24 min at 250 steps with two runs side by side).
# (`bitnet compare` at preset tiny had the twin's best rate at 4e-3 and 1e-3 far behind, so the
# twin's grid starts at 2e-3.) run_comparison extends any sweep whose best is at an end of its grid
# (CompareArgs.extend, default 3 more rates; --extend here) and records where it stopped at that limit.
LRS = {"lr_bitnet": [2e-3, 4e-3], "lr_bitnet1": [2e-3, 4e-3], "lr_bf16": [2e-3, 4e-3]}
STEPS = {"tinyshakespeare": 250, "wikitext-2": 125}
SIZES = {"tinyshakespeare": ["tiny", "base"], "wikitext-2": ["tiny", "small"]}


def corpora(shared: str) -> dict[str, dict]:
    return {
        "tinyshakespeare": {"data": os.path.join(shared, "tinyshakespeare", "input.txt"), "test_data": None,
                            "note": "last 10% of input.txt is the test text"},
        "wikitext-2": {"data": os.path.join(shared, "wikitext-2", "valid.txt"),
                       "test_data": os.path.join(shared, "wikitext-2", "test.txt"),
                       "note": "trained on valid.txt, tested on test.txt"},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    p.add_argument("--out", default="runs/ppl")
    p.add_argument("--presets", nargs="+", default=None, help="model sizes (default: SIZES)")
    p.add_argument("--corpora", nargs="+", default=["tinyshakespeare", "wikitext-2"])
    p.add_argument("--max-steps", type=int, default=None, help="steps per run (default: STEPS)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--extend", type=int, default=3, help="edge extensions per sweep (0: the grids only)")
    args = p.parse_args()

    specs, comparisons = corpora(args.shared), {}
    for name in args.corpora:
        spec = specs[name]
        comparisons[name] = CompareArgs(
            data=spec["data"], test_data=spec["test_data"], presets=args.presets or SIZES[name],
            max_steps=args.max_steps or STEPS[name], seq_len=args.seq_len, micro_batch=args.micro_batch, vocab_size=args.vocab_size, eval_every=25,
            jobs=args.jobs, threads=1, out=os.path.join(args.out, name), extend=args.extend, **LRS)
    # one pool over every corpus, so both cores stay busy to the end
    work = [w for cargs in comparisons.values() for w in planned_runs(cargs)]
    print(f"{len(work)} runs, {args.jobs} at a time", flush=True)
    train_runs(work, args.jobs, threads=1, progress=lambda s: print(s, flush=True))

    results, markdown = {}, []
    for name, cargs in comparisons.items():
        spec = specs[name]
        print(f"== {name}: {spec['note']}", flush=True)
        r = run_comparison(cargs, progress=lambda s: None)
        print(r["text"], flush=True)
        results[name] = {"note": spec["note"], **{k: r[k] for k in ("setup", "runs", "table")}}
        markdown.append(f"**{name}** ({spec['note']})\n\n{r['markdown']}\n")
        shutil.copy(os.path.join(cargs.out, "compare.png"), os.path.join(RESULTS_DIR, f"ppl_compare_{name}.png"))
    path = save_results("ppl_compare", {"corpora": results}, markdown="\n".join(markdown))
    print(f"saved {path}")


if __name__ == "__main__":
    main()

"""BitNet b1.58 vs the original (binary) BitNet vs the bf16 twin: same tokens, same seed, same
architecture, each with its own tuned learning rate; perplexity on held-out text.

    bitnet compare                                   # the short default: stdlib docstrings, minutes
    bitnet compare --data corpus.txt --presets small base --lr-bitnet 2e-3 4e-3 --lr-bf16 5e-4 1e-3

Centred on the recipes (bitnet.train.recipes): unless --lr-<system> is given, each system's sweep
at each size is its default recipe's rate times 1/2, 1 and 2, every run with the recipe's warm-up
(unless --warmup-steps), so the middle point is what `bitnet train` would do with no flags.

Protocol:
1. The corpus is split once: the last `test_fraction` (or --test-data) is the test text, never
   seen before the final evaluation. One byte-level BPE is trained on the training text and shared
   by every run, so all systems see the same tokens in the same order (same --seed).
2. Each (size, system, learning rate) trains with `bitnet train`; the last `dev_fraction` of the
   training text is its development split, used only to pick the learning rate (lowest final dev
   loss) — the test text plays no part in any choice.
3. The chosen run of each system is evaluated on the test text with `bitnet eval ppl` (sliding
   window, max_length = seq_len, stride = seq_len / 2), from its packed export.
Output: compare.json (every run, the sweep, the table), compare.md (the table) and compare.png
(the development-loss curves of the chosen runs), under --out.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .args import arg, device as named_device
from .config import PRESETS, BitNetConfig
from .convert import count_parameters
from .model import BitNetForCausalLM
from .plots import plot_panels, read_jsonl
from .report import table
from .train import data as D
from .train.recipes import default_recipe

SYSTEMS = {"bitnet": "BitNet b1.58", "bitnet1": "BitNet (binary)", "bf16": "bf16 twin"}


@dataclass
class CompareArgs:
    data: str | None = arg(None, help="training corpus (default: the embedded docstrings of Python's standard library)")
    test_data: str | None = arg(None, help="test text (default: the last --test-fraction of --data)")
    test_fraction: float = arg(0.1, help="test split of --data when --test-data is not given")
    presets: list[str] = arg(["tiny"], help="model sizes", choices=list(PRESETS))
    linears: list[str] = arg(["bitnet", "bitnet1", "bf16"], help="systems", choices=list(SYSTEMS))
    lr_bitnet: list[float] | None = arg(None, help="learning rates to try for bitnet (default: its recipe's rate at "
                                        "each size times 1/2, 1, 2)")
    lr_bitnet1: list[float] | None = arg(None, help="learning rates to try for bitnet1 (default: its recipe's rate "
                                         "times 1/2, 1, 2)")
    lr_bf16: list[float] | None = arg(None, help="learning rates to try for the bf16 twin (default: its recipe's "
                                      "rate times 1/2, 1, 2)")
    max_steps: int = arg(300, help="optimizer steps per run")
    seq_len: int = arg(128, help="tokens per sequence (also the evaluation window)")
    micro_batch: int = arg(16, help="sequences per step")
    vocab_size: int = arg(1024, help="BPE vocabulary, trained on the training text")
    dev_fraction: float = arg(0.05, help="development split (learning-rate choice) of the training text")
    eval_every: int = arg(50, help="development loss every N steps")
    warmup_steps: int | None = arg(None, help="warm-up steps of every run (default: each system's recipe at each "
                                   "size, e.g. 40%% of max_steps at tiny and small)")
    seed: int = arg(0, help="seed: initialization and data order, the same for every run")
    extend: int = arg(3, help="when a system's best rate is at an end of its sweep, try one more rate (x2 or /2, or "
                      "the grid's own step) past that end, up to this many per (size, system); 0: off")
    jobs: int = arg(1, help="runs trained in parallel (processes)")
    threads: int | None = arg(None, help="torch threads per run (default: cores / jobs)")
    device: str | None = arg(None, help="where each run trains and the chosen ones are evaluated: cuda, cpu, ... "
                             "(default: CUDA where torch sees a GPU, else the CPU)")
    out: str = arg("runs/compare", help="output folder (runs are reused when complete, resumed when not)")


def _corpus(args: CompareArgs) -> tuple[str, str, str]:
    """Write data/train.txt, data/test.txt and data/tokenizer.json under --out (once)."""
    d = os.path.join(args.out, "data")
    paths = tuple(os.path.join(d, f) for f in ("train.txt", "test.txt", "tokenizer.json"))
    if all(os.path.isfile(p) for p in paths):
        return paths
    os.makedirs(d, exist_ok=True)
    if args.data:
        docs = D.read_corpus(args.data)
    else:
        from .corpus import stdlib_docstrings

        docs = [stdlib_docstrings()]
    if args.test_data:
        train_docs, test_docs = docs, D.read_corpus(args.test_data)
    else:
        train_docs, test_docs = D.split_tail(docs, args.test_fraction)
    tok = D.train_tokenizer(train_docs, args.vocab_size)
    for path, text in zip(paths, ("".join(train_docs), "".join(test_docs), tok.to_str())):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return paths


def edge_lr(points: dict[float, float], factor: float = 2.0) -> float | None:
    """The next rate of a sweep whose best rate is at an end of its grid, one `factor` beyond that
    end; None when the best is inside the grid (or the sweep has a single point: nothing to bracket).

    points: {lr: final dev loss}; a diverged run counts as an infinite loss, so it is never the
    best and a sweep that diverges at its top extends downwards."""
    if len(points) < 2:
        return None
    lrs = sorted(points)
    finite = [lr for lr in lrs if math.isfinite(points[lr])]
    if not finite:
        return lrs[0] / factor
    best = min(finite, key=lambda lr: points[lr])
    if best == lrs[0]:
        return best / factor
    if best == lrs[-1]:
        return best * factor
    return None


GRID = (0.5, 1.0, 2.0)  # the default sweep: the recipe's rate times these


def sweep_lrs(args: CompareArgs, preset: str, linear: str) -> list[float]:
    """The rates a (size, system) sweep starts from: --lr-<system> when given, else the recipe's
    rate times GRID (rounded to 6 significant digits, so that run folders have clean names)."""
    given = getattr(args, f"lr_{linear}")
    if given:
        return list(given)
    lr = default_recipe(linear, preset).lr
    return [float(f"{lr * f:.6g}") for f in GRID]


def warmup_steps(args: CompareArgs, preset: str, linear: str) -> int:
    """Warm-up steps of every run of a (size, system) sweep: --warmup-steps, else the recipe's."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    return default_recipe(linear, preset).warmup_for(args.max_steps)


def describe_sweeps(args: CompareArgs) -> list[str]:
    """One line per (size, system): its starting grid and warm-up, and where they come from."""
    lines = []
    for p in args.presets:
        for lin in args.linears:
            where = "given" if getattr(args, f"lr_{lin}") else "recipe x 1/2, 1, 2"
            wu = "given" if args.warmup_steps is not None else "recipe"
            lines.append(f"{p} {lin}: lr {' '.join(f'{lr:g}' for lr in sweep_lrs(args, p, lin))} ({where}), "
                         f"warm-up {warmup_steps(args, p, lin)} steps ({wu})")
    return lines


def _run_dir(args: CompareArgs, preset: str, linear: str, lr: float) -> str:
    return os.path.join(args.out, "runs", f"{preset}-{linear}-lr{lr:g}")


def _complete(path: str, steps: int) -> bool:
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    return bool(rows) and rows[-1]["step"] == steps and os.path.isfile(os.path.join(path, "export", "model.safetensors"))


def train_command(args: CompareArgs, train_txt: str, tok: str, preset: str, linear: str, lr: float,
                  threads: int) -> list[str]:
    """The `bitnet train` command line of one sweep point (the recipe's schedule, this lr and warm-up)."""
    return [sys.executable, "-m", "bitnet", "train", "--data", train_txt, "--tokenizer", tok, "--out",
            _run_dir(args, preset, linear, lr), "--preset", preset, "--linear", linear, "--lr", str(lr),
            "--warmup-steps", str(warmup_steps(args, preset, linear)), "--max-steps", str(args.max_steps),
            "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--val-fraction",
            str(args.dev_fraction), "--eval-every", str(args.eval_every), "--eval-windows", "0", "--seed",
            str(args.seed), "--threads", str(threads), "--no-progress",
            *(["--device", args.device] if args.device else [])]


def _train(args: CompareArgs, train_txt: str, tok: str, preset: str, linear: str, lr: float, threads: int) -> dict:
    path = _run_dir(args, preset, linear, lr)
    t0 = time.time()
    if not _complete(path, args.max_steps):
        cmd = train_command(args, train_txt, tok, preset, linear, lr, threads)
        if os.path.isfile(os.path.join(path, "trainer_state.safetensors")):
            cmd.append("--resume")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "train.log"), "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            if "diverged" in open(os.path.join(path, "train.log")).read():
                open(os.path.join(path, "DIVERGED"), "w").close()
            else:
                raise RuntimeError(f"training {path} failed (exit {proc.returncode}); see {path}/train.log")
    if os.path.isfile(os.path.join(path, "DIVERGED")):  # a sweep point past the stable range: never chosen
        return {"preset": preset, "linear": linear, "lr": lr, "path": path, "dev_loss": math.inf, "dev_curve": [],
                "diverged": True, "train_seconds": 0.0, "wall_seconds_this_call": time.time() - t0}
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    dev = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return {"preset": preset, "linear": linear, "lr": lr, "path": path, "dev_loss": dev[-1][1], "dev_curve": dev,
            "train_seconds": sum(r["step_time_s"] for r in rows), "wall_seconds_this_call": time.time() - t0}


def planned_runs(args: CompareArgs) -> list[tuple]:
    """Every (args, train text, tokenizer, preset, system, lr) the comparison needs.
    Prepares the corpus split and tokenizer on the way."""
    train_txt, _, tok = _corpus(args)
    return [(args, train_txt, tok, p, lin, lr) for p in args.presets for lin in args.linears for lr in sweep_lrs(args, p, lin)]


def train_runs(work: list[tuple], jobs: int = 1, threads: int | None = None, progress=print) -> list[dict]:
    """Train `work` (from planned_runs, possibly of several comparisons) on `jobs` processes,
    the largest models first so that the pool does not end on one long run."""
    work = sorted(work, key=lambda w: -PRESETS[w[3]]["hidden_size"] * PRESETS[w[3]]["num_hidden_layers"])
    jobs = max(1, jobs)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    runs = []
    with cf.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(_train, *w, threads) for w in work]
        for fut in cf.as_completed(futures):
            r = fut.result()
            runs.append(r)
            progress(f"  {r['preset']:>6} {r['linear']:<8} lr {r['lr']:<8g} dev loss {r['dev_loss']:.4f} "
                     f"({r['train_seconds'] / 60:.1f} min of training)" + (" diverged" if r.get("diverged") else ""))
    return runs


def _points(runs: list[dict], preset: str, linear: str) -> dict[float, float]:
    return {r["lr"]: r["dev_loss"] for r in runs if r["preset"] == preset and r["linear"] == linear}


def _step(lrs: list[float]) -> float:
    """The sweep's own step between neighbouring rates (2 for a single point or a 1-2-4 grid)."""
    lrs = sorted(lrs)
    return min(b / a for a, b in zip(lrs, lrs[1:])) if len(lrs) > 1 else 2.0


def extend_sweeps(args: CompareArgs, runs: list[dict], progress=print) -> tuple[list[dict], list[str]]:
    """Extend each (size, system) sweep whose best rate is at an end of its grid by one rate past that
    end (bitnet.experiment.edge_lr), up to args.extend times; returns (all runs, the sweeps that
    stopped at that limit with the best still at an end, as text)."""
    train_txt, _, tok = _corpus(args)
    groups = [(p, lin) for p in args.presets for lin in args.linears]
    for _ in range(max(0, args.extend)):
        work = []
        for p, lin in groups:
            pts = _points(runs, p, lin)
            lr = edge_lr(pts, _step(sweep_lrs(args, p, lin)))
            if lr is not None:
                work.append((args, train_txt, tok, p, lin, lr))
        if not work:
            break
        progress("  best rate at an end of its sweep: " + ", ".join(f"{w[3]} {w[4]} -> lr {w[5]:g}" for w in work))
        runs = runs + train_runs(work, args.jobs, args.threads, progress)
    limited = []
    for p, lin in groups:
        pts = _points(runs, p, lin)
        if edge_lr(pts) is not None:
            best = min(pts, key=lambda lr: pts[lr])
            limited.append(f"{p} {lin}: best lr {best:g} is still at an end of its sweep "
                           f"({min(pts):g}-{max(pts):g}) after --extend {args.extend}")
    for line in limited:
        progress(f"  stopped at the limit: {line}")
    return runs, limited


def run_comparison(args: CompareArgs, progress=print) -> dict:
    """Train every (preset, system, lr), pick each system's lr on dev, evaluate on test; returns
    {"setup", "runs", "table"} and writes compare.{json,md,png} under args.out."""
    from .evaluate import evaluate_folder

    device = named_device(args.device)  # checked before any run starts; the runs' default is the same
    _, test_txt, tok = _corpus(args)
    runs = train_runs(planned_runs(args), args.jobs, args.threads, progress)
    runs, limited = extend_sweeps(args, runs, progress)
    tokens_per_run = args.max_steps * args.micro_batch * args.seq_len
    rows, chosen = [], {}
    for preset in args.presets:
        row = {"preset": preset, "tokens": tokens_per_run}
        for linear in args.linears:
            best = min((r for r in runs if r["preset"] == preset and r["linear"] == linear), key=lambda r: r["dev_loss"])
            result = evaluate_folder(os.path.join(best["path"], "export"), test_txt, args.seq_len, args.seq_len // 2,
                                     device=device)
            best.update(test_ppl=result.ppl, test_tokens=result.tokens)
            chosen[(preset, linear)] = best
            row[f"lr_{linear}"] = best["lr"]
            row[f"ppl_{linear}"] = result.ppl
        with torch.device("meta"):
            config = BitNetConfig.from_preset(preset, vocab_size=D.load_tokenizer(tok).get_vocab_size())
            row["params"] = count_parameters(BitNetForCausalLM(config))
        if "bf16" in args.linears:
            for linear in args.linears:
                if linear != "bf16":
                    row[f"ratio_{linear}"] = row[f"ppl_{linear}"] / row["ppl_bf16"]
        rows.append(row)

    columns = [("preset", "size", ""), ("params", "params", ",d"), ("tokens", "train tokens", ",d")]
    for linear in args.linears:
        columns.append((f"lr_{linear}", f"lr {linear}", "g"))
    for linear in args.linears:
        columns.append((f"ppl_{linear}", f"test ppl {SYSTEMS[linear]}", ".2f"))
    for linear in args.linears:
        if linear != "bf16" and "bf16" in args.linears:
            columns.append((f"ratio_{linear}", f"ratio {linear}/twin", ".3f"))
    md = table(rows, columns, markdown=True)
    text = table(rows, columns)
    setup = {k: v for k, v in asdict(args).items()}
    setup.update(test_protocol=f"sliding window, max_length {args.seq_len}, stride {args.seq_len // 2}",
                 selection="lowest final dev loss per (size, system)", corpus=args.data or "python stdlib docstrings",
                 sweeps_stopped_at_limit=limited,
                 sweeps={f"{p} {lin}": {"start": sweep_lrs(args, p, lin), "warmup_steps": warmup_steps(args, p, lin)}
                         for p in args.presets for lin in args.linears})
    result = {"setup": setup, "runs": sorted(runs, key=lambda r: (r["preset"], r["linear"], r["lr"])), "table": rows}
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(md + "\n")
    panels = {f"{p}: dev loss of the chosen runs": {f"{SYSTEMS[lin]} (lr {chosen[(p, lin)]['lr']:g})":
                                                    tuple(map(list, zip(*chosen[(p, lin)]["dev_curve"])))
                                                    for lin in args.linears} for p in args.presets}
    plot_panels(panels, os.path.join(args.out, "compare.png"), ylabel="dev loss (nats/token)")
    result["text"] = text
    result["markdown"] = md
    return result

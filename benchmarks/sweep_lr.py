"""Learning-rate sweeps of `bitnet train` as a new user runs it (the defaults, --max-steps 300),
and the defaults' perplexity ratio over seeds: the evidence behind bitnet/train/recipes.py.

    python benchmarks/sweep_lr.py sweep --presets tiny small          # dev loss at each rate, per corpus
    python benchmarks/sweep_lr.py seeds --presets tiny small --seeds 0 1 2   # defaults only, test ppl
    python benchmarks/sweep_lr.py report                                # results JSON/markdown + plots

Protocol. Every run is `python -m bitnet train --preset P --linear L --max-steps 300 [--lr LR]` with
the trainer's defaults otherwise (seq_len 256, micro-batch 8, the preset's vocabulary as a
byte-level BPE trained on the training text, the system's schedule and weight decay), on:
- tinyshakespeare: the first 90% of input.txt is the training file, the last 10% the test text;
- wikitext-2: trained on valid.txt, tested on test.txt.
The dev split is the trainer's own (the last 10% of the training file); the sweep picks on the
final dev loss over the whole dev split (--eval-windows 0), never on the test text. A sweep starts
on a grid (factor 2) and is extended one factor-2 point at a time past whichever end holds the
best rate (bitnet.experiment.edge_lr), up to --extend points; a run that diverges counts as an
infinite loss. Test perplexity (seeds) is `bitnet eval ppl`'s default protocol on the export
(sliding window of 256 tokens, stride 128).

CPU sharing: before every run and every evaluation the driver waits while /tmp/bench.lock exists
(another benchmark's timing), and each run is its own process with --threads (default 2).
Runs live under --out (complete ones are reused); results go to benchmarks/results/lr_sweep.*.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

from bitnet.experiment import edge_lr
from bitnet.plots import read_jsonl

LOCK = "/tmp/bench.lock"
GRIDS = {  # starting grids (factor 2); edge_lr extends them where the best sits at an end
    "tiny": [2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2],
    "small": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
    "base": [5e-4, 1e-3, 2e-3, 4e-3, 8e-3],
}
LINEARS = ["bitnet", "bitnet1", "bf16"]


def corpora(shared: str, out: str) -> dict[str, dict]:
    """{name: {train, test, note}}; writes the TinyShakespeare split once."""
    ts = os.path.join(shared, "tinyshakespeare", "input.txt")
    d = os.path.join(out, "tinyshakespeare", "data")
    train, test = os.path.join(d, "train.txt"), os.path.join(d, "test.txt")
    if not (os.path.isfile(train) and os.path.isfile(test)):
        os.makedirs(d, exist_ok=True)
        text = open(ts, encoding="utf-8").read()
        cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
        open(train, "w", encoding="utf-8").write(text[:cut])
        open(test, "w", encoding="utf-8").write(text[cut:])
    return {
        "tinyshakespeare": {"train": train, "test": test, "note": "first 90% of input.txt trained (its last 10% is "
                            "the dev split), last 10% of input.txt is the test text"},
        "wikitext-2": {"train": os.path.join(shared, "wikitext-2", "valid.txt"),
                       "test": os.path.join(shared, "wikitext-2", "test.txt"),
                       "note": "trained on valid.txt (its last 10% is the dev split), tested on test.txt"},
    }


def wait_for_lock() -> None:
    while os.path.exists(LOCK):
        time.sleep(10)


def run_politely(cmd: list[str], log) -> int:
    """Run `cmd`, pausing it (SIGSTOP) whenever /tmp/bench.lock appears and continuing it when the
    lock is gone, so that a timing benchmark that starts mid-run has the cores to itself."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    stopped = False
    while proc.poll() is None:
        locked = os.path.exists(LOCK)
        if locked != stopped:
            proc.send_signal(signal.SIGSTOP if locked else signal.SIGCONT)
            stopped = locked
        time.sleep(2)
    return proc.returncode


def run_dir(out: str, corpus: str, preset: str, linear: str, lr: float | None, seed: int, steps: int) -> str:
    tag = "default" if lr is None else f"lr{lr:g}"
    return os.path.join(out, corpus, "runs", f"{preset}-{linear}-{tag}-s{seed}-{steps}")


def train_point(a, corpus: dict, name: str, preset: str, linear: str, lr: float | None, seed: int) -> dict:
    """One `bitnet train` run (reused when complete); returns its record. A defaults run (lr None)
    reuses the explicit run at the default rate when that one is complete: the same computation."""
    if lr is None:
        from bitnet.train.recipes import default_recipe

        same = train_point_if_complete(a, name, preset, linear, default_recipe(linear, preset).lr, seed)
        if same is not None:
            return {**same, "default": True}
    path = run_dir(a.out, name, preset, linear, lr, seed, a.max_steps)
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    diverged = os.path.isfile(os.path.join(path, "DIVERGED"))
    if not diverged and not (rows and rows[-1]["step"] == a.max_steps and "val_loss" in rows[-1]):
        wait_for_lock()
        cmd = [sys.executable, "-m", "bitnet", "train", "--data", corpus["train"], "--out", path, "--preset", preset,
               "--linear", linear, "--max-steps", str(a.max_steps), "--eval-every", str(a.max_steps),
               "--eval-windows", "0", "--seed", str(seed), "--threads", str(a.threads), "--no-progress",
               "--cache-dir", os.path.join(a.out, "cache")]
        if lr is not None:
            cmd += ["--lr", str(lr)]
        if os.path.isfile(os.path.join(path, "trainer_state.safetensors")):
            cmd.append("--resume")
        else:
            shutil.rmtree(path, ignore_errors=True)  # a killed run before its first checkpoint: start clean
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "train.log"), "a") as log:
            code = run_politely(cmd, log)
        text = open(os.path.join(path, "train.log")).read()
        if code != 0 and "diverged" in text:
            open(os.path.join(path, "DIVERGED"), "w").close()
            diverged = True
        elif code != 0:
            raise RuntimeError(f"{path} failed (exit {code}); see {path}/train.log")
        rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    recipe = {}
    if os.path.isfile(os.path.join(path, "recipe.json")):
        recipe = json.load(open(os.path.join(path, "recipe.json")))
    used_lr = lr if lr is not None else recipe.get("lr")
    dev = math.inf if diverged else rows[-1]["val_loss"]
    return {"corpus": name, "preset": preset, "linear": linear, "lr": used_lr, "default": lr is None, "seed": seed,
            "steps": a.max_steps, "dev_loss": dev, "diverged": diverged, "path": path,
            "train_seconds": sum(r["step_time_s"] for r in rows)}


def train_point_if_complete(a, name: str, preset: str, linear: str, lr: float, seed: int) -> dict | None:
    path = run_dir(a.out, name, preset, linear, lr, seed, a.max_steps)
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    if not (rows and rows[-1]["step"] == a.max_steps and "val_loss" in rows[-1]):
        return None
    return {"corpus": name, "preset": preset, "linear": linear, "lr": lr, "default": False, "seed": seed,
            "steps": a.max_steps, "dev_loss": rows[-1]["val_loss"], "diverged": False, "path": path,
            "train_seconds": sum(r["step_time_s"] for r in rows)}


def evaluate(path: str, test: str, threads: int) -> dict:
    """`bitnet eval ppl`'s default protocol on the export: window 256 (the context of the small presets), stride 128."""
    import torch

    from bitnet.evaluate import evaluate_folder

    done = os.path.join(path, "test_ppl.json")
    if os.path.isfile(done):
        return json.load(open(done))
    wait_for_lock()
    torch.set_num_threads(threads)
    r = evaluate_folder(os.path.join(path, "export"), test, 256, 128)
    out = {"test_ppl": r.ppl, "test_tokens": r.tokens, "protocol": "sliding window 256, stride 128"}
    json.dump(out, open(done, "w"))
    return out


def state_path(a) -> str:
    return os.path.join(a.out, "points.json")


def point_key(p: dict) -> tuple:
    """What makes two records the same run."""
    return p["corpus"], p["preset"], p["linear"], p["lr"], p["default"], p["seed"], p["steps"]


def record(a, point: dict) -> None:
    """Add `point` to <out>/points.json (replacing the same run's older record); safe when several
    driver processes share --out (e.g. one per corpus, --threads 1 each, on a 2-core machine)."""
    import fcntl

    path = state_path(a)
    os.makedirs(a.out, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        points = json.load(open(path)) if os.path.isfile(path) else []
        points = [p for p in points if point_key(p) != point_key(point)] + [point]
        with open(path + ".tmp", "w") as f:
            json.dump(points, f, indent=1, default=str)
        os.replace(path + ".tmp", path)


def sweep(a) -> None:
    specs = corpora(a.shared, a.out)
    for preset in a.presets:
        for name in a.corpora:
            for linear in a.linears:
                grid = list(a.grid or GRIDS[preset])
                points: dict[float, float] = {}
                for lr in grid:
                    p = train_point(a, specs[name], name, preset, linear, lr, a.seed)
                    record(a, p)
                    points[lr] = p["dev_loss"]
                    print(f"{name:>15} {preset:>5} {linear:<8} lr {lr:<8g} dev {p['dev_loss']:.4f}", flush=True)
                for _ in range(a.extend):
                    lr = edge_lr(points)
                    if lr is None:
                        break
                    p = train_point(a, specs[name], name, preset, linear, lr, a.seed)
                    record(a, p)
                    points[lr] = p["dev_loss"]
                    print(f"{name:>15} {preset:>5} {linear:<8} lr {lr:<8g} dev {p['dev_loss']:.4f} (edge extension)",
                          flush=True)
                else:
                    if edge_lr(points) is not None:
                        print(f"{name} {preset} {linear}: best rate still at an end of the grid after --extend "
                              f"{a.extend} points; stopped at the limit", flush=True)


def seeds(a) -> None:
    specs = corpora(a.shared, a.out)
    for preset in a.presets:
        for name in a.corpora:
            for seed in a.seeds:
                for linear in a.linears:
                    p = train_point(a, specs[name], name, preset, linear, None, seed)
                    p.update(evaluate(p["path"], specs[name]["test"], a.threads))
                    record(a, p)
                    print(f"{name:>15} {preset:>5} {linear:<8} default lr {p['lr']:g} seed {seed} dev "
                          f"{p['dev_loss']:.4f} test ppl {p['test_ppl']:.2f}", flush=True)


def is_default(linear: str, preset: str, lr: float) -> bool:
    """Whether `lr` is the default rate of `linear` at `preset` (bitnet.train.recipes)."""
    from bitnet.train.recipes import default_recipe

    return abs(default_recipe(linear, preset).lr - lr) < 1e-12


def sweep_tables(points: list[dict]) -> dict:
    """{(corpus, preset): {linear: {lr: dev loss}}} of the seed-0 sweep points (explicit --lr)."""
    out: dict = {}
    for p in points:
        if p["default"] or p["seed"] != 0:
            continue
        out.setdefault((p["corpus"], p["preset"]), {}).setdefault(p["linear"], {})[p["lr"]] = p["dev_loss"]
    return out


def pick_defaults(tables: dict) -> dict:
    """{(preset, linear): (lr, worst gap)}: the swept rate whose dev loss is closest to each corpus's
    best, in the worst corpus (relative gap); only rates swept on every corpus of that preset."""
    picks = {}
    for preset in {k[1] for k in tables}:
        names = [k for k in tables if k[1] == preset]
        for linear in {lin for k in names for lin in tables[k]}:
            sweeps = [tables[k][linear] for k in names if linear in tables[k]]
            common = set.intersection(*(set(s) for s in sweeps))
            gap = lambda lr: max(s[lr] / min(s.values()) - 1 for s in sweeps)  # noqa: E731
            if common:
                lr = min(common, key=gap)
                picks[(preset, linear)] = (lr, gap(lr), len(sweeps))
    return picks


def plot_sweeps(tables: dict, preset: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitnet.plots import _save

    names = sorted(k for k in tables if k[1] == preset)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), dpi=110, squeeze=False)
    for ax, key in zip(axes.flat, names):
        for linear in LINEARS:
            pts = tables[key].get(linear)
            if not pts:
                continue
            lrs = sorted(lr for lr in pts if math.isfinite(pts[lr]))
            line, = ax.plot(lrs, [pts[lr] for lr in lrs], marker="o", label=linear)
            hit = [lr for lr in lrs if is_default(linear, preset, lr)]
            if hit:  # the default: a star on its line
                ax.plot(hit, [pts[hit[0]]], marker="*", markersize=14, color=line.get_color(), linestyle="none")
        ax.set_xscale("log")
        every = sorted({lr for pts in tables[key].values() for lr in pts})
        ax.set_xticks(every, [f"{lr:.2g}" for lr in every], rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set_title(f"{preset} on {key[0]}: final dev loss, {points_steps(key)} steps (star: default)", fontsize=10)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("dev loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def points_steps(key) -> int:
    return STEPS_SEEN.get(key, 300)


STEPS_SEEN: dict = {}


def report(a) -> None:
    from bitnet.bench import RESULTS_DIR, save_results
    from bitnet.train.recipes import default_recipe

    points = json.load(open(state_path(a)))
    kept_ablations = []
    if a.keep_from:  # an earlier session's results: its points and ablations stay unless rerun here
        earlier = json.load(open(a.keep_from))
        have = {point_key(p) for p in points}
        points = [p for p in earlier["points"] if point_key(p) not in have] + points
        kept_ablations = earlier.get("ablations", [])
    for p in points:
        STEPS_SEEN[(p["corpus"], p["preset"])] = p["steps"]
    tables = sweep_tables(points)
    picks = pick_defaults(tables)
    md = ["## LR sweeps (seed 0): final dev loss; **bold** = best of the sweep, `*` = the current default rate", ""]
    checks = []
    for key in sorted(tables, key=lambda k: (list(GRIDS).index(k[1]), k[0])):
        corpus, preset = key
        t = tables[key]
        lrs = sorted({lr for pts in t.values() for lr in pts})
        systems = [lin for lin in LINEARS if lin in t]
        md += [f"**{preset} on {corpus}** ({STEPS_SEEN[key]} steps x 2,048 tokens)", "",
               "| lr | " + " | ".join(systems) + " |", "|---" * (len(systems) + 1) + "|"]
        for lr in lrs:
            cells = []
            for lin in systems:
                v = t[lin].get(lr)
                mark = "*" if is_default(lin, preset, lr) else ""
                if v is None:
                    cells.append("")
                elif not math.isfinite(v):
                    cells.append(f"diverged{mark}")
                elif v == min(t[lin].values()):
                    cells.append(f"**{v:.4f}**{mark}")
                else:
                    cells.append(f"{v:.4f}{mark}")
            md.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        md.append("")
        for lin in systems:
            pts, d = t[lin], default_recipe(lin, preset).lr
            best_lr = min(pts, key=lambda lr: pts[lr])
            inside = best_lr not in (min(pts), max(pts))
            hit = next((v for lr, v in pts.items() if is_default(lin, preset, lr)), None)
            checks.append({"corpus": corpus, "preset": preset, "linear": lin, "best_lr": best_lr,
                           "best_dev_loss": pts[best_lr], "best_inside_grid": inside, "default_lr": d,
                           "default_dev_loss": hit, "gap": None if hit is None else hit / pts[best_lr] - 1,
                           "points": len(pts)})
    md += ["## Defaults against the sweeps", "",
           "| size | corpus | system | best lr | best inside the grid | default lr | default's dev loss over the best |",
           "|---|---|---|---|---|---|---|"]
    for c in checks:
        gap = "not swept" if c["gap"] is None else f"{100 * c['gap']:+.2f}%"
        md.append(f"| {c['preset']} | {c['corpus']} | {c['linear']} | {c['best_lr']:g} | "
                  f"{'yes' if c['best_inside_grid'] else 'NO (edge)'} | {c['default_lr']:g} | {gap} |")
    md.append("")
    seeds_md, seed_rows = seed_table(points)
    md += seeds_md
    ablations = []  # extra runs under <out>/<corpus>/ablation/<name>/ (e.g. the twin on the two-stage schedule)
    for corpus in sorted(os.listdir(a.out)):
        folder = os.path.join(a.out, corpus, "ablation")
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            rows = read_jsonl(os.path.join(folder, name, "metrics.jsonl"))
            recipe = json.load(open(os.path.join(folder, name, "recipe.json")))
            if rows and "val_loss" in rows[-1]:
                ablations.append({"corpus": corpus, "run": name, "dev_loss": rows[-1]["val_loss"], "recipe": recipe})
    here = {(x["corpus"], x["run"]) for x in ablations}
    ablations = [x for x in kept_ablations if (x["corpus"], x["run"]) not in here] + ablations
    ablations.sort(key=lambda x: (x["corpus"], x["run"]))
    if ablations:
        md += ["## Ablations (seed 0, final dev loss)", "", "| corpus | run | dev loss |", "|---|---|---|"]
        md += [f"| {x['corpus']} | {x['run']} | {x['dev_loss']:.4f} |" for x in ablations] + [""]
    payload = {"protocol": __doc__, "points": points, "checks": checks, "seeds": seed_rows, "ablations": ablations,
               "picks": [{"preset": k[0], "linear": k[1], "lr": v[0], "worst_gap": v[1], "corpora": v[2]}
                         for k, v in sorted(picks.items())]}
    path = save_results("lr_sweep", payload, markdown="\n".join(md))
    for preset in sorted({k[1] for k in tables}):
        plot_sweeps(tables, preset, os.path.join(RESULTS_DIR, f"lr_sweep_{preset}.png"))
    print("\n".join(md))
    print("picks (lr, worst gap over corpora):", {k: (v[0], round(100 * v[1], 2)) for k, v in sorted(picks.items())})
    print(f"saved {path}")


def seed_table(points: list[dict]) -> tuple[list[str], list[dict]]:
    """Test ppl of the default runs per seed, and the ratios to the twin: mean and min-max."""
    runs: dict = {}
    for p in points:
        if p["default"] and "test_ppl" in p:
            runs.setdefault((p["corpus"], p["preset"]), {}).setdefault(p["seed"], {})[p["linear"]] = p
    rows, md = [], ["## Defaults only (`bitnet train --preset P --linear L --max-steps 300`), test perplexity", "",
                    "| size | corpus | seeds | lr bitnet / bitnet1 / bf16 | test ppl b1.58 | binary | twin | "
                    "ratio b1.58/twin, mean (min-max) | ratio binary/twin, mean (min-max) | "
                    "b1.58/twin on the dev split, mean (min-max) |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
    for (corpus, preset), by_seed in sorted(runs.items(), key=lambda kv: (list(GRIDS).index(kv[0][1]), kv[0][0])):
        seeds = sorted(s for s, r in by_seed.items() if "bf16" in r)
        row = {"corpus": corpus, "preset": preset, "seeds": seeds}
        cells = []
        for lin in LINEARS:
            ppl = [by_seed[s][lin]["test_ppl"] for s in seeds if lin in by_seed[s]]
            row[f"ppl_{lin}"] = ppl
            row[f"lr_{lin}"] = next((by_seed[s][lin]["lr"] for s in seeds if lin in by_seed[s]), None)
            cells.append(f"{sum(ppl) / len(ppl):.2f}" if ppl else "")
        ratios = []
        for lin in ("bitnet", "bitnet1"):
            r = [by_seed[s][lin]["test_ppl"] / by_seed[s]["bf16"]["test_ppl"] for s in seeds if lin in by_seed[s]]
            row[f"ratio_{lin}"] = r
            ratios.append(f"{sum(r) / len(r):.3f} ({min(r):.3f}-{max(r):.3f})" if r else "")
        dev = [math.exp(by_seed[s]["bitnet"]["dev_loss"] - by_seed[s]["bf16"]["dev_loss"]) for s in seeds
               if "bitnet" in by_seed[s]]
        row["dev_ratio_bitnet"] = dev  # the same ratio on the dev split (the trainer's final dev loss)
        ratios.append(f"{sum(dev) / len(dev):.3f} ({min(dev):.3f}-{max(dev):.3f})" if dev else "")
        lrs = " / ".join(f"{row[f'lr_{lin}']:g}" if row[f"lr_{lin}"] else "-" for lin in LINEARS)
        md.append(f"| {preset} | {corpus} | {len(seeds)} | {lrs} | " + " | ".join(cells + ratios) + " |")
        rows.append(row)
    return md + [""], rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["sweep", "seeds", "report"])
    p.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(GRIDS))
    p.add_argument("--corpora", nargs="+", default=["tinyshakespeare", "wikitext-2"])
    p.add_argument("--linears", nargs="+", default=LINEARS, choices=LINEARS)
    p.add_argument("--grid", nargs="+", type=float, default=None, help="starting rates (default: GRIDS[preset])")
    p.add_argument("--extend", type=int, default=3, help="edge extensions per sweep at most")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-from", default=None, help="report: an earlier results JSON (e.g. benchmarks/results/"
                   "lr_sweep.json) whose points and ablations are kept where --out has no newer record")
    a = p.parse_args()
    if a.phase == "sweep":
        sweep(a)
    elif a.phase == "seeds":
        seeds(a)
    else:
        report(a)


if __name__ == "__main__":
    main()

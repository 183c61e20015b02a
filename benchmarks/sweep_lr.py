"""Learning-rate sweeps of `bitnet train` as a new user runs it (the defaults, --max-steps 300),
and the defaults' perplexity ratio over seeds: the evidence behind bitnet/train/recipes.py.

    python benchmarks/sweep_lr.py sweep --presets tiny small          # dev loss at each rate, per corpus
    python benchmarks/sweep_lr.py sweep --presets small --warmups 0.2 0.4 --grid 0.002 0.004   # warm-up axis
    python benchmarks/sweep_lr.py sweep --presets tiny --warmups 0.4 --seed 1   # the same sweep at another seed
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
infinite loss. Warm-up is the second axis: every explicit run warms up for a fraction of its steps
(--warmups, default 5%: the trainer's old default), one LR sweep per fraction; a defaults run takes
the whole recipe, warm-up included. A sweep line run at several seeds (--seed) is also reported as
the mean over its seeds, ranked on the mean. Each record names the CPU it ran on and when it
finished (float reductions differ between machines, and a run's last digits with them). Test
perplexity (seeds) is `bitnet eval ppl`'s default protocol on the export (sliding window of 256
tokens, stride 128).

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
from collections import Counter

from bitnet.bench import cpu_name
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


WARMUP = 0.05  # the warm-up fraction of the first sweeps (the trainer's old default); records without one had it


def warmup_steps(fraction: float, steps: int) -> int:
    """Warm-up steps of a run of `steps` that warms up for `fraction` of them: the trainer's rule."""
    from bitnet.train.recipes import Recipe

    return Recipe(lr=1.0, schedule="cosine", warmup_fraction=fraction).warmup_for(steps)


def default_point(linear: str, preset: str, steps: int) -> tuple[float, float]:
    """(lr, warm-up fraction) of the default recipe of `linear` at `preset` for a run of `steps`."""
    from bitnet.train.recipes import default_recipe

    r = default_recipe(linear, preset)
    return r.lr, r.warmup_for(steps) / steps


def run_dir(out: str, corpus: str, preset: str, linear: str, lr: float | None, warmup: float | None, seed: int,
            steps: int) -> str:
    tag = "default" if lr is None else f"lr{lr:g}-wu{warmup:g}"
    return os.path.join(out, corpus, "runs", f"{preset}-{linear}-{tag}-s{seed}-{steps}")


def train_point(a, corpus: dict, name: str, preset: str, linear: str, lr: float | None, seed: int,
                warmup: float | None = None) -> dict:
    """One `bitnet train` run (reused when complete); returns its record. An explicit run (lr given)
    warms up for the fraction `warmup` of its steps; a defaults run (lr None) takes the whole recipe,
    and reuses the explicit run at the default rate and warm-up when that one is complete: the same
    computation."""
    if lr is None:
        d_lr, d_wu = default_point(linear, preset, a.max_steps)
        same = train_point_if_complete(a, name, preset, linear, d_lr, d_wu, seed)
        if same is not None:
            return {**same, "default": True}
    path = run_dir(a.out, name, preset, linear, lr, warmup, seed, a.max_steps)
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    diverged = os.path.isfile(os.path.join(path, "DIVERGED"))
    if not diverged and not (rows and rows[-1]["step"] == a.max_steps and "val_loss" in rows[-1]):
        wait_for_lock()
        cmd = [sys.executable, "-m", "bitnet", "train", "--data", corpus["train"], "--out", path, "--preset", preset,
               "--linear", linear, "--max-steps", str(a.max_steps), "--eval-every", str(a.max_steps),
               "--eval-windows", "0", "--seed", str(seed), "--threads", str(a.threads), "--no-progress",
               "--cache-dir", os.path.join(a.out, "cache")]
        if lr is not None:
            cmd += ["--lr", str(lr), "--warmup-steps", str(warmup_steps(warmup, a.max_steps))]
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
    used_wu = warmup if lr is not None else recipe["warmup_steps"] / a.max_steps
    return run_record(a, name, preset, linear, used_lr, used_wu, lr is None, seed, path, rows, diverged)


def run_record(a, name: str, preset: str, linear: str, lr: float, warmup: float, default: bool, seed: int,
               path: str, rows: list[dict], diverged: bool = False) -> dict:
    """The record of a finished run; `finished` (UTC, from its metrics file) tells one session's
    machine from another's where the CPU's name does not."""
    return {"corpus": name, "preset": preset, "linear": linear, "lr": lr, "warmup": warmup, "default": default,
            "seed": seed, "steps": a.max_steps, "dev_loss": math.inf if diverged else rows[-1]["val_loss"],
            "diverged": diverged, "path": path, "train_seconds": sum(r["step_time_s"] for r in rows),
            "cpu": cpu_name(), "finished": finished_at(path)}


def finished_at(path: str) -> str:
    """When the run in `path` wrote its last metrics (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(os.path.getmtime(os.path.join(path, "metrics.jsonl"))))


def train_point_if_complete(a, name: str, preset: str, linear: str, lr: float, warmup: float,
                            seed: int) -> dict | None:
    path = run_dir(a.out, name, preset, linear, lr, warmup, seed, a.max_steps)
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    if not (rows and rows[-1]["step"] == a.max_steps and "val_loss" in rows[-1]):
        return None
    return run_record(a, name, preset, linear, lr, warmup, False, seed, path, rows)


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
    return p["corpus"], p["preset"], p["linear"], p["lr"], p.get("warmup", WARMUP), p["default"], p["seed"], p["steps"]


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
                for wu in a.warmups:
                    sweep_rates(a, specs[name], name, preset, linear, wu)


def sweep_rates(a, spec: dict, name: str, preset: str, linear: str, wu: float) -> None:
    """One LR sweep at warm-up fraction `wu`: the grid, then edge extensions up to --extend."""
    grid = list(a.grid or GRIDS[preset])
    points: dict[float, float] = {}
    where = f"{name:>15} {preset:>5} {linear:<8} warm-up {wu:<5g}"
    for lr in grid:
        p = train_point(a, spec, name, preset, linear, lr, a.seed, wu)
        record(a, p)
        points[lr] = p["dev_loss"]
        print(f"{where} lr {lr:<8g} dev {p['dev_loss']:.4f}", flush=True)
    for _ in range(a.extend):
        lr = edge_lr(points)
        if lr is None:
            break
        p = train_point(a, spec, name, preset, linear, lr, a.seed, wu)
        record(a, p)
        points[lr] = p["dev_loss"]
        print(f"{where} lr {lr:<8g} dev {p['dev_loss']:.4f} (edge extension)", flush=True)
    else:
        if edge_lr(points) is not None:
            print(f"{name} {preset} {linear} warm-up {wu:g}: best rate still at an end of the grid after --extend "
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
                    print(f"{name:>15} {preset:>5} {linear:<8} default lr {p['lr']:g} warm-up {p['warmup']:g} "
                          f"seed {seed} dev {p['dev_loss']:.4f} test ppl {p['test_ppl']:.2f}", flush=True)


def is_default(linear: str, preset: str, lr: float, warmup: float, steps: int) -> bool:
    """Whether (lr, warm-up fraction) is the default recipe of `linear` at `preset` (bitnet.train.recipes)."""
    d_lr, d_wu = default_point(linear, preset, steps)
    return abs(d_lr - lr) < 1e-12 and warmup_steps(warmup, steps) == warmup_steps(d_wu, steps)


def sweep_tables(points: list[dict]) -> dict:
    """{(corpus, preset): {linear: {(lr, warm-up): dev loss}}} of the seed-0 sweep points (explicit --lr)."""
    out: dict = {}
    for p in points:
        if p["default"] or p["seed"] != 0:
            continue
        pts = out.setdefault((p["corpus"], p["preset"]), {}).setdefault(p["linear"], {})
        pts[(p["lr"], p.get("warmup", WARMUP))] = p["dev_loss"]
    return out


def seed_sweeps(points: list[dict]) -> dict:
    """{(corpus, preset): {linear: {(lr, warm-up): {seed: dev loss}}}} of the sweep lines (corpus,
    preset, system, warm-up) run at more than one seed, each line kept at the rates that ran at every
    one of its seeds."""
    runs: dict = {}
    for p in points:
        if not p["default"]:
            line = runs.setdefault((p["corpus"], p["preset"], p["linear"], p.get("warmup", WARMUP)), {})
            line.setdefault(p["lr"], {})[p["seed"]] = p["dev_loss"]
    out: dict = {}
    for (corpus, preset, linear, wu), line in runs.items():
        seeds = max((set(s) for s in line.values()), key=len)
        if len(seeds) > 1:
            out.setdefault((corpus, preset), {}).setdefault(linear, {}).update(
                {(lr, wu): {k: s[k] for k in sorted(seeds)} for lr, s in line.items() if set(s) >= seeds})
    return out


def pick_defaults(tables: dict) -> dict:
    """{(preset, linear): ((lr, warm-up), worst gap, corpora)}: the swept point whose dev loss is
    closest to each corpus's best, in the worst corpus (relative gap); only points swept on every
    corpus of that preset."""
    picks = {}
    for preset in {k[1] for k in tables}:
        names = [k for k in tables if k[1] == preset]
        for linear in {lin for k in names for lin in tables[k]}:
            sweeps = [tables[k][linear] for k in names if linear in tables[k]]
            common = set.intersection(*(set(s) for s in sweeps))
            gap = lambda pt: max(s[pt] / min(s.values()) - 1 for s in sweeps)  # noqa: E731
            if common:
                pt = min(common, key=gap)
                picks[(preset, linear)] = (pt, gap(pt), len(sweeps))
    return picks


def picks_json(picks: dict) -> list[dict]:
    return [{"preset": k[0], "linear": k[1], "lr": v[0][0], "warmup": v[0][1], "worst_gap": v[1], "corpora": v[2]}
            for k, v in sorted(picks.items())]


def warmups_of(pts: dict) -> list[float]:
    return sorted({wu for _, wu in pts})


def plot_sweeps(tables: dict, preset: str, path: str, spread: dict | None = None, what: str = "final dev loss") -> str:
    """Dev loss against the rate, a line per system and warm-up; `spread` ({key: {linear: {(lr, wu):
    (lo, hi)}}}) draws each point's range over seeds as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitnet.plots import _save

    names = sorted(k for k in tables if k[1] == preset)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), dpi=110, squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, key in zip(axes.flat, names):
        steps = points_steps(key)
        every_wu = sorted({wu for pts in tables[key].values() for _, wu in pts})
        for i, linear in enumerate(LINEARS):
            pts = tables[key].get(linear)
            if not pts:
                continue
            for wu in warmups_of(pts):
                lrs = sorted(lr for lr, w in pts if w == wu and math.isfinite(pts[(lr, w)]))
                label = linear if len(every_wu) == 1 else f"{linear}, warm-up {100 * wu:g}%"
                ys = [pts[(lr, wu)] for lr in lrs]
                ax.plot(lrs, ys, marker="o", color=f"C{i}", linestyle=styles[every_wu.index(wu) % len(styles)],
                        label=label)
                if spread is not None and lrs:
                    lo, hi = zip(*(spread[key][linear][(lr, wu)] for lr in lrs))
                    ax.errorbar(lrs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                                fmt="none", ecolor=f"C{i}", capsize=3, alpha=0.6)
                hit = [lr for lr in lrs if is_default(linear, preset, lr, wu, steps)]
                if hit:  # the default: a star on its line
                    ax.plot(hit, [pts[(hit[0], wu)]], marker="*", markersize=14, color=f"C{i}", linestyle="none")
        ax.set_xscale("log")
        every = sorted({lr for pts in tables[key].values() for lr, _ in pts})
        ax.set_xticks(every, [f"{lr:.2g}" for lr in every], rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set_title(f"{preset} on {key[0]}: {what}, {steps} steps (star: default)", fontsize=10)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("dev loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def points_steps(key) -> int:
    return STEPS_SEEN.get(key, 300)


STEPS_SEEN: dict = {}


def sweep_section(tables: dict, note, cell) -> tuple[list[str], list[dict]]:
    """A markdown table per (corpus, preset) of `tables` ({key: {linear: {(lr, wu): dev loss}}}, the
    loss a point is ranked by), with `cell(key, linear, (lr, wu))` as each point's text and `note(key)`
    in its heading, and the check of each system's default against the best of its sweep."""
    md, checks = [], []
    for key in sorted(tables, key=lambda k: (list(GRIDS).index(k[1]), k[0])):
        corpus, preset = key
        t, steps = tables[key], STEPS_SEEN[key]
        lrs = sorted({lr for pts in t.values() for lr, _ in pts})
        cols = [(lin, wu) for lin in LINEARS if lin in t for wu in warmups_of(t[lin])]
        one_wu = len({wu for _, wu in cols}) == 1
        head = [lin if one_wu else f"{lin} wu {warmup_steps(wu, steps)}" for lin, wu in cols]
        wu_note = (f"warm-up {warmup_steps(cols[0][1], steps)} steps" if one_wu else
                   "`wu N`: N warm-up steps")
        md += [f"**{preset} on {corpus}** ({steps} steps x 2,048 tokens; {wu_note}; {note(key)})", "",
               "| lr | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
        for lr in lrs:
            cells = []
            for lin, wu in cols:
                v = t[lin].get((lr, wu))
                mark = "*" if is_default(lin, preset, lr, wu, steps) else ""
                if v is None:
                    cells.append("")
                elif not math.isfinite(v):
                    cells.append(f"diverged{mark}")
                elif v == min(t[lin].values()):
                    cells.append(f"**{cell(key, lin, (lr, wu))}**{mark}")
                else:
                    cells.append(f"{cell(key, lin, (lr, wu))}{mark}")
            md.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        md.append("")
        for lin in LINEARS:
            if lin not in t:
                continue
            pts = t[lin]
            d_lr, d_wu = default_point(lin, preset, steps)
            best = min(pts, key=lambda pt: pts[pt])
            at_wu = [lr for lr, wu in pts if wu == best[1]]  # the rates swept at the best's warm-up
            inside = best[0] not in (min(at_wu), max(at_wu))
            hit = next((v for (lr, wu), v in pts.items() if is_default(lin, preset, lr, wu, steps)), None)
            checks.append({"corpus": corpus, "preset": preset, "linear": lin, "best_lr": best[0],
                           "best_warmup": best[1], "best_warmup_steps": warmup_steps(best[1], steps),
                           "best_dev_loss": pts[best], "best_inside_grid": inside, "default_lr": d_lr,
                           "default_warmup": d_wu, "default_warmup_steps": warmup_steps(d_wu, steps),
                           "default_dev_loss": hit, "gap": None if hit is None else hit / pts[best] - 1,
                           "points": len(pts), "warmups_swept": warmups_of(pts)})
    return md, checks


def report(a) -> None:
    from bitnet.bench import RESULTS_DIR, save_results

    points = json.load(open(state_path(a)))
    for p in points:  # records written before they carried `finished`: the run's own metrics file tells
        if "finished" not in p and os.path.isfile(os.path.join(p["path"], "metrics.jsonl")):
            p["finished"] = finished_at(p["path"])
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
    md = ["## LR sweeps (seed 0): final dev loss; **bold** = best of the sweep, `*` = the current default "
          "(rate and warm-up)", ""]

    def where(key):
        cpus = Counter(p.get("cpu", "not recorded (an earlier session)") for p in points
                       if (p["corpus"], p["preset"]) == key and not p["default"] and p["seed"] == 0)
        return "points by CPU: " + ", ".join(f"{cpu} {n}" for cpu, n in cpus.most_common())

    tables_md, checks = sweep_section(tables, where, lambda key, lin, pt: f"{tables[key][lin][pt]:.4f}")
    md += tables_md
    by_seed = seed_sweeps(points)
    means = {key: {lin: {pt: sum(s.values()) / len(s) for pt, s in pts.items()} for lin, pts in t.items()}
             for key, t in by_seed.items()}
    spread = {key: {lin: {pt: (min(s.values()), max(s.values())) for pt, s in pts.items()} for lin, pts in t.items()}
              for key, t in by_seed.items()}

    def seeds_of(key):
        return sorted({k for pts in by_seed[key].values() for s in pts.values() for k in s})

    def mean_cell(key, lin, pt):  # a mean with a diverged seed is infinite: sweep_section writes "diverged"
        return f"{means[key][lin][pt]:.4f} ({spread[key][lin][pt][0]:.4f}-{spread[key][lin][pt][1]:.4f})"

    seed_picks = pick_defaults(means)
    seed_md, seed_checks = sweep_section(means, lambda key: f"seeds {', '.join(map(str, seeds_of(key)))}", mean_cell)
    if seed_md:
        md += ["## LR sweeps over seeds: mean final dev loss (min-max over the seeds), each line at the rates "
               "run at every one of its seeds; **bold** = best mean of the sweep, `*` = the current default", ""]
        md += seed_md
    md += ["## Defaults against the sweeps", "",
           "| size | corpus | system | seeds | best lr, warm-up steps | best rate inside its grid | "
           "default lr, warm-up steps | default's dev loss over the best |",
           "|---|---|---|---|---|---|---|---|"]
    for c in [{**c, "seeds": "0"} for c in checks] + [{**c, "seeds": "mean of " + ", ".join(
            map(str, seeds_of((c["corpus"], c["preset"]))))} for c in seed_checks]:
        gap = "not swept" if c["gap"] is None else f"{100 * c['gap']:+.2f}%"
        md.append(f"| {c['preset']} | {c['corpus']} | {c['linear']} | {c['seeds']} | {c['best_lr']:g}, "
                  f"{c['best_warmup_steps']} | "
                  f"{'yes' if c['best_inside_grid'] else 'NO (edge)'} | {c['default_lr']:g}, "
                  f"{c['default_warmup_steps']} | {gap} |")
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
    payload = {"protocol": __doc__, "points": points, "checks": checks,
               "seed_checks": [{**c, "seeds": seeds_of((c["corpus"], c["preset"]))} for c in seed_checks],
               "seeds": seed_rows, "ablations": ablations,
               "picks": picks_json(picks), "seed_picks": picks_json(seed_picks)}
    path = save_results("lr_sweep", payload, markdown="\n".join(md))
    for preset in sorted({k[1] for k in tables}):
        plot_sweeps(tables, preset, os.path.join(RESULTS_DIR, f"lr_sweep_{preset}.png"))
    for preset in sorted({k[1] for k in means}):
        plot_sweeps(means, preset, os.path.join(RESULTS_DIR, f"lr_sweep_{preset}_seeds.png"), spread,
                    "mean dev loss over seeds\n(bars: min-max)")
    print("\n".join(md))
    for name, chosen in (("seed 0", picks), ("seed means", seed_picks)):
        print(f"picks on {name} ((lr, warm-up), worst gap % over corpora):",
              {k: (v[0], round(100 * v[1], 2)) for k, v in sorted(chosen.items())})
    print(f"saved {path}")


def seed_table(points: list[dict]) -> tuple[list[str], list[dict]]:
    """Test ppl of the default runs per seed, and the ratios to the twin: mean and min-max. Only runs
    of the current defaults count (an earlier default's runs, kept from an older record, do not)."""
    runs: dict = {}
    for p in points:
        if p["default"] and "test_ppl" in p and is_default(p["linear"], p["preset"], p["lr"],
                                                           p.get("warmup", WARMUP), p["steps"]):
            runs.setdefault((p["corpus"], p["preset"]), {}).setdefault(p["seed"], {})[p["linear"]] = p
    rows, md = [], ["## Defaults only (`bitnet train --preset P --linear L --max-steps 300`), test perplexity", "",
                    "| size | corpus | seeds | lr, warm-up steps: bitnet / bitnet1 / bf16 | test ppl b1.58 | binary | twin | "
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
            row[f"warmup_{lin}"] = next((by_seed[s][lin].get("warmup", WARMUP) for s in seeds if lin in by_seed[s]), None)
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
        steps = by_seed[seeds[0]]["bf16"]["steps"]
        lrs = " / ".join(f"{row[f'lr_{lin}']:g}, {warmup_steps(row[f'warmup_{lin}'], steps)}" if row[f"lr_{lin}"] else "-"
                         for lin in LINEARS)
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
    p.add_argument("--warmups", nargs="+", type=float, default=[WARMUP],
                   help="sweep: warm-up fractions of --max-steps, one LR sweep each (default: 0.05)")
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

"""Does distillation help a converted model? A float model (the bf16 twin) trained on a corpus, then
converted to BitNet b1.58 and fine-tuned with quantization-aware training, once on the corpus
alone and once per distillation weight with the float model as teacher (`bitnet train --init T
--teacher T --distill-weight W`): test perplexity and KL(teacher || student) on text none of them
trained on.

    python benchmarks/bench_distill.py --data ../shared/data/tinyshakespeare/input.txt
    python benchmarks/bench_distill.py --data ... --preset small --teacher-steps 600 --steps 300 --students 0 10 10+att10

Protocol. The corpus' first 90% (cut at a line) is the training file, the rest the test text. The
teacher: `bitnet train --linear bf16 --preset P --max-steps N` with the defaults otherwise (its own
byte-level BPE, seq_len 256, micro-batch 8, the twin's recipe); its export is every student's
--init and teacher, its tokenizer theirs. Each student: `bitnet train --init TEACHER --linear
bitnet --max-steps M` (the same data order, seed and default recipe for the converted shape),
with --teacher TEACHER --distill-weight W --distill-temperature T where W > 0, with
--distill-attention-weight G for the attention term, with --sub-norms for BitNet's sub-norms
inserted first (--students 0 1 10 10+att10 10+subln). With --student-data F the students train on the training
file's first F only (cut at a line), the regime of a converted model fine-tuned on far less text
than its teacher learned from. Test perplexity:
`bitnet eval ppl`'s sliding window (256 tokens, stride 128) on the test text, the students packed
(export/, as they are served); the KL: the float64 mean over the test text's positions (windows
of 256) of KL(softmax(teacher) || softmax(student)), T = 1. Step time: the median of the run's
logged steps (the teacher's forward is the cost of distilling). Each run is its own process with
--threads; runs are reused when complete. Results: benchmarks/results/distill_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bitnet.bench import cpu_flags, cpu_name, save_results
from bitnet.evaluate import evaluate_folder, load_text_ids
from bitnet.model import BitNetForCausalLM
from bitnet.plots import read_jsonl


def split(data: str, out: str) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    train, test = os.path.join(out, "train.txt"), os.path.join(out, "test.txt")
    text = open(data, encoding="utf-8").read()
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    for path, part in ((train, text[:cut]), (test, text[cut:])):
        if not os.path.isfile(path) or open(path, encoding="utf-8").read() != part:
            with open(path, "w", encoding="utf-8") as f:
                f.write(part)
    return train, test


def head_of(path: str, fraction: float) -> str:
    """The file's leading `fraction`, cut at a line (written beside it)."""
    if fraction >= 1:
        return path
    text = open(path, encoding="utf-8").read()
    out = f"{path[:-4]}-{fraction:g}.txt"
    part = text[:text.rfind("\n", 0, int(len(text) * fraction)) + 1]
    if not os.path.isfile(out) or open(out, encoding="utf-8").read() != part:
        with open(out, "w", encoding="utf-8") as f:
            f.write(part)
    return out


def train(a, path: str, steps: int, *args: str, data: str | None = None, seed: int = 0) -> dict:
    """One `bitnet train` run (reused when complete); returns its timing."""
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    if not (rows and rows[-1]["step"] == steps and os.path.isdir(os.path.join(path, "export"))):
        cmd = [sys.executable, "-m", "bitnet", "train", "--data", data or a.train, "--out", path, "--preset", a.preset,
               "--max-steps", str(steps), "--eval-every", str(steps), "--eval-windows", "0", "--seed", str(seed),
               "--threads", str(a.threads), "--no-progress", "--device", "cpu", "--cache-dir",
               os.path.join(a.out, "cache"), *args]
        print("  " + " ".join(cmd[3:]), flush=True)
        t0 = time.time()
        if os.path.isfile(os.path.join(path, "trainer_state.safetensors")):
            cmd.append("--resume")  # a run stopped part-way continues exactly
        with open(path + ".log", "a") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc:
            raise SystemExit(f"bitnet train failed ({rc}); see {path}.log")
        print(f"    {time.time() - t0:.0f} s", flush=True)
        rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    times = [r["step_time_s"] for r in rows]
    done = time.gmtime(os.path.getmtime(os.path.join(path, "metrics.jsonl")))
    return {"finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", done), "steps": rows[-1]["step"], "step_time_ms": 1000 * statistics.median(times), "final_train_loss":
            rows[-1]["train_loss"], "final_val_loss": rows[-1].get("val_loss"),
            "final_distill_loss": rows[-1].get("distill_loss")}


@torch.no_grad()
def test_kl(student: str, teacher: str, test: str, window: int = 256) -> float:
    """Mean over the test text's positions of KL(softmax(teacher) || softmax(student)), float64."""
    ids = load_text_ids(teacher, test)
    n = (len(ids) // window) * window
    x = ids[:n].view(-1, window)
    models = [BitNetForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (student, teacher)]
    total = 0.0
    for i in range(0, len(x), 8):
        s, t = (m(x[i:i + 8]).logits.double().flatten(0, 1) for m in models)
        total += F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum").item()
    return total / n


def student_spec(spec: str, steps: int) -> tuple[float, float, bool, int]:
    """'10+att10+subln@100' -> (logits weight 10, attention weight 10, sub-norms, 100 steps; default `steps`)."""
    spec, _, at = spec.partition("@")
    first, *rest = spec.split("+")
    att, sub = 0.0, False
    for part in rest:
        if part == "subln":
            sub = True
        elif part.startswith("att"):
            att = float(part[3:])
        else:
            raise SystemExit(f"--students {spec}: {part!r} is neither attG nor subln")
    return float(first), att, sub, int(at) if at else steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="corpus text file (first 90%% trained on, the rest tested)")
    p.add_argument("--out", default="runs/distill", help="run folders (complete ones are reused)")
    p.add_argument("--preset", default="small")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each student")
    p.add_argument("--students", nargs="+", default=["0", "1", "10"],
                   help="one run each: the logits' distillation weight (0: no teacher), +attG for the attention "
                   "term at weight G, +subln for --sub-norms, @N for N steps instead of --steps (e.g. 10+att10, "
                   "0+subln, 0@30)")
    p.add_argument("--student-data", type=float, default=1.0,
                   help="the students train on this leading fraction of the training file (the teacher on all of "
                   "it): a fine-tuning corpus smaller than what the teacher learned from")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="each student at each seed (its data order; "
                   "the teacher is seed 0's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="distill_cpu")
    a = p.parse_args()
    a.train, a.test = split(a.data, os.path.join(a.out, "data"))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    teacher = os.path.join(a.out, f"teacher-{a.preset}-{a.teacher_steps}")
    print(f"teacher: bf16 {a.preset}, {a.teacher_steps} steps", flush=True)
    runs = [{"system": "teacher (bf16 twin)", "weight": None, **train(a, teacher, a.teacher_steps, "--linear", "bf16")}]
    t_export = os.path.join(teacher, "export")
    student_data = head_of(a.train, a.student_data)
    for spec in a.students:
        w, att, sub, steps = student_spec(spec, a.steps)
        system = "BitNet b1.58 QAT" + (" + sub-norms" if sub else "") + (" + logits KD" if w else "") + \
            (" + attention KD" if att else "")
        extra = ["--sub-norms"] if sub else []
        if w or att:
            extra += ["--teacher", t_export, "--distill-weight", str(w), "--distill-temperature", str(a.temperature)]
        if att:
            extra += ["--distill-attention-weight", str(att)]
        for seed in a.seeds:
            tag = f"w{w:g}-t{a.temperature:g}" + (f"-att{att:g}" if att else "") + ("-subln" if sub else "") + \
                (f"-data{a.student_data:g}" if a.student_data < 1 else "") + (f"-seed{seed}" if seed else "")
            path = os.path.join(a.out, f"student-{a.preset}-{steps}-{tag}")
            print(f"student: {system}, {steps} steps ({spec}), seed {seed}", flush=True)
            runs.append({"system": system, "spec": spec, "seed": seed, "weight": w, "attention_weight": att,
                         "sub_norms": sub, "path": path, **train(a, path, steps, "--init", t_export, "--linear",
                                                                "bitnet", *extra, data=student_data, seed=seed)})
    runs[0].update(path=teacher, spec="teacher", seed=0)
    for r in runs:
        export = os.path.join(r["path"], "export")
        r["test_ppl"] = evaluate_folder(export, a.test, max_length=256, stride=128).ppl
        r["test_kl"] = None if r["weight"] is None else test_kl(export, t_export, a.test)
        print(f"  {r['system']:<34} ({r['spec']}, seed {r['seed']}): test ppl {r['test_ppl']:.2f}"
              + (f", KL {r['test_kl']:.4f}" if r["test_kl"] is not None else ""), flush=True)
    ppl_t = runs[0]["test_ppl"]
    for r in runs:
        r["ppl_ratio_to_teacher"] = r["test_ppl"] / ppl_t
        r["path"] = os.path.relpath(r["path"])

    def cell(v, fmt):
        return "" if v is None else format(v, fmt)

    head = ("| system | logits KD weight | attention KD weight | steps | step time (ms) | test ppl, mean of seeds "
            "(each) | / teacher | KL(teacher \\|\\| student), test, mean |\n|---|---|---|---|---|---|---|---|")
    lines = []
    for spec in ["teacher", *a.students]:
        group = [r for r in runs if r["spec"] == spec]
        ppl = statistics.mean(r["test_ppl"] for r in group)
        each = " (" + ", ".join(format(r["test_ppl"], ".2f") for r in group) + ")" if len(group) > 1 else ""
        kl = None if group[0]["test_kl"] is None else statistics.mean(r["test_kl"] for r in group)
        g = group[0]
        lines.append(f"| {g['system']} | {cell(g['weight'], 'g')} | {cell(g.get('attention_weight'), 'g')} | "
                     f"{g['steps']} | {statistics.median(r['step_time_ms'] for r in group):.0f} | {ppl:.2f}{each} | "
                     f"{ppl / ppl_t:.3f} | {cell(kl, '.4f')} |")
    md = (f"# Distillation in QAT: a converted model fine-tuned with and without its float teacher\n\n"
          f"CPU `{cpu_name()}` ({', '.join(cpu_flags())}), {a.threads} threads; runs finished {min(r['finished'] for r in runs)} to "
          f"{max(r['finished'] for r in runs)} (complete runs are reused), evaluated {started}. "
          f"Corpus `{os.path.relpath(a.data)}` (first 90% trained, last 10% tested); preset `{a.preset}`; teacher "
          f"{a.teacher_steps} steps, students {a.steps} steps each (unless a row says other) from the teacher's export"
          + (f" on the training file's first {a.student_data:.0%} only" if a.student_data < 1 else "")
          + "; temperature "
          f"{a.temperature:g}; student seeds {', '.join(map(str, a.seeds))} (the data order). Protocol: "
          "benchmarks/bench_distill.py.\n\n" + head + "\n" + "\n".join(lines)
          + "\n\nTest ppl: sliding window 256, stride 128 (students packed, as served); KL: float64, mean over the "
          "test text's positions, windows of 256.\n")
    print(md)
    save_results(a.name, {"args": vars(a), "started": started, "teacher_test_ppl": ppl_t, "runs": runs}, md)


if __name__ == "__main__":
    main()

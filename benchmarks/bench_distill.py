"""Does distillation help a converted model? A float model (the bf16 twin) trained on a corpus, then
converted to BitNet b1.58 and fine-tuned with quantization-aware training, once on the corpus
alone and once per distillation weight with the float model as teacher (`bitnet train --init T
--teacher T --distill-weight W`): test perplexity and KL(teacher || student) on text none of them
trained on.

    python benchmarks/bench_distill.py --data ../shared/data/tinyshakespeare/input.txt
    python benchmarks/bench_distill.py --data ... --preset small --teacher-steps 600 --steps 300 --weights 1 10

Protocol. The corpus' first 90% (cut at a line) is the training file, the rest the test text. The
teacher: `bitnet train --linear bf16 --preset P --max-steps N` with the defaults otherwise (its own
byte-level BPE, seq_len 256, micro-batch 8, the twin's recipe); its export is every student's
--init and teacher, its tokenizer theirs. Each student: `bitnet train --init TEACHER --linear
bitnet --max-steps M` (the same data order, seed and default recipe for the converted shape),
with --teacher TEACHER --distill-weight W --distill-temperature T where W > 0 (and, for
--sub-norms-weights, with --sub-norms: BitNet's sub-norms inserted first). Test perplexity:
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

from bitnet.bench import cpu_name, save_results
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


def train(a, path: str, steps: int, *args: str) -> dict:
    """One `bitnet train` run (reused when complete); returns its timing."""
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    if not (rows and rows[-1]["step"] == steps and os.path.isdir(os.path.join(path, "export"))):
        cmd = [sys.executable, "-m", "bitnet", "train", "--data", a.train, "--out", path, "--preset", a.preset,
               "--max-steps", str(steps), "--eval-every", str(steps), "--eval-windows", "0", "--seed", str(a.seed),
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
    return {"steps": rows[-1]["step"], "step_time_ms": 1000 * statistics.median(times), "final_train_loss":
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="corpus text file (first 90%% trained on, the rest tested)")
    p.add_argument("--out", default="runs/distill", help="run folders (complete ones are reused)")
    p.add_argument("--preset", default="small")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each student")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 10.0], help="distillation weights (beside 0)")
    p.add_argument("--sub-norms-weights", type=float, nargs="*", default=[],
                   help="also these weights (0: none) with --sub-norms: the teacher's blocks given BitNet's sub-norms")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="distill_cpu")
    a = p.parse_args()
    a.train, a.test = split(a.data, os.path.join(a.out, "data"))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    teacher = os.path.join(a.out, f"teacher-{a.preset}-{a.teacher_steps}")
    print(f"teacher: bf16 {a.preset}, {a.teacher_steps} steps", flush=True)
    runs = [{"system": "teacher (bf16 twin)", "weight": None, **train(a, teacher, a.teacher_steps, "--linear", "bf16")}]
    t_export = os.path.join(teacher, "export")
    for w, sub in [(0.0, False), *((w, False) for w in a.weights), *((w, True) for w in a.sub_norms_weights)]:
        path = os.path.join(a.out, f"student-{a.preset}-{a.steps}-w{w:g}-t{a.temperature:g}{'-subln' if sub else ''}")
        extra = ["--teacher", t_export, "--distill-weight", str(w), "--distill-temperature", str(a.temperature)] if w else []
        if sub:
            extra.append("--sub-norms")
        print(f"student: BitNet b1.58 from the teacher{' with sub-norms' if sub else ''}, {a.steps} steps, "
              f"distillation weight {w:g}", flush=True)
        runs.append({"system": "BitNet b1.58 QAT" + (" + sub-norms" if sub else "") + (" + distillation" if w else ""),
                     "weight": w, "sub_norms": sub, "path": path,
                     **train(a, path, a.steps, "--init", t_export, "--linear", "bitnet", *extra)})
    runs[0]["path"] = teacher
    for r in runs:
        export = os.path.join(r["path"], "export")
        r["test_ppl"] = evaluate_folder(export, a.test, max_length=256, stride=128).ppl
        r["test_kl"] = None if r["weight"] is None else test_kl(export, t_export, a.test)
        print(f"  {r['system']:<34} weight {r['weight']}: test ppl {r['test_ppl']:.2f}"
              + (f", KL {r['test_kl']:.4f}" if r["test_kl"] is not None else ""), flush=True)
    ppl_t = runs[0]["test_ppl"]
    for r in runs:
        r["ppl_ratio_to_teacher"] = r["test_ppl"] / ppl_t
        r["path"] = os.path.relpath(r["path"])

    head = ("| system | distill weight | steps | step time (ms) | test ppl | / teacher | KL(teacher \\|\\| student), test |\n"
            "|---|---|---|---|---|---|---|")
    def cell(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = [f"| {r['system']} | {cell(r['weight'], 'g')} | {r['steps']} | {r['step_time_ms']:.0f} | {r['test_ppl']:.2f} | "
             f"{r['ppl_ratio_to_teacher']:.3f} | {cell(r['test_kl'], '.4f')} |" for r in runs]
    md = (f"# Distillation in QAT: a converted model fine-tuned with and without its float teacher\n\n"
          f"CPU `{cpu_name()}`, {a.threads} threads, {started} to {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}. "
          f"Corpus `{os.path.relpath(a.data)}` (first 90% trained, last 10% tested); preset `{a.preset}`; teacher "
          f"{a.teacher_steps} steps, students {a.steps} steps each from the teacher's export; temperature "
          f"{a.temperature:g}; seed {a.seed}. Protocol: benchmarks/bench_distill.py.\n\n" + head + "\n" + "\n".join(lines)
          + "\n\nTest ppl: sliding window 256, stride 128 (students packed, as served); KL: float64, mean over the "
          "test text's positions, windows of 256. One seed.\n")
    print(md)
    save_results(a.name, {"args": vars(a), "started": started, "teacher_test_ppl": ppl_t, "runs": runs}, md)


if __name__ == "__main__":
    main()

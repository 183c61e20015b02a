"""lm-evaluation-harness through `bitnet serve` against lm-evaluation-harness on transformers: one
checkpoint scored both ways, metric by metric and request by request.

    pip install "lm-eval[api]"                       # here, or in another environment: --lm-eval PATH
    python benchmarks/lm_eval_parity.py --model runs/small/export --corpus ../shared/data/tinyshakespeare/input.txt

Protocol. Three tasks are written from the last --tail of the corpus (local JSON: nothing is
downloaded; HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set):
- `mc` (multiple choice, loglikelihood): a line's first 4 words; its rest against the rest of 3
  other lines (acc, acc_norm);
- `ppl` (loglikelihood_rolling): paragraphs (word and byte perplexity, bits per byte), in windows
  of --max-length - 1 tokens (lm-eval's API models keep a position for the token they ask for; the
  hf run is given the same length, so that both score the same windows);
- `gen` (generate_until a newline, 16 tokens, greedy): exact match, and the texts themselves.
Run 1: `lm_eval --model hf`, transformers' own BitNet code on the folder (float32, CPU). Run 2:
`lm_eval --model local-completions` against `bitnet serve` on the same folder (its own process on a
free port of 127.0.0.1, float32, CPU, packed kernels), token ids (tokenized_requests), 4 requests
at a time. Compared: each metric; each request's log-likelihood (max |difference|; relative for the
rolling ones); each greedy flag; each generated text. The two differ where transformers, which
quantizes activations in another order, lands on the other side of a rounding tie (a logit moves
by ~1e-3): a few requests, never a metric beyond its last digits. Results:
benchmarks/results/lm_eval_parity.{json,md}, stamped with the machine and lm-eval's version.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from bitnet.bench import environment, free_port, save_results, stop_server, wait_healthy
from bitnet.report import table

TASKS = {
    "mc": """task: parity_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "ppl": """task: parity_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "gen": """task: parity_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""",
}


def write_tasks(corpus: str, tail: float, n_mc: int, n_ppl: int, n_gen: int, folder: str, seed: int = 0) -> dict:
    """The three tasks' JSON lines and YAML files in folder; their item counts."""
    with open(corpus, encoding="utf-8") as f:
        text = f.read()
    held = text[int(len(text) * (1 - tail)):]
    lines = [line.strip() for line in held.split("\n") if len(line.split()) >= 8]
    rng = random.Random(seed)
    rng.shuffle(lines)
    if len(lines) < n_mc + 3:
        raise SystemExit(f"--corpus: {len(lines)} lines of 8 words or more in its last {tail:.0%}, "
                         f"--mc {n_mc} needs {n_mc + 3}")
    items, pool = [], lines[n_mc:]
    for line in lines[:n_mc]:
        words = line.split()
        rests = [" " + " ".join(words[4:])] + [" " + " ".join(o.split()[4:]) for o in rng.sample(pool, 3)]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": " ".join(words[:4]), "choices": [rests[i] for i in order], "label": order.index(0)})
    paragraphs = [p.strip() for p in held.split("\n\n") if len(p.strip()) > 200][:n_ppl]
    data = {"mc": items, "ppl": [{"text": p} for p in paragraphs],
            "gen": [{"context": it["context"], "target": it["choices"][it["label"]]} for it in items[:n_gen]]}
    for name, rows in data.items():
        path = os.path.join(folder, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(folder, f"parity_{name}.yaml"), "w") as f:
            f.write(TASKS[name].format(data=path))
    return {name: len(rows) for name, rows in data.items()}


def run_lm_eval(cmd: list[str], model: str, model_args: str, tasks: str, out: str, log_path: str) -> float:
    """One lm_eval run; its wall seconds."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    full = cmd + ["--model", model, "--model_args", model_args, "--include_path", tasks, "--tasks",
                  "parity_mc,parity_ppl,parity_gen", "--log_samples", "--output_path", out]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        r = subprocess.run(full, stdout=log, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(full)} exited with {r.returncode}; its log: {log_path}")
    return time.perf_counter() - t0


def start_server(model: str, port: int, max_length: int, dtype: str, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bitnet", "serve", model, "--port", str(port), "--max-seq-len", str(max_length),
           "--max-batch", "4", "--dtype", dtype, "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "BITNET_API_KEY": ""})
    wait_healthy(proc, f"http://127.0.0.1:{port}", "bitnet serve", log.name, timeout=300)
    return proc


def read_run(out: str) -> tuple[dict, dict, dict]:
    """(metrics {task: {metric: value}}, samples {task: {doc_id: sample}}, versions) of one lm_eval run."""
    [results] = glob.glob(os.path.join(out, "*", "results_*.json"))
    with open(results) as f:
        run = json.load(f)
    metrics = {task: {k.split(",")[0]: v for k, v in values.items() if "," in k and "stderr" not in k}
               for task, values in run["results"].items()}
    versions = {k: run.get(k) for k in ("lm_eval_version", "transformers_version")}
    samples = {}
    for path in glob.glob(os.path.join(out, "*", "samples_*.jsonl")):
        task = os.path.basename(path)[len("samples_"):].rsplit("_", 1)[0]
        with open(path) as f:
            samples[task] = {s["doc_id"]: s for s in map(json.loads, f)}
    return metrics, samples, versions


def compare(a: dict, b: dict) -> dict:
    """Request by request: log-likelihoods, greedy flags, generated texts."""
    out = {}
    for task in sorted(a):
        lls, flags, texts = [], [], []
        for doc, sa in a[task].items():
            for ra, rb in zip(sa["resps"], b[task][doc]["resps"]):
                va, vb = ra[0], rb[0]
                if task.endswith("gen"):
                    texts.append(va == vb)
                elif isinstance(va, list):  # [loglikelihood, is_greedy]
                    lls.append((float(va[0]), float(vb[0])))
                    flags.append(str(va[1]) == str(vb[1]))
                else:  # a rolling loglikelihood
                    lls.append((float(va), float(vb)))
        row = {"requests": len(lls) or len(texts)}
        if lls:
            diffs = [abs(x - y) for x, y in lls]
            row.update(max_abs_diff=max(diffs), median_abs_diff=sorted(diffs)[len(diffs) // 2],
                       max_rel_diff=max(d / max(abs(x), 1e-12) for d, (x, _) in zip(diffs, lls)),
                       within_1e_4=sum(d < 1e-4 for d in diffs))
        if flags:
            row["greedy_flags_equal"] = sum(flags)
        if texts:
            row["same_text"] = sum(texts)
        out[task] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder with its tokenizer (what `bitnet serve` serves)")
    p.add_argument("--corpus", required=True, help="text file: the tasks come from its end")
    p.add_argument("--tail", type=float, default=0.05, help="fraction of the corpus, from its end, the tasks use")
    p.add_argument("--mc", type=int, default=100, help="multiple-choice items")
    p.add_argument("--ppl", type=int, default=40, help="paragraphs scored whole")
    p.add_argument("--gen", type=int, default=30, help="greedy generations")
    p.add_argument("--max-length", type=int, default=256, help="context of both runs (the server's --max-seq-len)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both runs' float parts")
    p.add_argument("--lm-eval", default=None, help="the lm_eval command (default: lm_eval on PATH, else python -m lm_eval)")
    p.add_argument("--name", default="lm_eval_parity")
    p.add_argument("--out-dir", default=None, help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)

    cmd = [args.lm_eval] if args.lm_eval else [shutil.which("lm_eval")] if shutil.which("lm_eval") else \
        [sys.executable, "-m", "lm_eval"]
    work = tempfile.mkdtemp(prefix="lm_eval_parity_")
    counts = write_tasks(args.corpus, args.tail, args.mc, args.ppl, args.gen, work)
    print(f"lm_eval_parity: {args.model}; tasks from the last {args.tail:.0%} of {args.corpus}: {counts}; in {work}")

    # lm-eval's API models keep a position for the token they ask for (windows of max_length - 1
    # tokens): the hf run gets max_length - 1, so that both score the same rolling windows
    hf_args = f"pretrained={args.model},dtype={args.dtype},max_length={args.max_length - 1}"
    seconds = {"transformers": run_lm_eval(cmd, "hf", hf_args, work, os.path.join(work, "out_hf"),
                                           os.path.join(work, "hf.log"))}
    print(f"  lm_eval --model hf: {seconds['transformers']:.0f} s")
    port = free_port()
    with open(os.path.join(work, "serve.log"), "w") as log:
        server = start_server(args.model, port, args.max_length, args.dtype, log)
        try:
            served = (f"model={args.model},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={args.model},"
                      f"tokenized_requests=True,max_length={args.max_length},num_concurrent=4")
            seconds["bitnet serve"] = run_lm_eval(cmd, "local-completions", served, work, os.path.join(work, "out_serve"),
                                                  os.path.join(work, "serve_eval.log"))
        finally:
            stop_server(server)
    print(f"  lm_eval --model local-completions (bitnet serve): {seconds['bitnet serve']:.0f} s")

    (m_hf, s_hf, versions), (m_srv, s_srv, _) = read_run(os.path.join(work, "out_hf")), read_run(os.path.join(work, "out_serve"))
    version = versions["lm_eval_version"]
    metrics = [{"task": task, "metric": metric, "transformers": value, "bitnet serve": m_srv[task][metric],
                "difference": m_srv[task][metric] - value}
               for task in sorted(m_hf) for metric, value in sorted(m_hf[task].items()) if isinstance(value, (int, float))]
    requests = compare(s_hf, s_srv)
    metric_cols = [("task", "task", ""), ("metric", "metric", ""), ("transformers", "lm_eval hf (transformers)", ".6g"),
                   ("bitnet serve", "lm_eval local-completions (bitnet serve)", ".6g"), ("difference", "difference", ".2e")]
    req_rows = [{"task": t, **r} for t, r in requests.items()]
    req_cols = [("task", "task", ""), ("requests", "requests", ""), ("max_abs_diff", "max abs. difference", ".2e"),
                ("median_abs_diff", "median abs. difference", ".2e"), ("max_rel_diff", "max relative difference", ".2e"),
                ("within_1e_4", "within 1e-4", ""), ("greedy_flags_equal", "greedy flags equal", ""),
                ("same_text", "same text", "")]
    print(table(metrics, metric_cols))
    print(table(req_rows, req_cols))
    env = environment()
    md = (f"# lm-evaluation-harness: `bitnet serve` against transformers\n\n"
          f"`python benchmarks/lm_eval_parity.py --model {args.model} --corpus {args.corpus}`; lm-eval {version}, "
          f"{env['cpu']} (flags {', '.join(env['cpu_flags'])}), {env['date']}. Tasks from the last {args.tail:.0%} of the corpus: {counts} items. "
          f"The protocol: the script's docstring.\n\n## Metrics\n\n{table(metrics, metric_cols, markdown=True)}\n\n"
          f"## Request by request\n\n{table(req_rows, req_cols, markdown=True)}\n\n"
          f"Wall time (loading included): lm_eval hf {seconds['transformers']:.0f} s, "
          f"lm_eval local-completions {seconds['bitnet serve']:.0f} s.\n")
    path = save_results(args.name, {"args": vars(args), **versions, "items": counts, "metrics": metrics,
                                    "requests": requests, "seconds": seconds}, md, args.out_dir, env=env)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 27's goals (and issue 26's test lines), each held against the GPU results: met, missed or not measured.

    python benchmarks/gpu_goals.py                                   # the committed results
    python benchmarks/gpu_goals.py --results <folder> --junit tests.xml

Reads what the device script's benchmarks write, from --results (default benchmarks/results):
  bench_kernels_cuda.json      the layer at M = 1, 16, 2048 against bf16 F.linear (GPU time, L2
                               flushed, bf16 in and out, activation quantization included); the
                               packed bytes' share of the measured copy bandwidth; 1.6-bit and
                               1-bit against 2-bit
  generate_cuda.json           2B-4T decode (batch 1, 8) and the 512-token prefill (recorded as a
                               CUDA graph), packed against the bf16 twin
  peer_transformers_cuda.json  eager decode against transformers' eager BitNet, greedy tokens
  peer_gpu_kernels_cuda.json   ours against bitnet.cpp's W2A8 GEMV and gemlite, cell by cell
and, with --junit (the tests stage's tests.xml, in logs.tar.gz), the suite's verdict on the GPU,
its duration and the exactness test at issue 27's shapes. Every ratio is recomputed here from the
times in those files (never taken from a file's own ratio column); a goal whose figure is absent
(a stage not run, cut short, or failed) says so and why. Below the goals, the A/Bs the device
script times beside their defaults (PDL, a batch's norms in the GEMM, the M = 1 dispatch, split-K
at small M, the large-M path), each with which way was faster and the knob that would switch.
Prints one table, a row a goal, and saves
gpu_goals_cuda.{json,md} beside the sources' stamps (GPU, commit, date). Exit status 0 whatever
the verdicts: this is a report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET

from bitnet.bench import RESULTS_DIR, save_results
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.packing import packed_rows
from bitnet.report import table

SOURCES = ("bench_kernels_cuda", "generate_cuda", "peer_transformers_cuda", "peer_gpu_kernels_cuda")

# Issue 27, "What to build": (shape N x K, M, least speedup over bf16 F.linear) of the 2-bit layer.
SPEEDUPS = [("2560x6912", 1, 4.0), ("6912x2560", 1, 4.0), ("8192x8192", 1, 6.0), ("28672x8192", 1, 6.0),
            *[(s, 16, 3.0) for s in ("2560x6912", "6912x2560", "8192x8192", "28672x8192")],
            *[(s, 2048, 1.3) for s in ("2560x6912", "6912x2560", "8192x8192", "28672x8192")]]
BANDWIDTH = [("8192x8192", 0.60), ("28672x8192", 0.60)]  # least share of the copy bandwidth, packed bytes, M = 1
FORMATS = [(s, fmt, most) for s in ("2560x6912", "6912x2560", "8192x8192", "28672x8192")
           for fmt, most in (("1.6bit", 1.3), ("1bit", 1.0))]  # most time over 2-bit's, M = 1
DECODE = [(1, 3.5), (8, 2.5)]  # (batch, least decode speed over the bf16 twin), CUDA graphs on both
PREFILL = (512, 1.0)  # (tokens, least prefill speed over the bf16 twin), both recorded as CUDA graphs
EXACT_TEST = "test_cuda_real_shapes_exact_and_equal_to_torch"  # tests/test_kernels.py: every format, shape, M
SUITE_SECONDS = 600  # issue 26: the whole suite under 10 minutes on the GPU machine


@dataclasses.dataclass
class GoalArgs:
    results: str = arg(RESULTS_DIR, help="folder of the GPU results (*_cuda.json)")
    junit: str | None = arg(None, help="the tests stage's JUnit XML (tests.xml in the device script's logs.tar.gz)")
    out_dir: str = arg(RESULTS_DIR, help="where gpu_goals_cuda.{json,md} go")
    name: str = arg("gpu_goals_cuda", help="file name of the scorecard, without extension")
    save: bool = arg(True, help="save the scorecard (--no-save: print it only)")


def goal(issue: int, what: str, target: str, value: float | None, ok: bool | None, source: str, note: str = "",
         shown: str | None = None) -> dict:
    """One row: status 'met' / 'missed' where ok says, 'not measured' where it is None (note: why)."""
    status = "not measured" if ok is None else "met" if ok else "MISSED"
    return {"issue": issue, "goal": what, "target": target, "value": value,
            "measured": shown if shown is not None else "" if value is None else f"{value:.2f}",
            "status": status, "source": source, "note": note}


def at_least(value: float | None, least: float) -> bool | None:
    return None if value is None else value >= least


def at_most(value: float | None, most: float) -> bool | None:
    return None if value is None else value <= most


def load(folder: str, name: str) -> tuple[dict | None, str]:
    """(the JSON, '') or (None, why it is absent)."""
    path = os.path.join(folder, f"{name}.json")
    try:
        with open(path) as f:
            return json.load(f), ""
    except FileNotFoundError:
        return None, f"no {name}.json"
    except (OSError, ValueError) as e:
        return None, f"{name}.json unreadable ({type(e).__name__}: {e})"


# ----------------------------------------------------------------------------- the kernels
def kernel_times(result: dict | None) -> dict[tuple[str, int, str], float | None]:
    """bench_kernels' GPU times (ms) by (shape, M, format label)."""
    return {(r["shape"], r["m"], r["format"]): r.get("ms") for r in (result or {}).get("rows", [])}


def kernel_goals(result: dict | None, why: str = "", speedups=SPEEDUPS, bandwidth=BANDWIDTH, formats=FORMATS) -> list[dict]:
    """bench_kernels' rows: each goal's ratio from the rows' GPU times (ms)."""
    src = "bench_kernels_cuda"
    ms = kernel_times(result)
    partial = "" if result is None or result.get("complete") else " (a run cut short)"

    def missing(*keys) -> str:
        return why or "no row for " + ", ".join(f"{s} M = {m} {f}" for s, m, f in keys if ms.get((s, m, f)) is None) + partial

    rows = []
    for shape, m, least in speedups:
        base, ours = ms.get((shape, m, "bf16")), ms.get((shape, m, "2bit"))
        value = base / ours if base and ours else None
        rows.append(goal(27, f"{shape}, M = {m}: 2-bit layer over bf16 F.linear", f">= {least:g}x", value,
                         at_least(value, least), src, "" if value else missing((shape, m, "bf16"), (shape, m, "2bit")),
                         shown=None if value is None else f"{value:.2f}x ({ours * 1e3:.1f} vs {base * 1e3:.1f} us)"))
    hbm = (result or {}).get("hbm_gbps")
    for shape, least in bandwidth:
        n, k = (int(v) for v in shape.split("x"))
        ours = ms.get((shape, 1, "2bit"))
        value = packed_rows(n, "2bit") * k / (ours * 1e-3) / 1e9 / hbm if ours and hbm else None
        rows.append(goal(27, f"{shape}, M = 1: packed bytes' share of the copy bandwidth", f">= {least:.0%}", value,
                         at_least(value, least), src, "" if value else missing((shape, 1, "2bit")) if not ours or why
                         else "no measured copy bandwidth in the file",
                         shown=None if value is None else f"{value:.0%} of {hbm:.0f} GB/s"))
    for shape, fmt, most in formats:
        two, other = ms.get((shape, 1, "2bit")), ms.get((shape, 1, fmt))
        value = other / two if two and other else None
        rows.append(goal(27, f"{shape}, M = 1: {fmt} time over 2-bit's", f"<= {most:g}x", value, at_most(value, most),
                         src, "" if value else missing((shape, 1, "2bit"), (shape, 1, fmt)),
                         shown=None if value is None else f"{value:.2f}x"))
    return rows


# ----------------------------------------------------------------------------- end to end
def generate_models(result: dict | None) -> dict[str, dict]:
    """model key -> its result: the merged results of a complete run, else each model's latest round."""
    if not result:
        return {}
    if result.get("results"):
        return result["results"]
    models = {}
    for rnd in result.get("rounds", []):
        models.update(rnd)
    return models


def model_row(models: dict[str, dict], key: str, batch: int) -> dict | None:
    """The row of model `key` at `batch` in bench_generate's results (generate_models), or None."""
    return next((r for r in models.get(key, {}).get("rows", []) if r["batch"] == batch), None)


def generate_goals(result: dict | None, why: str = "", decode=DECODE, prefill=PREFILL) -> list[dict]:
    """bench_generate: the packed model ('bitnet') over the bf16 twin ('bf16'), batch by batch."""
    src = "generate_cuda"
    models = generate_models(result)
    args = (result or {}).get("args", {})
    preset = "" if args.get("preset", "2b4t") == "2b4t" else f"preset {args['preset']}, not 2b4t"
    graphs = "" if args.get("compile") or args.get("cuda_graph") else "decode timed without CUDA graphs (--compile off)"

    def absent(batch: int) -> str:
        if why:
            return why
        gone = [k for k in ("bitnet", "bf16") if model_row(models, k, batch) is None]
        return f"no {' and no '.join(gone)} row at batch {batch}" + ("" if result.get("complete") else " (a run cut short)")

    rows = []
    for batch, least in decode:
        ours, twin = model_row(models, "bitnet", batch), model_row(models, "bf16", batch)
        value = ours["decode_tok_s"] / twin["decode_tok_s"] if ours and twin else None
        note = "" if value else absent(batch)
        if value and (preset or graphs):
            value, note = None, f"not the goal's conditions: {preset or graphs}"
        rows.append(goal(27, f"2B-4T decode, batch {batch}: packed over the bf16 twin (CUDA graphs)", f">= {least:g}x",
                         value, at_least(value, least), src, note, shown=None if value is None else
                         f"{value:.2f}x ({ours['decode_tok_s']:.0f} vs {twin['decode_tok_s']:.0f} tok/s)"))
    tokens, least = prefill
    ours, twin = model_row(models, "bitnet", 1), model_row(models, "bf16", 1)
    value, note, shown = None, "" if ours and twin else absent(1), None
    if ours and twin:
        if preset:
            note = f"not the goal's conditions: {preset}"
        elif ours.get("prefill_long_len") != tokens:
            note = f"the prefill timed was {ours.get('prefill_long_len')} tokens, not {tokens}"
        elif ours.get("prefill_long_graph_tok_s") and twin.get("prefill_long_graph_tok_s"):
            value = ours["prefill_long_graph_tok_s"] / twin["prefill_long_graph_tok_s"]
            eager = ours["prefill_long_tok_s"] / twin["prefill_long_tok_s"]
            shown, note = f"{value:.2f}x", f"eager: {eager:.2f}x"
        else:
            note = "; ".join(f"{k}: {r.get('prefill_long_graph_error', 'not recorded')}" for k, r in
                             (("packed", ours), ("twin", twin)) if not r.get("prefill_long_graph_tok_s"))
    rows.append(goal(27, f"2B-4T prefill of {tokens} tokens, batch 1: packed over the bf16 twin (CUDA graphs)",
                     f">= {least:g}x", value, at_least(value, least), src, note, shown))
    return rows


def peer_transformers_goals(result: dict | None, why: str = "") -> list[dict]:
    """peer_transformers: our eager decode against transformers' eager BitNet; greedy tokens equal."""
    src = "peer_transformers_cuda"
    speed = (result or {}).get("speed", {})
    preset = (result or {}).get("args", {}).get("preset", "2b4t")
    if preset != "2b4t":
        why, speed, result = f"not the goal's conditions: preset {preset}, not 2b4t", {}, None
    ours, theirs = speed.get("ours"), speed.get("transformers")
    value = ours["decode_tok_s"] / theirs["decode_tok_s"] if ours and theirs else None
    rows = [goal(27, "2B-4T eager decode, batch 1: ours over transformers' eager BitNet", ">= 1x", value,
                 at_least(value, 1.0), src, "" if value else why or "no speed in the file",
                 shown=None if value is None else
                 f"{value:.2f}x ({ours['decode_tok_s']:.1f} vs {theirs['decode_tok_s']:.1f} tok/s)")]
    greedy = (result or {}).get("greedy", {}).get("bf16")
    same = None if greedy is None else bool(greedy["identical"])
    note = why or ("no greedy tokens in the file" if greedy is None else "" if same else
                   f"first difference at new token {greedy['first_difference']}"
                   + (" (a near-tie)" if greedy.get("near_tie") else ""))
    n = len(greedy["ours"]) if greedy else 0
    rows.append(goal(27, "2B-4T greedy tokens, bf16: ours equal to transformers'", "equal", None, same, src, note,
                     shown="" if same is None else f"{'equal' if same else 'differ'} ({n} tokens)"))
    return rows


# ----------------------------------------------------------------------------- the GPU peers
OURS = {"timed": "ours bitlinear 2bit", "not timed": "ours packed_matmul (int8 x given)"}  # by act_quant


def peer_kernel_goals(result: dict | None, why: str = "") -> list[dict]:
    """peer_gpu_kernels: in every cell (shape, M), each peer's time over ours with the same work
    (the activation quantization timed on both sides, or on neither): ahead is >= 1."""
    src = "peer_gpu_kernels_cuda"
    if result is None:
        return [goal(27, "ahead of bitnet.cpp's W2A8 GEMV and gemlite, every cell", ">= 1x", None, None, src, why)]
    cells: dict[tuple[str, int], dict[str, dict]] = {}
    for r in result.get("rows", []):
        cells.setdefault((r["shape"], r["m"]), {})[r["system"]] = r
    rows = []
    for (shape, m), systems in cells.items():
        for name, r in systems.items():
            if name.startswith(("ours", "bf16", "(all)")) or r.get("status", "").startswith("not supported"):
                continue
            ours = systems.get(OURS.get(r.get("act_quant"), ""))
            value = r["ms"] / ours["ms"] if ours and ours.get("ms") and r.get("ms") else None
            note = "" if value else (r.get("status") if "ms" not in r else "no time of ours in this cell")
            rows.append(goal(27, f"{shape}, M = {m}: ahead of {name}", ">= 1x", value, at_least(value, 1.0), src, note,
                             shown=None if value is None else
                             f"{value:.2f}x ({ours['ms'] * 1e3:.1f} vs {r['ms'] * 1e3:.1f} us)"))
    return rows or [goal(27, "ahead of bitnet.cpp's W2A8 GEMV and gemlite, every cell", ">= 1x", None, None, src,
                         "no peer rows in the file")]


# ----------------------------------------------------------------------------- the A/Bs
# (what the default does, the other way, where measured, the knob that would switch): each timed in
# the same run as its default; a default slower than its alternative is the next thing to change.
GENERATE_ABS = [("bitnet-serial", (1, 8), "kernels launched as programmatic dependents (PDL)", "serialized",
                 "BITNET_PDL=0"),
                ("bitnet-norm-apart", (8,), "a batched step's norms inside its GEMMs", "norms launched apart",
                 "BITNET_GEMM_NORM_M=0")]
# (bench_kernels' label of the other way, the default, the other way, the knob): at every (shape, M) timed both ways
KERNEL_ABS = [("2bit act_quant + GEMV", "the GEMV quantizing x itself", "act_quant, then the int8 GEMV",
               "bitlinear's M = 1 dispatch"),
              ("2bit one split", "K split as gemm.split_k says", "one split", "BITNET_GEMM_SPLIT_K=1"),
              ("2bit decode-in-loop", "weights unpacked, then the int8 GEMM", "the GEMM decoding in its loop",
               "BITNET_UNPACK_GEMM_M")]


def decision(what: str, default_ms: float | None, other_ms: float | None, knob: str, src: str, why: str = "") -> dict:
    """One A/B: the default's time and the other way's, in ms, and which is faster."""
    ratio = other_ms / default_ms if default_ms and other_ms else None
    verdict = (why or "not measured") if ratio is None else "the default is faster" if ratio >= 1 else \
        f"the other way is {1 / ratio - 1:.0%} faster: {knob}"
    return {"what": what, "default_ms": default_ms, "other_ms": other_ms, "other_over_default": ratio,
            "verdict": verdict, "source": src}


def decisions(kernels: dict | None, generate: dict | None) -> list[dict]:
    """The A/Bs the device script times beside their defaults: PDL on or off and a batch's norms in
    or apart (generate, ms a decode step), the M = 1 dispatch, split-K and the large-M path
    (bench_kernels: wherever both ways were timed)."""
    rows = []
    models = generate_models(generate)

    def step_ms(key: str, batch: int) -> float | None:
        row = model_row(models, key, batch)
        return row.get("decode_ms_per_step") if row else None

    for key, batches, default, other, knob in GENERATE_ABS:
        for batch in batches:
            why = "no generate_cuda.json" if not generate else "" if key in models else f"no {key} in the run"
            rows.append(decision(f"2B-4T decode, batch {batch}: {default} / {other}", step_ms("bitnet", batch),
                                 step_ms(key, batch), knob, "generate_cuda", why))
    ms = kernel_times(kernels)
    for label, default, other, knob in KERNEL_ABS:
        for shape, m in dict.fromkeys((s, m) for s, m, f in ms if f == label):
            rows.append(decision(f"{shape}, M = {m}: {default} / {other}", ms.get((shape, m, "2bit")),
                                 ms.get((shape, m, label)), knob, "bench_kernels_cuda"))
    return rows


# ----------------------------------------------------------------------------- the tests
def junit_cases(path: str) -> tuple[list[tuple[str, str]], float | None]:
    """[(test name, outcome: passed / failed / skipped)], and the suite's seconds."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    cases = []
    for case in root.iter("testcase"):
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                   else "skipped" if case.find("skipped") is not None else "passed")
        cases.append((case.get("name", ""), outcome))
    seconds = sum(float(s.get("time", 0)) for s in suites) if suites else None
    return cases, seconds


def test_goals(junit: str | None, exact_test: str = EXACT_TEST, suite_seconds: float = SUITE_SECONDS) -> list[dict]:
    src = os.path.basename(junit) if junit else "tests.xml"
    why = "" if junit else "no --junit given (the tests stage's tests.xml, in logs.tar.gz)"
    cases, seconds = [], None
    if junit:
        try:
            cases, seconds = junit_cases(junit)
        except (OSError, ET.ParseError) as e:
            why = f"{junit} unreadable ({type(e).__name__}: {e})"
    count = {o: sum(1 for _, got in cases if got == o) for o in ("passed", "failed", "skipped")}
    green = None if why or not cases else count["failed"] == 0
    exact = [o for name, o in cases if name.split("[")[0] == exact_test]
    exact_ok = None if why or not exact or "passed" not in exact else all(o == "passed" for o in exact)
    exact_note = why or ("" if exact_ok is not None else
                         f"{exact_test} not run" if not exact else f"{exact_test}: every case skipped (no GPU?)")
    return [
        goal(26, "the whole suite on the GPU machine: none failed", "0 failed", None, green, src,
             why or ("" if cases else "no test cases in the file"),
             shown="" if green is None else f"{count['passed']} passed, {count['failed']} failed, {count['skipped']} skipped"),
        goal(26, "the whole suite's time on the GPU machine", f"<= {suite_seconds:g} s", seconds,
             None if why or seconds is None else seconds <= suite_seconds, src, why,
             shown=None if seconds is None else f"{seconds:.0f} s"),
        goal(27, "exact at issue 27's shapes, every format, M in {1, 4, 16, 64, 512, 2048}", "every case passed",
             None, exact_ok, src, exact_note,
             shown="" if exact_ok is None else f"{exact.count('passed')} of {len(exact)} passed"),
    ]


# ----------------------------------------------------------------------------- the scorecard
def scorecard(folder: str, junit: str | None = None) -> dict:
    loaded = {name: load(folder, name) for name in SOURCES}
    goals = (test_goals(junit) + kernel_goals(*loaded["bench_kernels_cuda"])
             + generate_goals(*loaded["generate_cuda"]) + peer_transformers_goals(*loaded["peer_transformers_cuda"])
             + peer_kernel_goals(*loaded["peer_gpu_kernels_cuda"]))
    sources = {}
    for name, (data, why) in loaded.items():
        env = (data or {}).get("environment", {})
        sources[name] = ({"device": env.get("device"), "commit": env.get("commit"), "dirty": env.get("dirty"),
                          "date": env.get("date"), "complete": data.get("complete", True)} if data else {"absent": why})
    counts = {s: sum(1 for g in goals if g["status"] == s) for s in ("met", "MISSED", "not measured")}
    ab_rows = decisions(loaded["bench_kernels_cuda"][0], loaded["generate_cuda"][0])
    return {"results": os.path.abspath(folder), "junit": junit, "counts": counts, "sources": sources, "goals": goals,
            "decisions": ab_rows}


def report(card: dict) -> str:
    c = card["counts"]
    lines = [f"# Issue 26 / 27 goals against the GPU results: {c['met']} met, {c['MISSED']} missed, "
             f"{c['not measured']} not measured", ""]
    for name, s in card["sources"].items():
        lines.append(f"- {name}: " + (s["absent"] if "absent" in s else
                                       f"{s['device']}, commit {str(s['commit'])[:10]}{' (dirty)' if s['dirty'] else ''}, "
                                       f"{s['date']}{'' if s['complete'] else ', a run cut short'}"))
    lines += ["", table(card["goals"], [("issue", "issue", ""), ("goal", "goal", ""), ("target", "target", ""),
                                        ("measured", "measured", ""), ("status", "status", ""), ("note", "note", "")],
                        markdown=True)]
    if card["decisions"]:
        lines += ["", "The defaults against their alternatives, timed in the same run (a layer's GPU time, or a "
                      "decode step's time):",
                  "", table([{**d, "default_us": d["default_ms"] and d["default_ms"] * 1e3,
                              "other_us": d["other_ms"] and d["other_ms"] * 1e3} for d in card["decisions"]],
                            [("what", "default / other", ""), ("default_us", "default (us)", ".1f"),
                             ("other_us", "other (us)", ".1f"), ("verdict", "verdict", "")], markdown=True)]
    return "\n".join(lines)


def main(args: GoalArgs) -> int:
    card = scorecard(args.results, args.junit)
    markdown = report(card)
    print(markdown)
    if args.save:  # stamped with the date alone: the figures' GPU, commit and date are the sources'
        stamp = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        path = save_results(args.name, {"args": dataclasses.asdict(args), **card}, markdown, args.out_dir, env=stamp)
        print(f"saved {path}", file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, GoalArgs)
    return main(GoalArgs(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    sys.exit(cli())

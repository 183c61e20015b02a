"""This package against transformers' own BitNet on one random checkpoint: logits, greedy tokens, decode speed.

    python benchmarks/peer_transformers.py                      # GPU: preset 2b4t; CPU: small
    python benchmarks/peer_transformers.py --preset tiny --new-tokens 8 --iters 1

One checkpoint, built here and saved in the offline (packed) format that transformers reads
(`save_pretrained`: config.json + model.safetensors, `linear_class: autobitlinear`), to a
temporary folder: latent weights N(0, 0.02) made on the device and frozen by the package's own
`freeze` (ternary codes, scale mean|W|), norms 1 + 0.1 N(0, 1) (so that a norm applied in the
wrong place shows in the logits), and every float tensor and every scale in bf16, as in
microsoft/bitnet-b1.58-2B-4T (so both sides hold the same scale values). Loaded twice, on the
same device:
  (a) this package: `BitNetForCausalLM.from_pretrained(dtype=bfloat16)`, projections packed 2 bits
      a weight, the package's kernels (Triton on CUDA, native C++ on a CPU);
  (b) transformers: `AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`, its BitNet with
      `AutoBitLinear` (it unpacks the weights to bf16 W_q at load). Its `torch.compile`d helpers
      run eagerly (torch._dynamo disabled around every call into it), as in tests/.
Reported:
- logits over a random prompt (batch 1): max and mean |ours - theirs| over all positions and at
  the last one. Tolerance: transformers in float32 is the reference; transformers' own bf16
  logits are within E (max) / e (mean) of it. A bf16 implementation at least as accurate as
  transformers' is within E of the reference too, so within 2E / 2e of transformers' bf16 (the
  triangle inequality): the check is max <= 2E and mean <= 2e. Also ours in float32 against the
  reference (equal up to int8 rounding ties: an ulp apart, x * 127 / max|x| rounds to different
  codes, and the difference propagates);
- greedy tokens (`generate`, N new tokens, no EOS stop), bf16 and float32: identical or not, the
  first step where they differ and the reference's top-2 logit margin there (a margin within the
  tolerance is a near-tie that either side may break);
- decode tokens/s, batch 1: (N - 1) / (time of generate(N) - time of generate(1)), median of
  --iters timed calls after --warmup: transformers' generate (eager), ours eager, and on a GPU ours
  with compile=True (CUDA graphs; the compile happens in the warm-up, not timed). Weights held
  by each side.
Results: benchmarks/results/peer_transformers_{cuda,cpu}.{json,md}, stamped by bitnet.bench. Exit
status 1 when the logits are beyond the tolerance or the bf16 greedy tokens part away from a near-tie.

The checkpoint comes from latent N(0, 0.02) weights (and norms off 1) frozen by the package, as a
user's export is made, rather than from bitnet.bench.random_model's codes drawn directly: the
comparison then covers freeze and save_pretrained too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import shutil
import sys
import tempfile
import time

import torch

from bitnet import BitNetConfig, BitNetForCausalLM, RMSNorm, freeze, weight_bytes
from bitnet.bench import RESULTS_DIR, environment, save_results, time_cpu, time_cuda
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.generation import generate
from bitnet.ops import default_kernel
from bitnet.report import human_bytes, table


@dataclasses.dataclass
class PeerArgs:
    preset: str | None = arg(None, help="model shape (default: 2b4t on a GPU, small on a CPU)")
    device: str | None = arg(None, help="cuda or cpu (default: cuda when available)")
    prompt_len: int = arg(32, help="prompt tokens (batch 1; random ids)")
    new_tokens: int | None = arg(None, help="greedy tokens generated (default: 32 on a GPU, 16 on a CPU)")
    warmup: int = arg(1, help="untimed generate calls before timing (compile=True compiles in them; at least 2 then)")
    iters: int = arg(3, help="timed generate calls; the median is reported")
    compile: bool | None = arg(None, help="also time ours with compile=True (default: on a GPU only)")
    seed: int = arg(0, help="seed of the weights and the prompt")
    checkpoint: str | None = arg(None, help="write the checkpoint to this folder and keep it (default: a temporary folder)")
    out_dir: str = arg(RESULTS_DIR, help="where the JSON and markdown go")
    name: str | None = arg(None, help="results file name (default: peer_transformers_cuda or peer_transformers_cpu)")

    def resolved(self) -> "PeerArgs":
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = torch.device(device).type == "cuda"
        return dataclasses.replace(
            self, device=device, preset=self.preset or ("2b4t" if gpu else "small"),
            new_tokens=self.new_tokens or (32 if gpu else 16), compile=gpu if self.compile is None else self.compile,
            name=self.name or f"peer_transformers_{'cuda' if gpu else 'cpu'}")


# ----------------------------------------------------------------------------- the checkpoint
def write_random_checkpoint(config: BitNetConfig, path: str, device: str, seed: int = 0) -> None:
    """A random packed checkpoint of `config` at `path` (see the module docstring); the latent
    float model exists only on `device` while it is frozen."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = BitNetForCausalLM(config)  # N(0, initializer_range) latent weights
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
    freeze(model)
    model.to(torch.bfloat16)  # float parts and scales in bf16 (the packed uint8 weights are not floats)
    model.save_pretrained(path)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def eager():
    """transformers' BitNet wraps helpers in torch.compile; run them eagerly (the same math)."""
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = old


def load_transformers(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    with eager():
        # device_map: the weights are unpacked where they land (on a GPU, not on the host)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})
    cast(model, dtype)  # a buffer or two keeps the file's dtype otherwise
    model.eval()
    model.generation_config.eos_token_id = None  # exactly N tokens, as ours (EOS not suppressed either)
    model.generation_config.pad_token_id = 0
    return model


def cast(model, dtype: torch.dtype) -> None:
    """Every float tensor of a transformers BitNet model to `dtype`, in place. torch's own Module.to:
    transformers refuses .float() on quantized models (right for weight-only int formats), but
    BitNet's float tensors (W_q in {-1, 0, 1}, scales, norms) go from bf16 to float32 exactly."""
    torch.nn.Module.to(model, dtype)


def held_bytes(model) -> int:
    """Bytes of every distinct tensor storage the model holds (parameters and buffers)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


# ----------------------------------------------------------------------------- the two sides
@torch.no_grad()
def logits_ours(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()  # (1, T, vocab)


@torch.no_grad()
def logits_theirs(model, ids: torch.Tensor) -> torch.Tensor:
    with eager():
        return model(ids).logits.float()


def greedy_ours(model, ids: torch.Tensor, n: int, compile: bool = False) -> torch.Tensor:
    """Ours eager (cuda_graph=False: the row issue 27 holds against transformers' eager BitNet) or
    compiled (torch.compile, CUDA graphs on a GPU)."""
    return generate(model, ids, n, compile=compile, cuda_graph=False)  # (1, T + n)


@torch.no_grad()
def greedy_theirs(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with eager():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max / mean |a - b| over all positions and at the last one; a, b (1, T, vocab) float32."""
    d = (a - b).abs()
    return {"max": d.max().item(), "mean": d.mean().item(), "last_max": d[:, -1].max().item(),
            "last_mean": d[:, -1].mean().item(), "ref_max_abs": b.abs().max().item()}


def first_difference(a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> int | None:
    """The first generated step (0-based) where two (1, T + n) token sequences differ, or None."""
    n = min(a.shape[1], b.shape[1])
    ne = (a[:, :n] != b[:, :n]).any(dim=0).nonzero()
    if a.shape[1] != b.shape[1] and not len(ne):
        return n - prompt_len
    return int(ne[0]) - prompt_len if len(ne) else None


def top2_margin(logits_fn, seq: torch.Tensor) -> float:
    """top-1 minus top-2 of the next-token logits after `seq` (1, L)."""
    top = logits_fn(seq)[0, -1].topk(2).values
    return (top[0] - top[1]).item()


def decode_speed(run, n: int, timer) -> dict:
    """Prefill and decode from generate(1) and generate(n) timings (ms). A generate(n) timed no
    longer than generate(1) (a first, cold call; too few iterations for this machine's noise) is an
    error, not a negative speed."""
    first_ms, total_ms = timer(lambda: run(1)), timer(lambda: run(n))
    step_ms = (total_ms - first_ms) / (n - 1)
    if step_ms <= 0:
        raise RuntimeError(f"generate({n}) took {total_ms:.2f} ms, generate(1) {first_ms:.2f} ms: the decode steps are "
                           "below this timing's noise; raise --warmup, --iters or --new-tokens")
    return {"prefill_ms": first_ms, "generate_ms": total_ms, "decode_ms_per_step": step_ms, "decode_tok_s": 1e3 / step_ms}


# ----------------------------------------------------------------------------- the comparison
def measure(args: PeerArgs) -> dict:
    device, n, cuda = args.device, args.new_tokens, torch.device(args.device).type == "cuda"
    config = BitNetConfig.from_preset(args.preset)
    if args.prompt_len + n > config.max_position_embeddings:
        raise ValueError(f"prompt_len + new_tokens exceeds the preset's context {config.max_position_embeddings}")
    seconds = {}

    def timer(warmup):
        if cuda:
            return lambda fn: time_cuda(fn, warmup=warmup, iters=args.iters)
        return lambda fn: time_cpu(fn, warmup=warmup, iters=args.iters)

    folder = args.checkpoint or tempfile.mkdtemp(prefix="peer_transformers_")
    try:
        t0 = time.perf_counter()
        write_random_checkpoint(config, folder, device, args.seed)
        seconds["checkpoint"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ours = BitNetForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device=device)
        seconds["load_ours"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = load_transformers(folder, torch.bfloat16, device)
        seconds["load_transformers"] = time.perf_counter() - t0
        sizes = {"ours": weight_bytes(ours)["total"], "transformers": held_bytes(theirs)}
        print(f"checkpoint {seconds['checkpoint']:.1f} s, loaded: ours {seconds['load_ours']:.1f} s, "
              f"transformers {seconds['load_transformers']:.1f} s", flush=True)

        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(3, config.vocab_size, (1, args.prompt_len), generator=g).to(device)
        l16 = {"ours": logits_ours(ours, ids), "theirs": logits_theirs(theirs, ids)}
        tok16 = {"ours": greedy_ours(ours, ids, n), "theirs": greedy_theirs(theirs, ids, n)}

        t0 = time.perf_counter()
        ours.setup_cache(1, args.prompt_len + n)  # reused by every call (and, compiled, by its CUDA graphs)
        speed = {"transformers": decode_speed(lambda k: greedy_theirs(theirs, ids, k), n, timer(args.warmup)),
                 "ours": decode_speed(lambda k: greedy_ours(ours, ids, k), n, timer(args.warmup))}
        seconds["eager_timing"] = time.perf_counter() - t0
        print(f"eager decode: transformers {speed['transformers']['decode_tok_s']:.1f} tok/s, "
              f"ours {speed['ours']['decode_tok_s']:.1f} tok/s", flush=True)

        # The float32 reference: transformers' own model, converted in place (its bf16 runs are done).
        t0 = time.perf_counter()
        cast(theirs, torch.float32)
        ours32 = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32, device=device)
        l32 = {"ours": logits_ours(ours32, ids), "theirs": logits_theirs(theirs, ids)}
        tok32 = {"ours": greedy_ours(ours32, ids, n), "theirs": greedy_theirs(theirs, ids, n)}
        ref_logits = functools.partial(logits_theirs, theirs)
        diffs = {"bf16": diff(l16["ours"], l16["theirs"]), "transformers_bf16_vs_fp32": diff(l16["theirs"], l32["theirs"]),
                 "ours_bf16_vs_fp32": diff(l16["ours"], l32["theirs"]), "fp32": diff(l32["ours"], l32["theirs"])}
        noise = diffs["transformers_bf16_vs_fp32"]
        tol = {"max": 2 * noise["max"], "mean": 2 * noise["mean"]}
        logits_ok = diffs["bf16"]["max"] <= tol["max"] and diffs["bf16"]["mean"] <= tol["mean"]
        greedy = {}
        for key, toks, near in (("bf16", tok16, tol["max"]), ("fp32", tok32, 2 * diffs["fp32"]["max"])):
            k = first_difference(toks["ours"], toks["theirs"], args.prompt_len)
            row = {"identical": k is None, "first_difference": k, "ours": toks["ours"][0, args.prompt_len:].tolist(),
                   "transformers": toks["theirs"][0, args.prompt_len:].tolist()}
            if k is not None:
                row["margin"] = top2_margin(ref_logits, toks["ours"][:, :args.prompt_len + k])
                row["near_tie"] = row["margin"] <= near
            greedy[key] = row
        seconds["fp32_reference"] = time.perf_counter() - t0
        del theirs, ours32
        if cuda:
            torch.cuda.empty_cache()

        result = {"config": config.to_dict(), "kernel": default_kernel(device), "prompt_len": args.prompt_len,
                  "new_tokens": n, "diffs": diffs, "tolerance": tol, "logits_within_tolerance": logits_ok,
                  "greedy": greedy, "speed": speed, "weight_bytes": sizes, "seconds": seconds}
        if args.compile:
            save(args, {**result, "partial": "compiled timing under way"})  # a compile that never ends loses nothing
            t0 = time.perf_counter()
            compiled = greedy_ours(ours, ids, n, compile=True)
            speed["ours_compiled"] = decode_speed(lambda k: greedy_ours(ours, ids, k, compile=True), n,
                                                  timer(max(2, args.warmup)))
            greedy["compiled_vs_eager"] = {"identical": bool(torch.equal(compiled, tok16["ours"])),
                                           "first_difference": first_difference(compiled, tok16["ours"], args.prompt_len)}
            seconds["compiled_timing"] = time.perf_counter() - t0
        ours.clear_cache()
        return result
    finally:
        if not args.checkpoint:
            shutil.rmtree(folder, ignore_errors=True)


def verdict(result: dict) -> bool:
    g = result["greedy"]["bf16"]
    return result["logits_within_tolerance"] and (g["identical"] or g["near_tie"])


def report(args: PeerArgs, result: dict) -> str:
    env, d, tol, n = environment(), result["diffs"], result["tolerance"], result["new_tokens"]
    rows = [{"what": "ours bf16 vs transformers bf16", **d["bf16"]},
            {"what": "transformers bf16 vs transformers fp32 (its own bf16 rounding: E, e)", **d["transformers_bf16_vs_fp32"]},
            {"what": "ours bf16 vs transformers fp32", **d["ours_bf16_vs_fp32"]},
            {"what": "ours fp32 vs transformers fp32", **d["fp32"]}]
    cols = [("what", f"logits over the {args.prompt_len}-token prompt", ""), ("max", "max abs diff", ".4g"),
            ("mean", "mean abs diff", ".3g"), ("last_max", "max, last position", ".4g"),
            ("last_mean", "mean, last position", ".3g"), ("ref_max_abs", "max abs of the second", ".3g")]

    def says(g: dict) -> str:
        if g["identical"]:
            return "yes"
        k = g["first_difference"]
        if "margin" not in g:
            return f"no: first difference at step {k}"
        tie = "a near-tie" if g["near_tie"] else "not a near-tie"
        return f"no: first difference at step {k}, reference top-2 margin there {g['margin']:.3g} ({tie})"

    greedy = [{"what": f"{k}: ours vs transformers", "says": says(result["greedy"][k])} for k in ("bf16", "fp32")]
    if "compiled_vs_eager" in result["greedy"]:
        greedy.append({"what": "ours compiled vs ours eager (bf16)", "says": says(result["greedy"]["compiled_vs_eager"])})
    speed = result["speed"]
    labels = {"transformers": "transformers AutoModelForCausalLM (eager; AutoBitLinear, bf16 W_q)",
              "ours": f"this package, packed 2-bit (eager; {result['kernel']})",
              "ours_compiled": f"this package, packed 2-bit, compile=True{' (CUDA graphs)' if args.device.startswith('cuda') else ''}"}
    base = speed["transformers"]["decode_tok_s"]
    srows = [{"what": labels[k], **s, "vs": s["decode_tok_s"] / base,
              "bytes": human_bytes(result["weight_bytes"]["ours" if k.startswith("ours") else "transformers"])}
             for k, s in speed.items()]
    ok = "yes" if result["logits_within_tolerance"] else "**no**"
    md = [
        f"# This package vs transformers' BitNet: preset `{args.preset}` on {env['device']}",
        "",
        f"One random checkpoint (seed {args.seed}), saved by `save_pretrained` (offline, `autobitlinear`; bf16 float "
        "parts and scales), loaded by `BitNetForCausalLM.from_pretrained` and by transformers' "
        f"`AutoModelForCausalLM` in bf16 on {args.device}; batch 1, random prompt of {args.prompt_len} tokens. "
        f"torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}, commit {(env['commit'] or '?')[:10]}.",
        "",
        table(rows, cols, markdown=True),
        "",
        f"Tolerance (transformers fp32 as the reference, its own bf16 logits within E = {d['transformers_bf16_vs_fp32']['max']:.4g} "
        f"(max) / e = {d['transformers_bf16_vs_fp32']['mean']:.3g} (mean) of it; a bf16 implementation as accurate is within "
        f"2E / 2e of transformers' bf16): max <= {tol['max']:.4g}, mean <= {tol['mean']:.3g}. Within: {ok}.",
        "",
        table(greedy, [("what", f"greedy, {n} new tokens", ""), ("says", "identical", "")], markdown=True),
        "",
        table(srows, [("what", "decode, batch 1", ""), ("decode_tok_s", "tok/s", ".1f"), ("decode_ms_per_step", "ms/step", ".2f"),
                      ("prefill_ms", f"prefill + 1 token (ms, {args.prompt_len} tokens)", ".1f"),
                      ("vs", "vs transformers", ".2f"), ("bytes", "weights held", "")], markdown=True),
        "",
        f"Decode: ({n} - 1) / (generate({n}) - generate(1)), median of {args.iters} after {args.warmup} warm-up "
        "(compiled: at least 2, compiling in them). transformers' torch.compile'd helpers ran eagerly.",
    ]
    return "\n".join(md)


def save(args: PeerArgs, result: dict) -> tuple[str, str]:
    markdown = report(args, result)
    return save_results(args.name, {"args": dataclasses.asdict(args), **result}, markdown, args.out_dir), markdown


def main(args: PeerArgs) -> int:
    args = args.resolved()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no GPU: nothing to compare on cuda (--device cpu compares on the CPU)")
        return 0
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (decode is timed as N tokens minus the first)")
    result = measure(args)
    path, markdown = save(args, result)
    print(markdown)
    good = verdict(result)
    print(f"\n{'agree' if good else 'DISAGREE'}: logits within tolerance {result['logits_within_tolerance']}, "
          f"bf16 greedy tokens identical {result['greedy']['bf16']['identical']}; results in {path}")
    return 0 if good else 1


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, PeerArgs)
    ns = parser.parse_args(argv)
    return main(PeerArgs(**vars(ns)))


if __name__ == "__main__":
    sys.exit(cli())

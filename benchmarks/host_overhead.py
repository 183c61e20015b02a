"""The host's share of an eager forward on the Triton path, measured without a GPU.

Eager decode on a GPU is host-bound at batch 1, and so is an eager prefill of a few hundred
tokens: the GPU finishes a 2B-class layer's kernels in tens (decode) to about a hundred (prefill of
512) microseconds, the host may need longer to issue them (Python, torch dispatch, the launchers,
Triton's own launch path). This measures that host time on any machine, per decoder layer, for a
decode step (batch 1 and a batch), and a prefill: a frozen model of the preset's layer shapes
(small vocabulary: the per-layer figure is what matters), its BitLinear on the Triton backend,
and no kernel running:

- launches "direct": as on a GPU, compiled for sm_90 (bitnet.kernels.precompile.launches_compiled:
  each kernel compiled once, for real, at the first step): the first launch of each call
  signature through Triton's own launch path, later ones directly (kernels/launch.py); only the
  driver's launch call is a no-op. The closest a CPU gets to a GPU run's host time.
- launches "triton": every launch through Triton's own launch path (binding, specialization, the
  autotuner's key, the compiled-kernel cache), as with BITNET_FAST_LAUNCH=0.
- launches "stub": each launch replaced by a counter (neither launch path is in it).
- "twin": the bf16 twin of the same shapes (nn.Linear), for the ratio of the two host times
  where both are host-bound: its F.linear returns an empty tensor of its output's shape (one
  dispatch, where a GPU's F.linear is a transpose view and a cuBLAS call: the twin's figure is
  low), its other ops run on this CPU. Those compute for real, negligible at decode but not over a
  prompt, so its prefill is timed over `twin_prefill` tokens: the same ops as any prompt length
  (the op counts say so), hence the same host time on a GPU.
The default measures "direct", "triton" and "twin" side by side.

A server step (bitnet.serve.runner, ours only) is measured too: a newcomer's prompt beside the
running sequences' decode tokens, run eagerly, and in pieces as prompt_graphs runs it on a GPU
(each piece a CUDA graph there: its host time is one replay, not in these figures; here the pieces
run eagerly and their time, ops and launches are left out).

Either way the torch ops around the projections run on the CPU for real, in the model's dtype as
on a GPU (the CPU's own rule computes attention in float32), except the prefill's attention
(torch's SDPA: one kernel on a GPU, a long CPU computation here), which returns an empty tensor of
its shape in flash attention's layout. Each figure is a difference of two timings, the model's first 2L
layers against its first L, divided by L: what the embedding, the mask and the head cost is not in
it. Reported per decoder layer: host time (the fastest of the timed forwards), Triton launches, torch ops (dispatches, views
included), and the time in the fused norm + projections path.

    python benchmarks/host_overhead.py                      # preset 2b4t: decode 1 and 8, prefill 512
    python benchmarks/host_overhead.py --preset 700m --launches stub

Writes benchmarks/results/host_overhead_cpu.{json,md}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bitnet.bench import RESULTS_DIR, save_results
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.report import table


@dataclasses.dataclass
class HostArgs:
    preset: str = arg("2b4t", help="layer shapes of this preset")
    layers: int = arg(2, help="L: the figures are timings of 2L layers minus L, per layer")
    vocab: int = arg(1024, help="vocabulary (small: the head is not what is measured)")
    dtype: str = arg("bfloat16", help="model dtype")
    batch: int = arg(8, help="sequences of the batched decode step (0: none)")
    prefill: int = arg(512, help="tokens of the prefill (0: none)")
    serve_batch: int = arg(16, help="a server step (bitnet.serve.runner) of this many sequences, one a newcomer's "
                           "prompt, the others a decode token each: eager, and in pieces as prompt_graphs runs it on a "
                           "GPU (0: none)")
    serve_prompt: int = arg(16, help="the newcomer's prompt tokens in that step (bench_serve's --prompt-len)")
    launches: str = arg("direct,triton,twin", help="comma-separated: direct, triton (launch paths for sm_90, nothing "
                                                     "launched), stub (counters), twin (the bf16 twin's layer)")
    twin_prefill: int = arg(2, help="tokens of the twin's prefill (its ops run on this CPU: see the docstring)")
    iters: int = arg(30, help="timed forwards per case (the fastest counts)")
    out_dir: str = arg(RESULTS_DIR, help="where the JSON and markdown go")
    name: str = arg("host_overhead_cpu", help="file name of the results, without extension")


# ops that launch no GPU kernel besides views: allocations, and a view torch does not tag as one
_NO_KERNEL = {"aten::empty.memory_format", "aten::empty_strided", "aten::_unsafe_view"}


_IN_PIECE = [False]  # inside a recorded piece of a server step (a graph replay on a GPU): not counted


class _CountOps(TorchDispatchMode):
    """Counts the torch ops dispatched, and those of them that launch a kernel on a GPU (neither a
    view nor an allocation): each of those costs a CUDA launch of host time there, which this CPU
    run does not."""

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _IN_PIECE[0]:
            self.ops += 1
            self.kernels += not func.is_view and func.name() not in _NO_KERNEL
        return func(*args, **(kwargs or {}))


KERNELS = [("gemv", "_gemv_kernel"), ("gemm", "_gemm_kernel"), ("gemm", "_gemm_int8_kernel"),
           ("activations", "_act_quant_kernel"), ("rmsnorm_quant", "_rmsnorm_act_quant_kernel"),
           ("rmsnorm_quant", "_rmsnorm_quant_unpack_kernel"),
           ("layout", "_unpack_kernel"), ("rope", "_rope_cache_kernel"), ("attention", "_decode_attention_kernel")]


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton kernel of bitnet.kernels replaced by a launch counter (yields it), restored after."""
    import importlib

    count = [0]

    class Stub:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                count[0] += 1
            return launch

    modules = [(importlib.import_module(f"bitnet.kernels.{module}"), name) for module, name in KERNELS]
    saved = [getattr(module, name) for module, name in modules]
    try:
        for module, name in modules:
            setattr(module, name, Stub())
        yield count
    finally:
        for (module, name), kernel in zip(modules, saved):
            setattr(module, name, kernel)


@contextlib.contextmanager
def triton_launches():
    """Every Triton launch as on a GPU for sm_90, nothing launched (yields a counter of launches, as
    stubbed_launches does): the first of each call signature through Triton's launch path (which
    compiles it), later ones directly (kernels/launch.py), the driver's launch call a no-op."""
    from bitnet.kernels.launch import Launcher
    from bitnet.kernels.precompile import launches_compiled

    count = [0]
    launch = Launcher.launch

    def counted(self, *args, **kwargs):
        count[0] += 1
        return launch(self, *args, **kwargs)

    Launcher.launch = counted
    try:
        with launches_compiled(90) as log:
            yield count
    finally:
        Launcher.launch = launch
    if log.failures:
        raise RuntimeError(f"{len(log.failures)} launches did not compile for sm_90: {log.failures[0][:2]}")


_STAND_INS = [0]  # calls of the two stand-ins below: each a kernel (SDPA's, cuBLAS's) on a GPU


def _attention_stand_in(q, k, v, **kwargs):
    """An uninitialized SDPA output of flash attention's layout on a GPU, (B, T, heads, hd) memory
    seen as (B, heads, T, hd): the model's transpose back to (B, T, heads * hd) is then a view there
    as on a GPU, not a copy that this CPU would compute."""
    _STAND_INS[0] += 1
    return torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=q.dtype).transpose(1, 2)


def _linear_stand_in(x, weight, bias=None):
    """The twin's F.linear: an uninitialized output of its shape (one dispatch)."""
    _STAND_INS[0] += 1
    return torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)


def _fastest(fn, iters: int, spent: list) -> tuple[float, float]:
    """(seconds, seconds in the fused path) of the fastest of `iters` calls, the seconds inside
    recorded pieces (spent[1]) left out: host time is what is measured, and other work on the cores
    only ever adds to it (as timeit reports)."""
    best = (float("inf"), 0.0)
    for _ in range(iters):
        spent[0] = spent[1] = 0.0
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0 - spent[1], spent[0]))
    return best


@contextlib.contextmanager
def pieces_replayed(spent: list, launches: list):
    """A server step's recorded pieces (bitnet.serve.runner._PromptPieces) as a GPU replays them:
    one graph replay each, whose host time is not in these figures (it runs them eagerly here, and
    their time, torch ops and launches are left out: spent[1] collects the time)."""
    from bitnet.serve import runner

    piece = runner._PromptPieces._piece

    def replayed(self, i):
        t0, before, stand_ins = time.perf_counter(), launches[0], _STAND_INS[0]
        _IN_PIECE[0] = True
        try:
            return piece(self, i)
        finally:
            _IN_PIECE[0] = False
            launches[0], _STAND_INS[0] = before, stand_ins
            spent[1] += time.perf_counter() - t0

    runner._PromptPieces._piece = replayed
    try:
        yield
    finally:
        runner._PromptPieces._piece = piece


def measure(args: HostArgs, mode: str = "stub") -> list[dict]:
    """One row per case: decode (batch 1), decode (args.batch), prefill (args.prefill tokens), with
    the launches as `mode` says (direct, triton, stub: the module's docstring)."""
    from bitnet.kernels import launch as fast
    import torch.nn.functional as F

    import bitnet.bitlinear
    import bitnet.model
    from bitnet import BitLinear, BitNetConfig, BitNetForCausalLM, freeze
    from bitnet.generation import decode_step, prefill

    from bitnet.serve.runner import ModelRunner, Segment

    spent = [0.0, 0.0]  # seconds in the fused norms + projections, seconds in recorded pieces
    fused = bitnet.bitlinear.normed_projections

    @functools.wraps(fused)
    def timed_fused(*a, **k):
        t0 = time.perf_counter()
        try:
            return fused(*a, **k)
        finally:
            if not _IN_PIECE[0]:
                spent[0] += time.perf_counter() - t0

    L = args.layers
    dtype = getattr(torch, args.dtype)
    twin = mode == "twin"
    config = BitNetConfig.from_preset(args.preset, num_hidden_layers=2 * L, vocab_size=args.vocab,
                                      **({"linear": "bf16"} if twin else {}))
    torch.manual_seed(0)
    model = BitNetForCausalLM(config).eval()
    model = (model if twin else freeze(model)).to(dtype)
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.kernel = "triton"  # CPU tensors: runs because TRITON_INTERPRET=1 (cli sets it)
    all_layers = model.model.layers
    prefill_tokens = min(args.prefill, args.twin_prefill) if twin else args.prefill
    cases = [("decode", 1, 1)] + ([("decode", args.batch, 1)] if args.batch > 1 else []) \
        + ([("prefill", 1, prefill_tokens)] if args.prefill > 0 else []) \
        + ([("serve", args.serve_batch, args.serve_prompt), ("serve pieces", args.serve_batch, args.serve_prompt)]
           if args.serve_batch > 1 and not twin else [])  # (a CPU's twin would attend row by row: not a GPU's way)
    rows = []
    sdpa, attention_dtype, linear = F.scaled_dot_product_attention, bitnet.model.attention_dtype, F.linear
    launch_mode = stubbed_launches if mode in ("stub", "twin") else triton_launches
    enabled = fast._STATE["enabled"]
    fast._STATE["enabled"] = mode == "direct"
    bitnet.model.normed_projections = timed_fused
    F.scaled_dot_product_attention = _attention_stand_in  # a prefill's attention: see above
    if twin:
        F.linear = _linear_stand_in
    bitnet.model.attention_dtype = lambda x, device=None: x.dtype  # a GPU's: attention in the model's dtype
    blocked = bitnet.model.blocked_prompts
    bitnet.model.blocked_prompts = lambda device: False  # a GPU's prompt attention: one call
    try:
        with launch_mode() as launches, torch.no_grad():
            for kind, batch, tokens in cases:
                length = tokens + 64
                mask = torch.ones(batch, length, dtype=torch.bool)
                if kind.startswith("serve"):  # a newcomer's prompt in slot 0, the others a decode token each
                    segs = [Segment(0, list(range(1, tokens + 1)), 0)] + [Segment(r, [5], 10) for r in range(1, batch)]
                elif kind == "decode":
                    ids, pos = torch.full((batch, 1), 5), torch.tensor([10])
                    pid = torch.full((batch, 1), 10)
                    step = functools.partial(decode_step, model, ids, pos, pid, None)  # generate's: no padding
                else:
                    ids = torch.randint(0, args.vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
                    pid = torch.arange(tokens).expand(batch, tokens)
                    step = functools.partial(prefill, model, ids, mask, pid)
                figures = {}
                for n in (L, 2 * L):
                    model.model.layers = all_layers[:n]
                    runner = None
                    if kind.startswith("serve"):  # its cache in the model's dtype (attention_dtype, patched)
                        runner = ModelRunner(model, max_batch=batch, max_seq_len=length, decode_graphs=False,
                                             prompt_graphs=kind == "serve pieces")
                        step = functools.partial(runner.step, segs)
                    else:  # the model's dtype, as on a GPU (the CPU's rule makes it float32)
                        model.setup_cache(batch, length, dtype=dtype)
                    with pieces_replayed(spent, launches):
                        for _ in range(3):  # the first compiles every kernel (triton), then warm
                            step()
                        launches[0] = _STAND_INS[0] = 0
                        with _CountOps() as counted:
                            step()
                        figures[n] = {"launches": launches[0], "ops": counted.ops,
                                      "kernels": launches[0] + counted.kernels + _STAND_INS[0]}
                        figures[n]["seconds"], figures[n]["fused"] = _fastest(step, args.iters, spent)
                    if runner is not None:
                        runner.close()
                    else:
                        model.clear_cache()
                per_layer = {key: (figures[2 * L][key] - figures[L][key]) / L for key in figures[L]}
                rows.append({"launches": "twin (bf16)" if twin else mode, "case": f"{kind} {batch} x {tokens}", "kind": kind, "batch": batch, "tokens": tokens,
                             "layer_us": per_layer["seconds"] * 1e6, "norm_projections_us": per_layer["fused"] * 1e6,
                             "triton_launches": per_layer["launches"], "torch_ops": per_layer["ops"],
                             "gpu_kernels": per_layer["kernels"], "replays": float(kind == "serve pieces")})
    finally:
        model.model.layers = all_layers
        bitnet.model.normed_projections = fused
        F.scaled_dot_product_attention, bitnet.model.attention_dtype, F.linear = sdpa, attention_dtype, linear
        bitnet.model.blocked_prompts = blocked
        fast._STATE["enabled"] = enabled
    return rows


COLUMNS = [("launches", "launches", ""), ("case", "case (batch x tokens)", ""), ("layer_us", "host us / layer", ".0f"),
           ("norm_projections_us", "of which norms + projections", ".0f"), ("triton_launches", "Triton launches / layer", ".1f"),
           ("torch_ops", "torch ops / layer", ".1f"), ("gpu_kernels", "GPU kernels / layer", ".1f"),
           ("replays", "graph replays / layer", ".0f")]


def host_ratios(rows: list[dict]) -> dict:
    """{case: the twin's host us a layer / ours with direct launches}, for the cases both measured
    (a prefill matched by kind: the twin's is timed over fewer tokens, the same ops)."""
    def keyed(mode):
        return {(r["kind"], r["batch"]): r for r in rows if r["launches"] == mode}
    ours, twin = keyed("direct"), keyed("twin (bf16)")
    return {ours[k]["case"]: twin[k]["layer_us"] / ours[k]["layer_us"] for k in ours if k in twin}


def main(args: HostArgs) -> int:
    rows = [row for mode in args.launches.split(",") for row in measure(args, mode)]
    result = {"args": dataclasses.asdict(args), "rows": rows, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine()}
    markdown = table(rows, COLUMNS, markdown=True)
    markdown += (f"\n\nPreset {args.preset}, {args.dtype}; eager forwards on the Triton path. Launches: direct = as on "
                 "a GPU (the first of each call signature through Triton's launch path for sm_90, later ones "
                 "directly, kernels/launch.py), triton = every launch through Triton's launch path (BITNET_FAST_LAUNCH=0), "
                 "stub = counted only; the driver's launch call is a no-op; twin = the bf16 twin's layer, its F.linear "
                 f"an empty tensor, its prefill over {args.twin_prefill} tokens (the same ops as any prompt). The torch "
                 "ops run on this CPU (the prefill's SDPA returns an empty tensor); GPU kernels: the Triton launches "
                 "and the torch ops that launch one on a GPU (SDPA's and F.linear's included), each a CUDA launch of "
                 "host time there that is not in these figures; per layer: the first "
                 f"{2 * args.layers} layers' fastest forward minus the first {args.layers}', over {args.layers}.")
    ratios = host_ratios(rows)
    if ratios:
        result["twin_over_direct"] = ratios
        markdown += ("\n\nWhere both are host-bound (eager, a GPU faster than the host), the ratio of speeds is that of "
                     "host times, twin / direct: " + ", ".join(f"{case} {r:.2f}" for case, r in ratios.items()) + ".")
    print(markdown)
    print(f"results in {save_results(args.name, result, markdown, args.out_dir)}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, HostArgs)
    args = HostArgs(**vars(parser.parse_args(argv)))
    modes = args.launches.split(",")
    if not modes or any(m not in ("direct", "triton", "stub", "twin") for m in modes):
        parser.error(f"--launches takes direct, triton, stub and twin, comma-separated; got {args.launches!r}")
    if set(modes) - {"stub", "twin"}:
        # the kernels imported as real JITFunctions (Triton's launch path compiles them); then
        # TRITON_INTERPRET=1 only so that bitnet.ops takes the Triton path for CPU tensors
        if os.environ.get("TRITON_INTERPRET") == "1":
            parser.error("--launches direct / triton import the kernels compiled: unset TRITON_INTERPRET")
        import bitnet.kernels.custom_ops  # noqa: F401

        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are first imported
    os.environ["BITNET_CPU_DISABLE"] = "1"  # no native CPU op (RMSNorm, RoPE, attention): the ops a GPU runs
    return main(args)


if __name__ == "__main__":
    sys.exit(cli())

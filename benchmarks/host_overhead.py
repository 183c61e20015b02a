"""The host's share of an eager decode step on the Triton path, measured without a GPU.

Eager decode on a GPU is host-bound at batch 1: the GPU finishes a 2B-class layer's kernels in
tens of microseconds, the host needs longer to issue them (Python, torch dispatch, the launchers).
This measures that host time on any machine: a frozen model of the preset's layer shapes (few
layers, small vocabulary: the per-layer figure is what matters), its BitLinear on the Triton
backend (TRITON_INTERPRET=1, set here, lets it take CPU tensors), every Triton kernel launch replaced by a stub that
only counts (so no kernel runs and what is timed is everything around the launches; Triton's own
launcher, which a GPU run adds, is not in it). The torch ops around the projections (attention,
RoPE, cache writes) run on the CPU for real; at one token and a short cache they are small.

Reported per decoder layer: host time of a decode step (median), Triton launches, torch ops
(dispatches, views included), and the time spent in the fused norm + projections path.

    python benchmarks/host_overhead.py                      # preset 2b4t, 4 layers
    python benchmarks/host_overhead.py --preset 700m --layers 6

Writes benchmarks/results/host_overhead_cpu.{json,md}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
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
    layers: int = arg(4, help="decoder layers (the figures are per layer)")
    vocab: int = arg(1024, help="vocabulary (small: the head is not what is measured)")
    dtype: str = arg("bfloat16", help="model dtype")
    iters: int = arg(50, help="timed decode steps (median reported)")
    out_dir: str = arg(RESULTS_DIR, help="where the JSON and markdown go")
    name: str = arg("host_overhead_cpu", help="file name of the results, without extension")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton kernel of bitnet.kernels replaced by a launch counter (yields it), restored after."""
    from bitnet.kernels import activations, attention, gemm, gemv, layout, rmsnorm_quant, rope

    count = [0]

    class Stub:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                count[0] += 1
            return launch

    kernels = [(gemv, "_gemv_kernel"), (gemm, "_gemm_kernel"), (gemm, "_gemm_int8_kernel"),
               (activations, "_act_quant_kernel"), (rmsnorm_quant, "_rmsnorm_act_quant_kernel"), (layout, "_unpack_kernel"),
               (rope, "_rope_cache_kernel"), (attention, "_decode_attention_kernel")]
    saved = [getattr(module, name) for module, name in kernels]
    try:
        for module, name in kernels:
            setattr(module, name, Stub())
        yield count
    finally:
        for (module, name), kernel in zip(kernels, saved):
            setattr(module, name, kernel)


def measure(args: HostArgs) -> dict:
    import bitnet.bitlinear
    import bitnet.model
    from bitnet import BitLinear, BitNetConfig, BitNetForCausalLM, freeze
    from bitnet.generation import decode_step

    spent = [0.0]
    fused = bitnet.bitlinear.normed_projections

    @functools.wraps(fused)
    def timed_fused(*a, **k):
        t0 = time.perf_counter()
        try:
            return fused(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0

    config = BitNetConfig.from_preset(args.preset, num_hidden_layers=args.layers, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = freeze(BitNetForCausalLM(config).eval()).to(getattr(torch, args.dtype))
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.kernel = "triton"  # CPU tensors: runs because TRITON_INTERPRET=1 (cli sets it)
    model.setup_cache(1, 64, dtype=getattr(torch, args.dtype))  # the model's dtype, as on a GPU (the CPU's is float32)
    tok, pos, pid = torch.tensor([[5]]), torch.tensor([10]), torch.tensor([[10]])
    mask = torch.ones(1, 64, dtype=torch.bool)
    bitnet.model.normed_projections = timed_fused
    try:
        with stubbed_launches() as launches, torch.no_grad():
            for _ in range(5):
                decode_step(model, tok, pos, pid, mask)
            launches[0] = 0
            with _CountOps() as counted:
                decode_step(model, tok, pos, pid, mask)
            per_step_launches = launches[0]
            times, spent[0] = [], 0.0
            for _ in range(args.iters):
                t0 = time.perf_counter()
                decode_step(model, tok, pos, pid, mask)
                times.append(time.perf_counter() - t0)
    finally:
        bitnet.model.normed_projections = fused
    L = args.layers
    return {"layer_us": statistics.median(times) / L * 1e6, "norm_projections_us": spent[0] / args.iters / L * 1e6,
            "triton_launches": per_step_launches / L, "torch_ops": counted.ops / L, "threads": torch.get_num_threads()}


COLUMNS = [("preset", "layer shapes", ""), ("layer_us", "host us / layer", ".0f"),
           ("norm_projections_us", "of which norms + projections", ".0f"), ("triton_launches", "Triton launches / layer", ".1f"),
           ("torch_ops", "torch ops / layer", ".1f")]


def main(args: HostArgs) -> int:
    result = {"args": dataclasses.asdict(args), **measure(args)}
    markdown = table([{**result, "preset": args.preset}], COLUMNS, markdown=True)
    markdown += ("\n\nOne eager decode step on the Triton path, every Triton launch stubbed (Triton's own "
                 "launcher not included), median of the timed steps.")
    print(markdown)
    print(f"results in {save_results(args.name, result, markdown, args.out_dir)}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    import argparse

    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are first imported

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, HostArgs)
    return main(HostArgs(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    sys.exit(cli())

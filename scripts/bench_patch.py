"""transformers' own generate on a BitNet model, before and after bitnet.patch: speed and bytes.

    python scripts/bench_patch.py [--hidden 1024 --intermediate 2816 --layers 4 --dtype bfloat16]

Writes a packed checkpoint with this package (both transformers conventions: linear_class
"autobitlinear", which transformers holds as float W_q, and "bitlinear", which it holds packed and
unpacks at every call), loads it with transformers' AutoModelForCausalLM, and times greedy
`model.generate` (batch 1, a 32-token prompt, 32 new tokens, median of --repeat runs after a
warm-up) before and after `bitnet.patch(model)`, checking that the tokens are the same.
transformers' BitNet layers are wrapped in torch.compile; they run eagerly here (as in the tests),
and the patched layers run the native CPU kernels (bitnet.ops). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

import bitnet


def held_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def timed_generate(model, ids, new_tokens: int, repeat: int) -> tuple[float, torch.Tensor]:
    import torch._dynamo

    torch._dynamo.config.disable = True
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, a.dtype)
    config = bitnet.BitNetConfig.from_preset("small", hidden_size=a.hidden, intermediate_size=a.intermediate,
                                             num_hidden_layers=a.layers, num_attention_heads=a.hidden // 128,
                                             num_key_value_heads=max(1, a.hidden // 512), vocab_size=a.vocab)
    torch.manual_seed(0)
    ours = bitnet.freeze(bitnet.BitNetForCausalLM(config))
    ids = torch.randint(3, a.vocab, (1, 32))
    rows = []
    for linear_class in ("autobitlinear", "bitlinear"):
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d, linear_class=linear_class)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
        b0 = held_bytes(model)
        t0, tok0 = timed_generate(model, ids, a.new_tokens, a.repeat)
        bitnet.patch(model)
        b1 = held_bytes(model)
        t1, tok1 = timed_generate(model, ids, a.new_tokens, a.repeat)
        same = bool(torch.equal(tok0, tok1))
        rows.append((linear_class, b0, b1, a.new_tokens / t0, a.new_tokens / t1, same))
        del model

    import transformers

    from bitnet.ops import describe_cpu_backend

    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; model: hidden {a.hidden}, intermediate {a.intermediate}, "
          f"{a.layers} layers, vocab {a.vocab}, {a.dtype}; greedy, batch 1, prompt 32, {a.new_tokens} new tokens, "
          f"median of {a.repeat}; packed layers on: {describe_cpu_backend()}")
    print()
    print("| transformers layer | weights held before | after patch | tokens/s before | tokens/s after | speedup | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for lc, b0, b1, s0, s1, same in rows:
        print(f"| {lc} | {b0 / 2**20:.1f} MiB | {b1 / 2**20:.1f} MiB | {s0:.1f} | {s1:.1f} | {s1 / s0:.2f}x | {same} |")


if __name__ == "__main__":
    main()

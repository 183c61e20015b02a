"""Independent references for the tests: checkpoints built and run by transformers' own code.

Nothing here imports bitnet: the quantization below is written out in float64 from the formulas
of the paper, the packing is transformers' `pack_weights`, and the logits come from
transformers' AutoModelForCausalLM.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors.torch import save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def no_compile():
    """transformers' BitNet layers are wrapped in torch.compile; run them eagerly (same math)."""
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = old


@contextlib.contextmanager
def pinned(kernel, config):
    """Run `kernel` (an autotuned one) with `config` alone while inside."""
    saved = kernel.configs
    kernel.configs = [config]
    try:
        yield
    finally:
        kernel.configs = saved


def hf_config(model_type: str = "bitnet", tied: bool = True, **overrides):
    from transformers import BitNetConfig, LlamaConfig

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=tied, rms_norm_eps=1e-5)
    kw.update(overrides)
    if model_type == "bitnet":
        return BitNetConfig(**kw)
    return LlamaConfig(hidden_act="silu", **kw)


def hf_model(config, seed: int = 0):
    """A transformers model with plain nn.Linear projections and random (non-trivial) weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from 1, so a missing norm shows in the logits
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05)
    return model.eval()


def ternary_float64(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """W -> (W_q in {-1, 0, 1}, s = mean|W|) computed in float64 from the paper's formula."""
    w64 = w.detach().double()
    s = max(w64.abs().mean().item(), 1e-5)
    return (w64 / s).round().clamp(-1, 1), s


def write_checkpoint(model, path: str, mode: str | None, linear_class: str = "autobitlinear",
                     scale_dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Write `model` (transformers, plain Linear) as a transformers BitNet checkpoint folder.

    mode None: unquantized (the twin). "online": latent weights + quantization_config. "offline":
    each projection quantized in float64, packed with transformers' pack_weights, weight_scale in
    the `linear_class` convention. Returns the tensors written.
    """
    from transformers.integrations.bitnet import pack_weights

    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if mode == "offline":
        for name in list(sd):
            if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
                w_q, s = ternary_float64(sd[name])
                sd[name] = pack_weights(w_q.to(torch.int8).clone())
                scale = s if linear_class == "autobitlinear" else 1.0 / s
                sd[name.replace(".weight", ".weight_scale")] = torch.tensor([scale], dtype=scale_dtype)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    if mode is not None:
        cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                      "quantization_mode": mode, "modules_to_not_convert": None}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return sd


def hf_logits(path: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the folder `path` as transformers' AutoModelForCausalLM computes them (float32)."""
    from transformers import AutoModelForCausalLM

    with no_compile():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(input_ids).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def int8_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 codes of x as the paper defines them (float32): (codes, x * a)."""
    x32 = x.detach().float()
    xa = x32 * (127 / x32.abs().amax(-1, keepdim=True).clamp(min=1e-5))
    return xa.round().clamp(-128, 127), xa


def logits_on_transformers_branch(ours, theirs, input_ids: torch.Tensor, tol: float = 1e-4):
    """Run both models on input_ids; return (our logits, their logits, number of rounding ties).

    An int8 quantizer turns an ulp of difference into a whole code when its input sits on a
    rounding tie (x * a within an ulp of k + 0.5). Two correct implementations that sum in a
    different order (transformers rounds x_q / a to float32 before its GEMM; an exact integer
    accumulation does not) therefore part ways now and then, by one code, and in a 64-wide model
    one code moves the logits by ~1e-3. So: at every quantized projection our input must equal
    theirs within `tol`, every int8 code must be the same except at ties (|frac(x * a) - 0.5| <
    1e-3, differing by one), and where a tie went the other way we continue on their branch (their
    input). Then the final logits are compared by the caller.
    """
    recorded: dict[str, torch.Tensor] = {}
    names = [n for n, m in theirs.named_modules() if n.split(".")[-1] in PROJECTIONS]
    hooks = [theirs.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: recorded.__setitem__(n, args[0].detach().clone())) for n in names]
    with no_compile(), torch.no_grad():
        ref = theirs(input_ids).logits
    for h in hooks:
        h.remove()

    ties = 0

    def pre_hook(mod, args, name):
        nonlocal ties
        x, xt = args[0], recorded[name].to(args[0].device)  # (ours may run on another device)
        assert rel_err(x, xt) < tol, f"{name}: input differs from transformers' by {rel_err(x, xt):.2e}"
        c, xa = int8_codes(x)
        ct, _ = int8_codes(xt)
        diff = c != ct
        if not bool(diff.any()):
            return None
        frac = (xa - xa.floor()).double()
        near_tie = (frac - 0.5).abs() < 1e-3
        assert bool(((c - ct).abs()[diff] == 1).all()), f"{name}: int8 codes differ by more than one"
        assert bool(near_tie[diff].all()), f"{name}: int8 codes differ away from a rounding tie"
        ties += int(diff.sum())
        return (xt.to(x.dtype),)

    hooks = [ours.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: pre_hook(mod, args, n)) for n in names]
    try:
        with torch.no_grad():
            out = ours(input_ids.to(next(ours.parameters()).device)).logits
    finally:
        for h in hooks:
            h.remove()
    return out, ref, ties


def assert_close_but_for_ties(got: torch.Tensor, ref: torch.Tensor, codes: list[torch.Tensor],
                              ref_codes: list[torch.Tensor]) -> None:
    """got against ref, two runs of a model whose norms differ in their last bit (the sums' order, a
    GPU's rsqrt), given the int8 activation codes each run fed its matmuls, norm by norm. Such a
    bit moves a code across a rounding tie now and then, in that norm or, through the scales' last
    bit, in a later one, and the codes after it follow (one moved code moves the logits ~1e-3):
    equal codes, 1e-5; a tie (at most 2 codes where the runs first part), 1% of ref's scale; more,
    a failure."""
    assert len(codes) == len(ref_codes)
    differ = [int((a.cpu() != b.cpu()).sum()) for a, b in zip(codes, ref_codes)]
    assert next((n for n in differ if n), 0) <= 2, f"int8 codes differ norm by norm: {differ}"
    tol = 1e-5 if not any(differ) else 1e-2 * float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=lambda m: f"int8 codes differ norm by norm {differ}: {m}")

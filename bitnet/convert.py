"""Module swaps: `convert` (nn.Linear -> training BitLinear), `freeze` (BitLinear -> packed) and
`add_sub_norms` (a Llama-style block -> BitNet's, with its sub-norms).

Both are explicit calls over a model, never inferred from names or files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from .bitlinear import BitLinear, RMSNorm, StreamedLinear
from .config import BitNetConfig, matches_any


def convert(model: nn.Module, skip: Iterable[str] = ("lm_head",), weight_bits: str = "ternary") -> nn.Module:
    """Swap every nn.Linear of `model` (in place) for a training-mode BitLinear.

    The BitLinear takes over the Linear's own weight and bias Parameters (same objects, so an
    optimizer built before still points at them). Embeddings are not nn.Linear and stay; modules
    named in `skip` (by default lm_head, whose weight may be tied to the embedding) stay too.
    Works on any torch model: ours, or a transformers LlamaForCausalLM.
    """
    skip = tuple(skip)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or matches_any(name, skip):
            continue
        with torch.device("meta"):
            layer = BitLinear(module.in_features, module.out_features, bias=module.bias is not None, weight_bits=weight_bits)
        layer.weight = module.weight
        layer.bias = module.bias
        model.set_submodule(name, layer)
    config = getattr(model, "config", None)
    if isinstance(config, BitNetConfig):
        config.linear = "bitnet" if weight_bits == "ternary" else "bitnet1"
        if skip != ("lm_head",):
            config.modules_to_not_convert = [s for s in skip if s != "lm_head"] or None
    return model


def bitlinears(model: nn.Module) -> list[tuple[str, BitLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]


def freeze(model: nn.Module, packing: str | None = None) -> nn.Module:
    """Pack every BitLinear of `model` for inference (in place): 2 bits (or 1.6, or 1) a weight.
    A plain nn.Linear lm_head becomes a StreamedLinear (the same module and parameters; on the CPU
    decode streams a bf16 head once through the native kernel)."""
    layers = bitlinears(model)
    for _, m in layers:
        m.freeze(packing)
    head = getattr(model, "lm_head", None)
    if layers and type(head) is nn.Linear:
        StreamedLinear.adopt(head)
    return model


def add_sub_norms(model: nn.Module) -> nn.Module:
    """BitNet's sub-norms (SubLN) into a Llama-style model (ours, model_type "llama"), in place: an
    RMSNorm with weight 1 on the attention's output before o_proj and on the MLP's act(gate) * up
    before down_proj, in every block, as BitNet b1.58's block has them and as BitNet Distillation's
    first stage inserts them before quantization-aware fine-tuning (they keep the variance of what
    enters the two quantized projections in check). The activation is kept (silu stays silu) and
    the model becomes model_type "bitnet": saved, it loads as transformers' BitNetForCausalLM. The
    function changes (the norms rescale those inputs): fine-tuning brings it back."""
    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"add_sub_norms: the model is model_type {config.model_type!r}, which has its sub-norms "
                         "already; it applies to a Llama-style model")
    ref = next(model.parameters())
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.attn_sub_norm = RMSNorm(attn.n_head * attn.head_dim, config.rms_norm_eps, ref.device, ref.dtype)
        mlp.ffn_sub_norm = RMSNorm(config.intermediate_size, config.rms_norm_eps, ref.device, ref.dtype)
    model.config = dataclasses.replace(config, model_type="bitnet")
    return model


def unfreeze(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every frozen BitLinear back to a trainable latent weight W_q * s."""
    for _, m in bitlinears(model):
        m.unfreeze(dtype)
    return model


def set_quant_strength(model: nn.Module, value: float | None) -> None:
    """Quantization warm-up: every training BitLinear computes w + lambda * (q(w) - w).detach()
    (and likewise for activations) with lambda = value; None restores full quantization.
    lambda is a tensor updated in place, so a compiled model does not recompile as it rises."""
    for _, m in bitlinears(model):
        if value is None:
            m.quant_strength = None
        elif m.quant_strength is None:
            m.quant_strength = torch.tensor(float(value), device=m.weight.device)
        else:
            m.quant_strength.fill_(float(value))


def quantization_mode(model: nn.Module) -> str | None:
    """'offline' if every BitLinear is frozen, 'online' if none is, None without BitLinear."""
    states = {m.frozen for _, m in bitlinears(model)}
    if not states:
        return None
    if len(states) == 2:
        frozen = [n for n, m in bitlinears(model) if m.frozen]
        raise ValueError(f"model mixes frozen and training BitLinear layers (frozen: {frozen[:3]}...); freeze all or none")
    return "offline" if states == {True} else "online"


def count_parameters(model: nn.Module) -> int:
    """Weights of the function, counted once when tied: a frozen BitLinear counts N * K."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, BitLinear) and module.frozen:
            total += module.out_features * module.in_features
            if module.bias is not None:
                total += module.bias.numel()
            if module.rms_norm is not None:
                total += module.rms_norm.weight.numel()
            seen.update(id(t) for t in module.parameters(recurse=True))
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def weight_bytes(model: nn.Module, float_bytes: int | None = None) -> dict[str, int]:
    """Bytes of the weights as held: {'linear': the projections (BitLinear or nn.Linear, scales and
    biases included, lm_head excluded), 'other': embeddings, norms, lm_head, 'total'}. Tied tensors
    count once. float_bytes overrides the size of a float element (2: as if stored in bf16)."""
    projection = {id(t) for n, m in model.named_modules() if isinstance(m, (BitLinear, nn.Linear)) and not n.endswith("lm_head")
                  for t in m.state_dict(keep_vars=True).values()}
    out = {"linear": 0, "other": 0}
    seen: set[int] = set()
    for t in model.state_dict(keep_vars=True).values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.numel() * (float_bytes if float_bytes and t.is_floating_point() else t.element_size())
        out["linear" if id(t) in projection else "other"] += size
    out["total"] = out["linear"] + out["other"]
    return out

"""This package's packed kernels inside a transformers model: `bitnet.patch(model)`.

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("microsoft/bitnet-b1.58-2B-4T", dtype=torch.bfloat16)
    bitnet.patch(model)                      # in place; transformers' generate / pipelines now run our kernels
    model.generate(input_ids, max_new_tokens=32)

transformers loads a BitNet checkpoint (quantization_config quant_method "bitnet") with one of two
layer classes of its own (transformers.integrations.bitnet), and `patch` swaps every one of them
for a frozen `bitnet.BitLinear` (packed uint8 weight, float32 weight_scale = mean|W|, forward
through bitnet.ops: Triton on CUDA, the native C++ kernels on a CPU, exact torch elsewhere):

- `BitLinear` (linear_class "bitlinear"): already packed in our layout (uint8 (N/4, K), code W_q + 1,
  strided row blocks) with weight_scale = 1 / mean|W|, by which its output is divided. The packed
  tensor is taken over as it is (same storage, no copy); the scale is inverted once.
- `AutoBitLinear` offline (linear_class "autobitlinear", e.g. microsoft/bitnet-b1.58-2B-4T):
  transformers unpacks the weights at load into a float (N, K) tensor of W_q in {-1, 0, 1}, output
  multiplied by weight_scale = mean|W|. They are checked and packed, 2 bits a weight; the float
  tensor is dropped with the old module.
- `AutoBitLinear` online: latent float weights, quantized as transformers' WeightQuant does
  (absmean, round, clamp) once and packed; the latent weights are dropped.

Biases and the optional RMSNorm inside the layer (quantization_config `use_rms_norm`) are taken
over as they are. Every layer computes the function it computed before, up to the rounding ties of
the int8 activation quantizer (an exact integer accumulation against transformers' float GEMM).
No module of the model other than those layers changes: attention, caches, generate and pipelines
stay transformers'. model.config.quantization_config becomes offline "autobitlinear", which is what
the patched layers now hold, so transformers' save_pretrained writes a checkpoint that transformers
and bitnet.from_pretrained both load to the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from .bitlinear import BitLinear
from .packing import pack
from .quant import quantize_weight


def _transformers_classes() -> tuple[type, type]:
    try:
        from transformers.integrations.bitnet import AutoBitLinear, BitLinear as HFBitLinear
    except ImportError as e:  # pragma: no cover (transformers is a dependency)
        raise ImportError(f"bitnet.patch needs transformers' BitNet integration ({e})") from None
    return HFBitLinear, AutoBitLinear


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every transformers BitNet layer (BitLinear or AutoBitLinear) of `model`."""
    classes = _transformers_classes()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


@torch.no_grad()
def patched_layer(module: nn.Module, name: str = "", kernel: str | None = None) -> BitLinear:
    """A frozen bitnet.BitLinear computing what the transformers layer `module` computes."""
    HFBitLinear, AutoBitLinear = _transformers_classes()
    n, k = module.out_features, module.in_features
    w = module.weight
    if isinstance(module, HFBitLinear):
        # Already our layout; transformers' BitLinear holds out_features // 4 rows (N % 4 == 0).
        if w.dtype not in (torch.uint8, torch.int8) or tuple(w.shape) != ((n + 3) // 4, k):
            raise ValueError(f"{name}: transformers BitLinear weight is {w.dtype} {tuple(w.shape)}, expected uint8 "
                             f"({(n + 3) // 4}, {k})")
        packed = w.view(torch.uint8)
        if bool(((packed & (packed >> 1)) & 0x55).any()):
            raise ValueError(f"{name}: packed weight holds the 2-bit code 3, which is not a ternary value")
        scale = 1.0 / module.weight_scale.detach().float().reshape(1)  # stored as 1 / mean|W|, output divided
    elif isinstance(module, AutoBitLinear) and not module.online_quant:
        ok = (w == -1) | (w == 0) | (w == 1)
        if not bool(ok.all()):
            raise ValueError(f"{name}: offline AutoBitLinear weight holds values outside {{-1, 0, 1}}; was it loaded "
                             "from a packed checkpoint?")
        packed = pack(w.to(torch.int8), "2bit")
        scale = module.weight_scale.detach().float().reshape(1)  # mean|W|, output multiplied
    elif isinstance(module, AutoBitLinear):
        w_q, s = quantize_weight(w.detach(), "ternary")  # transformers' WeightQuant: absmean, round, clamp
        packed, scale = pack(w_q, "2bit"), s.float().reshape(1)
    else:
        raise TypeError(f"{name}: {type(module).__name__} is not a transformers BitNet layer")
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{name}: weight_scale gives the scale {scale.item()}, not a positive finite number")

    norm = module.rms_norm
    eps = None if norm is None else getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    with torch.device("meta"):
        layer = BitLinear(k, n, bias=module.bias is not None, rms_norm_eps=eps, kernel=kernel)
    layer.freeze("2bit")  # meta buffers of the right shapes, filled below
    layer.weight = packed.contiguous()
    layer.weight_scale = scale.contiguous()
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    if norm is not None:
        layer.rms_norm.weight = norm.weight
    return layer


def patch(model: nn.Module, kernel: str | None = None) -> nn.Module:
    """Swap every transformers BitNet layer of `model` (in place) for a packed bitnet.BitLinear.

    `model`: a transformers model loaded from a BitNet checkpoint (quant_method "bitnet", linear_class
    "bitlinear" or "autobitlinear", offline or online), on any device. kernel: None (automatic, as
    bitnet.ops chooses), "triton", "cpu" or "torch". Returns `model`. See bitnet.hf.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformers BitNet layers (BitLinear / AutoBitLinear): "
                         "patch() is for models loaded from a BitNet checkpoint; for a float model use "
                         "bitnet.convert(model) then bitnet.freeze(model)")
    for name, module in layers:
        model.set_submodule(name, patched_layer(module, name, kernel))
        del module
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q is not None:  # what the layers hold now: packed W_q + 1 and mean|W|, multiplied
        for key, value in (("linear_class", "autobitlinear"), ("quantization_mode", "offline")):
            if isinstance(q, dict):
                q[key] = value
            elif hasattr(q, key):
                setattr(q, key, value)
    return model

"""BitLinear: a drop-in for nn.Linear with ternary (b1.58) or binary (BitNet) weights.

Two states:
- training (after construction or `convert`): a latent float `weight` Parameter (N, K); the
  forward fake-quantizes weights and activations with the straight-through estimator, so the
  layer trains with any torch optimizer.
- frozen (after `.freeze()`): buffers only, `weight` uint8 (R, K) packed (bitnet.packing) and
  `weight_scale` float32 (1,) = mean|W|, multiplied into the output. No latent copy is kept. The
  forward runs the integer path of bitnet.ops (Triton on CUDA, native C++ kernels on the CPU, exact
  torch as the fallback).

Both states compute the same function of the same latent weights:
    y = (x_q @ W_q^T) * s / a + bias
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .packing import TERNARY_FORMATS, pack, packed_rows, unpack
from .quant import fake_quant_activation, fake_quant_weight, quantize_activation, quantize_weight

WEIGHT_BITS = ("ternary", "binary")


class RMSNorm(nn.Module):
    """RMSNorm as in Llama and transformers' BitNet: normalize in float32, scale in input dtype
    (bitnet.ops.rms_norm: one native pass on the CPU in inference)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class StreamedLinear(nn.Linear):
    """nn.Linear, same parameters and state dict, for the float lm_head of a packed model: on the CPU
    in inference a bf16 weight is streamed once by the native kernel for decode's few rows
    (bitnet.ops.float_head); F.linear otherwise. `freeze` turns a model's nn.Linear head into one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.float_head(x, self.weight, self.bias)

    @classmethod
    def adopt(cls, linear: nn.Linear) -> "StreamedLinear":
        """The same module object, now of this class (parameters, ties and hooks unchanged)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"StreamedLinear adopts a plain nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        return linear


class BitLinear(nn.Module):
    """y = quant(x) @ quant(W)^T + b, a drop-in for nn.Linear(in_features, out_features, bias).

    Args:
        weight_bits: "ternary" (BitNet b1.58, absmean to {-1, 0, 1}) or "binary" (BitNet,
            sign(W - mean W) to {-1, 1}); activations are int8 per-token absmax in both.
        rms_norm_eps: if given, an RMSNorm over the input precedes quantization (checkpoints
            whose quantization_config sets `use_rms_norm`).
        kernel: None (automatic: Triton on CUDA tensors, the native C++ kernels on CPU tensors,
            torch where neither is available; the environment variable BITNET_KERNEL overrides),
            "triton", "cpu" or "torch". Used once frozen (bitnet.ops).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_bits: str = "ternary",
        rms_norm_eps: float | None = None,
        kernel: str | None = None,
    ):
        super().__init__()
        if weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}, got {weight_bits!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bits = weight_bits
        self.kernel = kernel
        self.packing: str | None = None  # None while training; the packed format once frozen
        # quantization warm-up lambda, a 0-dim tensor (None: 1, full quantization); not saved
        self.register_buffer("quant_strength", None, persistent=False)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.rms_norm = RMSNorm(in_features, rms_norm_eps, device, dtype) if rms_norm_eps is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialization, so that convert() and construction agree.
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every float buffer; the scale stays float32, as it was
        # computed and as checkpoints load it (a bf16 scale would move outputs by up to 0.4%).
        super()._apply(fn, recurse)
        scale = getattr(self, "weight_scale", None)
        if scale is not None and scale.dtype != torch.float32 and not scale.is_meta:
            self.weight_scale = scale.float()
        return self

    @property
    def frozen(self) -> bool:
        return self.packing is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            if self.packing is not None:  # frozen: its own norm fused into the quantization (Triton kernels)
                out = normed_projections(x, self.rms_norm, [self], own_norm=True)
                if out is not None:
                    return out[0]
            x = self.rms_norm(x)
        if self.packing is not None:
            return ops.bitlinear(x, self.weight, self.weight_scale, self.out_features, self.packing, self.bias, self.kernel)
        w = fake_quant_weight(self.weight, self.weight_bits, self.quant_strength)
        x = fake_quant_activation(x, self.quant_strength)
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def freeze(self, packing: str | None = None) -> "BitLinear":
        """Quantize the latent weight once, keep only packed bytes and the scale.

        packing: "2bit" (default for ternary, the checkpoint layout) or "1.6bit" (ternary, 5 per
        byte); binary weights always pack as "1bit". On the meta device only the shapes are made
        (for loading a checkpoint into them).
        """
        packing = packing or ("2bit" if self.weight_bits == "ternary" else "1bit")
        valid = TERNARY_FORMATS if self.weight_bits == "ternary" else ("1bit",)
        if packing not in valid:
            raise ValueError(f"{self.weight_bits} weights pack as {valid}, not {packing!r}")
        if self.frozen:
            if packing != self.packing:
                raise ValueError(f"layer is already frozen as {self.packing!r}; unfreeze() first to repack")
            return self
        latent = self.weight
        device = latent.device
        if latent.is_meta:
            packed = torch.empty(packed_rows(self.out_features, packing), self.in_features, dtype=torch.uint8, device=device)
            scale = torch.empty(1, dtype=torch.float32, device=device)
        else:
            w_q, s = quantize_weight(latent, self.weight_bits)
            packed, scale = pack(w_q, packing), s.reshape(1)
        del self.weight
        self.register_buffer("weight", packed)
        self.register_buffer("weight_scale", scale)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.packing = packing
        return self

    @torch.no_grad()
    def unfreeze(self, dtype: torch.dtype = torch.float32) -> "BitLinear":
        """Back to the training state with the dequantized weight W_q * s as latent weight.

        Binary weights survive a freeze/unfreeze/freeze cycle bit for bit. Ternary W_q survive too,
        but the absmean scale of W_q * s is s times the fraction of non-zeros, so re-freezing
        gives a different scale: quantization is not idempotent for ternary weights.
        """
        if not self.frozen:
            return self
        w = unpack(self.weight, self.out_features, self.packing, dtype=torch.float32) * self.weight_scale.float()
        del self.weight, self.weight_scale
        self.weight = nn.Parameter(w.to(dtype))
        if self.bias is not None:
            self.bias.requires_grad_(True)
        self.packing = None
        return self

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_q int8 (N, K), scale float32 scalar) in either state."""
        if self.frozen:
            return unpack(self.weight, self.out_features, self.packing), self.weight_scale.reshape(())
        return quantize_weight(self.weight, self.weight_bits)

    def extra_repr(self) -> str:
        state = f"frozen={self.packing}" if self.frozen else "training"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_bits={self.weight_bits}, {state}"
        )


def frozen_projections(x: torch.Tensor, layers) -> list[torch.Tensor] | None:
    """The outputs of several frozen BitLinear of one input (q / k / v, gate / up) with x quantized
    once (bitnet.ops.bitlinear_many: one native call on the CPU, one act_quant on the Triton
    kernels), or None where that does not apply: not all plain frozen BitLinear of one format and
    kernel without their own RMSNorm or hooks, or the torch path."""
    if not _plain_frozen(layers):
        return None
    first = layers[0]
    return ops.bitlinear_many(x, *_frozen_arguments(layers), first.packing, [m.bias for m in layers], first.kernel)


def normed_projections(x: torch.Tensor, norm: nn.Module, layers, up: torch.Tensor | None = None,
                       residual: torch.Tensor | None = None, own_norm: bool = False) -> list[torch.Tensor] | None:
    """[layer(norm(x)) for layer in layers] with the RMSNorm fused into the quantization of x
    (bitnet.ops.rms_norm_bitlinear_many: one rmsnorm_act_quant on the Triton kernels), or None
    where that does not apply: `norm` not a plain RMSNorm of x's dtype without hooks, global module
    hooks (the modules would not be called), autograd to record (the fused op has no backward),
    the layers not as frozen_projections needs them, or another backend. Its a may be an ulp and its
    x_q one step off norm(x)'s, where the RMSNorm's last bit is (bitnet.ops.rms_norm_bitlinear_many).
    up: the relu2 MLP's up projection output; the norm's input is then relu(x)^2 * up (x the gate's).
    residual (one layer; its output's shape and dtype): [residual + layer(norm(x))], the add fused.
    own_norm: `norm` is the one layer's own (use_rms_norm checkpoints: BitLinear.forward calls this,
    the layer's hooks have run)."""
    if type(norm) is not RMSNorm or norm._forward_hooks or norm._forward_pre_hooks or norm.weight.dtype != x.dtype:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
        return None
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or not _plain_frozen(layers, own_norm):
        return None
    if residual is not None and (len(layers) != 1 or residual.dtype != x.dtype or residual.requires_grad
                                 and torch.is_grad_enabled()):
        return None
    first = layers[0]
    return ops.rms_norm_bitlinear_many(x, norm.weight, norm.eps, *_frozen_arguments(layers), first.packing,
                                       [m.bias for m in layers], first.kernel, up, residual)


def _frozen_arguments(layers) -> tuple[list, list, list]:
    """(packed weights, weight scales, out_features) of frozen BitLinear, read from the buffers
    freeze() registers them as (a module attribute lookup costs ~0.5 us, twice a layer per call)."""
    packed, scales, ns = [], [], []
    for m in layers:
        b = m._buffers
        packed.append(b["weight"] if "weight" in b else m.weight)
        scales.append(b["weight_scale"] if "weight_scale" in b else m.weight_scale)
        ns.append(m.out_features)
    return packed, scales, ns


def _plain_frozen(layers, own_norm: bool = False) -> bool:
    """All plain frozen BitLinear of one format and kernel, without their own RMSNorm or hooks: what
    a shared quantization of their input computes exactly as each layer would. own_norm: one layer
    whose own RMSNorm is the one being fused, called from its forward (its hooks have run)."""
    if own_norm:
        m = layers[0]
        return len(layers) == 1 and type(m) is BitLinear and m.frozen and m.rms_norm is not None
    first = layers[0]
    for m in layers:
        if type(m) is not BitLinear or not m.frozen or m.packing != first.packing or m.rms_norm is not None:
            return False
        if m.kernel != first.kernel or m._forward_hooks or m._forward_pre_hooks:
            return False
    return True


class Int8Linear(nn.Module):
    """An inference-only linear layer with int8 weights, one float32 absmax scale per output row.

    Meant for the lm_head of packed models (decode streams every weight byte once: at the 700m
    shape the bf16 head weighs 60% as much as all ternary layers together):
        s_n = max_k |W[n, k]| / 127,   W_q[n, k] = round(W[n, k] / s_n) in [-127, 127]
        y = x @ (W_q * s)^T (+ bias)   activations stay in float.
    `state_dict()` holds the dequantized weight W_q * s in bf16 under `weight` (no extra tensor),
    so a model saved after the swap is an ordinary checkpoint whose head carries the rounding.
    """

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]
        self.register_buffer("weight", weight_q.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.float().reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._register_state_dict_hook(Int8Linear._dequantized_state)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127  # (N,)
        w_q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(w_q, scale, getattr(linear, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.weight, self.weight_scale, self.bias)

    @staticmethod
    def _dequantized_state(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "weight"] = (module.weight.float() * module.weight_scale[:, None]).to(torch.bfloat16)
        state_dict.pop(prefix + "weight_scale", None)
        return state_dict

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 rows"


class Int4Linear(nn.Module):
    """An inference-only linear layer with 4-bit weights in groups of 32 and int8 activations: the
    lm_head at about a third of a bf16 head's bytes (llama.cpp's heads are quantized the same way,
    Q6_K / Q4_0 weights against Q8 activations).

        groups of 32 along K (K padded with zero weights to Kp, a multiple of 64):
            d_g = max |W[n, g]| / 7,   c = round(W / d_g) + 8 in [1, 15]
        y = (sum_g d_g sum_{k in g} (c - 8) x_q) / a (+ bias)     x_q, a: per-row int8 activations
                                                                   (bitnet.quant.quantize_activation)
    Storage: `codes` uint8 (N, Kp / 2), block b of 64 weights in bytes 32b..32b+31 (weight 64b + i
    in the low nibble of byte i, 64b + 32 + i in its high nibble), `scales` float32 (N, Kp / 32):
    4.5 + 0.5 (padding aside) bits a weight. Decode's few rows run the native kernel on the CPU
    (exact integer sums per 4 weights, float32 over them) and a Triton GEMV on the GPU (exact sums
    per group of 32, float32 over the groups: kernels/int4_head.py); other inputs the same function
    in torch.
    `state_dict()` holds the dequantized weight in bf16 under `weight`, as Int8Linear's does.
    """

    GROUP = 32

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, codes.shape[0]
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._register_state_dict_hook(Int4Linear._dequantized_state)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module) -> "Int4Linear":
        w = linear.weight.detach().float()
        N, K = w.shape
        Kp = max(64, -(-K // 64) * 64)
        w = torch.nn.functional.pad(w, (0, Kp - K)).view(N, Kp // cls.GROUP, cls.GROUP)
        d = w.abs().amax(dim=2) / 7  # (N, groups)
        q = torch.where(d[..., None] > 0, w / d.clamp(min=1e-30)[..., None], torch.zeros_like(w))
        c = (q.round().clamp(-7, 7) + 8).to(torch.uint8).view(N, Kp // 64, 2, 32)  # (N, blocks, half, 32)
        codes = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, Kp // 2)
        return cls(codes, d, K, getattr(linear, "bias", None))

    def codes_unpacked(self) -> torch.Tensor:
        """The codes c (N, Kp) as int16, in weight order."""
        b = self.codes.view(self.out_features, -1, 32).to(torch.int16)
        return torch.stack([b & 15, b >> 4], dim=2).reshape(self.out_features, -1)

    def dequantized(self) -> torch.Tensor:
        """d_g (c - 8) as float32 (N, K)."""
        c = self.codes_unpacked().float() - 8
        return (c.view(self.out_features, -1, self.GROUP) * self.scales[..., None]).reshape(self.out_features, -1)[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.int4_linear(x, self.codes, self.scales, self.out_features, self.bias)  # few rows: a kernel
        if y is not None:
            return y
        x_q, a = quantize_activation(x)
        y = (x_q.float() @ self.dequantized().t()) / a
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    @staticmethod
    def _dequantized_state(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "weight"] = module.dequantized().to(torch.bfloat16)
        state_dict.pop(prefix + "codes", None)
        state_dict.pop(prefix + "scales", None)
        return state_dict

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int4 groups of 32"

"""BitNetForCausalLM: the decoder of microsoft/bitnet-b1.58-2B-4T (and its Llama variant), one file.

Per layer (model_type "bitnet"; "llama" drops the two sub-norms):
    h = x + o_proj(attn_sub_norm(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))))   n = input_layernorm(x)
    y = h + down_proj(ffn_sub_norm(act(gate_proj(m)) * up_proj(m)))                         m = post_attention_layernorm(h)
The seven projections are BitLinear (config.linear "bitnet"/"bitnet1") or nn.Linear ("bf16",
the twin); embeddings, norms and lm_head stay in high precision. Parameter names are
transformers', so state dicts map one to one onto real checkpoints.

Inference state: `setup_cache(batch, max_len)` preallocates a static KV cache (compile-friendly:
fixed shapes, positions passed as a tensor), used when `input_pos` is given; `generate`
(bitnet.generation) prefills it with the prompt and then decodes one token per step.

Eager CPU decode of a packed model (one token per sequence, native kernels built) runs each layer
as one native call, `bitnet_cpu::decode_layer` (`native_decode_args` says when): the layer's own
ops in C++ but for the attention, a decode kernel of its own (kernels/csrc/bitnet_attention.h)
that rounds differently from torch's in the last bits. A decode step of the 700m shape is
otherwise about 700 eager ops, 5 of its 23 ms on a 2-core Xeon.

On the Triton kernels (GPUs) every RMSNorm in front of frozen BitLinear (input_layernorm -> q/k/v,
attn_sub_norm -> o_proj, post_attention_layernorm -> gate/up, ffn_sub_norm -> down_proj) is fused
into the quantization of their input (`projections`, `prenormed`: bitnet::rmsnorm_packed_matmul_cat,
one launch at a decode step, the GEMV's or the GEMM's programs normalizing their rows; else one
rmsnorm_act_quant, then one packed matmul for the projections of that input). Its sum of squares runs in another order than the norm's, so a
scale a may be an ulp off and an x_q one step off the unfused path's; the torch and native CPU
paths are the references.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .bitlinear import BitLinear, Int4Linear, Int8Linear, RMSNorm, frozen_projections, normed_projections
from .config import BitNetConfig, matches_any
from .kernels import cpu as native
from .ops import choose_kernel, decode_attention, native_inference, rope, rope_cache, rope_decode_attention


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None = None


def make_linear(config: BitNetConfig, name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """nn.Linear for the twin and for modules_to_not_convert, BitLinear otherwise."""
    if config.linear == "bf16" or matches_any(name, config.modules_to_not_convert or ()):
        return nn.Linear(in_features, out_features, bias=bias)
    eps = config.quant_rms_norm_eps if config.use_rms_norm else None
    return BitLinear(in_features, out_features, bias=bias, weight_bits=config.weight_bits, rms_norm_eps=eps)


def projections(x: torch.Tensor, *layers: nn.Module, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[layer(norm(x)) for layer in layers] (x as it is without a norm); with a residual (one
    layer), [residual + layer(norm(x))], the add in the packed GEMV's epilogue where the norm fuses.

    On the Triton kernels a plain RMSNorm in front of frozen BitLinear is fused into the quantization
    of its output, once for all of them (normed_projections: rmsnorm_act_quant, then a packed matmul
    each; a may be an ulp, x_q one step off the unfused path's, where the norm's last bit is). Otherwise
    the norm runs as a module, then several frozen BitLinear share one quantization of its output
    (frozen_projections: one native call on the CPU, one act_quant on the Triton kernels; each
    output equal to its layer's own, bit for bit); one layer alone runs as a module.
    """
    if norm is not None:
        out = normed_projections(x, norm, layers, residual=residual)
        if out is not None:
            return out
        x = norm(x)
    if residual is not None:
        return [residual + layers[0](x)]
    out = frozen_projections(x, layers) if len(layers) > 1 else None
    return out if out is not None else [layer(x) for layer in layers]


def prenormed(block: nn.Module, norm: nn.Module, x: torch.Tensor, *args, skip: bool = False) -> torch.Tensor:
    """block(norm(x), *args), plus x with skip (the decoder layer's skip connection). An Attention
    or MLP block without hooks, after an RMSNorm of x's dtype (whose output has x's dtype too), is
    handed x and the norm instead, and applies it in front of its first projections (projections:
    fused into their quantization on the Triton kernels), and x as the residual its last projection
    adds (in the GEMV's epilogue there). Hooks on the block (a tensor-parallel plan, a user's) see
    its input normed and its output without x, as before."""
    hooks = nn.modules.module
    plain = type(block) in (Attention, MLP) and type(norm) is RMSNorm and norm.weight.dtype == x.dtype
    if not plain or block._forward_hooks or block._forward_pre_hooks or hooks._global_forward_hooks \
            or hooks._global_forward_pre_hooks:
        out = block(norm(x), *args)
        return x + out if skip else out
    return block(x, *args, norm=norm, residual=x if skip else None)


def _activation(name: str):
    if name == "relu2":
        return lambda x: F.relu(x).square()
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[name]


def rope_inv_freq(config: BitNetConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in float32, with Llama 3 scaling when configured."""
    d = config.dim_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin tables for positions 0..max_position_embeddings-1, float32, (L, head_dim)."""

    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.config = config
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset(None)

    def reset(self, device) -> None:
        if device is not None and torch.device(device).type == "meta":
            return
        inv_freq = rope_inv_freq(self.config).to(device)
        pos = torch.arange(self.config.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # (L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
        self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T) -> (B, 1, T, hd), broadcast over heads
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)


def attention_dtype(x: torch.Tensor, device: torch.device | str | None = None) -> torch.dtype:
    """float32 for bf16 / fp16 activations on the CPU, else their own dtype. torch's reduced-precision
    attention kernels on the CPU are several times slower than its float32 one (one decode token,
    24 heads, 64 keys: 157 us in bf16 vs 27 us in fp32 on a 2-core EPYC), and float32 is the more
    accurate. The cache: cache_dtype."""
    if torch.device(device or x.device).type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return x.dtype


def cache_dtype(model, device: torch.device | str | None = None) -> torch.dtype:
    """The KV cache's dtype: attention_dtype, except for a packed bf16 model decoding on the native
    CPU kernels, whose cache is bf16. Its keys and values are bf16 values already (the projections'
    outputs, RoPE'd in bf16), so a float32 cache held the same numbers in twice the bytes: the native
    decode attention reads bf16 as float32, exactly (tests/test_cpu_kernels.py: the same bits as from
    a float32 cache), and at long contexts a decode step reads as much cache as weights (2B-4T at 2048
    tokens: 315 MB of float32 cache a token beside 522 MB of weights). Elsewhere (a float twin, fp16,
    the torch or Triton paths) attention runs in torch over a float32 cache, which a bf16 one would
    make convert each step."""
    ref = model.model.embed_tokens.weight
    dtype = attention_dtype(ref, device)
    if torch.device(device or ref.device).type != "cpu" or ref.dtype != torch.bfloat16 or \
            model.config.hidden_act not in ("relu2", "relu") or not native_inference(ref.detach()):
        return dtype
    lins = [getattr(layer.self_attn, n) for layer in model.model.layers for n in ("q_proj", "k_proj", "v_proj")]
    return torch.bfloat16 if lins and all(type(m) is BitLinear and m.frozen for m in lins) else dtype


@dataclass
class CacheWindow:
    """The cache slots attention reads in this forward, shared by every layer's KVCache: None for
    all of them (static shapes: CUDA graphs, torch.compile), else slots [0, live)."""

    live: int | None = None


class KVCache(nn.Module):
    """Static cache (B, n_kv, max_len, hd); `update` writes the new keys at `input_pos` and returns
    the slots of the window (all, or the first `window.live`)."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device, window: CacheWindow):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.window = window  # one object for every layer (setup_cache), set once a forward

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos (T,), k/v (B, n_kv, T, hd)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.visible()

    def visible(self):
        """The keys and values attention reads: every slot, or the first `window.live`."""
        live = self.window.live
        if live is None:
            return self.k, self.v
        return self.k[:, :, :live], self.v[:, :, :live]


# The attention mask of a decode step that sees every key it is given (bitnet.model's _mask).
ALL_KEYS = object()
# The attention mask of a prompt written to cache slots 0..T-1 with no padding (bitnet.model's
# _mask, on a GPU): plain causal attention over those T slots.
CAUSAL_PREFIX = object()
# The attention mask of a decode step without attention_mask (no padding) over the static cache:
# each query sees the slots up to its own, input_pos, which the decode kernels do with no key mask
# at all (no mask built each step, nor loaded and applied in every attention's loop).
LIVE_SLOTS = object()

# A prompt's attention in the CPU's cached (inference) path runs in blocks of PROMPT_BLOCK query
# positions aligned to multiples of it in the sequence (prompt_attention), each over the keys up
# to its own end: a block of positions is the same torch call whether it came in a whole prompt,
# a chunk of one or after a cached prefix, so chunks that start at such multiples give the whole
# prefill's numbers bit for bit.
PROMPT_BLOCK = 32


def blocked_prompts(device: torch.device) -> bool:
    """Whether a cached prompt's attention runs in aligned blocks (prompt_attention): on the CPU,
    where the server's runner runs its prompt chunks that way too (a GPU's prompt paths are flash
    attention and a masked static-row call). benchmarks/host_overhead.py, which emulates a GPU's
    layer on the CPU, turns it off."""
    return device.type == "cpu"


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, start: int, gqa: bool
                     ) -> torch.Tensor:
    """Attention of a prompt chunk whose T queries q (B, nh, T, hd) sit at sequence positions
    start .. start + T - 1, over the cache's keys and values k, v (B, nkv, >= start + T, hd, any
    dtype: converted to q's) under mask (B or 1, 1, T, >= start + T), bool -> (B, nh, T, hd).

    Computed block by block, the blocks [a, b) the multiples of PROMPT_BLOCK cut [start, start + T)
    into, each block's queries over keys [0, b) with its rows of the mask (the keys and values
    converted and laid out once a call; a block reads the first b of them: with a fresh copy a
    block, the same numbers and 3% more time for a 1000-token 700m prefill). Why: torch's attention
    sums a row's keys in an order that depends on the call's shape (the numbers of queries and
    keys), and a 1-ulp difference in one layer moves an activation across an int8 rounding step in
    the next: at the 700m shape a prompt of 320 tokens prefilled in chunks of 256 + 64 (one call
    each, as before) gave logits 0.2 away from one call's. A block's call depends only on the block
    (its rows, keys [0, b), their values), so an aligned chunk boundary or cached prefix changes no
    number (tests/test_scheduler.py holds chunked and cached prefills to generate()'s bit for bit)."""
    T = q.shape[2]
    y = torch.empty_like(q)
    a, end = start, start + T
    k, v = k[:, :, :end].to(q.dtype).contiguous(), v[:, :, :end].to(q.dtype).contiguous()
    while a < end:
        b = min((a // PROMPT_BLOCK + 1) * PROMPT_BLOCK, end)
        y[:, :, a - start:b - start] = F.scaled_dot_product_attention(
            q[:, :, a - start:b - start], k[:, :, :b], v[:, :, :b], attn_mask=mask[:, :, a - start:b - start, :b],
            enable_gqa=gqa)
        a = b
    return y


class Attention(nn.Module):
    def __init__(self, config: BitNetConfig, prefix: str):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.dim_head
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = make_linear(config, f"{prefix}.q_proj", hidden, self.n_head * self.head_dim, bias)
        self.k_proj = make_linear(config, f"{prefix}.k_proj", hidden, self.n_kv * self.head_dim, bias)
        self.v_proj = make_linear(config, f"{prefix}.v_proj", hidden, self.n_kv * self.head_dim, bias)
        self.o_proj = make_linear(config, f"{prefix}.o_proj", self.n_head * self.head_dim, hidden, bias)
        self.attn_sub_norm = RMSNorm(self.n_head * self.head_dim, config.rms_norm_eps) if config.sub_norms else None
        self.kv_cache: KVCache | None = None
        self.capture: list | None = None  # a list: each forward appends its (q, k, v) (distillation's relations)

    def forward(self, x, cos, sin, mask, input_pos, norm=None, residual=None):
        # x (B, T, C); norm: the input_layernorm to apply to it first (prenormed), or None;
        # residual (B, T, C): returned plus the output (the layer's skip connection, prenormed)
        B, T, _ = x.shape
        q, k, v = projections(x, self.q_proj, self.k_proj, self.v_proj, norm=norm)
        if self.capture is not None:  # (B, T, heads x head_dim) each, before RoPE
            self.capture.append((q, k, v))
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        cache = self.kv_cache if input_pos is not None else None
        packed = type(self.q_proj) is BitLinear and self.q_proj.frozen  # packed inference (the bf16 twin stays vanilla)
        decode = cache is not None and T == 1
        key_mask = None if not decode or mask is ALL_KEYS or mask is LIVE_SLOTS else mask[:, 0, 0]  # (B, 1, 1, S) -> (B, S)
        if packed and decode:  # RoPE, cache write and attention in one Triton launch
            y = rope_decode_attention(q, k, v, cos, sin, cache, input_pos, key_mask, self.q_proj.kernel)
            if y is not None:  # (B, nh*hd)
                return projections(y.to(x.dtype)[:, None], self.o_proj, norm=self.attn_sub_norm, residual=residual)[0]
        fused = None
        if packed:
            fused = rope_cache(q, k, v, cos, sin, cache, input_pos, self.q_proj.kernel)  # one Triton launch, or None
        if fused is not None:
            q, k, v = fused  # (B, nh, T, hd); the cache (B, nkv, max_len, hd), or (B, nkv, T, hd)
            if cache is not None:
                k, v = cache.visible()
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
            q, k = rope(q, cos, sin), rope(k, cos, sin)  # x * cos + rotate_half(x) * sin (bitnet.ops)
            if cache is not None:
                k, v = cache.update(input_pos, k, v)  # (B, nkv, max_len, hd)
        dtype = attention_dtype(q)
        if cache is not None and T > 1 and blocked_prompts(q.device) and isinstance(mask, torch.Tensor) \
                and not torch.compiler.is_compiling():
            start = int(input_pos[0])  # a prompt (chunk) in the CPU's cache: in aligned blocks
            if int(input_pos[-1]) == start + T - 1:
                y = prompt_attention(q.to(dtype), k, v, mask, start, self.n_head != self.n_kv)
                y = y.to(x.dtype).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
                return projections(y, self.o_proj, norm=self.attn_sub_norm, residual=residual)[0]
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if decode:  # one Triton launch on the GPU (torch's SDPA would take its math path)
            y = decode_attention(q[:, :, 0], k, v, input_pos, key_mask=key_mask, kernel=getattr(self.q_proj, "kernel", None))
            if y is not None:  # (B, nh*hd)
                return projections(y.to(x.dtype)[:, None], self.o_proj, norm=self.attn_sub_norm, residual=residual)[0]
        gqa = self.n_head != self.n_kv
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif mask is ALL_KEYS:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        elif mask is CAUSAL_PREFIX:  # square and causal: flash attention takes it (a mask and GQA it would not)
            y = F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], is_causal=True, enable_gqa=gqa)
        elif mask is LIVE_SLOTS:  # (where no decode kernel ran) slots 0 .. input_pos
            live = input_pos[:, None] >= torch.arange(k.shape[2], device=k.device)[None, :]  # (1, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=live, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return projections(y, self.o_proj, norm=self.attn_sub_norm, residual=residual)[0]


class MLP(nn.Module):
    def __init__(self, config: BitNetConfig, prefix: str):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = make_linear(config, f"{prefix}.gate_proj", h, i, bias)
        self.up_proj = make_linear(config, f"{prefix}.up_proj", h, i, bias)
        self.down_proj = make_linear(config, f"{prefix}.down_proj", i, h, bias)
        self.ffn_sub_norm = RMSNorm(i, config.rms_norm_eps) if config.sub_norms else None
        self.act = _activation(config.hidden_act)
        self.relu2 = config.hidden_act == "relu2"

    def forward(self, x, norm=None, residual=None):
        # x (B, T, C); norm: the post_attention_layernorm to apply to it first (prenormed), or None;
        # residual (B, T, C): returned plus the output (the layer's skip connection, prenormed)
        gate, up = projections(x, self.gate_proj, self.up_proj, norm=norm)
        if self.relu2 and self.ffn_sub_norm is not None:
            # relu(gate)^2 * up folded into the sub norm's quantization on the Triton kernels
            out = normed_projections(gate, self.ffn_sub_norm, [self.down_proj], up=up, residual=residual)
            if out is not None:
                return out[0]
        return projections(self.act(gate) * up, self.down_proj, norm=self.ffn_sub_norm, residual=residual)[0]


class DecoderLayer(nn.Module):
    def __init__(self, config: BitNetConfig, i: int):
        super().__init__()
        self.self_attn = Attention(config, f"model.layers.{i}.self_attn")
        self.mlp = MLP(config, f"model.layers.{i}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, input_pos):
        # x + attn(norm(x)), then h + mlp(norm(h)); each block applies its norm and adds its input
        # (prenormed: on the Triton kernels the norms fuse into quantization, the adds into the GEMVs)
        x = prenormed(self.self_attn, self.input_layernorm, x, cos, sin, mask, input_pos, skip=True)
        return prenormed(self.mlp, self.post_attention_layernorm, x, skip=True)


def _attr(module: nn.Module, name: str):
    """module.<name> for the exact module types native_decode_args admits, read from the instance
    dict and the registered parameters, buffers and submodules in nn.Module.__getattr__'s order,
    without the failed lookup that reaches __getattr__ (~40 reads a layer: the 24 layers of 700m
    660 -> 300 us on the 2-core EPYC)."""
    d = module.__dict__
    if name in d:
        return d[name]
    for store in (d["_parameters"], d["_buffers"], d["_modules"]):
        if name in store:
            return store[name]
    return getattr(module, name)


def native_decode_args(layer, x: torch.Tensor, hidden_act: str, memo: dict | None = None) -> tuple | None:
    """The arguments of bitnet_cpu::decode_layer for `layer` at a decode step of x, or None where the
    layer is not exactly what that op computes: plain DecoderLayer / Attention / MLP / RMSNorm
    modules without hooks (nor global module hooks), the seven projections frozen BitLinear of one
    format on the native CPU kernels (no RMSNorm of their own), norms in x's dtype, a relu2 or relu
    MLP, a float32 or bf16 CPU cache, and native float ops allowed (bitnet.ops.native_inference). `memo`, a
    dict shared by the layers of one step, keeps what depends on x and the environment only. It runs
    for every layer at every step (a swapped module, weight, hook or cache takes effect at the next
    step) except inside BitNetForCausalLM.keep_decode_args (generate's decode loop), and reads
    attributes through _attr once each type is known to be ours."""
    memo = {} if memo is None else memo
    if type(layer) is not DecoderLayer or hidden_act not in ("relu2", "relu"):
        return None
    a, mlp = _attr(layer, "self_attn"), _attr(layer, "mlp")
    if type(a) is not Attention or type(mlp) is not MLP:
        return None
    if "native" not in memo:
        hooks = nn.modules.module
        memo["native"] = native_inference(x) and not hooks._global_forward_hooks and not hooks._global_forward_pre_hooks
    cache = _attr(a, "kv_cache")
    if cache is None or type(cache) is not KVCache or not memo["native"]:
        return None
    k_cache, v_cache = _attr(cache, "k"), _attr(cache, "v")
    if k_cache.dtype not in (torch.float32, torch.bfloat16) or k_cache.device.type != "cpu":
        return None
    lins = tuple(_attr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) + \
        tuple(_attr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
    fmt = lins[0].packing if type(lins[0]) is BitLinear else None
    for m in lins:
        if type(m) is not BitLinear or not m.frozen or m.packing != fmt or _attr(m, "rms_norm") is not None \
                or m._forward_hooks or m._forward_pre_hooks:
            return None
        if ("kernel", m.kernel) not in memo:
            memo["kernel", m.kernel] = choose_kernel(x, m.kernel) == "cpu"
        if not memo["kernel", m.kernel]:
            return None
    norms = (_attr(layer, "input_layernorm"), _attr(a, "attn_sub_norm"), _attr(layer, "post_attention_layernorm"),
             _attr(mlp, "ffn_sub_norm"))
    if any(n is not None and (type(n) is not RMSNorm or n._forward_hooks or n._forward_pre_hooks) for n in norms):
        return None
    weights = [None if n is None else _attr(n, "weight") for n in norms]
    if any(w is not None and w.dtype != x.dtype for w in weights):
        return None
    for m in (layer, a, mlp):
        if m._forward_hooks or m._forward_pre_hooks:
            return None
    return (weights, [1e-5 if n is None else n.eps for n in norms],
            [_attr(m, "weight") for m in lins], [_attr(m, "weight_scale") for m in lins], [_attr(m, "bias") for m in lins],
            [m.out_features for m in lins], fmt, hidden_act, k_cache, v_cache, a.n_head, a.n_kv)


class BitNetModel(nn.Module):
    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)


class BitNetForCausalLM(nn.Module):
    """`model(input_ids, labels=None)` -> CausalLMOutput(logits, loss).

    The convenience methods `from_pretrained`, `save_pretrained` (bitnet.checkpoint), `generate`
    (bitnet.generation), `freeze` and `num_parameters` (bitnet.convert) are defined on the floors
    above this module and attached to the class by bitnet/__init__.py (README: Layout).
    """

    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.config = config
        self.model = BitNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.tokenizer_files: dict[str, bytes] = {}  # tokenizer.json & co., carried by save_pretrained
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' initialization: N(0, initializer_range) for matrices, zero biases.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, BitLinear)) and not module.weight.is_meta and module.weight.is_floating_point():
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and not module.weight.is_meta:
            nn.init.normal_(module.weight, mean=0.0, std=std)

    # ----- forward -----
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        causal_prefix: bool = False,
    ) -> CausalLMOutput:
        """input_ids (B, T) -> logits (B, T, vocab); loss when labels (B, T) are given.

        attention_mask (B, S): 1 for real tokens, 0 for padding; S = T without a cache, the cache
        length with one. input_pos (T,): positions of these tokens in the cache (uses it when set
        up). position_ids (B, T): RoPE positions; default input_pos, else 0..T-1.
        logits_to_keep: if > 0, logits of the last that many positions only (B, logits_to_keep,
        vocab), as in transformers: a prefill needs one row, not a (B, T, vocab) tensor.
        causal_prefix: the caller vouches that input_pos is 0..T-1 and that attention_mask has no
        padding over those slots: plain causal attention over them (flash attention on a GPU),
        without the host sync that checks it otherwise, so that a prefill can be recorded as a
        CUDA graph (bitnet.generation.CapturedForward). Not checked: a wrong claim attends wrongly.
        """
        B, T = input_ids.shape
        if logits_to_keep and labels is not None:
            raise ValueError("labels need the logits of every position; leave logits_to_keep at 0")
        use_cache = input_pos is not None and self.model.layers[0].self_attn.kv_cache is not None
        if position_ids is None:
            base = input_pos if input_pos is not None else torch.arange(T, device=input_ids.device)
            position_ids = base.unsqueeze(0).expand(B, T)
        if use_cache:
            self._set_cache_window(input_pos)
        if causal_prefix and T > 1:  # (one token: the mask below, built without a sync)
            slots = self.model.layers[0].self_attn.kv_cache.k.shape[2] if use_cache else T
            if T > slots:
                raise ValueError(f"causal_prefix: a prompt of {T} tokens does not fit the cache's {slots} slots")
            mask = CAUSAL_PREFIX if use_cache else None
        else:
            mask = self._mask(B, T, attention_mask, input_pos if use_cache else None, input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.model.rotary(position_ids, x.dtype)
        pos = input_pos if use_cache else None
        layers = self.model.layers
        if use_cache and T == 1 and not self.training and not torch.compiler.is_compiling():
            x = self._native_decode(x, cos, sin, input_pos, attention_mask)
            if x.dim() == 2:  # every layer ran natively
                x, layers = x[:, None], ()
        for layer in layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, pos)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, logits_to_keep, C)
        logits = self.lm_head(self.model.norm(x))  # (B, T or logits_to_keep, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutput(logits=logits, loss=loss)

    def _native_decode(self, x, cos, sin, input_pos, attention_mask):
        """All layers of a decode step (x (B, 1, C)) as bitnet_cpu::decode_layer calls -> (B, C);
        x unchanged (B, 1, C) where a layer does not qualify (native_decode_args)."""
        B, _, C = x.shape
        kept = self.__dict__.get("_kept_decode_args")  # a dict inside keep_decode_args()
        key = (x.dtype, x.device, x.requires_grad, torch.is_grad_enabled())
        args = kept.get(key) if kept is not None else None
        if args is None:
            memo: dict = {}
            args = [native_decode_args(layer, x, self.config.hidden_act, memo) for layer in self.model.layers]
            if kept is not None:
                kept[key] = args
        if not args or any(a is None for a in args):
            return x
        live = int(input_pos[0]) + 1
        key_mask = None
        if attention_mask is not None:
            keys = attention_mask[:, :live].bool()
            key_mask = None if bool(keys.all()) else keys
        rows = torch.arange(B, device=x.device)
        pos = input_pos.expand(B).contiguous()
        cos, sin = cos.reshape(B, -1), sin.reshape(B, -1)
        h = x.reshape(B, C)
        for a in args:
            h = native.decode_layer(h, *a[:10], rows, pos, cos, sin, key_mask, *a[10:])
        return h

    @contextlib.contextmanager
    def keep_decode_args(self):
        """Within this block the native CPU decode path reads each layer's arguments
        (native_decode_args: ~40 attribute reads and checks a layer) at its first decode step and
        keeps them, instead of reading them again at every step (24 layers: ~0.3 ms of a ~9 ms step
        at 700m on 2 cores). generate() decodes inside it: the model (its modules, weights, hooks,
        cache) must not change while the block runs; a change made after it takes effect at once."""
        saved = self.__dict__.get("_kept_decode_args")
        self._kept_decode_args = {} if saved is None else saved  # nested: the outer block's
        try:
            yield self
        finally:
            self._kept_decode_args = saved

    def _mask(self, B, T, attention_mask, input_pos, device):
        """Boolean (B, 1, T, S) mask, None for the plain causal case (SDPA's is_causal), ALL_KEYS
        for a decode step that sees every key of the live cache window (eager CPU, no padding),
        LIVE_SLOTS for one without attention_mask over the static cache (slots 0 .. input_pos), or
        CAUSAL_PREFIX for a prompt into slots 0..T-1 with no padding on a GPU (eager: one host sync
        decides it): causal attention over those slots, which SDPA runs as flash attention, where
        the masked call over the static cache takes its math path (a mask with grouped heads)."""
        if input_pos is None:
            if attention_mask is None:
                return None
            allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
            keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
            diag = torch.eye(T, dtype=torch.bool, device=device)
        else:
            cache = self.model.layers[0].self_attn.kv_cache
            S = cache.window.live or cache.k.shape[2]
            if attention_mask is not None:
                attention_mask = attention_mask[:, :S]
            if cache.window.live is not None and T == 1 and (attention_mask is None or bool(attention_mask.all())):
                return ALL_KEYS  # one query at the last live slot, no padding: no mask to build or apply
            if T == 1 and attention_mask is None:
                return LIVE_SLOTS  # one query a sequence, no padding: slots 0 .. input_pos, no mask to build
            if T > 1 and input_pos.device.type == "cuda" and not torch.compiler.is_compiling() and T <= S:
                prefix = (input_pos == torch.arange(T, device=device)).all()
                if attention_mask is not None:
                    prefix = prefix & attention_mask[:, :T].bool().all()
                if bool(prefix):
                    return CAUSAL_PREFIX
            allowed = input_pos[:, None] >= torch.arange(S, device=device)[None, :]  # (T, S)
            keys = (attention_mask.bool() if attention_mask is not None else torch.ones(B, S, dtype=torch.bool, device=device))
            keys = keys[:, None, None, :]  # (B, 1, 1, S)
            diag = input_pos[:, None] == torch.arange(S, device=device)[None, :]
        # A padded query sees no real key: let it see itself, so its row is never all-masked
        # (an all-masked row makes SDPA return NaN, which the next layer would spread).
        return (allowed[None, None] & keys) | diag[None, None]

    @torch.no_grad()
    def quantize_lm_head(self, bits: int = 8) -> "BitNetForCausalLM":
        """Swap the lm_head for a quantized one, in place (inference only): bits=8, int8 rows with
        float32 row scales (bitnet.Int8Linear; activations stay float), half the bytes of a bf16
        head; bits=4, 4-bit weights in groups of 32 against int8 activations (bitnet.Int4Linear),
        under a third of them. Decode streams every head byte once a step (bits=8: the native kernel
        on a CPU, a Triton GEMV on a GPU; bits=4 likewise). With tied embeddings the
        embedding keeps its own float table. The cost in perplexity is measured in docs/results.md."""
        kinds = {8: Int8Linear, 4: Int4Linear}
        if bits not in kinds:
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        if isinstance(self.lm_head, (Int8Linear, Int4Linear)):
            if isinstance(self.lm_head, kinds[bits]):
                return self
            raise ValueError(f"the lm_head is already quantized ({type(self.lm_head).__name__}); load the model again to requantize")
        self.lm_head = kinds[bits].from_linear(self.lm_head)
        return self

    # ----- cache -----
    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Preallocate the static KV cache for `batch_size` sequences of up to `max_seq_len` tokens."""
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        ref = self.model.embed_tokens.weight
        window = CacheWindow()
        self._captured_step = None  # a recorded decode step (bitnet.generation) holds the old cache
        for layer in self.model.layers:
            a = layer.self_attn
            a.kv_cache = KVCache(batch_size, a.n_kv, max_seq_len, a.head_dim,
                                 dtype or cache_dtype(self, device), device or ref.device, window)

    def _set_cache_window(self, input_pos: torch.Tensor) -> None:
        """Eager CPU inference reads the cache up to the last slot written (the later slots are
        masked anyway; a long preallocated cache would otherwise be streamed whole every step, at
        the 700m shape 7 MB a layer for 1024 slots). Elsewhere (GPUs: CUDA graphs; torch.compile)
        the shapes stay static."""
        window = self.model.layers[0].self_attn.kv_cache.window
        eager_cpu = input_pos.device.type == "cpu" and not torch.compiler.is_compiling()
        window.live = int(input_pos.max()) + 1 if eager_cpu and input_pos.numel() else None

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self._captured_step = None  # a recorded decode step (bitnet.generation) holds the old cache

"""GGUF export for llama.cpp (and the runtimes built on it): `export_gguf(model, "out.gguf")`.

    bitnet convert runs/small/export model.gguf --to gguf [--gguf-type tq2_0|tq1_0|iq2_bn|iq1_bn|f16]

What is written (the `gguf` package writes the container):
- architecture `llama` for model_type "llama" (the HF1BitLLM / onebitllms layout: a Llama block),
  `bitnet` for model_type "bitnet" (the 2B-4T layout, with attn_sub_norm / ffn_sub_norm), or
  `bitnet-b1.58` for it (ik_llama.cpp's graph of that block: relu^2 and an untied head computed
  right; the default with gguf_type "iq2_bn" or "iq1_bn");
- hyper-parameters under llama.cpp's keys; the tokenizer (byte-level BPE, as tokenizer.json holds
  it: tokens, token types, merges, special ids, chat template); llama3 RoPE scaling as the
  `rope_freqs` tensor llama.cpp's own converter writes;
- the seven projections of every block as ternary blocks of 256 along K: TQ2_0 (2 bits a weight +
  one fp16 per block, 2.06 bits/weight) or TQ1_0 (base-3, 1.69 bits/weight). Block scale d = 1 and
  the per-matrix scale s = mean|W| as the F32 tensor `blk.N.<name>.scale` that llama.cpp multiplies
  after the matmul (scale="tensor": the dequantized weights are exactly W_q * s), or s folded into
  every block's fp16 d (scale="fold": for runtimes that do not read .scale tensors; s rounds to fp16);
- or, gguf_type "iq2_bn", ik_llama.cpp's own ternary type (IQ2_BN: per row one float32 scale, then
  blocks of 64 at 2 bits a weight; 2.0 bits/weight plus 4 bytes a row): the row scale is s itself,
  so the dequantized weights are exactly W_q * s and no .scale tensor is written; ik_llama.cpp runs it
  as it is (llama-quantize's own IQ2_BN of W_q * s holds the same codes); or "iq1_bn", its base-3
  type (IQ1_BN: an fp16 row scale, s rounded to fp16 as scale="fold" does, then 13 bytes per 64
  weights: 1.625 bits/weight);
- or, gguf_type "f16", every projection as F16 values W_q (exact; with scale="fold", W_q * fp16(s)):
  the input of runtimes that quantize with their own tools (ik_llama.cpp's llama-quantize), and a
  float reference: llama.cpp then multiplies float activations, without int8 quantization;
- a projection whose input width K is not a multiple of 256 cannot be held in TQ blocks: it is
  written as `fallback` (Q4_0 by default: blocks of 32, exact for ternary values, 4.5 bits/weight;
  or Q8_0, or F16; "error" refuses), and the report says which tensors (IQ2_BN / IQ1_BN: K a
  multiple of 64 and at least 512, as ik_llama.cpp quantizes their activations in rows of 8 blocks or
  more);
- q_proj / k_proj rows permuted for the `llama` architecture as llama.cpp's converter does (its
  llama RoPE rotates consecutive pairs, transformers' rotate_half rotates halves); the `bitnet` and
  `bitnet-b1.58` architectures use NeoX RoPE, so their rows stay as they are;
- embeddings and lm_head as `float_type` (f16 or f32), norms as F32.

Which runtime computes which layout right (FORMAT.md):
- `llama`: stock llama.cpp (and llama-cpp-python, ollama, LM Studio on a recent llama.cpp) runs it
  right; the slow test holds its logits to ours.
- `bitnet` (model_type "bitnet", relu^2 MLP): stock llama.cpp loads it but its graph hard-codes a
  SiLU gate, and bitnet.cpp's llama.cpp too, so a relu^2 model computes wrong there (a 2B-4T
  export gives garbage-level perplexity); the layout itself is right (a model_type "bitnet" model
  trained with hidden_act "silu" runs right). The head must be tied (llama.cpp's bitnet graph always
  reads it from token_embd).
- `bitnet-b1.58` (model_type "bitnet"): ik_llama.cpp's graph of the 2B-4T block (relu^2 gate,
  sub-norms, NeoX RoPE, output.weight when the head is untied) computes it right; it reads IQ2_BN /
  IQ1_BN (or F16, with scale="fold": it reads no .scale tensors), not TQ1_0 / TQ2_0 (types it does
  not have). Stock llama.cpp does not know the architecture and refuses the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .bitlinear import BitLinear
from .hub import chat_template
from .model import BitNetForCausalLM

GGUF_TYPES = ("tq2_0", "tq1_0", "iq2_bn", "iq1_bn", "f16")
ARCHITECTURES = ("llama", "bitnet", "bitnet-b1.58")
FALLBACKS = ("q4_0", "q8_0", "f16", "error")
FLOAT_TYPES = ("f16", "f32")
SCALES = ("tensor", "fold")
QK_K = 256  # TQ block
QK = 32  # Q4_0 / Q8_0 block
QK_BN = 64  # IQ2_BN / IQ1_BN block
# ik_llama.cpp's own ternary types (mainline llama.cpp and gguf-py have neither): GGML_TYPE_IQ1_BN /
# IQ2_BN and the file types LLAMA_FTYPE_MOSTLY_IQ1_BN / IQ2_BN
IK_TYPE_IDS = {"iq2_bn": 135, "iq1_bn": 134}
IK_FTYPES = {"iq2_bn": 137, "iq1_bn": 136}
BN_MIN_K = 512  # ik_llama.cpp quantizes their activations (Q8_K64) in rows of at least 8 blocks
IK_ARCH = "bitnet-b1.58"
PROJECTION_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}
NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}
LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


class GGUFError(ValueError):
    """A model (or an option) that this exporter cannot write as a GGUF llama.cpp would run."""


@dataclass
class GGUFReport:
    path: str
    architecture: str
    tensors: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # (name, type, torch shape)
    notes: list[str] = field(default_factory=list)
    bytes: int = 0

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for _, t, _ in self.tensors:
            kinds[t] = kinds.get(t, 0) + 1
        kinds_s = ", ".join(f"{n} {t}" for t, n in sorted(kinds.items()))
        return (f"{self.path}: GGUF architecture {self.architecture}, {len(self.tensors)} tensors ({kinds_s}), "
                f"{self.bytes / 2**20:.2f} MiB" + "".join(f"\n  note: {n}" for n in self.notes))


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the `gguf` package (llama.cpp's gguf-py): pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------- blocks
def _two_bit(c: torch.Tensor) -> torch.Tensor:
    """Codes c (..., 4, W) uint8 in [0, 3] -> bytes (..., W): code i of each byte in bits 2i, 2i+1."""
    return c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)


def _trit_bytes(b: torch.Tensor) -> torch.Tensor:
    """Base-3 numbers b < 243 -> uint8 ceil(b * 256 / 243), whose trits a decoder reads out by
    multiplication (TQ1_0, IQ1_BN)."""
    return ((b * 256 + 242) // 243).to(torch.uint8)


def tq2_0_blocks(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """TQ2_0 of ternary q (N, K) int8, K % 256 == 0, with block scale d (N, 1) float: uint8 (N, K/256 * 66).

    Per block of 256: 64 bytes, then d as fp16; in each half of 128 values, byte j holds values
    j, j+32, j+64, j+96 of that half in bits 0-1, 2-3, 4-5, 6-7, as the codes q + 1."""
    n, k = q.shape
    qs = _two_bit((q.to(torch.int16) + 1).to(torch.uint8).reshape(n, k // QK_K, 2, 4, 32))  # (N, blocks, 2, 32)
    return _with_d(qs.reshape(n, k // QK_K, 64), d, k // QK_K)


def tq1_0_blocks(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """TQ1_0 of ternary q (N, K) int8, K % 256 == 0: uint8 (N, K/256 * 54), 5 trits a byte.

    Per block of 256, codes c = q + 1 in base 3, most significant trit first: 32 bytes for values
    0..159 (byte j: c[j], c[j+32], ..., c[j+128]), 16 bytes for 160..239 (byte j: c[160+j], c[176+j],
    ...), 4 bytes for 240..255 (byte j: c[240+j], c[244+j], c[248+j], c[252+j], then a 0 trit),
    each byte b stored as ceil(b * 256 / 243) so that digits come out by multiplication; then d fp16."""
    n, k = q.shape
    c = (q.to(torch.int32) + 1).reshape(n, k // QK_K, QK_K)  # (N, blocks, 256)
    pow5 = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32)
    qs0 = (c[..., :160].reshape(n, -1, 5, 32) * pow5.view(5, 1)).sum(-2)  # (N, blocks, 32)
    qs1 = (c[..., 160:240].reshape(n, -1, 5, 16) * pow5.view(5, 1)).sum(-2)  # (N, blocks, 16)
    qh = (c[..., 240:].reshape(n, -1, 4, 4) * pow5[:4].view(4, 1)).sum(-2)  # (N, blocks, 4)
    return _with_d(_trit_bytes(torch.cat([qs0, qs1, qh], -1)), d, k // QK_K)


def iq2_bn_rows(q: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """IQ2_BN (ik_llama.cpp) of ternary q (N, K) int8, K % 64 == 0, with row scale s (N, 1) float:
    uint8 (N, 4 + K/4).

    Each row: its scale as float32 (little-endian), then per block of 64, byte j holds values j,
    j+16, j+32, j+48 of the block in bits 0-1, 2-3, 4-5, 6-7, as the codes q + 1."""
    n, k = q.shape
    qs = _two_bit((q.to(torch.int16) + 1).to(torch.uint8).reshape(n, k // QK_BN, 4, QK_BN // 4))  # (N, blocks, 16)
    d = s.to(torch.float32).reshape(n, 1).contiguous().view(torch.uint8)  # (N, 4), little-endian as torch is here
    return torch.cat([d, qs.reshape(n, k // 4)], -1).numpy()


def iq1_bn_rows(q: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """IQ1_BN (ik_llama.cpp) of ternary q (N, K) int8, K % 64 == 0, with row scale s (N, 1) float:
    uint8 (N, 2 + 13 K/64), 1.625 bits a weight.

    Each row: its scale as fp16, then per block of 64, four groups of 16: codes c = q + 1 of values
    5k..5k+4 of group g in byte 3g + k (k < 3), least significant trit first (sum of c_j 3^j), and
    value 15 of every group in byte 12 (sum of c_g 3^g); each byte b stored as ceil(b * 256 / 243),
    so that ik's decoder reads the trits out by multiplication."""
    n, k = q.shape
    c = (q.to(torch.int32) + 1).reshape(n, k // QK_BN, 4, 16)  # (N, blocks, group, 16)
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    fives = (c[..., :15].reshape(n, k // QK_BN, 4, 3, 5) * pow3).sum(-1)  # (N, blocks, 4, 3)
    extra = (c[..., 15] * pow3[:4]).sum(-1, keepdim=True)  # (N, blocks, 1)
    b = _trit_bytes(torch.cat([fives.reshape(n, k // QK_BN, 12), extra], -1))
    d = s.to(torch.float16).reshape(n, 1).contiguous().view(torch.uint8)  # (N, 2)
    return torch.cat([d, b.reshape(n, -1)], -1).numpy()


def q8_0_blocks(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Q8_0 of integers q (N, K), K % 32 == 0: per block of 32, d fp16 then the 32 int8 values."""
    n, k = q.shape
    qs = q.to(torch.int8).reshape(n, k // QK, QK).view(torch.uint8)
    return _with_d(qs, d, k // QK, d_first=True)


def q4_0_blocks(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Q4_0 of q (N, K) in [-8, 7], K % 32 == 0: per block of 32, d fp16 then 16 bytes, byte j holding
    value j (low nibble) and value j + 16 (high nibble), each as q + 8."""
    n, k = q.shape
    c = (q.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // QK, 2, 16)
    qs = c[..., 0, :] | (c[..., 1, :] << 4)
    return _with_d(qs, d, k // QK, d_first=True)


def _with_d(qs: torch.Tensor, d: torch.Tensor, blocks: int, d_first: bool = False) -> np.ndarray:
    """Append (or prepend) each block's fp16 d: qs (N, blocks, B) uint8, d (N, 1) -> (N, blocks * (B + 2))."""
    n = qs.shape[0]
    d16 = d.to(torch.float16).reshape(n, 1, 1).expand(n, blocks, 1).contiguous().view(torch.uint8)  # (N, blocks, 2)
    parts = [d16, qs] if d_first else [qs, d16]
    return torch.cat(parts, -1).reshape(n, -1).numpy()


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_metadata(files: dict[str, bytes], vocab_size: int, bos, eos, pad) -> dict:
    """What llama.cpp needs of a byte-level BPE tokenizer.json: tokens (padded to vocab_size),
    token types, merges, pre-tokenizer name, special ids, add_bos, chat template."""
    raw = files.get("tokenizer.json")
    if raw is None:
        raise GGUFError("no tokenizer.json travels with the model: llama.cpp needs the vocabulary; put the model's "
                        "tokenizer.json into its folder")
    tj = json.loads(raw)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"tokenizer.json holds a {model.get('type')} model with a {(tj.get('decoder') or {}).get('type')} "
                        "decoder; GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama 3 style) only")
    pre = _pre_tokenizer(tj.get("pre_tokenizer"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED, for rows of the embedding that no token names
    for tok, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = tok, 1  # NORMAL
    for t in tj.get("added_tokens") or []:
        if t["id"] < vocab_size:
            tokens[t["id"]], types[t["id"]] = t["content"], 3 if t.get("special") else 4  # CONTROL / USER_DEFINED
    too_big = [i for i in model["vocab"].values() if i >= vocab_size]
    if too_big:
        raise GGUFError(f"tokenizer.json has ids up to {max(too_big)}, beyond the model's vocab_size {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        post = tj.get("post_processor") or {}
        posts = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        single = next((p.get("single") for p in posts if p.get("type") == "TemplateProcessing"), None) or []
        add_bos = bool(single) and "SpecialToken" in single[0] and bos is not None
    first = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
    return dict(tokens=tokens, types=types, merges=merges, pre=pre, bos=first(bos), eos=first(eos), pad=first(pad),
                add_bos=bool(add_bos), chat_template=chat_template(files))


def _pre_tokenizer(pt: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer: GPT-2's regex ("gpt-2") or Llama 3's ("llama-bpe")."""
    if pt and pt.get("type") == "ByteLevel" and pt.get("use_regex", True):
        return "gpt-2"
    if pt and pt.get("type") == "Sequence":
        splits = [p for p in pt.get("pretokenizers", []) if p.get("type") == "Split"]
        regex = (splits[0].get("pattern") or {}).get("Regex", "") if splits else ""
        if regex.startswith(LLAMA3_REGEX_START):
            return "llama-bpe"
    raise GGUFError(f"tokenizer.json's pre-tokenizer {json.dumps(pt)[:200]} is neither GPT-2's byte-level regex nor "
                    "Llama 3's; llama.cpp would split text differently, so it is not exported")


# ----------------------------------------------------------------------------- the model
def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q / k from rotate_half order (pairs i, i + d/2) to llama.cpp's consecutive pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(config) -> torch.Tensor:
    """llama.cpp's rope_freqs (divisors of each RoPE frequency) for llama3 rope scaling."""
    rs = config.rope_scaling
    factor, low, high = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    dim = config.dim_head
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def check_exportable(model: BitNetForCausalLM, architecture: str | None = None, gguf_type: str = "tq2_0") -> str:
    """The GGUF architecture of `model` (`architecture`, or by default the one its model_type and
    gguf_type call for), or GGUFError saying why that runtime could not hold it."""
    c = model.config
    if architecture is None:
        architecture = "llama" if c.model_type == "llama" else IK_ARCH if gguf_type in IK_TYPE_IDS else "bitnet"
    if architecture not in ARCHITECTURES:
        raise GGUFError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    fits = ("llama",) if c.model_type == "llama" else ("bitnet", IK_ARCH)
    if architecture not in fits:
        raise GGUFError(f"model_type {c.model_type} (with{'out' if c.model_type == 'llama' else ''} sub-norms) is "
                        f"written as architecture {' or '.join(fits)}, not {architecture}")
    if c.attention_bias or c.mlp_bias:
        raise GGUFError("biases in the projections (attention_bias / mlp_bias) are not exported to GGUF")
    if c.use_rms_norm:
        raise GGUFError("quantization_config use_rms_norm (an RMSNorm inside every BitLinear) has no place in "
                        "llama.cpp's graphs")
    if architecture == "llama" and c.hidden_act != "silu":
        raise GGUFError(f"model_type llama with hidden_act {c.hidden_act!r}: llama.cpp's llama graph computes SiLU")
    if architecture in ("bitnet", IK_ARCH):
        if architecture == "bitnet" and not c.tie_word_embeddings:
            raise GGUFError("llama.cpp's bitnet architecture always reads the head from token_embd; this model's "
                            f"lm_head is not tied to its embeddings (ik_llama.cpp's {IK_ARCH} reads an untied "
                            "one: --gguf-type iq2_bn or iq1_bn)")
        if c.dim_head * c.num_attention_heads != c.hidden_size:
            raise GGUFError(f"llama.cpp's {architecture} architecture needs num_attention_heads * head_dim == hidden_size")
        if c.rope_scaling and architecture == "bitnet":
            raise GGUFError("rope scaling is not exported for the bitnet architecture")
    if architecture == IK_ARCH and gguf_type in ("tq2_0", "tq1_0"):
        raise GGUFError(f"architecture {IK_ARCH} is ik_llama.cpp's, which has no {gguf_type.upper()} (mainline "
                        "llama.cpp's type ids name nothing there): use gguf_type iq2_bn / iq1_bn, or f16 for its "
                        "llama-quantize")
    if gguf_type in IK_TYPE_IDS and architecture == "bitnet" and c.hidden_act != "silu":
        raise GGUFError(f"{gguf_type.upper()} is read by ik_llama.cpp only, whose bitnet graph computes SiLU: this "
                        f"model's {c.hidden_act} runs right under architecture {IK_ARCH} (the default for {gguf_type})")
    return architecture


def export_gguf(
    model: BitNetForCausalLM,
    path: str,
    gguf_type: str = "tq2_0",
    fallback: str = "q4_0",
    float_type: str = "f16",
    scale: str | None = None,
    name: str | None = None,
    architecture: str | None = None,
) -> GGUFReport:
    """Write `model` (any state: packed, latent or binary; binary weights are ternary without zeros)
    as a GGUF file at `path` (written under a temporary name, then renamed). See the module's docstring.
    scale None: "fold" where the runtime reads no .scale tensors (IQ2_BN / IQ1_BN, architecture
    bitnet-b1.58), "tensor" elsewhere; architecture None: llama / bitnet by model_type, bitnet-b1.58
    for iq2_bn / iq1_bn."""
    for value, allowed, what in ((gguf_type, GGUF_TYPES, "gguf_type"), (fallback, FALLBACKS, "fallback"),
                                 (float_type, FLOAT_TYPES, "float_type"), (scale, (None, *SCALES), "scale")):
        if value not in allowed:
            raise GGUFError(f"{what} must be one of {allowed}, got {value!r}")
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    c = model.config
    arch = check_exportable(model, architecture, gguf_type)
    ik = gguf_type in IK_TYPE_IDS or arch == IK_ARCH
    if scale is None:
        scale = "fold" if ik else "tensor"
    elif scale == "tensor" and ik:
        raise GGUFError(f"scale 'tensor': ik_llama.cpp's {arch} graph reads no .scale tensors"
                        if arch == IK_ARCH else f"scale 'tensor' with {gguf_type.upper()}: ik_llama.cpp reads the "
                        "scale from each row of it, and no .scale tensors beside it: use 'fold'")
    report = GGUFReport(path=path, architecture=arch)
    tok = tokenizer_metadata(model.tokenizer_files, c.vocab_size, c.bos_token_id, c.eos_token_id, c.pad_token_id)

    tmp = f"{path}.tmp.{os.getpid()}"
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(name or f"bitnet-{c.model_type}-{c.num_hidden_layers}x{c.hidden_size}")
    w.add_file_type({"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                     "f16": gguf.LlamaFileType.MOSTLY_F16, **IK_FTYPES}[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.dim_head)
    w.add_vocab_size(c.vocab_size)
    if c.dim_head * c.num_attention_heads != c.hidden_size:
        w.add_key_length(c.dim_head)
        w.add_value_length(c.dim_head)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if tok[key] is not None:
            add(int(tok[key]))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(False)
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    def add_float(gname: str, t: torch.Tensor, kind: str) -> None:
        arr = t.detach().float().cpu().numpy()
        arr = arr.astype(np.float16) if kind == "f16" else arr
        w.add_tensor(gname, arr)
        report.tensors.append((gname, kind.upper(), tuple(t.shape)))

    sd = model.state_dict()
    add_float("token_embd.weight", sd["model.embed_tokens.weight"], float_type)
    if c.rope_scaling:
        add_float("rope_freqs.weight", llama3_rope_factors(c), "f32")
    fell_back: list[str] = []
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}"
        for ours, theirs in NORM_NAMES.items():
            if f"{prefix}.{ours}.weight" in sd:
                add_float(f"blk.{i}.{theirs}.weight", sd[f"{prefix}.{ours}.weight"], "f32")
        for ours, theirs in PROJECTION_NAMES.items():
            module = model.get_submodule(f"{prefix}.{ours}")
            gname = f"blk.{i}.{theirs}"
            if not isinstance(module, BitLinear):  # modules_to_not_convert: a float projection
                weight = module.weight.detach().float()
                if arch == "llama" and theirs in ("attn_q", "attn_k"):
                    weight = llama_permute(weight, c.num_attention_heads if theirs == "attn_q" else c.num_key_value_heads)
                add_float(f"{gname}.weight", weight, float_type)
                continue
            q, s = module.quantized_weight()  # int8 (N, K), float32 scalar
            q = q.to(torch.int8).cpu()
            if arch == "llama" and theirs in ("attn_q", "attn_k"):
                q = llama_permute(q, c.num_attention_heads if theirs == "attn_q" else c.num_key_value_heads)
            n, k = q.shape
            s = s.float().reshape(1).cpu()
            d = (s if scale == "fold" else torch.ones(1)).expand(n, 1)
            kind = gguf_type
            block = QK_BN if kind in IK_TYPE_IDS else QK_K
            if kind != "f16" and (k % block or (kind in IK_TYPE_IDS and k < BN_MIN_K)):
                if fallback == "error":
                    raise GGUFError(f"{gname}: input width {k} is not a multiple of {block}"
                                    + (f" of at least {BN_MIN_K}" if kind in IK_TYPE_IDS else "")
                                    + f", which {gguf_type.upper()} blocks need; choose a fallback type (q4_0, q8_0 or f16)")
                kind = fallback if k % QK == 0 else "f16"
                fell_back.append(f"{gname} (K={k}) as {kind.upper()}")
            if kind == "f16":
                blocks = (q.float() * d).numpy().astype(np.float16)
                w.add_tensor(f"{gname}.weight", blocks)
            elif kind in IK_TYPE_IDS:  # a type gguf-py does not know: its bytes as int8, the shape given
                rows = (iq2_bn_rows if kind == "iq2_bn" else iq1_bn_rows)(q, d)
                w.add_tensor(f"{gname}.weight", rows.view(np.int8), raw_shape=(n, k), raw_dtype=IK_TYPE_IDS[kind])
            else:
                encode = {"tq2_0": tq2_0_blocks, "tq1_0": tq1_0_blocks, "q8_0": q8_0_blocks, "q4_0": q4_0_blocks}[kind]
                w.add_tensor(f"{gname}.weight", encode(q, d), raw_dtype=getattr(Q, kind.upper()))
            report.tensors.append((f"{gname}.weight", kind.upper(), (n, k)))
            if scale == "tensor":
                w.add_tensor(f"{gname}.scale", s.numpy())
                report.tensors.append((f"{gname}.scale", "F32", (1,)))
    add_float("output_norm.weight", sd["model.norm.weight"], "f32")
    if arch in ("llama", IK_ARCH) and not c.tie_word_embeddings:
        add_float("output.weight", sd["lm_head.weight"], float_type)
    if fell_back:
        report.notes.append(f"{len(fell_back)} projections have an input width that is not a multiple of "
                            + (f"{QK_BN} of at least {BN_MIN_K}" if gguf_type in IK_TYPE_IDS else f"{QK_K}") + " and "
                            f"were written in another type: {', '.join(fell_back[:4])}"
                            + (f" and {len(fell_back) - 4} more" if len(fell_back) > 4 else ""))
    if arch == "bitnet" and c.hidden_act != "silu":
        report.notes.append(f"architecture bitnet with hidden_act {c.hidden_act}: stock llama.cpp (and bitnet.cpp) "
                            "compute a SiLU gate there, so this file loads but computes another function; "
                            f"ik_llama.cpp's {IK_ARCH} graph computes it right: --gguf-type iq2_bn (or iq1_bn)")
    if ik:
        report.notes.append(f"for ik_llama.cpp ({'architecture ' + arch + ', ' if arch == IK_ARCH else ''}"
                            f"{gguf_type.upper() if gguf_type in IK_TYPE_IDS else 'F16, scales folded'}): stock llama.cpp "
                            "does not read this file")

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    report.bytes = os.path.getsize(path)
    return report

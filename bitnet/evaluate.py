"""Perplexity of a causal LM on a text file, by the two protocols the field uses.

- "sliding" (transformers' perplexity guide): windows of `max_length` tokens every `stride`
  tokens; each window scores only the tokens the previous windows did not (at most `stride`), so
  every token after the first is predicted once, with at least max_length - stride tokens of
  context once the text is that long. The guide weights each window's mean loss by an approximate
  token count; here the negative log-likelihoods are summed token by token, so the count is exact.
- "chunks" (the BitNet reproductions): the text cut into non-overlapping chunks of max_length - 1
  tokens, each prefixed with BOS; every chunk token is scored, the last partial chunk included.

The text is tokenized whole, without special tokens; "sliding" puts one BOS in front of the text
when the model has one (so that its first token is scored too). ppl = exp(sum NLL / tokens scored).
Works on this package's checkpoints in every format and on any transformers causal-LM folder.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .hub import resolve

PROTOCOLS = ("sliding", "chunks")


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored
    protocol: str
    max_length: int
    stride: int | None
    model: str = ""
    data: str = ""

    def summary(self) -> str:
        proto = f"{self.protocol}, max_length {self.max_length}" + (f", stride {self.stride}" if self.stride else "")
        return f"ppl {self.ppl:.4f}  (nll {self.nll:.4f} nats/token, {self.tokens:,} tokens scored; protocol {proto})"


def windows(n: int, max_length: int, stride: int, protocol: str, has_bos: bool) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) over a stream of n tokens (BOS already in it when used).

    A window feeds stream[begin:end]; tokens at positions first..end-1 are scored (predicted from
    everything before them in the window)."""
    if protocol == "chunks":
        step = max_length - 1  # each chunk gets its own BOS
        return [(b, min(b + step, n), b) for b in range(0, n, step)]
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, max_length: int = 1024, stride: int | None = None, protocol: str = "sliding",
               bos_token_id: int | None = None, batch_size: int = 4, device=None, progress: bool = False) -> Perplexity:
    """Perplexity of `model` (anything returning `.logits` for input_ids) on the 1-D token ids."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    stride = stride or max_length // 2
    if protocol == "sliding" and not 0 < stride <= max_length:
        raise ValueError(f"stride must be in (0, max_length], got {stride}")
    if protocol == "chunks" and bos_token_id is None:
        raise ValueError("the chunks protocol prefixes every chunk with BOS, but the model has no bos_token_id")
    device = device or next(model.parameters()).device
    ids = ids.long().flatten()
    if protocol == "sliding" and bos_token_id is not None:
        ids = torch.cat([torch.tensor([bos_token_id]), ids])
    if len(ids) < 2:
        raise ValueError("the text has fewer than two tokens: nothing to score")
    spans = windows(len(ids), max_length, stride, protocol, bos_token_id is not None)

    from tqdm.auto import tqdm

    total_nll, total_tokens = 0.0, 0
    # Batch windows of equal length (all but possibly the last ones).
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    bar = tqdm(total=len(spans), disable=not progress, desc="perplexity", dynamic_ncols=True)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in batch])  # (B, length)
            if protocol == "chunks":
                x = torch.cat([torch.full((len(batch), 1), bos_token_id), x], dim=1)  # (B, 1 + length)
            labels = x.clone()
            for row, (b, e, first) in enumerate(batch):
                offset = 1 if protocol == "chunks" else 0
                labels[row, : first - b + offset] = -100  # context only, not scored
            logits = model(x.to(device)).logits.float()  # (B, L, V)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(device),
                                  ignore_index=-100, reduction="sum")
            total_nll += nll.item()
            total_tokens += int((labels[:, 1:] != -100).sum())
            bar.update(len(batch))
    bar.close()
    mean = total_nll / total_tokens
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=total_tokens, protocol=protocol, max_length=max_length,
                      stride=stride if protocol == "sliding" else None)


# ----------------------------------------------------------------------------- folders
def load_model(path: str, device=None, dtype=None):
    """Our checkpoints (model_type bitnet or llama, any quantization) with BitNetForCausalLM; any
    other transformers causal-LM folder with AutoModelForCausalLM (local files only)."""
    from .config import MODEL_TYPES

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(cfg_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type in MODEL_TYPES:
        from .model import BitNetForCausalLM

        return BitNetForCausalLM.from_pretrained(path, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", local_files_only=True)
    return model.to(device or "cpu").eval()


def load_text_ids(path: str, text_file: str) -> torch.Tensor:
    """The text file tokenized with the folder's tokenizer, without special tokens."""
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{text_file} is empty")
    tok_file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok_file):
        from tokenizers import Tokenizer

        return torch.tensor(Tokenizer.from_file(tok_file).encode(text, add_special_tokens=False).ids)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no tokenizer in {path} (tokenizer.json or a transformers tokenizer): {e}") from None
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def bos_id(model) -> int | None:
    bos = getattr(model.config, "bos_token_id", None)
    return bos[0] if isinstance(bos, list) else bos


def evaluate_folder(path: str, data: str, max_length: int | None = None, stride: int | None = None, protocol: str = "sliding",
                    batch_size: int = 4, device=None, progress: bool = False, revision: str | None = None,
                    cache_dir: str | None = None, local_files_only: bool = False,
                    lm_head_bits: int | None = None) -> Perplexity:
    """Perplexity of the model at `path` (a folder or a hub id, bitnet.hub) on the text file `data`;
    lm_head_bits 8 or 4: with its lm_head quantized so (model.quantize_lm_head), as it would be served."""
    name, path = path, resolve(path, revision, cache_dir, local_files_only)
    model = load_model(path, device=device)
    if lm_head_bits:
        if not hasattr(model, "quantize_lm_head"):  # a transformers model, not BitNetForCausalLM
            raise ValueError(f"--lm-head int{lm_head_bits} quantizes the head of this package's models; {name} loaded "
                             f"as transformers' {type(model).__name__}")
        model.quantize_lm_head(lm_head_bits)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    max_length = max_length or min(1024, max_pos or 1024)
    if max_pos is not None and max_length > max_pos:
        raise ValueError(f"--max-length {max_length} exceeds the model's max_position_embeddings ({max_pos})")
    result = perplexity(model, load_text_ids(path, data), max_length, stride, protocol, bos_id(model), batch_size,
                        progress=progress)
    result.model, result.data = name, data
    return result


def result_json(result: Perplexity) -> str:
    return json.dumps(asdict(result))

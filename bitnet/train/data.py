"""Corpus -> tokenizer -> cached token ids -> fixed-length windows in a resumable order.

A corpus is a text file or a folder of text files (*.txt, *.raw, *.md, read in sorted order,
joined with the EOS token between files). The held-out split is an explicit file, or the last
`val_fraction` of the corpus text (cut at a line boundary); the tokenizer, when trained here, sees
only the training text. Token ids are cached as safetensors under the cache folder, keyed by the
SHA-256 of the text and of the tokenizer.

Order: the token stream is cut into windows of `seq_len` tokens; epoch e shifts the cut by a
seeded offset in [0, seq_len) and visits the windows in a seeded permutation. Sample i of the run
is therefore a pure function of (seed, i): the data position of a resumed run is one integer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from ..atomic import atomic_save_safetensors

TEXT_SUFFIXES = (".txt", ".raw", ".md", ".text")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: pad, bos, eos of the presets


_UNDECODABLE = re.compile("[\udc80-\udcff]")


class DataError(ValueError):
    """A corpus that cannot feed the requested training run."""


def read_corpus(path: str) -> list[str]:
    """The documents of a corpus: one text file, or every text file of a folder (sorted)."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"corpus folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    else:
        raise DataError(f"corpus {path} does not exist")
    docs, bad, total, worst = [], 0, 0, []
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        # Undecodable bytes become lone surrogates (one per byte), counted, then U+FFFD.
        text, n = _UNDECODABLE.subn("\ufffd", raw.decode("utf-8", errors="surrogateescape"))
        bad, total = bad + n, total + len(raw)
        if n:
            worst.append((n / max(1, len(raw)), f))
        docs.append(text)
    if bad:
        share, f = max(worst)
        where = f"; worst: {f} ({share:.1%})" if len(files) > 1 else ""
        warnings.warn(f"corpus {path}: {bad:,} of {total:,} bytes ({bad / total:.2%}) are not UTF-8 text and were "
                      f"replaced by U+FFFD{where}; is it a text corpus?", stacklevel=2)
    if not any(d.strip() for d in docs):
        raise DataError(f"corpus {path} is empty")
    return docs


def split_tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Cut the last `fraction` of the text (by characters, at a line boundary) as held-out."""
    if not 0 < fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {fraction}")
    total = sum(len(d) for d in docs)
    cut = int(total * (1 - fraction))
    train, val, seen = [], [], 0
    for d in docs:
        if seen + len(d) <= cut:
            train.append(d)
        elif seen >= cut:
            val.append(d)
        else:
            at = d.find("\n", cut - seen)
            at = len(d) if at < 0 else at + 1
            train.append(d[:at])
            val.append(d[at:])
        seen += len(d)
    train, val = [d for d in train if d], [d for d in val if d]
    if not val or not train:
        raise DataError("corpus too short to hold out a validation split")
    return train, val


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE trained on `docs`, with <pad>, <s>, </s> as ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_chunks(docs), trainer)
    return tok


def _chunks(docs: list[str], size: int = 1 << 16):
    """Text in pieces of about `size` characters cut at line ends (what the tokenizer sees at once)."""
    for d in docs:
        start = 0
        while start < len(d):
            end = d.find("\n", start + size)
            end = len(d) if end < 0 else end + 1
            yield d[start:end]
            start = end


def load_tokenizer(path: str):
    """A tokenizers.Tokenizer from a tokenizer.json file or a folder holding one."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise DataError(f"no tokenizer.json at {path}")
    try:
        return Tokenizer.from_file(file)
    except BaseException as e:  # tokenizers raises a bare Exception for a malformed file, a Rust panic for some
        if not (isinstance(e, Exception) or type(e).__name__ == "PanicException"):  # (pyo3's: a BaseException)
            raise
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise DataError(f"{file}: not a valid tokenizer.json ({reason})") from None


def tokenizer_config_json(tok) -> bytes:
    """A tokenizer_config.json so that transformers' AutoTokenizer reads the folder's tokenizer.json."""
    special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if special["<s>"] is not None:
        cfg.update(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return (json.dumps(cfg, indent=2) + "\n").encode()


def encode(docs: list[str], tok, eos_id: int | None, cache_dir: str | None) -> torch.Tensor:
    """Token ids of the documents (EOS between documents) as int32, cached by content hash."""
    h = hashlib.sha256(tok.to_str().encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    key = h.hexdigest()[:24]
    path = os.path.join(cache_dir, f"tokens-{key}.safetensors") if cache_dir else None
    if path and os.path.isfile(path):
        return load_file(path)["ids"]
    ids: list[int] = []
    for i, d in enumerate(docs):
        for enc in tok.encode_batch(list(_chunks([d]))):
            ids.extend(enc.ids)
        if eos_id is not None and i < len(docs) - 1:
            ids.append(eos_id)
    out = torch.tensor(ids, dtype=torch.int32)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_save_safetensors({"ids": out}, path)
    return out


@dataclass
class WindowSampler:
    """Sample i of the run -> a window of `seq_len` tokens; deterministic in (seed, i)."""

    tokens: torch.Tensor  # (n,) int32
    seq_len: int
    seed: int

    def __post_init__(self):
        self.windows_per_epoch = (len(self.tokens) - self.seq_len) // self.seq_len  # leaves room for any offset
        if self.windows_per_epoch < 1:
            raise DataError(f"training split has {len(self.tokens)} tokens, fewer than two windows of seq_len "
                            f"{self.seq_len}; use a larger corpus or a shorter --seq-len")
        self._epoch = None

    def _order(self, epoch: int) -> tuple[int, torch.Tensor]:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offset = int(torch.randint(0, self.seq_len, (1,), generator=g))
            self._epoch, self._cached = epoch, (offset, torch.randperm(self.windows_per_epoch, generator=g))
        return self._cached

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Samples start .. start+size-1 as a (size, seq_len) int64 tensor."""
        rows = []
        for i in range(start, start + size):
            epoch, j = divmod(i, self.windows_per_epoch)
            offset, perm = self._order(epoch)
            s = offset + int(perm[j]) * self.seq_len
            rows.append(self.tokens[s:s + self.seq_len])
        return torch.stack(rows).long()


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of the held-out stream, in order: (n, seq_len) int64."""
    n = len(tokens) // seq_len
    if n < 1:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than one window of seq_len {seq_len}")
    if max_windows:
        n = min(n, max_windows)
    return tokens[: n * seq_len].view(n, seq_len).long()

"""Text around the engine's token ids: the tokenizer and its chat template, streamed detokenization
and stop strings. No HTTP here either; the API layer (bitnet.serve.api) calls these.

    tok = ServeTokenizer.from_folder(folder, model.tokenizer_files)
    ids = tok.encode("Once upon a time")                       # as `bitnet generate` encodes a prompt
    ids = tok.chat([{"role": "user", "content": "Hi"}])        # NoChatTemplate if the folder has none
    detok, stops = tok.detokenizer(ids), StopStrings(["\\n\\n"])
    text, stopped = stops.feed(detok.push(token))             # per generated token

The chat template is the folder's, as transformers renders it: Jinja2 in a sandbox, `messages`,
`add_generation_prompt=True`, the special tokens' strings, `raise_exception`; the rendered text is
encoded without adding special tokens (the template writes them). It comes from --chat-template,
else chat_template.jinja in the folder, else tokenizer_config.json's "chat_template".
"""

from __future__ import annotations

import json
import os
from datetime import datetime

from ..generation import TextStream, load_tokenizer
from ..hub import chat_template


class NoChatTemplate(ValueError):
    """The model's folder has no chat template."""


class ServeTokenizer:
    def __init__(self, tokenizer, chat_template: str | None = None, special_tokens: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}
        self._template = None
        self._token_bytes = _token_bytes_fn(tokenizer)

    @classmethod
    def from_folder(cls, folder: str, files: dict[str, bytes] | None = None,
                    chat_template_file: str | None = None) -> "ServeTokenizer":
        """tokenizer.json (FileNotFoundError if missing) and the chat template of a checkpoint folder;
        `files`: the model's tokenizer_files, read first."""
        files = dict(files or {})
        tokenizer = load_tokenizer(folder, files)
        for name in ("tokenizer_config.json", "chat_template.jinja"):  # the folder's, where the model carries none
            path = os.path.join(folder, name)
            if name not in files and os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
        if chat_template_file:
            if not os.path.isfile(chat_template_file):
                raise FileNotFoundError(f"--chat-template {chat_template_file}: no such file")
            with open(chat_template_file, "rb") as f:
                files["chat_template.jinja"] = f.read()
        config = json.loads(files["tokenizer_config.json"]) if files.get("tokenizer_config.json") else {}
        template = chat_template(files)
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        special = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name)
            if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        return cls(tokenizer, template if isinstance(template, str) else None, special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, through the chat template."""
        if self.chat_template is None:
            raise NoChatTemplate("this model has no chat template (no chat_template in tokenizer_config.json, no "
                                 "chat_template.jinja in its folder, no --chat-template): use /v1/completions with a "
                                 "prompt, or start the server with --chat-template FILE")
        from jinja2.exceptions import TemplateError

        try:
            return self._compiled().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **self.special_tokens)
        except TemplateError as e:  # the template's raise_exception, or a template that does not compile
            raise ValueError(f"the chat template refused these messages: {e}") from None

    def _compiled(self):
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template

    def chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def detokenizer(self, prompt_ids: list[int]) -> "Detokenizer":
        return Detokenizer(self.tokenizer, prompt_ids)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a byte-level token may be part of a character; a special
        token: its own string)."""
        return self._token_bytes(token)

    def token_text(self, token: int) -> str:
        """The token as a string (logprobs' `token`, and the keys of the completions API's
        top_logprobs): its bytes as UTF-8 where they are whole characters, else "bytes:\\xe2\\x80"
        as OpenAI writes them (so that two byte tokens are two keys, not two U+FFFD)."""
        b = self._token_bytes(token)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def _token_bytes_fn(tokenizer):
    """token id -> bytes, after the tokenizer's decoder: byte-level (GPT-2, Llama 3: each character
    of the token's string stands for a byte), SentencePiece-style (Metaspace, or Replace '▁' with
    ByteFallback: '<0xE2>' is a byte), anything else decoded alone. Added tokens are their content."""
    spec = json.loads(tokenizer.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in spec.get("decoders", [spec])} if isinstance(spec, dict) else set()
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    if "ByteLevel" in kinds:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {c: b for b, c in bytes_to_unicode().items()}

        def piece(s: str) -> bytes:
            return bytes(byte_of[c] for c in s) if all(c in byte_of for c in s) else s.encode()
    elif kinds & {"Metaspace", "ByteFallback", "Replace"}:
        def piece(s: str) -> bytes:
            if "ByteFallback" in kinds and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                try:
                    return bytes([int(s[3:5], 16)])
                except ValueError:
                    pass
            return s.replace("▁", " ").encode()
    else:
        piece = None

    def token_bytes(token: int) -> bytes:
        if token in added:
            return added[token].encode()
        if piece is None:
            return tokenizer.decode([token], skip_special_tokens=False).encode()
        s = tokenizer.id_to_token(token)
        return b"" if s is None else piece(s)

    return token_bytes


class Detokenizer:
    """Generated tokens -> text increments, whole characters only, a few tokens decoded a token
    (bitnet.generation.TextStream: a character split over several byte-level tokens comes out once
    complete; the prompt's last tokens are decoded along as context, so that a decoder which strips
    the leading space of the first token, SentencePiece's Metaspace, keeps the space of the first
    generated one)."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self._chunks: list[str] = []
        self._stream = TextStream(tokenizer, prompt_ids, out=self)

    def write(self, text: str) -> None:  # TextStream's `out`
        self._chunks.append(text)

    def flush(self) -> None:
        pass

    def _take(self) -> str:
        text, self._chunks = "".join(self._chunks), []
        return text

    def push(self, token: int) -> str:
        self._stream.put(token)
        return self._take()

    def end(self) -> str:
        """What is left, an unfinished character included."""
        self._stream.end()
        return self._take()


class StopStrings:
    """Cuts streamed text at the first stop string (which is not returned), holding back any tail
    that could be the beginning of one until the next piece decides it."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text that is safe to send now, whether a stop string ended the text)."""
        text = self.pending + piece
        if not self.stops:
            self.pending = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        keep = 0  # the longest tail of text that begins some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def end(self) -> str:
        text, self.pending = self.pending, ""
        return text

"""The host's time to turn each new token into text, as `bitnet generate` and `bitnet serve` stream it.

Every token of a streamed generation is decoded to text on the host before the next is shown; on a
GPU that time competes with a decode step of ~1 ms (2B-4T). Two ways, on the same tokens:
- "whole text": decode the prompt and every generated token at each token and print what is new
  (what bitnet.generation.TextStream did until 2026-12-06): the cost grows with the text;
- "TextStream": the package's streamer now, tokenizers' DecodeStream over a window of a few tokens.
Both must print the same text (checked here, and in tests/test_generation.py).

The tokenizer: --tokenizer FILE (a tokenizer.json, e.g. a real model's), else a byte-level BPE of
--vocab tokens trained here on the docstrings of Python's standard library (no download). The
text: those docstrings (or --data FILE), a --prompt-tokens prompt, then --tokens generated tokens
fed one at a time. Reported: microseconds a token over windows of the generation (its first 100
tokens, then around each of --at), and the total.

    python benchmarks/bench_detokenize.py
    python benchmarks/bench_detokenize.py --tokenizer path/to/tokenizer.json --prompt-tokens 4000

Writes benchmarks/results/detokenize_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time

from bitnet.bench import RESULTS_DIR, environment, save_results
from bitnet.cli import add_dataclass_arguments, arg
from bitnet.generation import TextStream
from bitnet.report import table


@dataclasses.dataclass
class Args:
    tokenizer: str | None = arg(None, help="a tokenizer.json (default: a byte-level BPE trained here)")
    vocab: int = arg(32000, help="vocabulary of the BPE trained here")
    data: str | None = arg(None, help="text file (default: the docstrings of Python's standard library)")
    prompt_tokens: int = arg(1000, help="prompt length in tokens")
    tokens: int = arg(2000, help="generated tokens streamed")
    at: list[int] = arg([500, 1000, 2000], help="report the cost a token around these positions of the generation")
    name: str = arg("detokenize_cpu", help="results file name")
    out_dir: str = arg(RESULTS_DIR, help="where the JSON and markdown go")


class WholeText:
    """The baseline: decode everything at each token, print what is new (whole characters only)."""

    def __init__(self, tokenizer, prompt_ids, out):
        self.tokenizer, self.ids, self.out = tokenizer, list(prompt_ids), out
        self.printed = len(tokenizer.decode(self.ids, skip_special_tokens=True))

    def put(self, token: int) -> None:
        self.ids.append(token)
        self._print(final=False)

    def end(self) -> None:
        self._print(final=True)

    def _print(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if (final or not text.endswith("\ufffd")) and len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.printed = len(text)


def load(args: Args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if args.data:
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    else:
        from bitnet.corpus import stdlib_docstrings

        text = stdlib_docstrings(3_000_000)
    if args.tokenizer:
        tok = Tokenizer.from_file(args.tokenizer)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator((text[i:i + 10_000] for i in range(0, len(text), 10_000)),
                                trainers.BpeTrainer(vocab_size=args.vocab, show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = tok.encode(text[:40 * (args.prompt_tokens + args.tokens)]).ids
    if len(ids) < args.prompt_tokens + args.tokens:
        raise SystemExit(f"the text holds {len(ids)} tokens, fewer than --prompt-tokens + --tokens")
    return tok, ids[:args.prompt_tokens], ids[args.prompt_tokens:args.prompt_tokens + args.tokens]


def stream(cls, tok, prompt, generated) -> tuple[str, list[float]]:
    out = io.StringIO()
    s = cls(tok, prompt, out)
    times = []
    for t in generated:
        t0 = time.perf_counter()
        s.put(t)
        times.append(time.perf_counter() - t0)
    s.end()
    return out.getvalue(), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, Args)
    ns = parser.parse_args(argv)
    args = Args(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Args)})
    tok, prompt, generated = load(args)
    texts, rows = {}, []
    for name, cls in (("whole text", WholeText), ("TextStream", lambda t, p, o: TextStream(t, p, out=o))):
        text, times = stream(cls, tok, prompt, generated)
        texts[name] = text
        row = {"way": name, "first_100_us": 1e6 * sum(times[:100]) / len(times[:100]), "total_ms": 1e3 * sum(times)}
        for a in args.at:
            window = times[max(0, a - 50):a + 50]
            row[f"at_{a}_us"] = 1e6 * sum(window) / len(window) if window else None
        rows.append(row)
    same = texts["whole text"] == texts["TextStream"]
    columns = [("way", "way", ""), ("first_100_us", "us a token, first 100", ".1f")]
    columns += [(f"at_{a}_us", f"us a token, around {a}", ".1f") for a in args.at]
    columns += [("total_ms", f"total ms ({args.tokens} tokens)", ".1f")]
    env = environment()
    md = "\n".join([
        f"# Streaming text a token at a time: {args.tokens} tokens after a {args.prompt_tokens}-token prompt",
        "",
        f"{env['cpu']}, Python {env['python']}, tokenizers {__import__('tokenizers').__version__}; tokenizer "
        f"{args.tokenizer or f'byte-level BPE of {args.vocab} trained on the stdlib docstrings'}; one run, the "
        f"two ways back to back. Printed text identical: {same}. Protocol: benchmarks/bench_detokenize.py.",
        "",
        table(rows, columns, markdown=True),
        "",
    ])
    print(md)
    save_results(args.name, {"args": dataclasses.asdict(args), "rows": rows, "same_text": same}, md, args.out_dir,
                 env=env)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

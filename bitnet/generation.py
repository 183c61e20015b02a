"""Text generation on a static KV cache: prefill once, then one-token decode steps.

    ids = model.generate(input_ids, max_new_tokens=32)                       # greedy
    ids = model.generate(input_ids, 32, attention_mask=mask, temperature=0.8, top_p=0.95,
                         eos_token_id=2, generator=torch.Generator().manual_seed(0))

The shape of it is gpt-fast's: `setup_cache` preallocates every layer's K/V once per call, the
prompt fills positions 0..T-1 in one forward (`prefill`), and `decode_step` feeds one token per
sequence at cache position `input_pos`. Every tensor of a decode step has the same shape at every
step and positions are tensors, not Python ints, so `compile=True` traces the step once and, on
CUDA, replays it as a CUDA graph (`mode="reduce-overhead"`).

Batches: prompts of different lengths are LEFT-padded (attention_mask 0 on the left, 1 on real
tokens; `left_pad` builds both), so that every sequence's next token lands in the same cache slot.
RoPE positions count real tokens only (attention_mask.cumsum - 1), as transformers does, so a
padded prompt generates what it would alone.

EOS: a sequence that has produced an EOS token emits `pad_token_id` from then on; generation stops
once every sequence has. Finding that out reads a flag from the device, a host sync, so it is done
every `eos_check_every` steps (default 8) rather than at every step: at most that many steps
minus one run after the last EOS (on a GPU one more: the next step is queued before the flag is
read, `runs_ahead`), and their columns (all padding) are cut off at the end, so the output does not
depend on `eos_check_every`. Without `eos_token_id`, exactly `max_new_tokens`
tokens are generated and no step syncs.

Context: the prompt (padded length T) plus max_new_tokens must fit in max_position_embeddings,
else ValueError saying by how much (no silent clipping; `bitnet generate` clips max_new_tokens
itself and says so).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .args import LM_HEADS, arg, command, device as named_device, lm_head_arg
from .hub import resolve
from .kernels import cpu as native
from .model import cache_dtype
from .ops import capture_cuda_graph, on_device, record_cuda_graph

CACHE_MULTIPLE = 64  # cache length rounded up to this: fewer distinct shapes for torch.compile
log = logging.getLogger("bitnet.generation")


# ----------------------------------------------------------------------------- sampling
def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, vocab) -> their argmax (B,), the first of equal maxima as argmax's: max(dim).indices,
    which torch's CPU backend runs 5.7x faster than argmax on bf16 logits (71 against 404 us at a
    128256-token vocabulary, 2 threads, AMD EPYC; 1.4% of a 2B-4T decode step)."""
    return logits.max(dim=-1).indices


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,). temperature 0: argmax (top_k, top_p unused)."""
    if temperature == 0:
        return greedy_tokens(logits)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the most likely tokens until their mass reaches top_p (always the first).
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, vocab)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p exactly, like torch.multinomial, but without
    # multinomial's device-to-host sync (gpt-fast's trick).
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


# ----------------------------------------------------------------------------- the two forwards
def prefill(model, input_ids: torch.Tensor, key_mask: torch.Tensor, position_ids: torch.Tensor,
            causal_prefix: bool = False) -> torch.Tensor:
    """Run the prompt (B, T) through the model into cache slots 0..T-1; logits (B, vocab) of its
    last position. key_mask (B, S) marks the cache slots that hold real tokens. causal_prefix: the
    caller knows the prompt has no padding (BitNetForCausalLM.forward: no host sync, recordable)."""
    input_pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    out = model(input_ids, attention_mask=key_mask, position_ids=position_ids, input_pos=input_pos, logits_to_keep=1,
                causal_prefix=causal_prefix)
    return out.logits[:, -1]


def decode_step(model, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
    """One token per sequence: tokens (B, 1) at cache slot input_pos (1,), RoPE position_ids
    (B, 1), key_mask (B, S) the cache slots that hold real tokens (None: all up to input_pos, no
    padding) -> logits (B, vocab). Same shapes at every step and no host sync: the function
    torch.compile traces (and CUDA graphs replay)."""
    out = model(tokens, attention_mask=key_mask, position_ids=position_ids, input_pos=input_pos)
    return out.logits[:, -1]


class CapturedForward:
    """forward(model, *inputs) recorded once as a CUDA graph and replayed: every kernel of it
    issued by one call, without torch.compile. Each call copies its tensor arguments into the
    graph's input tensors and returns the graph's output tensor (overwritten by the next call).
    forward must not sync with the host (prefill with causal_prefix: what bench_generate times).

    The graph reads and writes the memory of the model's KV cache as it was when recorded, so a
    new cache (setup_cache, clear_cache) means a new recording. The recording's eager run writes
    the cache slots of its inputs, as the first replay then does."""

    def __init__(self, forward: Callable, model, *inputs: torch.Tensor):
        self.inputs = [t.clone() for t in inputs]
        self.graph, self.output = capture_cuda_graph(lambda: forward(model, *self.inputs))

    def __call__(self, model, *inputs: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.output


@dataclass(eq=False)
class Decoding:
    """The device state of a generate call between steps, updated in place (so that a recorded
    step reads and writes the same tensors at every replay):

    tokens (B, 1) the last token of each sequence, to be fed at cache slot `input_pos` (1,), RoPE
    position `position` (B, 1); `out` (B, S) every token by its cache slot (the prompt, then the
    generated ones); `finished` (B,) has ended (emits `pad` from then on); `ended` (B,) the slot of
    each sequence's EOS; `key_mask` (B, S) the slots that hold real tokens, None without padding."""

    tokens: torch.Tensor
    input_pos: torch.Tensor
    position: torch.Tensor
    out: torch.Tensor
    finished: torch.Tensor
    ended: torch.Tensor
    key_mask: torch.Tensor | None
    pad: int
    eos: tuple[int, ...]  # EOS ids (none: no stopping)
    eos_ids: torch.Tensor  # the same, (E,) long on the device

    def take(self, tokens: torch.Tensor) -> None:
        """The next token of each sequence (B,), at slot input_pos: kept, stored, checked for EOS."""
        tokens = torch.where(self.finished, self.pad, tokens)
        if self.eos:
            new = (tokens[:, None] == self.eos_ids).any(dim=-1) & ~self.finished
            self.ended.copy_(torch.where(new, self.input_pos, self.ended))
            self.finished |= new
        self.out.index_copy_(1, self.input_pos, tokens[:, None])
        self.tokens.copy_(tokens[:, None])

    def tensors(self, names: Sequence[str] = ("tokens", "input_pos", "position", "finished", "ended", "out",
                                              "key_mask")) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def load(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            getattr(self, name).copy_(value)


def advance(model, state: Decoding, greedy: bool, forward: Callable = decode_step) -> torch.Tensor:
    """One decode step in place: feed state.tokens, move to the next slot and, when greedy, take
    the argmax as the next tokens. Returns the step's logits (B, vocab) (sampled decoding takes
    its tokens from them). No host sync: what CapturedStep records."""
    logits = forward(model, state.tokens, state.input_pos, state.position, state.key_mask)
    state.input_pos += 1
    state.position += 1
    if greedy:
        state.take(greedy_tokens(logits))
    return logits


class CapturedStep:
    """advance(model, state, greedy) recorded once as a CUDA graph over the tensors of `state`, and
    replayed: one call per token issues the decode step's kernels, the move to the next slot and,
    when greedy, the argmax, the EOS bookkeeping and the token's store, with nothing done by the
    host between steps. The recording's eager run is undone (the state put back; the cache slot
    and the `out` column it wrote are written again, the same, by the first replay), also when it
    fails: the caller then decodes eagerly from the state as it was.

    The graph holds the model's KV cache as it was when recorded, and `state`'s tensors: a new
    cache (setup_cache, clear_cache) means a new recording; a new generate call on the same cache
    refills `state` (captured_step) and replays."""

    def __init__(self, model, state: Decoding, greedy: bool):
        # what a step changes but the column of `out` and the cache slot it writes (the first replay writes them again)
        saved = {name: t.clone() for name, t in state.tensors(("tokens", "input_pos", "position", "finished", "ended")).items()}
        self.state = state
        self.graph, self.logits = capture_cuda_graph(lambda: advance(model, state, greedy), undo=lambda: state.load(saved))

    def __call__(self) -> torch.Tensor:
        """Replay: the state moves one step; the step's logits (overwritten by the next replay)."""
        self.graph.replay()
        return self.logits


def runs_ahead(device: torch.device) -> bool:
    """Whether generate queues the next decode step before the host reads the last one's token
    (on_token) or all-ended flag: on a GPU the step then runs while the host waits for and handles
    them (`bitnet generate` reads every token), at the cost of one step decoded in vain after the
    last EOS (its column is dropped). On the CPU the step would only delay the host: not there."""
    return device.type == "cuda"


class HostCopy:
    """Tensors copied to the host as they are now, without waiting for what is queued after them.

    `int(t)`, `bool(t)`, `t.tolist()` of a CUDA tensor copy it on the current stream and wait for
    the stream to drain: for a step queued after `t` was computed too, so a host that queues the
    next step and then reads the last one's token waits for the next step as well, and the GPU sits
    idle while the host handles the token. Here each copy is queued (into pinned memory) where the
    stream stands now, an event marks its end, and `get()` waits for that event alone. On the CPU
    the copies are made at once. None stays None.

        read = HostCopy(tokens, done)     # before the next step is queued
        queue_the_next_step()
        tokens, done = read.get()         # this step's values, while the GPU runs the next
    """

    def __init__(self, *tensors: torch.Tensor | None):
        self.event = None
        if any(t is not None and t.is_cuda for t in tensors):
            self.host = [None if t is None else
                         torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = [None if t is None else t.detach().clone() for t in tensors]

    def get(self) -> list[torch.Tensor | None]:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def captured_step(model, state: Decoding, greedy: bool) -> CapturedStep:
    """The model's recorded decode step for its current cache and this kind of state, recorded now
    if there is none (bitnet.model's setup_cache / clear_cache drop the old one). Its state's
    tensors are `state`'s values from now on (the recording's own tensors are kept: copied into)."""
    cache = model.model.layers[0].self_attn.kv_cache
    key = (id(cache), tuple(state.out.shape), state.key_mask is not None, greedy, state.pad, state.eos)
    held = getattr(model, "_captured_step", None)
    if held is not None and held[0] == key:
        held[1].state.load(state.tensors())
        return held[1]
    model._captured_step = None  # the old recording (another cache or state) goes first
    step = record_cuda_graph(lambda: CapturedStep(model, state, greedy), "the decode step", state.tokens.device)
    model._captured_step = (key, step)
    return step


@functools.cache
def compiled_decode_step(device_type: str) -> Callable:
    """decode_step under torch.compile: CUDA graphs on CUDA ("reduce-overhead"), inductor elsewhere.

    One compiled function per device type, kept for the process: later generate calls with the
    same shapes reuse its graphs. dynamic=False: a new cache length or batch size recompiles
    instead of becoming a symbolic-shape graph, which CUDA graphs would re-record per shape anyway.
    """
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode_step, mode=mode, dynamic=False)


# ----------------------------------------------------------------------------- inputs
def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of any lengths -> (input_ids (B, T), attention_mask (B, T)), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def _token_ids(value, name: str) -> list[int]:
    ids = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    return ids


def check_inputs(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos_check_every):
    """Validate and normalize: returns (input_ids (B, T) long, attention_mask (B, T) bool)."""
    config = model.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError("input_ids must be an integer tensor of token ids, shape (batch, length)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    context = config.max_position_embeddings
    if T > context:
        raise ValueError(f"prompt of {T} tokens is longer than the context of {context} tokens "
                         "(max_position_embeddings)")
    if T + max_new_tokens > context:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of {context} "
                         f"tokens (max_position_embeddings); ask for at most {context - T} new tokens")
    if temperature is None or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not isinstance(eos_check_every, int) or eos_check_every < 1:
        raise ValueError(f"eos_check_every must be a positive integer, got {eos_check_every!r}")
    lo, hi = (int(v) for v in torch.aminmax(input_ids))  # one host sync, once per call
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}) (vocab_size), got ids from {lo} to {hi}")

    if attention_mask is None:
        return input_ids.long(), torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.to(device=input_ids.device).bool()
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt: row(s) {empty} of attention_mask have no real token")
    if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left-padded (0s, then 1s, per row) so that every sequence "
                         "continues in the same cache slot; bitnet.generation.left_pad builds such a batch")
    return input_ids.long(), mask


def _cache_length(model) -> tuple[int, int, torch.dtype] | None:
    """(batch, length, dtype) of the cache the model holds, or None."""
    cache = model.model.layers[0].self_attn.kv_cache
    return None if cache is None else (cache.k.shape[0], cache.k.shape[2], cache.k.dtype)


# ----------------------------------------------------------------------------- generate
@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    cuda_graph: bool | None = None,
    eos_check_every: int = 8,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Continue each prompt by up to max_new_tokens tokens; returns (B, T + generated) ids.

    input_ids (B, T) (or (T,)), left-padded with attention_mask (B, T) (1 = real token) when the
    prompts differ in length. temperature 0 is greedy; otherwise tokens are drawn from
    softmax(logits / temperature), restricted to the top_k most likely and to the smallest set of
    probability mass >= top_p, with `generator` for reproducibility. eos_token_id (an id or a
    list; None: no stopping) ends a sequence, which then emits pad_token_id (default
    config.pad_token_id, else the first EOS id); generation stops when every sequence has ended.
    compile: run the decode step under torch.compile (CUDA graphs on CUDA). cuda_graph (CUDA
    only; default: on CUDA unless compile): record the eager decode step as a CUDA graph once
    (CapturedStep: no compiler, the recording costs about one step; greedy, the argmax and the
    EOS bookkeeping are in it too, so the host only replays it) and replay it for every token;
    False decodes eagerly (the host issuing every kernel of every step). A step that cannot be
    recorded is logged and decoded eagerly. on_token(ids (B,), on the host) is called
    with each step's tokens; on a GPU the next step is queued before (`runs_ahead`, `HostCopy`).

    The KV cache: if the caller has set one up (model.setup_cache) that fits this batch and
    length, it is used and kept (repeated calls reuse its memory, and CUDA graphs their
    recording); otherwise one is allocated for this call, in bitnet.model.cache_dtype (the model's
    dtype; on the CPU float32, or bf16 for a packed bf16 model), and freed at the end.
    """
    config = model.config
    input_ids, mask = check_inputs(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                                   eos_check_every)
    # no padding: the decode steps see slots 0 .. input_pos with no key mask (bitnet.model.LIVE_SLOTS);
    # known without a sync when no mask was given, else read here, where check_inputs read it already
    padded = attention_mask is not None and not bool(mask.all())
    B, T = input_ids.shape
    device = model.model.embed_tokens.weight.device
    input_ids, mask = input_ids.to(device), mask.to(device)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not compile
    if cuda_graph and (device.type != "cuda" or compile):
        raise ValueError(f"cuda_graph records CUDA graphs of the eager step: it needs a CUDA model and not compile "
                         f"(got {device.type}, compile={compile})")
    eos = _token_ids(eos_token_id, "eos_token_id") if eos_token_id is not None else []
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)

    held = _cache_length(model)
    kv_dtype = cache_dtype(model, device)  # float32 on the CPU, bf16 for packed bf16 models (bitnet.model)
    owns_cache = not (held and held[0] == B and held[1] >= T + max_new_tokens and held[2] == kv_dtype)
    if owns_cache:
        length = -(-(T + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE
        model.setup_cache(B, min(length, config.max_position_embeddings), dtype=kv_dtype, device=device)
    current = on_device(device)  # (the model's GPU current: graphs record and replay there, Triton launches there)
    current.__enter__()
    try:
        S = _cache_length(model)[1]
        key_mask = torch.ones(B, S, dtype=torch.bool, device=device)  # slots after the prompt hold generated tokens
        key_mask[:, :T] = mask
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
        forward = compiled_decode_step(device.type) if compile else decode_step
        cuda_graphs = compile and device.type == "cuda"
        greedy = temperature == 0

        state = Decoding(
            tokens=torch.zeros(B, 1, dtype=torch.long, device=device),
            input_pos=torch.tensor([T], device=device),
            position=position_ids[:, -1:] + 1,
            out=torch.full((B, S), pad_token_id, dtype=torch.long, device=device),
            finished=torch.zeros(B, dtype=torch.bool, device=device),
            ended=torch.full((B,), S, dtype=torch.long, device=device),
            key_mask=key_mask if padded else None,  # (the prefill's slots are the prompt's: it takes the mask)
            pad=pad_token_id, eos=tuple(eos), eos_ids=torch.tensor(eos, dtype=torch.long, device=device))
        state.out[:, :T] = input_ids
        logits = prefill(model, input_ids, key_mask, position_ids)  # (B, vocab)
        state.take(sample(logits, temperature, top_k, top_p, generator))
        step = None
        if cuda_graph and max_new_tokens > 1:  # (a call of one token runs no decode step)
            try:
                step = captured_step(model, state, greedy)
                state = step.state
            except Exception:  # decode eagerly: the recording's warm-up left the state as it was
                log.warning("recording the decode step as a CUDA graph failed; decoding eagerly", exc_info=True)
                model._captured_step = None

        def run():
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
            logits = step() if step is not None else advance(model, state, greedy, forward)
            if not greedy:
                state.take(sample(logits, temperature, top_k, top_p, generator))

        ahead = runs_ahead(device)
        keep = getattr(model, "keep_decode_args", None)  # the CPU's native layers: their arguments read once
        with keep() if keep is not None else contextlib.nullcontext():
            for i in range(max_new_tokens):  # state.tokens: the i-th new token of each sequence
                check = eos and (i + 1) % eos_check_every == 0
                last = i + 1 == max_new_tokens
                read = HostCopy(state.tokens[:, 0] if on_token is not None else None,
                                state.finished.all() if check else None)
                if ahead and not last:
                    run()  # queued before the host reads this step's token and flag: the GPU runs it meanwhile
                token, done = read.get()  # waits for this step's copies, not for the step queued since
                if token is not None:
                    on_token(token)
                if last or (done is not None and bool(done)):
                    break
                if not ahead:
                    run()
        generated = max_new_tokens
        if eos and bool(state.finished.all()):
            generated = int(state.ended.max()) - T + 1  # drop the columns decoded after the last EOS
        return state.out[:, :T + generated].clone()
    finally:
        try:
            if owns_cache:
                model.clear_cache()
        finally:
            current.__exit__(None, None, None)


# ----------------------------------------------------------------------------- `bitnet generate`
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class GenerateArgs:
    model: str = arg(help="checkpoint folder with config.json, model.safetensors and tokenizer.json, or a hub id "
                     "(org/name)", positional=True)
    prompt: str = arg(help="text to continue")
    max_new_tokens: int = arg(64, help="tokens to generate at most (clipped to the context)")
    temperature: float = arg(0.0, help="0 for greedy decoding")
    top_k: int | None = arg(None, help="sample among the k most likely tokens")
    top_p: float | None = arg(None, help="sample among the most likely tokens holding this probability mass")
    seed: int | None = arg(None, help="random seed for sampling")
    device: str | None = arg(None, help="cuda or cpu (default: cuda when available)")
    dtype: str | None = arg(None, help="activation and float-weight dtype (default: bfloat16; decode streams every "
                            "weight byte once, the float ones too)",
                            choices=list(DTYPES))
    compile: bool = arg(False, help="compile the decode step (CUDA graphs on cuda)")
    cuda_graph: bool | None = arg(None, help="record the eager decode step as a CUDA graph once and replay it for every "
                                  "token (default: on cuda unless --compile; --no-cuda-graph: eager, the host issuing "
                                  "every kernel of every step)")
    lm_head: str = lm_head_arg()
    revision: str | None = arg(None, help="hub id: branch, tag or commit (default: main)")
    cache_dir: str | None = arg(None, help="hub id: huggingface_hub cache (default: $HF_HUB_CACHE)")
    local_files_only: bool = arg(False, help="hub id: the cache only, no network (as HF_HUB_OFFLINE=1)")


def load_tokenizer(folder: str, files: dict[str, bytes] | None = None):
    """The `tokenizers` Tokenizer of a checkpoint folder's tokenizer.json."""
    from tokenizers import Tokenizer

    data = (files or {}).get("tokenizer.json")
    if data is None:
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {folder}: generating text needs the model's tokenizer "
                                    "(copy the tokenizer.json of the model into the folder)")
        with open(path, "rb") as f:
            data = f.read()
    return Tokenizer.from_str(data.decode())


def eos_token_ids(model) -> list[int]:
    """EOS ids of config.json and, when the folder has one, generation_config.json."""
    ids = [] if model.config.eos_token_id is None else _token_ids(model.config.eos_token_id, "eos_token_id")
    raw = model.tokenizer_files.get("generation_config.json")
    if raw:
        extra = json.loads(raw).get("eos_token_id")
        ids += [] if extra is None else _token_ids(extra, "generation_config eos_token_id")
    return list(dict.fromkeys(ids))


class TextStream:
    """Prints a growing token sequence as text, a token at a time, each token costing a decode of a
    few tokens, not of the whole text (tokenizers' DecodeStream: it decodes a short window and
    prints what is new once the window does not end in an unfinished character, U+FFFD, so that a
    character split over several byte-level BPE tokens prints whole). The stream starts with the
    prompt's last CONTEXT tokens, not printed: a decoder that strips the leading space of the first
    token it decodes (SentencePiece's Metaspace) keeps the space of the first generated one. Should
    DecodeStream refuse a window, the rest is printed by decoding the whole text at each token."""

    CONTEXT = 4  # prompt tokens decoded along with the generated ones

    def __init__(self, tokenizer, prompt_ids: Sequence[int], out=None):
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.context = list(prompt_ids)[-self.CONTEXT:]
        self.ids: list[int] = []  # the generated tokens
        self.done = 0  # how many of them are printed
        self.written = 0  # characters printed
        self.stream = DecodeStream(skip_special_tokens=True)
        for t in self.context:
            self.stream.step(tokenizer, t)  # the context's own text is not printed

    def put(self, token: int) -> None:
        self.ids.append(token)
        if self.stream is not None:
            try:
                text = self.stream.step(self.tokenizer, token)
            except Exception:  # a window DecodeStream cannot follow: whole decodes from here on
                log.debug("DecodeStream failed; decoding the whole text at each token", exc_info=True)
                self.stream = None
            else:
                if text:
                    self._write(text)
                    self.done = len(self.ids)
                return
        self._print_whole(final=False)

    def end(self) -> None:
        """Print what is left, an unfinished character included."""
        if self.done < len(self.ids):
            self._print_whole(final=True)

    def _print_whole(self, final: bool) -> None:
        text = self.tokenizer.decode(self.context + self.ids, skip_special_tokens=True)
        text = text[len(self.tokenizer.decode(self.context, skip_special_tokens=True)):]
        if (final or not text.endswith("\ufffd")) and len(text) > self.written:
            self._write(text[self.written:])
            self.done = len(self.ids)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.written += len(text)


def speed_report(prompt_tokens: int, start: float, token_times: Sequence[float]) -> str:
    """`bitnet generate`'s last line: prefill and decode rates apart.

    start: perf_counter before generate; token_times: perf_counter as each new token arrived (the
    first comes from the prefill's logits, each later one from one decode step), so the prefill
    is start -> token_times[0] and the decode token_times[0] -> token_times[-1]."""
    if not token_times:
        return f"[prompt {prompt_tokens} tokens; no new tokens]"
    first = token_times[0] - start
    line = (f"[prompt {prompt_tokens} tokens in {first:.2f} s ({prompt_tokens / max(first, 1e-9):.0f} tok/s); "
            f"{len(token_times)} token{'s' if len(token_times) > 1 else ''} in {token_times[-1] - start:.2f} s")
    steps = len(token_times) - 1
    if steps == 0:
        return line + ", from the prefill]"
    decode = token_times[-1] - token_times[0]
    return line + (f", {steps / max(decode, 1e-9):.1f} tok/s decode ({steps} steps in {decode:.2f} s after the "
                   "prefill's token)]")


def build_cpu_kernels() -> None:
    """Build (or load) the native CPU kernels now, so that their one-time build (announced on stderr
    by bitnet.kernels.cpu) falls outside any timed part; nothing when they would not be used."""
    if os.environ.get("BITNET_KERNEL") == "torch" and os.environ.get("BITNET_CPU_FLOAT_OPS") == "torch":
        return
    native.load()


@command("generate", GenerateArgs)
def generate_cmd(args: GenerateArgs) -> None:
    """Continue a prompt with a checkpoint folder's model and tokenizer, streaming the text."""
    from .model import BitNetForCausalLM

    if not args.prompt:
        raise ValueError("empty prompt: pass some text with --prompt")
    folder = resolve(args.model, args.revision, args.cache_dir, args.local_files_only)
    tokenizer = load_tokenizer(folder)  # before the weights: a missing tokenizer fails fast
    device = named_device(args.device)
    dtype = DTYPES[args.dtype or "bfloat16"]
    if device.type == "cpu":
        build_cpu_kernels()  # the one-time build, if any, before the model and the clock
    model = BitNetForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
    if LM_HEADS[args.lm_head]:
        model.quantize_lm_head(LM_HEADS[args.lm_head])

    prompt_ids = tokenizer.encode(args.prompt).ids
    context = model.config.max_position_embeddings
    if len(prompt_ids) >= context:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens is longer than the context of {context} tokens "
                         f"(max_position_embeddings) with room for one more")
    max_new = min(args.max_new_tokens, context - len(prompt_ids))
    if max_new < args.max_new_tokens:
        print(f"[max_new_tokens clipped to {max_new}: the prompt has {len(prompt_ids)} of the {context} tokens of "
              "context]", file=sys.stderr)
    eos = eos_token_ids(model)
    input_ids = torch.tensor([prompt_ids], device=device)
    cuda_graph = args.cuda_graph  # None: generate's default (a CUDA graph on cuda unless --compile)
    held = device.type != "cpu" or args.compile  # where the first call compiles (Triton, torch.compile)
    if held:  # one cache for the warm-up and the timed call: the same buffers, so the compiled step is reused
        length = -(-(len(prompt_ids) + max_new) // CACHE_MULTIPLE) * CACHE_MULTIPLE
        model.setup_cache(1, min(length, context), dtype=cache_dtype(model, device), device=device)
        t0 = time.perf_counter()
        # prefill and one decode step (recorded as a CUDA graph, which later steps replay)
        generate(model, input_ids, min(2, max_new), compile=args.compile, cuda_graph=cuda_graph)
        print(f"[warm-up: kernels compiled for this prompt in {time.perf_counter() - t0:.2f} s, not counted below]",
              file=sys.stderr)
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    stream = TextStream(tokenizer, prompt_ids)
    ended = False
    token_times = []

    def on_token(tokens: torch.Tensor) -> None:
        nonlocal ended
        token = int(tokens[0])  # on the host already (HostCopy): the time below is when the host has it
        token_times.append(time.perf_counter())
        ended = ended or token in eos
        if not ended:
            stream.put(token)

    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    try:
        start = time.perf_counter()
        generate(model, input_ids, max_new, args.temperature, args.top_k, args.top_p, eos or None,
                 generator=generator, compile=args.compile, cuda_graph=cuda_graph, eos_check_every=1, on_token=on_token)
    finally:
        if held:
            model.clear_cache()
    stream.end()
    print()
    print(speed_report(len(prompt_ids), start, token_times), file=sys.stderr)

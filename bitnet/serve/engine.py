"""The serving engine: continuous batching of generation requests over one model, its loop in a
thread of its own (start) or in the caller's (run: what `bitnet serve` does, see Engine.run). It
knows nothing of HTTP: a request comes in as token ids and sampling parameters, its tokens go out
one by one through a callback, called from the loop's thread.

    engine = Engine(model, max_batch=8, max_seq_len=1024)       # the KV cache: 8 rows of 1024 tokens
    engine.start()
    rid = engine.submit(prompt_ids, SamplingParams(max_tokens=32), emit)   # emit(Output) per token
    engine.cancel(rid)                                           # client gone: the slot is free next step
    engine.stop()                                                # drain: finish what is running and queued

Each step (bitnet.serve.scheduler plans it) admits waiting requests into free slots and runs ONE
forward (bitnet.serve.runner) over the newcomers' prompt chunks (at most `prefill_chunk` tokens a
step) and one token of every running sequence, samples each row with its own parameters and emits
the tokens. A sequence ends at an EOS token (finish_reason "stop"), at max_tokens ("length"),
when cancelled, or when the model fails on it ("error"); its slot is free for the next step.

On a GPU a pure decode step runs ahead (run_ahead): the step after it is queued on the device,
fed the tokens chosen there, before they are read, so the GPU decodes while the host emits (see
_can_run_ahead).

Faults stay with their request: a step that raises is retried sequence by sequence, and only the
sequences that fail alone are failed (the others' cache columns are simply written again). The
loop survives anything a step raises.

With `logprobs` a generated token comes with its log-probability under the model (the raw
distribution: log_softmax of the logits, before temperature, top-k or top-p, as vLLM gives them by
default) and the most likely alternatives; with `prompt_logprobs` every prompt token after the
first gets the same from the prefill's logits (the head then runs on every prompt position, not
the last alone), all of them with the first token (or alone, with max_tokens 0: a prompt scored,
nothing generated). Rows that want logprobs are never run ahead.

Prefix caching (prefix_cache, on by default; bitnet.serve.scheduler): a prompt whose first
min_prefix tokens or more some cache row holds from an earlier prompt (the same conversation's
last turn, a shared system prompt or few-shot examples) starts its prefill after them, in whole
blocks of bitnet.model.PROMPT_BLOCK tokens; its first event says how many (Output.cached_tokens),
the server reports them as OpenAI does (usage.prompt_tokens_details).

Greedy rows are the argmax of logits that equal a lone `generate`'s bit for bit on packed models
(bitnet.serve.runner), so each stream gets its solo greedy output whatever else runs beside it,
on the CPU also after a cached prefix or in chunks (both cut at multiples of
bitnet.model.PROMPT_BLOCK, where the prompt attention's blocks make a chunk's numbers the whole
prompt's). On a GPU a prompt after a cached prefix is a chunked prefill whose logits equal a whole
one's within float rounding (prefix_cache=False, `bitnet serve --no-prefix-cache`: bit for bit).
With a `seed`, a sampled row draws from its own torch.Generator seeded with it, as `generate` with
`generator=torch.Generator().manual_seed(seed)` does: the same tokens as that lone call.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generation import HostCopy, greedy_tokens, sample
from ..model import PROMPT_BLOCK
from ..ops import on_device
from .runner import ModelRunner, Segment
from .scheduler import QueueFull, Scheduler
from .scheduler import Sequence as Seq

log = logging.getLogger("bitnet.serve")

__all__ = ["ContextOverflow", "Engine", "EngineClosed", "MAX_LOGPROBS", "Output", "QueueFull", "SamplingParams",
           "TokenLogprob"]

MAX_LOGPROBS = 20  # alternatives a token at most (OpenAI's chat: 20; vLLM's default max_logprobs: 20)


class ContextOverflow(ValueError):
    """prompt + max_tokens does not fit a cache row (max_seq_len)."""


class EngineClosed(RuntimeError):
    """The engine is draining or stopped: it takes no new request."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids
    logprobs: int | None = None  # each generated token's logprob and this many alternatives' (None: none)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first

    def check(self) -> None:
        least = 0 if self.prompt_logprobs is not None else 1  # nothing generated: a prompt scored
        if not isinstance(self.max_tokens, int) or self.max_tokens < least:
            raise ValueError(f"max_tokens must be an integer >= {least}"
                             f"{'' if least else ' (0: the prompt scored, nothing generated)'}, got {self.max_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """A token's natural-log probability under the model and the `top` most likely tokens' (id,
    logprob), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Output:
    """One event of a request: a token (with finish_reason on the last one), or an end without
    a token (finish_reason "error" with `error`, "cancelled", or "length" after a prompt scored
    with max_tokens 0). `time`: time.perf_counter(). `logprob`: the token's (SamplingParams.logprobs);
    `prompt_logprobs`: with the first event, one per prompt token, None for the first
    (SamplingParams.prompt_logprobs); `cached_tokens`: with the first event, the prompt tokens
    taken from the prefix cache (Engine's prefix_cache), not computed."""

    token: int | None
    finish_reason: str | None = None
    error: str | None = None
    time: float = field(default_factory=time.perf_counter)
    logprob: TokenLogprob | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    cached_tokens: int | None = None  # with the first event: prompt tokens read from the prefix cache


LOGPROB_ROWS = 64  # rows of logits turned into log-probabilities at a time (64 x a 128k vocabulary: 32 MB)


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int] | torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits (R, vocab) and the R tokens that follow them -> each token's log_softmax value (in
    float32) and the `top` largest, most likely first; one host copy a block of rows."""
    tokens = torch.as_tensor(tokens, device=logits.device).long()
    out = []
    for lo in range(0, logits.shape[0], LOGPROB_ROWS):
        lp = torch.log_softmax(logits[lo:lo + LOGPROB_ROWS].float(), dim=-1)
        own = lp.gather(1, tokens[lo:lo + LOGPROB_ROWS, None])[:, 0]
        if top:
            values, ids = lp.topk(min(top, lp.shape[1]), dim=-1)
            best = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            best = [()] * own.shape[0]
        out += [TokenLogprob(t, v, b) for t, v, b in zip(tokens[lo:lo + LOGPROB_ROWS].tolist(), own.tolist(), best)]
    return out


def choose(rows: list[Seq], logits: torch.Tensor) -> torch.Tensor:
    """Each row's next token from logits (B, vocab), on their device: the argmax, or a draw with the
    request's parameters and generator (bitnet.generation.sample: no host sync)."""
    tokens = greedy_tokens(logits)
    for i, seq in enumerate(rows):
        p = seq.payload.params
        if p.temperature > 0:
            tokens[i:i + 1] = sample(logits[i:i + 1], p.temperature, p.top_k, p.top_p, seq.payload.generator)
    return tokens


class _Flight:
    """A decode step queued on the device: rows (its sequences, in its order), tokens (chosen on the
    device, what the step after it is fed) and their copy to the host, not waited for until read()."""

    def __init__(self, rows: list[Seq], logits: torch.Tensor):
        self.rows = rows
        self.tokens = choose(rows, logits)
        self._copy = HostCopy(self.tokens)
        self.launched = time.perf_counter()

    def read(self) -> list[int]:
        return self._copy.get()[0].tolist()


@dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Output], None]
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    arrived: float
    last_token: int | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled chunk by chunk (params.prompt_logprobs)


class Engine:
    def __init__(self, model, *, max_batch: int = 4, max_seq_len: int | None = None, max_queue: int = 64,
                 prefill_chunk: int = 256, eos_token_ids: Sequence[int] = (), decode_graphs: bool | None = None,
                 run_ahead: bool | None = None, prompt_graphs: bool | None = None, prefix_cache: bool = True,
                 min_prefix: int = 32):
        context = model.config.max_position_embeddings
        self.max_seq_len = min(max_seq_len or context, context)
        self.max_batch, self.vocab_size = max_batch, model.config.vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        # decode_graphs: ModelRunner's (each bucket's pure decode step a CUDA graph; default on CUDA);
        # prompt_graphs: its steps with prompt tokens in pieces of CUDA graphs (default: with decode_graphs)
        self.runner = ModelRunner(model, max_batch, self.max_seq_len, decode_graphs=decode_graphs,
                                  prompt_graphs=prompt_graphs)
        if run_ahead and not self.runner.decode_graphs:
            raise ValueError("run_ahead queues the next padded decode step from the last one's tokens on the device: "
                             "it needs decode_graphs")
        # run_ahead: queue a decode step before the host reads the last one's tokens (see _land)
        self.run_ahead = self.runner.decode_graphs and self.runner.device.type == "cuda" if run_ahead is None \
            else run_ahead
        self._flight: _Flight | None = None  # a decode step queued on the device, its tokens not read yet
        self._landed = 0.0  # when the last flight's tokens were read (its step's time, for on_step)
        # prefix_cache: a prompt starts after the longest prefix of it some cache row holds (at least
        # min_prefix tokens; bitnet.serve.scheduler)
        self.scheduler = Scheduler(max_batch, max_queue, prefill_chunk, prefix_cache=prefix_cache, min_prefix=min_prefix,
                                   block=PROMPT_BLOCK)
        self._cond = threading.Condition()
        self._seqs: dict[int, Seq] = {}
        self._ids = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._running = False
        self._seconds_per_request = 1.0  # running mean of request durations, for Retry-After
        self.steps = 0
        self.last_batch = 0  # sequences decoded in the last step
        # called after each step with (seconds, prompt tokens prefilled, sequences decoded): metrics
        self.on_step: Callable[[float, int, int], None] | None = None

    # ----------------------------------------------------------------------------- the interface
    @property
    def num_running(self) -> int:
        return self.max_batch - self.scheduler.free_slots

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def running(self) -> bool:
        """The loop is running (in its thread or in the caller of run())."""
        return self._running

    def record_graphs(self) -> int:
        """Record the CUDA graphs of every step size now (ModelRunner.record: each decode bucket,
        each token bucket up to a step's most tokens, prefill_chunk + max_batch), not as the first
        requests meet them; the number of step sizes recorded. Call it before the loop runs."""
        with on_device(self.runner.device):
            return self.runner.record(self.scheduler.prefill_chunk + self.max_batch)

    def start(self) -> "Engine":
        """Run the loop in a thread of its own (tests, in-process servers). `bitnet serve` calls
        run() in its main thread instead: see run()."""
        if self._thread is None:
            self._running = True  # from now on, not from when the thread gets going
            self._thread = threading.Thread(target=self._loop, name="bitnet-engine", daemon=True)
            self._thread.start()
        return self

    def run(self, until: Callable[[], bool], poll: float = 0.2) -> None:
        """Run the loop in the calling thread until until() is true and nothing is left to do.

        `bitnet serve` runs the engine in its main thread and uvicorn in another: torch's OpenMP
        threads were made by the main thread (loading the model), and a loop in a second thread
        gets a second team of them. More threads than cores makes libgomp stop spinning between
        parallel regions, and every region then waits for its threads to wake: on 2 cores the
        700m decode step took 1.5-1.8x as long from a second thread (41 vs 28 ms at one sequence,
        140 vs 81 ms at 16)."""
        self._loop(until, poll)

    def submit(self, prompt: Sequence[int], params: SamplingParams, emit: Callable[[Output], None]) -> int:
        """Queue a request; returns its id. ValueError for bad input (ContextOverflow when prompt +
        max_tokens exceed max_seq_len), QueueFull when the queue is full, EngineClosed when draining.
        `emit` is called from the engine's thread, once per token and once at the end if that has no token."""
        prompt = list(prompt)
        params.check()
        if not prompt:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ContextOverflow(
                f"this model's maximum context length is {self.max_seq_len} tokens (--max-seq-len); the prompt has "
                f"{len(prompt)} tokens and max_tokens asks for {params.max_tokens} more: ask for at most "
                f"{max(self.max_seq_len - len(prompt), 0)} new tokens or shorten the prompt")
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(self.runner.device)
            generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down and takes no new requests")
            rid = next(self._ids)
            req = _Request(rid, prompt, params, emit, frozenset(self.eos_token_ids) | frozenset(params.stop_token_ids),
                           generator, time.perf_counter(),
                           prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
            seq = Seq(rid, len(prompt), params.max_tokens, payload=req,
                      tokens=list(prompt) if self.scheduler.prefix_cache else None,
                      reuse=params.prompt_logprobs is None)
            self.scheduler.add(seq)  # raises QueueFull
            self._seqs[rid] = seq
            self._cond.notify()
        return rid

    def cancel(self, rid: int) -> bool:
        """Drop a request (queued or running); its slot is free for the next step. False if it had ended."""
        with self._cond:
            seq = self._seqs.pop(rid, None)
            if seq is None:
                return False
            self.scheduler.cancel(seq)
        self._emit(seq.payload, Output(None, "cancelled"))
        return True

    def retry_after(self) -> int:
        """Seconds after which a refused request may find room: about one request's duration over
        the slots (a queue place frees when a running request ends)."""
        return max(1, math.ceil(self._seconds_per_request / self.max_batch))

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with drain, finish the running and queued ones first, else cancel
        them. Returns when the thread has ended (or after timeout seconds)."""
        dropped = []
        with self._cond:
            self._closing = True
            if not drain:
                for rid in list(self._seqs):
                    seq = self._seqs.pop(rid)
                    self.scheduler.cancel(seq)
                    dropped.append(seq)
            self._cond.notify()
        for seq in dropped:
            self._emit(seq.payload, Output(None, "cancelled"))
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.runner.close()

    # ----------------------------------------------------------------------------- the loop
    def _loop(self, until: Callable[[], bool] | None = None, poll: float = 0.2) -> None:
        self._running = True
        try:
            with on_device(self.runner.device):  # (the model's GPU current in this thread: its graphs replay there)
                while self._once(until, poll):
                    pass
        finally:
            self._running = False

    def _once(self, until, poll) -> bool:
        """Wait for work and run one step; False once closing (or until()) and drained. With a
        decode step in flight (run_ahead): queue the next one where nothing else is due,
        then read and emit the flight's tokens."""
        flight = self._flight
        with self._cond:
            if flight is not None:
                ahead = self._can_run_ahead(flight)
            else:
                while not self.scheduler.has_work() and not self._closing:
                    if until is not None and until():
                        return False
                    self._cond.wait(poll if until is not None else None)
                if not self.scheduler.has_work():
                    return False  # closing and drained
                step = self.scheduler.schedule()
        if flight is not None:
            self._flight = self._launch_next(flight) if ahead else None
            self._land(flight)
            return True
        t0 = time.perf_counter()
        try:
            self._step(step)
        except Exception as e:  # a bug of the engine itself: the step's requests fail, the loop lives
            log.exception("engine step failed")
            for seq in [s for s, _, _ in step.prefill] + step.decode:
                self._fail(seq, e)
        self.steps += 1
        if self._flight is not None:  # reported when its tokens are read
            self._flight.launched = t0
        else:
            self._report(time.perf_counter() - t0, sum(hi - lo for _, lo, hi in step.prefill), len(step.decode))
        return True

    def _step(self, step) -> None:
        """The step's prefix copies, then one forward for its prefill chunks and decode tokens
        (bitnet.serve.runner). Each sequence's `written` moves past the columns its segment wrote
        once they are written (or queued on the device, before anything that reads them)."""
        for src, dst, n in step.copies:  # before the forward writes any row (in the order planned)
            self.runner.copy_prefix(src, dst, n)
        work = [(seq, Segment(seq.slot, seq.payload.prompt[lo:hi], lo, logits=hi == seq.prompt_len,
                              every=seq.payload.prompt_logprobs is not None, prompt=True))
                for seq, lo, hi in step.prefill if not seq.finished]
        decode = [s for s in step.decode if not s.finished]
        work += [(seq, Segment(seq.slot, [seq.payload.last_token], seq.position)) for seq in decode]
        self.last_batch = len(decode)
        if not work:
            return
        try:
            logits = self.runner.step([seg for _, seg in work])
            for seq, seg in work:
                seq.written = seg.start + len(seg.tokens)
            if self.run_ahead and not step.prefill and not any(s.payload.params.logprobs is not None for s in decode):
                self._flight = _Flight(decode, logits)  # its tokens are read at the next turn of the loop, after
                return                                  # the step that follows it is queued (where one does)
            done = list(zip(work, logits.split([seg.rows for _, seg in work])))
        except Exception:  # find who: each segment alone; the others go on
            logits, done = None, []
            for seq, seg in work:
                try:
                    done.append(((seq, seg), self.runner.step([seg])))
                    seq.written = seg.start + len(seg.tokens)
                except Exception as e:
                    self._fail(seq, e)
        rows, last = [], []
        for (seq, seg), out in done:
            if seg.every:
                self._score_prompt(seq, seg, out)
            if seg.logits and seq.max_new_tokens == 0:
                self._scored(seq)
            elif seg.logits:
                rows.append(seq)
                last.append(out[-1:])
        if rows:  # (a step's logits are these rows already, unless it scored a prompt or ran segment by segment)
            plain = logits is not None and not any(seg.every for _, seg in work)
            self._emit_tokens(rows, logits if plain else torch.cat(last))

    def _score_prompt(self, seq: Seq, seg: Segment, logits: torch.Tensor) -> None:
        """The logprobs of the prompt tokens after a chunk's (logits: one row after each of its tokens)."""
        req = seq.payload
        following = req.prompt[seg.start + 1:seg.start + len(seg.tokens) + 1]  # (the last row's: a new token)
        req.prompt_logprobs += token_logprobs(logits[:len(following)], following, req.params.prompt_logprobs)

    def _scored(self, seq: Seq) -> None:
        """A request with max_tokens 0 whose prompt is scored: it ends without a token."""
        with self._cond:
            if seq.finished:
                return
            self._end(seq, time.perf_counter())
        self._emit(seq.payload, Output(None, "length", prompt_logprobs=tuple(seq.payload.prompt_logprobs)))

    # ----------------------------------------------------------------------------- running ahead
    # On a GPU a decode step is one graph replay; between two, the host read the tokens (a sync),
    # emitted them, scheduled and built the next step while the GPU waited. With run_ahead a pure
    # decode step is a _Flight: its tokens are chosen on the device (argmax, or a draw with the
    # request's generator) and copied to the host without a sync (HostCopy); at the next turn of
    # the loop the step after it (the same rows, one column further, fed those tokens on the
    # device: runner.decode_next) is queued first, and only then are the flight's tokens read and
    # emitted, while the GPU runs the next step. That step is queued where it serves as well as
    # the scheduler's would: nobody waits for a free slot (a newcomer's prefill goes in the
    # scheduler's next step), some row has a token left to make, and the rows still running fill
    # the same padded bucket. Rows that have ended (EOS, max_tokens, cancelled) ride along in vain:
    # their tokens are dropped (a sampled one's generator draws once more, unseen), and their cache
    # rows' extra columns are never read (a later owner of the slot prefills from column 0, in a
    # step queued after).
    def _can_run_ahead(self, flight: "_Flight") -> bool:
        """Under the lock: whether the step after the flight is worth queueing before reading it."""
        live = [s for s in flight.rows if not s.finished]
        pending = any(s is not None and not s.prefill_done for s in self.scheduler.slots)  # (a newcomer waiting for a donor)
        return (bool(live) and not (self.scheduler.waiting and self.scheduler.free_slots) and not pending
                and any(s.generated + 1 < s.max_new_tokens for s in live)
                and self.runner.bucket(len(live)) == self.runner.bucket(len(flight.rows)))

    def _launch_next(self, flight: "_Flight") -> "_Flight | None":
        try:
            logits = self.runner.decode_next(flight.tokens)
        except Exception:  # the scheduled step runs it again, and finds who fails
            log.debug("running ahead failed", exc_info=True)
            return None
        if logits is None:
            return None
        self.steps += 1
        self.last_batch = sum(not s.finished for s in flight.rows)  # (the ended ones ride along in vain)
        return _Flight(flight.rows, logits)

    def _land(self, flight: "_Flight") -> None:
        """Read the flight's tokens (waiting for its step alone) and emit them."""
        try:
            tokens = flight.read()
        except Exception as e:  # the device failed: the step's requests fail, the loop lives
            log.exception("engine step failed")
            self._flight = None
            for seq in flight.rows:
                self._fail(seq, e)
            return
        now = time.perf_counter()
        seconds, self._landed = now - max(flight.launched, self._landed), now
        self._emit_rows(flight.rows, tokens)
        self._report(seconds, 0, len(flight.rows))

    def _report(self, seconds: float, prefilled: int, decoded: int) -> None:
        if self.on_step is not None:
            try:
                self.on_step(seconds, prefilled, decoded)
            except Exception:
                log.debug("on_step failed", exc_info=True)

    # ----------------------------------------------------------------------------- tokens out
    def _emit_tokens(self, rows: list[Seq], logits: torch.Tensor) -> None:
        """Choose one token per row (logits (B, vocab)), emit it, end the rows that are done."""
        chosen = choose(rows, logits)
        tokens = chosen.tolist()  # one host sync for all
        scored = [i for i, s in enumerate(rows) if s.payload.params.logprobs is not None]
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if scored:
            top = max(rows[i].payload.params.logprobs for i in scored)
            for i, lp in zip(scored, token_logprobs(logits[scored], chosen[scored], top)):
                logprobs[i] = TokenLogprob(lp.token, lp.logprob, lp.top[:rows[i].payload.params.logprobs])
        self._emit_rows(rows, tokens, logprobs)

    def _emit_rows(self, rows: list[Seq], tokens: list[int], logprobs: list | None = None) -> None:
        """Emit each row's token and end the rows that are done (a row ended meanwhile: skipped)."""
        now = time.perf_counter()
        for i, (seq, token) in enumerate(zip(rows, tokens)):
            req = seq.payload
            with self._cond:
                if seq.finished:  # cancelled while the step ran
                    continue
                seq.generated += 1
                req.last_token = token
                if seq.tokens is not None:  # token G came from a step that fed token G - 1: written to there
                    seq.tokens.append(token)
                    seq.written = max(seq.written, seq.prompt_len + seq.generated - 1)
                reason = "stop" if token in req.stop_ids else "length" if seq.generated == seq.max_new_tokens else None
                if reason:
                    self._end(seq, now)
                scored = req.prompt_logprobs if seq.generated == 1 and req.prompt_logprobs is not None else None
            self._emit(req, Output(token, reason, time=now, logprob=logprobs[i] if logprobs else None,
                                   prompt_logprobs=None if scored is None else tuple(scored),
                                   cached_tokens=seq.cached if seq.generated == 1 else None))

    def _end(self, seq: Seq, now: float) -> None:
        """Free the slot (under the lock) and fold the request's duration into the running mean."""
        self.scheduler.finish(seq)
        self._seqs.pop(seq.id, None)
        self._seconds_per_request += 0.2 * ((now - seq.payload.arrived) - self._seconds_per_request)

    def _fail(self, seq: Seq, error: BaseException) -> None:
        log.error("request %s failed in the model: %s: %s", seq.id, type(error).__name__, error)
        with self._cond:
            if seq.finished:
                return
            self._end(seq, time.perf_counter())
        self._emit(seq.payload, Output(None, "error", error=f"{type(error).__name__}: {error}"))

    @staticmethod
    def _emit(req: _Request, out: Output) -> None:
        try:
            req.emit(out)
        except Exception:  # a consumer that is gone (closed event loop) must not stop the engine
            log.debug("request %s: emit failed", req.id, exc_info=True)


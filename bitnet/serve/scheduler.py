"""Continuous batching's bookkeeping: who waits, which sequence holds which slot of the KV cache,
and what the next step runs. Plain Python, no torch: the engine (bitnet.serve.engine) asks
`schedule()` for a Step, runs it on the model and reports back (`finish`); tests drive it with
numbers alone.

The policy, llama-server's slots with vLLM's chunked prefill, one cache row per sequence:
- a bounded queue: `add` refuses a sequence beyond `max_queue` waiting ones (QueueFull; the server
  answers 429 with Retry-After), so memory never grows with the load;
- admission at every step: waiting sequences take the free slots in arrival order, while the
  running ones keep decoding (nobody waits for the batch to drain);
- chunked prefill: a step prefills at most `prefill_chunk` prompt tokens in all, oldest first, so
  a newcomer's prompt delays the running streams' next token by at most one chunk's forward. A
  prompt that fits in one chunk is never split (one forward, as a lone `generate` runs it, so its
  logits are the same); a longer one goes in chunks of `prefill_chunk` tokens;
- every sequence whose prompt is in the cache decodes one token a step;
- `finish` (end of sequence, client gone, failure) frees the slot at once; `cancel` also takes a
  sequence out of the queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The waiting queue holds max_queue sequences already."""


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it: a prompt of prompt_len tokens, then up to
    max_new_tokens generated ones. `prefilled` counts prompt tokens in the cache, `generated` the
    tokens emitted (the first comes from the prefill's last logits)."""

    id: Hashable
    prompt_len: int
    max_new_tokens: int
    slot: int | None = None  # the slot it holds (or held, once finished)
    prefilled: int = 0
    generated: int = 0
    finished: bool = False
    arrival: int = -1  # order of `add`, set by the scheduler
    payload: object = field(default=None, repr=False)  # the engine's request, carried along

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == self.prompt_len

    @property
    def position(self) -> int:
        """Cache slot (and RoPE position) of the next token fed: the last one emitted."""
        return self.prompt_len + self.generated - 1


@dataclass
class Step:
    """What one engine step runs: prompt tokens [start, end) of each prefill sequence into its slot
    (`last`: the chunk that ends the prompt, whose logits give the first token), then one decode
    token for every sequence of `decode`."""

    prefill: list[tuple[Sequence, int, int]]
    decode: list[Sequence]

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, prefill_chunk: int):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"max_batch >= 1, max_queue >= 0 and prefill_chunk >= 1, got {max_batch}, {max_queue}, "
                             f"{prefill_chunk}")
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self._added = 0

    # ----- state
    @property
    def running(self) -> list[Sequence]:
        """Sequences holding a slot, in slot order."""
        return [s for s in self.slots if s is not None]

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    # ----- changes
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; QueueFull when max_queue sequences wait already and no slot is free
        for it (a free slot takes it at the next step, so it does not count as waiting)."""
        if seq.prompt_len < 1 or seq.max_new_tokens < 0:
            raise ValueError(f"a sequence needs a prompt and a count of tokens to generate (0: its prompt scored "
                             f"alone), got {seq.prompt_len} and {seq.max_new_tokens}")
        if len(self.waiting) - self.free_slots >= self.max_queue:
            raise QueueFull(f"{self.max_batch - self.free_slots} running and {len(self.waiting)} waiting "
                            f"(max_queue {self.max_queue})")
        seq.arrival, self._added = self._added, self._added + 1
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """The sequence is done (ended, cancelled or failed): its slot is free from now on."""
        seq.finished = True
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None  # seq.slot keeps the slot it held (a step under way may still write there)

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is: out of the queue, or out of its slot."""
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass
        self.finish(seq)

    def schedule(self) -> Step:
        """Admit waiting sequences into free slots, then plan this step: prefill chunks within the
        token budget (oldest sequences first) and a decode token for every prefilled sequence.
        The plan counts as done: `prefilled` moves to each chunk's end."""
        for i, s in enumerate(self.slots):
            if s is None and self.waiting:
                seq = self.waiting.popleft()
                seq.slot = i
                self.slots[i] = seq
        decode = [s for s in self.slots if s is not None and s.prefill_done and s.generated > 0]
        prefill: list[tuple[Sequence, int, int]] = []
        budget = self.prefill_chunk
        for seq in sorted((s for s in self.slots if s is not None and not s.prefill_done), key=lambda s: s.arrival):
            left = seq.prompt_len - seq.prefilled
            if left <= self.prefill_chunk and left > budget and prefill:
                break  # whole prompts are not split: it goes first in the next step
            n = min(left, budget)
            prefill.append((seq, seq.prefilled, seq.prefilled + n))
            seq.prefilled += n
            budget -= n
            if budget == 0:
                break
        return Step(prefill, decode)


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

Prefix caching (`prefix_cache`, llama-server's `cache_prompt` over all slots): a slot's cache row
keeps the keys and values of the last sequence that held it after it ends, and its prompt's columns
can start another prompt: a newcomer whose prompt starts with tokens a row's prompt holds starts its
prefill after them (`cached` tokens, at most all of its prompt but the last, whose logits give its
first token): a chat's history, a shared system prompt or few-shot examples are computed once.
Where the longest match is in a free slot, the newcomer takes that slot; where it is in a running
sequence's row (a shared prefix of requests in flight), the step first copies those columns into
the newcomer's slot (Step.copies); a copy must gain min_prefix tokens over the best free slot, and
a match shorter than `min_prefix` tokens is computed again. A newcomer whose prompt shares a
longer prefix with a running sequence's prompt that is not in its row yet (requests arriving
together: `n` choices of one prompt, a burst with one system prompt) takes its slot and waits
(`donor`): no chunk of it is planned until the donor's prefill has written those columns (or the
donor ended), then they are copied and its prefill starts after them; the donor, older, comes
first for the budget, so the wait costs no step that computing the prefix again would not. Without
a match a newcomer takes the free slot that has waited longest (an unused one first), so the most
recent histories stay longest.
A sequence with `tokens` None neither reuses nor leaves its columns to others; one with `reuse`
False leaves them but computes its whole prompt (its prompt logprobs need every position's logits).

Exactness (`block`, bitnet.model.PROMPT_BLOCK for the engine): a prompt's attention runs in blocks
of `block` positions aligned to its multiples, so a prefill cut at such a multiple gives the whole
prefill's numbers bit for bit. Hence a cached prefix is a multiple of `block` tokens, taken only
from the columns a prefill wrote (a prompt's, not the generated tokens' a decode step wrote: their
one-query attention sums in another order), and a chunk that does not end its prompt ends at a
multiple of `block` (with a budget below one block, where it cannot, it ends where the budget does).
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
    # prefix caching: the prompt's token ids, then the generated ones (None: no prefix caching)
    tokens: list[int] | None = field(default=None, repr=False)
    reuse: bool = True  # may start after a cached prefix (False: every prompt position is computed)
    written: int = 0  # columns of its slot that hold tokens[:written], as the engine has run them
    cached: int = 0  # prompt tokens taken from the cache, not computed
    donor: Sequence | None = field(default=None, repr=False)  # a running prefill it waits for (prefix caching)
    awaits: int = 0  # the columns of the donor's row it waits for

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == self.prompt_len

    @property
    def position(self) -> int:
        """Cache slot (and RoPE position) of the next token fed: the last one emitted."""
        return self.prompt_len + self.generated - 1


@dataclass
class Step:
    """What one engine step runs: the cache columns `copies` names copied from a row to another
    (prefix caching), prompt tokens [start, end) of each prefill sequence into its slot, then one
    decode token for every sequence of `decode`."""

    prefill: list[tuple[Sequence, int, int]]
    decode: list[Sequence]
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (from slot, to slot, columns), first, in order

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, prefill_chunk: int, prefix_cache: bool = False,
                 min_prefix: int = 32, block: int = 1):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or min_prefix < 1 or block < 1:
            raise ValueError(f"max_batch >= 1, max_queue >= 0, prefill_chunk >= 1, min_prefix >= 1 and block >= 1, got "
                             f"{max_batch}, {max_queue}, {prefill_chunk}, {min_prefix}, {block}")
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.prefix_cache, self.min_prefix, self.block = prefix_cache, min_prefix, block
        self.slots: list[Sequence | None] = [None] * max_batch
        self.held: list[Sequence | None] = [None] * max_batch  # the sequence whose columns each row holds
        self.freed: list[int] = [-1] * max_batch  # when each slot was last freed (-1: never held)
        self.waiting: deque[Sequence] = deque()
        self._added = 0
        self._finished = 0

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
            self.freed[seq.slot], self._finished = self._finished, self._finished + 1

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
        copies: list[tuple[int, int, int]] = []
        while self.waiting and None in self.slots:
            self._admit(self.waiting.popleft(), copies)
        for seq in self.slots:
            if seq is not None and seq.donor is not None:
                self._await(seq, copies)
        decode = [s for s in self.slots if s is not None and s.prefill_done and s.generated > 0]
        prefill: list[tuple[Sequence, int, int]] = []
        budget = self.prefill_chunk
        for seq in sorted((s for s in self.slots if s is not None and not s.prefill_done and s.donor is None),
                          key=lambda s: s.arrival):
            left = seq.prompt_len - seq.prefilled
            if left <= self.prefill_chunk and left > budget and prefill:
                break  # whole prompts are not split: it goes first in the next step
            n = min(left, budget)
            if n < left and self.block > 1:  # a chunk that does not end the prompt ends at a multiple of block
                aligned = (seq.prefilled + n) // self.block * self.block - seq.prefilled
                if aligned > 0:
                    n = aligned
                elif prefill:
                    break  # the next step's budget reaches a boundary
            prefill.append((seq, seq.prefilled, seq.prefilled + n))
            seq.prefilled += n
            budget -= n
            if budget == 0:
                break
        return Step(prefill, decode, copies)

    # ----- prefix caching
    def _admit(self, seq: Sequence, copies: list[tuple[int, int, int]]) -> None:
        """Give seq a free slot: the one holding the longest prefix of its prompt (min_prefix tokens
        at least); or a copy of a running row's where that is min_prefix tokens longer; or, where a
        running prefill will write min_prefix more than either, a wait for it (seq.donor); else the
        slot freed longest ago."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not self.prefix_cache:
            slot, cached = free[0], 0
        else:
            slot, cached = min(free, key=lambda i: self.freed[i]), 0
        if self.prefix_cache and seq.tokens is not None and seq.reuse:
            own = {i: self._match(i, seq) for i in free}  # what each free row holds of the prompt
            for i in free:
                if own[i] >= self.min_prefix and own[i] > cached:
                    slot, cached = i, own[i]
            source, copied = None, cached
            for i, s in enumerate(self.slots):
                if s is not None and (n := self._match(i, seq)) >= copied + self.min_prefix:
                    source, copied = i, n
            donor, awaits = None, copied
            for s in self.slots:
                if s is not None and s.tokens is not None and (n := self._shared(s, seq)) >= awaits + self.min_prefix:
                    donor, awaits = s, n
            unmatched = min(free, key=lambda i: (own[i] > 0, self.freed[i]))  # keeps others' histories
            if donor is not None:  # (its own slot's columns, if any, serve should the donor fail)
                seq.donor, seq.awaits = donor, awaits
                slot = slot if cached else unmatched
            elif source is not None:
                slot, cached = unmatched, copied
                copies.append((source, slot, copied))
        seq.slot, seq.prefilled, seq.written, seq.cached = slot, cached, cached, cached
        self.slots[slot] = self.held[slot] = seq

    def _await(self, seq: Sequence, copies: list[tuple[int, int, int]]) -> None:
        """A waiting newcomer (seq.donor): once the donor's row holds the prefix it waits for (or
        the donor ended, or its row was taken), copy what that row holds of it and start there."""
        d = seq.donor
        held = self.held[d.slot] is d
        n = self._match(d.slot, seq) if held else 0
        if held and not d.finished and n < seq.awaits:
            return  # its prefill has more to write
        seq.donor = None
        if n >= seq.cached + self.min_prefix:
            copies.append((d.slot, seq.slot, n))
            seq.prefilled, seq.written, seq.cached = n, n, n

    def _shared(self, running: Sequence, seq: Sequence) -> int:
        """Prompt tokens of seq that a running sequence's prompt starts with (whole blocks, all of
        seq's prompt but its last at most), written in its row or not."""
        if running.finished or running is seq:
            return 0
        n = common_prefix(running.tokens, seq.tokens, min(running.prompt_len, seq.prompt_len - 1))
        return n // self.block * self.block

    def _match(self, slot: int, seq: Sequence) -> int:
        """Prompt tokens of seq that row `slot` holds at the same columns, written by a prefill (all
        of seq's prompt but its last at most), in whole blocks."""
        held = self.held[slot]
        if held is None or held.tokens is None or seq.tokens is None:
            return 0
        n = common_prefix(held.tokens, seq.tokens, min(held.written, held.prompt_len, seq.prompt_len - 1))
        return n // self.block * self.block


def common_prefix(a: list, b: list, most: int) -> int:
    """The length of the longest common prefix of a and b, at most `most` (slices compared in C:
    a few compares of a 4k-token history, not 4k of Python's)."""
    if a[:most] == b[:most]:
        return most
    lo, hi = 0, most  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


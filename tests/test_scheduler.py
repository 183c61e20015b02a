"""Continuous batching without HTTP: the scheduler's policy (plain numbers), the runner's exactness
(a batched decode step gives each row the logits of that sequence run alone), and the engine (solo
greedy outputs under staggered arrivals, chunked prefill, seeded sampling, EOS, cancel, faults
that stay with their request, the queue bound, draining). The HTTP server: tests/test_serve.py."""

import os
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet import BitNetConfig, BitNetForCausalLM, freeze
from bitnet.generation import CACHE_MULTIPLE, decode_step, generate, prefill
from bitnet.kernels import cpu as native
from bitnet.model import PROMPT_BLOCK
from bitnet.serve.engine import ContextOverflow, Engine, EngineClosed, SamplingParams
from bitnet.serve.runner import ModelRunner, Segment
from bitnet.serve.scheduler import QueueFull, Scheduler, Sequence, Step

pytestmark = pytest.mark.usefixtures("gpu_gemm_tile")  # whole models: the GEMMs in a GPU's tile (conftest.py)

PROMPTS = [[1, 5, 77, 3, 9, 120, 45], [1, 99, 12], [1, 64, 64, 8, 30], [7], list(range(1, 40)), [3, 3, 3, 3]]


def tiny(linear="bitnet", dtype=torch.float32, seed=0, **kw):
    """The tiny preset with weights large enough (std 0.05) that greedy output is not one repeated token."""
    torch.manual_seed(seed)
    model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", linear=linear, initializer_range=0.05, **kw))
    model = model.to(dtype).eval()
    return freeze(model) if linear == "bitnet" else model


# ----------------------------------------------------------------------------- the scheduler
def seq(i, prompt_len=4, new=3):
    return Sequence(i, prompt_len, new)


def test_admits_in_arrival_order_into_free_slots_and_decodes_the_prefilled():
    s = Scheduler(max_batch=2, max_queue=4, prefill_chunk=64)
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    step = s.schedule()
    assert [(x.id, lo, hi) for x, lo, hi in step.prefill] == [("a", 0, 4), ("b", 0, 4)]
    assert step.decode == [] and list(s.waiting) == [c] and (a.slot, b.slot) == (0, 1)
    a.generated = b.generated = 1  # the engine emitted their first tokens (from the prefill)
    step = s.schedule()
    assert step.prefill == [] and step.decode == [a, b]
    s.finish(a)  # a slot frees at once; c takes it at the next step while b keeps decoding
    assert s.free_slots == 1
    step = s.schedule()
    assert c.slot == 0 and [x for x, _, _ in step.prefill] == [c] and step.decode == [b]


def test_the_queue_is_bounded():
    s = Scheduler(max_batch=1, max_queue=2, prefill_chunk=64)
    for i in range(3):  # one for the free slot, two waiting
        s.add(seq(i))
    with pytest.raises(QueueFull, match=r"0 running and 3 waiting \(max_queue 2\)"):
        s.add(seq(3))
    s.schedule()  # 0 takes the slot, 1 and 2 wait: still full
    with pytest.raises(QueueFull, match="1 running and 2 waiting"):
        s.add(seq(4))
    s.finish(s.running[0])  # a free slot takes the next one: room for one more
    s.add(seq(5))
    with pytest.raises(QueueFull):
        s.add(seq(6))
    with pytest.raises(ValueError, match="needs a prompt and a count of tokens"):
        Scheduler(1, 1, 1).add(seq(9, prompt_len=0))
    with pytest.raises(ValueError, match="needs a prompt and a count of tokens"):
        Scheduler(1, 1, 1).add(seq(9, new=-1))
    Scheduler(1, 1, 1).add(seq(9, new=0))  # a prompt scored alone (bitnet.serve.engine: prompt_logprobs)


def test_long_prompts_go_in_chunks_while_the_others_decode():
    s = Scheduler(max_batch=2, max_queue=4, prefill_chunk=256)
    a = seq("a", prompt_len=5, new=100)
    s.add(a)
    s.schedule()
    a.generated = 1
    long = seq("long", prompt_len=600)
    s.add(long)
    chunks = []
    for _ in range(3):
        step = s.schedule()
        assert step.decode == [a]  # a decodes at every step of the long prefill
        chunks += [(lo, hi) for x, lo, hi in step.prefill]
    assert chunks == [(0, 256), (256, 512), (512, 600)] and long.prefill_done


def test_a_whole_prompt_is_not_split_to_fill_the_budget():
    s = Scheduler(max_batch=3, max_queue=4, prefill_chunk=10)
    a, b, c = seq("a", 6), seq("b", 6), seq("c", 3)
    for x in (a, b, c):
        s.add(x)
    # b fits in a chunk but not in what a left of this step's budget: it waits, and c behind it too
    assert [(x.id, lo, hi) for x, lo, hi in s.schedule().prefill] == [("a", 0, 6)]
    assert [(x.id, lo, hi) for x, lo, hi in s.schedule().prefill] == [("b", 0, 6), ("c", 0, 3)]


def test_cancel_takes_a_sequence_out_of_the_queue_or_its_slot():
    s = Scheduler(max_batch=1, max_queue=4, prefill_chunk=64)
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    s.schedule()
    s.cancel(b)  # waiting
    s.cancel(a)  # running
    assert a.finished and b.finished and s.free_slots == 1 and list(s.waiting) == [c]
    assert [x for x, _, _ in s.schedule().prefill] == [c]
    s.finish(c)
    assert not s.has_work()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 6), st.integers(0, 3), st.booleans()), min_size=1,
                max_size=25),
       st.integers(1, 4), st.integers(1, 16))
def test_random_traffic_keeps_the_invariants(arrivals, max_batch, chunk):
    """Requests (prompt_len, max_new, arrival step, cancelled at admission) through the scheduler,
    with an engine that emits one token per decode and per finished prefill: every request ends;
    slots are never shared; a step prefills at most `chunk` tokens (one prompt alone may take a
    whole chunk); every prefilled running sequence decodes at every step; admission is FIFO."""
    s = Scheduler(max_batch, max_queue=len(arrivals), prefill_chunk=chunk)
    seqs = [Sequence(i, p, n) for i, (p, n, _, _) in enumerate(arrivals)]
    admitted, step_no = [], 0
    while step_no < 10_000:
        for i, (_, _, at, _) in enumerate(arrivals):
            if at == step_no:
                s.add(seqs[i])
        if step_no > max(a[2] for a in arrivals) and not s.has_work():
            break
        before = {x.id for x in s.running}
        step = s.schedule()
        running = s.running
        assert len({x.slot for x in running}) == len(running) <= max_batch
        admitted += [x.id for x in running if x.id not in before]
        assert sum(hi - lo for _, lo, hi in step.prefill) <= chunk
        assert set(x.id for x in step.decode) == {x.id for x in running if x.generated > 0}
        for x, lo, hi in step.prefill:
            if hi == x.prompt_len:
                x.generated = 1
        for x in step.decode:
            x.generated += 1
        for x in running:
            if x.generated >= x.max_new_tokens or (arrivals[x.id][3] and x.generated):
                s.finish(x)
        step_no += 1
    assert all(x.finished for x in seqs)
    assert admitted == sorted(admitted, key=lambda i: seqs[i].arrival)  # first come, first admitted


# ----------------------------------------------------------------------------- prefix caching
class Rows:
    """What each cache row holds, as the test sees it (not the scheduler): the token fed at each
    column, written by the steps a Step plans (its copies first) and nothing else."""

    def __init__(self, max_batch, width=200):
        self.rows = [[None] * width for _ in range(max_batch)]
        self.decoded = [[False] * width for _ in range(max_batch)]  # written by a decode step

    def run(self, step, fed):
        """Apply a step: its copies in order, then each prefill chunk's prompt tokens and each decode
        sequence's last token (fed[id]: the tokens a sequence has fed so far, prompt then generated)."""
        for src, dst, n in step.copies:
            self.rows[dst][:n] = self.rows[src][:n]
            self.decoded[dst][:n] = self.decoded[src][:n]
        for x, lo, hi in step.prefill:
            self.rows[x.slot][lo:hi] = x.tokens[lo:hi]
            self.decoded[x.slot][lo:hi] = [False] * (hi - lo)
            x.written = hi
        for x in step.decode:
            self.rows[x.slot][x.position] = x.tokens[x.position]
            self.decoded[x.slot][x.position] = True
            x.written = x.position + 1


def cached_seq(i, tokens, new=3, **kw):
    return Sequence(i, len(tokens), new, tokens=list(tokens), **kw)


def finish_after(s, rows, x, generated):
    """Run x's prefill and `generated` tokens (the engine appends each to x.tokens), then end it."""
    while not x.prefill_done or x.generated < generated:
        step = s.schedule()
        for y, _, hi in step.prefill:
            if hi == y.prompt_len:
                y.generated = 1
                y.tokens.append(1000 + y.generated)
        rows.run(step, None)
        for y in step.decode:
            y.generated += 1
            y.tokens.append(1000 + y.generated)
    s.finish(x)


def test_a_prompt_starts_after_the_longest_prefix_a_free_row_holds():
    """A finished sequence's row keeps its prompt's columns; a newcomer sharing min_prefix tokens
    or more of them takes that row and prefills the rest, the reused part cut to whole blocks and
    never the generated tokens' columns (a decode step wrote those); an identical prompt recomputes
    at least its last token (its logits give the first new token)."""
    s = Scheduler(max_batch=3, max_queue=8, prefill_chunk=64, prefix_cache=True, min_prefix=4, block=4)
    rows = Rows(3)
    a = cached_seq("a", range(22))
    s.add(a)
    finish_after(s, rows, a, generated=3)  # fed: the prompt + 2 of its 3 tokens
    assert a.written == 24 and rows.rows[a.slot][:24] == a.tokens[:24]
    turn2 = cached_seq("t2", a.tokens[:24] + [7, 8])  # the next turn of a chat: history + new text
    s.add(turn2)
    step = s.schedule()
    assert turn2.slot == a.slot and turn2.cached == 20 and step.copies == []  # 22 prompt columns -> 5 blocks
    assert [(x.id, lo, hi) for x, lo, hi in step.prefill] == [("t2", 20, 26)]
    rows.run(step, None)
    s.finish(turn2)
    same = cached_seq("same", turn2.tokens[:26])
    short = cached_seq("short", list(range(3)) + [99] * 10)  # 3 tokens in common < min_prefix
    s.add(same), s.add(short)
    step = s.schedule()
    assert (same.slot, same.cached) == (a.slot, 24) and [(lo, hi) for x, lo, hi in step.prefill if x is same] == [(24, 26)]
    assert short.slot != a.slot and short.cached == 0
    for x, _, _ in step.prefill:  # what each reused column holds is the newcomer's own prompt
        assert rows.rows[x.slot][:x.cached] == x.tokens[:x.cached]


def test_chunks_that_do_not_end_a_prompt_end_at_a_block_boundary():
    s = Scheduler(max_batch=2, max_queue=4, prefill_chunk=10, block=4)
    a, b = seq("a", prompt_len=25), seq("b", prompt_len=6)
    s.add(a)
    plans = []
    for _ in range(4):
        step = s.schedule()
        plans.append([(x.id, lo, hi) for x, lo, hi in step.prefill])
        if len(plans) == 1:
            s.add(b)
    # 10-token budget: a's chunks end at 8 and 16, its last is whole; b's whole prompt waits for room
    assert plans == [[("a", 0, 8)], [("a", 8, 16)], [("a", 16, 25)], [("b", 0, 6)]]
    s2 = Scheduler(max_batch=2, max_queue=4, prefill_chunk=10, block=4)
    c, d = seq("c", prompt_len=7), seq("d", prompt_len=30)
    s2.add(c), s2.add(d)
    assert [(x.id, lo, hi) for x, lo, hi in s2.schedule().prefill] == [("c", 0, 7)]  # d: 3 tokens left, no boundary
    assert [(x.id, lo, hi) for x, lo, hi in s2.schedule().prefill] == [("d", 0, 8)]
    s3 = Scheduler(max_batch=1, max_queue=4, prefill_chunk=3, block=4)  # a budget below a block: progress anyway
    e = seq("e", prompt_len=5)
    s3.add(e)
    assert [(lo, hi) for _, lo, hi in s3.schedule().prefill] == [(0, 3)]


def test_a_shared_prefix_is_copied_from_a_running_row_into_a_free_slot():
    s = Scheduler(max_batch=3, max_queue=8, prefill_chunk=64, prefix_cache=True, min_prefix=8, block=8)
    rows = Rows(3)
    system = list(range(100, 140))  # a 40-token system prompt
    a = cached_seq("a", system + [1, 2], new=50)
    s.add(a)
    rows.run(s.schedule(), None)  # a's prompt is in its row; a keeps decoding
    a.generated, a.tokens = 1, a.tokens + [5]
    b = cached_seq("b", system + [3])
    tiny_match = cached_seq("c", system[:5] + [9] * 20)  # 5 < min_prefix: computed whole
    s.add(b), s.add(tiny_match)
    step = s.schedule()
    assert step.copies == [(a.slot, b.slot, 40)] and b.cached == 40 and b.prefilled == 41
    assert tiny_match.cached == 0 and len({a.slot, b.slot, tiny_match.slot}) == 3
    rows.run(step, None)
    assert rows.rows[b.slot][:41] == b.tokens[:41]
    # a prefix not yet written: the newcomer holds a slot and waits for the donor's prefill, then copies
    s2 = Scheduler(max_batch=3, max_queue=8, prefill_chunk=16, prefix_cache=True, min_prefix=8, block=8)
    rows2 = Rows(3)
    x, y = cached_seq("x", system), cached_seq("y", system[:32] + [1, 2])  # 32 shared tokens
    s2.add(x), s2.add(y)
    plans = []
    for _ in range(3):
        step = s2.schedule()
        plans.append((step.copies, [(q.id, lo, hi) for q, lo, hi in step.prefill]))
        rows2.run(step, None)
    assert y.donor is None and y.cached == 32 and y.slot != x.slot
    assert plans == [([], [("x", 0, 16)]), ([], [("x", 16, 32)]), ([(x.slot, y.slot, 32)], [("x", 32, 40), ("y", 32, 34)])]
    assert rows2.rows[y.slot][:34] == y.tokens[:34]
    # the donor gone before it wrote what was awaited: the newcomer takes what its row holds (here 16)
    s3 = Scheduler(max_batch=2, max_queue=8, prefill_chunk=16, prefix_cache=True, min_prefix=8, block=8)
    u, v = cached_seq("u", system), cached_seq("v", system + [3])
    s3.add(u), s3.add(v)
    rows3 = Rows(2)
    rows3.run(s3.schedule(), None)  # u: 0..16
    s3.cancel(u)
    step = s3.schedule()
    assert step.copies == [(u.slot, v.slot, 16)] and [(lo, hi) for _, lo, hi in step.prefill] == [(16, 32)]


def test_prefix_cache_keeps_the_latest_histories_and_skips_who_asks_not_to():
    s = Scheduler(max_batch=2, max_queue=8, prefill_chunk=64, prefix_cache=True, min_prefix=4)
    rows = Rows(2)
    a, b = cached_seq("a", range(10)), cached_seq("b", range(50, 60))
    s.add(a), s.add(b)
    finish_after(s, rows, a, 1)
    finish_after(s, rows, b, 1)
    c = cached_seq("c", range(200, 210))  # no match: the row freed longest ago (a's)
    s.add(c)
    s.schedule()
    assert c.slot == a.slot
    s.finish(c)
    scored = cached_seq("scored", list(range(50, 60)) + [1], reuse=False)  # prompt logprobs: every position computed
    s.add(scored)
    step = s.schedule()
    assert scored.cached == 0 and [(lo, hi) for _, lo, hi in step.prefill] == [(0, 11)]
    off = Scheduler(max_batch=2, max_queue=8, prefill_chunk=64)  # prefix_cache off: tokens ignored
    d = cached_seq("d", range(10))
    off.add(d)
    off.schedule()
    d.written = 10
    off.finish(d)
    e = cached_seq("e", list(range(10)) + [5])
    off.add(e)
    assert off.schedule().prefill[0][1] == 0 and e.cached == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 30), st.integers(1, 5), st.integers(0, 4), st.booleans()),
                min_size=1, max_size=20),
       st.integers(1, 3), st.integers(1, 16), st.integers(1, 6), st.integers(1, 4))
def test_random_traffic_reuses_only_columns_that_hold_its_prompt(arrivals, max_batch, chunk, min_prefix, block):
    """Requests (which of 4 shared prefixes, prompt length, max_new, arrival step, cancelled at
    admission) through a prefix-caching scheduler and a model of the cache rows (which also marks
    the columns a decode step wrote): whenever a sequence starts after cached tokens, they are
    whole blocks its row (after the step's copies) holds exactly, all written by prefills; every
    chunk starts after columns that hold its prompt (a newcomer waiting for a donor gets none); a
    chunk that does not end its prompt ends at a block boundary (unless the budget is below a
    block); every request ends."""
    s = Scheduler(max_batch, max_queue=len(arrivals), prefill_chunk=chunk, prefix_cache=True, min_prefix=min_prefix,
                  block=block)
    rows = Rows(max_batch, width=64)
    bases = [[p * 100 + t for t in range(30)] for p in range(4)]
    seqs = [cached_seq(i, bases[b][:p - 1] + [900 + i], new=n) for i, (b, p, n, _, _) in enumerate(arrivals)]
    for step_no in range(10_000):
        for i, a in enumerate(arrivals):
            if a[3] == step_no:
                s.add(seqs[i])
        if step_no > max(a[3] for a in arrivals) and not s.has_work():
            break
        before = {x.id for x in s.running}
        step = s.schedule()
        for src, dst, n in step.copies:  # in order: a copy may read the row an earlier one wrote
            assert n >= min_prefix and rows.rows[src][:n] == s.held[dst].tokens[:n]
            rows.run(Step([], [], [(src, dst, n)]), None)
        for x, lo, hi in step.prefill:
            assert hi == x.prompt_len or hi % block == 0 or (chunk < block and len(step.prefill) == 1)
            assert x.donor is None and rows.rows[x.slot][:lo] == x.tokens[:lo]  # a chunk starts after its prompt
        rows.run(Step(step.prefill, step.decode), None)
        for x in s.running:
            if x.id not in before:
                assert x.cached == 0 or x.cached >= min_prefix
                assert x.cached % block == 0 and not any(rows.decoded[x.slot][:x.cached])
                assert rows.rows[x.slot][:x.cached] == x.tokens[:x.cached] and x.cached < x.prompt_len
        for x, lo, hi in step.prefill:
            if hi == x.prompt_len:
                x.generated = 1
                x.tokens.append(700 + x.generated)
        for x in step.decode:
            x.generated += 1
            x.tokens.append(700 + x.generated)
        for x in s.running:
            if x.generated >= x.max_new_tokens or (arrivals[x.id][4] and x.generated):
                s.finish(x)
    assert all(x.finished for x in seqs)


# ----------------------------------------------------------------------------- the runner's premise
@pytest.mark.skipif(not native.load(), reason="the native CPU kernels could not be built here")
@pytest.mark.parametrize("fmt", ["2bit", "1.6bit", "1bit"])
def test_native_kernels_give_each_row_what_it_gets_alone(fmt):
    """The batched decode step rests on this: row r of an (M, K) call equals the (1, K) call of that
    row, bit for bit, for M below and above the int8-GEMM threshold, and for the float heads."""
    from bitnet.packing import pack

    g = torch.Generator().manual_seed(0)
    N, K = 96, 256
    w_q = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    if fmt == "1bit":
        w_q = torch.where(w_q >= 0, 1, -1).to(torch.int8)
    packed, scale = pack(w_q, fmt), torch.tensor([0.0123])
    for dtype in (torch.float32, torch.bfloat16):
        for M in (2, 7, 16, 40, native.gemm_rows() + 3):
            x = torch.randn(M, K, generator=g).to(dtype)
            batched = native.linear(x, packed, scale, N, fmt)
            alone = torch.cat([native.linear(x[r:r + 1], packed, scale, N, fmt) for r in range(M)])
            assert torch.equal(batched, alone), (dtype, M)
            many = native.linear_many(x, [packed, packed], [scale, scale], [N, N], fmt, [None, None])
            assert torch.equal(many[0], alone) and torch.equal(many[1], alone)
    head = torch.randn(300, K, generator=g)
    x = torch.randn(16, K, generator=g)
    rows = range(16)
    assert torch.equal(native.bf16_linear(x, head.bfloat16(), None),
                       torch.cat([native.bf16_linear(x[r:r + 1], head.bfloat16(), None) for r in rows]))
    w8, s8 = head.to(torch.int8), torch.rand(300, generator=g)
    assert torch.equal(native.int8_linear(x, w8, s8, None), torch.cat([native.int8_linear(x[r:r + 1], w8, s8, None)
                                                                       for r in rows]))


@torch.no_grad()
def solo_logits(model, prompt, n, device="cpu"):
    """The logits of each greedy step of a lone `generate` on this prompt (its prefill, then its
    decode steps, on a cache of generate's length)."""
    T = len(prompt)
    L = -(-(T + n) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    model.setup_cache(1, L)
    key_mask = torch.ones(1, L, dtype=torch.bool, device=device)
    out = [prefill(model, torch.tensor([prompt], device=device), key_mask, torch.arange(T, device=device)[None])[0]]
    for i in range(n - 1):
        token = torch.tensor([[int(out[-1].argmax())]], device=device)
        out.append(decode_step(model, token, torch.tensor([T + i], device=device),
                               torch.tensor([[T + i]], device=device), key_mask)[0])
    model.clear_cache()
    return torch.stack(out)


def solo_and_batched(model, prompts, n, max_batch, device="cpu", max_seq_len=128, join_every=3, **runner_kw):
    """(each prompt's lone-run logits, the same prompts' logits through a ModelRunner, staggered)."""
    solo = [solo_logits(model, p, n, device=device) for p in prompts]
    runner = ModelRunner(model, max_batch=max_batch, max_seq_len=max_seq_len, **runner_kw)
    got = staggered(runner, prompts, n, max_batch, join_every)
    runner.close()
    return solo, got


def staggered(runner, prompts, n, max_batch, join_every=3):
    """Greedy decoding of every prompt through the runner, a prompt joining every few steps into
    whatever slot is free: its prefill in the same forward as the others' decode tokens (one
    runner.step). {prompt index: logits (n, vocab)}."""
    logits = {i: [] for i in range(len(prompts))}
    tokens = {i: [] for i in range(len(prompts))}
    active, pending, step = {}, list(range(len(prompts))), 0
    while active or pending:
        segments, owners = [], []
        for i, slot in active.items():
            segments.append(Segment(slot, [tokens[i][-1]], len(prompts[i]) + len(tokens[i]) - 1))
            owners.append(i)
        if pending and len(active) < max_batch and step % join_every == 0:
            i = pending.pop(0)
            slot = min(set(range(max_batch)) - set(active.values()))
            segments.insert(len(segments) // 2, Segment(slot, prompts[i], 0))  # amid the decode rows
            owners.insert(len(owners) // 2, i)
            active[i] = slot
        if segments:
            out = runner.step(segments)
            for r, i in enumerate(owners):
                logits[i].append(out[r])
                tokens[i].append(int(out[r].argmax()))
                if len(tokens[i]) == n:
                    del active[i]
        step += 1
    return {i: torch.stack(v) for i, v in logits.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_gives_each_sequence_its_solo_logits_bit_for_bit(dtype):
    """Packed model (native kernels where built, the torch path elsewhere: both exact per row),
    sequences joining at different steps into different slots, each newcomer's prefill in one
    forward with the others' decode tokens: every logit equal to the lone run's."""
    model = tiny(dtype=dtype)
    solo, got = solo_and_batched(model, PROMPTS, 16, 3)
    for i in range(len(PROMPTS)):
        assert torch.equal(got[i], solo[i]), f"prompt {i}"
    assert len(set(solo[0].argmax(-1).tolist())) > 3  # a non-degenerate continuation


@pytest.mark.skipif(not native.load(), reason="the native CPU kernels are not built here")
def test_the_runner_reads_the_layers_arguments_once(monkeypatch):
    """The runner reads each layer's native arguments (native_decode_args) at its first step and
    keeps them until close(): once a layer for a whole staggered run, not once a layer a step, its
    pure decode steps still one native decode_layer call a layer, and every logit still the lone
    run's."""
    import bitnet.serve.runner as runner_module

    model = tiny(dtype=torch.bfloat16)
    L = model.config.num_hidden_layers
    solo = [solo_logits(model, p, 8) for p in PROMPTS]
    reads, layers = [], []
    real_args, real_layer = runner_module.native_decode_args, native.decode_layer
    monkeypatch.setattr(runner_module, "native_decode_args", lambda *a: reads.append(1) or real_args(*a))
    monkeypatch.setattr(native, "decode_layer", lambda *a: layers.append(1) or real_layer(*a))
    runner = ModelRunner(model, max_batch=3, max_seq_len=64)
    got = staggered(runner, PROMPTS, 8, 3)
    assert len(reads) == L and len(layers) >= 4 * L
    for i in range(len(PROMPTS)):
        assert torch.equal(got[i], solo[i]), f"prompt {i}"
    runner.close()
    assert not runner._layer_args


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run of what the cuda test checks compiled")
def test_batched_decode_on_the_triton_path_gives_the_solo_logits(monkeypatch):
    """The Triton path under the interpreter (its RoPE and cache writes in one launch, each token
    into its own cache row; the decode attention over each query's own cache row): staggered
    sequences get their lone runs' logits bit for bit (the lone runs' decode steps with their RoPE
    and cache write inside the attention's launch)."""
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    from bitnet.kernels import custom_ops

    writes, attended = [], []
    real = custom_ops._rope_cache_impl
    monkeypatch.setattr(custom_ops, "_rope_cache_impl", lambda *a: writes.append(a[-1] is not None) or real(*a))
    real_attention = custom_ops._decode_attention_impl
    monkeypatch.setattr(custom_ops, "_decode_attention_impl",
                        lambda *a, **k: attended.append(k.get("rows", a[4] if len(a) > 4 else None) is not None)
                        or real_attention(*a, **k))
    folded = []
    real_folded = custom_ops._rope_decode_attention_impl
    monkeypatch.setattr(custom_ops, "_rope_decode_attention_impl",
                        lambda *a, **k: folded.append(k.get("rows", a[8] if len(a) > 8 else None) is not None)
                        or real_folded(*a, **k))
    model = tiny(num_hidden_layers=1)
    prompts = PROMPTS[:3]
    solo, got = solo_and_batched(model, prompts, 4, 2, max_seq_len=64)
    for i in range(len(prompts)):
        assert torch.equal(got[i], solo[i]), f"prompt {i}"
    assert True in writes and False in writes  # the runner's per-token rows and generate's prefill
    assert attended and all(attended)  # the runner's batched decode, each query over its own cache row
    assert False in folded  # generate's lone decode steps: RoPE, cache write and attention in one launch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run of what the cuda test checks compiled")
def test_padded_decode_buckets_change_no_sequence(monkeypatch):
    """decode_graphs (on CUDA: each bucket's step a CUDA graph) run eagerly on the CPU's Triton path:
    pure decode steps padded to 1, 2, 4 sequences from input tensors alone, the padding's tokens in
    the scratch cache row; every sequence still gets its lone run's logits bit for bit, and the
    sequences' own cache rows are all the padding never touches. Each layer of such a step runs
    its RoPE, cache writes and attention in one launch (per-token cache rows), as a GPU does."""
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    from bitnet.kernels import custom_ops
    from bitnet.serve import runner as runner_module

    folded = []
    real_folded = custom_ops._rope_decode_attention_impl
    monkeypatch.setattr(custom_ops, "_rope_decode_attention_impl",
                        lambda *a, **k: folded.append(k.get("rows", a[8] if len(a) > 8 else None) is not None)
                        or real_folded(*a, **k))

    buckets = []
    real = runner_module.ModelRunner.decode_forward
    monkeypatch.setattr(runner_module.ModelRunner, "decode_forward",
                        lambda self, t, p, r: buckets.append((t.shape[0], r.tolist())) or real(self, t, p, r))
    model = tiny(num_hidden_layers=1)
    prompts = PROMPTS[:3]
    # joining a step apart: then 3 at once (bucket 4, one padded), then 2 and 1 as they finish
    solo, got = solo_and_batched(model, prompts, 5, 4, max_seq_len=64, join_every=1, decode_graphs=True)
    for i in range(len(prompts)):
        assert torch.equal(got[i], solo[i]), f"prompt {i}"
    padded = [(b, rows) for b, rows in buckets if rows.count(4) > 0]  # row 4: the scratch row of max_batch 4
    assert padded and all(b in (1, 2, 4) for b, _ in buckets)
    assert all(rows[-1] == 4 and 4 not in rows[:rows.index(4)] for _, rows in padded)  # padding after the sequences
    assert True in folded  # the padded steps' layers (and False: generate's lone steps)


@pytest.mark.parametrize("recorder, option, said", [("_BucketStep", "decode_graphs", "decoding eagerly"),
                                                     ("_PromptPieces", "prompt_graphs", "running prompt steps eagerly")],
                         ids=["decode", "prompt"])
def test_a_step_that_cannot_be_recorded_runs_eagerly(monkeypatch, caplog, recorder, option, said):
    """If recording a bucket's CUDA graph (a decode step's, a prompt step's pieces) fails, the runner
    says so once and runs those steps eagerly from then on: the step still returns the sequences'
    logits (a prompt step's bit for bit; a decode step's within float32 rounding of the lone runs':
    the torch path, SDPA over the static rows instead of the live window)."""
    monkeypatch.setenv("BITNET_KERNEL", "torch")
    from bitnet.serve import runner as runner_module

    tries = []

    def broken(*args):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner_module, recorder, broken)
    model = tiny(num_hidden_layers=1)
    prompts = PROMPTS[:3]
    with caplog.at_level("WARNING", logger="bitnet.serve"):
        solo, got = solo_and_batched(model, prompts, 6, 2, max_seq_len=64, **{option: True})
    for i in range(len(prompts)):
        torch.testing.assert_close(got[i], solo[i], rtol=1e-5, atol=1e-5)
        assert option == "decode_graphs" or torch.equal(got[i], solo[i]), f"prompt {i}"
    assert tries == [1] and said in caplog.text


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="the interpreter's run of what the cuda test checks compiled"))])
def test_prompt_steps_in_padded_pieces_change_no_sequence(monkeypatch, kernel):
    """prompt_graphs (on CUDA: a step with a prompt in it padded to a bucket of tokens, all but the
    prompts' attention recorded, one piece between two layers' attention) run eagerly on the CPU:
    newcomers' prompts amid the others' decode tokens, a 39-token one among them, each step padded
    to 16, 32 or 64 tokens in the scratch cache row, the prompts' attention between the pieces; every sequence
    still gets its lone run's logits bit for bit (the torch path, and the Triton path under the
    interpreter: its RoPE and cache writes in one launch, the one-token segments' decode attention
    inside the pieces, padded to the bucket)."""
    monkeypatch.setenv("BITNET_KERNEL", kernel)
    from bitnet.serve import runner as runner_module

    loaded = []  # (the step's tokens, the pieces' inputs, its one-token segments attended inside the pieces)
    real = runner_module._PromptPieces.load

    def load(self, plan):
        real(self, plan)
        loaded.append((plan.n, self.inputs.clone(), self.in_graph_singles * sum(len(s.tokens) == 1 for s in plan.segs)))

    monkeypatch.setattr(runner_module._PromptPieces, "load", load)
    if kernel == "torch":
        model, prompts, n, kw = tiny(num_hidden_layers=2), PROMPTS, 5, {}
    else:  # the interpreter's GEMMs are slow: the prompt steps alone in pieces, the decode steps in their buckets
        model, prompts, n, kw = tiny(num_hidden_layers=1), [PROMPTS[0], PROMPTS[4], PROMPTS[1]], 3, {"decode_graphs": True}
    solo, got = solo_and_batched(model, prompts, n, 3, max_seq_len=64, join_every=1, prompt_graphs=True, **kw)
    for i in range(len(prompts)):
        assert torch.equal(got[i], solo[i]), f"prompt {i}"
    assert {inputs.shape[1] for _, inputs, _ in loaded} == {16, 64}  # 64: the 39-token prompt and decode tokens
    for tokens, inputs, _ in loaded:  # the padding after the step's tokens, in the scratch row (3 with max_batch 3)
        assert inputs[2, :tokens].lt(3).all() and inputs[2, tokens:].eq(3).all() and inputs[:2, tokens:].eq(0).all()
    # the Triton path takes the one-token segments' attention into the pieces (1 and 2 of them beside a prompt)
    assert (max(singles for _, _, singles in loaded) >= 2) == (kernel == "triton")


@pytest.mark.parametrize("pieces", [False, True], ids=["eager", "pieces"])
def test_a_step_makes_its_index_tensors_once_not_once_a_layer(monkeypatch, pieces):
    """On a GPU a tensor made from Python values is a copy that waits for the stream, so a step
    makes them before its layers: its tokens, positions and cache rows, and the one-token
    segments' indices, however many layers it runs (eager: the native kernels, whose decode
    attention takes the one-token segments as a lone decode step does, as the Triton one does on
    a GPU; 3 tensors a layer before; in pieces: the torch path)."""
    import sys

    if pieces:
        monkeypatch.setenv("BITNET_KERNEL", "torch")
    elif not native.load():
        pytest.skip("the native CPU kernels could not be built here")
    made = []
    real = torch.tensor

    def tensor(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("serve", "runner.py")):
            made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    counts = []
    for layers in (1, 3):
        runner = ModelRunner(tiny(num_hidden_layers=layers), max_batch=3, max_seq_len=32, prompt_graphs=pieces)
        runner.step([Segment(0, PROMPTS[0], 0)])
        runner.step([Segment(1, [5], 7)])
        made.clear()
        runner.step([Segment(0, [4], 7), Segment(2, PROMPTS[1], 0), Segment(1, [6], 8)])
        counts.append(len(made))
        runner.close()
    assert counts[0] == counts[1] > 0, counts


def test_graphs_recorded_before_the_first_request_serve_every_step(monkeypatch):
    """Engine.record_graphs (what `bitnet serve` does on a GPU before it listens): every decode
    bucket (1, 2, 4 of max_batch 4) and every token bucket up to a step's most tokens
    (prefill_chunk 40 + 4: 16, 32, 64) recorded at once (eager here); the requests that follow,
    staggered, a 39-token prompt among them, record nothing more and get their solo tokens."""
    from bitnet.serve import runner as runner_module

    monkeypatch.setenv("BITNET_KERNEL", "torch")
    model = tiny()
    solo = [alone(model, p, 6) for p in PROMPTS]
    engine = Engine(model, max_batch=4, max_seq_len=64, prefill_chunk=40, decode_graphs=True, prompt_graphs=True)
    assert engine.record_graphs() == 6
    assert sorted(engine.runner._buckets) == [1, 2, 4] and sorted(engine.runner._pieces) == [16, 32, 64]

    def late(*args):
        raise AssertionError("recorded at a request")

    monkeypatch.setattr(runner_module, "_BucketStep", late)
    monkeypatch.setattr(runner_module, "_PromptPieces", late)
    outs = run(engine.start(), PROMPTS, SamplingParams(max_tokens=6))
    engine.stop()
    assert [c.tokens for c in outs] == solo
    assert engine.runner.decode_graphs and engine.runner.prompt_graphs


def test_token_buckets():
    runner = ModelRunner(tiny(num_hidden_layers=1), max_batch=2, max_seq_len=64, prompt_graphs=True)
    assert [runner.token_bucket(n) for n in (1, 16, 17, 33, 64, 65, 130, 1024, 1025, 2000)] == \
        [16, 16, 32, 64, 64, 128, 192, 1024, 1280, 2048]
    assert runner.caches[0].k.shape[0] == 3  # a scratch row for the padding
    runner.close()


def test_a_float_twin_batches_within_a_stated_tolerance():
    """What is true for a model whose projections are float GEMMs: BLAS sums M = 1 and M = B rows
    in different orders, so the batched logits differ from a lone run's in the last bits (1e-5 of
    logits of order 1 here); its greedy tokens agree unless two logits tie that closely."""
    model = tiny("bf16")
    solo, got = solo_and_batched(model, PROMPTS, 12, 3)
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(got[i], solo[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_aligned_chunks_and_a_copied_prefix_give_the_whole_prefill_bit_for_bit(dtype):
    """A 320-token prompt at a shape where one attention call per chunk was not enough (hidden 256,
    4 heads of 64, 4 layers: chunks of 256 + 64 moved the logits by 0.017 fp32 / 0.066 bf16, a
    last-bit difference in one layer crossing an int8 rounding step in the next): chunks cut at
    multiples of PROMPT_BLOCK (a last one of one token too), and a prefix of 256 copied from another
    row whose prompt continued otherwise, give generate()'s prefill logits to the last bit."""
    torch.manual_seed(0)
    config = BitNetConfig.from_preset("tiny", initializer_range=0.05, hidden_size=256, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=512, num_hidden_layers=4,
                                      max_position_embeddings=512)
    model = freeze(BitNetForCausalLM(config).to(dtype).eval())
    prompt = torch.randint(0, config.vocab_size, (320,), generator=torch.Generator().manual_seed(1)).tolist()
    lone = solo_logits(model, prompt, 1)[0]  # generate's prefill
    runner = ModelRunner(model, max_batch=2, max_seq_len=512)
    assert torch.equal(runner.prefill(0, prompt, 0), lone)
    for cut in (256, 64, 96):
        assert cut % PROMPT_BLOCK == 0
        runner.prefill(1, prompt[:cut], 0)
        assert torch.equal(runner.prefill(1, prompt[cut:], cut), lone), cut
    other = prompt[:256] + [7] * 40
    runner.prefill(1, other, 0)
    runner.copy_prefix(1, 0, 256)
    assert torch.equal(runner.prefill(0, prompt[256:], 256), lone)
    # a last chunk of one token (a 321-token prompt after 320 cached ones) attends as the prefill does
    longer = prompt + [11]
    lone = solo_logits(model, longer, 1)[0]
    runner.prefill(1, longer[:320], 0)
    assert torch.equal(runner.prefill(1, longer[320:], 320), lone)
    runner.close()


def test_chunked_prefill_gives_the_whole_prefill_logits():
    model = tiny()
    runner = ModelRunner(model, max_batch=2, max_seq_len=256)
    prompt = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = runner.prefill(0, prompt, 0)
    for chunk in (16, 64, 150):
        for start in range(0, len(prompt), chunk):
            last = runner.prefill(1, prompt[start:start + chunk], start)
        assert torch.equal(last, whole), chunk
    runner.close()


# ----------------------------------------------------------------------------- the engine
class Collector:
    """emit() for one request: tokens, the finish reason, the error."""

    def __init__(self):
        self.tokens, self.finish, self.error, self.done = [], None, None, threading.Event()

    def __call__(self, out):
        if out.token is not None:
            self.tokens.append(out.token)
        if out.finish_reason is not None:
            self.finish, self.error = out.finish_reason, out.error
            self.done.set()

    def wait(self, timeout=60):
        assert self.done.wait(timeout), "request did not finish"
        return self


def run(engine, prompts, params):
    outs = [Collector() for _ in prompts]
    for p, prm, c in zip(prompts, params if isinstance(params, list) else [params] * len(prompts), outs):
        engine.submit(p, prm, c)
    return [c.wait() for c in outs]


def hold(model, gate: threading.Event) -> None:
    """Every forward of the model waits for the gate (the engine's step stalls there)."""
    def hook(module, args):
        gate.wait(10)

    model.model.embed_tokens.register_forward_pre_hook(hook)


def until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def alone(model, prompt, n, **kw):
    return generate(model, torch.tensor([prompt]), n, **kw)[0, len(prompt):].tolist()


def upto_eos(tokens, eos):
    """A stream's tokens up to and with its first EOS id."""
    ended = next((j for j, t in enumerate(tokens) if t in eos), None)
    return tokens if ended is None else tokens[:ended + 1]


AHEAD = pytest.mark.parametrize("ahead", [False, True, "pieces"], ids=["in-step", "run-ahead", "gpu-steps"])


class Spy(list):
    """An entry per step run ahead: how many of its rows had ended; `pieced`: the token counts of
    the steps run in pieces (prompt_graphs)."""

    pieced: list


def engine_args(monkeypatch, ahead):
    """Engine keywords, and a Spy. ahead: run_ahead (a GPU's default: each greedy decode step
    queued before the last one's tokens are read) forced on the CPU, with the padded decode steps it
    chains (decode_graphs, eager here) on the path that takes them (BITNET_KERNEL=torch: the native
    decode layers take a pure decode step otherwise); "pieces": also every other step padded and in
    pieces (prompt_graphs, eager here): all that a GPU's engine does by default."""
    chained = Spy()
    chained.pieced = []
    if not ahead:
        return {}, chained
    monkeypatch.setenv("BITNET_KERNEL", "torch")
    real = Engine._launch_next

    def launch_next(self, flight):
        nxt = real(self, flight)
        if nxt is not None:
            chained.append(sum(s.finished for s in flight.rows))
        return nxt

    monkeypatch.setattr(Engine, "_launch_next", launch_next)
    if ahead != "pieces":
        return {"decode_graphs": True, "run_ahead": True}, chained
    real_pieces = ModelRunner._piecewise
    monkeypatch.setattr(ModelRunner, "_piecewise",
                        lambda self, segs, *rest: chained.pieced.append(sum(len(s.tokens) for s in segs))
                        or real_pieces(self, segs, *rest))
    return {"decode_graphs": True, "run_ahead": True, "prompt_graphs": True}, chained


@AHEAD
def test_engine_streams_get_their_solo_greedy_tokens(monkeypatch, ahead):
    """More requests than slots (so some wait), different lengths, one chunked prompt (39 tokens,
    chunk 16): each gets exactly the tokens of generate() on its prompt alone; run ahead or not."""
    kw, chained = engine_args(monkeypatch, ahead)
    model = tiny()
    n = 14
    solo = [alone(model, p, n) for p in PROMPTS]
    engine = Engine(model, max_batch=3, max_seq_len=128, prefill_chunk=16, **kw).start()
    reported = []
    engine.on_step = lambda seconds, prefilled, decoded: reported.append((prefilled, decoded))
    outs = run(engine, PROMPTS, SamplingParams(max_tokens=n))
    engine.stop()
    for i, c in enumerate(outs):
        assert c.finish == "length" and c.tokens == solo[i], f"prompt {i}"
    assert engine.steps > n  # batched: fewer steps than requests x tokens
    assert len(reported) == engine.steps  # each step reported once (a step run ahead: when its tokens are read)
    assert sum(p for p, _ in reported) == sum(map(len, PROMPTS))
    assert (len(chained) > n) == bool(ahead)
    assert bool(chained.pieced) == (ahead == "pieces")


@AHEAD
def test_running_ahead_ends_each_stream_where_it_ends_alone(monkeypatch, ahead):
    """EOS ids that end streams at different steps, max_tokens from 1 to 12, a stream cancelled
    mid-way and a newcomer taking its slot (whose row holds a column decoded in vain for the
    cancelled stream, when run ahead): each stream's tokens are its solo run's up to its own end,
    none after it, and the step run ahead past an end is never emitted."""
    kw, chained = engine_args(monkeypatch, ahead)
    model = tiny()
    free = [alone(model, p, 12) for p in PROMPTS]
    eos = [free[0][3], free[2][6]]  # ends stream 0 and 2 early (and any stream that makes one of them)
    engine = Engine(model, max_batch=3, max_seq_len=128, eos_token_ids=eos, **kw).start()
    limits = [12, 12, 12, 1, 7, 12]
    outs = run(engine, PROMPTS, [SamplingParams(max_tokens=m) for m in limits])
    for i, (c, m) in enumerate(zip(outs, limits)):
        want = upto_eos(free[i][:m], eos)
        assert c.tokens == want and c.finish == ("stop" if want[-1] in eos else "length"), f"prompt {i}"
    first, waiting = Collector(), Collector()
    rid = engine.submit(PROMPTS[1], SamplingParams(max_tokens=100), first)
    until(lambda: len(first.tokens) >= 3)
    engine.submit(PROMPTS[4], SamplingParams(max_tokens=9), waiting)
    engine.submit(PROMPTS[5], SamplingParams(max_tokens=9), Collector())
    engine.submit(PROMPTS[0], SamplingParams(max_tokens=9), Collector())  # the slots are full: it waits
    assert engine.cancel(rid)
    assert waiting.wait().tokens == alone(model, PROMPTS[4], 9)
    engine.stop()
    assert first.finish == "cancelled" and first.tokens == alone(model, PROMPTS[1], len(first.tokens))
    assert bool(chained) == bool(ahead)


@AHEAD
def test_an_ended_stream_rides_along_to_the_end_of_its_cache_row(monkeypatch, caplog, ahead):
    """Four streams in 32-column cache rows, the first ending first, 3 columns short of its row's
    end, the others filling theirs: run ahead, the ended one rides along (three running still fill
    the bucket of four) until its next column would pass its row's end, where the step run ahead is
    refused and the scheduler's runs instead. Each gets its solo tokens."""
    kw, chained = engine_args(monkeypatch, ahead)
    model = tiny()
    engine = Engine(model, max_batch=4, max_seq_len=32, **kw).start()
    prompts = PROMPTS[:4]
    limits = [22, 29, 27, 31]  # prompts of 7, 3, 5, 1 tokens
    with caplog.at_level("DEBUG", logger="bitnet.serve"):
        outs = run(engine, prompts, [SamplingParams(max_tokens=m) for m in limits])
        engine.stop()
    for i, (p, m) in enumerate(zip(prompts, limits)):
        assert outs[i].tokens == alone(model, p, m), f"prompt {i}"
    assert (1 in chained) == bool(ahead)
    assert ("running ahead failed" in caplog.text and "beyond a cache row of 32" in caplog.text) == bool(ahead)


def test_running_ahead_needs_the_padded_decode_steps():
    with pytest.raises(ValueError, match="run_ahead .* needs decode_graphs"):
        Engine(tiny(), max_batch=2, max_seq_len=64, run_ahead=True)


@AHEAD
def test_engine_sampling_with_a_seed_is_generate_with_that_generator(monkeypatch, ahead):
    """Seeded sampled streams beside a greedy one: each gets the tokens of generate with its
    generator, the greedy one its solo tokens; run ahead too (the draws made on the device, a step
    before the host reads them)."""
    kw, chained = engine_args(monkeypatch, ahead)
    model = tiny()
    engine = Engine(model, max_batch=2, max_seq_len=128, **kw).start()
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=s) for s in (1, 2, 3)]
    outs = run(engine, PROMPTS[:4], params + [SamplingParams(max_tokens=10)])
    engine.stop()
    for p, prm, c in zip(PROMPTS, params, outs):
        assert c.tokens == alone(model, p, 10, temperature=0.9, top_k=40, top_p=0.95,
                                 generator=torch.Generator().manual_seed(prm.seed))
    assert outs[3].tokens == alone(model, PROMPTS[3], 10)
    assert bool(chained) == bool(ahead)


class Scored(Collector):
    """A Collector that keeps each output's logprob and the prompt's logprobs."""

    def __init__(self):
        super().__init__()
        self.logprobs, self.prompt = [], None

    def __call__(self, out):
        if out.prompt_logprobs is not None:
            assert self.prompt is None, "prompt logprobs twice"
            self.prompt = out.prompt_logprobs
        if out.token is not None:
            self.logprobs.append(out.logprob)
        super().__call__(out)


# Streams with logprobs (prompt and generated; PROMPTS[4], 39 tokens, scored in chunks of 16) beside
# streams without, and a prompt scored alone (max_tokens 0)
SCORED = [SamplingParams(max_tokens=8, logprobs=3, prompt_logprobs=2), SamplingParams(max_tokens=8),
          SamplingParams(max_tokens=8, logprobs=0), SamplingParams(max_tokens=8),
          SamplingParams(max_tokens=0, prompt_logprobs=1), SamplingParams(max_tokens=5, prompt_logprobs=0)]


def check_scored(model, engine, tol: float, same_order: bool) -> None:
    """Run SCORED on the engine: every stream gets its solo tokens; each logprob is the float64
    log_softmax of the model's forward over the prompt and the tokens, within tol (the top
    alternatives too, most likely first, the greedy token among them first; their ids in the
    reference's order where same_order: bf16 logits tie)."""
    outs = [Scored() for _ in PROMPTS]
    for p, prm, c in zip(PROMPTS, SCORED, outs):
        engine.submit(p, prm, c)
    for c in outs:
        c.wait()
    engine.stop()
    for p, prm, c in zip(PROMPTS, SCORED, outs):
        assert c.tokens == (alone(model, p, prm.max_tokens) if prm.max_tokens else [])
        assert c.finish == "length"
        with torch.no_grad():
            ref = model(torch.tensor([p + c.tokens], device=model.lm_head.weight.device)).logits[0].double().log_softmax(-1).cpu()
        if prm.logprobs is None:
            assert c.logprobs == [None] * len(c.tokens)
        else:
            for k, (t, lp) in enumerate(zip(c.tokens, c.logprobs)):
                row = ref[len(p) - 1 + k]
                assert lp.token == t and abs(lp.logprob - row[t].item()) < tol
                assert len(lp.top) == prm.logprobs and lp.top[:1] in ((), ((t, lp.logprob),))
                want = row.topk(prm.logprobs)
                assert all(abs(v - w) < tol for (_, v), w in zip(lp.top, want.values.tolist()))
                assert not same_order or [i for i, _ in lp.top] == want.indices.tolist()
        if prm.prompt_logprobs is None:
            assert c.prompt is None
            continue
        assert len(c.prompt) == len(p) and c.prompt[0] is None
        for i in range(1, len(p)):
            lp = c.prompt[i]
            assert lp.token == p[i] and abs(lp.logprob - ref[i - 1, p[i]].item()) < tol
            assert len(lp.top) == prm.prompt_logprobs and all(abs(v - ref[i - 1, j].item()) < tol for j, v in lp.top)
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


@AHEAD
def test_logprobs_beside_plain_streams_are_the_models_own(monkeypatch, ahead):
    """SCORED run ahead or not (rows with logprobs never are): solo tokens, and logprobs within
    1e-5 of a float64 log_softmax of the model's forward. (Against transformers' BitNet:
    tests/test_serve.py.)"""
    kw, _ = engine_args(monkeypatch, ahead)
    model = tiny()
    check_scored(model, Engine(model, max_batch=3, max_seq_len=128, prefill_chunk=16, **kw).start(), 1e-5, True)


class Cached(Scored):
    """Scored, and the cached_tokens its first event reports."""

    def __init__(self):
        super().__init__()
        self.cached = None

    def __call__(self, out):
        if out.cached_tokens is not None:
            self.cached = out.cached_tokens
        super().__call__(out)


def check_against_forward(model, prompt, c, tol):
    """c's tokens are the solo greedy ones and each logprob the float64 log_softmax of the model's
    forward over prompt + tokens, within tol."""
    assert c.tokens == alone(model, prompt, len(c.tokens))
    with torch.no_grad():
        ref = model(torch.tensor([prompt + c.tokens], device=model.lm_head.weight.device)).logits[0].double()
    ref = ref.log_softmax(-1).cpu()
    for k, (t, lp) in enumerate(zip(c.tokens, c.logprobs)):
        assert lp.token == t and abs(lp.logprob - ref[len(prompt) - 1 + k, t].item()) < tol


def check_prefix_cache(model, engine, tol, exact: dict | None):
    """A chat's second turn (the first turn's 70-token prompt and reply, then new text) starts
    after the first turn's prompt columns in whole blocks (64: the reply's columns a decode step
    wrote are computed again); a request sharing a 40-token system prompt with a running one gets
    its first block (32) copied from that row. Each reports its cached tokens and gets its solo
    greedy tokens, each logprob within tol of the model's own forward; exact (that engine's
    keywords): equal to the last bit to those of the same engine without the cache, each prompt
    prefilled whole (its logits are generate()'s bit for bit)."""
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(3, 512, (n,), generator=g).tolist()  # noqa: E731
    params = SamplingParams(max_tokens=6, logprobs=1)
    turn1 = rand(70)
    first, second = Cached(), Cached()
    engine.submit(turn1, params, first)
    assert first.wait().cached == 0
    turn2 = turn1 + first.tokens + rand(5)
    engine.submit(turn2, params, second)
    assert second.wait().cached == 64
    system = rand(40)
    a, b = Cached(), Cached()
    engine.submit(system + rand(3), SamplingParams(max_tokens=40, logprobs=1), a)
    until(lambda: len(a.tokens) >= 2)  # a's prompt is in its row, a decodes
    b_prompt = system + rand(4)
    engine.submit(b_prompt, params, b)
    b.wait(), a.wait()
    engine.stop()
    assert b.cached == 32 and a.cached == 0
    for prompt, c in ((turn1, first), (turn2, second), (b_prompt, b)):
        check_against_forward(model, prompt, c, tol)
    if exact is not None:
        plain = Engine(model, **{**exact, "prefix_cache": False, "prefill_chunk": 256}).start()  # whole prompts
        for prompt, c in ((turn2, second), (b_prompt, b)):
            ref = Cached()
            plain.submit(prompt, params, ref)
            assert ref.wait().tokens == c.tokens and [lp.logprob for lp in ref.logprobs] == [lp.logprob for lp in c.logprobs]
        plain.stop()


@AHEAD
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_prefix_cache_reuses_a_chat_history_and_a_running_rows_system_prompt(monkeypatch, ahead, dtype):
    """check_prefix_cache run ahead or not, in GPU-style pieces or not, fp32 and bf16 (the server's
    default dtype, its bf16 KV cache): on the CPU a prompt after a cached prefix gets the numbers
    of the whole prompt's prefill, bit for bit, and so do its chunks (prompt attention in aligned
    blocks)."""
    kw, _ = engine_args(monkeypatch, ahead)
    model = tiny(dtype=dtype)
    kw = dict(max_batch=3, max_seq_len=128, prefill_chunk=32, min_prefix=8, **kw)  # chunks of one block
    check_prefix_cache(model, Engine(model, **kw).start(), 1e-5 if dtype == torch.float32 else 2e-2, exact=kw)


@AHEAD
def test_engine_requests_arriving_together_compute_a_shared_prefix_once(monkeypatch, ahead):
    """Three requests submitted at once (n choices of one 70-token prompt, and a third sharing its
    first 64 tokens): the first computes the prefix, the others wait for its prefill and copy its
    64 columns; each gets the tokens and logprobs of the same engine without the cache, to the last
    bit on the native kernels (run ahead, on the torch path's padded steps, within 1e-5: the
    waits change which rows share a decode step, and a float head's GEMM is not exact per row)."""
    kw, _ = engine_args(monkeypatch, ahead)
    model = tiny()
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 512, (70,), generator=g).tolist()
    prompts = [prompt, prompt, prompt[:64] + torch.randint(3, 512, (9,), generator=g).tolist()]
    params = SamplingParams(max_tokens=5, logprobs=0)
    kw = dict(max_batch=3, max_seq_len=128, prefill_chunk=32, min_prefix=8, **kw)
    results = {}
    for cache in (True, False):
        engine = Engine(model, **{**kw, "prefix_cache": cache}).start()
        outs = [Cached() for _ in prompts]
        for p, c in zip(prompts, outs):
            engine.submit(p, params, c)
        for c in outs:
            c.wait()
        engine.stop()
        results[cache] = outs
    assert [c.cached for c in results[True]] == [0, 64, 64] and [c.cached for c in results[False]] == [0, 0, 0]
    for a, b, p in zip(results[True], results[False], prompts):
        assert a.tokens == b.tokens == alone(model, p, 5)
        if not ahead:  # the native kernels: exact per row in any batch
            assert [lp.logprob for lp in a.logprobs] == [lp.logprob for lp in b.logprobs]
        else:  # the padded steps on the torch path: a float head's GEMM sums a bucket of rows in its own order
            assert all(abs(x.logprob - y.logprob) < 1e-5 for x, y in zip(a.logprobs, b.logprobs))


def test_engine_without_prefix_cache_computes_every_prompt_bit_for_bit():
    """prefix_cache=False: the same 40-token prompt twice is computed twice, whole: no cached
    tokens, and the same logprobs to the last bit (with the cache the second would be a chunk of
    one token after 39 cached, equal within float rounding only)."""
    model = tiny()
    prompt = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    engine = Engine(model, max_batch=1, max_seq_len=128, prefix_cache=False).start()
    outs = [Cached(), Cached()]
    for c in outs:
        engine.submit(prompt, SamplingParams(max_tokens=4, logprobs=0), c)
    for c in outs:
        c.wait()
    engine.stop()
    assert outs[0].cached == outs[1].cached == 0
    assert outs[0].tokens == outs[1].tokens == alone(model, prompt, 4)
    assert [lp.logprob for lp in outs[0].logprobs] == [lp.logprob for lp in outs[1].logprobs]


def test_logprobs_parameters_are_checked():
    engine = Engine(tiny(), max_batch=1, max_seq_len=64)
    for bad, match in ((SamplingParams(max_tokens=0), "max_tokens must be an integer >= 1"),
                       (SamplingParams(logprobs=21), r"logprobs must be an integer in \[0, 20\]"),
                       (SamplingParams(prompt_logprobs=-1), r"prompt_logprobs must be an integer in \[0, 20\]")):
        with pytest.raises(ValueError, match=match):
            engine.submit([1, 2], bad, Collector())
    engine.submit([1, 2], SamplingParams(max_tokens=0, prompt_logprobs=0), Collector())  # a prompt scored


def test_engine_stops_at_eos_and_frees_the_slot():
    model = tiny()
    free = alone(model, PROMPTS[0], 12)
    eos = free[4]
    engine = Engine(model, max_batch=1, max_seq_len=128, eos_token_ids=[eos]).start()
    first, second = run(engine, [PROMPTS[0], PROMPTS[1]], SamplingParams(max_tokens=12))
    engine.stop()
    assert first.finish == "stop" and first.tokens == free[:free.index(eos) + 1]
    assert second.finish in ("stop", "length")  # the one slot served the second request after it


def test_cancel_frees_the_slot_for_the_next_request():
    model = tiny()
    gate = threading.Event()
    hold(model, gate)
    engine = Engine(model, max_batch=1, max_seq_len=128).start()
    long_one, waiting = Collector(), Collector()
    rid = engine.submit(PROMPTS[0], SamplingParams(max_tokens=100), long_one)
    engine.submit(PROMPTS[1], SamplingParams(max_tokens=5), waiting)
    until(lambda: engine.num_running == 1 and engine.num_waiting == 1)  # the first is in its prefill, held
    assert engine.cancel(rid) and not engine.cancel(rid)
    gate.set()
    assert waiting.wait().finish == "length" and len(waiting.tokens) == 5
    assert long_one.finish == "cancelled" and len(long_one.tokens) < 100
    engine.stop()


@AHEAD
def test_a_request_that_fails_in_the_model_fails_alone(monkeypatch, ahead):
    """A poison token makes the model raise: in a prompt (prefill), and as a token one request
    generates (a batched decode step, retried row by row; run ahead, the step queued ahead fails
    first and is dropped): only that request fails, the others get their solo tokens, and the
    engine keeps serving."""
    kw, chained = engine_args(monkeypatch, ahead)
    model = tiny()
    n = 10
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[4]]  # continuations that do not repeat one token
    solo = [alone(model, p, n) for p in prompts]
    # a token that request 1 generates first at step j >= 2 and that nothing else holds
    others = {t for i, s in enumerate(solo) for t in s + prompts[i] if i != 1} | set(prompts[1])
    j = next(j for j in range(2, n - 1) if solo[1][j] not in others | set(solo[1][:j]))
    poison = solo[1][j]

    def hook(module, args):
        if (args[0] == poison).any():
            raise RuntimeError("poisoned")

    model.model.embed_tokens.register_forward_pre_hook(hook)
    engine = Engine(model, max_batch=3, max_seq_len=128, **kw).start()
    outs = run(engine, prompts + [[poison, 5]], SamplingParams(max_tokens=n))
    # request 1 emits the poison, then the decode step that feeds it fails
    assert outs[1].finish == "error" and "poisoned" in outs[1].error and outs[1].tokens == solo[1][:j + 1]
    assert outs[3].finish == "error" and outs[3].tokens == []  # failed in its prefill
    assert outs[0].tokens == solo[0] and outs[2].tokens == solo[2]
    assert run(engine, [PROMPTS[0]], SamplingParams(max_tokens=n))[0].tokens == solo[0]  # still serving
    engine.stop()
    assert bool(chained) == bool(ahead)
    assert bool(chained.pieced) == (ahead == "pieces")


@pytest.mark.parametrize("ahead", [False, True], ids=["in-step", "run-ahead"])
def test_a_step_failing_outside_the_model_fails_its_requests_and_the_engine_serves_on(monkeypatch, caplog, ahead):
    """What fails after the model has run (in-step: choosing the step's tokens, as a host sync
    would; run ahead: reading a step's tokens back from the device) fails that step's requests, each
    told why, and nothing else: the engine goes on to serve the next request its solo tokens. Nor
    does a consumer that raises (its client gone) or an on_step hook that raises stop it."""
    import bitnet.serve.engine as engine_module

    kw, chained = engine_args(monkeypatch, ahead)
    model = tiny()
    n = 8
    solo = [alone(model, p, n) for p in PROMPTS[:3]]
    broken = {"left": 1}

    def once(real):
        def fail_once(*args, **kwargs):
            if broken["left"]:
                broken["left"] -= 1
                raise RuntimeError("device lost")
            return real(*args, **kwargs)
        return fail_once

    if ahead:
        monkeypatch.setattr(engine_module._Flight, "read", once(engine_module._Flight.read))
    else:
        monkeypatch.setattr(engine_module, "choose", once(engine_module.choose))
    engine = Engine(model, max_batch=2, max_seq_len=128, **kw)
    engine.on_step = lambda *a: 1 / 0
    failed = [Collector(), Collector()]
    for p, c in zip(PROMPTS[:2], failed):  # queued before the loop starts: both in its first step
        engine.submit(p, SamplingParams(max_tokens=n), c)
    with caplog.at_level("ERROR", logger="bitnet.serve"):
        engine.start()
        failed = [c.wait() for c in failed]
    assert broken["left"] == 0 and "engine step failed" in caplog.text
    for c, want in zip(failed, solo):
        # ended by the failure (before any token, or, run ahead, after the steps already read)
        assert c.finish == "error" and "RuntimeError: device lost" in c.error and c.tokens == want[:len(c.tokens)]

    class Gone(Collector):  # its first token's emit raises, as a closed event loop's would
        def __call__(self, out):
            super().__call__(out)
            if len(self.tokens) == 1 and out.finish_reason is None:
                raise RuntimeError("event loop is closed")

    gone, fine = Gone(), Collector()
    engine.submit(PROMPTS[0], SamplingParams(max_tokens=n), gone)
    engine.submit(PROMPTS[2], SamplingParams(max_tokens=n), fine)
    assert fine.wait().tokens == solo[2] and gone.wait().tokens == solo[0]
    engine.stop()
    assert bool(chained) == bool(ahead)


def test_engine_refuses_what_it_cannot_hold():
    model = tiny(max_position_embeddings=64)
    gate = threading.Event()
    hold(model, gate)
    engine = Engine(model, max_batch=1, max_seq_len=32, max_queue=1).start()
    with pytest.raises(ContextOverflow, match="maximum context length is 32 tokens.*at most 29 new"):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=30), Collector())
    for bad, match in [(SamplingParams(max_tokens=0), "max_tokens"), (SamplingParams(temperature=-1), "temperature"),
                       (SamplingParams(top_p=0.0), "top_p"), (SamplingParams(top_k=0), "top_k")]:
        with pytest.raises(ValueError, match=match):
            engine.submit([1], bad, Collector())
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        engine.submit([1, 512], SamplingParams(), Collector())
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit([], SamplingParams(), Collector())
    a, b = Collector(), Collector()
    engine.submit([1, 2], SamplingParams(max_tokens=3), a)  # takes the slot
    engine.submit([1, 2], SamplingParams(max_tokens=3), b)  # waits
    with pytest.raises(QueueFull):
        engine.submit([1, 2], SamplingParams(max_tokens=3), Collector())
    assert engine.retry_after() >= 1
    gate.set()
    engine.stop()  # drains: both finish
    assert a.wait().finish == b.wait().finish == "length"
    with pytest.raises(EngineClosed):
        engine.submit([1, 2], SamplingParams(), Collector())


def recorded_and_eager(model, option, prompts, n, max_batch):
    """The staggered logits with the runner's `option` (decode_graphs, prompt_graphs) on (True) and
    off (False), and the step sizes that had CUDA graphs recorded with it on."""
    got, recorded = {}, set()
    for graphs in (True, False):
        runner = ModelRunner(model, max_batch=max_batch, max_seq_len=128, **{option: graphs})
        got[graphs] = staggered(runner, prompts, n, max_batch)
        if graphs:
            recorded = {b for b, s in runner._buckets.items() if s.graph is not None} if option == "decode_graphs" \
                else {b for b, p in runner._pieces.items() if p.graphs}
        runner.close()
    return got, recorded


@pytest.mark.cuda
def test_decode_graphs_on_cuda_equal_the_eager_steps():
    """Each bucket's pure decode step recorded as a CUDA graph (the default on CUDA) and replayed,
    padded (3 sequences in a bucket of 4): the same logits as the eager steps, bit for bit, and
    graphs were recorded and replayed for the buckets used."""
    prompts = PROMPTS[:3]
    got, recorded = recorded_and_eager(tiny(dtype=torch.bfloat16).to("cuda"), "decode_graphs", prompts, 10, 4)
    assert recorded >= {1, 2, 4}
    for i in range(len(prompts)):
        assert torch.equal(got[True][i], got[False][i]), f"prompt {i}"


@pytest.mark.cuda
def test_prompt_graphs_on_cuda_give_each_sequence_its_solo_logits():
    """Steps with a prompt in them padded and recorded in pieces (the default on CUDA), the
    one-token rows' decode attention inside the pieces, the prompt's flash attention between them:
    each sequence's logits equal its lone run's and the eager steps', bit for bit, and pieces were
    recorded for the buckets used (16 and 64 tokens)."""
    model = tiny(dtype=torch.bfloat16).to("cuda")
    prompts = PROMPTS[:5]
    got, recorded = recorded_and_eager(model, "prompt_graphs", prompts, 8, 3)
    assert recorded == {16, 64}
    solo = [solo_logits(model, p, 8, device="cuda") for p in prompts]
    for i in range(len(prompts)):
        assert torch.equal(got[True][i], got[False][i]), f"prompt {i}"
        assert torch.equal(got[True][i], solo[i]), f"prompt {i}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batched_decode_on_cuda_gives_each_sequence_its_solo_logits(dtype):
    """On a GPU (Triton kernels for the packed layers, cuBLAS for the head row by row, one masked
    SDPA over the static cache as a lone GPU step runs it): staggered sequences get the logits of
    their lone runs bit for bit (seen on an H200, bf16 and fp32)."""
    model = tiny(dtype=dtype).to("cuda")
    prompts = PROMPTS[:4]
    solo, got = solo_and_batched(model, prompts, 10, 3, device="cuda")
    for i in range(len(prompts)):
        assert torch.equal(got[i], solo[i]), f"prompt {i}"


@pytest.mark.cuda
def test_engine_on_cuda_scores_prompts_and_tokens():
    """SCORED on a GPU (decode graphs, prompt graphs and run_ahead, its defaults; the head over every
    prompt position inside the pieces): solo tokens, logprobs within 2e-2 of a float64 log_softmax
    of the bf16 model's forward (bf16 logits; their ties leave the alternatives' order open)."""
    model = tiny(dtype=torch.bfloat16).to("cuda")
    engine = Engine(model, max_batch=3, max_seq_len=128, prefill_chunk=16).start()
    assert engine.run_ahead and engine.runner.decode_graphs and engine.runner.prompt_graphs
    check_scored(model, engine, 2e-2, False)


@pytest.mark.cuda
def test_engine_on_cuda_reuses_cached_prefixes():
    """check_prefix_cache on a GPU (decode graphs, prompt graphs, run_ahead): the copy of a running
    row's columns queued on the stream before the step that reads them; a chunk after a cached
    prefix in the recorded pieces. bf16, within 2e-2 (a GPU's prompt attention is not blocked: a
    chunk's numbers are the whole prompt's within rounding)."""
    model = tiny(dtype=torch.bfloat16).to("cuda")
    engine = Engine(model, max_batch=3, max_seq_len=128, prefill_chunk=16, min_prefix=8).start()
    assert engine.run_ahead and engine.runner.prompt_graphs
    check_prefix_cache(model, engine, 2e-2, exact=None)


@pytest.mark.cuda
def test_engine_on_cuda_runs_ahead_and_gives_each_stream_its_solo_tokens(monkeypatch):
    """The engine on a GPU (decode graphs and run_ahead, both its defaults): staggered requests,
    more than the slots, EOS ending some mid-way, different max_tokens, a sampled one beside them:
    each greedy stream gets its lone generate's tokens up to its own end, the sampled one its seeded
    generate's; steps were run ahead."""
    chained = []
    real = ModelRunner.decode_next
    monkeypatch.setattr(ModelRunner, "decode_next", lambda self, t: chained.append(1) or real(self, t))
    model = tiny(dtype=torch.bfloat16).to("cuda")
    free = [alone(model, p, 12) for p in PROMPTS]
    eos = [free[0][3], free[2][6]]
    engine = Engine(model, max_batch=3, max_seq_len=128, eos_token_ids=eos).start()
    assert engine.run_ahead and engine.runner.decode_graphs
    limits = [12, 12, 12, 1, 7, 12]
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, seed=4)
    outs = run(engine, PROMPTS + [PROMPTS[1]], [SamplingParams(max_tokens=m) for m in limits] + [sampled])
    engine.stop()
    for i, (c, m) in enumerate(zip(outs, limits)):
        assert c.tokens == upto_eos(free[i][:m], eos), f"prompt {i}"
    assert outs[-1].tokens == upto_eos(alone(model, PROMPTS[1], 10, temperature=0.9, top_k=40,
                                             generator=torch.Generator("cuda").manual_seed(4)), eos)
    assert chained

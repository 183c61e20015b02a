"""Generation: cached decode = full forward, greedy = transformers' generate, sampling, EOS,
padding, bad input, packed bytes in memory, torch.compile, and `bitnet generate`."""

import copy
import functools
import io
import re

import pytest
import torch
from reference import hf_config, hf_model, no_compile, rel_err, write_checkpoint

from bitnet import BitLinear, BitNetConfig, BitNetForCausalLM, freeze, weight_bytes
from bitnet.cli import main
from bitnet.generation import HostCopy, TextStream, decode_step, generate, left_pad, prefill, sample

pytestmark = pytest.mark.usefixtures("gpu_gemm_tile")  # whole models: the GEMMs in a GPU's tile (conftest.py)

PROMPTS = [[1, 5, 77, 3, 9, 120, 45], [1, 99, 12], [1, 64, 64, 8, 30]]


def tiny(linear="bitnet", dtype=torch.float32, seed=0, **kw):
    """A tiny model with weights large enough (std 0.05) that greedy output is not one repeated token."""
    torch.manual_seed(seed)
    model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", linear=linear, initializer_range=0.05, **kw))
    model = model.to(dtype).eval()
    return freeze(model) if linear == "bitnet" else model


def full_inputs(mask, n):
    """attention_mask and position_ids of prompt + n generated tokens, for a full forward."""
    full = torch.cat([mask.long(), torch.ones(mask.shape[0], n, dtype=torch.long)], dim=1)
    return full, (full.cumsum(1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- cache = full forward
def test_logits_to_keep_is_the_tail_of_the_logits():
    model = tiny()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        tail, full = model(ids, logits_to_keep=2).logits, model(ids).logits[:, -2:]
    # The lm_head is a float GEMM over 2 rows here and over every row there: BLAS may block and
    # sum the two shapes differently (AVX-512 kernels do), so the last bits may differ. fp32,
    # logits of order 1: a stated tolerance of 1e-5, far below any change that selects other rows.
    assert tail.shape == (1, 2, model.config.vocab_size)
    torch.testing.assert_close(tail, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        model(ids, labels=ids, logits_to_keep=1)


def cached_logits(model, ids, mask, seq):
    """Logits of prefill + one decode step per generated token of seq (B, T + n): (B, n, vocab)."""
    B, T = ids.shape
    n = seq.shape[1] - T
    model.setup_cache(B, seq.shape[1])
    key_mask = torch.ones(B, seq.shape[1], dtype=torch.bool)
    key_mask[:, :T] = mask.bool()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    steps = [prefill(model, ids, key_mask, pos)]
    for i in range(n - 1):
        steps.append(decode_step(model, seq[:, T + i:T + i + 1], torch.tensor([T + i]), pos[:, -1:] + 1 + i, key_mask))
    model.clear_cache()
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("linear,dtype,tol", [("bitnet", torch.float64, 1e-12), ("bf16", torch.float32, 1e-5)])
def test_cached_decode_logits_equal_full_forward(linear, dtype, tol):
    """Left-padded batch, prefill + 15 cached steps vs one forward over the whole sequence.

    The packed model quantizes each projection's input to int8, so an ulp of difference (the two
    paths sum attention in other orders) can move a code that sits on a rounding tie and the
    logits by ~1e-3. In float64 that needs an ulp of float64 to cross a float32 rounding boundary
    and a tie at once, which does not happen: there both paths see the same int8 codes and agree
    to 1e-12. Without a quantizer (the twin) float32 agrees to 1e-5. (Packed float32 is held to
    transformers' logits in test_greedy_equals_transformers_generate, ties accounted for.)
    """
    model = tiny(linear, dtype)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        seq = generate(model, ids, 16, attention_mask=mask)
        cached = cached_logits(model, ids, mask, seq)
        full_mask, pos = full_inputs(mask, 16)
        full = model(seq, attention_mask=full_mask, position_ids=pos).logits[:, ids.shape[1] - 1:-1]
    assert len(set(seq[:, ids.shape[1]:].flatten().tolist())) > 5  # a non-degenerate continuation
    assert rel_err(cached, full) < tol
    assert torch.equal(cached.argmax(-1), seq[:, ids.shape[1]:])  # and generate took the argmax


def test_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny(dtype=torch.float64)  # float64: no rounding tie separates the padded and the lone run
    ids, mask = left_pad(PROMPTS)
    batch = generate(model, ids, 12, attention_mask=mask)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([p]), 12)
        assert torch.equal(batch[i, ids.shape[1] - len(p):], alone[0])


# ----------------------------------------------------------------------------- vs transformers
def transformers_generate(path, ids, mask, n, eos, pad):
    from transformers import AutoModelForCausalLM

    with no_compile():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model.generate(ids, attention_mask=mask.long(), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                              pad_token_id=pad, return_dict_in_generate=True, output_logits=True)


def assert_same_greedy_tokens(ours, theirs, model, ids, mask, tie_tol):
    """Token for token, or else the first divergence of a row is a near-tie on one shared prefix.

    Two correct implementations can round one int8 activation code differently at a rounding
    tie (see logits_on_transformers_branch), which moves tiny-model logits by ~1e-3; greedy
    decoding then picks another token only if its top two logits are that close. So where a row
    diverges at step j, our logits on the shared prefix must equal theirs within tie_tol (the
    models agree) and the two tokens must be within 2 * tie_tol of each other (a near-tie); the
    tokens after a divergence cannot be compared. With the seeds here no row diverges.
    """
    T = ids.shape[1]
    for b in range(ids.shape[0]):
        n = min(ours.shape[1], theirs.sequences.shape[1]) - T
        diff = (ours[b, T:T + n] != theirs.sequences[b, T:T + n]).nonzero().flatten()
        if len(diff) == 0:
            assert ours.shape == theirs.sequences.shape
            continue
        j = int(diff[0])
        prefix = theirs.sequences[b:b + 1, :T + j]
        full_mask, pos = full_inputs(mask[b:b + 1], j)
        with torch.no_grad():
            our_logits = model(prefix, attention_mask=full_mask, position_ids=pos).logits[0, -1]
        their_logits = theirs.logits[j][b]
        assert rel_err(our_logits, their_logits) < tie_tol, f"row {b} diverges at step {j} where the models disagree"
        a, c = int(theirs.sequences[b, T + j]), int(ours[b, T + j])
        assert abs(their_logits[a] - their_logits[c]) / their_logits.abs().max() < 2 * tie_tol


@pytest.mark.parametrize("linear,dtype,tol", [("bitnet", torch.float64, 1e-12), ("bf16", torch.float32, 1e-5)])
def test_causal_prefix_prefill_equals_the_masked_one(linear, dtype, tol, monkeypatch):
    """forward(causal_prefix=True), the host-sync-free prefill a CUDA graph records: plain causal
    attention over the prompt's T slots (SDPA's is_causal, spied on), against the default path's
    explicit mask over the cache's slots; the logits of the prefill and of the decode steps after it
    agree (tolerances as in test_cached_decode_logits_equal_full_forward), and so without a cache
    (is_causal over the prompt). A prompt longer than the cache is a clear error."""
    import torch.nn.functional as F

    model = tiny(linear, dtype)
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    B, T = ids.shape
    seq = generate(model, ids, 6)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((k.shape[2], kw.get("is_causal", False))) or sdpa(q, k, v, **kw))

    def run(causal_prefix):
        model.setup_cache(B, seq.shape[1] + 8)
        key_mask = torch.ones(B, seq.shape[1] + 8, dtype=torch.bool)
        pos = torch.arange(T).expand(B, T)
        with torch.no_grad():
            steps = [prefill(model, ids, key_mask, pos, causal_prefix=causal_prefix)]
            for i in range(seq.shape[1] - T - 1):
                steps.append(decode_step(model, seq[:, T + i:T + i + 1], torch.tensor([T + i]),
                                         torch.full((B, 1), T + i), key_mask))
        model.clear_cache()
        return torch.stack(steps, dim=1)

    masked = run(False)
    assert calls and all(not causal for _, causal in calls)
    calls.clear()
    prefix = run(True)
    layers = model.config.num_hidden_layers
    assert calls[:layers] == [(T, True)] * layers  # the prefill's: causal over the prompt's slots
    assert rel_err(prefix, masked) < tol
    with torch.no_grad():
        assert rel_err(model(ids, causal_prefix=True).logits, model(ids).logits) < tol
        model.setup_cache(B, T - 1)
        with pytest.raises(ValueError, match=f"a prompt of {T} tokens does not fit the cache's {T - 1} slots"):
            prefill(model, ids, torch.ones(B, T - 1, dtype=torch.bool), torch.arange(T).expand(B, T), causal_prefix=True)
    model.clear_cache()


@pytest.mark.parametrize("mode,tie_tol", [("offline", 5e-3), (None, 1e-4)])
def test_greedy_equals_transformers_generate(tmp_path, mode, tie_tol):
    """Our greedy output vs transformers' generate on the same checkpoint (packed offline, and the
    unquantized twin), left-padded batch, with an EOS that stops one row early.

    The EOS id is the third token that row 1 generates without one (found by a first run), so
    that EOS handling is exercised whatever the random weights are; pad is 0.
    """
    write_checkpoint(hf_model(hf_config(), seed=0), tmp_path, mode)
    model = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids, mask = left_pad(PROMPTS)
    T = ids.shape[1]
    free = generate(model, ids, 20, attention_mask=mask)
    eos = int(free[1, T + 2])
    ours = generate(model, ids, 20, eos_token_id=eos, attention_mask=mask, pad_token_id=0)
    theirs = transformers_generate(tmp_path, ids, mask, 20, eos, 0)
    assert_same_greedy_tokens(ours, theirs, model, ids, mask, tie_tol)
    row = ours[1, T:].tolist()
    assert row[row.index(eos) + 1:] == [0] * (len(row) - row.index(eos) - 1)  # padding after EOS


# ----------------------------------------------------------------------------- EOS, sampling
def test_eos_stops_and_output_does_not_depend_on_the_check_interval():
    """EOS ids taken from a first run (a token each row generates by step 5), so every row ends
    and generation stops before max_new_tokens, whatever the random weights are."""
    model = tiny()
    ids, mask = left_pad(PROMPTS)
    T = ids.shape[1]
    free = generate(model, ids, 24, attention_mask=mask)
    eos = [int(free[0, T + 3]), int(free[1, T + 5]), int(free[2, T + 5])]
    runs = [generate(model, ids, 24, eos_token_id=eos, attention_mask=mask, pad_token_id=7, eos_check_every=k)
            for k in (1, 3, 8, 100)]
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    out = runs[0]
    ended = [next(j for j in range(24) if int(free[b, T + j]) in eos) for b in range(3)]
    for b, j in enumerate(ended):
        assert torch.equal(out[b, :T + j + 1], free[b, :T + j + 1])  # as without EOS, up to it
        assert (out[b, T + j + 1:] == 7).all()  # then padding
    assert out.shape[1] == T + max(ended) + 1 < T + 24  # stopped after the last EOS


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_running_ahead_changes_no_token(monkeypatch, temperature):
    """On a GPU generate queues the next step before the host reads a step's token (on_token) or
    the all-ended flag (generation.runs_ahead). Forced here on the CPU: the same output and the
    same streamed tokens as stepping after the host, greedy and sampled, with EOS at every check
    interval, and at most one step more (decoded in vain after the last EOS)."""
    import bitnet.generation as generation

    model = tiny()
    ids, mask = left_pad(PROMPTS)
    T = ids.shape[1]
    free = generate(model, ids, 24, attention_mask=mask)
    eos = [int(free[0, T + 3]), int(free[1, T + 5]), int(free[2, T + 5])]
    steps = []
    real = generation.decode_step
    monkeypatch.setattr(generation, "decode_step", lambda *a: steps.append(1) or real(*a))

    def run(ahead, **kw):
        monkeypatch.setattr(generation, "runs_ahead", lambda device: ahead)
        streamed, steps[:] = [], []
        out = generate(model, ids, 24, temperature, attention_mask=mask, pad_token_id=7, on_token=streamed.append,
                       generator=torch.Generator().manual_seed(5), **kw)
        return out, torch.stack(streamed, dim=1), len(steps)

    for kw in ({}, *({"eos_token_id": eos, "eos_check_every": k} for k in (1, 3, 8, 100))):
        (out, streamed, n), (out_ahead, streamed_ahead, n_ahead) = run(False, **kw), run(True, **kw)
        assert torch.equal(out_ahead, out) and torch.equal(streamed_ahead, streamed), kw
        kept = out.shape[1] - T  # streamed past the last EOS: padding, cut from the output
        assert torch.equal(streamed[:, :kept], out[:, T:]) and (streamed[:, kept:] == 7).all()
        assert n_ahead == n + (streamed.shape[1] < 24), kw  # a step in vain where an all-ended check stopped it


def test_a_host_copy_holds_the_values_it_was_made_from():
    """HostCopy on the CPU: copies made at once (the source changed in place afterwards, the copy
    keeps its values), None passed through."""
    t, flag = torch.arange(5), torch.tensor(False)
    read = HostCopy(t, None, flag)
    t.add_(10)
    flag.fill_(True)
    got, none, done = read.get()
    assert got.tolist() == [0, 1, 2, 3, 4] and none is None and not bool(done)


@pytest.mark.cuda
def test_a_host_copy_does_not_wait_for_later_work():
    """On a GPU, HostCopy.get() returns the values as they were when the copy was made, while work
    queued after it still runs: torch.cuda._sleep (about 0.5 s) and an in-place change of the
    source are queued after the copy; get() returns before the stream is idle, with the old values.
    (`t.tolist()` here would wait for the sleep.)"""
    t = torch.arange(8, device="cuda")
    torch.cuda.synchronize()
    read = HostCopy(t, t.sum() > 100)
    torch.cuda._sleep(1_000_000_000)
    t.add_(1)
    got, flag = read.get()
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy, "get() waited for the work queued after the copy"
    assert got.device.type == "cpu" and got.tolist() == list(range(8)) and not bool(flag)
    assert t.tolist() == list(range(1, 9))


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_streamed_token_is_read_while_the_next_step_runs(cuda_graph):
    """generate on a GPU queues step i + 1 before on_token gets step i's token (runs_ahead), and the
    token comes to the host without waiting for step i + 1 (HostCopy): each step here starts with
    torch.cuda._sleep (~25 ms, a forward pre-hook, recorded into the graph too), and on_token, having
    read its token, finds the stream still busy for every token but the last (no step follows it).
    The tokens are those of a run without the sleeps."""
    model = tiny(dtype=torch.bfloat16).to("cuda")
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    free = generate(model, ids, 8, cuda_graph=cuda_graph)
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(50_000_000))
    busy, streamed = [], []

    def on_token(tokens):
        streamed.append(tokens.tolist())
        busy.append(not torch.cuda.current_stream().query())

    try:
        out = generate(model, ids, 8, cuda_graph=cuda_graph, on_token=on_token)
    finally:
        hook.remove()
    assert torch.equal(out, free) and [s[0] for s in streamed] == free[0, ids.shape[1]:].tolist()
    assert busy[:-1] == [True] * 7, busy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_is_argmax_ties_and_nan_included(dtype):
    """generation.greedy_tokens (max(dim).indices, faster than argmax on bf16 CPU logits) picks what
    torch.argmax picks: the first of equal maxima (bf16 logits rounded to integers: many ties), a
    NaN where there is one, index 0 of a row all -inf."""
    from bitnet.generation import greedy_tokens

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = (torch.randn(4, 5000, generator=g) * 3).round().to(dtype)
        x[0, 1234] = float("nan")
        x[1] = float("-inf")
        assert torch.equal(greedy_tokens(x), x.argmax(dim=-1))
        assert greedy_tokens(x)[1] == 0 and greedy_tokens(x)[0] == 1234


def test_sample_distribution_top_k_top_p():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().expand(40000, 5)
    g = torch.Generator().manual_seed(0)

    def freq(**kw):
        return torch.bincount(sample(logits, generator=g, **kw), minlength=5).float() / logits.shape[0]

    torch.testing.assert_close(freq(temperature=1.0), probs, atol=0.01, rtol=0)
    torch.testing.assert_close(freq(temperature=1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.01, rtol=0)
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it -> the first two tokens
    torch.testing.assert_close(freq(temperature=1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.01, rtol=0)
    flat = freq(temperature=100.0)
    assert (flat > 0.17).all()  # a high temperature flattens toward uniform
    assert torch.equal(sample(logits[:3], temperature=1.0, top_k=1, generator=g), torch.zeros(3, dtype=torch.long))
    assert torch.equal(sample(logits[:3], temperature=1.0, top_p=0.1, generator=g), torch.zeros(3, dtype=torch.long))


def test_sampling_is_reproducible_with_a_generator():
    model = tiny()
    ids = torch.tensor([PROMPTS[0]])

    def run(seed):
        return generate(model, ids, 16, temperature=1.0, top_k=50, top_p=0.95, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# ----------------------------------------------------------------------------- cache, bad input
def test_cache_is_freed_unless_the_caller_set_it_up():
    model = tiny()
    ids = torch.tensor([PROMPTS[0]])
    ref = generate(model, ids, 8)
    assert model.model.layers[0].self_attn.kv_cache is None
    model.setup_cache(1, 100)
    cache = model.model.layers[0].self_attn.kv_cache
    assert torch.equal(generate(model, ids, 8), ref)
    assert torch.equal(generate(model, ids, 8), ref)  # stale slots of the last call are never seen
    assert model.model.layers[0].self_attn.kv_cache is cache
    model.clear_cache()


@pytest.mark.parametrize("linear,dtype,kept", [("bitnet", torch.bfloat16, torch.bfloat16), ("bitnet", torch.float32, torch.float32),
                                               ("bf16", torch.bfloat16, torch.float32)])
def test_a_packed_bf16_model_keeps_a_bf16_cache_with_the_same_logits(linear, dtype, kept):
    """On the CPU a packed bf16 model's KV cache is bf16 (half the bytes; its keys and values are
    bf16 values already) and gives the float32 cache's logits and tokens, bit for bit: padded
    prompts, prefill and decode, the native decode layers reading it. A float32 model, and the bf16
    twin (its attention in torch, over a float32 cache), keep float32."""
    import bitnet.generation as G

    model = tiny(linear, dtype)
    ids, mask = left_pad(PROMPTS)
    seen, logits = [], []
    real = model.setup_cache
    model.setup_cache = lambda *a, **k: real(*a, **k) or seen.append(model.model.layers[0].self_attn.kv_cache.k.dtype)
    hook = model.lm_head.register_forward_hook(lambda mod, i, o: logits.append(o.detach().clone()))
    out = generate(model, ids, 12, attention_mask=mask)
    n = len(logits)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(G, "cache_dtype", lambda model, device=None: torch.float32)
        wide = generate(model, ids, 12, attention_mask=mask)
    hook.remove()
    assert seen == [kept, torch.float32]
    assert torch.equal(out, wide) and n == len(logits) - n
    assert all(torch.equal(a, b) for a, b in zip(logits[:n], logits[n:]))


def test_bad_input_is_a_clear_error():
    model = tiny(max_position_embeddings=32)
    ok = torch.tensor([[1, 2, 3]])
    cases = [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
        (dict(input_ids=torch.tensor([[0, 5], [0, 6]]), attention_mask=torch.tensor([[0, 1], [0, 0]])), r"empty prompt: row\(s\) \[1\]"),
        (dict(input_ids=torch.ones(1, 33, dtype=torch.long)), "prompt of 33 tokens is longer than the context of 32"),
        (dict(input_ids=torch.ones(1, 30, dtype=torch.long), max_new_tokens=5), r"exceeds the context .* at most 2 new"),
        (dict(attention_mask=torch.tensor([[1, 1, 0]])), "left-padded"),
        (dict(input_ids=torch.tensor([[1, 512]])), r"token ids must lie in \[0, 512\)"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer tensor"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(eos_token_id="2"), "eos_token_id must be an int"),
    ]
    for kw, match in cases:
        kw = {"input_ids": ok, "max_new_tokens": 4, **kw}
        with pytest.raises(ValueError, match=match):
            generate(model, kw.pop("input_ids"), kw.pop("max_new_tokens"), **kw)
    assert generate(model, ok, 29).shape == (1, 32)  # exactly the context is fine
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([[1, 2], []])


# ----------------------------------------------------------------------------- packed bytes
def test_offline_checkpoint_stays_packed_in_memory(tmp_path):
    """From an offline checkpoint: 2 bits a weight in memory, a quarter of int8, an eighth of bf16."""
    write_checkpoint(hf_model(hf_config()), tmp_path / "packed", "offline")
    write_checkpoint(hf_model(hf_config()), tmp_path / "twin", None)
    model = BitNetForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(linears) == 14
    n_weights = sum(m.out_features * m.in_features for m in linears)
    for m in linears:
        assert m.weight.dtype == torch.uint8 and m.weight.numel() * 4 == m.out_features * m.in_features
        # no float copy of the weights: BitLinear holds Parameters only for a bias or an input norm
        assert all(n.startswith(("bias", "rms_norm.")) for n, _ in m.named_parameters()), list(m.named_parameters())
        assert [n for n, b in m.named_buffers() if b.is_floating_point()] == ["weight_scale"]
    packed = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    assert packed == n_weights // 4 == (n_weights * 1) // 4 == (n_weights * 2) // 8
    sizes = weight_bytes(model)
    assert sizes["linear"] == packed + 4 * len(linears)  # + one float32 scale per matrix
    twin = BitNetForCausalLM.from_pretrained(tmp_path / "twin", dtype=torch.bfloat16)
    twin_sizes = weight_bytes(twin)
    assert twin_sizes["linear"] == 2 * n_weights == 8 * packed
    assert twin_sizes["other"] == sizes["other"]  # embeddings and norms alike
    # generating keeps it so, and casting the model's dtype leaves the packed bytes alone
    generate(model, torch.tensor([PROMPTS[0]]), 4)
    model.to(torch.float32)
    assert all(m.weight.dtype == torch.uint8 for m in linears)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_runs_as_on_the_first():
    """Triton launches on the current device, and a CUDA graph records and replays on the current
    device's stream, whatever device the tensors are on: a model on cuda:1 while cuda:0 is current
    (every launch switches to its tensors' device, kernels/launch.py; generate runs with the model's
    GPU current, bitnet.ops.on_device) gives the logits and the tokens it gives on cuda:0, eager and
    recorded; and cuda:0 is current again afterwards. (The lent GPU machines have one GPU: this
    runs on a machine with two.)"""
    base = freeze(tiny(dtype=torch.bfloat16))
    ids = torch.tensor([PROMPTS[0]])
    runs = {}
    for index in (0, 1):
        model = copy.deepcopy(base).to(f"cuda:{index}")
        x = ids.to(f"cuda:{index}")
        torch.cuda.set_device(0)
        with torch.no_grad():
            logits = model(x).logits.cpu()
        runs[index] = (logits, *(generate(model, x, 8, cuda_graph=g).cpu() for g in (False, True)))
        assert torch.cuda.current_device() == 0
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2]) and torch.equal(runs[0][1], runs[0][2])


@pytest.mark.cuda
def test_offline_checkpoint_stays_packed_on_cuda(tmp_path):
    write_checkpoint(hf_model(hf_config()), tmp_path, "offline")
    model = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    linears = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert all(m.weight.is_cuda and m.weight.dtype == torch.uint8 for m in linears)
    out = generate(model, torch.tensor([PROMPTS[0]], device="cuda"), 8, compile=True)
    assert out.shape == (1, len(PROMPTS[0]) + 8)


# ----------------------------------------------------------------------------- compile
def test_decode_step_traces_as_one_graph():
    """No graph break in a decode step (checked with dynamo's eager backend: seconds, not minutes)."""
    model = tiny()
    model.setup_cache(2, 64)
    step = torch.compile(decode_step, backend="eager", fullgraph=True)
    with torch.no_grad():
        logits = step(model, torch.tensor([[3], [4]]), torch.tensor([5]), torch.tensor([[4], [1]]),
                      torch.ones(2, 64, dtype=torch.bool))
    model.clear_cache()
    assert logits.shape == (2, 512)


def test_compiled_generate_equals_eager():
    """compile=True with inductor on the CPU (about 30 s of compiling on 2 cores, once)."""
    model = tiny()
    ids, mask = left_pad(PROMPTS)
    assert torch.equal(generate(model, ids, 10, attention_mask=mask, compile=True),
                       generate(model, ids, 10, attention_mask=mask))


def test_cuda_graph_needs_a_cuda_model_and_no_compile():
    model = tiny()
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(model, torch.tensor([PROMPTS[0]]), 4, cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_generate_equals_eager(dtype, monkeypatch):
    """The eager decode step recorded once and replayed (generate's default on CUDA): the same
    tokens as eager, batch with padding; the recording is reused for the model's held cache and
    dropped with it; a recording that fails falls back to eager decoding, the same tokens."""
    import bitnet.generation as generation

    model = tiny(dtype=dtype).to("cuda")
    ids, mask = left_pad(PROMPTS)
    ids, mask = ids.cuda(), mask.cuda()
    eager = generate(model, ids, 12, attention_mask=mask, cuda_graph=False)
    assert torch.equal(generate(model, ids, 12, attention_mask=mask, cuda_graph=True), eager)
    assert torch.equal(generate(model, ids, 12, attention_mask=mask), eager)  # the default
    from bitnet.kernels import common

    with monkeypatch.context() as m:
        m.setattr(common, "PDL_ENABLED", common.PDL_ENABLED)  # restored after: a failed recording turns PDL off
        tries = []
        m.setattr(generation, "CapturedStep", lambda *a: tries.append(1) or (_ for _ in ()).throw(RuntimeError("capture failed")))
        before, in_use = common.PDL_ENABLED, common.pdl_in_use()  # (in use: a Hopper GPU, the probe passed)
        assert torch.equal(generate(model, ids, 12, attention_mask=mask), eager)
        # in use: tried once more without PDL, which failed too, so PDL is back on (not what failed); then eager
        assert len(tries) == 1 + in_use and common.PDL_ENABLED == before
    model.setup_cache(ids.shape[0], 64)
    first = generate(model, ids, 12, attention_mask=mask, cuda_graph=True)
    held = model._captured_step
    assert torch.equal(first, eager) and held is not None
    assert torch.equal(generate(model, ids, 12, attention_mask=mask, cuda_graph=True), eager)
    assert model._captured_step is held  # replayed, not recorded again
    model.clear_cache()
    assert model._captured_step is None


@pytest.mark.cuda
def test_the_recorded_step_carries_no_call_of_its_own():
    """The recorded greedy step (CapturedStep: the decode step, the argmax, the EOS bookkeeping and
    the token's store in one graph) holds no value of the call that recorded it: replayed for
    prompts of other lengths and other batches on the same cache, with EOS ending rows at
    different steps, the same tokens as eager decoding; sampled decoding (the graph gives logits,
    the host draws) the same tokens as eager with the same generator seed."""
    model = tiny(dtype=torch.bfloat16).to("cuda")
    model.setup_cache(len(PROMPTS), 64)
    # two padded batches (prompt lengths 7 and 4: one recording), then an unpadded one (no key mask)
    batches = [left_pad(PROMPTS), left_pad([PROMPTS[1], [1, 2], [5, 6, 7, 8]]), left_pad([p[-2:] for p in PROMPTS])]
    free = generate(model, batches[0][0].cuda(), 24, attention_mask=batches[0][1].cuda(), cuda_graph=False)
    T = batches[0][0].shape[1]
    eos = [int(free[0, T + 3]), int(free[2, T + 9])]
    for kw in ({}, {"eos_token_id": eos, "eos_check_every": 1}, {"eos_token_id": eos}):
        recordings = []
        for ids, mask in batches:
            ids, mask = ids.cuda(), mask.cuda()
            eager = generate(model, ids, 24, attention_mask=mask, cuda_graph=False, **kw)
            replayed = generate(model, ids, 24, attention_mask=mask, cuda_graph=True, **kw)
            assert torch.equal(replayed, eager), (kw, ids.shape)
            recordings.append(model._captured_step[1])
        assert recordings[0] is recordings[1] is not recordings[2]  # the second batch replayed the first's
    ids = batches[0][0].cuda()
    draws = [generate(model, ids, 16, temperature=0.9, top_k=40, cuda_graph=graph,
                      generator=torch.Generator("cuda").manual_seed(3)) for graph in (False, True)]
    assert torch.equal(draws[0], draws[1])
    model.clear_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("linear", ["bitnet", "bf16"])
def test_recorded_prefill_equals_eager(linear):
    """A prefill recorded as a CUDA graph (CapturedForward over prefill with causal_prefix, what
    bench_generate times beside the eager prefill) and replayed on another prompt of the same
    length: its logits and the KV cache it wrote equal an eager prefill's of that prompt bit for bit
    (the eager one takes the same causal path after its host sync)."""
    from bitnet.generation import CapturedForward

    model = tiny(linear, torch.bfloat16).to("cuda")
    B, T = 2, 48
    prompts = [torch.randint(0, model.config.vocab_size, (B, T), device="cuda", generator=torch.Generator("cuda").manual_seed(s))
               for s in (1, 2)]
    key_mask = torch.ones(B, T + 16, dtype=torch.bool, device="cuda")
    pos = torch.arange(T, device="cuda").expand(B, T)
    model.setup_cache(B, T + 16)
    attn = [layer.self_attn for layer in model.model.layers]
    with torch.no_grad():
        eager = prefill(model, prompts[1], key_mask, pos).clone()
        caches = [(a.kv_cache.k[:, :, :T].clone(), a.kv_cache.v[:, :, :T].clone()) for a in attn]
        recorded = CapturedForward(functools.partial(prefill, causal_prefix=True), model, prompts[0], key_mask, pos)
        replayed = recorded(model, prompts[1], key_mask, pos)
        torch.cuda.synchronize()
    assert not torch.equal(prompts[0], prompts[1])
    assert torch.equal(replayed, eager)
    for a, (k, v) in zip(attn, caches):
        assert torch.equal(a.kv_cache.k[:, :, :T], k) and torch.equal(a.kv_cache.v[:, :, :T], v)
    model.clear_cache()


def test_a_failed_recording_is_retried_without_pdl(monkeypatch, caplog):
    """ops.record_cuda_graph: where recording fails with programmatic dependent launch on, the
    recording runs once more without it, and where that succeeds PDL stays off for the process
    (logged); with PDL off already, on a device that launches no dependents (a CPU runner, a GPU
    before Hopper), or failing again (PDL then turned back on: not what failed), the failure is the
    caller's. (pdl() itself never applies off CUDA.)"""
    from bitnet import ops
    from bitnet.kernels import common

    assert common.pdl(torch.zeros(1)) == {"PDL": False}
    monkeypatch.setattr(common, "PDL_ENABLED", True)
    monkeypatch.setattr(common, "_PDL_DEVICES", {0: True})  # as after a launch on a Hopper GPU
    calls = []

    def record():
        calls.append(common.PDL_ENABLED)
        if common.PDL_ENABLED:
            raise RuntimeError("operation not permitted when stream is capturing")
        return "graph"

    with caplog.at_level("WARNING"):
        assert ops.record_cuda_graph(record, "a step", "cuda:0") == "graph"
    assert calls == [True, False] and not common.PDL_ENABLED and "(as BITNET_PDL=0)" in caplog.text
    calls.clear()
    monkeypatch.setattr(common, "PDL_ENABLED", True)  # a CPU runner's recording: PDL is not what failed it
    with pytest.raises(RuntimeError, match="operation not permitted"):
        ops.record_cuda_graph(record, "a step", "cpu")
    assert calls == [True] and common.PDL_ENABLED
    calls.clear()
    monkeypatch.setattr(common, "PDL_ENABLED", False)
    with pytest.raises(RuntimeError, match="always"):
        ops.record_cuda_graph(lambda: calls.append(1) or (_ for _ in ()).throw(RuntimeError("always")), "a step")
    assert calls == [1]  # PDL was off already: no second try
    monkeypatch.setattr(common, "PDL_ENABLED", True)
    with pytest.raises(RuntimeError, match="always"):
        ops.record_cuda_graph(lambda: calls.append(2) or (_ for _ in ()).throw(RuntimeError("always")), "a step")
    assert calls == [1, 2, 2] and common.PDL_ENABLED  # failed without PDL too: PDL back on
    monkeypatch.setattr(common, "PDL_ENABLED", True)
    monkeypatch.setattr(common, "_PDL_DEVICES", {0: False})  # no device launches dependents (or none has yet)
    with pytest.raises(RuntimeError, match="always"):
        ops.record_cuda_graph(lambda: calls.append(3) or (_ for _ in ()).throw(RuntimeError("always")), "a step")
    assert calls == [1, 2, 2, 3] and common.PDL_ENABLED


@pytest.mark.cuda
@pytest.mark.parametrize("unpack_m", [None, 2])
def test_pdl_launches_equal_serialized_ones(monkeypatch, unpack_m):
    """The Triton kernels launched as programmatic dependents (common.pdl, the default from sm_90
    on; each waits for its predecessor before reading what it wrote): the same tokens, eagerly and
    replayed from a CUDA graph, as with every launch serialized (BITNET_PDL=0); and the graph records
    with PDL on (no fallback; common.pdl_probe passes here). unpack_m 2: the prefill's and the batched
    decode's projections take the long-prefill path (the norm and the unpack in one launch, then the
    int8 GEMM, both dependents)."""
    from bitnet.kernels import common
    from bitnet.kernels import gemm as gemm_module

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 (this GPU launches serialized)")
    if unpack_m is not None:
        monkeypatch.setattr(gemm_module, "UNPACK_M", unpack_m)
    model = tiny(dtype=torch.bfloat16).to("cuda")
    ids, mask = left_pad(PROMPTS)
    ids, mask = ids.cuda(), mask.cuda()
    monkeypatch.setattr(common, "PDL_ENABLED", False)
    serialized = generate(model, ids, 16, attention_mask=mask, cuda_graph=False)
    monkeypatch.setattr(common, "PDL_ENABLED", True)
    assert common.pdl_probe(ids.get_device())  # dependent increments, eager and replayed from a graph, count right
    assert common.pdl(ids) == {"PDL": True, "launch_pdl": True}
    assert torch.equal(generate(model, ids, 16, attention_mask=mask, cuda_graph=False), serialized)
    model.setup_cache(ids.shape[0], 64)
    assert torch.equal(generate(model, ids, 16, attention_mask=mask, cuda_graph=True), serialized)
    assert model._captured_step is not None and common.PDL_ENABLED  # recorded with PDL, not after a fallback


# ----------------------------------------------------------------------------- `bitnet generate`
def checkpoint_with_tokenizer(path, tokenizer, **kw):
    model = tiny(vocab_size=tokenizer.get_vocab_size(), **kw)
    model.tokenizer_files["tokenizer.json"] = tokenizer.to_str().encode()
    model.save_pretrained(path)
    return model


def test_cli_generate_streams_the_greedy_continuation(tmp_path, tokenizer, capsys):
    """On the CPU, held to generate() of the float32 model in this process (the CLI's default device
    is cuda where there is one: test_cli_generate_on_cuda)."""
    model = checkpoint_with_tokenizer(tmp_path, tokenizer, eos_token_id=None)
    cmd = ["generate", str(tmp_path), "--device", "cpu", "--prompt", "hello world", "--max-new-tokens", "12"]
    assert main(cmd) == 0
    out = capsys.readouterr()
    prompt_ids = tokenizer.encode("hello world").ids
    ids = generate(model, torch.tensor([prompt_ids]), 12)[0].tolist()
    assert out.out == tokenizer.decode(ids) + "\n"
    assert "12 tokens in" in out.err


def test_cli_generate_stops_at_an_eos_id_of_generation_config(tmp_path, tokenizer, capsys):
    """A folder's generation_config.json may name end tokens config.json does not (checkpoints of the
    Llama 3 vocabulary list e.g. [128001, 128008, 128009] there, <|eot_id|> ending a chat turn,
    beside config.json's 128001): the CLI stops at any of them, and prints none. Here config.json names a token greedy decoding never reaches, generation_config
    a list holding a token of the continuation that first comes fourth or later: the text is the
    tokens before it, and the rates count those and the end token. A malformed list is refused,
    naming the file's key."""
    import json

    model = checkpoint_with_tokenizer(tmp_path, tokenizer, eos_token_id=None)
    prompt_ids = tokenizer.encode("hello world").ids
    free = generate(model, torch.tensor([prompt_ids]), 12)[0, len(prompt_ids):].tolist()
    first = next(j for j in range(3, len(free)) if free[j] not in free[:j])
    stop = free[first]
    never = next(t for t in range(tokenizer.get_vocab_size()) if t not in free)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": never}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [never, stop]}))
    cmd = ["generate", str(tmp_path), "--device", "cpu", "--prompt", "hello world", "--max-new-tokens", "12"]
    assert main(cmd) == 0
    out = capsys.readouterr()
    assert out.out == tokenizer.decode(prompt_ids + free[:first]) + "\n"
    assert f"{first + 1} tokens in" in out.err
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop, "2"]}))
    assert main(cmd) == 2
    assert re.search(r"generation_config eos_token_id must be an int or a list of ints, got \[\d+, '2'\]",
                     capsys.readouterr().err)


@pytest.mark.cuda
def test_cli_generate_on_cuda(tmp_path, tokenizer, capsys, monkeypatch):
    """The CLI's default device where there is a GPU: it runs there (Triton kernels, bf16) and streams
    12 tokens after the prompt, its decode step recorded as a CUDA graph once (by default) and
    replayed, the same text as eager decoding (--no-cuda-graph: the same kernels). Its tokens are not
    held to the CPU's: another device sums the float parts in another order, and a rounding tie of
    an int8 code may then pick another token."""
    import bitnet.generation as generation

    recorded = []
    real = generation.CapturedStep
    monkeypatch.setattr(generation, "CapturedStep", lambda *a: recorded.append(1) or real(*a))
    checkpoint_with_tokenizer(tmp_path, tokenizer, eos_token_id=None)
    cmd = ["generate", str(tmp_path), "--prompt", "hello world", "--max-new-tokens", "12"]
    assert main(cmd) == 0
    out = capsys.readouterr()
    assert out.out.startswith("hello world") and out.out.endswith("\n")
    assert "12 tokens in" in out.err
    assert recorded == [1]  # recorded at the warm-up, replayed by the timed call
    assert main([*cmd, "--no-cuda-graph"]) == 0
    assert capsys.readouterr().out == out.out and recorded == [1]


def test_text_stream_prints_multibyte_characters_whole(tokenizer):
    prompt, text = tokenizer.encode("hello ").ids, "naïve café, 😀 grüße"
    ids = tokenizer.encode(text).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token holds part of a character
    buf = io.StringIO()
    stream = TextStream(tokenizer, prompt, out=buf)
    for i in ids:
        stream.put(i)
        assert "\ufffd" not in buf.getvalue()
    stream.end()
    assert buf.getvalue() == text


def other_tokenizers():
    """A SentencePiece-style BPE (Metaspace: the decoder strips the first token's leading space)
    and a WordPiece one (its decoder joins "##" pieces and cleans spaces before punctuation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ["hello world, a tiny corpus for a tiny tokenizer.", "naïve café, 😀 grüße! it's (nested) text"] * 20
    meta = Tokenizer(models.BPE(unk_token="<unk>"))
    meta.pre_tokenizer, meta.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    meta.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"]))
    piece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    piece.pre_tokenizer, piece.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece(cleanup=True)
    piece.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[CLS]"]))
    return {"metaspace": meta, "wordpiece": piece}


def streamed(tokenizer, prompt, ids):
    """The pieces TextStream prints for ids after prompt, its end's included."""
    pieces = []

    class Out:
        def write(self, text):
            pieces.append(text)

        def flush(self):
            pass

    stream = TextStream(tokenizer, prompt, out=Out())
    for i in ids:
        stream.put(i)
    stream.end()
    return pieces


def test_text_stream_prints_what_the_whole_decode_adds(tokenizer, monkeypatch):
    """For byte-level BPE, Metaspace and WordPiece tokenizers, on real text and on random token ids
    (split and broken characters included), with special tokens among them: what TextStream prints,
    a token at a time, adds up to the tokenizer's decode of prompt tail + generated ids less that of
    the prompt tail; with valid text no piece holds U+FFFD. Likewise where DecodeStream fails mid-way
    and the stream goes on with whole decodes."""
    from tokenizers.decoders import DecodeStream

    text = "naïve café, 😀 grüße! hello world, it's (nested) text"
    g = torch.Generator().manual_seed(0)
    for name, tok in {"byte-level": tokenizer, **other_tokenizers()}.items():
        prompt = tok.encode("hello world, a tiny").ids
        real = tok.encode(text).ids
        special = tok.token_to_id("<s>") if tok.token_to_id("<s>") is not None else tok.token_to_id("[CLS]")
        noise = torch.randint(0, tok.get_vocab_size(), (300,), generator=g).tolist()
        for ids in (real, real[:5] + [special] + real[5:], noise):
            context = prompt[-TextStream.CONTEXT:]
            whole = tok.decode(context + ids, skip_special_tokens=True)
            want = whole[len(tok.decode(context, skip_special_tokens=True)):]
            pieces = streamed(tok, prompt, ids)
            assert "".join(pieces) == want, (name, ids[:8])
            if ids is not noise:
                assert not any("\ufffd" in p for p in pieces), name
    ids = tokenizer.encode(text).ids
    context = tokenizer.encode("hello world, a tiny").ids[-TextStream.CONTEXT:]
    calls = []

    class Failing:  # DecodeStream that refuses the 7th generated token's window
        def __init__(self, **kw):
            self.inner = DecodeStream(**kw)

        def step(self, tok, token):
            calls.append(token)
            if len(calls) == len(context) + 7:
                raise Exception("invalid prefix")
            return self.inner.step(tok, token)

    monkeypatch.setattr("tokenizers.decoders.DecodeStream", Failing)
    want = tokenizer.decode(context + ids)[len(tokenizer.decode(context)):]
    assert "".join(streamed(tokenizer, context, ids)) == want and len(calls) == len(context) + 7


def test_cli_generate_bad_input(tmp_path, tokenizer, capsys):
    checkpoint_with_tokenizer(tmp_path / "m", tokenizer, max_position_embeddings=8)
    cmd = ["generate", str(tmp_path / "m"), "--device", "cpu", "--prompt"]  # the CPU tier, GPU or not
    assert main([*cmd, ""]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main([*cmd, "hello world, a tiny corpus for a tiny tokenizer"]) == 2
    assert "longer than the context of 8 tokens" in capsys.readouterr().err
    assert main([*cmd, "hello", "--max-new-tokens", "50"]) == 0
    assert "clipped to" in capsys.readouterr().err
    assert main([*cmd, "hello", "--cuda-graph"]) == 2
    assert "cuda_graph records CUDA graphs of the eager step: it needs a CUDA model" in capsys.readouterr().err
    (tmp_path / "m" / "tokenizer.json").unlink()
    assert main([*cmd, "hello"]) == 2
    assert f"no tokenizer.json in {tmp_path / 'm'}" in capsys.readouterr().err

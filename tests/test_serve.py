"""`bitnet serve`, the real thing: uvicorn on 127.0.0.1 on a free port, driven by the official
`openai` client and by raw HTTP. Solo greedy outputs for concurrent clients (completions, chat
through the folder's chat template, streamed and not), the bad-input and auth tables (OpenAI's
error body, the right 4xx), overload (429 + Retry-After), a disconnect mid-stream freeing its slot,
a request the model fails on failing alone, /metrics through Prometheus' parser, and SIGTERM
draining a stream of the `bitnet serve` process. The engine alone: tests/test_scheduler.py."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

REASON = "needs the serve extra and its test clients: pip install -e '.[serve]' openai httpx"
for _module in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client", "openai", "httpx"):
    pytest.importorskip(_module, reason=REASON)

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bitnet import BitNetConfig, BitNetForCausalLM, freeze  # noqa: E402
from bitnet.bench import free_port  # noqa: E402
from bitnet.generation import generate  # noqa: E402
from bitnet.serve.server import ServeArgs, load  # noqa: E402

pytestmark = pytest.mark.usefixtures("gpu_gemm_tile")  # whole models: the GEMMs in a GPU's tile (conftest.py)

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
TEXTS = ["hello world", "a tiny corpus", "naïve café", "grüße", "tokenizer for a tiny", "world, hello", "😀", "h"]
CONTEXT = 128
EOS = 2  # "</s>" of the tokenizer below


def write_model(path, tokenizer, chat_template=True, **kw):
    """The tiny preset, packed, fp32, with the tokenizer (and a chat template) in its folder."""
    torch.manual_seed(0)
    config = BitNetConfig.from_preset("tiny", initializer_range=0.05, vocab_size=tokenizer.get_vocab_size(),
                                      max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=EOS, **kw)
    model = freeze(BitNetForCausalLM(config).eval())
    model.tokenizer_files["tokenizer.json"] = tokenizer.to_str().encode()
    tok_config = {"bos_token": "<s>", "eos_token": "</s>", **({"chat_template": TEMPLATE} if chat_template else {})}
    model.tokenizer_files["tokenizer_config.json"] = json.dumps(tok_config).encode()
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    return write_model(tmp_path_factory.mktemp("served"), tokenizer)


@pytest.fixture(scope="module")
def reference(folder):
    """The same checkpoint loaded apart from the server's: the solo greedy outputs come from it."""
    return BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32)


def solo(model, tokenizer, ids, n):
    """(text, finish_reason, completion tokens) of generate() on this prompt alone, greedy, the
    model's EOS ending it as the server's does."""
    out = generate(model, torch.tensor([ids]), n, eos_token_id=EOS)[0, len(ids):].tolist()
    if EOS in out:
        out = out[:out.index(EOS) + 1]
        return tokenizer.decode(out[:-1]), "stop", len(out)
    return tokenizer.decode(out), "length", len(out)


class Server:
    """`bitnet serve`'s app in uvicorn, in a thread, on a socket bound to a free port of 127.0.0.1."""

    def __init__(self, folder, **kw):
        args = ServeArgs(folder, **{"dtype": "float32", "device": "cpu", "max_seq_len": CONTEXT, **kw})
        self.app, self.engine, _ = load(args)
        self.name = args.served_model_name or folder
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        until(lambda: self.uvicorn.started)

    @property
    def model(self):
        return self.engine.runner.model

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def async_client(self, key="none"):
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, parsed by Prometheus' own parser: {name{labels}: value}."""
        text = httpx.get(f"{self.url}/metrics").text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def close(self):
        self.uvicorn.should_exit = True
        self.thread.join(30)


def until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder, max_batch=3, max_queue=32)
    yield s
    s.close()


def hook(model, fn):
    """A forward pre-hook on the embedding (every forward passes there): the test's handle on a step."""
    def pre_hook(module, args):
        fn(args[0])

    return model.model.embed_tokens.register_forward_pre_hook(pre_hook)


# ----------------------------------------------------------------------------- solo outputs
def test_completion_is_the_solo_greedy_output(server, reference, tokenizer):
    client = server.client()
    for text in TEXTS[:3]:
        r = client.completions.create(model=server.name, prompt=text, max_tokens=12, temperature=0)
        want, finish, n = solo(reference, tokenizer, tokenizer.encode(text).ids, 12)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, finish)
        assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(tokenizer.encode(text).ids)
        assert r.object == "text_completion" and r.model == server.name
    # token ids as the prompt, as OpenAI's API allows
    ids = tokenizer.encode(TEXTS[0]).ids
    r = client.completions.create(model=server.name, prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == solo(reference, tokenizer, ids, 12)[0]


def test_lm_head_quantized_at_load_serves_its_own_solo_outputs(folder, tokenizer):
    """--lm-head int4: the server's model has the head quantize_lm_head makes, and 3 concurrent
    requests each get that model's solo greedy output (the reference quantized through the API)."""
    from bitnet import Int4Linear

    s = Server(folder, max_batch=2, lm_head="int4")
    try:
        assert isinstance(s.model.lm_head, Int4Linear)
        ref = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32).quantize_lm_head(4)

        async def one(text):
            r = await s.async_client().completions.create(model=s.name, prompt=text, max_tokens=10, temperature=0)
            return r.choices[0].text

        async def all_of():
            return await asyncio.gather(*(one(t) for t in TEXTS[:3]))

        for text, got in zip(TEXTS[:3], asyncio.run(all_of())):
            assert got == solo(ref, tokenizer, tokenizer.encode(text).ids, 10)[0], text
    finally:
        s.close()


def test_concurrent_clients_each_get_their_solo_output(server, reference, tokenizer):
    """8 clients at once on 3 slots (the rest queue, and join the running batch as slots free),
    streamed and not, completions and chat: each gets exactly its prompt's solo greedy output."""
    n = 20

    async def one(i):
        client = server.async_client()
        text, stream = TEXTS[i], i % 2 == 0
        if i % 3 == 2:  # chat
            messages = [{"role": "user", "content": text}]
            ids = tokenizer.encode(f"<s>user: {text}\nassistant:", add_special_tokens=False).ids
            r = await client.chat.completions.create(model=server.name, messages=messages, max_tokens=n,
                                                     temperature=0, stream=stream)
            if stream:
                got, finish = "", None
                async for chunk in r:
                    got += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            else:
                got, finish = r.choices[0].message.content, r.choices[0].finish_reason
        else:
            ids = tokenizer.encode(text).ids
            r = await client.completions.create(model=server.name, prompt=text, max_tokens=n, temperature=0,
                                                stream=stream)
            if stream:
                got, finish = "", None
                async for chunk in r:
                    got += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
            else:
                got, finish = r.choices[0].text, r.choices[0].finish_reason
        await client.close()
        return got, finish, ids

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(len(TEXTS))))

    results = asyncio.run(all_of_them())
    for got, finish, ids in results:
        want, want_finish, _ = solo(reference, tokenizer, ids, n)
        assert (got, finish) == (want, want_finish)
    assert server.metrics()["bitnet_requests_running"] == 0


@pytest.mark.cuda
def test_the_server_on_a_gpu_gives_concurrent_clients_their_solo_outputs(folder, tokenizer):
    """The app on CUDA with its GPU defaults (bf16, decode steps recorded as CUDA graphs and run
    ahead, prompt steps in recorded pieces): 8 clients at once on 3 slots, streamed and not, each
    gets its prompt's solo greedy output of the same checkpoint on the same GPU, and graphs of both
    kinds were recorded and used."""
    reference = BitNetForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device="cuda")
    server = Server(folder, max_batch=3, max_queue=32, device="cuda", dtype="bfloat16")
    runner = server.engine.runner
    assert runner.decode_graphs and runner.prompt_graphs and server.engine.run_ahead
    n = 20

    async def one(i):
        client = server.async_client()
        text, stream = TEXTS[i], i % 2 == 0
        r = await client.completions.create(model=server.name, prompt=text, max_tokens=n, temperature=0, stream=stream)
        if stream:
            got = ""
            async for chunk in r:
                got += chunk.choices[0].text
        else:
            got = r.choices[0].text
        await client.close()
        return got

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(len(TEXTS))))

    try:
        results = asyncio.run(all_of_them())
        for text, got in zip(TEXTS, results):
            assert got == solo(reference, tokenizer, tokenizer.encode(text).ids, n)[0], text
        assert any(step.graph is not None for step in runner._buckets.values())
        assert any(pieces.graphs for pieces in runner._pieces.values())
    finally:
        server.close()


def test_chat_renders_the_template_and_streams_chunks(server, reference, tokenizer):
    client = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = tokenizer.encode("<s>system: be brief\nuser: hello\nassistant:", add_special_tokens=False).ids
    want, finish, n = solo(reference, tokenizer, ids, 16)
    r = client.chat.completions.create(model=server.name, messages=messages, max_completion_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, finish)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    chunks = list(client.chat.completions.create(model=server.name, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert len({c.id for c in chunks}) == 1


def test_a_chats_second_turn_starts_after_its_history(server, reference, tokenizer):
    """Prefix caching through the API: the second turn of a chat (the first turn, the reply, a new
    message) is prefilled after the tokens the first turn left in its row (its prompt and the reply
    but the last token: the longest common prefix of those ids and the new prompt's, counted here
    from the tokenizer); the count comes back as OpenAI's usage.prompt_tokens_details.cached_tokens
    and in /metrics, and the reply is the solo greedy one."""
    client = server.client()
    system = "answer briefly, never twice the same way"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hello world"}]
    render = lambda ms: tokenizer.encode("<s>" + "".join(f"{m['role']}: {m['content']}\n" for m in ms) + "assistant:",  # noqa: E731
                                         add_special_tokens=False).ids
    before = server.metrics()
    first = client.chat.completions.create(model=server.name, messages=messages, max_tokens=8, temperature=0)
    fed = render(messages) + tokenizer.encode(first.choices[0].message.content, add_special_tokens=False).ids
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "again"}]
    ids = render(messages)
    held = fed[:len(render(messages[:2])) + first.usage.completion_tokens - 1]
    common = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
    assert common >= 32, "the test's history must reach --min-prefix"
    chunks = list(client.chat.completions.create(model=server.name, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(ids) and usage.prompt_tokens_details.cached_tokens == min(common, len(ids) - 1)
    want, _, _ = solo(reference, tokenizer, ids, 8)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    after = server.metrics()
    assert after["bitnet_prefix_cache_hit_tokens_total"] - before["bitnet_prefix_cache_hit_tokens_total"] == \
        usage.prompt_tokens_details.cached_tokens


def test_stop_strings_cut_the_text(server, reference, tokenizer):
    client = server.client()
    full = client.completions.create(model=server.name, prompt="hello", max_tokens=24, temperature=0).choices[0].text
    cut = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip())  # a piece in the middle
    r = client.completions.create(model=server.name, prompt="hello", max_tokens=24, temperature=0, stop=[cut, "zzz"])
    assert r.choices[0].text == full[:full.index(cut)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.name, prompt="hello", max_tokens=24, temperature=0, stop=cut, stream=True))
    assert streamed == full[:full.index(cut)]


def test_seeded_sampling_is_reproducible(server):
    client = server.client()

    def run(seed):
        return client.completions.create(model=server.name, prompt="hello", max_tokens=16, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text

    assert run(1) == run(1)
    assert len({run(s) for s in (1, 2, 3)}) > 1


# ----------------------------------------------------------------------------- logprobs, scoring, choices
@pytest.fixture(scope="module")
def scorer(folder):
    """A server whose prompts go in chunks of 8 tokens: scores cross chunk boundaries."""
    s = Server(folder, max_batch=2, prefill_chunk=8, max_queue=32)
    yield s
    s.close()


class Scores:
    """log_softmax in float64 of two references' logits on ids, row i scoring token i + 1:
    transformers' own BitNet code on the same checkpoint (independent of ours: within
    THEIRS_TOL, since it quantizes activations in another order and a rounding tie then moves a
    logit by a few 1e-3), and our model's plain forward over the whole sequence (within OURS_TOL:
    the server's batched steps, chunked prefill and decode kernels give the same logits)."""

    THEIRS_TOL, OURS_TOL = 1e-2, 1e-4

    def __init__(self, folder, model, ids):
        from reference import hf_logits

        self.theirs = hf_logits(folder, torch.tensor([ids]))[0].double().log_softmax(-1)
        with torch.no_grad():
            self.ours = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)

    def check(self, value: float, row: int, token: int | None = None) -> None:
        """value is row's logprob of token (None: of the most likely)."""
        for ref, tol in ((self.theirs, self.THEIRS_TOL), (self.ours, self.OURS_TOL)):
            want = ref[row].max() if token is None else ref[row, token]
            assert abs(value - want.item()) < tol, (value, want.item(), row, token)


def test_lm_eval_loglikelihood_requests_score_the_continuation(scorer, folder, reference, tokenizer):
    """The body lm-evaluation-harness's local-completions sends for loglikelihood (token ids, a
    batch of prompts, echo, logprobs 1, max_tokens 1), parsed as it parses it: the continuation's
    summed logprob and whether it is the greedy one, against transformers on the same checkpoint."""
    contexts = ["hello world, a tiny", "naïve café, 😀 gr", "a tiny corpus for a tiny tokenizer, hello world, " * 2]
    continuations = [" corpus", "üße", " naïve"]
    batch, ctxlens = [], []
    for c, x in zip(contexts, continuations):
        ctx, whole = tokenizer.encode(c).ids, tokenizer.encode(c + x).ids
        assert whole[:len(ctx)] == ctx
        batch.append(whole)
        ctxlens.append(len(ctx))
    body = {"model": scorer.name, "prompt": batch, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    r = httpx.post(f"{scorer.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["prompt_tokens"] == sum(map(len, batch)) and out["usage"]["completion_tokens"] == 3
    for choice, ids, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), batch, ctxlens):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        # lm-eval's parse_logprobs
        got = sum(lp["token_logprobs"][ctxlen:-1])
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]))
        ref = Scores(folder, reference, ids)
        for scores, tol in ((ref.theirs, ref.THEIRS_TOL), (ref.ours, ref.OURS_TOL)):
            want = sum(scores[i - 1, ids[i]].item() for i in range(ctxlen, len(ids)))
            assert abs(got - want) < tol, (got, want)
        assert greedy == all(ref.ours[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))
        # every prompt token, and the token generated after them (the greedy one)
        for i in range(1, len(ids)):
            ref.check(lp["token_logprobs"][i], i - 1, ids[i])
            assert len(lp["top_logprobs"][i]) == 1
            ref.check(max(lp["top_logprobs"][i].values()), i - 1)
        ref.check(lp["token_logprobs"][-1], len(ids) - 1)
        assert choice["text"].startswith(tokenizer.decode(ids))


def test_echo_with_max_tokens_0_scores_the_prompt_alone(scorer, folder, reference, tokenizer):
    """max_tokens 0 with echo (the completions API's way to score a text): the prompt back, each
    token's logprob and its 3 most likely alternatives, where each token's text starts, nothing
    generated; streamed: the same in one chunk, then the end."""
    text = "hello world, a tiny corpus for a tiny tokenizer"
    ids = tokenizer.encode(text).ids
    assert len(ids) > 8  # (over a chunk)
    client = scorer.client()
    r = client.completions.create(model=scorer.name, prompt=text, max_tokens=0, echo=True, logprobs=3)
    c = r.choices[0]
    assert (c.text, c.finish_reason, r.usage.completion_tokens, r.usage.prompt_tokens) == (text, "length", 0, len(ids))
    lp = c.logprobs
    ref = Scores(folder, reference, ids)
    assert lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None
    for i in range(1, len(ids)):
        ref.check(lp.token_logprobs[i], i - 1, ids[i])
        top = lp.top_logprobs[i]
        assert list(top.values()) == sorted(top.values(), reverse=True) and len(top) == 3
        for value, token in zip(top.values(), ref.ours[i - 1].topk(3).indices.tolist()):
            ref.check(value, i - 1, token)
    assert [text[a:b] for a, b in zip(lp.text_offset, lp.text_offset[1:] + [len(text)])] == lp.tokens
    chunks = list(client.completions.create(model=scorer.name, prompt=text, max_tokens=0, echo=True, logprobs=3,
                                            stream=True))
    assert [ch.choices[0].text for ch in chunks] == [text, ""] and chunks[-1].choices[0].finish_reason == "length"
    assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs
    # echo without logprobs: the prompt's text before the completion's, and no logprobs
    r = client.completions.create(model=scorer.name, prompt=text, max_tokens=4, echo=True, temperature=0)
    plain = client.completions.create(model=scorer.name, prompt=text, max_tokens=4, temperature=0)
    assert r.choices[0].text == text + plain.choices[0].text and r.choices[0].logprobs is None


def test_generated_tokens_come_with_their_logprobs(scorer, folder, reference, tokenizer):
    """logprobs 2 on a completion and top_logprobs 2 on a chat, streamed and not: each generated
    token's logprob is transformers' at its position, its first alternative is itself (greedy),
    the chat's bytes put together are the message's text, and the stream carries the same entries."""
    client = scorer.client()

    def check(got, prefix):
        """got: (logprob, alternatives' logprobs) of each generated token after prefix."""
        out = solo_ids(scorer, prefix, 10)
        assert len(got) == len(out)
        ref = Scores(folder, reference, prefix + out)
        for k, (value, tops) in enumerate(got):
            ref.check(value, len(prefix) - 1 + k, out[k])
            assert len(tops) == 2 and tops[0] == value and tops[1] <= value  # greedy: the token is the first
            ref.check(tops[1], len(prefix) - 1 + k, ref.ours[len(prefix) - 1 + k].topk(2).indices[1].item())
        return out

    prompt = "naïve café"
    r = client.completions.create(model=scorer.name, prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
    c, lp = r.choices[0], r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == r.usage.completion_tokens
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    check([(v, list(top.values())) for v, top in zip(lp.token_logprobs, lp.top_logprobs)], tokenizer.encode(prompt).ids)
    stream = list(client.completions.create(model=scorer.name, prompt=prompt, max_tokens=10, temperature=0, logprobs=2,
                                            stream=True))
    assert "".join(ch.choices[0].text for ch in stream) == c.text
    assert sum((ch.choices[0].logprobs.token_logprobs for ch in stream), []) == lp.token_logprobs

    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=scorer.name, messages=messages, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    out = check([(e.logprob, [t.logprob for t in e.top_logprobs]) for e in content],
                tokenizer.encode(f"<s>user: {prompt}\nassistant:", add_special_tokens=False).ids)
    mine = content[:len(out) - (out[-1] == EOS)]  # (an EOS token's bytes are its string, not text)
    assert b"".join(bytes(e.bytes) for e in mine).decode() == chat.choices[0].message.content
    for e in content:  # a token that is not whole characters is written as OpenAI writes it
        b = bytes(e.bytes)
        assert e.token == (b.decode() if b.decode(errors="ignore").encode() == b else
                           "bytes:" + "".join(f"\\x{c:02x}" for c in b))
    chunks = list(client.chat.completions.create(model=scorer.name, messages=messages, max_tokens=10, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob, e.bytes) for e in streamed] == [(e.token, e.logprob, e.bytes) for e in content]


def solo_ids(server, prefix, n):
    """The greedy tokens generate() gives the server's model after `prefix`: the reference scores them."""
    out = generate(server.model, torch.tensor([prefix]), n, eos_token_id=EOS)[0, len(prefix):].tolist()
    return out[:out.index(EOS) + 1] if EOS in out else out


def test_several_prompts_and_n_choices(server, reference, tokenizer):
    """prompt as a list (lm-eval's batches) and n: choice i * n + j is prompt i's j-th; greedy
    choices are each their prompt's solo output; a seeded request's choice j draws as a lone
    request with seed + j does; streamed, the chunks of each index make up the same texts."""
    client = server.client()
    prompts = ["hello world", "a tiny corpus"]
    r = client.completions.create(model=server.name, prompt=prompts, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text == solo(reference, tokenizer, tokenizer.encode(prompts[c.index // 2]).ids, 8)[0]
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p).ids) for p in prompts)
    sampled = client.completions.create(model=server.name, prompt="hello", n=3, max_tokens=12, temperature=1.0,
                                        seed=7)
    alone = [client.completions.create(model=server.name, prompt="hello", max_tokens=12, temperature=1.0,
                                       seed=7 + j).choices[0].text for j in range(3)]
    assert [c.text for c in sampled.choices] == alone and len(set(alone)) > 1
    texts = {}
    for ch in client.completions.create(model=server.name, prompt=prompts, n=2, max_tokens=8, temperature=0,
                                        stream=True):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in r.choices}
    chat = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "hello"}], n=2,
                                          max_tokens=6, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[1].message.content


def test_the_tokenizer_routes_are_what_lm_evals_remote_tokenizer_reads(server, tokenizer):
    """GET /tokenizer_info, POST /tokenize and /detokenize as vLLM serves them, driven as
    lm-evaluation-harness's check_remote_tokenizer_support and RemoteTokenizer drive them: the
    served model's own tokenizer, its EOS id from the EOS string, the chat template's ids."""
    base = server.url
    info = httpx.get(f"{base}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["chat_template"] == TEMPLATE
    assert info["model_max_length"] == CONTEXT
    probe = httpx.post(f"{base}/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert isinstance(probe["tokens"], list) and probe["count"] == len(probe["tokens"])
    for text in TEXTS:
        ids = httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
        assert ids == tokenizer.encode(text, add_special_tokens=False).ids
        assert httpx.post(f"{base}/detokenize", json={"tokens": ids}).json()["prompt"] == tokenizer.decode(ids)
    eos = httpx.post(f"{base}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"][0] == EOS  # RemoteTokenizer.eos_token_id
    chat = httpx.post(f"{base}/tokenize", json={"messages": [{"role": "user", "content": "hello"}]}).json()
    assert chat["tokens"] == tokenizer.encode("<s>user: hello\nassistant:", add_special_tokens=False).ids
    for path, body, status, param in [("tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None),
                                      ("tokenize", {}, 400, None),
                                      ("tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
                                      ("detokenize", {"tokens": [1, 99999]}, 400, "tokens"),
                                      ("detokenize", {"tokens": "abc"}, 400, "tokens")]:
        r = httpx.post(f"{base}/{path}", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (body, r.text)
        assert "could not parse" not in r.json()["error"]["message"]


def test_models_health_and_unknown_routes(server):
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [server.name]
    assert client.models.retrieve(server.name).id == server.name
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_stop_strings_and_detokenizer_pieces(tokenizer):
    """Text comes out whole: a stop string split over pieces still cuts, a held-back tail that
    turns out not to be one is released, and a character split over byte-level tokens is sent
    once complete."""
    from bitnet.serve.text import Detokenizer, ServeTokenizer, StopStrings

    stops = StopStrings(["abc", "xyz"])
    assert [stops.feed(p) for p in ["12a", "b", "c34"]] == [("12", False), ("", False), ("", True)]
    stops = StopStrings(["abc"])
    assert [stops.feed(p) for p in ["12a", "bd", "e"]] + [stops.end()] == [("12", False), ("abd", False), ("e", False), ""]
    text = "naïve café, 😀 grüße"
    ids = tokenizer.encode(text).ids
    detok = Detokenizer(tokenizer, tokenizer.encode("hello ").ids)
    pieces = [detok.push(t) for t in ids] + [detok.end()]
    assert "".join(pieces) == tokenizer.decode(ids) and not any("\ufffd" in p for p in pieces)
    refusing = ServeTokenizer(tokenizer, "{{ raise_exception('only user messages') }}")
    with pytest.raises(ValueError, match="only user messages"):
        refusing.chat([{"role": "system", "content": "x"}])


# ----------------------------------------------------------------------------- bad input, faults
def bad_cases(name):
    ok = {"model": name, "prompt": "hello", "max_tokens": 4}
    chat = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
    return [  # (endpoint, body, status, param, code)
        ("completions", b"{not json", 400, None, None),
        ("completions", b"[1, 2]", 400, None, None),
        ("completions", {**ok, "model": "gpt-4o"}, 404, "model", "model_not_found"),
        ("completions", {**ok, "prompt": "hello " * 200}, 400, "prompt", "context_length_exceeded"),
        ("completions", {**ok, "max_tokens": 10**9}, 400, "prompt", "context_length_exceeded"),
        ("completions", {**ok, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ("completions", {**ok, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
        ("completions", {**ok, "max_tokens": "many"}, 400, "max_tokens", "invalid_value"),
        ("completions", {**ok, "temperature": -1}, 400, "temperature", "invalid_value"),
        ("completions", {**ok, "temperature": 1e9}, 400, "temperature", "invalid_value"),
        ("completions", {**ok, "top_p": 0}, 400, "top_p", "invalid_value"),
        ("completions", {**ok, "top_p": 1.5}, 400, "top_p", "invalid_value"),
        ("completions", {**ok, "top_k": 0}, 400, "top_k", "invalid_value"),
        ("completions", {**ok, "seed": 2**70}, 400, "seed", "invalid_value"),
        ("completions", {**ok, "n": 0}, 400, "n", "invalid_value"),
        ("completions", {**ok, "n": 129}, 400, "n", "invalid_value"),
        ("completions", {**ok, "n": 100}, 400, "n", "invalid_value"),  # more than the server holds at once
        ("completions", {**ok, "prompt": [[1, 2]] * 60}, 400, "prompt", "invalid_value"),
        ("completions", {**ok, "logprobs": 21}, 400, "logprobs", "invalid_value"),
        ("completions", {**ok, "logprobs": -1}, 400, "logprobs", "invalid_value"),
        ("completions", {**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
        ("completions", {**ok, "max_token": 4}, 400, "max_token", None),
        ("completions", {**ok, "prompt": ""}, 400, "prompt", "invalid_value"),
        ("completions", {**ok, "prompt": [1, 99999]}, 400, "prompt", "invalid_value"),
        ("completions", {**ok, "prompt": []}, 400, "prompt", "invalid_value"),
        ("completions", {**ok, "prompt": [[1, 2], []]}, 400, "prompt", "invalid_value"),
        ("completions", {**ok, "prompt": [[1, 2], [3, 99999]]}, 400, "prompt", "invalid_value"),
        ("completions", {**ok, "prompt": ["hello " * 200, "hi"]}, 400, "prompt", "context_length_exceeded"),
        ("completions", {"prompt": "hello"}, 400, "model", "invalid_value"),
        ("chat/completions", {**chat, "messages": []}, 400, "messages", "invalid_value"),
        ("chat/completions", {**chat, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role",
         "invalid_value"),
        ("chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages", "unsupported"),
        ("chat/completions", {**chat, "max_tokens": 10**6}, 400, "messages", "context_length_exceeded"),
        ("chat/completions", {**chat, "tools": [{"type": "function"}]}, 400, "tools", "unsupported"),
        ("completions", {**ok, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported"),
        ("completions", {**ok, "frequency_penalty": -1}, 400, "frequency_penalty", "unsupported"),
        ("completions", {**ok, "logit_bias": {"5": 10}}, 400, "logit_bias", "unsupported"),
        ("completions", {**ok, "best_of": 2}, 400, "best_of", "unsupported"),
        ("completions", {**ok, "best_of": 3, "n": 2}, 400, "best_of", "unsupported"),
        ("completions", {**ok, "suffix": "end"}, 400, "suffix", "unsupported"),
        ("chat/completions", {**chat, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
        ("chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
        ("chat/completions", {**chat, "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported"),
        ("chat/completions", {**chat, "tool_choice": "required"}, 400, "tool_choice", "unsupported"),
        ("chat/completions", {**chat, "max_tokens": 4, "max_completion_tokens": 5}, 400, None, None),
    ]


def test_the_chat_template_comes_from_where_transformers_writes_it(tmp_path, tokenizer):
    """tokenizer_config.json's "chat_template" (a list of named templates: the default one; special
    tokens as objects, {"content": ...}); chat_template.jinja beside it wins, and travels with the
    model (from_pretrained carries it, save_pretrained writes it); --chat-template wins over both."""
    from bitnet.serve.text import ServeTokenizer

    body = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {"bos_token": {"content": "<s>", "lstrip": False, "special": True},
              "chat_template": [{"name": "tool_use", "template": "T:" + body}, {"name": "default", "template": "{{ bos_token }}D:" + body}]}
    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size())))
    model.tokenizer_files["tokenizer.json"] = tokenizer.to_str().encode()
    model.tokenizer_files["tokenizer_config.json"] = json.dumps(config).encode()
    model.save_pretrained(tmp_path / "named")
    said = [{"role": "user", "content": "hi"}]
    assert ServeTokenizer.from_folder(str(tmp_path / "named")).render_chat(said) == "<s>D:hi"
    model.tokenizer_files["chat_template.jinja"] = ("{{ bos_token }}J:" + body).encode()
    model.save_pretrained(tmp_path / "jinja")
    assert (tmp_path / "jinja" / "chat_template.jinja").read_text() == "{{ bos_token }}J:" + body
    loaded = BitNetForCausalLM.from_pretrained(tmp_path / "jinja")
    assert ServeTokenizer.from_folder(str(tmp_path / "named"), loaded.tokenizer_files).render_chat(said) == "<s>J:hi"
    own = tmp_path / "own.jinja"
    own.write_text("X{{ messages | length }}")
    assert ServeTokenizer.from_folder(str(tmp_path / "jinja"), loaded.tokenizer_files, str(own)).render_chat(said) == "X1"
    with pytest.raises(FileNotFoundError, match="--chat-template .*nope.jinja: no such file"):
        ServeTokenizer.from_folder(str(tmp_path / "jinja"), loaded.tokenizer_files, str(tmp_path / "nope.jinja"))


def test_bad_input_is_an_openai_error_and_the_server_stays_up(server):
    for endpoint, body, status, param, code in bad_cases(server.name):
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(f"{server.url}/v1/{endpoint}", **kw)
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (status, param), (body, r.text)
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"] == "invalid_request_error"
        if code is not None:
            assert err["code"] == code, (body, err)
        if isinstance(body, dict):  # a body that parsed is not called unparsable
            assert "could not parse" not in err["message"], (body, err)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client().completions.create(model=server.name, prompt="hello", max_tokens=500)
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="hello")
    assert server.client().completions.create(model=server.name, prompt="hello", max_tokens=3).usage.completion_tokens
    assert server.metrics()['bitnet_requests_total{endpoint=completions,status=400}'] >= 20


def test_a_request_the_model_fails_on_fails_alone(server, reference, tokenizer):
    poison = tokenizer.encode("café").ids[-1]

    def raise_on_poison(ids):
        if (ids == poison).any():
            raise RuntimeError("poisoned input")

    handle = hook(server.model, raise_on_poison)
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": server.name, "prompt": "naïve café", "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_error" and "poisoned" in r.json()["error"]["message"]
        with pytest.raises(openai.APIError, match="poisoned"):
            list(server.client().completions.create(model=server.name, prompt="naïve café", max_tokens=4, stream=True))
        r = server.client().completions.create(model=server.name, prompt="hello world", max_tokens=8, temperature=0)
        assert r.choices[0].text == solo(reference, tokenizer, tokenizer.encode("hello world").ids, 8)[0]
    finally:
        handle.remove()


def test_disconnect_mid_stream_frees_the_slot(server):
    slow = hook(server.model, lambda ids: time.sleep(0.01))  # >= 10 ms a step: 100 tokens take > 1 s
    try:
        before = server.metrics()["bitnet_generation_tokens_total"]
        body = {"model": server.name, "prompt": "hello", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
            assert len(got) >= 2 and server.metrics()["bitnet_requests_running"] == 1
        # the connection is closed: the slot frees within a step, long before the 100 tokens
        until(lambda: server.metrics()["bitnet_requests_running"] == 0, timeout=5)
        time.sleep(0.1)
        assert server.metrics()["bitnet_generation_tokens_total"] - before < 60
    finally:
        slow.remove()


def test_a_client_that_leaves_a_request_it_did_not_stream_frees_the_slot(server):
    """Not streamed, the server writes nothing until the end, so it polls the connection
    (DISCONNECT_POLL_S): a client that times out and closes it has its request cancelled within a
    poll and a step (~0.6 s: at most ~30 tokens), long before its 100, and the server answers the next one."""
    slow = hook(server.model, lambda ids: time.sleep(0.02))  # >= 20 ms a step: 100 tokens take > 2 s
    try:
        before = server.metrics()["bitnet_generation_tokens_total"]
        body = {"model": server.name, "prompt": "hello", "max_tokens": 100, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
        until(lambda: server.metrics()["bitnet_requests_running"] == 0, timeout=5)
        time.sleep(0.1)
        assert server.metrics()["bitnet_generation_tokens_total"] - before < 60
        assert server.metrics()["bitnet_requests_total{endpoint=completions,status=499}"] >= 1
    finally:
        slow.remove()
    assert server.client().completions.create(model=server.name, prompt="hello", max_tokens=3).usage.completion_tokens == 3


def test_an_oversized_body_and_a_wrong_method_are_openai_errors(server):
    """A body over MAX_BODY_BYTES is refused from its Content-Length (413) before it is read, and a
    route asked with a method it does not take is a 405; both OpenAI error bodies, the server up."""
    from bitnet.serve.api import MAX_BODY_BYTES

    big = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    r = httpx.post(f"{server.url}/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert f"{len(big)} bytes is over the limit" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert server.client().completions.create(model=server.name, prompt="hello", max_tokens=2).usage.completion_tokens == 2


def test_metrics_parse_and_count(server, tokenizer):
    client = server.client()
    before = server.metrics()
    for stream in (False, True):
        r = client.completions.create(model=server.name, prompt="hello world", max_tokens=6, temperature=0, stream=stream)
        if stream:
            list(r)
    after = server.metrics()
    key = "bitnet_requests_total{endpoint=completions,status=200}"
    assert after[key] - before.get(key, 0) == 2
    prompt = len(tokenizer.encode("hello world").ids)
    assert after["bitnet_prompt_tokens_total"] - before["bitnet_prompt_tokens_total"] == 2 * prompt
    assert after["bitnet_generation_tokens_total"] - before["bitnet_generation_tokens_total"] <= 2 * 6
    assert after["bitnet_time_to_first_token_seconds_count"] - before["bitnet_time_to_first_token_seconds_count"] == 2
    assert after["bitnet_inter_token_latency_seconds_count"] - before["bitnet_inter_token_latency_seconds_count"] >= 2
    assert after["bitnet_request_duration_seconds_count"] > before["bitnet_request_duration_seconds_count"]
    assert after["bitnet_batch_slots"] == 3 and after["bitnet_requests_waiting"] == 0
    steps = sum(after.get(f"bitnet_step_seconds_count{{kind={k}}}", 0) - before.get(f"bitnet_step_seconds_count{{kind={k}}}", 0)
                for k in ("decode", "prefill", "mixed"))
    assert steps == 2 * 6  # one prefill step and five decode steps a request (they ran one after the other)
    assert after["bitnet_prefill_tokens_total"] - before["bitnet_prefill_tokens_total"] == 2 * prompt


# ----------------------------------------------------------------------------- auth, overload, no template
@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tokenizer):
    """A server with an API key, one slot, a queue of one, and a folder without a chat template."""
    s = Server(write_model(tmp_path_factory.mktemp("bare"), tokenizer, chat_template=False), api_key="sekret",
               max_batch=1, max_queue=1, served_model_name="bare")
    yield s
    s.close()


def test_api_key_table(guarded):
    url = f"{guarded.url}/v1/completions"
    body = {"model": "bare", "prompt": "hello", "max_tokens": 2}
    for headers, status in [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "sekret"}, 401),
                            ({"Authorization": "Basic sekret"}, 401), ({"Authorization": "Bearer sekret"}, 200)]:
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == status, headers
        if status == 401:
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(url, content=b"{bad", headers={"Authorization": "Bearer x"}).status_code == 401  # auth first
    assert httpx.get(f"{guarded.url}/v1/models").status_code == 401
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").completions.create(model="bare", prompt="hello", max_tokens=2)
    assert guarded.client("sekret").completions.create(model="bare", prompt="hello", max_tokens=2).usage


def test_chat_without_a_template_is_a_clear_400(guarded):
    with pytest.raises(openai.BadRequestError, match="no chat template") as e:
        guarded.client("sekret").chat.completions.create(model="bare", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "chat_template_missing"


def test_overload_is_429_with_retry_after(guarded):
    gate = threading.Event()
    held = hook(guarded.model, lambda ids: gate.wait(20))
    client = guarded.client("sekret")
    try:
        with httpx.Client(headers={"Authorization": "Bearer sekret"}, timeout=30) as http:
            body = {"model": "bare", "prompt": "hello", "max_tokens": 3, "temperature": 0}
            url = f"{guarded.url}/v1/completions"
            first = threading.Thread(target=http.post, args=(url,), kwargs={"json": body})
            first.start()
            until(lambda: guarded.engine.num_running == 1)  # in the slot, held at its prefill
            second = threading.Thread(target=http.post, args=(url,), kwargs={"json": body})
            second.start()
            until(lambda: guarded.engine.num_waiting == 1)
            r = http.post(url, json=body)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                client.completions.create(**body)
            gate.set()
            first.join(10)
            second.join(10)
        assert client.completions.create(**body).usage.completion_tokens == 3  # room again
    finally:
        gate.set()
        held.remove()


def test_a_request_dropped_at_shutdown_is_a_503(folder):
    s = Server(folder, max_batch=1)
    gate = threading.Event()
    hook(s.model, lambda ids: gate.wait(20))
    result = {}
    body = {"model": s.name, "prompt": "hello", "max_tokens": 5}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(f"{s.url}/v1/completions", json=body, timeout=30)))
    t.start()
    try:
        until(lambda: s.engine.num_running == 1)
        threading.Timer(0.2, gate.set).start()
        s.engine.stop(drain=False)  # what the app's shutdown does once uvicorn has waited for the connections
        t.join(30)
        assert result["r"].status_code == 503 and result["r"].json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{s.url}/health").status_code == 503
    finally:
        gate.set()
        s.close()


def test_decode_graphs_need_a_gpu(folder, monkeypatch):
    """--decode-graphs (each batch size's decode step a CUDA graph; the default on CUDA) is refused
    on a CPU with a clear error, before any weight is loaded; the runner's own default there is off.
    So is --run-ahead (it chains those graphs), on a CPU and beside --no-decode-graphs, and
    --prompt-graphs on a CPU."""
    from bitnet.serve.server import ServeArgs, load

    with pytest.raises(ValueError, match="--decode-graphs records CUDA graphs: it needs a CUDA device, not cpu"):
        load(ServeArgs(model=folder, device="cpu", decode_graphs=True))
    with pytest.raises(ValueError, match="--run-ahead chains the decode steps recorded as CUDA graphs.*device cpu"):
        load(ServeArgs(model=folder, device="cpu", run_ahead=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (a GPU machine: --device cuda passes its check)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--run-ahead .* --decode-graphs False"):
        load(ServeArgs(model=folder, device="cuda", decode_graphs=False, run_ahead=True))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--prompt-graphs records CUDA graphs: it needs a CUDA device, not cpu"):
        load(ServeArgs(model=folder, device="cpu", prompt_graphs=True))


# ----------------------------------------------------------------------------- the command, SIGTERM
def test_sigterm_drains_a_running_stream(folder):
    """`bitnet serve` as a process: a stream is running when SIGTERM comes; it still gets all its
    tokens, the process exits, and then nothing listens on the port."""
    port = free_port()
    env = {**os.environ, "BITNET_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "bitnet", "serve", folder, "--port", str(port), "--dtype", "float32",
                             "--device", "cpu", "--max-batch", "2", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        until(up, timeout=60)
        n = CONTEXT - 8
        body = {"model": folder, "prompt": "hello", "max_tokens": n, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        chunks, at_signal = [], None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                chunks.append(line[5:].strip())
                if at_signal is None:
                    proc.send_signal(signal.SIGTERM)
                    at_signal = len(chunks)
        assert chunks[-1] == "[DONE]"
        usage = json.loads(chunks[-2])["usage"]
        finishes = [json.loads(c)["choices"][0]["finish_reason"] for c in chunks[:-2]]
        assert usage["completion_tokens"] == n and finishes[-1] == "length"
        assert at_signal < len(chunks) - 3  # the stream was under way when the signal came
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

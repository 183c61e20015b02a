"""bitnet.serve: an OpenAI-compatible HTTP server with continuous batching (`bitnet serve MODEL`).

Layered as vLLM's and SGLang's entrypoints are, each part in one module:
    scheduler.py  who waits, which slot of the KV cache each sequence holds, what a step runs (no torch)
    runner.py     runs a step's prefills and batched decode on the model's static cache
    engine.py     the loop in its own thread: admits, runs, samples, emits tokens (no HTTP)
    text.py       tokenizer, chat template, streamed detokenization, stop strings
    protocol.py   OpenAI's request / response bodies (pydantic)
    metrics.py    Prometheus metrics
    api.py        the FastAPI app: routes, auth, errors, server-sent events
    server.py     the `bitnet serve` command
The HTTP modules need the `serve` extra; the engine needs only torch.
"""

"""`bitnet serve MODEL`: load a checkpoint, start the engine, serve the OpenAI API with uvicorn.

    bitnet serve ./my-model --max-batch 8 --max-seq-len 1024 --api-key secret
    bitnet serve microsoft/bitnet-b1.58-2B-4T --port 8000

Needs the `serve` extra (fastapi, uvicorn, sse-starlette, prometheus-client); this module imports
none of them until the command runs, so that `bitnet --help` works without it. `load(args)` builds
the app without serving it (tests and benchmarks start it their own way).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from ..args import LM_HEADS, arg, command, device as named_device, lm_head_arg

EXTRA_HINT = "bitnet serve needs the serve extra: pip install 'bitnet-b158[serve]' (fastapi, uvicorn, sse-starlette, " \
             "prometheus-client)"


@dataclass
class ServeArgs:
    model: str = arg(help="checkpoint folder (config.json, model.safetensors, tokenizer.json) or a hub id (org/name)",
                     positional=True)
    host: str = arg("127.0.0.1", help="address to listen on (0.0.0.0: every interface; set --api-key then)")
    port: int = arg(8000, help="TCP port")
    max_batch: int = arg(4, help="sequences decoded together: the KV cache's rows (slots)")
    max_seq_len: int | None = arg(None, help="tokens per sequence, prompt + completion: the KV cache's columns "
                                  "(default: the model's context, at most 2048)")
    max_queue: int = arg(64, help="requests waiting for a slot; beyond them: 429 with Retry-After")
    prefill_chunk: int = arg(256, help="prompt tokens prefilled per step at most (a longer prompt goes in chunks, so "
                             "running streams wait at most one chunk's forward for their next token)")
    prefix_cache: bool = arg(True, help="start a prompt after the longest prefix of it a cache row holds (an earlier "
                             "turn, a shared system prompt: computed once; default: on; --no-prefix-cache: every prompt computed "
                             "whole, each stream's greedy tokens bit for bit its solo ones)")
    min_prefix: int = arg(32, help="prefix caching: reuse a cached prefix of at least this many tokens")
    api_key: str | None = arg(None, help="require 'Authorization: Bearer KEY' on /v1 routes (default: "
                              "$BITNET_API_KEY, else none)")
    served_model_name: str | None = arg(None, help="the model's name in the API (default: MODEL as given)")
    chat_template: str | None = arg(None, help="a Jinja chat template file (default: the folder's)")
    dtype: str | None = arg(None, help="activation and float-weight dtype (default: bfloat16)",
                            choices=["bfloat16", "float16", "float32"])
    lm_head: str = lm_head_arg()
    device: str | None = arg(None, help="cuda or cpu (default: cuda when available)")
    decode_graphs: bool | None = arg(None, help="record each batch size's decode step as a CUDA graph and replay it "
                                     "(default: on cuda; --no-decode-graphs: eager steps)")
    prompt_graphs: bool | None = arg(None, help="run the steps with prompt tokens padded to a bucket of tokens, all but "
                                     "the prompts' attention replayed as CUDA graphs (default: on with the decode graphs; "
                                     "--no-prompt-graphs: eager)")
    run_ahead: bool | None = arg(None, help="queue each decode step before the host reads the last one's tokens, "
                                 "so the GPU runs it while the host emits them (default: on with the decode graphs; "
                                 "--no-run-ahead: read, emit, then queue)")
    drain_timeout: float = arg(30.0, help="on SIGTERM / Ctrl-C: seconds to let running requests finish")
    log_level: str = arg("info", help="uvicorn's log level", choices=["critical", "error", "warning", "info", "debug"])
    revision: str | None = arg(None, help="hub id: branch, tag or commit (default: main)")
    cache_dir: str | None = arg(None, help="hub id: huggingface_hub cache (default: $HF_HUB_CACHE)")
    local_files_only: bool = arg(False, help="hub id: the cache only, no network (as HF_HUB_OFFLINE=1)")


def check_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RuntimeError(f"{EXTRA_HINT}; missing here: {', '.join(missing)}")


def load(args: ServeArgs, manage_engine: bool = True):
    """(app, engine, description) for these arguments: the model loaded, the engine built, not
    started (manage_engine: the app's startup starts it in a thread, else the caller runs it)."""
    check_extra()
    from ..generation import DTYPES, build_cpu_kernels, eos_token_ids
    from ..hub import resolve
    from ..model import BitNetForCausalLM
    from ..report import human_bytes
    from .api import build_app
    from .engine import Engine
    from .text import ServeTokenizer

    for name in ("max_batch", "max_queue", "prefill_chunk", "min_prefix"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be at least {0 if name == 'max_queue' else 1}")
    folder = resolve(args.model, args.revision, args.cache_dir, args.local_files_only)
    device = named_device(args.device)
    if args.decode_graphs and device.type != "cuda":
        raise ValueError(f"--decode-graphs records CUDA graphs: it needs a CUDA device, not {device}")
    if args.prompt_graphs and device.type != "cuda":
        raise ValueError(f"--prompt-graphs records CUDA graphs: it needs a CUDA device, not {device}")
    if args.run_ahead and (device.type != "cuda" or args.decode_graphs is False):
        raise ValueError("--run-ahead chains the decode steps recorded as CUDA graphs: it needs a CUDA device and the "
                         f"decode graphs (device {device}, --decode-graphs {args.decode_graphs})")
    dtype = DTYPES[args.dtype or "bfloat16"]
    if device.type == "cpu":
        build_cpu_kernels()  # a first build says so on stderr, before the model
    model = BitNetForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
    if LM_HEADS[args.lm_head]:
        model.quantize_lm_head(LM_HEADS[args.lm_head])
    tokenizer = ServeTokenizer.from_folder(folder, model.tokenizer_files, args.chat_template)
    context = model.config.max_position_embeddings
    max_seq_len = args.max_seq_len or min(context, 2048)
    if not 2 <= max_seq_len <= context:
        raise ValueError(f"--max-seq-len must be in [2, {context}] (the model's context), got {max_seq_len}")
    engine = Engine(model, max_batch=args.max_batch, max_seq_len=max_seq_len, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, eos_token_ids=eos_token_ids(model), decode_graphs=args.decode_graphs,
                    run_ahead=args.run_ahead, prompt_graphs=args.prompt_graphs, prefix_cache=args.prefix_cache,
                    min_prefix=args.min_prefix)
    name = args.served_model_name or args.model
    api_key = args.api_key if args.api_key is not None else os.environ.get("BITNET_API_KEY") or None
    app = build_app(engine, tokenizer, name, api_key=api_key, drain_timeout=args.drain_timeout,
                    manage_engine=manage_engine)
    from ..ops import describe_cpu_backend, describe_gpu_backend

    kernels = (f"packed layers: {describe_cpu_backend()}" if device.type == "cpu" else
               f"packed layers on {describe_gpu_backend(device)}" if device.type == "cuda" else f"device {device}")
    description = (f"{name}: {args.max_batch} slots x {max_seq_len} tokens (KV cache "
                   f"{human_bytes(engine.runner.cache_bytes())}), queue {args.max_queue}, prefill chunk "
                   f"{args.prefill_chunk}, prefix cache "
                   f"{f'on (>= {args.min_prefix} tokens)' if args.prefix_cache else 'off'}, {dtype}, lm_head {args.lm_head}, {kernels}; chat template: "
                   f"{'yes' if tokenizer.chat_template else 'none (/v1/chat/completions answers 400)'}"
                   f"{'; API key required' if api_key else ''}")
    return app, engine, description


@command("serve", ServeArgs)
def serve_cmd(args: ServeArgs) -> None:
    """Serve a model over OpenAI's HTTP API (completions, chat, streaming) with continuous batching."""
    check_extra()
    import signal
    import threading

    import uvicorn

    app, engine, description = load(args, manage_engine=False)
    print(f"bitnet serve: {description}", file=sys.stderr)
    if engine.runner.decode_graphs or engine.runner.prompt_graphs:  # before the first request, not at it
        t0 = time.perf_counter()
        sizes = engine.record_graphs()
        print(f"bitnet serve: the CUDA graphs of {sizes} step sizes recorded in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    print(f"bitnet serve: http://{args.host}:{args.port}/v1 (GET /health, /metrics)", file=sys.stderr, flush=True)
    logging.getLogger("bitnet.serve").setLevel(args.log_level.upper())
    # uvicorn in a thread, the engine in this one: the main thread made torch's OpenMP threads
    # (Engine.run says why that matters); the signals are caught here and passed on to uvicorn.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout))
    http = threading.Thread(target=server.run, name="uvicorn", daemon=True)

    def on_signal(signum, frame):
        if server.should_exit:  # a second Ctrl-C: do not wait for the streams
            server.force_exit = True
        server.should_exit = True  # stop accepting, let the open requests finish (drain), then end

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    http.start()
    try:
        engine.run(until=lambda: not http.is_alive())
    finally:
        engine.stop(drain=False)
    if not server.started:
        raise RuntimeError(f"the HTTP server did not start on {args.host}:{args.port} (see the log above)")

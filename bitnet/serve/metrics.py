"""The server's Prometheus metrics (GET /metrics, text format 0.0.4), in a registry of its own per
app, so that several servers in one process (tests) do not share counters.

    bitnet_requests_total{endpoint, status}       requests answered, by HTTP status (200, 400, 429, ...)
    bitnet_prompt_tokens_total                    prompt tokens of admitted requests
    bitnet_generation_tokens_total                tokens generated
    bitnet_requests_waiting                       requests in the queue (gauge)
    bitnet_requests_running                       requests holding a slot (gauge)
    bitnet_batch_slots                            slots of the KV cache (--max-batch) (gauge)
    bitnet_decode_batch_size                      sequences in the last decode step (gauge)
    bitnet_time_to_first_token_seconds            request received -> first token (histogram)
    bitnet_inter_token_latency_seconds            between two tokens of one request (histogram)
    bitnet_request_duration_seconds               request received -> last token (histogram)
    bitnet_step_seconds{kind}                     one engine step: decode, prefill, or mixed (histogram)
    bitnet_prefill_tokens_total                   prompt tokens run through the model (chunks included)
    bitnet_prefix_cache_hit_tokens_total          prompt tokens read from the prefix cache instead
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("bitnet_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("bitnet_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("bitnet_generation_tokens", "Tokens generated", registry=r)
        Gauge("bitnet_requests_waiting", "Requests in the queue", registry=r).set_function(lambda: engine.num_waiting)
        Gauge("bitnet_requests_running", "Requests holding a slot of the KV cache",
              registry=r).set_function(lambda: engine.num_running)
        Gauge("bitnet_batch_slots", "Slots of the KV cache (--max-batch)", registry=r).set(engine.max_batch)
        Gauge("bitnet_decode_batch_size", "Sequences in the last decode step",
              registry=r).set_function(lambda: engine.last_batch)
        self.ttft = Histogram("bitnet_time_to_first_token_seconds", "Request received to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("bitnet_inter_token_latency_seconds", "Time between two tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("bitnet_request_duration_seconds", "Request received to its last token",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("bitnet_step_seconds", "One engine step (one forward): decode only, prefill only, or both",
                              ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.prefilled = Counter("bitnet_prefill_tokens", "Prompt tokens run through the model", registry=r)
        self.cached_tokens = Counter("bitnet_prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache, "
                                     "not run through the model", registry=r)
        engine.on_step = self._on_step

    def _on_step(self, seconds: float, prefill_tokens: int, decoded: int) -> None:  # the engine's thread
        kind = "mixed" if prefill_tokens and decoded else "prefill" if prefill_tokens else "decode"
        self.step.labels(kind).observe(seconds)
        self.prefilled.inc(prefill_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

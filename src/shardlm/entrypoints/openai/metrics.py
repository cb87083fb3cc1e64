"""Prometheus metrics of the server (prometheus_client, on a registry of its own so two
servers in one process never clash).

Counters and histograms are updated by the request handlers; the engine gauges are read
from the engine thread's last published snapshot when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shardlm.engine.llm_engine import EngineStats

# Seconds: from a few ms (small models, GPUs) to a minute (long prompts on CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "shardlm_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "shardlm_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "shardlm_generation_tokens", "Tokens generated", registry=r
        )
        self.ttft = Histogram(
            "shardlm_time_to_first_token_seconds",
            "Request arrival to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "shardlm_inter_token_latency_seconds",
            "Time between consecutive tokens of a stream",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "shardlm_num_requests_running", "Sequences being generated", registry=r
        )
        self.waiting = Gauge(
            "shardlm_num_requests_waiting", "Sequences waiting to start", registry=r
        )
        self.blocks_in_use = Gauge("shardlm_kv_blocks_in_use", "KV cache blocks in use", registry=r)
        self.decode_tokens = Gauge(
            "shardlm_engine_decode_tokens",
            "Decode tokens the engine has computed since it started",
            registry=r,
        )
        self.blocks_total = Gauge(
            "shardlm_kv_blocks_total", "KV cache blocks in the pool", registry=r
        )
        self._stats = stats

    def render(self) -> bytes:
        s = self._stats()
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.blocks_in_use.set(s.blocks_in_use)
        self.blocks_total.set(s.num_blocks)
        self.decode_tokens.set(s.decode_tokens)
        return generate_latest(self.registry)

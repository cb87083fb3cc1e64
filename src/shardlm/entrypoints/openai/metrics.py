"""Prometheus metrics of the server (prometheus_client, on a registry of its own so two
servers in one process never clash).

Counters and histograms are updated by the request handlers; the engine gauges are read
from the engine process's last published snapshot when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shardlm.engine.stats import EngineStats

if TYPE_CHECKING:
    from shardlm.entrypoints.openai.engine_core import NodeSnapshot

# Seconds: from a few ms (small models, GPUs) to a minute (long prompts on CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(
        self,
        stats: Callable[[], EngineStats],
        node_stats: Callable[[], NodeSnapshot] | None = None,
    ) -> None:
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
        # Speculative decoding (0 when it is off).
        self.spec_draft = Gauge(
            "shardlm_spec_decode_draft_tokens", "Draft tokens verified", registry=r
        )
        self.spec_accepted = Gauge(
            "shardlm_spec_decode_accepted_tokens", "Draft tokens accepted", registry=r
        )
        self.spec_rate = Gauge(
            "shardlm_spec_decode_acceptance_rate",
            "Accepted / verified draft tokens since the engine started",
            registry=r,
        )
        self.spec_rate_position = Gauge(
            "shardlm_spec_decode_acceptance_rate_per_position",
            "Accepted / verified drafts at each draft position (1 = first draft of a step)",
            ["position"],
            registry=r,
        )
        # What the compute and attention nodes report of themselves (refreshed by the
        # engine process about once a second).
        node = ["compute_node"]
        self.compute_tokens = Gauge(
            "shardlm_compute_node_tokens", "Tokens a compute node has computed", node, registry=r
        )
        self.compute_tokens_step = Gauge(
            "shardlm_compute_node_tokens_last_step",
            "Tokens a compute node computed in the last step",
            node,
            registry=r,
        )
        self.compute_flops_step = Gauge(
            "shardlm_compute_node_dense_flops_last_step",
            "Dense FLOPs a compute node computed in the last step",
            node,
            registry=r,
        )
        self.compute_flops = Gauge(
            "shardlm_compute_node_dense_flops",
            "Dense FLOPs (QKV, O, MLP) a compute node has computed",
            node,
            registry=r,
        )
        self.compute_bytes = Gauge(
            "shardlm_compute_node_attention_bytes",
            "Bytes a compute node has sent to / received from the attention nodes",
            [*node, "direction"],
            registry=r,
        )
        self.compute_wait = Gauge(
            "shardlm_compute_node_wait_on_attention_seconds",
            "Time a compute node has been blocked waiting for the attention nodes' answers",
            node,
            registry=r,
        )
        where = ["head_group", "shard"]
        self.node_wait = Gauge(
            "shardlm_attention_node_wait_on_compute_seconds",
            "Time an attention node has been blocked waiting for the compute side's messages",
            where,
            registry=r,
        )
        self.node_kv_tokens = Gauge(
            "shardlm_attention_node_kv_tokens",
            "Tokens of KV an attention node holds",
            where,
            registry=r,
        )
        self.node_blocks = Gauge(
            "shardlm_attention_node_blocks_in_use",
            "KV blocks an attention node uses",
            where,
            registry=r,
        )
        self._stats = stats
        self._node_stats = node_stats

    def render(self) -> bytes:
        s = self._stats()
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.blocks_in_use.set(s.blocks_in_use)
        self.blocks_total.set(s.num_blocks)
        self.decode_tokens.set(s.decode_tokens)
        self.spec_draft.set(s.spec_draft_tokens)
        self.spec_accepted.set(s.spec_accepted_tokens)
        self.spec_rate.set(s.spec_acceptance_rate)
        for i, (drafted, accepted) in enumerate(
            zip(s.spec_draft_tokens_per_position, s.spec_accepted_tokens_per_position, strict=True)
        ):
            self.spec_rate_position.labels(str(i + 1)).set(accepted / drafted if drafted else 0.0)
        if self._node_stats is not None:
            self._render_nodes(self._node_stats())
        return generate_latest(self.registry)

    def _render_nodes(self, nodes: NodeSnapshot) -> None:
        for c in nodes.compute:
            a = str(c.compute_node)
            self.compute_tokens.labels(a).set(c.tokens)
            self.compute_tokens_step.labels(a).set(c.tokens_last_step)
            self.compute_flops_step.labels(a).set(c.dense_flops_last_step)
            self.compute_flops.labels(a).set(c.dense_flops)
            self.compute_bytes.labels(a, "to").set(c.bytes_to_attention_nodes)
            self.compute_bytes.labels(a, "from").set(c.bytes_from_attention_nodes)
            self.compute_wait.labels(a).set(c.wait_on_nodes_us / 1e6)
        for n in nodes.attention:
            where = (str(n.head_group), str(n.shard))
            self.node_kv_tokens.labels(*where).set(n.kv_tokens)
            self.node_blocks.labels(*where).set(n.blocks_in_use)
            self.node_wait.labels(*where).set(n.wait_on_compute_us / 1e6)

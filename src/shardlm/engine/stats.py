"""What the engine reports of itself: its counters, and each compute node's."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ComputeNodeStats:
    """One compute node's counters, summed over its tensor-parallel ranks."""

    compute_node: int
    tokens_last_step: int
    dense_flops_last_step: int
    tokens: int
    dense_flops: int
    bytes_to_attention_nodes_last_step: int
    bytes_from_attention_nodes_last_step: int
    bytes_to_attention_nodes: int
    bytes_from_attention_nodes: int
    hidden_bytes_to_compute_node_0: int  # the sampled rows' hidden states (α > 1)
    # Time blocked waiting for the attention nodes' answers, summed over the compute node's
    # ranks: the attention time that the dense work of other micro-batches did not hide.
    wait_on_nodes_us_last_step: int
    wait_on_nodes_us: int


@dataclass
class EngineStats:
    """Counters since the engine started (for tests and /metrics)."""

    preemptions: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    prefill_tokens: int
    decode_tokens: int
    blocks_in_use: int
    num_blocks: int
    num_running: int
    num_waiting: int
    # Speculative decoding: drafts verified, and of those accepted (0 when it is off), and
    # the same per draft position (index i: the (i + 1)-th draft of a step).
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_draft_tokens_per_position: tuple[int, ...] = ()
    spec_accepted_tokens_per_position: tuple[int, ...] = ()
    # Bytes one token takes in a KV pool (K and V of every layer, int8's scales included):
    # one rank's pool, or with attention nodes one node's.
    kv_cache_bytes_per_token: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted drafts / verified drafts (0 before any draft)."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

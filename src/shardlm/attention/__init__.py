"""Attention backends behind one primitive: partial attention returning (out, lse), and an
exact merge of partials. The single-device path, split-KV kernels and attention nodes all
reduce to it."""

from shardlm.attention.reference import merge_partials, partial_attention, visibility_mask

__all__ = ["merge_partials", "partial_attention", "visibility_mask"]

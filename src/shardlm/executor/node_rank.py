"""An attention-node rank (distributed transport): one AttentionNode, driven by the driver's
control broadcast and fed by the compute nodes of its head group.

Per STEP the node takes the step's metadata from the broadcast (so no per-layer metadata
travels), then for each layer receives one message q|k|v from each compute node with rows
in the step (rank (a, g): compute node a's tensor-parallel rank of this head group),
writes every compute node's new K/V, attends, and sends each its own rows' out and lse.
Message sizes follow from the metadata: each compute node's rows of the group's heads, and
the rows of those this node owns.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardlm.attention.node import AttentionNode
from shardlm.cache.paged import PagedKVCache
from shardlm.config import ModelConfig
from shardlm.distributed import protocol
from shardlm.distributed.parallel_state import TPContext
from shardlm.engine_config import EngineConfig
from shardlm.executor.launch import device_for_rank
from shardlm.executor.startup import (
    join_startup,
    propose_pool,
    report_compute_stats,
    report_node_stats,
    rshard_of,
)
from shardlm.models.llama import ShardLayout
from shardlm.step_inputs import StepInputs


def serve_attention_node(tp: TPContext, config: EngineConfig) -> None:
    p = config.parallel
    model = ModelConfig.from_pretrained(config.model.model)
    head_group, shard = divmod(tp.job_rank - p.compute_ranks, p.attention_nodes)
    layout = ShardLayout.for_rank(model, head_group, p.tp_size)
    dtype = config.torch_dtype
    device = device_for_rank(p.attention_device or config.model.device)
    block_size = config.cache.block_size
    per_token = PagedKVCache.bytes_per_token(
        model.num_hidden_layers, layout.kv_heads, model.head_dim, dtype
    )
    num_blocks, _ = join_startup(
        tp, lambda: propose_pool(config, per_token, device, 1), 0, block_size, per_token
    )
    node = AttentionNode(
        shard,
        rshard_of(config),
        model.num_hidden_layers,
        num_blocks,
        block_size,
        layout.kv_heads,
        model.head_dim,
        dtype,
        device,
        model.head_dim**-0.5,
        model.sliding_windows,
        head_group=head_group,
        name=p.role_of(tp.job_rank),
    )
    shapes = (layout.heads, layout.kv_heads, model.head_dim)
    while True:
        command, sizes, payload = protocol.receive(tp)
        if command is protocol.Command.SHUTDOWN:
            return
        if command is protocol.Command.RELEASE:
            node.release(payload.tolist())
        elif command is protocol.Command.NODE_STATS:
            report_node_stats(tp, config, [node])
        elif command is protocol.Command.COMPUTE_STATS:
            report_compute_stats(tp, config, None)
        elif command is protocol.Command.STEP:
            inputs = StepInputs.decode(sizes, payload)
            node.begin_step(
                inputs.seq_ids.tolist(),
                inputs.positions,
                inputs.num_decodes,
                inputs.token_counts(),
                inputs.row_groups,
            )
            peers = {a: p.compute_rank(a, head_group) for a in node.group_sizes()}
            run_layers(tp, node, model.num_hidden_layers, peers, shapes, dtype, device)
        # SCORE runs on the compute ranks alone: nothing to do.


def run_layers(
    tp: TPContext,
    node: AttentionNode,
    num_layers: int,
    peers: dict[int, int],
    shapes: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """One step's layers: from each compute node a (rank ``peers[a]``) its q | k | v, then
    back to each its (out, lse)."""
    heads, kv_heads, head_dim = shapes
    sizes = node.group_sizes()
    split = {
        a: [n * heads * head_dim, *(2 * [own * kv_heads * head_dim])]
        for a, (n, own) in sizes.items()
    }
    messages = {a: torch.empty(sum(parts), dtype=dtype) for a, parts in split.items()}
    for layer in range(num_layers):
        works = [
            dist.irecv(messages[a], src=rank, group=tp.node_group) for a, rank in peers.items()
        ]
        for work in works:
            work.wait(tp.timeout)
        parts = {}
        for a, (n, own) in sizes.items():
            q, k, v = messages[a].split(split[a])
            parts[a] = (
                q.view(n, heads, head_dim).to(device),
                k.view(own, kv_heads, head_dim).to(device),
                v.view(own, kv_heads, head_dim).to(device),
            )
        results = node.attend_groups(layer, parts)
        outgoing = [(peers[a], t.cpu()) for a, pair in results.items() for t in pair]
        sends = [dist.isend(t, dst=rank, group=tp.node_group) for rank, t in outgoing]
        for work in sends:  # ``outgoing`` keeps the tensors alive until they are sent
            work.wait(tp.timeout)

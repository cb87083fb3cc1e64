"""An attention-node rank (distributed transport): one AttentionNode, driven by the driver's
control broadcast and fed by its compute rank.

Per STEP the node takes the step's metadata from the broadcast (so no per-layer metadata
travels), then for each layer receives one message q|k|v from the compute rank of its head
group, attends, and sends back out and lse. Message sizes follow from the metadata: T
queries of the group's heads, and the rows this node owns.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardlm.attention.node import AttentionNode
from shardlm.config import ModelConfig
from shardlm.distributed import protocol
from shardlm.distributed.launch import WorkerArgs, device_for_rank
from shardlm.distributed.parallel_state import TPContext
from shardlm.engine.step_inputs import StepInputs
from shardlm.loader import DTYPES
from shardlm.models.llama import ShardLayout


def serve_attention_node(tp: TPContext, args: WorkerArgs) -> None:
    from shardlm.cache.paged import PagedKVCache
    from shardlm.distributed.worker import join_startup, propose_pool, report_node_stats, rshard_of

    config = ModelConfig.from_pretrained(args.model)
    group_rank, shard = divmod(tp.rank - args.tp_size, args.attention_nodes)
    layout = ShardLayout.for_rank(config, group_rank, args.tp_size)
    dtype = DTYPES[args.dtype]
    device = device_for_rank(args.attention_device_type)
    rshard = rshard_of(args)
    per_token = PagedKVCache.bytes_per_token(
        config.num_hidden_layers, layout.kv_heads, config.head_dim, dtype
    )

    num_blocks, _ = join_startup(
        tp, lambda: propose_pool(args, per_token, device, 1), 0, args.block_size, per_token
    )
    node = AttentionNode(
        shard,
        rshard,
        config.num_hidden_layers,
        num_blocks,
        args.block_size,
        layout.kv_heads,
        config.head_dim,
        dtype,
        device,
        config.head_dim**-0.5,
        config.sliding_windows,
        head_group=group_rank,
        name=args.role_of(tp.rank),
    )
    compute_rank = group_rank
    q_width = layout.heads * config.head_dim
    kv_width = layout.kv_heads * config.head_dim
    while True:
        command, sizes, payload = protocol.receive(tp)
        if command is protocol.Command.SHUTDOWN:
            return
        if command is protocol.Command.RELEASE:
            node.release(payload.tolist())
        elif command is protocol.Command.NODE_STATS:
            report_node_stats(tp, args, [node])
        elif command is protocol.Command.STEP:
            inputs = StepInputs.decode(sizes[:5], payload)
            positions = inputs.positions
            node.begin_step(
                inputs.seq_ids.tolist(), positions, inputs.num_decodes, inputs.token_counts()
            )
            t = positions.shape[0]
            own = node.owned_rows(positions).numel()
            message = torch.empty(t * q_width + 2 * own * kv_width, dtype=dtype)
            for layer in range(config.num_hidden_layers):
                work = dist.irecv(message, src=compute_rank, group=tp.node_group)
                work.wait(tp.timeout)
                q, k, v = message.split([t * q_width, own * kv_width, own * kv_width])
                out, lse = node.attend(
                    layer,
                    q.view(t, layout.heads, config.head_dim).to(device),
                    k.view(own, layout.kv_heads, config.head_dim).to(device),
                    v.view(own, layout.kv_heads, config.head_dim).to(device),
                )
                for tensor in (out.cpu(), lse.cpu()):
                    dist.isend(tensor, dst=compute_rank, group=tp.node_group).wait(tp.timeout)
        # SCORE runs on the compute ranks alone: nothing to do.

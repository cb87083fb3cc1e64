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
from shardlm.cache.paged import PagedKVCache
from shardlm.config import ModelConfig
from shardlm.distributed import protocol
from shardlm.distributed.parallel_state import TPContext
from shardlm.engine_config import EngineConfig
from shardlm.executor.launch import device_for_rank
from shardlm.executor.startup import join_startup, propose_pool, report_node_stats, rshard_of
from shardlm.models.llama import ShardLayout
from shardlm.step_inputs import StepInputs


def serve_attention_node(tp: TPContext, config: EngineConfig) -> None:
    p = config.parallel
    model = ModelConfig.from_pretrained(config.model.model)
    group_rank, shard = divmod(tp.rank - p.tp_size, p.attention_nodes)
    layout = ShardLayout.for_rank(model, group_rank, p.tp_size)
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
        head_group=group_rank,
        name=p.role_of(tp.rank),
    )
    compute_rank = group_rank
    q_width = layout.heads * model.head_dim
    kv_width = layout.kv_heads * model.head_dim
    while True:
        command, sizes, payload = protocol.receive(tp)
        if command is protocol.Command.SHUTDOWN:
            return
        if command is protocol.Command.RELEASE:
            node.release(payload.tolist())
        elif command is protocol.Command.NODE_STATS:
            report_node_stats(tp, config, [node])
        elif command is protocol.Command.STEP:
            inputs = StepInputs.decode(sizes[:5], payload)
            positions = inputs.positions
            node.begin_step(
                inputs.seq_ids.tolist(), positions, inputs.num_decodes, inputs.token_counts()
            )
            t = positions.shape[0]
            own = node.owned_rows(positions).numel()
            message = torch.empty(t * q_width + 2 * own * kv_width, dtype=dtype)
            for layer in range(model.num_hidden_layers):
                work = dist.irecv(message, src=compute_rank, group=tp.node_group)
                work.wait(tp.timeout)
                q, k, v = message.split([t * q_width, own * kv_width, own * kv_width])
                out, lse = node.attend(
                    layer,
                    q.view(t, layout.heads, model.head_dim).to(device),
                    k.view(own, layout.kv_heads, model.head_dim).to(device),
                    v.view(own, layout.kv_heads, model.head_dim).to(device),
                )
                for tensor in (out.cpu(), lse.cpu()):
                    dist.isend(tensor, dst=compute_rank, group=tp.node_group).wait(tp.timeout)
        # SCORE runs on the compute ranks alone: nothing to do.

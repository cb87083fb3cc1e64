"""An attention-node rank (distributed transport): one AttentionNode, driven by the driver's
control broadcast and fed by the compute nodes of its head group.

Per STEP the node takes the step's metadata from the broadcast (so no per-layer metadata
travels), then for each layer and micro-batch receives one message q|k|v from each compute
node with rows in it (rank (a, g): compute node a's tensor-parallel rank of this head
group), writes every compute node's new K/V, attends, and sends each its own rows' out and
lse. Message sizes follow from the metadata: each compute node's rows of the group's heads,
and the rows of those this node owns. The receives of the next (layer, micro-batch) are
posted before the node attends the current one, so its messages arrive meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
from shardlm.runtime.kv_scales import fp8_kv_scales
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
        model.num_hidden_layers, layout.kv_heads, model.head_dim, dtype, config.cache.kv_cache_dtype
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
        kv_cache_dtype=config.cache.kv_cache_dtype,
        fp8_scales=fp8_kv_scales(config, model),  # the compute ranks' scales
    )
    shapes = (layout.heads, layout.kv_heads, model.head_dim)
    # Where the exchanged tensors live: the node's GPU over NCCL, else host memory (gloo).
    link_device = device if p.attention_link == "nccl" else torch.device("cpu")
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
            node.begin_step(inputs, inputs.micro_batches(p.node_microbatches))
            run_layers(
                tp, node, model.num_hidden_layers, shapes, dtype, link_device, p.compute_rank
            )
        # SCORE runs on the compute ranks alone: nothing to do.


def run_layers(
    tp: TPContext,
    node: AttentionNode,
    num_layers: int,
    shapes: tuple[int, int, int],
    dtype: torch.dtype,
    link_device: torch.device,
    compute_rank: Callable[[int, int], int],
) -> None:
    """One step's layers, each in the node's micro-batches: from each compute node a with
    rows in the micro-batch its q | k | v, then back to it its (out, lse). Messages are
    received (tp.link_out) into and sent (tp.link_back) from ``link_device`` tensors."""
    heads, kv_heads, head_dim = shapes
    sizes = [node.group_sizes(mb) for mb in range(node.num_micro_batches)]
    splits = [
        {a: [n * heads * head_dim, *(2 * [own * kv_heads * head_dim])] for a, (n, own) in s.items()}
        for s in sizes
    ]
    order = [(layer, mb) for layer in range(num_layers) for mb in range(len(sizes))]
    # Receive buffers per micro-batch: the next item's messages land in one while the node
    # attends from views of another. With one micro-batch consecutive items share it, so
    # that case gets two sets, alternating.
    sets = 2 if len(sizes) == 1 else 1
    buffers = [
        [
            {
                a: torch.empty(sum(parts), dtype=dtype, device=link_device)
                for a, parts in split.items()
            }
            for split in splits
        ]
        for _ in range(sets)
    ]

    def receive(item: int) -> list[dist.Work]:
        messages = buffers[item % sets][order[item][1]]
        return [
            dist.irecv(messages[a], src=compute_rank(a, node.head_group), group=tp.link_out)
            for a in messages
        ]

    waited = 0.0
    # The previous item's answers, kept alive until sent; waited for one item later (the
    # compute side posted their receives before the node even got the message), so at
    # most two items' answers are held, not a whole step's.
    sending: list[tuple[dist.Work, torch.Tensor]] = []
    incoming = receive(0)
    for item, (layer, mb) in enumerate(order):
        start = time.perf_counter()
        for work in incoming:
            work.wait(tp.timeout)
        waited += time.perf_counter() - start
        if item + 1 < len(order):
            incoming = receive(item + 1)
        parts = {}
        for a, (n, own) in sizes[mb].items():
            q, k, v = buffers[item % sets][mb][a].split(splits[mb][a])
            parts[a] = (
                q.view(n, heads, head_dim).to(node.device),
                k.view(own, kv_heads, head_dim).to(node.device),
                v.view(own, kv_heads, head_dim).to(node.device),
            )
        sent = []
        for a, pair in node.attend_groups(layer, parts, mb).items():
            for t in pair:
                t = t.to(link_device)
                dst = compute_rank(a, node.head_group)
                sent.append((dist.isend(t, dst=dst, group=tp.link_back), t))
        for work, _ in sending:
            work.wait(tp.timeout)
        sending = sent
    for work, _ in sending:
        work.wait(tp.timeout)
    node.wait_us_last_step = int(waited * 1e6)
    node.wait_us += node.wait_us_last_step

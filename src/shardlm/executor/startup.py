"""What every rank of a job does at start-up, in the same order: report its weight bytes,
agree on the KV pool size, then build its pools; and the attention-node statistics query,
which also involves every rank.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from shardlm.attention.node import AttentionNode
from shardlm.cache.rshard import RShard
from shardlm.distributed.parallel_state import TPContext
from shardlm.engine_config import EngineConfig
from shardlm.runtime.compute_nodes import COMPUTE_FIELDS
from shardlm.runtime.kv_sizing import pools_sharing_memory, propose_kv_tokens
from shardlm.runtime.runner import ModelRunner

logger = logging.getLogger(__name__)

NO_POOL = 2**62  # what a rank without a KV pool proposes to the MIN
# NodeStats after (head_group, shard): kv_tokens, blocks_in_use, num_blocks, sequences and
# the two wait counters.
STATS_FIELDS = 6


def startup_timeout(tp: TPContext) -> datetime.timedelta:
    """Ranks load at different speeds: start-up waits longer than a step may."""
    return max(tp.timeout * 10, datetime.timedelta(minutes=10))


def rshard_of(config: EngineConfig) -> RShard:
    return RShard(config.parallel.attention_nodes, config.parallel.kv_chunk_size)


def setup_compute_rank(
    tp: TPContext, runner: ModelRunner, config: EngineConfig
) -> tuple[int, list[int]]:
    """A compute rank's start-up: size its KV pool (or its in-process attention nodes') with
    the other ranks, then build it. Returns (blocks per pool, weight bytes of every rank)."""
    per_token = runner.kv_bytes_per_token()
    p, block_size = config.parallel, config.cache.block_size
    node_device = in_process_node_device(config, runner)

    def propose() -> tuple[int, str] | None:
        if p.remote_nodes:
            return None  # the node ranks hold the pools
        if p.attention_nodes:
            return propose_pool(config, per_token, node_device, p.attention_nodes)
        return propose_pool(config, per_token, runner.device, 1)

    num_blocks, weights = join_startup(tp, propose, runner.weight_bytes, block_size, per_token)
    if p.attention_nodes == 0:
        runner.init_kv_cache(num_blocks, block_size)
        if runner.attention_backend == "triton" and runner.device.type == "cuda":
            runner.check_triton_kernels(fall_back=config.kernels.attention_backend == "auto")
        if config.uses_cuda_graphs and runner.attention_backend == "triton":
            runner.init_decode_graphs(config.scheduler.max_num_seqs, capture=True)
    elif p.remote_nodes:
        ranks = [p.node_rank(tp.rank, s) for s in range(p.attention_nodes)]
        runner.init_attention_nodes(num_blocks, block_size, rshard_of(config), None, ranks)
    else:
        runner.init_attention_nodes(num_blocks, block_size, rshard_of(config), node_device)
    return num_blocks, weights


def propose_pool(
    config: EngineConfig, per_token: int, device: torch.device, pools_in_process: int
) -> tuple[int, str]:
    """This rank's proposal for the size of each of its ``pools_in_process`` KV pools on
    ``device``: the compute rank's own pool, or with attention nodes each node's pool (which
    holds at most node 0's share of a full-length sequence)."""
    p, max_len = config.parallel, config.model.max_model_len
    nodes = p.attention_nodes
    pools_in_job = p.tp_size * max(1, nodes)
    seq_tokens = rshard_of(config).count(max_len, 0) if nodes else max_len
    return propose_kv_tokens(
        per_token,
        device,
        config.cache.kv_cache_tokens,
        config.cache.memory_utilization,
        pools_sharing_memory(device, pools_in_job, pools_in_process, p.world_size),
        config.scheduler.max_num_seqs * seq_tokens,
    )


def in_process_node_device(config: EngineConfig, runner: ModelRunner) -> torch.device:
    """In-process nodes live on ``attention_device`` if given, else beside the model."""
    where = config.parallel.attention_device
    return torch.device(where) if where else runner.device


def join_startup(
    tp: TPContext,
    propose: Callable[[], tuple[int, str] | None],
    weight_bytes: int,
    block_size: int,
    per_token: int,
) -> tuple[int, list[int]]:
    """The start-up collectives every rank of the job makes, in this order: report each
    rank's weight bytes — which doubles as "every rank has loaded", so pools sized after it
    see the memory the weights took — then agree on the KV pool size (the smallest any
    pool-holding rank proposes; ``propose`` returns None on ranks without a pool).
    Returns (blocks per pool, weight bytes by rank)."""
    weights = [weight_bytes]
    if tp.has_peers:
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(tp.job_size)]
        work = dist.all_gather(
            sizes, torch.tensor([weight_bytes]), group=tp.control_group, async_op=True
        )
        work.wait(startup_timeout(tp))
        weights = [int(x) for x in sizes]
    tokens, how = propose() or (NO_POOL, "")
    if tp.has_peers:
        agreed = torch.tensor([tokens], dtype=torch.long)
        work = dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=tp.control_group, async_op=True)
        work.wait(startup_timeout(tp))
        if int(agreed) < tokens:
            how = "the smallest pool another rank could hold"
        tokens = int(agreed)
    if tokens < block_size:
        raise ValueError(
            f"{how} leaves room for {tokens} KV-cache tokens, less than one block "
            f"({block_size} tokens × {per_token} bytes); raise memory_utilization or set "
            "kv_cache_tokens"
        )
    num_blocks = tokens // block_size
    if tp.is_driver:
        logger.info(
            "KV cache: %d blocks × %d tokens = %d tokens, %.2f GiB per pool (%s)",
            num_blocks,
            block_size,
            num_blocks * block_size,
            num_blocks * block_size * per_token / 2**30,
            how,
        )
    return num_blocks, weights


def report_compute_stats(
    tp: TPContext, config: EngineConfig, runner: ModelRunner | None
) -> torch.Tensor:
    """Every rank: add its compute-node counters (runtime/compute_nodes.py) to an
    [α, fields] table summed over the job; attention-node ranks add nothing."""
    table = torch.zeros(config.parallel.compute_nodes, len(COMPUTE_FIELDS), dtype=torch.long)
    if runner is not None:
        table += runner.counters.table
    if tp.has_peers:
        work = dist.all_reduce(table, group=tp.control_group, async_op=True)
        work.wait(tp.timeout)
    return table


def report_node_stats(
    tp: TPContext, config: EngineConfig, local_nodes: list[AttentionNode]
) -> torch.Tensor:
    """Every rank: add the stats of the attention nodes it holds to a [t·β, 6] table summed
    over the job (each node appears in exactly one process). The driver gets the table."""
    p = config.parallel
    table = torch.zeros(p.tp_size * p.attention_nodes, STATS_FIELDS, dtype=torch.long)
    for node in local_nodes:
        st = node.stats
        table[st.head_group * p.attention_nodes + st.shard] = torch.tensor(
            [
                st.kv_tokens,
                st.blocks_in_use,
                st.num_blocks,
                st.sequences,
                st.wait_on_compute_us_last_step,
                st.wait_on_compute_us,
            ]
        )
    if tp.has_peers:
        work = dist.all_reduce(table, group=tp.control_group, async_op=True)
        work.wait(tp.timeout)
    return table

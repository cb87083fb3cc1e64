"""How many KV blocks the pool gets: exactly what was asked, or what free memory allows.

Every tensor-parallel rank runs this at start-up; they agree on the smallest count any of
them can hold (an AllReduce MIN), so block tables mean the same slots everywhere.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from shardlm.engine.runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_UTILIZATION = {"cuda": 0.9, "cpu": 0.3}


def plan_kv_blocks(
    runner: ModelRunner,
    kv_cache_tokens: int | None,
    memory_utilization: float | None,
    block_size: int,
    max_num_seqs: int,
) -> int:
    per_token = runner.kv_bytes_per_token()
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
        how = "kv_cache_tokens"
    else:
        util = memory_utilization or DEFAULT_MEMORY_UTILIZATION[runner.device.type]
        budget = memory_budget(runner.device, util)
        if runner.device.type == "cpu":
            # Ranks on one host share its RAM: each takes its part of the fraction.
            budget //= int(os.environ.get("LOCAL_WORLD_SIZE", runner.tp.world_size))
        # More than every sequence at full length can never be used.
        tokens = min(budget // per_token, max_num_seqs * runner.max_model_len)
        how = f"memory_utilization={util} of free memory ({budget / 2**30:.2f} GiB)"
    if runner.tp.enabled:
        agreed = torch.tensor([tokens], dtype=torch.long)
        from shardlm.distributed.worker import startup_timeout

        work = dist.all_reduce(
            agreed, op=dist.ReduceOp.MIN, group=runner.tp.control_group, async_op=True
        )
        work.wait(startup_timeout(runner.tp))
        tokens = int(agreed)
    if tokens < block_size:
        raise ValueError(
            f"{how} leaves room for {tokens} KV-cache tokens, less than one block "
            f"({block_size} tokens × {per_token} bytes); raise memory_utilization or set "
            "kv_cache_tokens"
        )
    num_blocks = tokens // block_size
    if runner.tp.is_driver:
        logger.info(
            "KV cache: %d blocks × %d tokens = %d tokens, %.2f GiB per rank (%s)",
            num_blocks,
            block_size,
            num_blocks * block_size,
            num_blocks * block_size * per_token / 2**30,
            how,
        )
    return num_blocks


def memory_budget(device: torch.device, utilization: float) -> int:
    """Bytes the KV pool may take: ``utilization`` of what is free now (after the weights)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(total * utilization) - (total - free))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return int(available * utilization)

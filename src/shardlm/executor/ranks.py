"""A rank ≥ 1 serves the driver as a compute rank or an attention node, whichever way it was
started (spawned: executor/worker_main.py; torchrun: the same command as the driver)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardlm.distributed.parallel_state import TPContext
from shardlm.distributed.torchrun import torchrun_rank
from shardlm.engine_config import EngineConfig
from shardlm.executor.compute_rank import serve_compute_rank
from shardlm.executor.launch import init_groups, threads_per_rank
from shardlm.executor.node_rank import serve_attention_node


def serve(tp: TPContext, config: EngineConfig) -> None:
    """Serve the driver as this rank's role until SHUTDOWN."""
    torch.set_num_threads(threads_per_rank(config.parallel.world_size))
    if tp.job_rank >= config.parallel.compute_ranks:
        serve_attention_node(tp, config)
        dist.destroy_process_group()
    else:
        serve_compute_rank(tp, config)


def run_torchrun_worker(config: EngineConfig) -> int:
    """A rank > 0 of a torchrun job: given the same options as the driver (the same command
    line), resolve them the same way and serve the driver."""
    config = config.resolve()
    rank, world = torchrun_rank()
    p = config.parallel
    if world != p.world_size:
        raise ValueError(
            f"torchrun's WORLD_SIZE {world} does not match the job ({p.compute_ranks} compute "
            f"ranks + {p.world_size - p.compute_ranks} attention nodes = {p.world_size})"
        )
    serve(init_groups(rank, config, None), config)
    return 0

"""A tensor-parallel worker (rank ≥ 1): build this rank's shard, then obey the driver.

The loop blocks on the control broadcast, runs each STEP / SCORE exactly as the driver does
(the model's collectives pair up across ranks), and returns on SHUTDOWN. Any error ends the
process with a non-zero exit code, which the driver reports by rank.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from shardlm.config import ModelConfig
from shardlm.distributed import protocol
from shardlm.distributed.launch import (
    WorkerArgs,
    device_for_rank,
    init_groups,
    threads_per_rank,
    torchrun_rank,
)
from shardlm.distributed.parallel_state import TPContext
from shardlm.engine.kv_sizing import plan_kv_blocks
from shardlm.engine.runner import ModelRunner
from shardlm.engine.step_inputs import StepInputs
from shardlm.loader import DTYPES, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


def run_torchrun_worker(
    model: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
    kv_cache_tokens: int | None = None,
    memory_utilization: float | None = None,
    block_size: int = 16,
    max_num_seqs: int = 256,
    tensor_parallel_size: int = 1,
    tp_timeout_s: float = 60.0,
) -> int:
    """A rank > 0 of a torchrun job: given the same engine arguments as the driver (the same
    command line), resolve them the same way and serve the driver."""
    config = ModelConfig.from_pretrained(model)
    dev = resolve_device(device)
    args = WorkerArgs.of(
        model,
        resolve_dtype(dtype, config.torch_dtype, dev),
        dev,
        max_model_len or config.max_position_embeddings,
        kv_cache_tokens,
        memory_utilization,
        block_size,
        max_num_seqs,
        tensor_parallel_size,
        tp_timeout_s,
    )
    rank, world = torchrun_rank()
    tp = init_groups(rank, world, args.device_type, args.timeout_s, None)
    serve(tp, args)
    return 0


def serve(tp: TPContext, args: WorkerArgs) -> None:
    """Build the shard, size the KV pool with the other ranks, then run the command loop."""
    torch.set_num_threads(threads_per_rank(args.world_size))
    device = device_for_rank(args.device_type)
    config = ModelConfig.from_pretrained(args.model)
    runner = ModelRunner(args.model, config, DTYPES[args.dtype], device, args.max_model_len, tp)
    join_startup(tp, runner, args)
    while True:
        command, sizes, payload = protocol.receive(tp)
        if command is protocol.Command.SHUTDOWN:
            break
        if command is protocol.Command.STEP:
            runner.run(StepInputs.decode(sizes[:5], payload).to(device))
        elif command is protocol.Command.SCORE:
            runner.score(payload)
    dist.destroy_process_group()


def startup_timeout(tp: TPContext) -> datetime.timedelta:
    """Ranks load at different speeds: start-up waits longer than a step may."""
    return max(tp.timeout * 10, datetime.timedelta(minutes=10))


def join_startup(tp: TPContext, runner: ModelRunner, args: WorkerArgs) -> tuple[int, list[int]]:
    """The start-up collectives every rank makes, in this order: agree on the KV pool size
    (the smallest any rank can hold) and report the weight bytes each rank holds."""
    num_blocks = plan_kv_blocks(
        runner, args.kv_cache_tokens, args.memory_utilization, args.block_size, args.max_num_seqs
    )
    runner.init_kv_cache(num_blocks, args.block_size)
    if not tp.enabled:
        return num_blocks, [runner.weight_bytes]
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(tp.world_size)]
    work = dist.all_gather(
        sizes, torch.tensor([runner.weight_bytes]), group=tp.control_group, async_op=True
    )
    work.wait(startup_timeout(tp))
    return num_blocks, [int(s) for s in sizes]

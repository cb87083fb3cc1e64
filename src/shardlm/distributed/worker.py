"""A worker rank (≥ 1): build this rank's part, then obey the driver.

A compute rank (tensor-parallel shard) blocks on the control broadcast and runs each STEP /
SCORE exactly as the driver does (the model's collectives pair up across ranks); an
attention-node rank runs distributed/node_worker.py. Both return on SHUTDOWN. Any error ends
the process with a non-zero exit code, which the driver reports by the rank's role.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from shardlm.attention.rshard import RShard
from shardlm.attention.sharded import LocalLink, ShardedAttention
from shardlm.config import ModelConfig
from shardlm.distributed import protocol
from shardlm.distributed.launch import (
    WorkerArgs,
    device_for_rank,
    init_groups,
    threads_per_rank,
    torchrun_rank,
    under_torchrun,
)
from shardlm.distributed.parallel_state import TPContext
from shardlm.engine.kv_sizing import pools_sharing_memory, propose_kv_tokens
from shardlm.engine.runner import ModelRunner
from shardlm.engine.step_inputs import StepInputs
from shardlm.kernels import resolve_attention_backend
from shardlm.loader import DTYPES, resolve_device, resolve_dtype
from shardlm.models.transforms import WeightTransforms

logger = logging.getLogger(__name__)


def run_torchrun_worker(model: str | os.PathLike, **engine_args) -> int:
    """A rank > 0 of a torchrun job: given the same engine arguments as the driver (the same
    command line), resolve them the same way and serve the driver."""
    args = resolve_worker_args(model, **engine_args)
    rank, world = torchrun_rank()
    if world != args.world_size:
        raise ValueError(
            f"torchrun's WORLD_SIZE {world} does not match the job "
            f"({args.tp_size} compute ranks + {args.world_size - args.tp_size} attention "
            f"nodes = {args.world_size})"
        )
    tp = init_groups(rank, args, None)
    serve(tp, args)
    return 0


def resolve_worker_args(
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
    attention_nodes: int = 0,
    kv_chunk_size: int = 16,
    attention_device: str | None = None,
    attention_transport: str = "distributed",
    arm: str = "none",
    arm_calibration: str | os.PathLike | None = None,
    quantization: str | None = None,
    quantize_all_linears: bool = False,
    load_format: str = "auto",
    attention_backend: str = "auto",
    enforce_eager: bool = False,
) -> WorkerArgs:
    """Engine arguments resolved as LLMEngine resolves them (dtype, devices, the calibration
    file ARM smoothing reads)."""
    config = ModelConfig.from_pretrained(model)
    dev = resolve_device(device)
    transforms = WeightTransforms.resolve(
        model, arm, arm_calibration, quantization, quantize_all_linears
    )
    return WorkerArgs.of(
        model,
        resolve_dtype(dtype, config.torch_dtype, dev),
        dev,
        max_model_len=max_model_len or config.max_position_embeddings,
        kv_cache_tokens=kv_cache_tokens,
        memory_utilization=memory_utilization,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        tp_size=tensor_parallel_size,
        timeout_s=tp_timeout_s,
        attention_nodes=attention_nodes,
        kv_chunk_size=kv_chunk_size,
        attention_device=str(resolve_device(attention_device)) if attention_device else None,
        attention_transport=attention_transport,
        arm=transforms.arm,
        arm_calibration=transforms.calibration,
        quantization=transforms.quantization,
        quantize_all_linears=transforms.quantize_all_linears,
        load_format=load_format,
        attention_backend=resolve_attention_backend(
            attention_backend, dev, block_size, attention_nodes
        ),
        enforce_eager=enforce_eager,
        kernels_chosen_by_auto=attention_backend == "auto",
    )


def check_attention_device(
    attention_device: str | None,
    transport: str,
    tensor_parallel_size: int,
    attention_nodes: int,
    compute_device: torch.device,
) -> None:
    """Refuse, before anything starts, an attention device that cannot work."""
    dev = compute_device
    if attention_device is not None:
        try:
            dev = resolve_device(attention_device)
        except ValueError as e:
            raise ValueError(f"attention_device: {e}") from None
    if attention_nodes and transport == "distributed" and dev.type == "cuda":
        if attention_device is not None and dev.index is not None:
            raise ValueError(
                f"attention_device={attention_device!r}: distributed attention nodes each take "
                "the GPU of their local rank; give 'cuda' without an index"
            )
        ranks = tensor_parallel_size * (1 + attention_nodes)
        if not under_torchrun() and torch.cuda.device_count() < ranks:
            raise ValueError(
                f"attention_nodes={attention_nodes} on CUDA with the distributed transport needs "
                f"one GPU per rank ({ranks}), this machine has {torch.cuda.device_count()}; "
                "use attention_device='cpu' or attention_transport='in-process'"
            )


def serve(tp: TPContext, args: WorkerArgs) -> None:
    """Build this rank's part, size the KV pools with the other ranks, then obey the driver."""
    torch.set_num_threads(threads_per_rank(args.world_size))
    if tp.rank >= args.tp_size:
        from shardlm.distributed.node_worker import serve_attention_node

        serve_attention_node(tp, args)
        dist.destroy_process_group()
        return
    device = device_for_rank(args.device_type)
    config = ModelConfig.from_pretrained(args.model)
    runner = ModelRunner(
        args.model,
        config,
        DTYPES[args.dtype],
        device,
        args.max_model_len,
        tp,
        args.transforms,
        args.load_format,
        args.attention_backend,
    )
    setup_compute_rank(tp, runner, args)
    while True:
        command, sizes, payload = protocol.receive(tp)
        if command is protocol.Command.SHUTDOWN:
            break
        if command is protocol.Command.STEP:
            runner.run(StepInputs.decode(sizes[:5], payload))
        elif command is protocol.Command.SCORE:
            runner.score(payload)
        elif command is protocol.Command.RELEASE:
            runner.release(payload.tolist())
        elif command is protocol.Command.NODE_STATS:
            report_node_stats(tp, args, runner_nodes(runner))
    dist.destroy_process_group()


def startup_timeout(tp: TPContext) -> datetime.timedelta:
    """Ranks load at different speeds: start-up waits longer than a step may."""
    return max(tp.timeout * 10, datetime.timedelta(minutes=10))


def setup_compute_rank(
    tp: TPContext, runner: ModelRunner, args: WorkerArgs
) -> tuple[int, list[int]]:
    """A compute rank's start-up: size its KV pool (or its in-process attention nodes') with
    the other ranks, then build it. Returns (blocks per pool, weight bytes of every rank)."""
    per_token = runner.kv_bytes_per_token()

    def propose() -> tuple[int, str] | None:
        if args.remote_nodes:
            return None  # the node ranks hold the pools
        if args.attention_nodes:
            return propose_pool(args, per_token, node_device, args.attention_nodes)
        return propose_pool(args, per_token, runner.device, 1)

    node_device = in_process_node_device(args, runner)
    num_blocks, weights = join_startup(tp, propose, runner.weight_bytes, args.block_size, per_token)
    if args.attention_nodes == 0:
        runner.init_kv_cache(num_blocks, args.block_size)
        if runner.attention_backend == "triton" and runner.device.type == "cuda":
            runner.check_triton_kernels(fall_back=args.kernels_chosen_by_auto)
        if args.uses_cuda_graphs and runner.attention_backend == "triton":
            runner.init_decode_graphs(args.max_num_seqs, capture=True)
    elif args.remote_nodes:
        ranks = [args.node_rank(tp.rank, s) for s in range(args.attention_nodes)]
        runner.init_attention_nodes(num_blocks, args.block_size, rshard_of(args), None, ranks)
    else:
        runner.init_attention_nodes(num_blocks, args.block_size, rshard_of(args), node_device)
    return num_blocks, weights


def propose_pool(
    args: WorkerArgs, per_token: int, device: torch.device, pools_in_process: int
) -> tuple[int, str]:
    """This rank's proposal for the size of each of its ``pools_in_process`` KV pools on
    ``device``: the compute rank's own pool, or with attention nodes each node's pool (which
    holds at most node 0's share of a full-length sequence)."""
    nodes = args.attention_nodes
    pools_in_job = args.tp_size * max(1, nodes)
    seq_tokens = rshard_of(args).count(args.max_model_len, 0) if nodes else args.max_model_len
    return propose_kv_tokens(
        per_token,
        device,
        args.kv_cache_tokens,
        args.memory_utilization,
        pools_sharing_memory(device, pools_in_job, pools_in_process, args.world_size),
        args.max_num_seqs * seq_tokens,
    )


def in_process_node_device(args: WorkerArgs, runner: ModelRunner) -> torch.device:
    """In-process nodes live on ``attention_device`` if given, else beside the model."""
    return torch.device(args.attention_device) if args.attention_device else runner.device


def rshard_of(args: WorkerArgs) -> RShard:
    return RShard(args.attention_nodes, args.kv_chunk_size)


NO_POOL = 2**62  # what a rank without a KV pool proposes to the MIN


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


def runner_nodes(runner: ModelRunner) -> list:
    """The attention nodes living in this compute rank's process (in-process transport)."""
    attention = getattr(runner, "attention", None)
    if not isinstance(attention, ShardedAttention):
        return []
    return [link.node for link in attention.links if isinstance(link, LocalLink)]


STATS_FIELDS = 4  # kv_tokens, blocks_in_use, num_blocks, sequences


def report_node_stats(tp: TPContext, args: WorkerArgs, local_nodes: list) -> torch.Tensor:
    """Every rank: add the stats of the attention nodes it holds to a [t·β, 4] table summed
    over the job (each node appears in exactly one process). The driver gets the table."""
    table = torch.zeros(args.tp_size * args.attention_nodes, STATS_FIELDS, dtype=torch.long)
    for node in local_nodes:
        st = node.stats
        table[st.head_group * args.attention_nodes + st.shard] = torch.tensor(
            [st.kv_tokens, st.blocks_in_use, st.num_blocks, st.sequences]
        )
    if tp.has_peers:
        work = dist.all_reduce(table, group=tp.control_group, async_op=True)
        work.wait(tp.timeout)
    return table

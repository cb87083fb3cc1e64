"""The driver's handle on a job: rank 0's ModelRunner and, when there are any, the other
ranks (tensor-parallel workers, attention nodes) — started, commanded, watched and stopped.

The engine above it sees one object with ``run_step``, ``score``, ``release``,
``node_stats`` and ``shutdown``, whether the job is one process or many. Every call that
talks to other ranks goes through ``guarded``: a failed collective becomes a WorkerFailure
naming the rank, with every rank stopped.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.distributed as dist

from shardlm.attention.node import NodeStats
from shardlm.attention.sharded import AttentionTraffic
from shardlm.config import ModelConfig
from shardlm.distributed import protocol
from shardlm.distributed.parallel_state import TPContext
from shardlm.distributed.torchrun import torchrun_rank, under_torchrun
from shardlm.engine_config import EngineConfig
from shardlm.errors import ShardlmError, WorkerFailure
from shardlm.executor.launch import (
    WorkerGroup,
    device_for_rank,
    init_groups,
    spawn_workers,
    threads_per_rank,
)
from shardlm.executor.startup import report_compute_stats, report_node_stats, setup_compute_rank
from shardlm.runtime.runner import ModelRunner
from shardlm.step_inputs import StepInputs

logger = logging.getLogger(__name__)


class Executor:
    """Rank 0 of the job described by a resolved EngineConfig."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        self.config = config
        self.workers: WorkerGroup | None = None
        self._closed = False
        self._owns_group = False
        self._threads = torch.get_num_threads()
        self.runner: ModelRunner | None = None
        tp = TPContext.single()
        device = torch.device(config.model.device)
        world = config.parallel.world_size
        if world > 1:
            tp, self.workers = start_driver(config)
            self._owns_group = True
            # An engine dropped without shutdown() must not leave its workers running.
            self._finalizer = weakref.finalize(self, _stop_job, self.workers)
            torch.set_num_threads(threads_per_rank(world))
            if device.type == "cuda":
                device = device_for_rank("cuda")
        self.tp = tp
        try:
            self.runner = ModelRunner(config, model_config, device, tp)
            self.num_blocks, self.rank_weight_bytes = self.guarded(
                setup_compute_rank, tp, self.runner, config
            )
        except BaseException:
            self.shutdown(graceful=False)
            raise

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # -- commands --
    def run_step(self, inputs: StepInputs) -> torch.Tensor:
        """One forward on every rank; the logits of ``inputs.sample_rows`` (float32). Not
        guarded by itself: the caller guards it together with reading the sampled ids, since
        on CUDA a failed collective surfaces only there."""
        if self.tp.has_peers:
            protocol.send(self.tp, protocol.Command.STEP, inputs.header(), inputs.payload())
        return self.runner.run(inputs)

    def score(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, vocab] at every position of one prompt (private cache)."""

        def score() -> torch.Tensor:
            tensor = torch.tensor(ids, dtype=torch.long)
            if self.tp.has_peers:
                protocol.send(self.tp, protocol.Command.SCORE, [], tensor)
            return self.runner.score(tensor)

        return self.guarded(score)

    def release(self, seq_ids: list[int]) -> None:
        """Tell every rank's attention nodes which sequences the scheduler freed."""

        def release() -> None:
            if self.tp.has_peers:
                ids = torch.tensor(seq_ids, dtype=torch.long)
                protocol.send(self.tp, protocol.Command.RELEASE, [], ids)
            self.runner.release(seq_ids)

        self.guarded(release)

    def node_stats(self) -> list[NodeStats]:
        """What each attention node holds, as the nodes report it (wherever they run)."""

        def collect() -> torch.Tensor:
            if self.tp.has_peers:
                protocol.send(self.tp, protocol.Command.NODE_STATS, [], None)
            return report_node_stats(self.tp, self.config, self.runner.attention.local_nodes())

        beta = self.config.parallel.attention_nodes
        return [
            NodeStats(i // beta, i % beta, *(int(x) for x in row))
            for i, row in enumerate(self.guarded(collect).tolist())
        ]

    def compute_stats(self) -> torch.Tensor:
        """[α, len(COMPUTE_FIELDS)]: every compute node's counters, summed over its ranks
        (each rank reports its own)."""

        def collect() -> torch.Tensor:
            if self.tp.has_peers:
                protocol.send(self.tp, protocol.Command.COMPUTE_STATS, [], None)
            return report_compute_stats(self.tp, self.config, self.runner)

        return self.guarded(collect)

    @property
    def traffic(self) -> AttentionTraffic | None:
        return self.runner.attention.traffic

    # -- failures --
    def guarded(self, fn, *args):
        """Run something that talks to the other ranks. A failed collective becomes a
        WorkerFailure naming the rank, with every rank stopped. Anything else that interrupts
        a step half-way (bad input found late, Ctrl-C) also stops the workers, since they
        would otherwise be left inside that step's collectives: the engine is then failed."""
        if self._closed:
            raise WorkerFailure("the engine was shut down")
        if self.workers is None and not self.tp.has_peers:
            return fn(*args)
        if self.workers is not None:
            self.workers.check_alive()
        try:
            return fn(*args)
        except WorkerFailure:
            raise
        except (ShardlmError, ValueError, KeyboardInterrupt) as e:
            self._abandon(f"interrupted by {type(e).__name__}")
            raise
        except Exception as e:  # a collective failed or timed out
            if self.workers is None:  # torchrun: it stops the other ranks itself
                raise WorkerFailure(
                    f"a tensor-parallel collective failed: {str(e).splitlines()[0]}; "
                    "torchrun stops the other ranks"
                ) from e
            self.workers.diagnose(e)
            raise  # diagnose always raises; this keeps the flow explicit
        except BaseException:
            self._abandon("interrupted")
            raise

    def _abandon(self, why: str) -> None:
        """Stop every worker and mark the engine failed (without raising)."""
        if self.workers is not None and self.workers.failed is None:
            self.workers.failed = WorkerFailure(
                f"the engine was {why} during a tensor-parallel step; all ranks were stopped"
            )
            self.workers.kill()

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers (if any) and release the process groups. Idempotent."""
        if self._closed:
            return
        self._closed = True
        failed = self.workers is not None and self.workers.failed is not None
        if graceful and not failed and self.runner is not None and self.tp.has_peers:
            try:
                protocol.send(self.tp, protocol.Command.SHUTDOWN, [], None)
            except Exception:
                logger.warning("could not tell the workers to shut down; stopping them")
                graceful = False
        if self.workers is not None:
            if graceful:
                self.workers.join(timeout=10)
            else:
                self.workers.kill()
        if self._owns_group:
            self._finalizer.detach()
            if dist.is_initialized():
                dist.destroy_process_group()
        torch.set_num_threads(self._threads)


def _stop_job(workers: WorkerGroup | None) -> None:
    """Last resort for an engine garbage-collected (or a process exiting) without shutdown."""
    if workers is not None:
        workers.kill()
    if dist.is_initialized():
        dist.destroy_process_group()


def start_driver(config: EngineConfig) -> tuple[TPContext, WorkerGroup | None]:
    """Become rank 0: join a torchrun job, or spawn the workers ourselves."""
    if dist.is_initialized():
        raise ValueError(
            "a tensor-parallel engine (or another torch.distributed job) is already running in "
            "this process; shut it down first (one tensor-parallel engine per process)"
        )
    p = config.parallel
    if under_torchrun():
        rank, world = torchrun_rank()
        if world != p.world_size or rank != 0:
            raise ValueError(
                f"under torchrun, WORLD_SIZE ({world}) must equal the compute ranks "
                f"({p.compute_ranks}: α·t) plus the attention-node ranks "
                f"({p.world_size - p.compute_ranks}: t·β), and only RANK 0 builds the engine "
                f"(this is {rank})"
            )
        return init_groups(0, config, None), None
    return spawn_workers(config)

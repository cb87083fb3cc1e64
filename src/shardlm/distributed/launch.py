"""Starting, watching and stopping the ranks of a tensor-parallel job.

Two ways in, one code path after:

* Spawned (``LLM(..., tensor_parallel_size=N)`` or ``shardlm generate --tp N``): the calling
  process becomes rank 0, the driver, and starts ranks 1..N-1 as fresh Python processes
  (``python -m shardlm.distributed.worker_main``; unlike multiprocessing's spawn this never
  re-imports the user's script, so no ``if __name__ == "__main__"`` guard is needed). They
  rendezvous through a TCPStore the driver opens on a port the OS picks, so two jobs on one
  host never collide.
* torchrun (``torchrun --nproc-per-node N -m shardlm generate ...``, one or many hosts):
  every rank runs the same command; RANK 0 is the driver, the others enter the worker loop.

Failure handling. Each worker's heartbeat thread writes a timestamp into the store every
second and exits the process if its parent (the driver, when spawned) disappears. The model's
collectives run with the failure timeout, so a rank that dies or hangs mid-step makes the
driver's collective fail within it; the driver then names the rank (dead process, or stale
heartbeat), kills every worker, and raises WorkerFailure.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from shardlm.attention.node import node_name
from shardlm.distributed.parallel_state import TPContext
from shardlm.errors import WorkerFailure
from shardlm.models.transforms import WeightTransforms

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
# Workers wait on the control group between steps, for as long as the driver is idle.
CONTROL_TIMEOUT = datetime.timedelta(days=7)


@dataclass
class WorkerArgs:
    """Everything a rank needs to build its part; picklable (sent once, at spawn)."""

    model: str
    dtype: str  # a resolved dtype name, e.g. "float32"
    device_type: str  # "cpu" | "cuda"
    max_model_len: int
    kv_cache_tokens: int | None
    memory_utilization: float | None
    block_size: int
    max_num_seqs: int
    tp_size: int
    timeout_s: float
    attention_nodes: int = 0  # β token shards per head group; 0 = KV on the compute ranks
    kv_chunk_size: int = 16
    attention_device: str | None = None  # None: the compute device
    attention_transport: str = "distributed"  # "distributed" | "in-process"
    arm: str = "none"  # the WeightTransforms fields, flat so the args stay JSON
    arm_calibration: str | None = None
    quantization: str | None = None
    quantize_all_linears: bool = False
    load_format: str = "auto"  # "dummy": random weights, no checkpoint read (benchmarks)
    attention_backend: str = "torch"  # resolved: "torch" (SDPA) | "triton" (the kernels)
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    kernels_chosen_by_auto: bool = False  # "auto" picked triton: fall back if it cannot run

    @classmethod
    def of(
        cls,
        model: str | os.PathLike,
        dtype: torch.dtype,
        device: torch.device,
        **kwargs,
    ) -> WorkerArgs:
        """From resolved engine arguments (the driver's, or a torchrun worker's own)."""
        kwargs["timeout_s"] = float(kwargs["timeout_s"])
        return cls(str(model), str(dtype).removeprefix("torch."), device.type, **kwargs)

    @property
    def transforms(self) -> WeightTransforms:
        return WeightTransforms(
            self.arm, self.arm_calibration, self.quantization, self.quantize_all_linears
        )

    @property
    def uses_cuda_graphs(self) -> bool:
        """Decode steps from CUDA graphs: on one GPU with the Triton kernels (the SDPA path's
        gathered keys change shape every step). Tensor-parallel ranks run eagerly (their
        collectives inside a graph are not built or tested yet)."""
        return (
            self.device_type == "cuda"
            and self.attention_backend == "triton"
            and self.world_size == 1
            and not self.enforce_eager
        )

    @property
    def attention_device_type(self) -> str:
        return torch.device(self.attention_device or self.device_type).type

    @property
    def remote_nodes(self) -> bool:
        return self.attention_nodes > 0 and self.attention_transport == "distributed"

    @property
    def world_size(self) -> int:
        """Ranks in the job: t compute ranks, then t·β attention nodes if they are ranks."""
        return self.tp_size * (1 + (self.attention_nodes if self.remote_nodes else 0))

    def node_rank(self, head_group: int, shard: int) -> int:
        return self.tp_size + head_group * self.attention_nodes + shard

    def role_of(self, rank: int) -> str:
        """How a rank is named in logs and errors."""
        if rank < self.tp_size:
            return f"tensor-parallel rank {rank}"
        g, s = divmod(rank - self.tp_size, self.attention_nodes)
        return f"{node_name(g, s)} (rank {rank})"


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    )


def torchrun_rank() -> tuple[int, int]:
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def threads_per_rank(world_size: int) -> int:
    """CPU threads each rank may use, so N ranks on one host do not oversubscribe its cores."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, (os.cpu_count() or 1) // local)


def device_for_rank(device_type: str) -> torch.device:
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SHARDLM_LOCAL_RANK", "0")))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_groups(rank: int, args: WorkerArgs, store: dist.Store | None) -> TPContext:
    """Join the job: a group for the model's collectives (the compute ranks), a gloo control
    group (every rank), and with attention-node ranks a gloo group for their messages.
    Every rank creates the groups in the same order, as torch.distributed requires."""
    backend = "nccl" if args.device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=args.timeout_s)
    world = args.world_size
    if store is None:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    group, node_group = dist.group.WORLD, None
    if world > args.tp_size:
        group = dist.new_group(list(range(args.tp_size)), backend=backend, timeout=timeout)
        node_group = dist.new_group(backend="gloo", timeout=timeout)
    return TPContext(
        rank,
        args.tp_size,
        group if rank < args.tp_size else None,
        control,
        timeout=timeout,
        job_size=world,
        node_group=node_group,
    )


class WorkerGroup:
    """The driver's view of the workers it spawned (or, under torchrun, of none)."""

    def __init__(
        self,
        processes: list[subprocess.Popen],
        store: dist.TCPStore | None,
        timeout_s: float,
        role_of=lambda rank: f"tensor-parallel rank {rank}",
    ):
        self.processes = processes  # index i is rank i + 1
        self.store = store
        self.timeout_s = timeout_s
        self.role_of = role_of
        self.failed: WorkerFailure | None = None

    def _dead(self) -> list[str]:
        return [
            f"{self.role_of(rank)} died (exit code {proc.returncode})"
            for rank, proc in enumerate(self.processes, start=1)
            if proc.poll() is not None
        ]

    def check_alive(self) -> None:
        """Fail fast, before a step, if a spawned worker has already exited."""
        if self.failed is not None:
            raise self.failed
        dead = self._dead()
        if dead:
            self.fail("; ".join(dead))

    def diagnose(self, error: BaseException) -> None:
        """After a failed collective: name the ranks responsible, stop everything, raise.

        Every dead process is named: one rank's death can take down others that were
        waiting on it (a compute rank whose attention node died), and the first cause is
        among them."""
        if self.failed is not None:
            raise self.failed
        deadline = time.monotonic() + 2.0  # let a dying process finish dying
        while time.monotonic() < deadline:
            if self._dead():
                time.sleep(0.3)  # others may be following it down
                # A rank that died waiting on a hung one: name the hung one too.
                stale = [
                    f"{self.role_of(r)} stopped answering (no heartbeat for {age:.0f} s)"
                    for r, age in self._stale_ranks()
                    if self.processes[r - 1].poll() is None
                ]
                self.fail("; ".join(self._dead() + stale))
            time.sleep(0.1)
        stale = self._stale_ranks()
        if stale:
            ranks = ", ".join(
                f"{self.role_of(r)} (no heartbeat for {age:.0f} s)" for r, age in stale
            )
            self.fail(f"{ranks} stopped answering")
        self.fail(f"a collective failed: {str(error).splitlines()[0]}")

    def fail(self, reason: str) -> None:
        self.failed = WorkerFailure(
            f"{reason}; all ranks were stopped (failure timeout {self.timeout_s:g} s)"
        )
        logger.error("%s", self.failed)
        self.kill()
        raise self.failed

    def _stale_ranks(self) -> list[tuple[int, float]]:
        if self.store is None:
            return []
        now = time.time()
        stale = []
        for rank in range(1, len(self.processes) + 1):
            key = f"shardlm/heartbeat/{rank}"
            try:
                beat = float(self.store.get(key)) if self.store.check([key]) else 0.0
            except Exception:  # the store itself is unreachable: say nothing more
                return []
            if now - beat > 3 * HEARTBEAT_SECONDS:
                stale.append((rank, now - beat))
        return stale

    def kill(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
        for proc in self.processes:
            proc.wait()

    def join(self, timeout: float) -> None:
        """Wait for workers to exit after SHUTDOWN; kill the ones that do not."""
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()


def spawn_workers(args: WorkerArgs) -> tuple[TPContext, WorkerGroup]:
    """Driver side of a spawned job: open the store, start ranks 1..N-1, join the groups."""
    store = dist.TCPStore(
        "127.0.0.1",
        0,  # the OS picks a free port: concurrent jobs never collide
        world_size=args.world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=args.timeout_s),
        wait_for_workers=False,
    )
    processes = []
    env = {**os.environ, "LOCAL_WORLD_SIZE": str(args.world_size)}
    for rank in range(1, args.world_size):
        command = [
            sys.executable, "-m", "shardlm.distributed.worker_main",
            "--rank", str(rank),
            "--port", str(store.port),
            "--parent", str(os.getpid()),
            "--args", json.dumps(asdict(args)),
        ]  # fmt: skip
        processes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env))
    group = WorkerGroup(processes, store, args.timeout_s, args.role_of)
    try:
        tp = init_groups(0, args, store)
    except Exception as e:
        group.diagnose(e)
    return tp, group


def start_heartbeat(rank: int, host: str, port: int, parent_pid: int | None) -> None:
    """Worker side: publish liveness; exit if the spawning driver is gone."""

    def beat() -> None:
        client = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=30))
        while True:
            if parent_pid is not None and os.getppid() != parent_pid:
                os._exit(1)  # the driver died: never outlive it
            try:
                client.set(f"shardlm/heartbeat/{rank}", str(time.time()))
            except Exception:
                os._exit(1)  # the driver's store is gone
            time.sleep(HEARTBEAT_SECONDS)

    threading.Thread(target=beat, name="shardlm-heartbeat", daemon=True).start()

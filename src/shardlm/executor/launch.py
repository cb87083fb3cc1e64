"""Starting, watching and stopping the ranks of a tensor-parallel job.

Two ways in, one code path after:

* Spawned (``LLM(..., tensor_parallel_size=N)`` or ``shardlm generate --tp N``): the calling
  process becomes rank 0, the driver, and starts ranks 1..N-1 as fresh Python processes
  (``python -m shardlm.executor.worker_main``; unlike multiprocessing's spawn this never
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
import logging
import os
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from shardlm.distributed.parallel_state import TPContext
from shardlm.engine_config import EngineConfig
from shardlm.errors import WorkerFailure

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
# Workers wait on the control group between steps, for as long as the driver is idle.
CONTROL_TIMEOUT = datetime.timedelta(days=7)


def threads_per_rank(world_size: int) -> int:
    """CPU threads each rank may use, so N ranks on one host do not oversubscribe its cores."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, (os.cpu_count() or 1) // local)


def device_for_rank(device: str) -> torch.device:
    """This rank's device of the configured kind: on CUDA the GPU of its local rank."""
    if torch.device(device).type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SHARDLM_LOCAL_RANK", "0")))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_groups(rank: int, config: EngineConfig, store: dist.Store | None) -> TPContext:
    """Join the job: a group for each compute node's collectives (its t ranks), a gloo
    control group (every rank), and with attention-node ranks a gloo group for the
    exchange messages (and two NCCL ones for the attention tensors, when they go GPU to GPU).
    Every rank creates the groups in the same order, as torch.distributed requires."""
    p = config.parallel
    backend = "nccl" if torch.device(config.model.device).type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=p.tp_timeout_s)
    world, t = p.world_size, p.tp_size
    if store is None:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    compute = rank < p.compute_ranks
    node_index, tp_rank = divmod(rank, t) if compute else (0, rank)
    group, node_group, links = dist.group.WORLD, None, (None, None)
    if world > t:
        groups = [
            dist.new_group(list(range(a * t, (a + 1) * t)), backend=backend, timeout=timeout)
            for a in range(p.compute_ranks // t)
        ]
        node_group = dist.new_group(backend="gloo", timeout=timeout)
        if p.remote_nodes:
            # Compute ↔ attention-node tensors, a group per direction (NCCL needs it, see
            # TPContext; over gloo the same layout lets the CPU tests check each side sends
            # and receives on the right one).
            link = p.attention_link
            links = tuple(dist.new_group(backend=link, timeout=timeout) for _ in range(2))
        group = groups[node_index] if compute else None
    return TPContext(
        tp_rank,
        t,
        group,
        control,
        timeout=timeout,
        job_size=world,
        node_group=node_group,
        link_out=links[0],
        link_back=links[1],
        job_rank=rank,
        compute_node=node_index,
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


def spawn_workers(config: EngineConfig) -> tuple[TPContext, WorkerGroup]:
    """Driver side of a spawned job: open the store, start ranks 1..N-1 (each given the
    resolved configuration as JSON), join the groups."""
    p = config.parallel
    store = dist.TCPStore(
        "127.0.0.1",
        0,  # the OS picks a free port: concurrent jobs never collide
        world_size=p.world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=p.tp_timeout_s),
        wait_for_workers=False,
    )
    processes = []
    env = {**os.environ, "LOCAL_WORLD_SIZE": str(p.world_size)}
    for rank in range(1, p.world_size):
        command = [
            sys.executable, "-m", "shardlm.executor.worker_main",
            "--rank", str(rank),
            "--port", str(store.port),
            "--parent", str(os.getpid()),
            "--config", config.to_json(),
        ]  # fmt: skip
        processes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env))
    group = WorkerGroup(processes, store, p.tp_timeout_s, p.role_of)
    try:
        tp = init_groups(0, config, store)
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

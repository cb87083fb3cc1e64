"""α compute nodes inside one process, in lock step (the in-process transport's test aid).

In-process, the α compute nodes of figure 2 share one process and one copy of the weights,
and each must post a layer's queries and K/V to the attention nodes before any node may
answer (a query sees the keys the other compute nodes produced in the same layer). Each
compute node's forward therefore runs in its own thread, and the threads take turns: one
runs until it needs an answer that is not ready (``pass_turn``, from SharedNode.collect),
then the next, and so on around the ring; when the last compute node with rows in a
(layer, micro-batch) has posted, the nodes answer, and a waiting thread resumes with its
answer on its next turn. One thread runs at a time, and turns follow the step's data, the
same in every process, so under tensor parallelism every rank makes its collectives in the
same order.

The distributed transport needs none of this: each compute node is its own process, and
the attention-node ranks wait for every compute node's message.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class LockstepAborted(RuntimeError):
    """Another compute node's thread failed: this one stops too."""


class Lockstep:
    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device  # a new thread's current CUDA device is cuda:0: set ours
        self._cond = threading.Condition()
        self._order: list[int] = []
        self._done: set[int] = set()
        self._turn = 0
        self._failed = False
        self._local = threading.local()

    def run(self, work: dict[int, Callable[[], T]]) -> dict[int, T]:
        """Run each compute node's ``work`` in its own thread, in turns, in key order.
        Returns each one's result; the first failure is raised (the others are stopped)."""
        self._order = sorted(work)
        self._done, self._turn, self._failed = set(), 0, False
        results: dict[int, T] = {}
        errors: list[BaseException] = []

        def body(group: int) -> None:
            self._local.group = group
            try:
                with self._cond:
                    self._cond.wait_for(lambda: self._is_turn(group) or self._failed)
                    if self._failed:
                        return
                on_cuda = self.device is not None and self.device.type == "cuda"
                place = torch.cuda.device(self.device) if on_cuda else contextlib.nullcontext()
                with torch.inference_mode(), place:
                    results[group] = work[group]()
            except BaseException as e:  # handed to the caller
                errors.append(e)
                with self._cond:
                    self._failed = True
            finally:
                with self._cond:
                    self._done.add(group)
                    self._advance()
                    self._cond.notify_all()

        threads = [threading.Thread(target=body, args=(g,), daemon=True) for g in self._order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if not isinstance(e, LockstepAborted)]
        if real or errors:
            raise (real or errors)[0]
        return results

    def pass_turn(self) -> None:
        """Called by a compute node's thread that waits for the others: let the next one
        run, and wait for this one's turn to come round again."""
        group = self._local.group
        with self._cond:
            self._advance()
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._is_turn(group) or self._failed)
            if self._failed:
                raise LockstepAborted("another compute node failed")

    def _is_turn(self, group: int) -> bool:
        return self._order[self._turn] == group

    def _advance(self) -> None:
        """Move the turn to the next compute node still running (caller holds the lock)."""
        if len(self._done) == len(self._order):
            return
        for _ in range(len(self._order)):
            self._turn = (self._turn + 1) % len(self._order)
            if self._order[self._turn] not in self._done:
                return

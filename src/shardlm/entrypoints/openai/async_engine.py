"""The engine behind the server: one thread drives ``LLMEngine.step``; requests talk to it
through a command queue and receive their outputs on asyncio queues.

LLMEngine is not thread-safe, so only the engine thread touches it. The event loop thread
submits ``add`` / ``abort`` commands and awaits outputs; the engine thread adds requests
between steps, runs steps while anything is unfinished, hands each request its deltas with
``loop.call_soon_threadsafe``, and sleeps on an event when idle. It publishes a snapshot of
the engine's counters after every step and every batch of commands, for /metrics and for
admission control.

Every submitted request is answered: accepted, refused (the engine's ValueError), or failed
with EngineDead, also when the engine dies or shuts down while it is queued (a lock makes
"check that the engine is alive, then queue" and "mark it dead, then fail the queue" atomic).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shardlm.attention.node import NodeStats
from shardlm.engine.llm_engine import LLMEngine
from shardlm.engine.outputs import RequestOutput
from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine.stats import ComputeNodeStats, EngineStats

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05
NODE_STATS_PERIOD_S = 1.0


class EngineDead(RuntimeError):
    """The engine failed (a worker died, a step raised) or is shutting down."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class NodeSnapshot:
    """The compute and attention nodes' own reports, as of the last refresh."""

    compute: list[ComputeNodeStats] = field(default_factory=list)
    attention: list[NodeStats] = field(default_factory=list)


_ACCEPTED = object()  # the engine queued the request (it passed the engine's own checks)


class RequestStream:
    """One accepted request's deltas. ``abort`` (idempotent) stops it and frees its KV
    blocks; callers call it in a ``finally`` so a client that goes away costs nothing."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self._outputs = outputs
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._outputs.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards `dead` against queueing (see the module doc)
        self.pending_sequences = 0  # submitted, not yet taken by the engine thread
        self.stats: EngineStats = engine.stats
        # What the compute and attention nodes report of themselves (collectives: asked at
        # most every NODE_STATS_PERIOD_S, from this thread, between steps).
        self.node_stats: NodeSnapshot = NodeSnapshot()
        self._node_stats_at = 0.0
        self._stepped = True  # steps ran since the last refresh
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shardlm-engine", daemon=True)
        self._thread.start()

    # -- the event-loop side --
    async def add(self, request_id: str, prompt: dict, params: SamplingParams) -> RequestStream:
        """Queue a request; returns once the engine has accepted it. Raises ValueError if
        the engine refuses it, EngineDead if the engine has failed or is stopping."""
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self.dead is not None:
                raise EngineDead(f"the engine is not running: {self.dead}")
            self.pending_sequences += params.n
            self._commands.put(("add", request_id, prompt, params, sink))
        self._wake.set()
        try:
            first = await sink.queue.get()
        except BaseException:  # cancelled while queued: make sure it does not run anyway
            self.abort(request_id)
            raise
        if isinstance(first, BaseException):
            raise first
        return RequestStream(self, request_id, sink.queue)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stop_after(self, seconds: float) -> None:
        """Fail every request still running ``seconds`` from now (EngineDead: the server is
        shutting down), so handlers answer them properly before the server cancels them."""
        timer = threading.Timer(max(0.0, seconds), self._stop_now)
        timer.daemon = True
        timer.start()

    def _stop_now(self) -> None:
        self._stop.set()
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Fail what is left, stop the thread, then shut the engine down (its workers)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        # A thread still inside a step owns the engine: only kill the workers then.
        self.engine.shutdown(graceful=not self._thread.is_alive())

    # -- the engine thread --
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._refresh_node_stats(idle=True)
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    sink = self._sinks.get(out.request_id)
                    if sink is not None:
                        sink.put(out)
                        if out.finished:
                            del self._sinks[out.request_id]
                self.stats = self.engine.stats
                self._stepped = True
                self._refresh_node_stats()
            self._die(EngineDead("the server is shutting down"))
        except BaseException as e:  # a failed step: every request gets the error
            logger.exception("the engine failed")
            self._die(EngineDead(f"the engine failed: {e}"))

    def _refresh_node_stats(self, idle: bool = False) -> None:
        """At most every NODE_STATS_PERIOD_S; when idle, once more after the last steps (so
        /metrics does not keep a burst's middle), then not again until work comes."""
        now = time.monotonic()
        if now - self._node_stats_at < NODE_STATS_PERIOD_S or (idle and not self._stepped):
            return
        self._stepped = False
        self._node_stats_at = now
        self.node_stats = NodeSnapshot(
            self.engine.compute_node_stats(), self.engine.attention_node_stats()
        )

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                self.stats = self.engine.stats
                return
            if command[0] == "add":
                _, rid, prompt, params, sink = command
                try:
                    self.engine.add_request(rid, prompt, params)
                except Exception as e:  # ValueError: refused; anything else is answered too
                    sink.put(e)
                else:
                    self._sinks[rid] = sink
                    sink.put(_ACCEPTED)
                finally:
                    with self._lock:
                        self.pending_sequences -= params.n
            elif command[0] == "abort" and self.engine.abort(command[1]):
                self._sinks.pop(command[1], None)

    def _die(self, error: EngineDead) -> None:
        """Mark the engine dead and answer every request, running or queued, with ``error``."""
        with self._lock:
            self.dead = error
        for rid in list(self._sinks):
            with contextlib.suppress(Exception):  # a broken engine: the error still goes out
                self.engine.abort(rid)
        for sink in self._sinks.values():
            sink.put(error)
        self._sinks.clear()
        while True:  # submitted before `dead` was set, never taken
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                command[4].put(error)

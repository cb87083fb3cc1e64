"""The server's side of the engine process: it starts engine_core.py's process, sends it
requests, and hands each request its outputs on an asyncio queue.

The event loop submits ``add`` / ``abort`` / ``compile`` commands (multiprocessing puts: they
pickle on the queue's feeder thread, so the loop never waits on the engine); one reader thread
takes the engine's messages and delivers them with ``loop.call_soon_threadsafe``. The engine's
counters arrive with every step, for /metrics and for admission control.

Every submitted request is answered: accepted, refused (the engine's ValueError), or failed with
EngineDead, also when the engine process dies or the server shuts down while it waits (a lock
makes "check that the engine is alive, then register" and "mark it dead, then fail every
registered request" atomic). A dead engine process is noticed within READ_TIMEOUT_S even if it
could say nothing (killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardlm.engine.outputs import RequestOutput
from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine.stats import EngineStats
from shardlm.entrypoints.openai.engine_core import (
    EngineInfo,
    NodeSnapshot,
    RemoteError,
    run_engine_core,
)
from shardlm.errors import ShardlmError
from shardlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from shardlm.structured.params import StructuredOutputs

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.5  # how often the reader looks at the engine process while nothing comes
STOP_TIMEOUT_S = 30.0


class EngineDead(RuntimeError):
    """The engine failed (a worker died, a step raised, its process exited) or is stopping."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Pending:
    """A request sent to the engine and not yet accepted or refused."""

    sink: _Sink
    sequences: int


_ACCEPTED = object()  # the engine queued the request (it passed the engine's own checks)


class RequestStream:
    """One accepted request's deltas. ``abort`` (idempotent) stops it and frees its KV
    blocks; callers call it in a ``finally`` so a client that goes away costs nothing."""

    def __init__(self, engine: EngineClient, request_id: str, outputs: asyncio.Queue) -> None:
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


class EngineClient:
    """``engine_args``: LLMEngine's keyword arguments. Blocks until the engine process has
    loaded the model; raises its start-up error (a ShardlmError for bad input) if it fails."""

    def __init__(self, engine_args: dict) -> None:
        self.node_stats = NodeSnapshot()
        self.pending_sequences = 0  # submitted, not yet accepted or refused
        self.dead: BaseException | None = None
        self._lock = threading.Lock()  # guards `dead` against registering (module doc)
        self._pending: dict[str, _Pending] = {}
        self._sinks: dict[str, _Sink] = {}
        self._compiles: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._tokens = itertools.count()
        self._reader: threading.Thread | None = None
        # Only the watchdog waits on the process (two threads reaping one child race: the
        # loser's waitpid fails and it takes a dead process for a live one); the others
        # look at this event.
        self._exited = threading.Event()
        context = multiprocessing.get_context("spawn")
        self._commands = context.Queue()
        self._messages = context.Queue()
        self._process = context.Process(
            target=run_engine_core,
            args=(engine_args, self._commands, self._messages, os.getpid()),
            name="shardlm-engine",
            # Terminated at interpreter exit if nothing stopped it before (a crash between
            # start and shutdown must not leave the HTTP process waiting for its child).
            daemon=True,
        )
        self._process.start()
        # A process killed in the middle of a message leaves the reader blocked inside it:
        # the watchdog notices the exit whatever the reader is doing.
        watchdog = threading.Thread(target=self._watch, name="shardlm-engine-watchdog")
        watchdog.daemon = True
        watchdog.start()
        try:
            self.info, self.stats = self._wait_until_ready()
            path = self.info.tokenizer_path
            # The HTTP process's own tokenizer: prompts and chat templates are rendered here.
            self.tokenizer: Tokenizer | None = (
                None if path is None else Tokenizer.from_pretrained(path)
            )
        except BaseException:
            self._end_process(timeout=5.0)
            raise
        self.max_model_len = self.info.max_model_len
        self.vocab_size = self.info.vocab_size
        self._reader = threading.Thread(target=self._read, name="shardlm-engine-reader")
        self._reader.daemon = True
        self._reader.start()

    # -- the event-loop side --
    async def add(self, request_id: str, prompt: dict, params: SamplingParams) -> RequestStream:
        """Queue a request; returns once the engine has accepted it. Raises ValueError if
        the engine refuses it, EngineDead if the engine has failed or is stopping."""
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self.dead is not None:
                raise EngineDead(f"the engine is not running: {self.dead}")
            self.pending_sequences += params.n
            self._pending[request_id] = _Pending(sink, params.n)
            self._commands.put(("add", request_id, prompt, params))
        try:
            first = await sink.queue.get()
        except BaseException:  # cancelled while queued: make sure it does not run anyway
            self.abort(request_id)
            raise
        if isinstance(first, BaseException):
            raise first
        return RequestStream(self, request_id, sink.queue)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._sinks.pop(request_id, None)
            if self.dead is None:
                self._commands.put(("abort", request_id))

    async def compile(self, spec: StructuredOutputs) -> None:
        """Have the engine process parse and compile a structured-output grammar (off its step
        loop); raises ParamError if the spec is bad, EngineDead if the engine is gone."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        token = next(self._tokens)
        with self._lock:
            if self.dead is not None:
                raise EngineDead(f"the engine is not running: {self.dead}")
            self._compiles[token] = (loop, future)
            self._commands.put(("compile", token, spec))
        error = await future
        if error is not None:
            raise error.exception()

    def stop_after(self, seconds: float) -> None:
        """Fail every request still running ``seconds`` from now (EngineDead: the server is
        shutting down), so handlers answer them properly before the server cancels them."""
        timer = threading.Timer(max(0.0, seconds), self._stop_now)
        timer.daemon = True
        timer.start()

    def _stop_now(self) -> None:
        self._die(EngineDead("the server is shutting down"))
        with contextlib.suppress(Exception):  # the engine's work is nobody's any more
            self._commands.put(("stop",))

    def shutdown(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Fail what is left, then stop the engine process (it stops its workers)."""
        self._stop_now()
        self._end_process(timeout)

    # -- the engine process --
    def _wait_until_ready(self) -> tuple[EngineInfo, EngineStats]:
        while True:
            try:
                message = self._messages.get(timeout=READ_TIMEOUT_S)
            except queue.Empty:
                if self._exited.is_set():
                    raise ShardlmError(
                        f"the engine process exited with code {self._process.exitcode} "
                        "before it was ready (see the log above)"
                    ) from None
                continue
            if message[0] == "ready":
                return message[1], message[2]
            if message[0] == "failed":
                raise message[1].exception()
            raise RuntimeError(f"unexpected first message from the engine: {message[0]!r}")

    def _end_process(self, timeout: float) -> None:
        """Ask the engine process to stop; terminate it if it does not in ``timeout``."""
        if not self._exited.is_set():
            with contextlib.suppress(Exception):
                self._commands.put(("stop",))
        if not self._exited.wait(timeout):  # it ignores SIGTERM (engine_core.py): kill it
            logger.warning("the engine process did not stop in %.0f s: killing it", timeout)
            self._process.kill()  # not reaped yet (the event is not set): still our child
            self._exited.wait()
        # Anything still buffered for a process that is gone must not hold up our exit.
        self._commands.cancel_join_thread()

    def _watch(self) -> None:
        """Wait for the engine process to exit; give the reader a moment to deliver what the
        engine said last (its own reason for dying), then fail whatever is left."""
        self._process.join()
        self._exited.set()
        if self._reader is not None:
            self._reader.join(READ_TIMEOUT_S * 2)
        self._die(EngineDead(f"the engine process exited (code {self._process.exitcode})"))

    def _read(self) -> None:
        """The reader thread: every engine message, until the engine is dead."""
        while True:
            try:
                message = self._messages.get(timeout=READ_TIMEOUT_S)
            except queue.Empty:
                if self._exited.is_set():  # the watchdog says why
                    return
                continue
            except (EOFError, OSError) as e:
                self._die(EngineDead(f"lost the engine process: {e}"))
                return
            if not self._deliver(message):
                return

    def _deliver(self, message: tuple) -> bool:
        """Act on one message; False once the engine has said it is dead."""
        kind = message[0]
        if kind == "update":
            _, outputs, stats, nodes = message
            with self._lock:
                for out in outputs:
                    sink = self._sinks.get(out.request_id)
                    if sink is not None:
                        sink.put(out)
                        if out.finished:
                            del self._sinks[out.request_id]
            self.stats = stats
            if nodes is not None:
                self.node_stats = nodes
        elif kind in ("accepted", "refused"):
            rid = message[1]
            with self._lock:
                pending = self._pending.pop(rid, None)
                if pending is None:
                    return True
                self.pending_sequences -= pending.sequences
                if kind == "accepted":
                    self.stats = message[2]
                    self._sinks[rid] = pending.sink
                    pending.sink.put(_ACCEPTED)
                else:
                    pending.sink.put(message[2].exception())
        elif kind == "compiled":
            with self._lock:
                waiter = self._compiles.pop(message[1], None)
            if waiter is not None:
                loop, future = waiter
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, future, message[2])
        elif kind == "dead":
            self._die(EngineDead(message[1]))
            return False
        return True

    def _die(self, error: EngineDead) -> None:
        """Mark the engine dead (once) and answer every request, running or waiting to be
        accepted, and every compile, with ``error``."""
        with self._lock:
            if self.dead is not None:
                return
            self.dead = error
            sinks = [*self._sinks.values(), *(p.sink for p in self._pending.values())]
            compiles = list(self._compiles.values())
            self._sinks.clear()
            self._pending.clear()
            self._compiles.clear()
            self.pending_sequences = 0
        for sink in sinks:
            sink.put(error)
        for loop, future in compiles:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_fail, future, error)


def _resolve(future: asyncio.Future, error: RemoteError | None) -> None:
    if not future.done():
        future.set_result(error)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)

"""The engine process of ``shardlm serve``: LLMEngine and its step loop, apart from the HTTP
process (vLLM's engine core, SGLang's scheduler process), so tokenizing, HTTP and SSE in the
server never hold the GIL a step needs.

It talks to the server's EngineClient (engine_client.py) over two multiprocessing queues
(spawn context). Commands in: add, abort, compile (a structured-output grammar), stop.
Messages out: ready or failed once at start; accepted or refused per add; compiled per
compile; after every step, one update with the step's outputs and the engine's counters; dead
when the loop ends. Grammar compilation and drafting (speculative decoding) happen here, where
the steps run; compiles on a small thread pool, so a step never waits for one.

Under torchrun the HTTP process is torchrun's rank-0 worker and this process, its child,
inherits its environment (RANK=0, MASTER_ADDR, ...): it joins the job as torch.distributed
rank 0, the driver of ranks 1..N-1.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.queues import Queue

from shardlm.attention.node import NodeStats
from shardlm.engine.stats import ComputeNodeStats
from shardlm.errors import ParamError, ShardlmError, WorkerFailure

logger = logging.getLogger(__name__)

# How long an idle loop waits for a command before it looks at its parent again.
IDLE_WAIT_S = 0.05
# The nodes' own counters are collectives: asked at most this often, between steps.
NODE_STATS_PERIOD_S = 1.0
GRAMMAR_THREADS = 2


@dataclass
class NodeSnapshot:
    """The compute and attention nodes' own reports, as of the last refresh."""

    compute: list[ComputeNodeStats] = field(default_factory=list)
    attention: list[NodeStats] = field(default_factory=list)


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP process needs to know of the engine it did not build."""

    model: str | None
    tokenizer_path: str | None  # None: skip_tokenizer_init
    max_model_len: int
    vocab_size: int
    dtype: str  # "float32"
    device: str


@dataclass(frozen=True)
class RemoteError:
    """An exception that crossed the process boundary. Exceptions are sent as their kind and
    message, not pickled: ParamError's constructor takes (param, message), which pickle's
    default ``cls(*args)`` would not call right."""

    kind: str  # "param" | "value" | "user" | "worker" | "other"
    message: str
    param: str | None = None

    @classmethod
    def of(cls, e: BaseException) -> RemoteError:
        if isinstance(e, ParamError):
            return cls("param", str(e), e.param)
        if isinstance(e, ShardlmError):
            return cls("user", str(e))
        if isinstance(e, ValueError):
            return cls("value", str(e))
        if isinstance(e, WorkerFailure):
            return cls("worker", str(e))
        return cls("other", f"{type(e).__name__}: {e}")

    def exception(self) -> Exception:
        if self.kind == "param":
            return ParamError(self.param or "", self.message)
        if self.kind == "user":
            return ShardlmError(self.message)
        if self.kind == "value":
            return ValueError(self.message)
        if self.kind == "worker":
            return WorkerFailure(self.message)
        return RuntimeError(self.message)


def run_engine_core(engine_args: dict, commands: Queue, messages: Queue, parent_pid: int) -> None:
    """The engine process's entry (multiprocessing spawn target): build the engine, say ready
    (or why not), then step until told to stop, the loop fails, or the parent is gone."""
    # Ctrl-C in a terminal, or a service manager stopping the unit, signals the whole
    # process group: the HTTP process decides when this one stops (it drains first), so the
    # engine ignores SIGINT and SIGTERM (it stops on a command, or when its parent is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from shardlm.engine.llm_engine import LLMEngine  # the heavy import, in this process only

    try:
        engine = LLMEngine(**engine_args)
    except BaseException as e:
        messages.put(("failed", RemoteError.of(e)))
        return
    m = engine.engine_config.model
    info = EngineInfo(
        model=None if m.model is None else str(m.model),
        tokenizer_path=None if engine.tokenizer is None else str(m.tokenizer or m.model),
        max_model_len=engine.max_model_len,
        vocab_size=engine.config.vocab_size,
        dtype=str(engine.dtype).removeprefix("torch."),
        device=str(engine.device),
    )
    messages.put(("ready", info, engine.stats))
    EngineCore(engine, commands, messages, parent_pid).run()


class EngineCore:
    """The step loop: commands between steps, one update message after each step."""

    def __init__(self, engine, commands: Queue, messages: Queue, parent_pid: int) -> None:
        self.engine = engine
        self.commands = commands
        self.messages = messages
        self.parent_pid = parent_pid
        self.grammar_pool = ThreadPoolExecutor(GRAMMAR_THREADS, "shardlm-grammar")
        self.stopping = False
        self._node_stats_at = 0.0
        self._stepped = True  # steps ran since the last node-stats refresh

    def run(self) -> None:
        graceful = True
        try:
            while not self.stopping and os.getppid() == self.parent_pid:
                changed = self._drain_commands()
                if self.stopping:
                    break
                if not self.engine.has_unfinished_requests():
                    nodes = self._node_stats(idle=True)
                    if changed or nodes is not None:
                        self._update([], nodes)
                    self._wait_for_command()
                    continue
                outputs = self.engine.step()
                self._stepped = True
                self._update(outputs, self._node_stats())
            if self.stopping:
                self.messages.put(("dead", "the server is shutting down"))
            else:  # nobody reads the queue any more: do not wait at exit to flush it
                self.messages.cancel_join_thread()
        except BaseException as e:  # a failed step: the client fails every request with it
            logger.exception("the engine failed")
            self.messages.put(("dead", f"the engine failed: {e}"))
            graceful = False
        finally:
            self.grammar_pool.shutdown(wait=False, cancel_futures=True)
            self.engine.shutdown(graceful=graceful)

    def _update(self, outputs: list, nodes: NodeSnapshot | None) -> None:
        # The server has each request's prompt: deltas cross without it (a long prompt would
        # otherwise be pickled, and unpickled in the HTTP process, at every step).
        slim = [replace(out, prompt=None, prompt_token_ids=[]) for out in outputs]
        self.messages.put(("update", slim, self.engine.stats, nodes))

    def _wait_for_command(self) -> None:
        try:
            command = self.commands.get(timeout=IDLE_WAIT_S)
        except queue.Empty:
            return
        self._handle(command)

    def _drain_commands(self) -> bool:
        """Every queued command; True if any came (the counters may have changed)."""
        changed = False
        while not self.stopping:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                break
            self._handle(command)
            changed = True
        return changed

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, rid, prompt, params = command
            try:
                self.engine.add_request(rid, prompt, params)
            except Exception as e:  # ValueError: refused; anything else is answered too
                self.messages.put(("refused", rid, RemoteError.of(e)))
            else:  # with the counters that now include it (the server's admission check)
                self.messages.put(("accepted", rid, self.engine.stats))
        elif kind == "abort":
            self.engine.abort(command[1])
        elif kind == "compile":
            self.grammar_pool.submit(self._compile, command[1], command[2])
        elif kind == "stop":
            self.stopping = True
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
        else:
            raise RuntimeError(f"unknown engine command {kind!r}")

    def _compile(self, token: int, spec) -> None:
        """Parse and compile a grammar (GrammarCache is thread-safe); the add that follows
        finds it compiled."""
        try:
            self.engine.grammars.compile(spec)
        except Exception as e:
            self.messages.put(("compiled", token, RemoteError.of(e)))
        else:
            self.messages.put(("compiled", token, None))

    def _node_stats(self, idle: bool = False) -> NodeSnapshot | None:
        """A fresh snapshot at most every NODE_STATS_PERIOD_S; when idle, once more after the
        last steps (so /metrics does not keep a burst's middle), then not until work comes."""
        now = time.monotonic()
        if now - self._node_stats_at < NODE_STATS_PERIOD_S or (idle and not self._stepped):
            return None
        self._stepped = False
        self._node_stats_at = now
        return NodeSnapshot(self.engine.compute_node_stats(), self.engine.attention_node_stats())

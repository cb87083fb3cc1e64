"""Specs to compiled grammars: parsed when a request is added, compiled in a thread pool,
once per distinct spec.

Parsing (schema → grammar, regex → grammar, EBNF) is fast and is where a bad spec fails, so
it runs in the caller's thread and a bad spec raises ``ParamError("structured_outputs", …)``
before anything is queued. Compiling (the per-token mask tables, which grow with the
vocabulary) runs in a small pool, off the engine's step loop; the request's sequences wait in
the scheduler's queue until it is done (``GrammarState.ready``). Both are cached by the spec,
so the same schema sent a thousand times is parsed and compiled once. Thread-safe: the server's
engine process compiles on a small thread pool, asked before a request is queued, while its
step loop runs.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from shardlm.errors import ParamError
from shardlm.structured.backend import compiler_message, xgrammar
from shardlm.structured.params import PARAM, StructuredOutputs
from shardlm.structured.state import GrammarState
from shardlm.tokenizer import Tokenizer

# Compiled grammars kept (least recently used dropped first). One holds a mask table of about
# (states × vocabulary) bits: small next to a KV cache, but not to be kept without bound.
MAX_CACHED = 256
# Any JSON object, as OpenAI's response_format {"type": "json_object"} asks.
JSON_OBJECT_SCHEMA = {"type": "object"}


class GrammarCache:
    """The engine's grammars: one per distinct spec, for this model's vocabulary."""

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        max_cached: int = MAX_CACHED,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._compiler: Any = None  # xgrammar.GrammarCompiler, made on first use
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, spec: StructuredOutputs) -> Future:
        """The spec's compiled grammar, as a future (done at once on a cache hit). Raises
        ParamError if the spec does not parse, or if structured outputs cannot run here."""
        with self._lock:
            future = self._cache.get(spec.key)
            if future is not None:
                self._cache.move_to_end(spec.key)
                return future
        compiler = self._xgr_compiler()
        grammar = self._parse(spec)  # outside the lock: a slow parse blocks no other caller
        with self._lock:
            future = self._cache.get(spec.key)
            if future is None:
                assert self._pool is not None
                future = self._pool.submit(compiler.compile_grammar, grammar)
                self._cache[spec.key] = future
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
            return future

    def compile(self, spec: StructuredOutputs) -> Any:
        """``submit`` and wait: the compiled grammar (for the server's worker threads)."""
        future = self.submit(spec)
        try:
            return future.result()
        except Exception as e:
            with self._lock:
                self._cache.pop(spec.key, None)
            raise ParamError(PARAM, f"the grammar failed to compile: {compiler_message(e)}") from e

    def state(self, spec: StructuredOutputs, stop_token_ids: Iterable[int] = ()) -> GrammarState:
        """A new sequence's place in the spec's grammar (``stop_token_ids``: the request's own
        stop tokens, which may end it too, besides EOS)."""
        stops = sorted(
            set(self.stop_token_ids) | {t for t in stop_token_ids if t < self.vocab_size}
        )
        return GrammarState(self.submit(spec), stops)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- helpers --
    def _xgr_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ParamError(
                        PARAM, "structured outputs need the tokenizer (skip_tokenizer_init is set)"
                    )
                from shardlm.structured.tokenizer_info import build_tokenizer_info

                info = build_tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
                # xgrammar's own cache would keep every grammar ever compiled (no byte limit
                # by default): this class's LRU of futures is the one cache.
                self._compiler = xgrammar().GrammarCompiler(
                    info, max_threads=2, cache_enabled=False
                )
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="shardlm-grammar")
            return self._compiler

    def _parse(self, spec: StructuredOutputs) -> Any:
        xgr = xgrammar()
        parse, what = _PARSERS[spec.kind]
        try:
            return parse(xgr, spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ParamError(PARAM, f"invalid {what}: {compiler_message(e)}") from None


def wait_for_any(states: Iterable[GrammarState | None], timeout: float) -> None:
    """Block until one of the grammars still compiling is done, or ``timeout`` seconds (for
    an engine step that had nothing to run but sequences waiting for their grammar)."""
    pending = [s.future for s in states if s is not None and not s.ready]
    if pending:
        wait_futures(pending, timeout=timeout, return_when="FIRST_COMPLETED")


def _json_schema(schema: Any) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are EBNF string literals (the same escapes).
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


# Compact JSON (any_whitespace=False): ", " and ": " between items, no other whitespace, so
# a small model cannot spend its max_tokens on newlines and indentation.
_PARSERS: dict[str, tuple[Callable[[Any, StructuredOutputs], Any], str]] = {
    "json": (
        lambda xgr, s: xgr.Grammar.from_json_schema(_json_schema(s.json), any_whitespace=False),
        "JSON schema",
    ),
    "json_object": (
        lambda xgr, s: xgr.Grammar.from_json_schema(
            json.dumps(JSON_OBJECT_SCHEMA), any_whitespace=False
        ),
        "JSON object",
    ),
    "regex": (lambda xgr, s: xgr.Grammar.from_regex(s.regex), "regex"),
    "choice": (lambda xgr, s: xgr.Grammar.from_ebnf(_choice_ebnf(s.choice)), "choice"),
    "grammar": (lambda xgr, s: xgr.Grammar.from_ebnf(s.grammar), "grammar"),
}

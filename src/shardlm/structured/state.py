"""One sequence's place in its grammar: an xgrammar ``GrammarMatcher`` fed every token the
sequence generates.

The matcher advances only when a token is appended to the sequence, and tokens are never
taken back (a preempted sequence keeps its generated tokens and recomputes only their KV), so
its state always matches the sequence's output. Made on first use, once the grammar has
compiled; the scheduler admits the sequence only then.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

import torch

from shardlm.structured.backend import compiler_message, xgrammar

logger = logging.getLogger(__name__)


class GrammarState:
    def __init__(self, future: Future, stop_token_ids: list[int]) -> None:
        self.future = future  # of the compiled grammar (shared by every sequence of the spec)
        self.stop_token_ids = stop_token_ids
        self._matcher: Any = None

    @property
    def ready(self) -> bool:
        """The grammar has compiled (or failed to: the first use then raises)."""
        return self.future.done()

    @property
    def failure(self) -> str | None:
        """Why the grammar failed to compile, once it has; None while compiling or after a
        success."""
        if not self.future.done() or self.future.cancelled():
            return None
        error = self.future.exception()
        return None if error is None else compiler_message(error)

    @property
    def matcher(self) -> Any:
        if self._matcher is None:
            self._matcher = xgrammar().GrammarMatcher(
                self.future.result(), override_stop_tokens=self.stop_token_ids or None
            )
        return self._matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens the grammar allows next into ``bitmask[row]`` (int32, on CPU)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> str | None:
        """Advance past ``token``. Returns the finish reason it implies: "stop" once the
        grammar is complete and a stop token was taken, "abort" if the grammar refuses the
        token (only possible if something removed every token the mask allowed), else None."""
        matcher = self.matcher
        if not matcher.accept_token(token):
            logger.warning("the grammar refused token %d; the sequence is ended", token)
            return "abort"
        return "stop" if matcher.is_terminated() else None

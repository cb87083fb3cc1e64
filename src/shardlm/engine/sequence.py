"""Requests and their sequences: token state, KV blocks, and the text each one has produced.

A request with ``n`` samples owns ``n`` sequences. A sequence's tokens are its prompt followed
by what it generated; ``num_computed_tokens`` of them have K/V in the cache. The scheduler
moves sequences between waiting and running; the engine appends sampled tokens and decides,
here, when a sequence is finished and what text it may emit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from shardlm.engine.sampler import Logprob, name_tokens
from shardlm.engine.sampling_params import SamplingParams
from shardlm.structured.state import GrammarState
from shardlm.tokenizer import IncrementalDetokenizer, Tokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer | None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Hashes of the leading full blocks already registered with the prefix cache.
    block_hashes: list[bytes] = field(default_factory=list)
    # Order of admission to the running set; the most recent one is preempted first.
    admitted_at: int = -1
    # The compute node that runs its decodes (figure 2, α > 1): chosen at its first
    # admission, kept through preemption.
    compute_node: int | None = None
    # Structured outputs: its place in the grammar, fed every token it generates (None
    # without one). The scheduler admits it once the grammar has compiled.
    grammar: GrammarState | None = None
    # Speculative decoding: this step's unverified draft tokens (never in token_ids; the
    # verify step appends the accepted ones).
    draft_ids: list[int] = field(default_factory=list)
    text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    # Per prompt position (SamplingParams.prompt_logprobs, the request's first sample only):
    # None at position 0 and until the prefill has scored it.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def grammar_ready(self) -> bool:
        return self.grammar is None or self.grammar.ready

    def pending_text(self) -> str:
        """Text not yet emitted that can safely be emitted now.

        While a stop string could still complete, the last (longest stop − 1) characters are
        held back: they might be the start of a stop string, which must never leak.
        """
        end = len(self.text)
        if not self.is_finished and self.params.stop:
            end -= max(len(s) for s in self.params.stop) - 1
        if end <= self.num_emitted_chars:
            return ""
        delta = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    bad_words: list[list[int]] = field(default_factory=list)  # token ids of params.bad_words

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def append_token(
    seq: Sequence,
    token: int,
    logprobs: dict[int, Logprob] | None,
    eos_ids: set[int],
    max_model_len: int,
    tokenizer: Tokenizer | None,
) -> None:
    """Add a sampled token to ``seq``, update its text, and finish it if a stop rule fires.

    Order (as vLLM): stop token / EOS, then stop strings, then length limits. EOS and stop
    tokens stay in ``token_ids`` but add no text. A grammar takes every other token; once
    complete it allows only stop tokens (EOS, the request's stop_token_ids), and taking one
    ends the sequence with "stop", with ``ignore_eos`` too.
    """
    params = seq.params
    seq.token_ids.append(token)
    if logprobs is not None:
        name_tokens(logprobs, tokenizer)
        seq.logprobs.append(logprobs)
    finish: str | None = None
    reason: int | str | None = None
    if token in params.stop_token_ids:
        finish, reason = "stop", token
    elif token in eos_ids and not params.ignore_eos:
        finish = "stop"
    elif seq.grammar is not None:
        finish = seq.grammar.accept(token)
    if finish is None and seq.detokenizer is not None:
        seq.text += seq.detokenizer.add(token)
        # As vLLM: stop strings do not end a sequence before min_tokens (the sampler holds
        # back EOS and stop tokens until then too).
        if params.stop and seq.num_output_tokens >= params.min_tokens:
            hit = _find_stop(seq.text, params.stop, len(seq.text) - seq.num_emitted_chars)
            if hit is not None:
                at, stop = hit
                seq.text = seq.text[: at + (len(stop) if params.include_stop_str_in_output else 0)]
                finish_sequence(seq, "stop", stop, flush=False)
                return
    if finish is None and (
        (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
        or seq.num_tokens >= max_model_len
    ):
        finish = "length"
    if finish is not None:
        finish_sequence(seq, finish, reason)


def finish_sequence(
    seq: Sequence, reason: str, stop_reason: int | str | None = None, flush: bool = True
) -> None:
    """Mark ``seq`` finished. ``flush`` releases text held back for an incomplete character
    (not wanted when a stop string has just cut the text)."""
    if seq.detokenizer is not None and flush:
        seq.text += seq.detokenizer.flush()
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = reason
    seq.stop_reason = stop_reason


def _find_stop(text: str, stops: list[str], new_chars: int) -> tuple[int, str] | None:
    """Earliest stop string that ends within the not-yet-emitted tail of ``text``."""
    best: tuple[int, str] | None = None
    for stop in stops:
        # Only the unemitted tail can complete a stop string (emitted text had none).
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    return best

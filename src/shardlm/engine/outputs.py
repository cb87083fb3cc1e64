"""What generation returns (shaped like vLLM's RequestOutput / CompletionOutput).

``LLM.generate`` returns cumulative outputs (all tokens, all text). ``LLMEngine.step`` returns
deltas: each CompletionOutput then holds only the tokens and text produced since the last
output for that sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardlm.engine.sampler import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    # "stop" (EOS, a stop token or a stop string), "length" (max_tokens, the context limit,
    # or a KV pool smaller than the sequence), "abort", or None while running.
    finish_reason: str | None = None
    # The stop token id or stop string that ended generation; None for EOS or length.
    stop_reason: int | str | None = None
    # Per generated token when SamplingParams.logprobs is set: token id → Logprob.
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # SamplingParams.prompt_logprobs: per prompt token (None for the first), token id →
    # Logprob of the token and the top k. In the first output after the prefill (a delta
    # carries it once; LLM.generate keeps it).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Why the engine ended the request itself (finish_reason "abort"), e.g. a structured-output
    # grammar that failed to compile after add_request had accepted its spec; None otherwise.
    error: str | None = None

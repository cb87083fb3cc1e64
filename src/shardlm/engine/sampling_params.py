"""Per-request generation settings, validated up front (shaped like vLLM's SamplingParams)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardlm.errors import ParamError
from shardlm.structured.params import StructuredOutputs


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. ``top_k`` 0 or -1 disables top-k; ``top_p`` 1 and ``min_p`` 0
    disable theirs. ``seed`` makes a request's sampling reproducible whatever else is in the
    batch; without it the engine's seeded generator is used. ``max_tokens`` None means "until
    the context is full".

    Penalties (applied before temperature, as vLLM does): ``repetition_penalty`` divides
    positive / multiplies negative logits of every token already in the prompt or output;
    ``presence_penalty`` and ``frequency_penalty`` subtract p·[count > 0] + f·count for tokens
    already generated (OpenAI's definition).

    ``stop``: strings that end generation; the text is cut right before the stop string (kept
    with ``include_stop_str_in_output``). ``stop_token_ids``: token ids that end generation.
    ``prompt_logprobs=k``: per prompt token after the first, its log-probability given the
    tokens before it and the top k (from the prefill's own logits); ``max_tokens=0`` with it
    scores a prompt without generating.
    ``logprobs=k``: per generated token, the log-probabilities (of the model's raw
    distribution) of the sampled token and the top k. ``n``: independent samples per prompt.
    ``structured_outputs``: the output must match a JSON schema, regex, choice or grammar
    (a StructuredOutputs, or a dict of its fields; the engine compiles it).
    ``speculative=False`` (shardlm's): this request decodes one token a step even when the
    engine speculates (``speculative_config``); True lets it use drafts when it can.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    speculative: bool = True

    def __post_init__(self) -> None:
        _check_int("n", self.n, "an integer in [1, 128]", lambda v: 1 <= v <= 128)
        _check_number("temperature", self.temperature, "a number ≥ 0", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "a number in (0, 1]", lambda v: 0 < v <= 1)
        _check_number("min_p", self.min_p, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        _check_int("top_k", self.top_k, "an integer ≥ 1, or 0 / -1 to disable", lambda v: v >= -1)
        _check_number(
            "repetition_penalty", self.repetition_penalty, "a number > 0", lambda v: v > 0
        )
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), "a number in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, "an integer in [0, 20]", lambda v: 0 <= v <= 20)
        if self.prompt_logprobs is not None:
            _check_int(
                "prompt_logprobs",
                self.prompt_logprobs,
                "an integer in [0, 20]",
                lambda v: 0 <= v <= 20,
            )
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise ParamError(
                "stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}"
            )
        self.stop = list(self.stop)
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None:
            _check_int("seed", self.seed, "an integer in [0, 2**63)", lambda v: 0 <= v < 2**63)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, "an integer ≥ 0", lambda v: v >= 0)
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ParamError(
                "stop_token_ids",
                f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}",
            )
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, "a list of integers ≥ 0", lambda v: v >= 0)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputs.coerce(self.structured_outputs)
        self._check_constraints()
        for name in (
            "ignore_eos",
            "skip_special_tokens",
            "include_stop_str_in_output",
            "speculative",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"{name} must be true or false, got {getattr(self, name)!r}")

    def _check_constraints(self) -> None:
        """logit_bias, min_tokens, allowed_token_ids, bad_words (engine/logits_processors.py;
        token ids are checked against the vocabulary by the engine)."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ParamError(
                    "logit_bias",
                    f"logit_bias must be a dict of token id → bias, got {self.logit_bias!r}",
                )
            bias = {}
            for key, value in self.logit_bias.items():
                digits = isinstance(key, str) and key.isascii() and key.isdigit()
                token = int(key) if digits else key
                _check_int("logit_bias", token, "keyed by token ids ≥ 0", lambda v: v >= 0)
                _check_number(
                    "logit_bias", value, "values in [-100, 100]", lambda v: -100 <= v <= 100
                )
                bias[token] = float(value)
            self.logit_bias = bias
        _check_int("min_tokens", self.min_tokens, "an integer ≥ 0", lambda v: v >= 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError(
                "min_tokens",
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            )
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise ParamError(
                    "allowed_token_ids",
                    f"allowed_token_ids must be a non-empty list of token ids, "
                    f"got {self.allowed_token_ids!r}",
                )
            for t in self.allowed_token_ids:
                _check_int("allowed_token_ids", t, "a list of integers ≥ 0", lambda v: v >= 0)
            self.allowed_token_ids = list(self.allowed_token_ids)
            if self.structured_outputs is not None:
                # A grammar whose next tokens are all outside the list would leave nothing.
                raise ParamError(
                    "allowed_token_ids",
                    "allowed_token_ids cannot be combined with structured_outputs (the "
                    "grammar decides which tokens may come next)",
                )
        if self.bad_words is not None and (
            not isinstance(self.bad_words, (list, tuple))
            or not all(isinstance(w, str) and w.strip() for w in self.bad_words)
        ):
            raise ParamError(
                "bad_words",
                f"bad_words must be a list of non-empty strings, got {self.bad_words!r}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _check_number(name: str, value: object, allowed: str, ok) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ParamError(name, f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: object, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ParamError(name, f"{name} must be {allowed}, got {value!r}")

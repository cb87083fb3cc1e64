"""Per-request generation settings, validated up front (shaped like vLLM's SamplingParams)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardlm.errors import ParamError


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
    ``logprobs=k``: per generated token, the log-probabilities (of the model's raw
    distribution) of the sampled token and the top k. ``n``: independent samples per prompt.
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
    skip_special_tokens: bool = True

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
            _check_int("max_tokens", self.max_tokens, "an integer ≥ 1", lambda v: v >= 1)
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ParamError(
                "stop_token_ids",
                f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}",
            )
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, "a list of integers ≥ 0", lambda v: v >= 0)
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"{name} must be true or false, got {getattr(self, name)!r}")

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

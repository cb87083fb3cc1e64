"""Checks on a prompt's token ids, shared by the engine and the HTTP server.

Each raises a ParamError naming the field as the caller's client knows it (``prompt`` for the
Python API and completions, ``messages`` for chat), so a server reports it without parsing
messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardlm.errors import ParamError

if TYPE_CHECKING:
    from shardlm.tokenizer import Tokenizer

# What the Python API takes as a prompt: text, token ids, or {"prompt": text,
# "prompt_token_ids": ids} (the ids are used, the text reported back).
Prompt = str | list[int] | tuple[int, ...] | dict


def check_token_ids(ids: Sequence[object], vocab_size: int, field: str = "prompt") -> list[int]:
    """The ids as a list of ints, each in [0, vocab_size); not empty."""
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ParamError(
                field, f"{field} token id {t!r} is outside the vocabulary [0, {vocab_size})"
            )
    if not ids:
        raise ParamError(field, f"{field} is empty (it must have at least one token)")
    return list(ids)


def check_prompt_length(num_tokens: int, max_model_len: int, field: str = "prompt") -> None:
    """A prompt must leave room for at least one generated token."""
    if num_tokens >= max_model_len:
        raise ParamError(
            field,
            f"{field} has {num_tokens} tokens; max_model_len is {max_model_len} (this model's "
            "maximum context length), which must leave room for at least one generated token",
        )


def check_context(
    num_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
    field: str = "prompt",
    max_tokens_field: str = "max_tokens",
) -> None:
    """The prompt leaves room, and (when ``max_tokens`` is given) prompt + max_tokens fits the
    context: what OpenAI-compatible servers refuse up front. The engine itself only needs the
    first (a sequence reaching max_model_len finishes with "length")."""
    check_prompt_length(num_tokens, max_model_len, field)
    if max_tokens is not None and max_tokens >= 1 and num_tokens + max_tokens > max_model_len:
        raise ParamError(
            max_tokens_field,
            f"this model's maximum context length is {max_model_len} tokens, but "
            f"{num_tokens + max_tokens} were requested ({num_tokens} in the prompt, "
            f"{max_tokens} for the completion); shorten the prompt or lower {max_tokens_field}",
        )


def encode_prompt(
    prompt: Prompt, tokenizer: Tokenizer | None, vocab_size: int, max_model_len: int
) -> tuple[str | None, list[int]]:
    """Validate a prompt and return (text or None, token ids).

    A dict may carry both: ``prompt_token_ids`` are used and ``prompt`` is kept as the
    text reported back (so an already tokenized prompt is not tokenized again)."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise ParamError(
                    "prompt",
                    f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}",
                )
            _, ids = encode_prompt(ids, tokenizer, vocab_size, max_model_len)
            return (text if isinstance(text, str) else None), ids
        if "prompt" not in prompt:
            raise ParamError("prompt", "a dict prompt needs a 'prompt' or 'prompt_token_ids' key")
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ParamError(
                "prompt", "text prompts need a tokenizer (skip_tokenizer_init=True was set)"
            )
        text, ids = prompt, tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        text, ids = None, check_token_ids(prompt, vocab_size)
    else:
        raise ParamError(
            "prompt",
            "a prompt must be a string, a list of token ids or a dict, "
            f"got {type(prompt).__name__}",
        )
    if not ids:
        raise ParamError("prompt", "prompt is empty (it must have at least one token)")
    check_prompt_length(len(ids), max_model_len)
    return text, ids

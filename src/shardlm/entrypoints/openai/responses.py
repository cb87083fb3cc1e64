"""Response bodies of the OpenAI API, built from the engine's deltas (pure functions)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from shardlm.engine.outputs import CompletionOutput
from shardlm.engine.sampler import Logprob


def sse(payload: dict | str) -> str:
    """One Server-Sent Event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


# JSON has no -inf: a token the model rules out gets this floor instead (as vLLM does).
LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN to the floor


def empty_completion_logprobs() -> dict[str, list]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


@dataclass
class Choice:
    """Everything produced so far for one choice (one sequence of one prompt)."""

    index: int
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    completion_logprobs: dict = field(default_factory=empty_completion_logprobs)
    chat_logprobs: list = field(default_factory=list)
    prompt_echoed: bool = False  # its echoed prompt's logprobs went out (echo + logprobs)

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason  # "stop" or "length"


def _top(lp: dict[int, Logprob], k: int) -> list[Logprob]:
    """The k most likely entries (ties in rank can bring in one more: cut at k)."""
    return sorted((e for e in lp.values() if e.rank <= k), key=lambda e: e.rank)[:k]


def completion_logprobs(delta: CompletionOutput, k: int, offset: int) -> dict:
    """The legacy completions ``logprobs`` object for a delta's tokens; ``offset`` is the
    length of the choice's text before the delta (for ``text_offset``)."""
    out = empty_completion_logprobs()
    for token_id, lp in zip(delta.token_ids, delta.logprobs or [], strict=False):
        chosen = lp[token_id]
        text = chosen.decoded_token or ""
        out["tokens"].append(text)
        out["token_logprobs"].append(finite(chosen.logprob))
        out["top_logprobs"].append(_top_by_text(lp, k))
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _top_by_text(lp: dict[int, Logprob], k: int) -> dict[str, float]:
    """The top k keyed by text, as OpenAI's legacy format is, most likely first: distinct
    tokens with the same text (partial UTF-8 bytes) share a key, and the most likely keeps it."""
    top: dict[str, float] = {}
    for e in _top(lp, k):
        top.setdefault(e.decoded_token or "", finite(e.logprob))
    return top


def echoed_prompt_logprobs(
    token_ids: list[int],
    token_texts: list[str],
    token_widths: list[int],
    prompt_logprobs: list[dict[int, Logprob] | None],
    k: int,
) -> dict:
    """The legacy ``logprobs`` object of an echoed prompt: its tokens with their logprobs and
    top k (the first token has none: null, as OpenAI reports it). ``text_offset`` advances by
    each token's width in the echoed text: 0 for special tokens the tokenizer added (a BOS is
    not in the prompt's text)."""
    out = empty_completion_logprobs()
    offset = 0
    for token, text, width, entry in zip(
        token_ids, token_texts, token_widths, prompt_logprobs, strict=True
    ):
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += width
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(finite(entry[token].logprob))
        out["top_logprobs"].append(_top_by_text(entry, k))
    return out


def vllm_prompt_logprobs(prompt_logprobs: list[dict[int, Logprob] | None]) -> list:
    """vLLM's ``prompt_logprobs`` response field: per prompt token, null or
    {token id: {logprob, rank, decoded_token}}."""
    return [
        None
        if entry is None
        else {
            str(token): {
                "logprob": finite(lp.logprob),
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for token, lp in entry.items()
        }
        for entry in prompt_logprobs
    ]


def chat_logprobs(delta: CompletionOutput, k: int) -> list[dict]:
    """Chat's ``logprobs.content`` entries for a delta's tokens."""

    def entry(e: Logprob) -> dict:
        token = e.decoded_token or ""
        # bytes of the decoded text: a token that is part of a UTF-8 character shows U+FFFD.
        return {"token": token, "logprob": finite(e.logprob), "bytes": list(token.encode())}

    content = []
    for token_id, lp in zip(delta.token_ids, delta.logprobs or [], strict=False):
        item = entry(lp[token_id])
        item["top_logprobs"] = [entry(e) for e in _top(lp, k)]
        content.append(item)
    return content


def usage(choices: list[Choice], prompt_tokens: int) -> dict:
    completion = sum(c.tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def envelope(kind: str, request_id: str, model: str, created: int | None = None) -> dict:
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()) if created is None else created,
        "model": model,
    }


def model_card(name: str, max_model_len: int, created: int | None = None) -> dict:
    """The one entry of /v1/models (``max_model_len`` is vLLM's extension)."""
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()) if created is None else created,
        "owned_by": "shardlm",
        "max_model_len": max_model_len,
    }

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
        # Keyed by text, as OpenAI's legacy format is: distinct tokens with the same text
        # (partial UTF-8 bytes) share a key, and the most likely of them is kept.
        top = reversed(_top(lp, k))
        out["top_logprobs"].append({e.decoded_token or "": finite(e.logprob) for e in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


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

"""``speculative_config``: what speculative decoding proposes drafts with, in vLLM's shape.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
     "prompt_lookup_min": 2}
    {"method": "draft_model", "model": "/path/to/draft", "num_speculative_tokens": 4}

One engine option (``EngineConfig.speculative.speculative_config``) holds it as JSON text, so
it reaches the CLI (``--speculative-config '{...}'``), the workers and the docs like every
other option; ``LLM(speculative_config={...})`` takes a dict too. ``parse`` checks every key
and names the one that is wrong.

``disable_by_batch_size`` (as vLLM's): no drafts while at least that many sequences are
running or waiting. Verifying k drafts adds k rows to a sequence's step; when a step is
memory-bound (small batch, a GPU, or bfloat16 on this CPU) those rows are nearly free, when it
is compute-bound (large batch, or float32 matmuls on this CPU) they cost about what they
compute, and drafts stop paying. The default (``DEFAULT_DISABLE_BY_BATCH``) is the safe side
of benchmarks/speculative.py's figures (docs/benchmarks.md); null never disables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shardlm.errors import ParamError

SPECULATIVE_METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_PROMPT_LOOKUP_MAX = 4
DEFAULT_PROMPT_LOOKUP_MIN = 2  # 1 proposes after any repeated token: more drafts, fewer right
DEFAULT_DISABLE_BY_BATCH = 16
# "model" of a draft_model config may name the built-in draft (demo.py) by this.
BUILTIN_DRAFT = "builtin"

_KEYS = (
    "method",
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "model",
    "disable_by_batch_size",
)
FIELD = "speculative_config"


@dataclass(frozen=True)
class SpeculativeConfig:
    """A parsed, checked ``speculative_config``."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP_MAX
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP_MIN
    model: str | None = None  # draft_model: the draft's checkpoint (or BUILTIN_DRAFT)
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH

    def to_json(self) -> str:
        """The canonical JSON text (what the option holds once given as a dict)."""
        keys = [k for k in _KEYS if getattr(self, k) is not None]
        if self.method != "ngram":
            keys = [k for k in keys if not k.startswith("prompt_lookup")]
        if self.disable_by_batch_size is None:
            keys.append("disable_by_batch_size")  # null: never disabled
        return json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)


def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ParamError(
            f"{FIELD}.{key}", f"{FIELD}.{key} must be an integer in [{lo}, {hi}], got {value!r}"
        )
    return value


def parse(value: str | dict | None) -> SpeculativeConfig | None:
    """JSON text or a dict → SpeculativeConfig (None: speculation off). Raises ParamError
    naming the key at fault."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ParamError(FIELD, f"{FIELD} is not valid JSON ({e.msg} at {e.pos})") from None
    if not isinstance(value, dict):
        raise ParamError(
            FIELD, f"{FIELD} must be a JSON object, got {type(value).__name__}: {value!r}"
        )
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise ParamError(
            f"{FIELD}.{unknown[0]}",
            f"{FIELD} has an unknown key {unknown[0]!r}; allowed: {', '.join(_KEYS)}",
        )
    method = value.get("method", "draft_model" if value.get("model") is not None else None)
    if method not in SPECULATIVE_METHODS:
        raise ParamError(
            f"{FIELD}.method",
            f"{FIELD}.method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}",
        )
    if "num_speculative_tokens" not in value:
        raise ParamError(
            f"{FIELD}.num_speculative_tokens",
            f"{FIELD} needs num_speculative_tokens (drafts per step, 1..{MAX_SPECULATIVE_TOKENS})",
        )
    k = _int("num_speculative_tokens", value["num_speculative_tokens"], 1, MAX_SPECULATIVE_TOKENS)
    model = value.get("model")
    if method == "draft_model":
        if not isinstance(model, str) or not model:
            raise ParamError(
                f"{FIELD}.model",
                f"{FIELD}.method 'draft_model' needs model: the draft's checkpoint directory "
                f"(or {BUILTIN_DRAFT!r} for the built-in model's draft), got {model!r}",
            )
        for key in ("prompt_lookup_max", "prompt_lookup_min"):
            if key in value:
                raise ParamError(f"{FIELD}.{key}", f"{FIELD}.{key} is for method 'ngram' only")
    elif model is not None:
        raise ParamError(f"{FIELD}.model", f"{FIELD}.model is for method 'draft_model' only")
    lookup_max = _int(
        "prompt_lookup_max", value.get("prompt_lookup_max", DEFAULT_PROMPT_LOOKUP_MAX), 1, 64
    )
    lookup_min = _int(
        "prompt_lookup_min",
        value.get("prompt_lookup_min", min(DEFAULT_PROMPT_LOOKUP_MIN, lookup_max)),
        1,
        64,
    )
    if lookup_min > lookup_max:
        raise ParamError(
            f"{FIELD}.prompt_lookup_min",
            f"{FIELD}.prompt_lookup_min ({lookup_min}) must not exceed prompt_lookup_max "
            f"({lookup_max})",
        )
    disable = value.get("disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH)
    if disable is not None:
        disable = _int("disable_by_batch_size", disable, 1, 2**31)
    return SpeculativeConfig(method, k, lookup_max, lookup_min, model, disable)


def check(value: Any) -> None:
    """The option's check: parse and drop the result."""
    parse(value)

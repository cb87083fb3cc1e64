"""The offline Python API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shardlm.config import ModelConfig
from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.engine.runner import ModelRunner
from shardlm.engine.sampler import sample_token
from shardlm.engine.sampling_params import SamplingParams
from shardlm.errors import ShardlmError
from shardlm.loader import resolve_dtype
from shardlm.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

# A prompt is text, token ids, or vLLM's dict form {"prompt": ...} / {"prompt_token_ids": ...}.
Prompt = str | Sequence[int] | dict


@dataclass
class StreamEvent:
    """One generated token as it is produced (what ``LLM.stream`` yields)."""

    token_id: int
    text_delta: str
    finish_reason: str | None
    stop_reason: int | None = None


class LLM:
    """A model loaded from a Hugging Face checkpoint directory, ready to generate.

    ``dtype``: auto | float32 | bfloat16 | float16 (auto = the checkpoint's dtype on GPU,
    float32 on CPU). ``device``: auto (CUDA if available) | cpu | cuda[:N].
    ``max_model_len``: the longest sequence (prompt + output) allowed; defaults to the
    model's max_position_embeddings. ``seed`` seeds sampling of requests without a seed.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        tokenizer: str | Path | None = None,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        skip_tokenizer_init: bool = False,
    ) -> None:
        path = Path(model)
        if not path.is_dir():
            raise ShardlmError(
                f"model {str(model)!r} is not a directory (expected a checkpoint dir)"
            )
        self.model_path = path
        self.config = ModelConfig.from_pretrained(path)
        self.device = _resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.config.torch_dtype, self.device)
        limit = self.config.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
        elif (
            isinstance(max_model_len, bool)
            or not isinstance(max_model_len, int)
            or not (1 <= max_model_len <= limit)
        ):
            raise ValueError(
                f"max_model_len must be an integer in [1, {limit}] "
                f"(max_position_embeddings), got {max_model_len!r}"
            )
        self.max_model_len = max_model_len
        self.tokenizer = (
            None if skip_tokenizer_init else Tokenizer.from_pretrained(tokenizer or path)
        )
        self.eos_token_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.runner = ModelRunner(path, self.config, self.dtype, self.device, max_model_len)
        self._generator = torch.Generator(self.device).manual_seed(seed)
        self._request_ids = itertools.count()

    # -- lifecycle (no workers yet: these exist so user code is ready for them) --
    def shutdown(self) -> None:
        """Release resources. A no-op on one device; tensor parallelism gives it work."""

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- generation --
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries but there are "
                    f"{len(prompt_list)} prompts; pass one, or one per prompt"
                )
        # Validate every prompt before generating anything, so bad input fails fast.
        encoded = [self._encode(p) for p in prompt_list]
        results = []
        for (text, ids), params in zip(encoded, params_list, strict=True):
            completion = CompletionOutput(index=0, text="", token_ids=[])
            for event in self._stream_ids(ids, params):
                completion.token_ids.append(event.token_id)
                completion.text += event.text_delta
                completion.finish_reason = event.finish_reason
                completion.stop_reason = event.stop_reason
            results.append(
                RequestOutput(
                    request_id=str(next(self._request_ids)),
                    prompt=text,
                    prompt_token_ids=ids,
                    outputs=[completion],
                    finished=True,
                )
            )
        return results

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield each token as it is generated with its text delta; the last has finish_reason."""
        _, ids = self._encode(prompt)
        return self._stream_ids(ids, params or SamplingParams())

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return self._encode(prompt)[1]

    # -- internals --
    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs a 'prompt' or 'prompt_token_ids' key")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True was set)")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            vocab = self.config.vocab_size
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(
                        f"prompt token id {t!r} is outside the vocabulary [0, {vocab})"
                    )
        if not ids:
            raise ValueError("prompt is empty (it must have at least one token)")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                "which must leave room for at least one generated token"
            )
        return text, ids

    def _stream_ids(self, ids: list[int], params: SamplingParams) -> Iterator[StreamEvent]:
        room = self.max_model_len - len(ids)
        budget = room if params.max_tokens is None else min(params.max_tokens, room)
        generator = (
            self._generator
            if params.seed is None
            else torch.Generator(self.device).manual_seed(params.seed)
        )
        detok = (
            IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            if self.tokenizer is not None
            else None
        )
        stop_ids = set(params.stop_token_ids)
        eos_ids = set() if params.ignore_eos else self.eos_token_ids

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return sample_token(logits, params, generator)

        for count, token in enumerate(self.runner.generate(ids, budget, pick), start=1):
            finish, stop_reason = None, None
            if token in stop_ids:
                finish, stop_reason = "stop", token
            elif token in eos_ids:
                finish = "stop"
            elif count == budget:
                finish = "length"
            delta = ""
            if detok is not None:
                # EOS and stop tokens end the text; they are not part of it.
                if finish != "stop":
                    delta = detok.add(token)
                if finish is not None:
                    delta += detok.flush()
            yield StreamEvent(token, delta, finish, stop_reason)
            if finish is not None:
                return


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]  # one prompt given as token ids
    for p in prompts:
        if not isinstance(p, (str, dict, list, tuple)):
            raise ValueError(
                "each prompt must be a string, a list of token ids or a dict, "
                f"got {type(p).__name__}"
            )
    return prompts


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev

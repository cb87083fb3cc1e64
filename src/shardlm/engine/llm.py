"""The offline Python API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from shardlm.engine.llm_engine import LLMEngine, Prompt
from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.engine.sampling_params import SamplingParams


@dataclass
class StreamEvent:
    """New output of one request as it is produced (what ``LLM.stream`` yields)."""

    token_ids: list[int]
    text_delta: str
    finish_reason: str | None
    stop_reason: int | str | None = None


class LLM:
    """A model loaded from a Hugging Face checkpoint directory, ready to generate.

    ``dtype``: auto | float32 | bfloat16 | float16 (auto = the checkpoint's dtype on GPU,
    float32 on CPU). ``device``: auto (CUDA if available) | cpu | cuda[:N].
    ``max_model_len``: the longest sequence (prompt + output); default max_position_embeddings.
    ``seed`` seeds sampling of requests without a seed. Engine options: ``kv_cache_tokens``
    (exact pool size) or ``memory_utilization`` (fraction of free memory, default 0.9 on GPU,
    0.3 on CPU), ``block_size`` (16), ``max_num_batched_tokens`` (2048 per step),
    ``max_num_seqs`` (256 running at once), ``enable_prefix_caching`` (True).
    ``tensor_parallel_size`` N > 1 splits the model over N processes (spawned here, or the
    ranks of a torchrun job); ``tp_timeout_s`` bounds how long a dead or hung rank can stall
    a step before WorkerFailure is raised (default 60). ``attention_nodes`` β ≥ 1 R-shards the
    KV cache over β attention nodes per head group (docs/architecture.md).
    ``quantization``: None | "int8" | "fp8" (W8A8) for the MLP down projection, or every
    linear but the LM head with ``quantize_all_linears=True``. ``arm``: none | hadamard |
    smooth | both, the activation redistribution in front of the down projection
    (docs/arm.md); smoothing reads ``arm_calibration`` (default: the checkpoint's
    arm_calibration.safetensors, written by ``shardlm calibrate``).
    """

    def __init__(self, model: str, **engine_args) -> None:
        self.engine = LLMEngine(model, **engine_args)
        self._request_ids = itertools.count()
        # Step outputs not yet collected, per request: whoever drives the engine (a generate
        # call or any open stream) files every request's output here for its owner.
        self._pending: dict[str, list[RequestOutput]] = {}
        self._waited_on: set[str] = set()  # request ids some caller is collecting

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    @property
    def runner(self):
        return self.engine.runner

    # -- lifecycle --
    def shutdown(self) -> None:
        """Stop tensor-parallel workers, if any, and release the process groups."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- generation --
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched continuously; outputs in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries but there are "
                    f"{len(prompt_list)} prompts; pass one, or one per prompt"
                )
        # Tokenize and validate every prompt before queueing any, so bad input fails without
        # side effects; the engine then takes the ids as they are.
        encoded = [self.engine.encode_prompt(p) for p in prompt_list]
        ids = [f"gen-{next(self._request_ids)}" for _ in prompt_list]
        results: dict[str, RequestOutput] = {}
        try:
            for rid, (text, token_ids), params in zip(ids, encoded, params_list, strict=True):
                prompt = {"prompt": text, "prompt_token_ids": token_ids}
                self.engine.add_request(rid, prompt, params)
                self._waited_on.add(rid)
            bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm or len(ids) < 8)
            with bar:
                unfinished = set(ids)
                while unfinished:
                    self._step()
                    for rid in list(unfinished):
                        for delta in self._pending.pop(rid, []):
                            _accumulate(results, delta)
                            if delta.finished:
                                unfinished.discard(rid)
                                bar.update(1)
        finally:
            for rid in ids:  # on error (or Ctrl-C), leave nothing running
                self.engine.abort(rid)
                self._pending.pop(rid, None)
                self._waited_on.discard(rid)
        return [results[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield one request's new tokens and text as they are produced (n must be 1)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream supports n=1 only, got n={params.n}")
        rid = f"stream-{next(self._request_ids)}"
        self.engine.add_request(rid, prompt, params)
        self._waited_on.add(rid)
        try:
            while True:
                outs = self._pending.pop(rid, [])
                if not outs:
                    self._step()
                    continue
                for out in outs:
                    c = out.outputs[0]
                    yield StreamEvent(c.token_ids, c.text, c.finish_reason, c.stop_reason)
                    if out.finished:
                        return
        finally:
            self.engine.abort(rid)
            self._pending.pop(rid, None)
            self._waited_on.discard(rid)

    def _step(self) -> None:
        """Advance the engine one step and file each request's output for its owner."""
        for out in self.engine.step():
            if out.request_id in self._waited_on:  # else: abandoned (e.g. an abort's echo)
                self._pending.setdefault(out.request_id, []).append(out)

    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        """Float32 logits [T, vocab] at every position of the prompt (for scoring)."""
        return self.engine.prompt_logits(prompt)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return self.engine.encode_prompt(prompt)[1]


def _accumulate(results: dict[str, RequestOutput], delta: RequestOutput) -> None:
    """Fold a step's delta output into the cumulative output of its request."""
    out = results.get(delta.request_id)
    if out is None:
        out = results[delta.request_id] = RequestOutput(
            delta.request_id, delta.prompt, delta.prompt_token_ids
        )
    by_index = {c.index: c for c in out.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        if c is None:
            c = CompletionOutput(d.index, "", [], logprobs=[] if d.logprobs is not None else None)
            out.outputs.append(c)
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            c.logprobs.extend(d.logprobs)
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    out.outputs.sort(key=lambda c: c.index)
    out.finished = delta.finished


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(
            "prompts must be a string, a list of token ids, a dict, or a list of those; "
            f"got {type(prompts).__name__}"
        )
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts

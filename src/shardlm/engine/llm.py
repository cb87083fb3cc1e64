"""The offline Python API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from shardlm.engine.llm_engine import LLMEngine
from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.engine.prompts import Prompt
from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine_config import EngineConfig


@dataclass
class StreamEvent:
    """New output of one request as it is produced (what ``LLM.stream`` yields)."""

    token_ids: list[int]
    text_delta: str
    finish_reason: str | None
    stop_reason: int | str | None = None


class LLM:
    """A model loaded from a Hugging Face checkpoint directory, ready to generate.

    ``LLM(model, **options)``: every option of ``shardlm.EngineConfig`` as a keyword argument
    (dtype, device, max_model_len, KV cache, scheduler, tensor parallelism, attention nodes,
    kernels, quantization and ARM; the table is in docs/configuration.md), or
    ``LLM(config=EngineConfig(...))``. An unknown option is refused with the closest valid
    names. ``model`` None is the built-in model.
    """

    def __init__(
        self, model: str | None = None, *, config: EngineConfig | None = None, **options
    ) -> None:
        self.engine = LLMEngine(model, config=config, **options)
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
        self._compile_grammars(params_list)
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
        self._compile_grammars([params])
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

    def _compile_grammars(self, params: Sequence[SamplingParams]) -> None:
        """Compile every structured-output grammar before anything is queued, as the server
        does: a grammar that parses but fails to compile is a ParamError here, not a failure
        inside a later step (the engine then finds it compiled, in its cache)."""
        for spec in {id(p.structured_outputs): p.structured_outputs for p in params}.values():
            if spec is not None:
                self.engine.grammars.compile(spec)

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
    if delta.prompt_logprobs is not None:
        out.prompt_logprobs = delta.prompt_logprobs


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

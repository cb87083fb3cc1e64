"""The serving core: requests in, incremental outputs out, one scheduler step at a time.

    engine.add_request("r1", "Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():      # deltas: new token ids and new text per sequence
            ...
    engine.abort("r2")                 # frees its KV blocks at once

Each step: the scheduler picks decodes and prefill chunks within the token budget, the
executor runs them in one forward on every rank, the sampler picks the next tokens on device
(the only host sync is reading those ids), and each sequence's stop rules and text are
updated. The engine orchestrates; the configuration (engine_config.py), the job's ranks
(executor/), the model on each rank (runtime/) and the blocks (cache/) are each their own.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import torch

from shardlm.attention.node import NodeStats
from shardlm.attention.sharded import AttentionTraffic
from shardlm.cache.block_manager import BlockManager
from shardlm.cache.node_budget import NodeBlockBudget
from shardlm.cache.rshard import RShard
from shardlm.config import ModelConfig
from shardlm.engine.batching import build_step_inputs, sampling_rows
from shardlm.engine.logits_processors import bad_word_token_ids, check_against_vocabulary
from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.engine.prompt_logprobs import score_prompt, take_prompt_logprobs
from shardlm.engine.prompts import Prompt, encode_prompt
from shardlm.engine.sampler import sample
from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine.scheduler import ScheduledBatch, Scheduler
from shardlm.engine.sequence import Request, Sequence, append_token, finish_sequence
from shardlm.engine.speculative import (
    NgramProposer,
    Proposer,
    RowResult,
    SpecStats,
    draft_slots,
    sample_and_verify,
)
from shardlm.engine.stats import ComputeNodeStats, EngineStats
from shardlm.engine_config import EngineConfig
from shardlm.errors import ParamError
from shardlm.executor.driver import Executor
from shardlm.structured.compiler import GrammarCache, wait_for_any
from shardlm.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

# How long an idle step waits for a structured-output grammar that is compiling.
GRAMMAR_WAIT_S = 0.05


class LLMEngine:
    """Owns the scheduler, the requests and the executor. Not thread-safe: one caller drives
    ``step``; a server runs it in one background loop."""

    def __init__(
        self, model: str | Path | None = None, *, config: EngineConfig | None = None, **options: Any
    ) -> None:
        """``LLMEngine(model, **options)`` with the options of EngineConfig (flat keyword
        arguments), or ``LLMEngine(config=EngineConfig(...))``."""
        if model is not None:
            options["model"] = model
        if config is None:
            config = EngineConfig.from_kwargs("LLMEngine", **options)
        elif options:
            config = config.replace(**options)
        self.engine_config = config = config.resolve()  # every check before anything loads
        self.config = ModelConfig.from_pretrained(config.model.model)
        self.model_path = Path(config.model.model)
        self.dtype = config.torch_dtype
        self.max_model_len = config.model.max_model_len
        self.tokenizer = self._load_tokenizer()
        self.eos_token_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        # Structured outputs' grammars, for the logits' width (the model's vocabulary).
        self.grammars = GrammarCache(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        self.executor = Executor(config, self.config)
        self.device = self.executor.device
        self.rank_weight_bytes = self.executor.rank_weight_bytes
        self.blocks = self._block_manager(self.executor.num_blocks)
        self.scheduler = Scheduler(
            self.blocks,
            config.scheduler.max_num_batched_tokens,
            config.scheduler.max_num_seqs,
            config.parallel.compute_nodes,
            lookahead=self._draft_slots if config.speculative.config is not None else None,
        )
        self.speculation = config.speculative.config
        self.spec_stats = SpecStats()
        self.proposer = self._proposer()
        # Drafts verified as one chunk per sequence (PyTorch attention) or as decode rows
        # (the Triton decode kernel and CUDA graphs): engine/batching.py.
        self.verify_as_chunks = self.runner.attention_backend != "triton"
        self.generator = torch.Generator(self.device).manual_seed(config.model.seed)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._prefill_tokens = 0
        self._decode_tokens = 0
        self._aborted_outputs: list[RequestOutput] = []

    def _load_tokenizer(self) -> Tokenizer | None:
        m = self.engine_config.model
        if m.skip_tokenizer_init:
            return None
        return Tokenizer.from_pretrained(m.tokenizer or m.model)

    def _block_manager(self, num_blocks: int) -> BlockManager:
        """The driver's blocks: its own pool's, or (attention nodes) a count of node 0's."""
        cache, p = self.engine_config.cache, self.engine_config.parallel
        if not p.attention_nodes:
            return BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        return NodeBlockBudget(
            num_blocks,
            cache.block_size,
            RShard(p.attention_nodes, p.kv_chunk_size),
            cache.enable_prefix_caching,
        )

    def _proposer(self) -> Proposer | None:
        """Where drafts come from (speculative decoding; None when it is off)."""
        spec = self.speculation
        if spec is None:
            return None
        if spec.method == "ngram":
            return NgramProposer(spec)
        from shardlm.engine.draft_model import DraftModelProposer

        # As many token slots as the target's pool (all nodes' together, with attention nodes).
        nodes = max(1, self.engine_config.parallel.attention_nodes)
        slots = self.blocks.num_blocks * self.blocks.block_size * nodes
        return DraftModelProposer(
            self.engine_config, self.config, self.tokenizer, self.device, slots
        )

    def _propose(self, batch: ScheduledBatch) -> dict[Sequence, torch.Tensor]:
        """Drafts for this step's lookahead (Sequence.draft_ids); stale ones of an earlier
        step that raised are dropped first. The draft distributions of sampled rows."""
        if self.proposer is None:
            return {}
        for seq in batch.decodes:
            seq.draft_ids = []
        return self.proposer.propose(batch.lookahead) if batch.lookahead else {}

    def _draft_slots(self, seq: Sequence, queued: int) -> int:
        return draft_slots(seq, self.speculation, queued, self.max_model_len)

    # -- the job --
    @property
    def runner(self):
        return self.executor.runner

    @property
    def tp(self):
        return self.executor.tp

    @property
    def workers(self):
        return self.executor.workers

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers (if any) and release the process groups. Idempotent."""
        self.executor.shutdown(graceful)
        self.grammars.shutdown()

    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        """Float32 logits at every prompt position (scoring; tests compare with HF)."""
        _, ids = self.encode_prompt(prompt)  # validated before any rank sees them
        return self.executor.score(ids)

    # -- requests --
    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None
    ) -> None:
        """Queue a request. Raises ValueError (and queues nothing) if it can never run."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ParamError(
                "params", f"params must be a SamplingParams, got {type(params).__name__}"
            )
        if not isinstance(request_id, str):
            raise ParamError(
                "request_id", f"request_id must be a string, got {type(request_id).__name__}"
            )
        if request_id in self.requests:
            raise ParamError("request_id", f"request_id {request_id!r} is already in use")
        if params.stop and self.tokenizer is None:
            raise ParamError(
                "stop",
                "stop strings need a tokenizer (skip_tokenizer_init=True was set); "
                "use stop_token_ids instead",
            )
        text, ids = self.encode_prompt(prompt)
        check_against_vocabulary(params, self.config.vocab_size)
        bad_words = bad_word_token_ids(params.bad_words, self.tokenizer) if params.bad_words else []
        pool_tokens = self.blocks.capacity_tokens
        if len(ids) + 1 > pool_tokens:
            nodes = self.engine_config.parallel.attention_nodes
            where = (
                f" (β = {nodes} attention nodes of "
                f"{self.blocks.num_blocks * self.blocks.block_size} tokens each)"
                if nodes
                else ""
            )
            raise ParamError(
                "prompt",
                f"prompt has {len(ids)} tokens but the KV cache holds only {pool_tokens}"
                f"{where}; raise kv_cache_tokens or memory_utilization",
            )
        # Structured outputs: parsed here (a bad spec raises now), compiled in a thread pool.
        spec = params.structured_outputs
        grammars = [
            self.grammars.state(spec, params.stop_token_ids) if spec else None
            for _ in range(params.n)
        ]
        request = Request(request_id, text, ids, params, next(self._arrivals), bad_words=bad_words)
        for i in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request=request,
                index=i,
                token_ids=list(ids),
                num_prompt_tokens=len(ids),
                generator=self._generator_for(params.seed, i),
                grammar=grammars[i],
                detokenizer=(
                    IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                    if self.tokenizer is not None
                    else None
                ),
                # One sample scores the prompt for the request (the others may reuse its KV).
                prompt_logprobs=(
                    [None] * len(ids) if params.prompt_logprobs is not None and i == 0 else None
                ),
            )
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def abort(self, request_id: str, error: str | None = None) -> bool:
        """Stop a request now and free its blocks. Its final output (finish_reason "abort",
        with ``error`` when the engine itself gives up on it) comes from the next ``step``.
        False if no such unfinished request."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                self._release_drafts(seq)
                finish_sequence(seq, "abort")
        output = self._output(request, request.seqs)
        output.error = error
        self._aborted_outputs.append(output)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted_outputs)

    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Validate a prompt and return (text or None, token ids) (engine/prompts.py)."""
        return encode_prompt(prompt, self.tokenizer, self.config.vocab_size, self.max_model_len)

    # -- the step --
    def step(self) -> list[RequestOutput]:
        """Advance every scheduled sequence by one step; return what changed (as deltas)."""
        self._fail_uncompiled_grammars()
        outputs, self._aborted_outputs = self._aborted_outputs, []
        batch = self.scheduler.schedule()
        if not batch:  # nothing to run: perhaps only sequences whose grammar is compiling
            wait_for_any((s.grammar for s in self.scheduler.waiting), GRAMMAR_WAIT_S)
        # Before the step runs, nodes must drop what the scheduler freed since the last step
        # (finishes, aborts) and in this schedule (preemptions): the step may reuse the blocks.
        self._release_finished()
        touched: dict[str, list[Sequence]] = {}
        for seq in batch.finished:  # could never fit: finished by the scheduler
            touched.setdefault(seq.request.request_id, []).append(seq)
        if batch:
            self._prefill_tokens += sum(n for _, n in batch.prefills)
            self._decode_tokens += len(batch.decodes)
            draft_probs = self._propose(batch)
            seqs, results = self.executor.guarded(self._execute_and_sample, batch, draft_probs)
            for seq, n in [(s, 1) for s in batch.decodes] + batch.prefills:
                seq.num_computed_tokens += n
                if not seq.draft_ids:
                    self._register_full_blocks(seq)
            for seq, result in zip(seqs, results, strict=True):
                if seq.params.max_tokens == 0:  # scoring only: the prompt, no token
                    finish_sequence(seq, "length")
                else:
                    for token, lps in zip(result.tokens, result.logprobs, strict=True):
                        append_token(
                            seq, token, lps, self.eos_token_ids, self.max_model_len, self.tokenizer
                        )
                        if seq.is_finished:
                            break  # tokens after a stop are dropped
                if seq.draft_ids:
                    self._roll_back(seq, result.accepted)
                elif seq in batch.lookahead and not seq.is_finished:
                    # Slots were reserved but the proposer made no draft: give them back.
                    self.scheduler.trim_blocks(seq)
                touched.setdefault(seq.request.request_id, []).append(seq)
        for request_id, seqs in touched.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            for seq in seqs:
                if seq.is_finished:
                    self.scheduler.remove(seq)
                    self._release_drafts(seq)
            outputs.append(self._output(request, seqs))
            if request.is_finished:
                del self.requests[request_id]
        return outputs

    def _fail_uncompiled_grammars(self) -> None:
        """A structured-output spec parses in add_request but compiles in a pool: a waiting
        request whose grammar failed to compile ends here, explicitly (finish_reason "abort"
        and the compiler's message in ``error``), instead of failing the batch it would join.
        (LLM.generate and the server compile before queueing and never get here.)"""
        for seq in list(self.scheduler.waiting):
            failure = seq.grammar.failure if seq.grammar is not None else None
            if failure is not None:
                self.abort(
                    seq.request.request_id,
                    error=f"structured_outputs: the grammar failed to compile: {failure}",
                )

    def _release_drafts(self, seq: Sequence) -> None:
        """A finished or aborted sequence's draft-model K/V goes at once (the draft is local;
        preempted sequences reach it through ``_release_finished``)."""
        if self.proposer is not None:
            self.proposer.release([seq.seq_id])

    def _release_finished(self) -> None:
        """Tell the attention nodes (every rank's, via the control broadcast) which sequences
        the scheduler freed: finished, aborted or preempted. Sent just before the next step
        runs (or a stats query), so a step's finishes and the next schedule's preemptions
        travel in one message. Without nodes, nothing to do."""
        released = self.scheduler.drain_released()
        if released and self.proposer is not None:
            self.proposer.release(released)
        if released and self.engine_config.parallel.attention_nodes:
            self.executor.release(released)

    def _execute_and_sample(
        self, batch: ScheduledBatch, draft_probs: dict[Sequence, torch.Tensor]
    ) -> tuple[list[Sequence], list[RowResult]]:
        """Forward + sampling (and verification of drafts). Reading the sampled ids is the
        step's one host sync; it stays inside the guarded call because on CUDA a failed
        collective surfaces only there."""
        p = self.engine_config.parallel
        inputs, seqs, scored = build_step_inputs(
            batch, p.compute_nodes, p.compute_chunk_size, self.verify_as_chunks
        )
        logits = self.executor.run_step(inputs)
        sampled = inputs.sample_rows.shape[0]
        if scored:
            score_prompt(logits[sampled:], scored, self.tokenizer)
            logits = logits[:sampled]
        if not seqs:
            return [], []
        rows = sampling_rows(seqs, self.eos_token_ids)
        if not batch.lookahead:
            out = sample(logits, rows)
            return seqs, [
                RowResult([t], [lp])
                for t, lp in zip(out.token_ids.tolist(), out.logprobs, strict=True)
            ]
        return seqs, sample_and_verify(logits, seqs, rows, draft_probs)

    def _roll_back(self, seq: Sequence, accepted: int) -> None:
        """After a verify step: the sequence's computed tokens are those whose K/V came from
        final tokens (its previous last token and the accepted drafts it kept), i.e. all
        but its new last token; the rejected drafts' slots are overwritten later and their
        blocks past the tokens' need go back (attention nodes drop what they hold past the
        next step's start themselves). Only then are full blocks offered to the prefix
        cache, so it never holds an unverified token."""
        self.spec_stats.record(len(seq.draft_ids), accepted)
        seq.draft_ids = []
        seq.num_computed_tokens = seq.num_tokens - 1
        self._register_full_blocks(seq)
        if not seq.is_finished:
            self.scheduler.trim_blocks(seq)

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks this step filled to the prefix cache."""
        if not self.blocks.enable_prefix_caching:
            return
        while True:
            j = len(seq.block_hashes)
            start, end = self.blocks.block_span(j)
            if end > seq.num_computed_tokens:
                return
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(
                self.blocks.register_full_block(
                    seq.block_table[j], parent, seq.token_ids[start:end]
                )
            )

    def _output(self, request: Request, seqs: list[Sequence]) -> RequestOutput:
        completions = []
        for seq in dict.fromkeys(seqs):  # each once, in order
            new_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens :]
            new_logprobs = (
                seq.logprobs[seq.num_emitted_tokens :] if seq.params.logprobs is not None else None
            )
            seq.num_emitted_tokens = seq.num_output_tokens
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.pending_text(),
                    token_ids=new_ids,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=new_logprobs,
                )
            )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=request.is_finished,
            prompt_logprobs=take_prompt_logprobs(request),
        )

    def _generator_for(self, seed: int | None, index: int) -> torch.Generator:
        """Seeded requests get their own generator per sample, so their draws do not depend
        on what else is batched; others share the engine's generator."""
        if seed is None:
            return self.generator
        return torch.Generator(self.device).manual_seed((seed + index * 0x9E3779B97F4A7C15) % 2**63)

    # -- attention nodes: observability --
    @property
    def attention_traffic(self) -> AttentionTraffic | None:
        """Bytes between the driver (head group 0) and its attention nodes, in total and in
        the last step; every head group moves the same amount. None without nodes."""
        return self.executor.traffic

    def attention_node_stats(self) -> list[NodeStats]:
        """What each attention node holds, as reported by the nodes (wherever they run)."""
        if not self.engine_config.parallel.attention_nodes:
            return []
        self._release_finished()  # an abort since the last step: its KV goes first
        return self.executor.node_stats()

    def compute_node_stats(self) -> list[ComputeNodeStats]:
        """What each compute node computed, as its ranks count it (runtime/compute_nodes.py):
        tokens and dense FLOPs in the last step and in total, bytes to and from the
        attention nodes. One entry with α = 1."""
        table = self.executor.compute_stats()
        return [ComputeNodeStats(a, *(int(x) for x in row)) for a, row in enumerate(table.tolist())]

    @property
    def stats(self) -> EngineStats:
        return EngineStats(
            preemptions=self.scheduler.stats.preemptions,
            prefix_cache_hit_tokens=self.blocks.stats.prefix_hit_tokens,
            prefix_cache_query_tokens=self.blocks.stats.prefix_queries_tokens,
            prefill_tokens=self._prefill_tokens,
            decode_tokens=self._decode_tokens,
            blocks_in_use=self.blocks.num_used_blocks,
            num_blocks=self.blocks.num_blocks,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            spec_draft_tokens=self.spec_stats.draft_tokens,
            spec_accepted_tokens=self.spec_stats.accepted_tokens,
            spec_draft_tokens_per_position=tuple(self.spec_stats.draft_per_position),
            spec_accepted_tokens_per_position=tuple(self.spec_stats.accepted_per_position),
            kv_cache_bytes_per_token=self.executor.runner.kv_bytes_per_token(),
        )

"""The serving core: requests in, incremental outputs out, one scheduler step at a time.

    engine.add_request("r1", "Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():      # deltas: new token ids and new text per sequence
            ...
    engine.abort("r2")                 # frees its KV blocks at once

Each step: the scheduler picks decodes and prefill chunks within the token budget, the model
runner executes them in one forward, the sampler picks the next tokens on device (the only
host sync is reading those ids), and each sequence's stop rules and text are updated.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from shardlm.attention.node import NodeStats
from shardlm.attention.paged import ATTENTION_BACKENDS
from shardlm.attention.rshard import RShard
from shardlm.attention.sharded import AttentionTraffic, ShardedAttention
from shardlm.cache.block_manager import BlockManager
from shardlm.cache.node_budget import NodeBlockBudget
from shardlm.config import ModelConfig
from shardlm.distributed import protocol
from shardlm.distributed.launch import (
    WorkerArgs,
    WorkerGroup,
    device_for_rank,
    init_groups,
    spawn_workers,
    threads_per_rank,
    torchrun_rank,
    under_torchrun,
)
from shardlm.distributed.parallel_state import TPContext
from shardlm.distributed.worker import (
    check_attention_device,
    report_node_stats,
    resolve_worker_args,
    runner_nodes,
    setup_compute_rank,
)
from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.engine.runner import ModelRunner
from shardlm.engine.sampler import SamplingRow, sample
from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine.scheduler import Scheduler
from shardlm.engine.sequence import Request, Sequence, append_token, finish_sequence
from shardlm.errors import ShardlmError, WorkerFailure
from shardlm.kernels import triton_available
from shardlm.loader import LOAD_FORMATS, resolve_device, resolve_dtype
from shardlm.models.llama import check_tensor_parallel
from shardlm.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

ATTENTION_TRANSPORTS = ("distributed", "in-process")

Prompt = str | list[int] | tuple[int, ...] | dict


@dataclass
class EngineStats:
    """Counters since the engine started (for tests and /metrics)."""

    preemptions: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    prefill_tokens: int
    decode_tokens: int
    blocks_in_use: int
    num_blocks: int
    num_running: int
    num_waiting: int


class LLMEngine:
    """Owns the model runner, KV pool, scheduler and requests. Not thread-safe: one caller
    drives ``step``; a server runs it in one background loop."""

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
        kv_cache_tokens: int | None = None,
        memory_utilization: float | None = None,
        block_size: int = 16,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        tp_timeout_s: float = 60.0,
        attention_nodes: int = 0,
        kv_chunk_size: int = 16,
        attention_device: str | None = None,
        attention_transport: str = "distributed",
        arm: str = "none",
        arm_calibration: str | Path | None = None,
        quantization: str | None = None,
        quantize_all_linears: bool = False,
        load_format: str = "auto",
        attention_backend: str = "auto",
        enforce_eager: bool = False,
    ) -> None:
        path = Path(model)
        if not path.is_dir():
            raise ShardlmError(
                f"model {str(model)!r} is not a directory (expected a checkpoint dir)"
            )
        _check_int("block_size", block_size, 1, 1024)
        _check_int("max_num_batched_tokens", max_num_batched_tokens, 1, 2**20)
        _check_int("max_num_seqs", max_num_seqs, 1, 2**16)
        _check_int("tensor_parallel_size", tensor_parallel_size, 1, 1024)
        _check_int("attention_nodes", attention_nodes, 0, 1024, "(0 = no attention nodes)")
        _check_int("kv_chunk_size", kv_chunk_size, 1, 2**20)
        if load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}"
            )
        check_attention_backend(attention_backend, device, block_size, attention_nodes)
        if not isinstance(enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {enforce_eager!r}")
        if attention_transport not in ATTENTION_TRANSPORTS:
            raise ValueError(
                f"attention_transport must be one of {', '.join(ATTENTION_TRANSPORTS)}, "
                f"got {attention_transport!r}"
            )
        if attention_device is not None and not attention_nodes:
            raise ValueError("attention_device needs attention_nodes ≥ 1")
        if kv_cache_tokens is not None:
            _check_int("kv_cache_tokens", kv_cache_tokens, block_size, 2**40)
        if memory_utilization is not None and not (
            isinstance(memory_utilization, (int, float))
            and not isinstance(memory_utilization, bool)
            and 0 < memory_utilization <= 1
        ):
            raise ValueError(
                f"memory_utilization must be a number in (0, 1], got {memory_utilization!r}"
            )
        if not (isinstance(tp_timeout_s, (int, float)) and 1 <= tp_timeout_s <= 3600):
            raise ValueError(f"tp_timeout_s must be a number in [1, 3600], got {tp_timeout_s!r}")
        self.model_path = path
        self.config = ModelConfig.from_pretrained(path)
        check_tensor_parallel(self.config, tensor_parallel_size)  # before anything loads
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.config.torch_dtype, self.device)
        limit = self.config.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
        else:
            _check_int("max_model_len", max_model_len, 1, limit, "(max_position_embeddings)")
        self.max_model_len = max_model_len
        self.tokenizer = (
            None if skip_tokenizer_init else Tokenizer.from_pretrained(tokenizer or path)
        )
        self.eos_token_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)

        self.workers: WorkerGroup | None = None
        self._closed = False
        self._tp_owned = False
        self._threads = torch.get_num_threads()
        tp = TPContext.single()
        check_attention_device(
            attention_device,
            attention_transport,
            tensor_parallel_size,
            attention_nodes,
            self.device,
        )
        args = resolve_worker_args(
            path,
            dtype=dtype,
            device=device,
            max_model_len=self.max_model_len,
            kv_cache_tokens=kv_cache_tokens,
            memory_utilization=memory_utilization,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            tensor_parallel_size=tensor_parallel_size,
            tp_timeout_s=tp_timeout_s,
            attention_nodes=attention_nodes,
            kv_chunk_size=kv_chunk_size,
            attention_device=attention_device,
            attention_transport=attention_transport,
            arm=arm,
            arm_calibration=arm_calibration,
            quantization=quantization,
            quantize_all_linears=quantize_all_linears,
            load_format=load_format,
            attention_backend=attention_backend,
            enforce_eager=enforce_eager,
        )
        self.args = args
        if args.world_size > 1:
            tp, self.workers = start_driver(args)
            self._tp_owned = True
            # An engine dropped without shutdown() must not leave its workers running.
            self._finalizer = weakref.finalize(self, _stop_tensor_parallel, self.workers)
            torch.set_num_threads(threads_per_rank(args.world_size))
            if self.device.type == "cuda":
                self.device = device_for_rank("cuda")
        try:
            self.runner = ModelRunner(
                path,
                self.config,
                self.dtype,
                self.device,
                max_model_len,
                tp,
                args.transforms,
                load_format,
                args.attention_backend,
            )
            num_blocks, self.rank_weight_bytes = self._guarded(
                setup_compute_rank, tp, self.runner, args
            )
        except BaseException:
            self.shutdown(graceful=False)
            raise
        if attention_nodes:
            if enable_prefix_caching:
                logger.info("prefix caching is off with attention nodes (not built for them)")
            self.blocks = NodeBlockBudget(
                num_blocks, block_size, RShard(attention_nodes, kv_chunk_size)
            )
        else:
            self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens, max_num_seqs)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._prefill_tokens = 0
        self._decode_tokens = 0
        self._aborted_outputs: list[RequestOutput] = []

    # -- tensor parallelism: lifecycle and failures --
    @property
    def tp(self) -> TPContext:
        return self.runner.tp

    def _guarded(self, fn, *args):
        """Run something that talks to the workers. A failed collective becomes a
        WorkerFailure naming the rank, with every rank stopped. Anything else that interrupts
        a step half-way (bad input found late, Ctrl-C) also stops the workers, since they
        would otherwise be left inside that step's collectives: the engine is then failed."""
        if self._closed:
            raise WorkerFailure("the engine was shut down")
        tp = self.runner.tp if hasattr(self, "runner") else None
        if self.workers is None and (tp is None or not tp.has_peers):
            return fn(*args)
        if self.workers is not None:
            self.workers.check_alive()
        try:
            return fn(*args)
        except WorkerFailure:
            raise
        except (ShardlmError, ValueError, KeyboardInterrupt) as e:
            self._abandon(f"interrupted by {type(e).__name__}")
            raise
        except Exception as e:  # a collective failed or timed out
            if self.workers is None:  # torchrun: it stops the other ranks itself
                raise WorkerFailure(
                    f"a tensor-parallel collective failed: {str(e).splitlines()[0]}; "
                    "torchrun stops the other ranks"
                ) from e
            self.workers.diagnose(e)
            raise  # diagnose always raises; this keeps the flow explicit
        except BaseException:
            self._abandon("interrupted")
            raise

    def _abandon(self, why: str) -> None:
        """Stop every worker and mark the engine failed (without raising)."""
        if self.workers is not None and self.workers.failed is None:
            self.workers.failed = WorkerFailure(
                f"the engine was {why} during a tensor-parallel step; all ranks were stopped"
            )
            self.workers.kill()

    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        """Float32 logits at every prompt position (scoring; tests compare with HF)."""
        _, ids = self.encode_prompt(prompt)  # validated before any rank sees them
        return self._guarded(self.runner.prompt_logits, ids)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers (if any) and release the process groups. Idempotent."""
        if self._closed:
            return
        self._closed = True
        runner = getattr(self, "runner", None)
        failed = self.workers is not None and self.workers.failed is not None
        if graceful and not failed and runner is not None and runner.tp.has_peers:
            try:
                protocol.send(runner.tp, protocol.Command.SHUTDOWN, [], None)
            except Exception:
                logger.warning("could not tell the workers to shut down; stopping them")
                graceful = False
        if self.workers is not None:
            if graceful:
                self.workers.join(timeout=10)
            else:
                self.workers.kill()
        if self._tp_owned:
            self._finalizer.detach()
            if dist.is_initialized():
                dist.destroy_process_group()
        torch.set_num_threads(self._threads)

    # -- requests --
    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None
    ) -> None:
        """Queue a request. Raises ValueError (and queues nothing) if it can never run."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.stop and self.tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer (skip_tokenizer_init=True was set); "
                "use stop_token_ids instead"
            )
        text, ids = self.encode_prompt(prompt)
        pool_tokens = self.blocks.capacity_tokens
        if len(ids) + 1 > pool_tokens:
            where = (
                f" (β = {self.args.attention_nodes} attention nodes of "
                f"{self.blocks.num_blocks * self.blocks.block_size} tokens each)"
                if self.args.attention_nodes
                else ""
            )
            raise ValueError(
                f"prompt has {len(ids)} tokens but the KV cache holds only {pool_tokens}"
                f"{where}; raise kv_cache_tokens or memory_utilization"
            )
        request = Request(request_id, text, ids, params, next(self._arrivals))
        for i in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request=request,
                index=i,
                token_ids=list(ids),
                num_prompt_tokens=len(ids),
                generator=self._generator_for(params.seed, i),
                detokenizer=(
                    IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                    if self.tokenizer is not None
                    else None
                ),
            )
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. Its final output (finish_reason "abort")
        comes from the next ``step``. False if no such unfinished request."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                finish_sequence(seq, "abort")
        self._aborted_outputs.append(self._output(request, request.seqs))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted_outputs)

    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Validate a prompt and return (text or None, token ids).

        A dict may carry both: ``prompt_token_ids`` are used and ``prompt`` is kept as the
        text reported back (so an already tokenized prompt is not tokenized again)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise ValueError(
                        f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}"
                    )
                _, ids = self.encode_prompt(ids)
                return (text if isinstance(text, str) else None), ids
            if "prompt" not in prompt:
                raise ValueError("a dict prompt needs a 'prompt' or 'prompt_token_ids' key")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True was set)")
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
            vocab = self.config.vocab_size
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(
                        f"prompt token id {t!r} is outside the vocabulary [0, {vocab})"
                    )
        else:
            raise ValueError(
                "a prompt must be a string, a list of token ids or a dict, "
                f"got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError("prompt is empty (it must have at least one token)")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                "which must leave room for at least one generated token"
            )
        return text, ids

    # -- the step --
    def step(self) -> list[RequestOutput]:
        """Advance every scheduled sequence by one step; return what changed (as deltas)."""
        outputs, self._aborted_outputs = self._aborted_outputs, []
        batch = self.scheduler.schedule()
        # Before the step runs, nodes must drop what the scheduler freed since the last step
        # (finishes, aborts) and in this schedule (preemptions): the step may reuse the blocks.
        self._release_finished()
        touched: dict[str, list[Sequence]] = {}
        for seq in batch.finished:  # could never fit: finished by the scheduler
            touched.setdefault(seq.request.request_id, []).append(seq)
        if batch:
            self._prefill_tokens += sum(n for _, n in batch.prefills)
            self._decode_tokens += len(batch.decodes)
            seqs, tokens, logprobs = self._guarded(self._execute_and_sample, batch)
            for seq, n in [(s, 1) for s in batch.decodes] + batch.prefills:
                seq.num_computed_tokens += n
                self._register_full_blocks(seq)
            if seqs:
                for seq, token, lps in zip(seqs, tokens, logprobs, strict=True):
                    append_token(
                        seq, token, lps, self.eos_token_ids, self.max_model_len, self.tokenizer
                    )
                    touched.setdefault(seq.request.request_id, []).append(seq)
        for request_id, seqs in touched.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            for seq in seqs:
                if seq.is_finished:
                    self.scheduler.remove(seq)
            outputs.append(self._output(request, seqs))
            if request.is_finished:
                del self.requests[request_id]
        return outputs

    def _release_finished(self) -> None:
        """Tell the attention nodes (every rank's, via the control broadcast) which sequences
        the scheduler freed: finished, aborted or preempted. Sent just before the next step
        runs (or a stats query), so a step's finishes and the next schedule's preemptions
        travel in one message. Without nodes, nothing to do."""
        released = self.scheduler.drain_released()
        if released and self.args.attention_nodes:
            self._guarded(self._send_release, released)

    def _send_release(self, seq_ids: list[int]) -> None:
        if self.tp.has_peers:
            ids = torch.tensor(seq_ids, dtype=torch.long)
            protocol.send(self.tp, protocol.Command.RELEASE, [], ids)
        self.runner.release(seq_ids)

    def _execute_and_sample(self, batch) -> tuple[list[Sequence], list[int], list]:
        """Forward + sampling. Reading the sampled ids is the step's one host sync; it stays
        inside the guarded call because on CUDA a failed collective surfaces only there."""
        seqs, logits = self.runner.execute(batch)
        if not seqs:
            return [], [], []
        # Token lists only for rows with penalties (the sampler reads them for no other):
        # slicing every sequence's context each step would cost O(context) per token.
        rows = [
            SamplingRow(s.params, s.generator, s.token_ids[: s.num_prompt_tokens], s.output_ids)
            if s.params.has_penalties
            else SamplingRow(s.params, s.generator, (), ())
            for s in seqs
        ]
        result = sample(logits, rows)
        return seqs, result.token_ids.tolist(), result.logprobs

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks this step filled to the prefix cache."""
        if not self.blocks.enable_prefix_caching:
            return
        bs = self.blocks.block_size
        for j in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(
                self.blocks.register_full_block(
                    seq.block_table[j], parent, seq.token_ids[j * bs : (j + 1) * bs]
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
        attention = getattr(self.runner, "attention", None)
        return attention.traffic if isinstance(attention, ShardedAttention) else None

    def attention_node_stats(self) -> list[NodeStats]:
        """What each attention node holds, as reported by the nodes (wherever they run)."""
        if not self.args.attention_nodes:
            return []
        self._release_finished()  # an abort since the last step: its KV goes first
        table = self._guarded(self._collect_node_stats)
        beta = self.args.attention_nodes
        return [
            NodeStats(i // beta, i % beta, *(int(x) for x in row))
            for i, row in enumerate(table.tolist())
        ]

    def _collect_node_stats(self) -> torch.Tensor:
        if self.tp.has_peers:
            protocol.send(self.tp, protocol.Command.NODE_STATS, [], None)
        return report_node_stats(self.tp, self.args, runner_nodes(self.runner))

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
        )


def check_attention_backend(
    backend: str, device: str, block_size: int, attention_nodes: int
) -> None:
    """The Triton kernels need triton, a CUDA device (or, for tests on CPU, Triton's
    interpreter: TRITON_INTERPRET=1), a power-of-two block size, and the local paged pool.
    "auto" picks them only where all of that holds (kernels.resolve_attention_backend)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}"
        )
    if backend != "triton":
        return
    if not triton_available():
        raise ValueError("attention_backend='triton' needs triton installed (pip install triton)")
    if block_size & (block_size - 1):
        raise ValueError(
            f"attention_backend='triton' needs a power-of-two block_size, got {block_size}"
        )
    if attention_nodes:
        raise ValueError(
            "attention_backend='triton' is for the local paged pool; attention nodes compute "
            "with the reference primitive (use attention_backend='torch' with them)"
        )
    on_cpu = resolve_device(device).type == "cpu"
    if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attention_backend='triton' runs on CUDA devices; on CPU only in Triton's "
            "interpreter (TRITON_INTERPRET=1, for tests)"
        )


def _check_int(name: str, value: object, lo: int, hi: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(
            f"{name} must be an integer in [{lo}, {hi}]{' ' + note if note else ''}, got {value!r}"
        )


def _stop_tensor_parallel(workers: WorkerGroup | None) -> None:
    """Last resort for an engine garbage-collected (or a process exiting) without shutdown."""
    if workers is not None:
        workers.kill()
    if dist.is_initialized():
        dist.destroy_process_group()


def start_driver(args: WorkerArgs) -> tuple[TPContext, WorkerGroup | None]:
    """Become rank 0: join a torchrun job, or spawn the workers ourselves."""
    if dist.is_initialized():
        raise ValueError(
            "a tensor-parallel engine (or another torch.distributed job) is already running in "
            "this process; shut it down first (one tensor-parallel engine per process)"
        )
    if under_torchrun():
        rank, world = torchrun_rank()
        if world != args.world_size or rank != 0:
            raise ValueError(
                f"under torchrun, WORLD_SIZE ({world}) must equal tensor_parallel_size "
                f"({args.tp_size}) plus its attention-node ranks ({args.world_size - args.tp_size}"
                f"), and only RANK 0 builds the engine (this is {rank})"
            )
        return init_groups(0, args, None), None
    return spawn_workers(args)

"""Continuous batching: which sequences run this step, and how many tokens of each.

Every step has a token budget (``max_num_batched_tokens``). It is spent in this order:

1. one token for every running sequence that is decoding, so streams never stall;
2. the next chunk of every running sequence still in prefill (chunked prefill: a long prompt
   is computed over several steps and never blocks the decodes);
3. new sequences from the waiting queue (FIFO), each starting with its longest cached prefix
   and as much of the rest of its prompt as the budget allows. Samples 2..n of a request
   wait until sample 1 has computed the prompt, then share its blocks through the cache.
   A sequence whose structured-output grammar is still compiling waits; later ones pass it.
4. speculative decoding's draft slots for decodes (``lookahead``), out of the budget and the
   free blocks left by all of the above: drafts never delay or preempt other work.

When the pool has no block for a running sequence's next tokens, the most recently admitted
running sequence is preempted: its blocks are freed and it goes back to the front of the
waiting queue, keeping the tokens it generated; when readmitted they are recomputed (often
from the prefix cache). No step admits new work after it had to preempt.

With α compute nodes (figure 2), a sequence is placed on one of them at its first admission
— the one whose running sequences hold the fewest tokens — and keeps it: that node runs its
decodes. (Prefill tokens are dealt to all compute nodes by position: engine/batching.py.)
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shardlm.cache.block_manager import BlockManager
from shardlm.engine.sequence import Sequence, SequenceStatus, finish_sequence


@dataclass
class ScheduledBatch:
    """Sequences to run this step with the number of new tokens each computes. Decodes
    (one token each) come first, then prefill chunks."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    # Speculative decoding: slots a decode reserved for drafts (token budget and KV blocks),
    # by sequence. The engine proposes up to that many drafts (Sequence.draft_ids).
    lookahead: dict[Sequence, int] = field(default_factory=dict)
    # Sequences finished by the scheduler itself (no room ever), to be reported.
    finished: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(self.lookahead.values()) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


@dataclass
class SchedulerStats:
    preemptions: int = 0


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        compute_nodes: int = 1,
        lookahead: Callable[[Sequence, int], int] | None = None,
    ):
        """``lookahead(seq, queued)``: draft slots a decoding sequence asks for this step,
        given how many sequences are running or waiting (speculative decoding; None:
        never)."""
        self.blocks = blocks
        self.lookahead = lookahead
        self.compute_nodes = compute_nodes
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.stats = SchedulerStats()
        self._admissions = itertools.count()
        # Sequences whose blocks were freed since the last drain (attention nodes are told).
        self.released: list[int] = []

    # -- queue management --
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort)."""
        if seq.status is SequenceStatus.RUNNING or seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step --
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False

        # 1 + 2: running sequences, decodes first, then continuing prefills.
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        queued = len(self.running) + len(self.waiting)
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget, scoring_cap(seq))
            before = self.stats.preemptions
            fits = self._make_room(seq, seq.num_computed_tokens + n, batch)
            preempted |= self.stats.preemptions != before
            if not fits:
                continue
            if seq.num_tokens - seq.num_computed_tokens == 1:
                batch.decodes.append(seq)  # its last known token: a decode, sampled
            else:
                batch.prefills.append((seq, n))
            # Recomputed, not decremented: a preemption may have removed scheduled work.
            budget = self.max_num_batched_tokens - batch.num_tokens

        # 3: admit waiting sequences, in arrival order.
        for seq in list(self.waiting):
            if budget == 0 or preempted or len(self.running) >= self.max_num_seqs:
                break
            if self._wait_for_sibling(seq) or not seq.grammar_ready:
                continue  # sample 1 goes first, or its grammar is still compiling
            # Reuse cached full blocks, but always leave at least one token to compute: its
            # logits are needed to sample the next token.
            if needs_prompt_scoring(seq):  # a cached prefix has no logits to score it with
                cached, hashes = [], []
            else:
                cached, hashes = self.blocks.acquire_prefix(seq.token_ids, seq.num_tokens - 1)
            computed = self.blocks.prefix_tokens(len(cached))
            n = min(seq.num_tokens - computed, budget, scoring_cap(seq))
            need = self.blocks.blocks_needed(computed + n) - len(cached)
            if need > self.blocks.num_free_blocks:
                self.blocks.free(cached)
                break
            self.waiting.remove(seq)
            queried = self.blocks.cacheable_tokens(seq.num_tokens - 1)
            self.blocks.record_prefix_lookup(queried, computed)
            seq.block_table = cached + self.blocks.allocate(need)
            seq.block_hashes = hashes
            seq.num_computed_tokens = computed
            seq.status = SequenceStatus.RUNNING
            seq.admitted_at = next(self._admissions)
            if seq.compute_node is None:
                seq.compute_node = self._least_loaded_compute_node()
            self.running.append(seq)
            batch.prefills.append((seq, n))
            budget -= n

        # 4: draft slots (speculative decoding), last: out of the budget and the free blocks
        # every decode, prefill and admission left, so drafts never delay or preempt anyone.
        if self.lookahead is not None:
            for seq in batch.decodes:
                if budget <= 0:
                    break
                extra = self._draft_room(seq, min(self.lookahead(seq, queued), budget))
                if extra:
                    batch.lookahead[seq] = extra
                    budget -= extra
        return batch

    # -- helpers --
    def _least_loaded_compute_node(self) -> int:
        """The compute node whose running sequences hold the fewest tokens (lowest index on a
        tie)."""
        if self.compute_nodes == 1:
            return 0
        load = [0] * self.compute_nodes
        for s in self.running:
            load[s.compute_node or 0] += s.num_tokens
        return min(range(self.compute_nodes), key=lambda a: (load[a], a))

    def _wait_for_sibling(self, seq: Sequence) -> bool:
        """Samples 2..n of a request wait until sample 1 has computed the prompt, so they take
        its full prompt blocks from the prefix cache instead of computing them again."""
        first = seq.request.seqs[0]
        if seq.index and needs_prompt_scoring(first) and not first.is_finished:
            return True  # sample 1 scores the prompt first (its logprobs lead every output)
        if seq.index == 0 or not self.blocks.enable_prefix_caching:
            return False
        return first.status is SequenceStatus.RUNNING and (
            first.num_computed_tokens < first.num_prompt_tokens
        )

    def _draft_room(self, seq: Sequence, extra: int) -> int:
        """Blocks for up to ``extra`` draft slots after ``seq``'s next token, from free blocks
        only (drafts never preempt anyone); how many slots it got."""
        end = seq.num_computed_tokens + 1
        while extra:
            need = self.blocks.blocks_needed(end + extra) - len(seq.block_table)
            if need <= self.blocks.num_free_blocks:
                if need > 0:
                    seq.block_table += self.blocks.allocate(need)
                return extra
            extra -= 1
        return 0

    def trim_blocks(self, seq: Sequence) -> None:
        """Give back blocks past what ``seq``'s tokens need (the rejected drafts' slots), so
        block accounting stays exact. Those blocks were never registered with the prefix
        cache: only blocks of verified, computed tokens are."""
        keep = self.blocks.blocks_needed(seq.num_tokens)
        if len(seq.block_table) > keep:
            self.blocks.free(seq.block_table[keep:])
            del seq.block_table[keep:]

    def _make_room(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Ensure ``seq`` has blocks for ``num_tokens`` tokens, preempting the most recently
        admitted sequences if needed. False if ``seq`` itself had to give way."""
        need = self.blocks.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True  # most decode steps: the last block still has room
        while need > self.blocks.num_free_blocks:
            if self.running == [seq]:
                # Alone and still no room: the pool is smaller than this sequence. Stop it
                # rather than loop; its output so far is kept.
                self.running.remove(seq)
                self._release(seq)
                finish_sequence(seq, "length")
                batch.finished.append(seq)
                return False
            victim = max(self.running, key=lambda s: s.admitted_at)
            self._preempt(victim, batch)
            if victim is seq:
                return False
        seq.block_table += self.blocks.allocate(need)
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        # It may already be in this step's batch (scheduled before the sequence that needed
        # room): take it out again, its blocks are going away.
        if seq in batch.decodes:
            batch.decodes.remove(seq)
            batch.lookahead.pop(seq, None)
        batch.prefills = [(s, n) for s, n in batch.prefills if s is not seq]
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def drain_released(self) -> list[int]:
        out, self.released = self.released, []
        return out

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.released.append(seq.seq_id)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0


# Prompt tokens a prompt-logprobs request prefills per step: each scored row needs a [V] row
# of float32 logits (and its log-softmax), which a 2048-token chunk at a 150k vocabulary
# would make gigabytes the KV sizing never counted.
SCORING_CHUNK = 256


def scoring_cap(seq: Sequence) -> int:
    """How many tokens ``seq`` may prefill this step (SCORING_CHUNK while it scores)."""
    return SCORING_CHUNK if needs_prompt_scoring(seq) else seq.num_tokens


def needs_prompt_scoring(seq: Sequence) -> bool:
    """The sequence still has prompt tokens to score (SamplingParams.prompt_logprobs)."""
    return seq.prompt_logprobs is not None and None in seq.prompt_logprobs[1:]

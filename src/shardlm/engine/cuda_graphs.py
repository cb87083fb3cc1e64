"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step at small batch launches a few hundred short kernels; launched one by one from
Python, the launches cost more than the kernels (a 1B model's step reads ~2.5 GB, ~0.8 ms on
an H100, while ~200 launches take about as long). A CUDA graph records a step's kernels once
and replays them with one launch.

Replaying requires every tensor the step reads to sit at a fixed address and every shape to
be fixed, and nothing in the step may read back to the host. So what varies between steps
is made data, not shape:

* the batch is padded up to its bucket. Padding rows have context length 0 — the decode
  kernel gives them out 0 and reads nothing — write their K/V to the pool's padding slot
  (PagedKVCache.padding_slot, never read), and their logits are dropped;
* the block tables are as wide as ``max_model_len`` needs. Each row is filled up to its own
  blocks; entries past them are stale and the kernel never reads them (it stops at
  ⌈len / block_size⌉);
* decode attention divides each sequence's own blocks among a number of splits fixed per
  bucket (kernels/decode_attention.py), so longer contexts change no shape.

Per step the host fills one pinned staging buffer (ids, positions, lengths, write slots) and
the new table columns, two host→device copies go out, and the graph replays. With
``capture=False`` the same buffers and padding run eagerly: that path is what the CPU tests
check against the plain engine (graphs themselves need a GPU).
"""

from __future__ import annotations

import logging
import time

import torch

from shardlm.attention.paged import PagedAttention, PagedStep
from shardlm.engine.step_inputs import StepInputs

logger = logging.getLogger(__name__)

# Batch sizes with a graph: larger decode batches are padded up to the next one; beyond the
# last, steps run eagerly (at such batches the launches are a small part of a step).
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)

IDS, POSITIONS, LENGTHS, SLOTS = range(4)  # rows of the staging buffer


def graph_buckets(max_batch: int) -> list[int]:
    """The buckets up to ``max_batch`` (which gets one of its own if it falls between)."""
    top = min(max_batch, BUCKETS[-1])
    return [b for b in BUCKETS if b < top] + [top]


class DecodeGraphs:
    """Static buffers and (on CUDA) captured graphs for pure-decode steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        attention: PagedAttention,
        max_batch: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.attention = attention
        self.device = device
        self.block_size = attention.cache.block_size
        self.buckets = graph_buckets(max_batch)
        self.padding_slot = attention.cache.padding_slot
        top = self.buckets[-1]
        self.width = -(-max_model_len // self.block_size)
        pin = device.type == "cuda"
        self.host_meta = torch.zeros(4, top, dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.zeros(top, self.width, dtype=torch.long, pin_memory=pin)
        # A padding row: token 0 at position 0, context length 0, K/V to the padding slot.
        self.padding = torch.zeros(4, top, dtype=torch.long)
        self.padding[SLOTS] = self.padding_slot
        self.host_meta.copy_(self.padding)
        self._staged_rows = 0  # rows [0, this) of host_meta hold a real step's values
        self.meta = torch.zeros(4, top, dtype=torch.long, device=device)
        self.tables = torch.zeros(top, self.width, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def can_run(self, inputs: StepInputs) -> bool:
        """A step made only of decodes, within the largest bucket."""
        return (
            not inputs.prefill_tables
            and 0 < inputs.num_decodes <= self.buckets[-1]
            and inputs.decode_tables.shape[1] <= self.width
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first, all in one memory pool (one step
        runs at a time, so they can share it)."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        pool = None
        self.host_meta.copy_(self.padding)
        self._staged_rows = 0
        self.meta.copy_(self.host_meta)
        for n in reversed(self.buckets):
            # Warm-up outside the capture: compiles the Triton kernels for this shape and lets
            # cuBLAS set up its workspaces, neither of which may happen during a capture.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(n)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[n] = self._forward(n)
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "captured %d decode graphs (batch %s) in %.2fs",
            len(self.graphs),
            ",".join(map(str, self.buckets)),
            self.capture_seconds,
        )

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [B, vocab] (float32) of a decode step that ``can_run``; a view of the graph's
        output, valid until the next step."""
        n = inputs.num_decodes
        bucket = next(b for b in self.buckets if b >= n)
        width = inputs.decode_tables.shape[1]
        tables, lens = inputs.decode_tables, inputs.decode_lens
        last = lens - 1
        slots = tables.gather(1, (last // self.block_size)[:, None]).squeeze(1)
        slots = slots * self.block_size + last % self.block_size
        self.host_meta[:, :n] = torch.stack((inputs.input_ids, inputs.positions, lens, slots))
        if self._staged_rows > n:  # rows a larger batch used become padding again
            self._stage_padding(n, self._staged_rows)
        self._staged_rows = n
        self.host_tables[:n, :width] = tables
        # Pinned sources: asynchronous copies, ordered before the replay on the same stream.
        # The host buffers are next written after this step's sampled ids are read back.
        self.meta[:, :bucket].copy_(self.host_meta[:, :bucket], non_blocking=True)
        self.tables[:n, :width].copy_(self.host_tables[:n, :width], non_blocking=True)
        graph = self.graphs.get(bucket)
        if graph is None:  # not captured (CPU, tests): the same buffers, run eagerly
            return self._forward(bucket)[:n]
        graph.replay()
        return self.outputs[bucket][:n]

    def _stage_padding(self, start: int, end: int) -> None:
        """Rows [start, end) of the staging buffer become padding rows."""
        self.host_meta[:, start:end] = self.padding[:, start:end]

    def _forward(self, n: int) -> torch.Tensor:
        meta = self.meta[:, :n]
        self.attention.begin_step(
            PagedStep(
                slot_mapping=meta[SLOTS],
                num_decodes=n,
                decode_slots=None,
                decode_context_lens=meta[LENGTHS],
                prefills=[],
                decode_block_tables=self.tables[:n],
            )
        )
        hidden = self.model(meta[IDS], meta[POSITIONS], self.attention)
        return self.model.compute_logits(hidden)

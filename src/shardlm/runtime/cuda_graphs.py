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
one with the batch's block tables; two host→device copies and one device copy of the tables
into place go out, and the graph replays. All buckets write their logits into one buffer. With
``capture=False`` the same buffers and padding run eagerly: that path is what the CPU tests
check against the plain engine (graphs themselves need a GPU).
"""

from __future__ import annotations

import logging
import time

import torch

from shardlm.attention.paged import PagedAttention, decode_write_slots
from shardlm.step_inputs import StepInputs

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
        long = dict(dtype=torch.long)
        # Host staging, pinned on CUDA so the copies are asynchronous. Both are copied whole or
        # as a leading slice of a flat buffer: contiguous on both sides (a strided copy would go
        # through a pageable temporary).
        self.host_meta = torch.zeros(4, top, **long, pin_memory=pin)
        self.host_tables = torch.zeros(top * self.width, **long, pin_memory=pin)
        # A padding row: token 0 at position 0, context length 0, K/V to the padding slot.
        self.padding = torch.zeros(4, top, **long)
        self.padding[SLOTS] = self.padding_slot
        self.host_meta.copy_(self.padding)
        self._staged_rows = 0  # rows [0, this) of host_meta hold a real step's values
        self.meta = torch.zeros(4, top, **long, device=device)
        self.tables = torch.zeros(top, self.width, **long, device=device)
        self.tables_in = torch.zeros(top * self.width, **long, device=device)  # flat landing
        # One logits buffer for every bucket (each graph writes its rows): not one per graph.
        self.logits = torch.zeros(top, model.config.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
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
            # Warm-up outside the capture: compiles this bucket's Triton kernel variants and
            # creates cuBLAS's handle, neither of which may happen during a capture.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(n)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(n)
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
        """Logits [B, vocab] (float32) of a decode step that ``can_run``: a view of the static
        logits buffer, valid until the next step. (Module hooks do not fire in a replay.)"""
        n = inputs.num_decodes
        bucket = next(b for b in self.buckets if b >= n)
        width = inputs.decode_tables.shape[1]
        tables, lens = inputs.decode_tables, inputs.decode_lens
        slots = decode_write_slots(tables, lens, self.block_size)
        self.host_meta[:, :n] = torch.stack((inputs.input_ids, inputs.positions, lens, slots))
        if self._staged_rows > n:  # rows a larger batch used become padding again
            self.host_meta[:, n : self._staged_rows] = self.padding[:, n : self._staged_rows]
        self._staged_rows = n
        flat = n * width
        self.host_tables[:flat].view(n, width).copy_(tables)
        # Pinned, contiguous sources: asynchronous copies, ordered before the replay on the
        # same stream. The host buffers are next written after this step's sampled ids are
        # read back, which waits for the copies.
        self.meta.copy_(self.host_meta, non_blocking=True)
        self.tables_in[:flat].copy_(self.host_tables[:flat], non_blocking=True)
        # Entries past each row's width are stale: the kernel never reads past a sequence's
        # own blocks.
        self.tables[:n, :width].copy_(self.tables_in[:flat].view(n, width))
        graph = self.graphs.get(bucket)
        if graph is None:  # not captured (CPU, tests): the same buffers, run eagerly
            self._forward(bucket)
        else:
            graph.replay()
        return self.logits[:n]

    def _forward(self, n: int) -> None:
        meta = self.meta[:, :n]
        self.attention.begin_step(
            StepInputs.static_decodes(
                meta[IDS], meta[POSITIONS], meta[LENGTHS], meta[SLOTS], self.tables[:n]
            )
        )
        hidden = self.model(meta[IDS], meta[POSITIONS], self.attention)
        self.model.compute_logits(hidden, out=self.logits[:n])

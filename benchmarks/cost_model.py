"""An analytic cost model of one decode step: compute nodes + attention nodes (figure 2)
against co-located tensor parallelism (figure 1), calibrated and checked on this machine,
then projected to H100 / H200 figures.

Why a model: the CPU development machine cannot show whether figure 2 pays on accelerators
(its processes share two cores and a gloo round trip costs ~1 ms). A model whose terms are
measured here, and whose predictions are compared with shardlm's real step times here, is
the honest way to say what the design should do on hardware we have not run.

Three parts, each printing markdown tables:

    python benchmarks/cost_model.py calibrate   # gloo p2p, GEMM FLOP/s, bandwidths here
    python benchmarks/cost_model.py validate    # model vs measured shardlm decode steps
    python benchmarks/cost_model.py project     # Llama-3-8B / 70B on H100 / H200 figures
    python benchmarks/cost_model.py all         # the three; validate uses this calibration

``validate`` calibrates first (in the same run) and takes its figures from there; it fits
two host constants (per step, per pipeline task), each on one named cell, and predicts the
rest. The defaults take about 3.5 minutes on the 2-core development machine (calibrate ~15 s,
validate ~2.5 min, project ~30 s); ``--contexts``, ``--decode-steps``, ``--repeats``,
``--betas`` and ``--microbatches`` make validate smaller. Flags: ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from common import make_checkpoint

# ------------------------------------------------------------------------------------------
# The deployment's shapes and the hardware's figures
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A Llama-family model as far as decode cost goes."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int
    tied_embeddings: bool = False

    def heads_per_rank(self, t: int) -> int:
        """Query heads of one tensor-parallel rank (head group)."""
        return self.heads // t

    def kv_heads_per_rank(self, t: int) -> int:
        """KV heads of one rank: ceil(Hkv / t); replicated when t > Hkv (figure 1)."""
        return -(-self.kv_heads // t)

    def pre_params(self, t: int) -> int:
        """Parameters of one rank's QKV projection (the dense work before attention)."""
        heads = self.heads_per_rank(t) + 2 * self.kv_heads_per_rank(t)
        return self.hidden * heads * self.head_dim

    def post_params(self, t: int) -> int:
        """Parameters of one rank's O projection and MLP (gate, up, down): after attention."""
        o = self.heads_per_rank(t) * self.head_dim * self.hidden
        return o + 3 * self.hidden * self.intermediate // t

    def weight_bytes(self, t: int) -> int:
        """Bytes of weights one rank holds (norms left out: a few KiB)."""
        per_layer = self.pre_params(t) + self.post_params(t)
        embeddings = (1 if self.tied_embeddings else 2) * self.vocab * self.hidden // t
        return (self.layers * per_layer + embeddings) * self.dtype_bytes

    def kv_bytes_per_token(self, t: int) -> int:
        """KV bytes one token adds on one head group (all layers): 2 (K, V) · L · Hkv/t · D · e."""
        return 2 * self.layers * self.kv_heads_per_rank(t) * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class Hardware:
    """One device's figures. ``weight_bw`` streams weights, ``kv_bw`` streams KV in the
    attention kernel (on an accelerator both are the memory bandwidth, assuming kernels at
    the roofline; on this CPU they are what the code reaches, measured by ``calibrate``).
    ``kv_curve``, when given, replaces ``kv_bw`` by a rate that depends on the KV bytes one
    attention call reads — (bytes, bytes/s) points, interpolated in log(bytes): on a CPU a
    call whose KV fits the caches runs several times faster than one that streams from DRAM.
    ``link_*``: one compute ↔ attention message; ``tp_*``: the tensor-parallel AllReduce
    inside a compute node (or a co-located TP group)."""

    name: str
    flops: float  # dense FLOP/s of the model dtype
    weight_bw: float  # bytes/s
    kv_bw: float  # bytes/s
    memory: float  # bytes
    link_bw: float  # bytes/s, one direction, per device
    link_latency: float  # s per message
    tp_bw: float  # bytes/s, one direction, per device
    tp_latency: float  # s per AllReduce
    step_overhead: float = 0.0  # s per step on the host (scheduler, sampling, launches)
    task_overhead: float = 0.0  # s per pipeline task on the host (Python, kernel launches)
    memory_utilization: float = 0.9  # share of memory for weights + KV
    kv_curve: tuple[tuple[float, float], ...] = ()

    def kv_rate(self, nbytes: float) -> float:
        """Bytes/s of an attention call that reads ``nbytes`` of KV."""
        pts = self.kv_curve
        if not pts:
            return self.kv_bw
        if nbytes <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            if nbytes <= x1:
                w = math.log(nbytes / x0) / math.log(x1 / x0)
                return y0 + w * (y1 - y0)
        return pts[-1][1]


@dataclass(frozen=True)
class Nodes:
    """A figure-2 deployment: α compute nodes of t ranks each, β attention nodes per head
    group (t·β in all), m micro-batches per step."""

    alpha: int
    beta: int
    t: int
    m: int

    @property
    def devices(self) -> int:
        return self.t * (self.alpha + self.beta)


# ------------------------------------------------------------------------------------------
# Cost terms
# ------------------------------------------------------------------------------------------


def allreduce_time(hw: Hardware, nbytes: float, t: int) -> float:
    """Ring AllReduce of ``nbytes`` over t ranks: each rank sends and receives 2(t−1)/t of
    the data, plus one latency (NCCL's small-message cost, an assumption)."""
    if t == 1:
        return 0.0
    return hw.tp_latency + 2 * (t - 1) / t * nbytes / hw.tp_bw


def dense_times(shape: Shape, hw: Hardware, rows: int, t: int) -> tuple[float, float]:
    """(before, after) attention: one rank's dense work for ``rows`` rows of one layer.

    Each part takes max(FLOP time, weight-read time): a matrix product streams its weights
    once whatever the rows, and does 2 FLOPs per multiply-add per row. The part after
    attention carries figure 1's two AllReduces (after O and after the MLP down projection),
    each of rows · hidden · e bytes. Norms, RoPE, SiLU are left out (elementwise, a few
    hidden-sized vectors per row)."""
    e = shape.dtype_bytes

    def matmul(params: int) -> float:
        return max(2.0 * params * rows / hw.flops, params * e / hw.weight_bw)

    before = matmul(shape.pre_params(t))
    after = matmul(shape.post_params(t)) + 2 * allreduce_time(hw, rows * shape.hidden * e, t)
    return before, after


def lm_head_time(shape: Shape, hw: Hardware, rows: int, t: int) -> float:
    """The vocabulary-parallel LM head for the sampled rows (one rank's slice)."""
    params = shape.vocab * shape.hidden // t
    return max(2.0 * params * rows / hw.flops, params * shape.dtype_bytes / hw.weight_bw)


def attention_time(
    shape: Shape, hw: Hardware, rows: int, context: float, t: int, shards: int = 1
) -> float:
    """One layer's decode attention of ``rows`` sequences, ``context`` tokens each, on one
    device holding head group 1/t and token shard 1/shards of their KV.

    KV bytes read: rows · (context/shards) · 2 · Hkv/t · D · e, at ``kv_bw``; FLOPs: 4 per
    (query head, key, head dim) — q·k and p·v — which at decode is far below the roofline
    ridge (GQA reuses each key for Hq/Hkv query heads only), so the bytes decide."""
    keys = rows * context / shards
    kv = keys * 2 * shape.kv_heads_per_rank(t) * shape.head_dim * shape.dtype_bytes
    flops = 4.0 * keys * shape.heads_per_rank(t) * shape.head_dim
    return max(kv / hw.kv_rate(kv), flops / hw.flops)


def split_rows(rows: int, m: int) -> list[int]:
    """Rows of each of min(m, rows) micro-batches of whole sequences, balanced: micro-batch
    k ends at the first sequence where the running count reaches k·rows/n (one decode row
    per sequence, as StepInputs.micro_batches cuts a decode step)."""
    n = max(1, min(m, rows))
    sizes, start = [], 0
    for k in range(1, n):
        end = -(-k * rows // n)
        sizes.append(end - start)
        start = end
    sizes.append(rows - start)
    return sizes


@dataclass(frozen=True)
class Stage:
    """Durations (s) of one micro-batch's tasks in one layer of the figure-2 pipeline."""

    before: float  # compute: norm + QKV of its rows (+ RoPE, left out), + host time
    after: float  # compute: O + AllReduce, norm, MLP + AllReduce (previous layer), + host
    send: float  # the outbound link is busy this long with its messages (bytes / bandwidth)
    attend: float  # the node attends it (every compute node's rows of it), + host time
    back: float  # the return link is busy this long (out in the dtype, lse in float32)
    latency: float  # one-way message latency, on top of the busy time


def node_stages(shape: Shape, hw: Hardware, dep: Nodes, batch: int, context: float) -> list[Stage]:
    """The per-layer tasks of every micro-batch of one step.

    Rows: the batch's ``batch`` decodes deal out evenly over α compute nodes (the busiest
    gets ceil(batch/α)), each cut into m micro-batches. Micro-batch i of every compute node
    meets on the attention nodes together (a node waits for every compute node's post).

    Messages, per compute rank (head group g: Hq/t query heads, Hkv/t KV heads) and per
    micro-batch of b rows (docs/architecture.md, "Bytes per layer"):
        to each of the β nodes   b·Hq/t·D·e  (every query)  +  (b/β)·2·Hkv/t·D·e  (K/V it owns)
        from each node           b·Hq/t·(D·e + 4)           (out, and lse in float32)
    A compute rank's NIC sends β of these and an attention node's NIC receives α, so the
    link is busy max(α, β) · message / bandwidth each way; the latency adds to the path.
    """
    e, d = shape.dtype_bytes, shape.head_dim
    hq, hkv = shape.heads_per_rank(dep.t), shape.kv_heads_per_rank(dep.t)
    per_node = -(-batch // dep.alpha)
    fan = max(dep.alpha, dep.beta)
    stages = []
    for b in split_rows(per_node, dep.m):
        before, after = dense_times(shape, hw, b, dep.t)
        out_msg = b * hq * d * e + (b / dep.beta) * 2 * hkv * d * e
        back_msg = b * hq * (d * e + 4)
        rows_on_node = min(b * dep.alpha, batch)
        host = hw.task_overhead
        stages.append(
            Stage(
                before=before + host,
                after=after + host,
                send=fan * out_msg / hw.link_bw,
                attend=attention_time(shape, hw, rows_on_node, context, dep.t, dep.beta) + host,
                back=fan * back_msg / hw.link_bw,
                latency=hw.link_latency,
            )
        )
    return stages


# ------------------------------------------------------------------------------------------
# The pipeline: m micro-batches ping-pong between the compute side and the attention nodes
# ------------------------------------------------------------------------------------------
#
# Four resources work in parallel: the compute device (C), the outbound link (S), the
# attention node (A) and the return link (R); each serves one task at a time, in arrival
# order. Compute round l (l = 0..L) runs, for each micro-batch i in turn, the task
#
#     C(l, i) = after(l−1, i) + before(l, i)       (round 0: before only; round L: after only)
#
# exactly the order of runtime/micro_batches.py (collect i, finish layer l−1, post layer l).
# C(l, i) may start once the compute device is free and micro-batch i's answer of layer
# l−1 is back. Then (l < L):
#
#     S ends   = max(S free, C(l, i) ends) + send          its messages are on the wire
#     A ends   = max(A free, S ends + latency) + attend    the node has attended it
#     R ends   = max(R free, A ends) + back
#     back(i)  = R ends + latency                          C(l+1, i) may start
#
# With m = 1 this is the sum over layers of (before + after + send + attend + back +
# 2·latency): compute, two link crossings and the node, one after the other. With m ≥ 2 it
# is a max-plus recurrence; once it settles, every layer adds the same period
#
#     P = max( Σ_i (before_i + after_i),  Σ_i attend_i,  Σ_i send_i,  Σ_i back_i,
#              max_i (before_i + after_i + send_i + attend_i + back_i + 2·latency) )
#
# — the busiest resource, or one micro-batch's own round trip when there are too few
# micro-batches to cover it. Each term is the time around one cycle of the recurrence's
# graph (a resource serving its m tasks; a micro-batch's own loop) per layer it advances,
# and the period is the largest such cycle mean: P is exact when the micro-batches are
# equal and a lower bound when they are not (a randomised check against the stepped
# recurrence agreed to 1e-12 and never saw P exceed it). The step is L·P plus the fill
# (round 0: the nodes wait for micro-batch 0's first QKV) and the drain (round L: the
# micro-batches' last MLPs), which came out under one more period in every equal case of
# that check. Note what m costs: every micro-batch reads the layer's weights again, so a
# weight-bound compute side pays m·(weight-read time) per layer, while the node reads each
# sequence's KV once per step whatever m is.
#
# ``pipeline_time`` runs the recurrence itself rather than this approximation; it steps
# layer by layer and, once a layer shifts every clock by the same amount as the layer
# before (the recurrence has settled), adds that shift for the remaining identical layers
# (exact; a recurrence that does not settle is stepped through every layer).


def pipeline_time(stages: Sequence[Stage], layers: int) -> float:
    """Seconds from the step's first dense task to the end of its last one (module notes)."""
    m = len(stages)
    # state: [C free, S free, A free, R free, back(0..m-1)]
    state = [0.0] * (4 + m)

    def round_(state: list[float], first: bool, last: bool) -> list[float]:
        c, s, a, r = state[:4]
        back = state[4:]
        new_back = list(back)
        for i, st in enumerate(stages):
            c = max(c, back[i]) + (0.0 if first else st.after) + (0.0 if last else st.before)
            if not last:
                s = max(s, c) + st.send
                a = max(a, s + st.latency) + st.attend
                r = max(r, a) + st.back
                new_back[i] = r + st.latency
        return [c, s, a, r, *new_back]

    state = round_(state, first=True, last=False)
    done, previous_shift = 1, None
    while done < layers:
        new = round_(state, first=False, last=False)
        shift = [x - y for x, y in zip(new, state, strict=True)]
        state, done = new, done + 1
        if previous_shift is not None and _same(shift, previous_shift):
            left = layers - done
            state = [x + left * dx for x, dx in zip(state, shift, strict=True)]
            done = layers
        previous_shift = shift
    return round_(state, first=False, last=True)[0]


def _same(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= 1e-12 * max(1.0, abs(x)) for x, y in zip(a, b, strict=True))


def steady_period(stages: Sequence[Stage]) -> float:
    """The closed form P of the notes above (for the docs and a self-check)."""
    compute = sum(s.before + s.after for s in stages)
    trip = max(s.before + s.after + s.send + s.attend + s.back + 2 * s.latency for s in stages)
    return max(
        compute,
        sum(s.attend for s in stages),
        sum(s.send for s in stages),
        sum(s.back for s in stages),
        trip,
    )


def nodes_step_time(shape: Shape, hw: Hardware, dep: Nodes, batch: int, context: float) -> float:
    """One decode step of a figure-2 deployment: the pipeline over L layers, then compute
    node 0's LM head for all sampled rows (the other compute nodes send it their rows'
    hidden states: one message), and the host's per-step overhead."""
    stages = node_stages(shape, hw, dep, batch, context)
    gather = 0.0
    if dep.alpha > 1:
        gather = hw.link_latency + batch * shape.hidden * shape.dtype_bytes / hw.link_bw
    head = lm_head_time(shape, hw, batch, dep.t)
    return pipeline_time(stages, shape.layers) + gather + head + hw.step_overhead


def tp_step_time(shape: Shape, hw: Hardware, t: int, batch: int, context: float) -> float:
    """The co-located peer (figure 1): t ranks each hold 1/t of the heads and of the MLP and
    their heads' KV; per layer QKV, local attention, O + AllReduce, MLP + AllReduce, one
    after the other on the same device."""
    before, after = dense_times(shape, hw, batch, t)
    attend = attention_time(shape, hw, batch, context, t)
    layer = before + attend + after
    return shape.layers * layer + lm_head_time(shape, hw, batch, t) + hw.step_overhead


# ------------------------------------------------------------------------------------------
# Memory and the search for the best deployment
# ------------------------------------------------------------------------------------------


def tp_max_batch(shape: Shape, hw: Hardware, t: int, context: float) -> int:
    """Sequences that fit a co-located TP group: weights/t + batch·context·KV per token of a
    rank ≤ utilization · memory on every rank (activations left out)."""
    room = hw.memory_utilization * hw.memory - shape.weight_bytes(t)
    return max(0, int(room // (context * shape.kv_bytes_per_token(t))))


def nodes_max_batch(shape: Shape, hw: Hardware, dep: Nodes, context: float) -> int:
    """Sequences that fit: compute ranks hold the weights (t-way split) and no KV; the t·β
    attention nodes hold all the KV, each 1/β of every sequence's tokens of its head group
    (R-sharding, within one chunk)."""
    if shape.weight_bytes(dep.t) > hw.memory_utilization * hw.memory:
        return 0
    per_node = hw.memory_utilization * hw.memory
    return int(dep.beta * per_node // (context * shape.kv_bytes_per_token(dep.t)))


def largest_batch(step: Callable[[int], float], limit: int, slo: float) -> tuple[int, float]:
    """Largest batch ≤ limit whose step time meets the SLO (step time grows with the
    batch), and that step time; (0, inf) when even one sequence misses it."""
    if limit < 1 or step(1) > slo:
        return 0, math.inf
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if step(mid) <= slo:
            lo = mid
        else:
            hi = mid - 1
    return lo, step(lo)


@dataclass(frozen=True)
class Best:
    """The best deployment found: its description, batch, step time and throughput."""

    label: str
    devices: int
    batch: int
    step: float
    dep: Nodes | None = None

    @property
    def tokens_per_device(self) -> float:
        return self.batch / self.step / self.devices if self.batch else 0.0

    @property
    def users_per_device(self) -> float:
        return self.batch / self.devices


TP_SIZES = (1, 2, 4, 8)  # one NVLink domain (an 8-GPU HGX board)
ALPHAS = (1, 2, 3, 4, 6, 8)
BETAS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MICROBATCHES = (1, 2, 3, 4, 6, 8)


def best_tp(shape: Shape, hw: Hardware, context: float, slo: float) -> Best:
    """Co-located TP at the best t (replicas of it fill any number of devices, so tokens
    per device do not depend on how many replicas)."""
    best = Best("none fits", 1, 0, math.inf)
    for t in TP_SIZES:
        limit = tp_max_batch(shape, hw, t, context)
        batch, step = largest_batch(
            lambda b, t=t: tp_step_time(shape, hw, t, b, context), limit, slo
        )
        cand = Best(f"TP={t}", t, batch, step)
        if cand.tokens_per_device > best.tokens_per_device:
            best = cand
    return best


def best_nodes(shape: Shape, hw: Hardware, context: float, slo: float, max_devices: int) -> Best:
    """Figure 2 at the best (t, α, β, m) of small grids, ≤ max_devices devices."""
    best = Best("none fits", 1, 0, math.inf)
    for t in TP_SIZES:
        if shape.weight_bytes(t) > hw.memory_utilization * hw.memory:
            continue
        for alpha in ALPHAS:
            for beta in BETAS:
                if t * (alpha + beta) > max_devices:
                    continue
                for m in MICROBATCHES:
                    dep = Nodes(alpha, beta, t, m)
                    limit = nodes_max_batch(shape, hw, dep, context)
                    if limit < alpha * m:  # fewer rows than micro-batches: a smaller m wins
                        continue
                    batch, step = largest_batch(
                        lambda b, dep=dep: nodes_step_time(shape, hw, dep, b, context),
                        limit,
                        slo,
                    )
                    cand = Best(f"t={t} {alpha}:{beta} m={m}", dep.devices, batch, step, dep)
                    if cand.tokens_per_device > best.tokens_per_device:
                        best = cand
    return best


def latency_floor(
    shape: Shape, hw: Hardware, context: float, max_devices: int
) -> tuple[Best, Best]:
    """The shortest step one sequence can get: (co-located TP, nodes). TP stops at t = 8 (and
    at the KV heads: beyond them each rank would hold the same KV); nodes keep cutting the
    sequence's KV over more attention nodes, paying the link on every layer."""
    tp = Best("none fits", 1, 0, math.inf)
    for t in TP_SIZES:
        if tp_max_batch(shape, hw, t, context) >= 1:
            step = tp_step_time(shape, hw, t, 1, context)
            if step < tp.step:
                tp = Best(f"TP={t}", t, 1, step)
    nodes = Best("none fits", 1, 0, math.inf)
    for t in TP_SIZES:
        for beta in BETAS:
            dep = Nodes(1, beta, t, 1)
            if dep.devices <= max_devices and nodes_max_batch(shape, hw, dep, context) >= 1:
                step = nodes_step_time(shape, hw, dep, 1, context)
                if step < nodes.step:
                    nodes = Best(f"t={t} 1:{beta}", dep.devices, 1, step, dep)
    return tp, nodes


# ------------------------------------------------------------------------------------------
# 1. calibrate: the figures of this machine
# ------------------------------------------------------------------------------------------

P2P_SIZES = (64, 4096, 65536, 1 << 20, 8 << 20)  # bytes per message
GLOO_TIMEOUT = datetime.timedelta(seconds=30)


def _gloo_worker(rank: int, port: int, repeats: int, results: Any) -> None:
    """One of two processes: ping-pong messages of each size with isend/irecv, as
    RemoteLink exchanges them (rank 0 reports one-way times = round trip / 2), then time a
    small broadcast (the driver's per-step control message)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=GLOO_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=GLOO_TIMEOUT)
    try:
        one_way = {}
        for size in P2P_SIZES:
            x = torch.zeros(size // 4)
            n = max(3, repeats // (1 + size // 65536))
            samples = []
            for i in range(n + 2):
                start = time.perf_counter()
                if rank == 0:
                    dist.isend(x, dst=1).wait(GLOO_TIMEOUT)
                    dist.irecv(x, src=1).wait(GLOO_TIMEOUT)
                else:
                    dist.irecv(x, src=0).wait(GLOO_TIMEOUT)
                    dist.isend(x, dst=0).wait(GLOO_TIMEOUT)
                if i >= 2:  # two warm-up round trips
                    samples.append(time.perf_counter() - start)
            one_way[size] = statistics.median(samples) / 2
        flag = torch.zeros(16, dtype=torch.int64)
        samples = []
        for i in range(repeats + 2):
            dist.barrier()
            start = time.perf_counter()
            dist.broadcast(flag, src=0)
            if i >= 2:
                samples.append(time.perf_counter() - start)
        if rank == 0:
            results.put({"one_way": one_way, "broadcast": statistics.median(samples)})
    finally:
        dist.destroy_process_group()


def measure_gloo(repeats: int = 200, timeout_s: float = 120.0) -> dict:
    """Two spawned processes on loopback (TCP store on 127.0.0.1, a port the OS picks)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore(
        "127.0.0.1", 0, world_size=3, is_master=True, timeout=GLOO_TIMEOUT, wait_for_workers=False
    )
    results = mp.get_context("spawn").Queue()
    procs = mp.spawn(_gloo_worker, args=(store.port, repeats, results), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not procs.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gloo calibration did not finish in {timeout_s:.0f} s")
        return results.get(timeout=10)
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def _median_time(fn: Callable[[], object], repeats: int, min_s: float = 0.2) -> float:
    """Median seconds of fn, after one warm-up; at least ``repeats`` calls and ``min_s``."""
    fn()
    samples: list[float] = []
    begin = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - begin < min_s:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _split_k_gemv(x: torch.Tensor, w: torch.Tensor, splits: int) -> torch.Tensor:
    """x [B, K] · w [K, N] as ``splits`` row blocks of w in one batched product, summed —
    the CPU decode layout of docs/architecture.md ("Weight layout and split-K")."""
    b, k = x.shape
    xs = x.view(b, splits, k // splits).transpose(0, 1)  # [S, B, K/S]
    return torch.bmm(xs, w.view(splits, k // splits, -1)).sum(0)


def measure_compute(threads: int, shape: Shape, batch: int, repeats: int) -> dict:
    """FLOP/s and bandwidths on ``threads`` threads (float32)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out: dict[str, float] = {}
        for n in (512, 1024, 2048):
            a, b = torch.randn(n, n), torch.randn(n, n)
            out[f"gemm {n}"] = 2 * n**3 / _median_time(lambda a=a, b=b: a @ b, repeats)
        out["gemm"] = max(out[f"gemm {n}"] for n in (512, 1024, 2048))
        # Decode-shaped: batch rows through the validation model's MLP-sized weights.
        h, i = shape.hidden, shape.intermediate
        x, w = torch.randn(batch, h), torch.randn(h, 3 * i)
        secs = _median_time(lambda: _split_k_gemv(x, w, threads), repeats)
        out["gemv flops"] = 2 * batch * h * 3 * i / secs
        big = torch.randn(2048, 8192)  # 64 MiB of weights: out of cache, like a real model's
        xb = torch.randn(batch, 2048)
        out["weight stream"] = (
            big.numel() * 4 / _median_time(lambda: _split_k_gemv(xb, big, threads), repeats)
        )
        buf = torch.ones(64 << 20)  # 256 MiB, written: untouched pages would read as zeros
        dst = torch.zeros_like(buf)
        out["copy"] = 2 * buf.numel() * 4 / _median_time(lambda: dst.copy_(buf), repeats)
        out["read"] = buf.numel() * 4 / _median_time(lambda: buf.sum(), repeats)
        return out
    finally:
        torch.set_num_threads(saved)


def measure_kv_curves(
    shape: Shape, batch: int, keys: Sequence[int], threads: int, repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """KV bytes per second of the two CPU decode-attention paths, gather included, for calls
    that read ``keys`` keys (rows × keys per row): SDPA over keys gathered from a paged pool
    (the single-node engine) and the float32 reference primitive (what an attention node
    runs: shardlm.attention.reference). Returns {path: [(KV bytes per call, bytes/s)]}."""
    import torch.nn.functional as F

    from shardlm.attention.reference import batched_partial_attention

    hq, hkv, d = shape.heads, shape.kv_heads, shape.head_dim
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    curves: dict[str, list[tuple[float, float]]] = {"sdpa": [], "reference": []}
    try:
        for n in keys:
            rows = max(1, min(batch, n // 256))
            length = n // rows
            k_pool = torch.randn(rows * length + 16, hkv, d)
            v_pool = torch.randn_like(k_pool)
            slots = torch.arange(rows * length).view(rows, length)
            q = torch.randn(rows, hq, d)
            mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
            visible = torch.ones(rows, length, dtype=torch.bool)
            kv_bytes = 2 * rows * length * hkv * d * 4

            def local(k_pool=k_pool, v_pool=v_pool, slots=slots, q=q, mask=mask) -> Any:
                keys_ = k_pool[slots].transpose(1, 2)
                vals = v_pool[slots].transpose(1, 2)
                return F.scaled_dot_product_attention(
                    q.unsqueeze(2), keys_, vals, attn_mask=mask, enable_gqa=True
                )

            def node(k_pool=k_pool, v_pool=v_pool, slots=slots, q=q, visible=visible) -> Any:
                return batched_partial_attention(q, k_pool[slots], v_pool[slots], d**-0.5, visible)

            curves["sdpa"].append((kv_bytes, kv_bytes / _median_time(local, repeats)))
            curves["reference"].append((kv_bytes, kv_bytes / _median_time(node, repeats)))
    finally:
        torch.set_num_threads(saved)
    return curves


@dataclass
class Calibration:
    """What ``calibrate`` measured: per thread count, and the gloo link."""

    compute: dict[int, dict[str, float]] = field(default_factory=dict)
    kv_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    kv_threads: int = 1
    one_way: dict[int, float] = field(default_factory=dict)  # bytes → s
    broadcast: float = 0.0
    link_latency: float = 0.0
    link_bw: float = 0.0


def kv_sizes(args: argparse.Namespace) -> list[int]:
    """Keys per attention call to calibrate: from the smallest call validation makes (one
    row of the shortest context on one of the most nodes) to the largest (the whole batch
    of the longest), ×4 apart."""
    low = max(256, min(args.contexts) // max(args.betas, default=1))
    high = args.batch * max(args.contexts)
    sizes = [low]
    while sizes[-1] * 4 < high:
        sizes.append(sizes[-1] * 4)
    return [*sizes, high]


def calibrate(
    shape: Shape, batch: int, keys: Sequence[int], kv_threads: int, repeats: int
) -> Calibration:
    """Every figure ``validate`` needs, measured now (the machine is shared: its figures
    move with the load, so they are measured in the same run as what they predict)."""
    cal = Calibration()
    gloo = measure_gloo()
    cal.one_way = gloo["one_way"]
    cal.broadcast = gloo["broadcast"]
    sizes = sorted(cal.one_way)
    cal.link_latency = cal.one_way[sizes[0]]
    big, bigger = sizes[-2], sizes[-1]
    cal.link_bw = (bigger - big) / max(cal.one_way[bigger] - cal.one_way[big], 1e-9)
    for threads in sorted({1, torch.get_num_threads()}):
        cal.compute[threads] = measure_compute(threads, shape, batch, repeats)
    cal.kv_threads = kv_threads
    cal.kv_curves = measure_kv_curves(shape, batch, keys, kv_threads, repeats)
    return cal


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def _binary(n: int) -> str:
    for shift, unit in ((20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def print_calibration(cal: Calibration, shape: Shape, batch: int) -> None:
    print("\n## 1. calibrate: this machine's figures\n")
    print(
        f"{os.cpu_count()} cores, torch {torch.__version__}, float32. gloo point-to-point "
        "between two spawned processes on 127.0.0.1 (isend/irecv ping-pong, one thread each; "
        "one-way = median round trip / 2):\n"
    )
    print("| message | one-way time | effective bandwidth |")
    print("|---:|---:|---:|")
    for size, secs in sorted(cal.one_way.items()):
        print(f"| {_binary(size)} | {secs * 1e6:,.0f} µs | {_si(size / secs, 'B/s')} |")
    print(
        f"\nmodel figures: latency {cal.link_latency * 1e6:,.0f} µs per message (the smallest "
        f"message), bandwidth {_si(cal.link_bw, 'B/s')} (slope between the two largest); "
        f"16-int broadcast (the step's control message) {cal.broadcast * 1e6:,.0f} µs\n"
    )
    threads = sorted(cal.compute)
    print("| figure | " + " | ".join(f"{n} thread{'s' * (n > 1)}" for n in threads) + " |")
    print("|---|" + "---:|" * len(threads))
    rows = [
        ("GEMM 512³ (torch.matmul)", "gemm 512", "FLOP/s"),
        ("GEMM 1024³", "gemm 1024", "FLOP/s"),
        ("GEMM 2048³", "gemm 2048", "FLOP/s"),
        (
            f"decode GEMV [{batch}×{shape.hidden}]·[{shape.hidden}×{3 * shape.intermediate}]",
            "gemv flops",
            "FLOP/s",
        ),
        ("weight streaming (split-K GEMV, 64 MiB)", "weight stream", "B/s"),
        ("memory copy (256 MiB, read + write)", "copy", "B/s"),
        ("memory read (sum of 256 MiB)", "read", "B/s"),
    ]
    for label, key, unit in rows:
        cells = " | ".join(_si(cal.compute[n][key], unit) for n in threads)
        print(f"| {label} | {cells} |")
    print(
        f"\nDecode attention ({shape.heads}q/{shape.kv_heads}kv heads of {shape.head_dim}, "
        f"float32, {cal.kv_threads} thread{'s' * (cal.kv_threads > 1)}): KV bytes per second "
        "of one call, gather from a paged pool included, by the KV bytes it reads:\n"
    )
    print("| KV per call | gather + SDPA (single node) | gather + reference (attention node) |")
    print("|---:|---:|---:|")
    for (nbytes, sdpa), (_, ref) in zip(
        cal.kv_curves["sdpa"], cal.kv_curves["reference"], strict=True
    ):
        print(f"| {_binary(int(nbytes))} | {_si(sdpa, 'B/s')} | {_si(ref, 'B/s')} |")
    print(
        "\nThe model takes FLOP/s = the best GEMM, weight bandwidth = weight streaming, KV "
        "rate = the attention path's curve above (interpolated by the call's KV bytes), each "
        "at the threads a rank gets (cores / ranks)."
    )


def cpu_hardware(cal: Calibration, threads: int, kv_path: str, overhead: float) -> Hardware:
    """This machine as the model's Hardware, for ranks of ``threads`` threads."""
    fig = cal.compute[min(cal.compute, key=lambda n: abs(n - threads))]
    curve = tuple(cal.kv_curves[kv_path])
    return Hardware(
        name="this CPU",
        flops=fig["gemm"],
        weight_bw=fig["weight stream"],
        kv_bw=curve[-1][1],
        kv_curve=curve,
        memory=20e9,
        link_bw=cal.link_bw,
        link_latency=cal.link_latency,
        tp_bw=cal.link_bw,
        tp_latency=cal.link_latency,
        step_overhead=overhead,
    )


# ------------------------------------------------------------------------------------------
# 2. validate: predicted vs measured decode steps of shardlm on this machine
# ------------------------------------------------------------------------------------------


def microbatches_supported() -> bool:
    """Whether this checkout's engine has ``node_microbatches`` (being added)."""
    from shardlm import EngineConfig

    parallel = type(EngineConfig().parallel)  # the group that holds attention_nodes
    return "node_microbatches" in {f.name for f in dataclasses.fields(parallel)}


def longest_sequence(args: argparse.Namespace) -> int:
    """Prompt + generated tokens of the longest sequence ``measure_decode`` can make."""
    longest = max(args.contexts)
    return longest + args.decode_steps + args.batch * longest // 2048 + 4


def measure_decode(
    path: str, engine_args: dict, contexts: Sequence[int], args: argparse.Namespace
) -> list[float]:
    """Median decode step seconds per context: ``--batch`` sequences of that many prompt
    tokens are prefilled, then every step in which all of them decode is timed."""
    from shardlm import LLM, SamplingParams

    pool = args.batch * (longest_sequence(args) + 32)
    medians = []
    with LLM(
        path,
        device="cpu",
        skip_tokenizer_init=True,
        kv_cache_tokens=pool,  # per node with attention nodes: more than enough
        max_num_seqs=args.batch,
        max_num_batched_tokens=2048,
        enable_prefix_caching=False,  # prompts of one context prefix the next context's
        tp_timeout_s=30,  # a rank that cannot start fails the configuration in 30 s
        **engine_args,
    ) as llm:
        engine = llm.engine
        for n, context in enumerate(contexts):
            times: list[float] = []
            for r in range(args.repeats):
                # Prompts prefill a chunk of 2048 tokens per step, so the sequences start
                # decoding up to batch·context/2048 steps apart: room for that, then stop.
                stagger = args.batch * context // 2048 + 4  # as in longest_sequence
                params = SamplingParams(
                    temperature=0.0, max_tokens=args.decode_steps + stagger, ignore_eos=True
                )
                ids = [f"{n}-{r}-{b}" for b in range(args.batch)]
                for b, rid in enumerate(ids):
                    prompt = [(7 * i + 13 * b + r) % 4000 + 3 for i in range(context)]
                    engine.add_request(rid, prompt, params)
                timed = 0
                while engine.has_unfinished_requests() and timed < args.decode_steps:
                    sched = engine.scheduler
                    decoding = (
                        not sched.waiting
                        and len(sched.running) == args.batch
                        and all(s.num_tokens - s.num_computed_tokens == 1 for s in sched.running)
                    )
                    start = time.perf_counter()
                    engine.step()
                    if decoding:
                        times.append(time.perf_counter() - start)
                        timed += 1
                for rid in ids:
                    engine.abort(rid)
            medians.append(statistics.median(times))
    return medians


def fit(predict: Callable[[float], float], target: float) -> float:
    """The x ≥ 0 with predict(x) = target (predict grows with x); 0 when predict(0) is
    already above it."""
    lo, hi = 0.0, max(target, 1e-6)
    if predict(lo) >= target:
        return 0.0
    while predict(hi) < target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(mid) < target else (lo, mid)
    return (lo + hi) / 2


def validate(cal: Calibration, args: argparse.Namespace) -> None:
    """Measured shardlm decode steps against the model with this run's calibration.

    Two constants are fitted, each on one cell, and named in the output: the host's time per
    step (scheduler, sampling, Python), from the single node at the shortest context, and
    the host's time per exchange task (posting, collecting and merging on the compute side;
    receiving, attending and answering on the node: Python and gloo calls), from β = 1,
    m = 1 at the shortest context. Every other cell is a prediction."""
    shape = validation_shape(args)
    has_m = microbatches_supported()
    ms = [m for m in args.microbatches if m == 1 or has_m]
    configs: list[tuple[str, dict, Nodes | None]] = [("single node", {}, None)]
    for beta in args.betas:
        for m in ms:
            engine = {"attention_nodes": beta}
            if has_m:
                engine["node_microbatches"] = m
            configs.append((f"β={beta} m={m}", engine, Nodes(1, beta, 1, m)))
    measured: dict[str, list[float] | str] = {}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as path:
        layout = argparse.Namespace(
            hidden=shape.hidden,
            intermediate=shape.intermediate,
            layers=shape.layers,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            vocab=shape.vocab,
        )
        make_checkpoint(path, layout, max_positions=longest_sequence(args) + 64)
        for name, engine, _ in configs:
            start = time.perf_counter()
            # A world of one keeps this process's threads: pin it like a rank of a larger job
            # (the spawned ranks get cores // ranks, one each here).
            torch.set_num_threads(args.single_threads if not engine else threads)
            try:
                measured[name] = measure_decode(path, engine, args.contexts, args)
            except Exception as e:  # a configuration that fails is reported, not fatal
                measured[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            finally:
                torch.set_num_threads(threads)
            print(f"  measured {name} in {time.perf_counter() - start:.0f} s", flush=True)

    cores = os.cpu_count() or 1
    single_hw = cpu_hardware(cal, args.single_threads, "sdpa", 0.0)
    single = measured.get("single node")
    first = args.contexts[0]
    step_host = 0.0
    if isinstance(single, list):
        step_host = fit(
            lambda h: tp_step_time(
                shape, dataclasses.replace(single_hw, step_overhead=h), 1, args.batch, first
            ),
            single[0],
        )

    def node_hw(dep: Nodes, task_host: float) -> Hardware:
        hw = cpu_hardware(
            cal, max(1, cores // (1 + dep.beta)), "reference", step_host + cal.broadcast
        )
        return dataclasses.replace(hw, task_overhead=task_host)

    task_host, fit_row = 0.0, None
    for name, _, dep in configs:
        if dep is not None and dep.m == 1 and isinstance(measured[name], list):
            fit_row = name
            task_host = fit(
                lambda h, dep=dep: nodes_step_time(shape, node_hw(dep, h), dep, args.batch, first),
                measured[name][0],
            )
            break

    print("\n## 2. validate: model vs shardlm on this machine\n")
    print(
        f"random Llama: hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"{shape.layers} layers, {shape.heads}q/{shape.kv_heads}kv heads of {shape.head_dim}, "
        f"vocab {shape.vocab}; float32; batch {args.batch} sequences of the context's length; "
        f"median of the steps in which all {args.batch} decode ({args.decode_steps} per "
        f"generation, {args.repeats} generation(s)); α = 1 compute node; attention nodes "
        f"distributed (own processes, gloo on loopback), kv_chunk_size 16; every rank and the "
        f"single node on {args.single_threads} thread(s)."
    )
    if not has_m:
        print(
            "\n`node_microbatches` is not an option of this checkout's EngineConfig: only "
            "m = 1 was measured."
        )
    else:
        print(f"\nmicro-batches measured: m ∈ {{{', '.join(map(str, ms))}}}.")
    print(
        f"\nFitted (each on the row marked 'fit'): host time per step {step_host * 1e3:.2f} ms "
        f"(single node, context {first:,}); host time per exchange task "
        f"{task_host * 1e3:.3f} ms ({fit_row or 'no node row'}, context {first:,}), on each "
        f"dense part of a micro-batch and each node attend. Node runs add the measured "
        f"control broadcast ({cal.broadcast * 1e6:,.0f} µs per step). Every other cell is "
        f"predicted from the calibration above.\n"
    )
    print(
        "| configuration | context | measured ms | × single node | predicted ms | error |"
        " modelled parts of the step (ms; sums, which overlap when m ≥ 2) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, _, dep in configs:
        result = measured[name]
        for i, context in enumerate(args.contexts):
            if isinstance(result, str):
                print(f"| {name} | {context:,} | failed: {result} | | | | |")
                continue
            if dep is None:
                hw = dataclasses.replace(single_hw, step_overhead=step_host)
                pred = tp_step_time(shape, hw, 1, args.batch, context)
                before, after = dense_times(shape, hw, args.batch, 1)
                attn = attention_time(shape, hw, args.batch, context, 1)
                parts = (
                    f"dense {1e3 * shape.layers * (before + after):.2f}, attention "
                    f"{1e3 * shape.layers * attn:.2f}, host {1e3 * step_host:.2f}"
                )
            else:
                hw = node_hw(dep, task_host)
                pred = nodes_step_time(shape, hw, dep, args.batch, context)
                stages = node_stages(shape, hw, dep, args.batch, context)
                layers = shape.layers
                parts = (
                    f"dense {1e3 * layers * sum(s.before + s.after for s in stages):.2f}, "
                    f"node {1e3 * layers * sum(s.attend for s in stages):.2f}, links "
                    f"{1e3 * layers * sum(s.send + s.back + 2 * s.latency for s in stages):.2f}"
                )
            got = result[i]
            base = single[i] if isinstance(single, list) else got
            fitted = i == 0 and (dep is None or name == fit_row)
            err = "fit" if fitted else f"{(pred - got) / got:+.0%}"
            print(
                f"| {name} | {context:,} | {got * 1e3:.2f} | {got / base:.2f}× | "
                f"{pred * 1e3:.2f} | {err} | {parts} |"
            )
    print(
        "\nError = (predicted − measured) / measured. The processes share this machine's two "
        "cores (β = 2: three processes), and other jobs may share them too: read trends."
    )


def validation_shape(args: argparse.Namespace) -> Shape:
    return Shape(
        name="validation",
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        vocab=args.vocab,
        dtype_bytes=4,
    )


# ------------------------------------------------------------------------------------------
# 3. project: Llama-3 8B / 70B on H100 / H200 figures
# ------------------------------------------------------------------------------------------

LLAMA3_8B = Shape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128, 128256, 2)
LLAMA3_70B = Shape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128, 128256, 2)

# Hardware figures (peak, from NVIDIA's datasheets as quoted by the pages cited; the
# datasheet PDFs themselves were not read here):
# - H100 SXM: 989.4 TFLOPS dense BF16 (1,979 with 2:4 sparsity), 80 GB HBM3 at 3.35 TB/s,
#   NVLink 4 900 GB/s bidirectional per GPU = 450 GB/s each way. Quoted by
#   glennklockwood.com/garden/processors/h100 and archive-lib.hpctech.co.jp (NVIDIA H100 spec
#   table, "specifications 1/2 lower without sparsity").
# - H200 SXM: the same GH100 compute (989 TFLOPS dense BF16), 141 GB HBM3e at 4.8 TB/s,
#   NVLink 900 GB/s. Quoted by aiwiki.ai/wiki/nvidia_h200 and the MLCommons inference v4.1
#   system description H200-SXM-141GBx8 ("18x 4th Gen NVLink, 900GB/s", "141 GB").
# - Between nodes: one ConnectX-7 NDR InfiniBand port per GPU, 400 Gb/s = 50 GB/s each way
#   (docs.nvidia.com ConnectX-7 user manual: "Single-port OSFP, NDR 400Gb/s"; DGX H100 user
#   guide: eight ConnectX-7 ports, one per GPU).
# - Latencies are assumptions, not datasheet figures: 10 µs per compute ↔ attention message
#   (GPU-initiated RDMA send/recv over InfiniBand plus a kernel launch) and 10 µs per NVLink
#   AllReduce of a few hundred KiB (NCCL's small-message regime).
HW_SOURCES = (
    "H100 SXM: 989.4 TFLOPS dense BF16, 80 GB HBM3, 3.35 TB/s; H200: 141 GB HBM3e, 4.8 TB/s, "
    "same compute; NVLink 4 900 GB/s bidirectional (450 GB/s each way); ConnectX-7 NDR "
    "400 Gb/s (50 GB/s each way) per GPU — NVIDIA datasheet figures as quoted by "
    "glennklockwood.com (H100), aiwiki.ai and MLCommons v4.1 system JSON (H200), "
    "docs.nvidia.com ConnectX-7 manual; message and AllReduce latency 10 µs: assumptions"
)
H100_SXM = Hardware(
    name="H100 SXM",
    flops=989.4e12,
    weight_bw=3.35e12,
    kv_bw=3.35e12,
    memory=80e9,
    link_bw=50e9,
    link_latency=10e-6,
    tp_bw=450e9,
    tp_latency=10e-6,
)
H200 = dataclasses.replace(H100_SXM, name="H200 SXM", weight_bw=4.8e12, kv_bw=4.8e12, memory=141e9)
PROJECT_CONTEXTS = (32768, 131072, 524288, 1048576)

CLAIMS = (
    "NVIDIA Helix Parallelism (Bhatia et al., arXiv 2507.07120, and NVIDIA's developer blog, "
    "2025): up to 32× larger batches — concurrent users — under the same token-to-token "
    "latency budget, and up to 1.5× lower latency at a fixed batch, for DeepSeek-R1 with "
    "multi-million-token contexts on Blackwell (GB200 NVL72: FP4, 1.8 TB/s NVLink). Attention "
    "is KV-parallel and the FFN tensor(/expert)-parallel on the same GPUs, not on separate "
    "nodes.",
    "MegaScale-Infer (Zhu et al., ByteDance, arXiv 2504.02263): up to 1.90× per-GPU decode "
    "throughput over state-of-the-art serving, attention and FFN on separate GPUs with "
    "ping-pong micro-batches, for MoE models of 132B–317B (sparse experts make the FFN "
    "memory-bound, which disaggregation fixes; a dense model has less to gain).",
)


def _context_label(context: float) -> str:
    return f"{context / 1048576:g}M" if context >= 1048576 else f"{context / 1024:g}k"


def project(args: argparse.Namespace) -> None:
    shapes = (LLAMA3_8B, LLAMA3_70B)
    hardware = tuple(
        dataclasses.replace(h, task_overhead=args.host_task_us * 1e-6) for h in (H100_SXM, H200)
    )
    if args.link == "nvlink":
        hardware = tuple(
            dataclasses.replace(h, link_bw=h.tp_bw, link_latency=h.tp_latency) for h in hardware
        )
    for slo_ms in args.slo_ms:
        slo = slo_ms / 1e3
        print(
            f"\n## 3. project: tokens/s per device at ≤ {slo_ms:g} ms per step "
            f"(bf16, ≤ {args.max_devices} devices, compute ↔ attention over {args.link})\n"
        )
        print(
            "| model | GPU | context | co-located TP | tok/s/dev | nodes (t α:β m) "
            "| tok/s/dev | × TP | users/dev × TP |"
        )
        print("|---|---|---:|---|---:|---|---:|---:|---:|")
        for shape in shapes:
            for hw in hardware:
                for context in PROJECT_CONTEXTS:
                    tp = best_tp(shape, hw, context, slo)
                    nodes = best_nodes(shape, hw, context, slo, args.max_devices)
                    print(
                        f"| {shape.name} | {hw.name} | {_context_label(context)} | "
                        f"{_describe(tp)} | {tp.tokens_per_device:,.1f} | {_describe(nodes)} | "
                        f"{nodes.tokens_per_device:,.1f} | {_ratio(nodes, tp, 'tokens')} | "
                        f"{_ratio(nodes, tp, 'users')} |"
                    )
        print("\nWhere nodes stop paying (tokens/s per device, nodes ÷ TP, by context):\n")
        print("| model | GPU | " + " | ".join(_context_label(c) for c in SCAN) + " |")
        print("|---|---|" + "---:|" * len(SCAN))
        for shape in shapes:
            for hw in hardware:
                cells = []
                for context in SCAN:
                    tp = best_tp(shape, hw, context, slo)
                    nodes = best_nodes(shape, hw, context, slo, args.max_devices)
                    cells.append(_ratio(nodes, tp, "tokens"))
                print(f"| {shape.name} | {hw.name} | " + " | ".join(cells) + " |")
    print("\n## 3b. the shortest step one sequence can get (ms)\n")
    print("| model | GPU | context | co-located TP | nodes | nodes ÷ TP |")
    print("|---|---|---:|---|---|---:|")
    for shape in shapes:
        for hw in hardware:
            for context in PROJECT_CONTEXTS:
                tp, nodes = latency_floor(shape, hw, context, args.max_devices)
                ratio = f"{nodes.step / tp.step:.2f}×" if tp.batch and nodes.batch else "—"
                print(
                    f"| {shape.name} | {hw.name} | {_context_label(context)} | "
                    f"{_floor(tp)} | {_floor(nodes)} | {ratio} |"
                )
    print(f"\nHardware figures: {HW_SOURCES}.")
    print(
        "Co-located TP: the best t ∈ {1, 2, 4, 8} (one NVLink domain), replicated to fill "
        "devices; nodes: best t ∈ {1, 2, 4, 8}, α ∈ {1..8}, β ∈ {1..64}, m ∈ {1..8} with "
        "t·(α + β) devices. Batch: the largest that fits 90 % of memory and meets the step "
        "time. 'users/dev' = concurrent sequences per device (Helix's measure)."
    )
    print("\nPublished claims, for comparison (not reproduced here):\n")
    for claim in CLAIMS:
        print(f"- {claim}")


SCAN = (4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)


def _describe(best: Best) -> str:
    if not best.batch:
        return "none meets it"
    return f"{best.label}, B={best.batch}, {best.step * 1e3:.1f} ms"


def _floor(best: Best) -> str:
    if not best.batch:
        return "does not fit"
    return f"{best.step * 1e3:.2f} ({best.label}, {best.devices} devices)"


def _ratio(nodes: Best, tp: Best, what: str) -> str:
    a = nodes.tokens_per_device if what == "tokens" else nodes.users_per_device
    b = tp.tokens_per_device if what == "tokens" else tp.users_per_device
    if not nodes.batch:
        return "—"
    if not tp.batch:
        return "TP: none"
    return f"{a / b:.2f}×"


# ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("part", choices=("calibrate", "validate", "project", "all"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batch", type=int, default=4, help="sequences decoding together")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="generations per context")
    parser.add_argument("--betas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--calibration-repeats", type=int, default=20)
    parser.add_argument(
        "--single-threads", type=int, default=1, help="threads of the single-node peer"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument(
        "--slo-ms", type=float, nargs="+", default=[50.0, 15.0], help="step-time budgets"
    )
    parser.add_argument("--max-devices", type=int, default=64)
    parser.add_argument("--link", choices=("infiniband", "nvlink"), default="infiniband")
    parser.add_argument(
        "--host-task-us",
        type=float,
        default=0.0,
        help="project: host/launch µs per pipeline task of the node path (0: hidden, as "
        "in a CUDA graph; the TP peer is charged none)",
    )
    args = parser.parse_args()

    if args.part in ("calibrate", "validate", "all"):
        shape = validation_shape(args)
        keys = kv_sizes(args)
        cal = calibrate(shape, args.batch, keys, args.single_threads, args.calibration_repeats)
        print_calibration(cal, shape, args.batch)
        if args.part in ("validate", "all"):
            validate(cal, args)
    if args.part in ("project", "all"):
        project(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

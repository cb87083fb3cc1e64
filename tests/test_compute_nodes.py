"""Figure 2's compute side: α compute nodes sharing β attention nodes per head group, each on
its own rows of every step (decodes of its own sequences, runs of every prefill).

Oracle: transformers' greedy tokens (float32) for every configuration; the engine's own
counters for the division of work and the bytes moved.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.engine.scheduler import ScheduledBatch
from shardlm.errors import ParamError, WorkerFailure
from shardlm.runtime.lockstep import Lockstep, LockstepAborted
from shardlm.step_inputs import StepInputs
from tests.conftest import make_checkpoint
from tests.test_attention_nodes import generate_under_preemption
from tests.test_tensor_parallel import SHARDLM, TORCHRUN, child_pids, cli_generate, finish

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# Small steps: the 300-token prompt is prefilled in chunks, and every chunk is split across
# the compute nodes.
STEP = dict(max_num_batched_tokens=64, compute_chunk_size=7, kv_cache_tokens=2048)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("compute-nodes-llama")
    hf = make_checkpoint(
        path,
        "llama",
        {"num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024},
        seed=13,
    )
    return path, hf


def prompts() -> list[list[int]]:
    """A prompt of several hundred tokens, one shorter than any chunk, two in between."""
    g = torch.Generator().manual_seed(8)
    return [torch.randint(2, 258, (n,), generator=g).tolist() for n in (300, 3, 40, 70)]


@pytest.fixture(scope="module")
def hf_tokens(ckpt):
    from tests.test_model_parity import hf_greedy

    _, hf = ckpt
    return [hf_greedy(hf, p, NEW_TOKENS) for p in prompts()]


def generate(path, **engine_args):
    """Greedy tokens of prompts(), checking on the way that every compute node worked and
    the attention nodes hold nothing afterwards."""
    with LLM(path, device="cpu", **engine_args) as llm:
        outs = llm.generate(prompts(), GREEDY, use_tqdm=False)
        computed = llm.engine.compute_node_stats()
        held = llm.engine.attention_node_stats()
        stats = llm.engine.stats
    assert len(computed) == engine_args["compute_nodes"]
    assert all(c.tokens > 0 for c in computed), computed  # every compute node had rows
    assert sum(c.tokens for c in computed) == stats.prefill_tokens + stats.decode_tokens
    assert all(n.kv_tokens == 0 and n.blocks_in_use == 0 for n in held)
    return [o.outputs[0].token_ids for o in outs]


MATRIX = [
    (alpha, beta, tp, chunk)
    for alpha in (2, 3)
    for beta in (1, 2, 3)
    for tp in (1, 2)
    for chunk in (1, 5, 16)
]


# Each compute and attention node a process of its own: α·t + t·β ranks on 2 cores.
DISTRIBUTED = [(2, 1, 1, 5), (3, 2, 1, 1), (2, 3, 1, 16), (3, 1, 2, 16), (2, 2, 2, 5), (3, 2, 2, 1)]
CASES = [("in-process", *c) for c in MATRIX] + [("distributed", *c) for c in DISTRIBUTED]


@pytest.mark.parametrize("transport, alpha, beta, tp, chunk", CASES)
def test_compute_nodes_match_transformers(transport, alpha, beta, tp, chunk, ckpt, hf_tokens):
    path, _ = ckpt
    got = generate(
        path,
        compute_nodes=alpha,
        attention_nodes=beta,
        tensor_parallel_size=tp,
        kv_chunk_size=chunk,
        attention_transport=transport,
        **STEP,
    )
    assert got == hf_tokens
    assert not child_pids()


@pytest.mark.parametrize("transport", ["in-process", "distributed"])
def test_preemption_with_compute_nodes(transport, ckpt):
    """Node pools too small for every sequence at once: sequences are preempted, their node
    KV released and recomputed, on whichever compute nodes the rows fall."""
    path, _ = ckpt
    g = torch.Generator().manual_seed(3)
    batch = [torch.randint(2, 258, (n,), generator=g).tolist() for n in (50, 33, 20, 7)]
    want, got = generate_under_preemption(
        path,
        batch,
        40,
        compute_nodes=2,
        attention_nodes=2,
        kv_chunk_size=5,
        kv_cache_tokens=96,  # each node; four sequences of ~80 tokens need ~160 per node
        attention_transport=transport,
    )
    assert got == want


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_a_long_prefill_is_divided_between_the_compute_nodes(alpha, ckpt):
    """One 600-token prompt in one step: each compute node computes its runs of it (within
    one run of T/α), and the dense FLOPs add up to the single node's."""
    path, _ = ckpt
    prompt = [2 + i % 250 for i in range(600)]
    with LLM(
        path,
        device="cpu",
        compute_nodes=alpha,
        attention_nodes=2,
        attention_transport="in-process",
        compute_chunk_size=16,
        max_num_batched_tokens=1024,
    ) as llm:
        llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
        stats = llm.engine.compute_node_stats()
    tokens = [s.tokens for s in stats]
    assert sum(tokens) == 600
    assert max(tokens) - min(tokens) <= 16
    assert [s.dense_flops for s in stats] == [t * dense_flops(ckpt[1].config) for t in tokens]


def dense_flops(c) -> int:
    """2 per multiply-add of QKV, O and the MLP, every layer (the attention is on the nodes)."""
    d = c.hidden_size // c.num_attention_heads
    qkv = c.hidden_size * d * (c.num_attention_heads + 2 * c.num_key_value_heads)
    out = c.num_attention_heads * d * c.hidden_size
    return 2 * c.num_hidden_layers * (qkv + out + 3 * c.hidden_size * c.intermediate_size)


def test_short_prompts_prefill_where_their_sequences_were_placed(ckpt):
    """Prompts shorter than a run: each prefills on its own sequence's compute node, so a
    batch of them spreads over the nodes like the sequences."""
    path, _ = ckpt
    with LLM(
        path,
        device="cpu",
        compute_nodes=2,
        attention_nodes=1,
        attention_transport="in-process",
    ) as llm:
        short = [[5 + i] * 12 for i in range(8)]
        llm.generate(short, SamplingParams(max_tokens=1), use_tqdm=False)
        stats = llm.engine.compute_node_stats()
    assert [s.tokens for s in stats] == [48, 48]


@pytest.mark.parametrize(
    "transport, tp", [("in-process", 1), ("distributed", 2)], ids=["in-process", "distributed-t2"]
)
def test_bytes_to_and_from_the_attention_nodes_follow_the_formula(transport, tp, ckpt):
    """Per layer, every row's query goes to each of the β nodes and its K/V to the one node
    that owns it; each node answers every query with out (dtype) and lse (float32):

        to nodes   = L · rows · (β·Hq·D·e + 2·Hkv·D·e)
        from nodes = L · rows · β·Hq·(D·e + 4)

    for each compute node over its own rows (summed over its t ranks' head groups). The
    sampled rows' hidden states that compute node 1 sends to compute node 0 are H·e each."""
    path, hf = ckpt
    c = hf.config
    layers, hq, hkv = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    d, e, beta = c.hidden_size // c.num_attention_heads, 4, 3  # float32: 4 bytes
    with LLM(
        path,
        device="cpu",
        compute_nodes=2,
        attention_nodes=beta,
        tensor_parallel_size=tp,
        attention_transport=transport,
        **STEP,
    ) as llm:
        llm.generate(prompts(), GREEDY, use_tqdm=False)
        stats = llm.engine.compute_node_stats()
    for s in stats:
        assert s.bytes_to_attention_nodes == layers * s.tokens * (
            beta * hq * d * e + 2 * hkv * d * e
        )
        assert s.bytes_from_attention_nodes == layers * s.tokens * beta * hq * (d * e + 4)
    if transport == "distributed":  # in-process, nothing travels to compute node 0
        sent = stats[1].hidden_bytes_to_compute_node_0
        assert sent > 0 and sent % (c.hidden_size * e * tp) == 0


def test_a_sequence_is_placed_by_load_and_keeps_its_compute_node(ckpt):
    path, _ = ckpt
    with LLM(
        path,
        device="cpu",
        compute_nodes=3,
        attention_nodes=1,
        attention_transport="in-process",
    ) as llm:
        engine = llm.engine
        for i, n in enumerate((40, 10, 10, 5)):
            engine.add_request(f"r{i}", list(range(2, 2 + n)), GREEDY)
        engine.step()
        seqs = [engine.requests[f"r{i}"].seqs[0] for i in range(4)]
        # 40 tokens → node 0; 10 → node 1; 10 → node 2; 5 → the least loaded (1, on a tie
        # with 2 the lower index).
        placed = [s.compute_node for s in seqs]
        assert placed == [0, 1, 2, 1]
        # A preempted sequence keeps its compute node when it comes back.
        engine.scheduler._preempt(seqs[0], ScheduledBatch())
        while engine.has_unfinished_requests():
            engine.step()
        assert [s.compute_node for s in seqs] == placed


def test_step_inputs_carry_the_rows_compute_nodes():
    groups = torch.tensor([1, 0, 1, 1, 0])
    inputs = StepInputs(
        input_ids=torch.arange(5),
        positions=torch.arange(5),
        decode_tables=torch.zeros(0, 0, dtype=torch.long),
        decode_lens=torch.zeros(0, dtype=torch.long),
        prefill_meta=torch.tensor([[5, 5]]),
        prefill_tables=[torch.tensor([3])],
        sample_rows=torch.tensor([4]),
        seq_ids=torch.tensor([9]),
        row_groups=groups,
    )
    back = StepInputs.decode(inputs.header(), inputs.payload())
    assert torch.equal(back.row_groups, groups)
    assert torch.equal(back.sample_rows, inputs.sample_rows)
    assert back.rows_of(1).tolist() == [0, 2, 3] and back.active_groups() == [0, 1]


def test_lockstep_takes_turns_in_order_and_stops_everyone_on_a_failure():
    lock = Lockstep()
    seen = []

    def node(name, fail=False):
        def work():
            for layer in range(3):
                seen.append((name, layer))
                if fail and layer == 1:
                    raise RuntimeError("boom")
                lock.pass_turn()
            return name

        return work

    assert lock.run({0: node("a"), 1: node("b")}) == {0: "a", 1: "b"}
    assert seen == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    for failing in (1, 0):  # a middle one, then the first in the order
        seen.clear()
        work = {g: node(name, fail=g == failing) for g, name in enumerate("abc")}
        with pytest.raises(RuntimeError, match="boom") as e:
            lock.run(work)
        assert not isinstance(e.value, LockstepAborted)  # the cause, not a follower's abort
        assert not any(layer == 2 for _, layer in seen)  # nobody went on after the failure


@pytest.mark.parametrize(
    "how, tp, victim, role",
    [
        (signal.SIGKILL, 1, 1, r"compute node 1, tensor-parallel rank 0 \(rank 1\)"),
        (signal.SIGSTOP, 1, 1, r"compute node 1, tensor-parallel rank 0 \(rank 1\)"),
        (signal.SIGKILL, 2, 3, r"compute node 1, tensor-parallel rank 1 \(rank 3\)"),
        (signal.SIGKILL, 1, 2, r"attention node 0 of head group 0 \(rank 2\)"),
    ],
    ids=["kill-compute", "stop-compute", "kill-compute-t2", "kill-attention"],
)
def test_a_dead_or_silent_node_is_reported_by_name(how, tp, victim, role, ckpt):
    path, _ = ckpt
    # Six processes rendezvous on 2 cores at t = 2: start-up (which the failure timeout also
    # bounds) needs more than 5 s there.
    timeout = 5.0 * tp
    llm = LLM(
        path,
        device="cpu",
        compute_nodes=2,
        attention_nodes=1,
        tensor_parallel_size=tp,
        tp_timeout_s=timeout,
    )
    process = llm.engine.workers.processes[victim - 1]
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)

    def strike() -> None:
        time.sleep(0.5)
        os.kill(process.pid, how)

    threading.Thread(target=strike).start()
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=role):
        llm.generate([[5, 6, 7], [8, 9, 10]], params, use_tqdm=False)
    assert time.monotonic() - start < 0.5 + timeout + 10
    llm.shutdown()
    assert not child_pids()


def test_compute_nodes_need_attention_nodes(ckpt):
    with pytest.raises(ParamError, match="compute_nodes=2 needs attention_nodes ≥ 1"):
        LLM(ckpt[0], device="cpu", compute_nodes=2)


def test_cli_and_torchrun_compute_nodes_give_the_same_text(ckpt):
    path, _ = ckpt
    plain = finish(cli_generate(path, SHARDLM))
    extra = ["--compute-nodes", "2", "--attention-nodes", "1", "--compute-chunk-size", "2"]
    assert finish(cli_generate(path, SHARDLM, extra)) == plain
    # torchrun places them: WORLD_SIZE 3 = 2 compute nodes (t = 1) + 1 attention node.
    launcher = [*TORCHRUN, "--standalone", "--nproc-per-node", "3", "-m", "shardlm"]
    assert finish(cli_generate(path, launcher, extra)) == plain


def test_node_reports_reach_the_metrics(ckpt):
    """The server's engine process asks the nodes for their own counters and /metrics shows
    them: tokens per compute node, KV per attention node."""
    import asyncio

    pytest.importorskip("prometheus_client")
    from shardlm.entrypoints.openai.engine_client import EngineClient
    from shardlm.entrypoints.openai.metrics import ServerMetrics

    client = EngineClient(
        dict(
            model=str(ckpt[0]),
            device="cpu",
            compute_nodes=2,
            attention_nodes=2,
            attention_transport="in-process",
            compute_chunk_size=4,
        )
    )

    async def ask() -> None:
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        stream = await client.add("r", {"prompt_token_ids": list(range(2, 40))}, params)
        async for _ in stream:
            pass

    try:
        asyncio.run(ask())
        # The engine refreshes the snapshot at most once a second, and once more when it
        # goes idle after the last steps: wait for that one.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sum(c.tokens for c in client.node_stats.compute) == 38 + 7:
                break
            time.sleep(0.05)
        text = ServerMetrics(lambda: client.stats, lambda: client.node_stats).render().decode()
    finally:
        client.shutdown()
    tokens = {
        line.split('"')[1]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("shardlm_compute_node_tokens{")
    }
    assert set(tokens) == {"0", "1"} and all(v > 0 for v in tokens.values())
    assert sum(tokens.values()) == 38 + 7  # the prompt, then 7 decodes (8th token sampled)
    assert 'shardlm_attention_node_kv_tokens{head_group="0",shard="1"}' in text
    # The wait counters are there too (in-process nodes answer at once: a wait of ~0 s).
    assert 'shardlm_compute_node_wait_on_attention_seconds{compute_node="1"}' in text
    assert 'shardlm_attention_node_wait_on_compute_seconds{head_group="0",shard="0"}' in text

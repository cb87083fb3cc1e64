"""Attention nodes that pay: micro-batches that ping-pong between the compute side and the
nodes (node_microbatches), and prefix caching with the KV cache R-sharded over the nodes.

Oracle: transformers' greedy tokens (float32) for every (m, prefix caching, α, transport);
the plain single-micro-batch node for the node's own split; the engine's counters for hits,
waits and released blocks.
"""

from __future__ import annotations

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.attention.node import AttentionNode, AttentionNodeError
from shardlm.attention.sharded import SharedNode
from shardlm.cache.node_budget import NodeBlockBudget
from shardlm.cache.rshard import RShard
from shardlm.engine_config import check_attention_link
from shardlm.errors import ParamError
from shardlm.runtime.lockstep import Lockstep
from shardlm.step_inputs import StepInputs
from tests.conftest import make_checkpoint
from tests.test_attention_nodes import IN_PROCESS, generate_under_preemption, prefill_step
from tests.test_tensor_parallel import child_pids

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# β = 2 nodes, R-shard chunks of 3 tokens, blocks of 4: a cached prefix is a multiple of
# 2 · lcm(3, 4) = 24 tokens, three blocks of every node.
NODES = dict(attention_nodes=2, kv_chunk_size=3, block_size=4, kv_cache_tokens=1024)
UNIT = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("overlap-llama")
    hf = make_checkpoint(
        path,
        "llama",
        {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
        seed=21,
    )
    return path, hf


def prompts() -> tuple[list[int], list[list[int]]]:
    """A first prompt, then four that share 0, 30, 61 and all 80 of its first 80 tokens (a
    prefix that is cached only in whole units of 24: 24, 48 and 72 tokens)."""
    g = torch.Generator().manual_seed(5)
    first = torch.randint(2, 258, (80,), generator=g).tolist()
    later = []
    for shared, extra in ((0, 20), (30, 9), (61, 40), (80, 5)):
        later.append(first[:shared] + torch.randint(2, 258, (extra,), generator=g).tolist())
    return first, later


@pytest.fixture(scope="module")
def hf_tokens(ckpt):
    from tests.test_model_parity import hf_greedy

    _, hf = ckpt
    first, later = prompts()
    return [hf_greedy(hf, p, NEW_TOKENS) for p in [first, *later]]


def generate(path, **engine_args):
    """Greedy tokens of the first prompt, then of the later ones (so the first one's blocks
    are cached by then); the engine's stats after."""
    first, later = prompts()
    with LLM(path, device="cpu", max_num_batched_tokens=40, **NODES, **engine_args) as llm:
        outs = llm.generate([first], GREEDY, use_tqdm=False)
        outs += llm.generate(later, GREEDY, use_tqdm=False)
        stats = llm.engine.stats
        nodes = llm.engine.attention_node_stats()
        computed = llm.engine.compute_node_stats()
    return [o.outputs[0].token_ids for o in outs], stats, nodes, computed


CASES = [
    (transport, alpha, m, caching)
    for transport in ("in-process", "distributed")
    for alpha in (1, 2)
    for m in (1, 2, 3)
    for caching in (False, True)
]


@pytest.mark.parametrize("transport, alpha, m, caching", CASES)
def test_micro_batches_and_prefix_caching_match_transformers(
    transport, alpha, m, caching, ckpt, hf_tokens
):
    path, _ = ckpt
    got, stats, nodes, computed = generate(
        path,
        attention_transport=transport,
        compute_nodes=alpha,
        node_microbatches=m,
        enable_prefix_caching=caching,
    )
    assert got == hf_tokens
    # Hits only in whole units: 24 + 48 + 72 of the shared 0, 30, 61 and 80 tokens.
    assert stats.prefix_cache_hit_tokens == (24 + 48 + 72 if caching else 0)
    assert stats.blocks_in_use == 0
    assert all(n.blocks_in_use == 0 and n.sequences == 0 for n in nodes)
    assert len(computed) == alpha
    if transport == "distributed":
        # Every step blocked on the nodes' answers for a while, and the nodes on the
        # compute side's messages.
        assert all(c.wait_on_nodes_us > 0 for c in computed)
        assert all(n.wait_on_compute_us > 0 for n in nodes)
        assert not child_pids()


@pytest.mark.parametrize("m", [2, 3])
def test_steps_run_in_micro_batches(m, ckpt):
    """A step of several sequences really is cut into min(m, sequences) micro-batches."""
    path, _ = ckpt
    first, later = prompts()
    with LLM(
        path,
        device="cpu",
        attention_transport="in-process",
        node_microbatches=m,
        **NODES,
    ) as llm:
        engine = llm.engine
        for i, p in enumerate(later[:3]):
            engine.add_request(str(i), p, GREEDY)
        engine.step()  # the three prefills
        assert [p.index for p in engine.runner.attention.parts] == list(range(min(m, 3)))
        engine.add_request("last", first, GREEDY)
        engine.step()
        node = engine.runner.attention.local_nodes()[0]
        assert node.num_micro_batches == min(m, 4)


def test_micro_batches_are_whole_sequences_balanced_by_tokens():
    step = StepInputs(
        input_ids=torch.zeros(3 + 100 + 1 + 1, dtype=torch.long),
        positions=torch.arange(105),
        decode_tables=torch.zeros(3, 1, dtype=torch.long),
        decode_lens=torch.tensor([5, 6, 7]),
        prefill_meta=torch.tensor([[100, 100], [1, 1], [1, 1]]),
        prefill_tables=[torch.zeros(1, dtype=torch.long)] * 3,
        sample_rows=torch.tensor([0, 1, 2, 102, 103, 104]),
        seq_ids=torch.arange(6),
    )
    rows = lambda mbs: [(mb.rows.start, mb.rows.stop) for mb in mbs]  # noqa: E731
    assert rows(step.micro_batches(1)) == [(0, 105)]
    # The long prefill closes the first micro-batch; the rest share the others.
    assert rows(step.micro_batches(2)) == [(0, 103), (103, 105)]
    assert rows(step.micro_batches(3)) == [(0, 103), (103, 104), (104, 105)]
    assert len(step.micro_batches(16)) == 6  # never more than the sequences
    part = step.select(step.micro_batches(3)[1])
    assert part.seq_ids.tolist() == [4] and part.sample_rows.tolist() == [0]
    assert part.num_decodes == 0 and part.token_counts() == [1]


def test_a_node_answers_micro_batches_exactly_as_one_step():
    """The node's plans per micro-batch give the same (out, lse) rows as one plan."""
    rs = RShard(2, 3)

    def node():
        return AttentionNode(
            0, rs, 1, 16, 4, 1, 8, torch.float32, torch.device("cpu"), 0.5, (None,)
        )

    long = dict(dtype=torch.long)
    step = StepInputs(
        input_ids=torch.zeros(12, **long),
        positions=torch.cat([torch.arange(5), torch.arange(7)]),
        decode_tables=torch.zeros(0, 0, **long),
        decode_lens=torch.zeros(0, **long),
        prefill_meta=torch.tensor([[5, 5], [7, 7]]),
        prefill_tables=[torch.tensor([0, 1]), torch.tensor([2, 3])],
        sample_rows=torch.tensor([4, 11]),
        seq_ids=torch.tensor([1, 2]),
    )
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 2, 8, generator=g)
    k, v = torch.randn(12, 1, 8, generator=g), torch.randn(12, 1, 8, generator=g)
    whole = node()
    whole.begin_step(step)
    own = whole.owned_rows(step.positions)
    out, lse = whole.attend(0, q, k[own], v[own])
    split = node()
    micro = step.micro_batches(2)
    split.begin_step(step, micro)
    for i, mb in enumerate(micro):
        rows = torch.arange(mb.rows.start, mb.rows.stop)
        mine = rows[split.owned_rows(step.positions[rows])]
        part_out, part_lse = split.attend(0, q[rows], k[mine], v[mine], i)
        torch.testing.assert_close(part_out, out[rows], rtol=0, atol=0)
        torch.testing.assert_close(part_lse, lse[rows], rtol=0, atol=0)


def test_node_block_spans_and_prefix_units():
    """A block's hash covers the tokens up to where the last node fills it; hits come in
    whole units where every node holds whole blocks."""
    rs = RShard(2, 3)
    budget = NodeBlockBudget(64, 4, rs, enable_prefix_caching=True)
    assert budget.prefix_unit == UNIT and budget.hit_unit_blocks == 3
    ends = [budget.block_span(j)[1] for j in range(6)]
    for j, end in enumerate(ends):
        # Node 1 fills its block j exactly at ``end``: it holds 4 (j + 1) tokens then.
        assert rs.count(end, 1) == 4 * (j + 1) and rs.count(end - 1, 1) == 4 * (j + 1) - 1
        assert all(rs.count(end, s) >= 4 * (j + 1) for s in range(2))
    assert ends[2] == UNIT and ends[5] == 2 * UNIT
    assert [budget.block_span(j)[0] for j in range(1, 6)] == ends[:-1]
    assert budget.cacheable_tokens(71) == 48
    # One node: any whole block is a unit, and spans are the plain blocks.
    single = NodeBlockBudget(64, 4, RShard(1, 3), enable_prefix_caching=True)
    assert single.prefix_unit == 4 and single.hit_unit_blocks == 1
    assert [single.block_span(j) for j in range(3)] == [(0, 4), (4, 8), (8, 12)]
    for beta, chunk, bs in [(2, 3, 4), (3, 5, 2), (4, 1, 16), (3, 16, 16)]:
        rs = RShard(beta, chunk)
        for j in range(20):  # the integer formula is the last shard's position + 1
            last = torch.tensor((j + 1) * bs - 1)
            assert rs.block_end(j, bs) == int(rs.global_position(last, beta - 1)) + 1


def test_a_node_refuses_a_new_sequence_that_starts_inside_a_prefix_unit():
    rs = RShard(2, 3)
    node = AttentionNode(0, rs, 1, 16, 4, 1, 8, torch.float32, torch.device("cpu"), 0.5, (None,))
    node.begin_step(prefill_step(seq_id=3, length=4, table=[5, 6, 7, 8], start=UNIT))  # a hit
    assert node.stats.kv_tokens == rs.count(UNIT + 4, 0)
    with pytest.raises(AttentionNodeError, match="cached-prefix boundary"):
        node.begin_step(prefill_step(seq_id=4, length=4, table=[5, 6, 7], start=20))


@pytest.mark.parametrize("transport", ["in-process", "distributed"])
def test_preemption_and_abort_release_node_blocks_with_caching_and_micro_batches(transport, ckpt):
    """Node pools too small for every sequence at once, a shared prefix, two micro-batches:
    preempted sequences come back (possibly through the prefix cache) with the same tokens,
    and nothing is left in use on any node after an abort."""
    path, _ = ckpt
    first, later = prompts()

    def abort_one(engine) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        engine.add_request("gone", first, params)
        engine.step()
        engine.step()
        engine.abort("gone")
        engine.step()
        assert engine.stats.blocks_in_use == 0
        assert all(n.blocks_in_use == 0 for n in engine.attention_node_stats())

    want, got = generate_under_preemption(
        path,
        [first, *later],
        30,
        check=abort_one,
        attention_transport=transport,
        node_microbatches=2,
        **{**NODES, "kv_cache_tokens": 120},
    )
    assert got == want


# -- the transport by device --
def test_the_nccl_link_needs_both_sides_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    check_attention_link("gloo", cpu, None)
    check_attention_link("gloo", cuda, "cpu")  # pinned host buffers
    check_attention_link("nccl", cuda, None)
    with pytest.raises(ParamError, match=r"attention_link='nccl'.*compute on cpu"):
        check_attention_link("nccl", cpu, None)
    with pytest.raises(ParamError, match="attention nodes on cpu"):
        check_attention_link("nccl", cuda, "cpu")


def test_nccl_link_is_refused_before_anything_starts_on_cpu(ckpt):
    path, _ = ckpt
    with pytest.raises(ParamError, match="attention_link"):
        LLM(path, device="cpu", attention_nodes=1, attention_link="nccl")
    with pytest.raises(ParamError, match="needs attention_nodes ≥ 1 with attention_transport"):
        LLM(path, device="cpu", attention_nodes=1, attention_link="nccl", **IN_PROCESS)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_cuda_compute_with_cpu_attention_nodes_over_pinned_gloo(ckpt):
    """The compute rank on the GPU, two attention-node ranks on the CPU: messages staged in
    pinned host memory. The same tokens as the single-GPU engine."""
    path, _ = ckpt
    first, later = prompts()
    batch = [first, *later]
    with LLM(path, device="cuda", dtype="float32", enforce_eager=True) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    with LLM(
        path,
        device="cuda",
        dtype="float32",
        attention_device="cpu",
        node_microbatches=2,
        **NODES,
    ) as llm:
        links = llm.engine.runner.attention.links
        assert all(link.pin and not link.on_device for link in links)
        got = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    assert got == want


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL point-to-point needs a GPU per rank (2)",
)
def test_cuda_attention_node_over_nccl(ckpt):
    """Compute rank on GPU 0, its attention node on GPU 1: tensors device to device."""
    path, _ = ckpt
    first, later = prompts()
    batch = [first, *later]
    with LLM(path, device="cuda", dtype="float32", enforce_eager=True) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    one_node = {**NODES, "attention_nodes": 1, "attention_link": "nccl"}
    with LLM(path, device="cuda", dtype="float32", **one_node) as llm:
        assert all(link.on_device for link in llm.engine.runner.attention.links)
        got = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    assert got == want


def test_a_compute_node_waiting_for_a_post_nobody_will_make_fails_loudly():
    """In-process: compute node 0 collects an answer that needs compute node 1's post, and
    compute node 1 is not running: a full round of turns passes with nothing posted."""
    rs = RShard(1, 4)
    node = AttentionNode(0, rs, 1, 8, 4, 1, 8, torch.float32, torch.device("cpu"), 0.5, (None,))
    lock = Lockstep()
    shared = SharedNode(node, lock.pass_turn)
    step = prefill_step(seq_id=1, length=4, table=[0])
    step.row_groups = torch.tensor([0, 0, 1, 1])  # rows on compute nodes 0 and 1
    shared.begin_step(step, step.micro_batches(1))

    def compute_node_0():
        q, kv = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
        shared.post(0, 0, 0, q, kv, kv)
        return shared.collect(0, 0)

    with pytest.raises(RuntimeError, match="which no other compute node will post"):
        lock.run({0: compute_node_0})

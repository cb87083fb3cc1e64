"""Attention nodes (second design figure): the KV cache R-sharded over β nodes per head group,
partial attention (out, lse) on each node and an exact merge on the compute node.

Oracles: full softmax attention in float64 for the primitive; the single-node engine and
transformers for whole generations.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.attention.node import AttentionNode
from shardlm.attention.reference import (
    batched_partial_attention,
    merge_partials,
    partial_attention,
    visibility_mask,
)
from shardlm.cache.rshard import RShard
from shardlm.errors import WorkerFailure
from shardlm.step_inputs import StepInputs
from tests.conftest import make_checkpoint
from tests.test_tensor_parallel import SHARDLM, TORCHRUN, child_pids, cli_generate, finish

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
IN_PROCESS = dict(attention_transport="in-process")


# -- the primitive --
def full_attention(q, k, v, scale, visible):
    """Softmax attention in float64 over all keys (GQA by repeating KV heads)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
@pytest.mark.parametrize("window", [None, 5])
def test_merge_of_partials_is_exact(num_shards, window):
    g = torch.Generator().manual_seed(num_shards)
    tq, tk, hq, hkv, d = 6, 40, 8, 2, 16
    q = torch.randn(tq, hq, d, generator=g) * 3  # large scores: lse must do its job
    k = torch.randn(tk, hkv, d, generator=g) * 3
    v = torch.randn(tk, hkv, d, generator=g)
    q_pos = torch.arange(tk - tq, tk)
    kv_pos = torch.arange(tk)
    visible = visibility_mask(q_pos, kv_pos, window)
    expected = full_attention(q, k, v, 0.25, visible)
    # Keys dealt to shards at random. With ≥ 3 shards the last one gets nothing at all and,
    # under a window, shard 0 gets exactly the keys no query may see (fully masked).
    owner = torch.randint(0, num_shards, (tk,), generator=g)
    masked_shard = num_shards >= 3 and window is not None
    if num_shards >= 3:
        owner[owner == num_shards - 1] = 1
    if masked_shard:
        unseen = kv_pos <= q_pos[0] - window
        owner[owner == 0] = 1
        owner[unseen] = 0
    outs, lses = [], []
    for s in range(num_shards):
        keys = owner == s
        out, lse = partial_attention(q, k[keys], v[keys], 0.25, visible[:, keys])
        outs.append(out)
        lses.append(lse)
        if not keys.any() or (s == 0 and masked_shard):
            assert torch.isneginf(lse).all() and (out == 0).all()
    out, lse = merge_partials(outs, lses)
    rel = (out.double() - expected).norm() / expected.norm()
    assert rel < 1e-5, rel
    assert torch.isfinite(lse).all()


def test_shard_with_every_key_masked_returns_minus_infinity():
    q = torch.randn(3, 4, 8)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    out, lse = partial_attention(q, k, v, 0.3, torch.zeros(3, 5, dtype=torch.bool))
    assert torch.isneginf(lse).all() and (out == 0).all()
    # Merged with a shard that sees something, the empty one changes nothing.
    out2, lse2 = partial_attention(q, k, v, 0.3, torch.ones(3, 5, dtype=torch.bool))
    merged, merged_lse = merge_partials([out, out2], [lse, lse2])
    torch.testing.assert_close(merged, out2, rtol=0, atol=0)
    torch.testing.assert_close(merged_lse, lse2, rtol=0, atol=0)


def test_batched_partial_attention_matches_per_sequence():
    g = torch.Generator().manual_seed(3)
    b, length, hq, hkv, d = 4, 11, 6, 3, 8
    q = torch.randn(b, hq, d, generator=g)
    k = torch.randn(b, length, hkv, d, generator=g)
    v = torch.randn(b, length, hkv, d, generator=g)
    visible = torch.rand(b, length, generator=g) < 0.6
    visible[2] = False  # a sequence with nothing visible on this node
    out, lse = batched_partial_attention(q, k, v, 0.2, visible)
    for i in range(b):
        ref_out, ref_lse = partial_attention(q[i : i + 1], k[i], v[i], 0.2, visible[i][None])
        torch.testing.assert_close(out[i], ref_out[0])
        torch.testing.assert_close(lse[i], ref_lse[0])
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()


@pytest.mark.parametrize("beta, chunk", [(1, 1), (1, 16), (2, 1), (2, 5), (3, 5), (3, 16)])
def test_rshard_ownership_and_local_indices(beta, chunk):
    rs = RShard(beta, chunk)
    pos = torch.arange(300)
    owner = rs.owner(pos)
    assert (owner == (pos // chunk) % beta).all()
    for s in range(beta):
        mine = pos[owner == s]
        # Local index i (dense, in arrival order) ↔ the i-th position the shard owns.
        assert (rs.global_position(torch.arange(mine.numel()), s) == mine).all()
        for length in range(0, 300, 7):
            assert rs.count(length, s) == int((owner[:length] == s).sum())
    for capacity in range(40):
        n = rs.max_length(capacity)
        assert rs.count(n, 0) <= capacity < rs.count(n + 1, 0)


# -- whole generations --
@pytest.fixture(scope="module")
def node_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("nodes-llama")
    hf = make_checkpoint(
        path,
        "llama",
        {"num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4200},
        seed=11,
    )
    return path, hf


def prompts() -> list[list[int]]:
    """One prompt shorter than β·c for every grid point (3 < 1·5), some longer (40, 70)."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 258, (n,), generator=g).tolist() for n in (40, 3, 70)]


@pytest.fixture(scope="module")
def reference_tokens(node_ckpt):
    from tests.test_model_parity import hf_greedy

    path, hf = node_ckpt
    with LLM(path, device="cpu") as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)]
    assert ref == [hf_greedy(hf, p, 64) for p in prompts()]  # the single node is right
    return ref


def generate(path, **engine_args) -> list[list[int]]:
    with LLM(path, device="cpu", **engine_args) as llm:
        outs = llm.generate(prompts(), GREEDY, use_tqdm=False)
        held = llm.engine.attention_node_stats()
    assert len(held) == engine_args.get("tensor_parallel_size", 1) * engine_args["attention_nodes"]
    assert all(n.kv_tokens == 0 and n.blocks_in_use == 0 for n in held)  # nothing leaks
    return [o.outputs[0].token_ids for o in outs]


GRID = [(beta, chunk) for beta in (1, 2, 3) for chunk in (1, 5, 16)]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("beta, chunk", GRID)
def test_in_process_nodes_match_single_node(beta, chunk, tp, node_ckpt, reference_tokens):
    path, _ = node_ckpt
    got = generate(
        path, attention_nodes=beta, kv_chunk_size=chunk, tensor_parallel_size=tp, **IN_PROCESS
    )
    assert got == reference_tokens


# Distributed nodes cost processes: the whole grid at TP 1, its diagonal at TP 2.
DISTRIBUTED = [(beta, chunk, 1) for beta, chunk in GRID] + [(1, 16, 2), (2, 5, 2), (3, 1, 2)]


@pytest.mark.parametrize("beta, chunk, tp", DISTRIBUTED)
def test_distributed_nodes_match_single_node(beta, chunk, tp, node_ckpt, reference_tokens):
    path, _ = node_ckpt
    got = generate(path, attention_nodes=beta, kv_chunk_size=chunk, tensor_parallel_size=tp)
    assert got == reference_tokens
    assert not child_pids()


def generate_under_preemption(path, batch, max_tokens, check=None, **node_args):
    """Greedy tokens of ``batch`` from the plain engine, then from one with ``node_args``
    (node pools too small for every sequence at once): both lists, after checking the node
    run preempted, ran ``check(engine)`` if given, and left no KV on any node."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(path, device="cpu", max_num_batched_tokens=24) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    with LLM(path, device="cpu", max_num_batched_tokens=24, **node_args) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
        assert llm.engine.stats.preemptions > 0
        if check is not None:
            check(llm.engine)
        assert all(n.kv_tokens == 0 for n in llm.engine.attention_node_stats())
    return want, got


@pytest.mark.parametrize("transport", ["in-process", "distributed"])
def test_sliding_window_chunked_prefill_and_preemption(transport, checkpoints):
    """Mistral's sliding window seen through global positions on every node; prompts split
    into several prefill chunks; a pool so small that sequences get preempted and their
    node KV released and recomputed."""
    path, _ = checkpoints["mistral-sliding"]
    g = torch.Generator().manual_seed(9)
    batch = [torch.randint(2, 258, (n,), generator=g).tolist() for n in (50, 33, 20, 7)]
    want, got = generate_under_preemption(
        path,
        batch,
        40,
        attention_nodes=3,
        kv_chunk_size=5,
        kv_cache_tokens=64,  # each node; four sequences of ~80 tokens need ~110 per node
        attention_transport=transport,
    )
    assert got == want


@pytest.mark.parametrize("transport", ["in-process", "distributed"])
def test_beta_nodes_serve_a_context_no_single_node_could_hold(transport, node_ckpt):
    path, _ = node_ckpt
    per_node, beta = 96, 3
    context = int(0.9 * beta * per_node) + 1  # 260 tokens on nodes of 96
    prompt = list(range(2, 202))
    params = SamplingParams(temperature=0.0, max_tokens=context - len(prompt), ignore_eos=True)
    single = LLM(path, device="cpu", kv_cache_tokens=per_node)
    with single, pytest.raises(ValueError, match="KV cache holds only 96"):
        single.generate([prompt + list(range(2, 60))], params, use_tqdm=False)
    with LLM(
        path,
        device="cpu",
        kv_cache_tokens=per_node,
        attention_nodes=beta,
        kv_chunk_size=5,
        attention_transport=transport,
    ) as llm:
        before_last, generated = None, 0
        for event in llm.stream(prompt, params):
            generated += len(event.token_ids)
            if event.finish_reason is None:
                before_last = llm.engine.attention_node_stats()
        assert event.finish_reason == "length"
        assert len(prompt) + generated == context >= 0.9 * beta * per_node
        # After sampling token j the nodes hold the prompt and tokens 1..j-1: one event
        # before the end, context - 2 tokens, spread evenly and each node within its pool.
        held = [n.kv_tokens for n in before_last]
        assert sum(held) == context - 2
        assert max(held) <= per_node
        assert max(held) - min(held) <= 5  # at most one chunk apart


@pytest.mark.parametrize("transport", ["in-process", "distributed"])
def test_bytes_per_decode_step_do_not_grow_with_the_context(transport, node_ckpt):
    path, _ = node_ckpt
    per_step = {}
    with LLM(
        path, device="cpu", attention_nodes=2, kv_chunk_size=16, attention_transport=transport
    ) as llm:
        engine = llm.engine
        for context in (100, 4000):
            prompt = [2 + i % 250 for i in range(context)]
            engine.add_request(str(context), prompt, SamplingParams(max_tokens=8, ignore_eos=True))
            seen = set()
            while engine.has_unfinished_requests():
                engine.step()
                traffic = engine.attention_traffic
                if engine.stats.num_running and engine.scheduler.running[0].num_output_tokens > 1:
                    seen.add((traffic.last_step_bytes_to_nodes, traffic.last_step_bytes_from_nodes))
            per_step[context] = seen
    assert len(per_step[100]) == 1  # the same bytes every decode step
    assert per_step[100] == per_step[4000]
    (to_nodes, from_nodes) = per_step[100].pop()
    layers, hq, hkv, d = 2, 8, 2, 8
    # Per layer: q to both nodes, one new k and v to its owner; out (float32) + lse back.
    assert to_nodes == layers * (2 * hq * d + 2 * hkv * d) * 4
    assert from_nodes == layers * 2 * (hq * d + hq) * 4


def test_abort_releases_node_kv(node_ckpt):
    path, _ = node_ckpt
    with LLM(path, device="cpu", attention_nodes=2, kv_chunk_size=5, **IN_PROCESS) as llm:
        engine = llm.engine
        engine.add_request("a", list(range(2, 60)), GREEDY)
        for _ in range(3):
            engine.step()
        assert sum(n.kv_tokens for n in engine.attention_node_stats()) == 58 + 2
        engine.abort("a")
        engine.step()
        assert all(n.kv_tokens == 0 and n.sequences == 0 for n in engine.attention_node_stats())


def prefill_step(seq_id: int, length: int, table: list[int], start: int = 0) -> StepInputs:
    """One sequence's prefill chunk [start, start + length) as the driver sends it."""
    long = dict(dtype=torch.long)
    return StepInputs(
        input_ids=torch.zeros(length, **long),
        positions=torch.arange(start, start + length),
        decode_tables=torch.zeros(0, 0, **long),
        decode_lens=torch.zeros(0, **long),
        prefill_meta=torch.tensor([[length, start + length]]),
        prefill_tables=[torch.tensor(table, **long)],
        sample_rows=torch.tensor([length - 1]),
        seq_ids=torch.tensor([seq_id]),
    )


def test_node_takes_a_step_again_after_an_interrupted_one():
    """A step the compute side abandoned half-way (error, Ctrl-C) runs again: the node drops
    what it took in and gives the same answer."""
    rs = RShard(2, 3)
    node = AttentionNode(1, rs, 1, 4, 2, 1, 8, torch.float32, torch.device("cpu"), 0.5, (None,))
    positions = torch.arange(10)
    own = node.owned_rows(positions)
    q = torch.randn(10, 2, 8)
    k, v = torch.randn(own.numel(), 1, 8), torch.randn(own.numel(), 1, 8)
    step = prefill_step(seq_id=7, length=10, table=[3, 1, 2])
    node.begin_step(step)
    first = node.attend(0, q, k, v)
    node.begin_step(step)  # the same step again
    again = node.attend(0, q, k, v)
    torch.testing.assert_close(first, again)
    # Node 1 holds positions 3, 4, 5 and 9 of the 10: the first two blocks of the table.
    assert node.stats.kv_tokens == rs.count(10, 1) == 4 and node.stats.blocks_in_use == 2


def test_attention_node_failure_is_reported_by_name(node_ckpt):
    path, _ = node_ckpt
    timeout = 5.0
    llm = LLM(path, device="cpu", attention_nodes=2, kv_chunk_size=5, tp_timeout_s=timeout)
    node = llm.engine.workers.processes[1]  # rank 2: attention node 1 of head group 0
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)

    def strike() -> None:
        time.sleep(0.5)
        os.kill(node.pid, signal.SIGKILL)

    threading.Thread(target=strike).start()
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match="attention node 1 of head group 0 \\(rank 2\\)"):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert time.monotonic() - start < 0.5 + timeout + 10
    llm.shutdown()
    assert not child_pids()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention_nodes=-1), "attention_nodes must be an integer in \\[0, 1024\\]"),
        (dict(attention_nodes=2, kv_chunk_size=0), "kv_chunk_size must be an integer"),
        (dict(attention_nodes=2, attention_transport="tcp"), "attention_transport must be one"),
        (dict(attention_device="cpu"), "attention_device needs attention_nodes"),
        (dict(attention_nodes=1, attention_device="tpu"), "attention_device: device 'tpu'"),
    ],
)
def test_bad_attention_node_arguments(kwargs, message, node_ckpt):
    with pytest.raises(ValueError, match=message):
        LLM(node_ckpt[0], device="cpu", **kwargs)


def test_cli_and_torchrun_attention_nodes_give_the_same_text(node_ckpt):
    path, _ = node_ckpt
    plain = finish(cli_generate(path, SHARDLM))
    nodes = finish(cli_generate(path, SHARDLM, ["--attention-nodes", "2", "--kv-chunk-size", "3"]))
    assert nodes == plain
    # torchrun places the nodes: WORLD_SIZE 3 = 1 compute rank + 2 attention nodes.
    launcher = [*TORCHRUN, "--standalone", "--nproc-per-node", "3", "-m", "shardlm"]
    assert finish(cli_generate(path, launcher, ["--attention-nodes", "2"])) == plain
    bad = cli_generate(path, SHARDLM, ["--attention-nodes", "2", "--kv-chunk-size", "0"])
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2
    assert "kv_chunk_size must be an integer" in err and "Traceback" not in err

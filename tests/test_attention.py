"""The attention primitive: partial attention (out, lse), exact merges, the SDPA fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardlm.attention import merge_partials, partial_attention, visibility_mask
from shardlm.attention.contiguous import ContiguousAttention
from shardlm.cache.contiguous import ContiguousKVCache


def naive(q, k, v, scale, visible):
    """Textbook softmax attention, one head at a time, for comparison."""
    tq, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(tq, hq, d, dtype=torch.float64)
    for h in range(hq):
        s = (q[:, h].double() @ k[:, h // group].double().T) * scale
        s = s.masked_fill(~visible, float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ v[:, h // group].double()
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_partial_attention_matches_naive_softmax(hq, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, hq, 8, generator=g)
    k = torch.randn(9, hkv, 8, generator=g)
    v = torch.randn(9, hkv, 8, generator=g)
    visible = visibility_mask(torch.arange(4, 9), torch.arange(9))
    out, lse = partial_attention(q, k, v, 0.3, visible)
    torch.testing.assert_close(out.double(), naive(q, k, v, 0.3, visible), rtol=1e-5, atol=1e-5)
    assert lse.shape == (5, hq)


def test_merge_of_token_shards_is_exact_including_empty_shards():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 16, generator=g)
    k = torch.randn(20, 2, 16, generator=g)
    v = torch.randn(20, 2, 16, generator=g)
    q_pos, kv_pos = torch.arange(17, 20), torch.arange(20)
    whole, whole_lse = partial_attention(q, k, v, 0.25, visibility_mask(q_pos, kv_pos))
    # R-shard the keys round-robin in chunks of 4 over 3 shards; a 4th shard holds keys no
    # query may see (positions beyond every query), so its lse must be -inf.
    outs, lses = [], []
    for shard in range(3):
        idx = torch.tensor([p for p in range(20) if (p // 4) % 3 == shard])
        o, lse_s = partial_attention(q, k[idx], v[idx], 0.25, visibility_mask(q_pos, kv_pos[idx]))
        outs.append(o)
        lses.append(lse_s)
    future = torch.tensor([50, 51])
    o, lse_s = partial_attention(q, k[:2], v[:2], 0.25, visibility_mask(q_pos, future))
    assert torch.isneginf(lse_s).all() and (o == 0).all()
    outs.append(o)
    lses.append(lse_s)
    out, lse = merge_partials(outs, lses)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-5, atol=1e-5)


def test_merge_of_only_empty_shards_gives_zero_and_minus_inf():
    outs = torch.zeros(2, 1, 2, 4)
    lses = torch.full((2, 1, 2), float("-inf"))
    out, lse = merge_partials(outs, lses)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("start,n", [(0, 6), (6, 1), (4, 3)])
def test_contiguous_sdpa_path_matches_reference(window, start, n):
    """The fast path (cache write + SDPA) against partial_attention over the same keys."""
    g = torch.Generator().manual_seed(2)
    hq, hkv, d = 4, 2, 8
    cache = ContiguousKVCache(1, hkv, d, 16, torch.float32, "cpu")
    attn = ContiguousAttention(cache, 0.35, (window,))
    keys = torch.randn(start + n, hkv, d, generator=g)
    vals = torch.randn(start + n, hkv, d, generator=g)
    if start:
        attn.begin_chunk(0, start)
        attn.attend(0, torch.randn(start, hq, d, generator=g), keys[:start], vals[:start])
    q = torch.randn(n, hq, d, generator=g)
    attn.begin_chunk(start, n)
    fast = attn.attend(0, q, keys[start:], vals[start:])
    visible = visibility_mask(torch.arange(start, start + n), torch.arange(start + n), window)
    ref, _ = partial_attention(q, keys, vals, 0.35, visible)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_visibility_mask_sliding_window():
    m = visibility_mask(torch.tensor([5]), torch.arange(8), sliding_window=3)
    assert m[0].tolist() == [False, False, False, True, True, True, False, False]


def test_sdpa_agrees_with_reference_without_mask():
    q, k, v = torch.randn(1, 2, 4), torch.randn(6, 2, 4), torch.randn(6, 2, 4)
    ref, _ = partial_attention(q, k, v, 0.5, None)
    fast = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=0.5
    ).transpose(0, 1)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_paged_backend_matches_paged_reference():
    """The engine's batched paged attention vs paged_partial_attention per sequence:
    two decodes of different lengths and one prefill chunk continuing a cached prefix."""
    from shardlm.attention.paged import (
        PagedAttention,
        PagedStep,
        PrefillChunk,
        paged_partial_attention,
        sequence_slots,
    )
    from shardlm.cache.paged import PagedKVCache

    g = torch.Generator().manual_seed(3)
    bs, hq, hkv, d = 4, 4, 2, 8
    for window in (None, 5):
        cache = PagedKVCache(1, 16, bs, hkv, d, torch.float32, "cpu")
        cache.k.normal_(generator=g)
        cache.v.normal_(generator=g)
        attn = PagedAttention(cache, 0.3, (window,))
        tables = [torch.tensor([3, 7, 1]), torch.tensor([0, 9]), torch.tensor([5, 2, 11, 4])]
        lens = [10, 6]  # decode context lengths (including the new token)
        chunk_start, chunk_len = 7, 6  # prefill chunk: positions 7..12 of sequence 2
        slots_d = [sequence_slots(t, n, bs) for t, n in zip(tables[:2], lens, strict=True)]
        lmax = max(lens)
        padded = torch.stack([torch.cat([s, s[:1].expand(lmax - len(s))]) for s in slots_d])
        chunk_slots = sequence_slots(tables[2], chunk_start + chunk_len, bs)
        step = PagedStep(
            slot_mapping=torch.cat([padded[0, 9:10], padded[1, 5:6], chunk_slots[chunk_start:]]),
            num_decodes=2,
            decode_slots=padded,
            decode_context_lens=torch.tensor(lens),
            prefills=[PrefillChunk(2, 2 + chunk_len, chunk_start + chunk_len, chunk_slots)],
        )
        q = torch.randn(2 + chunk_len, hq, d, generator=g)
        k = torch.randn(2 + chunk_len, hkv, d, generator=g)
        v = torch.randn(2 + chunk_len, hkv, d, generator=g)
        attn.plan(step)
        fast = attn.attend(0, q, k, v)
        for i, n in enumerate(lens):
            ref, _ = paged_partial_attention(
                q[i : i + 1],
                torch.tensor([n - 1]),
                cache.k[0],
                cache.v[0],
                tables[i],
                n,
                bs,
                0.3,
                window,
            )
            torch.testing.assert_close(fast[i : i + 1], ref, rtol=1e-5, atol=1e-5)
        ref, _ = paged_partial_attention(
            q[2:],
            torch.arange(chunk_start, chunk_start + chunk_len),
            cache.k[0],
            cache.v[0],
            tables[2],
            chunk_start + chunk_len,
            bs,
            0.3,
            window,
        )
        torch.testing.assert_close(fast[2:], ref, rtol=1e-5, atol=1e-5)


def test_paged_step_turns_step_inputs_into_the_plan():
    """PagedAttention.begin_step's translation (paged_step) against a plan built by hand:
    two decodes (tables padded with block 0, as the driver sends them) and one prefill chunk
    continuing a cached prefix; then the Triton form (write slots only) and a static step."""
    from shardlm.attention.paged import paged_step, sequence_slots
    from shardlm.step_inputs import StepInputs

    bs = 4
    tables = [[3, 7, 1], [0, 9], [5, 2, 11, 4]]
    lens, chunk_start, chunk_len = [10, 6], 7, 6
    inputs = StepInputs(
        input_ids=torch.arange(2 + chunk_len),
        positions=torch.tensor([9, 5, *range(chunk_start, chunk_start + chunk_len)]),
        decode_tables=torch.tensor([tables[0], [*tables[1], 0]]),
        decode_lens=torch.tensor(lens),
        prefill_meta=torch.tensor([[chunk_len, chunk_start + chunk_len]]),
        prefill_tables=[torch.tensor(tables[2])],
        sample_rows=torch.tensor([0, 1, 7]),
        seq_ids=torch.tensor([4, 5, 6]),
    )
    slots = [
        sequence_slots(torch.tensor(t), n, bs) for t, n in zip(tables, [*lens, 13], strict=True)
    ]
    step = paged_step(inputs, bs)
    assert step.slot_mapping.tolist() == [slots[0][9], slots[1][5], *slots[2][7:13].tolist()]
    # The decodes' keys by whole blocks: ⌈10 / 4⌉ = 3 columns of the padded tables.
    assert step.decode_slots is None
    assert step.decode_blocks.tolist() == [[3, 7, 1], [0, 9, 0]]
    (chunk,) = step.prefills
    assert (chunk.start, chunk.end, chunk.context_len) == (2, 8, 13)
    assert chunk.slots.tolist() == slots[2].tolist()
    kernel = paged_step(inputs, bs, gather_decode_keys=False)  # the Triton kernel's form
    assert kernel.decode_slots is None and kernel.decode_blocks is None
    assert torch.equal(kernel.slot_mapping, step.slot_mapping)
    static = StepInputs.static_decodes(
        torch.tensor([1]),
        torch.tensor([0]),
        torch.tensor([0]),
        torch.tensor([99]),
        torch.zeros(1, 3, dtype=torch.long),
    )
    assert paged_step(static, bs, gather_decode_keys=False).slot_mapping.tolist() == [99]
    with pytest.raises(ValueError, match="needs the Triton decode kernel"):
        paged_step(static, bs)


def test_never_written_slots_cannot_poison_decodes(llama_ckpt):
    """The PyTorch decode path gathers whole blocks, so it reads slots past a sequence's
    length; the pool is torch.empty. With every slot NaN before the first request, the
    greedy tokens are still transformers'."""
    from shardlm import LLM, SamplingParams
    from tests.test_model_parity import hf_greedy

    path, hf = llama_ckpt
    prompts = [[5, 9, 13], list(range(20, 47))]  # lengths inside a block and past several
    with LLM(path, dtype="float32", device="cpu", block_size=8, attention_backend="torch") as llm:
        llm.engine.runner.kv_cache.k.fill_(float("nan"))
        llm.engine.runner.kv_cache.v.fill_(float("nan"))
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 10) for p in prompts]

"""Triton kernels against their PyTorch references, on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported). Skipped where triton is not installed.
On a GPU the same tests run the compiled kernels (set SHARDLM_KERNEL_DEVICE=cuda)."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("SHARDLM_KERNEL_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from shardlm.attention.paged import paged_partial_attention  # noqa: E402
from shardlm.kernels.decode_attention import paged_decode_attention  # noqa: E402
from shardlm.kernels.fused import add_rms_norm, rope_and_store, silu_and_mul  # noqa: E402
from shardlm.kernels.fused import rms_norm as fused_rms_norm  # noqa: E402
from shardlm.layers.activation import silu_and_mul as silu_and_mul_reference  # noqa: E402
from shardlm.layers.norm import rms_norm  # noqa: E402

# numpy, which runs the interpreter, has no bfloat16: half precision is float16 there.
HALF = [(torch.float16, 2e-3)] + ([(torch.bfloat16, 2e-2)] if DEVICE == "cuda" else [])


def make_pool(lens, block_size, hkv, d, dtype, seed=0):
    """A shuffled paged pool holding random K/V for sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    blocks_each = [-(-n // block_size) for n in lens]
    total = sum(blocks_each) + 3  # spare blocks that hold garbage
    order = torch.randperm(total, generator=g)
    k_pool = torch.randn(total * block_size, hkv, d, generator=g).to(dtype)
    v_pool = torch.randn(total * block_size, hkv, d, generator=g).to(dtype)
    width = max(blocks_each)
    # Entries past a sequence's blocks are garbage (as a batch's padded tables can be): the
    # kernel must never follow them.
    tables = torch.full((len(lens), width), 2**30, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_each):
        tables[i, :nb] = order[used : used + nb].to(torch.int32)
        used += nb
    return k_pool.to(DEVICE), v_pool.to(DEVICE), tables.to(DEVICE)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (3, 1, 24), (2, 2, 8)])
def test_decode_attention_equals_the_reference(splits, window, hq, hkv, d):
    block_size, lens = 4, [1, 7, 13, 4]
    k_pool, v_pool, tables = make_pool(lens, block_size, hkv, d, torch.float32)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    context = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out, lse = paged_decode_attention(
        q, k_pool, v_pool, tables, context, block_size, 0.3, window, splits, min_split_blocks=1
    )
    for i, n in enumerate(lens):
        ref_out, ref_lse = paged_partial_attention(
            q[i : i + 1],
            torch.tensor([n - 1], device=DEVICE),
            k_pool,
            v_pool,
            tables[i].long(),
            n,
            block_size,
            0.3,
            window,
        )
        torch.testing.assert_close(out[i], ref_out[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[i], ref_lse[0], rtol=1e-5, atol=1e-5)


def test_split_with_no_visible_key_is_merged_exactly():
    """Splits past the window see nothing (lse −inf, out 0), and so does a split beyond the
    last block: the merge must ignore them."""
    block_size, lens = 2, [9]
    k_pool, v_pool, tables = make_pool(lens, block_size, 1, 8, torch.float32)
    q = torch.randn(1, 2, 8).to(DEVICE)
    context = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    one, one_lse = paged_decode_attention(
        q, k_pool, v_pool, tables, context, block_size, 0.5, 3, num_splits=1
    )
    many, many_lse = paged_decode_attention(
        q, k_pool, v_pool, tables, context, block_size, 0.5, 3, num_splits=7, min_split_blocks=1
    )
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many_lse, one_lse, rtol=1e-5, atol=1e-5)


def test_wide_tables_padding_rows_and_int64_metadata():
    """What a CUDA-graph bucket feeds the kernel: tables as wide as max_model_len (stale
    entries past each sequence's blocks), int64 metadata, and padding rows (length 0) that
    must see nothing. Every split count gives the reference's answer."""
    block_size, lens = 4, [13, 2]
    k_pool, v_pool, tables = make_pool(lens, block_size, 2, 16, torch.float32)
    wide = torch.full((4, 40), 7, dtype=torch.long, device=DEVICE)  # 7: a real, stale block
    wide[:2, : tables.shape[1]] = tables.long()
    context = torch.tensor([*lens, 0, 0], dtype=torch.long, device=DEVICE)
    q = torch.randn(4, 4, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    narrow_out, narrow_lse = paged_decode_attention(
        q[:2], k_pool, v_pool, tables, context[:2], block_size, 0.25, num_splits=1
    )
    for splits in (1, 2, 5):
        out, lse = paged_decode_attention(
            q, k_pool, v_pool, wide, context, block_size, 0.25, None, splits, min_split_blocks=1
        )
        torch.testing.assert_close(out[:2], narrow_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:2], narrow_lse, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[2:], torch.zeros_like(out[2:]))
        assert torch.isneginf(lse[2:]).all()


def test_default_split_choice_follows_the_batch_not_the_context():
    from shardlm.kernels.decode_attention import choose_splits

    assert choose_splits(batch_heads=8, max_blocks=1000, sms=132, min_split_blocks=4) == 33
    assert choose_splits(batch_heads=512, max_blocks=1000, sms=132, min_split_blocks=4) == 1
    assert choose_splits(batch_heads=8, max_blocks=10, sms=132, min_split_blocks=4) == 2


def test_decode_attention_refuses_odd_block_sizes():
    k_pool, v_pool, tables = make_pool([3], 3, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="power-of-two block_size, got 3"):
        paged_decode_attention(
            torch.randn(1, 1, 8), k_pool, v_pool, tables, torch.tensor([3]), 3, 1.0
        )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), *HALF])
def test_add_rms_norm_equals_add_then_norm(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 48, generator=g).to(dtype).to(DEVICE)
    r = torch.randn(5, 48, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(48, generator=g).to(dtype).to(DEVICE)
    out, new_r = add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(new_r, x + r, rtol=0, atol=0)
    torch.testing.assert_close(out, rms_norm(x + r, w, 1e-6), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), *HALF])
def test_rms_norm_without_residual_equals_the_reference(dtype, tol):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 40, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(40, generator=g).to(dtype).to(DEVICE)
    torch.testing.assert_close(fused_rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), *HALF])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (3, 1, 24), (6, 6, 8)])
def test_rope_and_store_equals_rotary_then_cache_writes(dtype, tol, hq, hkv, d):
    """q rotated and returned; k rotated and v copied into the pool at each token's slot;
    every other slot untouched."""
    from shardlm.config import RopeConfig
    from shardlm.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(4)
    t, slots = 5, 32
    rotary = RotaryEmbedding(d, RopeConfig(theta=10000.0), 64, dtype).to(DEVICE)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype).to(DEVICE)
    positions = torch.tensor([0, 3, 17, 40, 63], device=DEVICE)
    slot_mapping = torch.tensor([9, 0, 31, 4, 20], device=DEVICE)
    k_pool = torch.randn(slots, hkv, d, generator=g).to(dtype).to(DEVICE)
    v_pool = torch.randn(slots, hkv, d, generator=g).to(dtype).to(DEVICE)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()

    q = rope_and_store(
        qkv, positions, rotary.cos, rotary.sin, slot_mapping, k_pool, v_pool, hq, hkv
    )

    qk = rotary(qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d), positions)
    k_ref[slot_mapping] = qk[:, hq:]
    v_ref[slot_mapping] = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    torch.testing.assert_close(q, qk[:, :hq], rtol=tol, atol=tol)
    torch.testing.assert_close(k_pool, k_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(v_pool, v_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), *HALF])
def test_silu_and_mul_equals_the_reference(dtype, tol):
    gate_up = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(0))
    gate_up = gate_up.to(dtype).to(DEVICE)  # 1500 columns: two programs per row, a ragged end
    torch.testing.assert_close(
        silu_and_mul(gate_up), silu_and_mul_reference(gate_up), rtol=tol, atol=tol
    )


@pytest.mark.skipif(DEVICE != "cuda", reason="needs ~9 GB of GPU memory")
def test_fused_kernels_index_past_two_to_the_31_elements():
    """Rows whose offsets pass 2³¹ elements (a long prefill of an 8B-sized MLP): 64-bit
    offsets, or the last rows read and write the wrong memory."""
    rows, inter = 75_000, 14_336  # rows · 2·inter > 2³¹
    gate_up = torch.randn(rows, 2 * inter, dtype=torch.bfloat16, device=DEVICE)
    out = silu_and_mul(gate_up)
    tail = gate_up[-4:]
    torch.testing.assert_close(out[-4:], silu_and_mul_reference(tail), rtol=2e-2, atol=2e-2)
    del gate_up, out
    x = torch.randn(600_000, 4096, dtype=torch.bfloat16, device=DEVICE)  # rows · 4096 > 2³¹
    w = torch.randn(4096, dtype=torch.bfloat16, device=DEVICE)
    normed = fused_rms_norm(x, w, 1e-5)
    torch.testing.assert_close(normed[-4:], rms_norm(x[-4:], w, 1e-5), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("variant", ["llama-gqa", "mistral-sliding", "qwen2-bias"])
def test_engine_with_the_triton_kernels_gives_the_same_tokens(checkpoints, variant):
    """Continuous batching (mixed lengths, decodes joining prefills) with the Triton kernels
    (decode attention, RoPE + KV write, add + RMSNorm, SiLU·mul): the same greedy tokens as
    the PyTorch path, sliding window and biases included."""
    from shardlm import LLM, SamplingParams

    path, _ = checkpoints[variant]
    prompts = ["abc", "a longer prompt, past a few blocks", "x" * 21]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def tokens(**kwargs) -> list[list[int]]:
        with LLM(path, dtype="float32", device=DEVICE, block_size=4, **kwargs) as llm:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert tokens(attention_backend="triton") == tokens(attention_backend="torch")


def test_triton_backend_is_refused_where_it_cannot_run(llama_ckpt, monkeypatch):
    from shardlm import LLM

    path, _ = llama_ckpt
    with pytest.raises(ValueError, match="needs a power-of-two block_size, got 12"):
        LLM(path, device="cpu", attention_backend="triton", block_size=12)
    with pytest.raises(ValueError, match="attention nodes compute with the reference"):
        LLM(path, device="cpu", attention_backend="triton", attention_nodes=2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA devices; on CPU only in Triton's interp"):
        LLM(path, device="cpu", attention_backend="triton")
    with pytest.raises(ValueError, match="must be one of auto, torch, triton, got 'flash'"):
        LLM(path, attention_backend="flash")

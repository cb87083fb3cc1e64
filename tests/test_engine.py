"""The serving engine: continuous batching, chunked prefill, preemption, prefix caching,
aborts, and full sampling, checked against running each request alone and transformers."""

from __future__ import annotations

import random

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.engine.llm_engine import LLMEngine

GREEDY = dict(temperature=0.0, ignore_eos=True)


def random_prompts(count: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 258) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


@pytest.fixture(scope="module")
def alone(llama_ckpt):
    """Reference: an engine with a roomy pool that runs one request at a time."""
    path, _ = llama_ckpt
    with LLM(path, device="cpu", kv_cache_tokens=4096) as llm:
        yield llm


def run_alone(llm: LLM, prompts, params_list) -> list[list[int]]:
    return [
        llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
        for p, params in zip(prompts, params_list, strict=True)
    ]


@pytest.mark.parametrize(
    "pool_tokens,max_batched",
    [(16384, 2048), (512, 256)],  # roomy; and so small that sequences must be preempted
)
def test_batched_greedy_equals_each_request_alone(llama_ckpt, alone, pool_tokens, max_batched):
    path, _ = llama_ckpt
    prompts = random_prompts(32, 1, 300, seed=0)
    rng = random.Random(1)
    params = [SamplingParams(max_tokens=rng.randint(4, 40), **GREEDY) for _ in prompts]
    expected = run_alone(alone, prompts, params)
    with LLM(
        path, device="cpu", kv_cache_tokens=pool_tokens, max_num_batched_tokens=max_batched
    ) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.stats
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert stats.blocks_in_use == 0
        if pool_tokens < 1000:
            assert stats.preemptions > 0
        else:
            assert stats.preemptions == 0


def test_every_block_returns_after_aborts_in_prefill_and_decode(llama_ckpt):
    path, _ = llama_ckpt
    engine = LLMEngine(
        path,
        device="cpu",
        kv_cache_tokens=2048,
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
    )
    prompts = random_prompts(6, 100, 200, seed=2)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=30, **GREEDY))
    finished = {}

    def step() -> None:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason

    step()  # r0 is mid-prefill (64-token budget, ≥100-token prompt)
    assert engine.requests["r0"].seqs[0].num_computed_tokens == 64
    assert engine.abort("r0")
    for _ in range(12):
        step()
    decoding = [
        rid
        for rid, r in engine.requests.items()
        if r.seqs[0].num_output_tokens > 0 and not r.seqs[0].is_finished
    ]
    assert decoding, "some request should be decoding by now"
    engine.abort(decoding[0])
    assert engine.blocks.num_used_blocks > 0
    while engine.has_unfinished_requests():
        step()
    assert finished["r0"] == "abort" and finished[decoding[0]] == "abort"
    assert len(finished) == 6
    assert engine.blocks.num_used_blocks == 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.abort("r0")  # already gone


def test_prefix_cache_prefills_only_the_uncached_tail(llama_ckpt):
    path, _ = llama_ckpt
    prefix = random_prompts(1, 200, 200, seed=3)[0]
    a, b = [*prefix, 7, 8, 9], [*prefix, 10, 11, 12, 13, 14]
    params = SamplingParams(max_tokens=8, **GREEDY)
    outs = {}
    for caching in (True, False):
        with LLM(path, device="cpu", kv_cache_tokens=4096, enable_prefix_caching=caching) as llm:
            llm.generate([a], params, use_tqdm=False)
            before = llm.engine.stats
            outs[caching] = llm.generate([b], params, use_tqdm=False)[0].outputs[0].token_ids
            after = llm.engine.stats
            prefilled = after.prefill_tokens - before.prefill_tokens
            hit = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
            if caching:
                cached = (200 // 16) * 16  # full blocks of the shared prefix
                assert hit == cached
                assert prefilled == len(b) - cached
            else:
                assert hit == 0 and prefilled == len(b)
    assert outs[True] == outs[False]


def test_chunked_prefill_keeps_decodes_flowing_and_matches(llama_ckpt, alone):
    path, _ = llama_ckpt
    engine = LLMEngine(path, device="cpu", kv_cache_tokens=4096, max_num_batched_tokens=32)
    short, long = [5, 6, 7], random_prompts(1, 400, 400, seed=4)[0]
    engine.add_request("short", short, SamplingParams(max_tokens=30, **GREEDY))
    engine.step()  # short prefilled, first token out
    engine.add_request("long", long, SamplingParams(max_tokens=5, **GREEDY))
    got: dict[str, list[int]] = {"short": [], "long": []}
    steps_with_short_token = 0
    steps = 0
    while engine.has_unfinished_requests():
        outs = {o.request_id: o for o in engine.step()}
        steps += 1
        for rid, o in outs.items():
            got[rid] += o.outputs[0].token_ids
        if "short" in outs and outs["short"].outputs[0].token_ids:
            steps_with_short_token += 1
        if steps == 13:  # the long prompt needs 400 / 31 ≈ 13 steps of prefill
            assert steps_with_short_token == 13
    expected = run_alone(
        alone, [short, long], [SamplingParams(max_tokens=n, **GREEDY) for n in (30, 5)]
    )
    # The first token of "short" came from the step before the loop.
    assert [got["short"], got["long"]] == [expected[0][1:], expected[1]]


def test_prompt_that_can_never_fit_fails_alone(llama_ckpt):
    path, _ = llama_ckpt
    engine = LLMEngine(path, device="cpu", kv_cache_tokens=64, block_size=16)
    engine.add_request("ok", [3, 4, 5], SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(ValueError, match="prompt has 100 tokens but the KV cache holds only 64"):
        engine.add_request("big", list(range(2, 102)), SamplingParams())
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == "ok" and outs[-1].finished
    # A sequence that outgrows the whole pool while running stops with "length".
    engine.add_request("grow", [3] * 40, SamplingParams(max_tokens=100, **GREEDY))
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            final = o
    assert final.outputs[0].finish_reason == "length"
    assert engine.blocks.num_used_blocks == 0


def test_seeded_sampling_is_independent_of_batch_composition(alone, llama_ckpt):
    path, _ = llama_ckpt
    target = [9, 8, 7, 6]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    solo = alone.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    with LLM(path, device="cpu", kv_cache_tokens=4096, seed=99) as llm:
        others = random_prompts(5, 3, 40, seed=5)
        mix = [
            SamplingParams(temperature=1.0, max_tokens=10),
            SamplingParams(temperature=0.7, seed=1, max_tokens=30),
            SamplingParams(max_tokens=5, **GREEDY),
            SamplingParams(temperature=1.2, presence_penalty=1.0, max_tokens=12),
            SamplingParams(temperature=1.0, top_k=5, max_tokens=20),
        ]
        outs = llm.generate([*others[:3], target, *others[3:]], [*mix[:3], params, *mix[3:]])
    assert outs[3].outputs[0].token_ids == solo


def test_n_samples_are_distinct_and_reproducible(alone):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    a = alone.generate([[4, 5, 6]], params, use_tqdm=False)[0]
    b = alone.generate([[4, 5, 6]], params, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3


@pytest.fixture(scope="module")
def ascii_llm(tmp_path_factory):
    """A random model whose LM head can only favour ASCII bytes, so its text is clean."""
    from shardlm.byte_tokenizer import BYTE_VOCAB_SIZE
    from tests.conftest import make_checkpoint

    path = tmp_path_factory.mktemp("ascii")
    hf = make_checkpoint(path, "llama", {}, seed=3)
    with torch.no_grad():
        hf.lm_head.weight[2 + 128 : BYTE_VOCAB_SIZE] = 0.0  # non-ASCII bytes: logit 0
        hf.lm_head.weight[:2] = 0.0  # and BOS / EOS
    hf.save_pretrained(path)
    with LLM(path, device="cpu", kv_cache_tokens=2048) as llm:
        yield llm


def test_stop_strings_cut_exactly_and_never_leak(ascii_llm):
    prompt = [5, 6, 7, 8]
    free = ascii_llm.generate([prompt], SamplingParams(max_tokens=60, **GREEDY), use_tqdm=False)
    text = free[0].outputs[0].text
    assert text.isascii() and len(text) == 60
    # A 3-character stop string that first occurs at index ≥ 8 (so it spans tokens).
    at = next(i for i in range(8, len(text) - 3) if text.find(text[i : i + 3]) == i)
    stop = text[at : at + 3]
    for include in (False, True):
        params = SamplingParams(
            max_tokens=60,
            stop=["\x00never", stop],
            include_stop_str_in_output=include,
            **GREEDY,
        )
        out = ascii_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.text == text[: at + (3 if include else 0)]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert len(out.token_ids) == at + 3  # generation ended on the token completing it
        # Streaming: every delta so far is a prefix of the final text (nothing to take back).
        streamed = ""
        for event in ascii_llm.stream(prompt, params):
            streamed += event.text_delta
            assert out.text.startswith(streamed)
            assert stop not in streamed or include
        assert streamed == out.text


def test_logprobs_match_transformers(llama_ckpt, alone):
    _, hf = llama_ckpt
    prompt = [3, 14, 15, 92, 65]
    params = SamplingParams(max_tokens=6, logprobs=3, **GREEDY)
    out = alone.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    assert len(out.logprobs) == 6
    for i, (token, lps) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + i]
        top = torch.topk(row, 3).indices.tolist()
        assert set(lps) == set(top) | {token}
        for tid, lp in lps.items():
            assert abs(lp.logprob - row[tid].item()) < 1e-4
        assert lps[token].rank == 1  # greedy picks the top token
        assert lps[token].decoded_token == alone.tokenizer.decode(
            [token], skip_special_tokens=False
        )


def test_repetition_penalty_matches_transformers(llama_ckpt, alone):
    _, hf = llama_ckpt
    prompt = [30, 31, 32, 30, 31]
    out = (
        alone.generate(
            [prompt],
            SamplingParams(max_tokens=20, repetition_penalty=1.5, **GREEDY),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    config = hf.generation_config
    config.eos_token_id, saved = None, config.eos_token_id
    try:
        x = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=20,
                do_sample=False,
                repetition_penalty=1.5,
            )[0, len(prompt) :].tolist()
    finally:
        config.eos_token_id = saved
    assert out == ref
    plain = alone.generate([prompt], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)
    assert plain[0].outputs[0].token_ids != out


def test_engine_argument_validation(llama_ckpt):
    path, _ = llama_ckpt
    for kwargs, msg in [
        ({"block_size": 0}, "block_size must be an integer in [1, 1024], got 0"),
        ({"max_num_seqs": 0}, "max_num_seqs must be an integer"),
        ({"kv_cache_tokens": 4}, "kv_cache_tokens must be an integer in [16,"),
        ({"memory_utilization": 1.5}, "memory_utilization must be a number in (0, 1]"),
        ({"max_num_batched_tokens": "8"}, "max_num_batched_tokens must be an integer"),
    ]:
        with pytest.raises(ValueError) as e:
            LLMEngine(path, device="cpu", **kwargs)
        assert msg in str(e.value)
    engine = LLMEngine(path, device="cpu", kv_cache_tokens=100)
    assert engine.blocks.num_blocks == 6  # exact: 100 // 16
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="request_id 'a' is already in use"):
        engine.add_request("a", [1, 2])


def test_pool_sized_from_memory_when_no_token_count_is_given(llama_ckpt, caplog):
    import logging

    path, _ = llama_ckpt
    with caplog.at_level(logging.INFO, logger="shardlm"):
        engine = LLMEngine(path, device="cpu", max_model_len=128, max_num_seqs=4)
    # Free memory here is far more than 4 sequences × 128 tokens need: the cap applies.
    assert engine.blocks.num_blocks == 4 * 128 // 16
    assert any("KV cache: 32 blocks" in r.message for r in caplog.records)
    with pytest.raises(
        ValueError,
        match=r"memory_utilization=1e-12 of free memory .* leaves room for 0 KV-cache tokens",
    ):
        LLMEngine(path, device="cpu", memory_utilization=1e-12)


@pytest.mark.parametrize("budget", [2, 3, 5])
def test_tiny_token_budgets_never_sample_mid_prompt(llama_ckpt, alone, budget):
    """A prefill chunk of one token that is not the prompt's last must not be sampled."""
    path, _ = llama_ckpt
    prompts = [[1], [1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13], [4, 4]]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (6, 5, 4, 7)]
    expected = run_alone(alone, prompts, params)
    with LLM(path, device="cpu", kv_cache_tokens=1024, max_num_batched_tokens=budget) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected


def test_interleaved_streams_and_generate_each_get_their_own_output(alone):
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (12, 20)]
    prompts = [[5, 6], [9, 10, 11]]
    expected = run_alone(alone, prompts, params)
    a = alone.stream(prompts[0], params[0])
    b = alone.stream(prompts[1], params[1])
    got_a, got_b = [], []
    for _ in range(3):  # a and b advance each other's requests
        got_a += next(a).token_ids
        got_b += next(b).token_ids
    middle = alone.generate([[3, 3, 3]], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert len(middle[0].outputs[0].token_ids) == 4
    got_a += [t for e in a for t in e.token_ids]
    got_b += [t for e in b for t in e.token_ids]
    assert [got_a, got_b] == expected
    assert not alone._pending and not alone._waited_on


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda llm: llm.generate(None), "prompts must be a string"),
        (lambda llm: llm.generate(123), "prompts must be a string"),
        (lambda llm: llm.generate({"prompt_token_ids": 5}), "prompt_token_ids must be a list"),
        (lambda llm: llm.engine.add_request(7, [1, 2]), "request_id must be a string"),
        (lambda llm: llm.prompt_logits([1, 999]), "outside the vocabulary"),
    ],
)
def test_bad_calls_raise_one_line_value_errors(alone, call, match):
    with pytest.raises(ValueError, match=match):
        call(alone)


def test_stop_strings_without_tokenizer_are_refused(llama_ckpt):
    path, _ = llama_ckpt
    engine = LLMEngine(path, device="cpu", kv_cache_tokens=256, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request("a", [1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="memory_utilization must be a number"):
        LLMEngine(path, device="cpu", memory_utilization=True)


def test_n_samples_compute_the_prompt_once(llama_ckpt):
    path, _ = llama_ckpt
    prompt = random_prompts(1, 100, 100, seed=9)[0]  # 6 full blocks + 4 tokens
    params = SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=3, ignore_eos=True)
    outs = {}
    for caching in (True, False):
        with LLM(path, device="cpu", kv_cache_tokens=2048, enable_prefix_caching=caching) as llm:
            outs[caching] = llm.generate([prompt], params, use_tqdm=False)[0]
            stats = llm.engine.stats
        extra_samples = 3
        if caching:  # each extra sample recomputes only the 4-token partial last block
            assert stats.prefill_tokens == 100 + extra_samples * 4
            assert stats.prefix_cache_hit_tokens == extra_samples * 96
        else:
            assert stats.prefill_tokens == 4 * 100
    assert [c.token_ids for c in outs[True].outputs] == [c.token_ids for c in outs[False].outputs]

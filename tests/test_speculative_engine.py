"""Speculative decoding inside the engine: n-gram and draft-model drafts, verified in one
forward as extra decode rows, rolled back exactly.

Oracles: transformers' greedy tokens (float32) for every combination; the engine without
speculation for logprobs, stop rules and text; the target's own distribution (computed from
its logits) for sampled tokens, by chi-square; the block counts for rollback.
"""

from __future__ import annotations

import json

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.engine_config import EngineConfig
from shardlm.errors import ParamError
from tests.conftest import make_checkpoint
from tests.test_model_parity import hf_greedy

NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A target, a draft of the same vocabulary with other weights (partial acceptance), and
    one with another vocabulary size (refused)."""
    target = tmp_path_factory.mktemp("spec-target")
    hf = make_checkpoint(target, "llama", seed=3)
    other = tmp_path_factory.mktemp("spec-draft")
    perturbed_copy(hf, other, noise=0.04)
    wrong = tmp_path_factory.mktemp("spec-wrong-vocab")
    make_checkpoint(wrong, "llama", {"vocab_size": 300}, seed=4)
    return target, hf, other, wrong


def perturbed_copy(hf, path, noise: float) -> None:
    """The target with noise on its matrices: a draft that agrees often, not always (a draft
    of independent random weights would agree with a random target about never)."""
    import copy

    from shardlm.byte_tokenizer import build_byte_level_tokenizer

    model = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    model.save_pretrained(path)
    build_byte_level_tokenizer(path)


def prompts() -> list[list[int]]:
    """Prompts that repeat themselves (n-gram drafts find matches) and one that does not."""
    g = torch.Generator().manual_seed(9)
    motif = torch.randint(2, 258, (7,), generator=g).tolist()
    loose = torch.randint(2, 258, (19,), generator=g).tolist()
    return [motif * 4, loose, (motif + loose[:5]) * 3, loose[:3] * 6]


@pytest.fixture(scope="module")
def hf_tokens(ckpts):
    _, hf, _, _ = ckpts
    return [hf_greedy(hf, p, NEW) for p in prompts()]


def ngram(k=4, **more):
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, **more}


def draft(path, k=3, **more):
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k, **more}


def run(path, spec, params=GREEDY, batch=None, **engine):
    """Greedy tokens of prompts(), the engine's stats."""
    with LLM(path, device="cpu", dtype="float32", speculative_config=spec, **engine) as llm:
        outs = llm.generate(batch or prompts(), params, use_tqdm=False)
        stats = llm.engine.stats
    return outs, stats


@pytest.mark.parametrize(
    "method, k, engine",
    [
        ("ngram", 1, {}),
        ("ngram", 4, {"max_num_batched_tokens": 16}),  # chunked prefill beside verify rows
        ("ngram", 5, {"enable_prefix_caching": False, "block_size": 4}),
        ("self", 3, {}),
        ("other", 2, {"block_size": 4}),
        ("other", 4, {"max_num_batched_tokens": 12, "max_num_seqs": 3}),
    ],
)
def test_greedy_tokens_are_transformers_with_every_draft(method, k, engine, ckpts, hf_tokens):
    target, _, other, _ = ckpts
    spec = {
        "ngram": ngram(k),
        "self": draft(target, k),
        "other": draft(other, k),
    }[method]
    outs, stats = run(target, spec, **engine)
    assert [o.outputs[0].token_ids for o in outs] == hf_tokens
    assert stats.blocks_in_use == 0  # every rejected draft's block went back
    assert stats.spec_draft_tokens > 0
    assert 0 < stats.spec_accepted_tokens <= stats.spec_draft_tokens
    if method == "self":  # the target as its own draft: every draft is accepted
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
    if method == "other":
        assert stats.spec_accepted_tokens < stats.spec_draft_tokens
    assert sum(stats.spec_draft_tokens_per_position) == stats.spec_draft_tokens
    assert sum(stats.spec_accepted_tokens_per_position) == stats.spec_accepted_tokens


def test_speculation_is_off_unless_configured(ckpts):
    target, *_ = ckpts
    _, stats = run(target, None)
    assert stats.spec_draft_tokens == 0


def test_requests_that_cannot_speculate_share_the_batch_and_stay_exact(ckpts, hf_tokens):
    """Penalties, logit_bias and an explicit opt-out decode one token a step beside the
    speculating requests; the greedy ones stay transformers' tokens."""
    target, *_ = ckpts
    ps = prompts()
    penalised = SamplingParams(temperature=0.0, max_tokens=NEW, repetition_penalty=1.3)
    biased = SamplingParams(temperature=0.0, max_tokens=NEW, logit_bias={5: 3.0})
    opted_out = SamplingParams(temperature=0.0, max_tokens=NEW, speculative=False)
    with LLM(target, device="cpu", dtype="float32") as plain:
        want = plain.generate([ps[0], ps[2]], [penalised, biased], use_tqdm=False)
    with LLM(target, device="cpu", dtype="float32", speculative_config=ngram()) as llm:
        outs = llm.generate(
            [ps[0], ps[1], ps[2], ps[3]], [penalised, GREEDY, biased, opted_out], use_tqdm=False
        )
        assert llm.engine.stats.spec_draft_tokens > 0
    assert outs[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert outs[1].outputs[0].token_ids == hf_tokens[1]
    assert outs[2].outputs[0].token_ids == want[1].outputs[0].token_ids
    assert outs[3].outputs[0].token_ids == hf_tokens[3]


def test_logprobs_stops_and_text_are_those_of_plain_decoding(ckpts, hf_tokens):
    """A stop token and a stop string that fall inside an accepted run end the sequence
    right there; logprobs of accepted drafts are the target's."""
    target, *_ = ckpts
    ps = prompts()
    stop_token = hf_tokens[0][9]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=NEW, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=NEW, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),  # max_tokens mid-run
    ]
    with LLM(target, device="cpu", dtype="float32") as plain:
        text = plain.generate([ps[0]], GREEDY, use_tqdm=False)[0].outputs[0].text
        stop_string = text[len(text) // 2 : len(text) // 2 + 2]
        cases.append(SamplingParams(temperature=0.0, max_tokens=NEW, stop=[stop_string]))
        want = [plain.generate([ps[0]], c, use_tqdm=False)[0].outputs[0] for c in cases]
    with LLM(target, device="cpu", dtype="float32", speculative_config=draft(target, 4)) as llm:
        got = [llm.generate([ps[0]], c, use_tqdm=False)[0].outputs[0] for c in cases]
        assert llm.engine.stats.blocks_in_use == 0
    for g, w in zip(got, want, strict=True):
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (
            w.token_ids,
            w.text,
            w.finish_reason,
            w.stop_reason,
        )
    assert got[1].finish_reason == "stop" and len(got[1].token_ids) < NEW
    for g, w in zip(got[0].logprobs, want[0].logprobs, strict=True):
        assert g.keys() == w.keys()
        for t in g:
            assert g[t].logprob == pytest.approx(w[t].logprob, abs=1e-4)
            assert g[t].rank == w[t].rank


def test_preemption_rolls_back_and_recomputes_exactly(ckpts, hf_tokens):
    """A pool too small for every sequence at once: drafts never preempt anyone, preempted
    sequences (and their draft KV) come back and still give transformers' tokens."""
    target, _, other, _ = ckpts
    for spec in (ngram(), draft(other, 3)):
        outs, stats = run(target, spec, kv_cache_tokens=96, block_size=4)
        assert [o.outputs[0].token_ids for o in outs] == hf_tokens
        assert stats.preemptions > 0
        assert stats.blocks_in_use == 0


@pytest.mark.parametrize("method", ["ngram", "other"])
def test_block_tables_hold_exactly_what_the_tokens_need_between_steps(method, ckpts):
    """Also when the proposer makes fewer drafts than the slots reserved (n-gram misses)."""
    target, _, other, _ = ckpts
    spec = ngram() if method == "ngram" else draft(other, 4)
    with LLM(target, device="cpu", dtype="float32", speculative_config=spec, block_size=4) as llm:
        engine = llm.engine
        for i, p in enumerate(prompts()):
            engine.add_request(str(i), p, GREEDY)
        while engine.has_unfinished_requests():
            engine.step()
            running = engine.scheduler.running
            for seq in running:
                assert not seq.draft_ids
                if seq.num_computed_tokens == seq.num_tokens - 1:  # decoding
                    # No block past what its tokens need (a fresh token's slot may come with
                    # the next schedule), none missing for what it computed.
                    need = engine.blocks.blocks_needed
                    assert need(seq.num_computed_tokens) <= len(seq.block_table)
                    assert len(seq.block_table) <= need(seq.num_tokens)
            held = sum(len(s.block_table) for s in running)
            assert engine.blocks.num_used_blocks == held  # no prefix shared here
            if method == "other":
                drafted = sum(len(st.block_table) for st in engine.proposer.state.values())
                assert engine.proposer.blocks.num_used_blocks == drafted
        if method == "other":
            assert engine.proposer.blocks.num_used_blocks == 0  # finished: draft KV freed too


def test_draft_slots_take_only_blocks_nobody_else_needs(ckpts):
    """Four blocks of 4 tokens. After the prefills, A (4 tokens) fits its block, B (5 tokens)
    needs a second one, C fits: one block is free. Draft slots are handed out last, so B's
    decode gets that block and nobody is preempted (A's drafts would have taken it first)."""
    target, *_ = ckpts
    with LLM(
        target,
        device="cpu",
        dtype="float32",
        speculative_config=ngram(4),
        kv_cache_tokens=16,
        block_size=4,
        enable_prefix_caching=False,
    ) as llm:
        engine = llm.engine
        for name, prompt in (("A", [5, 6, 7]), ("B", [8, 9, 10, 11]), ("C", [12, 13])):
            engine.add_request(name, prompt, GREEDY)
        engine.step()  # the three prefills
        assert engine.blocks.num_free_blocks == 1
        engine.step()
        assert engine.scheduler.stats.preemptions == 0
        b = next(s for s in engine.scheduler.running if s.request.request_id == "B")
        assert len(b.block_table) == 2


@pytest.mark.parametrize(
    "engine",
    [
        {"attention_nodes": 2, "kv_chunk_size": 3, "block_size": 4, "node_microbatches": 2},
        {
            "attention_nodes": 2,
            "kv_chunk_size": 3,
            "block_size": 4,
            "compute_nodes": 2,
            "enable_prefix_caching": True,
        },
    ],
)
def test_attention_and_compute_nodes_roll_back_with_the_driver(engine, ckpts, hf_tokens):
    """The nodes hold rejected drafts' K/V after a verify step; a sequence continuing before
    what a node holds truncates it there (AttentionNode._held), and the driver's node-block
    budget gives the blocks back."""
    target, _, other, _ = ckpts
    for spec in (ngram(), draft(other, 3)):
        outs, stats = run(target, spec, **engine)
        assert [o.outputs[0].token_ids for o in outs] == hf_tokens
        assert stats.spec_accepted_tokens > 0
        assert stats.blocks_in_use == 0


def test_tensor_parallel_verify_steps(ckpts, hf_tokens):
    """Verify rows travel to the other rank like any decode rows; the draft runs on the
    driver alone."""
    target, _, other, _ = ckpts
    outs, stats = run(target, draft(other, 3), tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in outs] == hf_tokens
    assert stats.spec_accepted_tokens > 0


# -- sampling: the target's distribution --
V_TOP = 4
SAMPLES = 1500
# 0.999 quantile of chi-square with V_TOP − 1 = 3 degrees of freedom.
CHI2_3_999 = 16.266


class TableProposer:
    """Deterministic drafts as an n-gram proposer makes them (no draft distribution), from a
    table: after first token t, draft table[t] — the target's likeliest next token, so
    drafts are accepted often and rejected often."""

    def __init__(self, table: dict[int, int]) -> None:
        self.table = table

    def propose(self, slots):
        for seq, _ in slots.items():
            seq.draft_ids = [self.table[seq.token_ids[-1]]]
        return {}

    def release(self, seq_ids):
        pass


@pytest.mark.parametrize("method", ["deterministic", "other"])
def test_sampled_tokens_follow_the_target_distribution(method, ckpts):
    """The second generated token (the first verify step) conditioned on the first, over
    1500 samples with top_k=4: chi-square against the target's own top-4 distribution.
    Drafts are accepted sometimes and rejected sometimes, so both paths are counted."""
    target, _, other, _ = ckpts
    spec = ngram(1) if method == "deterministic" else draft(other, 3)
    spec["disable_by_batch_size"] = None
    prompt = torch.randint(2, 258, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=1.0, top_k=V_TOP, max_tokens=3, ignore_eos=True)
    with LLM(
        target,
        device="cpu",
        dtype="float32",
        speculative_config=spec,
        max_num_seqs=256,
        max_num_batched_tokens=8192,  # the draft catches up on 256 prompts in one step
    ) as llm:
        engine = llm.engine
        if method == "deterministic":
            firsts = engine.prompt_logits(prompt)[-1].topk(V_TOP).indices.tolist()
            engine.proposer = TableProposer(
                {t: int(engine.prompt_logits([*prompt, t])[-1].argmax()) for t in firsts}
            )
        outs = llm.generate([prompt] * SAMPLES, params, use_tqdm=False)
        stats = engine.stats
        # Most samples' second token was verified (drafts get the budget admissions leave).
        assert stats.spec_draft_tokens >= SAMPLES * 0.8
        pairs = [tuple(o.outputs[0].token_ids) for o in outs]
        first = max(set(p[0] for p in pairs), key=[p[0] for p in pairs].count)
        seconds = torch.tensor([p[1] for p in pairs if p[0] == first])
        logits = engine.prompt_logits([*prompt, first])[-1]
    top = logits.topk(V_TOP)
    probs = torch.softmax(top.values, dim=-1)
    counts = torch.stack([(seconds == t).sum() for t in top.indices]).float()
    assert counts.sum() == seconds.numel(), "a token outside the top k came out"
    expected = probs * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_3_999, (chi2, counts, expected)
    assert SAMPLES // 50 < stats.spec_accepted_tokens < stats.spec_draft_tokens


def test_seeded_sampled_requests_decode_plainly_and_reproduce(ckpts):
    """How many drafts a step verifies depends on the batch, and with it how much of the
    request's generator a step uses: seeded sampled requests do not speculate, so they give
    the tokens of plain decoding whatever their neighbours; seeded greedy ones speculate."""
    target, _, other, _ = ckpts
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=NEW, seed=11, ignore_eos=True)
    with LLM(target, device="cpu", dtype="float32") as plain:
        want = plain.generate(prompts()[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    for batch in (prompts()[:1], prompts()[:1] + [[7, 8, 9]] * 3):
        outs, stats = run(target, draft(other, 3), params=params, batch=batch)
        assert outs[0].outputs[0].token_ids == want
        assert stats.spec_draft_tokens == 0
    greedy_seeded = SamplingParams(temperature=0.0, max_tokens=NEW, seed=11, ignore_eos=True)
    _, stats = run(target, ngram(), params=greedy_seeded)
    assert stats.spec_draft_tokens > 0


# -- configuration --
@pytest.mark.parametrize(
    "value, field",
    [
        ("{not json", "speculative_config"),
        ('["ngram"]', "speculative_config"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "speculative_config.method"),
        ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
        (
            {"method": "ngram", "num_speculative_tokens": 0},
            "speculative_config.num_speculative_tokens",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "tokens": 3},
            "speculative_config.tokens",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5},
            "speculative_config.prompt_lookup_min",
        ),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "model": "/x"},
            "speculative_config.model",
        ),
    ],
)
def test_bad_speculative_configs_name_the_key(value, field):
    with pytest.raises(ParamError) as e:
        EngineConfig.from_kwargs(speculative_config=value)
    assert e.value.param == field


def test_json_and_dict_are_one_option(ckpts):
    text = json.dumps(ngram(3))
    a = EngineConfig.from_kwargs(speculative_config=text).speculative.config
    b = EngineConfig.from_kwargs(speculative_config=ngram(3)).speculative.config
    assert a == b and a.num_speculative_tokens == 3 and a.prompt_lookup_max == 3
    config = EngineConfig.from_kwargs(speculative_config=ngram(3))
    assert EngineConfig.from_json(config.to_json()) == config  # what workers receive


def test_a_draft_must_share_the_vocabulary(ckpts):
    target, _, _, wrong = ckpts
    with pytest.raises(ParamError, match="vocab_size") as e:
        LLM(target, device="cpu", speculative_config=draft(wrong))
    assert e.value.param == "speculative_config.model"
    with pytest.raises(ParamError, match="not a checkpoint") as e:
        LLM(target, device="cpu", speculative_config=draft(target / "nope"))


def test_the_builtin_model_speculates_out_of_the_box():
    """The built-in model and its shipped draft: greedy tokens as without speculation."""
    params = SamplingParams(temperature=0.0, max_tokens=40)
    prompt = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"
    with LLM(dtype="float32") as plain:
        want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    spec = {"method": "draft_model", "model": "builtin", "num_speculative_tokens": 3}
    with LLM(dtype="float32", speculative_config=spec) as llm:
        got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert llm.engine.stats.spec_accepted_tokens > 0
    assert got == want


def test_prefix_cache_hits_with_speculation_stay_exact(ckpts, hf_tokens):
    """The second round takes the first round's blocks from the prefix cache: blocks
    registered after rollback hold only verified tokens, so the hits give the same tokens."""
    target, *_ = ckpts
    with LLM(
        target, device="cpu", dtype="float32", speculative_config=ngram(), block_size=4
    ) as llm:
        first = llm.generate(prompts(), GREEDY, use_tqdm=False)
        second = llm.generate(prompts(), GREEDY, use_tqdm=False)
        stats = llm.engine.stats
    assert [o.outputs[0].token_ids for o in first] == hf_tokens
    assert [o.outputs[0].token_ids for o in second] == hf_tokens
    assert stats.prefix_cache_hit_tokens > 0 and stats.blocks_in_use == 0


def test_the_server_speculates_and_reports_acceptance(ckpts):
    """`shardlm serve --speculative-config`: the openai client's greedy completions equal
    the offline engine's without speculation, with or without the per-request opt-out;
    /metrics carries the acceptance rate."""
    from tests.test_server import Server

    target, *_ = ckpts
    prompt = "the cat sat on the mat, the cat sat on the mat, the cat"
    with LLM(target, device="cpu", dtype="float32") as plain:
        want = plain.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].text
    server = Server(target, "--speculative-config", json.dumps(ngram(3)))
    try:
        client = server.client()
        for extra in ({"ignore_eos": True}, {"ignore_eos": True, "speculative": False}):
            got = client.completions.create(
                model="tiny", prompt=prompt, temperature=0, max_tokens=NEW, extra_body=extra
            )
            assert got.choices[0].text == want
        assert server.metric("shardlm_spec_decode_draft_tokens") > 0
        assert 0 < server.metric("shardlm_spec_decode_acceptance_rate") <= 1
        assert server.metric('shardlm_spec_decode_acceptance_rate_per_position{position="1"}') > 0
    finally:
        assert server.stop() == 0


def test_a_bad_speculative_config_flag_is_a_one_line_error(ckpts):
    import subprocess
    import sys

    target, *_ = ckpts
    argv = [sys.executable, "-m", "shardlm", "generate", "--model", str(target)]
    argv += ["--device", "cpu", "--speculative-config", '{"method": "ngram"}']
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "num_speculative_tokens" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("method", ["ngram", "other"])
def test_verify_as_decode_rows_on_the_pytorch_path(method, ckpts, hf_tokens):
    """The representation the Triton kernel and CUDA graphs take (k + 1 decode rows of one
    sequence), here through PyTorch attention: the same tokens as the default chunks."""
    target, _, other, _ = ckpts
    spec = ngram() if method == "ngram" else draft(other, 3)
    with LLM(target, device="cpu", dtype="float32", speculative_config=spec) as llm:
        llm.engine.verify_as_chunks = False
        outs = llm.generate(prompts(), GREEDY, use_tqdm=False)
        stats = llm.engine.stats
    assert [o.outputs[0].token_ids for o in outs] == hf_tokens
    assert stats.spec_accepted_tokens > 0 and stats.blocks_in_use == 0

"""logit_bias, min_tokens, allowed_token_ids and bad_words: each changes greedy output exactly
as defined, leaves rows without them untouched in the same batch, and bad values are named."""

from __future__ import annotations

import pytest

from shardlm import LLM, SamplingParams
from shardlm.errors import ParamError

PROMPTS = [[5, 70, 71, 72, 73], [90, 100, 110], [33, 34]]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    path, _ = llama_ckpt
    with LLM(path, device="cpu") as llm:
        yield llm


@pytest.fixture(scope="module")
def plain(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(), use_tqdm=False)]


def tokens(llm, prompt, params) -> list[int]:
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def test_logit_bias_forces_and_bans(llm, plain):
    forced = 200
    assert set(tokens(llm, PROMPTS[0], greedy(logit_bias={forced: 100}))) == {forced}
    first = plain[0][0]
    banned = tokens(llm, PROMPTS[0], greedy(logit_bias={str(first): -100}))
    assert first not in banned
    # OpenAI's string keys are token ids too.
    assert tokens(llm, PROMPTS[0], greedy(logit_bias={"200": 100})) == [forced] * 12


def test_min_tokens_holds_back_eos_and_stop_tokens(llm, plain):
    stop = plain[1][2]  # the third token of the plain run
    params = dict(temperature=0, max_tokens=12, stop_token_ids=[stop])
    early = tokens(llm, PROMPTS[1], SamplingParams(**params))
    assert early[-1] == stop and len(early) <= 3
    late = tokens(llm, PROMPTS[1], SamplingParams(min_tokens=6, **params))
    assert len(late) >= 6 and stop not in late[:5]


def test_min_tokens_holds_back_stop_strings_too(llm, plain):
    """As vLLM: a stop string does not end the sequence before min_tokens."""
    text = llm.tokenizer.decode(plain[1])
    stop = next(ch for ch in text if ch.isascii() and ch.isprintable())
    params = dict(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    early = llm.generate([PROMPTS[1]], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) < 6
    late = llm.generate([PROMPTS[1]], SamplingParams(min_tokens=8, **params), use_tqdm=False)
    assert len(late[0].outputs[0].token_ids) >= 8


def test_allowed_token_ids_are_the_only_ones_produced(llm):
    allowed = [40, 41, 42]
    assert set(tokens(llm, PROMPTS[2], greedy(allowed_token_ids=allowed))) <= set(allowed)


def test_bad_words_never_appear(llm, plain):
    """A two-token word the plain greedy run writes (a printable pair of byte tokens) is
    never written once it is a bad word; a one-token word never either."""
    texts = [llm.tokenizer.decode(ids) for ids in plain]
    i, at = next(
        (i, j)
        for i, t in enumerate(texts)
        for j in range(len(t) - 1)
        if t[j : j + 2].isascii() and t[j : j + 2].isprintable() and t[j : j + 2].strip()
    )
    word = texts[i][at : at + 2]
    out = llm.generate([PROMPTS[i]], greedy(bad_words=[word]), use_tqdm=False)[0].outputs[0]
    assert word in texts[i] and word not in out.text
    single = llm.generate([PROMPTS[i]], greedy(bad_words=[word[0]]), use_tqdm=False)
    assert word[0] not in single[0].outputs[0].text


def test_constrained_and_free_rows_share_a_batch(llm, plain):
    params = [greedy(logit_bias={200: 100}), greedy(), greedy(allowed_token_ids=[40, 41])]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert outs[1].outputs[0].token_ids == plain[1]
    assert set(outs[0].outputs[0].token_ids) == {200}
    assert set(outs[2].outputs[0].token_ids) <= {40, 41}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"logit_bias": {5: 101}}, "logit_bias must be values in [-100, 100], got 101"),
        ({"logit_bias": {-1: 1}}, "logit_bias must be keyed by token ids ≥ 0, got -1"),
        ({"logit_bias": {"x": 1}}, "logit_bias must be keyed by token ids ≥ 0, got 'x'"),
        ({"logit_bias": {"²": 1}}, "logit_bias must be keyed by token ids ≥ 0, got '²'"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens (5) must not exceed max_tokens (4)"),
        ({"allowed_token_ids": []}, "allowed_token_ids must be a non-empty list"),
        ({"bad_words": [""]}, "bad_words must be a list of non-empty strings"),
        (
            {"allowed_token_ids": [5], "structured_outputs": {"regex": "a+"}},
            "cannot be combined with structured_outputs",
        ),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ParamError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == next(iter(kwargs))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"logit_bias": {300: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [1, 999]}, "allowed_token_ids"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_named(llm, kwargs, param):
    with pytest.raises(ParamError) as e:
        llm.generate([PROMPTS[0]], greedy(**kwargs), use_tqdm=False)
    assert e.value.param == param and "outside the vocabulary" in str(e.value)

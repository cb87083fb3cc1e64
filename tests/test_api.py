"""The LLM / SamplingParams API: validation, stopping rules, seeds, streaming."""

from __future__ import annotations

import pytest

from shardlm import LLM, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    path, _ = llama_ckpt
    with LLM(path, device="cpu") as llm:
        yield llm


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"bad_words": "no"}, "bad_words"),
        ({"seed": -1}, "seed"),
        ({"stop_token_ids": [1, -3]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(field)
    value = next(iter(kwargs.values()))
    shown = value[-1] if isinstance(value, list) else value
    assert str(e.value).endswith(f"got {shown!r}")


def test_prompt_forms_and_output_shape(llm):
    outs = llm.generate(
        [
            "Hello",
            [5, 6, 7],
            {"prompt": "Hi"},
            {"prompt_token_ids": [9, 10]},
            {"prompt": "shown as text", "prompt_token_ids": [11, 12]},  # ids win, text kept
        ],
        SamplingParams(max_tokens=3, **GREEDY),
    )
    assert [o.prompt for o in outs] == ["Hello", None, "Hi", None, "shown as text"]
    assert outs[1].prompt_token_ids == [5, 6, 7]
    assert outs[4].prompt_token_ids == [11, 12]
    assert outs[0].prompt_token_ids[0] == llm.tokenizer.bos_token_id
    assert all(len(o.outputs[0].token_ids) == 3 and o.finished for o in outs)
    assert len({o.request_id for o in outs}) == 5
    # A flat list of ints is one prompt, not four.
    assert len(llm.generate([5, 6, 7], SamplingParams(max_tokens=1))) == 1


@pytest.mark.parametrize(
    "prompt,match",
    [
        ([], "empty"),
        ([5, 258], "outside the vocabulary \\[0, 258\\)"),
        ([5, -1], "outside the vocabulary"),
        ([3.5], "outside the vocabulary"),
        ({"text": "x"}, "'prompt' or 'prompt_token_ids'"),
        (b"bytes", "string, a list of token ids or a dict"),
    ],
)
def test_bad_prompts(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt, "a valid prompt"])


def test_stop_token_ids_and_eos(llm, llama_ckpt):
    ids = [5, 6, 7, 8]
    free = llm.generate(ids, SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0].token_ids
    stop_at = free[3]
    first = free.index(stop_at)
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]))
    c = out[0].outputs[0]
    assert c.token_ids == free[: first + 1]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop_at)
    # EOS: make the model's EOS be that token; generation ends there unless ignore_eos.
    saved = set(llm.engine.eos_token_ids)
    llm.engine.eos_token_ids = {stop_at}
    try:
        c = llm.generate(ids, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
        assert c.token_ids == free[: first + 1] and c.finish_reason == "stop"
        assert c.stop_reason is None
        assert c.text == llm.tokenizer.decode(free[:first])  # EOS is not part of the text
        c = llm.generate(ids, SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0]
        assert c.token_ids == free and c.finish_reason == "length"
    finally:
        llm.engine.eos_token_ids = saved


def test_max_model_len_bounds_prompt_and_output(llama_ckpt):
    path, _ = llama_ckpt
    with LLM(path, device="cpu", max_model_len=10) as small:
        out = small.generate([5] * 7, SamplingParams(max_tokens=50, **GREEDY))[0].outputs[0]
        assert len(out.token_ids) == 3 and out.finish_reason == "length"
        with pytest.raises(ValueError, match="prompt has 10 tokens; max_model_len is 10"):
            small.generate([5] * 10)
    with pytest.raises(ValueError, match="max_model_len must be an integer in \\[1, 512\\]"):
        LLM(path, device="cpu", max_model_len=513)


def test_seeded_sampling_is_reproducible_and_greedy_equivalents(llm):
    ids = [3, 4, 5]
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)
    a = llm.generate(ids, sampled)[0].outputs[0].token_ids
    llm.generate([9, 9], SamplingParams(max_tokens=5))  # unrelated work in between
    b = llm.generate(ids, sampled)[0].outputs[0].token_ids
    assert a == b
    greedy = llm.generate(ids, SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0].token_ids
    top1 = (
        llm.generate(ids, SamplingParams(temperature=1.0, top_k=1, max_tokens=20, ignore_eos=True))[
            0
        ]
        .outputs[0]
        .token_ids
    )
    assert top1 == greedy
    assert a != greedy  # sampling at temperature 1 on a random model does differ


def test_stream_matches_generate_and_never_splits_characters(llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    events = list(llm.stream("héllo 世界", params))
    full = llm.generate("héllo 世界", params)[0].outputs[0]
    assert [t for e in events for t in e.token_ids] == full.token_ids
    assert "".join(e.text_delta for e in events) == full.text
    assert full.text == llm.tokenizer.decode(full.token_ids)
    for e in events[:-1]:
        assert "\ufffd" not in e.text_delta or "\ufffd" in full.text
    assert [e.finish_reason for e in events][-1] == "length"
    assert all(e.finish_reason is None for e in events[:-1])


def test_sampling_params_per_prompt(llm):
    outs = llm.generate(
        [[1, 2], [3, 4]],
        [SamplingParams(max_tokens=2, **GREEDY), SamplingParams(max_tokens=5, **GREEDY)],
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]
    with pytest.raises(ValueError, match="sampling_params has 1 entries but there are 2"):
        llm.generate([[1], [2]], [SamplingParams()])


def test_skip_tokenizer_init_refuses_text(llama_ckpt):
    path, _ = llama_ckpt
    with LLM(path, device="cpu", skip_tokenizer_init=True) as llm:
        assert llm.generate([4, 5], SamplingParams(max_tokens=2))[0].outputs[0].text == ""
        with pytest.raises(ValueError, match="need a tokenizer"):
            llm.generate("hi")


def test_bad_dtype_and_device(llama_ckpt):
    path, _ = llama_ckpt
    with pytest.raises(ValueError, match="dtype 'int8' is not supported; allowed: auto"):
        LLM(path, dtype="int8")
    with pytest.raises(ValueError, match="device 'tpu' is not"):
        LLM(path, device="tpu")

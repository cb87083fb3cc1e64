"""Structured outputs (xgrammar): JSON schemas, regexes, choices and EBNF grammars, on the
built-in model (a real BPE tokenizer), checked by parsing and validating what comes out.

The oracle for validity is independent of xgrammar: ``json`` + ``jsonschema`` for schemas,
``re.fullmatch`` for regexes. Mixed batches are checked against runs without any grammar.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import Future

import jsonschema
import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.demo import demo_checkpoint
from shardlm.errors import ParamError
from shardlm.structured import StructuredOutputs
from shardlm.structured.compiler import GrammarCache
from shardlm.structured.masks import apply_grammar_masks, unpack_bitmask, unpack_words
from shardlm.structured.tokenizer_info import build_tokenizer_info
from shardlm.tokenizer import Tokenizer

pytest.importorskip("xgrammar")

PROMPT = "def parse(config):\n    return "

# Bounded: every string, array and integer has a limit, so any output finishes in max_tokens.
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["module", "class", "function"]},
            "public": {"type": "boolean"},
        },
        "required": ["name", "kind", "public"],
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "minItems": 1,
                "maxItems": 3,
            },
            "count": {"type": "integer", "minimum": 0, "maximum": 999},
        },
        "required": ["tags", "count"],
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -50, "maximum": 50},
                    "y": {"type": "integer", "minimum": -50, "maximum": 50},
                },
                "required": ["x", "y"],
            },
            "label": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
        },
        "required": ["point", "label"],
    },
    {
        "type": "array",
        "items": {"enum": ["red", "green", "blue", 7, None]},
        "minItems": 2,
        "maxItems": 4,
    },
]


@pytest.fixture(scope="module")
def llm():
    with LLM(demo_checkpoint(), dtype="float32", device="cpu", kv_cache_tokens=16384) as llm:
        yield llm


def generate(llm: LLM, prompts, params: SamplingParams | list[SamplingParams]):
    return [o.outputs for o in llm.generate(prompts, params, use_tqdm=False)]


def test_sampled_json_outputs_parse_and_validate(llm):
    """100 sampled outputs (25 per schema, n > 1: each sample its own matcher)."""
    params = [
        SamplingParams(
            n=25, temperature=1.0, max_tokens=200, seed=i, structured_outputs={"json": schema}
        )
        for i, schema in enumerate(SCHEMAS)
    ]
    results = generate(llm, [PROMPT] * len(SCHEMAS), params)
    for schema, outputs in zip(SCHEMAS, results, strict=True):
        assert len(outputs) == 25
        for out in outputs:
            assert out.finish_reason == "stop", out
            jsonschema.validate(json.loads(out.text), schema)
            assert out.token_ids[-1] == llm.engine.tokenizer.eos_token_id  # the grammar's end
        assert len({o.text for o in outputs}) > 1  # sampled, not one output 25 times


def test_json_schema_as_a_string_and_json_object(llm):
    schema = json.dumps(SCHEMAS[0])
    [outs] = generate(
        llm,
        [PROMPT],
        SamplingParams(temperature=0, max_tokens=100, structured_outputs={"json": schema}),
    )
    jsonschema.validate(json.loads(outs[0].text), SCHEMAS[0])
    [outs] = generate(
        llm,
        [PROMPT],
        SamplingParams(
            n=8, temperature=1.0, max_tokens=400, seed=1, structured_outputs={"json_object": True}
        ),
    )
    for out in outs:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
    assert any(out.finish_reason == "stop" for out in outs)


@pytest.mark.parametrize(
    "regex", [r"[a-z]{2,6}_[0-9]{1,3}", r"(get|set)_[a-z]{1,8}\(\)", r"-?\d{1,4}\.\d{2}"]
)
def test_regex_outputs_match(llm, regex):
    params = SamplingParams(
        n=10, temperature=1.0, max_tokens=40, seed=5, structured_outputs={"regex": regex}
    )
    [outs] = generate(llm, [PROMPT], params)
    for out in outs:
        assert out.finish_reason == "stop"
        assert re.fullmatch(regex, out.text), out.text


def test_choice_and_grammar_outputs(llm):
    choices = ["yes", "no", 'say "maybe"', "ünï\ncode"]
    [outs] = generate(
        llm,
        [PROMPT],
        SamplingParams(n=12, temperature=1.5, seed=2, structured_outputs={"choice": choices}),
    )
    assert all(out.text in choices and out.finish_reason == "stop" for out in outs)
    assert len({out.text for out in outs}) > 1
    grammar = 'root ::= "(" item ("," item){0,3} ")"\nitem ::= [a-z]{1,4} | [0-9]{1,2}'
    [outs] = generate(
        llm,
        [PROMPT],
        SamplingParams(n=8, temperature=1.0, seed=3, structured_outputs={"grammar": grammar}),
    )
    item = r"([a-z]{1,4}|[0-9]{1,2})"
    for out in outs:
        assert out.finish_reason == "stop"
        assert re.fullmatch(rf"\({item}(,{item}){{0,3}}\)", out.text), out.text


def test_mixed_batch_leaves_unconstrained_rows_as_they_were(llm):
    """Constrained and free rows, greedy and sampled, in one batch: the free rows' tokens equal
    a run without any grammar in the batch, the constrained rows' equal their runs alone."""
    free = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True),
    ]
    spec = StructuredOutputs(json=SCHEMAS[1])
    constrained = [
        SamplingParams(temperature=0, max_tokens=60, structured_outputs=spec),
        SamplingParams(temperature=1.0, seed=12, max_tokens=60, structured_outputs=spec),
    ]
    prompts = [PROMPT, "import os\n", "class A:", PROMPT]
    mixed = generate(llm, prompts, [free[0], constrained[0], free[1], constrained[1]])
    without = generate(llm, [prompts[0], prompts[2]], free)
    assert [mixed[0][0].token_ids, mixed[2][0].token_ids] == [o[0].token_ids for o in without]
    alone = [generate(llm, [prompts[i]], [constrained[j]])[0][0] for i, j in ((1, 0), (3, 1))]
    assert [mixed[1][0].token_ids, mixed[3][0].token_ids] == [o.token_ids for o in alone]
    for out in (mixed[1][0], mixed[3][0]):
        jsonschema.validate(json.loads(out.text), SCHEMAS[1])


def test_seeded_structured_sampling_is_reproducible(llm):
    params = SamplingParams(
        n=3, temperature=1.0, seed=1234, max_tokens=200, structured_outputs={"json": SCHEMAS[0]}
    )
    first = [o.text for o in generate(llm, [PROMPT], params)[0]]
    again = [o.text for o in generate(llm, ["x = 1\n", PROMPT], [params, params])[1]]
    assert first == again


def test_output_that_cannot_finish_ends_with_length(llm):
    regex = r"[a-z]{30}"
    for ignore_eos in (False, True):
        params = SamplingParams(
            temperature=1.0,
            seed=0,
            max_tokens=5,
            ignore_eos=ignore_eos,
            structured_outputs={"regex": regex},
        )
        [[out]] = generate(llm, [PROMPT], params)
        assert out.finish_reason == "length"
        assert len(out.token_ids) == 5 and re.fullmatch(r"[a-z]*", out.text)
        assert not re.fullmatch(regex, out.text)


def test_ignore_eos_still_ends_when_the_grammar_is_complete(llm):
    params = SamplingParams(
        temperature=0, max_tokens=50, ignore_eos=True, structured_outputs={"choice": ["ok"]}
    )
    [[out]] = generate(llm, [PROMPT], params)
    assert (out.text, out.finish_reason) == ("ok", "stop")


def test_stop_strings_and_stop_token_ids_with_a_grammar(llm):
    params = SamplingParams(
        temperature=0, max_tokens=50, stop=["b"], structured_outputs={"regex": "aaabbbccc"}
    )
    [[out]] = generate(llm, [PROMPT], params)
    assert (out.text, out.finish_reason, out.stop_reason) == ("aaa", "stop", "b")
    # A stop token id ends the output only where the grammar could end.
    stop_id = llm.engine.tokenizer.encode("x", add_special_tokens=False)[0]
    params = SamplingParams(
        temperature=0, max_tokens=50, stop_token_ids=[stop_id], structured_outputs={"regex": "ab"}
    )
    [[out]] = generate(llm, [PROMPT], params)
    assert out.text == "ab" and out.finish_reason == "stop"


def test_preempted_sequences_keep_a_valid_matcher():
    """A pool so small that sequences are preempted mid-output: each output still validates
    and equals the greedy run without preemption."""
    spec = StructuredOutputs(json=SCHEMAS[0])
    prompts = [PROMPT + "x" * i for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=120, structured_outputs=spec)
    path = demo_checkpoint()
    with LLM(path, dtype="float32", device="cpu", kv_cache_tokens=4096) as roomy:
        expected = [o[0].token_ids for o in generate(roomy, prompts, params)]
    with LLM(
        path, dtype="float32", device="cpu", kv_cache_tokens=160, max_num_batched_tokens=64
    ) as tight:
        outs = generate(tight, prompts, params)
        assert tight.engine.stats.preemptions > 0
    assert [o[0].token_ids for o in outs] == expected
    for o in outs:
        jsonschema.validate(json.loads(o[0].text), SCHEMAS[0])


def test_a_sequence_waits_for_its_grammar_without_holding_up_others(llm, monkeypatch):
    """The compile runs off the step loop: until it is done the scheduler leaves the
    sequence waiting and runs the others."""
    engine = llm.engine
    compiled = engine.grammars.compile(StructuredOutputs(regex="ab"))
    pending: Future = Future()
    monkeypatch.setattr(engine.grammars, "submit", lambda spec: pending)
    engine.add_request("g", PROMPT, SamplingParams(structured_outputs={"regex": "ab"}))
    engine.add_request("free", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    finished = False
    while not finished:
        for out in engine.step():
            assert out.request_id == "free"
            finished = out.finished
    assert engine.requests["g"].seqs[0].num_output_tokens == 0
    pending.set_result(compiled)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].text  # deltas
            finish = out.outputs[0].finish_reason
    assert (text, finish) == ("ab", "stop")


def test_tensor_parallel_samples_on_the_driver_with_the_same_grammar_output(llm):
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs={"json": SCHEMAS[0]})
    [expected] = generate(llm, [PROMPT], params)
    with LLM(demo_checkpoint(), dtype="float32", device="cpu", tensor_parallel_size=2) as tp:
        [outs] = generate(tp, [PROMPT], params)
    assert outs[0].token_ids == expected[0].token_ids
    jsonschema.validate(json.loads(outs[0].text), SCHEMAS[0])


# -- refusals --
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"json": {"type": "object"}, "regex": "a"},
        {"choice": []},
        {"choice": ["a", 3]},
        {"json": "{not json"},
        {"json": [1, 2]},
        {"json": {"enum": {1, 2}}},
        {"regex": ""},
        {"json_object": False},
    ],
)
def test_bad_combinations_are_refused_at_construction(kwargs):
    with pytest.raises(ParamError) as e:
        SamplingParams(structured_outputs=kwargs)
    assert e.value.param == "structured_outputs"
    with pytest.raises(ParamError):
        SamplingParams(structured_outputs={"jsn": {}})


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"json": {"type": "nope"}}, "invalid JSON schema"),
        ({"json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "JSON schema"),
        ({"regex": "a(b"}, "invalid regex: Regex parsing error"),
        ({"grammar": "root ::= undefined_rule"}, "invalid grammar"),
        ({"grammar": "root ::= "}, "invalid grammar"),
    ],
)
def test_bad_specs_are_refused_by_add_request_before_queueing(llm, spec, message):
    engine = llm.engine
    with pytest.raises(ParamError) as e:
        engine.add_request("bad", PROMPT, SamplingParams(structured_outputs=spec))
    assert e.value.param == "structured_outputs"
    assert message in str(e.value) and "/project/" not in str(e.value)
    assert not engine.has_unfinished_requests() and "bad" not in engine.requests


def test_missing_xgrammar_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    tokenizer = Tokenizer.from_pretrained(demo_checkpoint())
    cache = GrammarCache(tokenizer, tokenizer.vocab_size, [1])
    with pytest.raises(ParamError, match=r"pip install 'shardlm\[structured\]'") as e:
        cache.submit(StructuredOutputs(regex="a"))
    assert e.value.param == "structured_outputs"


# -- the pieces --
def test_grammars_are_compiled_once_per_spec(llm):
    cache = llm.engine.grammars
    a = cache.submit(StructuredOutputs(json={"type": "object", "properties": {"q": {}}}))
    b = cache.submit(StructuredOutputs(json='{"properties": {"q": {}}, "type": "object"}'))
    c = cache.submit(StructuredOutputs(regex="q+"))
    assert a is b and a is not c


def test_vocabulary_padding_and_special_tokens_are_never_allowed():
    """The mask covers the model's vocabulary (wider than the tokenizer's here): the padding
    ids and the special tokens (<s>, which xgrammar would read as text) stay banned."""
    tokenizer = Tokenizer.from_pretrained(demo_checkpoint())
    vocab = tokenizer.vocab_size + 100
    cache = GrammarCache(tokenizer, vocab, [1])
    state = cache.state(StructuredOutputs(regex=r'"[^"]*"'))
    state.future.result()
    assert state.accept(tokenizer.encode('"', add_special_tokens=False)[0]) is None
    logits = torch.zeros(2, vocab)
    masked = apply_grammar_masks(logits, [None, state])
    assert torch.equal(logits, torch.zeros(2, vocab))  # the input is not modified
    assert torch.equal(masked[0], logits[0])  # the free row is untouched
    banned = torch.isinf(masked[1]).nonzero().flatten().tolist()
    assert set(range(tokenizer.vocab_size, vocab)) <= set(banned)
    assert 0 in banned and 1 in banned  # <s>; </s> (a stop token: not inside a string)
    assert len(banned) < vocab // 2  # a string allows most tokens
    info = build_tokenizer_info(tokenizer, vocab, [1])
    assert info.vocab_size == vocab and info.stop_token_ids == [1]


@pytest.mark.parametrize("vocab", [4096, 4100, 31])
def test_both_unpackings_equal_xgrammars_kernel(vocab):
    """The CPU (numpy) and device (shift) unpackings mask what xgrammar's kernel masks."""
    import xgrammar as xgr

    g = torch.Generator().manual_seed(vocab)
    words = -(2**31) + torch.randint(0, 2**32, (3, (vocab + 31) // 32), generator=g)
    bitmask = words.to(torch.int32)
    logits = torch.randn(3, vocab, generator=g)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab)
    for allowed in (
        unpack_bitmask(bitmask, vocab, torch.device("cpu")),
        unpack_words(bitmask, vocab),
    ):
        assert torch.equal(torch.where(allowed, logits, float("-inf")), expected)


def test_a_grammar_that_fails_to_compile_ends_its_request_explicitly(llm, monkeypatch):
    """add_request accepted the spec (it parsed) but the compile fails in the pool: the
    request ends with finish_reason "abort" and the compiler's message, and the others run
    on (it never reaches a batch, where the matcher would raise)."""
    engine = llm.engine
    failed: Future = Future()
    failed.set_exception(RuntimeError("the compiler ran out of patience"))
    monkeypatch.setattr(engine.grammars, "submit", lambda spec: failed)
    engine.add_request("g", PROMPT, SamplingParams(structured_outputs={"regex": "ab"}))
    engine.add_request("free", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    g = outputs["g"][-1]
    assert g.finished and g.outputs[0].finish_reason == "abort"
    assert "failed to compile" in g.error and "out of patience" in g.error
    assert g.outputs[0].token_ids == []
    free = outputs["free"][-1]
    assert free.finished and free.error is None and free.outputs[0].finish_reason == "length"

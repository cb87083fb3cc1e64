"""Prompt logprobs: each prompt token's log-probability given the tokens before it, from the
batched prefill's own logits, in the Python API and the server (echo + logprobs as OpenAI's
legacy API and lm-eval use it; vLLM's prompt_logprobs field).

Oracle: transformers' log_softmax over the prompt, in float32.
"""

from __future__ import annotations

import json

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.errors import ParamError
from tests.conftest import make_checkpoint
from tests.test_server import Server


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt-logprobs")
    hf = make_checkpoint(
        path, "llama", {"num_attention_heads": 8, "num_key_value_heads": 2}, seed=21
    )
    return path, hf


PROMPT = torch.randint(2, 258, (45,), generator=torch.Generator().manual_seed(4)).tolist()


@pytest.fixture(scope="module")
def reference(ckpt):
    """transformers' log_softmax: row p - 1 scores prompt token p."""
    _, hf = ckpt
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].float(), dim=-1)


def check(prompt_logprobs, reference, k: int) -> None:
    assert len(prompt_logprobs) == len(PROMPT) and prompt_logprobs[0] is None
    for p in range(1, len(PROMPT)):
        entry, row = prompt_logprobs[p], reference[p - 1]
        got = entry[PROMPT[p]]
        assert abs(got.logprob - row[PROMPT[p]].item()) < 1e-4
        assert got.rank == int((row > row[PROMPT[p]]).sum()) + 1
        top = row.topk(k).indices.tolist()
        assert set(top) <= set(entry) and len(entry) <= k + 1
        assert all(entry[t].rank <= k for t in top)


CONFIGS = {
    "plain": {},
    "chunked prefill": dict(max_num_batched_tokens=16),
    "tensor parallel": dict(tensor_parallel_size=2),
    "attention nodes": dict(attention_nodes=2, attention_transport="in-process"),
    "compute nodes": dict(
        compute_nodes=2, attention_nodes=2, compute_chunk_size=5, max_num_batched_tokens=24
    ),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_prompt_logprobs_match_transformers(config, ckpt, reference):
    path, _ = ckpt
    with LLM(path, device="cpu", **CONFIGS[config]) as llm:
        # The same prompt twice in one batch: the second is not taken from the prefix cache
        # (a cached prefix has no logits to score it with).
        scoring = SamplingParams(max_tokens=0, prompt_logprobs=3)
        outs = llm.generate([PROMPT, PROMPT], scoring, use_tqdm=False)
        then = llm.generate(PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=3))[0]
    for out in [*outs, then]:
        check(out.prompt_logprobs, reference, 3)
    assert all(
        o.outputs[0].token_ids == [] and o.outputs[0].finish_reason == "length" for o in outs
    )
    assert len(then.outputs[0].token_ids) == 2


def test_prompt_logprobs_survive_preemption_mid_prefill(ckpt, reference):
    """A pool too small for every sequence: the scoring sequence is preempted while its
    prompt is half scored; recomputed, its logprobs are still transformers'."""
    path, _ = ckpt
    others = [[7 + i] * 40 for i in range(4)]
    with LLM(path, device="cpu", kv_cache_tokens=96, max_num_batched_tokens=16) as llm:
        scoring = SamplingParams(max_tokens=20, prompt_logprobs=2, ignore_eos=True)
        plain = SamplingParams(max_tokens=30, ignore_eos=True)
        outs = llm.generate([*others, PROMPT], [plain] * 4 + [scoring], use_tqdm=False)
        assert llm.engine.stats.preemptions > 0
    check(outs[-1].prompt_logprobs, reference, 2)


def test_n_samples_share_one_scoring_and_requests_without_it_get_none(ckpt, reference):
    path, _ = ckpt
    with LLM(path, device="cpu") as llm:
        asked = SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=1, prompt_logprobs=1)
        out, plain = llm.generate([PROMPT, PROMPT], [asked, SamplingParams(max_tokens=4)])
    check(out.prompt_logprobs, reference, 1)
    assert len(out.outputs) == 3 and plain.prompt_logprobs is None


def test_prompt_logprobs_out_of_range_is_named():
    with pytest.raises(ParamError, match="prompt_logprobs must be an integer in \\[0, 20\\]"):
        SamplingParams(prompt_logprobs=21)


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt[0])
    yield s
    assert s.stop() == 0


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server, reference):
    """lm-eval's local-completions loglikelihood request: token ids, echo, logprobs 1,
    max_tokens 1; it reads token_logprobs[ctxlen:-1] and compares top_logprobs there."""
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(PROMPT) + 1  # the prompt, then the generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [reference[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))]
    got = lp["token_logprobs"][1 : len(PROMPT)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
    assert all(len(top) >= 1 for top in lp["top_logprobs"][1:])
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert offsets[-1] == len(server_text(server, PROMPT))  # the generated token follows
    assert choice["text"].startswith(server_text(server, PROMPT))


def server_text(server, ids) -> str:
    r = server.post("/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 0})
    return r.json()["choices"][0]["text"]


def test_max_tokens_zero_with_echo_only_scores(server, reference):
    body = {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 0}
    r = server.post("/v1/completions", body).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(PROMPT)
    assert abs(lp["token_logprobs"][-1] - reference[-2, PROMPT[-1]].item()) < 1e-4


def test_streamed_echo_leads_with_the_prompt_logprobs(server):
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 3, "stream": True}
    body["temperature"] = 0
    with server.client().completions.create(
        model="tiny", **{k: v for k, v in body.items() if k != "stream"}, stream=True
    ) as stream:
        chunks = [c.choices[0] for c in stream if c.choices]
    first = chunks[0].logprobs
    assert first.token_logprobs[0] is None and len(first.tokens) >= len(PROMPT)
    total = sum(len(c.logprobs.tokens) for c in chunks if c.logprobs)
    assert total == len(PROMPT) + 3


def test_vllm_prompt_logprobs_field_on_both_endpoints(server, reference):
    body = {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    pl = choice["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(PROMPT)
    entry = pl[7][str(PROMPT[7])]
    assert abs(entry["logprob"] - reference[6, PROMPT[7]].item()) < 1e-4
    assert entry["rank"] >= 1 and "decoded_token" in entry
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0}
    r = server.post("/v1/chat/completions", chat).json()
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) > 1
    streamed = server.post("/v1/completions", {**body, "stream": True}).text
    first = json.loads(streamed.split("data: ", 2)[1])["choices"][0]
    assert first["prompt_logprobs"] == pl  # in the first chunk, as computed
    bad = server.post("/v1/completions", {"prompt": "x", "prompt_logprobs": 99})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_logprobs"


@pytest.mark.parametrize("prompt", ["def f(x):", "s = 'héllo ünïcode ✓'"])
def test_text_offsets_index_the_echoed_text(server, prompt):
    """A text prompt is echoed as given: the BOS the tokenizer adds has no width in it, and
    the byte tokens of a multi-byte character have width 0 but the last, so each offset
    points where its token's text begins and the generated tokens start at the text's end."""
    body = {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    offsets = lp["text_offset"]
    assert lp["tokens"][0] == "<s>" and offsets[:2] == [0, 0]
    assert offsets == sorted(offsets) and offsets[-3] == len(prompt)
    for token, offset in list(zip(lp["tokens"], offsets, strict=True))[1:-3]:
        if "\ufffd" not in token:  # a whole character: its text is at its offset
            assert text[offset : offset + len(token)] == token
    top = lp["top_logprobs"][1]
    assert list(top.values()) == sorted(top.values(), reverse=True)  # most likely first

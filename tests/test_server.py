"""The OpenAI-compatible server, started as `shardlm serve` in a subprocess and driven by the
official `openai` client, httpx and curl-like raw requests.

The oracle is the offline engine (`LLM.generate`) on the same checkpoint, itself checked
against transformers elsewhere: greedy server output must equal it token for token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from shardlm import LLM, SamplingParams
from tests.conftest import make_checkpoint

KEY = "sk-test-key"
NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *flags: str, api_key: str | None = KEY) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SHARDLM_API_KEY", None)
        argv = [sys.executable, "-m", "shardlm", "serve", "--model", str(model)]
        argv += ["--port", str(self.port), "--served-model-name", NAME, "--device", "cpu"]
        argv += ["--dtype", "float32", "--kv-cache-tokens", "4096", *flags]
        if api_key:
            argv += ["--api-key", api_key]
        # A file, never a pipe nobody reads (a full pipe would block the server); closed in stop.
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **kwargs)

    def post(self, path: str, body, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, (dict, list)):
            return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=timeout)
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{self.url}{path}", content=body, headers=headers, timeout=timeout)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve")
    make_checkpoint(path, "llama", {"max_position_embeddings": 256})
    return path


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory) -> Path:
    """Room for 4,000-token generations: requests that are still running seconds later."""
    path = tmp_path_factory.mktemp("serve-long")
    make_checkpoint(path, "llama", {"max_position_embeddings": 4096})
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def offline(ckpt):
    with LLM(ckpt, dtype="float32", device="cpu") as llm:
        yield llm


def greedy(llm: LLM, prompt, n: int = 12, **kwargs) -> str:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


# -- the openai client --
def test_completion_equals_offline_greedy_streamed_or_not(server, offline):
    client = server.client()
    r = client.completions.create(model=NAME, prompt="The cat", **GREEDY)
    assert r.choices[0].text == greedy(offline, "The cat")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(offline.encode_prompt("The cat"))
    stream = client.completions.create(model=NAME, prompt="The cat", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text


def test_chat_uses_the_template_streamed_or_not(server, offline):
    client = server.client()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "More"},
    ]
    r = client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    text = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = offline.tokenizer.encode(text, add_special_tokens=False)
    assert r.choices[0].message.content == greedy(offline, ids)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        r.choices[0].message.content
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_n_prompts_lists_and_token_ids(server, offline):
    client = server.client()
    r = client.completions.create(model=NAME, prompt=["ab", "cd"], n=2, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [greedy(offline, "ab")] * 2 + [greedy(offline, "cd")] * 2
    ids = offline.encode_prompt("ab")
    r = client.completions.create(model=NAME, prompt=ids, **GREEDY)
    assert r.choices[0].text == greedy(offline, "ab")
    r = client.completions.create(model=NAME, prompt=[ids, ids], **GREEDY)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 2 * len(ids)


def test_stop_string_ends_the_text(server, offline):
    full = greedy(offline, "The cat", 24)
    stop = full[5:7]
    r = server.client().completions.create(
        model=NAME, prompt="The cat", stop=[stop], temperature=0, max_tokens=24
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(server):
    client = server.client()
    kwargs = dict(model=NAME, prompt="Once", max_tokens=16, temperature=1.0, seed=7)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    others = {client.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in (8, 9)}
    assert others != {first}


def test_logprobs_completion_and_chat(server, offline):
    client = server.client()
    r = client.completions.create(model=NAME, prompt="The cat", logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        # Keyed by text (OpenAI's legacy format): tokens with the same text share an entry.
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert abs(chosen - max(top.values())) < 1e-5  # greedy: the chosen token is the top
    assert max(len(top) for top in lp.top_logprobs) == 3
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "x"}],
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 12 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.token.encode() == bytes(t.bytes) for t in content)


def test_models_and_api_key(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    r = httpx.get(f"{server.url}/v1/models", timeout=10)
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # no key needed


def test_concurrent_streams_each_equal_offline(server, offline):
    """32 clients streaming at once through continuous batching; each gets exactly its own
    offline greedy continuation."""
    prompts = [f"Prompt number {i}: " + "xyz"[: i % 4] for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(
            model=NAME,
            prompt=prompt,
            stream=True,
            temperature=0,
            max_tokens=16,
            extra_body={"ignore_eos": True},
        )
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(main()) == expected


# -- structured outputs --
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
}


def test_response_format_json_schema_and_json_object_via_the_openai_client(server, offline):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    client = server.client()
    messages = [{"role": "user", "content": "Who are you?"}]
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    r = client.chat.completions.create(
        model=NAME, messages=messages, response_format=schema_format, temperature=0, max_tokens=80
    )
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", content
    jsonschema.validate(json.loads(content), PERSON)
    text = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = offline.tokenizer.encode(text, add_special_tokens=False)
    spec = SamplingParams(temperature=0, max_tokens=80, structured_outputs={"json": PERSON})
    assert content == offline.generate(ids, spec, use_tqdm=False)[0].outputs[0].text
    # json_object, streamed, sampled: the deltas join into one JSON object (or stop at length).
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=3,
        max_tokens=150,
        stream=True,
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    joined = "".join(c.delta.content or "" for c in chunks)
    if chunks[-1].finish_reason == "stop":
        assert isinstance(json.loads(joined), dict)
    else:
        assert chunks[-1].finish_reason == "length"


def test_structured_outputs_field_on_completions(server, offline):
    pytest.importorskip("xgrammar")
    client = server.client()
    choices = ["red", "green", "blue"]
    r = client.completions.create(
        model=NAME,
        prompt="The colour is",
        n=4,
        temperature=1.0,
        seed=1,
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert all(c.text in choices and c.finish_reason == "stop" for c in r.choices)
    regex = r"[0-9]{3}-[a-z]{2,4}"
    r = client.completions.create(
        model=NAME,
        prompt="The code is",
        temperature=0,
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": regex, "json": None}},
    )
    assert re.fullmatch(regex, r.choices[0].text) and r.choices[0].finish_reason == "stop"
    spec = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"regex": regex})
    assert r.choices[0].text == offline.generate("The code is", spec)[0].outputs[0].text


def test_structured_output_errors_carry_the_compiler_message(server):
    pytest.importorskip("xgrammar")
    r = server.post("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a(b"}})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "structured_outputs"
    assert "invalid regex" in error["message"] and "parenthesis" in error["message"], error
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
    }
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format"
    assert "invalid JSON schema" in r.json()["error"]["message"]


# -- bad input --
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * 400}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tools.0.function",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -2},
        400,
        "max_completion_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 25},
        400,
        "top_logprobs",
    ),
    ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    ("/v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, None),
    ("/v1/completions", b'{"prompt": "\\ud800 lone"}', 400, "prompt"),
    ("/v1/completions", {"prompt": [True, False]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 40, "n": 40}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 500}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [10**6]}, 400, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "bad_words": [""]}, 400, "bad_words"),
]

# Structured outputs: a bad spec is a 400 naming the field the client used (never a 500).
USER = [{"role": "user", "content": "x"}]
BAD_SPECS = [
    {"regex": "a(b"},
    {"grammar": "root ::= nope"},
    {"json": {"type": "nope"}},
    {"json": "{bad"},
    {"choice": []},
    {"regex": "a", "choice": ["a"]},
    {"yaml": "a"},
    "a+",
]
BAD_FORMATS = [
    {"type": "yaml"},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"schema": [1]}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
    {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "("}}},
]
BAD_REQUESTS += [
    ("/v1/completions", {"prompt": "x", "structured_outputs": s}, 400, "structured_outputs")
    for s in BAD_SPECS
]
BAD_REQUESTS += [
    ("/v1/chat/completions", {"messages": USER, "response_format": f}, 400, "response_format")
    for f in BAD_FORMATS
]
BAD_REQUESTS += [
    (
        "/v1/completions",
        {"prompt": "x", "response_format": {"type": "json_object"}, "structured_outputs": {}},
        400,
        "structured_outputs",
    ),
    (
        "/v1/chat/completions",
        {"messages": USER, "structured_outputs": {"json": 1}},
        400,
        "structured_outputs",
    ),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_request_gets_a_4xx_in_openai_shape(server, path, body, status, param):
    r = server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_server_is_healthy_after_the_bad_inputs(server, offline):
    for path, body, _, _ in BAD_REQUESTS:
        server.post(path, body)
    r = server.post(
        "/v1/completions",
        {"prompt": "The cat", "temperature": 0, "max_tokens": 12, "ignore_eos": True},
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == greedy(offline, "The cat")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert server.metric('shardlm_requests_total{endpoint="/v1/completions",status="400"}') > 20


def test_serve_says_once_where_it_listens(server):
    log = Path(server.log.name).read_text()
    assert log.count("shardlm serve: listening on") == 1, log
    assert f"listening on {server.url} (model {NAME}, dtype float32, device cpu," in log


def test_unknown_route_and_method_are_openai_errors(server):
    r = httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


def test_context_overflow_names_both_numbers(server):
    r = server.post("/v1/completions", {"prompt": "hello", "max_tokens": 300})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "256" in message and "300" in message


# -- disconnects, metrics, limits, shutdown --
def test_dropped_streams_free_their_kv_blocks(server):
    """Clients that close their stream mid-generation abort their requests: KV blocks in use
    go back to the idle level, and the engine stops decoding them long before the 4 × 250
    tokens asked for (the engine's own decode counter, not what the handlers consumed)."""
    idle = server.metric("shardlm_kv_blocks_in_use")
    decoded = server.metric("shardlm_engine_decode_tokens")
    body = {"prompt": "abc", "max_tokens": 250, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with contextlib.ExitStack() as streams:
        for _ in range(4):
            r = streams.enter_context(
                httpx.stream(
                    "POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60
                )
            )
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        busy = server.metric("shardlm_kv_blocks_in_use")
    # the streams are closed here, mid-generation
    assert busy > idle
    deadline = time.monotonic() + 10
    while server.metric("shardlm_kv_blocks_in_use") > idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("shardlm_kv_blocks_in_use") == idle
    assert server.metric("shardlm_num_requests_running") == 0
    assert server.metric("shardlm_engine_decode_tokens") - decoded < 4 * 249 * 0.8


def test_non_streaming_client_that_leaves_is_aborted(long_ckpt):
    """A non-streaming request whose client gives up is aborted (its connection is polled):
    the engine decodes far fewer than the 4,000 tokens asked for."""
    s = Server(long_ckpt, api_key=None)
    try:
        body = {"prompt": "abc", "max_tokens": 4000, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            s.post("/v1/completions", body, key=None, timeout=0.5)
        deadline = time.monotonic() + 10
        while s.metric("shardlm_num_requests_running") > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.metric("shardlm_num_requests_running") == 0
        assert s.metric("shardlm_engine_decode_tokens") < 3000
    finally:
        assert s.stop() == 0


def test_echo_usage_chunk_and_n_streams(server, offline):
    client = server.client()
    r = client.completions.create(model=NAME, prompt="The cat", echo=True, **GREEDY)
    assert r.choices[0].text == "The cat" + greedy(offline, "The cat")
    stream = client.completions.create(
        model=NAME,
        prompt="The cat",
        n=2,
        stream=True,
        echo=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    texts = ["", ""]
    chunks = list(stream)
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == ["The cat" + greedy(offline, "The cat")] * 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_metrics_exposes_the_promised_series(server):
    server.client().completions.create(model=NAME, prompt="x", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in (
        "shardlm_requests_total",
        "shardlm_prompt_tokens_total",
        "shardlm_generation_tokens_total",
        "shardlm_num_requests_running",
        "shardlm_num_requests_waiting",
        "shardlm_kv_blocks_in_use",
        "shardlm_time_to_first_token_seconds_bucket",
        "shardlm_inter_token_latency_seconds_bucket",
    ):
        assert name in text, name
    assert server.metric("shardlm_generation_tokens_total") >= 3


def test_full_waiting_queue_answers_429(long_ckpt):
    """One sequence runs (a long one), one waits (the limit): the next is refused with 429."""
    s = Server(long_ckpt, "--max-num-seqs", "1", "--max-waiting", "1", api_key=None)
    try:
        body = {"prompt": "abc", "max_tokens": 50, "ignore_eos": True}
        url = f"{s.url}/v1/completions"
        long = {**body, "max_tokens": 4000, "stream": True}
        with httpx.stream("POST", url, json=long, timeout=60) as running:
            events = running.iter_lines()  # kept: dropping the iterator closes the stream
            next(events)  # it runs
            waiting: list[httpx.Response] = []
            t = threading.Thread(
                target=lambda: waiting.append(httpx.post(url, json=body, timeout=120))
            )
            t.start()
            deadline = time.monotonic() + 10
            while s.metric("shardlm_num_requests_waiting") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            refused = httpx.post(url, json=body, timeout=60)
        t.join()
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert waiting[0].status_code == 200
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_in_flight_requests_and_exits_0(ckpt):
    s = Server(ckpt, "--shutdown-timeout", "20", api_key=None)
    body = {
        "prompt": "abc",
        "max_tokens": 120,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)  # generating: now ask the server to stop
        s.proc.send_signal(signal.SIGTERM)
        events = [line for line in lines if line]
    assert s.proc.wait(timeout=30) == 0
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 120  # it finished
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health", timeout=2)


def test_sigterm_ends_what_cannot_finish_with_an_error_event(long_ckpt):
    s = Server(long_ckpt, "--shutdown-timeout", "1", api_key=None)
    body = {"prompt": "abc", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        s.proc.send_signal(signal.SIGTERM)
        events = [line for line in lines if line]
    assert s.proc.wait(timeout=30) == 0
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert "shutting down" in error["message"] and error["type"] == "service_unavailable"


def test_serve_with_tensor_parallelism_and_attention_nodes(ckpt, offline):
    s = Server(
        ckpt,
        "--tp",
        "2",
        "--attention-nodes",
        "2",
        "--attention-transport",
        "in-process",
        api_key=None,
    )
    try:
        r = httpx.post(
            f"{s.url}/v1/completions",
            json={"prompt": "The cat", "temperature": 0, "max_tokens": 12, "ignore_eos": True},
            timeout=60,
        )
        assert r.json()["choices"][0]["text"] == greedy(offline, "The cat")
    finally:
        assert s.stop() == 0


def test_serve_without_the_extra_says_how_to_install_it(ckpt):
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from shardlm.entrypoints.cli import main\n"
        f"sys.exit(main(['serve', '--model', {str(ckpt)!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "pip install 'shardlm[serve]'" in r.stderr


def test_core_never_imports_the_server_stack():
    code = (
        "import sys, shardlm, shardlm.engine.llm, shardlm.entrypoints.cli\n"
        "print(json.dumps(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', "
        "'pydantic') if m in sys.modules)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []

"""The serving objects and build_app in-process, over a fake engine: no model, no socket.

The fake engine answers every request with a fixed script of deltas, so these tests check
the server's own logic (choice numbering, echo, streaming shape, admission, error mapping,
the API key) exactly; tests/test_server.py checks the real engine behind a real socket.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine.stats import EngineStats
from shardlm.entrypoints.openai.engine_client import EngineDead, RequestStream
from shardlm.entrypoints.openai.engine_core import NodeSnapshot
from shardlm.entrypoints.openai.metrics import ServerMetrics
from shardlm.entrypoints.openai.protocol import APIError, ChatCompletionRequest, CompletionRequest
from shardlm.entrypoints.openai.server import build_app
from shardlm.entrypoints.openai.server_config import ServerConfig
from shardlm.entrypoints.openai.serving_chat import ChatServing
from shardlm.entrypoints.openai.serving_completions import CompletionServing
from shardlm.entrypoints.openai.validation import COMPLETION_FIELDS, chat_fields
from shardlm.errors import ParamError

NAME = "fake"
MAX_MODEL_LEN = 64
VOCAB = 300


class Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeEngine:
    """EngineClient's surface: every request generates "ab" (two deltas), n sequences each."""

    def __init__(self, refuse: BaseException | None = None, waiting: int = 0) -> None:
        self.tokenizer = Tokenizer()
        self.max_model_len = MAX_MODEL_LEN
        self.vocab_size = VOCAB
        self.stats = EngineStats(
            preemptions=0,
            prefix_cache_hit_tokens=0,
            prefix_cache_query_tokens=0,
            prefill_tokens=0,
            decode_tokens=0,
            blocks_in_use=0,
            num_blocks=8,
            num_running=0,
            num_waiting=waiting,
        )
        self.node_stats = NodeSnapshot()
        self.pending_sequences = 0
        self.dead: BaseException | None = None
        self.refuse = refuse
        self.added: list[tuple[str, dict, SamplingParams]] = []
        self.aborted: list[str] = []

    async def add(self, request_id: str, prompt: dict, params: SamplingParams) -> RequestStream:
        self.added.append((request_id, prompt, params))
        if self.refuse is not None and request_id.endswith("-1"):
            raise self.refuse
        outputs: asyncio.Queue = asyncio.Queue()
        for step, char in enumerate("ab"):
            last = step == 1
            deltas = [
                CompletionOutput(j, char, [ord(char)], "length" if last else None)
                for j in range(params.n)
            ]
            ids = prompt["prompt_token_ids"]
            outputs.put_nowait(RequestOutput(request_id, prompt["prompt"], ids, deltas, last))
        return RequestStream(self, request_id, outputs)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def serving(cls, engine: FakeEngine, max_waiting: int = 8):
    metrics = ServerMetrics(lambda: engine.stats)
    return cls(engine=engine, metrics=metrics, model_name=NAME, max_waiting=max_waiting)


def refused(coro) -> APIError:
    with pytest.raises(APIError) as info:
        asyncio.run(coro)
    return info.value


def sse_payloads(text: str) -> list:
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


# -- the serving objects, without HTTP --
def test_completion_validate_tokenizes_checks_and_builds_params_per_prompt():
    s = serving(CompletionServing, FakeEngine())
    body = CompletionRequest(prompt=["ab", "c"], max_tokens=5, n=2)
    prompts, params = asyncio.run(s.validate(body))
    assert prompts == [("ab", [97, 98]), ("c", [99])]
    assert [(p.n, p.max_tokens) for p in params] == [(2, 5), (2, 5)]
    assert params[0] is not params[1]
    prompts, _ = asyncio.run(s.validate(CompletionRequest(prompt=[104, 105])))
    assert prompts == [("hi", [104, 105])]  # token ids: the text is their decoding


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": [[1], [VOCAB]]}, "prompt"),
        ({"prompt": "x" * MAX_MODEL_LEN}, "prompt"),
        ({"prompt": "x" * 60, "max_tokens": 5}, "max_tokens"),
        ({"prompt": "x", "model": "other"}, "model"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
    ],
)
def test_completion_validate_refuses_naming_the_field(body, param):
    s = serving(CompletionServing, FakeEngine())
    assert refused(s.validate(CompletionRequest.model_validate(body))).param == param


def test_chat_validate_names_messages_and_the_limit_the_client_used():
    s = serving(ChatServing, FakeEngine())
    msg = [{"role": "user", "content": "hi"}]
    (text, ids), params, _ = asyncio.run(
        s.validate(ChatCompletionRequest.model_validate({"messages": msg, "top_logprobs": None}))
    )
    assert text == "<user>hi<assistant>" and ids == list(text.encode())
    assert params.max_tokens is None  # chat's default: up to the context limit
    long = [{"role": "user", "content": "x" * MAX_MODEL_LEN}]
    e = refused(s.validate(ChatCompletionRequest.model_validate({"messages": long})))
    assert e.param == "messages"
    for field in ("max_tokens", "max_completion_tokens"):
        body = ChatCompletionRequest.model_validate({"messages": msg, field: MAX_MODEL_LEN})
        e = refused(s.validate(body))
        assert e.param == field and f"lower {field}" in e.message


def test_start_is_all_or_nothing_and_renames_the_engine_field():
    engine = FakeEngine(refuse=ParamError("prompt", "prompt token id 7 is not allowed"))
    s = serving(ChatServing, engine)
    prompts = [("a", [97]), ("b", [98])]
    params = [SamplingParams(), SamplingParams()]
    e = refused(s.start("r", prompts, params, chat_fields()))
    assert (e.status, e.param) == (400, "messages")
    assert e.message.startswith("messages token id 7")
    assert engine.aborted == ["r-0"]  # the accepted one does not run on
    engine = FakeEngine(refuse=ValueError("the KV cache is too small"))
    e = refused(serving(CompletionServing, engine).start("r", prompts, params, COMPLETION_FIELDS))
    assert (e.status, e.param) == (400, None)
    engine = FakeEngine(refuse=EngineDead("the server is shutting down"))
    e = refused(serving(CompletionServing, engine).start("r", prompts, params, COMPLETION_FIELDS))
    assert e.status == 503 and "shutting down" in e.message


def test_start_admits_up_to_the_waiting_limit():
    params = [SamplingParams(n=2), SamplingParams(n=2)]
    prompts = [("a", [97]), ("b", [98])]

    def start(engine: FakeEngine, max_waiting: int = 8):
        s = serving(CompletionServing, engine, max_waiting)
        return s.start("r", prompts, params, COMPLETION_FIELDS)

    assert len(asyncio.run(start(FakeEngine(waiting=4)))) == 2  # 4 waiting + 4 = the limit
    engine = FakeEngine(waiting=5)
    e = refused(start(engine))
    assert e.status == 429 and engine.added == []
    e = refused(start(FakeEngine(), max_waiting=3))
    assert (e.status, e.param) == (400, "n")


# -- build_app, over ASGI --
def call(app, method: str, path: str, body: dict | None = None, key: str | None = None):
    async def go() -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, json=body, headers=headers)

    return asyncio.run(go())


def test_app_completions_number_choices_and_echo(monkeypatch):
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    app = build_app(FakeEngine(), ServerConfig(), NAME)
    r = call(app, "POST", "/v1/completions", {"prompt": ["p", "q"], "n": 2, "echo": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == NAME and out["object"] == "text_completion"
    assert [(c["index"], c["text"]) for c in out["choices"]] == [
        (0, "pab"),
        (1, "pab"),
        (2, "qab"),
        (3, "qab"),
    ]
    assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}


def test_app_chat_stream_has_the_role_chunk_usage_and_done(monkeypatch):
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    app = build_app(FakeEngine(), ServerConfig(), NAME)
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = call(app, "POST", "/v1/chat/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2])
    assert text == "ab" and events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 2


def test_app_errors_are_openai_shaped_and_counted(monkeypatch):
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    engine = FakeEngine(refuse=RuntimeError("boom"))
    app = build_app(engine, ServerConfig(), NAME)
    r = call(app, "POST", "/v1/completions", {"prompt": ["a", "b"]})
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]
    r = call(app, "POST", "/v1/chat/completions", {"messages": [{"role": "user"}], "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = call(app, "POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    metrics = call(app, "GET", "/metrics").text
    assert 'shardlm_requests_total{endpoint="/v1/completions",status="500"} 1.0' in metrics
    assert 'shardlm_requests_total{endpoint="/v1/chat/completions",status="400"} 1.0' in metrics
    engine.dead = EngineDead("the engine failed: boom")
    assert call(app, "GET", "/health").status_code == 503


def test_app_models_card_and_api_key_from_config_or_environment(monkeypatch):
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    app = build_app(FakeEngine(), ServerConfig(api_key="k1"), NAME)
    assert call(app, "GET", "/v1/models").status_code == 401
    card = call(app, "GET", "/v1/models", key="k1").json()["data"][0]
    assert (card["id"], card["max_model_len"], card["owned_by"]) == (NAME, MAX_MODEL_LEN, "shardlm")
    assert call(app, "GET", "/health").status_code == 200  # no key needed
    monkeypatch.setenv("SHARDLM_API_KEY", "k2")
    app = build_app(FakeEngine(), ServerConfig(), NAME)
    assert call(app, "GET", "/v1/models", key="k1").json()["error"]["message"] == "wrong API key"
    assert call(app, "GET", "/v1/models", key="k2").status_code == 200
    app = build_app(FakeEngine(), ServerConfig(api_key="k1"), NAME)  # the option wins
    assert call(app, "GET", "/v1/models", key="k1").status_code == 200

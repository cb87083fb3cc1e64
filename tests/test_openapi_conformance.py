"""The server against OpenAI's published API spec (../shared/openai-openapi/openapi.json),
fuzzed with schemathesis: createChatCompletion and createCompletion, bodies generated from
the spec's request schemas, the model name fixed by a hook, against `shardlm serve` on the
built-in model (tools auto-enabled with the hermes parser, as a tool-serving deployment is).

For every case: no 5xx; a 200 is valid against the spec's response schema (schemathesis'
response_schema_conformance, which also reads Server-Sent Events); every 4xx is in a listed
class: a feature the README lists as refused on purpose, or a validation error of a named
kind. The tally per class is printed (-s) and written to $SHARDLM_CONFORMANCE_TALLY if set.
Bounded (MAX_EXAMPLES per operation, max_tokens ≤ 4) to stay near a minute on 2 CPU cores.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from shardlm.entrypoints.openai.protocol import (  # noqa: E402
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from tests.test_server_legacy_functions import _nullable  # noqa: E402
from tests.test_server_tools import TEMPLATE  # noqa: E402

SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.json"
if not SPEC.is_file():
    pytest.skip(f"{SPEC} is absent", allow_module_level=True)

NAME = "tiny"
MAX_TOKENS = 4
MAX_EXAMPLES = int(os.environ.get("SHARDLM_CONFORMANCE_EXAMPLES", "150"))

# Every 4xx the server may answer a spec-valid request with: (class, status, param pattern,
# message pattern). Refused on purpose (README, "accepted message forms"), or a value the
# spec's schema allows but its text, OpenAI or the engine refuses.
ALLOWED_4XX = [
    ("refused: non-text content part", 400, r"messages\.\d+\.content\.\d+\.type", "not supported"),
    (
        "legacy function definition or function_call invalid",
        400,
        r"functions(\.\d+(\.name|\.parameters|\.description)?)?|function_call(\.name)?",
        "",
    ),
    ("refused: audio output", 400, r"audio|modalities", "text only"),
    # The legacy answer holds one call (README, legacy functions API).
    ("refused: parallel calls with legacy functions", 400, r"parallel_tool_calls", "one call"),
    (
        "refused: custom tools and calls",
        400,
        r"tools\.\d+\.type|messages\.\d+\.tool_calls\.\d+\.type",
        "",
    ),
    ("refused: suffix", 400, r"suffix", "not supported"),
    ("refused: best_of other than n", 400, r"best_of", "not supported"),
    (
        "tool definition invalid",
        400,
        r"tools(\.\d+(\.function(\.name|\.parameters|\.description)?)?)?",
        "",
    ),
    ("tool_choice invalid or unknown function", 400, r"tool_choice(\.function\.name)?", ""),
    ("tool message without tool_call_id", 400, r"messages\.\d+\.tool_call_id", ""),
    ("top_logprobs without logprobs", 400, r"top_logprobs", "needs logprobs"),
    ("max_tokens beyond the context or below 0", 400, r"max_tokens|max_completion_tokens", ""),
    ("n beyond the server's queue", 400, r"n", "sequences"),
    ("chat template refused the conversation", 400, r"messages", "chat template"),
    ("prompt: empty, a token outside the vocabulary, or too long", 400, r"prompt|messages", ""),
    ("logprobs beyond 20 / prompt_logprobs", 400, r"logprobs|top_logprobs", ""),
    ("logit_bias token outside the vocabulary", 400, r"logit_bias", ""),
    ("stop strings beyond the limit", 400, r"stop", ""),
    ("response_format schema refused by the compiler", 400, r"response_format", ""),
    ("string not valid Unicode (lone surrogate)", 400, r"[\w.]+", "not valid Unicode"),
]


# Fields shardlm reads beyond OpenAI's (vLLM's extensions: structured_outputs, top_k,
# chat_template_kwargs, a message's reasoning_content, ...). The spec lets a request carry any
# extra property, so the fuzzer sends them with values of every type; one shardlm cannot read
# is a 400 naming it (pydantic's "Input should be ..."), never a 5xx or a silent ignore.
SPEC_TEXT = SPEC.read_text()
EXTENSIONS = {
    name
    for model in (ChatCompletionRequest, CompletionRequest, ChatMessage)
    for name in model.model_fields
    if f'"{name}"' not in SPEC_TEXT
}


def classify(status: int, error: dict) -> str | None:
    param, message = error.get("param") or "", error.get("message") or ""
    for name, code, params, text in ALLOWED_4XX:
        if code == status and re.fullmatch(params, param) and text in message:
            return name
    field = re.sub(r"^messages\.\d+\.", "", param).split(".")[0]
    if status == 400 and field in EXTENSIONS and "Input should be" in message:
        return "extension field (vLLM's) of a type shardlm cannot read"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url():
    port = free_port()
    argv = [sys.executable, "-m", "shardlm", "serve", "--port", str(port)]
    argv += ["--served-model-name", NAME, "--device", "cpu", "--kv-cache-tokens", "16384"]
    argv += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    env = {k: v for k, v in os.environ.items() if k != "SHARDLM_API_KEY"}
    with (
        tempfile.NamedTemporaryFile("w+", suffix=".log") as log,
        tempfile.NamedTemporaryFile("w", suffix=".jinja") as template,
    ):
        # The built-in model's template knows no tool role: serve a tool-format one.
        template.write(TEMPLATE)
        template.flush()
        argv += ["--chat-template", template.name]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"server did not start: {log.read()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.2)
            yield url + "/v1"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def with_known_deviations(spec: dict) -> dict:
    """The spec as OpenAI's API answers in one place it does not describe: with ``echo`` and
    ``logprobs``, a completion's first prompt token has no logprob, and OpenAI (like vLLM,
    and as lm-eval reads it) answers null in token_logprobs and top_logprobs there."""
    choice = spec["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"]
    logprobs = choice["items"]["properties"]["logprobs"]["anyOf"][0]["properties"]
    for key in ("token_logprobs", "top_logprobs"):
        logprobs[key]["items"] = {"anyOf": [logprobs[key]["items"], {"type": "null"}]}
    return spec


STREAM_CHUNKS = {  # the schema each streamed chunk follows
    "createChatCompletion": "CreateChatCompletionStreamResponse",
    "createCompletion": "CreateCompletionResponse",
}


def check_stream(spec: dict, operation_id: str, text: str) -> None:
    """Every data line of a streamed answer against its chunk schema, and [DONE] last.
    Streams are checked here rather than by schemathesis, whose event-stream check validates
    the SSE event's envelope instead of its JSON data."""
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", text[-300:]
    name = STREAM_CHUNKS[operation_id]
    components = _nullable(spec["components"])
    validator = jsonschema.Draft202012Validator(
        {"components": components, "$ref": f"#/components/schemas/{name}"}
    )
    for chunk in data[:-1]:
        validator.validate(json.loads(chunk))


@pytest.fixture(scope="module")
def spec() -> dict:
    return with_known_deviations(json.loads(SPEC_TEXT))


@pytest.fixture(scope="module")
def schema(spec):
    loaded = schemathesis.openapi.from_dict(spec)

    @loaded.hook("map_body")
    def served_model_and_few_tokens(context, body):
        """The served model's name; at most MAX_TOKENS generated (values below it, which
        exercise the checks, are kept)."""
        if not isinstance(body, dict):
            return body
        body["model"] = NAME
        limits = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
        for key in limits:
            if isinstance(body[key], (int, float)) and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if not limits or all(body[k] is None for k in limits):
            body["max_tokens"] = MAX_TOKENS
        return body

    return loaded


TALLY: collections.Counter = collections.Counter()


@pytest.mark.parametrize("operation_id", ["createChatCompletion", "createCompletion"])
def test_spec_valid_requests_are_answered_as_the_spec_says(spec, schema, base_url, operation_id):
    operation = schema.find_operation_by_id(operation_id)
    tally: collections.Counter = collections.Counter()
    unlisted: list[str] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(hooks=schema.hooks))
    def fuzz(case):
        response = case.call(base_url=base_url, timeout=120)
        status = response.status_code
        assert status < 500, f"{status} for {case.body!r}: {response.text[:500]}"
        if status == 200:
            content_type = response.headers.get("content-type") or [""]  # a list of values
            if str(content_type[0]).startswith("text/event-stream"):
                check_stream(spec, operation_id, response.text)
            else:
                case.validate_response(response, checks=[response_schema_conformance])
            tally["200"] += 1
            return
        error = response.json().get("error", {})
        kind = classify(status, error)
        if kind is None:
            unlisted.append(f"{status} {error} for {json.dumps(case.body)[:300]}")
            kind = "UNLISTED"
        tally[kind] += 1

    fuzz()
    TALLY.update({f"{operation_id}: {k}": v for k, v in tally.items()})
    report = "\n".join(f"{v:5d}  {k}" for k, v in tally.most_common())
    print(f"\n{operation_id} ({sum(tally.values())} cases):\n{report}")
    if path := os.environ.get("SHARDLM_CONFORMANCE_TALLY"):
        with open(path, "a") as f:
            f.write(f"{operation_id}\n{report}\n")
    assert not unlisted, "\n".join(unlisted[:10])
    # A floor, so that a server refusing everything by a listed class still fails.
    assert tally["200"] >= sum(tally.values()) // 4, tally

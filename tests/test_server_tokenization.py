"""vLLM's /tokenize, /detokenize and /tokenizer_info, and OpenAI routes shardlm does not serve
(answered in OpenAI's error shape, saying so)."""

from __future__ import annotations

import httpx
import openai
import pytest

from shardlm.tokenizer import Tokenizer
from tests.test_server import Server


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.conftest import make_checkpoint

    path = tmp_path_factory.mktemp("serve-tokenize")
    make_checkpoint(path, "llama", {"max_position_embeddings": 256})
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt)
    yield s
    assert s.stop() == 0


def test_tokenize_and_detokenize_round_trip(server, ckpt):
    tokenizer = Tokenizer.from_pretrained(ckpt)
    r = server.post("/tokenize", {"prompt": "hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tokenizer.encode("hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256 and "".join(r["token_strs"]).endswith("hello world")
    bare = server.post("/tokenize", {"prompt": "hello", "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode("hello", add_special_tokens=False)
    back = server.post("/detokenize", {"tokens": bare["tokens"]}).json()
    assert back == {"prompt": "hello"}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert server.post("/tokenize", chat).json()["tokens"] == tokenizer.encode(
        rendered, add_special_tokens=False
    )


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ],
)
def test_bad_tokenizer_requests_name_the_field(server, path, body, param):
    r = server.post(path, body)
    assert 400 <= r.status_code < 500
    assert r.json()["error"]["param"] == param


def test_tokenizer_info_says_what_the_tokenizer_is(server, ckpt):
    assert server.post("/tokenizer_info", {}).status_code == 405  # GET only
    got = httpx.get(f"{server.url}/tokenizer_info", timeout=10).json()
    tokenizer = Tokenizer.from_pretrained(ckpt)
    assert got["eos_token"] == tokenizer.eos_token and got["model_max_length"] == 256
    assert got["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_openai_routes_not_served_say_so(server):
    r = server.post("/v1/embeddings", {"model": "tiny", "input": "x"})
    error = r.json()["error"]
    assert r.status_code == 404 and error["code"] == "unsupported_endpoint"
    assert "does not serve" in error["message"] and "/v1/completions" in error["message"]
    with pytest.raises(openai.NotFoundError, match="does not serve"):
        server.client().responses.create(model="tiny", input="hi")
    other = server.post("/no/such/route", {})
    assert (
        other.status_code == 404 and "no route /no/such/route" in other.json()["error"]["message"]
    )

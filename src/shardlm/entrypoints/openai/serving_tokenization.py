"""vLLM's tokenizer endpoints, as lm-evaluation-harness and other clients call them:

* ``POST /tokenize`` {"prompt": text} or {"messages": [...]} (rendered as
  /v1/chat/completions renders them: the chat template or --chat-template, ``tools``,
  ``chat_template_kwargs``, ``add_generation_prompt``), ``add_special_tokens`` (default true;
  never added to a rendered chat), ``return_token_strs`` →
  {"count", "max_model_len", "tokens", "token_strs"};
* ``POST /detokenize`` {"tokens": [ids]} → {"prompt": text};
* ``GET /tokenizer_info`` → the tokenizer's settings, as tokenizer_config.json has them
  (``tokenizer_class``, the special tokens, ``chat_template``, ``model_max_length``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.requests import Request

from shardlm.entrypoints.openai.protocol import APIError, ChatCompletionRequest
from shardlm.entrypoints.openai.serving import OpenAIServing, read_body
from shardlm.entrypoints.openai.validation import (
    COMPLETION_FIELDS,
    Fields,
    check_model,
    check_tools,
    render_chat,
    token_ids,
)

TOKENIZE_FIELDS = COMPLETION_FIELDS
DETOKENIZE_FIELDS = Fields({"prompt": "tokens", "prompt_token_ids": "tokens"})


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None  # checked as a chat request's (TokenizeChatRequest)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatCompletionRequest):
    """The messages form of /tokenize: a chat request's rendering fields, and the token
    strings flag."""

    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]


class TokenizationServing(OpenAIServing):
    def __init__(self, *args: Any, chat_template: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chat_template = chat_template  # --chat-template's text, or None

    def _tokenizer(self):
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer (skip_tokenizer_init)")
        return self.tokenizer

    async def tokenize(self, request: Request) -> dict:
        body = await read_body(request, TokenizeRequest)
        check_model(body.model, self.model_name)
        tokenizer = self._tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            chat = await read_body(request, TokenizeChatRequest)
            check_tools(chat)
            text = render_chat(tokenizer, chat, self.chat_template)
            ids = await self.encode(text, TOKENIZE_FIELDS, add_special_tokens=False)
        else:
            ids = await self.encode(
                body.prompt, TOKENIZE_FIELDS, add_special_tokens=body.add_special_tokens
            )
        strs = None
        if body.return_token_strs:
            strs = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        return {
            "count": len(ids),
            "max_model_len": self.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }

    async def detokenize(self, request: Request) -> dict:
        body = await read_body(request, DetokenizeRequest)
        check_model(body.model, self.model_name)
        ids = token_ids(body.tokens, self.vocab_size, DETOKENIZE_FIELDS)
        return {"prompt": self._tokenizer().decode(ids, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict:
        tokenizer = self._tokenizer()
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **tokenizer.special_tokens,
            "chat_template": tokenizer.chat_template,
            "model_max_length": self.max_model_len,
            "vocab_size": tokenizer.vocab_size,
        }

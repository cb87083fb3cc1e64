"""``ServerConfig``: the options of ``shardlm serve``, declared once (shardlm/options.py).

The flags, their checks and the docs table all come from these declarations. This module
imports only shardlm.options, so the CLI builds its parser without FastAPI installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from shardlm.errors import ParamError
from shardlm.options import check_fields, int_in, number_in, option

API_KEY_ENV = "SHARDLM_API_KEY"
# The names in tool_parsers.TOOL_PARSERS and reasoning.REASONING_PARSERS (tests check they
# agree); listed here so that the CLI builds its parser without importing the server.
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
REASONING_PARSERS = ("qwen3", "deepseek_r1")


def _template_file(value: object) -> str | None:
    """--chat-template names a readable UTF-8 jinja file (read here, before the engine
    starts, so a bad file is one line on the command line)."""
    if value is None:
        return None
    if not isinstance(value, str) or not Path(value).is_file():
        raise ParamError("chat_template", f"chat_template must be a jinja file, got {value!r}")
    try:
        Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ParamError("chat_template", f"chat_template {value!r} cannot be read: {e}") from None
    return None


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP server listens, names its model, authorizes and sheds load."""

    host: str = option("127.0.0.1", "address to bind (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port to listen on (0: any free port)", check=int_in(0, 65535))
    served_model_name: str | None = option(
        None,
        "the model's name in the API",
        default_text="the model path, or the built-in model's name",
    )
    api_key: str | None = option(
        None,
        "require 'Authorization: Bearer KEY' on /v1",
        default_text=f"${API_KEY_ENV}, else none",
    )
    max_waiting: int = option(
        1024,
        "answer 429 while this many sequences wait to start",
        check=int_in(1, 2**31 - 1),
    )
    shutdown_timeout: float = option(
        10.0,
        "on SIGTERM, seconds in-flight requests get to finish before they are aborted",
        check=number_in(0, math.inf),
    )

    tool_call_parser: str | None = option(
        None,
        "how tool_choice 'auto' reads calls from the generated text",
        choices=(*TOOL_CALL_PARSERS, None),
    )
    enable_auto_tool_choice: bool = option(
        False, "allow tool_choice 'auto' (vLLM's flag; needs --tool-call-parser)"
    )
    reasoning_parser: str | None = option(
        None,
        "split <think>…</think> reasoning into reasoning_content",
        choices=(*REASONING_PARSERS, None),
    )
    chat_template: str | None = option(
        None,
        "a jinja chat template file that replaces the checkpoint's",
        check=_template_file,
        default_text="the checkpoint's",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ParamError(
                "enable_auto_tool_choice",
                "enable_auto_tool_choice needs tool_call_parser (--tool-call-parser NAME: "
                + ", ".join(TOOL_CALL_PARSERS)
                + ")",
            )

    def chat_template_text(self) -> str | None:
        """The --chat-template file's template, read once at startup."""
        if self.chat_template is None:
            return None
        return Path(self.chat_template).read_text(encoding="utf-8")

"""``ServerConfig``: the options of ``shardlm serve``, declared once (shardlm/options.py).

The flags, their checks and the docs table all come from these declarations. This module
imports only shardlm.options, so the CLI builds its parser without FastAPI installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardlm.options import check_fields, int_in, number_in, option

API_KEY_ENV = "SHARDLM_API_KEY"


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

    def __post_init__(self) -> None:
        check_fields(self)

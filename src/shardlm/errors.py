"""Errors users see. Each carries a one-line message naming what was wrong and what is allowed.

The CLI prints ``str(error)`` for these and exits non-zero without a traceback; anything else
is a bug in shardlm and keeps its traceback.
"""

from __future__ import annotations


class ShardlmError(ValueError):
    """Base for errors caused by the user's input (checkpoint, config, arguments)."""


class ParamError(ShardlmError):
    """One argument has a value that is not allowed. ``param`` names it (as the caller spelt
    it: an engine option, a SamplingParams field, ``prompt``), so a server can report the
    field without parsing the message."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ConfigError(ShardlmError):
    """config.json describes a model shardlm cannot run, or is malformed."""


class CheckpointError(ShardlmError):
    """The weights on disk do not match what the config promises."""


class WorkerFailure(RuntimeError):
    """A tensor-parallel rank died or stopped answering; every rank has been stopped."""

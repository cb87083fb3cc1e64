"""xgrammar, imported on first use: it is an optional extra (``shardlm[structured]``) and
pulls in transformers, which neither the core nor a request without a grammar should pay for."""

from __future__ import annotations

import re
from types import ModuleType

from shardlm.errors import ParamError
from shardlm.structured.params import PARAM

INSTALL_HINT = "structured outputs need xgrammar: pip install 'shardlm[structured]'"

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " (and may add a "Check
# failed: ... is false: " preamble): the user needs only what follows.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def xgrammar() -> ModuleType:
    """The xgrammar module, or a ParamError saying how to install it."""
    try:
        import xgrammar as xgr
    except ImportError:
        raise ParamError(PARAM, INSTALL_HINT) from None
    return xgr


def compiler_message(error: Exception) -> str:
    """xgrammar's error as one line without its source location."""
    text = str(error).strip()
    return " ".join(_LOG_PREFIX.sub("", text).split()) or type(error).__name__

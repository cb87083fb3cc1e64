"""The vocabulary as xgrammar sees it, built from shardlm's tokenizer (``tokenizers``).

Three things differ from handing xgrammar the tokenizer as is:

* the mask covers the model's ``vocab_size`` (the logits' width), which may exceed the
  tokenizer's (padded LM heads) or fall short of it (added tokens the head lacks): ids past
  the tokenizer's vocabulary are blank, which xgrammar treats as special and never allows;
* special added tokens (``<s>``, chat markers) are blanked too: xgrammar would otherwise read
  ``<s>`` as the literal text "<s>" and allow it inside a JSON string, while the detokenizer
  drops it from the text, so the text would not be what the grammar accepted;
* the stop tokens are the engine's EOS ids: a complete grammar allows only them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shardlm.structured.backend import xgrammar
from shardlm.tokenizer import Tokenizer


def build_tokenizer_info(
    tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]
) -> Any:
    """An ``xgrammar.TokenizerInfo`` for masks of width ``vocab_size``."""
    xgr = xgrammar()
    from transformers import PreTrainedTokenizerFast  # xgrammar depends on it

    backend = tokenizer.backend_tokenizer
    stops = sorted(t for t in set(stop_token_ids) if 0 <= t < vocab_size)
    # xgrammar's own detection of the vocabulary's encoding (byte-level, byte-fallback, raw)
    # and of a prepended space, through the wrapper it knows how to read.
    detected = xgr.TokenizerInfo.from_huggingface(
        PreTrainedTokenizerFast(tokenizer_object=backend),
        vocab_size=vocab_size,
        stop_token_ids=stops or None,
    )
    encoded = [""] * vocab_size
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size:
            encoded[i] = token
    for i, added in backend.get_added_tokens_decoder().items():
        if added.special and i < vocab_size:
            encoded[i] = ""
    return xgr.TokenizerInfo(
        encoded,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=stops or None,
        add_prefix_space=detected.add_prefix_space,
    )

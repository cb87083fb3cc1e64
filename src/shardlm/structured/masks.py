"""The sampler's one call: each constrained row's allowed-token bitmask applied to its logits,
on the logits' device.

The matchers fill one CPU bitmask (32 tokens an int32, bit j of word w is token 32·w + j) for
the constrained rows only. On CPU it is unpacked with numpy's ``unpackbits`` (about twice as
fast as xgrammar's own CPU kernel here); elsewhere it goes to the device in one copy (pinned,
asynchronous) and is unpacked there with shifts. Either way the disallowed logits become -inf
in a new tensor; unconstrained rows are not touched, so they sample exactly as in a batch
without grammars.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shardlm.structured.backend import xgrammar
from shardlm.structured.state import GrammarState


def apply_grammar_masks(
    logits: torch.Tensor, grammars: Sequence[GrammarState | None]
) -> torch.Tensor:
    """``logits`` [N, V] with each constrained row's disallowed tokens at -inf, as a new
    tensor (``logits`` itself, not copied, when no row has a grammar)."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return logits
    vocab = logits.shape[1]
    bitmask = xgrammar().allocate_token_bitmask(len(rows), vocab)
    for j, i in enumerate(rows):
        grammars[i].fill_bitmask(bitmask, j)  # type: ignore[union-attr]
    allowed = unpack_bitmask(bitmask, vocab, logits.device)
    if len(rows) == logits.shape[0]:
        return torch.where(allowed, logits, float("-inf"))
    idx = torch.tensor(rows, device=logits.device)
    return logits.index_copy(0, idx, torch.where(allowed, logits[idx], float("-inf")))


def unpack_bitmask(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """An int32 bitmask [R, ceil(V / 32)] (on CPU) as bool [R, V] on ``device``."""
    if device.type == "cpu":
        as_bytes = bitmask.numpy().view(np.uint8)  # little-endian words: bit j is token j
        bits = np.unpackbits(as_bytes, axis=1, count=vocab, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    return unpack_words(bitmask.pin_memory().to(device, non_blocking=True), vocab)


def unpack_words(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """The same unpacking with tensor ops, on the words' device."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # the sign bit too: & 1 after the shift
    return bits.view(words.shape[0], -1)[:, :vocab].bool()

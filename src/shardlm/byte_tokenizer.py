"""Deterministic byte-level BPE tokenizer builder for the built-in demo checkpoint and tests.

The layout is fixed so that ids are predictable without reading any file:

* id 0: ``<s>``  (BOS, registered as a special added token)
* id 1: ``</s>`` (EOS, registered as a special added token)
* ids 2..257: the 256 bytes, byte ``b`` at id ``2 + b``, spelled with the GPT-2 ByteLevel alphabet
* ids 258..: merged tokens, in merge order (only when ``extra_merges_corpus`` is given)

There is no ``<unk>``: every byte string is representable. The files are written so that
``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads them as a ``PreTrainedTokenizerFast``
and behaves exactly like :class:`shardlm.tokenizer.Tokenizer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

__all__ = [
    "BOS_ID",
    "BOS_TOKEN",
    "BYTE_VOCAB_SIZE",
    "DEFAULT_CHAT_TEMPLATE",
    "EOS_ID",
    "EOS_TOKEN",
    "build_byte_level_tokenizer",
    "bytes_to_unicode",
]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
BOS_ID = 0
EOS_ID = 1
_FIRST_BYTE_ID = 2
#: Vocabulary size without merges (2 specials + 256 bytes).
BYTE_VOCAB_SIZE = _FIRST_BYTE_ID + 256

# Plain-text role markers; only BOS/EOS are real special tokens. EOS closes every turn so that a
# model trained on this format stops generating at EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 ByteLevel byte -> printable character table (same as tokenizers' ByteLevel).

    Printable Latin-1 bytes map to themselves; the rest are shifted to U+0100 and up so that no
    token contains whitespace or control characters.
    """
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _base_vocab() -> dict[str, int]:
    vocab = {BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}
    for b, ch in bytes_to_unicode().items():
        vocab[ch] = _FIRST_BYTE_ID + b
    return vocab


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _train_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Learn up to ``num_merges`` merges on ``corpus`` with tokenizers' BpeTrainer.

    The trainer breaks count ties by symbol id and counts are exact, so the result does not depend
    on thread scheduling or hash seeds (checked by building twice in the tests).
    """
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=BYTE_VOCAB_SIZE + num_merges,
        min_frequency=2,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines() or [corpus], trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    # Older tokenizers serialise merges as "a b", newer ones as ["a", "b"].
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def build_byte_level_tokenizer(
    out_dir: str | os.PathLike,
    *,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    extra_merges_corpus: str | None = None,
    num_merges: int = 256,
) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir`` (created if needed).

    Without ``extra_merges_corpus`` the BPE model has no merges (one token per byte, vocab size
    :data:`BYTE_VOCAB_SIZE`). With it, up to ``num_merges`` merges learnt on the corpus are appended
    after the byte tokens. Output is byte-identical across runs and processes.
    """
    vocab = _base_vocab()
    merges: list[tuple[str, str]] = []
    if extra_merges_corpus is not None:
        for left, right in _train_merges(extra_merges_corpus, num_merges):
            if left not in vocab or right not in vocab:
                continue  # cannot happen for a consistent merge list; keep the model loadable
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    # Already in the vocab, so this keeps ids 0/1 and only marks them special (skipped on decode,
    # never split by the pre-tokenizer).
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)]
    )

    config: dict[str, object] = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # tokenizers serialises vocab and added tokens in id order, so to_str() is deterministic.
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )

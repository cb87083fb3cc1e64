"""Tokenizer layer tests; transformers is used only as the reference implementation."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE, WordLevel

from shardlm.byte_tokenizer import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    DEFAULT_CHAT_TEMPLATE,
    EOS_ID,
    build_byte_level_tokenizer,
    bytes_to_unicode,
)
from shardlm.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Then the other fox said hello to the dog, and the dog said hello back.\n"
    "héllo wörld, 世界 你好 🙂🙂 — naïve café.\n"
) * 8

TEXTS = [
    "",
    "hello world",
    "héllo 世界 🙂",
    "  leading and trailing spaces  \n\ttabs\r\n",
    "The quick brown fox jumps over the lazy dog.",
    "<s>inline specials</s> stay single tokens",
    "e\u0301 combining, \x00\x7f controls, \U0001f468\u200d\U0001f469\u200d\U0001f467 zwj",
    "a" * 40,
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! 世界?"},
    {"role": "assistant", "content": "Hello. 🙂"},
    {"role": "user", "content": "Again, with <s> inside."},
]

# Exercises whitespace control, loop controls, namespace, tojson, extra variables and
# raise_exception, all of which must behave as in transformers' sandbox.
STRICT_TEMPLATE = """{{ bos_token }}
{% if tools is not none %}
    [TOOLS {{ tools | tojson }}]
{% endif %}
{% set ns = namespace(system=none, turns=0) %}
{% for message in messages %}
    {% if loop.first and message['role'] == 'system' %}
        {% set ns.system = message['content'] %}
        {% continue %}
    {% endif %}
    {% if message['role'] == 'stop' %}
        {% break %}
    {% endif %}
    {% if (message['role'] == 'user') != (ns.turns % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    [{{ message['role'] | upper }}{% if message.name is defined %} name={{ message.name }}{% endif %}{% if ns.system is not none and ns.turns == 1 %} sys={{ ns.system | tojson }}{% endif %}]
    {{ message['content'] | trim }}
    {% if message['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
    [ASSISTANT{% if reasoning is defined and reasoning %} think{% endif %}]
{% endif %}"""  # noqa: E501


@pytest.fixture(scope="module")
def transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("byte")
    build_byte_level_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def merges_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merges")
    build_byte_level_tokenizer(out, extra_merges_corpus=CORPUS)
    return out


@pytest.fixture(scope="module", params=["byte", "merges"])
def tok_dir(request, byte_dir: Path, merges_dir: Path) -> Path:
    return byte_dir if request.param == "byte" else merges_dir


@pytest.fixture(scope="module")
def byte_tok(byte_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(byte_dir)


@pytest.fixture(scope="module")
def merges_tok(merges_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(merges_dir)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------------------------ builder


def test_byte_tokenizer_layout(byte_dir: Path, byte_tok: Tokenizer) -> None:
    assert BYTE_VOCAB_SIZE == 258
    assert byte_tok.vocab_size == BYTE_VOCAB_SIZE
    assert (BOS_ID, EOS_ID) == (0, 1)
    assert (byte_tok.bos_token, byte_tok.eos_token) == ("<s>", "</s>")
    assert (byte_tok.bos_token_id, byte_tok.eos_token_id) == (BOS_ID, EOS_ID)
    assert byte_tok.chat_template == DEFAULT_CHAT_TEMPLATE
    # one token per byte, byte b at id 2 + b, BOS prepended by the post-processor
    text = "aé\x00"
    assert byte_tok.encode(text) == [BOS_ID] + [2 + b for b in text.encode()]
    assert byte_tok.convert_ids_to_tokens([2 + ord("a"), 2 + 0x20]) == ["a", bytes_to_unicode()[32]]
    config = json.loads((byte_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    added = json.loads((byte_dir / "tokenizer.json").read_text())["added_tokens"]
    assert [(t["id"], t["content"], t["special"]) for t in added] == [
        (0, "<s>", True),
        (1, "</s>", True),
    ]


def test_build_is_byte_identical(tmp_path: Path, byte_dir: Path, merges_dir: Path) -> None:
    build_byte_level_tokenizer(tmp_path / "byte")
    build_byte_level_tokenizer(tmp_path / "merges", extra_merges_corpus=CORPUS)
    assert _digest(tmp_path / "byte") == _digest(byte_dir)
    assert _digest(tmp_path / "merges") == _digest(merges_dir)
    # Rust hash maps are seeded per process, so also build in a fresh interpreter.
    code = (
        "import sys; from shardlm.byte_tokenizer import build_byte_level_tokenizer as b; "
        "b(sys.argv[1], extra_merges_corpus=sys.argv[2])"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "proc"), CORPUS],
        check=True,
        env={"PYTHONPATH": src, "PYTHONHASHSEED": "123"},
    )
    assert _digest(tmp_path / "proc") == _digest(merges_dir)


def test_merges_are_learnt(merges_tok: Tokenizer, byte_tok: Tokenizer) -> None:
    assert merges_tok.vocab_size > BYTE_VOCAB_SIZE
    text = "the quick brown fox said hello"
    assert len(merges_tok.encode(text)) < len(byte_tok.encode(text)) // 2
    # the byte ids are shared, only merged tokens are appended
    assert merges_tok.encode("\x01", add_special_tokens=False) == [3]


# ------------------------------------------------------------------------ transformers parity


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(transformers, tok_dir: Path, text: str) -> None:
    ours = Tokenizer.from_pretrained(tok_dir)
    auto = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    for add in (True, False):
        ids = ours.encode(text, add_special_tokens=add)
        assert ids == auto.encode(text, add_special_tokens=add)
        assert ids == fast.encode(text, add_special_tokens=add)
        assert ids[: len(ids) - len(ours.encode(text, add_special_tokens=False))] == (
            [BOS_ID] if add else []
        )
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == auto.decode(
                ids, skip_special_tokens=skip
            )
    assert ours.decode(ours.encode(text)) == text.replace("<s>", "").replace("</s>", "")
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == "<s>" + text
    assert ours.vocab_size == len(auto)


def test_decode_of_arbitrary_ids_matches_transformers(transformers, merges_dir: Path) -> None:
    ours = Tokenizer.from_pretrained(merges_dir)
    auto = transformers.AutoTokenizer.from_pretrained(str(merges_dir))
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == auto.decode(
                ids, skip_special_tokens=skip
            )


def test_config_special_tokens_registered_like_transformers(transformers, tmp_path: Path) -> None:
    """Config tokens missing from tokenizer.json's added tokens become special (as transformers)."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<eot>"] = len(vocab)  # in the model vocab, but not an added/special token
    backend = BackendTokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # not in the vocab at all; the dict form is how transformers saves an AddedToken
        "bos_token": {
            "__type": "AddedToken",
            "content": "<start>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "eos_token": "<eot>",
        "add_bos_token": True,  # ignored by transformers v5 when tokenizer.json exists
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.bos_token == "<start>"
    assert (ours.bos_token_id, ours.eos_token_id) == (auto.bos_token_id, auto.eos_token_id)
    assert ours.eos_token_id == vocab["<eot>"]
    assert ours.vocab_size == len(auto) == len(vocab) + 1
    text = "<start>hi<eot> there"
    ids = ours.encode(text)
    assert ids == auto.encode(text)
    assert ids[0] == ours.bos_token_id  # split as a single special token, not added by a template
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == auto.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.decode(ids) == "hi there"


# ---------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("n_messages", [1, 2, 3, 4])
def test_default_chat_template_matches_transformers(
    transformers, byte_dir: Path, byte_tok: Tokenizer, add_generation_prompt: bool, n_messages: int
) -> None:
    auto = transformers.AutoTokenizer.from_pretrained(str(byte_dir))
    messages = MESSAGES[:n_messages] if n_messages > 1 else MESSAGES[1:2]
    text = byte_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = auto.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    assert text.startswith("<s><|")
    assert text.endswith("<|assistant|>\n") == add_generation_prompt
    ids = byte_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    expected_ids = auto.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ids == expected_ids
    assert ids.count(BOS_ID) == 1 + "".join(m["content"] for m in messages).count("<s>")
    assert ids[0] == BOS_ID and ids[1] != BOS_ID  # template's BOS only, no double BOS


def test_default_chat_template_rejects_unknown_role(byte_tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="Unknown role: robot"):
        byte_tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def _write_template_dir(directory: Path, template: object) -> Path:
    build_byte_level_tokenizer(directory, chat_template=None)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def strict_dir(tmp_path_factory) -> Path:
    # list form, as transformers saves several named templates
    templates = [
        # transformers picks "tool_use" when tools are passed, "default" otherwise
        {"name": "tool_use", "template": "TOOL USE {{ tools | tojson }} {{ messages | length }}"},
        {"name": "default", "template": STRICT_TEMPLATE},
    ]
    return _write_template_dir(tmp_path_factory.mktemp("strict"), templates)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(
    "messages",
    [
        MESSAGES,
        MESSAGES[1:],
        [*MESSAGES[:3], {"role": "stop", "content": "x"}, {"role": "user", "content": "late"}],
        [{"role": "user", "content": "  padded  ", "name": None}],
    ],
    ids=["system", "no-system", "break", "none-key"],
)
def test_strict_template_matches_transformers(
    transformers, strict_dir: Path, messages: list[dict], add_generation_prompt: bool
) -> None:
    ours = Tokenizer.from_pretrained(strict_dir)
    auto = transformers.AutoTokenizer.from_pretrained(str(strict_dir))
    tools = [{"type": "function", "function": {"name": "f", "description": "é <x>"}}]
    for extra in ({}, {"reasoning": True}, {"tools": tools}):
        text = ours.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **extra
        )
        expected = auto.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
        assert text == expected
        assert ("think]" in text) == (add_generation_prompt and "reasoning" in extra)
        assert text.startswith("TOOL USE [{") == ("tools" in extra)
        assert "name=" not in text
        ids = ours.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **extra
        )
        assert ids == auto.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=False,
            **extra,
        )
    assert "late" not in text


def test_strict_template_raise_exception(transformers, strict_dir: Path) -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    ours = Tokenizer.from_pretrained(strict_dir)
    with pytest.raises(TokenizerError, match="roles must alternate"):
        ours.apply_chat_template(bad)
    auto = transformers.AutoTokenizer.from_pretrained(str(strict_dir))
    with pytest.raises(Exception, match="roles must alternate"):
        auto.apply_chat_template(bad, tokenize=False)


def test_chat_template_jinja_file_takes_priority(transformers, tmp_path: Path) -> None:
    build_byte_level_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", encoding="utf-8"
    )
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(
        "tools={{ tools | length }} {{ bos_token }}", encoding="utf-8"
    )
    ours = Tokenizer.from_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    expected = auto.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES) == expected
    assert expected.startswith("system: You are terse.\n")
    tools = [{"type": "function", "function": {"name": "f"}}]
    expected = auto.apply_chat_template(MESSAGES, tools=tools, tokenize=False)
    assert ours.apply_chat_template(MESSAGES, tools=tools) == expected == "tools=1 <s>"


def test_missing_chat_template(tmp_path: Path) -> None:
    build_byte_level_tokenizer(tmp_path, chat_template=None)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match=r"no chat_template in tokenizer_config\.json"):
        tok.apply_chat_template(MESSAGES)


def test_invalid_chat_template_syntax(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_write_template_dir(tmp_path, "{% for m in messages %}"))
    with pytest.raises(TokenizerError, match="invalid chat_template"):
        tok.apply_chat_template(MESSAGES)


# ------------------------------------------------------------------------------------ errors


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json") as info:
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "tokenizer.json") in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_config_field(tmp_path: Path) -> None:
    build_byte_level_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 7}))
    with pytest.raises(TokenizerError, match="'eos_token'") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert "tokenizer_config.json" in str(info.value)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="invalid JSON"):
        Tokenizer.from_pretrained(tmp_path)


def test_stored_truncation_and_padding_are_ignored(transformers, tmp_path: Path) -> None:
    build_byte_level_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["truncation"] = {"max_length": 3, "stride": 0, "strategy": "LongestFirst"}
    data["truncation"]["direction"] = "Right"
    data["padding"] = {
        "strategy": {"Fixed": 64},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 1,
        "pad_type_id": 0,
        "pad_token": "</s>",
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer.from_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "longer than three tokens"
    assert ours.encode(text) == auto.encode(text) == [BOS_ID] + [2 + b for b in text.encode()]


def test_config_is_optional(tmp_path: Path) -> None:
    build_byte_level_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token, tok.bos_token_id, tok.chat_template) == (None, None, None)
    assert tok.encode("a") == [BOS_ID, 2 + ord("a")]  # the post-processor still adds BOS


# ---------------------------------------------------------------------- incremental decoding


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), skip: bool = True):
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


def _random_text(rng: random.Random, n: int) -> str:
    pools = ["abc xyz", "éüñ", "世界你好", "🙂🚀👨\u200d👩", " \n\t", "<s></s>"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_detokenizer_holds_back_partial_characters(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("a世🙂", add_special_tokens=False)
    assert len(ids) == 1 + 3 + 4  # every byte is its own token
    detok = IncrementalDetokenizer(byte_tok)
    deltas = [detok.add(i) for i in ids]
    assert deltas == ["a", "", "", "世", "", "", "", "🙂"]
    assert detok.flush() == ""
    assert detok.text == "a世🙂"


@pytest.mark.parametrize("which", ["byte", "merges"])
def test_detokenizer_random_text(byte_tok: Tokenizer, merges_tok: Tokenizer, which: str) -> None:
    tok = byte_tok if which == "byte" else merges_tok
    rng = random.Random(1234)
    for _ in range(60):
        ids = tok.encode(_random_text(rng, rng.randrange(1, 30)), add_special_tokens=False)
        for skip in (True, False):
            full = tok.decode(ids, skip_special_tokens=skip)
            deltas, tail = _stream(tok, ids, skip=skip)
            assert "".join(deltas) + tail == full
            assert tail == ""  # text ends on a character boundary, nothing left
            assert "\ufffd" not in full
            assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_random_ids(merges_tok: Tokenizer) -> None:
    """Arbitrary ids, including invalid UTF-8 and specials: output still equals decode()."""
    rng = random.Random(99)
    byte_ids = [2 + b for b in range(0x80, 0x100)]  # continuation and lead bytes
    for _ in range(200):
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(merges_tok.vocab_size)
            for _ in range(rng.randrange(1, 25))
        ]
        for skip in (True, False):
            full = merges_tok.decode(ids, skip_special_tokens=skip)
            deltas, tail = _stream(merges_tok, ids, skip=skip)
            assert "".join(deltas) + tail == full
            if "\ufffd" not in full:
                assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_with_prompt(byte_tok: Tokenizer, merges_tok: Tokenizer) -> None:
    rng = random.Random(7)
    for tok in (byte_tok, merges_tok):
        for _ in range(30):
            prompt = tok.encode("PROMPT " + _random_text(rng, rng.randrange(0, 20)))
            gen = tok.encode(_random_text(rng, rng.randrange(1, 20)), add_special_tokens=False)
            deltas, tail = _stream(tok, gen, prompt)
            out = "".join(deltas) + tail
            assert out == tok.decode(gen)
            assert "PROMPT" not in out
            assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_keeps_prompt_context_for_sentencepiece_spaces() -> None:
    """Metaspace decoders drop the leading space of a sequence's first token; a continuation
    after a prompt must keep it, so that prompt text + streamed text == decode(prompt + gen)."""
    backend = BackendTokenizer(
        WordLevel({"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3, "▁": 4}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    tok = Tokenizer(backend)
    prompt, gen = tok.encode("hello"), [2, 3, 1]
    assert prompt == [1]
    deltas, tail = _stream(tok, gen)
    assert deltas == ["world", "!", " hello"] and tail == ""
    assert "".join(deltas) == tok.decode(gen) == "world! hello"
    deltas, tail = _stream(tok, gen, prompt)
    assert "".join(deltas) + tail == " world! hello"
    assert tok.decode(prompt) + "".join(deltas) == tok.decode(prompt + gen)
    rng = random.Random(3)
    for _ in range(50):
        ids = [rng.randrange(5) for _ in range(rng.randrange(1, 12))]
        deltas, tail = _stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids)


def test_detokenizer_prompt_ending_inside_character(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("x世", add_special_tokens=False)
    gen = [*ids[3:], 2 + ord("a")]
    deltas, tail = _stream(byte_tok, gen, prompt=ids[:3])
    assert "".join(deltas) + tail == byte_tok.decode(gen) == "\ufffda"


def test_detokenizer_flush_releases_incomplete_tail(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("ok世", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(byte_tok)
    assert "".join(detok.add(i) for i in ids) == "ok"
    assert detok.flush() == "\ufffd"
    assert detok.text == byte_tok.decode(ids)
    assert detok.flush() == ""


def test_detokenizer_long_stream(merges_tok: Tokenizer) -> None:
    text = _random_text(random.Random(5), 3000)
    ids = merges_tok.encode(text, add_special_tokens=False)
    assert len(ids) > 1000  # crosses the internal trimming threshold several times
    deltas, tail = _stream(merges_tok, ids)
    assert "".join(deltas) + tail == merges_tok.decode(ids)

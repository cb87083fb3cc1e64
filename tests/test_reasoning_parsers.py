"""Reasoning parsers: the split of hand-written outputs, and the streamed split equal to it
for every way of cutting the text into deltas."""

from __future__ import annotations

import random

import pytest

from shardlm.entrypoints.openai.reasoning import REASONING_PARSERS

QWEN3 = [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", ("Let me think.", "The answer is 4.")),
    ("The answer is 4.", (None, "The answer is 4.")),
    ("  The answer\n", (None, "  The answer\n")),
    ("<think>\nstill thinking\n", ("still thinking\n", None)),
    ("<think>\n\n</think>\n\nHi", (None, "Hi")),
    ("\n<think>\nR\n</think>\n\nC", ("R", "C")),
    ("Talk about <think> tags</think>", (None, "Talk about <think> tags</think>")),
    ("<think>\na\n\nb\n</think>\n\nc\n\nd", ("a\n\nb", "c\n\nd")),
    ("<think>\nR\n</think>\n\n\nC", ("R", "\nC")),
    ("<think>R</think>C", ("R", "C")),
    ("<think>\n思考 </thin\n</think>\n\n答案", ("思考 </thin", "答案")),
    ("<think>\nR\n</think>\n\n", ("R", None)),
    ("<thin", (None, "<thin")),
    ("", (None, None)),
]

DEEPSEEK = [
    ("Let me think.\n</think>\n\nAnswer", ("Let me think.", "Answer")),
    ("<think>\nR\n</think>\n\nC", ("R", "C")),
    ("cut off while thi", ("cut off while thi", None)),
    ("cut off while thinking\n</thi", ("cut off while thinking\n</thi", None)),
    ("</think>\n\nC", (None, "C")),
    ("R</think>", ("R", None)),
    ("\nR\n\n</think>\nC\n", ("R\n", "C\n")),
    ("  <think>\nR</think>C", ("R", "C")),
    ("x <think> y</think>z", ("x <think> y", "z")),
    ("<think>\n思考\n</think>\n\n答案", ("思考", "答案")),
    ("", (None, None)),
]

CASES = [("qwen3", t, e) for t, e in QWEN3] + [("deepseek_r1", t, e) for t, e in DEEPSEEK]


def stream(name: str, pieces: list[str]) -> tuple[str, str]:
    s = REASONING_PARSERS[name]().streamer()
    out = [s.feed(p) for p in pieces] + [s.finish()]
    for r, c in out:
        assert r != "" and c != "", "an empty delta is None"
    return "".join(r or "" for r, _ in out), "".join(c or "" for _, c in out)


def joined(expected: tuple[str | None, str | None]) -> tuple[str, str]:
    return expected[0] or "", expected[1] or ""


@pytest.mark.parametrize("name, text, expected", CASES)
def test_split(name, text, expected):
    assert REASONING_PARSERS[name]().split(text) == expected


@pytest.mark.parametrize("name, text, expected", CASES)
def test_every_two_and_three_way_cut_streams_the_split(name, text, expected):
    want = joined(expected)
    assert stream(name, [text]) == want
    assert stream(name, list(text)) == want
    for i in range(len(text) + 1):
        assert stream(name, [text[:i], text[i:]]) == want, i
        for j in range(i, len(text) + 1, 3):
            assert stream(name, [text[:i], text[i:j], text[j:]]) == want, (i, j)


@pytest.mark.parametrize("name, text, expected", CASES)
def test_random_cuts_stream_the_split(name, text, expected):
    rng = random.Random(len(text))
    for _ in range(50):
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, 8)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(name, pieces) == joined(expected), pieces


def test_reasoning_and_content_are_sent_as_they_arrive():
    s = REASONING_PARSERS["qwen3"]().streamer()
    assert s.feed("<thi") == (None, None)
    assert s.feed("nk>\nStep one") == ("Step one", None)
    assert s.feed("\n") == (None, None)  # maybe the newline before </think>
    assert s.feed("two") == ("\ntwo", None)
    assert s.feed("\n</think>\n\nAns") == (None, "Ans")
    assert s.feed("wer") == (None, "wer")
    assert s.finish() == (None, None)

    s = REASONING_PARSERS["qwen3"]().streamer()
    assert s.feed("Hello") == (None, "Hello")  # no <think>: content at once

    s = REASONING_PARSERS["deepseek_r1"]().streamer()
    assert s.feed("Hmm, 2+2") == ("Hmm, 2+2", None)
    assert s.feed("</th") == (None, None)
    assert s.finish() == ("</th", None)


def test_registry_names():
    assert {n: p.name for n, p in REASONING_PARSERS.items()} == {
        "qwen3": "qwen3",
        "deepseek_r1": "deepseek_r1",
    }

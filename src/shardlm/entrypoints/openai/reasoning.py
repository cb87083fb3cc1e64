"""Reasoning (``<think>…</think>``) split from the answer, whole or streamed: qwen3, deepseek_r1.

Pure (stdlib only). ``split(text) -> (reasoning, content)``, each None when empty; a
``streamer()`` gives (reasoning_delta, content_delta) pairs per delta that join to ``split``
of the whole text, however the text is cut (tags split across deltas included).

The choices:

- deepseek_r1: the chat template usually ends the prompt with ``<think>``, so the output may
  lack the opening tag (one at the start, after whitespace, is dropped). Everything before
  ``</think>`` is reasoning, everything after it content. No ``</think>`` at all: all
  reasoning (the model was cut off while thinking).
- qwen3: reasoning only when the output begins (after whitespace) with ``<think>``; without
  it (enable_thinking=False puts the empty block into the prompt) the output is all content,
  exactly as generated. An unclosed ``<think>`` is all reasoning, as for deepseek_r1.
- Newlines the models put around the tags are dropped: one after the opening tag, one before
  ``</think>``, up to two after it — "<think>\\nR\\n</think>\\n\\nC" is ("R", "C").
"""

from __future__ import annotations

from typing import ClassVar

OPEN, CLOSE = "<think>", "</think>"


def _held(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def _drop(text: str, prefix: str) -> str:
    return text[len(prefix) :] if text.startswith(prefix) else text


def _none(text: str) -> str | None:
    return text or None


class ReasoningParser:
    """One family's convention; ``opening_required`` is the only difference."""

    name: ClassVar[str] = ""
    opening_required: ClassVar[bool] = False  # without <think> first, all content
    markers: ClassVar[tuple[str, ...]] = (OPEN, CLOSE)  # as ToolParser.markers

    def split(self, text: str) -> tuple[str | None, str | None]:
        rest = text.lstrip()
        if rest.startswith(OPEN):
            body = rest[len(OPEN) :]
        elif self.opening_required:
            return None, _none(text)
        else:
            body = text
        body = _drop(body, "\n")
        end = body.find(CLOSE)
        if end < 0:
            return _none(body), None
        reasoning = body[:end].removesuffix("\n")
        content = _drop(_drop(body[end + len(CLOSE) :], "\n"), "\n")
        return _none(reasoning), _none(content)

    def streamer(self) -> ReasoningStreamer:
        return ReasoningStreamer(self.opening_required)


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    opening_required = True


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


class ReasoningStreamer:
    """The split as deltas arrive: holds back only what may still be a tag or a newline the
    split drops."""

    def __init__(self, opening_required: bool) -> None:
        self.opening_required = opening_required
        self.state = "start"  # start → reasoning → after → content
        self.buffer = ""
        self.lead = True  # a newline right after <think> is still to drop
        self.newlines = 2  # newlines after </think> still to drop

    def feed(self, delta: str) -> tuple[str | None, str | None]:
        self.buffer += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str | None, str | None]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str | None, str | None]:
        reasoning, content = "", ""
        if self.state == "start":
            rest = self.buffer.lstrip()
            if rest.startswith(OPEN):
                self.state, self.buffer = "reasoning", rest[len(OPEN) :]
            elif not final and (not rest or OPEN.startswith(rest)):
                return None, None  # still maybe <think>
            else:
                self.state = "content" if self.opening_required else "reasoning"
        if self.state == "reasoning":
            if self.lead and self.buffer:
                self.buffer, self.lead = _drop(self.buffer, "\n"), False
            end = self.buffer.find(CLOSE)
            if end >= 0:
                reasoning = self.buffer[:end].removesuffix("\n")
                self.state, self.buffer = "after", self.buffer[end + len(CLOSE) :]
            else:
                keep = 0 if final else _held(self.buffer, CLOSE)
                cut = len(self.buffer) - keep
                if not final and self.buffer[:cut].endswith("\n"):
                    cut -= 1  # the newline before </think> is dropped
                reasoning, self.buffer = self.buffer[:cut], self.buffer[cut:]
        if self.state == "after":
            while self.newlines and self.buffer.startswith("\n"):
                self.buffer, self.newlines = self.buffer[1:], self.newlines - 1
            if self.buffer:
                self.state = "content"
        if self.state == "content":
            content, self.buffer = self.buffer, ""
        return _none(reasoning), _none(content)

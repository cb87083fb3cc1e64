"""Tokenizer layer: HF ``tokenizer.json`` + ``tokenizer_config.json`` without transformers.

Behaviour follows ``transformers.PreTrainedTokenizerFast`` (v5) loaded with ``AutoTokenizer``:

* specials are added by the ``tokenizer.json`` post-processor (``add_bos_token`` / ``add_eos_token``
  in the config are ignored when a ``tokenizer.json`` exists, as transformers v5 does);
* the named special tokens of the config (``bos_token``, ``eos_token``, ...) are (re)registered as
  special added tokens, so they are never split and are dropped by ``skip_special_tokens``;
* truncation/padding stored in ``tokenizer.json`` are disabled (transformers disables them per
  call);
* decoding never applies ``clean_up_tokenization_spaces`` (transformers v5 ignores it for BPE, and
  it would break streaming);
* chat templates render in the same sandboxed jinja2 environment with the same helpers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from tokenizers import AddedToken
from tokenizers import Tokenizer as _BackendTokenizer

from shardlm.errors import ShardlmError

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ADDITIONAL_CHAT_TEMPLATES_DIR = "additional_chat_templates"

# Named special tokens transformers exposes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_FIELDS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TokenizerError(ShardlmError):
    """Invalid or missing tokenizer files, or a chat template that cannot be applied."""


# --------------------------------------------------------------------------------------------
# Loading helpers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read file ({e.strerror})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object at top level")
    return data


def _parse_special_token(value: Any, field: str, source: Path) -> AddedToken | None:
    """Accept ``"<s>"`` or ``{"content": "<s>", ...}`` (how transformers writes AddedToken)."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return AddedToken(
            value["content"],
            special=True,
            normalized=bool(value.get("normalized", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            single_word=bool(value.get("single_word", False)),
        )
    raise TokenizerError(
        f"{source}: field {field!r} must be a string or an object with a string 'content', "
        f"got {type(value).__name__}"
    )


def _parse_chat_templates(value: Any, source: Path) -> dict[str, str]:
    """A template string (named "default"), or a list of ``{"name", "template"}`` objects."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        templates = {}
        for entry in value:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise TokenizerError(
                    f"{source}: field 'chat_template' list entries must be objects with "
                    "'name' and 'template' strings"
                )
            templates[entry["name"]] = entry["template"]
        return templates
    raise TokenizerError(
        f"{source}: field 'chat_template' must be a string or a list of named templates, "
        f"got {type(value).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Chat template environment (mirrors transformers' sandbox so templates render identically)


class _GenerationBlock(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used for assistant masks) as a no-op."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes, so templates cannot poke at internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja's built-in tojson, no HTML escaping and non-ASCII kept (transformers' override).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(template: str, source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"{source}: invalid chat_template (line {e.lineno}: {e.message})"
        ) from None


# --------------------------------------------------------------------------------------------


class Tokenizer:
    """A Hugging Face fast tokenizer (``tokenizers`` backend) plus its config and chat template."""

    def __init__(
        self,
        backend: _BackendTokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        named_chat_templates: Mapping[str, str] | None = None,
        source: str = "<memory>",
    ) -> None:
        """Wrap an already configured backend; prefer :meth:`from_pretrained`.

        ``special_tokens`` maps field names (``bos_token``, ``eos_token``, ...) to token strings;
        they must already be in the backend's vocabulary. ``named_chat_templates`` may hold extra
        templates by name; "tool_use" is picked when ``tools`` are passed, as in transformers.
        """
        self._backend = backend
        self._source = source
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id: int | None = self.token_to_id(self.bos_token)
        self.eos_token_id: int | None = self.token_to_id(self.eos_token)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template: str | None = chat_template
        self.named_chat_templates: dict[str, str] = dict(named_chat_templates or {})
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``<path>/tokenizer.json`` (required) and the optional config and chat template."""
        root = Path(path)
        tok_file = root / TOKENIZER_FILE
        if not tok_file.is_file():
            raise TokenizerError(
                f"{tok_file}: not found (expected a Hugging Face tokenizers JSON file)"
            )
        try:
            backend = _BackendTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tok_file}: cannot parse tokenizer ({e})") from None
        # transformers disables stored truncation/padding unless asked for them per call.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = False

        cfg_file = root / TOKENIZER_CONFIG_FILE
        config = _read_json(cfg_file) if cfg_file.is_file() else {}

        special_tokens: dict[str, str] = {}
        to_register: list[AddedToken] = []
        for field in _SPECIAL_TOKEN_FIELDS:
            token = _parse_special_token(config.get(field), field, cfg_file)
            if token is not None:
                special_tokens[field] = token.content
                to_register.append(token)
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
        if isinstance(extra, list):
            for i, value in enumerate(extra):
                token = _parse_special_token(value, f"additional_special_tokens[{i}]", cfg_file)
                if token is not None:
                    to_register.append(token)
        if to_register:
            # Same as transformers' _post_init: existing ids are kept, missing tokens are appended.
            backend.add_special_tokens(to_register)

        # Newer checkpoints store templates as files (chat_template.jinja for the default one,
        # additional_chat_templates/<name>.jinja for named ones); like transformers, any such file
        # replaces all templates from the config.
        template_files = {}
        if (root / CHAT_TEMPLATE_FILE).is_file():
            template_files["default"] = root / CHAT_TEMPLATE_FILE
        extra_dir = root / ADDITIONAL_CHAT_TEMPLATES_DIR
        if extra_dir.is_dir():
            for file in sorted(extra_dir.glob("*.jinja")):
                template_files[file.stem] = file
        if template_files:
            templates = {}
            for name, file in template_files.items():
                try:
                    templates[name] = file.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    raise TokenizerError(f"{file}: cannot read chat template ({e})") from None
            source = str(template_files.get("default", root / CHAT_TEMPLATE_FILE))
        else:
            templates = _parse_chat_templates(config.get("chat_template"), cfg_file)
            source = str(cfg_file)

        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=templates.get("default"),
            named_chat_templates=templates,
            source=source,
        )

    # ---------------------------------------------------------------- vocabulary

    @property
    def backend_tokenizer(self) -> _BackendTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (shared, do not reconfigure)."""
        return self._backend

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens from the config (e.g. for stop conditions)."""
        ids = (self.token_to_id(t) for t in self.special_tokens.values())
        return sorted({i for i in ids if i is not None})

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Raw vocabulary strings (e.g. ``"Ġhello"``); ``None`` for ids outside the vocabulary."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; specials (e.g. BOS) come from tokenizer.json's post-processor."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the vocabulary are ignored (as transformers does)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat template

    def _template(self, with_tools: bool, override: str | None = None) -> jinja2.Template:
        template = self.chat_template
        if with_tools and "tool_use" in self.named_chat_templates:
            template = self.named_chat_templates["tool_use"]
        if override is not None:  # a named template of the checkpoint, or the template itself
            template = self.named_chat_templates.get(override, override)
        if template is None:
            raise TokenizerError(
                f"{self._source}: checkpoint has no chat_template in tokenizer_config.json "
                f"(nor a {CHAT_TEMPLATE_FILE}, nor a template named 'default'); "
                "cannot format chat messages"
            )
        compiled = self._compiled.get(template)
        if compiled is None:
            compiled = self._compiled[template] = _compile_chat_template(template, self._source)
        return compiled

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the checkpoint's template, like transformers.

        The template sees ``messages``, ``add_generation_prompt``, the named special tokens
        (``bos_token``, ``eos_token``, ...), ``tools``/``documents`` (``None`` unless given) and
        ``extra`` (transformers' ``**kwargs``, e.g. ``enable_thinking``). Messages are passed as
        given (``None`` values dropped): a tool call's ``arguments`` stay a dict or a string,
        as the caller wrote them. ``chat_template`` overrides the checkpoint's: the name of one
        of its named templates, or a template. With ``tokenize=True`` the text is encoded
        without adding specials: the template already writes BOS where the model expects it.
        """
        template = self._template(extra.get("tools") is not None, chat_template)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TokenizerError("apply_chat_template: messages must be a non-empty list of dicts")
        cleaned = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TokenizerError(
                    f"apply_chat_template: messages[{i}] must be a dict, "
                    f"got {type(message).__name__}"
                )
            # transformers drops None values (OpenAI clients send content=None, tool_calls=None).
            cleaned.append({k: v for k, v in message.items() if v is not None})
        variables: dict[str, Any] = {
            **self.special_tokens,
            "tools": None,
            "documents": None,
            **extra,
            "messages": cleaned,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            text = template.render(**variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template error: {e.message or e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # The template's own Python operations on what the request gave it (a number
            # where it concatenates strings, a missing key): the input's fault, not a bug.
            raise TokenizerError(f"chat template error: {type(e).__name__}: {e}") from None
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text


# --------------------------------------------------------------------------------------------

# Prompt tokens kept as decoding context: enough for decoders that treat the first token of a
# sequence specially (SentencePiece's leading-space strip) to see a "middle" token instead.
_PROMPT_CONTEXT_TOKENS = 5
# Drop consumed ids once this many precede the decoding window, so memory stays bounded.
_TRIM_AT = 256


class IncrementalDetokenizer:
    """Streams text for generated token ids.

    Keeps two offsets into the recent ids: ``prefix`` (start of a short context window) and
    ``read`` (end of what has been emitted). Each step decodes ``ids[prefix:]`` and emits the part
    beyond the text of ``ids[prefix:read]``, so the cost per token is a decode of a few tokens.
    Text ending in U+FFFD (an incomplete UTF-8 sequence under byte-level decoding) is held back
    until later tokens complete it; :meth:`flush` releases it at the end.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = [int(i) for i in prompt_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        if self._prefix_text.endswith("\ufffd"):
            # The prompt ends inside a character: a prefix-based diff would misalign, so decode
            # the generated ids on their own instead.
            self._reset_context()
        self._parts: list[str] = []
        self._text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _reset_context(self) -> None:
        self._ids = []
        self._prefix = self._read = 0
        self._prefix_text = ""

    def _advance(self, new_text: str) -> str:
        """Emit ``new_text`` beyond the prefix text and slide the window forward."""
        delta = new_text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        if self._prefix >= _TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        if delta:
            self._parts.append(delta)
        return delta

    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the new text ("" while held back)."""
        self._ids.append(int(token_id))
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""
        return self._advance(new_text)

    def flush(self) -> str:
        """Emit whatever is held back, rendered as :meth:`Tokenizer.decode` would."""
        if self._read == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(self._prefix_text):
            self._read = len(self._ids)
            self._prefix_text = new_text
            return ""
        delta = self._advance(new_text)
        if delta.endswith("\ufffd"):
            self._reset_context()  # later ids must not "complete" a character already emitted
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

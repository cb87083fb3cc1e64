"""Options declared once: a dataclass field carries its type, default, help, check and CLI flag.

    @dataclass(frozen=True)
    class CacheOptions:
        block_size: int = option(16, "tokens per KV block", check=int_in(1, 1024))

From that one declaration come the keyword argument (``from_kwargs``: unknown keys are named
with the closest valid ones, vLLM's spellings accepted as aliases), the validation (``check``,
called from ``__post_init__``), the command-line flag (``add_arguments``: ``--block-size``,
its default shown in ``--help``) and the row of the generated options table
(``markdown_table``, docs/configuration.md).

A configuration is either flat (one dataclass of options: the server's) or made of groups
(a dataclass whose fields are option dataclasses: the engine's). Keyword arguments and flags
are flat either way; option names are unique across the groups of a configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardlm.errors import ParamError

# A check returns None when the value is allowed, else what is allowed ("an integer in
# [1, 8]"); it may also raise a ParamError with a message of its own.
Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Option:
    """What one field is, for users: its help line, allowed values, and spellings."""

    help: str
    check: Check | None = None
    choices: tuple | None = None
    flags: tuple[str, ...] = ()  # extra flag spellings, e.g. ("--tp",)
    aliases: tuple[
        str, ...
    ] = ()  # extra keyword spellings (vLLM's), e.g. ("gpu_memory_utilization",)
    default_text: str | None = None  # how the default reads in --help and the docs


def option(
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    choices: tuple | None = None,
    flags: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    default_text: str | None = None,
) -> Any:
    """A dataclass field declaring one option (see the module docstring)."""
    meta = Option(help, check, choices, flags, aliases, default_text)
    return field(default=default, metadata={"option": meta})


# -- checks: each returns None when the value is allowed, else what is allowed --
def int_in(lo: int, hi: int) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            return f"an integer in [{lo}, {hi}]"
        return None

    return check


def number_in(lo: float, hi: float, *, open_low: bool = False) -> Check:
    def check(value: Any) -> str | None:
        ok = (
            not isinstance(value, bool)
            and isinstance(value, (int, float))
            and math.isfinite(value)
            and (lo < value if open_low else lo <= value)
            and value <= hi
        )
        return None if ok else f"a number in {'(' if open_low else '['}{lo:g}, {hi:g}]"

    return check


# -- reading a configuration's declarations --
@dataclass(frozen=True)
class OptionField:
    name: str
    group: str | None  # the group's field name in a grouped configuration
    type: Any  # the annotation, resolved
    default: Any
    option: Option

    @property
    def base_type(self) -> type:
        """int, float, str or bool (the annotation without ``| None``)."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        return args[0] if args else self.type

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        if self.option.default_text is not None:
            return self.option.default_text
        return "none" if self.default is None else str(self.default)

    def validate(self, value: Any) -> None:
        """Raise ParamError naming this option if ``value`` is not allowed. A ``check`` owns
        the whole test of its option's values (and may raise its own ParamError); otherwise
        the type and ``choices`` are checked."""
        if value is None and self.optional:
            return
        base, check = self.base_type, self.option.check
        if check is not None:
            allowed = check(value)
        elif base is bool:
            allowed = None if isinstance(value, bool) else "True or False"
        elif base is str and not isinstance(value, str):
            allowed = "a string"
        elif self.option.choices is not None and value not in self.option.choices:
            named = [str(c) for c in self.option.choices if c is not None]
            allowed = "one of " + ", ".join(named) + (" or None" if self.optional else "")
        else:
            allowed = None
        if allowed is not None:
            raise ParamError(self.name, f"{self.name} must be {allowed}, got {value!r}")


def _is_options(cls: Any) -> bool:
    return dataclasses.is_dataclass(cls) and any(
        "option" in f.metadata for f in dataclasses.fields(cls)
    )


def option_fields(cls: type) -> list[OptionField]:
    """Every option of a configuration class, in declaration order (groups flattened)."""
    hints = typing.get_type_hints(cls)
    out: list[OptionField] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if "option" in f.metadata:
            out.append(OptionField(f.name, None, kind, f.default, f.metadata["option"]))
        elif _is_options(kind):
            out.extend(dataclasses.replace(o, group=f.name) for o in option_fields(kind))
    return out


def check_fields(instance: Any) -> None:
    """Validate every option of one (group) dataclass instance: call from __post_init__.
    Paths given as Path objects are kept as strings (the configuration travels as JSON)."""
    for f in option_fields(type(instance)):
        value = getattr(instance, f.name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
            object.__setattr__(instance, f.name, value)  # frozen: set once, here
        f.validate(value)


def groups_of(cls: type) -> Iterator[tuple[str, type]]:
    """(field name, group class) of a grouped configuration."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_options(hints[f.name]):
            yield f.name, hints[f.name]


# -- keyword arguments --
def normalise_kwargs(cls: type, kwargs: dict[str, Any], caller: str) -> dict[str, Any]:
    """Aliases mapped to their option names, paths made strings; an unknown key raises a
    ParamError naming it and the closest valid names."""
    fields = {f.name: f for f in option_fields(cls)}
    aliases = {a: f.name for f in fields.values() for a in f.option.aliases}
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        name = aliases.get(key, key)
        if name not in fields:
            close = difflib.get_close_matches(key, [*fields, *aliases], n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ParamError(
                key,
                f"{caller} got an unknown option {key!r}{hint} "
                "(every option: docs/configuration.md)",
            )
        if name in out:
            raise ParamError(key, f"{caller} got {name!r} twice (as {key!r} and its alias)")
        out[name] = str(value) if isinstance(value, Path) else value
    return out


def from_kwargs(cls: type, kwargs: dict[str, Any], caller: str) -> Any:
    """Build a configuration (flat or grouped) from flat keyword arguments."""
    values = normalise_kwargs(cls, kwargs, caller)
    groups = dict(groups_of(cls))
    if not groups:
        return cls(**values)
    per_group: dict[str, dict[str, Any]] = {name: {} for name in groups}
    for f in option_fields(cls):
        if f.name in values:
            per_group[f.group][f.name] = values[f.name]
    return cls(**{name: groups[name](**v) for name, v in per_group.items()})


def flat_values(config: Any) -> dict[str, Any]:
    """Every option of a configuration instance as flat keyword arguments."""
    out = {}
    for f in option_fields(type(config)):
        holder = getattr(config, f.group) if f.group else config
        out[f.name] = getattr(holder, f.name)
    return out


# -- the command line --
def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    titles: dict[str, str] | None = None,
) -> None:
    """One flag per option of ``cls`` (but ``exclude``), grouped in ``--help`` by the
    configuration's groups. Flags not given stay out of the namespace (``kwargs_from``)."""
    sections: dict[str | None, argparse._ArgumentGroup] = {}
    for f in option_fields(cls):
        if f.name in exclude:
            continue
        if f.group not in sections:
            title = (titles or {}).get(f.group or "", f.group)
            sections[f.group] = parser.add_argument_group(title) if title else parser
        base = f.base_type
        # The dest is prefixed, so a command's own flag of the same name (generate's --seed
        # seeds the request) never collides with an option's.
        kw: dict[str, Any] = dict(dest=f"{cls.__name__}.{f.name}", default=argparse.SUPPRESS)
        help_text = f"{f.option.help} (default: {f.default_text})"
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
            kw["metavar"] = f.name.upper() if f.option.choices is None else None
            if f.option.choices is not None:  # None is the flag left out, not a choice
                kw["choices"] = [c for c in f.option.choices if c is not None]
        kw["help"] = help_text.replace("%", "%%")
        sections[f.group].add_argument(f.flag, *f.option.flags, **kw)


def kwargs_from(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given on the command line (``add_arguments`` flags)."""
    prefix = f"{cls.__name__}."
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}


# -- the docs --
def markdown_table(cls: type, titles: dict[str, str] | None = None) -> str:
    """Every option: keyword, flag, default, meaning; a table per group."""
    lines: list[str] = []
    current: object = object()
    for f in option_fields(cls):
        if f.group != current:
            current = f.group
            if lines:
                lines.append("")
            if f.group is not None:
                lines += [f"### {(titles or {}).get(f.group, f.group)}", ""]
            lines += ["| option | flag | default | meaning |", "|---|---|---|---|"]
        flags = ", ".join(f"`{s}`" for s in (f.flag, *f.option.flags))
        meaning = f.option.help
        if f.option.choices is not None:
            meaning += " (" + " | ".join(str(c) for c in f.option.choices) + ")"
        if f.option.aliases:
            meaning += "; also accepted as " + ", ".join(f"`{a}`" for a in f.option.aliases)
        meaning = meaning.replace("|", "\\|")
        lines.append(f"| `{f.name}` | {flags} | {f.default_text} | {meaning} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "Option",
    "OptionField",
    "add_arguments",
    "check_fields",
    "flat_values",
    "from_kwargs",
    "int_in",
    "kwargs_from",
    "markdown_table",
    "number_in",
    "option",
    "option_fields",
]

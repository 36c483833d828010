"""Command-line flags made from a config dataclass: one source for every knob.

A knob is declared once, as a field of a frozen dataclass with its line in the class
docstring's ``Attributes:`` section; ``field_docs`` reads those lines and
``define_dataclass_flags`` turns every field into an absl flag of the field's type, default
and help text, so that the command line cannot drift from the library.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any

from absl import flags


def field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the Google-style ``Attributes:`` section of ``cls``'s docstring
    (continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    in_attrs = False
    current = None
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            in_attrs = True
            continue
        if not in_attrs:
            continue
        if line and not line.startswith(" "):
            break  # the next section
        m = re.match(r"^ {2}(\w+): (.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.startswith("    "):
            out[current] += " " + line.strip()
    return out


def _define(name: str, hint: Any, default: Any, help_text: str, choices=None) -> None:
    """One absl flag of the scalar type ``hint`` (``X | None`` allowed), or an enum."""
    if choices is not None:
        flags.DEFINE_enum(name, default, list(choices), help_text)
        return
    define = {
        bool: flags.DEFINE_bool,
        int: flags.DEFINE_integer,
        float: flags.DEFINE_float,
        str: flags.DEFINE_string,
    }.get(_scalar_type(hint))
    if define is None:
        raise TypeError(f"--{name}: no flag type for {hint!r}")
    define(name, default, help_text)


def _field_doc(cls: type, field: str) -> str:
    doc = field_docs(cls).get(field)
    if doc is None:
        raise TypeError(f"{cls.__name__}.{field} has no line in the docstring")
    return doc


def define_dataclass_flags(
    cls: type, prefix: str, *, choices: dict[str, tuple[str, ...]] | None = None
) -> list[str]:
    """Defines ``--<prefix><field>`` for every field of ``cls`` (int, float, bool, str), with
    the field's default and its docstring line as help; returns the flag names.

    Raises:
      TypeError: a field of another type, or a field without a docstring line.
    """
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        doc = _field_doc(cls, f.name)
        _define(name, hints[f.name], f.default, doc, (choices or {}).get(f.name))
        names.append(name)
    return names


def dataclass_from_flags(cls: type, prefix: str, values: Any = None) -> Any:
    """``cls`` built from the flags ``define_dataclass_flags(cls, prefix)`` defined."""
    values = values if values is not None else flags.FLAGS
    return cls(**{f.name: values[prefix + f.name].value for f in dataclasses.fields(cls)})


def _scalar_type(hint: Any) -> type | None:
    """``int``/``float``/``bool``/``str`` from a field's type hint (``X | None`` included)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    return hint if hint in (int, float, bool, str) else None


def define_override_flags(
    overrides: dict[str, tuple[str, str]],
    sections: dict[str, type],
    choices: dict[str, tuple[str, ...]],
    *,
    skip: tuple[str, ...] = (),
) -> list[str]:
    """One flag per ``overrides`` entry (``flag -> (section, field)``), of the field's type,
    default ``None`` (the preset decides), with the field's docstring line as help and, where
    ``choices`` lists them, the library's values as an enum; returns the flag names.

    Raises:
      TypeError: a field that is not a scalar, or has no docstring line.
    """
    names = []
    for name, (section, field) in overrides.items():
        if name in skip:
            continue
        cls = sections[section]
        help_text = f"{_field_doc(cls, field)} (preset: {section}.{field})"
        _define(name, typing.get_type_hints(cls)[field], None, help_text, choices.get(name))
        names.append(name)
    return names

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


def define_dataclass_flags(
    cls: type, prefix: str, *, choices: dict[str, tuple[str, ...]] | None = None
) -> list[str]:
    """Defines ``--<prefix><field>`` for every field of ``cls`` (int, float, bool, str), with
    the field's default and its docstring line as help; returns the flag names.

    Raises:
      TypeError: a field of another type, or a field without a docstring line.
    """
    docs = field_docs(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no line in the docstring")
        name = prefix + f.name
        default: Any = f.default
        help_text = docs[f.name]
        if choices and f.name in choices:
            flags.DEFINE_enum(name, default, list(choices[f.name]), help_text)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_text)
        elif isinstance(default, str):
            flags.DEFINE_string(name, default, help_text)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {type(default)}")
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
        doc = field_docs(cls).get(field)
        if doc is None:
            raise TypeError(f"{cls.__name__}.{field} has no line in the docstring")
        kind = _scalar_type(typing.get_type_hints(cls)[field])
        help_text = f"{doc} (preset: {section}.{field})"
        if name in choices:
            flags.DEFINE_enum(name, None, list(choices[name]), help_text)
        elif kind is bool:
            flags.DEFINE_bool(name, None, help_text)
        elif kind is int:
            flags.DEFINE_integer(name, None, help_text)
        elif kind is float:
            flags.DEFINE_float(name, None, help_text)
        elif kind is str:
            flags.DEFINE_string(name, None, help_text)
        else:
            raise TypeError(f"{cls.__name__}.{field}: no flag type for its hint")
        names.append(name)
    return names

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

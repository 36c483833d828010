"""JSON files: atomic writes (process 0 only), tolerant reads, and conversion and comparison
of config trees.

Example:
  >>> import os, tempfile
  >>> from satm_jax import jsonio
  >>> p = os.path.join(tempfile.mkdtemp(), "x.json")
  >>> jsonio.write_json(p, {"a": (1, 2)}); jsonio.read_json(p)
  {'a': [1, 2]}
  >>> jsonio.json_diff({"lr": 0.1, "n": 2}, {"lr": 0.2, "n": 2})
  ['lr: stored 0.1, requested 0.2']
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from satm_jax.parallel import main_process_only


@main_process_only
def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_default)
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def to_jsonable(x: Any) -> Any:
    """``x`` as plain JSON values (tuples become lists, NumPy scalars numbers)."""
    return json.loads(json.dumps(x, default=_default))


def json_diff(
    a: Any, b: Any, left: str = "stored", right: str = "requested", prefix: str = ""
) -> list[str]:
    """Human-readable list of the fields where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += json_diff(
                a.get(k, "<absent>"), b.get(k, "<absent>"), left, right, f"{prefix}{k}."
            )
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix.rstrip('.')}: {left} {a!r}, {right} {b!r}"]


def read_json(path: str) -> Any | None:
    """The JSON content of ``path``; ``None`` if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None

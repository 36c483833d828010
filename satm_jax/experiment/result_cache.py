"""Finished results on disk, reused only when they were made by the same request.

One format for every cached result of the experiment layer (a run's ``result.json``, the
baselines' ``baselines/*.json``, a continual stage's ``<method>/result.json``)::

    {"key": <what the result depends on>, "complete": true, ...payload}

``load`` returns the payload only if the file exists, parses, is complete and was stored under
an equal ``key``; anything else (absent, truncated, another request) means "compute again".
Files are written atomically by process 0 (``satm_jax.jsonio.write_json``), so a killed run
leaves either the old file or the new one.

Files written before this format existed are read through ``legacy``: a function from the old
document to ``(key, payload)`` (or ``None`` when it cannot be read), so that finished work in an
old workdir is still reused.

Example:
  >>> import os, tempfile
  >>> from satm_jax.experiment import result_cache
  >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
  >>> result_cache.store(p, {"lr": 0.1}, {"accs": [90.0]})
  >>> result_cache.load(p, {"lr": 0.1})
  {'accs': [90.0]}
  >>> result_cache.load(p, {"lr": 0.2}) is None
  True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from satm_jax import jsonio

Legacy = Callable[[dict[str, Any]], "tuple[Any, dict[str, Any]] | None"]

_RESERVED = ("key", "complete")


def store(path: str, key: Any, payload: dict[str, Any]) -> None:
    """Writes ``payload`` under ``key`` at ``path`` (atomically, process 0 only)."""
    clash = [k for k in _RESERVED if k in payload]
    if clash:
        raise ValueError(f"payload fields {clash} are reserved by the cache format")
    jsonio.write_json(path, {"key": jsonio.to_jsonable(key), "complete": True, **payload})


def load(path: str, key: Any, *, legacy: Legacy | None = None) -> dict[str, Any] | None:
    """The payload stored at ``path`` under ``key``; ``None`` if there is none to reuse."""
    doc = jsonio.read_json(path)
    if not isinstance(doc, dict):
        return None
    if "key" in doc and doc.get("complete") is True:
        stored, payload = doc["key"], {k: v for k, v in doc.items() if k not in _RESERVED}
    elif legacy is not None:
        old = legacy(doc)
        if old is None:
            return None
        stored, payload = old
    else:
        return None
    return payload if stored == jsonio.to_jsonable(key) else None

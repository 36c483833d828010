"""The cache of decoded arrays: ``data_dir/satm_cache/<name>.npz``.

``cached(data_dir, name, identity, build)`` returns ``build()``'s arrays, read from the cache
when it was made from a source with the same ``identity`` (the source files' sizes and
mtimes); a corrupt cache warns and is rebuilt, an unwritable one is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CACHE_DIR = "satm_cache"
CACHE_FORMAT = 1
_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")


def cache_path(data_dir: Path, name: str) -> Path:
    """``data_dir/satm_cache/<name>.npz``."""
    return data_dir / CACHE_DIR / f"{name}.npz"


def cache_key(parts: Any) -> str:
    """A digest of the source's identity (JSON-able ``parts``) and the cache format."""
    blob = json.dumps([CACHE_FORMAT, parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``path`` holds ones made under ``key``; a corrupt file warns."""
    if not path.is_file():
        return None
    try:
        # The file handle is ours: np.load leaves the one it opens unclosed when the file is
        # not a zip archive (a ResourceWarning on every corrupt cache).
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            arrays = {k: z[k] for k in _CACHE_ARRAYS}
        for split in ("train", "test"):
            x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if x.dtype != np.uint8 or x.ndim != 4 or y.shape != x.shape[:1]:
                raise ValueError(f"{split} arrays {x.dtype} {x.shape} / {y.shape}")
        return arrays
    except Exception as e:  # a damaged npz raises many types
        warnings.warn(
            f"ignoring the corrupt dataset cache {path} ({type(e).__name__}: {e}); "
            "rebuilding it from the source files",
            stacklevel=3,
        )
        return None


def save_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> bool:
    """Writes ``arrays`` atomically (temp file + ``os.replace``); ``False`` if not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        warnings.warn(f"not caching decoded arrays: cannot write {path} ({e})", stacklevel=3)
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            warnings.warn(f"not caching decoded arrays: cannot write {path} ({e})", stacklevel=3)
            return False
        raise
    return True


def cached(
    data_dir: Path | None,
    name: str,
    identity: Any,
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """``build()``'s arrays, read from ``data_dir/satm_cache/<name>.npz`` when that was made
    from a source with the same ``identity``; otherwise built and written there."""
    if data_dir is None:
        return build()
    path = cache_path(data_dir, name)
    key = cache_key([name, identity])
    hit = load_cache(path, key)
    if hit is not None:
        return hit
    arrays = build()
    save_cache(path, key, arrays)
    return arrays

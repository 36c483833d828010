"""Read-only views of dataset files: a folder, a zip or a tar.gz archive seen the same way.

* ``FileTree``: files addressed by ``/``-separated paths relative to a root;
  ``DirTree``/``ZipTree``/``TarTree``: a folder, a zip or a tar.gz archive, so the same code
  reads an archive and its extracted folder;
* ``file_identity``: a file's size and mtime, for cache keys; ``md5_file``: its checksum.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from satm_jax.datasets.errors import DatasetError


def md5_file(path: Path) -> str:
    """Hex MD5 of a file, read in 1 MiB blocks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(path: Path) -> list[Any]:
    """``[path, size, mtime_ns]``: a file's identity for cache keys."""
    try:
        st = path.stat()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    return [str(path), st.st_size, st.st_mtime_ns]


class FileTree:
    """Read-only files addressed by ``/``-separated paths relative to a root."""

    location: Path

    def describe(self, rel: str) -> str:
        """Where ``rel`` is, for messages."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        """The file's bytes; ``DatasetError`` if it is missing or unreadable."""
        raise NotImplementedError

    def listdir(self, rel: str) -> list[str] | None:
        """Sorted names of the files directly inside folder ``rel``; ``None`` if no folder."""
        raise NotImplementedError

    def identity(self, rels: Iterable[str]) -> list[Any]:
        """What identifies the content of ``rels`` (sizes and mtimes), for cache keys."""
        return file_identity(self.location)

    def close(self) -> None:
        pass

    def __enter__(self) -> FileTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirTree(FileTree):
    """A folder on disk."""

    def __init__(self, root: Path):
        self.location = root

    def describe(self, rel: str) -> str:
        return str(self.location / rel)

    def exists(self, rel: str) -> bool:
        return (self.location / rel).is_file()

    def read(self, rel: str) -> bytes:
        try:
            return (self.location / rel).read_bytes()
        except FileNotFoundError as e:
            raise DatasetError(f"missing file {self.describe(rel)}") from e
        except OSError as e:
            raise DatasetError(f"cannot read {self.describe(rel)}: {e}") from e

    def listdir(self, rel: str) -> list[str] | None:
        d = self.location / rel
        if not d.is_dir():
            return None
        with os.scandir(d) as it:
            return sorted(e.name for e in it if e.is_file())

    def identity(self, rels: Iterable[str]) -> list[Any]:
        h = hashlib.sha256()
        for rel in rels:
            try:
                st = os.stat(self.location / rel)
            except OSError as e:
                raise DatasetError(f"missing file {self.describe(rel)}") from e
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return [str(self.location), h.hexdigest()]


class ZipTree(FileTree):
    """A zip archive, rooted at the folder inside it that holds ``marker`` (if given)."""

    def __init__(self, path: Path, marker: str | None = None):
        self.location = path
        try:
            self._zip = zipfile.ZipFile(path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise DatasetError(f"{path} is corrupt: not a readable zip archive ({e})") from e
        self.root = ""
        if marker is not None:
            hits = [n for n in names if n == marker or n.endswith("/" + marker)]
            if not hits:
                raise DatasetError(f"{path} is corrupt or not the official archive: no {marker}")
            self.root = min(hits, key=len)[: -len(marker)]
        self._files = set()
        self._dirs: dict[str, list[str]] = {}
        for n in names:
            if n.endswith("/") or not n.startswith(self.root):
                continue
            rel = n[len(self.root) :]
            self._files.add(rel)
            parent, _, base = rel.rpartition("/")
            self._dirs.setdefault(parent, []).append(base)
        for v in self._dirs.values():
            v.sort()

    def describe(self, rel: str) -> str:
        return f"{self.location} (member {self.root}{rel})"

    def exists(self, rel: str) -> bool:
        return rel in self._files

    def read(self, rel: str) -> bytes:
        if rel not in self._files:
            raise DatasetError(
                f"{self.location} is corrupt or incomplete: no member {self.root}{rel}"
            )
        try:
            return self._zip.read(self.root + rel)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as e:
            raise DatasetError(
                f"{self.location} is corrupt: cannot read {self.root}{rel} ({e})"
            ) from e

    def listdir(self, rel: str) -> list[str] | None:
        return self._dirs.get(rel.rstrip("/"))

    def close(self) -> None:
        self._zip.close()


class TarTree(FileTree):
    """A (gzipped) tar archive read in one pass into memory (small archives like CIFAR's)."""

    def __init__(self, path: Path):
        self.location = path
        self._files: dict[str, bytes] = {}
        try:
            with tarfile.open(path, "r:*") as tar:
                for m in tar:
                    if m.isfile():
                        f = tar.extractfile(m)
                        if f is not None:
                            self._files[m.name.lstrip("./")] = f.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path} is corrupt: not a readable tar.gz archive ({e})") from e

    def describe(self, rel: str) -> str:
        return f"{self.location} (member {rel})"

    def exists(self, rel: str) -> bool:
        return rel in self._files

    def read(self, rel: str) -> bytes:
        if rel not in self._files:
            raise DatasetError(f"{self.location} is corrupt or incomplete: no member {rel}")
        return self._files[rel]

    def listdir(self, rel: str) -> list[str] | None:
        prefix = rel.rstrip("/") + "/"
        names = [n[len(prefix) :] for n in self._files if n.startswith(prefix)]
        names = [n for n in names if "/" not in n]
        return sorted(names) if names else None

"""Readers for the official dataset file formats, and the cache of decoded arrays.

``satm_jax.data`` builds its loaders from these pieces:

* ``read_idx``: MNIST's idx files (gzipped or not), header and size checked;
* ``load_pickle``: the CIFAR python-version pickles, unpickled with a whitelist that admits
  NumPy arrays only;
* ``read_svhn_mat``: SVHN's MATLAB ``*_32x32.mat`` files;
* ``DirTree``/``ZipTree``/``TarTree``: one read-only view of a folder, a zip or a tar.gz
  archive, so the same code reads an archive and its extracted folder;
* ``tiny_imagenet_index``: Tiny ImageNet's class list, training files and labelled
  validation files;
* ``decode_images``: parallel PIL decoding (``decode_rgb``) into one uint8 array, optionally
  resized and centre-cropped (``resize_center_crop``, MTT's ``Resize`` + ``CenterCrop``);
* ``cached``: an ``.npz`` cache of decoded arrays keyed by the source's identity;
* ``tfds_prepared``/``read_tfds_split``: a TFDS dataset prepared as ``array_record`` in a
  ``data_dir``, read through ``tfds.data_source`` (no TensorFlow needed).

Every failure is a :class:`DatasetError` that names the file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class DatasetError(Exception):
    """Missing, unreadable or corrupt dataset files, or a bad dataset request."""


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def as_path(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` as an absolute ``Path`` with ``~`` expanded (``None`` stays ``None``)."""
    if data_dir is None:
        return None
    return Path(os.path.expanduser(os.fspath(data_dir))).absolute()


# --------------------------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Reads an idx file (``.gz`` suffix: gzipped) whose magic number must be ``magic``.

    Raises:
      DatasetError: unreadable, bad gzip stream, bad magic number, or a data size that
        disagrees with the header (truncated file).
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path} is corrupt: cannot read it ({e})") from e
    return parse_idx(raw, magic, str(path))


def parse_idx(raw: bytes, magic: int, what: str) -> np.ndarray:
    """Parses idx bytes: big-endian magic ``0x000008NN`` (uint8, NN dims), then NN sizes."""
    if len(raw) < 4:
        raise DatasetError(f"{what} is corrupt: {len(raw)} bytes, too short for an idx header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DatasetError(
            f"{what} is corrupt: idx magic number 0x{got:08X}, expected 0x{magic:08X}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{what} is corrupt: truncated idx header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DatasetError(
            f"{what} is corrupt: {len(raw) - header} data bytes but the header says "
            f"{'x'.join(map(str, dims))} = {count} (truncated or padded file)"
        )
    return np.frombuffer(raw, np.uint8, count=count, offset=header).reshape(dims).copy()


# --------------------------------------------------------------------------------------------
# Checksums and pickles (CIFAR)
# --------------------------------------------------------------------------------------------


def md5_file(path: Path) -> str:
    """Hex MD5 of a file, read in 1 MiB blocks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/bytes/NumPy arrays; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def load_pickle(data: bytes, what: str) -> Any:
    """Unpickles Python-2 pickles of NumPy data (``encoding='bytes'``: keys stay bytes)."""
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # unpickling corrupt data raises anything
        raise DatasetError(
            f"{what} is corrupt: cannot unpickle it ({type(e).__name__}: {e})"
        ) from e


def cifar_images(rows: Any, what: str) -> np.ndarray:
    """CIFAR ``b'data'`` rows ``(N, 3072)`` (R, G, B planes of 32x32) as NHWC uint8."""
    x = np.asarray(rows)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{what} is corrupt: b'data' is {x.dtype} {x.shape}, expected uint8 (N, 3072)"
        )
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def pickle_field(d: Any, key: bytes, what: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise DatasetError(f"{what} is corrupt: no {key!r} entry")
    return d[key]


@dataclasses.dataclass(frozen=True)
class CifarLayout:
    """Where the python-version CIFAR files keep things.

    Attributes:
      name: registry (and TFDS) name.
      archive: the official archive's file name.
      folder: the folder the archive extracts to.
      train: training batch files.
      test: the test batch file.
      meta: the metadata file.
      labels_key: the batches' label entry.
      names_key: the metadata's class-name entry.
    """

    name: str
    archive: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels_key: bytes
    names_key: bytes


CIFAR10 = CifarLayout(
    "cifar10",
    "cifar-10-python.tar.gz",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
    b"labels",
    b"label_names",
)
CIFAR100 = CifarLayout(
    "cifar100",
    "cifar-100-python.tar.gz",
    "cifar-100-python",
    ("train",),
    "test",
    "meta",
    b"fine_labels",
    b"fine_label_names",
)


def read_cifar(layout: CifarLayout, tree: FileTree) -> dict[str, Any]:
    """The arrays (and class names) of a CIFAR archive or extracted folder's parent."""

    def batch(member: str) -> tuple[np.ndarray, np.ndarray]:
        rel = f"{layout.folder}/{member}"
        what = tree.describe(rel)
        d = load_pickle(tree.read(rel), what)
        x = cifar_images(pickle_field(d, b"data", what), what)
        y = np.asarray(pickle_field(d, layout.labels_key, what)).reshape(-1)
        if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{what} is corrupt: {len(x)} images but {len(y)} labels")
        return x, y.astype(np.int32)

    meta_rel = f"{layout.folder}/{layout.meta}"
    meta = load_pickle(tree.read(meta_rel), tree.describe(meta_rel))
    names = pickle_field(meta, layout.names_key, tree.describe(meta_rel))
    parts = [batch(m) for m in layout.train]
    x_test, y_test = batch(layout.test)
    return {
        "train_images": np.concatenate([p[0] for p in parts]),
        "train_labels": np.concatenate([p[1] for p in parts]),
        "test_images": x_test,
        "test_labels": y_test,
        "class_names": [n.decode() if isinstance(n, bytes) else str(n) for n in names],
    }


# --------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``*_32x32.mat``: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) with 10 meaning 0.

    Returns:
      NHWC uint8 images and int32 labels in 0..9.
    """
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises many types on bad files
        raise DatasetError(
            f"{path} is corrupt: cannot read it as a MATLAB file ({type(e).__name__}: {e})"
        ) from e
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path} is corrupt: it lacks the 'X' and 'y' variables")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or len(y) != x.shape[3]:
        raise DatasetError(
            f"{path} is corrupt: X is {x.dtype} {x.shape} and y has {len(y)} labels; "
            "expected uint8 (32, 32, 3, N) and N labels"
        )
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DatasetError(f"{path} is corrupt: labels outside 1..10")
    labels = np.where(y == 10, 0, y).astype(np.int32)
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels


def file_identity(path: Path) -> list[Any]:
    """``[path, size, mtime_ns]``: a file's identity for cache keys."""
    try:
        st = path.stat()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    return [str(path), st.st_size, st.st_mtime_ns]


# --------------------------------------------------------------------------------------------
# File trees: a folder, a zip or a tar.gz seen the same way
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tiny ImageNet layout
# --------------------------------------------------------------------------------------------


TINY_IMAGENET_SIZE = 64


@dataclasses.dataclass(frozen=True)
class TinyImageNetIndex:
    """What a Tiny ImageNet tree holds.

    Attributes:
      wnids: the classes, in ``wnids.txt`` order (= label index).
      class_names: the first ``words.txt`` name of each class (the wnid if it has none).
      train: ``(path, label)`` of each ``train/<wnid>/images/*.JPEG``, class by class.
      val: ``(path, label)`` of each ``val/images/*.JPEG``, in ``val_annotations.txt`` order.
    """

    wnids: tuple[str, ...]
    class_names: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    val: tuple[tuple[str, int], ...]


def _text_lines(tree: FileTree, rel: str) -> list[str]:
    try:
        text = tree.read(rel).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{tree.describe(rel)} is corrupt: not UTF-8 text") from e
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def tiny_imagenet_index(tree: FileTree) -> TinyImageNetIndex:
    """Reads ``wnids.txt``, ``words.txt`` (optional), the train folders and the validation
    annotations of a Tiny ImageNet tree (rooted at ``tiny-imagenet-200/``).

    Raises:
      DatasetError: a missing file or class folder, or a malformed annotation line.
    """
    wnids = tuple(line.strip() for line in _text_lines(tree, "wnids.txt"))
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(f"{tree.describe('wnids.txt')} is corrupt: empty or duplicated wnids")
    label_of = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    if tree.exists("words.txt"):
        for line in _text_lines(tree, "words.txt"):
            wnid, _, name = line.partition("\t")
            words[wnid.strip()] = name.split(",")[0].strip()
    class_names = tuple(words.get(w) or w for w in wnids)
    train = []
    for w in wnids:
        folder = f"train/{w}/images"
        names = [n for n in tree.listdir(folder) or [] if _is_image(n)]
        if not names:
            raise DatasetError(
                f"{tree.describe(folder)} is missing or holds no images: the Tiny ImageNet "
                f"tree is incomplete (class {w} of wnids.txt)"
            )
        train.extend((f"{folder}/{n}", label_of[w]) for n in names)
    val = []
    ann = "val/val_annotations.txt"
    for k, line in enumerate(_text_lines(tree, ann)):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in label_of:
            raise DatasetError(
                f"{tree.describe(ann)} is corrupt: line {k + 1} {line[:80]!r} is not "
                "'<file>\\t<wnid>\\t...' with a wnid of wnids.txt"
            )
        val.append((f"val/images/{fields[0].strip()}", label_of[fields[1].strip()]))
    return TinyImageNetIndex(wnids, class_names, tuple(train), tuple(val))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode_rgb(data: bytes) -> Any:
    """Decodes image bytes with PIL into an RGB ``PIL.Image`` (grayscale/CMYK converted)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def resize_center_crop(img: Any, size: int) -> Any:
    """torchvision's ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image.

    The shorter side becomes ``size`` and the longer ``int(size * long / short)`` (bilinear,
    PIL's antialiased filter, as torchvision's PIL backend); the crop's offsets are
    ``int(round((side - size) / 2))``.
    """
    from PIL import Image

    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def decode_images(
    tree: FileTree,
    rels: Sequence[str],
    *,
    crop_size: int | None = None,
    expect_size: int | None = None,
    chunk: int = 2048,
) -> np.ndarray:
    """Decodes ``rels`` of ``tree`` to uint8 ``(N, S, S, 3)``, on a thread pool.

    Args:
      tree: where the files are.
      rels: the image files.
      crop_size: resize the shorter side to this and centre-crop a square (MTT's ImageNet).
      expect_size: otherwise, every image must already be ``expect_size`` square.
      chunk: files read into memory at a time.

    Raises:
      DatasetError: a missing or undecodable file, or one of the wrong size.
    """
    side = crop_size or expect_size
    if side is None:
        raise ValueError("give crop_size or expect_size")
    out = np.empty((len(rels), side, side, 3), np.uint8)

    def work(i: int, data: bytes) -> None:
        try:
            img = decode_rgb(data)
        except DatasetError:
            raise
        except Exception as e:  # PIL raises many types on bad data
            raise DatasetError(
                f"{tree.describe(rels[i])} is corrupt: cannot decode the image "
                f"({type(e).__name__}: {e})"
            ) from e
        if crop_size is not None:
            img = resize_center_crop(img, crop_size)
        elif img.size != (side, side):
            raise DatasetError(
                f"{tree.describe(rels[i])} is {img.size[0]}x{img.size[1]}, expected {side}x{side}"
            )
        out[i] = np.asarray(img, np.uint8)

    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(rels), chunk):
            datas = [tree.read(r) for r in rels[start : start + chunk]]
            list(pool.map(work, range(start, start + len(datas)), datas))
    return out


def labelled_arrays(
    tree: FileTree,
    train: Sequence[tuple[str, int]],
    test: Sequence[tuple[str, int]],
    class_names: Sequence[str],
    **decode_kw: Any,
) -> dict[str, Any]:
    """Decodes ``(file, label)`` lists into the arrays of a dataset (``decode_images``)."""
    return {
        "train_images": decode_images(tree, [r for r, _ in train], **decode_kw),
        "train_labels": np.array([y for _, y in train], np.int32),
        "test_images": decode_images(tree, [r for r, _ in test], **decode_kw),
        "test_labels": np.array([y for _, y in test], np.int32),
        "class_names": np.array(list(class_names)),
    }


# --------------------------------------------------------------------------------------------
# Cache of decoded arrays
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Prepared TFDS datasets
# --------------------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def tfds_prepared(data_dir: Path, name: str) -> tuple[str, str] | None:
    """``(version, file_format)`` of the newest TFDS ``name`` prepared in ``data_dir``.

    A version counts as prepared when ``data_dir/<name>/<version>/dataset_info.json`` exists.
    """
    root = data_dir / name
    if not root.is_dir():
        return None
    versions = [
        d
        for d in root.iterdir()
        if _VERSION_RE.match(d.name) and (d / "dataset_info.json").is_file()
    ]
    if not versions:
        return None
    best = max(versions, key=lambda d: tuple(int(p) for p in d.name.split(".")))
    try:
        info = json.loads((best / "dataset_info.json").read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{best / 'dataset_info.json'} is corrupt: {e}") from e
    return best.name, str(info.get("fileFormat", "tfrecord")) if isinstance(info, dict) else ""


def read_tfds_split(
    name: str, version: str, data_dir: Path, split: str, label_key: str = "label"
) -> tuple[np.ndarray, np.ndarray]:
    """All ``(image, label)`` of a split through ``tfds.data_source`` (no TensorFlow).

    Returns:
      uint8 NHWC images and int32 labels, in the data source's order.
    """
    import tensorflow_datasets as tfds

    where = data_dir / name / version
    try:
        src = tfds.data_source(f"{name}:{version}", split=split, data_dir=os.fspath(data_dir))
        n = len(src)
        images: np.ndarray | None = None
        labels = np.empty(n, np.int32)
        for i in range(n):
            ex = src[i]
            img = np.asarray(ex["image"], np.uint8)
            if images is None:
                images = np.empty((n, *img.shape), np.uint8)
            images[i] = img
            labels[i] = int(ex[label_key])
    except DatasetError:
        raise
    except Exception as e:  # tfds/array_record raise many types
        raise DatasetError(
            f"cannot read split {split!r} of the TFDS dataset {name}:{version} in {where} "
            f"({type(e).__name__}: {e}); it may be corrupt: delete it and prepare it again"
        ) from e
    if images is None:
        raise DatasetError(f"the TFDS dataset {name}:{version} in {where} has no {split!r} images")
    return images, labels


def read_tfds(name: str, version: str, data_dir: Path, test_split: str) -> dict[str, Any]:
    """The arrays of a prepared TFDS dataset: its ``train`` and ``test_split`` splits, and
    the class names (``metadata['class_names']``, else the ``label`` feature's names)."""
    import tensorflow_datasets as tfds

    x_train, y_train = read_tfds_split(name, version, data_dir, "train")
    x_test, y_test = read_tfds_split(name, version, data_dir, test_split)
    try:
        info = tfds.builder(f"{name}:{version}", data_dir=os.fspath(data_dir)).info
        names = (info.metadata or {}).get("class_names") or info.features["label"].names
    except Exception as e:  # tfds raises many types on a damaged folder
        raise DatasetError(
            f"cannot read the class names of {data_dir / name / version}: {e}"
        ) from e
    return {
        "train_images": x_train,
        "train_labels": y_train,
        "test_images": x_test,
        "test_labels": y_test,
        "class_names": np.array([str(n) for n in names]),
    }

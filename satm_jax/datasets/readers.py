"""Readers for each official dataset file format.

* ``read_idx``: MNIST's idx files (gzipped or not), header and size checked;
* ``load_pickle``/``read_cifar``: the CIFAR python-version pickles, unpickled with a whitelist
  that admits NumPy arrays only;
* ``read_svhn_mat``: SVHN's MATLAB ``*_32x32.mat`` files;
* ``tiny_imagenet_index``: Tiny ImageNet's class list, training files and labelled
  validation files.

They read through a ``satm_jax.datasets.archives.FileTree`` where a dataset may come as an
archive or a folder. Every failure is a :class:`DatasetError` that names the file.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from satm_jax.datasets.archives import FileTree
from satm_jax.datasets.errors import DatasetError
from satm_jax.datasets.images import IMAGE_EXTENSIONS

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
# Pickles (CIFAR)
# --------------------------------------------------------------------------------------------

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

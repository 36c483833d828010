"""The built-in datasets: one loader per official distribution, registered by name.

``satm_jax.datasets.load_dataset(name, data_dir=...)`` returns a :class:`Dataset` of uint8
``(N, H, W, C)`` images and integer labels, read from the dataset's official distribution.
Nothing is downloaded: a missing or corrupt file stops with a :class:`DatasetError` that names
the expected file, where to get it and where to put it.

``digits`` is scikit-learn's 8x8 handwritten digits, which ships inside the scikit-learn wheel:
it is the embedded default that needs no download. The others, and what they read in
``data_dir`` (details in each loader's docstring; the format readers are in
``satm_jax.datasets.readers``):

* ``mnist``, ``fashion_mnist``: the four idx files, gzipped or not (Fashion-MNIST also from the
  Debian package ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``);
* ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat``;
* ``cifar10``, ``cifar100``: a TFDS dataset prepared as ``array_record``, the python-version
  ``.tar.gz`` (MD5-checked) or its extracted folder;
* ``tiny_imagenet``: a TFDS dataset prepared by ``satm_jax.datasets.tfds_tiny_imagenet``,
  ``tiny-imagenet-200.zip`` or its extracted folder (the test split is the validation set);
* ``imagenette``, ``imagewoof``: MTT's 10-class subsets from ImageNet's ``train/<wnid>/`` and
  ``val/<wnid>/`` folders, resized and centre-cropped to 128x128.

Decoded JPEG datasets are cached in ``data_dir/satm_cache/<name>.npz``, keyed by the source
files' sizes and mtimes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from satm_jax.datasets import archives, cache, readers, tfds_reader
from satm_jax.datasets.errors import DatasetError
from satm_jax.datasets.images import IMAGE_EXTENSIONS, labelled_arrays
from satm_jax.datasets.registry import Dataset, register_dataset


def as_path(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` as an absolute ``Path`` with ``~`` expanded (``None`` stays ``None``)."""
    if data_dir is None:
        return None
    return Path(os.path.expanduser(os.fspath(data_dir))).absolute()


@register_dataset("digits")
def load_digits(data_dir: str | None = None) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 16 grey levels), embedded in its wheel.

    Pixels ``v`` in 0..16 become ``round(v * 255 / 16)``. The split is fixed and stratified:
    with a NumPy generator seeded 0, 20% of each class (rounded) is held out for testing,
    giving 1,438 training and 359 test images.
    """
    del data_dir
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(labels), bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(0.2 * len(idx)))
        test_mask[rng.permutation(idx)[:n_test]] = True
    return Dataset(
        name="digits",
        train_images=images[~test_mask],
        train_labels=labels[~test_mask],
        test_images=images[test_mask],
        test_labels=labels[test_mask],
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
    )


# --------------------------------------------------------------------------------------------
# Official distributions
# --------------------------------------------------------------------------------------------


def _dest(data_dir: Path | None, *parts: str) -> str:
    """The exact path ``data_dir/parts...`` for messages (``<data_dir>/...`` when unset)."""
    if data_dir is None:
        return "/".join(("<data_dir>", *parts))
    return str(data_dir.joinpath(*parts))


def _no_dir_hint(data_dir: Path | None) -> str:
    if data_dir is not None:
        return ""
    return " No data_dir was given: pass data_dir=<folder> (experiments.run: --data_dir)."


def _dataset(name: str, arrays: dict[str, Any]) -> Dataset:
    """A ``Dataset`` from ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels`` and ``class_names`` arrays."""
    class_names = arrays["class_names"]
    return Dataset(
        name=name,
        train_images=arrays["train_images"],
        train_labels=np.asarray(arrays["train_labels"], np.int32),
        test_images=arrays["test_images"],
        test_labels=np.asarray(arrays["test_labels"], np.int32),
        num_classes=len(class_names),
        class_names=tuple(str(c) for c in class_names),
    )


# ---- MNIST, Fashion-MNIST ------------------------------------------------------------------

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_URL_ALT = "http://yann.lecun.com/exdb/mnist/"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = tuple(
    "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")
)


def _idx_files_in(folder: Path) -> dict[str, Path]:
    """The idx files present in ``folder`` (uncompressed preferred over ``.gz``)."""
    found = {}
    for f in IDX_FILES:
        for candidate in (folder / f, folder / f"{f}.gz"):
            if candidate.is_file():
                found[f] = candidate
                break
    return found


def _load_idx_dataset(
    name: str, folders: list[Path], class_names: tuple[str, ...], how_to_get: str
) -> Dataset:
    """Reads the four idx files from the first of ``folders`` holding any of them."""
    for folder in folders:
        found = _idx_files_in(folder)
        if not found:
            continue
        missing = [f for f in IDX_FILES if f not in found]
        if missing:
            raise DatasetError(
                f"{name}: {folder} holds only some of the idx files; missing "
                f"{', '.join(f + '[.gz]' for f in missing)}. {how_to_get}"
            )
        x_train = readers.read_idx(found[IDX_FILES[0]], readers.IDX_IMAGES_MAGIC)
        y_train = readers.read_idx(found[IDX_FILES[1]], readers.IDX_LABELS_MAGIC)
        x_test = readers.read_idx(found[IDX_FILES[2]], readers.IDX_IMAGES_MAGIC)
        y_test = readers.read_idx(found[IDX_FILES[3]], readers.IDX_LABELS_MAGIC)
        for x, y, fx, fy in (
            (x_train, y_train, IDX_FILES[0], IDX_FILES[1]),
            (x_test, y_test, IDX_FILES[2], IDX_FILES[3]),
        ):
            if len(x) != len(y):
                raise DatasetError(
                    f"{name}: {found[fx]} holds {len(x)} images but {found[fy]} "
                    f"{len(y)} labels: one of them is corrupt. {how_to_get}"
                )
            if y.size and y.max() >= len(class_names):
                raise DatasetError(f"{found[fy]} is corrupt: label {y.max()} out of range")
        arrays = {
            "train_images": x_train[..., None],
            "train_labels": y_train,
            "test_images": x_test[..., None],
            "test_labels": y_test,
            "class_names": class_names,
        }
        return _dataset(name, arrays)
    raise DatasetError(f"{name}: no idx files found. {how_to_get}")


def _idx_how_to_get(name: str, data_dir: Path | None, urls: str) -> str:
    files = ", ".join(IDX_FILES)
    return (
        f"Expected the four files {files} (each gzipped '.gz' or not) in "
        f"{_dest(data_dir)} or {_dest(data_dir, name)}. Download them from {urls} and put "
        f"them in {_dest(data_dir, name)}.{_no_dir_hint(data_dir)}"
    )


@register_dataset("mnist")
def load_mnist(data_dir: str | None = None) -> Dataset:
    """MNIST: 60,000/10,000 handwritten digits, 28x28x1.

    Expected files, gzipped (``.gz``) or not, in ``data_dir/`` or ``data_dir/mnist/``:
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte`` from https://ossci-datasets.s3.amazonaws.com/mnist/ (or
    http://yann.lecun.com/exdb/mnist/).

    Raises:
      DatasetError: missing files, bad idx magic, or truncated files.
    """
    dd = as_path(data_dir)
    how = _idx_how_to_get("mnist", dd, f"{MNIST_URL} (or {MNIST_URL_ALT})")
    folders = [] if dd is None else [dd, dd / "mnist"]
    return _load_idx_dataset("mnist", folders, tuple(str(i) for i in range(10)), how)


@register_dataset("fashion_mnist")
def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    """Fashion-MNIST: 60,000/10,000 Zalando article images, 28x28x1.

    Expected files, gzipped (``.gz``) or not, in ``data_dir/`` or ``data_dir/fashion_mnist/``
    (the same four idx names as MNIST) from
    http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/. When ``data_dir`` is unset or
    lacks them, the Debian package ``dataset-fashion-mnist`` location
    ``/usr/share/datasets/fashion-mnist`` is used.

    Raises:
      DatasetError: missing files, bad idx magic, or truncated files.
    """
    dd = as_path(data_dir)
    how = _idx_how_to_get("fashion_mnist", dd, FASHION_MNIST_URL) + (
        f" Or install the Debian package dataset-fashion-mnist (apt-get install "
        f"dataset-fashion-mnist), which puts them in {FASHION_MNIST_DEBIAN_DIR}."
    )
    folders = [] if dd is None else [dd, dd / "fashion_mnist"]
    folders.append(Path(FASHION_MNIST_DEBIAN_DIR))
    return _load_idx_dataset("fashion_mnist", folders, FASHION_MNIST_CLASSES, how)


# ---- SVHN ----------------------------------------------------------------------------------

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


@register_dataset("svhn")
def load_svhn(data_dir: str | None = None) -> Dataset:
    """SVHN (cropped digits, format 2): 73,257/26,032 house-number images, 32x32x3.

    Expected files in ``data_dir/`` or ``data_dir/svhn/``: ``train_32x32.mat`` and
    ``test_32x32.mat`` from http://ufldl.stanford.edu/housenumbers/ (``extra_32x32.mat`` is
    not used). Label 10 (digit 0) becomes 0.

    Raises:
      DatasetError: missing or unreadable ``.mat`` files.
    """
    dd = as_path(data_dir)
    folders = [] if dd is None else [dd, dd / "svhn"]
    folder = next((f for f in folders if all((f / n).is_file() for n in SVHN_FILES)), None)
    if folder is None:
        missing = [n for n in SVHN_FILES if dd is None or not (dd / n).is_file()]
        raise DatasetError(
            f"svhn: missing {' and '.join(missing)}. Download {' and '.join(SVHN_FILES)} "
            f"from {SVHN_URL} (format 2, cropped digits) and put them in {_dest(dd)} "
            f"(e.g. {_dest(dd, missing[0])}).{_no_dir_hint(dd)}"
        )
    x_train, y_train = readers.read_svhn_mat(folder / SVHN_FILES[0])
    x_test, y_test = readers.read_svhn_mat(folder / SVHN_FILES[1])
    arrays = dict(
        train_images=x_train, train_labels=y_train, test_images=x_test, test_labels=y_test
    )
    return _dataset("svhn", dict(arrays, class_names=tuple(str(i) for i in range(10))))


# ---- CIFAR ---------------------------------------------------------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
#: Official MD5 of the python-version archives (tests replace entries with their own).
CIFAR_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}


def _load_cifar(layout: readers.CifarLayout, data_dir: str | None) -> Dataset:
    dd = as_path(data_dir)
    note = ""
    if dd is not None:
        prepared = tfds_reader.tfds_prepared(dd, layout.name)
        if prepared is not None and prepared[1] == "array_record":
            return _dataset(
                layout.name, tfds_reader.read_tfds(layout.name, prepared[0], dd, "test")
            )
        if prepared is not None:
            note = (
                f" (The TFDS dataset in {dd / layout.name / prepared[0]} is stored as "
                f"{prepared[1]!r}; reading it without TensorFlow needs file_format="
                "'array_record'.)"
            )
        archive = dd / layout.archive
        if archive.is_file():
            expected = CIFAR_MD5[layout.archive]
            got = archives.md5_file(archive)
            if got != expected:
                raise DatasetError(
                    f"{layout.name}: {archive} is corrupt: MD5 {got}, expected {expected}. "
                    f"Download {layout.archive} (python version) again from {CIFAR_URL} "
                    f"and put it at {archive}."
                )
            return _dataset(layout.name, readers.read_cifar(layout, archives.TarTree(archive)))
        if (dd / layout.folder).is_dir():
            return _dataset(layout.name, readers.read_cifar(layout, archives.DirTree(dd)))
    raise DatasetError(
        f"{layout.name}: no data found. Expected {_dest(dd, layout.archive)} (the python "
        f"version), or its extracted folder {_dest(dd, layout.folder)}/, or a TFDS "
        f"{layout.name} prepared with file_format='array_record' in "
        f"{_dest(dd, layout.name)}/<version>/. Download {layout.archive} from {CIFAR_URL} and "
        f"put it at {_dest(dd, layout.archive)}.{note}{_no_dir_hint(dd)}"
    )


@register_dataset("cifar10")
def load_cifar10(data_dir: str | None = None) -> Dataset:
    """CIFAR-10: 50,000/10,000 images, 32x32x3, 10 classes.

    Read from the first of, in ``data_dir``:

    1. a TFDS ``cifar10`` prepared with ``file_format='array_record'``
       (``data_dir/cifar10/<version>/``), through ``tfds.data_source`` (no TensorFlow);
    2. ``cifar-10-python.tar.gz`` (MD5-checked against ``CIFAR_MD5``);
    3. its extracted folder ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
       ``test_batch``, ``batches.meta``).

    Download: https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version).

    Raises:
      DatasetError: nothing found, a checksum mismatch, or unreadable batches.
    """
    return _load_cifar(readers.CIFAR10, data_dir)


@register_dataset("cifar100")
def load_cifar100(data_dir: str | None = None) -> Dataset:
    """CIFAR-100: 50,000/10,000 images, 32x32x3, the 100 fine classes.

    Read from the first of, in ``data_dir``:

    1. a TFDS ``cifar100`` prepared with ``file_format='array_record'``
       (``data_dir/cifar100/<version>/``; its fine ``label``);
    2. ``cifar-100-python.tar.gz`` (MD5-checked against ``CIFAR_MD5``);
    3. its extracted folder ``cifar-100-python/`` (``train``, ``test``, ``meta``).

    Download: https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-100 python version).

    Raises:
      DatasetError: nothing found, a checksum mismatch, or unreadable batches.
    """
    return _load_cifar(readers.CIFAR100, data_dir)


# ---- Tiny ImageNet -------------------------------------------------------------------------

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_ZIP = "tiny-imagenet-200.zip"
TINY_IMAGENET_DIR = "tiny-imagenet-200"


def _tiny_arrays(tree: archives.FileTree, index: readers.TinyImageNetIndex) -> dict[str, Any]:
    size = readers.TINY_IMAGENET_SIZE
    return labelled_arrays(tree, index.train, index.val, index.class_names, expect_size=size)


@register_dataset("tiny_imagenet")
def load_tiny_imagenet(data_dir: str | None = None) -> Dataset:
    """Tiny ImageNet: 100,000 training images of 200 classes, 64x64x3; the test split is the
    official validation set (10,000 images).

    Read from the first of, in ``data_dir``:

    1. a TFDS ``tiny_imagenet`` prepared with ``file_format='array_record'`` by
       ``satm_jax.datasets.tfds_tiny_imagenet`` (``data_dir/tiny_imagenet/<version>/``; its
       ``validation`` split is the test split);
    2. ``tiny-imagenet-200.zip``, read in place;
    3. its extracted folder ``tiny-imagenet-200/``.

    In the archive/folder: ``wnids.txt`` (class order = label), ``words.txt`` (class names:
    the first synonym; optional), ``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG``
    labelled by ``val/val_annotations.txt``. Grayscale JPEGs become RGB. Decoded arrays are
    cached in ``data_dir/satm_cache/tiny_imagenet.npz``.

    Download: http://cs231n.stanford.edu/tiny-imagenet-200.zip

    Raises:
      DatasetError: nothing found, a bad zip, a missing file or an undecodable image.
    """
    dd = as_path(data_dir)
    how = (
        f"Download {TINY_IMAGENET_URL} and put it at {_dest(dd, TINY_IMAGENET_ZIP)} (or "
        f"extract it to {_dest(dd, TINY_IMAGENET_DIR)}/).{_no_dir_hint(dd)}"
    )
    if dd is None:
        raise DatasetError(f"tiny_imagenet: no data found. {how}")
    prepared = tfds_reader.tfds_prepared(dd, "tiny_imagenet")
    if prepared is not None and prepared[1] == "array_record":
        from satm_jax.datasets import tfds_tiny_imagenet  # noqa: F401 - registers the builder

        version = prepared[0]
        folder = archives.DirTree(dd / "tiny_imagenet" / version)
        identity = ["tfds", version, folder.identity(folder.listdir("") or [])]
        build = lambda: tfds_reader.read_tfds("tiny_imagenet", version, dd, "validation")
        return _dataset("tiny_imagenet", cache.cached(dd, "tiny_imagenet", identity, build))
    archive = dd / TINY_IMAGENET_ZIP
    if archive.is_file():

        def from_zip() -> dict[str, Any]:
            with archives.ZipTree(archive, marker="wnids.txt") as tree:
                return _tiny_arrays(tree, readers.tiny_imagenet_index(tree))

        identity = ["zip", archives.file_identity(archive)]
        return _dataset("tiny_imagenet", cache.cached(dd, "tiny_imagenet", identity, from_zip))
    if (dd / TINY_IMAGENET_DIR).is_dir():
        tree = archives.DirTree(dd / TINY_IMAGENET_DIR)
        index = readers.tiny_imagenet_index(tree)
        rels = ["wnids.txt", "val/val_annotations.txt"]
        rels += ["words.txt"] if tree.exists("words.txt") else []
        rels += [r for r, _ in index.train + index.val]
        identity = ["folder", tree.identity(rels)]
        build = lambda: _tiny_arrays(tree, index)
        return _dataset("tiny_imagenet", cache.cached(dd, "tiny_imagenet", identity, build))
    raise DatasetError(f"tiny_imagenet: no data found in {dd}. {how}")


# ---- ImageNet subsets (MTT) ----------------------------------------------------------------

IMAGENET_SUBSET_SIZE = 128
IMAGENET_URL = "https://image-net.org/download.php"
#: MTT's ImageNet subsets: (wnids in label order, class names).
IMAGENET_SUBSETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # ImageNet indices 0, 217, 482, 491, 497, 566, 569, 571, 574, 701.
    "imagenette": (
        tuple(
            "n01440764 n02102040 n02979186 n03000684 n03028079 "
            "n03394916 n03417042 n03425413 n03445777 n03888605".split()
        ),
        tuple(
            "tench,English springer,cassette player,chain saw,church,French horn,"
            "garbage truck,gas pump,golf ball,parachute".split(",")
        ),
    ),
    # ImageNet indices 193, 182, 258, 162, 155, 167, 159, 273, 207, 229 (MTT's order).
    "imagewoof": (
        tuple(
            "n02096294 n02093754 n02111889 n02088364 n02086240 "
            "n02089973 n02087394 n02115641 n02099601 n02105641".split()
        ),
        tuple(
            "Australian terrier,Border terrier,Samoyed,beagle,Shih-Tzu,English foxhound,"
            "Rhodesian ridgeback,dingo,golden retriever,Old English sheepdog".split(",")
        ),
    ),
}


def _load_imagenet_subset(name: str, data_dir: str | None) -> Dataset:
    wnids, class_names = IMAGENET_SUBSETS[name]
    dd = as_path(data_dir)
    layout = (
        f"ImageNet (ILSVRC-2012) class folders train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
        f"(the validation images sorted into class folders) in {_dest(dd)} or "
        f"{_dest(dd, 'imagenet')}; get ImageNet from {IMAGENET_URL}"
    )
    roots = [] if dd is None else [dd, dd / "imagenet"]
    root = next((r for r in roots if (r / "train").is_dir()), None)
    if root is None:
        raise DatasetError(
            f"{name}: no ImageNet train folder found. Expected {layout}.{_no_dir_hint(dd)}"
        )
    tree = archives.DirTree(root)
    files: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "val"):
        files[split] = []
        for label, wnid in enumerate(wnids):
            names = tree.listdir(f"{split}/{wnid}")
            if names is None:
                raise DatasetError(
                    f"{name}: missing class folder {root / split / wnid} "
                    f"({class_names[label]}). Expected {layout}."
                )
            images = [f"{split}/{wnid}/{n}" for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
            if not images:
                raise DatasetError(f"{name}: class folder {root / split / wnid} holds no images")
            files[split] += [(r, label) for r in images]
    size = IMAGENET_SUBSET_SIZE
    rels = [r for r, _ in files["train"] + files["val"]]
    identity = ["imagenet", size, tree.identity(rels)]

    build = lambda: labelled_arrays(tree, files["train"], files["val"], class_names, crop_size=size)
    return _dataset(name, cache.cached(dd, name, identity, build))


@register_dataset("imagenette")
def load_imagenette(data_dir: str | None = None) -> Dataset:
    """MTT's ImageNette: 10 easy ImageNet classes, 128x128x3.

    Expected in ``data_dir/`` or ``data_dir/imagenet/``: ImageNet's ``train/<wnid>/*.JPEG``
    and ``val/<wnid>/*.JPEG`` (validation images sorted into class folders) for the wnids of
    ``IMAGENET_SUBSETS['imagenette']`` (tench, English springer, cassette player, chain saw,
    church, French horn, garbage truck, gas pump, golf ball, parachute). Each image is resized
    so the shorter side is 128 (bilinear) and centre-cropped to 128x128 (MTT's ``Resize(128)``
    + ``CenterCrop(128)``). Decoded arrays are cached in ``data_dir/satm_cache/imagenette.npz``.

    Raises:
      DatasetError: a missing class folder or an undecodable image.
    """
    return _load_imagenet_subset("imagenette", data_dir)


@register_dataset("imagewoof")
def load_imagewoof(data_dir: str | None = None) -> Dataset:
    """MTT's ImageWoof: 10 dog breeds of ImageNet, 128x128x3.

    As :func:`load_imagenette` with the wnids of ``IMAGENET_SUBSETS['imagewoof']`` in MTT's
    order (Australian terrier, Border terrier, Samoyed, beagle, Shih-Tzu, English foxhound,
    Rhodesian ridgeback, dingo, golden retriever, Old English sheepdog); cached in
    ``data_dir/satm_cache/imagewoof.npz``.

    Raises:
      DatasetError: a missing class folder or an undecodable image.
    """
    return _load_imagenet_subset("imagewoof", data_dir)

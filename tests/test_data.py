"""The dataset loaders on small files written in the exact official file layouts."""

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from satm_jax import datasets
from satm_jax.datasets import errors, images, loaders

# --------------------------------------------------------------------------------------------
# Writers of the official file layouts
# --------------------------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, magic: int | None = None) -> None:
    """An idx file: big-endian magic 0x000008<ndim>, the dims, then uint8 data."""
    magic = (0x800 | arr.ndim) if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def make_idx_set(folder: Path, gz: bool, seed: int, n_train=12, n_test=7) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return arrays


def check_idx_dataset(ds: datasets.Dataset, arrays: dict) -> None:
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_images.shape[1:] == (28, 28, 1) and ds.train_images.dtype == np.uint8


def cifar_rows(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def make_cifar(root: Path, which: str, seed: int = 0) -> dict:
    """The python-version folder (and tar.gz) of CIFAR-10 or CIFAR-100, 5 images a batch."""
    rng = np.random.default_rng(seed)
    if which == "cifar10":
        folder = root / "cifar-10-batches-py"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, labels_key, k = "test_batch", "batches.meta", b"labels", 10
        meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
        archive = root / "cifar-10-python.tar.gz"
    else:
        folder = root / "cifar-100-python"
        train_files, test_file, meta_file = ["train"], "test", "meta"
        labels_key, k = b"fine_labels", 100
        meta = {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
        archive = root / "cifar-100-python.tar.gz"
    folder.mkdir(parents=True)
    out = {"train_rows": [], "train_labels": [], "test_rows": None, "test_labels": None}
    for name in train_files + [test_file]:
        n = 5 if which == "cifar10" else 9
        rows, labels = cifar_rows(rng, n), [int(v) for v in rng.integers(0, k, n)]
        d = {b"batch_label": name.encode(), labels_key: labels, b"data": rows}
        d[b"filenames"] = [f"img{i}.png".encode() for i in range(n)]
        if which == "cifar100":
            d[b"coarse_labels"] = [v // 5 for v in labels]
        # Python 2 pickles (the official files) name numpy.core; numpy 2 pickles numpy._core.
        blob = pickle.dumps(d, protocol=2).replace(b"numpy._core.", b"numpy.core.")
        (folder / name).write_bytes(blob)
        if name == test_file:
            out["test_rows"], out["test_labels"] = rows, labels
        else:
            out["train_rows"].append(rows)
            out["train_labels"] += labels
    (folder / meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    out["train_rows"] = np.concatenate(out["train_rows"])
    out["archive"], out["folder"] = archive, folder
    return out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def check_cifar(ds: datasets.Dataset, ref: dict) -> None:
    for split in ("train", "test"):
        x, rows = getattr(ds, f"{split}_images"), ref[f"{split}_rows"]
        assert x.shape == (len(rows), 32, 32, 3) and x.dtype == np.uint8
        # Pixel (row r, column c, channel ch) is byte ch * 1024 + r * 32 + c of the row.
        for i, r, c, ch in [(0, 0, 0, 0), (1, 3, 17, 2), (len(rows) - 1, 31, 5, 1)]:
            assert x[i, r, c, ch] == rows[i, ch * 1024 + r * 32 + c]
        np.testing.assert_array_equal(x, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), ref[f"{split}_labels"])


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def random_image(rng, size, mode="RGB") -> Image.Image:
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    base = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), *shape[2:]), dtype=np.uint8)
    return Image.fromarray(base, mode).resize((w, h), Image.BILINEAR)


def make_tiny(root: Path, wnids: list[str], n_train: int = 3, n_val: int = 6, seed=0) -> dict:
    """An official-layout ``tiny-imagenet-200/`` folder and its zip (with directory entries)."""
    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = [f"{w}\tname of {w}, synonym" for w in wnids] + ["n99999999\tunrelated entry"]
    (base / "words.txt").write_text("\n".join(words) + "\n")
    files: dict[str, bytes] = {}  # relative path -> JPEG bytes
    train, val = [], []
    for label, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True)
        boxes = []
        for k in range(n_train):
            mode = "L" if (label, k) == (0, 1) else "RGB"  # one grayscale JPEG
            rel = f"train/{w}/images/{w}_{k}.JPEG"
            files[rel] = jpeg_bytes(random_image(rng, (64, 64), mode))
            train.append((rel, label))
            boxes.append(f"{w}_{k}.JPEG\t0\t0\t63\t63")
        (base / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    (base / "val" / "images").mkdir(parents=True)
    ann = []
    for k in range(n_val):
        label = int(rng.integers(0, len(wnids)))
        rel = f"val/images/val_{k}.JPEG"
        files[rel] = jpeg_bytes(random_image(rng, (64, 64), "L" if k == 2 else "RGB"))
        val.append((rel, label))
        ann.append(f"val_{k}.JPEG\t{wnids[label]}\t1\t2\t60\t61")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    (base / "test" / "images").mkdir(parents=True)
    files["test/images/test_0.JPEG"] = jpeg_bytes(random_image(rng, (64, 64)))
    for rel, blob in files.items():
        (base / rel).write_bytes(blob)
    archive = root / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for dirpath, _, filenames in sorted(os.walk(base)):
            z.write(dirpath, os.path.relpath(dirpath, root) + "/")
            for f in sorted(filenames):
                z.write(os.path.join(dirpath, f), os.path.relpath(os.path.join(dirpath, f), root))

    def decoded(rel):
        return np.asarray(Image.open(io.BytesIO(files[rel])).convert("RGB"))

    return {
        "train_images": np.stack([decoded(r) for r, _ in train]),
        "train_labels": np.array([y for _, y in train]),
        "test_images": np.stack([decoded(r) for r, _ in val]),
        "test_labels": np.array([y for _, y in val]),
        "class_names": tuple(f"name of {w}" for w in wnids),
        "archive": archive,
        "folder": base,
    }


def check_tiny(ds: datasets.Dataset, ref: dict) -> None:
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(ds, key), ref[key], err_msg=key)
    assert ds.class_names == ref["class_names"]
    assert ds.image_shape == (64, 64, 3)


WNIDS = ["n01443537", "n01629819", "n01641577", "n01644900"]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_names():
    for name in (
        "digits",
        "mnist",
        "fashion_mnist",
        "svhn",
        "cifar10",
        "cifar100",
        "tiny_imagenet",
        "imagenette",
        "imagewoof",
    ):
        datasets.check_dataset_name(name)
    with pytest.raises(datasets.DatasetError, match="unknown dataset 'nope'"):
        datasets.check_dataset_name("nope")
    assert datasets.DatasetError is errors.DatasetError


# --------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_in_data_dir(tmp_path, gz):
    arrays = make_idx_set(tmp_path, gz, seed=1)
    ds = datasets.load_dataset("mnist", data_dir=str(tmp_path))
    check_idx_dataset(ds, arrays)
    assert ds.class_names == tuple("0123456789") and ds.num_classes == 10


def test_fashion_mnist_in_subfolder_takes_precedence_over_debian(tmp_path, monkeypatch):
    # Two complete sets with different contents: one where the Debian package puts it, one in
    # the data_dir's subfolder.
    debian = make_idx_set(tmp_path / "debian" / "fashion-mnist", gz=False, seed=9)
    monkeypatch.setattr(
        loaders, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "debian" / "fashion-mnist")
    )
    arrays = make_idx_set(tmp_path / "data" / "fashion_mnist", gz=True, seed=2)
    assert not np.array_equal(debian["train-labels-idx1-ubyte"], arrays["train-labels-idx1-ubyte"])
    ds = datasets.load_dataset("fashion_mnist", data_dir=tmp_path / "data")
    check_idx_dataset(ds, arrays)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    # The Debian folder is a valid set, used when data_dir holds none.
    check_idx_dataset(datasets.load_dataset("fashion_mnist"), debian)
    check_idx_dataset(datasets.load_dataset("fashion_mnist", data_dir=tmp_path / "empty"), debian)


def test_mnist_missing_files_message(tmp_path):
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_dataset("mnist", data_dir=tmp_path)
    msg = str(e.value)
    for part in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", loaders.MNIST_URL):
        assert part in msg
    assert str(tmp_path / "mnist") in msg
    with pytest.raises(datasets.DatasetError, match="pass data_dir="):
        datasets.load_dataset("mnist")


def test_mnist_partial_set_names_missing_file(tmp_path):
    make_idx_set(tmp_path, gz=False, seed=3)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(datasets.DatasetError, match=r"missing t10k-images-idx3-ubyte\[\.gz\]"):
        datasets.load_dataset("mnist", data_dir=tmp_path)


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_dataset("fashion_mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert loaders.FASHION_MNIST_URL in msg and "dataset-fashion-mnist" in msg
    assert "train-labels-idx1-ubyte" in msg and str(tmp_path / "fashion_mnist") in msg


def test_idx_bad_magic(tmp_path):
    make_idx_set(tmp_path, gz=False, seed=4)
    labels = np.zeros(12, np.uint8)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, magic=0x00000803)
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_dataset("mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte is corrupt" in msg and "0x00000801" in msg


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    make_idx_set(tmp_path, gz=gz, seed=5)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(datasets.DatasetError, match=r"t10k-images-idx3-ubyte(\.gz)? is corrupt"):
        datasets.load_dataset("mnist", data_dir=tmp_path)


def test_idx_count_mismatch(tmp_path):
    make_idx_set(tmp_path, gz=False, seed=6)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(datasets.DatasetError, match="12 images but .* 11 labels"):
        datasets.load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.skipif(
    not os.path.isdir(loaders.FASHION_MNIST_DEBIAN_DIR), reason="dataset-fashion-mnist absent"
)
def test_real_fashion_mnist_from_debian_package():
    ds = datasets.load_dataset("fashion_mnist")
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.class_names == (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
    np.testing.assert_array_equal(ds.class_counts(), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))


# --------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------


def make_svhn(folder: Path, n_train=9, n_test=6) -> dict:
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out


def test_svhn(tmp_path):
    ref = make_svhn(tmp_path / "svhn")
    ds = datasets.load_dataset("svhn", data_dir=tmp_path)
    for split in ("train", "test"):
        x, y = ref[split]
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        assert images.shape == (x.shape[3], 32, 32, 3)
        assert images[2, 5, 7, 1] == x[5, 7, 1, 2]
        np.testing.assert_array_equal(images, np.moveaxis(x, 3, 0))
        assert labels[0] == 0  # label 10 is the digit 0
        np.testing.assert_array_equal(labels, y[:, 0] % 10)


def test_svhn_missing_and_unreadable(tmp_path):
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_dataset("svhn", data_dir=tmp_path)
    msg = str(e.value)
    assert "train_32x32.mat" in msg and "test_32x32.mat" in msg
    assert loaders.SVHN_URL in msg and str(tmp_path / "train_32x32.mat") in msg
    make_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 50)
    with pytest.raises(datasets.DatasetError, match="test_32x32.mat is corrupt"):
        datasets.load_dataset("svhn", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_archive_checked_by_md5(tmp_path, monkeypatch, which):
    ref = make_cifar(tmp_path, which)
    archive = ref["archive"]
    import shutil

    shutil.rmtree(ref["folder"])  # only the archive
    monkeypatch.setitem(loaders.CIFAR_MD5, archive.name, md5(archive))
    ds = datasets.load_dataset(which, data_dir=tmp_path)
    check_cifar(ds, ref)
    if which == "cifar10":
        assert ds.class_names == tuple(f"class{i}" for i in range(10))
    else:
        assert ds.num_classes == 100 and ds.class_names[42] == "fine42"


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_extracted_folder(tmp_path, which):
    ref = make_cifar(tmp_path, which)
    ref["archive"].unlink()
    check_cifar(datasets.load_dataset(which, data_dir=tmp_path), ref)


def test_cifar_wrong_checksum(tmp_path):
    ref = make_cifar(tmp_path, "cifar10")  # the official MD5 stays: it cannot match
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_dataset("cifar10", data_dir=tmp_path)
    msg = str(e.value)
    assert str(ref["archive"]) in msg and "c58f30108f718f92721af3b95e74349a" in msg
    assert md5(ref["archive"]) in msg and loaders.CIFAR_URL in msg


def test_cifar_missing_message(tmp_path):
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_dataset("cifar100", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python.tar.gz") in msg and loaders.CIFAR_URL in msg
    assert "cifar-100-python/" in msg


def test_cifar_corrupt_batch_and_unsafe_pickle(tmp_path):
    ref = make_cifar(tmp_path, "cifar10")
    ref["archive"].unlink()
    batch = ref["folder"] / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(datasets.DatasetError, match="data_batch_3 is corrupt"):
        datasets.load_dataset("cifar10", data_dir=tmp_path)
    batch.write_bytes(pickle.dumps({b"data": os.getcwd}, protocol=2))
    with pytest.raises(datasets.DatasetError, match="refusing to unpickle"):
        datasets.load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_tfds_prepared_under_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    for name in ("cifar10", "cifar100"):
        info = tmp_path / name / "3.0.2" / "dataset_info.json"
        info.parent.mkdir(parents=True)
        info.write_text(json.dumps({"fileFormat": "array_record", "name": name}))
    make_cifar(tmp_path, "cifar10")  # present but ignored: the TFDS dataset comes first
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        for name in ("cifar10", "cifar100"):
            ds = datasets.load_dataset(name, data_dir=tmp_path)
            assert ds.train_images.shape == (6, 32, 32, 3) == ds.test_images.shape
            for split, tfds_split in (("train", "train"), ("test", "test")):
                src = tfds.data_source(name, split=tfds_split, data_dir=str(tmp_path))
                for i in range(6):
                    ex = src[i]
                    np.testing.assert_array_equal(getattr(ds, f"{split}_images")[i], ex["image"])
                    assert getattr(ds, f"{split}_labels")[i] == ex["label"]  # fine label
            assert ds.num_classes == (10 if name == "cifar10" else 100)
            # Unprepared (mocked) builders name classes by number; prepared ones by name.
            names = tfds.builder(name, data_dir=str(tmp_path)).info.features["label"].names
            assert ds.class_names == tuple(names)


def test_cifar_tfrecord_tfds_falls_back_to_folder(tmp_path):
    info = tmp_path / "cifar10" / "3.0.2" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"fileFormat": "tfrecord"}))
    ref = make_cifar(tmp_path, "cifar10")
    ref["archive"].unlink()
    check_cifar(datasets.load_dataset("cifar10", data_dir=tmp_path), ref)
    import shutil

    shutil.rmtree(ref["folder"])
    with pytest.raises(datasets.DatasetError, match="file_format='array_record'"):
        datasets.load_dataset("cifar10", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Tiny ImageNet
# --------------------------------------------------------------------------------------------


def test_tiny_imagenet_folder_and_zip(tmp_path):
    ref = make_tiny(tmp_path / "a", WNIDS)
    # The folder alone.
    ref["archive"].rename(tmp_path / "moved.zip")
    ds = datasets.load_dataset("tiny_imagenet", data_dir=tmp_path / "a")
    check_tiny(ds, ref)
    gray = ds.train_images[1]  # the grayscale JPEG became RGB with equal channels
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert (tmp_path / "a" / "satm_cache" / "tiny_imagenet.npz").is_file()
    # The zip alone, read in place.
    zdir = tmp_path / "z"
    zdir.mkdir()
    (tmp_path / "moved.zip").rename(zdir / "tiny-imagenet-200.zip")
    check_tiny(datasets.load_dataset("tiny_imagenet", data_dir=zdir), ref)
    assert not (zdir / "tiny-imagenet-200").exists()


def test_tiny_imagenet_cache_written_once_and_reused(tmp_path, monkeypatch):
    ref = make_tiny(tmp_path, WNIDS)
    calls = []
    real = images.decode_rgb
    monkeypatch.setattr(images, "decode_rgb", lambda b: calls.append(1) or real(b))
    check_tiny(datasets.load_dataset("tiny_imagenet", data_dir=tmp_path), ref)
    assert len(calls) == len(ref["train_labels"]) + len(ref["test_labels"])
    cache = tmp_path / "satm_cache" / "tiny_imagenet.npz"
    stamp = cache.stat().st_mtime_ns

    def boom(b):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(images, "decode_rgb", boom)
    check_tiny(datasets.load_dataset("tiny_imagenet", data_dir=tmp_path), ref)
    assert cache.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.parent.iterdir()) == ["tiny_imagenet.npz"]  # no temp
    # A changed source (new mtime of the zip) invalidates the cache.
    st = ref["archive"].stat()
    os.utime(ref["archive"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(datasets.DatasetError, match="decoded again"):
        datasets.load_dataset("tiny_imagenet", data_dir=tmp_path)


def test_tiny_imagenet_corrupt_cache_is_rebuilt(tmp_path):
    ref = make_tiny(tmp_path, WNIDS)
    datasets.load_dataset("tiny_imagenet", data_dir=tmp_path)
    cache = tmp_path / "satm_cache" / "tiny_imagenet.npz"
    cache.write_bytes(cache.read_bytes()[:300])
    with pytest.warns(UserWarning, match="corrupt dataset cache"):
        check_tiny(datasets.load_dataset("tiny_imagenet", data_dir=tmp_path), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: a clean hit now
        check_tiny(datasets.load_dataset("tiny_imagenet", data_dir=tmp_path), ref)


def test_tiny_imagenet_unwritable_cache_is_skipped(tmp_path):
    ref = make_tiny(tmp_path, WNIDS)
    (tmp_path / "satm_cache").write_text("a file where the cache folder would go")
    with pytest.warns(UserWarning, match="not caching"):
        check_tiny(datasets.load_dataset("tiny_imagenet", data_dir=tmp_path), ref)


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_dataset("tiny_imagenet", data_dir=tmp_path)
    msg = str(e.value)
    assert loaders.TINY_IMAGENET_URL in msg and str(tmp_path / "tiny-imagenet-200.zip") in msg
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(datasets.DatasetError, match="tiny-imagenet-200.zip is corrupt"):
        datasets.load_dataset("tiny_imagenet", data_dir=tmp_path)
    (tmp_path / "tiny-imagenet-200.zip").unlink()
    ref = make_tiny(tmp_path, WNIDS)
    ref["archive"].unlink()
    bad = ref["folder"] / "val" / "images" / "val_4.JPEG"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(datasets.DatasetError, match="val_4.JPEG is corrupt"):
        datasets.load_dataset("tiny_imagenet", data_dir=tmp_path)
    import shutil

    shutil.rmtree(ref["folder"] / "train" / WNIDS[2])
    with pytest.raises(datasets.DatasetError, match=f"train/{WNIDS[2]}/images is missing"):
        datasets.load_dataset("tiny_imagenet", data_dir=tmp_path)


def test_tiny_imagenet_tfds_builder_without_tensorflow(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from satm_jax.datasets import tfds_tiny_imagenet

    wnids = [f"n{i:08d}" for i in range(200)]
    ref = make_tiny(tmp_path / "manual", wnids, n_train=1, n_val=5)
    import shutil

    shutil.rmtree(ref["folder"])  # prepare from the zip
    out = tmp_path / "tfds"
    builder = tfds_tiny_imagenet.TinyImagenet(data_dir=str(out), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual"))
    )
    src = tfds.data_source("tiny_imagenet", split="validation", data_dir=str(out))
    assert len(src) == 5
    ex = src[0]
    assert ex["image"].shape == (64, 64, 3) and ex["file_name"].startswith(b"val_")
    ds = datasets.load_dataset("tiny_imagenet", data_dir=out)
    assert ds.num_classes == 200 and ds.class_names[7] == "name of n00000007"
    # Same (image, label) pairs as the zip, in TFDS's shuffled order.
    for split, key in (("train", "train"), ("test", "test")):
        got = {
            x.tobytes(): int(y)
            for x, y in zip(getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels"))
        }
        want = {x.tobytes(): int(y) for x, y in zip(ref[f"{key}_images"], ref[f"{key}_labels"])}
        assert got == want, split


def test_tiny_imagenet_builder_reports_missing_manual_file(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from satm_jax.datasets import tfds_tiny_imagenet

    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "README").write_text("not the zip")
    builder = tfds_tiny_imagenet.TinyImagenet(data_dir=str(tmp_path / "o"))
    assert builder.info.file_format.value == "array_record"  # the default here
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
        )


# --------------------------------------------------------------------------------------------
# ImageNet subsets
# --------------------------------------------------------------------------------------------


def make_imagenet_tree(root: Path, wnids, sizes) -> dict:
    rng = np.random.default_rng(9)
    files = {"train": [], "val": []}
    for split in ("train", "val"):
        for label, w in enumerate(wnids):
            (root / split / w).mkdir(parents=True)
            for k, size in enumerate(sizes if split == "train" else sizes[:1]):
                path = root / split / w / f"{w}_{k}.JPEG"
                path.write_bytes(jpeg_bytes(random_image(rng, size), quality=100))
                files[split].append((path, label))
    return files


def test_imagenette_tree_geometry_and_cache(tmp_path, monkeypatch):
    wnids, names = loaders.IMAGENET_SUBSETS["imagenette"]
    root = tmp_path / "imagenet"  # data_dir/imagenet/train/... is accepted
    files = make_imagenet_tree(root, wnids, [(200, 150), (96, 140)])
    # A deterministic geometry probe: 256x192, value = column index (a horizontal ramp).
    ramp_w = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (192, 1, 3))
    Image.fromarray(ramp_w).save(root / "train" / wnids[3] / "zz_ramp.png")
    # 100x300 with value = 0.8 * row (a vertical ramp).
    rows = np.round(0.8 * np.arange(300)).astype(np.uint8)
    ramp_h = np.tile(rows[:, None, None], (1, 100, 3))
    Image.fromarray(ramp_h).save(root / "val" / wnids[9] / "zz_ramp.png")
    ds = datasets.load_dataset("imagenette", data_dir=tmp_path)
    assert ds.image_shape == (128, 128, 3) and ds.class_names[0] == "tench"
    np.testing.assert_array_equal(np.bincount(ds.train_labels), np.r_[2, 2, 2, 3, [2] * 6])
    np.testing.assert_array_equal(ds.test_labels, np.r_[np.arange(10), 9])
    # Resize(128): 256x192 -> 170x128; CenterCrop(128): columns 21..148 of the resized image.
    probe = ds.train_images[3 * 2 + 2].astype(float)
    scale = 256 / 170
    expected_cols = (np.arange(128) + 21 + 0.5) * scale - 0.5
    assert np.abs(probe[64, :, 0] - expected_cols).max() < 1.5
    assert np.ptp(probe[:, 64, 0]) == 0  # constant down a column
    # 100x300 -> 128x384; crop rows 128..255.
    probe = ds.test_images[-1].astype(float)
    expected_rows = 0.8 * ((np.arange(128) + 128 + 0.5) * (300 / 384) - 0.5)
    assert np.abs(probe[:, 50, 1] - expected_rows).max() < 1.5
    # A JPEG, pixel for pixel against PIL's decoding resized and cropped the same way.
    path, _ = files["train"][1]  # 96x140 (portrait)
    img = Image.open(path).convert("RGB").resize((128, int(128 * 140 / 96)), Image.BILINEAR)
    top = int(round((img.size[1] - 128) / 2))
    want = np.asarray(img.crop((0, top, 128, top + 128)))
    np.testing.assert_array_equal(ds.train_images[1], want)
    # Cached: a second load decodes nothing.
    assert (tmp_path / "satm_cache" / "imagenette.npz").is_file()
    monkeypatch.setattr(images, "decode_rgb", lambda b: 1 / 0)
    again = datasets.load_dataset("imagenette", data_dir=tmp_path)
    np.testing.assert_array_equal(again.train_images, ds.train_images)


def test_imagewoof_missing_class_folder(tmp_path):
    wnids, _ = loaders.IMAGENET_SUBSETS["imagewoof"]
    assert wnids[0] == "n02096294" and wnids[-1] == "n02105641"
    make_imagenet_tree(tmp_path, wnids[:7], [(130, 129)])
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_dataset("imagewoof", data_dir=tmp_path)
    msg = str(e.value)
    assert f"missing class folder {tmp_path / 'train' / wnids[7]}" in msg and "dingo" in msg
    with pytest.raises(datasets.DatasetError, match="no ImageNet train folder"):
        datasets.load_dataset("imagewoof", data_dir=tmp_path / "empty")

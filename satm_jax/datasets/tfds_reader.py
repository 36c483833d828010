"""Prepared TFDS datasets read without TensorFlow.

``tfds_prepared`` finds a TFDS dataset prepared in a ``data_dir`` (its newest version and file
format); ``read_tfds_split``/``read_tfds`` read one prepared as ``array_record`` through
``tfds.data_source``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from satm_jax.datasets.errors import DatasetError

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

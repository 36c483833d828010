"""Datasets by name, and the preprocessing trajectory matching applies to them.

``load_dataset(name, data_dir=...)`` returns a :class:`Dataset` of uint8 ``(N, H, W, C)`` images
and integer labels, read from the dataset's official distribution. Nothing is downloaded: a
missing or corrupt file stops with a :class:`DatasetError` that names the expected file, where
to get it and where to put it.

``digits`` is scikit-learn's 8x8 handwritten digits, which ships inside the scikit-learn wheel:
it is the embedded default that needs no download.

Preprocessing (``Preprocessing``/``fit_preprocessing``) follows MTT: pixels to [0, 1], then
either ZCA whitening (no mean/std normalisation, ``satm_jax.zca``) or per-channel
standardisation with the training set's mean and std.

Example:
  >>> from satm_jax import data
  >>> ds = data.load_dataset("digits")
  >>> ds.train_images.shape[1:], ds.num_classes
  ((8, 8, 1), 10)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from satm_jax import zca as zca_lib


class DatasetError(Exception):
    """Missing, unreadable or corrupt dataset files, or a bad dataset request."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image classification dataset held in memory.

    Attributes:
      name: registry name.
      train_images: uint8 ``(N, H, W, C)``.
      train_labels: int ``(N,)`` in ``[0, num_classes)``.
      test_images: uint8 ``(M, H, W, C)``.
      test_labels: int ``(M,)``.
      num_classes: number of classes.
      class_names: one name per class.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> np.ndarray:
        """Training images per class."""
        return np.bincount(self.train_labels, minlength=self.num_classes)

    def validate(self) -> Dataset:
        """Checks shapes, dtypes and label ranges; returns ``self``.

        Raises:
          DatasetError: on any inconsistency.
        """
        for split in ("train", "test"):
            x = getattr(self, f"{split}_images")
            y = getattr(self, f"{split}_labels")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise DatasetError(
                    f"{self.name}: {split} images must be uint8 (N, H, W, C), "
                    f"got {x.dtype} {x.shape}"
                )
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise DatasetError(
                    f"{self.name}: {split} has {x.shape[0]} images but labels of shape {y.shape}"
                )
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise DatasetError(
                    f"{self.name}: {split} labels outside [0, {self.num_classes}): "
                    f"min {y.min()}, max {y.max()}"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DatasetError(
                f"{self.name}: train images {self.train_images.shape[1:]} and test images "
                f"{self.test_images.shape[1:]} differ in shape"
            )
        if len(self.class_names) != self.num_classes:
            raise DatasetError(f"{self.name}: {len(self.class_names)} class names")
        return self


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

Loader = Callable[..., Dataset]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator adding ``loader(data_dir=None) -> Dataset`` under ``name``."""

    def deco(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return deco


def check_dataset_name(name: str) -> None:
    """Raises ``DatasetError`` for a name that is not registered."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")


def load_dataset(name: str, *, data_dir: str | None = None) -> Dataset:
    """Loads the dataset registered as ``name`` from ``data_dir``.

    Raises:
      DatasetError: unknown name, or missing/corrupt files (the message says which file is
        expected, where to get it and where to put it).
    """
    check_dataset_name(name)
    return DATASETS[name](data_dir=data_dir).validate()


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
# Preprocessing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 images become network inputs.

    Attributes:
      zca: ZCA whitening (kornia's, eps ``zca_eps``) of [0, 1] pixels; otherwise per-channel
        standardisation with the training set's mean and std.
      zca_eps: the eigenvalue regulariser (0.1 in MTT).
    """

    zca: bool = False
    zca_eps: float = 0.1

    def identity(self) -> dict[str, Any]:
        return {"zca": self.zca, "zca_eps": self.zca_eps if self.zca else None}


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """A fitted preprocessing: ``forward`` for networks, ``inverse`` for viewing."""

    config: Preprocessing
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    zca: zca_lib.ZCA | None = None

    def forward(self, images_uint8: np.ndarray) -> np.ndarray:
        x = images_uint8.astype(np.float32) / 255.0
        if self.zca is not None:
            return zca_lib.apply_zca(self.zca, x)
        return (x - self.mean) / self.std

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Back to [0, 1] pixels (clipped), for image grids."""
        x = np.asarray(x, np.float32)
        if self.zca is not None:
            x = zca_lib.invert_zca(self.zca, x)
        else:
            x = x * self.std + self.mean
        return np.clip(x, 0.0, 1.0)


def fit_preprocessing(train_images: np.ndarray, config: Preprocessing) -> Preprocessor:
    """Fits the preprocessing on uint8 training images."""
    x = train_images.astype(np.float32) / 255.0
    if config.zca:
        return Preprocessor(config, zca=zca_lib.fit_zca(x, eps=config.zca_eps))
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
    std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    return Preprocessor(config, mean=mean.astype(np.float32), std=std)


# --------------------------------------------------------------------------------------------
# Sampling real images
# --------------------------------------------------------------------------------------------


def check_ipc(labels: np.ndarray, num_classes: int, ipc: int) -> None:
    """Raises ``DatasetError`` unless ``1 <= ipc <= `` the smallest class's training count."""
    counts = np.bincount(labels, minlength=num_classes)
    if ipc < 1:
        raise DatasetError(f"images per class must be at least 1, got ipc={ipc}")
    if ipc > counts.min():
        raise DatasetError(
            f"ipc={ipc} exceeds the smallest class's {int(counts.min())} training images "
            f"(class {int(counts.argmin())}); choose ipc <= {int(counts.min())}"
        )


def sample_per_class(
    rng: np.random.Generator, labels: np.ndarray, num_classes: int, ipc: int
) -> np.ndarray:
    """Indices of ``ipc`` distinct random images of each class, class-sorted."""
    check_ipc(labels, num_classes, ipc)
    out = [rng.choice(np.flatnonzero(labels == c), ipc, replace=False) for c in range(num_classes)]
    return np.concatenate(out)


def class_sorted_labels(num_classes: int, ipc: int) -> np.ndarray:
    """``[0]*ipc + [1]*ipc + ...``: the hard labels of a synthetic set."""
    return np.repeat(np.arange(num_classes, dtype=np.int32), ipc)

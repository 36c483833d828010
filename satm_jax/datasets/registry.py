"""The dataset registry: :class:`Dataset`, ``register_dataset`` and ``load_dataset``.

``load_dataset(name, data_dir=...)`` returns a :class:`Dataset` of uint8 ``(N, H, W, C)``
images and integer labels, read by the loader registered under ``name``
(``satm_jax.datasets.loaders`` registers the built-in ones when the package is imported).

Example:
  >>> from satm_jax import datasets
  >>> ds = datasets.load_dataset("digits")
  >>> ds.train_images.shape[1:], ds.num_classes
  ((8, 8, 1), 10)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from satm_jax.datasets.errors import DatasetError


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

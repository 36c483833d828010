"""Per-class sampling of real images, and the labels of a class-sorted synthetic set."""

from __future__ import annotations

import numpy as np

from satm_jax.datasets.errors import DatasetError


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

"""The preprocessing trajectory matching applies to images.

``Preprocessing``/``fit_preprocessing`` follow MTT: pixels to [0, 1], then either ZCA
whitening (no mean/std normalisation, ``satm_jax.zca``) or per-channel standardisation with
the training set's mean and std. The fitted :class:`Preprocessor` maps uint8 images to
network inputs (``forward``) and back to pixels (``inverse``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from satm_jax import zca as zca_lib


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

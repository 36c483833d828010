"""ZCA whitening as the reference code computes it (kornia ``ZCAWhitening`` in MTT).

Inputs are images in ``[0, 1]`` with no mean/std normalisation, flattened per image. With
``m`` the mean over samples and ``S = (X - m)^T (X - m) / (n - 1)`` (unbiased covariance),
``S = U diag(s) U^T``, the transform is

    T = U diag((s + eps)^-1/2) U^T,   zca(x) = (x - m) T,   eps = 0.1,

and its inverse, used only to look at images, is ``x U diag((s + eps)^1/2) U^T + m``.

ZCA does not depend on the order in which pixels are flattened (``T`` is basis-independent),
so flattening NHWC here gives the same whitened images as the reference's NCHW.

The covariance is accumulated in float64 over chunks of images and decomposed with a symmetric
eigensolver (LAPACK ``syevd`` via ``np.linalg.eigh``). At its peak a 12,288-dimensional Tiny
ImageNet fit holds about five ``12288^2`` float64 matrices (the covariance, the solver's copy of
it, its workspace of two, the eigenvectors: about 5.6 GiB) on top of the images. Measured with
``python -m experiments.zca_memory`` (20,000 random 64x64x3 images, 2 CPU cores): peak RSS
6.9 GiB, about 10 minutes, within a 24 GiB machine.

Example:
  >>> import numpy as np
  >>> from satm_jax import zca
  >>> x = np.random.default_rng(0).random((100, 4, 4, 1)).astype(np.float32)
  >>> w = zca.fit_zca(x)
  >>> y = zca.apply_zca(w, x)
  >>> bool(np.allclose(zca.invert_zca(w, y), x, atol=1e-4))
  True
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ZCA(NamedTuple):
    """A fitted ZCA transform for images of shape ``image_shape``.

    Attributes:
      mean: per-coordinate mean, ``(D,)`` float32.
      transform: ``T``, ``(D, D)`` float32.
      inverse: ``T^-1``, ``(D, D)`` float32.
      image_shape: ``(H, W, C)``.
      eps: the regulariser added to the eigenvalues.
    """

    mean: np.ndarray
    transform: np.ndarray
    inverse: np.ndarray
    image_shape: tuple[int, ...]
    eps: float


def fit_zca(images: np.ndarray, eps: float = 0.1, chunk: int = 2048) -> ZCA:
    """Fits ZCA on ``images`` (``(N, H, W, C)`` floats in [0, 1]).

    Raises:
      ValueError: fewer than two images, or non-finite pixels.
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError("ZCA needs at least two images to estimate a covariance")
    flat = images.reshape(n, -1)
    d = flat.shape[1]
    mean = np.zeros(d, np.float64)
    for i in range(0, n, chunk):
        mean += flat[i : i + chunk].astype(np.float64).sum(0)
    mean /= n
    if not np.all(np.isfinite(mean)):
        raise ValueError("ZCA input contains non-finite pixels")
    cov = np.zeros((d, d), np.float64)
    for i in range(0, n, chunk):
        xc = flat[i : i + chunk].astype(np.float64) - mean
        cov += xc.T @ xc
    cov /= n - 1
    evals, evecs = np.linalg.eigh(cov)
    del cov
    evals = np.clip(evals, 0.0, None)  # round-off can make tiny eigenvalues negative
    transform = (evecs * (evals + eps) ** -0.5) @ evecs.T
    inverse = (evecs * (evals + eps) ** 0.5) @ evecs.T
    return ZCA(
        mean=mean.astype(np.float32),
        transform=transform.astype(np.float32),
        inverse=inverse.astype(np.float32),
        image_shape=tuple(images.shape[1:]),
        eps=float(eps),
    )


def apply_zca(zca: ZCA, images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Whitens ``images`` ``(N, H, W, C)``; returns float32 of the same shape."""
    if tuple(images.shape[1:]) != tuple(zca.image_shape):
        raise ValueError(f"ZCA was fitted on {zca.image_shape} images, got {images.shape[1:]}")
    n = images.shape[0]
    flat = images.reshape(n, -1)
    out = np.empty(flat.shape, np.float32)
    for i in range(0, n, chunk):
        out[i : i + chunk] = (flat[i : i + chunk].astype(np.float32) - zca.mean) @ zca.transform
    return out.reshape(images.shape)


def invert_zca(zca: ZCA, images: np.ndarray) -> np.ndarray:
    """Undoes ``apply_zca`` (for viewing synthetic images)."""
    n = images.shape[0]
    flat = np.asarray(images, np.float32).reshape(n, -1)
    return (flat @ zca.inverse + zca.mean).reshape(images.shape)

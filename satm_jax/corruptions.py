"""Image corruptions for robustness evaluation, and loaders for the official corrupted sets.

The corruptions follow the families of MNIST-C (Mu and Gilmer, "MNIST-C: A Robustness
Benchmark for Computer Vision", 2019) and CIFAR-10-C (Hendrycks and Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019):
noise, blur, weather-like and digital corruptions, affine transforms and drawn lines. They are
written from scratch in ``jax.numpy``; the parameter values of the five severities are this
project's own choice (listed in :data:`SEVERITY_PARAMS`), so the outputs are *not* the images
of the published benchmarks. To evaluate on the published benchmarks, read their files with
:func:`load_cifar_c` and :func:`load_mnist_c`.

Conventions shared by every corruption ``f(images, severity, key)``:

* ``images``: float array ``(N, H, W, C)`` with values in ``[0, 1]`` (pixel space, before any
  normalisation), any ``H``, ``W`` and ``C``;
* ``severity``: an integer in ``0..5``; ``0`` is the identity (``images`` itself is returned,
  untouched), ``1..5`` (:data:`SEVERITIES`) go from mild to strong;
* ``key``: a ``jax.random`` key, or an integer seed ``s`` standing for
  ``jax.random.PRNGKey(s)``. The output is a pure function of ``(images, severity, key)``.
  Random draws do not depend on the severity: with the same key, severity only changes the
  strength (the same noise scaled, the same rotation direction, the first ``severity`` lines of
  the same set). Corruptions in :data:`KEY_INDEPENDENT` ignore the key;
* the result is a ``jax.Array`` of the same shape and dtype, clipped to ``[0, 1]``. Work is done
  in float32 (float64 for float64 inputs) and cast back; as everywhere in JAX, a NumPy float64
  input becomes float32 unless x64 is enabled. With a static ``severity`` the functions are
  traceable (``jax.jit``, ``jax.vmap``).

Geometric transforms resample bilinearly about the image centre with zero fill; blurs pad by
repeating the edge pixels.

Example:
  >>> import jax.numpy as jnp
  >>> from satm_jax import corruptions
  >>> x = jnp.full((2, 28, 28, 1), 0.5, jnp.float32)
  >>> y = corruptions.corrupt("gaussian_noise", x, 3, key=0)
  >>> y.shape, y.dtype
  ((2, 28, 28, 1), dtype('float32'))
  >>> bool(((y >= 0) & (y <= 1)).all())
  True
  >>> bool((corruptions.corrupt("gaussian_noise", x, 3, key=0) == y).all())
  True
  >>> corruptions.corrupt("rotate", x, 0, key=0) is x
  True
  >>> sorted(corruptions.CORRUPTIONS)[:3]
  ['brightness', 'contrast', 'defocus_blur']
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
KeyLike = Array | int
Corruption = Callable[..., Array]

SEVERITIES = (1, 2, 3, 4, 5)

CIFAR10_C_URL = "https://zenodo.org/records/2535967"
CIFAR100_C_URL = "https://zenodo.org/records/3555552"
MNIST_C_URL = "https://github.com/google-research/mnist-c"

# Rows per severity in the official CIFAR-10-C / CIFAR-100-C files (5 x 10,000 = 50,000).
CIFAR_C_BLOCK = 10_000


class CorruptionDataError(Exception):
    """An official corrupted data set is missing, unreadable or not in the expected format."""


# --------------------------------------------------------------------------------------------
# Severity parameters (this project's own choice)
# --------------------------------------------------------------------------------------------

_GAUSSIAN_SIGMA = (0.04, 0.08, 0.12, 0.18, 0.26)
_SHOT_RATE = (60.0, 25.0, 12.0, 6.0, 3.0)
_IMPULSE_AMOUNT = (0.02, 0.05, 0.09, 0.15, 0.24)
_SPECKLE_SIGMA = (0.1, 0.2, 0.3, 0.45, 0.6)
_BLUR_SIGMA = (0.5, 0.75, 1.0, 1.5, 2.0)
_DEFOCUS_RADIUS = (1.0, 1.5, 2.0, 2.5, 3.0)
_MOTION_LENGTH = (3, 5, 7, 9, 11)
_BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)
_CONTRAST_FACTOR = (0.7, 0.55, 0.4, 0.28, 0.15)
_FOG_DENSITY = (0.25, 0.4, 0.55, 0.7, 0.85)
_PIXELATE_FACTOR = (0.85, 0.7, 0.55, 0.45, 0.35)
_ROTATE_DEGREES = (8.0, 16.0, 24.0, 32.0, 40.0)
_SHEAR_FACTOR = (0.1, 0.2, 0.3, 0.4, 0.5)
_SCALE_FACTOR = (0.9, 0.8, 0.7, 0.6, 0.5)
_TRANSLATE_FRACTION = (0.05, 0.1, 0.15, 0.2, 0.25)
_ZIGZAG_LINES = (1, 2, 3, 4, 5)

SEVERITY_PARAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "gaussian_noise": ("standard deviation of additive N(0, sigma^2) noise", _GAUSSIAN_SIGMA),
    "shot_noise": ("Poisson rate: x -> Poisson(rate * x) / rate (lower is noisier)", _SHOT_RATE),
    "impulse_noise": ("fraction of values set to 0 or 1 (salt and pepper)", _IMPULSE_AMOUNT),
    "speckle_noise": (
        "standard deviation of multiplicative noise x * (1 + sigma z)",
        _SPECKLE_SIGMA,
    ),
    "gaussian_blur": ("Gaussian kernel standard deviation, pixels", _BLUR_SIGMA),
    "defocus_blur": ("disk kernel radius, pixels", _DEFOCUS_RADIUS),
    "motion_blur": ("line kernel length, pixels (random direction)", _MOTION_LENGTH),
    "brightness": ("value added to every pixel", _BRIGHTNESS_SHIFT),
    "contrast": (
        "factor on the deviation from the image mean (lower is stronger)",
        _CONTRAST_FACTOR,
    ),
    "fog": ("peak density of a fractal white fog layer", _FOG_DENSITY),
    "pixelate": (
        "resolution factor of the down-then-up resampling (lower is stronger)",
        _PIXELATE_FACTOR,
    ),
    "rotate": ("rotation angle, degrees (random sign)", _ROTATE_DEGREES),
    "shear": ("shear factor (random sign and axis)", _SHEAR_FACTOR),
    "scale": ("zoom factor f: shrink by f or enlarge by 1/f (random choice)", _SCALE_FACTOR),
    "translate": ("shift as a fraction of the image size (random direction)", _TRANSLATE_FRACTION),
    "zigzag": ("number of white zigzag lines drawn", _ZIGZAG_LINES),
}
"""For each corruption: what its severity parameter is, and its values for severities 1..5."""

KEY_INDEPENDENT = frozenset({"gaussian_blur", "defocus_blur", "brightness", "contrast", "pixelate"})
"""Corruptions whose output does not depend on the key."""


# --------------------------------------------------------------------------------------------
# Argument checks and the shared wrapper
# --------------------------------------------------------------------------------------------


def _check_severity(severity: int, allowed: Sequence[int] = (0, *SEVERITIES)) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise ValueError(
            f"severity must be an integer in {min(allowed)}..{max(allowed)}, "
            f"got {severity!r} of type {type(severity).__name__}"
        )
    s = int(severity)
    if s not in allowed:
        raise ValueError(
            f"severity must be an integer in {min(allowed)}..{max(allowed)}"
            + (" (0 is the identity)" if 0 in allowed else "")
            + f", got {s}"
        )
    return s


def _as_key(key: KeyLike) -> Array:
    if isinstance(key, bool):
        raise TypeError("key must be a jax.random key or an integer seed, got a bool")
    if isinstance(key, int | np.integer):
        return jax.random.PRNGKey(int(key))
    return key


def _check_images(images) -> Array:
    x = jnp.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"images must be a float array with values in [0, 1], got dtype {x.dtype} "
            "(for uint8 images, divide by 255 first)"
        )
    return x


def _apply(impl: Callable[[Array, int, Array], Array], images, severity: int, key: KeyLike):
    """Checks the arguments; returns ``images`` itself at severity 0, else the corruption."""
    s = _check_severity(severity)
    x = _check_images(images)
    k = _as_key(key)
    if s == 0:
        return images
    dtype = x.dtype
    work = jnp.float64 if dtype == jnp.float64 else jnp.float32
    out = impl(x.astype(work), s, k)
    return jnp.clip(out, 0.0, 1.0).astype(dtype)


def _f(value: float, dtype) -> Array:
    """A Python number as a scalar of ``dtype`` (strict dtype promotion)."""
    return jnp.asarray(value, dtype)


# --------------------------------------------------------------------------------------------
# Helpers: random draws, filtering, resampling, fractal noise, line drawing
# --------------------------------------------------------------------------------------------
#
# Every random draw goes through ``jax.random.uniform`` (normals by the inverse CDF, as
# ``jax.random.normal`` does): eagerly, JAX compiles one sampler per shape and dtype, shared by
# all corruptions and severities. Kernel and line counts are padded to their largest size for
# the same reason: the severity changes values, not shapes.


def _uniform(key: Array, shape: tuple[int, ...], dtype, lo: float = 0.0, hi: float = 1.0):
    return jax.random.uniform(key, shape, dtype, lo, hi)


def _normal(key: Array, shape: tuple[int, ...], dtype) -> Array:
    lo = float(np.nextafter(np.asarray(-1.0, dtype), np.asarray(0.0, dtype)))
    return _f(math.sqrt(2.0), dtype) * lax.erf_inv(_uniform(key, shape, dtype, lo, 1.0))


@jax.jit
def _filter(x: Array, kernels: Array) -> Array:
    """Correlates each image with its own odd ``(K, K)`` kernel, edge padding.

    ``kernels`` is ``(K, K)`` (shared) or ``(N, K, K)`` (one per image); every channel of an
    image uses the image's kernel.
    """
    n, h, w, c = x.shape
    kernels = jnp.broadcast_to(kernels.astype(x.dtype), (n, *kernels.shape[-2:]))
    k = kernels.shape[-1]
    r = k // 2
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    # Images become channel groups of a single batch element: (1, H', W', N*C).
    lhs = jnp.transpose(xp, (1, 2, 0, 3)).reshape(1, h + 2 * r, w + 2 * r, n * c)
    rhs = jnp.repeat(jnp.transpose(kernels, (1, 2, 0)), c, axis=-1)[:, :, None, :]
    out = lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=n * c,
        precision=lax.Precision.HIGHEST,
    )
    return jnp.transpose(out.reshape(h, w, n, c), (2, 0, 1, 3))


def _centred_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads an odd square ``kernel`` to ``(size, size)``, normalised to sum 1."""
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel / kernel.sum(), pad)


def _sample_bilinear(x: Array, rows: Array, cols: Array) -> Array:
    """``x`` at fractional pixel coordinates ``rows, cols`` (each ``(N, H, W)``), zero outside."""
    n, h, w, _ = x.shape
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    wr, wc = rows - r0, cols - c0
    batch = jnp.arange(n)[:, None, None]
    one = _f(1.0, x.dtype)

    def tap(r, c):
        inside = (r >= 0) & (r <= h - 1) & (c >= 0) & (c <= w - 1)
        ri = jnp.clip(r, 0, h - 1).astype(jnp.int32)
        ci = jnp.clip(c, 0, w - 1).astype(jnp.int32)
        return x[batch, ri, ci] * inside[..., None].astype(x.dtype)

    return (
        tap(r0, c0) * ((one - wr) * (one - wc))[..., None]
        + tap(r0, c0 + one) * ((one - wr) * wc)[..., None]
        + tap(r0 + one, c0) * (wr * (one - wc))[..., None]
        + tap(r0 + one, c0 + one) * (wr * wc)[..., None]
    )


@jax.jit
def _affine(x: Array, inverse: Array, offset: Array | None = None) -> Array:
    """Resamples each image: output pixel ``p`` reads ``inverse @ (p - centre) + centre + offset``.

    ``inverse`` is ``(N, 2, 2)`` and ``offset`` ``(N, 2)``, both in (row, column) pixel units.
    """
    n, h, w, _ = x.shape
    centre = jnp.asarray([(h - 1) / 2.0, (w - 1) / 2.0], x.dtype)
    rr, cc = jnp.meshgrid(jnp.arange(h, dtype=x.dtype), jnp.arange(w, dtype=x.dtype), indexing="ij")
    p = jnp.stack([rr, cc], axis=-1) - centre[None, None, :]  # (H, W, 2)
    src = jnp.einsum("nij,hwj->nhwi", inverse.astype(x.dtype), p, precision=lax.Precision.HIGHEST)
    src = src + centre[None, None, None, :]
    if offset is not None:
        src = src + offset.astype(x.dtype)[:, None, None, :]
    return _sample_bilinear(x, src[..., 0], src[..., 1])


def _random_sign(key: Array, n: int, dtype) -> Array:
    return jnp.where(_uniform(key, (n,), dtype) < 0.5, _f(1.0, dtype), _f(-1.0, dtype))


def _resample_matrix(size: int, factor: float) -> np.ndarray:
    """``(size, size)``: box-average down to ``round(size * factor)`` cells, nearest back up."""
    small = max(1, round(size * factor))
    edges = np.linspace(0.0, size, small + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(size, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)  # (small, size)
    down = overlap / overlap.sum(axis=1, keepdims=True)
    up = np.zeros((size, small))
    up[
        np.arange(size), np.minimum(((np.arange(size) + 0.5) * small / size).astype(int), small - 1)
    ] = 1
    return up @ down


_FOG_GRID = 33  # the finest octave's grid; octave o has 2 ** (o + 1) + 1 points a side
_FOG_DECAY = 0.6  # amplitude ratio between successive octaves


def _octave_matrices(size: int) -> np.ndarray:
    """``(O, size, G)``: smoothstep interpolation from each octave's grid to ``size`` pixels."""
    grids = [g for g in (2 ** (o + 1) + 1 for o in range(5)) if g <= max(3, size)]
    mats = np.zeros((len(grids), size, _FOG_GRID))
    for o, g in enumerate(grids):
        t = np.arange(size) * (g - 1) / max(size - 1, 1)
        j = np.minimum(np.floor(t).astype(int), g - 2)
        u = t - j
        s = u * u * (3 - 2 * u)
        mats[o, np.arange(size), j] += 1 - s
        mats[o, np.arange(size), j + 1] += s
    return mats


def _fractal_noise(key: Array, n: int, h: int, w: int, dtype) -> Array:
    """Smooth multi-octave value noise ``(N, H, W)``, rescaled to ``[0, 1]`` per image."""
    mh, mw = _octave_matrices(h), _octave_matrices(w)
    octaves = min(len(mh), len(mw))
    amp = _FOG_DECAY ** np.arange(octaves)
    mh = jnp.asarray(mh[:octaves] * amp[:, None, None], dtype)
    mw = jnp.asarray(mw[:octaves], dtype)
    grid = _uniform(key, (n, octaves, _FOG_GRID, _FOG_GRID), dtype)
    hi = lax.Precision.HIGHEST
    acc = jnp.einsum(
        "nohk,owk->nhw", jnp.einsum("ohg,nogk->nohk", mh, grid, precision=hi), mw, precision=hi
    )
    lo = acc.min(axis=(1, 2), keepdims=True)
    top = acc.max(axis=(1, 2), keepdims=True)
    return (acc - lo) / jnp.maximum(top - lo, _f(1e-6, dtype))


def _segment_distance(p: Array, a: Array, b: Array) -> Array:
    """Distance from points ``p`` ``(H, W, 2)`` to segments ``a -> b`` ``(..., 2)``:
    ``(..., H, W)``."""
    a = a[..., None, None, :]
    b = b[..., None, None, :]
    p = p.reshape((1,) * (a.ndim - p.ndim) + p.shape)  # explicit leading axes
    ab = b - a
    t = jnp.sum((p - a) * ab, axis=-1) / jnp.maximum(jnp.sum(ab * ab, axis=-1), _f(1e-6, p.dtype))
    t = jnp.clip(t, 0.0, 1.0)
    d = p - (a + t[..., None] * ab)
    return jnp.sqrt(jnp.sum(d * d, axis=-1))


@jax.jit
def _poisson(key: Array, lam: Array) -> Array:
    """Poisson samples of rates ``lam`` (float, ``0 <= lam <= 80``) by inverse-CDF search."""
    dt = lam.dtype
    u = _uniform(key, lam.shape, dt)
    k_max = _f(float(math.ceil(float(np.max(_SHOT_RATE)) * 2 + 40)), dt)

    def cond(state):
        k, p, cdf = state
        return jnp.any((u > cdf) & (k < k_max))

    def body(state):
        k, p, cdf = state
        go = (u > cdf) & (k < k_max)
        k_next = k + _f(1.0, dt)
        p_next = p * lam / k_next
        return jnp.where(go, k_next, k), jnp.where(go, p_next, p), jnp.where(go, cdf + p_next, cdf)

    p0 = jnp.exp(-lam)
    k, _, _ = lax.while_loop(cond, body, (jnp.zeros_like(lam), p0, p0))
    return k


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def _gaussian_noise(x: Array, s: int, k: Array) -> Array:
    return x + _f(_GAUSSIAN_SIGMA[s - 1], x.dtype) * _normal(k, x.shape, x.dtype)


def gaussian_noise(images, severity: int, key: KeyLike) -> Array:
    """Additive Gaussian noise ``x + sigma z``, ``z ~ N(0, 1)`` per value.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; sigma = 0.04, 0.08, 0.12, 0.18, 0.26.
      key: ``jax.random`` key or integer seed.

    Returns:
      The corrupted images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_gaussian_noise, images, severity, key)


def _shot_noise(x: Array, s: int, k: Array) -> Array:
    rate = _f(_SHOT_RATE[s - 1], x.dtype)
    return _poisson(k, rate * jnp.clip(x, 0.0, 1.0)) / rate


def shot_noise(images, severity: int, key: KeyLike) -> Array:
    """Poisson (shot) noise ``Poisson(rate x) / rate`` per value.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; rate = 60, 25, 12, 6, 3 (photons at full intensity).
      key: ``jax.random`` key or integer seed.

    Returns:
      The corrupted images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_shot_noise, images, severity, key)


def _impulse_noise(x: Array, s: int, k: Array) -> Array:
    k_hit, k_salt = jax.random.split(k)
    hit = _uniform(k_hit, x.shape, x.dtype) < _f(_IMPULSE_AMOUNT[s - 1], x.dtype)
    salt = (_uniform(k_salt, x.shape, x.dtype) < 0.5).astype(x.dtype)
    return jnp.where(hit, salt, x)


def impulse_noise(images, severity: int, key: KeyLike) -> Array:
    """Salt-and-pepper noise: a fraction of the values becomes 0 or 1 (equally likely).

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; fraction = 0.02, 0.05, 0.09, 0.15, 0.24.
      key: ``jax.random`` key or integer seed.

    Returns:
      The corrupted images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_impulse_noise, images, severity, key)


def _speckle_noise(x: Array, s: int, k: Array) -> Array:
    return x + x * _f(_SPECKLE_SIGMA[s - 1], x.dtype) * _normal(k, x.shape, x.dtype)


def speckle_noise(images, severity: int, key: KeyLike) -> Array:
    """Multiplicative noise ``x (1 + sigma z)``, ``z ~ N(0, 1)`` per value.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; sigma = 0.1, 0.2, 0.3, 0.45, 0.6.
      key: ``jax.random`` key or integer seed.

    Returns:
      The corrupted images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_speckle_noise, images, severity, key)


# --------------------------------------------------------------------------------------------
# Blur
# --------------------------------------------------------------------------------------------


def _gaussian_blur(x: Array, s: int, k: Array) -> Array:
    sigma = _BLUR_SIGMA[s - 1]
    r_max = math.ceil(3 * max(_BLUR_SIGMA))
    r = max(1, math.ceil(3 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * sigma**2))
    kernel = _centred_kernel(np.outer(g, g), 2 * r_max + 1)
    return _filter(x, jnp.asarray(kernel, x.dtype))


def gaussian_blur(images, severity: int, key: KeyLike) -> Array:
    """Isotropic Gaussian blur (kernel radius ``ceil(3 sigma)``, edge padding).

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; sigma = 0.5, 0.75, 1.0, 1.5, 2.0 pixels.
      key: ignored (accepted for a uniform signature).

    Returns:
      The blurred images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_gaussian_blur, images, severity, key)


def _defocus_blur(x: Array, s: int, k: Array) -> Array:
    radius = _DEFOCUS_RADIUS[s - 1]
    r_max = math.ceil(max(_DEFOCUS_RADIUS))
    t = np.arange(-r_max, r_max + 1, dtype=np.float64)
    dist = np.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
    kernel = np.clip(radius + 0.5 - dist, 0.0, 1.0)  # anti-aliased disk
    return _filter(x, jnp.asarray(kernel / kernel.sum(), x.dtype))


def defocus_blur(images, severity: int, key: KeyLike) -> Array:
    """Defocus blur: mean over an anti-aliased disk (edge padding).

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; disk radius = 1, 1.5, 2, 2.5, 3 pixels.
      key: ignored (accepted for a uniform signature).

    Returns:
      The blurred images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_defocus_blur, images, severity, key)


def _motion_blur(x: Array, s: int, k: Array) -> Array:
    length = _MOTION_LENGTH[s - 1]
    r = max(_MOTION_LENGTH) // 2 + 1
    n, dt = x.shape[0], x.dtype
    angle = _uniform(k, (n,), dt, 0.0, math.pi)
    half = (length - 1) / 2
    t = jnp.asarray(np.linspace(-half, half, 4 * max(_MOTION_LENGTH) + 1), dt)
    pr = t[None, :] * jnp.sin(angle)[:, None]  # (N, T) points along the line
    pc = t[None, :] * jnp.cos(angle)[:, None]
    grid = jnp.arange(-r, r + 1, dtype=dt)
    one = _f(1.0, dt)
    grid = grid[None, None, :]
    wr = jnp.maximum(one - jnp.abs(pr[:, :, None] - grid), 0.0)  # (N, T, K): bilinear splat
    wc = jnp.maximum(one - jnp.abs(pc[:, :, None] - grid), 0.0)
    kernels = jnp.einsum("nti,ntj->nij", wr, wc, precision=lax.Precision.HIGHEST)
    kernels = kernels / kernels.sum(axis=(1, 2), keepdims=True)
    return _filter(x, kernels)


def motion_blur(images, severity: int, key: KeyLike) -> Array:
    """Motion blur: mean along a centred line segment of random direction (one per image).

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; line length = 3, 5, 7, 9, 11 pixels.
      key: ``jax.random`` key or integer seed (draws the direction, uniform in [0, 180) deg).

    Returns:
      The blurred images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_motion_blur, images, severity, key)


# --------------------------------------------------------------------------------------------
# Photometric, weather and digital
# --------------------------------------------------------------------------------------------


def _brightness(x: Array, s: int, k: Array) -> Array:
    return x + _f(_BRIGHTNESS_SHIFT[s - 1], x.dtype)


def brightness(images, severity: int, key: KeyLike) -> Array:
    """Brightness increase: ``x + shift`` (clipped).

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; shift = 0.1, 0.2, 0.3, 0.4, 0.5.
      key: ignored (accepted for a uniform signature).

    Returns:
      The brightened images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_brightness, images, severity, key)


def _contrast(x: Array, s: int, k: Array) -> Array:
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - m) * _f(_CONTRAST_FACTOR[s - 1], x.dtype) + m


def contrast(images, severity: int, key: KeyLike) -> Array:
    """Contrast reduction towards each image's mean: ``(x - m) c + m``.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; factor c = 0.7, 0.55, 0.4, 0.28, 0.15.
      key: ignored (accepted for a uniform signature).

    Returns:
      The corrupted images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_contrast, images, severity, key)


def _fog(x: Array, s: int, k: Array) -> Array:
    n, h, w, _ = x.shape
    d = _f(_FOG_DENSITY[s - 1], x.dtype) * _fractal_noise(k, n, h, w, x.dtype)
    return x + d[..., None] * (_f(1.0, x.dtype) - x)


def fog(images, severity: int, key: KeyLike) -> Array:
    """Fog: blend towards white through a smooth fractal density ``d`` in ``[0, 1]``.

    ``x + a d (1 - x)`` with peak density ``a``; ``d`` is multi-octave value noise (grids of
    3, 5, 9, 17 and 33 points, amplitude ratio 0.6), the same for every channel.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; peak density a = 0.25, 0.4, 0.55, 0.7, 0.85.
      key: ``jax.random`` key or integer seed (draws the fog pattern).

    Returns:
      The fogged images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_fog, images, severity, key)


def _pixelate(x: Array, s: int, k: Array) -> Array:
    _, h, w, _ = x.shape
    f = _PIXELATE_FACTOR[s - 1]
    mh = jnp.asarray(_resample_matrix(h, f), x.dtype)
    mw = jnp.asarray(_resample_matrix(w, f), x.dtype)
    hi = lax.Precision.HIGHEST
    y = jnp.einsum("ij,njwc->niwc", mh, x, precision=hi)
    return jnp.einsum("lk,nikc->nilc", mw, y, precision=hi)


def pixelate(images, severity: int, key: KeyLike) -> Array:
    """Pixelation: box-average down to a fraction of each side, nearest-neighbour back up.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; factor = 0.85, 0.7, 0.55, 0.45, 0.35 of each side.
      key: ignored (accepted for a uniform signature).

    Returns:
      The pixelated images, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_pixelate, images, severity, key)


def _zigzag(x: Array, s: int, k: Array) -> Array:
    u = _uniform(k, (x.shape[0], max(_ZIGZAG_LINES), 5), x.dtype)
    return _draw_zigzags(x, u, jnp.asarray(_ZIGZAG_LINES[s - 1], jnp.int32))


@jax.jit
def _draw_zigzags(x: Array, u: Array, n_drawn: Array) -> Array:
    """Draws the first ``n_drawn`` of the lines that ``u`` ``(N, L, 5)`` (uniform draws:
    centre row, centre column, angle, length, amplitude) describes."""
    n, h, w, _ = x.shape
    dt = x.dtype
    size = float(min(h, w))
    n_lines, n_seg = u.shape[1], 4
    lo = jnp.asarray([0.25 * (h - 1), 0.25 * (w - 1), 0.0, 0.5 * size, 0.06 * size], dt)
    hi = jnp.asarray([0.75 * (h - 1), 0.75 * (w - 1), 2 * math.pi, 0.9 * size, 0.14 * size], dt)
    u = lo[None, None, :] + u * (hi - lo)[None, None, :]
    mid, ang, length, amp = u[..., :2], u[..., 2:3], u[..., 3:4], u[..., 4:5]
    along = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
    across = jnp.concatenate([jnp.cos(ang), -jnp.sin(ang)], axis=-1)
    steps = jnp.asarray(np.linspace(-0.5, 0.5, n_seg + 1), dt)  # (V,)
    signs = jnp.asarray([(-1.0) ** i for i in range(n_seg + 1)], dt)
    verts = (
        mid[:, :, None, :]
        + steps[None, None, :, None] * (length * along)[:, :, None, :]
        + signs[None, None, :, None] * (amp * across)[:, :, None, :]
    )  # (N, L, V, 2)
    rr, cc = jnp.meshgrid(jnp.arange(h, dtype=dt), jnp.arange(w, dtype=dt), indexing="ij")
    p = jnp.stack([rr, cc], axis=-1)
    dist = _segment_distance(p, verts[:, :, :-1], verts[:, :, 1:]).min(axis=2)  # (N, L, H, W)
    drawn = jnp.arange(n_lines) < n_drawn  # the first n_drawn lines
    dist = jnp.where(drawn[None, :, None, None], dist, _f(1e6, dt)).min(axis=1)
    half_width = _f(0.5 * size / 28.0, dt)
    ink = jnp.clip(half_width + _f(1.0, dt) - dist, 0.0, 1.0)  # (N, H, W), anti-aliased
    return jnp.maximum(x, ink[..., None])


def zigzag(images, severity: int, key: KeyLike) -> Array:
    """White zigzag lines (four segments each, random position, direction and amplitude).

    Five lines are drawn from the key; severity ``s`` draws the first ``s`` of them. Lines are
    about ``min(H, W) / 28`` pixels wide, anti-aliased, and drawn with ``max(x, line)``.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; number of lines = 1, 2, 3, 4, 5.
      key: ``jax.random`` key or integer seed.

    Returns:
      The images with lines, same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_zigzag, images, severity, key)


# --------------------------------------------------------------------------------------------
# Geometric (bilinear, zero fill, about the image centre)
# --------------------------------------------------------------------------------------------


def _rotate(x: Array, s: int, k: Array) -> Array:
    deg = _f(math.radians(_ROTATE_DEGREES[s - 1]), x.dtype)
    theta = _random_sign(k, x.shape[0], x.dtype) * deg
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    inverse = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
    return _affine(x, inverse)


def rotate(images, severity: int, key: KeyLike) -> Array:
    """Rotation about the image centre by a fixed angle, direction random per image.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; angle = 8, 16, 24, 32, 40 degrees.
      key: ``jax.random`` key or integer seed (draws the direction).

    Returns:
      The rotated images (zero fill), same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_rotate, images, severity, key)


def _shear(x: Array, s: int, k: Array) -> Array:
    n, dt = x.shape[0], x.dtype
    k_sign, k_axis = jax.random.split(k)
    f = _random_sign(k_sign, n, dt) * _f(_SHEAR_FACTOR[s - 1], dt)
    horizontal = _uniform(k_axis, (n,), dt) < 0.5
    zero, one = jnp.zeros((n,), dt), jnp.ones((n,), dt)
    off_rc = jnp.where(horizontal, zero, f)  # row offset proportional to the column
    off_cr = jnp.where(horizontal, f, zero)  # column offset proportional to the row
    inverse = jnp.stack([jnp.stack([one, off_rc], -1), jnp.stack([off_cr, one], -1)], -2)
    return _affine(x, inverse)


def shear(images, severity: int, key: KeyLike) -> Array:
    """Shear about the image centre, sign and axis (rows or columns) random per image.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; shear factor = 0.1, 0.2, 0.3, 0.4, 0.5.
      key: ``jax.random`` key or integer seed (draws the sign and the axis).

    Returns:
      The sheared images (zero fill), same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_shear, images, severity, key)


def _scale(x: Array, s: int, k: Array) -> Array:
    n, dt = x.shape[0], x.dtype
    f = _SCALE_FACTOR[s - 1]
    zoom = jnp.where(_uniform(k, (n,), dt) < 0.5, _f(f, dt), _f(1.0 / f, dt))
    inverse = jnp.eye(2, dtype=dt)[None] / zoom[:, None, None]
    return _affine(x, inverse)


def scale(images, severity: int, key: KeyLike) -> Array:
    """Isotropic scaling about the image centre: shrink by ``f`` or enlarge by ``1 / f``.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; f = 0.9, 0.8, 0.7, 0.6, 0.5.
      key: ``jax.random`` key or integer seed (draws shrink or enlarge per image).

    Returns:
      The scaled images (zero fill), same shape and dtype, in ``[0, 1]``.
    """
    return _apply(_scale, images, severity, key)


def _translate(x: Array, s: int, k: Array) -> Array:
    n, h, w, _ = x.shape
    dt = x.dtype
    frac = _TRANSLATE_FRACTION[s - 1]
    ang = _uniform(k, (n,), dt, 0.0, 2 * math.pi)
    shift = jnp.stack([_f(frac * h, dt) * jnp.sin(ang), _f(frac * w, dt) * jnp.cos(ang)], -1)
    return _affine(x, jnp.broadcast_to(jnp.eye(2, dtype=dt), (n, 2, 2)), -shift)


def translate(images, severity: int, key: KeyLike) -> Array:
    """Translation by a fixed fraction of the image size in a random direction per image.

    Args:
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5; shift = 0.05, 0.1, 0.15, 0.2, 0.25 of (H, W).
      key: ``jax.random`` key or integer seed (draws the direction, uniform on the circle).

    Returns:
      The shifted images (zero fill, sub-pixel shifts resampled), same shape and dtype.
    """
    return _apply(_translate, images, severity, key)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "brightness": brightness,
    "contrast": contrast,
    "fog": fog,
    "pixelate": pixelate,
    "zigzag": zigzag,
    "rotate": rotate,
    "shear": shear,
    "scale": scale,
    "translate": translate,
}
"""Every corruption by name; each is ``f(images, severity, key) -> images``."""


def corrupt(name: str, images, severity: int, key: KeyLike) -> Array:
    """Applies the corruption ``name`` (a key of :data:`CORRUPTIONS`).

    Args:
      name: corruption name, e.g. ``"gaussian_noise"``.
      images: float ``(N, H, W, C)`` in ``[0, 1]``.
      severity: 0 (identity) to 5.
      key: ``jax.random`` key or integer seed.

    Returns:
      The corrupted images, same shape and dtype, in ``[0, 1]``.

    Raises:
      ValueError: unknown ``name`` (the message lists the known ones), ``severity`` not an
        integer in 0..5, or ``images`` not a float ``(N, H, W, C)`` array.
    """
    if name not in CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {name!r}; known corruptions: {', '.join(sorted(CORRUPTIONS))}"
        )
    _check_severity(severity)
    return CORRUPTIONS[name](images, severity, key)


# --------------------------------------------------------------------------------------------
# Loaders for the official corrupted sets
# --------------------------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"

_CIFAR_C_HELP = (
    "CIFAR-10-C and CIFAR-100-C ship one <corruption>.npy of shape (50000, 32, 32, 3) uint8 "
    "(severities 1..5 in consecutive blocks of 10000 images) and one labels.npy of 50000 "
    f"labels; download CIFAR-10-C from {CIFAR10_C_URL} or CIFAR-100-C from {CIFAR100_C_URL} "
    "and pass the extracted folder as root"
)
_MNIST_C_HELP = (
    "MNIST-C ships <corruption>/test_images.npy of shape (10000, 28, 28, 1) uint8 and "
    f"<corruption>/test_labels.npy of 10000 labels; download mnist_c.zip from {MNIST_C_URL} "
    "and pass the extracted mnist_c folder as root"
)


def cifar_c_rows(severity: int, n_total: int = 5 * CIFAR_C_BLOCK) -> slice:
    """The rows of severity ``severity`` in a CIFAR-C file of ``n_total`` rows.

    The five severities are stacked in equal consecutive blocks of ``n_total // 5`` rows:
    severity ``s`` is rows ``(s - 1) * block`` to ``s * block`` (exclusive). With the official
    50,000 rows, severity 1 is rows 0..9,999 and severity 5 is rows 40,000..49,999.

    Args:
      severity: 1 to 5.
      n_total: rows in the file, a positive multiple of 5.

    Returns:
      ``slice((severity - 1) * block, severity * block)``.
    """
    s = _check_severity(severity, SEVERITIES)
    if n_total <= 0 or n_total % len(SEVERITIES):
        raise ValueError(f"n_total must be a positive multiple of 5, got {n_total}")
    block = n_total // len(SEVERITIES)
    return slice((s - 1) * block, s * block)


def _check_name(corruption: str) -> None:
    if (
        not isinstance(corruption, str)
        or not corruption
        or corruption in (".", "..")
        or any(sep in corruption for sep in ("/", "\\", os.sep))
    ):
        raise ValueError(f"corruption must be a plain name such as 'fog', got {corruption!r}")


def _load_npy(path: Path, help_text: str, what: str) -> np.ndarray:
    """Memory-maps a ``.npy`` file, raising :class:`CorruptionDataError` for anything else."""
    if not path.is_file():
        raise CorruptionDataError(f"missing file {path} (expected {what}); {help_text}")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(_NPY_MAGIC))
    except OSError as e:
        raise CorruptionDataError(f"cannot read {path} ({e}); {help_text}") from e
    if magic != _NPY_MAGIC:
        raise CorruptionDataError(
            f"{path} is not a .npy file (no NumPy header; expected {what}); {help_text}"
        )
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorruptionDataError(
            f"{path} is not a valid .npy file ({e}; expected {what}); it may be truncated or "
            f"corrupt; {help_text}"
        ) from e
    if not isinstance(arr, np.ndarray):  # pragma: no cover - np.load of a .npy is an array
        raise CorruptionDataError(f"{path} is not a .npy array (expected {what}); {help_text}")
    return arr


def _check_array(arr: np.ndarray, path: Path, trailing: tuple[int, ...], help_text: str, what: str):
    if arr.ndim != 1 + len(trailing) or tuple(arr.shape[1:]) != trailing or arr.shape[0] == 0:
        raise CorruptionDataError(f"{path} has shape {arr.shape}, expected {what}; {help_text}")


def _load_labels(path: Path, n: int, num_classes: int, help_text: str, what: str) -> np.ndarray:
    labels = _load_npy(path, help_text, what)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptionDataError(
            f"{path} has shape {labels.shape} and dtype {labels.dtype}, expected {what}; "
            f"{help_text}"
        )
    if labels.shape[0] != n:
        raise CorruptionDataError(
            f"{path} has {labels.shape[0]} labels but the images file has {n} images "
            f"(expected {what}); {help_text}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptionDataError(
            f"{path} has labels in {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}; "
            f"{help_text}"
        )
    return labels


def _available(root: Path, pattern: str) -> str:
    names = sorted(p.stem if p.is_file() else p.name for p in root.glob(pattern))
    names = [n for n in names if n != "labels"]
    return ", ".join(names) if names else "none"


def load_cifar_c(
    root: str | os.PathLike, corruption: str, severity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one corruption at one severity of CIFAR-10-C or CIFAR-100-C.

    Expects the official layout: ``<root>/<corruption>.npy`` of shape ``(50000, 32, 32, 3)``
    uint8, the five severities stacked in blocks of 10,000 rows (see :func:`cifar_c_rows`), and
    ``<root>/labels.npy`` of 50,000 integer labels. Any positive multiple of 5 rows is accepted
    (block = rows // 5), so small files in the same format work too. Only the requested block is
    read (memory-mapped).

    Args:
      root: the extracted ``CIFAR-10-C`` or ``CIFAR-100-C`` folder.
      corruption: file stem, e.g. ``"fog"`` or ``"gaussian_noise"``.
      severity: 1 to 5.

    Returns:
      ``(images, labels)``: NumPy float32 ``(block, 32, 32, 3)`` in ``[0, 1]`` and int64
      ``(block,)``.

    Raises:
      ValueError: ``severity`` not in 1..5 or ``corruption`` not a plain name.
      CorruptionDataError: missing folder or file, invalid ``.npy``, wrong shape, dtype or
        length; the message names the file and where to download the data.
    """
    _check_severity(severity, SEVERITIES)
    _check_name(corruption)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorruptionDataError(
            f"missing folder {root} (expected the CIFAR-C folder); {_CIFAR_C_HELP}"
        )
    path = root / f"{corruption}.npy"
    what_images = "(50000, 32, 32, 3) uint8: 5 severities x 10000 images"
    if not path.is_file():
        raise CorruptionDataError(
            f"missing file {path} (expected {what_images}); corruptions found in {root}: "
            f"{_available(root, '*.npy')}; {_CIFAR_C_HELP}"
        )
    images = _load_npy(path, _CIFAR_C_HELP, what_images)
    _check_array(images, path, (32, 32, 3), _CIFAR_C_HELP, what_images)
    if images.dtype != np.uint8:
        raise CorruptionDataError(
            f"{path} has dtype {images.dtype}, expected {what_images}; {_CIFAR_C_HELP}"
        )
    n = images.shape[0]
    if n % len(SEVERITIES):
        raise CorruptionDataError(
            f"{path} has {n} images, not a multiple of 5 (expected {what_images}); {_CIFAR_C_HELP}"
        )
    rows = cifar_c_rows(severity, n)
    labels = _load_labels(
        root / "labels.npy",
        n,
        100,
        _CIFAR_C_HELP,
        f"({n},) integer labels, one per image of {path.name}",
    )
    x = np.asarray(images[rows], dtype=np.float32) / np.float32(255.0)
    return x, labels[rows].copy()


def load_mnist_c(root: str | os.PathLike, corruption: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads the test split of one MNIST-C corruption.

    Expects the official layout: ``<root>/<corruption>/test_images.npy`` of shape
    ``(10000, 28, 28, 1)`` uint8 and ``<root>/<corruption>/test_labels.npy`` of 10,000 integer
    labels in 0..9 (any positive number of images is accepted).

    Args:
      root: the extracted ``mnist_c`` folder.
      corruption: sub-folder name, e.g. ``"fog"`` or ``"zigzag"``.

    Returns:
      ``(images, labels)``: NumPy float32 ``(N, 28, 28, 1)`` in ``[0, 1]`` and int64 ``(N,)``.

    Raises:
      ValueError: ``corruption`` not a plain name.
      CorruptionDataError: missing folder or file, invalid ``.npy``, wrong shape, dtype or
        length; the message names the file and where to download the data.
    """
    _check_name(corruption)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorruptionDataError(
            f"missing folder {root} (expected the mnist_c folder); {_MNIST_C_HELP}"
        )
    folder = root / corruption
    if not folder.is_dir():
        found = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "none"
        raise CorruptionDataError(
            f"missing folder {folder} (expected {corruption}/test_images.npy and "
            f"{corruption}/test_labels.npy); corruptions found in {root}: {found}; {_MNIST_C_HELP}"
        )
    path = folder / "test_images.npy"
    what_images = "(10000, 28, 28, 1) uint8"
    images = _load_npy(path, _MNIST_C_HELP, what_images)
    _check_array(images, path, (28, 28, 1), _MNIST_C_HELP, what_images)
    if images.dtype != np.uint8:
        raise CorruptionDataError(
            f"{path} has dtype {images.dtype}, expected {what_images}; {_MNIST_C_HELP}"
        )
    n = images.shape[0]
    labels = _load_labels(
        folder / "test_labels.npy", n, 10, _MNIST_C_HELP, f"({n},) integer labels in 0..9"
    )
    x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
    return x, labels


__all__ = [
    "CIFAR10_C_URL",
    "CIFAR100_C_URL",
    "CIFAR_C_BLOCK",
    "CORRUPTIONS",
    "KEY_INDEPENDENT",
    "MNIST_C_URL",
    "SEVERITIES",
    "SEVERITY_PARAMS",
    "CorruptionDataError",
    "brightness",
    "cifar_c_rows",
    "contrast",
    "corrupt",
    "defocus_blur",
    "fog",
    "gaussian_blur",
    "gaussian_noise",
    "impulse_noise",
    "load_cifar_c",
    "load_mnist_c",
    "motion_blur",
    "pixelate",
    "rotate",
    "scale",
    "shear",
    "shot_noise",
    "speckle_noise",
    "translate",
    "zigzag",
]

"""Differentiable Siamese Augmentation (DSA) in JAX.

DSA (Zhao & Bilen, ICML 2021) augments a batch with random transformations that are
differentiable with respect to the images, so the synthetic set can be learned *through* the
augmentation. Trajectory matching (MTT) applies it at every inner step, in expert training and
in evaluation. This module reproduces the reference ``DiffAugment`` with the strategy
``color_crop_cutout_flip_scale_rotate``:

* each call picks ONE family uniformly at random, then draws that family's parameters
  independently for every sample;
* ``color``: brightness ``x + (u - 0.5)``, then saturation ``(x - mean_c) * 2u + mean_c``
  (mean over channels, per pixel), then contrast ``(x - mean) * (u + 0.5) + mean`` (mean over
  the image), each with its own ``u ~ U(0, 1)``;
* ``crop``: shift by whole pixels, up to ``round(0.125 * H)`` rows and ``round(0.125 * W)``
  columns either way, with zero fill;
* ``cutout``: zero a ``round(0.5 H) x round(0.5 W)`` square at a random centre;
* ``flip``: horizontal mirror with probability 0.5;
* ``scale``: independent factors ``U(1/1.2, 1.2)`` per axis, bilinear resampling, zero padding;
* ``rotate``: ``U(-15, 15)`` degrees, bilinear resampling, zero padding.

Resampling follows ``torch.nn.functional.affine_grid``/``grid_sample`` with
``align_corners=True``, as the reference does. All functions take ``(key, images)`` with
images ``(N, H, W, C)`` and are pure: usable under ``jit``, ``vmap`` and ``grad``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from satm_jax import augment
  >>> dsa = augment.make_augment("color_crop_cutout_flip_scale_rotate")
  >>> dsa(jax.random.PRNGKey(0), jnp.ones((4, 8, 8, 3))).shape
  (4, 8, 8, 3)

Reference: Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation",
ICML 2021; Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR
2022.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
AugmentFn = Callable[[Array, Array], Array]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclasses.dataclass(frozen=True)
class DSAParams:
    """The reference ``ParamDiffAug`` values."""

    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0


def _uniform(key: Array, n: int, lo: float = 0.0, hi: float = 1.0, dtype=jnp.float32) -> Array:
    return jax.random.uniform(key, (n, 1, 1, 1), dtype, lo, hi)


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


def brightness(key: Array, x: Array, p: DSAParams = DSAParams()) -> Array:
    """Adds ``(u - 0.5) * p.brightness`` per sample."""
    u = _uniform(key, x.shape[0], dtype=x.dtype)
    return x + (u - 0.5) * p.brightness


def saturation(key: Array, x: Array, p: DSAParams = DSAParams()) -> Array:
    """Scales each pixel's deviation from its channel mean by ``u * p.saturation``."""
    u = _uniform(key, x.shape[0], dtype=x.dtype)
    m = jnp.mean(x, axis=-1, keepdims=True)
    return (x - m) * (u * p.saturation) + m


def contrast(key: Array, x: Array, p: DSAParams = DSAParams()) -> Array:
    """Scales each image's deviation from its mean by ``u + p.contrast``."""
    u = _uniform(key, x.shape[0], dtype=x.dtype)
    m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - m) * (u + p.contrast) + m


def color(key: Array, x: Array, p: DSAParams = DSAParams()) -> Array:
    """Brightness, then saturation, then contrast (the reference ``color`` family)."""
    kb, ks, kc = jax.random.split(key, 3)
    return contrast(kc, saturation(ks, brightness(kb, x, p), p), p)


def _shift_axis(x: Array, shift: Array, axis: int) -> Array:
    """``out[i] = x[i + shift]`` along ``axis`` (per sample), zero where out of range."""
    n = x.shape[axis]
    idx = jnp.arange(n)[None, :] + shift[:, None]  # (N, n)
    valid = (idx >= 0) & (idx < n)
    idx = jnp.clip(idx, 0, n - 1)
    shape = [x.shape[0], 1, 1, 1]
    shape[axis] = n
    gathered = jnp.take_along_axis(x, idx.reshape(shape), axis=axis)
    return jnp.where(valid.reshape(shape), gathered, jnp.zeros((), x.dtype))


def crop(key: Array, x: Array, p: DSAParams = DSAParams()) -> Array:
    """Shifts each image by whole pixels (padding-then-cropping), zero fill."""
    n, h, w, _ = x.shape
    sh, sw = _round_half_up(h * p.ratio_crop_pad), _round_half_up(w * p.ratio_crop_pad)
    kh, kw = jax.random.split(key)
    th = jax.random.randint(kh, (n,), -sh, sh + 1)
    tw = jax.random.randint(kw, (n,), -sw, sw + 1)
    return _shift_axis(_shift_axis(x, th, 1), tw, 2)


def cutout(key: Array, x: Array, p: DSAParams = DSAParams()) -> Array:
    """Zeroes one ``round(0.5 H) x round(0.5 W)`` square per image at a random centre."""
    n, h, w, _ = x.shape
    ch, cw = _round_half_up(h * p.ratio_cutout), _round_half_up(w * p.ratio_cutout)
    kh, kw = jax.random.split(key)
    oh = jax.random.randint(kh, (n,), 0, h + (1 - ch % 2))
    ow = jax.random.randint(kw, (n,), 0, w + (1 - cw % 2))
    lo_h, lo_w = oh - ch // 2, ow - cw // 2
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_h = (rows >= lo_h[:, None]) & (rows < lo_h[:, None] + ch)  # (N, H)
    in_w = (cols >= lo_w[:, None]) & (cols < lo_w[:, None] + cw)  # (N, W)
    cut = in_h[:, :, None] & in_w[:, None, :]
    return jnp.where(cut[..., None], jnp.zeros((), x.dtype), x)


def flip(key: Array, x: Array, p: DSAParams = DSAParams()) -> Array:
    """Mirrors each image horizontally with probability ``p.prob_flip``."""
    u = _uniform(key, x.shape[0])
    return jnp.where(u < p.prob_flip, x[:, :, ::-1, :], x)


def _grid_sample(x: Array, theta: Array) -> Array:
    """``grid_sample(x, affine_grid(theta), align_corners=True)``: bilinear, zero padding.

    Args:
      x: images ``(N, H, W, C)``.
      theta: per-sample affine maps ``(N, 2, 3)`` in normalised coordinates (x = width).
    """
    n, h, w, c = x.shape
    xs = jnp.linspace(-1.0, 1.0, w, dtype=x.dtype) if w > 1 else jnp.zeros((1,), x.dtype)
    ys = jnp.linspace(-1.0, 1.0, h, dtype=x.dtype) if h > 1 else jnp.zeros((1,), x.dtype)
    gx, gy = jnp.meshgrid(xs, ys)  # (H, W)
    base = jnp.stack([gx, gy, jnp.ones_like(gx)], axis=-1)  # (H, W, 3)
    src = jnp.einsum("hwk,nak->nhwa", base, theta.astype(x.dtype))  # (N, H, W, 2)
    px = (src[..., 0] + 1.0) * 0.5 * (w - 1)
    py = (src[..., 1] + 1.0) * 0.5 * (h - 1)

    def sample_one(img, py, px):
        y0 = jnp.floor(py)
        x0 = jnp.floor(px)
        wy1 = py - y0
        wx1 = px - x0
        out = jnp.zeros((h, w, c), img.dtype)
        for dy, wy in ((0, 1.0 - wy1), (1, wy1)):
            for dx, wx in ((0, 1.0 - wx1), (1, wx1)):
                yi = (y0 + dy).astype(jnp.int32)
                xi = (x0 + dx).astype(jnp.int32)
                valid = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
                v = img[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
                out = out + jnp.where(valid, wy * wx, 0.0)[..., None] * v
        return out

    return jax.vmap(sample_one)(x, py, px)


def scale(key: Array, x: Array, p: DSAParams = DSAParams()) -> Array:
    """Rescales each axis by an independent factor in ``[1/ratio, ratio]`` (bilinear)."""
    n = x.shape[0]
    kx, ky = jax.random.split(key)
    lo = 1.0 / p.ratio_scale
    sx = jax.random.uniform(kx, (n,), minval=lo, maxval=p.ratio_scale)
    sy = jax.random.uniform(ky, (n,), minval=lo, maxval=p.ratio_scale)
    z = jnp.zeros_like(sx)
    theta = jnp.stack([jnp.stack([sx, z, z], -1), jnp.stack([z, sy, z], -1)], axis=1)
    return _grid_sample(x, theta)


def rotate(key: Array, x: Array, p: DSAParams = DSAParams()) -> Array:
    """Rotates each image by ``U(-ratio, ratio)`` degrees about its centre (bilinear)."""
    n = x.shape[0]
    ang = (jax.random.uniform(key, (n,)) - 0.5) * 2.0 * p.ratio_rotate / 180.0 * math.pi
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    z = jnp.zeros_like(ang)
    theta = jnp.stack([jnp.stack([cos, -sin, z], -1), jnp.stack([sin, cos, z], -1)], axis=1)
    return _grid_sample(x, theta)


FAMILY_FNS: dict[str, Callable[[Array, Array, DSAParams], Array]] = {
    "color": color,
    "crop": crop,
    "cutout": cutout,
    "flip": flip,
    "scale": scale,
    "rotate": rotate,
}


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Splits ``"color_crop_..."`` into families; ``""`` or ``"none"`` gives ``()``.

    Raises:
      ValueError: an unknown family name.
    """
    if strategy in ("", "none"):
        return ()
    fams = tuple(strategy.split("_"))
    bad = [f for f in fams if f not in FAMILY_FNS]
    if bad:
        raise ValueError(f"unknown DSA families {bad} in {strategy!r}; known: {FAMILIES}")
    return fams


def make_augment(strategy: str = DEFAULT_STRATEGY, params: DSAParams = DSAParams()) -> AugmentFn:
    """Returns ``augment(key, images) -> images`` applying one random family per call.

    With ``strategy="none"`` the function is the identity (the key is ignored).
    """
    fams = parse_strategy(strategy)
    if not fams:
        return lambda key, x: x
    branches = [lambda k, x, f=f: FAMILY_FNS[f](k, x, params) for f in fams]

    def augment(key: Array, x: Array) -> Array:
        if len(branches) == 1:
            return branches[0](key, x)
        kc, ka = jax.random.split(key)
        which = jax.random.randint(kc, (), 0, len(branches))
        return jax.lax.switch(which, branches, ka, x)

    return augment


def dsa(key: Array, x: Array, strategy: str = DEFAULT_STRATEGY) -> Array:
    """One DSA call with the reference parameters (see ``make_augment``)."""
    return make_augment(strategy)(key, x)

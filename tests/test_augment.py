"""DSA (``satm_jax.augment``) against the reference ``DiffAugment`` semantics.

Geometry is checked against an independent float64 NumPy implementation of PyTorch's
``affine_grid`` + ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True)``
(``np_affine_grid``/``np_grid_sample`` below; they were checked once against PyTorch 2.13 CPU
outside this suite, max abs difference at float64 round-off).
"""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from satm_jax import augment
from tests.helpers import slow_cases, x64

# --------------------------------------------------------------------------------------------
# Independent NumPy references
# --------------------------------------------------------------------------------------------


def np_affine_grid(theta, h, w):
    """``F.affine_grid(theta, (N, C, h, w), align_corners=True)``: ``(N, h, w, 2)`` as (x, y)."""
    theta = np.asarray(theta, np.float64)
    xs = np.linspace(-1.0, 1.0, w) if w > 1 else np.zeros(1)
    ys = np.linspace(-1.0, 1.0, h) if h > 1 else np.zeros(1)
    base = np.empty((h, w, 3))
    base[..., 0] = xs[None, :]
    base[..., 1] = ys[:, None]
    base[..., 2] = 1.0
    return np.einsum("hwk,nak->nhwa", base, theta)


def np_grid_sample(img, grid):
    """``F.grid_sample(img, grid, "bilinear", "zeros", align_corners=True)`` for NHWC images."""
    img = np.asarray(img, np.float64)
    n, h, w, _ = img.shape
    ix = (grid[..., 0] + 1.0) / 2.0 * (w - 1)
    iy = (grid[..., 1] + 1.0) / 2.0 * (h - 1)
    ix_w, iy_n = np.floor(ix), np.floor(iy)
    ix_e, iy_s = ix_w + 1.0, iy_n + 1.0
    corners = [
        (iy_n, ix_w, (ix_e - ix) * (iy_s - iy)),
        (iy_n, ix_e, (ix - ix_w) * (iy_s - iy)),
        (iy_s, ix_w, (ix_e - ix) * (iy - iy_n)),
        (iy_s, ix_e, (ix - ix_w) * (iy - iy_n)),
    ]
    out = np.zeros(grid.shape[:3] + img.shape[-1:])
    b = np.arange(n)[:, None, None]
    for yy, xx, wt in corners:
        inside = (xx >= 0) & (xx <= w - 1) & (yy >= 0) & (yy <= h - 1)
        yi = np.clip(yy, 0, h - 1).astype(np.int64)
        xi = np.clip(xx, 0, w - 1).astype(np.int64)
        out += np.where(inside, wt, 0.0)[..., None] * img[b, yi, xi]
    return out


def np_warp(img, theta):
    img = np.asarray(img)
    return np_grid_sample(img, np_affine_grid(theta, img.shape[1], img.shape[2]))


def np_shift(img, dy, dx):
    """``out[r, c] = img[r + dy, c + dx]``, zero outside (one ``(H, W, C)`` image)."""
    h, w, _ = img.shape
    out = np.zeros_like(img)
    r0, r1 = max(0, -dy), min(h, h - dy)
    c0, c1 = max(0, -dx), min(w, w - dx)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = img[r0 + dy : r1 + dy, c0 + dx : c1 + dx]
    return out


def half_up(v):
    return int(np.floor(v + 0.5))


# --------------------------------------------------------------------------------------------
# Per-sample signatures of each family (None when the sample does not fit)
# --------------------------------------------------------------------------------------------


def flip_sig(x, y):
    """0 (unchanged) or 1 (mirrored along the width), else None."""
    if np.array_equal(y, x):
        return 0
    if np.array_equal(y, x[:, ::-1]):
        return 1
    return None


def crop_sig(x, y):
    """The (dy, dx) with ``y = shift(x, dy, dx)`` within the reference range, else None."""
    h, w, _ = x.shape
    sh, sw = half_up(0.125 * h), half_up(0.125 * w)
    hits = [
        (dy, dx)
        for dy in range(-sh, sh + 1)
        for dx in range(-sw, sw + 1)
        if np.array_equal(y, np_shift(x, dy, dx))
    ]
    return hits[0] if len(hits) == 1 else None


def cutout_sig(x, y):
    """The zeroed rectangle ``(r0, r1, c0, c1)`` if ``y`` is ``x`` with one reference cutout."""
    h, w, _ = x.shape
    ch, cw = half_up(0.5 * h), half_up(0.5 * w)
    changed = np.any(y != x, axis=-1)
    if not changed.any() or np.any(y[changed] != 0):
        return None
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.zeros_like(changed)
    box[r0:r1, c0:c1] = True
    if not np.array_equal(box, changed):
        return None
    # Reference: offset ~ randint(0, H + 1 - ch % 2), rows [offset - ch // 2, + ch) clipped.
    ok_r = any(
        (max(lo, 0), min(lo + ch, h)) == (r0, r1)
        for lo in range(-(ch // 2), h - ch % 2 - ch // 2 + 1)
    )
    ok_c = any(
        (max(lo, 0), min(lo + cw, w)) == (c0, c1)
        for lo in range(-(cw // 2), w - cw % 2 - cw // 2 + 1)
    )
    return (r0, r1, c0, c1) if ok_r and ok_c else None


def color_sig(x, y, tol=2e-4):
    """(brightness b, saturation s, contrast c) if ``y`` is the reference colour map of ``x``.

    brightness -> saturation -> contrast gives
    ``y = c s x + c (1 - s) mean_channels(x) + (1 - c) mean(x) + b``: fit the three
    coefficients of ``[x, mean_channels(x), 1]`` and check the fit and the parameter ranges.
    """
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    mc = np.broadcast_to(x.mean(-1, keepdims=True), x.shape)
    a = np.stack([x.ravel(), mc.ravel(), np.ones(x.size)], 1)
    coef, *_ = np.linalg.lstsq(a, y.ravel(), rcond=None)
    if np.max(np.abs(a @ coef - y.ravel())) > tol:
        return None
    alpha, beta, gamma = coef
    c = alpha + beta
    s = alpha / c
    b = gamma - (1 - c) * x.mean()
    ok = 0.5 - tol <= c <= 1.5 + tol and -tol <= s <= 2 + tol and abs(b) <= 0.5 + tol
    return (b, s, c) if ok else None


def probe_image(h, w):
    """Channels (1, x, y) in normalised coordinates: a warp's output reveals its ``theta``."""
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 1.0
    img[..., 1] = np.linspace(-1, 1, w)[None, :]
    img[..., 2] = np.linspace(-1, 1, h)[:, None]
    return img


def fit_theta(y):
    """``theta`` of an affine warp from its output on ``probe_image``, if it explains it.

    Where the sampling point lies inside the image, bilinear interpolation reproduces the
    affine channels exactly, so (channel 1, channel 2) are the source coordinates there.
    """
    h, w, _ = y.shape
    inside = np.abs(y[..., 0] - 1.0) < 1e-6
    if inside.sum() < 0.25 * h * w:
        return None
    base = np_affine_grid(np.eye(2, 3)[None], h, w)[0]
    a = np.concatenate([base[inside], np.ones((inside.sum(), 1))], 1)
    theta, *_ = np.linalg.lstsq(a, y[inside][:, 1:].astype(np.float64), rcond=None)
    theta = theta.T
    if np.max(np.abs(np_warp(probe_image(h, w)[None], theta[None])[0] - y)) > 1e-4:
        return None
    return theta


def rotate_sig(theta, tol=1e-4):
    """The angle in degrees if ``theta`` is the reference rotation, else None."""
    if theta is None:
        return None
    cos, sin = theta[0, 0], theta[1, 0]
    rot = np.array([[cos, -sin, 0.0], [sin, cos, 0.0]])
    if np.max(np.abs(theta - rot)) > tol or abs(cos**2 + sin**2 - 1) > tol:
        return None
    deg = np.degrees(np.arctan2(sin, cos))
    return deg if abs(deg) <= 15 + 1e-3 else None


def scale_sig(theta, tol=1e-4):
    """The factors (sx, sy) if ``theta`` is the reference axis scaling, else None."""
    if theta is None:
        return None
    sx, sy = theta[0, 0], theta[1, 1]
    if np.max(np.abs(theta - np.array([[sx, 0, 0], [0, sy, 0]]))) > tol:
        return None
    ok = all(1 / 1.2 - tol <= s <= 1.2 + tol for s in (sx, sy))
    return (sx, sy) if ok else None


def _images(key_seed, shape, lo=0.5, hi=1.5):
    """Random images with no zero pixel (so zero fill and cutout are unambiguous)."""
    return np.random.default_rng(key_seed).uniform(lo, hi, shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Geometry: flip, crop, cutout
# --------------------------------------------------------------------------------------------


def test_flip_mirrors_the_width_axis_exactly_per_sample():
    x = _images(0, (32, 12, 10, 3))
    y = np.asarray(augment.flip(jax.random.PRNGKey(0), jnp.asarray(x)))
    sigs = [flip_sig(xi, yi) for xi, yi in zip(x, y)]
    assert None not in sigs
    assert 4 <= sum(sigs) <= 28  # both happen, about half each


@pytest.mark.parametrize("shape", [(64, 20, 12, 3), (32, 16, 16, 1)])
def test_crop_shifts_by_whole_pixels_with_zero_fill(shape):
    # 20 * 0.125 = 2.5 and 12 * 0.125 = 1.5: the reference rounds half up (3 and 2).
    x = _images(1, shape)
    y = np.asarray(augment.crop(jax.random.PRNGKey(1), jnp.asarray(x)))
    shifts = [crop_sig(xi, yi) for xi, yi in zip(x, y)]
    assert None not in shifts
    dys, dxs = {s[0] for s in shifts}, {s[1] for s in shifts}
    sh, sw = half_up(0.125 * shape[1]), half_up(0.125 * shape[2])
    assert {-sh, sh} <= dys and {-sw, sw} <= dxs  # the extremes are reached
    assert len(set(shifts)) > 8  # per-sample shifts


@pytest.mark.parametrize("shape", [(64, 13, 10, 3), (64, 16, 12, 2)])
def test_cutout_zeroes_one_clipped_square_and_nothing_else(shape):
    n, h, w, _ = shape
    x = _images(2, shape)
    y = np.asarray(augment.cutout(jax.random.PRNGKey(2), jnp.asarray(x)))
    boxes = [cutout_sig(xi, yi) for xi, yi in zip(x, y)]
    assert None not in boxes
    ch, cw = half_up(0.5 * h), half_up(0.5 * w)
    sizes = [(r1 - r0, c1 - c0) for r0, r1, c0, c1 in boxes]
    assert all(0 < a <= ch and 0 < b <= cw for a, b in sizes)
    assert (ch, cw) in sizes  # unclipped squares occur ...
    assert any(a < ch or b < cw for a, b in sizes)  # ... and clipped ones at the borders
    assert len(set(boxes)) > 16


# --------------------------------------------------------------------------------------------
# Resampling: rotate, scale (bilinear, zero padding, align_corners=True)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(9, 7), (8, 8), (1, 6)])
def test_grid_sample_matches_the_numpy_torch_reference_in_float64(hw):
    h, w = hw
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, h, w, 2))
    theta = rng.normal(scale=0.7, size=(6, 2, 3))
    theta[0] = [[1, 0, 0], [0, 1, 0]]  # identity
    theta[1] = [[-1, 0, 0], [0, 1, 0]]  # mirror
    theta[2, :, 2] = [1.7, -0.4]  # mostly outside: zero padding
    with x64():
        got = np.asarray(augment._grid_sample(jnp.asarray(x), jnp.asarray(theta)))
    np.testing.assert_allclose(got, np_warp(x, theta), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[0], x[0], atol=1e-12)
    np.testing.assert_allclose(got[1], x[1][:, ::-1], atol=1e-12)


def _captured_warp(monkeypatch, family, x, key):
    """Runs ``family`` eagerly, capturing the ``theta`` it passes to ``_grid_sample``."""
    seen = []
    original = augment._grid_sample

    def spy(images, theta):
        seen.append(np.asarray(theta, np.float64))
        return original(images, theta)

    monkeypatch.setattr(augment, "_grid_sample", spy)
    y = np.asarray(family(key, jnp.asarray(x)))
    assert len(seen) == 1
    return y, seen[0]


@pytest.mark.slow
def test_rotate_is_a_reference_rotation_per_sample(monkeypatch):
    x = _images(4, (64, 12, 10, 3), -1.0, 1.0)
    y, theta = _captured_warp(monkeypatch, augment.rotate, x, jax.random.PRNGKey(4))
    angles = np.array([rotate_sig(t) for t in theta], dtype=object)
    assert None not in list(angles)
    angles = angles.astype(np.float64)
    assert angles.min() < -12 and angles.max() > 12 and len(np.unique(angles)) == len(angles)
    np.testing.assert_allclose(y, np_warp(x, theta), rtol=0, atol=2e-5)
    # The output alone also pins the rotation down (probe image), as in the strategy test.
    p = probe_image(12, 10)[None].repeat(8, 0)
    yp, tp = _captured_warp(monkeypatch, augment.rotate, p, jax.random.PRNGKey(5))
    for yi, ti in zip(yp, tp):
        np.testing.assert_allclose(fit_theta(yi), ti, atol=1e-4)


def test_scale_is_an_independent_per_axis_rescaling_per_sample(monkeypatch):
    x = _images(6, (64, 12, 10, 3), -1.0, 1.0)
    y, theta = _captured_warp(monkeypatch, augment.scale, x, jax.random.PRNGKey(6))
    factors = [scale_sig(t) for t in theta]
    assert None not in factors
    sx, sy = np.array(factors).T
    assert not np.allclose(sx, sy)
    for s in (sx, sy):
        assert s.min() < 0.9 and s.max() > 1.1
    np.testing.assert_allclose(y, np_warp(x, theta), rtol=0, atol=2e-5)


def test_rotate_and_scale_in_float64_match_the_reference_tightly(monkeypatch):
    x = np.random.default_rng(7).normal(size=(8, 9, 11, 3))
    for family in (augment.rotate, augment.scale):
        with x64():
            y, theta = _captured_warp(monkeypatch, family, x, jax.random.PRNGKey(7))
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, np_warp(x, theta), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Colour: per-sample brightness, saturation, contrast
# --------------------------------------------------------------------------------------------


def test_brightness_adds_one_offset_per_sample():
    x = _images(8, (32, 6, 5, 3))
    y = np.asarray(augment.brightness(jax.random.PRNGKey(8), jnp.asarray(x)))
    d = (y - x).reshape(32, -1)
    np.testing.assert_allclose(d, d[:, :1].repeat(d.shape[1], 1), atol=1e-6)
    off = d[:, 0]
    assert np.all(np.abs(off) <= 0.5) and off.std() > 0.15 and len(np.unique(off)) == 32


def test_saturation_keeps_channel_means_and_scales_deviations_per_sample():
    x = _images(9, (32, 6, 5, 3))
    y = np.asarray(augment.saturation(jax.random.PRNGKey(9), jnp.asarray(x)))
    m = x.mean(-1, keepdims=True)
    np.testing.assert_allclose(y.mean(-1, keepdims=True), m, atol=1e-6)
    dx, dy = (x - m).reshape(32, -1), (y - m).reshape(32, -1)
    f = np.sum(dx * dy, 1) / np.sum(dx * dx, 1)
    np.testing.assert_allclose(dy, f[:, None] * dx, atol=1e-5)
    assert np.all((f >= 0) & (f <= 2)) and f.std() > 0.3 and len(np.unique(f)) == 32


def test_contrast_keeps_each_image_mean_and_scales_deviations_per_sample():
    x = _images(10, (32, 6, 5, 3))
    y = np.asarray(augment.contrast(jax.random.PRNGKey(10), jnp.asarray(x)))
    m = x.mean((1, 2, 3), keepdims=True)
    np.testing.assert_allclose(y.mean((1, 2, 3), keepdims=True), m, atol=1e-6)
    dx, dy = (x - m).reshape(32, -1), (y - m).reshape(32, -1)
    f = np.sum(dx * dy, 1) / np.sum(dx * dx, 1)
    np.testing.assert_allclose(dy, f[:, None] * dx, atol=1e-5)
    assert np.all((f >= 0.5) & (f <= 1.5)) and f.std() > 0.15 and len(np.unique(f)) == 32


def test_color_is_a_per_sample_affine_map_of_that_sample_only():
    x = _images(11, (16, 6, 5, 3))
    key = jax.random.PRNGKey(11)
    y = np.asarray(augment.color(key, jnp.asarray(x)))
    params = [color_sig(xi, yi) for xi, yi in zip(x, y)]
    assert None not in params
    b, s, c = np.array(params).T
    assert b.std() > 0.1 and s.std() > 0.2 and c.std() > 0.1
    # Changing one sample leaves every other sample's output unchanged.
    x2 = x.copy()
    x2[3] = _images(12, x.shape[1:])
    y2 = np.asarray(augment.color(key, jnp.asarray(x2)))
    np.testing.assert_array_equal(np.delete(y2, 3, 0), np.delete(y, 3, 0))
    assert color_sig(x2[3], y2[3]) is not None


# --------------------------------------------------------------------------------------------
# Differentiability, determinism, strategy
# --------------------------------------------------------------------------------------------

ALL = [*augment.FAMILIES, "full"]


def _fn(name):
    if name == "full":
        return augment.make_augment(augment.DEFAULT_STRATEGY)
    return lambda k, x: augment.FAMILY_FNS[name](k, x, augment.DSAParams())


@pytest.mark.parametrize("name", slow_cases(ALL, ["full", "scale", "color"]))
def test_image_gradients_are_finite_eager_jit_and_vmapped_over_keys(name):
    fn = _fn(name)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    wts = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
    grad = jax.grad(lambda x, k: jnp.sum(wts * fn(k, x) ** 2))
    keys = jax.random.split(jax.random.PRNGKey(2), 6)
    g = grad(x, keys[0])
    gj = jax.jit(grad)(x, keys[0])
    gv = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(x, keys)
    for a in (g, gj, gv):
        assert bool(jnp.all(jnp.isfinite(a))) and float(jnp.max(jnp.abs(a))) > 0
    np.testing.assert_allclose(gj, g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gv[0], g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", augment.FAMILIES)
def test_image_gradients_match_finite_differences_in_float64(name):
    fn = _fn(name)
    with x64():
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 6, 3), jnp.float64)
        key = jax.random.PRNGKey(3)
        jax.test_util.check_grads(lambda x: fn(key, x), (x,), order=1, modes=("rev",))


@pytest.mark.parametrize("name", ALL)
def test_same_key_same_output_other_key_other_output(name):
    fn = _fn(name)
    x = jnp.asarray(_images(13, (8, 8, 8, 3)))
    k1, k2 = jax.random.PRNGKey(13), jax.random.PRNGKey(14)
    y1 = np.asarray(fn(k1, x))
    np.testing.assert_array_equal(np.asarray(fn(k1, x)), y1)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(k1, x)), y1, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(fn(k2, x)), y1)
    assert fn(k1, x).dtype == x.dtype and fn(k1, x).shape == x.shape


@pytest.mark.slow
def test_strategy_applies_exactly_one_family_per_call_and_uses_them_all():
    h, w = 12, 10
    probes = probe_image(h, w)[None].repeat(8, 0)
    x = np.concatenate([probes, _images(15, (8, h, w, 3))])
    aug = jax.jit(augment.make_augment("color_crop_cutout_flip_scale_rotate"))
    keys = jax.random.split(jax.random.PRNGKey(15), 48)
    ys = np.asarray(jax.vmap(aug, in_axes=(0, None))(keys, jnp.asarray(x)))
    counts = dict.fromkeys(augment.FAMILIES, 0)
    for k, y in zip(keys, ys):
        np.testing.assert_allclose(np.asarray(aug(k, jnp.asarray(x))), y, atol=1e-5)
        per_sample = {
            "flip": [flip_sig(a, b) for a, b in zip(x, y)],
            "crop": [crop_sig(a, b) for a, b in zip(x, y)],
            "cutout": [cutout_sig(a, b) for a, b in zip(x, y)],
            "color": [color_sig(a, b) for a, b in zip(x, y)],
        }
        found = {f for f, sigs in per_sample.items() if None not in sigs}
        found -= {"color"} if np.array_equal(x, y) else set()
        thetas = [fit_theta(b) for b in y[:8]]
        moved = any(t is not None and np.abs(t - np.eye(2, 3)).max() > 1e-3 for t in thetas)
        changed = not np.allclose(y[8:], x[8:])
        if moved and changed and all(rotate_sig(t) is not None for t in thetas):
            found.add("rotate")
        if moved and changed and all(scale_sig(t) is not None for t in thetas):
            found.add("scale")
        assert len(found) == 1, found
        counts[found.pop()] += 1
    assert min(counts.values()) >= 3, counts


def test_single_family_strategy_and_identity_and_unknown_family():
    x = jnp.asarray(_images(16, (8, 8, 8, 3)))
    key = jax.random.PRNGKey(16)
    np.testing.assert_array_equal(
        np.asarray(augment.make_augment("flip")(key, x)),
        np.asarray(augment.flip(key, x)),
    )
    for s in ("none", ""):
        assert augment.make_augment(s)(key, x) is x
    assert augment.parse_strategy("none") == ()
    assert augment.parse_strategy(augment.DEFAULT_STRATEGY) == augment.FAMILIES
    for bad in ("color_blur", "Flip", "crop__flip"):
        with pytest.raises(ValueError, match="unknown DSA famil"):
            augment.make_augment(bad)

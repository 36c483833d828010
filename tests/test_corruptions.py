"""Corruptions (MNIST-C / CIFAR-10-C families) and the official corrupted-set loaders."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import corruptions
from satm_jax.corruptions import CORRUPTIONS, SEVERITIES, CorruptionDataError

NAMES = sorted(CORRUPTIONS)
RANDOM_NAMES = [n for n in NAMES if n not in corruptions.KEY_INDEPENDENT]
REQUIRED = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "gaussian_blur",
    "motion_blur",
    "brightness",
    "contrast",
    "fog",
    "rotate",
    "shear",
    "scale",
    "translate",
    "zigzag",
)
SHAPES = {"mnist": (8, 28, 28, 1), "cifar": (8, 32, 32, 3)}


@functools.cache
def blobs(kind: str, seed: int = 0) -> np.ndarray:
    """Structured test images: a few smooth Gaussian blobs per image, float32 in [0, 1].

    Grey-scale ones on black (MNIST-like), colour ones on a dim random background.
    """
    n, h, w, c = SHAPES[kind]
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w, c))
    for i in range(n):
        if c > 1:
            out[i] += rng.uniform(0.0, 0.3, size=c)
        for _ in range(3):
            r0, c0 = rng.uniform(0.25, 0.75, size=2) * (h, w)
            sig = rng.uniform(0.08, 0.18) * min(h, w)
            amp = rng.uniform(0.5, 1.0, size=c)
            out[i] += amp * np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * sig**2))[..., None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def images(kind: str) -> jax.Array:
    return jnp.asarray(blobs(kind))


def mean_change(name, x, severity, key=0) -> float:
    return float(jnp.mean(jnp.abs(corruptions.corrupt(name, x, severity, key) - x)))


# --------------------------------------------------------------------------------------------
# Registry and argument checks
# --------------------------------------------------------------------------------------------


def test_registry_lists_every_corruption_with_its_parameters():
    assert SEVERITIES == (1, 2, 3, 4, 5)
    assert set(REQUIRED) <= set(CORRUPTIONS)
    assert set(corruptions.SEVERITY_PARAMS) == set(CORRUPTIONS)
    assert corruptions.KEY_INDEPENDENT < set(CORRUPTIONS)
    for name, fn in CORRUPTIONS.items():
        assert callable(fn) and fn.__name__ == name
        assert getattr(corruptions, name) is fn
        description, values = corruptions.SEVERITY_PARAMS[name]
        assert description and len(values) == len(SEVERITIES)
        assert fn.__doc__ and "severity" in fn.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_identity(name):
    x = images("mnist")
    assert CORRUPTIONS[name](x, 0, 0) is x
    assert corruptions.corrupt(name, x, 0, jax.random.PRNGKey(3)) is x
    xn = blobs("cifar")
    out = corruptions.corrupt(name, xn, 0, 1)
    assert out is xn
    np.testing.assert_array_equal(out, blobs("cifar"))


def test_unknown_name_raises_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown corruption 'snowfall'") as info:
        corruptions.corrupt("snowfall", images("mnist"), 1, 0)
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("severity", [-1, 6, 10, 2.5, 3.0, True, "3", None])
def test_bad_severity_raises(severity):
    x = images("mnist")
    with pytest.raises(ValueError, match=r"severity must be an integer in 0\.\.5"):
        corruptions.corrupt("gaussian_noise", x, severity, 0)
    with pytest.raises(ValueError, match=r"severity must be an integer in 0\.\.5"):
        corruptions.rotate(x, severity, 0)


def test_numpy_integer_severity_is_accepted():
    x = images("mnist")
    np.testing.assert_array_equal(
        corruptions.corrupt("contrast", x, np.int64(2), 0), corruptions.contrast(x, 2, 0)
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((28, 28, 1), np.float32), r"shape \(N, H, W, C\)"),
        (np.zeros((2, 28, 28, 1), np.uint8), "float array"),
    ],
)
def test_bad_images_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        corruptions.corrupt("brightness", bad, 1, 0)
    with pytest.raises(ValueError, match=match):  # even at severity 0
        corruptions.corrupt("brightness", bad, 0, 0)


# --------------------------------------------------------------------------------------------
# Generic properties of every corruption
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_keeps_shape_dtype_and_range(name, kind):
    x = images(kind)
    for s in SEVERITIES:
        y = corruptions.corrupt(name, x, s, 7)
        assert isinstance(y, jax.Array)
        assert y.shape == x.shape and y.dtype == x.dtype
        y = np.asarray(y)
        assert np.isfinite(y).all()
        assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_keeps_low_precision_dtypes(dtype):
    x = images("mnist").astype(dtype)
    for name in NAMES:
        y = corruptions.corrupt(name, x, 3, 0)
        assert y.dtype == dtype and y.shape == x.shape, name
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, name


def test_keeps_float64_under_x64():
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:  # older JAX
        from jax.experimental import enable_x64
    with enable_x64(True):
        x = jnp.asarray(blobs("mnist"), jnp.float64)
        for name in ("gaussian_noise", "shot_noise", "gaussian_blur", "rotate", "fog"):
            y = corruptions.corrupt(name, x, 2, 0)
            assert y.dtype == jnp.float64, name
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, name


def test_numpy_input_gives_the_same_result():
    xn = blobs("cifar")
    for name in NAMES:
        np.testing.assert_array_equal(
            corruptions.corrupt(name, xn, 2, 5), corruptions.corrupt(name, jnp.asarray(xn), 2, 5)
        )


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_its_key(name):
    x = images("cifar")
    y = np.asarray(corruptions.corrupt(name, x, 3, jax.random.PRNGKey(11)))
    np.testing.assert_array_equal(corruptions.corrupt(name, x, 3, jax.random.PRNGKey(11)), y)
    # An integer seed stands for PRNGKey(seed); new-style typed keys work too.
    np.testing.assert_array_equal(corruptions.corrupt(name, x, 3, 11), y)
    np.testing.assert_array_equal(corruptions.corrupt(name, x, 3, jax.random.key(11)), y)
    other = np.asarray(corruptions.corrupt(name, x, 3, jax.random.PRNGKey(12)))
    if name in corruptions.KEY_INDEPENDENT:
        np.testing.assert_array_equal(other, y)
    else:
        assert np.abs(other - y).max() > 1e-2


def test_random_corruptions_draw_per_image():
    """A batch of identical images is corrupted differently image by image."""
    x = jnp.broadcast_to(images("mnist")[:1], SHAPES["mnist"])
    for name in RANDOM_NAMES:
        y = np.asarray(corruptions.corrupt(name, x, 4, 0))
        differs = np.abs(y[1:] - y[0]).max(axis=(1, 2, 3)) > 1e-2
        assert differs.sum() >= len(differs) // 2, name  # sign choices may repeat


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_grows_with_severity(name, kind):
    x = images(kind)
    for key in (0, 1):
        change = [mean_change(name, x, s, key) for s in (0, *SEVERITIES)]
        assert change[0] == 0.0
        assert all(a < b for a, b in zip(change, change[1:])), (key, np.round(change, 5))


@pytest.mark.parametrize("name", ["shot_noise", "rotate", "zigzag", "motion_blur"])
def test_traceable_with_static_severity(name):
    x = images("mnist")
    fn = jax.jit(functools.partial(CORRUPTIONS[name], severity=4))
    np.testing.assert_allclose(
        fn(x, key=jax.random.PRNGKey(2)), CORRUPTIONS[name](x, 4, 2), atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# What each severity parameter means
# --------------------------------------------------------------------------------------------


def params(name):
    return corruptions.SEVERITY_PARAMS[name][1]


def test_brightness_and_contrast_follow_their_parameters():
    x = images("cifar")
    for s in SEVERITIES:
        np.testing.assert_allclose(
            corruptions.brightness(x, s, 0),
            np.clip(x + params("brightness")[s - 1], 0, 1),
            atol=1e-6,
        )
        y = corruptions.contrast(x, s, 0)
        m = np.asarray(x).mean(axis=(1, 2, 3), keepdims=True)
        np.testing.assert_allclose(
            y, (np.asarray(x) - m) * params("contrast")[s - 1] + m, atol=1e-6
        )
        np.testing.assert_allclose(np.mean(y, axis=(1, 2, 3)), m.ravel(), atol=1e-6)


def test_gaussian_and_speckle_noise_have_the_documented_spread():
    x = jnp.full((8, 32, 32, 3), 0.5, jnp.float32)
    for s in (1, 2, 3):  # small enough that clipping at 0 and 1 is negligible
        sigma = params("gaussian_noise")[s - 1]
        d = np.asarray(corruptions.gaussian_noise(x, s, s)) - 0.5
        assert abs(d.mean()) < 0.05 * sigma
        assert d.std() == pytest.approx(sigma, rel=0.05)
        d = np.asarray(corruptions.speckle_noise(x, s, s)) - 0.5
        assert d.std() == pytest.approx(0.5 * params("speckle_noise")[s - 1], rel=0.05)


def test_shot_noise_is_poisson():
    x = jnp.full((8, 32, 32, 3), 0.5, jnp.float32)
    rate = params("shot_noise")[0]
    y = np.asarray(corruptions.shot_noise(x, 1, 0))
    counts = y * rate
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)  # whole photon counts
    assert counts.mean() == pytest.approx(0.5 * rate, rel=0.02)
    assert counts.var() == pytest.approx(0.5 * rate, rel=0.1)  # Poisson: variance = mean
    black = corruptions.shot_noise(jnp.zeros((2, 8, 8, 1), jnp.float32), 5, 0)
    assert float(jnp.abs(black).max()) == 0.0  # no light, no photons


def test_impulse_noise_sets_the_documented_fraction_to_zero_or_one():
    x = jnp.full((8, 32, 32, 3), 0.5, jnp.float32)
    for s in SEVERITIES:
        y = np.asarray(corruptions.impulse_noise(x, s, 0))
        hit = y != 0.5
        assert hit.mean() == pytest.approx(params("impulse_noise")[s - 1], rel=0.15, abs=0.004)
        assert set(np.unique(y[hit])) <= {0.0, 1.0}
        assert (y[hit] == 1.0).mean() == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "motion_blur"])
def test_blurs_preserve_constant_images(name):
    x = jnp.full(SHAPES["cifar"], 0.3, jnp.float32)
    for s in SEVERITIES:
        np.testing.assert_allclose(corruptions.corrupt(name, x, s, 0), x, atol=1e-6)


def test_fog_only_whitens_and_is_grey():
    x = images("cifar")
    for s in SEVERITIES:
        y = np.asarray(corruptions.fog(x, s, 0))
        assert (y >= np.asarray(x) - 1e-6).all()
        # x + a d (1 - x): the density d = (y - x) / (1 - x) is the same in every channel.
        density = (y - np.asarray(x)) / np.maximum(1 - np.asarray(x), 1e-3)
        ok = np.asarray(x).max(axis=-1) < 0.95
        np.testing.assert_allclose(density[..., 0][ok], density[..., 2][ok], atol=2e-3)
        assert density.max() <= params("fog")[s - 1] + 1e-5


def test_pixelate_gives_blocks():
    x = images("mnist")
    for s in SEVERITIES:
        y = np.asarray(corruptions.pixelate(x, s, 0))[0, :, :, 0]
        cells = max(1, round(28 * params("pixelate")[s - 1]))
        assert len(np.unique(y, axis=0)) <= cells  # distinct rows
        assert len(np.unique(y.T.copy(), axis=0)) <= cells  # distinct columns


def test_zigzag_lines_are_nested_and_counted():
    x = jnp.zeros(SHAPES["mnist"], jnp.float32)
    lit = [np.asarray(corruptions.zigzag(x, s, 3)) > 0.5 for s in SEVERITIES]
    for a, b in zip(lit, lit[1:]):
        assert (b | ~a).all()  # the lines of severity s are still drawn at s + 1
        assert b.sum() > a.sum()


def centre_of_mass(img: np.ndarray) -> np.ndarray:
    rr, cc = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    return np.array([(rr * img).sum(), (cc * img).sum()]) / img.sum()


def test_translate_moves_by_the_documented_distance():
    rr, cc = np.mgrid[0:28, 0:28]
    blob = np.exp(-((rr - 13.5) ** 2 + (cc - 13.5) ** 2) / (2 * 2.0**2)).astype(np.float32)
    x = jnp.asarray(np.broadcast_to(blob[None, :, :, None], SHAPES["mnist"]))
    for s in SEVERITIES:
        y = np.asarray(corruptions.translate(x, s, 0))
        for img in y[..., 0]:
            moved = np.linalg.norm(centre_of_mass(img) - 13.5)
            assert moved == pytest.approx(params("translate")[s - 1] * 28, abs=0.1)


def test_rotate_keeps_a_centred_round_blob_and_scale_resizes_it():
    rr, cc = np.mgrid[0:28, 0:28]
    r2 = (rr - 13.5) ** 2 + (cc - 13.5) ** 2
    blob = np.exp(-r2 / (2 * 2.5**2)).astype(np.float32)
    x = jnp.asarray(np.broadcast_to(blob[None, :, :, None], SHAPES["mnist"]))
    for s in SEVERITIES:
        np.testing.assert_allclose(corruptions.rotate(x, s, 0), x, atol=0.03)
        f = params("scale")[s - 1]
        for img in np.asarray(corruptions.scale(x, s, 0))[..., 0]:
            spread = np.sqrt((r2 * img).sum() / img.sum() / 2)
            # shrunk by f or enlarged by 1 / f (edge truncation and resampling: 5%)
            assert min(abs(spread / 2.5 / t - 1) for t in (f, 1 / f)) < 0.05


# --------------------------------------------------------------------------------------------
# Official corrupted sets: CIFAR-10-C / CIFAR-100-C
# --------------------------------------------------------------------------------------------


def write_cifar_c(root, n_per_severity=4, name="fog", seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    imgs = rng.integers(0, 256, size=(5 * n_per_severity, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(rng.integers(0, 10, size=n_per_severity), 5).astype(np.uint8)
    np.save(root / f"{name}.npy", imgs)
    np.save(root / "labels.npy", labels)
    return imgs, labels


def test_cifar_c_block_arithmetic():
    assert corruptions.CIFAR_C_BLOCK == 10_000
    for s in SEVERITIES:  # the official 50,000-row files
        assert corruptions.cifar_c_rows(s) == slice((s - 1) * 10_000, s * 10_000)
        assert corruptions.cifar_c_rows(s, 50_000) == slice((s - 1) * 10_000, s * 10_000)
        assert corruptions.cifar_c_rows(s, 20) == slice((s - 1) * 4, s * 4)
    for bad in (0, 7, -5):
        with pytest.raises(ValueError, match="multiple of 5"):
            corruptions.cifar_c_rows(1, bad)
    for bad in (0, 6):
        with pytest.raises(ValueError, match=r"1\.\.5"):
            corruptions.cifar_c_rows(bad)


def test_load_cifar_c_reads_the_official_format(tmp_path):
    other, _ = write_cifar_c(tmp_path, name="gaussian_noise", seed=1)
    imgs, labels = write_cifar_c(tmp_path)  # (labels.npy is shared: the last one written)
    for s in SEVERITIES:
        x, y = corruptions.load_cifar_c(tmp_path, "fog", s)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (4, 32, 32, 3) and y.shape == (4,)
        np.testing.assert_array_equal(x, imgs[(s - 1) * 4 : s * 4].astype(np.float32) / 255)
        np.testing.assert_array_equal(y, labels[(s - 1) * 4 : s * 4])
        assert x.min() >= 0 and x.max() <= 1
    x, y = corruptions.load_cifar_c(str(tmp_path), "gaussian_noise", 2)  # str root, other file
    np.testing.assert_array_equal(x, other[4:8].astype(np.float32) / 255)
    np.testing.assert_array_equal(y, labels[4:8])


def test_load_cifar_c_full_size_file_maps_severity_to_its_10000_rows(tmp_path):
    n = 50_000
    imgs = np.lib.format.open_memmap(tmp_path / "snow.npy", "w+", np.uint8, (n, 32, 32, 3))
    tagged = [r for s in SEVERITIES for r in ((s - 1) * 10_000, s * 10_000 - 1)]
    for r in tagged:  # the row number in base 256 in the first pixel
        imgs[r, 0, 0] = (r // 65536, (r // 256) % 256, r % 256)
    imgs.flush()
    del imgs
    np.save(tmp_path / "labels.npy", np.repeat(np.arange(5, dtype=np.uint8), 10_000))
    for s in SEVERITIES:
        x, y = corruptions.load_cifar_c(tmp_path, "snow", s)
        assert x.shape == (10_000, 32, 32, 3) and y.shape == (10_000,)
        rows = np.round(x[[0, -1], 0, 0] * 255).astype(np.int64) @ np.array([65536, 256, 1])
        assert rows.tolist() == [(s - 1) * 10_000, s * 10_000 - 1]
        assert (y == s - 1).all()


def _garbage(path):
    path.write_bytes(b"this is not a numpy file\n" * 10)


def _truncated(path):
    np.save(path, np.zeros((20, 32, 32, 3), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickled(path):
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


CIFAR_BAD = {
    "missing images": ("fog.npy", lambda p: (p / "fog.npy").unlink(), "missing file"),
    "missing labels": ("labels.npy", lambda p: (p / "labels.npy").unlink(), "missing file"),
    "garbage images": ("fog.npy", lambda p: _garbage(p / "fog.npy"), "not a .npy"),
    "garbage labels": ("labels.npy", lambda p: _garbage(p / "labels.npy"), "not a .npy"),
    "truncated": ("fog.npy", lambda p: _truncated(p / "fog.npy"), "not a valid .npy"),
    "pickled": ("fog.npy", lambda p: _pickled(p / "fog.npy"), "not a valid .npy"),
    "grey": (
        "fog.npy",
        lambda p: np.save(p / "fog.npy", np.zeros((20, 32, 32, 1), np.uint8)),
        "shape",
    ),
    "3-d": ("fog.npy", lambda p: np.save(p / "fog.npy", np.zeros((20, 32, 32), np.uint8)), "shape"),
    "empty": (
        "fog.npy",
        lambda p: np.save(p / "fog.npy", np.zeros((0, 32, 32, 3), np.uint8)),
        "shape",
    ),
    "float": (
        "fog.npy",
        lambda p: np.save(p / "fog.npy", np.zeros((20, 32, 32, 3), np.float32)),
        "dtype",
    ),
    "not 5 blocks": (
        "fog.npy",
        lambda p: np.save(p / "fog.npy", np.zeros((21, 32, 32, 3), np.uint8)),
        "multiple of 5",
    ),
    "short labels": (
        "labels.npy",
        lambda p: np.save(p / "labels.npy", np.zeros(19, np.int64)),
        "19 labels",
    ),
    "2-d labels": (
        "labels.npy",
        lambda p: np.save(p / "labels.npy", np.zeros((20, 1), np.int64)),
        "shape",
    ),
    "float labels": (
        "labels.npy",
        lambda p: np.save(p / "labels.npy", np.zeros(20, np.float32)),
        "dtype",
    ),
    "label range": (
        "labels.npy",
        lambda p: np.save(p / "labels.npy", np.full(20, 100, np.int64)),
        "0..99",
    ),
}


@pytest.mark.parametrize("case", CIFAR_BAD)
def test_load_cifar_c_rejects_bad_files(tmp_path, case):
    filename, damage, what = CIFAR_BAD[case]
    write_cifar_c(tmp_path)
    damage(tmp_path)
    with pytest.raises(CorruptionDataError, match=what) as info:
        corruptions.load_cifar_c(tmp_path, "fog", 3)
    message = str(info.value)
    assert str(tmp_path / filename) in message
    assert "zenodo.org/records/2535967" in message and "zenodo.org/records/3555552" in message


def test_load_cifar_c_missing_folder_or_corruption(tmp_path):
    with pytest.raises(CorruptionDataError, match="missing folder") as info:
        corruptions.load_cifar_c(tmp_path / "CIFAR-10-C", "fog", 1)
    assert "CIFAR-10-C" in str(info.value) and "2535967" in str(info.value)
    write_cifar_c(tmp_path)
    with pytest.raises(CorruptionDataError, match="snow.npy") as info:
        corruptions.load_cifar_c(tmp_path, "snow", 1)
    assert "found in" in str(info.value) and "fog" in str(info.value)
    assert "3555552" in str(info.value)


def test_load_cifar_c_rejects_bad_arguments(tmp_path):
    write_cifar_c(tmp_path)
    for bad in (0, 6, 1.0):
        with pytest.raises(ValueError, match=r"1\.\.5"):
            corruptions.load_cifar_c(tmp_path, "fog", bad)
    for bad in ("../fog", "a/b", "", ".."):
        with pytest.raises(ValueError, match="plain name"):
            corruptions.load_cifar_c(tmp_path, bad, 1)


# --------------------------------------------------------------------------------------------
# Official corrupted sets: MNIST-C
# --------------------------------------------------------------------------------------------


def write_mnist_c(root, name="zigzag", n=6, seed=0):
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    imgs = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    np.save(root / name / "test_images.npy", imgs)
    np.save(root / name / "test_labels.npy", labels)
    return imgs, labels


def test_load_mnist_c_reads_the_official_format(tmp_path):
    imgs, labels = write_mnist_c(tmp_path)
    other, _ = write_mnist_c(tmp_path, name="fog", seed=1)
    x, y = corruptions.load_mnist_c(tmp_path, "zigzag")
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, imgs.astype(np.float32) / 255)
    np.testing.assert_array_equal(y, labels)
    x, _ = corruptions.load_mnist_c(str(tmp_path), "fog")
    np.testing.assert_array_equal(x, other.astype(np.float32) / 255)


MNIST_BAD = {
    "missing images": (
        "test_images.npy",
        lambda p: (p / "zigzag" / "test_images.npy").unlink(),
        "missing file",
    ),
    "missing labels": (
        "test_labels.npy",
        lambda p: (p / "zigzag" / "test_labels.npy").unlink(),
        "missing file",
    ),
    "garbage": (
        "test_images.npy",
        lambda p: _garbage(p / "zigzag" / "test_images.npy"),
        "not a .npy",
    ),
    "truncated": (
        "test_images.npy",
        lambda p: _truncated(p / "zigzag" / "test_images.npy"),
        "not a valid .npy",
    ),
    "no channel axis": (
        "test_images.npy",
        lambda p: np.save(p / "zigzag" / "test_images.npy", np.zeros((6, 28, 28), np.uint8)),
        "shape",
    ),
    "cifar-sized": (
        "test_images.npy",
        lambda p: np.save(p / "zigzag" / "test_images.npy", np.zeros((6, 32, 32, 3), np.uint8)),
        "shape",
    ),
    "float": (
        "test_images.npy",
        lambda p: np.save(p / "zigzag" / "test_images.npy", np.zeros((6, 28, 28, 1), np.float64)),
        "dtype",
    ),
    "short labels": (
        "test_labels.npy",
        lambda p: np.save(p / "zigzag" / "test_labels.npy", np.zeros(5, np.int64)),
        "5 labels",
    ),
    "label range": (
        "test_labels.npy",
        lambda p: np.save(p / "zigzag" / "test_labels.npy", np.full(6, 10, np.int64)),
        "0..9",
    ),
}


@pytest.mark.parametrize("case", MNIST_BAD)
def test_load_mnist_c_rejects_bad_files(tmp_path, case):
    filename, damage, what = MNIST_BAD[case]
    write_mnist_c(tmp_path)
    damage(tmp_path)
    with pytest.raises(CorruptionDataError, match=what) as info:
        corruptions.load_mnist_c(tmp_path, "zigzag")
    message = str(info.value)
    assert str(tmp_path / "zigzag" / filename) in message
    assert "github.com/google-research/mnist-c" in message


def test_load_mnist_c_missing_folders(tmp_path):
    with pytest.raises(CorruptionDataError, match="missing folder") as info:
        corruptions.load_mnist_c(tmp_path / "mnist_c", "fog")
    assert "mnist_c" in str(info.value) and "google-research/mnist-c" in str(info.value)
    write_mnist_c(tmp_path)
    with pytest.raises(CorruptionDataError, match="missing folder") as info:
        corruptions.load_mnist_c(tmp_path, "fog")
    message = str(info.value)
    assert str(tmp_path / "fog") in message and "test_images.npy" in message
    assert "found in" in message and "zigzag" in message
    with pytest.raises(ValueError, match="plain name"):
        corruptions.load_mnist_c(tmp_path, "../zigzag")

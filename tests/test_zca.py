"""ZCA (``satm_jax.zca``) against kornia's ``ZCAWhitening(eps=0.1)`` as MTT uses it.

The reference below is written independently in float64 NumPy from kornia's definition
(``zca_mean``): mean over samples, unbiased covariance ``Xc^T Xc / (n - 1)``, SVD
``cov = U diag(s) U^T``, ``T = U diag((s + eps)^-1/2) U^T``, ``T^-1 = U diag((s + eps)^1/2) U^T``,
whitened ``(x - mean) T`` on images flattened per sample.
"""

import numpy as np
import pytest

from satm_jax import zca

EPS = 0.1


def kornia_zca_reference(images, eps=EPS):
    """(mean, T, T_inv, U, s) of kornia's ZCA in float64, images flattened per sample."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / (len(x) - 1)
    u, s, _ = np.linalg.svd(cov)
    t = (u * (s + eps) ** -0.5) @ u.T
    t_inv = (u * (s + eps) ** 0.5) @ u.T
    return mean, t, t_inv, u, s


def _images(n, shape=(4, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    # Correlated pixels in [0, 1] (a smooth random field plus noise), like natural images.
    base = rng.random((n, 1, 1, shape[-1]))
    x = 0.6 * base + 0.3 * rng.random((n, *shape)) + 0.1 * rng.random((n, shape[0], 1, 1))
    return x.astype(np.float32)


def _close(a, b, rel=1e-5):
    b = np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=0, atol=rel * np.abs(b).max())


@pytest.mark.parametrize("n", [300, 20])  # full-rank covariance, and rank n - 1 < D = 48
def test_fit_matches_the_kornia_reference(n):
    x = _images(n)
    w = zca.fit_zca(x)
    mean, t, t_inv, _, _ = kornia_zca_reference(x)
    assert w.eps == EPS and w.image_shape == (4, 4, 3)
    assert w.mean.dtype == w.transform.dtype == w.inverse.dtype == np.float32
    _close(w.mean, mean)
    _close(w.transform, t)
    _close(w.inverse, t_inv)
    y = zca.apply_zca(w, x)
    assert y.dtype == np.float32 and y.shape == x.shape
    _close(y.reshape(n, -1), (x.reshape(n, -1) - mean) @ t, rel=2e-5)
    # New images (a test split) use the training mean and transform.
    x_new = _images(7, seed=1)
    _close(zca.apply_zca(w, x_new).reshape(7, -1), (x_new.reshape(7, -1) - mean) @ t, rel=2e-5)


def test_whitened_covariance_is_u_diag_s_over_s_plus_eps_u_transposed():
    x = _images(400, seed=2)
    w = zca.fit_zca(x)
    _, _, _, u, s = kornia_zca_reference(x)
    y = zca.apply_zca(w, x).reshape(len(x), -1).astype(np.float64)
    yc = y - y.mean(0)
    cov_y = yc.T @ yc / (len(y) - 1)
    expected = (u * (s / (s + EPS))) @ u.T
    np.testing.assert_allclose(cov_y, expected, rtol=0, atol=2e-5)
    # Not the identity: eps = 0.1 damps the low-variance directions.
    assert np.abs(np.diag(cov_y) - 1).max() > 0.1
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)


def test_invert_undoes_apply():
    x = _images(100, seed=3)
    w = zca.fit_zca(x)
    back = zca.invert_zca(w, zca.apply_zca(w, x))
    assert back.shape == x.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        w.transform.astype(np.float64) @ w.inverse.astype(np.float64), np.eye(48), atol=1e-4
    )


def test_flattening_order_does_not_change_the_whitened_images():
    x = _images(120, shape=(5, 3, 2), seed=4)  # NHWC
    nchw = x.transpose(0, 3, 1, 2)
    y_nhwc = zca.apply_zca(zca.fit_zca(x), x)
    w_nchw = zca.fit_zca(nchw)
    assert w_nchw.image_shape == (2, 5, 3)
    y_nchw = zca.apply_zca(w_nchw, nchw)
    np.testing.assert_allclose(y_nchw.transpose(0, 2, 3, 1), y_nhwc, rtol=0, atol=2e-5)


def test_chunked_accumulation_does_not_change_the_fit():
    x = _images(50, seed=5)
    a, b = zca.fit_zca(x), zca.fit_zca(x, chunk=7)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-7)
    np.testing.assert_allclose(a.transform, b.transform, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(zca.apply_zca(a, x), zca.apply_zca(b, x, chunk=9), atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="at least two"):
        zca.fit_zca(_images(1))
    with pytest.raises(ValueError, match="at least two"):
        zca.fit_zca(np.zeros((0, 4, 4, 3), np.float32))
    bad = _images(5)
    bad[2, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        zca.fit_zca(bad)
    w = zca.fit_zca(_images(10))
    with pytest.raises(ValueError, match=r"fitted on \(4, 4, 3\)"):
        zca.apply_zca(w, _images(3, shape=(4, 4, 1)))
    with pytest.raises(ValueError, match="fitted on"):
        zca.apply_zca(w, _images(3).transpose(0, 3, 1, 2))

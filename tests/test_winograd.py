"""Winograd F(2x2, 3x3) convolution: the same function, derivatives and hypergradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import matching, models, winograd
from tests.helpers import x64


def _lax(x, k, padding):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), ((padding, padding),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    "h,w,padding", [(8, 8, 1), (7, 9, 1), (28, 28, 3), (5, 6, 0), (3, 3, 0), (1, 1, 1)]
)
def test_winograd_equals_the_direct_convolution_in_float64(h, w, padding):
    with x64():
        kx, kk = jax.random.split(jax.random.PRNGKey(h * 31 + w))
        x = jax.random.normal(kx, (2, h, w, 3), jnp.float64)
        k = jax.random.normal(kk, (3, 3, 3, 4), jnp.float64)
        got, want = winograd.conv3x3(x, k, padding=padding), _lax(x, k, padding)
        assert got.shape == want.shape and got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_winograd_float32_error_is_a_few_ulps_of_the_direct_one():
    with x64():
        kx, kk = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, (4, 16, 16, 32), jnp.float64)
        k = jax.random.normal(kk, (3, 3, 32, 16), jnp.float64) / 17.0
        exact = _lax(x, k, 1)
        x32, k32 = x.astype(jnp.float32), k.astype(jnp.float32)
        direct = models.conv2d(x32, k32, padding=1, impl="patches").astype(jnp.float64)
        ours = winograd.conv3x3(x32, k32, padding=1).astype(jnp.float64)
        direct, ours = float(jnp.abs(direct - exact).max()), float(jnp.abs(ours - exact).max())
    assert ours < 4 * direct + 1e-6, (ours, direct)


def test_winograd_first_and_second_derivatives_equal_the_direct_ones_in_float64():
    """What trajectory matching differentiates: d/dx of a function of d(loss)/d(kernel)."""
    with x64():
        kx, kk, kc = jax.random.split(jax.random.PRNGKey(3), 3)
        x = jax.random.normal(kx, (2, 7, 6, 5), jnp.float64)
        k = jax.random.normal(kk, (3, 3, 5, 4), jnp.float64)
        c = jax.random.normal(kc, (2, 7, 6, 4), jnp.float64)

        def inner(conv, x, k):  # a loss whose kernel gradient depends on x nonlinearly
            return jnp.sum(jnp.tanh(conv(x, k)) * c)

        def outer(conv, x):
            gk = jax.grad(inner, argnums=2)(conv, x, k)
            return jnp.sum(gk**2)

        wino = lambda x, k: winograd.conv3x3(x, k, padding=1)
        direct = lambda x, k: _lax(x, k, 1)
        for argnums in (1, 2):
            np.testing.assert_allclose(
                jax.grad(inner, argnums=argnums)(wino, x, k),
                jax.grad(inner, argnums=argnums)(direct, x, k),
                rtol=1e-10,
                atol=1e-12,
            )
        np.testing.assert_allclose(
            jax.grad(outer, argnums=1)(wino, x),
            jax.grad(outer, argnums=1)(direct, x),
            rtol=1e-10,
            atol=1e-12,
        )


def test_the_exact_hypergradient_is_the_same_with_winograd_and_patches_in_float64():
    with x64():
        grads = {}
        for impl in ("patches", "winograd"):
            net = models.ConvNet(num_classes=3, width=8, depth=2, conv_impl=impl)
            params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 2), jnp.float64))
            params = jax.tree.map(lambda p: p.astype(jnp.float64), params["params"])
            target = jax.tree.map(lambda p: p + 0.01, params)
            x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 2), jnp.float64)
            y = jnp.arange(6) % 3
            batches = matching.sample_student_batches(jax.random.PRNGKey(2), 6, None, 4)
            apply_fn = models.make_apply_fn(net)

            def loss(x, a, apply_fn=apply_fn, params=params, target=target):
                return matching.matching_loss(apply_fn, x, y, a, params, target, batches)

            grads[impl] = jax.grad(loss, argnums=(0, 1))(x, jnp.asarray(0.05, jnp.float64))
        for a, b in zip(grads["patches"], grads["winograd"]):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


def test_conv2d_uses_winograd_only_where_it_applies(monkeypatch):
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(
        winograd, "conv3x3", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)
    )
    x8 = jnp.ones((1, 6, 6, 8))
    models.conv2d(x8, jnp.ones((3, 3, 8, 4)), padding=1, impl="winograd")  # Winograd
    models.conv2d(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 4)), padding=1, impl="winograd")
    models.conv2d(x8, jnp.ones((3, 3, 8, 4)), stride=2, padding=1, impl="winograd")
    models.conv2d(x8, jnp.ones((5, 5, 8, 4)), padding=2, impl="winograd")
    models.conv2d(x8, jnp.ones((3, 3, 8, 4)), padding=1, impl="patches")
    assert calls == [(3, 3, 8, 4)]


def test_winograd_refuses_other_kernels_and_too_small_inputs():
    with pytest.raises(ValueError, match="3x3 kernel"):
        winograd.conv3x3(jnp.ones((1, 8, 8, 2)), jnp.ones((5, 5, 2, 2)), padding=2)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        winograd.conv3x3(jnp.ones((1, 2, 2, 2)), jnp.ones((3, 3, 2, 2)), padding=0)

"""Relative (scale-free) image learning rates against hand computation."""

import jax.numpy as jnp
import numpy as np
import optax

from satm_jax import distill, scale_free


def _adam_by_hand(grads, lr, b1=0.9, b2=0.999, eps=1e-10):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


def test_relative_adam_is_adam_times_the_initial_rms():
    x0 = jnp.array([[1.0, -2.0], [3.0, 0.5]])
    rms = float(np.sqrt(np.mean(np.square(np.asarray(x0)))))
    tx = scale_free.relative_adam(0.02)
    state = tx.init(x0)
    grads = [np.array([[1e-4, -2e-4], [0.0, 5e-5]]), np.array([[3e-4, 1e-4], [2e-5, -5e-5]])]
    x = x0
    expected = _adam_by_hand(grads, 0.02 * rms)
    for g, e in zip(grads, expected):
        # params change, but the scale stays that of the initial set
        u, state = tx.update(jnp.asarray(g, jnp.float32), state, x)
        np.testing.assert_allclose(np.asarray(u), e, rtol=1e-4, atol=1e-9)  # float32
        x = optax.apply_updates(x, u) * 10.0


def test_the_same_relative_rate_means_the_same_on_any_scale():
    g = jnp.array([1e-3, -4e-3, 2e-3])
    for scale in (1e-2, 1.0, 1e3):
        x0 = scale * jnp.array([1.0, 2.0, -2.0])
        tx = scale_free.relative_adam(0.01)
        u, _ = tx.update(g * scale**2, tx.init(x0), x0)  # gradients of any size
        rel = float(jnp.linalg.norm(u) / jnp.linalg.norm(x0))
        np.testing.assert_allclose(rel, 0.01, rtol=2e-3)  # eps matters at 1e-7 gradients


def test_zero_initial_set_uses_unit_scale():
    tx = scale_free.scale_by_reference_rms(-0.5)
    u, _ = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(np.asarray(u), -0.5)


def test_distill_image_transform_selects_the_optimiser():
    x0 = jnp.full((2, 2), 2.0)
    g = jnp.full((2, 2), 1e-3)
    sgd = distill.make_image_transform(distill.DistillConfig(lr_img=100.0, img_momentum=0.0))
    u, _ = sgd.update(g, sgd.init(x0), x0, grad_fn=None)
    np.testing.assert_allclose(np.asarray(u), -0.1, rtol=1e-6)
    adam = distill.make_image_transform(
        distill.DistillConfig(img_optimizer="adam", lr_img_rel=0.05)
    )
    u, _ = adam.update(g, adam.init(x0), x0, grad_fn=None)
    np.testing.assert_allclose(np.asarray(u), -0.05 * 2.0, rtol=1e-5)

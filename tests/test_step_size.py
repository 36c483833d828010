"""The closed-form step-size initialisation and the step size learned in log space."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import distill, matching, step_size
from tests.helpers import distill_problem, flatten, tiny_problem, x64

N = 3


def test_best_constant_step_is_the_pooled_formula_by_hand():
    m = step_size.StepMoments(
        d_dot_g=jnp.array([2.0, 6.0]), g_sq=jnp.array([4.0, 9.0]), d_sq=jnp.array([1.0, 4.0])
    )
    # sum_s <d,G>/|d|^2 / sum_s |G|^2/|d|^2 = (2 + 1.5) / (4 + 2.25)
    np.testing.assert_allclose(float(step_size.best_constant_step(m)), 3.5 / 6.25, rtol=1e-6)


@pytest.mark.slow
def test_closed_form_minimises_the_first_order_loss_of_a_tiny_problem():
    with x64():
        _, apply_fn, start, target, x, y = tiny_problem(dtype=jnp.float64)
        batches = matching.sample_student_batches(jax.random.PRNGKey(3), 4, None, N)
        alpha = jnp.asarray(0.05, jnp.float64)
        # G by hand: N explicit SGD steps, summing the gradients.
        p, g_sum = start, None
        for n in range(N):
            p, g = matching.student_step(
                apply_fn, p, x, y, alpha, batches.indices[n], None, batches.keys[n]
            )
            g_sum = g if g_sum is None else jax.tree.map(jnp.add, g_sum, g)
        d, gv = flatten(start) - flatten(target), flatten(g_sum)
        expected = np.dot(d, gv) / np.dot(gv, gv)
        moments_fn = step_size.make_moments_fn(
            apply_fn, lambda k, v: v, lambda key: (start, target, batches)
        )
        m = moments_fn(jax.random.split(jax.random.PRNGKey(0), 1), x, y, alpha)
        got = float(step_size.best_constant_step(m))
        np.testing.assert_allclose(got, expected, rtol=1e-10)
        # ... and it is the minimiser of the quadratic ||d - a G||^2 / ||d||^2.
        q = lambda a: np.sum((d - a * gv) ** 2) / np.sum(d**2)  # noqa: E731
        assert q(got) < q(got * 1.01) and q(got) < q(got * 0.99)


def test_calibrate_iterates_to_a_fixed_point_and_keeps_the_floor():
    calls = []

    def moments_fn(keys, images, labels, alpha):
        calls.append(float(alpha))
        # G grows with alpha: <d,G> = 1, ||G||^2 = (1 + alpha)^2 -> alpha* = 1 / (1 + alpha)^2
        a = jnp.asarray(alpha)
        return step_size.StepMoments(jnp.ones(1), jnp.reshape((1 + a) ** 2, (1,)), jnp.ones(1))

    alpha, hist = step_size.calibrate(moments_fn, None, None, None, 0.0, refinements=30)
    np.testing.assert_allclose(alpha, 1.0 / (1.0 + alpha) ** 2, rtol=1e-4)
    assert hist[0] == 0.0 and hist[1] == 1.0 and len(calls) == 31

    def pointing_away(keys, images, labels, alpha):
        return step_size.StepMoments(-jnp.ones(1), jnp.ones(1), jnp.ones(1))

    alpha, hist = step_size.calibrate(pointing_away, None, None, None, 0.01)
    assert alpha == 0.01 and hist == [0.01]

    def tiny(keys, images, labels, alpha):
        return step_size.StepMoments(jnp.ones(1) * 1e-9, jnp.ones(1), jnp.ones(1))

    alpha, _ = step_size.calibrate(tiny, None, None, None, 0.01, refinements=0, floor=1e-5)
    assert alpha == 1e-5


@pytest.mark.slow
def test_calibrated_outer_loop_starts_at_the_closed_form_step():
    cfg, apply_fn, bank, x, y = distill_problem(lr_init="closed_form", lr_init_samples=4)
    state = distill.init_state(cfg, x, y)
    new, hist = distill.calibrate_step_size(state, bank, apply_fn, lambda k, v: v, cfg)
    assert hist[0] == pytest.approx(cfg.lr_teacher) and float(new.syn_lr) == hist[-1]
    assert float(new.syn_lr) != cfg.lr_teacher
    # Only the step size changed; the outer loop's key is untouched.
    np.testing.assert_array_equal(new.key, state.key)
    np.testing.assert_array_equal(new.images, state.images)


def test_log_space_step_size_moves_by_a_factor_by_hand():
    cfg = distill.DistillConfig(lr_space="log", lr_log_lr=0.05, lr_teacher=0.01)
    tx = distill.make_lr_transform(cfg)
    alpha = jnp.asarray(0.02, jnp.float32)
    state = tx.init(alpha)
    # Adam's first step is -lr * sign(g): log(alpha) moves by -0.05, whatever |g|.
    for g in (1e-6, 3e2):
        new, _ = distill.update_step_size(cfg, tx, jnp.asarray(g, jnp.float32), alpha, state)
        np.testing.assert_allclose(float(new), 0.02 * np.exp(-0.05), rtol=1e-5)
    new, _ = distill.update_step_size(cfg, tx, jnp.asarray(-1.0, jnp.float32), alpha, state)
    np.testing.assert_allclose(float(new), 0.02 * np.exp(0.05), rtol=1e-5)
    lin = dataclasses.replace(cfg, lr_space="linear", lr_lr=1e-3, lr_momentum=0.0)
    txl = distill.make_lr_transform(lin)
    new, _ = distill.update_step_size(
        lin, txl, jnp.asarray(2.0, jnp.float32), alpha, txl.init(alpha)
    )
    np.testing.assert_allclose(float(new), 0.02 - 1e-3 * 2.0, rtol=1e-6)

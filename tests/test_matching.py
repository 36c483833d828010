"""The hypergradient: finite differences in float64, truncation, trajectory reusing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from satm_jax import augment, matching
from tests.helpers import tiny_problem, tree_allclose, x64

N_STEPS = 3


def _setup(dtype, n_steps=N_STEPS, batch_syn=None, n=4, seed=0):
    net, apply_fn, start, target, images, labels = tiny_problem(dtype, n=n, seed=seed)
    batches = matching.sample_student_batches(jax.random.PRNGKey(7), n, batch_syn, n_steps)
    return apply_fn, start, target, images, labels, batches


@pytest.mark.slow
def test_exact_hypergradient_matches_central_finite_differences_float64():
    with x64():
        apply_fn, start, target, images, labels, batches = _setup(jnp.float64)
        aug = augment.make_augment("color_crop_cutout_flip_scale_rotate")
        lr = jnp.asarray(0.05, jnp.float64)

        def loss(x, a):
            return matching.matching_loss(
                apply_fn, x, labels, a, start, target, batches, augment_fn=aug
            )

        gx, ga = jax.grad(loss, argnums=(0, 1))(images, lr)
        assert gx.dtype == jnp.float64
        eps = 1e-5
        rng = np.random.default_rng(0)
        for _ in range(3):  # random directions
            d = jnp.asarray(rng.normal(size=images.shape))
            fd = (loss(images + eps * d, lr) - loss(images - eps * d, lr)) / (2 * eps)
            np.testing.assert_allclose(float(jnp.vdot(gx, d)), float(fd), rtol=1e-6, atol=1e-10)
        for idx in [(0, 3, 4, 0), (2, 7, 0, 0)]:  # single pixels
            e = jnp.zeros_like(images).at[idx].set(1.0)
            fd = (loss(images + eps * e, lr) - loss(images - eps * e, lr)) / (2 * eps)
            np.testing.assert_allclose(float(gx[idx]), float(fd), rtol=1e-5, atol=1e-10)
        fd_a = (loss(images, lr + eps) - loss(images, lr - eps)) / (2 * eps)
        np.testing.assert_allclose(float(ga), float(fd_a), rtol=1e-6)


def test_exact_hypergradient_with_minibatches_matches_finite_differences_float64():
    with x64():
        apply_fn, start, target, images, labels, batches = _setup(
            jnp.float64, n_steps=4, batch_syn=3, n=5
        )
        assert batches.weights is not None  # 5 images in chunks of 3: padded last chunk
        lr = jnp.asarray(0.05, jnp.float64)
        loss = lambda x: matching.matching_loss(apply_fn, x, labels, lr, start, target, batches)  # noqa: E731
        g = jax.grad(loss)(images)
        d = jnp.asarray(np.random.default_rng(1).normal(size=images.shape))
        eps = 1e-5
        fd = (loss(images + eps * d) - loss(images - eps * d)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.vdot(g, d)), float(fd), rtol=1e-6)


@pytest.mark.slow
def test_truncation_with_k_equal_n_is_the_exact_hypergradient():
    apply_fn, start, target, images, labels, batches = _setup(jnp.float32)
    lr = jnp.asarray(0.05)

    def grads(truncate):
        return jax.grad(
            lambda x, a: matching.matching_loss(
                apply_fn, x, labels, a, start, target, batches, truncate=truncate
            ),
            argnums=(0, 1),
        )(images, lr)

    tree_allclose(grads(None), grads(N_STEPS), rtol=0, atol=0)


@pytest.mark.slow
def test_truncated_hypergradient_differentiates_only_the_last_k_steps():
    apply_fn, start, target, images, labels, batches = _setup(jnp.float32, n_steps=4)
    lr = jnp.asarray(0.05)
    k = 2
    # Independent construction: the first N-K steps see X as a constant.
    x_const = jnp.array(images)
    head, _ = matching.unroll(apply_fn, start, x_const, labels, lr, batches.slice(0, 4 - k))

    def suffix(x):
        final, _ = matching.unroll(apply_fn, head, x, labels, lr, batches.slice(4 - k, 4))
        return matching.normalized_distance(final, start, target)

    expected = jax.grad(suffix)(images)
    got = jax.grad(
        lambda x: matching.matching_loss(
            apply_fn, x, labels, lr, start, target, batches, truncate=k
        )
    )(images)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    exact = jax.grad(
        lambda x: matching.matching_loss(apply_fn, x, labels, lr, start, target, batches)
    )(images)
    assert not np.allclose(got, exact)  # truncation does change the gradient
    # ... but not the loss value
    l_t = matching.matching_loss(apply_fn, images, labels, lr, start, target, batches, truncate=k)
    l_e = matching.matching_loss(apply_fn, images, labels, lr, start, target, batches)
    np.testing.assert_allclose(l_t, l_e, rtol=1e-6)


@pytest.mark.slow
def test_remat_does_not_change_the_hypergradient():
    apply_fn, start, target, images, labels, batches = _setup(jnp.float32)
    g = [
        jax.grad(
            lambda x: matching.matching_loss(
                apply_fn, x, labels, 0.05, start, target, batches, remat=r
            )
        )(images)
        for r in (True, False)
    ]
    np.testing.assert_allclose(g[0], g[1], rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_suffix_from_the_prefix_reproduces_the_truncated_gradient():
    """Trajectory reusing's building block: restarting from theta_{N-K} changes nothing."""
    apply_fn, start, target, images, labels, batches = _setup(jnp.float32, n_steps=5)
    lr = jnp.asarray(0.05)
    k = 2
    prefix = matching.run_prefix(apply_fn, start, images, labels, lr, batches, 5 - k)
    g_tr = jax.grad(
        lambda x: matching.suffix_loss(
            apply_fn, x, labels, lr, prefix, start, target, batches, 5 - k
        )[0]
    )(images)
    g_tuh = jax.grad(
        lambda x: matching.matching_loss(
            apply_fn, x, labels, lr, start, target, batches, truncate=k
        )
    )(images)
    np.testing.assert_allclose(g_tr, g_tuh, rtol=1e-6, atol=1e-8)


def test_first_order_step_size_gradient_closed_form():
    apply_fn, start, target, images, labels, batches = _setup(jnp.float32)
    lr = jnp.asarray(0.05)
    prefix = matching.run_prefix(apply_fn, start, images, labels, lr, batches, 0)
    loss, aux = matching.suffix_loss(
        apply_fn, images, labels, lr, prefix, start, target, batches, 0
    )
    # theta_N = theta_0 - alpha * G exactly, for plain SGD steps.
    tree_allclose(
        aux.final_params,
        jax.tree.map(lambda s, g: s - lr * g, start, aux.grad_sum),
        rtol=1e-5,
        atol=1e-6,
    )
    g = matching.first_order_lr_grad(aux.final_params, aux.grad_sum, start, target)
    diff = jax.tree.map(jnp.subtract, aux.final_params, target)
    expected = (
        -2 * optax.tree_utils.tree_vdot(diff, aux.grad_sum) / matching.tree_sq_dist(start, target)
    )
    np.testing.assert_allclose(g, expected, rtol=1e-6)


@pytest.mark.slow
def test_first_order_step_size_gradient_equals_backprop_when_n_is_one():
    with x64():
        apply_fn, start, target, images, labels, batches = _setup(jnp.float64, n_steps=1)
        lr = jnp.asarray(0.05, jnp.float64)
        g_bp = jax.grad(
            lambda a: matching.matching_loss(apply_fn, images, labels, a, start, target, batches)
        )(lr)
        prefix = matching.run_prefix(apply_fn, start, images, labels, lr, batches, 0)
        _, aux = matching.suffix_loss(
            apply_fn, images, labels, lr, prefix, start, target, batches, 0
        )
        g_fo = matching.first_order_lr_grad(aux.final_params, aux.grad_sum, start, target)
        np.testing.assert_allclose(float(g_fo), float(g_bp), rtol=1e-10)


@pytest.mark.slow
def test_window_step_size_gradient_sums_only_the_differentiated_steps():
    apply_fn, start, target, images, labels, batches = _setup(jnp.float32)
    lr, n_pre = jnp.asarray(0.05), N_STEPS - 2
    prefix = matching.run_prefix(apply_fn, start, images, labels, lr, batches, n_pre)
    _, aux = matching.suffix_loss(
        apply_fn, images, labels, lr, prefix, start, target, batches, n_pre, window_grad_sum=True
    )
    # G_K by hand: the gradients of the last two steps, taken from theta_{N-K}.
    p, g_window = prefix.params, jax.tree.map(jnp.zeros_like, start)
    for n in range(n_pre, N_STEPS):
        w = None if batches.weights is None else batches.weights[n]
        p, g = matching.student_step(
            apply_fn, p, images, labels, lr, batches.indices[n], w, batches.keys[n]
        )
        g_window = jax.tree.map(jnp.add, g_window, g)
    tree_allclose(aux.grad_sum, g_window, rtol=1e-5, atol=1e-7)
    # theta_N = theta_{N-K} - alpha * G_K, and the gradient is the closed form with G_K.
    tree_allclose(
        aux.final_params,
        jax.tree.map(lambda s, g: s - lr * g, prefix.params, g_window),
        rtol=1e-5,
        atol=1e-6,
    )
    diff = jax.tree.map(jnp.subtract, aux.final_params, target)
    expected = (
        -2 * optax.tree_utils.tree_vdot(diff, g_window) / matching.tree_sq_dist(start, target)
    )
    g = matching.first_order_lr_grad(aux.final_params, aux.grad_sum, start, target)
    np.testing.assert_allclose(g, expected, rtol=1e-5)


def test_window_step_size_gradient_equals_truncated_backprop_when_k_is_one():
    # With K = 1 the differentiated step's gradient is taken at the constant theta_{N-1}, so
    # the window's first-order step-size gradient is the truncated graph's exact one; the
    # all-steps form (SATM's) is not.
    with x64():
        apply_fn, start, target, images, labels, batches = _setup(jnp.float64)
        lr, n_pre = jnp.asarray(0.05, jnp.float64), N_STEPS - 1
        g_bp = jax.grad(
            lambda a: matching.matching_loss(
                apply_fn, images, labels, a, start, target, batches, truncate=1
            )
        )(lr)
        prefix = matching.run_prefix(apply_fn, start, images, labels, lr, batches, n_pre)
        grads = {}
        for window in (True, False):
            _, aux = matching.suffix_loss(
                apply_fn,
                images,
                labels,
                lr,
                prefix,
                start,
                target,
                batches,
                n_pre,
                window_grad_sum=window,
            )
            grads[window] = float(
                matching.first_order_lr_grad(aux.final_params, aux.grad_sum, start, target)
            )
        np.testing.assert_allclose(grads[True], float(g_bp), rtol=1e-10)
        assert abs(grads[False] - float(g_bp)) > 1e-3 * abs(float(g_bp))


def test_student_batches_walk_permutations():
    b = matching.sample_student_batches(jax.random.PRNGKey(0), 10, 4, 7)
    assert b.indices.shape == (7, 4) and b.keys.shape == (7, 2)
    idx, w = np.asarray(b.indices), np.asarray(b.weights)
    # 3 chunks per permutation (4 + 4 + 2 real, 2 padding); each permutation covers all 10.
    for p in range(2):
        rows = slice(3 * p, 3 * p + 3)
        real = idx[rows][w[rows] > 0]
        assert sorted(real.tolist()) == list(range(10))
    full = matching.sample_student_batches(jax.random.PRNGKey(0), 10, None, 3)
    assert full.weights is None and np.all(np.asarray(full.indices) == np.arange(10))


def test_bad_truncation_is_refused():
    with pytest.raises(ValueError, match="truncate"):
        matching.num_prefix_steps(5, 6)
    with pytest.raises(ValueError, match="truncate"):
        matching.num_prefix_steps(5, 0)


def test_default_truncation_is_ceil_n_over_three_and_at_least_one():
    assert [matching.default_truncation(n) for n in (1, 2, 3, 4, 20, 50)] == [1, 1, 1, 2, 7, 17]


@pytest.mark.parametrize(
    "soft_labels, batch_syn, track, truncate",
    [(False, None, False, None), (True, 3, True, 2)],
    ids=["hard-full-exact", "soft-minibatch-gradsum-truncated"],
)
def test_forward_over_reverse_gives_the_reverse_over_reverse_gradients_float64(
    soft_labels, batch_syn, track, truncate
):
    """``second_order="forward"`` (custom VJP) against JAX's reverse mode through the scan:
    the gradients in the images, the step size, float labels, the start parameters and the
    gradient sum's input, with DSA, padded minibatches and truncation."""
    with x64():
        apply_fn, start, target, images, labels, batches = _setup(
            jnp.float64, n_steps=4, batch_syn=batch_syn, n=5
        )
        if soft_labels:
            labels = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (5, 2), jnp.float64))
        aug = augment.make_augment("color_crop_cutout_flip_scale_rotate")
        n_pre = matching.num_prefix_steps(batches.num_steps, truncate)

        def loss(second_order, x, a, y, p0, gs0):
            prefix = matching.run_prefix(apply_fn, p0, x, y, a, batches, n_pre, augment_fn=aug)
            if track:  # a differentiable grad_sum input, and the sum in the loss
                prefix = prefix._replace(grad_sum=gs0)
            value, aux = matching.suffix_loss(
                apply_fn, x, y, a, prefix, start, target, batches, n_pre,
                augment_fn=aug, second_order=second_order, window_grad_sum=not track,
            )  # fmt: skip
            return value + 0.1 * matching.tree_sq_dist(aux.grad_sum, target)

        a = jnp.asarray(0.05, jnp.float64)
        gs0 = jax.tree.map(lambda p: 0.1 * p, start)
        argnums = (1, 2, 3, 4, 5) if soft_labels else (1, 2, 4, 5)
        grads = {
            mode: jax.value_and_grad(loss, argnums=argnums)(mode, images, a, labels, start, gs0)
            for mode in ("reverse", "forward")
        }
        (v_r, g_r), (v_f, g_f) = grads["reverse"], grads["forward"]
        assert float(v_r) == float(v_f)
        assert float(jnp.max(jnp.abs(g_r[0]))) > 0  # the image gradient is not trivially zero
        tree_allclose(g_f, g_r, rtol=1e-9, atol=1e-13)


def test_second_order_modes_are_checked_and_auto_is_forward_on_the_cpu():
    assert matching.resolve_second_order("auto") == (
        "forward" if jax.default_backend() == "cpu" else "reverse"
    )
    assert matching.resolve_second_order("reverse") == "reverse"
    with pytest.raises(ValueError, match="second_order must be one of"):
        matching.resolve_second_order("backward")

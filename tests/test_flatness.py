"""Flatness measures of a finished set, against dense linear algebra and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import augment, distill, flatness, matching
from tests.helpers import synthetic_bank, tiny_problem, x64

B = np.array(
    [[2.0, 0.3, -0.4, 0.0], [0.3, -3.5, 0.2, 0.1], [-0.4, 0.2, 1.0, 0.5], [0, 0.1, 0.5, 0.7]]
)


def _cubic(x):
    return 0.5 * x @ jnp.asarray(B) @ x + 0.3 * jnp.sum(jnp.sin(x) ** 3) + jnp.sum(x**4) / 12


def test_hvp_matches_central_differences_of_the_gradient_in_float64():
    with x64():
        x = jnp.array([0.3, -1.1, 0.7, 2.0])
        v = jnp.array([1.0, 0.5, -0.2, 0.3])
        g = jax.grad(_cubic)
        h = 1e-6
        fd = (g(x + h * v) - g(x - h * v)) / (2 * h)
        np.testing.assert_allclose(flatness.hvp(_cubic, x, v), fd, rtol=1e-8, atol=1e-9)


def test_power_iteration_finds_the_eigenvalue_of_largest_magnitude_with_its_sign():
    with x64():
        x = jnp.array([0.1, -0.2, 0.05, 0.3])
        dense = np.asarray(jax.hessian(_cubic)(x))
        eig = np.linalg.eigvalsh(dense)
        top = eig[np.argmax(np.abs(eig))]
        assert top < 0  # the negative direction dominates: the sign must survive
        got = flatness.dominant_hessian_eigenvalue(_cubic, x, iterations=200)
        assert float(got) == pytest.approx(top, rel=1e-6)


def test_top_eigenvalue_is_the_largest_even_where_a_negative_one_dominates():
    with x64():
        x = jnp.array([0.1, -0.2, 0.05, 0.3])
        eig = np.linalg.eigvalsh(np.asarray(jax.hessian(_cubic)(x)))
        assert abs(eig[0]) > abs(eig[-1]) > 0  # negative dominant, positive largest
        largest, dominant = flatness.hessian_eigenvalues(_cubic, x, iterations=200)
        assert float(largest) == pytest.approx(eig[-1], rel=1e-6)
        assert float(dominant) == pytest.approx(eig[0], rel=1e-6)
        assert float(flatness.top_hessian_eigenvalue(_cubic, x, iterations=200)) == float(largest)
        # A positive dominant eigenvalue is the largest: returned as it is, no second iteration.
        a = jnp.diag(jnp.array([4.0, -1.0, 0.5]))
        f = lambda v: 0.5 * v @ a @ v  # noqa: E731
        largest, dominant = flatness.hessian_eigenvalues(f, jnp.zeros(3), iterations=100)
        assert float(largest) == float(dominant) == pytest.approx(4.0, rel=1e-9)
        # Every eigenvalue negative: the largest is the one nearest zero.
        b = jnp.diag(jnp.array([-4.0, -1.0, -0.5]))
        g = lambda v: 0.5 * v @ b @ v  # noqa: E731
        largest, dominant = flatness.hessian_eigenvalues(g, jnp.zeros(3), iterations=200)
        assert float(largest) == pytest.approx(-0.5, rel=1e-6)
        assert float(dominant) == pytest.approx(-4.0, rel=1e-6)


def _scale_free(x):
    # A loss of each image's direction only (as an instance-normalised network's), coupled
    # across images, with curvature of both signs.
    u = x / jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=1)[:, None]
    w = jnp.arange(1.0, 1.0 + u.size).reshape(u.shape) / u.size
    return jnp.sum(jnp.sin(3 * u) * w) + (jnp.sum(u[0] * u[1]) - 0.5 * jnp.sum(u[2])) ** 2


def test_both_power_iterations_trace_the_hessian_vector_product_once():
    # The Hessian-vector product of a matching loss is the costly part to compile: the dominant
    # and the shifted iteration share one traced product (a loop body), and measure() batches
    # the plain and the scaled operator over that same trace.
    traces = []

    def counted(x):
        traces.append(1)
        return _cubic(x)

    x = jnp.array([0.1, -0.2, 0.05, 0.3])
    largest, dominant = jax.jit(lambda x: flatness.hessian_eigenvalues(counted, x, iterations=50))(
        x
    )
    assert len(traces) == 1
    assert float(dominant) < 0 < float(largest)  # the shifted iteration ran on that trace
    traces.clear()
    jax.jit(lambda x: flatness.dominant_hessian_eigenvalue(counted, x, iterations=5))(x)
    assert len(traces) == 1


def test_eigenvalues_batched_over_scales_equal_separate_calls_when_only_one_needs_the_shift():
    # measure() vmaps hessian_eigenvalues over (ones, per-image scale): the batched while loop
    # must keep each member's result although only one of them runs the shifted iteration.
    with x64():
        x = jnp.array([0.1, -0.2, 0.05, 0.3])
        scales = jnp.stack([jnp.ones(4), jnp.array([0.2, 0.1, 3.0, 3.0])])
        eig = lambda s: flatness.hessian_eigenvalues(_cubic, x, iterations=60, scale=s)  # noqa: E731
        largest, dominant = jax.vmap(eig)(scales)
        separate = [eig(s) for s in scales]
        assert float(dominant[0]) < 0 < float(dominant[1])  # one shifted, one not
        for i, (lg, dom) in enumerate(separate):
            assert float(largest[i]) == pytest.approx(float(lg), rel=1e-12)
            assert float(dominant[i]) == pytest.approx(float(dom), rel=1e-12)
        dense = np.asarray(jax.hessian(_cubic)(x))
        for i, s in enumerate(np.asarray(scales)):
            want = np.linalg.eigvalsh(s[:, None] * dense * s[None, :])[-1]
            assert float(largest[i]) == pytest.approx(want, rel=1e-6)


def test_scaled_eigenvalue_ignores_rescaled_images_and_matches_the_dense_s_h_s():
    with x64():
        x = jnp.array([[0.3, -1.1, 0.7, 2.0], [1.0, 0.5, -0.2, 0.3], [-0.4, 0.9, 0.1, 0.6]])
        c = jnp.array([0.5, 2.0, 3.0])[:, None]
        s = flatness.per_example_scale(x)
        np.testing.assert_allclose(s[:, 0], np.linalg.norm(np.asarray(x), axis=1), rtol=1e-12)
        h = np.asarray(jax.hessian(_scale_free)(x)).reshape(x.size, x.size)
        d = np.asarray(s).reshape(-1)
        dense = np.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1]
        got = flatness.top_hessian_eigenvalue(_scale_free, x, iterations=300, scale=s)
        assert float(got) == pytest.approx(dense, rel=1e-6)
        moved = flatness.top_hessian_eigenvalue(
            _scale_free, c * x, iterations=300, scale=flatness.per_example_scale(c * x)
        )
        assert float(moved) == pytest.approx(float(got), rel=1e-6)
        # The plain eigenvalue does change under the same rescaling.
        plain = flatness.top_hessian_eigenvalue(_scale_free, x, iterations=300)
        plain_moved = flatness.top_hessian_eigenvalue(_scale_free, c * x, iterations=300)
        assert abs(float(plain_moved) - float(plain)) > 0.1 * abs(float(plain))


def test_an_instance_normalised_networks_matching_loss_ignores_rescaled_images():
    # The premise of the scaled eigenvalue: instance norm after the first convolution removes
    # each image's scale (exactly but for the normalisation's epsilon).
    with x64():
        apply_fn, params, images, labels, dcfg = _bank_problem(res=4)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        images = images.astype(jnp.float64)
        bank = synthetic_bank(params, num_experts=2, epochs=4, seed=0)
        t = flatness.draw_trajectories(bank, jax.random.PRNGKey(1), 2, 4, dcfg)
        lr = jnp.asarray(0.05, jnp.float64)
        aug = augment.make_augment("none")
        f = flatness.fixed_matching_loss(apply_fn, labels, lr, t, augment_fn=aug)
        c = jnp.array([0.5, 2.0, 3.0, 1.5]).reshape(4, 1, 1, 1)
        assert float(f(c * images)) == pytest.approx(float(f(images)), rel=1e-4)
        assert float(f(-images)) != pytest.approx(float(f(images)), rel=1e-4)  # positive only


def test_worst_case_increase_reaches_the_quadratic_maximum_and_respects_the_ball():
    with x64():
        a = jnp.diag(jnp.array([5.0, 1.0, 0.2]))
        f = lambda x: 0.5 * x @ a @ x  # noqa: E731
        x0 = jnp.zeros(3)
        r = 0.2
        got = flatness.worst_case_increase(f, x0, r, steps=30, radius_scale="absolute")
        assert float(got) == pytest.approx(0.5 * 5.0 * r**2, rel=1e-6)
        # relative radius: the ball scales with ||x||; at x = (1, 0, 0) the maximum of
        # f(x + d) - f(x) over ||d|| <= r ||x|| is 5 r + 2.5 r^2 (along the first axis)
        x1 = jnp.array([1.0, 0.0, 0.0])
        got = flatness.worst_case_increase(f, x1, r, steps=30)
        assert float(got) == pytest.approx(5 * r + 2.5 * r**2, rel=1e-6)
        assert float(flatness.worst_case_increase(f, 3 * x1, r, steps=30)) == pytest.approx(
            9 * (5 * r + 2.5 * r**2), rel=1e-6
        )


def test_per_example_ball_bounds_every_slice():
    with x64():
        x = jnp.array([[1.0, 0.0], [0.0, 10.0]])
        w = jnp.array([[3.0, 1.0], [1.0, 0.1]])
        f = lambda z: jnp.sum(w * z**2)  # noqa: E731
        r = 0.1
        got = flatness.worst_case_increase(f, x, r, steps=40, ball="per_example")
        # each row moves within 0.1 ||x_i|| along its own steepest direction
        best = (3 * (1 + r) ** 2 - 3) + (0.1 * (10 + 10 * r) ** 2 - 0.1 * 100)
        assert float(got) == pytest.approx(best, rel=1e-4)
        glob = flatness.worst_case_increase(f, x, r, steps=40, ball="global")
        assert float(glob) > float(got)  # one ball of radius 0.1 ||X|| lets row 0 move far more


def _bank_problem(res=8):
    _, apply_fn, params, _, images, labels = tiny_problem(n=4, res=res)
    cfg = distill.DistillConfig(
        syn_steps=3, expert_epochs=1, min_start_epoch=0, max_start_epoch=2, batch_syn=None
    )
    return apply_fn, params, images, labels, cfg


@pytest.mark.slow
def test_fixed_matching_loss_is_the_mean_over_its_drawn_trajectories():
    apply_fn, params, images, labels, dcfg = _bank_problem()
    bank = synthetic_bank(params, num_experts=2, epochs=4)
    aug = augment.make_augment("crop_flip")
    traj = flatness.draw_trajectories(bank, jax.random.PRNGKey(3), 3, images.shape[0], dcfg)
    lr = jnp.asarray(0.05, jnp.float32)
    f = flatness.fixed_matching_loss(apply_fn, labels, lr, traj, augment_fn=aug)
    by_hand = np.mean(
        [
            matching.matching_loss(
                apply_fn,
                images,
                labels,
                lr,
                jax.tree.map(lambda t, i=i: t[i], traj["start"]),
                jax.tree.map(lambda t, i=i: t[i], traj["target"]),
                jax.tree.map(lambda t, i=i: t[i], traj["batches"]),
                augment_fn=aug,
            )
            for i in range(3)
        ]
    )
    assert float(f(images)) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(f(images)) == float(f(images))  # deterministic
    # another bank, same key: the same minibatches and augmentation keys (a paired draw)
    other = synthetic_bank(params, num_experts=2, epochs=4, seed=9)
    traj2 = flatness.draw_trajectories(other, jax.random.PRNGKey(3), 3, images.shape[0], dcfg)
    np.testing.assert_array_equal(traj2["batches"].keys, traj["batches"].keys)
    assert not np.allclose(jax.tree.leaves(traj2["start"])[0], jax.tree.leaves(traj["start"])[0])


@pytest.mark.slow
def test_measure_on_a_tiny_set_against_its_dense_hessian():
    with x64():
        apply_fn, params, images, labels, dcfg = _bank_problem(res=4)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        images = images.astype(jnp.float64)
        aug = augment.make_augment("none")
        lr = jnp.asarray(0.05, jnp.float64)

        def loss_on(seed):
            bank = synthetic_bank(params, num_experts=2, epochs=4, seed=seed)
            t = flatness.draw_trajectories(bank, jax.random.PRNGKey(1), 2, 4, dcfg)
            return flatness.fixed_matching_loss(apply_fn, labels, lr, t, augment_fn=aug)

        sampled, held = loss_on(0), loss_on(5)
        cfg = flatness.FlatnessConfig(samples=2, power_iterations=300, ascent_steps=10)
        out = flatness.measure(cfg, images, sampled, held)
        assert out["generalisation_gap"] == pytest.approx(
            float(held(images) - sampled(images)), rel=1e-9
        )
        dense = jax.hessian(held)(images).reshape(images.size, images.size)
        eig = np.linalg.eigvalsh(np.asarray(dense))
        assert out["hessian_top_eig"] == pytest.approx(eig[-1], rel=1e-3)
        assert out["hessian_dominant_eig"] == pytest.approx(eig[np.argmax(np.abs(eig))], rel=1e-3)
        d = np.asarray(flatness.per_example_scale(images)).reshape(-1)
        scaled = np.linalg.eigvalsh(d[:, None] * np.asarray(dense) * d[None, :])[-1]
        assert out["hessian_top_eig_scaled"] == pytest.approx(scaled, rel=1e-3)
        r = 0.01 * float(jnp.linalg.norm(images))
        assert out["radius"] == pytest.approx(r, rel=1e-9)
        g = jax.grad(held)(images)
        sam_point = float(held(images + r * g / jnp.linalg.norm(g)) - held(images))
        # the ascent does at least as well as SAM's one step, and not much better than the
        # second-order estimate at that step's size (the loss is nearly linear at this radius)
        quad = r * float(jnp.linalg.norm(g)) + 0.5 * r**2 * np.abs(eig).max()
        assert sam_point <= out["worst_case_increase"] <= 1.1 * quad


def test_config_is_validated():
    with pytest.raises(ValueError, match="ball"):
        flatness.FlatnessConfig(ball="per_class").validate()
    with pytest.raises(ValueError, match="radius > 0"):
        flatness.FlatnessConfig(radius=0.0).validate()

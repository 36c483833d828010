"""The sharpness-aware Optax transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from satm_jax import sharpness
from tests.helpers import flatten, tree_allclose

A = jnp.array([[3.0, 0.5, 0.0], [0.5, 1.0, -0.2], [0.0, -0.2, 2.0]])


def loss(w):
    """A non-quadratic loss on a dict of parameters."""
    x = w["a"]
    return 0.5 * x @ A @ x + jnp.sum(jnp.sin(w["b"])) + 0.1 * jnp.sum(w["b"] ** 4)


def params0():
    return {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.3, -1.2], [2.0, 0.1]])}


grad = jax.grad(loss)
grad_fn = lambda p, i: grad(p)  # noqa: E731


def _run(tx, steps=5, jit=False):
    p = params0()
    state = tx.init(p)
    upd = lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn)  # noqa: E731
    if jit:
        upd = jax.jit(upd)
    out = []
    for _ in range(steps):
        u, state = upd(grad(p), state, p)
        p = optax.apply_updates(p, u)
        out.append(p)
    return out


def test_sam_follows_optax_contrib_sam_step_for_step():
    rho = 0.05
    base = lambda: optax.sgd(0.1, momentum=0.5)  # noqa: E731
    ours = _run(sharpness.sam(base(), rho), steps=8)
    ref_tx = optax.contrib.sam(
        base(),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        opaque_mode=True,
        sync_period=2,
    )
    theirs = _run(ref_tx, steps=8)
    for a, b in zip(ours, theirs):
        tree_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sam_one_step_by_hand():
    rho, lr = 0.1, 0.2
    p = params0()
    h = grad(p)
    hn = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(h)))
    adv = jax.tree.map(lambda x, g: x + rho * g / hn, p, h)
    expected = jax.tree.map(lambda x, g: x - lr * g, p, grad(adv))
    got = _run(sharpness.sam(optax.sgd(lr), rho), steps=1)[0]
    tree_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_sam_with_zero_gradient_is_finite_and_composes_with_chain():
    p = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    zero = jax.tree.map(jnp.zeros_like, p)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), sharpness.sam(optax.sgd(0.1), 0.05), optax.scale(1.0)
    )
    state = tx.init(p)
    # The gradient of sum(w^2) is zero at w = 0, where both runs start.
    sq_grad = lambda q, i: jax.tree.map(lambda v: 2.0 * v, q)  # noqa: E731
    u, state = tx.update(zero, state, p, grad_fn=sq_grad)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    # optax's own normalize divides by a zero norm:
    ref = optax.contrib.sam(
        optax.sgd(0.1), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True
    )
    u_ref, _ = ref.update(zero, ref.init(p), p, grad_fn=sq_grad)
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u_ref))


def test_transforms_jit_and_rho_zero_is_the_base_optimizer():
    base = _run(optax.with_extra_args_support(optax.sgd(0.1, momentum=0.5)), steps=3)
    for tx in [
        sharpness.sam(optax.sgd(0.1, momentum=0.5), 0.0),
        sharpness.asam(optax.sgd(0.1, momentum=0.5), 0.0),
        sharpness.gsam(optax.sgd(0.1, momentum=0.5), 0.0, alpha=0.0),
    ]:
        tree_allclose(_run(tx, steps=3, jit=True), base, rtol=1e-6, atol=1e-7)


def test_gsam_with_zero_coefficient_is_sam():
    tree_allclose(
        _run(sharpness.gsam(optax.sgd(0.1), 0.05, alpha=0.0)),
        _run(sharpness.sam(optax.sgd(0.1), 0.05)),
        rtol=0,
        atol=0,
    )


def test_gsam_one_step_by_hand():
    rho, lr, alpha = 0.1, 0.2, 0.3
    p = params0()
    h = flatten(grad(p))
    adv = jax.tree.map(lambda x, g: x + rho * g / np.linalg.norm(h), p, grad(p))
    g = flatten(grad(adv))
    h_perp = h - (h @ g) / (g @ g) * g
    assert abs(h_perp @ g) < 1e-4
    direction = g - alpha * h_perp
    got = flatten(_run(sharpness.gsam(optax.sgd(lr), rho, alpha=alpha), steps=1)[0])
    np.testing.assert_allclose(got, flatten(p) - lr * direction, rtol=1e-5, atol=1e-6)


def test_asam_one_step_by_hand():
    rho, lr, eta = 0.5, 0.1, 0.01
    p = params0()
    w, h = flatten(p), flatten(grad(p))
    t = np.abs(w) + eta  # T = |w| + eta
    eps = rho * t**2 * h / np.linalg.norm(t * h)  # eps = rho T^2 g / ||T g||
    # The step: the base optimizer (SGD) applies the gradient at w + eps, from w.
    norm = np.linalg.norm(t * h)
    adv = jax.tree.map(lambda x, g: x + rho * (jnp.abs(x) + eta) ** 2 * g / norm, p, grad(p))
    np.testing.assert_allclose(flatten(adv), w + eps, rtol=1e-6)
    expected = w - lr * flatten(grad(adv))
    seen = []

    def recording(q, i):
        seen.append(flatten(q))
        return grad(q)

    tx = sharpness.asam(optax.sgd(lr), rho, eta)
    u, _ = tx.update(grad(p), tx.init(p), p, grad_fn=recording)
    np.testing.assert_allclose(seen[0], w + eps, rtol=1e-5)
    got = flatten(optax.apply_updates(p, u))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # ... and it is not SAM's step (the rescaling by T acts).
    sam_step = flatten(_run(sharpness.sam(optax.sgd(lr), rho), steps=1)[0])
    assert np.abs(got - sam_step).max() > 1e-3


def test_asam_is_invariant_to_rescaling_a_block_as_its_paper_states():
    """ASAM (eta = 0): for f(c*w1, w2/c) = f(w1, w2) (a ReLU layer pair), the perturbation
    moves with the rescaling and the perturbed loss is the same (Kwon et al. 2021, Thm. 1)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    y = jax.random.normal(jax.random.PRNGKey(1), (16, 2))

    def f(w):
        return jnp.mean((jax.nn.relu(x @ w["w1"]) @ w["w2"] - y) ** 2)

    w = {
        "w1": jax.random.normal(jax.random.PRNGKey(2), (3, 4)),
        "w2": jax.random.normal(jax.random.PRNGKey(3), (4, 2)),
    }
    c = 3.0
    w_scaled = {"w1": c * w["w1"], "w2": w["w2"] / c}
    np.testing.assert_allclose(f(w), f(w_scaled), rtol=1e-5)

    def perturbed(tx, w):
        seen = []
        tx.update(
            jax.grad(f)(w), tx.init(w), w, grad_fn=lambda q, i: seen.append(q) or jax.grad(f)(q)
        )
        return seen[0]

    asam = sharpness.asam(optax.sgd(0.1), rho=0.5, eta=0.0)
    a, b = perturbed(asam, w), perturbed(asam, w_scaled)
    np.testing.assert_allclose(b["w1"], c * a["w1"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b["w2"], a["w2"] / c, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f(a), f(b), rtol=1e-4)
    # SAM is not invariant: its perturbed loss changes under the same rescaling.
    sam = sharpness.sam(optax.sgd(0.1), rho=0.5)
    assert abs(float(f(perturbed(sam, w)) - f(perturbed(sam, w_scaled)))) > 1e-3


def test_smoothing_with_sigma_zero_is_sam():
    tree_allclose(
        _run(sharpness.smooth_sam(optax.sgd(0.1), 0.05, sigma=0.0)),
        _run(sharpness.sam(optax.sgd(0.1), 0.05)),
        rtol=1e-6,
        atol=1e-7,
    )


def test_smoothing_uses_its_key_and_differs_from_sam():
    rho, sigma, lr = 0.05, 0.5, 0.1
    seen = []

    def recording(q, i):
        seen.append((i, q))
        return grad(q)

    p = params0()
    tx = sharpness.smooth_sam(optax.sgd(lr), rho, sigma=sigma, seed=3)
    s0 = tx.init(p)
    u, s1 = tx.update(grad(p), s0, p, grad_fn=recording)
    assert [i for i, _ in seen] == [0, 1]
    noise = jax.tree.map(jnp.subtract, seen[0][1], p)
    n = flatten(noise)
    assert 0.2 < n.std() < 1.0  # sigma = 0.5
    assert not np.array_equal(np.asarray(s0.key), np.asarray(s1.key))
    # SAM from the same point, same rho and base optimizer, takes another step ...
    got = flatten(optax.apply_updates(p, u))
    sam_step = flatten(_run(sharpness.sam(optax.sgd(lr), rho), steps=1)[0])
    assert np.abs(got - sam_step).max() > 1e-4, np.abs(got - sam_step).max()
    # ... the one by hand: the ascent direction is the gradient at the noisy point.
    h = grad(seen[0][1])
    hn = np.linalg.norm(flatten(h))
    adv = jax.tree.map(lambda x, g: x + rho * g / hn, p, h)
    expected = flatten(p) - lr * flatten(grad(adv))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_missing_grad_fn_and_unknown_name_are_clear_errors():
    tx = sharpness.sam(optax.sgd(0.1), 0.05)
    p = params0()
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(grad(p), tx.init(p), p)
    with pytest.raises(ValueError, match="unknown sharpness"):
        sharpness.make_sharpness("adam", optax.sgd(0.1))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_radii_and_coefficients_are_refused(bad):
    # A negative radius would descend where SAM ascends: a different method, silently.
    base = optax.sgd(0.1)
    cases = {
        "rho": [
            lambda: sharpness.sam(base, bad),
            lambda: sharpness.asam(base, bad),
            lambda: sharpness.gsam(base, bad),
            lambda: sharpness.smooth_sam(base, bad),
        ],
        "eta": [lambda: sharpness.asam(base, 0.5, bad)],
        "alpha": [lambda: sharpness.gsam(base, 0.05, bad)],
        "sigma": [lambda: sharpness.smooth_sam(base, 0.05, bad)],
    }
    for name, makers in cases.items():
        for make in makers:
            with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
                make()
    # zero stays allowed (rho = 0 is the base optimizer), and a traced radius is not checked
    sharpness.sam(base, 0.0)
    jax.jit(lambda r: sharpness.sam(base, r).init(params0()))(jnp.asarray(-1.0))


def _x_and_h():
    x = jnp.array([[[1.0, 2.0], [2.0, 0.0]], [[0.0, 0.0], [3.0, 4.0]], [[0.5, 0.5], [0.5, 0.5]]])
    h = jnp.array([[[0.1, 0.0], [0.0, 0.0]], [[0.0, -2.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    return x, h


def test_per_example_ball_gives_each_slice_its_own_radius():
    x, h = _x_and_h()
    eps = sharpness.sam_perturbation(h, 0.2, x, ball="per_example")
    np.testing.assert_allclose(jnp.linalg.norm(eps.reshape(3, -1), axis=1), [0.2, 0.2, 0.2], 1e-6)
    # each slice points along its own gradient, unlike the global ball (dominated by slice 1)
    np.testing.assert_allclose(eps[0], [[0.2, 0.0], [0.0, 0.0]], atol=1e-7)
    glob = sharpness.sam_perturbation(h, 0.2, x)
    assert float(jnp.linalg.norm(glob)) == pytest.approx(0.2, rel=1e-6)
    assert float(jnp.linalg.norm(glob[0])) < 0.02


def test_relative_radius_is_rho_times_the_norm_by_hand():
    x, h = _x_and_h()
    rho = 0.1
    glob = sharpness.sam_perturbation(h, rho, x, radius="relative")
    expect = rho * jnp.linalg.norm(x) * h / jnp.linalg.norm(h)
    np.testing.assert_allclose(glob, expect, rtol=1e-6)
    per = sharpness.sam_perturbation(h, rho, x, ball="per_example", radius="relative")
    xn = jnp.linalg.norm(x.reshape(3, -1), axis=1)  # 3, 5, 1
    hn = jnp.linalg.norm(h.reshape(3, -1), axis=1)
    np.testing.assert_allclose(per, rho * (xn / hn)[:, None, None] * h, rtol=1e-6)
    # scale-free: scaling the set scales the perturbation, the absolute one does not change
    np.testing.assert_allclose(
        sharpness.sam_perturbation(h, rho, 10 * x, radius="relative"), 10 * glob, rtol=1e-6
    )
    np.testing.assert_allclose(
        sharpness.sam_perturbation(h, rho, 10 * x), sharpness.sam_perturbation(h, rho, x)
    )


def test_ball_options_reach_the_transforms_update():
    """sam and gsam take the per-example relative point: the gradient is taken at x + eps."""
    x, h = _x_and_h()
    seen = []

    def recording_grad_fn(p, i):
        seen.append(p)
        return h

    eps = sharpness.sam_perturbation(h, 0.3, x, ball="per_example", radius="relative")
    for tx in (
        sharpness.sam(optax.sgd(1.0), 0.3, ball="per_example", radius="relative"),
        sharpness.gsam(optax.sgd(1.0), 0.3, 0.0, ball="per_example", radius="relative"),
        sharpness.make_sharpness(
            "sam", optax.sgd(1.0), rho=0.3, ball="per_example", radius="relative"
        ),
    ):
        seen.clear()
        tx.update(h, tx.init(x), x, grad_fn=recording_grad_fn)
        np.testing.assert_allclose(seen[0], x + eps, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown ball"):
        sharpness.sam(optax.sgd(1.0), ball="per_class")
    with pytest.raises(ValueError, match="takes no ball"):
        sharpness.make_sharpness("asam", optax.sgd(1.0), radius="relative")
    with pytest.raises(ValueError, match="needs params"):
        sharpness.sam_perturbation(h, 0.1, radius="relative")

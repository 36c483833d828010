"""The synthetic set's start (``satm_jax.initial_set``) and the baselines' draws
(``satm_jax.baselines``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import baselines, expert_store, initial_set

LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
X = jnp.arange(12, dtype=jnp.float32).reshape(12, 1) * jnp.ones((1, 3), jnp.float32)


def test_real_images_are_ipc_random_images_of_each_class_class_sorted():
    start = initial_set.real_images(np.random.default_rng(3), X, LABELS, 3, ipc=2)
    picked = np.asarray(start.images[:, 0]).astype(int)
    assert LABELS[picked].tolist() == [0, 0, 1, 1, 2, 2]
    assert len(set(picked.tolist())) == 6
    assert start.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert start.logits is None and start.misclassified == 0


def _bank_and_apply(wrong: set[int]):
    """An 'expert' whose logits put the true class first except on images in ``wrong``; two
    experts whose parameters scale the logits by 1 and 3 (mean: 2)."""

    def apply_fn(params, x):
        idx = x[:, 0].astype(jnp.int32)
        true = jnp.asarray(LABELS)[idx]
        bad = jnp.isin(idx, jnp.asarray(sorted(wrong) or [-1]))
        cls = jnp.where(bad, (true + 1) % 3, true)
        return params["s"] * jax.nn.one_hot(cls, 3)

    params = {"s": jnp.asarray([[1.0, 1.0], [3.0, 3.0]])}  # (experts, epochs)
    return expert_store.ExpertBank(params), apply_fn


def test_soft_label_start_takes_correctly_classified_images_and_the_mean_logits():
    bank, apply_fn = _bank_and_apply(wrong={0, 3, 6})  # three of class 0's four are wrong
    start = initial_set.soft_label_start(np.random.default_rng(0), X, LABELS, 3, 2, apply_fn, bank)
    picked = np.asarray(start.images[:, 0]).astype(int)
    assert LABELS[picked].tolist() == [0, 0, 1, 1, 2, 2]
    assert 9 in picked[:2]  # the one correct image of class 0 is taken
    assert start.misclassified == 1  # and one wrong one tops class 0 up
    for i, j in zip(picked, np.asarray(start.logits)):
        cls = LABELS[i] if i not in (0, 3, 6) else (LABELS[i] + 1) % 3
        np.testing.assert_allclose(j, 2.0 * np.eye(3)[cls])  # mean of 1x and 3x


def test_random_draws_differ_per_network_and_follow_their_seeds():
    draws = baselines.random_draws(LABELS, 3, ipc=2, num_draws=3, seed=1)
    assert draws.shape == (3, 6)
    for row in draws:
        assert LABELS[row].tolist() == [0, 0, 1, 1, 2, 2]
    assert len({tuple(r) for r in draws}) > 1
    from satm_jax import datasets

    rng = np.random.default_rng(baselines.RANDOM_SEED_BASE + 100 + 2)
    np.testing.assert_array_equal(draws[2], datasets.sample_per_class(rng, LABELS, 3, 2))


def test_herding_start_takes_each_classs_herding_picks_in_order():
    # Class 0 = rows 0, 3, 6, 9 (features 0, 4, 2, 10; mean 4): picks 3 (4), then 6 (2).
    # Class 1 = rows 1, 4, 7, 10 (5, 1, 0, 6; mean 3): rows 1 and 4 tie, the lower index first.
    # Class 2 = rows 2, 5, 8, 11 (0, 0, 9, 3; mean 3): picks 11 (3), then 2 (0, lower index).
    features = np.array([0, 5, 0, 4, 1, 0, 2, 0, 9, 10, 6, 3], np.float64)[:, None]
    start = initial_set.herding_start(X, LABELS, 3, 2, features)
    assert np.asarray(start.images[:, 0]).astype(int).tolist() == [3, 6, 1, 4, 11, 2]
    assert start.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert start.logits is None and start.misclassified == 0


def test_herding_start_refuses_features_that_are_not_one_row_per_image():
    with pytest.raises(ValueError, match="one row per image"):
        initial_set.herding_start(X, LABELS, 3, 1, np.zeros((11, 2)))
    with pytest.raises(ValueError, match="one row per image"):
        initial_set.herding_start(X, LABELS, 3, 1, np.zeros(12))

"""Herding selection (greedy class-mean matching) and the penultimate-embedding features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import herding, models

# Four points in 2-D, worked by hand.  Class mean mu = ((0+4+0+3)/4, (0+0+2+4)/4) = (1.75, 1.5).
POINTS = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 2.0], [3.0, 4.0]])


def test_herding_picks_the_greedy_class_mean_sequence_worked_by_hand():
    # t = 1: squared distance of each point to mu:
    #   p0 (0,0): 1.75^2 + 1.5^2 = 5.3125     p1 (4,0): 2.25^2 + 1.5^2 = 7.3125
    #   p2 (0,2): 1.75^2 + 0.5^2 = 3.3125     p3 (3,4): 1.25^2 + 2.5^2 = 7.8125   -> p2
    # t = 2: (p2 + x) / 2 closest to mu  <=>  x closest to 2 mu - p2 = (3.5, 1):
    #   p0: 3.5^2 + 1^2 = 13.25   p1: 0.5^2 + 1^2 = 1.25   p3: 0.5^2 + 3^2 = 9.25   -> p1
    # t = 3: x closest to 3 mu - p2 - p1 = (5.25, 4.5) - (4, 2) = (1.25, 2.5):
    #   p0: 1.25^2 + 2.5^2 = 7.8125   p3: 1.75^2 + 1.5^2 = 5.3125                   -> p3
    # t = 4: p0 is left.
    expected = [2, 1, 3, 0]
    assert herding.herding_select(POINTS, 4).tolist() == expected
    assert herding.herding_select(POINTS, 2).tolist() == expected[:2]
    # Not the same as "the k points nearest to the mean" (p2, p0, p1, p3): herding looks at
    # the running mean, not at each point alone.
    nearest = np.argsort(np.sum((POINTS - POINTS.mean(0)) ** 2, axis=1)).tolist()
    assert nearest == [2, 0, 1, 3] and nearest[:2] != expected[:2]


def test_herding_ties_go_to_the_lowest_index_and_translation_does_not_matter():
    sym = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    # mu = 0: all four tie at t = 1 (-> 0); then -1,0 makes the mean exactly 0 (-> 1); at t = 3
    # points 2 and 3 tie (-> 2).
    assert herding.herding_select(sym, 4).tolist() == [0, 1, 2, 3]
    assert herding.herding_select(POINTS + 100.0, 4).tolist() == [2, 1, 3, 0]


def test_herding_never_picks_an_index_twice_and_is_a_greedy_prefix():
    f = np.random.default_rng(0).normal(size=(40, 6))
    full = herding.herding_select(f, 40)
    assert sorted(full.tolist()) == list(range(40))  # a permutation: no repeats
    for k in (1, 5, 17):
        assert herding.herding_select(f, k).tolist() == full[:k].tolist()
    # Each pick is the best available one for the running mean.
    mu = f.mean(0)
    for t in range(1, 10):
        chosen = full[: t - 1]
        rest = np.setdiff1d(np.arange(40), chosen)
        err = [np.sum((mu - (f[chosen].sum(0) + f[i]) / t) ** 2) for i in rest]
        assert full[t - 1] == rest[int(np.argmin(err))]
    # The mean of the picks tracks the class mean better than a random subset of equal size.
    rng = np.random.default_rng(1)
    rand_err = np.mean(
        [np.linalg.norm(f[rng.choice(40, 5, replace=False)].mean(0) - mu) for _ in range(200)]
    )
    assert np.linalg.norm(f[full[:5]].mean(0) - mu) < 0.5 * rand_err


def test_herding_per_class_selects_within_each_class_in_the_given_order():
    labels = np.array([5, 3, 5, 3, 5, 3, 5, 3])
    feats = np.zeros((8, 2))
    feats[labels == 5] = POINTS  # rows 0, 2, 4, 6
    feats[labels == 3] = POINTS[::-1]  # rows 1, 3, 5, 7 hold p3, p2, p1, p0
    idx = herding.herding_per_class(feats, labels, [3, 5], 2)
    # class 3: local picks p2, p1 -> rows 3, 5; class 5: local p2, p1 -> rows 4, 2.
    assert idx.tolist() == [3, 5, 4, 2]
    with pytest.raises(ValueError, match="fewer than k=5"):
        herding.herding_per_class(feats, labels, [3], 5)


@pytest.mark.parametrize(
    "features,k,message",
    [
        (POINTS, 5, "1 <= k <= n"),
        (POINTS, 0, "1 <= k <= n"),
        (POINTS[:, 0], 1, r"\(n, d\)"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), 1, "finite"),
    ],
)
def test_herding_rejects_bad_input(features, k, message):
    with pytest.raises(ValueError, match=message):
        herding.herding_select(features, k)


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_features_are_the_penultimate_embedding_of_the_convnet(norm):
    net = models.ConvNet(num_classes=3, width=4, depth=2, norm=norm, first_padding=1)
    x0 = jnp.zeros((1, 8, 8, 1), jnp.float32)
    variables = jax.jit(lambda k: dict(net.init(k, x0, train=False)))(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 8, 8, 1))
    feats = herding.extract_features(net, variables, x, chunk=3)  # 3 chunks, the last padded
    # width 4 x (8 px -> 4 -> 2)^2 = 16 features; the classifier maps them to the logits.
    assert feats.shape == (7, 16) and feats.dtype == np.float32
    dense = variables["params"]["Dense_0"]
    logits = np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, x))
    np.testing.assert_allclose(
        feats @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]), logits, atol=1e-5
    )
    # After the last ReLU and average pooling: non-negative; chunking changes nothing.
    assert feats.min() >= 0.0
    np.testing.assert_allclose(
        feats, np.asarray(jax.jit(herding.make_feature_fn(net))(variables, x)), atol=1e-6
    )


def test_feature_fn_refuses_a_model_without_a_dense_layer():
    import flax.linen as nn

    class NoDense(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            return nn.relu(x)

    with pytest.raises(ValueError, match="no Dense layer"):
        herding.make_feature_fn(NoDense())({}, jnp.zeros((1, 2, 2, 1)))


def test_feature_network_training_learns_a_separable_toy_set():
    net = models.ConvNet(num_classes=2, width=4, depth=1, first_padding=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4, 4, 1)).astype(np.float32)
    y = np.arange(32, dtype=np.int32) % 2
    x[y == 1] += 2.0  # class 1 is brighter
    cfg = herding.FeatureTraining(epochs=15, lr=0.05, batch_size=8, dsa_strategy="none")
    a = herding.train_feature_network(net, x, y, cfg, key=jax.random.PRNGKey(3))
    logits = jax.jit(lambda v, x: net.apply(v, x, train=False))(a, jnp.asarray(x))
    acc = np.mean(np.argmax(np.asarray(logits), -1) == y)
    assert acc >= 0.9
    with pytest.raises(ValueError, match="at least 1 epoch"):
        herding.train_feature_network(net, x, y, herding.FeatureTraining(epochs=0))

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import model_registry, models
from tests.helpers import slow_cases, tiny_eval_problem, tree_allclose


def _net_and_params(conv_impl, norm="instancenorm", channels=3, depth=2, width=8):
    net = models.ConvNet(num_classes=5, width=width, depth=depth, norm=norm, conv_impl=conv_impl)
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, channels)), train=False)
    return net, variables


@pytest.mark.parametrize("impl", ["patches", "winograd"])
@pytest.mark.parametrize(
    "norm", slow_cases(["instancenorm", "batchnorm", "none"], ["instancenorm", "batchnorm"])
)
def test_patches_winograd_and_lax_convolutions_agree_on_outputs_and_gradients(impl, norm):
    net_p, variables = _net_and_params(impl, norm)
    net_l, _ = _net_and_params("lax", norm)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 16, 16, 3))
    y = jnp.arange(6) % 5
    apply_p, apply_l = models.make_apply_fn(net_p), models.make_apply_fn(net_l)
    params = variables["params"]
    np.testing.assert_allclose(apply_p(params, x), apply_l(params, x), rtol=2e-5, atol=2e-5)

    def loss(apply, p, x):
        logits = apply(p, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), y])

    gp = jax.grad(loss, argnums=(1, 2))(apply_p, params, x)
    gl = jax.grad(loss, argnums=(1, 2))(apply_l, params, x)
    tree_allclose(gp, gl, rtol=1e-4, atol=1e-5)

    # Second order, as trajectory matching uses it: d/dx of ||d loss / d params||^2.
    def second(apply, x):
        g = jax.grad(loss, argnums=1)(apply, params, x)
        return sum(jnp.sum(v**2) for v in jax.tree.leaves(g))

    np.testing.assert_allclose(
        jax.grad(second, argnums=1)(apply_p, x),
        jax.grad(second, argnums=1)(apply_l, x),
        rtol=1e-3,
        atol=1e-5,
    )


def test_auto_convolution_is_winograd_on_cpu():
    assert jax.default_backend() == "cpu"
    assert models.resolve_conv_impl("auto") == "winograd"
    with pytest.raises(ValueError, match="conv_impl"):
        models.resolve_conv_impl("cudnn")


@pytest.mark.parametrize(
    "shape,classes,depth,expected",
    [
        ((32, 32, 3), 10, None, 320_010),
        ((32, 32, 3), 100, None, 504_420),
        ((64, 64, 3), 200, None, 857_160),
        # MNIST-style: the first convolution pads 1-channel inputs by 3 (28 -> 32), as MTT's.
        ((28, 28, 1), 10, None, 1_280 + 256 + 2 * (147_584 + 256) + 128 * 4 * 4 * 10 + 10),
    ],
)
def test_parameter_counts_match_mtt(shape, classes, depth, expected):
    net = models.ConvNet(num_classes=classes, width=128, depth=depth)
    params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))[
        "params"
    ]
    assert models.count_params(params) == expected


@pytest.mark.slow
def test_depth_follows_resolution():
    assert [models.default_depth(r) for r in (8, 16, 28, 32, 64, 128)] == [1, 2, 3, 3, 4, 5]
    net = models.ConvNet(num_classes=10, width=4)
    p = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    assert len([k for k in p if k.startswith("Conv")]) == 4


@pytest.mark.slow
def test_pytorch_default_initialisation_bounds():
    net = models.ConvNet(num_classes=10, width=64, depth=2)
    p = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    conv1 = p["Conv_0"]["kernel"]
    bound = 1 / np.sqrt(3 * 9)
    assert conv1.shape == (3, 3, 3, 64)
    assert float(jnp.max(jnp.abs(conv1))) <= bound
    # U(-b, b) has std b / sqrt(3).
    assert abs(float(jnp.std(conv1)) - bound / np.sqrt(3)) < 0.1 * bound
    dense = p["Dense_0"]["kernel"]
    assert float(jnp.max(jnp.abs(p["Dense_0"]["bias"]))) <= 1 / np.sqrt(dense.shape[0])
    norm = p["InstanceNorm_0"]
    assert np.all(np.asarray(norm["scale"]) == 1) and np.all(np.asarray(norm["bias"]) == 0)


def test_instance_norm_matches_a_numpy_groupnorm():
    x = np.random.default_rng(0).normal(size=(3, 5, 4, 6)).astype(np.float32)
    y = models.InstanceNorm().apply({"params": {"scale": jnp.ones(6), "bias": jnp.zeros(6)}}, x)
    m = x.mean(axis=(1, 2), keepdims=True)
    v = x.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(y, (x - m) / np.sqrt(v + 1e-5), rtol=1e-4, atol=1e-5)


def test_instance_norm_refuses_a_1x1_map_where_it_would_output_a_constant():
    params = {"params": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
    with pytest.raises(ValueError, match="1x1 feature map"):
        models.InstanceNorm().apply(params, jnp.ones((3, 1, 1, 2)))
    assert models.InstanceNorm().apply(params, jnp.ones((3, 1, 2, 2))).shape == (3, 1, 2, 2)


@pytest.mark.slow
def test_any_number_of_input_channels_and_odd_sizes():
    for c in (1, 2, 4):
        net = models.ConvNet(num_classes=3, width=4, depth=2)
        v = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 9, 9, c)))
        assert net.apply(v, jnp.ones((2, 9, 9, c))).shape == (2, 3)


def test_unknown_model_and_norm_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        model_registry.build_model(model_registry.ModelConfig(name="nope"), 10)
    with pytest.raises(ValueError, match="unknown norm"):
        model_registry.build_model(model_registry.ModelConfig(norm="layer"), 10)


def test_evaluation_flags_networks_whose_training_diverged():
    from satm_jax import evaluate
    from satm_jax.experiment import pipeline

    net, x, y, tx, ty = tiny_eval_problem(9)
    cfg = evaluate.EvalConfig(epochs=3, num_models=2, dsa_strategy="none")
    fine = evaluate.evaluate_set(net, x, y, 0.05, tx, ty, cfg, progress=False)
    np.testing.assert_array_equal(fine.diverged, [False, False])
    assert "diverged" not in fine.summary()
    assert "diverged" not in pipeline._row("mtt", 1, fine)
    # A step size that overflows float32: every weight becomes non-finite, the networks predict
    # one class (chance accuracy), and the result must say so rather than average it silently.
    blown = evaluate.evaluate_set(net, x, y, 1e30, tx, ty, cfg, progress=False)
    np.testing.assert_array_equal(blown.diverged, [True, True])
    assert blown.num_diverged == 2
    assert "WARNING: 2 of 2 networks diverged" in blown.summary()
    assert pipeline._row("mtt", 1, blown)["diverged"] == 2
    # Stored and read back (evals.json, the baselines' cache) with the flags.
    back = evaluate.EvalResult(
        blown.accs, **pipeline._health_from_json(pipeline._health_json(blown))
    )
    np.testing.assert_array_equal(back.diverged, [True, True])
    assert back.num_diverged == 2 and back.num_collapsed == 0  # diverged, not counted twice
    assert pipeline._health_from_json({}) == {"diverged": None, "collapsed": None}


def test_evaluation_flags_networks_that_predict_one_class(monkeypatch):
    from satm_jax import evaluate
    from satm_jax.experiment import pipeline

    net, x, y, _, _ = tiny_eval_problem(1)
    cfg = evaluate.EvalConfig(epochs=10, num_models=2, dsa_strategy="none")
    # Tested on its training images, which both networks fit: no collapse.
    fine = evaluate.evaluate_set(net, x, y, 0.05, x, y, cfg, progress=False)
    np.testing.assert_array_equal(fine.accs, [1.0, 1.0])
    np.testing.assert_array_equal(fine.collapsed, [False, False])
    # Class 1's logit pushed far up: finite weights, every test image predicted as class 1.
    real = evaluate.train_lib.make_predict

    def biased(model, batch_size=1000):
        predict = real(model, batch_size)

        def run(params, stats, images):
            logits = predict(params, stats, images)
            return logits.at[:, 1].add(1e6)

        return run

    monkeypatch.setattr(evaluate.train_lib, "make_predict", biased)
    one = evaluate.evaluate_set(net, x, y, 0.05, x, y, cfg, progress=False)
    monkeypatch.undo()
    np.testing.assert_array_equal(one.collapsed, [True, True])
    np.testing.assert_allclose(one.accs, [2 / 6, 2 / 6])  # the two images of class 1
    assert one.num_collapsed == 2 and one.num_diverged == 0
    assert "WARNING: 2 of 2 networks predict one class" in one.summary()
    assert pipeline._row("mtt", 1, one)["collapsed"] == 2


def test_diverged_networks_looks_at_each_network_and_its_batch_statistics():
    from satm_jax import evaluate, train

    params = {"w": jnp.array([[1.0, 2.0], [3.0, jnp.nan]]), "b": jnp.zeros((2, 1))}
    stats = {"mean": jnp.array([[0.0], [0.0]])}
    state = train.TrainState(params, stats, params, jnp.zeros((2,), jnp.int32))
    np.testing.assert_array_equal(evaluate.diverged_networks(state), [False, True])
    stats = {"mean": jnp.array([[jnp.inf], [0.0]])}
    state = train.TrainState(params, stats, params, jnp.zeros((2,), jnp.int32))
    np.testing.assert_array_equal(evaluate.diverged_networks(state), [True, True])


@pytest.mark.slow
def test_evaluation_tests_in_chunks_with_the_same_accuracy(monkeypatch):
    from satm_jax import evaluate

    net, x, y, tx, ty = tiny_eval_problem(23)
    cfg = evaluate.EvalConfig(epochs=3, num_models=2, dsa_strategy="none")
    whole = evaluate.evaluate_set(net, x, y, 0.05, tx, ty, cfg, progress=False)
    seen = []
    real = evaluate.train_lib.make_predict

    def recording(model, batch_size=1000):
        predict = real(model, batch_size)

        def run(params, stats, images):
            seen.append(images.shape[0])  # static under jit: once per traced chunk shape
            return predict(params, stats, images)

        return run

    monkeypatch.setattr(evaluate, "PREDICT_CHUNK", 5)
    monkeypatch.setattr(evaluate.train_lib, "make_predict", recording)
    chunked = evaluate.evaluate_set(net, x, y, 0.05, tx, ty, cfg, progress=False)
    monkeypatch.undo()
    np.testing.assert_array_equal(chunked.accs, whole.accs)
    assert sorted(set(seen)) == [3, 5]  # 23 test images went through in chunks of 5

"""The cross-architecture evaluation pool (MTT's ``networks.py``) in ``satm_jax.model_pool``.

Reference parameter counts for CIFAR-10 shapes (32x32x3, 10 classes), from the reference
definitions (PyTorch counts ``BatchNorm2d`` running statistics as buffers, not parameters; a
``GroupNorm(C, C)`` or ``BatchNorm2d(C)`` has 2C parameters):

* ``ResNet18`` / ``ResNet18BN``: 11,173,962 (convolutions without bias 11,159,232, norms
  9,600, ``Linear(512, 10)`` 5,130);
* ``ResNet18BN_AP``: 11,250,762 (same convolutions and norms, ``Linear(512 * 4 * 4, 10)``
  81,930);
* ``VGG11`` / ``VGG11BN``: 9,231,114 (convolutions with bias 9,220,480, norms 5,504,
  ``Linear(512, 10)`` 5,130);
* ``AlexNet``: 1,872,202 (convolutions with bias 1,841,472, ``Linear(192 * 4 * 4, 10)`` 30,730).

For 28x28x1 (MNIST) the first convolution loses ``2 * out * k * k`` weights and the
``_AP`` classifier reads 512 x 3 x 3 features.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satm_jax import model_pool, model_registry, models, train

POOL = ("resnet18", "resnet18_bn", "resnet18_ap", "vgg11", "vgg11_bn", "alexnet")
BN = ("resnet18_bn", "resnet18_ap", "vgg11_bn")


def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def linear(fin, fout):
    return fin * fout + fout


def resnet18_count(channels, classes, fc_in=512):
    n = conv(channels, 64, 3, False) + 2 * 64
    cin = 64
    for planes in (64, 128, 256, 512):
        for _ in range(2):
            n += conv(cin, planes, 3, False) + conv(planes, planes, 3, False) + 4 * planes
            if cin != planes:
                n += conv(cin, planes, 1, False) + 2 * planes
            cin = planes
    return n + linear(fc_in, classes)


def vgg11_count(channels, classes):
    n, cin = 0, channels
    for v in (64, 128, 256, 256, 512, 512, 512, 512):
        n += conv(cin, v, 3) + 2 * v
        cin = v
    return n + linear(512, classes)


def alexnet_count(channels, classes):
    return (
        conv(channels, 128, 5)
        + conv(128, 192, 5)
        + conv(192, 256, 3)
        + conv(256, 192, 3)
        + conv(192, 192, 3)
        + linear(192 * 4 * 4, classes)
    )


CIFAR10_COUNTS = {
    "resnet18": 11_173_962,
    "resnet18_bn": 11_173_962,
    "resnet18_ap": 11_250_762,
    "vgg11": 9_231_114,
    "vgg11_bn": 9_231_114,
    "alexnet": 1_872_202,
}


def _build(name, classes=10):
    return model_registry.build_model(model_registry.ModelConfig(name=name), classes)


def _shapes(name, shape, classes=10, train_mode=False):
    """``(variables, logits)`` shapes, without computing anything."""
    net = _build(name, classes)

    def run():
        v = net.init(jax.random.PRNGKey(0), jnp.zeros((2, *shape)), train=False)
        out = net.apply(v, jnp.zeros((3, *shape)), train=train_mode, mutable=["batch_stats"])
        return v, out[0]

    return jax.eval_shape(run)


def test_the_reference_counts_follow_from_the_definitions():
    assert resnet18_count(3, 10) == CIFAR10_COUNTS["resnet18"]
    assert resnet18_count(3, 10, fc_in=512 * 4 * 4) == CIFAR10_COUNTS["resnet18_ap"]
    assert vgg11_count(3, 10) == CIFAR10_COUNTS["vgg11"]
    assert alexnet_count(3, 10) == CIFAR10_COUNTS["alexnet"]


@pytest.mark.parametrize("name", POOL)
def test_parameter_counts_equal_the_reference_models(name):
    assert name in model_registry.MODELS
    v, logits = _shapes(name, (32, 32, 3))
    assert logits.shape == (3, 10)
    assert models.count_params(v["params"]) == CIFAR10_COUNTS[name]
    assert models.has_batch_stats(v) == (name in BN)
    # 28x28x1 (MNIST-like): same geometry as the reference's channel == 1 branch.
    v1, logits1 = _shapes(name, (28, 28, 1))
    assert logits1.shape == (3, 10)
    expected = {
        "resnet18": resnet18_count(1, 10),
        "resnet18_bn": resnet18_count(1, 10),
        "resnet18_ap": resnet18_count(1, 10, fc_in=512 * 3 * 3),
        "vgg11": vgg11_count(1, 10),
        "vgg11_bn": vgg11_count(1, 10),
        "alexnet": alexnet_count(1, 10),
    }[name]
    assert models.count_params(v1["params"]) == expected
    # 64x64x3 with 200 classes (Tiny ImageNet) also builds; the classifier follows the features.
    v64, logits64 = _shapes(name, (64, 64, 3), classes=200)
    assert logits64.shape == (3, 200)
    fc_in = {"resnet18_ap": 512 * 8 * 8, "alexnet": 192 * 8 * 8, "vgg11": 512 * 2 * 2}
    fc_in["vgg11_bn"] = fc_in["vgg11"]
    assert v64["params"]["Dense_0"]["kernel"].shape == (fc_in.get(name, 512), 200)


def test_resnet_blocks_downsample_as_the_reference():
    """Plain blocks: stride-2 conv (and 1x1 stride-2 shortcut); ``_AP``: stride 1 + avg-pool."""

    def inter(name):
        net = _build(name)

        def run():
            v = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
            _, st = net.apply(
                v,
                jnp.zeros((2, 32, 32, 3)),
                train=True,
                mutable=["batch_stats", "intermediates"],
                capture_intermediates=True,
            )
            return v, st["intermediates"]

        return jax.eval_shape(run)

    v, it = inter("resnet18")
    blk = it["BasicBlock_2"]  # first block of stage 2
    assert blk["Conv_0"]["__call__"][0].shape == (2, 16, 16, 128)
    assert blk["Conv_2"]["__call__"][0].shape == (2, 16, 16, 128)  # 1x1 shortcut
    assert v["params"]["BasicBlock_2"]["Conv_2"]["kernel"].shape == (1, 1, 64, 128)
    assert "bias" not in v["params"]["BasicBlock_2"]["Conv_0"]
    assert it["Dense_0"]["__call__"][0].shape == (2, 10)
    v, it = inter("resnet18_ap")
    blk = it["BasicBlock_2"]
    assert blk["Conv_0"]["__call__"][0].shape == (2, 32, 32, 128)  # stride 1, pooled after
    assert blk["Conv_2"]["__call__"][0].shape == (2, 32, 32, 128)  # shortcut pooled after
    assert blk["__call__"][0].shape == (2, 16, 16, 128)
    assert it["BasicBlock_7"]["__call__"][0].shape == (2, 4, 4, 512)
    assert v["params"]["Dense_0"]["kernel"].shape == (512 * 4 * 4, 10)


def test_max_pool_matches_pytorch_floor_semantics():
    x = jnp.arange(2 * 5 * 7 * 3, dtype=jnp.float32).reshape(2, 5, 7, 3) % 11
    y = np.asarray(model_pool.max_pool_2x2(x))
    xn = np.asarray(x)[:, :4, :6]
    ref = xn.reshape(2, 2, 2, 3, 2, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(y, ref)


def _data(shape, n=4, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, *shape))
    return x, jnp.arange(n, dtype=jnp.int32) % 10


@pytest.mark.slow
@pytest.mark.parametrize("name", POOL)
def test_forward_and_one_sgd_step(name):
    net = _build(name)
    init = jax.jit(lambda k, x: net.init(k, x, train=False))
    variables = init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
    assert models.count_params(variables["params"]) == CIFAR10_COUNTS[name]
    x, y = _data((32, 32, 3))
    # One epoch of one minibatch (4 images): SGD with momentum, training-mode forward.
    epoch = jax.jit(
        train.make_train_epoch(net, lambda k, x: x, train.SGDConfig(batch_size=4, momentum=0.9))
    )
    state = train.init_train_state(variables)
    new, metrics = epoch(state, jax.random.PRNGKey(2), x, y, jnp.asarray(0.01, jnp.float32))
    assert bool(jnp.isfinite(metrics["loss"]))
    leaves = jax.tree.leaves(new.params)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in leaves)
    moved = [not np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(state.params))]
    # (A conv bias right before a norm layer has a zero gradient, in the reference too.)
    assert np.mean(moved) > 0.5
    assert not np.array_equal(new.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])
    if name in BN:
        old_stats, new_stats = jax.tree.leaves(state.batch_stats), jax.tree.leaves(new.batch_stats)
        assert old_stats and all(not np.array_equal(a, b) for a, b in zip(old_stats, new_stats))
    else:
        assert not jax.tree.leaves(new.batch_stats)
    # Inference-mode logits on 32x32x3 with the trained variables.
    v_new = {"params": new.params, **({"batch_stats": new.batch_stats} if name in BN else {})}
    logits = jax.jit(lambda v, x: net.apply(v, x, train=False))(v_new, x)
    assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))

    # 28x28x1 (MNIST-like): init and a training-mode forward.
    @jax.jit
    def forward28(k, x):
        v = net.init(k, x, train=False)
        return net.apply(v, x, train=True, mutable=["batch_stats"])[0]

    x28, _ = _data((28, 28, 1), n=2, seed=3)
    logits28 = forward28(jax.random.PRNGKey(3), x28)
    assert logits28.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits28)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18_ap", "vgg11_bn"])
def test_batchnorm_train_uses_the_batch_and_eval_uses_running_averages(name):
    net = _build(name)
    variables = jax.jit(lambda k: net.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.PRNGKey(4)
    )
    x, _ = _data((32, 32, 3), n=3, seed=5)
    x = x * 2.0 + 0.5
    x_other = x.at[1:].set(_data((32, 32, 3), n=2, seed=6)[0])  # same first sample

    @functools.partial(jax.jit, static_argnums=2)
    def fwd(v, x, train_mode):
        return net.apply(
            v,
            x,
            train=train_mode,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: isinstance(mdl, models.Conv),
        )

    out_t, st = fwd(variables, x, True)
    out_t2, _ = fwd(variables, x_other, True)
    # Training mode normalises with the batch: a sample's output depends on its batch-mates.
    assert not np.allclose(out_t[0], out_t2[0], atol=1e-4)
    # Running mean after one step: 0.9 * 0 + 0.1 * batch mean (PyTorch momentum 0.1).
    first_conv = st["intermediates"]["Conv_0"]["__call__"][0]
    np.testing.assert_allclose(
        st["batch_stats"]["BatchNorm_0"]["mean"],
        0.1 * jnp.mean(first_conv, axis=(0, 1, 2)),
        rtol=1e-4,
        atol=1e-6,
    )
    # Inference mode uses the running averages: per-sample, batch-independent, unchanged.
    out_e, st_e = fwd(variables, x, False)
    out_e2, _ = fwd(variables, x_other, False)
    np.testing.assert_allclose(out_e[0], out_e2[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(st_e["batch_stats"]), jax.tree.leaves(variables["batch_stats"])
    ):
        np.testing.assert_array_equal(a, b)


def test_norm_follows_the_name():
    p = _shapes("resnet18", (32, 32, 3))[0]["params"]
    assert "InstanceNorm_0" in p and "BatchNorm_0" not in p
    p = _shapes("vgg11", (32, 32, 3))[0]["params"]
    assert "InstanceNorm_0" in p
    v = _shapes("resnet18_ap", (32, 32, 3))[0]
    assert "BatchNorm_0" in v["params"] and "BatchNorm_0" in v["batch_stats"]
    p = _shapes("alexnet", (32, 32, 3))[0]["params"]
    assert not any(k.startswith(("InstanceNorm", "BatchNorm")) for k in p)

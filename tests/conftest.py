"""Test-wide JAX settings: strict dtype promotion, 8 simulated CPU devices, quiet logs.

Float64 checks use ``x64()`` (a context manager) so the rest runs in float32 as users do.
"""

import contextlib
import logging
import os

os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

logging.getLogger("absl").setLevel(logging.WARNING)


@contextlib.contextmanager
def x64():
    """Enables float64 for the block."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
    else:  # older JAX
        from jax.experimental import enable_x64

        with enable_x64():
            yield


def flatten(tree) -> np.ndarray:
    """All leaves of ``tree`` as one flat NumPy vector (for hand computations)."""
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def tree_allclose(a, b, rtol=1e-6, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def tiny_problem(
    dtype=jnp.float32,
    n=4,
    res=8,
    channels=1,
    classes=2,
    width=4,
    depth=1,
    seed=0,
    norm="instancenorm",
    conv_impl="auto",
):
    """A tiny ConvNet, a start/target pair, synthetic images and labels."""
    from satm_jax import models

    net = models.ConvNet(
        num_classes=classes, width=width, depth=depth, norm=norm, conv_impl=conv_impl
    )
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = net.init(k1, jnp.zeros((1, res, res, channels)))["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    target = jax.tree.map(
        lambda p, k: p + 0.05 * jax.random.normal(k, p.shape, dtype),
        params,
        jax.tree.unflatten(
            jax.tree.structure(params), list(jax.random.split(k2, len(jax.tree.leaves(params))))
        ),
    )
    images = jax.random.normal(k3, (n, res, res, channels), dtype)
    labels = jnp.arange(n, dtype=jnp.int32) % classes
    return net, models.make_apply_fn(net), params, target, images, labels


@pytest.fixture(scope="module")
def fast_compile():
    """XLA compile time dominates tiny inputs: skip most optimisation for a module
    (``pytestmark = pytest.mark.usefixtures("fast_compile")``)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def digits():
    from satm_jax import data

    return data.load_dataset("digits")

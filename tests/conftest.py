"""Test-wide JAX settings and fixtures: strict dtype and rank promotion, 8 simulated CPU
devices, quiet logs. Helpers that tests import live in ``tests/helpers.py``.

Float64 checks use ``helpers.x64()`` (a context manager) so the rest runs in float32 as users do.
"""

import logging
import os

os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")

import pytest  # noqa: E402

logging.getLogger("absl").setLevel(logging.WARNING)


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

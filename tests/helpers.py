"""Helpers shared by the test modules (``from tests.helpers import ...``).

``conftest.py`` holds only the suite's settings and fixtures; everything a test imports lives
here: float64 blocks, tree comparisons, the tiny problems the outer-loop tests share, and the
one runner for ``python -m experiments.<module>`` in a subprocess.
"""

import contextlib
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smallest `experiments.run` that exercises every stage (experts, MTT, SATM, evaluation,
# checkpoints, reuse): seconds of work, most of the wall time is start-up and compilation.
TINY = [
    "--iterations=4",
    "--syn_steps=3",
    "--num_experts=2",
    "--expert_train_epochs=3",
    "--max_start_epoch=2",
    "--expert_epochs=1",
    "--eval_epochs=3",
    "--num_eval=2",
    "--width=8",
    "--depth=1",
    "--full_epochs=1",
    "--progress=false",
    "--steps_per_call=2",
    "--checkpoint_every=2",
]


def tiny_overrides(**changes):
    """``configs.make_run_config`` overrides of a tiny in-process run on digits (what ``TINY``
    is for subprocesses), with ``changes`` applied."""
    base = {
        "iterations": 3,
        "syn_steps": 3,
        "num_experts": 2,
        "expert_train_epochs": 2,
        "max_start_epoch": 1,
        "expert_epochs": 1,
        "eval_epochs": 2,
        "num_eval": 1,
        "width": 4,
        "depth": 1,
    }
    return {**base, **changes}


# --------------------------------------------------------------------------------------------
# The fast tier (`-m "not slow"`)
# --------------------------------------------------------------------------------------------

slow = pytest.mark.slow


def slow_cases(values, slow_values):
    """``values`` for ``pytest.mark.parametrize``, the cases in ``slow_values`` marked slow."""
    assert set(slow_values) <= set(values), set(slow_values) - set(values)
    return [pytest.param(v, marks=slow) if v in slow_values else v for v in values]


# --------------------------------------------------------------------------------------------
# Files (closed at once: an unclosed file is a ResourceWarning, an error in this suite)
# --------------------------------------------------------------------------------------------


def read_text(path) -> str:
    with open(path) as f:
        return f.read()


def read_json(path):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


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
    """Same structure, shapes and dtypes, values within ``rtol``/``atol`` (chex's check)."""
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Tiny problems
# --------------------------------------------------------------------------------------------


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


def tiny_eval_problem(n_test):
    """A 3-class ConvNet (width 4, depth 1), 6 training images of 8x8x1 (two per class) and
    ``n_test`` test images: what the evaluation tests train and test on."""
    from satm_jax import models

    net = models.ConvNet(num_classes=3, width=4, depth=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 1))
    y = jnp.arange(6, dtype=jnp.int32) % 3
    tx = jax.random.normal(jax.random.PRNGKey(1), (n_test, 8, 8, 1))
    ty = jnp.arange(n_test, dtype=jnp.int32) % 3
    return net, x, y, tx, ty


def synthetic_bank(params, num_experts=2, epochs=4, seed=0):
    """Synthetic expert trajectories: random walks from ``params``."""
    from satm_jax import expert_store

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    stacked = []
    for leaf, k in zip(leaves, keys):
        steps = 0.05 * jax.random.normal(k, (num_experts, epochs, *leaf.shape))
        traj = leaf[None, None] + jnp.concatenate(
            [jnp.zeros((num_experts, 1, *leaf.shape)), jnp.cumsum(steps, 1)], 1
        )
        stacked.append(traj)
    return expert_store.ExpertBank(jax.tree.unflatten(treedef, stacked))


DISTILL_SYN_STEPS = 4


def distill_problem(**cfg_kw):
    """``(cfg, apply_fn, bank, images, labels)``: a tiny outer-loop problem (2 classes, IPC 2,
    ``DISTILL_SYN_STEPS`` student steps, a synthetic bank); ``cfg_kw`` overrides the config."""
    from satm_jax import distill

    net, apply_fn, params, _, images, labels = tiny_problem(n=4)
    base = dict(
        ipc=2,
        iterations=3,
        syn_steps=DISTILL_SYN_STEPS,
        expert_epochs=1,
        max_start_epoch=3,
        lr_img=10.0,
        lr_lr=1e-4,
        lr_teacher=0.05,
        dsa_strategy="crop_flip",
        steps_per_call=3,
    )
    base.update(cfg_kw)
    cfg = distill.DistillConfig(**base)
    return cfg, apply_fn, synthetic_bank(params), images, labels


# --------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------


def module_env(**extra) -> dict:
    """The environment of a subprocess: this checkout first on the path, CPU, no progress bars."""
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TQDM_DISABLE="1", **extra)


def module_command(module: str, *args: str) -> list[str]:
    """``python -m experiments.<module> args...`` with this interpreter."""
    return [sys.executable, "-m", f"experiments.{module}", *args]


def run(cmd, *, cwd=ROOT, timeout=600, check=False, background=False, env=None, log=None):
    """Runs ``cmd`` in a subprocess with ``module_env(**env)``: the suite's one runner.

    Returns the ``subprocess.CompletedProcess`` (text output captured); with ``check`` asserts
    a zero exit status first, showing the end of stderr. With ``background`` it returns the
    started ``subprocess.Popen`` instead, its output going to ``log`` (an open file, which
    the caller closes; discarded without one), for tests that kill it or run several processes
    at once. ``env``: extra environment variables.
    """
    environ = module_env(**(env or {}))
    if background:
        out = subprocess.DEVNULL if log is None else log
        return subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT)
    r = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_module(module, *args, **kw):
    """``run(python -m experiments.<module> args...)``; keywords as ``run``'s."""
    return run(module_command(module, *args), **kw)

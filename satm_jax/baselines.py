"""The reference points a condensed set is compared with, under the same evaluation protocol.

* ``random_real``: ``ipc`` random real images per class, a different draw for every evaluation
  network (as MTT's and DC's "random" rows: the spread over networks includes the draw's);
* ``full_data``: the whole training set.

Both train fresh networks with ``satm_jax.evaluate.evaluate_set`` and return its
``EvalResult``; ``extra_tests`` scores the same networks on more test sets (corrupted ones, see
``satm_jax.ood``).

Example:
  >>> import numpy as np
  >>> from satm_jax import baselines
  >>> baselines.random_draws(np.array([0, 1, 0, 1, 0, 1]), 2, ipc=1, num_draws=3, seed=0).shape
  (3, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from satm_jax import datasets as data_lib
from satm_jax import evaluate as evaluate_lib

# Seeds of the random draws: draw ``i`` of distillation seed ``s`` uses
# ``RANDOM_SEED_BASE + 100 * s + i`` (never a distillation seed's own generator).
RANDOM_SEED_BASE = 10_000
# Offsets of the evaluation keys from ``EvalConfig.seed`` (the condensed sets use the
# iteration's number, so these never coincide with an evaluation at iteration 0).
RANDOM_KEY_OFFSET = 17
FULL_KEY_OFFSET = 23


def random_draws(
    train_labels: np.ndarray, num_classes: int, ipc: int, num_draws: int, seed: int
) -> np.ndarray:
    """``(num_draws, num_classes * ipc)`` class-sorted indices of real images, one row per
    evaluation network."""
    return np.stack(
        [
            data_lib.sample_per_class(
                np.random.default_rng(RANDOM_SEED_BASE + seed * 100 + i),
                train_labels,
                num_classes,
                ipc,
            )
            for i in range(num_draws)
        ]
    )


def random_real(
    model: nn.Module,
    train_x: Any,
    train_labels: np.ndarray,
    num_classes: int,
    ipc: int,
    lr: float,
    test_x: Any,
    test_y: Any,
    cfg: evaluate_lib.EvalConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    extra_tests: Mapping[Any, tuple[Any, Any]] | None = None,
) -> evaluate_lib.EvalResult:
    """``cfg.num_models`` networks, each trained with step size ``lr`` on its own draw of
    ``ipc`` real images per class (``random_draws`` with ``seed``)."""
    n = cfg.num_models
    idx = random_draws(train_labels, num_classes, ipc, n, seed)
    images = train_x[jnp.asarray(idx)]
    labels = jnp.asarray(np.stack([data_lib.class_sorted_labels(num_classes, ipc)] * n))
    return evaluate_lib.evaluate_set(
        model,
        images,
        labels,
        lr,
        test_x,
        test_y,
        cfg,
        key=jax.random.PRNGKey(cfg.seed + RANDOM_KEY_OFFSET),
        per_model_sets=True,
        progress=progress,
        desc=f"eval random ipc{ipc}",
        extra_tests=extra_tests,
    )


def full_data(
    model: nn.Module,
    train_x: Any,
    train_y: Any,
    lr: float,
    test_x: Any,
    test_y: Any,
    cfg: evaluate_lib.EvalConfig,
    *,
    epochs: int,
    progress: bool = True,
    extra_tests: Mapping[Any, tuple[Any, Any]] | None = None,
) -> evaluate_lib.EvalResult:
    """``cfg.num_models`` networks trained with step size ``lr`` on the whole training set for
    ``epochs`` epochs (one epoch per jit call), otherwise ``cfg``'s protocol."""
    ecfg = dataclasses.replace(cfg, epochs=epochs, epochs_per_call=1)
    return evaluate_lib.evaluate_set(
        model,
        train_x,
        train_y,
        lr,
        test_x,
        test_y,
        ecfg,
        key=jax.random.PRNGKey(cfg.seed + FULL_KEY_OFFSET),
        progress=progress,
        desc="eval full",
        extra_tests=extra_tests,
    )

"""Where a synthetic set starts: real images of each class, herding's picks, DATM's start.

MTT (Cazenavette et al., 2022) starts the synthetic set from random real images of each class
with hard labels. ``herding_start`` (our option, ``--syn_init=herding``) starts from the
images herding selects in each class instead (``satm_jax.herding``: the greedy class-mean
match of iCaRL and of DM's continual-learning baseline): a coreset start, like the coreset
initialisations DC-BENCH (Cui et al., 2022) compared for condensation. DATM (Guo et al., 2024,
"Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching") starts
soft labels from the experts: the images are drawn among real images an expert classifies
correctly, and the label logits are the experts' mean logits on them. Both random starts draw
the images class by class from one ``numpy`` generator, so a seed gives the same start on
every backend.

Example:
  >>> import numpy as np
  >>> from satm_jax import initial_set
  >>> train_x = np.arange(12, dtype=np.float32).reshape(6, 2)
  >>> start = initial_set.real_images(
  ...     np.random.default_rng(0), train_x, np.array([0, 1, 0, 1, 0, 1]), 2, ipc=1)
  >>> start.images.shape, start.labels.tolist(), start.logits is None
  ((2, 2), [0, 1], True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from satm_jax import datasets as data_lib
from satm_jax import expert_store
from satm_jax import herding as herding_lib

# Candidates the expert classifies per jit call while looking for correctly classified images.
CHUNK = 256


class InitialSet(NamedTuple):
    """A synthetic set's start.

    Attributes:
      images: ``(num_classes * ipc, ...)`` real images, class-sorted.
      labels: ``(num_classes * ipc,)`` int class ids, class-sorted.
      logits: ``(num_classes * ipc, num_classes)`` soft-label logits, or ``None`` (hard labels).
      misclassified: how many images had to be taken although the expert misclassifies them
        (too few correct ones in their class); 0 for hard labels.
    """

    images: Any
    labels: np.ndarray
    logits: jax.Array | None
    misclassified: int


def real_images(
    rng: np.random.Generator, train_x: Any, train_labels: np.ndarray, num_classes: int, ipc: int
) -> InitialSet:
    """``ipc`` random real images of every class (``datasets.sample_per_class``), hard labels."""
    idx = data_lib.sample_per_class(rng, train_labels, num_classes, ipc)
    labels = data_lib.class_sorted_labels(num_classes, ipc)
    return InitialSet(train_x[jnp.asarray(idx)], labels, None, 0)


def herding_start(
    train_x: Any, train_labels: np.ndarray, num_classes: int, ipc: int, features: Any
) -> InitialSet:
    """The ``ipc`` images of every class that herding picks first in ``features``, hard labels.

    Args:
      train_x: ``(n, ...)`` candidate images.
      train_labels: ``(n,)`` their class ids.
      num_classes: classes ``0 .. num_classes - 1``, in output order.
      ipc: images per class.
      features: ``(n, d)`` features of ``train_x`` (e.g. ``herding.extract_features`` of a
        trained expert).

    Returns:
      The class-sorted start; within a class the images are in herding order. It depends on
      the features only (no random draw).

    Raises:
      ValueError: ``features`` does not have one row per image, or a class has fewer than
        ``ipc`` images.
    """
    train_labels = np.asarray(train_labels)
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"features {features.shape} must be (n, d) with one row per image "
            f"(n = {train_labels.shape[0]})"
        )
    idx = herding_lib.herding_per_class(features, train_labels, range(num_classes), ipc)
    labels = data_lib.class_sorted_labels(num_classes, ipc)
    return InitialSet(train_x[jnp.asarray(idx)], labels, None, 0)


def soft_label_start(
    rng: np.random.Generator,
    train_x: Any,
    train_labels: np.ndarray,
    num_classes: int,
    ipc: int,
    apply_fn: Callable[..., jax.Array],
    bank: expert_store.ExpertBank,
) -> InitialSet:
    """DATM's start: per class, the first ``ipc`` images of a random permutation that the
    bank's first expert (at its last loaded epoch) classifies correctly (topped up with other
    images of the class if too few are), and the mean logits of all the bank's experts at
    that epoch as label logits."""
    last = bank.num_epochs - 1
    params = jax.tree.map(lambda x: x[:, last], bank.params)
    first = jax.tree.map(lambda x: x[0], params)
    predict_one = jax.jit(lambda x: jnp.argmax(apply_fn(first, x), -1))
    mean_logits = jax.jit(
        lambda x: jnp.mean(jax.vmap(apply_fn, in_axes=(0, None))(params, x), axis=0)
    )
    chosen, short = [], 0
    for c in range(num_classes):
        cand = rng.permutation(np.flatnonzero(train_labels == c))
        picked: list[int] = []
        for i in range(0, len(cand), CHUNK):
            chunk = cand[i : i + CHUNK]
            pred = np.asarray(predict_one(train_x[jnp.asarray(chunk)]))
            picked.extend(chunk[pred == c][: ipc - len(picked)].tolist())
            if len(picked) == ipc:
                break
        if len(picked) < ipc:  # too few correct: fill with other images of the class
            short += ipc - len(picked)
            taken = set(picked)
            picked.extend([j for j in cand.tolist() if j not in taken][: ipc - len(picked)])
        chosen.extend(picked)
    images = train_x[jnp.asarray(np.asarray(chosen))]
    labels = data_lib.class_sorted_labels(num_classes, ipc)
    return InitialSet(images, labels, mean_logits(images), short)

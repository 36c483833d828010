"""Herding: pick real images whose feature mean tracks the class mean (Welling, 2009).

Herding is the coreset baseline of DM's continual-learning experiments (``CL_DM.py``, from
iCaRL, Rebuffi et al., 2017): for each class, with features ``f_1 .. f_n`` of its images and
their mean ``mu``, the ``t``-th pick is

    i_t = argmin_{i not yet picked} || mu - (f_{i_1} + ... + f_{i_{t-1}} + f_i) / t ||_2

so the running mean of the picked features stays as close as it can to the class mean, one
greedy step at a time. No index is picked twice; ties go to the lowest index, so the selection
is a deterministic function of the features (computed in float64 with NumPy).

The features are the penultimate embedding of a trained network: for MTT's ``ConvNet`` the
flattened output of its last [conv -> norm -> ReLU -> pool] block, i.e. the input of its final
linear layer. ``make_feature_fn`` records that input with ``flax.linen.intercept_methods``
while the unchanged model runs (``satm_jax.models.ConvNet`` has no embedding output, and
re-assembling its forward pass from its submodules would duplicate ``models.py``); the same
rule, "the input of the last ``Dense`` layer called", is the embedding of every network of the
evaluation pool too. ``train_feature_network`` is the short supervised training that gives the
network its features (``satm_jax.train``'s SGD epochs with DSA).

Example:
  >>> import numpy as np
  >>> from satm_jax import herding
  >>> f = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
  >>> herding.herding_select(f, 4).tolist()
  [2, 1, 3, 0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from satm_jax import models as models_lib
from satm_jax import train as train_lib

Array = jax.Array

FEATURE_CHUNK = 500  # images per jit call when features are computed


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def herding_select(features: Any, k: int) -> np.ndarray:
    """Indices of ``k`` rows of ``features`` chosen greedily by herding (class-mean matching).

    Args:
      features: ``(n, d)`` features of one class's images.
      k: how many to pick, ``1 <= k <= n``.

    Returns:
      ``(k,)`` int64 indices into ``features`` in the order they were picked (distinct).

    Raises:
      ValueError: ``features`` is not 2-D or not finite, or ``k`` is out of range.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {f.shape}")
    n = f.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"herding picks 1 <= k <= n = {n} images, got k={k}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features must be finite")
    mu = f.mean(axis=0)
    running = np.zeros_like(mu)
    taken = np.zeros(n, bool)
    picked = np.empty(k, np.int64)
    for t in range(1, k + 1):
        dist = np.sum(np.square(mu - (running + f) / t), axis=1)
        dist[taken] = np.inf
        i = int(np.argmin(dist))  # first minimum: ties go to the lowest index
        picked[t - 1] = i
        taken[i] = True
        running += f[i]
    return picked


def herding_per_class(features: Any, labels: Any, classes: Any, k: int) -> np.ndarray:
    """Herding within each class: ``k`` indices (into ``features``) per class of ``classes``.

    Args:
      features: ``(n, d)`` features of all candidate images.
      labels: ``(n,)`` their class ids.
      classes: the classes to select for, in output order.
      k: images per class.

    Returns:
      ``(len(classes) * k,)`` indices into ``features``: class ``classes[0]``'s picks (in
      herding order), then ``classes[1]``'s, ...

    Raises:
      ValueError: shapes disagree, or a class has fewer than ``k`` images.
    """
    labels = np.asarray(labels)
    features = np.asarray(features)
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels {labels.shape} do not match features {features.shape}")
    out = []
    for c in np.asarray(classes).tolist():
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than k={k}")
        out.append(idx[herding_select(features[idx], k)])
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def make_feature_fn(model: nn.Module) -> Callable[[dict[str, Any], Array], Array]:
    """``features(variables, x) -> (n, d)``: the input of the model's last ``Dense`` layer.

    The model runs unchanged in inference mode (``train=False``); an interceptor records the
    argument of every ``Dense.__call__`` (``satm_jax.models.Dense`` or ``flax.linen.Dense``)
    and the last one is returned, flattened per image. For ``ConvNet`` that is the flattened
    output of the last block (the penultimate embedding: ``logits = features @ W + b``).

    Raises:
      ValueError: (when called) the model calls no ``Dense`` layer.
    """

    def features(variables: dict[str, Any], x: Array) -> Array:
        seen: list[Array] = []

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(
                context.module, (models_lib.Dense, nn.Dense)
            ):
                seen.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, x, train=False)
        if not seen:
            raise ValueError(f"{type(model).__name__} calls no Dense layer: no embedding to take")
        return seen[-1].reshape(x.shape[0], -1)

    return features


def extract_features(
    model: nn.Module,
    variables: dict[str, Any],
    images: Any,
    chunk: int = FEATURE_CHUNK,
) -> np.ndarray:
    """Features (``make_feature_fn``) of ``images`` in chunks of ``chunk``; ``(n, d)`` float32.

    The last chunk is padded with zeros to the chunk size (one compiled program); padded rows
    are dropped (inference mode treats images independently).
    """
    fn = jax.jit(make_feature_fn(model))
    images = jnp.asarray(images, jnp.float32)
    n = images.shape[0]
    b = max(1, min(chunk, n))
    out = []
    for i in range(0, n, b):
        x = images[i : i + b]
        m = x.shape[0]
        if m < b:
            x = jnp.concatenate([x, jnp.zeros((b - m, *x.shape[1:]), x.dtype)])
        out.append(np.asarray(fn(variables, x))[:m])
    return np.concatenate(out).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FeatureTraining:
    """The short supervised training of the network whose features herding uses.

    Evaluation-style SGD (``satm_jax.train``): momentum and weight decay as
    ``satm_jax.evaluate.EvalConfig``'s defaults, constant learning rate, DSA on every batch.

    Attributes:
      epochs: passes over the images.
      lr: learning rate.
      batch_size: minibatch size.
      momentum: SGD momentum.
      weight_decay: L2 added to the gradient.
      dsa_strategy: DSA families (``"none"`` disables).
      seed: the network's init and batch-order seed (callers fold in more, e.g. the stage).
    """

    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    seed: int = 0


def train_feature_network(
    model: nn.Module,
    images: Any,
    labels: Any,
    cfg: FeatureTraining,
    *,
    key: Array | None = None,
) -> dict[str, Any]:
    """Trains ``model`` from a fresh initialisation on ``(images, labels)``; returns variables.

    Args:
      model: the network (outputs one logit per class of ``labels``).
      images: ``(n, H, W, C)`` preprocessed images.
      labels: ``(n,)`` class ids in ``[0, num_outputs)``.
      cfg: the training.
      key: init/batch key (default ``PRNGKey(cfg.seed)``).

    Raises:
      ValueError: ``cfg.epochs < 1``, or the training diverged (non-finite parameters).
    """
    from satm_jax import augment as augment_lib

    if cfg.epochs < 1:
        raise ValueError(f"the feature network needs at least 1 epoch, got {cfg.epochs}")
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    sgd = train_lib.SGDConfig(
        batch_size=cfg.batch_size, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    epoch = jax.jit(
        train_lib.make_train_epoch(model, augment_lib.make_augment(cfg.dsa_strategy), sgd)
    )
    x0 = jnp.zeros((2, *images.shape[1:]), jnp.float32)
    init = jax.jit(lambda k: train_lib.init_train_state(dict(model.init(k, x0, train=False))))
    state = init(jax.random.fold_in(key, 0))  # jitted: op-by-op init is slow on the CPU
    lr = jnp.asarray(cfg.lr, jnp.float32)
    for e in range(cfg.epochs):
        state, _ = epoch(state, jax.random.fold_in(key, e + 1), images, labels, lr)
    out: dict[str, Any] = {"params": state.params}
    if jax.tree.leaves(state.batch_stats):
        out["batch_stats"] = state.batch_stats
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out)):
        raise ValueError(
            f"the herding feature network diverged (lr {cfg.lr}); lower its learning rate"
        )
    return out

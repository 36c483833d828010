"""Evaluation: train fresh networks from scratch on a (synthetic) set, report test accuracy.

The protocol is MTT's ``evaluate_synset``: a freshly initialised network is trained on
``(X, Y)`` with SGD (momentum 0.9, weight decay 5e-4), learning rate = the learned step size
``alpha``, 1000 epochs with the rate multiplied by 0.1 once at epoch 500, batch 256, DSA on every
batch; the test accuracy after the last epoch is recorded. Several networks (default 5) train
in one program (``satm_jax.train.over_models``: one after another on the CPU, side by side
with ``jax.vmap`` elsewhere); the result is their mean and standard deviation. Presets may scale
the number of epochs down (``EvalConfig.epochs``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from satm_jax import evaluate, models
  >>> net = models.ConvNet(num_classes=2, width=4, depth=1)
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1)); y = jnp.array([0, 0, 1, 1])
  >>> cfg = evaluate.EvalConfig(epochs=2, num_models=2, dsa_strategy="none")
  >>> r = evaluate.evaluate_set(net, x, y, 0.01, x, y, cfg, progress=False)
  >>> r.accs.shape
  (2,)
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from satm_jax import augment as augment_lib
from satm_jax import train as train_lib

Array = jax.Array

HEALTH_FLAGS = ("diverged", "collapsed")  # EvalResult's per-network flags, by field name
PREDICT_CHUNK = 500  # test images per jit call when the evaluated networks are tested


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol.

    Attributes:
      epochs: training epochs (MTT: 1000); the learning rate drops x0.1 at ``epochs // 2``.
      batch_size: minibatch size.
      momentum: SGD momentum.
      weight_decay: L2 added to the gradient.
      num_models: networks trained per evaluation (their mean and std are reported).
      dsa_strategy: DSA families applied to every batch.
      epochs_per_call: epochs per jit call (progress granularity).
      seed: base seed; evaluation ``i`` of a call uses ``fold_in(key, i)``.
      width: width of the evaluation ConvNet (``None``: the distillation network's width).
    """

    epochs: int = 1000
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_models: int = 5
    dsa_strategy: str = augment_lib.DEFAULT_STRATEGY
    epochs_per_call: int = 100
    seed: int = 0
    width: int | None = None


class EvalResult(NamedTuple):
    """Test accuracies (fractions) of the evaluated networks.

    Attributes:
      accs: accuracy of each network on the test split.
      extra: accuracy of each network on every extra test set (``extra_tests`` of
        :func:`evaluate_set`), by the set's key; empty when none was given.
      diverged: whether each network's training diverged (a non-finite weight or batch
        statistic at the end): such a network predicts one class, so its accuracy is chance
        and says nothing about the set. ``None`` where unknown (e.g. a result read back from
        a file that did not record it).
      collapsed: whether each network predicts one class for every test image (finite
        weights, but a degenerate network: e.g. every ReLU dead after too large a step);
        ``None`` where unknown.
    """

    accs: np.ndarray
    extra: Mapping[Any, np.ndarray] = types.MappingProxyType({})
    diverged: np.ndarray | None = None
    collapsed: np.ndarray | None = None

    @property
    def num_diverged(self) -> int:
        """How many networks diverged (0 where unknown)."""
        return 0 if self.diverged is None else int(np.sum(self.diverged))

    @property
    def num_collapsed(self) -> int:
        """How many networks that did not diverge predict one class only (0 where unknown)."""
        if self.collapsed is None:
            return 0
        ok = np.ones_like(self.collapsed) if self.diverged is None else ~self.diverged
        return int(np.sum(self.collapsed & ok))

    @property
    def mean(self) -> float:
        """Mean accuracy in percent."""
        return float(100.0 * np.mean(self.accs))

    @property
    def std(self) -> float:
        """Standard deviation (population, as ``np.std``) in percent."""
        return float(100.0 * np.std(self.accs))

    def health_counts(self) -> dict[str, int]:
        """``{flag: how many networks}`` for every flag of ``HEALTH_FLAGS``."""
        return {flag: getattr(self, f"num_{flag}") for flag in HEALTH_FLAGS}

    def summary(self) -> str:
        """``"mean +- std %"``, with a warning when networks diverged or collapsed."""
        text = f"{self.mean:.2f} +- {self.std:.2f} %"
        if self.num_diverged:
            text += (
                f" (WARNING: {self.num_diverged} of {len(self.accs)} networks diverged: "
                "non-finite weights, chance accuracy; lower the evaluation learning rate)"
            )
        if self.num_collapsed:
            text += (
                f" (WARNING: {self.num_collapsed} of {len(self.accs)} networks predict one "
                "class for every test image; try a lower evaluation learning rate)"
            )
        return text


def evaluate_set(
    model: nn.Module,
    images: Array,
    labels: Array,
    lr: float | Array,
    test_images: Array,
    test_labels: Array,
    cfg: EvalConfig,
    *,
    key: Array | None = None,
    per_model_sets: bool = False,
    progress: bool = True,
    desc: str = "eval",
    extra_tests: Mapping[Any, tuple[Any, Any]] | None = None,
    model_axis: str = "auto",
) -> EvalResult:
    """Trains ``cfg.num_models`` fresh networks on ``(images, labels)``; returns test accuracies.

    Args:
      model: the network (a fresh initialisation per evaluation key).
      images: the training set, ``(n, H, W, C)``, or ``(num_models, n, H, W, C)`` with
        ``per_model_sets`` (e.g. a different random real subset per network).
      labels: class ids or probability rows (soft labels), with a leading model axis if
        ``per_model_sets``.
      lr: learning rate (the learned step size).
      test_images, test_labels: the test split (preprocessed).
      cfg: the protocol.
      key: evaluation key (default ``PRNGKey(cfg.seed)``).
      per_model_sets: whether ``images``/``labels`` carry a leading model axis.
      progress: show a progress bar.
      desc: progress bar label.
      extra_tests: more test sets ``{key: (images, labels)}`` (e.g. corrupted copies of the
        test split, ``satm_jax.ood``), preprocessed like ``test_images``; the same trained
        networks are tested on each, the accuracies are in ``EvalResult.extra``.
      model_axis: how the networks share one program (``satm_jax.train.MODEL_AXES``):
        ``"auto"`` (one after another on the CPU, ``vmap`` elsewhere), ``"vmap"``, ``"map"``;
        the accuracies are the same either way.
    """
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(cfg.num_models))
    sgd = train_lib.SGDConfig(
        batch_size=cfg.batch_size,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lr_decay_epochs=(cfg.epochs // 2,),
    )
    augment_fn = augment_lib.make_augment(cfg.dsa_strategy)
    epoch_fn = train_lib.make_train_epoch(model, augment_fn, sgd)
    data_axis = 0 if per_model_sets else None
    shape = images.shape[1:] if not per_model_sets else images.shape[2:]
    x0 = jnp.zeros((2, *shape), jnp.float32)
    lr = jnp.asarray(lr, jnp.float32)

    @jax.jit
    @jax.vmap
    def init(k):
        variables = model.init(jax.random.fold_in(k, 0), x0, train=False)
        return train_lib.init_train_state(dict(variables))

    def chunk_fn(length):
        def run(state, k, x, y, lr):
            def body(s, _):
                ek = jax.random.fold_in(k, s.epoch + 1)
                return epoch_fn(s, ek, x, y, lr)

            return jax.lax.scan(body, state, None, length=length)

        return jax.jit(
            train_lib.over_models(run, (0, 0, data_axis, data_axis, None), how=model_axis)
        )

    states = init(keys)
    compiled: dict[int, Any] = {}
    bar = tqdm(total=cfg.epochs, desc=desc, disable=not progress, leave=False)
    done = 0
    while done < cfg.epochs:
        length = min(cfg.epochs_per_call, cfg.epochs - done)
        if length not in compiled:
            compiled[length] = chunk_fn(length)
        states, metrics = compiled[length](states, keys, images, labels, lr)
        done += length
        bar.update(length)
        bar.set_postfix(train_acc=f"{100 * float(jnp.mean(metrics['acc'][:, -1])):.1f}%")
    bar.close()
    # The test set goes through in chunks from the host: one jit program for all of it would
    # hold every chunk's activations (x the networks, x 9 for patch convolutions) at once,
    # tens of GiB for 10,000 images at width 128.
    predict = jax.jit(
        train_lib.over_models(
            train_lib.make_predict(model, batch_size=PREDICT_CHUNK), (0, 0, None), how=model_axis
        )
    )

    def logits_of(x) -> Array:
        return jnp.concatenate(
            [
                predict(states.params, states.batch_stats, jnp.asarray(x[i : i + PREDICT_CHUNK]))
                for i in range(0, x.shape[0], PREDICT_CHUNK)
            ],
            axis=1,
        )

    def accuracy(logits, y) -> np.ndarray:
        return np.asarray(jax.vmap(train_lib.accuracy, (0, None))(logits, jnp.asarray(y)))

    logits = logits_of(test_images)
    accs = accuracy(logits, test_labels)
    predicted = np.asarray(jnp.argmax(logits, -1))
    collapsed = np.all(predicted == predicted[:, :1], axis=1)
    extra = {k: accuracy(logits_of(x), y) for k, (x, y) in (extra_tests or {}).items()}
    return EvalResult(
        accs,
        types.MappingProxyType(extra),
        np.asarray(diverged_networks(states)),
        collapsed,
    )


@jax.jit
def diverged_networks(states: Any) -> Array:
    """Per network (the leading axis of ``states``' parameters and batch statistics): whether
    any of its values is not finite."""

    def bad(tree):
        leaves = jax.tree.leaves(tree)
        if not leaves:
            return jnp.zeros((), bool)
        return jnp.any(jnp.stack([~jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))

    return jax.vmap(lambda p, b: bad(p) | bad(b))(states.params, states.batch_stats)

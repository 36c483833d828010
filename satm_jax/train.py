"""Supervised SGD training on an in-memory labelled set, shared by experts and evaluation.

One epoch walks a fresh random permutation of the set in minibatches (the last one padded with
zero-weight repeats, so shapes stay static and the gradient equals that of the short batch),
applies DSA to every batch, and takes PyTorch-style SGD steps:

    g = grad + weight_decay * p;  buf = momentum * buf + g;  p = p - lr * buf

(``torch.optim.SGD`` with dampening 0). Everything is a pure function of its inputs, so epochs
run over a leading axis of experts or evaluation seeds (``over_models``) and ``jit`` as one
program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from optax import tree_utils as otu

Array = jax.Array
AugmentFn = Callable[[Array, Array], Array]

# How several networks (experts, evaluation seeds) are trained in one program.
MODEL_AXES = ("auto", "vmap", "map")


def resolve_model_axis(how: str, *, sharded: bool = False) -> str:
    """Maps ``"auto"`` to ``"map"`` on a single CPU device and ``"vmap"`` otherwise.

    Our choice, by measurement (docs/PERFORMANCE.md, 2026-12-04): on XLA's CPU backend
    training vmapped networks cost 1.28-1.33x more per network than one after another
    (``experiments.bench --mode=eval``), so there ``jax.lax.map`` (one network after another inside the same program,
    the same numbers) is faster; on GPU/TPU, and whenever the network axis is sharded across
    devices (``sharded``), ``vmap`` keeps the networks side by side.
    """
    if how not in MODEL_AXES:
        raise ValueError(f"model axis must be one of {MODEL_AXES}, got {how!r}")
    if how == "auto":
        return "map" if jax.default_backend() == "cpu" and not sharded else "vmap"
    return how


def over_models(
    fn: Callable[..., Any], in_axes: tuple[int | None, ...], how: str = "auto"
) -> Callable[..., Any]:
    """``fn`` over the leading axis of the arguments whose ``in_axes`` entry is 0.

    ``how="vmap"`` is ``jax.vmap(fn, in_axes)``; ``"map"`` runs ``fn`` on one slice after
    another with ``jax.lax.map`` (same results, one network's memory at a time); ``"auto"``:
    ``resolve_model_axis``. Outputs are stacked along a new leading axis either way.

    Example:
      >>> import jax.numpy as jnp
      >>> from satm_jax import train
      >>> f = train.over_models(lambda a, b: a * b, (0, None), how="map")
      >>> f(jnp.arange(3.0), 2.0).tolist()
      [0.0, 2.0, 4.0]
    """
    if any(a not in (0, None) for a in in_axes):
        raise ValueError(f"in_axes entries must be 0 or None, got {in_axes}")
    how = resolve_model_axis(how)
    if how == "vmap":
        return jax.vmap(fn, in_axes=in_axes)
    mapped = [i for i, a in enumerate(in_axes) if a == 0]

    def run(*args):
        if len(args) != len(in_axes):
            raise TypeError(f"expected {len(in_axes)} arguments, got {len(args)}")

        def one(xs):
            full = list(args)
            for i, x in zip(mapped, xs):
                full[i] = x
            return fn(*full)

        return jax.lax.map(one, tuple(args[i] for i in mapped))

    return run


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    """Plain/momentum SGD on minibatches.

    Attributes:
      batch_size: minibatch size (MTT: 256).
      momentum: heavy-ball momentum (experts 0, evaluation 0.9).
      weight_decay: L2 added to the gradient (experts 0, evaluation 5e-4).
      lr_decay_epochs: epochs at whose start the learning rate is multiplied by 0.1.
    """

    batch_size: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay_epochs: tuple[int, ...] = ()


class TrainState(NamedTuple):
    """Network variables, the momentum buffer and the epoch counter."""

    params: Any
    batch_stats: Any
    momentum: Any
    epoch: Array


def init_train_state(variables: dict[str, Any]) -> TrainState:
    params = variables["params"]
    return TrainState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        momentum=otu.tree_zeros_like(params),
        epoch=jnp.zeros((), jnp.int32),
    )


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Per-example cross-entropy; ``targets`` are class ids or probability rows (soft labels)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        return -jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return -jnp.sum(targets.astype(logp.dtype) * logp, axis=-1)


def epoch_batches(key: Array, n: int, batch_size: int) -> tuple[Array, Array]:
    """Indices ``(steps, b)`` of one epoch over a random permutation, and 0/1 weights.

    ``b = min(batch_size, n)``; the last batch is filled up with repeats of weight 0.
    """
    b = min(batch_size, n)
    steps = -(-n // b)
    perm = jax.random.permutation(key, n)
    pad = steps * b - n
    idx = jnp.concatenate([perm, perm[:pad]]) if pad else perm
    w = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
    return idx.reshape(steps, b), w.reshape(steps, b)


def lr_factor(epoch: Array, decay_epochs: tuple[int, ...]) -> Array:
    """``0.1 ** (number of decay epochs <= epoch)``."""
    f = jnp.ones((), jnp.float32)
    for e in decay_epochs:
        f = jnp.where(epoch >= e, f * 0.1, f)
    return f


def make_train_epoch(
    model: nn.Module,
    augment_fn: AugmentFn,
    cfg: SGDConfig,
    sharpness_tx: Any | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """Returns ``epoch(state, key, images, labels, lr) -> (state, metrics)``.

    ``labels`` may be integer ids or probability rows. ``lr`` is a scalar array (it can be a
    learned step size). Metrics: mean training loss and accuracy of the epoch.

    ``sharpness_tx``: an optional stateless sharpness-aware transform from
    ``satm_jax.sharpness`` built on ``optax.identity()`` (e.g. GSAM for FTD's flat experts);
    it turns each minibatch gradient into the sharpness-aware direction (same batch, same
    augmentation) before weight decay and momentum.
    """

    def loss_fn(params, batch_stats, x, y, w):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, new_vars = model.apply(variables, x, train=True, mutable=["batch_stats"])
        ce = cross_entropy(logits, y)
        w = w.astype(ce.dtype)
        loss = jnp.sum(w * ce) / jnp.sum(w)
        hard = y if jnp.issubdtype(y.dtype, jnp.integer) else jnp.argmax(y, -1)
        correct = jnp.sum(w * (jnp.argmax(logits, -1) == hard).astype(w.dtype))
        return loss, (new_vars.get("batch_stats", batch_stats), correct)

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def epoch(state: TrainState, key: Array, images: Array, labels: Array, lr: Array):
        k_perm, k_aug = jax.random.split(key)
        idx, wts = epoch_batches(k_perm, images.shape[0], cfg.batch_size)
        aug_keys = jax.random.split(k_aug, idx.shape[0])
        step_lr = lr * lr_factor(state.epoch, cfg.lr_decay_epochs)

        def step(carry, inp):
            params, batch_stats, mom = carry
            bidx, w, k = inp
            x = augment_fn(k, images[bidx])
            y = labels[bidx]
            (loss, (new_stats, correct)), g = value_and_grad(params, batch_stats, x, y, w)
            if sharpness_tx is not None:
                grad_fn = lambda p, i: value_and_grad(p, batch_stats, x, y, w)[1]  # noqa: E731
                g, _ = sharpness_tx.update(g, sharpness_tx.init(params), params, grad_fn=grad_fn)
            batch_stats = new_stats
            if cfg.weight_decay:
                g = jax.tree.map(lambda gi, p: gi + cfg.weight_decay * p, g, params)
            if cfg.momentum:
                mom = jax.tree.map(lambda m, gi: cfg.momentum * m + gi, mom, g)
                direction = mom
            else:
                direction = g
            params = jax.tree.map(lambda p, d: p - step_lr.astype(p.dtype) * d, params, direction)
            return (params, batch_stats, mom), (loss * jnp.sum(w), correct)

        (params, batch_stats, mom), (losses, corrects) = jax.lax.scan(
            step, (state.params, state.batch_stats, state.momentum), (idx, wts, aug_keys)
        )
        n = images.shape[0]
        metrics = {"loss": jnp.sum(losses) / n, "acc": jnp.sum(corrects) / n}
        return TrainState(params, batch_stats, mom, state.epoch + 1), metrics

    return epoch


def make_predict(model: nn.Module, batch_size: int = 1000) -> Callable[[Any, Any, Array], Array]:
    """Returns ``predict(params, batch_stats, images) -> logits`` in inference mode, batched."""

    def predict(params, batch_stats, images):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        n = images.shape[0]
        outs = []
        for i in range(0, n, batch_size):
            outs.append(model.apply(variables, images[i : i + batch_size], train=False))
        return jnp.concatenate(outs, axis=0)

    return predict


def accuracy(logits: Array, labels: Array) -> Array:
    """Fraction of rows whose argmax equals the label."""
    return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))

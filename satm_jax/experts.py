"""Expert trajectories: training, and sampling for matching.

An *expert* is a network trained on the real training set with plain SGD (MTT: lr 0.01,
momentum 0, weight decay 0, batch 256, DSA on every batch). Its parameters are recorded before
training and after every epoch, ``theta*_{e,0..E}``; trajectory matching reads pairs
``(theta*_{e,t}, theta*_{e,t+M})``.

Several experts train in one program (``ExpertConfig.parallel``; ``satm_jax.train.over_models``:
one after another on a CPU, side by side with ``jax.vmap`` elsewhere); each finished one goes
to an ``satm_jax.expert_store.ExpertStore`` (orbax checkpoints and a manifest).

Example:
  >>> from satm_jax import experts
  >>> experts.ExpertConfig(num_experts=2, epochs=3).lr
  0.01
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from satm_jax import parallel
from satm_jax import sharpness as sharpness_lib
from satm_jax import train as train_lib
from satm_jax.expert_store import ExpertBank, ExpertError, ExpertStore

Array = jax.Array
Params = Any


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """How experts are trained (MTT's ``buffer.py`` defaults).

    Attributes:
      num_experts: how many trajectories to record (papers: 100).
      epochs: training epochs per expert; only epochs up to ``T+ + M`` are ever read.
      lr: SGD learning rate.
      batch_size: minibatch size.
      momentum: SGD momentum (MTT: 0).
      weight_decay: L2 (MTT: 0).
      dsa_strategy: DSA families applied to every batch (``"none"`` disables).
      seed: base seed; expert ``i`` uses ``fold_in(PRNGKey(seed), i)``.
      parallel: experts trained together in one program (one group).
      sharpness: ``"none"`` (MTT) or ``"gsam"``/``"sam"``/``"asam"``: flat experts as in FTD
        (Du et al., CVPR 2023, which trains its experts with GSAM).
      rho: radius of the experts' sharpness-aware step (FTD: 0.01).
      gsam_alpha: GSAM's coefficient (FTD's default 0.4).
    """

    num_experts: int = 10
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    seed: int = 0
    parallel: int = 5
    sharpness: str = "none"
    rho: float = 0.01
    gsam_alpha: float = 0.4


# The sharpness-aware steps experts can take (``ExpertConfig.sharpness``).
EXPERT_SHARPNESS = ("none", "sam", "asam", "gsam")


# --------------------------------------------------------------------------------------------
# Sampling for matching
# --------------------------------------------------------------------------------------------


def sample_start_target(
    bank: ExpertBank, key: Array, min_start: int, max_start: Array | int, expert_epochs: int
) -> tuple[Params, Params, Array, Array]:
    """Draws an expert uniformly and a start epoch ``t`` uniformly from ``[min_start,
    max_start)``; returns ``(theta*_t, theta*_{t+M}, expert, t)``. ``max_start`` may be traced."""
    ke, kt = jax.random.split(key)
    e = jax.random.randint(ke, (), 0, bank.num_experts)
    t = jax.random.randint(kt, (), min_start, jnp.maximum(max_start, min_start + 1))
    start = jax.tree.map(lambda x: x[e, t], bank.params)
    target = jax.tree.map(lambda x: x[e, t + expert_epochs], bank.params)
    return start, target, e, t


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def expert_key(seed: int, index: int) -> Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), index)


def make_expert_trainer(
    model: nn.Module,
    image_shape: tuple[int, ...],
    cfg: ExpertConfig,
    augment_fn: Callable[[Array, Array], Array],
    model_axis: str = "auto",
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Returns ``(init, epoch)``, both over a leading axis of experts and jitted.

    ``init(keys) -> train states``; ``epoch(states, keys, images, labels) -> states, metrics``.
    ``model_axis``: how the experts share the program (``satm_jax.train.over_models``).
    """
    sgd = train_lib.SGDConfig(
        batch_size=cfg.batch_size, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sharp = None
    if cfg.sharpness != "none":
        if cfg.sharpness not in EXPERT_SHARPNESS:
            raise ValueError(
                f"expert sharpness must be one of {EXPERT_SHARPNESS}, got {cfg.sharpness!r}"
            )
        sharp = sharpness_lib.make_sharpness(
            cfg.sharpness, optax.identity(), rho=cfg.rho, gsam_alpha=cfg.gsam_alpha
        )
    epoch_fn = train_lib.make_train_epoch(model, augment_fn, sgd, sharpness_tx=sharp)
    x0 = jnp.zeros((2, *image_shape), jnp.float32)

    def init_one(key):
        variables = model.init(key, x0, train=False)
        return train_lib.init_train_state(dict(variables))

    def epoch_one(state, key, images, labels):
        return epoch_fn(state, key, images, labels, jnp.asarray(cfg.lr, jnp.float32))

    init = jax.jit(jax.vmap(init_one))
    epoch = jax.jit(train_lib.over_models(epoch_one, (0, 0, None, None), how=model_axis))
    return init, epoch


def train_experts(
    model: nn.Module,
    cfg: ExpertConfig,
    train_images: Array,
    train_labels: Array,
    indices: list[int],
    *,
    augment_fn: Callable[[Array, Array], Array],
    test_images: Array | None = None,
    test_labels: Array | None = None,
    progress: bool = True,
    mesh: Any | None = None,
    log: Callable[[str], None] | None = None,
    model_axis: str = "auto",
) -> list[tuple[int, list[Params], float | None]]:
    """Trains experts ``indices`` together (one group, one program) for ``cfg.epochs`` epochs.

    ``model_axis`` (``satm_jax.train.MODEL_AXES``): ``"auto"`` trains the group one expert
    after another on a single CPU device and side by side (``vmap``) elsewhere or when sharded;
    the trajectories are the same either way.

    With a ``mesh`` (``satm_jax.parallel.make_mesh``) whose size divides the group, the expert
    axis is split across its devices (each device trains its share; the data are replicated).
    A group that does not divide (e.g. the last, smaller group) trains on one device with the
    same results, and ``log`` (default: a ``logging`` warning) says so.

    Returns ``[(index, [theta_0, ..., theta_E], test_acc), ...]``; each ``theta`` is a host
    (NumPy) parameter tree.
    """
    sharded = mesh is not None and len(indices) % parallel.num_devices(mesh) == 0
    axis = train_lib.resolve_model_axis(model_axis, sharded=sharded)
    init, epoch = make_expert_trainer(model, train_images.shape[1:], cfg, augment_fn, axis)
    keys = jnp.stack([expert_key(cfg.seed, i) for i in indices])
    if sharded:
        keys = parallel.shard_leading(keys, mesh)
        train_images = parallel.replicate(train_images, mesh)
        train_labels = parallel.replicate(train_labels, mesh)
    elif mesh is not None:
        n = parallel.num_devices(mesh)
        (log or logging.getLogger(__name__).warning)(
            f"experts {indices[0]}-{indices[-1]}: a group of {len(indices)} does not divide "
            f"across {n} devices; training it on one device (an --expert_parallel that is a "
            f"multiple of {n} uses them all)"
        )
    k_init = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    states = init(k_init)
    host = lambda s: jax.tree.map(np.asarray, s.params)  # noqa: E731
    history = [host(states)]
    bar = tqdm(
        range(cfg.epochs),
        desc=f"experts {indices[0]}-{indices[-1]}",
        disable=not progress,
        leave=False,
    )
    for e in bar:
        ek = jax.vmap(lambda k: jax.random.fold_in(k, e + 1))(keys)
        states, metrics = epoch(states, ek, train_images, train_labels)
        history.append(host(states))
        bar.set_postfix(loss=f"{float(jnp.mean(metrics['loss'])):.3f}")
    accs: list[float | None] = [None] * len(indices)
    if test_images is not None:
        predict = train_lib.make_predict(model)
        logits = jax.jit(train_lib.over_models(predict, (0, 0, None), how=axis))(
            states.params, states.batch_stats, test_images
        )
        accs = [float(a) for a in jax.vmap(train_lib.accuracy, (0, None))(logits, test_labels)]
    out = []
    for j, i in enumerate(indices):
        traj = [jax.tree.map(lambda x: x[j], h) for h in history]
        out.append((i, traj, accs[j]))
    return out


def generate_experts(
    store: ExpertStore,
    model: nn.Module,
    cfg: ExpertConfig,
    train_images: Array,
    train_labels: Array,
    *,
    augment_fn: Callable[[Array, Array], Array],
    test_images: Array | None = None,
    test_labels: Array | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    mesh: Any | None = None,
) -> ExpertStore:
    """Trains the store's missing experts, ``cfg.parallel`` at a time, saving each group as it
    finishes (an interrupted run resumes with the experts still missing)."""
    missing = store.missing(cfg.num_experts)
    done = cfg.num_experts - len(missing)
    if done:
        log(f"experts: {done} of {cfg.num_experts} already in {store.directory}")
    if not missing:
        return store
    bar = tqdm(total=len(missing), desc="experts", disable=not progress)
    for g in range(0, len(missing), cfg.parallel):
        group = missing[g : g + cfg.parallel]
        results = train_experts(
            model,
            cfg,
            train_images,
            train_labels,
            group,
            augment_fn=augment_fn,
            test_images=test_images,
            test_labels=test_labels,
            progress=progress,
            mesh=mesh,
            log=log,
        )
        for i, traj, acc in results:
            bad = [
                e
                for e, p in enumerate(traj)
                if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p))
            ]
            if bad:
                raise ExpertError(
                    f"expert {i} diverged: non-finite parameters from epoch {bad[0]} on; it was "
                    f"not saved. Lower the experts' learning rate (--expert_lr, now {cfg.lr})."
                )
            store.save_expert(i, traj, acc)
        bar.update(len(group))
        accs = [a for _, _, a in results if a is not None]
        if accs:
            bar.set_postfix(test_acc=f"{100 * np.mean(accs):.1f}%")
    bar.close()
    return store

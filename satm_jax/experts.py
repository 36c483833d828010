"""Expert trajectories: training, storage with orbax-checkpoint, and sampling for matching.

An *expert* is a network trained on the real training set with plain SGD (MTT: lr 0.01,
momentum 0, weight decay 0, batch 256, DSA on every batch). Its parameters are recorded before
training and after every epoch, ``theta*_{e,0..E}``; trajectory matching reads pairs
``(theta*_{e,t}, theta*_{e,t+M})``.

Several experts train at once with ``jax.vmap`` (``ExpertConfig.parallel``). Each expert is
stored as one orbax checkpoint holding ``{"epoch_000": params, "epoch_001": ..., ...}``, next to
a ``manifest.json`` that records what they were trained on (dataset, model config,
preprocessing) and how (seed, lr, epochs, ...), plus the list of finished experts. Reading is
partial: ``load_pair`` restores exactly the two epochs a matching step needs, ``load_bank`` only
the epochs up to ``T+ + M``.

Stored experts that do not match the requested dataset, model or preprocessing are refused
with an ``ExpertMismatchError`` that lists every field that differs; parameter files whose
shapes do not match the model are refused likewise.

Example:
  >>> import tempfile
  >>> from satm_jax import experts
  >>> spec = {"dataset": "digits", "model": {"name": "convnet"}, "preprocessing": {"zca": False}}
  >>> store = experts.ExpertStore.create(tempfile.mkdtemp(), spec, num_experts=2, epochs=3)
  >>> store.completed()
  []
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from satm_jax import parallel
from satm_jax import sharpness as sharpness_lib
from satm_jax import train as train_lib
from satm_jax.checkpoint import quiet_orbax
from satm_jax.outputs import json_diff, to_jsonable, write_json

Array = jax.Array
Params = Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ExpertError(Exception):
    """Missing, corrupt or unusable expert files."""


class ExpertMismatchError(ExpertError):
    """Stored experts were trained for a different dataset, model or preprocessing."""


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
      parallel: experts trained at once with ``vmap``.
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


def _epoch_key(e: int) -> str:
    return f"epoch_{e:03d}"


def _expert_dir(i: int) -> str:
    return f"expert_{i:04d}"


class ExpertStore:
    """A directory of expert trajectories with a manifest.

    ``spec`` is what an expert must agree on to be usable (dataset, model identity,
    preprocessing, ...); ``open`` refuses a store whose spec differs from the requested one.
    """

    def __init__(self, directory: str, manifest: dict[str, Any]):
        self.directory = os.path.abspath(directory)
        self.manifest = manifest

    # ---- creation and opening ---------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str,
        spec: dict[str, Any],
        *,
        num_experts: int,
        epochs: int,
        training: dict[str, Any] | None = None,
    ) -> ExpertStore:
        """Creates an empty store (the directory may exist but must have no manifest)."""
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(os.path.join(directory, MANIFEST)):
            raise ExpertError(f"{directory} already holds an expert store; open it instead")
        manifest = {
            "format_version": FORMAT_VERSION,
            "spec": to_jsonable(spec),
            "num_experts": int(num_experts),
            "epochs": int(epochs),
            "training": to_jsonable(training or {}),
            "completed": [],
            "test_acc": {},
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        store = cls(directory, manifest)
        store._write_manifest()
        return store

    @classmethod
    def open(
        cls,
        directory: str,
        spec: dict[str, Any] | None = None,
        *,
        min_epochs: int | None = None,
    ) -> ExpertStore:
        """Opens an existing store and checks it against the requested ``spec``.

        Raises:
          ExpertError: no manifest, or an unreadable one, or too few epochs.
          ExpertMismatchError: the stored spec differs from ``spec``; the message lists every
            differing field.
        """
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise ExpertError(
                f"no expert store at {directory} (expected {path}); train experts first, e.g. "
                "python -m experiments.run with --workdir pointing at that folder's parent"
            )
        try:
            with open(path) as f:
                manifest = json.load(f)
            manifest["spec"]
            manifest["epochs"]
            manifest["completed"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ExpertError(f"corrupt expert manifest {path}: {e}") from e
        store = cls(directory, manifest)
        if spec is not None:
            store.check_spec(spec)
        if min_epochs is not None and manifest["epochs"] < min_epochs:
            raise ExpertError(
                f"experts in {directory} were trained for {manifest['epochs']} epochs, but "
                f"matching needs epoch {min_epochs} (max_start_epoch + expert_epochs)"
            )
        return store

    @classmethod
    def open_or_create(
        cls,
        directory: str,
        spec: dict[str, Any],
        *,
        num_experts: int,
        epochs: int,
        training: dict[str, Any] | None = None,
    ) -> ExpertStore:
        """Opens the store if it exists (checking ``spec`` and the training settings), else
        creates it."""
        if os.path.exists(os.path.join(directory, MANIFEST)):
            store = cls.open(directory, spec)
            if training is not None:
                diffs = json_diff(
                    store.manifest["training"], to_jsonable(training), prefix="training."
                )
                if store.manifest["epochs"] != epochs:
                    diffs.append(f"epochs: stored {store.manifest['epochs']}, requested {epochs}")
                if diffs:
                    raise ExpertMismatchError(
                        f"experts in {directory} were trained differently:\n  "
                        + "\n  ".join(diffs)
                        + "\nUse another --workdir or delete that folder to retrain."
                    )
            if store.manifest["num_experts"] < num_experts:
                store.manifest["num_experts"] = int(num_experts)
                store._write_manifest()
            return store
        return cls.create(
            directory, spec, num_experts=num_experts, epochs=epochs, training=training
        )

    def check_spec(self, spec: dict[str, Any]) -> None:
        """Raises ``ExpertMismatchError`` listing fields where the stored spec differs."""
        diffs = json_diff(self.manifest["spec"], to_jsonable(spec))
        if diffs:
            raise ExpertMismatchError(
                f"the experts in {self.directory} do not match this run:\n  "
                + "\n  ".join(diffs)
                + "\nTrain experts for this configuration (another --workdir), or request the "
                "stored configuration."
            )

    # ---- bookkeeping -------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        write_json(os.path.join(self.directory, MANIFEST), self.manifest)  # process 0 only

    @property
    def epochs(self) -> int:
        return int(self.manifest["epochs"])

    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest["spec"]

    def completed(self) -> list[int]:
        return sorted(int(i) for i in self.manifest["completed"])

    def missing(self, num_experts: int | None = None) -> list[int]:
        n = self.manifest["num_experts"] if num_experts is None else num_experts
        done = set(self.completed())
        return [i for i in range(n) if i not in done]

    # ---- saving and loading ------------------------------------------------------------------

    def save_expert(
        self, index: int, trajectory: list[Params], test_acc: float | None = None
    ) -> None:
        """Writes expert ``index`` (``epochs + 1`` parameter trees) and marks it finished."""
        import orbax.checkpoint as ocp

        if len(trajectory) != self.epochs + 1:
            raise ExpertError(
                f"expert trajectory has {len(trajectory)} checkpoints, expected {self.epochs + 1}"
            )
        tree = {_epoch_key(e): jax.tree.map(np.asarray, p) for e, p in enumerate(trajectory)}
        path = os.path.join(self.directory, _expert_dir(index))
        if os.path.exists(path) and parallel.is_main_process():
            shutil.rmtree(path)  # an unfinished earlier attempt
        parallel.sync(f"experts.save_expert.{index}")
        with quiet_orbax():
            ocp.PyTreeCheckpointer().save(path, tree)
        self.manifest["completed"] = sorted(set(self.completed()) | {int(index)})
        if test_acc is not None:
            self.manifest["test_acc"][str(index)] = float(test_acc)
        self._write_manifest()

    def _restore(self, index: int, epochs: list[int], like: Params | None) -> dict[str, Params]:
        import orbax.checkpoint as ocp

        if index not in self.completed():
            raise ExpertError(f"expert {index} is not finished in {self.directory}")
        for e in epochs:
            if not 0 <= e <= self.epochs:
                raise ExpertError(f"epoch {e} outside the stored 0..{self.epochs}")
        path = os.path.join(self.directory, _expert_dir(index))
        try:
            ck = ocp.PyTreeCheckpointer()
            meta = ck.metadata(path)
            structure = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
            item = {_epoch_key(e): structure[_epoch_key(e)] for e in epochs}
            item = jax.tree.map(lambda _: 0, item)
            with quiet_orbax():
                out = ck.restore(path, args=ocp.args.PyTreeRestore(item=item, partial_restore=True))
        except Exception as e:  # orbax raises many types for damaged files
            raise ExpertError(
                f"cannot read expert {index} at {path}: {type(e).__name__}: {e}. "
                "The files are missing or corrupt; delete that folder and rerun to retrain it."
            ) from e
        if like is not None:
            for k, tree in out.items():
                check_params_match(tree, like, f"expert {index} {k} in {self.directory}")
        return out

    def load_pair(
        self, index: int, start_epoch: int, expert_epochs: int, like: Params | None = None
    ) -> tuple[Params, Params]:
        """Restores only ``theta*_{index, start}`` and ``theta*_{index, start + M}``."""
        e0, e1 = start_epoch, start_epoch + expert_epochs
        out = self._restore(index, [e0, e1], like)
        return out[_epoch_key(e0)], out[_epoch_key(e1)]

    def load_window(self, index: int, max_epoch: int, like: Params | None = None) -> Params:
        """Epochs ``0..max_epoch`` of one expert, stacked on a leading axis."""
        out = self._restore(index, list(range(max_epoch + 1)), like)
        trees = [out[_epoch_key(e)] for e in range(max_epoch + 1)]
        return jax.tree.map(lambda *xs: np.stack(xs), *trees)

    def load_bank(
        self, max_epoch: int, like: Params | None = None, indices: list[int] | None = None
    ) -> ExpertBank:
        """Epochs ``0..max_epoch`` of the given (default: all finished) experts, stacked
        ``(E, max_epoch + 1, ...)``: what the jit-compiled distillation step samples from."""
        indices = self.completed() if indices is None else indices
        if not indices:
            raise ExpertError(f"no finished experts in {self.directory}")
        if max_epoch > self.epochs:
            raise ExpertError(
                f"matching needs epoch {max_epoch}, experts in {self.directory} stop at "
                f"{self.epochs}"
            )
        windows = [self.load_window(i, max_epoch, like) for i in indices]
        params = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *windows)
        return ExpertBank(params=params)


def check_params_match(tree: Params, like: Params, what: str) -> None:
    """Raises ``ExpertMismatchError`` unless ``tree`` has ``like``'s structure and shapes."""
    t_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    l_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(like)}
    problems = []
    for k in sorted(set(t_flat) | set(l_flat)):
        if k not in t_flat:
            problems.append(f"{k}: missing in the stored parameters")
        elif k not in l_flat:
            problems.append(f"{k}: not a parameter of the model")
        elif tuple(np.shape(t_flat[k])) != tuple(np.shape(l_flat[k])):
            problems.append(
                f"{k}: stored shape {tuple(np.shape(t_flat[k]))}, model expects "
                f"{tuple(np.shape(l_flat[k]))}"
            )
    if problems:
        raise ExpertMismatchError(
            f"{what} does not match the model:\n  " + "\n  ".join(problems[:10])
        )


# --------------------------------------------------------------------------------------------
# Sampling for matching
# --------------------------------------------------------------------------------------------


class ExpertBank(NamedTuple):
    """Expert windows on the device: leaves ``(num_experts, num_epochs, ...)``."""

    params: Params

    @property
    def num_experts(self) -> int:
        return jax.tree.leaves(self.params)[0].shape[0]

    @property
    def num_epochs(self) -> int:
        return jax.tree.leaves(self.params)[0].shape[1]


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
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Returns ``(init, epoch)``, both over a leading axis of experts (``vmap``) and jitted.

    ``init(keys) -> train states``; ``epoch(states, keys, images, labels) -> states, metrics``.
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
    epoch = jax.jit(jax.vmap(epoch_one, in_axes=(0, 0, None, None)))
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
) -> list[tuple[int, list[Params], float | None]]:
    """Trains experts ``indices`` together (one ``vmap`` group) for ``cfg.epochs`` epochs.

    With a ``mesh`` (``satm_jax.parallel.make_mesh``) whose size divides the group, the expert
    axis is split across its devices (each device trains its share; the data are replicated).
    A group that does not divide (e.g. the last, smaller group) trains on one device with the
    same results, and ``log`` (default: a ``logging`` warning) says so.

    Returns ``[(index, [theta_0, ..., theta_E], test_acc), ...]``; each ``theta`` is a host
    (NumPy) parameter tree.
    """
    init, epoch = make_expert_trainer(model, train_images.shape[1:], cfg, augment_fn)
    keys = jnp.stack([expert_key(cfg.seed, i) for i in indices])
    if mesh is not None and len(indices) % parallel.num_devices(mesh) == 0:
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
        logits = jax.jit(jax.vmap(predict, in_axes=(0, 0, None)))(
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

"""Class-incremental continual learning with a condensed memory (DM's protocol).

The protocol of DM's ``CL_DM.py`` (Zhao & Bilen, "Dataset Condensation with Distribution
Matching", WACV 2023), in the GDumb style it follows:

1. **Class orders.** For each seed ``s`` the classes are shuffled by
   ``np.random.seed(s); np.random.permutation(num_classes)`` (``class_orders``).
2. **Stages.** The order is cut into ``S`` stages of ``num_classes / S`` classes each
   (``split_stages``). Stage ``k`` sees only the training images whose labels are among its
   classes (``stage_indices``, ``stage_dataset``).
3. **Memory.** At stage ``k`` a method turns the stage's images into ``ipc`` images per class
   of the stage (``random``: random real images; ``herding``: herding in the features of a
   network trained on the stage's images only; ``mtt``/``satm``: trajectory matching with
   experts trained on the stage's images only). The memory after stage ``k`` is the union of
   the stage memories ``0..k`` (``memory_union``); it grows by ``ipc * num_classes / S`` images
   per stage.
4. **Evaluation.** After every stage a *fresh* network (new initialisation, nothing carried
   over from an earlier stage: ``eval_key`` depends only on the evaluation seed, the class
   order and the stage) with one output per class of the *whole* dataset is trained from
   scratch on the memory alone with ``satm_jax.evaluate.evaluate_set`` and the preset's
   ``EvalConfig`` (SGD, momentum 0.9, weight decay 5e-4, learning rate x0.1 at half time, DSA
   on every batch), at DM's fixed learning rate ``EVAL_LR`` = 0.01 (DM's ``lr_net``; not a
   learned step size, which would differ between the stages' condensed sets). It is tested on
   the test images of all classes seen so far. The table reports the mean and standard
   deviation over class orders x evaluation networks.

Our choices (where DM's script leaves room or does something we cannot):

* **Unseen classes' logits are not masked**: the network has all ``num_classes`` outputs at
  every stage and the prediction is the argmax over all of them, as in ``CL_DM.py``
  (``get_network(..., num_classes, ...)`` and a plain argmax). Outputs of unseen classes never
  get a positive target, so they only lose.
* **Preprocessing** (mean/std standardisation or ZCA) is fitted once on the whole training
  split, like DM's fixed per-dataset mean and std, so every stage's memory and the test images
  live in one input space. These statistics are the only thing computed from more than the
  stage's images; no image of another stage reaches a stage's experts, condensation, feature
  network or memory.
* **Condensation** of a stage is ``satm_jax.experiment.pipeline``'s (``ensure_experts`` then
  ``distill_and_evaluate``) on a ``satm_jax.datasets.Dataset`` restricted to the stage's classes
  with labels remapped to ``0..c-1`` (in the class order); the condensed labels are mapped back
  to global class ids. ``distill_and_evaluate`` always evaluates the set it makes; that
  evaluation is reduced to one network for one epoch (``STAGE_RUN_EVAL``), since the protocol
  evaluates the memory itself.
* **Herding features** come from the distillation ConvNet (``RunConfig.model``, one output per
  class of the stage) trained from scratch on the stage's images for ``herding_epochs``
  (default: the experts' epochs) with evaluation-style SGD (momentum 0.9, weight decay 5e-4)
  at the experts' learning rate, batch size and DSA; the features are its penultimate
  embedding (``satm_jax.herding``). DM ships precomputed herding sets instead.
* **Random** memories draw ``ipc`` distinct images per class with a NumPy generator seeded by
  ``(seed, class order seed, stage)``; one draw is shared by the evaluation networks, as in
  ``CL_DM.py``.
* **Evaluation keys** are shared by the methods (common random numbers): at a given class order
  and stage every method's networks start from the same initialisations.

Files (``run_continual``): under ``<workdir>/order_<s>/stage_<k>_<hash>/`` (the hash names the
dataset and the stage's classes) the stage's experts and condensation runs (``experts/``,
``runs/``, as ``satm_jax.experiment.pipeline`` lays them out) and, per method, ``<method>/memory.npz`` (the
stage's memory, with the settings that made it) and ``<method>/result.json`` (the accuracies of
the networks trained on the memory of stages ``0..k``). Each is written as soon as it is done;
a rerun (e.g. after the process was killed) reads finished stages back instead of computing
them again, and resumes an unfinished condensation from its last checkpoint.
``<workdir>/continual.json`` (rewritten after every stage), ``continual.md`` and
``continual.png`` hold the summary.

Example:
  >>> from satm_jax.experiment import continual
  >>> [o.tolist() for o in continual.class_orders(4, [0, 1])]
  [[2, 3, 1, 0], [3, 2, 0, 1]]
  >>> [s.tolist() for s in continual.split_stages([2, 3, 1, 0], 2)]
  [[2, 3], [1, 0]]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from satm_jax import datasets as data_lib
from satm_jax import evaluate as evaluate_lib
from satm_jax import herding as herding_lib
from satm_jax import jsonio, model_registry, parallel
from satm_jax import outputs as outputs_lib
from satm_jax.experiment import configs as configs_lib
from satm_jax.experiment import pipeline as pipeline_lib
from satm_jax.experiment import result_cache
from satm_jax.experiment.configs import ConfigError, RunConfig

Log = Callable[[str], None]

METHODS = ("random", "herding", "mtt", "satm")
CONDENSATION_METHODS = ("mtt", "satm")
EVAL_LR = 0.01  # DM's lr_net: the evaluation networks' learning rate at every stage
#: What ``distill_and_evaluate``'s own end-of-run evaluation of a stage's set is cut down to.
STAGE_RUN_EVAL = dict(epochs=1, num_models=1, epochs_per_call=1)

#: Where the budgets start a stage's condensation (``--syn_init``, **our choice**): herding's
#: picks per class in the features of the stage's first expert (``satm_jax.initial_set``), not
#: random real images. Measured on the digits smoke run (one class order, 2 networks, codes
#: 7076d27 and 47f83a0, 2026-12-06): at 10 classes MTT 86.77 and SATM 87.19 from herding's picks against
#: 76.32 and 75.63 with ``--syn_init=real`` (random memory 76.04, herding memory 86.91);
#: docs/APPLICATIONS.md has both and the Fashion-MNIST run.
STAGE_SYN_INIT = "herding"

#: A reduced budget for 2 CPU cores (``experiments.continual --budget=continual``), applied on
#: top of the preset (meant for ``--preset=cpu``; explicit flags still win). Sized for
#: Fashion-MNIST, 5 stages of 2 classes, IPC 10, 3 class orders, the 4 methods, to fit in 2.5
#: hours (about 2 hours estimated from small timings, in ``experiments/continual.py``; not
#: run): 2 experts of 5 epochs per stage, 80 outer iterations of N = 10 inner steps with the
#: calibrated outer loop (``configs.CALIBRATED_OUTER_LOOP``, as the ``cpu`` preset has it), 2
#: evaluation networks of the distillation width (32) trained for 250 epochs, herding features
#: after 2 epochs. Both budgets start each stage's condensation from herding's picks
#: (``STAGE_SYN_INIT``).
CONTINUAL_BUDGET: dict[str, Any] = {
    "num_experts": 2,
    "expert_parallel": 2,
    "expert_train_epochs": 5,
    "max_start_epoch": 3,
    "expert_epochs": 2,
    "syn_steps": 10,
    "iterations": 80,
    "eval_epochs": 250,
    "num_eval": 2,
    "eval_width": 32,
    "syn_init": STAGE_SYN_INIT,
    **configs_lib.CALIBRATED_OUTER_LOOP,
}
#: A smoke-test budget (``--budget=smoke``, for digits with ``--preset=default``): 2 experts of
#: 4 epochs, 20 outer iterations of N = 10 with the calibrated outer loop (the digits preset's
#: literal SGD loop, tuned for 10-class sets, blows up the images of a 2-class stage within 20
#: iterations), 2 evaluation networks for 100 epochs, herding features after 4 epochs.
SMOKE_BUDGET: dict[str, Any] = {
    "num_experts": 2,
    "expert_parallel": 2,
    "expert_train_epochs": 4,
    "max_start_epoch": 2,
    "expert_epochs": 2,
    "syn_steps": 10,
    "iterations": 20,
    "eval_epochs": 100,
    "num_eval": 2,
    "syn_init": STAGE_SYN_INIT,
    **configs_lib.CALIBRATED_OUTER_LOOP,
}
#: Budget name -> (overrides, herding feature-network epochs).
BUDGETS: dict[str, tuple[dict[str, Any], int]] = {
    "continual": (CONTINUAL_BUDGET, 2),
    "smoke": (SMOKE_BUDGET, 4),
}


def _print(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Class orders, stages, stage data
# --------------------------------------------------------------------------------------------


def class_orders(num_classes: int, seeds: Sequence[int]) -> list[np.ndarray]:
    """DM's class orders: ``np.random.seed(s); np.random.permutation(num_classes)`` per seed.

    The literal calls are made on NumPy's global generator, whose state is saved before and
    restored after, so callers' global random streams are left as they were.

    Raises:
      ValueError: ``num_classes < 1``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    saved = np.random.get_state()
    try:
        out = []
        for s in seeds:
            np.random.seed(int(s))
            out.append(np.random.permutation(num_classes))
        return out
    finally:
        np.random.set_state(saved)


def check_stages(num_classes: int, num_stages: int) -> int:
    """Classes per stage; raises ``ConfigError`` unless ``S >= 1`` divides ``num_classes``."""
    if num_stages < 1:
        raise ConfigError(f"the number of stages must be >= 1, got {num_stages}")
    if num_classes % num_stages:
        raise ConfigError(
            f"{num_stages} stages do not divide {num_classes} classes into equal stages; "
            f"choose a divisor of {num_classes}"
        )
    return num_classes // num_stages


def split_stages(order: Sequence[int], num_stages: int) -> list[np.ndarray]:
    """The class order cut into ``num_stages`` consecutive stages of equal size.

    Raises:
      ConfigError: ``num_stages < 1`` or it does not divide the number of classes.
    """
    order = np.asarray(order, np.int64)
    per = check_stages(len(order), num_stages)
    return [order[k * per : (k + 1) * per] for k in range(num_stages)]


def stage_indices(labels: Any, classes: Sequence[int]) -> np.ndarray:
    """Indices (ascending) of the images whose label is one of ``classes``."""
    return np.flatnonzero(np.isin(np.asarray(labels), np.asarray(classes)))


def remap_labels(labels: Any, classes: Sequence[int], num_classes: int) -> np.ndarray:
    """Global class ids to stage-local ids: ``classes[j] -> j``.

    Raises:
      ValueError: a label is not among ``classes``.
    """
    classes = np.asarray(classes, np.int64)
    table = np.full(num_classes, -1, np.int32)
    table[classes] = np.arange(len(classes), dtype=np.int32)
    out = table[np.asarray(labels, np.int64)]
    if out.size and out.min() < 0:
        raise ValueError(f"labels outside the stage's classes {classes.tolist()}")
    return out


def to_global(local_labels: Any, classes: Sequence[int]) -> np.ndarray:
    """Stage-local ids back to global class ids: ``j -> classes[j]`` (int32)."""
    return np.asarray(classes, np.int32)[np.asarray(local_labels, np.int64)]


def stage_dataset(
    dataset: data_lib.Dataset, classes: Sequence[int]
) -> tuple[data_lib.Dataset, np.ndarray, np.ndarray]:
    """The dataset restricted to ``classes``, labels remapped to ``0..c-1`` in their order.

    Returns:
      ``(stage dataset, train indices, test indices)``: the indices (ascending) of the
      original splits that the stage dataset holds.
    """
    classes = np.asarray(classes, np.int64)
    tr = stage_indices(dataset.train_labels, classes)
    te = stage_indices(dataset.test_labels, classes)
    c = dataset.num_classes
    sub = data_lib.Dataset(
        name=dataset.name,
        train_images=dataset.train_images[tr],
        train_labels=remap_labels(dataset.train_labels[tr], classes, c),
        test_images=dataset.test_images[te],
        test_labels=remap_labels(dataset.test_labels[te], classes, c),
        num_classes=len(classes),
        class_names=tuple(dataset.class_names[int(i)] for i in classes),
    )
    return sub.validate(), tr, te


class StageMemory(NamedTuple):
    """One stage's contribution to the memory.

    Attributes:
      images: ``(n, H, W, C)`` float32, preprocessed (network input space).
      labels: ``(n,)`` int32 global class ids.
      indices: ``(n,)`` int64 indices of the training images chosen (real-image methods), or
        ``None`` for synthetic images.
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray | None


def memory_union(memories: Sequence[StageMemory]) -> tuple[np.ndarray, np.ndarray]:
    """The memory after the last of ``memories``: all their images and labels, in stage order.

    Raises:
      ValueError: no memories.
    """
    if not memories:
        raise ValueError("the memory of no stage is empty")
    images = np.concatenate([np.asarray(m.images, np.float32) for m in memories])
    labels = np.concatenate([np.asarray(m.labels, np.int32) for m in memories])
    return images, labels


def random_indices(
    train_labels: Any, classes: Sequence[int], ipc: int, rng: np.random.Generator
) -> np.ndarray:
    """``ipc`` distinct random training images of each class in ``classes`` (class by class).

    Raises:
      DatasetError: a class has fewer than ``ipc`` images.
    """
    labels = np.asarray(train_labels)
    out = []
    for c in np.asarray(classes).tolist():
        idx = np.flatnonzero(labels == c)
        if len(idx) < ipc:
            raise data_lib.DatasetError(f"class {c} has {len(idx)} images, fewer than ipc={ipc}")
        out.append(rng.choice(idx, ipc, replace=False))
    return np.concatenate(out).astype(np.int64)


def eval_key(eval_seed: int, order_seed: int, stage: int) -> jax.Array:
    """The key of stage ``stage``'s evaluation networks: a function of these three ints only
    (``evaluate_set`` initialises network ``i`` from ``fold_in(key, i)``), so no stage's
    networks depend on another stage's."""
    key = jax.random.PRNGKey(eval_seed)
    return jax.random.fold_in(jax.random.fold_in(key, order_seed), stage)


def selection_key(seed: int, order_seed: int, stage: int) -> jax.Array:
    """The key of a stage's herding feature network."""
    key = jax.random.PRNGKey(seed)
    return jax.random.fold_in(jax.random.fold_in(key, order_seed), stage)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
    """One continual-learning experiment.

    Attributes:
      dataset: registry name.
      ipc: memory images per class.
      stages: number of stages ``S`` (must divide the number of classes).
      methods: memory methods, from ``METHODS``.
      class_orders: seeds of the class orders.
      preset: ``satm_jax.experiment.configs`` preset the run configs start from.
      overrides: flat ``satm_jax.experiment.configs.OVERRIDES`` settings (applied to every method).
      lr: the evaluation networks' learning rate (DM: 0.01).
      herding_epochs: feature-network epochs for herding (``None``: the experts' epochs).
      seed: seed of the random memories and the herding feature networks.
      data_dir: where the dataset files are.
    """

    dataset: str
    ipc: int
    stages: int
    methods: tuple[str, ...] = METHODS
    class_orders: tuple[int, ...] = (0, 1, 2, 3, 4)
    preset: str = "auto"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr: float = EVAL_LR
    herding_epochs: int | None = None
    seed: int = 0
    data_dir: str | None = None

    def validate(self) -> ContinualConfig:
        """Checks names and ranges that need no data.

        Raises:
          ConfigError: unknown or repeated methods, no methods or class orders, repeated
            class orders, ``ipc < 1``, ``stages < 1``, bad ``lr`` or ``herding_epochs``.
        """
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown continual method {bad[0]!r}; choose from {METHODS}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must be distinct and non-empty, got {self.methods}")
        if not self.class_orders or len(set(self.class_orders)) != len(self.class_orders):
            raise ConfigError(
                f"class orders must be distinct and non-empty, got {self.class_orders}"
            )
        if self.ipc < 1:
            raise ConfigError(f"ipc must be >= 1, got {self.ipc}")
        if self.stages < 1:
            raise ConfigError(f"the number of stages must be >= 1, got {self.stages}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the evaluation learning rate must be positive, got {self.lr}")
        if self.herding_epochs is not None and self.herding_epochs < 1:
            raise ConfigError(f"herding_epochs must be >= 1, got {self.herding_epochs}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return jsonio.to_jsonable(dataclasses.asdict(self))


def method_config(ccfg: ContinualConfig, method: str) -> RunConfig:
    """The ``RunConfig`` behind ``method``: its own for ``mtt``/``satm``; the ``mtt`` one for
    ``random`` and ``herding``, which use only its network, preprocessing, experts' training
    settings and evaluation protocol.

    Raises:
      ConfigError: unknown method, preset or override; soft labels (not supported here).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown continual method {method!r}; choose from {METHODS}")
    base = method if method in CONDENSATION_METHODS else "mtt"
    cfg = configs_lib.make_run_config(
        ccfg.dataset,
        ccfg.ipc,
        base,
        ccfg.preset,
        dict(ccfg.overrides),
        ccfg.data_dir,
        strict=False,
    )
    if cfg.distill.soft_labels:
        raise ConfigError("soft labels are not supported by the continual protocol")
    return cfg


def stage_run_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` for one stage's condensation: its own end-of-run evaluation cut to
    ``STAGE_RUN_EVAL`` and no cross-architecture evaluations."""
    return dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, **STAGE_RUN_EVAL), eval_models=()
    )


def feature_training(ccfg: ContinualConfig, cfg: RunConfig) -> herding_lib.FeatureTraining:
    """How herding's feature network is trained (see the module docstring)."""
    e = cfg.experts
    return herding_lib.FeatureTraining(
        epochs=ccfg.herding_epochs or e.epochs,
        lr=e.lr,
        batch_size=e.batch_size,
        dsa_strategy=e.dsa_strategy,
        seed=ccfg.seed,
    )


def budget_overrides(
    name: str, overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], int]:
    """The overrides of budget ``name`` (``BUDGETS``) with ``overrides`` on top (the latter
    win), and the budget's herding feature-network epochs.

    Raises:
      ConfigError: unknown budget.
    """
    if name not in BUDGETS:
        raise ConfigError(f"unknown budget {name!r}; choose one of {sorted(BUDGETS)}")
    base, herding_epochs = BUDGETS[name]
    return {**base, **(overrides or {})}, herding_epochs


# --------------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    """One stage of one class order, with its data (network space, global preprocessing).

    Attributes:
      order_seed: the class order's seed.
      index: stage number ``k``.
      classes: the stage's classes (global ids, in the order's order).
      directory: the stage's folder.
      train_idx: indices of the stage's training images in the full training split.
      test_idx: indices of the stage's test images in the full test split.
      data: ``pipeline.PreparedData`` of the stage dataset (labels ``0..c-1``).
    """

    order_seed: int
    index: int
    classes: np.ndarray
    directory: str
    train_idx: np.ndarray
    test_idx: np.ndarray
    data: pipeline_lib.PreparedData


def stage_dir(workdir: str, dataset: str, order_seed: int, k: int, classes: Sequence[int]) -> str:
    """``<workdir>/order_<s>/stage_<k>_<hash of dataset and classes>``."""
    ident = json.dumps([dataset, [int(c) for c in classes]])
    digest = hashlib.sha1(ident.encode()).hexdigest()[:8]
    return os.path.join(workdir, f"order_{order_seed}", f"stage_{k}_{digest}")


def make_stage(
    dataset: data_lib.Dataset,
    prep: data_lib.Preprocessor,
    train_x: np.ndarray,
    test_x: np.ndarray,
    order_seed: int,
    k: int,
    classes: np.ndarray,
    workdir: str,
) -> Stage:
    """The stage's restricted dataset and its preprocessed arrays (``train_x``/``test_x``:
    the full splits, preprocessed with ``prep``)."""
    sub, tr, te = stage_dataset(dataset, classes)
    data = pipeline_lib.PreparedData(
        dataset=sub,
        preprocessor=prep,
        train_x=jnp.asarray(train_x[tr]),
        train_y=jnp.asarray(sub.train_labels, jnp.int32),
        test_x=jnp.asarray(test_x[te]),
        test_y=jnp.asarray(sub.test_labels, jnp.int32),
    )
    directory = stage_dir(workdir, dataset.name, order_seed, k, classes)
    os.makedirs(directory, exist_ok=True)
    jsonio.write_json(
        os.path.join(directory, "stage.json"),
        {
            "dataset": dataset.name,
            "order_seed": int(order_seed),
            "stage": int(k),
            "classes": [int(c) for c in classes],
            "num_train": int(len(tr)),
            "num_test": int(len(te)),
        },
    )
    return Stage(order_seed, k, np.asarray(classes), directory, tr, te, data)


def condensed_memory(
    cfg: RunConfig, stage: Stage, *, progress: bool = True, log: Log = _print
) -> StageMemory:
    """Condenses the stage's data with the pipeline (experts of the stage only), global labels.

    ``cfg`` is the stage run's config (``stage_run_config``).
    """
    store = pipeline_lib.ensure_experts(
        cfg, stage.data, stage.directory, progress=progress, log=log
    )
    pipeline_lib.distill_and_evaluate(
        cfg, stage.data, store, stage.directory, progress=progress, log=log
    )
    d = outputs_lib.load_distilled(os.path.join(stage.directory, "runs", cfg.name, "distilled.npz"))
    labels = np.asarray(d["labels"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{cfg.name}: the condensed set has soft labels {labels.shape}")
    return StageMemory(np.asarray(d["images"], np.float32), to_global(labels, stage.classes), None)


def herding_memory(
    ccfg: ContinualConfig,
    cfg: RunConfig,
    stage: Stage,
    train_x: np.ndarray,
    train_labels: np.ndarray,
) -> StageMemory:
    """Herding on the features of a network trained on the stage's images only."""
    c = len(stage.classes)
    model = model_registry.build_model(cfg.model, c)
    variables = herding_lib.train_feature_network(
        model,
        stage.data.train_x,
        stage.data.train_y,
        feature_training(ccfg, cfg),
        key=selection_key(ccfg.seed, stage.order_seed, stage.index),
    )
    feats = herding_lib.extract_features(model, variables, stage.data.train_x)
    local = herding_lib.herding_per_class(
        feats, np.asarray(stage.data.dataset.train_labels), np.arange(c), ccfg.ipc
    )
    idx = stage.train_idx[local]
    return StageMemory(train_x[idx], np.asarray(train_labels[idx], np.int32), idx)


def random_memory(
    ccfg: ContinualConfig, stage: Stage, train_x: np.ndarray, train_labels: np.ndarray
) -> StageMemory:
    """``ipc`` random real images per class of the stage (seeded by seed, order and stage)."""
    rng = np.random.default_rng([ccfg.seed, stage.order_seed, stage.index])
    local = random_indices(train_labels[stage.train_idx], stage.classes, ccfg.ipc, rng)
    idx = stage.train_idx[local]
    return StageMemory(train_x[idx], np.asarray(train_labels[idx], np.int32), idx)


def memory_key(ccfg: ContinualConfig, cfg: RunConfig, method: str, stage: Stage) -> dict:
    """What a stored stage memory must match to be reused."""
    key: dict[str, Any] = {
        "dataset": ccfg.dataset,
        "method": method,
        "ipc": ccfg.ipc,
        "classes": [int(c) for c in stage.classes],
        "order_seed": int(stage.order_seed),
        "stage": int(stage.index),
        "preprocessing": cfg.preprocessing.identity(),
    }
    if method == "random":
        key["seed"] = ccfg.seed
    elif method == "herding":
        key["model"] = cfg.model.identity()
        key["training"] = dataclasses.asdict(feature_training(ccfg, cfg))
    else:
        key["run"] = stage_run_config(cfg).to_dict()
    return jsonio.to_jsonable(key)


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@parallel.main_process_only
def save_memory(path: str, memory: StageMemory, key: dict) -> None:
    """Writes a stage memory atomically (``.npz``) with its key."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    idx = np.zeros((0,), np.int64) if memory.indices is None else memory.indices
    tmp = path + ".tmp.npz"
    np.savez_compressed(
        tmp,
        images=np.asarray(memory.images, np.float32),
        labels=np.asarray(memory.labels, np.int32),
        indices=np.asarray(idx, np.int64),
        synthetic=np.asarray(memory.indices is None),
        key=np.asarray(json.dumps(key, sort_keys=True)),
    )
    os.replace(tmp, path)


def load_memory(path: str, key: dict) -> StageMemory | None:
    """The stage memory stored at ``path`` if it exists, is readable and has ``key``."""
    if not os.path.exists(path):
        return None
    try:
        # Our own handle: np.load leaves the one it opens unclosed on a file that is no zip.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != key:
                return None
            idx = None if bool(z["synthetic"]) else np.asarray(z["indices"], np.int64)
            return StageMemory(
                np.asarray(z["images"], np.float32), np.asarray(z["labels"], np.int32), idx
            )
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def summarize(
    records: list[dict[str, Any]], methods: Sequence[str], classes_per_stage: int
) -> list[dict[str, Any]]:
    """Rows per (method, stage): mean and std (percent, ``np.std``) over every class order's
    evaluation networks (``n`` of them). ``records`` hold ``method``, ``order``, ``stage`` and
    ``accs`` (fractions), and optionally ``diverged`` / ``collapsed`` (networks whose training
    diverged / that predict one class: ``EvalResult``); a row with any has their total)."""
    rows = []
    for m in methods:
        stages = sorted({r["stage"] for r in records if r["method"] == m})
        for k in stages:
            rs = [r for r in records if r["method"] == m and r["stage"] == k]
            accs = np.concatenate([np.asarray(r["accs"], np.float64) for r in rs])
            res = evaluate_lib.EvalResult(accs)
            rows.append(
                {
                    "method": m,
                    "stage": int(k),
                    "num_classes_seen": int((k + 1) * classes_per_stage),
                    "acc_mean": round(res.mean, 4),
                    "acc_std": round(res.std, 4),
                    "n": int(len(accs)),
                    "orders": [int(r["order"]) for r in rs],
                    "accs": [round(100.0 * float(a), 4) for a in accs],
                }
            )
            for flag in evaluate_lib.HEALTH_FLAGS:
                count = sum(int(r.get(flag, 0)) for r in rs)
                if count:
                    rows[-1][flag] = count
    return rows


def _order_means(row: dict[str, Any]) -> dict[int, float]:
    """A summary row's accuracy per class order: the mean over that order's networks
    (``accs`` are order-major, the same number of networks per order)."""
    orders = row["orders"]
    per = np.asarray(row["accs"], np.float64).reshape(len(orders), -1)
    return {int(o): float(a.mean()) for o, a in zip(orders, per)}


def paired_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """The differences ``continual.md`` reports: every method against ``random``, and SATM
    against MTT."""
    pairs = [(m, "random") for m in methods if m != "random" and "random" in methods]
    if "satm" in methods and "mtt" in methods:
        pairs.append(("satm", "mtt"))
    return pairs


def paired_differences(results: list[dict[str, Any]], a: str, b: str) -> list[dict[str, Any]]:
    """``a - b`` paired by class order at every stage both have: per order the difference of
    the two methods' means over that order's networks (the same initialisations: the
    evaluation keys are shared), then the mean, the sample std (``ddof=1``; 0 with one order)
    and the count of positive differences over the orders they share. Removes the class
    orders' difficulty, which dominates the unpaired spread."""
    out = []
    for ra in results:
        if ra["method"] != a:
            continue
        rb = [r for r in results if r["method"] == b and r["stage"] == ra["stage"]]
        if not rb:
            continue
        ma, mb = _order_means(ra), _order_means(rb[0])
        common = sorted(set(ma) & set(mb))
        if not common:
            continue
        d = np.asarray([ma[o] - mb[o] for o in common])
        out.append(
            {
                "a": a,
                "b": b,
                "stage": int(ra["stage"]),
                "num_classes_seen": int(ra["num_classes_seen"]),
                "diff_mean": round(float(d.mean()), 4),
                "diff_std": round(float(d.std(ddof=1)) if len(d) > 1 else 0.0, 4),
                "positive": int((d > 0).sum()),
                "orders": common,
            }
        )
    return out


def orders_done(out: dict[str, Any]) -> list[int]:
    """The class-order seeds that have results so far (a run still going, or stopped, has
    fewer than it requested)."""
    return sorted({int(o) for r in out["results"] for o in r.get("orders", [])})


def markdown_table(out: dict[str, Any]) -> str:
    """``continual.md``: one row per method, one column per stage (classes seen)."""
    cfg = out["config"]
    rows = out["results"]
    methods = [m for m in cfg["methods"] if any(r["method"] == m for r in rows)]
    seen = sorted({r["num_classes_seen"] for r in rows})
    per = cfg["classes_per_stage"]
    lines = [
        f"# Class-incremental learning on {cfg['dataset']}: {out['stages']} stages of {per} "
        f"classes, IPC {out['ipc']}" + (" (REDUCED protocol)" if cfg.get("reduced") else ""),
        "",
        f"Preset {cfg['preset']}; class orders (seeds) {orders_done(out)} of the requested "
        f"{cfg['class_order_seeds']}; test accuracy "
        "(%) on all classes seen so far of fresh ConvNets trained from scratch on the memory "
        f"(evaluation lr {cfg['lr']}, {cfg['eval']['epochs']} epochs, "
        f"{cfg['eval']['num_models']} networks per order): mean +- std over class orders x "
        "networks (n); unseen classes' logits not masked. "
        f"Wall {out['wall_s']:.0f} s (this invocation).",
        "",
        "| method | " + " | ".join(f"{s} classes" for s in seen) + " |",
        "|---|" + "---|" * len(seen),
    ]
    for m in methods:
        cells = []
        for s in seen:
            r = [x for x in rows if x["method"] == m and x["num_classes_seen"] == s]
            cells.append(
                f"{r[0]['acc_mean']:.2f} +- {r[0]['acc_std']:.2f} ({r[0]['n']})" if r else "-"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    paired = out.get("paired") or []
    if paired:
        lines += [
            "",
            "Paired by class order (each order's mean over its networks; mean +- std over the "
            "orders, and in how many orders the difference is positive):",
            "",
            "| difference | " + " | ".join(f"{s} classes" for s in seen) + " |",
            "|---|" + "---|" * len(seen),
        ]
        for a, b in dict.fromkeys((p["a"], p["b"]) for p in paired):
            cells = []
            for s in seen:
                r = [p for p in paired if (p["a"], p["b"], p["num_classes_seen"]) == (a, b, s)]
                cells.append(
                    f"{r[0]['diff_mean']:+.2f} +- {r[0]['diff_std']:.2f} "
                    f"({r[0]['positive']}/{len(r[0]['orders'])})"
                    if r
                    else "-"
                )
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_continual(path: str, out: dict[str, Any]) -> str:
    """``continual.png``: accuracy against classes seen, one line per method, +-std bands."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = out["results"]
    for m in out["config"]["methods"]:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["num_classes_seen"])
        if not rs:
            continue
        x = np.asarray([r["num_classes_seen"] for r in rs])
        y = np.asarray([r["acc_mean"] for r in rs])
        s = np.asarray([r["acc_std"] for r in rs])
        (line,) = ax.plot(x, y, "o-", lw=1.5, label=m)
        ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2, lw=0)
    cfg = out["config"]
    ax.set_xlabel("classes seen")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"{cfg['dataset']}: {out['stages']} stages, IPC {out['ipc']}, "
        f"{len(orders_done(out))} of {len(cfg['class_order_seeds'])} class order(s)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


@parallel.main_process_only
def write_outputs(out: dict[str, Any], workdir: str, *, plot: bool = True) -> None:
    """``continual.json``, ``continual.md`` and (with ``plot``) ``continual.png``."""
    jsonio.write_json(os.path.join(workdir, "continual.json"), out)
    md = os.path.join(workdir, "continual.md")
    with open(md + ".tmp", "w") as f:
        f.write(markdown_table(out))
    os.replace(md + ".tmp", md)
    if plot and out["results"]:
        plot_continual(os.path.join(workdir, "continual.png"), out)


def run_continual(
    ccfg: ContinualConfig,
    workdir: str,
    *,
    dataset: data_lib.Dataset | None = None,
    progress: bool = True,
    log: Log = _print,
) -> dict[str, Any]:
    """Runs the protocol for every class order, stage and method; writes the outputs.

    Args:
      ccfg: the experiment.
      workdir: output folder (created); finished stages found there are reused.
      dataset: the loaded dataset (default: ``ccfg.dataset`` from ``ccfg.data_dir``).
      progress: progress bars.
      log: where messages go.

    Returns:
      The ``continual.json`` content.

    Raises:
      ConfigError: bad settings (methods, stages not dividing the classes, conflicts).
      DatasetError: the dataset cannot be loaded, or ``ipc`` exceeds a class's images.
    """
    t_start = time.time()
    ccfg.validate()
    if dataset is None:
        dataset = data_lib.load_dataset(ccfg.dataset, data_dir=ccfg.data_dir)
    if dataset.name != ccfg.dataset:
        raise ConfigError(f"the dataset is {dataset.name!r}, the config says {ccfg.dataset!r}")
    num_classes = dataset.num_classes
    per = check_stages(num_classes, ccfg.stages)
    data_lib.check_ipc(dataset.train_labels, num_classes, ccfg.ipc)
    cfgs = {m: method_config(ccfg, m) for m in ccfg.methods}
    base = cfgs[ccfg.methods[0]]
    for m, c in cfgs.items():
        if (c.preprocessing, c.model, c.eval) != (base.preprocessing, base.model, base.eval):
            raise ConfigError(f"{m}: the methods must share preprocessing, network and evaluation")
    orders = class_orders(num_classes, ccfg.class_orders)
    stage_cfgs = {m: stage_run_config(cfgs[m]) for m in ccfg.methods if m in CONDENSATION_METHODS}
    if stage_cfgs:  # every stage has the same shape: check one before any work
        first, _, _ = stage_dataset(dataset, split_stages(orders[0], ccfg.stages)[0])
        pipeline_lib.validate_configs(list(stage_cfgs.values()), first)

    os.makedirs(workdir, exist_ok=True)
    prep = data_lib.fit_preprocessing(dataset.train_images, base.preprocessing)
    train_x = prep.forward(dataset.train_images).astype(np.float32)
    test_x = prep.forward(dataset.test_images).astype(np.float32)
    train_labels = np.asarray(dataset.train_labels, np.int32)
    test_labels = np.asarray(dataset.test_labels, np.int32)
    eval_net = pipeline_lib.eval_model(base, "convnet", num_classes)
    eval_identity = base.model.identity()
    if base.eval.width is not None:
        eval_identity = {**eval_identity, "width": base.eval.width}
    log(
        f"continual: {dataset.name}, {ccfg.stages} stages of {per} classes, IPC {ccfg.ipc}, "
        f"methods {list(ccfg.methods)}, class orders {list(ccfg.class_orders)}; "
        f"backend {jax.default_backend()}"
    )

    config_dict = {
        "dataset": dataset.name,
        "preset": base.preset,
        "reduced": any(c.reduced for c in cfgs.values()),
        "methods": list(ccfg.methods),
        "class_order_seeds": [int(s) for s in ccfg.class_orders],
        "class_orders": [o.tolist() for o in orders],
        "classes_per_stage": per,
        "lr": ccfg.lr,
        "eval": jsonio.to_jsonable(dataclasses.asdict(base.eval)),
        "eval_model": eval_identity,
        "unseen_logits": "not masked (all classes' outputs, argmax over all)",
        "preprocessing_fit": "whole training split",
        "continual": ccfg.to_dict(),
        "runs": {m: jsonio.to_jsonable(c.to_dict()) for m, c in stage_cfgs.items()},
        "herding": dataclasses.asdict(feature_training(ccfg, base))
        if "herding" in ccfg.methods
        else None,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
    }
    records: list[dict[str, Any]] = []

    def output(final: bool) -> dict[str, Any]:
        results = summarize(records, ccfg.methods, per)
        out = {
            "stages": ccfg.stages,
            "ipc": ccfg.ipc,
            "results": results,
            "paired": [
                d for a, b in paired_pairs(ccfg.methods) for d in paired_differences(results, a, b)
            ],
            "config": config_dict,
            "wall_s": round(time.time() - t_start, 2),
        }
        write_outputs(out, workdir, plot=final)
        return out

    for order_seed, order in zip(ccfg.class_orders, orders):
        memories: dict[str, list[StageMemory]] = {m: [] for m in ccfg.methods}
        digests: dict[str, list[str]] = {m: [] for m in ccfg.methods}
        stages = split_stages(order, ccfg.stages)
        for k, classes in enumerate(stages):
            stage = make_stage(dataset, prep, train_x, test_x, order_seed, k, classes, workdir)
            seen = np.concatenate(stages[: k + 1])
            test_idx = stage_indices(test_labels, seen)
            for m in ccfg.methods:
                cfg = cfgs[m]
                where = f"order {order_seed} stage {k} ({m}, classes {classes.tolist()})"
                mkey = memory_key(ccfg, cfg, m, stage)
                mpath = os.path.join(stage.directory, m, "memory.npz")
                mem = load_memory(mpath, mkey)
                if mem is not None:
                    log(f"{where}: memory reused from {mpath}")
                else:
                    if m == "random":
                        mem = random_memory(ccfg, stage, train_x, train_labels)
                    elif m == "herding":
                        mem = herding_memory(ccfg, cfg, stage, train_x, train_labels)
                    else:
                        mem = condensed_memory(stage_cfgs[m], stage, progress=progress, log=log)
                    save_memory(mpath, mem, mkey)
                memories[m].append(mem)
                digests[m].append(_digest(mkey))
                rkey = jsonio.to_jsonable(
                    {
                        "memories": digests[m],
                        "classes_seen": seen.tolist(),
                        "eval": dataclasses.asdict(base.eval),
                        "eval_model": eval_identity,
                        "num_classes": num_classes,
                        "lr": ccfg.lr,
                        "key": [base.eval.seed, int(order_seed), k],
                    }
                )
                rpath = os.path.join(stage.directory, m, "result.json")
                cached = result_cache.load(rpath, rkey)
                if cached is not None:
                    accs = np.asarray(cached["accs"], np.float64)
                    health = {k: int(cached.get(k, 0)) for k in evaluate_lib.HEALTH_FLAGS}
                    log(f"{where}: evaluation reused from {rpath}")
                else:
                    x, y = memory_union(memories[m])
                    res = evaluate_lib.evaluate_set(
                        eval_net,
                        jnp.asarray(x),
                        jnp.asarray(y, jnp.int32),
                        ccfg.lr,
                        jnp.asarray(test_x[test_idx]),
                        jnp.asarray(test_labels[test_idx], jnp.int32),
                        base.eval,
                        key=eval_key(base.eval.seed, int(order_seed), k),
                        progress=progress,
                        desc=f"eval {m} order{order_seed} stage{k}",
                    )
                    accs = np.asarray(res.accs, np.float64)
                    health = res.health_counts()
                    result_cache.store(
                        rpath,
                        rkey,
                        {
                            "accs": accs.tolist(),
                            **health,
                            "memory_size": int(len(y)),
                            "num_test": int(len(test_idx)),
                        },
                    )
                    log(
                        f"{where}: memory {len(y)} images, {len(seen)} classes seen: "
                        f"{res.summary()} ({len(accs)} nets)"
                    )
                records.append(
                    {
                        "method": m,
                        "order": int(order_seed),
                        "stage": k,
                        "accs": accs,
                        **health,
                    }
                )
            output(final=False)
    out = output(final=True)
    log(markdown_table(out))
    return out

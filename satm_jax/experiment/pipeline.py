"""The whole experiment: data, experts, distillation, evaluation, baselines, outputs.

``train_and_evaluate(configs, workdir)`` runs a list of ``RunConfig`` (one per dataset, IPC and
method) sharing data and experts, and writes under ``workdir``:

* ``experts/<dataset>-<hash>/``: the expert store (reused by later runs with the same dataset,
  model, preprocessing and expert training);
* ``runs/<dataset>_ipc<k>_<method>/``: ``config.json``, ``metrics.jsonl``, checkpoints,
  ``synthetic.png`` (ZCA undone), ``distilled.npz``, ``result.json`` (the run's rows, reused
  by a later identical request; ``result_cache``'s format);
* ``baselines/``: random real images and the full training set (``result_cache``'s format);
* ``results.json``: ``{"results": [...], "config": {...}, "wall_s": ...}`` and ``results.md``.

Finished pieces are not redone: a rerun with the same configuration reuses finished experts,
resumes the distillation from its last checkpoint and keeps finished evaluations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from satm_jax import augment as augment_lib
from satm_jax import baselines as baselines_lib
from satm_jax import checkpoint as checkpoint_lib
from satm_jax import convergence, expert_store, jsonio, model_registry, parallel
from satm_jax import datasets as data_lib
from satm_jax import distill as distill_lib
from satm_jax import evaluate as evaluate_lib
from satm_jax import experts as experts_lib
from satm_jax import flatness as flatness_lib
from satm_jax import herding as herding_lib
from satm_jax import initial_set as initial_set_lib
from satm_jax import models as models_lib
from satm_jax import ood as ood_lib
from satm_jax import outputs as outputs_lib
from satm_jax.experiment import configs as configs_lib
from satm_jax.experiment import result_cache
from satm_jax.experiment.configs import ConfigError, RunConfig

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


@dataclasses.dataclass
class PreparedData:
    """A dataset with its fitted preprocessing, as device arrays."""

    dataset: data_lib.Dataset
    preprocessor: data_lib.Preprocessor
    train_x: jax.Array
    train_y: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    ood_cache: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.dataset.image_shape


def prepare_data(dataset: data_lib.Dataset, preprocessing: data_lib.Preprocessing) -> PreparedData:
    """Fits the preprocessing on the training split and applies it to both splits."""
    prep = data_lib.fit_preprocessing(dataset.train_images, preprocessing)
    return PreparedData(
        dataset=dataset,
        preprocessor=prep,
        train_x=jnp.asarray(prep.forward(dataset.train_images)),
        train_y=jnp.asarray(dataset.train_labels, jnp.int32),
        test_x=jnp.asarray(prep.forward(dataset.test_images)),
        test_y=jnp.asarray(dataset.test_labels, jnp.int32),
    )


def validate_configs(configs: list[RunConfig], dataset: data_lib.Dataset) -> None:
    """Checks every config against the data before any work starts.

    Raises:
      ConfigError: IPC out of range, experts too short for the matching window, bad names,
        a network too deep for the images (``check_networks_fit``).
      DatasetError: (via ``check_ipc``) IPC above the smallest class's count.
    """
    for cfg in configs:
        data_lib.check_ipc(dataset.train_labels, dataset.num_classes, cfg.ipc)
        if cfg.experts.epochs < cfg.distill.max_epoch_needed:
            raise ConfigError(
                f"{cfg.name}: matching reads expert epoch {cfg.distill.max_epoch_needed} "
                f"(max_start_epoch - 1 + expert_epochs) but experts train for "
                f"{cfg.experts.epochs}; raise --expert_train_epochs or lower --max_start_epoch"
            )
        if (
            cfg.distill.batch_syn is not None
            and cfg.distill.batch_syn > cfg.ipc * dataset.num_classes
        ):
            raise ConfigError(
                f"{cfg.name}: batch_syn={cfg.distill.batch_syn} exceeds the synthetic set "
                f"({cfg.ipc * dataset.num_classes} images)"
            )
        configs_lib.check_eval_models(cfg.eval_models)
        check_networks_fit(cfg, cfg.eval_models, dataset.image_shape, dataset.num_classes)
        for strategy in (cfg.experts.dsa_strategy, cfg.distill.dsa_strategy, cfg.eval.dsa_strategy):
            try:
                augment_lib.parse_strategy(strategy)
            except ValueError as e:
                raise ConfigError(str(e)) from e


def check_networks_fit(
    cfg: RunConfig, eval_models: Sequence[str], image_shape: tuple[int, ...], num_classes: int
) -> None:
    """Checks, before any training, that the student and every evaluation network of
    ``eval_models`` can take images of ``image_shape`` (an abstract initialisation: traced,
    not computed), so that a network too deep for small images (VGG-11 on digits' 8x8) stops
    the run at once instead of after the experts, the distillation or the other networks.

    Raises:
      ConfigError: a network that cannot be built (unknown name or norm), or one that cannot
        take the images, naming the network, the image shape and the reason.
    """
    try:
        nets = [("student", model_registry.build_model(cfg.model, num_classes))]
        nets += [(name, eval_model(cfg, name, num_classes)) for name in eval_models]
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for label, model in nets:
        try:
            model_registry.abstract_variables(model, tuple(image_shape))
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"{cfg.name}: the {label} network cannot take {tuple(image_shape)} images of "
                f"{cfg.dataset}: {e}"
            ) from e


# --------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------


def expert_spec(cfg: RunConfig, data: PreparedData) -> dict[str, Any]:
    """What stored experts must agree on to be reused for ``cfg``."""
    return {
        "dataset": cfg.dataset,
        "image_shape": list(data.image_shape),
        "num_classes": data.num_classes,
        "model": cfg.model.resolved(data.image_shape[0]).identity(),
        "preprocessing": cfg.preprocessing.identity(),
    }


def expert_training(cfg: RunConfig) -> dict[str, Any]:
    e = cfg.experts
    return {
        "lr": e.lr,
        "batch_size": e.batch_size,
        "momentum": e.momentum,
        "weight_decay": e.weight_decay,
        "dsa_strategy": e.dsa_strategy,
        "seed": e.seed,
        "sharpness": e.sharpness,
        **({"rho": e.rho, "gsam_alpha": e.gsam_alpha} if e.sharpness != "none" else {}),
    }


def expert_dir(workdir: str, cfg: RunConfig, data: PreparedData) -> str:
    """The store for ``cfg``: an existing finished one in ``workdir/experts`` that matches the
    spec and the training settings and has at least as many experts and epochs, else a new
    folder named by a hash of the configuration."""
    key = json.dumps(
        {
            "spec": expert_spec(cfg, data),
            "training": expert_training(cfg),
            "epochs": cfg.experts.epochs,
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    own = os.path.join(workdir, "experts", f"{cfg.dataset}-{digest}")
    if os.path.exists(os.path.join(own, expert_store.MANIFEST)):
        return own
    found = expert_store.find_compatible(
        os.path.join(workdir, "experts"),
        expert_spec(cfg, data),
        expert_training(cfg),
        epochs=cfg.experts.epochs,
        num_experts=cfg.experts.num_experts,
    )
    return found or own


def ensure_experts(
    cfg: RunConfig, data: PreparedData, workdir: str, *, progress: bool = True, log: Log = _print
) -> expert_store.ExpertStore:
    """Opens (or creates) the expert store for ``cfg`` and trains its missing experts."""
    directory = expert_dir(workdir, cfg, data)
    manifest = expert_store.read_manifest(directory)
    if manifest is not None and manifest.get("epochs", 0) > cfg.experts.epochs:
        log(f"experts: reusing {directory} (trained for {manifest['epochs']} epochs)")
        return expert_store.ExpertStore.open(directory, expert_spec(cfg, data))
    store = expert_store.ExpertStore.open_or_create(
        directory,
        expert_spec(cfg, data),
        num_experts=cfg.experts.num_experts,
        epochs=cfg.experts.epochs,
        training=expert_training(cfg),
    )
    missing = store.missing(cfg.experts.num_experts)
    if missing:
        log(
            f"training {len(missing)} expert(s) on {cfg.dataset} for {cfg.experts.epochs} epochs "
            f"-> {directory}"
        )
    model = model_registry.build_model(cfg.model, data.num_classes)
    experts_lib.generate_experts(
        store,
        model,
        cfg.experts,
        data.train_x,
        data.train_y,
        augment_fn=augment_lib.make_augment(cfg.experts.dsa_strategy),
        test_images=data.test_x,
        test_labels=data.test_y,
        progress=progress,
        log=log,
        mesh=parallel.make_mesh() if jax.local_device_count() > 1 else None,
    )
    accs = list(store.manifest["test_acc"].values())
    if accs:
        log(f"experts: {len(accs)} trained, test accuracy {100 * np.mean(accs):.2f}% (mean)")
    return store


def load_expert_bank(store: expert_store.ExpertStore, cfg: RunConfig, like: Any):
    """The first ``cfg.experts.num_experts`` finished experts of ``store`` (a store may hold
    more, e.g. one shared with a run that asked for more), epochs up to what matching reads.

    Raises:
      ExpertError: fewer finished experts than requested.
    """
    done = sorted(store.completed())
    n = cfg.experts.num_experts
    if len(done) < n:
        raise expert_store.ExpertError(
            f"{store.directory} holds {len(done)} finished experts, the run needs {n}"
        )
    return store.load_bank(cfg.distill.max_epoch_needed, like=like, indices=done[:n])


# --------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------


def eval_model(cfg: RunConfig, name: str, num_classes: int):
    """The evaluation network called ``name``: ``convnet`` is the run's ConvNet, at
    ``cfg.eval.width`` if that is set (the published evaluation network is width 128 even where
    a reduced preset distils with a narrower student)."""
    if name == "convnet":
        model = cfg.model
        if cfg.eval.width is not None:
            model = dataclasses.replace(model, width=cfg.eval.width)
        return model_registry.build_model(model, num_classes)
    return model_registry.build_model(model_registry.ModelConfig(name=name), num_classes)


def ood_test_sets(
    data: PreparedData, ood: ood_lib.OodConfig | None
) -> dict[tuple[str, int], tuple[Any, Any]] | None:
    """The corrupted test sets of ``ood``, preprocessed for ``data`` (made once per request)."""
    if ood is None:
        return None
    k = json.dumps(ood.identity(), sort_keys=True)
    if k not in data.ood_cache:
        data.ood_cache[k] = ood_lib.prepared_test_sets(
            ood,
            data.dataset.test_images,
            data.dataset.test_labels,
            data.dataset.name,
            data.preprocessor.forward,
        )
    return data.ood_cache[k]


def _row(
    method: str,
    ipc: int,
    result: evaluate_lib.EvalResult,
    ood: ood_lib.OodConfig | None = None,
    **extra: Any,
) -> dict[str, Any]:
    row = {
        "method": method,
        "ipc": int(ipc),
        "acc_mean": round(result.mean, 4),
        "acc_std": round(result.std, 4),
        "n_eval": int(len(result.accs)),
        "accs": [round(100.0 * float(a), 4) for a in result.accs],
        **extra,
    }
    row.update({flag: n for flag, n in result.health_counts().items() if n})
    if ood is not None and result.extra:
        row["ood"] = ood_lib.summarise(result.extra, ood)
    return row


def random_baseline(
    cfg: RunConfig,
    data: PreparedData,
    *,
    progress: bool = True,
    model_name: str = "convnet",
    ood: ood_lib.OodConfig | None = None,
) -> evaluate_lib.EvalResult:
    """``satm_jax.baselines.random_real`` for ``cfg``: random real images, ``ipc`` per class,
    a different draw for every evaluation network (also tested on ``ood``'s corrupted sets)."""
    return baselines_lib.random_real(
        eval_model(cfg, model_name, data.num_classes),
        data.train_x,
        data.dataset.train_labels,
        data.num_classes,
        cfg.ipc,
        cfg.distill.lr_teacher,
        data.test_x,
        data.test_y,
        cfg.eval,
        seed=cfg.distill.seed,
        progress=progress,
        extra_tests=ood_test_sets(data, ood),
    )


def full_baseline(
    cfg: RunConfig,
    data: PreparedData,
    *,
    progress: bool = True,
    ood: ood_lib.OodConfig | None = None,
) -> evaluate_lib.EvalResult:
    """``satm_jax.baselines.full_data`` for ``cfg``: the whole training set for
    ``cfg.full_epochs`` epochs at the experts' learning rate (also tested on ``ood``'s
    corrupted sets)."""
    return baselines_lib.full_data(
        eval_model(cfg, "convnet", data.num_classes),
        data.train_x,
        data.train_y,
        cfg.experts.lr,
        data.test_x,
        data.test_y,
        cfg.eval,
        epochs=cfg.full_epochs,
        progress=progress,
        extra_tests=ood_test_sets(data, ood),
    )


# --------------------------------------------------------------------------------------------
# One condensation run
# --------------------------------------------------------------------------------------------


def initial_set(
    cfg: RunConfig,
    data: PreparedData,
    apply_fn: Callable[..., jax.Array] | None = None,
    bank: expert_store.ExpertBank | None = None,
    log: Log = _print,
    model: nn.Module | None = None,
) -> tuple[jax.Array, np.ndarray, jax.Array | None]:
    """The synthetic set's start for ``cfg``: ``(images, class ids, label logits or None)``
    (``satm_jax.initial_set``: random real images drawn with the distillation seed, herding's
    picks in the features of the bank's first expert at its last loaded epoch when
    ``cfg.distill.init == "herding"``, or DATM's soft-label start from the experts when
    ``cfg.distill.soft_labels``)."""
    rng = np.random.default_rng(cfg.distill.seed)
    args = (rng, data.train_x, data.dataset.train_labels, data.num_classes, cfg.ipc)
    if cfg.distill.init == "herding":
        if model is None or bank is None:
            raise ValueError("the herding start needs the model and the experts (model, bank)")
        if model_registry.has_running_stats(cfg.model, data.image_shape):
            raise ConfigError(
                f"--syn_init=herding needs a network without running statistics; "
                f"{cfg.model.name!r} (norm {cfg.model.norm!r}) keeps batch statistics"
            )
        last = bank.num_epochs - 1
        expert = jax.tree.map(lambda x: x[0, last], bank.params)
        features = herding_lib.extract_features(model, {"params": expert}, data.train_x)
        start = initial_set_lib.herding_start(
            data.train_x, data.dataset.train_labels, data.num_classes, cfg.ipc, features
        )
        log(
            f"{cfg.name}: start = herding's picks per class in the features of expert 0 at its "
            f"epoch index {last} ({features.shape[1]} features per image)"
        )
    elif not cfg.distill.soft_labels:
        start = initial_set_lib.real_images(*args)
    elif apply_fn is None or bank is None:
        raise ValueError("soft labels need the experts (apply_fn and bank)")
    else:
        start = initial_set_lib.soft_label_start(*args, apply_fn, bank)
    if start.misclassified:
        log(
            f"soft labels: {start.misclassified} initial image(s) are not classified "
            "correctly by the expert"
        )
    return start.images, start.labels, start.logits


def final_set(cfg: RunConfig, state: distill_lib.DistillState) -> tuple[jax.Array, jax.Array]:
    """What gets evaluated: the images (their EMA if enabled) and label targets."""
    images = state.ema if state.ema is not None else state.images
    return images, distill_lib.label_targets(state.labels, cfg.distill.soft_labels)


def _unlabelled(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without its ablation label: an ablation's "mtt" variant is the plain MTT run."""
    return {k: v for k, v in d.items() if k != "variant"}


def evaluate_final_set(
    cfg: RunConfig,
    data: PreparedData,
    images: Any,
    labels: Any,
    step: float | jax.Array,
    names: tuple[str, ...] | list[str],
    *,
    key_for: Callable[[str], jax.Array | None],
    reuse: Callable[[str], evaluate_lib.EvalResult | None] = lambda name: None,
    ood: ood_lib.OodConfig | None = None,
    progress: bool = True,
    log: Log = _print,
    log_note: str = "",
    lr_for: Mapping[str, float] | None = None,
    **row_extra: Any,
) -> list[dict[str, Any]]:
    """One results row per evaluation network in ``names``: fresh networks trained on
    ``(images, labels)`` at step size ``step`` with ``cfg.eval`` (evaluation key
    ``key_for(name)``; ``reuse(name)``'s result instead where it has one), tested on the test
    split and on ``ood``'s corrupted sets. Rows carry ``row_extra`` and the run's variant.

    ``lr_for`` gives some networks their own step size instead of ``step`` (never a reused
    result: ``reuse`` is not asked for them); their rows get ``"eval_lr"``."""
    lr_for = dict(lr_for or {})
    rows = []
    for name in names:
        own = {"eval_lr": lr_for[name]} if name in lr_for else {}
        res = None if own else reuse(name)
        if res is None:
            res = evaluate_lib.evaluate_set(
                eval_model(cfg, name, data.num_classes),
                images,
                labels,
                own.get("eval_lr", step),
                data.test_x,
                data.test_y,
                cfg.eval,
                key=key_for(name),
                progress=progress,
                desc=f"eval {cfg.name} {name}",
                extra_tests=ood_test_sets(data, ood),
            )
        rows.append(
            _row(
                cfg.method,
                cfg.ipc,
                res,
                ood,
                model=name,
                **row_extra,
                **own,
                **({"variant": cfg.variant} if cfg.variant else {}),
            )
        )
        note = f" lr {own['eval_lr']:.4g}" if own else log_note
        log(f"{cfg.name} [{name}]{note}: {res.summary()}")
    return rows


def distill_and_evaluate(
    cfg: RunConfig,
    data: PreparedData,
    store: expert_store.ExpertStore,
    workdir: str,
    *,
    progress: bool = True,
    log: Log = _print,
    ood: ood_lib.OodConfig | None = None,
    flatness: flatness_lib.FlatnessConfig | None = None,
) -> list[dict[str, Any]]:
    """Condenses with ``cfg``, evaluates the result, writes the run's outputs; returns rows.

    With ``ood`` the final set's evaluation networks are also tested on corrupted test sets
    (rows get an ``"ood"`` object). With ``flatness`` the final set's flatness is measured on
    held-out experts (``flatness.json``, a ``"flatness"`` object per row; see
    ``measure_flatness``). A finished run is reused only if it was evaluated with the same
    ``ood`` and ``flatness`` requests; otherwise its final checkpoint is evaluated again (no
    distillation).
    """
    ood_id = ood.identity() if ood is not None else None
    flat_id = flatness.validate().identity() if flatness is not None else None
    rundir = os.path.join(workdir, "runs", cfg.name)
    os.makedirs(rundir, exist_ok=True)
    cfg_dict = jsonio.to_jsonable(cfg.to_dict())
    result_path = os.path.join(rundir, "result.json")
    result_key = _run_key(cfg_dict, ood_id, flat_id)
    cached = result_cache.load(result_path, result_key, legacy=_legacy_run_result)
    if cached is not None:
        log(f"{cfg.name}: finished earlier, results reused from {result_path}")
        label = {"variant": cfg.variant} if cfg.variant else {}
        return [{**_unlabelled(row), **label} for row in cached["rows"]]
    jsonio.write_json(os.path.join(rundir, "config.json"), cfg_dict)

    model = model_registry.build_model(cfg.model, data.num_classes)
    like = models_lib.init_params(model, jax.random.PRNGKey(0), data.image_shape)["params"]
    bank = load_expert_bank(store, cfg, like)
    augment_fn = augment_lib.make_augment(cfg.distill.dsa_strategy)
    apply_fn = models_lib.make_apply_fn(model)
    images0, labels0, logits0 = initial_set(cfg, data, apply_fn, bank, log, model=model)
    state = distill_lib.init_state(cfg.distill, images0, labels0, label_logits=logits0)
    mesh = parallel.make_mesh() if cfg.distill.data_parallel else None
    outer_step = distill_lib.make_outer_step(apply_fn, augment_fn, cfg.distill, mesh=mesh)

    ckpt = checkpoint_lib.DistillCheckpointer(
        os.path.join(rundir, "checkpoints"),
        cfg_dict,
        resumable=configs_lib.RESUMABLE_CHANGES,
    )
    state = ckpt.restore_latest(state, log=log)
    if int(state.iteration) > cfg.distill.iterations:
        raise ConfigError(
            f"{rundir} holds a run already at iteration {int(state.iteration)}, past the "
            f"{cfg.distill.iterations} iterations asked for; its state there is not kept. "
            "Ask for at least as many iterations, or use another --workdir."
        )
    if int(state.iteration) == 0 and cfg.distill.lr_init == "closed_form":
        state, history = distill_lib.calibrate_step_size(
            state, bank, apply_fn, augment_fn, cfg.distill
        )
        log(
            f"{cfg.name}: step size initialised at the closed-form best constant step "
            f"{float(state.syn_lr):.4g} (fixed point "
            + " -> ".join(f"{a:.4g}" for a in history)
            + f", {cfg.distill.lr_init_samples} trajectories)"
        )
    if mesh is not None:
        batch = min(cfg.distill.batch_syn or state.images.shape[0], state.images.shape[0])
        if batch % parallel.num_devices(mesh):
            log(
                f"warning: the inner minibatch ({batch}) is not divisible by "
                f"{parallel.num_devices(mesh)} devices; it will not be split"
            )
        state, bank = parallel.replicate((state, bank), mesh)
        log(f"{cfg.name}: inner minibatches split across {parallel.num_devices(mesh)} devices")
    metrics_log = outputs_lib.MetricsWriter(rundir, start_iteration=int(state.iteration))
    evals = jsonio.read_json(os.path.join(rundir, "evals.json")) or {}

    def eval_fn(st):
        it = int(st.iteration)
        x, y = final_set(cfg, st)
        final = ood is not None and it == cfg.distill.iterations
        res = evaluate_lib.evaluate_set(
            eval_model(cfg, "convnet", data.num_classes),
            x,
            y,
            st.syn_lr,
            data.test_x,
            data.test_y,
            cfg.eval,
            key=jax.random.PRNGKey(cfg.eval.seed + it),
            progress=progress,
            desc=f"eval {cfg.name} it{it}",
            extra_tests=ood_test_sets(data, ood) if final else None,
        )
        evals[str(it)] = {
            "acc_mean": res.mean,
            "acc_std": res.std,
            "accs": res.accs.tolist(),
            **_health_json(res),
        }
        if final:
            evals[str(it)].update(ood=ood_id, ood_accs=ood_lib.accs_to_json(res.extra))
        jsonio.write_json(os.path.join(rundir, "evals.json"), evals)
        metrics_log.scalar(it, "eval/acc_mean", res.mean)
        outputs_lib.save_synthetic_grid(rundir, cfg, data, x, y, it)
        outputs_lib.plot_run(rundir, cfg)
        log(f"{cfg.name} iteration {it}: {res.summary()} ({cfg.eval.num_models} nets)")

    t0 = time.time()
    if int(state.iteration) < cfg.distill.iterations:
        log(
            f"{cfg.name}: distilling {data.num_classes}x{cfg.ipc} images, "
            f"{cfg.distill.iterations} iterations, N={cfg.distill.syn_steps}, "
            f"M={cfg.distill.expert_epochs}, sharpness={cfg.distill.sharpness}, "
            f"hypergrad={cfg.distill.hypergrad}"
            + (f" K={cfg.distill.truncate}" if cfg.distill.truncation else "")
        )
    state = distill_lib.run_distillation(
        state,
        bank,
        cfg.distill,
        outer_step,
        eval_every=cfg.eval_every,
        eval_fn=lambda st: eval_fn(st) if str(int(st.iteration)) not in evals else None,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_fn=ckpt.save,
        metrics_fn=metrics_log.iteration,
        progress=progress,
        desc=cfg.name,
        log=log,
    )
    ckpt.save(state)
    metrics_log.close()
    # The distillation's wall time over every session of a resumed run (its kept metrics
    # lines); runs written before the lines carried ``wall_s`` fall back to this session's.
    walls = [r["wall_s"] for r in outputs_lib.read_metrics(rundir) if "wall_s" in r]
    distill_s = sum(walls) if walls else time.time() - t0
    images, labels = final_set(cfg, state)
    report = run_convergence(rundir, images0, state.images)
    jsonio.write_json(os.path.join(rundir, "convergence.json"), report)
    for w in report["warnings"]:
        log(f"warning: {cfg.name}: {w}")
    outputs_lib.export_distilled(os.path.join(rundir, "distilled.npz"), cfg, data, state, images)
    outputs_lib.plot_run(rundir, cfg)
    flat = None
    if flatness is not None:
        flat = jsonio.read_json(os.path.join(rundir, "flatness.json"))
        if flat is None or flat.get("config") != flat_id:
            held_cfg = heldout_config(cfg, flatness)
            held = ensure_experts(held_cfg, data, workdir, progress=progress, log=log)
            flat = {
                "config": flat_id,
                **measure_flatness(
                    cfg,
                    flatness,
                    images,
                    state,
                    apply_fn,
                    augment_fn,
                    bank,
                    load_expert_bank(held, held_cfg, like),
                ),
            }
            jsonio.write_json(os.path.join(rundir, "flatness.json"), flat)
        log(
            f"{cfg.name} flatness: loss sampled {flat['loss_sampled']:.4f} held-out "
            f"{flat['loss_heldout']:.4f}, worst-case increase {flat['worst_case_increase']:.4g}, "
            f"top Hessian eigenvalue {flat['hessian_top_eig']:.4g}"
        )

    final_it = int(state.iteration)
    ev = evals.get(str(final_it))

    def reuse(name: str) -> evaluate_lib.EvalResult | None:
        if name == "convnet" and ev is not None and (ood is None or ev.get("ood") == ood_id):
            return evaluate_lib.EvalResult(
                np.asarray(ev["accs"]),
                ood_lib.accs_from_json(ev.get("ood_accs", {})),
                **_health_from_json(ev),
            )
        return None

    rows = evaluate_final_set(
        cfg,
        data,
        images,
        labels,
        state.syn_lr,
        cfg.eval_models,
        # An earlier evaluation at this iteration (made without ``ood``) is repeated with its
        # own key, so that the clean accuracies stay those it reported.
        key_for=lambda name: (
            jax.random.PRNGKey(cfg.eval.seed + final_it)
            if name == "convnet" and ev is not None
            else None
        ),
        reuse=reuse,
        ood=ood,
        progress=progress,
        log=log,
        lr_for=configs_lib.parse_eval_model_lr(cfg.eval_model_lr),
        syn_lr=float(state.syn_lr),
        distill_s=round(distill_s, 1),
        nonfinite=int(state.num_nonfinite),
        reduced=cfg.reduced,
        convergence=report,
        **({"flatness": flat} if flat is not None else {}),
    )
    result_cache.store(result_path, result_key, {"rows": rows})
    return rows


def _run_key(cfg_dict: dict[str, Any], ood_id: Any, flat_id: Any) -> dict[str, Any]:
    """What a finished run's ``result.json`` must match to be reused (its ablation label aside:
    an ablation's "mtt" variant is the plain MTT run)."""
    return {"config": _unlabelled(cfg_dict), "ood": ood_id, "flatness": flat_id}


def _legacy_run_result(doc: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """A ``result.json`` of the format before ``result_cache`` (config, rows, ood, flatness)."""
    if doc.get("complete") is not True or "config" not in doc or "rows" not in doc:
        return None
    return _run_key(doc["config"], doc.get("ood"), doc.get("flatness")), {"rows": doc["rows"]}


# Held-out experts are trained with the run's expert seed plus this: never the sampled ones.
HELDOUT_SEED_OFFSET = 1_000_003


def heldout_config(cfg: RunConfig, flatness: flatness_lib.FlatnessConfig) -> RunConfig:
    """``cfg`` with the expert settings of its held-out experts (another seed, so another
    store: none of them was sampled during distillation)."""
    experts = dataclasses.replace(
        cfg.experts,
        seed=cfg.experts.seed + HELDOUT_SEED_OFFSET,
        num_experts=flatness.heldout_experts,
        parallel=min(cfg.experts.parallel, flatness.heldout_experts),
    )
    return dataclasses.replace(cfg, experts=experts)


def measure_flatness(
    cfg: RunConfig,
    flatness: flatness_lib.FlatnessConfig,
    images: Any,
    state: distill_lib.DistillState,
    apply_fn: Any,
    augment_fn: Any,
    sampled_bank: expert_store.ExpertBank,
    heldout_bank: expert_store.ExpertBank,
) -> dict[str, float]:
    """``satm_jax.flatness.measure`` of the final set: the matching loss at the learned step
    size on ``flatness.samples`` trajectories drawn alike (same key, so the same minibatches
    and augmentations) from the sampled and the held-out experts."""
    d = cfg.distill
    key = jax.random.PRNGKey(flatness.seed)
    targets = distill_lib.label_targets(state.labels, d.soft_labels)

    def loss_on(bank):
        traj = flatness_lib.draw_trajectories(bank, key, flatness.samples, int(images.shape[0]), d)
        return flatness_lib.fixed_matching_loss(
            apply_fn, targets, state.syn_lr, traj, augment_fn=augment_fn, remat=d.remat
        )

    return flatness_lib.measure(flatness, images, loss_on(sampled_bank), loss_on(heldout_bank))


def run_convergence(rundir: str, initial_images: Any, final_images: Any) -> dict[str, Any]:
    """``satm_jax.convergence.report`` of a run from its ``metrics.jsonl`` and its images."""
    recs = [r for r in outputs_lib.read_metrics(rundir) if "loss" in r]
    x0 = np.asarray(initial_images, np.float64)
    move = float(np.linalg.norm(np.asarray(final_images, np.float64) - x0) / np.linalg.norm(x0))
    return convergence.report(
        [r["loss"] for r in recs],
        groups=[int(r.get("start_epoch", 0)) * 1000 + int(r.get("expert", 0)) for r in recs],
        syn_lrs=[r["syn_lr"] for r in recs],
        image_updates=[r["img_update_rel"] for r in recs if "img_update_rel" in r],
        image_move=move,
    )


def evaluate_distilled(
    path: str,
    *,
    lr: float | None = None,
    eval_models: tuple[str, ...] | None = None,
    num_models: int | None = None,
    epochs: int | None = None,
    width: int | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    log: Log = _print,
    eval_ood: str | None = None,
    ood_source: str = "auto",
    ood_samples: int = ood_lib.DEFAULT_SAMPLES,
) -> list[dict[str, Any]]:
    """Evaluates a saved ``distilled.npz`` again, with the protocol of the run that made it.

    ``eval_ood`` (``"all"`` or corruption names, see ``satm_jax.ood.parse_eval_ood``) also
    tests the same networks on corrupted test sets; each row then has an ``"ood"`` object.

    With the defaults (the set's own learned step size, the run's evaluation networks, number
    of networks and epochs) the accuracies are those the run reported: the same keys are used.
    ``lr`` replaces the learned step size (e.g. to separate the images' quality from the step
    size they were distilled with), ``eval_models`` adds other architectures, ``width`` sets the
    evaluation ConvNet's width (e.g. the published 128 for a set distilled with a narrower one).
    Without ``lr`` the networks the run gave their own step size (``RunConfig.eval_model_lr``)
    train at it; with ``lr`` every network does.

    Returns:
      One results row per evaluation network (as in ``results.json``), with ``lr`` and ``path``.

    Raises:
      FileNotFoundError, ValueError: missing or unreadable file.
      ConfigError: the file's config cannot be read, bad ``lr``/``num_models``/``epochs``.
      data_lib.DatasetError: the dataset cannot be loaded, or its images do not match the set.
    """
    if eval_models is not None:
        eval_models = configs_lib.check_eval_models(eval_models)
    d = outputs_lib.load_distilled(path)
    cfg = configs_lib.run_config_from_dict(d["config"])
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ConfigError(f"the learning rate must be a positive number, got {lr}")
    for name, v in (("num_models", num_models), ("epochs", epochs), ("width", width)):
        if v is not None and v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    ecfg = dataclasses.replace(
        cfg.eval,
        num_models=num_models or cfg.eval.num_models,
        epochs=epochs or cfg.eval.epochs,
        width=width or cfg.eval.width,
    )
    cfg = dataclasses.replace(cfg, eval=ecfg)
    ood = ood_lib.parse_eval_ood(
        eval_ood,
        dataset=cfg.dataset,
        data_dir=data_dir or cfg.data_dir,
        source=ood_source,
        samples=ood_samples,
    )
    dataset = data_lib.load_dataset(cfg.dataset, data_dir=data_dir or cfg.data_dir)
    images = jnp.asarray(d["images"])
    if tuple(images.shape[1:]) != tuple(dataset.image_shape):
        raise data_lib.DatasetError(
            f"{path} holds {tuple(images.shape[1:])} images, {cfg.dataset} has "
            f"{tuple(dataset.image_shape)}"
        )
    if int(d.get("num_classes", dataset.num_classes)) != dataset.num_classes:
        raise data_lib.DatasetError(
            f"{path} has {int(d['num_classes'])} classes, {cfg.dataset} has {dataset.num_classes}"
        )
    check_networks_fit(
        cfg, eval_models or cfg.eval_models, dataset.image_shape, dataset.num_classes
    )
    data = prepare_data(dataset, cfg.preprocessing)
    labels = distill_lib.label_targets(jnp.asarray(d["labels"]), d["soft_labels"])
    step = float(d["syn_lr"]) if lr is None else float(lr)
    it = int(d.get("iteration", 0))
    rows = evaluate_final_set(
        cfg,
        data,
        images,
        labels,
        step,
        eval_models or cfg.eval_models,
        # The run's keys: the ConvNet is evaluated with seed + iteration, the others with seed.
        key_for=lambda name: jax.random.PRNGKey(ecfg.seed + it) if name == "convnet" else None,
        ood=ood,
        progress=progress,
        log=log,
        log_note=f" lr {step:.4g}",
        # The run's own step sizes per network, unless ``lr`` names one for all.
        lr_for=configs_lib.parse_eval_model_lr(cfg.eval_model_lr) if lr is None else None,
        lr=step,
        path=path,
        reduced=cfg.reduced,
        eval_width=ecfg.width or cfg.model.width,
        eval_epochs=ecfg.epochs,
    )
    for row in rows:  # "lr": the step size each row's networks trained at
        row["lr"] = row.get("eval_lr", row["lr"])
    return rows


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def _baseline_key(cfg: RunConfig, ood: ood_lib.OodConfig | None, **extra: Any) -> dict[str, Any]:
    """What a cached baseline result must match to be reused."""
    return {
        "dataset": cfg.dataset,
        "eval": jsonio.to_jsonable(dataclasses.asdict(cfg.eval)),
        "model": jsonio.to_jsonable(dataclasses.asdict(cfg.model)),
        "preprocessing": cfg.preprocessing.identity(),
        **({"ood": ood.identity()} if ood is not None else {}),
        **extra,
    }


def _cached_baseline(
    path: str,
    key: dict[str, Any],
    compute: Callable[[], evaluate_lib.EvalResult],
    log: Log,
    what: str,
) -> evaluate_lib.EvalResult:
    cached = result_cache.load(path, key, legacy=_legacy_baseline)
    if cached is not None:
        log(f"{what}: reused from {path}")
        return evaluate_lib.EvalResult(
            np.asarray(cached["accs"]),
            ood_lib.accs_from_json(cached.get("ood_accs", {})),
            **_health_from_json(cached),
        )
    res = compute()
    out: dict[str, Any] = {"accs": res.accs.tolist(), **_health_json(res)}
    if res.extra:
        out["ood_accs"] = ood_lib.accs_to_json(res.extra)
    result_cache.store(path, key, out)
    return res


def _health_json(res: evaluate_lib.EvalResult) -> dict[str, Any]:
    """``{"diverged": [bool per network], "collapsed": [...]}`` for a stored evaluation
    (the flags that are known)."""
    flags = {name: getattr(res, name) for name in evaluate_lib.HEALTH_FLAGS}
    return {name: [bool(v) for v in f] for name, f in flags.items() if f is not None}


def _health_from_json(doc: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """The per-network flags of a stored evaluation as ``EvalResult`` keyword arguments
    (``None``: not recorded)."""
    return {
        name: np.asarray(doc[name], bool) if name in doc else None
        for name in evaluate_lib.HEALTH_FLAGS
    }


def _legacy_baseline(doc: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """A baseline file of the format before ``result_cache`` (key and accs, no ``complete``)."""
    if "key" not in doc or "accs" not in doc:
        return None
    return doc["key"], {k: v for k, v in doc.items() if k != "key"}


def train_and_evaluate(
    configs: list[RunConfig],
    workdir: str,
    *,
    dataset: data_lib.Dataset | None = None,
    baselines: bool = True,
    progress: bool = True,
    log: Log = _print,
    results_name: str = "results",
    ood: ood_lib.OodConfig | None = None,
    flatness: flatness_lib.FlatnessConfig | None = None,
) -> dict[str, Any]:
    """Runs every config (same dataset), the baselines, and writes ``results.json``.

    Args:
      configs: runs to make; they must share the dataset.
      workdir: output folder (created).
      dataset: the loaded dataset (loaded from the configs' ``dataset``/``data_dir`` if None).
      baselines: also evaluate random real images (per IPC) and the full training set.
      progress: progress bars.
      log: where messages go.
      results_name: stem of the results files (``<stem>.json``, ``<stem>.md``) in ``workdir``;
        other entry points (``experiments.ablate``) use their own so that they never overwrite
        the results of ``experiments.run`` in a shared workdir.
      ood: also test every evaluated set (random, condensed, full) on these corrupted test
        sets: rows get an ``"ood"`` object, ``<stem>_ood.md`` and ``<stem>_ood.png`` are written.
      flatness: also measure every condensed set's flatness on held-out experts (rows of the
        condensed sets get a ``"flatness"`` object; see ``distill_and_evaluate``).

    Returns:
      The ``results.json`` content.
    """
    t_start = time.time()
    if not configs:
        raise ConfigError("no runs requested")
    names = {c.dataset for c in configs}
    if len(names) != 1:
        raise ConfigError(f"one dataset per call, got {sorted(names)}")
    first = configs[0]
    if dataset is None:
        dataset = data_lib.load_dataset(first.dataset, data_dir=first.data_dir)
    validate_configs(configs, dataset)
    os.makedirs(workdir, exist_ok=True)
    log(
        f"dataset {dataset.name}: {len(dataset.train_labels)} training / "
        f"{len(dataset.test_labels)} test images of {dataset.image_shape}, "
        f"{dataset.num_classes} classes; backend {jax.default_backend()}"
    )

    prepared: dict[str, PreparedData] = {}

    def data_for(cfg: RunConfig) -> PreparedData:
        k = json.dumps(cfg.preprocessing.identity(), sort_keys=True)
        if k not in prepared:
            prepared[k] = prepare_data(dataset, cfg.preprocessing)
        return prepared[k]

    rows: list[dict[str, Any]] = []
    results_path = os.path.join(workdir, f"{results_name}.json")
    config_dict = {
        "dataset": first.dataset,
        "preset": first.preset,
        "source": first.source,
        "reduced": any(c.reduced for c in configs),
        "runs": {c.name: jsonio.to_jsonable(c.to_dict()) for c in configs},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.local_devices()],
        "processes": jax.process_count(),
        **({"ood": ood.identity()} if ood is not None else {}),
        **({"flatness": flatness.identity()} if flatness is not None else {}),
    }

    def write_results() -> dict[str, Any]:
        out = {"results": rows, "config": config_dict, "wall_s": round(time.time() - t_start, 2)}
        jsonio.write_json(results_path, out)
        outputs_lib.write_results_table(os.path.join(workdir, f"{results_name}.md"), out)
        if ood is not None:
            ood_lib.write_report(workdir, rows, stem=f"{results_name}_ood")
        return out

    done_random: set[int] = set()
    stores: dict[str, expert_store.ExpertStore] = {}
    for cfg in configs:
        data = data_for(cfg)
        if baselines and cfg.ipc not in done_random:
            done_random.add(cfg.ipc)
            key = _baseline_key(
                cfg, ood, ipc=cfg.ipc, lr=cfg.distill.lr_teacher, seed=cfg.distill.seed
            )
            res = _cached_baseline(
                os.path.join(workdir, "baselines", f"random_ipc{cfg.ipc}.json"),
                key,
                lambda: random_baseline(cfg, data, progress=progress, ood=ood),
                log,
                f"random ipc{cfg.ipc}",
            )
            rows.append(_row("random", cfg.ipc, res, ood, model="convnet", reduced=cfg.reduced))
            log(f"random real images, ipc {cfg.ipc}: {res.summary()}")
            write_results()
        edir = expert_dir(workdir, cfg, data)
        if edir not in stores:  # runs with the same expert configuration share the store
            stores[edir] = ensure_experts(cfg, data, workdir, progress=progress, log=log)
        store = stores[edir]
        rows.extend(
            distill_and_evaluate(
                cfg, data, store, workdir, progress=progress, log=log, ood=ood, flatness=flatness
            )
        )
        write_results()

    if baselines:
        cfg = configs[0]
        data = data_for(cfg)
        key = _baseline_key(cfg, ood, epochs=cfg.full_epochs, lr=cfg.experts.lr)
        res = _cached_baseline(
            os.path.join(workdir, "baselines", "full.json"),
            key,
            lambda: full_baseline(cfg, data, progress=progress, ood=ood),
            log,
            "full training set",
        )
        per_class = int(round(len(dataset.train_labels) / dataset.num_classes))
        rows.append(
            _row(
                "full",
                per_class,
                res,
                ood,
                model="convnet",
                epochs=cfg.full_epochs,
                n_train=int(len(dataset.train_labels)),
                reduced=cfg.reduced,
            )
        )
        log(f"full training set ({cfg.full_epochs} epochs): {res.summary()}")
    out = write_results()
    log(outputs_lib.format_table(out))
    return out

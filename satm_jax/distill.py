"""The outer loop: learning the synthetic set by (sharpness-aware) trajectory matching.

The whole outer iteration is one pure function ``outer_step(state, bank) -> (state, metrics)``
and is jit-compiled as one program, for SATM both passes and every update included:

1. draw an expert and a start epoch ``t`` from the device-resident ``ExpertBank``;
   ``theta_0 = theta*_t``, target ``theta*_{t+M}``;
2. draw the ``N`` inner minibatches and augmentation keys;
3. first pass: run the ``N - K`` untracked prefix steps (``K = N`` in exact mode), then
   ``jax.value_and_grad`` of the loss through the last ``K`` steps: ``h = dL/dX`` and the
   step-size gradient (back-propagated, SATM's first-order closed form, or none);
4. the images' Optax transform (``satm_jax.sharpness``) takes ``h`` and a ``grad_fn``; for SATM it
   evaluates the gradient at ``X + eps`` by re-running the last ``K`` steps from the first
   pass's ``theta_{N-K}`` with the same minibatches and keys (trajectory reusing, TR), or the
   whole unroll from ``theta_0`` with TR off; MTT uses no sharpness (``grad_fn`` unused);
5. apply the updates to the images (SGD, momentum 0.5), the step size (SGD, momentum 0.5,
   kept positive) and, if learnable, the soft labels; update the EMA of the images;
6. guard: if the loss, a gradient or an update is not finite, the state is left unchanged for
   this iteration and counted.

``run_distillation`` drives it in chunks of ``steps_per_call`` iterations per jit call
(``jax.lax.scan`` over outer steps, no host round trip inside a chunk, the state buffers
donated), with a progress bar, periodic evaluation and checkpoint callbacks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from satm_jax import expert_store, matching, scale_free, step_size
from satm_jax import experts as experts_lib
from satm_jax import sharpness as sharpness_lib

Array = jax.Array
Params = Any

HYPERGRADS = ("exact", "truncated")
LR_UPDATES = ("backprop", "first_order", "first_order_window", "fixed")
IMG_OPTIMIZERS = ("sgd", "adam")
LR_SPACES = ("linear", "log")
LR_INITS = ("teacher", "closed_form")
SYN_INITS = ("real", "herding")


class DistillError(Exception):
    """The distillation cannot continue (e.g. too many non-finite iterations in a row)."""


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Hyperparameters of the outer loop (MTT's names where MTT has them).

    Attributes:
      ipc: synthetic images per class.
      iterations: outer iterations.
      syn_steps: ``N``, inner student steps per iteration.
      expert_epochs: ``M``, epochs between start and target checkpoints.
      min_start_epoch: ``T-``, lowest start epoch.
      max_start_epoch: ``T+``, start epochs are drawn from ``[T-, T+)``.
      max_start_epoch_final: if set, ``T+`` grows linearly to this value by iteration
        ``grow_until`` (DATM's sequential generation).
      grow_until: iteration at which ``T+`` reaches ``max_start_epoch_final`` (default: half of
        ``iterations``).
      batch_syn: synthetic minibatch per inner step (``None``: the whole set).
      img_optimizer: ``"sgd"`` (MTT: SGD with ``lr_img`` and ``img_momentum``) or ``"adam"``
        (ours: ``satm_jax.scale_free.relative_adam`` with ``lr_img_rel``).
      lr_img: learning rate of the images with ``img_optimizer="sgd"``.
      lr_img_rel: with ``img_optimizer="adam"``, the image step as a fraction of the RMS of
        the initial set (scale-free: the same value means the same on every dataset).
      lr_space: ``"linear"`` (MTT: SGD with ``lr_lr`` and ``lr_momentum`` on ``alpha``) or
        ``"log"`` (ours: Adam with ``lr_log_lr`` on ``log alpha``; a relative step).
      lr_lr: learning rate of the step size with ``lr_space="linear"``.
      lr_log_lr: Adam's learning rate on ``log alpha`` with ``lr_space="log"`` (0.01 changes
        ``alpha`` by about 1% per iteration at most).
      lr_teacher: the experts' learning rate: the initial step size ``alpha`` with
        ``lr_init="teacher"`` and the unit of ``lr_floor``.
      lr_init: ``"teacher"`` (MTT: ``alpha_0 = lr_teacher``) or ``"closed_form"`` (ours: the
        best constant step for the initial set, ``satm_jax.step_size``).
      lr_init_samples: trajectories the closed-form initialisation averages over.
      img_momentum: SGD momentum of the images (MTT 0.5).
      lr_momentum: SGD momentum of the step size (MTT 0.5).
      lr_update: step-size gradient: ``"backprop"`` (MTT), ``"first_order"`` (SATM's closed
        form, ``G`` summed over all ``N`` steps), ``"first_order_window"`` (ours: the same
        closed form with ``G`` summed over the last ``K`` steps only, the window the truncated
        hypergradient differentiates; equal to ``"first_order"`` when ``K = N``) or
        ``"fixed"``.
      lr_floor: the step size is kept at or above ``lr_floor * lr_teacher`` (our guard).
      hypergrad: ``"exact"`` (all ``N`` steps) or ``"truncated"`` (last ``truncate`` steps).
      truncate: ``K`` for the truncated hypergradient.
      sharpness: ``"none"`` (MTT) or a ``satm_jax.sharpness.SHARPNESS`` name.
      rho: sharpness radius.
      rho_ball: ``"global"`` (SAM: one ball around the whole set) or ``"per_example"`` (ours:
        one ball per image); ``satm_jax.sharpness.BALLS``.
      rho_scale: ``"absolute"`` (SAM: ``rho`` is an L2 length) or ``"relative"`` (ours: ``rho``
        is a fraction of the set's norm, or of each image's with ``per_example``);
        ``satm_jax.sharpness.RADII``.
      sigma: Gaussian smoothing scale (``smooth_sam``).
      asam_eta: ASAM's ``eta``.
      gsam_alpha: GSAM's coefficient.
      reuse_trajectory: TR: the sharpness pass restarts from the first pass's
        ``theta_{N-K}`` (``True``) or from ``theta_0`` (``False``).
      init: where the images start: ``"real"`` (MTT: random real images of each class, drawn
        with ``seed``) or ``"herding"`` (ours: the herding selection of each class in the
        penultimate features of the first expert at its last loaded epoch,
        ``satm_jax.initial_set.herding_start``; the same start for every ``seed``). Hard
        labels only (DATM's soft-label start chooses its own images).
      soft_labels: learn the labels (DATM); targets are ``softmax(label_logits)``.
      lr_label: learning rate of the label logits (SGD, momentum 0.5).
      ema_decay: EMA of the synthetic images (FTD), evaluated instead of the raw images;
        ``None`` disables it (``0`` keeps an EMA equal to the raw images).
      dsa_strategy: DSA families for the inner steps (``"none"`` disables).
      remat: ``jax.checkpoint`` each differentiated inner step (``second_order="reverse"``).
      second_order: how the hypergradient differentiates the inner steps' gradients,
        ``satm_jax.matching.SECOND_ORDER``: ``"reverse"`` (JAX's reverse-over-reverse),
        ``"forward"`` (ours: a custom VJP of the unroll with forward-over-reverse
        Hessian-vector products) or ``"auto"`` (forward on the CPU, reverse elsewhere). The
        same gradient to rounding; only the speed and memory differ.
      steps_per_call: outer iterations per jit call.
      data_parallel: split each inner minibatch across all devices (see ``make_outer_step``).
      max_consecutive_nonfinite: stop after this many non-finite iterations in a row.
      seed: PRNG seed of the distillation.
    """

    ipc: int = 1
    iterations: int = 1000
    syn_steps: int = 20
    expert_epochs: int = 2
    min_start_epoch: int = 0
    max_start_epoch: int = 10
    max_start_epoch_final: int | None = None
    grow_until: int | None = None
    batch_syn: int | None = None
    img_optimizer: str = "sgd"
    lr_img: float = 1000.0
    lr_img_rel: float = 0.01
    lr_space: str = "linear"
    lr_lr: float = 1e-5
    lr_log_lr: float = 0.01
    lr_teacher: float = 0.01
    lr_init: str = "teacher"
    lr_init_samples: int = 16
    img_momentum: float = 0.5
    lr_momentum: float = 0.5
    lr_update: str = "backprop"
    lr_floor: float = 1e-3
    hypergrad: str = "exact"
    truncate: int | None = None
    sharpness: str = "none"
    rho: float = 0.05
    rho_ball: str = "global"
    rho_scale: str = "absolute"
    sigma: float = 0.01
    asam_eta: float = 0.01
    gsam_alpha: float = 0.1
    reuse_trajectory: bool = True
    init: str = "real"
    soft_labels: bool = False
    lr_label: float = 1.0
    ema_decay: float | None = None
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    remat: bool = True
    second_order: str = "auto"
    steps_per_call: int = 10
    data_parallel: bool = False
    max_consecutive_nonfinite: int = 20
    seed: int = 0

    def validate(self) -> DistillConfig:
        """Raises ``ValueError`` for inconsistent settings."""
        if self.ipc < 1:
            raise ValueError(f"ipc must be >= 1, got {self.ipc}")
        if self.syn_steps < 1 or self.expert_epochs < 1 or self.iterations < 0:
            raise ValueError("syn_steps and expert_epochs must be >= 1, iterations >= 0")
        if not 0 <= self.min_start_epoch < self.max_start_epoch:
            raise ValueError(
                f"need 0 <= min_start_epoch < max_start_epoch, got {self.min_start_epoch}, "
                f"{self.max_start_epoch}"
            )
        if (
            self.max_start_epoch_final is not None
            and self.max_start_epoch_final < self.max_start_epoch
        ):
            raise ValueError("max_start_epoch_final must be >= max_start_epoch")
        if self.hypergrad not in HYPERGRADS:
            raise ValueError(f"hypergrad must be one of {HYPERGRADS}, got {self.hypergrad!r}")
        if self.hypergrad == "truncated":
            if self.truncate is None:
                raise ValueError("hypergrad='truncated' needs truncate=K")
            matching.num_prefix_steps(self.syn_steps, self.truncate)
        for name, choices in (
            ("lr_update", LR_UPDATES),
            ("img_optimizer", IMG_OPTIMIZERS),
            ("lr_space", LR_SPACES),
            ("lr_init", LR_INITS),
            ("init", SYN_INITS),
            ("second_order", matching.SECOND_ORDER),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        rates = ("lr_img", "lr_img_rel", "lr_lr", "lr_log_lr", "lr_label")
        knobs = ("rho", "sigma", "asam_eta", "gsam_alpha")
        sharpness_lib.check_nonnegative(**{name: getattr(self, name) for name in rates + knobs})
        if self.lr_init_samples < 1:
            raise ValueError(f"lr_init_samples must be >= 1, got {self.lr_init_samples}")
        if self.sharpness not in sharpness_lib.SHARPNESS:
            raise ValueError(
                f"sharpness must be one of {sharpness_lib.SHARPNESS}, got {self.sharpness!r}"
            )
        try:
            sharpness_lib.check_ball(self.rho_ball, self.rho_scale, self.sharpness)
        except ValueError as e:
            raise ValueError(f"rho_ball/rho_scale: {e}") from None
        if self.init != "real" and self.soft_labels:
            raise ValueError(
                f"init={self.init!r} needs hard labels: the soft-label start (DATM) chooses "
                "its own images"
            )
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ValueError(f"batch_syn must be >= 1 or None, got {self.batch_syn}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr_teacher <= 0:
            raise ValueError(f"lr_teacher must be positive, got {self.lr_teacher}")
        if self.steps_per_call < 1:
            raise ValueError("steps_per_call must be >= 1")
        return self

    @property
    def truncation(self) -> int | None:
        """``K`` if truncated, else ``None`` (exact)."""
        return self.truncate if self.hypergrad == "truncated" else None

    @property
    def max_epoch_needed(self) -> int:
        """The last expert epoch any iteration can read: ``T+_final - 1 + M``."""
        top = self.max_start_epoch_final or self.max_start_epoch
        return top - 1 + self.expert_epochs


class DistillState(NamedTuple):
    """Everything the outer loop carries.

    Attributes:
      images: the synthetic set ``(C * IPC, H, W, channels)``, preprocessed space.
      labels: int32 class ids ``(C * IPC,)`` or float label logits ``(C * IPC, C)``.
      syn_lr: the learned inner step size ``alpha``.
      img_opt_state: state of the images' (sharpness-aware) Optax transform.
      lr_opt_state: state of the step size's optimizer.
      label_opt_state: state of the label optimizer (empty for hard labels).
      ema: EMA of the images (``None`` when disabled).
      key: PRNG key.
      iteration: outer iterations done.
      num_nonfinite: iterations skipped for non-finite values, in total.
      consecutive_nonfinite: the current run of skipped iterations.
    """

    images: Array
    labels: Array
    syn_lr: Array
    img_opt_state: Any
    lr_opt_state: Any
    label_opt_state: Any
    ema: Array | None
    key: Array
    iteration: Array
    num_nonfinite: Array
    consecutive_nonfinite: Array


def make_image_transform(cfg: DistillConfig) -> optax.GradientTransformationExtraArgs:
    """The images' base optimiser (SGD(lr_img, momentum), or Adam relative to the initial set's
    scale), wrapped in the configured sharpness transform."""
    if cfg.img_optimizer == "adam":
        base = scale_free.relative_adam(cfg.lr_img_rel)
    else:
        base = optax.sgd(cfg.lr_img, momentum=cfg.img_momentum or None)
    return sharpness_lib.make_sharpness(
        cfg.sharpness,
        base,
        rho=cfg.rho,
        eta=cfg.asam_eta,
        gsam_alpha=cfg.gsam_alpha,
        sigma=cfg.sigma,
        seed=cfg.seed + 1,
        ball=cfg.rho_ball,
        radius=cfg.rho_scale,
    )


def make_lr_transform(cfg: DistillConfig) -> optax.GradientTransformation:
    """The step size's optimiser: SGD on ``alpha`` (linear) or Adam on ``log alpha`` (log)."""
    if cfg.lr_space == "log":
        return optax.chain(scale_free.scale_by_adam(eps=1e-12), optax.scale(-cfg.lr_log_lr))
    return optax.sgd(cfg.lr_lr, momentum=cfg.lr_momentum or None)


def update_step_size(
    cfg: DistillConfig, lr_tx: optax.GradientTransformation, g_lr: Array, syn_lr: Array, opt_state
) -> tuple[Array, Any]:
    """One step of the step size from its gradient ``dL/dalpha``, kept at or above the floor.

    In log space the optimiser sees ``dL/dlog(alpha) = alpha dL/dalpha`` and ``alpha`` moves
    by a factor ``exp(update)``.
    """
    floor = jnp.asarray(cfg.lr_floor * cfg.lr_teacher, jnp.float32)
    if cfg.lr_space == "log":
        log_lr = jnp.log(syn_lr)
        upd, opt_state = lr_tx.update(g_lr * syn_lr, opt_state, log_lr)
        new = jnp.exp(optax.apply_updates(log_lr, upd))
    else:
        upd, opt_state = lr_tx.update(g_lr, opt_state, syn_lr)
        new = optax.apply_updates(syn_lr, upd)
    return jnp.maximum(new, floor), opt_state


def make_label_transform(cfg: DistillConfig) -> optax.GradientTransformation:
    return optax.sgd(cfg.lr_label, momentum=0.5)


def init_state(
    cfg: DistillConfig,
    images: Array,
    labels: Array,
    *,
    label_logits: Array | None = None,
) -> DistillState:
    """The initial state: images (preprocessed real images), class-sorted labels, ``alpha``.

    With ``cfg.soft_labels`` the labels are learnable logits, initialised from
    ``label_logits`` (e.g. an expert's logits, DATM) or, if ``None``, from one-hot rows.
    """
    images = jnp.array(images, jnp.float32, copy=True)  # own buffers: the loop donates them
    labels = jnp.array(labels, copy=True)
    if cfg.soft_labels:
        if label_logits is None:
            num_classes = int(labels.max()) + 1
            label_logits = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
        lab = jnp.asarray(label_logits, jnp.float32)
    else:
        lab = labels.astype(jnp.int32)
    syn_lr = jnp.asarray(cfg.lr_teacher, jnp.float32)
    label_opt_state = make_label_transform(cfg).init(lab) if cfg.soft_labels else optax.EmptyState()
    return DistillState(
        images=images,
        labels=lab,
        syn_lr=syn_lr,
        img_opt_state=make_image_transform(cfg).init(images),
        lr_opt_state=make_lr_transform(cfg).init(syn_lr),
        label_opt_state=label_opt_state,
        ema=jnp.array(images, copy=True) if cfg.ema_decay is not None else None,
        key=jax.random.PRNGKey(cfg.seed),
        iteration=jnp.zeros((), jnp.int32),
        num_nonfinite=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
    )


def label_targets(labels: Array, soft: bool) -> Array:
    """What the inner cross-entropy uses: class ids, or ``softmax(label_logits)``."""
    return jax.nn.softmax(labels, axis=-1) if soft else labels


def current_max_start(cfg: DistillConfig, iteration: Array) -> Array:
    """``T+`` at ``iteration``: constant, or growing linearly to ``max_start_epoch_final``."""
    if cfg.max_start_epoch_final is None:
        return jnp.asarray(cfg.max_start_epoch, jnp.int32)
    until = cfg.grow_until if cfg.grow_until is not None else max(1, cfg.iterations // 2)
    frac = jnp.clip(iteration.astype(jnp.float32) / max(until, 1), 0.0, 1.0)
    span = cfg.max_start_epoch_final - cfg.max_start_epoch
    return (cfg.max_start_epoch + jnp.floor(frac * span)).astype(jnp.int32)


def _all_finite(*trees: Any) -> Array:
    leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class IterationSample(NamedTuple):
    """The random draws of one outer iteration."""

    key: Array
    start: Params
    target: Params
    expert: Array
    start_epoch: Array
    batches: matching.StudentBatches


def sample_iteration(
    state: DistillState, bank: expert_store.ExpertBank, cfg: DistillConfig
) -> IterationSample:
    """Draws the expert, start epoch, minibatches and augmentation keys; advances the key."""
    key, k_exp, k_batch = jax.random.split(state.key, 3)
    max_start = current_max_start(cfg, state.iteration)
    start, target, e, t, batches = draw_trajectory(
        bank, k_exp, k_batch, cfg, state.images.shape[0], max_start
    )
    return IterationSample(key, start, target, e, t, batches)


def draw_trajectory(
    bank: expert_store.ExpertBank,
    k_exp: Array,
    k_batch: Array,
    cfg: DistillConfig,
    num_syn: int,
    max_start: Array | int,
) -> tuple[Params, Params, Array, Array, matching.StudentBatches]:
    """One draw of what an outer iteration matches: ``(start, target, expert, start_epoch,
    batches)``, the expert and start epoch from ``k_exp``, the minibatches and augmentation
    keys from ``k_batch``."""
    start, target, e, t = experts_lib.sample_start_target(
        bank, k_exp, cfg.min_start_epoch, max_start, cfg.expert_epochs
    )
    batches = matching.sample_student_batches(k_batch, num_syn, cfg.batch_syn, cfg.syn_steps)
    return start, target, e, t, batches


def calibrate_step_size(
    state: DistillState,
    bank: expert_store.ExpertBank,
    apply_fn: matching.ApplyFn,
    augment_fn: matching.AugmentFn,
    cfg: DistillConfig,
    *,
    refinements: int = 2,
) -> tuple[DistillState, list[float]]:
    """``state`` with ``syn_lr`` set to the closed-form best constant step (``satm_jax.step_size``)
    over ``cfg.lr_init_samples`` trajectories drawn as the outer loop draws them.

    The draws use their own key (``cfg.seed``), so the outer loop's random stream is unchanged.
    Returns the new state and the fixed-point history (``lr_teacher`` first).
    """
    num_syn = state.images.shape[0]
    max_start = current_max_start(cfg, jnp.zeros((), jnp.int32))

    def sample_fn(key):
        k_exp, k_batch = jax.random.split(key)
        start, target, _, _, batches = draw_trajectory(
            bank, k_exp, k_batch, cfg, num_syn, max_start
        )
        return start, target, batches

    moments_fn = step_size.make_moments_fn(apply_fn, augment_fn, sample_fn)
    keys = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 7919), cfg.lr_init_samples
    )
    alpha, history = step_size.calibrate(
        moments_fn,
        keys,
        state.images,
        label_targets(state.labels, cfg.soft_labels),
        float(state.syn_lr),
        refinements=refinements,
        floor=cfg.lr_floor * cfg.lr_teacher,
    )
    return state._replace(syn_lr=jnp.asarray(alpha, jnp.float32)), history


def make_outer_step(
    apply_fn: matching.ApplyFn,
    augment_fn: matching.AugmentFn,
    cfg: DistillConfig,
    mesh: Any | None = None,
) -> Callable[[DistillState, expert_store.ExpertBank], tuple[DistillState, dict[str, Array]]]:
    """Builds ``outer_step(state, bank) -> (state, metrics)`` (pure; jit it).

    Metrics: ``loss`` (matching loss at the unperturbed images), ``syn_lr``, ``grad_norm``
    (``||h||``), ``img_norm`` (``||X||``), ``update_norm`` (``||X_new - X||``),
    ``img_update_rel`` (``||X_new - X|| / ||X||``), ``start_epoch``, ``expert``, ``finite`` (1
    if the iteration was applied). With a sharpness-aware transform also ``eps_norm``
    (``||eps||``, the ascent step), ``perturbed_loss`` (``L(X + eps)`` along the second pass)
    and ``sharpness`` (``L(X + eps) - L(X)``: with trajectory reusing both passes share the
    prefix, so this is the sharpness at one trajectory, free of cost; without it the second
    pass re-runs the prefix at ``X + eps``).

    ``mesh``: a ``jax.sharding.Mesh`` (``satm_jax.parallel.make_mesh``) to split every inner
    step's synthetic minibatch across devices (data parallel; the parameter gradient's batch
    mean becomes an all-reduce). ``None`` runs on one device.
    """
    cfg.validate()
    if mesh is not None:
        from satm_jax import parallel

        base_augment = augment_fn

        def augment_fn(key, x):
            return parallel.constrain_batch(base_augment(key, x), mesh)

    img_tx = make_image_transform(cfg)
    lr_tx = make_lr_transform(cfg)
    label_tx = make_label_transform(cfg)
    soft = cfg.soft_labels
    passes = make_passes(apply_fn, augment_fn, cfg)

    def outer_step(state: DistillState, bank: expert_store.ExpertBank):
        sample = sample_iteration(state, bank, cfg)
        first_pass_loss, perturbed_loss = passes(state, sample)
        argnums = (0, 1, 2) if soft else (0, 1)
        (loss, aux), grads = jax.value_and_grad(first_pass_loss, argnums=argnums, has_aux=True)(
            state.images, state.syn_lr, state.labels
        )
        g_img, g_lr = grads[0], grads[1]
        if cfg.lr_update in ("first_order", "first_order_window"):
            g_lr = matching.first_order_lr_grad(
                aux.final_params, aux.grad_sum, sample.start, sample.target
            )
        elif cfg.lr_update == "fixed":
            g_lr = jnp.zeros_like(state.syn_lr)

        # The images' update; a sharpness-aware transform calls grad_fn at perturbed images.
        # The last call's point and value are kept (same trace) for the metrics.
        probe: dict[str, Array] = {}

        def grad_fn(images, i):
            value, g = jax.value_and_grad(perturbed_loss)(images)
            probe.update(images=images, loss=value)
            return g

        img_updates, img_opt_state = img_tx.update(
            g_img, state.img_opt_state, state.images, grad_fn=grad_fn
        )
        new_images = optax.apply_updates(state.images, img_updates)

        new_lr, lr_opt_state = update_step_size(cfg, lr_tx, g_lr, state.syn_lr, state.lr_opt_state)

        if soft:
            lab_updates, label_opt_state = label_tx.update(grads[2], state.label_opt_state)
            new_labels = optax.apply_updates(state.labels, lab_updates)
        else:
            new_labels, label_opt_state = state.labels, state.label_opt_state

        new_ema = state.ema
        if state.ema is not None:
            new_ema = cfg.ema_decay * state.ema + (1.0 - cfg.ema_decay) * new_images

        finite = _all_finite(loss, g_img, g_lr, new_images, new_lr, new_labels)
        applied = state._replace(
            images=new_images,
            labels=new_labels,
            syn_lr=new_lr,
            img_opt_state=img_opt_state,
            lr_opt_state=lr_opt_state,
            label_opt_state=label_opt_state,
            ema=new_ema,
        )
        # Guard: a non-finite iteration leaves everything but the key and counters unchanged.
        kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), applied, state)
        nf = (~finite).astype(jnp.int32)
        new_state = kept._replace(
            key=sample.key,
            iteration=state.iteration + 1,
            num_nonfinite=state.num_nonfinite + nf,
            consecutive_nonfinite=(state.consecutive_nonfinite + nf) * nf,
        )
        img_norm = jnp.sqrt(jnp.sum(jnp.square(state.images)))
        update_norm = jnp.sqrt(jnp.sum(jnp.square(new_state.images - state.images)))
        metrics = {
            "loss": loss,
            "syn_lr": new_state.syn_lr,
            "grad_norm": jnp.sqrt(jnp.sum(jnp.square(g_img))),
            "img_norm": img_norm,
            "update_norm": update_norm,
            "img_update_rel": update_norm / img_norm,
            "start_epoch": sample.start_epoch,
            "expert": sample.expert,
            "finite": finite.astype(jnp.int32),
        }
        if probe:
            metrics["eps_norm"] = jnp.sqrt(jnp.sum(jnp.square(probe["images"] - state.images)))
            metrics["perturbed_loss"] = probe["loss"]
            metrics["sharpness"] = probe["loss"] - loss
        return new_state, metrics

    return outer_step


def make_passes(
    apply_fn: matching.ApplyFn, augment_fn: matching.AugmentFn, cfg: DistillConfig
) -> Callable[[DistillState, IterationSample], tuple[Callable[..., Any], Callable[..., Any]]]:
    """Returns ``passes(state, sample) -> (first_pass_loss, perturbed_loss)``.

    ``first_pass_loss(images, syn_lr, labels) -> (loss, SuffixAux)`` differentiates the last
    ``K`` steps from the untracked prefix ``theta_{N-K}`` (computed here, once, at the current
    images). ``perturbed_loss(images)`` is the sharpness-aware second pass: with trajectory
    reusing it restarts from that same ``theta_{N-K}`` and re-runs only the last ``K`` steps
    with the same minibatches and keys; without, it re-runs all ``N`` steps from the expert
    checkpoint ``theta_0`` (still differentiating only the last ``K``).
    """
    n_pre = matching.num_prefix_steps(cfg.syn_steps, cfg.truncation)
    soft = cfg.soft_labels
    kw = dict(augment_fn=augment_fn, remat=cfg.remat, second_order=cfg.second_order)
    window = cfg.lr_update == "first_order_window"

    def passes(state: DistillState, sample: IterationSample):
        targets0 = label_targets(state.labels, soft)
        prefix = matching.run_prefix(
            apply_fn,
            sample.start,
            state.images,
            targets0,
            state.syn_lr,
            sample.batches,
            n_pre,
            augment_fn=augment_fn,
        )

        def first_pass_loss(images, syn_lr, labels):
            return matching.suffix_loss(
                apply_fn,
                images,
                label_targets(labels, soft),
                syn_lr,
                prefix,
                sample.start,
                sample.target,
                sample.batches,
                n_pre,
                window_grad_sum=window,
                **kw,
            )

        if cfg.reuse_trajectory:

            def perturbed_loss(images):
                return first_pass_loss(images, state.syn_lr, state.labels)[0]
        else:

            def perturbed_loss(images):
                return matching.matching_loss(
                    apply_fn,
                    images,
                    targets0,
                    state.syn_lr,
                    sample.start,
                    sample.target,
                    sample.batches,
                    truncate=cfg.truncation,
                    **kw,
                )

        return first_pass_loss, perturbed_loss

    return passes


def make_multi_step(
    outer_step: Callable[..., Any], length: int
) -> Callable[[DistillState, expert_store.ExpertBank], tuple[DistillState, dict[str, Array]]]:
    """``length`` outer iterations in one jit call (``lax.scan``), the state donated."""

    def multi(state, bank):
        return jax.lax.scan(lambda s, _: outer_step(s, bank), state, None, length=length)

    return jax.jit(multi, donate_argnums=0)


def _boundaries(start: int, stop: int, every: list[int]) -> list[int]:
    """Sorted iteration numbers in ``(start, stop]`` that are multiples of any of ``every``,
    plus ``stop``."""
    pts = {stop}
    for k in every:
        if k and k > 0:
            pts.update(range((start // k + 1) * k, stop + 1, k))
    return sorted(p for p in pts if start < p <= stop)


def run_distillation(
    state: DistillState,
    bank: expert_store.ExpertBank,
    cfg: DistillConfig,
    outer_step: Callable[..., Any],
    *,
    eval_every: int = 0,
    eval_fn: Callable[[DistillState], dict[str, Any]] | None = None,
    checkpoint_every: int = 0,
    checkpoint_fn: Callable[[DistillState], None] | None = None,
    metrics_fn: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    desc: str = "distill",
    log: Callable[[str], None] = print,
) -> DistillState:
    """Runs outer iterations from ``state.iteration`` up to ``cfg.iterations``.

    Iterations run ``cfg.steps_per_call`` at a time; chunk boundaries fall on absolute multiples
    of ``steps_per_call``, ``eval_every`` and ``checkpoint_every``, so a resumed run executes the
    same chunks as an uninterrupted one. ``eval_fn(state)`` runs at multiples of
    ``eval_every`` (and at the end); ``checkpoint_fn(state)`` at multiples of
    ``checkpoint_every``; ``metrics_fn(iteration, metrics)`` once per iteration, the metrics
    with ``wall_s``: the iteration's share of its chunk's wall time (compilation included), so
    that the kept lines of a resumed run sum to its distillation time.

    Raises:
      DistillError: ``cfg.max_consecutive_nonfinite`` non-finite iterations in a row.
    """
    begin = int(state.iteration)
    total = cfg.iterations
    points = _boundaries(begin, total, [cfg.steps_per_call, eval_every, checkpoint_every])
    compiled: dict[int, Callable[..., Any]] = {}
    bar = tqdm(total=total, initial=begin, desc=desc, disable=not progress, dynamic_ncols=True)
    it = begin
    t0 = time.time()
    for stop in points:
        length = stop - it
        if length not in compiled:
            compiled[length] = make_multi_step(outer_step, length)
        t_chunk = time.time()
        state, metrics = compiled[length](state, bank)
        host = jax.tree.map(np.asarray, metrics)
        per_iteration = (time.time() - t_chunk) / length
        for j in range(length):
            m = {k: float(v[j]) for k, v in host.items()}
            m["wall_s"] = per_iteration
            if metrics_fn is not None:
                metrics_fn(it + j + 1, m)
        skipped = int(length - host["finite"].sum())
        if skipped:
            log(
                f"iteration {stop}: {skipped} of the last {length} iterations had non-finite "
                f"values and were skipped ({int(state.num_nonfinite)} in total)"
            )
        if int(state.consecutive_nonfinite) >= cfg.max_consecutive_nonfinite:
            bar.close()
            raise DistillError(
                f"{int(state.consecutive_nonfinite)} consecutive iterations produced non-finite "
                f"losses or gradients (up to iteration {stop}); the state of iteration "
                f"{stop - int(state.consecutive_nonfinite)} is kept. Lower lr_img/lr_lr or "
                "check the experts."
            )
        it = stop
        bar.update(length)
        bar.set_postfix(loss=f"{host['loss'][-1]:.4f}", lr=f"{host['syn_lr'][-1]:.2e}")
        if checkpoint_fn is not None and checkpoint_every and it % checkpoint_every == 0:
            checkpoint_fn(state)
        if eval_fn is not None and ((eval_every and it % eval_every == 0) or it == total):
            eval_fn(state)
    bar.close()
    if total > begin:
        dt = time.time() - t0
        log(
            f"{desc}: {total - begin} iterations in {dt:.1f}s ({1000 * dt / (total - begin):.1f} ms/it incl. compile)"
        )
    return state

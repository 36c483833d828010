"""Flatness of a finished synthetic set: how the matching loss behaves around it.

SATM's claim is that a set found by minimising the sharpness of the outer loss generalises
better. These measures look at a finished set ``X`` alone, however it was made:

* ``worst_case_increase``: ``max_{||delta|| <= r} L(X + delta) - L(X)``, by a few steps of
  projected (normalised) gradient ascent from ``delta = 0``; the ball is ``r = radius``
  (absolute) or ``r = radius * ||X||`` (relative, the default), around the whole set or per
  image, as in ``satm_jax.sharpness.sam_perturbation``;
* ``top_hessian_eigenvalue``: the largest eigenvalue of ``d^2 L / dX^2`` by power iteration on
  Hessian-vector products (forward-over-reverse: ``jax.jvp`` of ``jax.grad``), shifted where
  the eigenvalue of largest magnitude is negative (``hessian_eigenvalues``);
* ``hessian_top_eig_scaled``: the same for ``S H S`` with every image's norm on ``S``
  (``per_example_scale``): the matching loss of an instance-normalised network does not change
  when an image is rescaled, but the plain eigenvalues shrink as ``1 / c^2``, so a set that
  merely grew looks flatter by them (ours, after ASAM's argument for scale-invariant weights);
* the generalisation gap of the outer problem: ``L`` on trajectories of **held-out experts**
  (never sampled during distillation) minus ``L`` on the sampled experts, on the same
  minibatches and augmentation draws.

``L`` here is deterministic: the mean matching loss over ``samples`` trajectories (expert,
start epoch, minibatches and augmentation keys) drawn once from a key, with the set's learned
step size held fixed and the exact (untruncated) unroll. That choice of a fixed draw, and the
relative default radius, are this project's.

Example:
  >>> import jax.numpy as jnp
  >>> from satm_jax import flatness
  >>> a = jnp.diag(jnp.array([4.0, 1.0, 0.5]))
  >>> f = lambda x: 0.5 * x @ a @ x
  >>> x0 = jnp.zeros(3)
  >>> round(float(flatness.top_hessian_eigenvalue(f, x0, iterations=30)), 3)
  4.0
  >>> round(float(flatness.worst_case_increase(f, x0, 0.1, steps=20, radius_scale="absolute")), 4)
  0.02

Reference for the power-iteration measure: Yao et al., "PyHessian: Neural Networks Through the
Lens of the Hessian", 2020; for m-sharpness: Foret et al., ICLR 2021.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from satm_jax import distill as distill_lib
from satm_jax import expert_store, matching
from satm_jax import sharpness as sharpness_lib

Array = jax.Array
LossFn = Callable[[Array], Array]


#: Bumped whenever ``measure`` gains or changes a measure (2: the largest eigenvalue where a
#: negative one dominates, and the scale-invariant ``hessian_top_eig_scaled``; 2026-12-06).
MEASURES_VERSION = 2


@dataclasses.dataclass(frozen=True)
class FlatnessConfig:
    """What ``measure`` computes.

    Attributes:
      heldout_experts: experts trained with another seed for the held-out measures.
      samples: trajectories ``L`` averages over (the same draw for every measure).
      radius: the ascent ball's radius (see ``radius_scale``).
      radius_scale: ``"relative"`` (``radius * ||X||``) or ``"absolute"``.
      ball: ``"global"`` or ``"per_example"`` (one ball per image).
      ascent_steps: projected ascent steps of ``worst_case_increase``.
      power_iterations: Hessian-vector products of ``top_hessian_eigenvalue``.
      seed: key of the trajectory draw and of the power iteration's start.
    """

    heldout_experts: int = 2
    samples: int = 4
    radius: float = 0.01
    radius_scale: str = "relative"
    ball: str = "global"
    ascent_steps: int = 5
    power_iterations: int = 10
    seed: int = 0

    def validate(self) -> FlatnessConfig:
        """Raises ``ValueError`` for settings that cannot be measured."""
        if self.heldout_experts < 1 or self.samples < 1:
            raise ValueError("flatness needs heldout_experts >= 1 and samples >= 1")
        if not self.radius > 0 or self.ascent_steps < 1 or self.power_iterations < 1:
            raise ValueError("flatness needs radius > 0, ascent_steps >= 1, power_iterations >= 1")
        try:
            sharpness_lib.check_ball(self.ball, self.radius_scale)
        except ValueError as e:
            raise ValueError(f"flatness ball/radius_scale: {e}") from None
        return self

    def identity(self) -> dict[str, Any]:
        """What a cached measurement must agree on (the measures' version included: a set
        measured before a measure was added is measured again)."""
        return {**dataclasses.asdict(self), "measures": MEASURES_VERSION}


# --------------------------------------------------------------------------------------------
# Generic measures of a loss around a point
# --------------------------------------------------------------------------------------------


def _ball_radius(x: Array, radius: float, radius_scale: str, ball: str) -> Array:
    """The radius per example (``ball="per_example"``, shape ``(n, 1, ...)``) or overall."""
    if radius_scale == "absolute":
        return jnp.asarray(radius, x.dtype)
    if ball == "global":
        return radius * jnp.linalg.norm(x)
    return radius * sharpness_lib.example_norms(x)


def _project(delta: Array, r: Array, ball: str) -> Array:
    """``delta`` shrunk into the ball of radius ``r``."""
    if ball == "global":
        n = jnp.linalg.norm(delta)
    else:
        n = sharpness_lib.example_norms(delta)
    return delta * jnp.minimum(1.0, r / (n + sharpness_lib.NORM_EPS))


def worst_case_increase(
    loss_fn: LossFn,
    x: Array,
    radius: float,
    *,
    steps: int = 5,
    radius_scale: str = "relative",
    ball: str = "global",
    key: Array | None = None,
) -> Array:
    """``max L(x + delta) - L(x)`` over the ball, by projected normalised gradient ascent.

    ``delta`` starts at a random point a tenth of the radius from ``x`` (so that a stationary
    ``x`` still has an ascent direction); each step moves it by the ball's radius along the
    (per-example) normalised gradient at ``x + delta`` and projects it back onto the ball. The
    largest increase seen is returned: a lower bound of the true maximum.

    Args:
      loss_fn: ``L(x) -> scalar``.
      x: the point (e.g. the synthetic set).
      radius: the ball's radius, absolute or relative to ``||x||`` (``radius_scale``).
      steps: ascent steps.
      radius_scale: ``"relative"`` or ``"absolute"``.
      ball: ``"global"`` or ``"per_example"``.
      key: the random start's key (default ``PRNGKey(0)``).
    """
    r = _ball_radius(x, radius, radius_scale, ball)
    key = jax.random.PRNGKey(0) if key is None else key
    noise = jax.random.normal(key, x.shape, x.dtype)
    delta0 = 0.1 * r * sharpness_lib.sam_perturbation(noise, 1.0, ball=ball)
    base = loss_fn(x)
    value_and_grad = jax.value_and_grad(loss_fn)

    # Step j evaluates the loss and gradient at the j-th point; the loss there counts from the
    # first ascent step on, so ``steps + 1`` gradients (one traced) see ``steps`` ascended
    # points (the last step's move is discarded).
    def body(carry, j):
        delta, best = carry
        value, g = value_and_grad(x + delta)
        best = jnp.where(j > 0, jnp.maximum(best, value - base), best)
        step = sharpness_lib.sam_perturbation(g, 1.0, ball=ball)  # unit (per-example) direction
        delta = _project(delta + r * step, r, ball)
        return (delta, best), None

    init = (delta0.astype(x.dtype), jnp.asarray(-jnp.inf, base.dtype))
    (_, best), _ = jax.lax.scan(body, init, jnp.arange(steps + 1))
    return best


def hvp(loss_fn: LossFn, x: Array, v: Array) -> Array:
    """The Hessian-vector product ``(d^2 L / dx^2) v``, forward-over-reverse."""
    return jax.jvp(jax.grad(loss_fn), (x,), (v,))[1]


def _power_iteration(
    op: Callable[[Array], Array], v: Array, iterations: int
) -> tuple[Array, Array]:
    """``(v, v^T op(v))`` for the unit vector ``v`` after ``iterations`` steps of
    ``v <- op(v) / ||op(v)||``: ``iterations + 1`` applications of ``op``, traced once (the
    last one gives the Rayleigh quotient; its normalised vector is discarded)."""

    def body(carry, _):
        v = carry[0]
        w = op(v)
        return (w / (jnp.linalg.norm(w) + sharpness_lib.NORM_EPS), v, jnp.vdot(v, w)), None

    v = v / jnp.linalg.norm(v)
    init = (v, v, jnp.zeros((), v.dtype))
    (_, v, rq), _ = jax.lax.scan(body, init, None, length=iterations + 1)
    return v, rq


def _hessian_operator(loss_fn: LossFn, x: Array, scale: Array | None) -> Callable[[Array], Array]:
    """``v -> S H S v`` with ``H = d^2 L / dx^2`` and ``S = diag(scale)`` (``H`` without)."""
    if scale is None:
        return lambda v: hvp(loss_fn, x, v)
    return lambda v: scale * hvp(loss_fn, x, scale * v)


def per_example_scale(x: Array) -> Array:
    """Every image's norm, broadcast over its pixels: the ``scale`` that makes
    ``hessian_eigenvalues`` invariant to rescaling each image.

    With instance (or layer) normalisation after the first convolution the network, and so
    the matching loss, is invariant to a positive rescaling of each image (the convolution's
    bias is removed by the normalisation's mean), so ``H(c X) = C^-1 H(X) C^-1`` and the plain
    eigenvalues shrink as ``1 / c^2`` when a set grows, without the loss changing at all. In
    the coordinates ``X_i = ||X_i|| u_i`` the Hessian is ``S H S``, whose eigenvalues do not
    move under such a rescaling (as ASAM's normalisation for scale-invariant weights).
    """
    norms = jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))
    return jnp.broadcast_to(norms.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)


def dominant_hessian_eigenvalue(
    loss_fn: LossFn,
    x: Array,
    *,
    iterations: int = 10,
    key: Array | None = None,
    scale: Array | None = None,
) -> Array:
    """The eigenvalue of largest magnitude of ``d^2 L / dx^2`` (of ``S H S`` with ``scale``)
    by power iteration.

    Returns the Rayleigh quotient ``v^T H v`` of the last unit vector ``v``, which converges to
    the dominant eigenvalue (sign included) at the rate of the ratio of the two largest
    magnitudes.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    op = _hessian_operator(loss_fn, x, scale)
    return _power_iteration(op, jax.random.normal(key, x.shape, x.dtype), iterations)[1]


def hessian_eigenvalues(
    loss_fn: LossFn,
    x: Array,
    *,
    iterations: int = 10,
    key: Array | None = None,
    scale: Array | None = None,
) -> tuple[Array, Array]:
    """``(largest, dominant)`` eigenvalues of ``d^2 L / dx^2``: the algebraically largest
    (the sharpness of the loss: its steepest upward curvature) and the one of largest
    magnitude. With ``scale`` (e.g. ``per_example_scale(x)``), those of ``S H S``.

    Power iteration finds the dominant one. Where that is negative (a direction of negative
    curvature outweighs every positive one), a second power iteration on the shifted operator
    ``H - dominant * I``, whose eigenvalues ``lambda_i - dominant`` are all >= 0 with the
    largest at ``lambda_max``, finds the largest (only then: ``iterations + 1``
    Hessian-vector products more). Both run in one ``jax.lax.while_loop`` whose body applies
    the Hessian once, so a Hessian-vector product is compiled once, not four times.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    op = _hessian_operator(loss_fn, x, scale)
    unit = lambda v: v / (jnp.linalg.norm(v) + sharpness_lib.NORM_EPS)  # noqa: E731
    first = unit(jax.random.normal(key, x.shape, x.dtype))
    second = unit(jax.random.normal(jax.random.fold_in(key, 1), x.shape, x.dtype))
    last = iterations  # the step whose Rayleigh quotient is the dominant eigenvalue

    # Both power iterations in one loop, so that ``op`` (a Hessian-vector product: the costly
    # part to compile) is traced once: steps 0..last on ``H``, then (only where the dominant
    # eigenvalue is negative) steps last+1..2*last+1 on ``H - dominant * I`` from ``second``.
    def cond(state):
        k, _, dominant, _ = state
        return (k <= last) | ((dominant < 0) & (k <= 2 * last + 1))

    def body(state):
        k, v, dominant, largest = state
        w = op(v)
        rq = jnp.vdot(v, w)
        dominant = jnp.where(k == last, rq, dominant)
        largest = jnp.where(k == 2 * last + 1, rq, largest)
        shift = jnp.where(k <= last, jnp.zeros_like(dominant), dominant)
        v = jnp.where(k == last, second, unit(w - shift * v))
        return k + 1, v, dominant, largest

    zero = jnp.zeros((), x.dtype)
    init = (jnp.asarray(0, jnp.int32), first, zero, zero)
    _, _, dominant, largest = jax.lax.while_loop(cond, body, init)
    return jnp.where(dominant < 0, largest, dominant), dominant


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    x: Array,
    *,
    iterations: int = 10,
    key: Array | None = None,
    scale: Array | None = None,
) -> Array:
    """The largest (algebraic) eigenvalue of ``d^2 L / dx^2`` (``hessian_eigenvalues``)."""
    return hessian_eigenvalues(loss_fn, x, iterations=iterations, key=key, scale=scale)[0]


# --------------------------------------------------------------------------------------------
# The matching loss on a fixed draw of trajectories
# --------------------------------------------------------------------------------------------


def draw_trajectories(
    bank: expert_store.ExpertBank,
    key: Array,
    samples: int,
    num_syn: int,
    cfg: distill_lib.DistillConfig,
) -> dict[str, Any]:
    """``samples`` trajectories drawn as the outer loop draws them
    (``satm_jax.distill.draw_trajectory`` with ``cfg``'s matching window at its last
    iteration), stacked on a leading axis.

    The expert/start draw and the minibatch/augmentation draw use separate keys, so two banks
    drawn with the same key share the minibatches and augmentations (a paired comparison).
    """
    keys = jax.random.split(key, samples)
    max_start = distill_lib.current_max_start(cfg, jnp.asarray(cfg.iterations, jnp.int32))

    def one(k):
        k_exp, k_batch = jax.random.split(k)
        start, target, _, _, batches = distill_lib.draw_trajectory(
            bank, k_exp, k_batch, cfg, num_syn, max_start
        )
        return {"start": start, "target": target, "batches": batches}

    return jax.vmap(one)(keys)


def fixed_matching_loss(
    apply_fn: matching.ApplyFn,
    labels: Array,
    syn_lr: Array,
    trajectories: dict[str, Any],
    *,
    augment_fn: matching.AugmentFn,
    remat: bool = True,
) -> LossFn:
    """``L(X)``: the mean exact matching loss over the stacked ``trajectories``."""

    def loss_fn(images):
        def one(t):
            return matching.matching_loss(
                apply_fn,
                images,
                labels,
                syn_lr,
                t["start"],
                t["target"],
                t["batches"],
                augment_fn=augment_fn,
                remat=remat,
            )

        return jnp.mean(jax.lax.map(one, trajectories))

    return loss_fn


def measure(
    cfg: FlatnessConfig,
    images: Array,
    loss_sampled: LossFn,
    loss_heldout: LossFn,
) -> dict[str, float]:
    """Every measure of one set: the losses on sampled and held-out trajectories, their gap,
    and the worst-case increase and top Hessian eigenvalue of the held-out loss.

    Returns:
      ``{"loss_sampled", "loss_heldout", "generalisation_gap", "worst_case_increase",
      "worst_case_increase_rel", "hessian_top_eig", "hessian_dominant_eig",
      "hessian_top_eig_scaled", "radius"}`` as floats (the ``_rel`` entry is the increase over
      the held-out loss; ``hessian_top_eig`` the largest eigenvalue, ``hessian_dominant_eig``
      the one of largest magnitude, equal where that is positive; ``hessian_top_eig_scaled``
      the largest eigenvalue of ``S H S`` with every image's norm on ``S``
      (``per_example_scale``), which does not change when images are rescaled; ``radius`` is
      the ball's radius in the set's units, the overall one for a per-image ball).
    """
    cfg.validate()
    images = jnp.asarray(images)
    ls = float(jax.jit(loss_sampled)(images))
    lh = float(jax.jit(loss_heldout)(images))
    wc = float(
        jax.jit(
            lambda x: worst_case_increase(
                loss_heldout,
                x,
                cfg.radius,
                steps=cfg.ascent_steps,
                radius_scale=cfg.radius_scale,
                ball=cfg.ball,
                key=jax.random.PRNGKey(cfg.seed + 2),
            )
        )(images)
    )

    def eigenvalues(x, scale):
        return hessian_eigenvalues(
            loss_heldout,
            x,
            iterations=cfg.power_iterations,
            key=jax.random.PRNGKey(cfg.seed + 1),
            scale=scale,
        )

    # The plain and the scaled operator batched over the scale (``S = 1`` is ``H`` exactly):
    # one traced Hessian-vector product for both, vectorised over its tangents.
    def both(x):
        scales = jnp.stack([jnp.ones_like(x), per_example_scale(x)])
        return jax.vmap(lambda s: eigenvalues(x, s))(scales)

    largest, dominants = jax.jit(both)(images)
    eig, eig_scaled, dominant = float(largest[0]), float(largest[1]), float(dominants[0])
    r = _ball_radius(images, cfg.radius, cfg.radius_scale, cfg.ball)
    return {
        "loss_sampled": ls,
        "loss_heldout": lh,
        "generalisation_gap": lh - ls,
        "worst_case_increase": wc,
        "worst_case_increase_rel": wc / lh if lh else float("nan"),
        "hessian_top_eig": eig,
        "hessian_dominant_eig": dominant,
        "hessian_top_eig_scaled": eig_scaled,
        "radius": _overall_radius(r, images, cfg.ball),
    }


def _overall_radius(r: Array, x: Array, ball: str) -> float:
    """The length of a full-radius perturbation: ``r``, or ``sqrt(sum_i r_i^2)`` per example."""
    if ball == "global":
        return float(r)
    per = jnp.broadcast_to(jnp.reshape(r, (-1,)) if jnp.ndim(r) else r, x.shape[:1])
    return float(jnp.sqrt(jnp.sum(jnp.square(per))))

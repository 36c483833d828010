"""Sharpness-aware minimisers as Optax gradient transformations.

Every transform here wraps a *base* optimizer (the one that applies the final gradient) and
follows the calling convention of ``optax.contrib.sam(..., opaque_mode=True)``:

    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

where ``grads`` is the gradient at ``params`` and ``grad_fn(params, i) -> grads`` evaluates the
gradient anywhere (``i`` numbers the extra evaluations of one update: 0, 1, ...). The transform
makes the ascent step itself and returns the base optimizer's update for the gradient at the
perturbed point, so it drops into any JAX training loop and composes with ``optax.chain``.

* ``sam``: ``eps = rho h / (||h|| + 1e-12)``, ``g = grad(params + eps)`` (Foret et al., 2021).
  Unlike ``optax.contrib.normalize`` the norm has an epsilon, so a zero gradient gives a zero
  perturbation, not NaN.

  Two options of ours shape the ball (``sam``, ``gsam`` and ``smooth_sam`` take both):
  ``ball="per_example"`` normalises each slice along the leading axis of every leaf on its own
  (one ball per image, SAM's "m-sharpness" with ``m = 1``) instead of one ball for the whole
  tree; ``radius="relative"`` makes ``rho`` a fraction of the parameters' own norm (of the
  whole tree, or of each slice with ``per_example``), so that one value means the same on
  every scale. ``ball="global", radius="absolute"`` is SAM as published.
* ``asam``: ``eps = rho T^2 h / ||T h||``, ``T = |params| + eta`` (Kwon et al., 2021).
* ``gsam``: update direction ``g - alpha h_perp``, ``h_perp`` the part of ``h`` orthogonal to
  ``g`` (Zhuang et al., 2022). ``alpha = 0`` is SAM.
* ``smooth_sam``: the ascent direction is the gradient at ``params + xi``,
  ``xi ~ N(0, sigma^2 I)`` (Gaussian smoothing, after R-SAM, Liu et al., 2022; the form is this
  project's choice). ``sigma = 0`` is SAM.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from satm_jax import sharpness
  >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
  >>> tx = sharpness.sam(optax.sgd(0.1), rho=0.05)
  >>> w = jnp.zeros(3)
  >>> state = tx.init(w)
  >>> grad_fn = lambda p, i: jax.grad(loss)(p)
  >>> for _ in range(100):
  ...     updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=grad_fn)
  ...     w = optax.apply_updates(w, updates)
  >>> bool(jnp.allclose(w, 1.0, atol=0.05))
  True

Reference: Gao et al., "Sharpness-Aware Trajectory Matching" (SATM), arXiv 2502.01865.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

Params = Any
GradFn = Callable[[Params, int], Params]

NORM_EPS = 1e-12


def _require_grad_fn(grad_fn: GradFn | None, name: str) -> GradFn:
    if grad_fn is None:
        raise ValueError(
            f"{name}.update needs grad_fn=: call tx.update(grads, state, params, grad_fn=f) "
            "with f(params, i) -> gradient at params"
        )
    return grad_fn


def _require_params(params: Params | None, name: str) -> Params:
    if params is None:
        raise ValueError(f"{name}.update needs params (the point the gradient was taken at)")
    return params


class SharpnessState(NamedTuple):
    """State of ``sam``/``asam``/``gsam``: the base optimizer's state."""

    base_state: optax.OptState


class SmoothSharpnessState(NamedTuple):
    """State of ``smooth_sam``: the base optimizer's state and the noise key."""

    base_state: optax.OptState
    key: jax.Array


BALLS = ("global", "per_example")
RADII = ("absolute", "relative")


def check_nonnegative(**values: float) -> None:
    """Raises ``ValueError`` unless every value is a finite number >= 0 (a negative radius
    would descend where SAM ascends). Traced values are left to the caller."""
    for name, v in values.items():
        try:
            f = float(v)
        except jax.errors.ConcretizationTypeError:
            continue
        if not 0.0 <= f < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")


def check_ball(ball: str, radius: str, sharpness: str | None = None) -> None:
    """Raises ``ValueError`` for an unknown ``ball``/``radius``, or (with ``sharpness``, a
    ``SHARPNESS`` name) for ball options on a transform that does not take them."""
    if ball not in BALLS:
        raise ValueError(f"unknown ball {ball!r}; choose one of {BALLS}")
    if radius not in RADII:
        raise ValueError(f"unknown radius {radius!r}; choose one of {RADII}")
    if sharpness in ("none", "asam") and (ball, radius) != ("global", "absolute"):
        raise ValueError(
            f"sharpness {sharpness!r} takes no ball/radius options (got {ball}, {radius})"
        )


def example_norms(x: jax.Array) -> jax.Array:
    """``||x_i||`` over every axis but the first, shaped to broadcast against ``x``."""
    if x.ndim == 0:
        return jnp.sqrt(jnp.square(x))
    axes = tuple(range(1, x.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def sam_perturbation(
    grads: Params,
    rho: float,
    params: Params | None = None,
    *,
    ball: str = "global",
    radius: str = "absolute",
) -> Params:
    """SAM's ascent step ``eps`` of length ``rho`` along ``grads``.

    Args:
      grads: the gradient ``h`` at ``params``.
      rho: the radius.
      params: the point (needed only with ``radius="relative"``).
      ball: ``"global"``: ``eps = r h / (||h|| + 1e-12)``, one norm over the whole tree;
        ``"per_example"``: ``eps_i = r_i h_i / (||h_i|| + 1e-12)`` for every slice ``i`` along
        the leading axis of every leaf.
      radius: ``"absolute"``: ``r = rho``; ``"relative"``: ``r = rho ||params||`` (global) or
        ``r_i = rho ||params_i||`` (per example).

    Example:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([[3.0, 4.0], [0.0, 1.0]]); x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> eps = sam_perturbation(h, 0.5, x, ball="per_example", radius="relative")
      >>> [round(float(v), 4) for v in eps.ravel()]  # rows of length 0.5 * ||x_i||
      [0.3, 0.4, 0.0, 1.0]
    """
    check_ball(ball, radius)
    if radius == "relative" and params is None:
        raise ValueError("radius='relative' needs params")
    if ball == "global":
        r = rho * otu.tree_norm(params) if radius == "relative" else rho
        scale = r / (otu.tree_norm(grads) + NORM_EPS)
        return jax.tree.map(lambda g: (scale * g).astype(g.dtype), grads)

    def leaf(g, x):
        r = rho * example_norms(x) if radius == "relative" else rho
        return (r * g / (example_norms(g) + NORM_EPS)).astype(g.dtype)

    like = params if params is not None else grads
    return jax.tree.map(leaf, grads, like)


def _perturbed_transform(
    base_optimizer: optax.GradientTransformation,
    perturb: Callable[[Params, Params], Params],
    combine: Callable[[Params, Params], Params],
    name: str,
) -> optax.GradientTransformationExtraArgs:
    """One ascent step: ``g = grad_fn(params + perturb(h, params), 0)``, then the base update."""

    def init_fn(params):
        return SharpnessState(base_optimizer.init(params))

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del extra_args
        grad_fn = _require_grad_fn(grad_fn, name)
        params = _require_params(params, name)
        eps = perturb(updates, params)
        adv_grads = grad_fn(otu.tree_add(params, eps), 0)
        direction = combine(updates, adv_grads)
        new_updates, base_state = base_optimizer.update(direction, state.base_state, params)
        return new_updates, SharpnessState(base_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    *,
    ball: str = "global",
    radius: str = "absolute",
) -> optax.GradientTransformationExtraArgs:
    """Sharpness-Aware Minimization as an Optax transform.

    ``update(grads, state, params, grad_fn=f)``: with ``h = grads`` (the gradient at
    ``params``), ``eps = rho h / (||h|| + 1e-12)``; ``g = f(params + eps, 0)``; returns the base
    optimizer's update for ``g`` (applied to ``params``, not to ``params + eps``). Equivalent to
    ``optax.contrib.sam(base, chain(normalize(), sgd(rho)), opaque_mode=True)`` except that a
    zero gradient stays finite.

    Args:
      base_optimizer: applies the sharpness-aware gradient (e.g. ``optax.sgd(lr, 0.5)``).
      rho: radius of the perturbation (``rho = 0`` gives the base optimizer).
      ball: ``"global"`` (SAM) or ``"per_example"`` (one ball per leading-axis slice; ours).
      radius: ``"absolute"`` (SAM) or ``"relative"`` (``rho`` times the parameters' norm;
        ours). See ``sam_perturbation``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> tx = sam(optax.sgd(0.1), rho=0.1)
      >>> p = jnp.array([1.0, -2.0]); f = lambda w: jnp.sum(w ** 2)
      >>> u, _ = tx.update(jax.grad(f)(p), tx.init(p), p, grad_fn=lambda w, i: jax.grad(f)(w))
      >>> u.shape
      (2,)

    Reference: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021.
    """
    check_ball(ball, radius)
    check_nonnegative(rho=rho)
    return _perturbed_transform(
        base_optimizer,
        perturb=lambda h, p: sam_perturbation(h, rho, p, ball=ball, radius=radius),
        combine=lambda h, g: g,
        name="sam",
    )


def asam(
    base_optimizer: optax.GradientTransformation, rho: float = 0.5, eta: float = 0.01
) -> optax.GradientTransformationExtraArgs:
    """Adaptive SAM: ``eps = rho T^2 h / (||T h|| + 1e-12)``, ``T = |params| + eta``.

    The perturbation scales with each parameter's magnitude, which makes the sharpness measure
    invariant to rescaling a block of parameters (and its gradient inversely).

    Args:
      base_optimizer: applies the gradient at the perturbed point.
      rho: radius in the normalised space (the ASAM paper uses values around 0.5 - 2).
      eta: keeps ``T`` away from zero.

    Reference: Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks", ICML 2021.
    """

    check_nonnegative(rho=rho, eta=eta)

    def perturb(h, p):
        t = jax.tree.map(lambda x: jnp.abs(x) + eta, p)
        th = jax.tree.map(jnp.multiply, t, h)
        scale = rho / (otu.tree_norm(th) + NORM_EPS)
        return jax.tree.map(lambda ti, thi: (scale * ti * thi).astype(thi.dtype), t, th)

    return _perturbed_transform(base_optimizer, perturb, lambda h, g: g, "asam")


def gsam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    alpha: float = 0.1,
    *,
    ball: str = "global",
    radius: str = "absolute",
) -> optax.GradientTransformationExtraArgs:
    """Surrogate-gap guided SAM: direction ``g - alpha * h_perp``.

    ``h`` is the gradient at ``params``, ``g`` the gradient at the SAM point
    ``params + rho h / ||h||``, and ``h_perp = h - (<h, g> / ||g||^2) g`` the part of ``h``
    orthogonal to ``g``. Descending along ``-h_perp`` lowers the surrogate gap without changing
    the perturbed loss to first order. ``alpha = 0`` is SAM. ``ball`` and ``radius`` shape the
    SAM point as in ``sam``.

    Reference: Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022.
    """

    def combine(h, g):
        coef = otu.tree_vdot(h, g) / (otu.tree_vdot(g, g) + NORM_EPS)
        h_perp = otu.tree_add_scale(h, -coef, g)
        return otu.tree_add_scale(g, -alpha, h_perp)

    check_ball(ball, radius)
    check_nonnegative(rho=rho, alpha=alpha)
    return _perturbed_transform(
        base_optimizer,
        lambda h, p: sam_perturbation(h, rho, p, ball=ball, radius=radius),
        combine,
        "gsam",
    )


def smooth_sam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    sigma: float = 0.01,
    seed: int = 0,
    *,
    ball: str = "global",
    radius: str = "absolute",
) -> optax.GradientTransformationExtraArgs:
    """SAM whose ascent direction is taken at a Gaussian-perturbed point.

    ``xi ~ N(0, sigma^2 I)``; ``h = grad_fn(params + xi, 0)``; ``eps = rho h / (||h|| + 1e-12)``;
    ``g = grad_fn(params + eps, 1)``; the base optimizer applies ``g``. The incoming ``grads``
    are not used for the direction. ``sigma = 0`` reproduces ``sam`` (one more gradient
    evaluation). The noise key lives in the state, so the transform stays pure. ``ball`` and
    ``radius`` shape ``eps`` as in ``sam``.

    Reference: Liu et al., "Random Sharpness-Aware Minimization", NeurIPS 2022 (the smoothing
    form in SATM's public description is not spelled out; this one is this project's choice).
    """

    check_ball(ball, radius)
    check_nonnegative(rho=rho, sigma=sigma)

    def init_fn(params):
        return SmoothSharpnessState(base_optimizer.init(params), jax.random.PRNGKey(seed))

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del updates, extra_args
        grad_fn = _require_grad_fn(grad_fn, "smooth_sam")
        params = _require_params(params, "smooth_sam")
        key, sub = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(sub, len(leaves))
        noise = [sigma * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
        noisy = jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise)])
        h = grad_fn(noisy, 0)
        eps = sam_perturbation(h, rho, params, ball=ball, radius=radius)
        g = grad_fn(otu.tree_add(params, eps), 1)
        new_updates, base_state = base_optimizer.update(g, state.base_state, params)
        return new_updates, SmoothSharpnessState(base_state, key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def no_sharpness(
    base_optimizer: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """The base optimizer with the same calling convention (``grad_fn`` is accepted, unused)."""
    return optax.with_extra_args_support(base_optimizer)


SHARPNESS = ("none", "sam", "asam", "gsam", "smooth_sam")


def make_sharpness(
    name: str,
    base_optimizer: optax.GradientTransformation,
    *,
    rho: float = 0.05,
    eta: float = 0.01,
    gsam_alpha: float = 0.1,
    sigma: float = 0.01,
    seed: int = 0,
    ball: str = "global",
    radius: str = "absolute",
) -> optax.GradientTransformationExtraArgs:
    """The sharpness-aware transform named ``name`` (one of ``SHARPNESS``).

    ``ball`` and ``radius`` (``BALLS``, ``RADII``) apply to ``sam``, ``gsam`` and
    ``smooth_sam``; ASAM has its own normalisation and accepts only the defaults.

    Raises:
      ValueError: unknown name, ball or radius; a ball or radius that ``name`` does not take.
    """
    check_ball(ball, radius, name)
    if name == "none":
        return no_sharpness(base_optimizer)
    if name == "sam":
        return sam(base_optimizer, rho, ball=ball, radius=radius)
    if name == "asam":
        return asam(base_optimizer, rho, eta)
    if name == "gsam":
        return gsam(base_optimizer, rho, gsam_alpha, ball=ball, radius=radius)
    if name == "smooth_sam":
        return smooth_sam(base_optimizer, rho, sigma, seed, ball=ball, radius=radius)
    raise ValueError(f"unknown sharpness {name!r}; choose one of {SHARPNESS}")

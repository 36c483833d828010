"""Calibrating the student's step size: the closed-form best constant step.

MTT starts the learned inner step size ``alpha`` at the experts' learning rate and learns it
with plain SGD at a fixed learning rate. Whether ``N`` student steps can then cover ``M`` expert
epochs depends on the dataset: on Fashion-MNIST at IPC 1, 20 steps at ``alpha = 0.01`` cover
only a small part of two expert epochs, and with MTT's CIFAR-10 IPC 1 learning rate (``1e-7``)
``alpha`` barely moves, so the images barely move either.

This module computes the step at which ``N`` steps land closest to the target, to first order
(**our choice**, not part of MTT or SATM). With plain SGD ``theta_N = theta_0 - alpha * G``,
``G = sum_n g_n``; holding the ``g_n`` fixed, the matching loss of one trajectory,
``||theta_0 - alpha G - target||^2 / ||theta_0 - target||^2``, is a quadratic in ``alpha`` with
minimiser ``<theta_0 - target, G> / ||G||^2``. Over several sampled trajectories ``s`` the mean
normalised loss is minimised by

    alpha* = sum_s <d_s, G_s> / ||d_s||^2  /  sum_s ||G_s||^2 / ||d_s||^2,   d_s = theta_0 - target.

Because ``G`` itself depends on ``alpha``, ``calibrate`` repeats the computation at the new step
a few times (a fixed-point iteration).

Example:
  >>> import jax.numpy as jnp
  >>> from satm_jax import step_size
  >>> start, target = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([0.0, 0.0])}
  >>> grad_sum = {"w": jnp.array([10.0, 10.0])}
  >>> round(float(step_size.best_constant_step(step_size.step_moments(start, target, grad_sum))), 6)
  0.1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax import tree_utils as otu

from satm_jax import matching

Array = jax.Array
Params = Any


class StepMoments(NamedTuple):
    """Per-trajectory inner products for the closed form (arrays with a sample axis or not).

    Attributes:
      d_dot_g: ``<theta_0 - target, G>``.
      g_sq: ``||G||^2``.
      d_sq: ``||theta_0 - target||^2``.
    """

    d_dot_g: Array
    g_sq: Array
    d_sq: Array


def step_moments(start: Params, target: Params, grad_sum: Params) -> StepMoments:
    """The inner products of one trajectory that ``best_constant_step`` needs."""
    d = otu.tree_sub(start, target)
    return StepMoments(
        otu.tree_vdot(d, grad_sum),
        otu.tree_vdot(grad_sum, grad_sum),
        otu.tree_vdot(d, d),
    )


def best_constant_step(m: StepMoments) -> Array:
    """``alpha*`` minimising the mean normalised first-order loss over the sample axis.

    With scalar moments (one trajectory) this is ``<d, G> / ||G||^2``.
    """
    num = jnp.sum(m.d_dot_g / m.d_sq)
    den = jnp.sum(m.g_sq / m.d_sq)
    return num / den


def make_moments_fn(
    apply_fn: matching.ApplyFn,
    augment_fn: matching.AugmentFn,
    sample_fn: Callable[[Array], tuple[Params, Params, matching.StudentBatches]],
) -> Callable[[Array, Array, Array, Array], StepMoments]:
    """``moments(keys, images, labels, alpha) -> StepMoments`` over one key per trajectory.

    ``sample_fn(key) -> (start, target, batches)`` draws a trajectory the way the outer loop
    does. The unroll runs forward only (no hypergradient) and is jit-compiled.
    """

    def one(key, images, labels, alpha):
        start, target, batches = sample_fn(key)
        _, grad_sum = matching.unroll(
            apply_fn,
            start,
            images,
            labels,
            alpha,
            batches,
            augment_fn=augment_fn,
            remat=False,
            grad_sum=otu.tree_zeros_like(start),
        )
        return step_moments(start, target, grad_sum)

    def moments(keys, images, labels, alpha):
        return jax.lax.map(lambda k: one(k, images, labels, alpha), keys)

    return jax.jit(moments)


def calibrate(
    moments_fn: Callable[[Array, Array, Array, Array], StepMoments],
    keys: Array,
    images: Array,
    labels: Array,
    alpha0: float,
    *,
    refinements: int = 2,
    floor: float = 0.0,
) -> tuple[float, list[float]]:
    """Fixed-point iteration ``alpha <- alpha*(G(alpha))`` from ``alpha0``.

    Returns ``(alpha, history)``; ``history`` starts with ``alpha0``. A non-finite or
    non-positive closed form (the summed gradient points away from the target) stops the
    iteration at the last good value; the result is kept at or above ``floor``.
    """
    alpha = float(alpha0)
    history = [alpha]
    for _ in range(refinements + 1):
        m = moments_fn(keys, images, labels, jnp.asarray(alpha, jnp.float32))
        new = float(best_constant_step(m))
        if not (new == new and new > 0.0 and new != float("inf")):
            break
        alpha = max(new, floor)
        history.append(alpha)
    return alpha, history

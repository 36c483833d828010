"""Learning rates that mean the same on every dataset: steps relative to the parameters' scale.

MTT's image learning rates span 100 to 100,000 across datasets (method.md, section 5) because
plain SGD's step is ``lr * gradient`` and the matching loss's gradient with respect to the
pixels has a different size on every dataset, resolution and set size. ``relative_adam`` makes
the step scale-free (**our choice**, not MTT's): Adam normalises each coordinate's gradient to
about unit size, and the result is multiplied by ``lr_rel * RMS(params_0)``, the root mean square
of the parameters when the optimiser was initialised. ``lr_rel = 0.01`` moves each pixel by
about 1% of the initial set's typical pixel magnitude per iteration, on any dataset.

Example:
  >>> import jax.numpy as jnp, optax
  >>> from satm_jax import scale_free
  >>> x = jnp.array([3.0, -4.0])  # RMS 3.5355
  >>> tx = scale_free.relative_adam(0.1)
  >>> state = tx.init(x)
  >>> updates, state = tx.update(jnp.array([1e-6, -2e-6]), state)
  >>> [round(float(u), 3) for u in updates]  # Adam's first step is -sign(g), times 0.1 * RMS
  [-0.354, 0.354]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

Params = Any


class AdamState(NamedTuple):
    """Adam's moments and step count."""

    count: jax.Array
    mu: Params
    nu: Params


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-10):
    """Adam's normalised direction ``m_hat / (sqrt(v_hat) + eps)`` (Kingma and Ba, 2015).

    The same as ``optax.scale_by_adam``, written out so that it runs under JAX's strict dtype
    promotion (optax's bias correction raises a Python float to an int32 count).
    """

    def init_fn(params):
        # two separate buffers: the outer loop donates its state, and one buffer cannot be
        # donated twice
        mu = otu.tree_zeros_like(params)
        nu = otu.tree_zeros_like(params)
        return AdamState(jnp.zeros((), jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        c1 = 1 - jnp.power(jnp.float32(b1), t)
        c2 = 1 - jnp.power(jnp.float32(b2), t)
        out = jax.tree.map(
            lambda m, v: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(m.dtype), mu, nu
        )
        return out, AdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ReferenceScaleState(NamedTuple):
    """``scale``: the RMS of the parameters at ``init``."""

    scale: jax.Array


def tree_rms(tree: Params) -> jax.Array:
    """Root mean square over every entry of every leaf."""
    leaves = jax.tree.leaves(tree)
    total = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    count = sum(x.size for x in leaves)
    return jnp.sqrt(total / count)


def scale_by_reference_rms(step: float) -> optax.GradientTransformation:
    """Multiplies updates by ``step * RMS(params at init)`` (a zero RMS counts as 1)."""

    def init_fn(params):
        rms = tree_rms(params)
        return ReferenceScaleState(jnp.where(rms > 0, rms, jnp.ones_like(rms)))

    def update_fn(updates, state, params=None):
        del params
        s = step * state.scale
        return jax.tree.map(lambda u: (s * u).astype(u.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def relative_adam(
    lr_rel: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-10
) -> optax.GradientTransformation:
    """Adam whose step is ``lr_rel`` times the RMS of the parameters it was initialised with.

    Args:
      lr_rel: the step as a fraction of the initial parameters' RMS.
      b1, b2: Adam's decay rates.
      eps: Adam's epsilon (small: pixel gradients of the matching loss are small).
    """
    return optax.chain(scale_by_adam(b1=b1, b2=b2, eps=eps), scale_by_reference_rms(-lr_rel))

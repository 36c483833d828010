"""The student unroll, the matching loss and its hypergradients.

Trajectory matching (MTT, Cazenavette et al., CVPR 2022) starts a *student* network at an
expert's checkpoint ``theta_0 = theta*_t`` and trains it for ``N`` plain SGD steps on minibatches
of the synthetic set ``X``:

    theta_{n+1} = theta_n - alpha * grad_theta CE(f(theta_n; DSA(X[B_n])), Y[B_n]),

then measures how close it lands to the expert ``M`` epochs later:

    L(X, alpha) = ||theta_N - theta*_{t+M}||^2 / ||theta_0 - theta*_{t+M}||^2.

The *hypergradient* ``dL/dX`` back-propagates through the whole unroll (second derivatives of
the network). This module offers:

* ``unroll``: the student as one ``jax.lax.scan``; the per-step minibatch indices and
  augmentation keys are scan inputs (``StudentBatches``), so the unroll is a pure function;
  ``jax.checkpoint`` per step keeps the backward pass's memory at one parameter copy per step.
* exact mode (``truncate=None`` or ``truncate == N``): differentiate all ``N`` steps (MTT).
* truncated mode (TUH, SATM): run all ``N`` steps forward but stop the gradient at
  ``theta_{N-K}``, so only the last ``K`` steps are differentiated. ``K = N`` is exact.
* ``second_order``: how the steps' gradients are differentiated, JAX's reverse mode through
  the scan (``"reverse"``) or our custom VJP with forward-over-reverse Hessian-vector products
  (``"forward"``, the CPU's default through ``DistillConfig.second_order="auto"``); the same
  gradients either way.
* ``run_prefix``/``suffix_loss``: the two halves of a truncated unroll, so a second pass (SATM's
  sharpness-aware pass with trajectory reusing) can restart from the first pass's
  ``theta_{N-K}`` with the same minibatches and keys.
* ``first_order_lr_grad``: SATM's closed-form step-size gradient
  ``dL/dalpha = -2 <theta_N - target, G> / ||theta_0 - target||^2`` with ``G = sum_n g_n``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from satm_jax import matching, models
  >>> net = models.ConvNet(num_classes=2, width=4, depth=1)
  >>> apply_fn = models.make_apply_fn(net)
  >>> start = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  >>> target = jax.tree.map(lambda p: p + 0.01, start)
  >>> x, y = jnp.ones((4, 8, 8, 1)), jnp.array([0, 0, 1, 1])
  >>> batches = matching.sample_student_batches(jax.random.PRNGKey(1), 4, None, 3)
  >>> loss = matching.matching_loss(apply_fn, x, y, 0.01, start, target, batches, truncate=2)
  >>> g = jax.grad(matching.matching_loss, argnums=1)(apply_fn, x, y, 0.01, start, target,
  ...                                                 batches, truncate=2)
  >>> g.shape
  (4, 8, 8, 1)

Reference: Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR
2022; Gao et al., "Sharpness-Aware Trajectory Matching" (SATM), arXiv 2502.01865.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax import tree_utils as otu

from satm_jax.train import cross_entropy

Array = jax.Array
Params = Any
ApplyFn = Callable[[Params, Array], Array]
AugmentFn = Callable[[Array, Array], Array]

# ``unroll`` argument of the student's ``lax.scan`` at trace time; only ``unrolled_scans`` sets
# it (a context variable: a block in one thread does not change another thread's traces).
_SCAN_UNROLL: contextvars.ContextVar[int | bool] = contextvars.ContextVar("scan_unroll", default=1)


@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
    """Functions traced inside this block unroll the student as straight-line code.

    For FLOP counting only: XLA's cost analysis counts a loop body once whatever its trip
    count, so ``experiments.flops`` lowers the outer step inside this block. Computation and
    results are unchanged; compilation gets slower.
    """
    token = _SCAN_UNROLL.set(True)
    try:
        yield
    finally:
        _SCAN_UNROLL.reset(token)


def _identity_augment(key: Array, x: Array) -> Array:
    del key
    return x


class StudentBatches(NamedTuple):
    """What each inner step sees, as scan inputs.

    Attributes:
      indices: ``(N, b)`` int32 indices into the synthetic set.
      weights: ``(N, b)`` float32, 1 for a real entry and 0 for padding (the last chunk of a
        permutation can be short); ``None`` when every batch is the whole set.
      keys: ``(N, 2)`` uint32 augmentation keys, one per step.
    """

    indices: Array
    weights: Array | None
    keys: Array

    @property
    def num_steps(self) -> int:
        return self.indices.shape[0]

    def slice(self, start: int, stop: int) -> StudentBatches:
        w = None if self.weights is None else self.weights[start:stop]
        return StudentBatches(self.indices[start:stop], w, self.keys[start:stop])

    def scan_inputs(self) -> tuple[Array, ...]:
        """The per-step arrays as ``lax.scan`` inputs (``weights`` only where present)."""
        if self.weights is None:
            return (self.indices, self.keys)
        return (self.indices, self.weights, self.keys)

    @staticmethod
    def unpack(inp: tuple[Array, ...]) -> tuple[Array, Array | None, Array]:
        """One step's ``(indices, weights or None, key)`` from a slice of ``scan_inputs``."""
        return inp if len(inp) == 3 else (inp[0], None, inp[1])


def sample_student_batches(
    key: Array, num_syn: int, batch_syn: int | None, num_steps: int
) -> StudentBatches:
    """Minibatches for ``num_steps`` inner steps, walking random permutations (MTT).

    Each permutation of the ``num_syn`` images is cut into chunks of ``batch_syn``; a step takes
    the next chunk and a new permutation starts when one is used up. A short last chunk is
    padded to ``batch_syn`` with zero-weight entries. ``batch_syn=None`` (or ``>= num_syn``)
    uses the whole set, in order, at every step.
    """
    k_perm, k_aug = jax.random.split(key)
    keys = jax.random.split(k_aug, num_steps)
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    if batch_syn is None or batch_syn >= num_syn:
        idx = jnp.broadcast_to(jnp.arange(num_syn, dtype=jnp.int32), (num_steps, num_syn))
        return StudentBatches(idx, None, keys)
    b = batch_syn
    chunks = -(-num_syn // b)
    pad = chunks * b - num_syn
    num_perms = -(-num_steps // chunks)
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_syn))(
        jax.random.split(k_perm, num_perms)
    ).astype(jnp.int32)
    if pad:
        perms = jnp.concatenate([perms, perms[:, :pad]], axis=1)
    w = jnp.concatenate([jnp.ones((num_syn,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
    idx = perms.reshape(num_perms * chunks, b)[:num_steps]
    wts = jnp.broadcast_to(w.reshape(chunks, b), (num_perms, chunks, b))
    wts = wts.reshape(num_perms * chunks, b)[:num_steps]
    return StudentBatches(idx, wts if pad else None, keys)


def tree_sq_dist(a: Params, b: Params) -> Array:
    """``sum over leaves of ||a - b||^2``."""
    return otu.tree_norm(otu.tree_sub(a, b), squared=True)


def normalized_distance(params: Params, start: Params, target: Params) -> Array:
    """MTT's loss ``||params - target||^2 / ||start - target||^2`` (sums over all params)."""
    return tree_sq_dist(params, target) / tree_sq_dist(start, target)


def step_loss(
    apply_fn: ApplyFn,
    params: Params,
    images: Array,
    labels: Array,
    indices: Array,
    weights: Array | None,
    key: Array,
    augment_fn: AugmentFn = _identity_augment,
) -> Array:
    """The inner step's loss: cross-entropy on the augmented minibatch ``images[indices]``
    (weighted mean where ``weights`` marks padding)."""
    ce = cross_entropy(apply_fn(params, augment_fn(key, images[indices])), labels[indices])
    if weights is None:
        return jnp.mean(ce)
    w = weights.astype(ce.dtype)
    return jnp.sum(w * ce) / jnp.sum(w)


def student_step(
    apply_fn: ApplyFn,
    params: Params,
    images: Array,
    labels: Array,
    syn_lr: Array,
    indices: Array,
    weights: Array | None,
    key: Array,
    augment_fn: AugmentFn = _identity_augment,
) -> tuple[Params, Params]:
    """One inner SGD step on a synthetic minibatch; returns ``(new_params, gradient)``."""
    g = jax.grad(step_loss, argnums=1)(
        apply_fn, params, images, labels, indices, weights, key, augment_fn
    )
    new = jax.tree.map(lambda p, gi: p - syn_lr.astype(p.dtype) * gi, params, g)
    return new, g


# How the hypergradient differentiates each inner step's gradient (the second derivative):
# "reverse": JAX's reverse mode through the scan (reverse-over-reverse, each step under
# ``jax.checkpoint`` when ``remat``); "forward": our custom VJP of the unroll, which computes
# each step's Hessian-vector products forward-over-reverse (``_unroll_forward_over_reverse``);
# "auto": "forward" on the CPU, where it was measured faster (docs/PERFORMANCE.md), "reverse"
# elsewhere (not measured on accelerators).
SECOND_ORDER = ("auto", "reverse", "forward")


def resolve_second_order(mode: str) -> str:
    """``"reverse"`` or ``"forward"`` for ``mode`` (``"auto"`` by the default backend).

    Raises:
      ValueError: an unknown mode.
    """
    if mode not in SECOND_ORDER:
        raise ValueError(f"second_order must be one of {SECOND_ORDER}, got {mode!r}")
    if mode == "auto":
        return "forward" if jax.default_backend() == "cpu" else "reverse"
    return mode


def unroll(
    apply_fn: ApplyFn,
    params: Params,
    images: Array,
    labels: Array,
    syn_lr: Array,
    batches: StudentBatches,
    *,
    augment_fn: AugmentFn = _identity_augment,
    remat: bool = True,
    grad_sum: Params | None = None,
    second_order: str = "reverse",
) -> tuple[Params, Params | None]:
    """Runs the student for ``batches.num_steps`` SGD steps with ``jax.lax.scan``.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` (training mode).
      params: ``theta_0``.
      images: the synthetic set ``(n, H, W, C)``.
      labels: class ids ``(n,)`` or probability rows ``(n, classes)``.
      syn_lr: the step size ``alpha`` (scalar array).
      batches: per-step indices, weights and augmentation keys.
      augment_fn: ``augment_fn(key, x)`` (DSA), applied at every step.
      remat: wrap each step in ``jax.checkpoint`` so the backward pass stores only the
        parameters at each step.
      grad_sum: if given, ``sum_n g_n`` is accumulated onto it and returned (for the
        first-order step-size gradient); otherwise ``None`` is returned in its place.
      second_order: ``SECOND_ORDER``: how a gradient through the unroll differentiates the
        steps' gradients. The values and gradients are the same (to rounding); ``"forward"``
        stores the parameters and the gradient of each step and no activations (``remat``
        does not apply), and does not support forward-mode differentiation (``jax.jvp``) of
        the unroll.

    Returns:
      ``(theta_N, grad_sum)``.
    """
    syn_lr = jnp.asarray(syn_lr)
    if batches.num_steps == 0:
        return params, grad_sum
    if resolve_second_order(second_order) == "forward":
        return _unroll_forward_over_reverse(
            apply_fn, params, images, labels, syn_lr, batches, augment_fn, grad_sum
        )
    return _sgd_scan(
        apply_fn, params, images, labels, syn_lr, batches, augment_fn, grad_sum, remat=remat
    )[0]


def _sgd_scan(
    apply_fn: ApplyFn,
    params: Params,
    images: Array,
    labels: Array,
    syn_lr: Array,
    batches: StudentBatches,
    augment_fn: AugmentFn,
    grad_sum: Params | None,
    *,
    remat: bool = False,
    keep_steps: bool = False,
) -> tuple[tuple[Params, Params | None], Any]:
    """The student's SGD steps as one ``lax.scan``: ``((theta_N, grad_sum), steps)``, where
    ``steps`` stacks every step's ``(theta_n, g_n)`` with ``keep_steps`` (else ``None``)."""
    track = grad_sum is not None

    def body(carry, inp):
        p, gs = carry
        idx, w, key = StudentBatches.unpack(inp)
        new, g = student_step(apply_fn, p, images, labels, syn_lr, idx, w, key, augment_fn)
        if track:
            gs = otu.tree_add(gs, g)
        return (new, gs), ((p, g) if keep_steps else None)

    if remat:
        body = jax.checkpoint(body)
    (final, gs), steps = jax.lax.scan(
        body,
        (params, grad_sum if track else 0.0),
        batches.scan_inputs(),
        unroll=_SCAN_UNROLL.get(),
    )
    return (final, gs if track else None), steps


def _unroll_forward_over_reverse(
    apply_fn: ApplyFn,
    params: Params,
    images: Array,
    labels: Array,
    syn_lr: Array,
    batches: StudentBatches,
    augment_fn: AugmentFn,
    grad_sum: Params | None,
) -> tuple[Params, Params | None]:
    """``unroll`` with a custom VJP whose second derivatives run forward-over-reverse.

    The forward pass stores ``theta_n`` and ``g_n`` of every step. With ``g_n = grad_theta
    l_n(theta_n, X, Y)`` and ``theta_{n+1} = theta_n - alpha g_n``, the backward pass walks the steps in
    reverse with the cotangent ``lambda`` of ``theta_{n+1}`` (and ``mu`` of ``grad_sum``):
    ``v = -alpha lambda + mu``, then one ``jax.jvp`` of ``grad_{theta, X, Y} l_n`` at
    ``theta_n`` along ``(v, 0, 0)`` gives ``(H_tt v, H_Xt v, H_Yt v)`` (the Hessian's
    symmetry makes these the VJPs the chain rule needs); ``lambda += H_tt v``, ``X_bar +=
    H_Xt v``, ``Y_bar += H_Yt v`` (float labels only), ``alpha_bar -= <g_n, lambda>``. Same
    result as JAX's reverse-over-reverse to rounding (tested in float64); it replaces the
    transpose of each step's linearised gradient by its forward derivative.
    """
    track = grad_sum is not None
    diff_labels = jnp.issubdtype(labels.dtype, jnp.inexact)

    def forward(params, images, labels, syn_lr, gs, batches, keep_steps):
        return _sgd_scan(
            apply_fn, params, images, labels, syn_lr, batches, augment_fn, gs,
            keep_steps=keep_steps,
        )  # fmt: skip

    @jax.custom_vjp
    def run(params, images, labels, syn_lr, gs, batches):
        return forward(params, images, labels, syn_lr, gs, batches, False)[0]

    def run_fwd(params, images, labels, syn_lr, gs, batches):
        out, steps = forward(params, images, labels, syn_lr, gs, batches, True)
        return out, (steps, images, labels, syn_lr, batches)

    def run_bwd(res, ct):
        steps, images, labels, syn_lr, batches = res
        lam, mu = ct
        argnums = (1, 2, 3) if diff_labels else (1, 2)

        def body(carry, inp):
            lam, x_bar, y_bar, a_bar = carry
            (theta, g_theta), (idx, w, key) = inp[0], StudentBatches.unpack(inp[1:])
            v = jax.tree.map(lambda c: -syn_lr.astype(c.dtype) * c, lam)
            if track:
                v = otu.tree_add(v, mu)

            def grads(p):
                return jax.grad(step_loss, argnums=argnums)(
                    apply_fn, p, images, labels, idx, w, key, augment_fn
                )

            t = jax.jvp(grads, (theta,), (v,))[1]
            a_bar = a_bar - otu.tree_vdot(g_theta, lam).astype(a_bar.dtype)
            y_bar = y_bar + t[2] if diff_labels else y_bar
            return (otu.tree_add(lam, t[0]), x_bar + t[1], y_bar, a_bar), None

        init = (
            lam,
            jnp.zeros_like(images),
            jnp.zeros_like(labels) if diff_labels else 0.0,
            jnp.zeros_like(syn_lr),
        )
        (lam, x_bar, y_bar, a_bar), _ = jax.lax.scan(
            body, init, (steps, *batches.scan_inputs()), reverse=True, unroll=_SCAN_UNROLL.get()
        )
        return lam, x_bar, y_bar if diff_labels else None, a_bar, mu if track else None, None

    run.defvjp(run_fwd, run_bwd)
    return run(params, images, labels, syn_lr, grad_sum, batches)


class Prefix(NamedTuple):
    """The untracked head of a truncated unroll: ``theta_{N-K}`` and ``sum_{n<N-K} g_n``."""

    params: Params
    grad_sum: Params


def run_prefix(
    apply_fn: ApplyFn,
    start: Params,
    images: Array,
    labels: Array,
    syn_lr: Array,
    batches: StudentBatches,
    num_prefix_steps: int,
    *,
    augment_fn: AugmentFn = _identity_augment,
) -> Prefix:
    """The first ``N - K`` steps, forward only; gradients are stopped at their result (TUH)."""
    sg = jax.lax.stop_gradient
    params, grad_sum = unroll(
        apply_fn,
        sg(start),
        sg(images),
        sg(labels),
        sg(jnp.asarray(syn_lr)),
        batches.slice(0, num_prefix_steps),
        augment_fn=augment_fn,
        remat=False,
        grad_sum=otu.tree_zeros_like(start),
    )
    return Prefix(sg(params), sg(grad_sum))


class SuffixAux(NamedTuple):
    """Side outputs of ``suffix_loss``."""

    final_params: Params
    grad_sum: Params


def suffix_loss(
    apply_fn: ApplyFn,
    images: Array,
    labels: Array,
    syn_lr: Array,
    prefix: Prefix,
    start: Params,
    target: Params,
    batches: StudentBatches,
    num_prefix_steps: int,
    *,
    augment_fn: AugmentFn = _identity_augment,
    remat: bool = True,
    window_grad_sum: bool = False,
    second_order: str = "reverse",
) -> tuple[Array, SuffixAux]:
    """The last ``K`` steps from ``prefix`` and the normalised loss; differentiable in X, alpha.

    ``aux.grad_sum`` is ``G = sum_n g_n`` over all ``N`` steps (prefix included), for
    ``first_order_lr_grad``; with ``window_grad_sum=True`` it is ``G_K``, the sum over the
    last ``K`` (differentiated) steps only, so that ``theta_N = theta_{N-K} - alpha * G_K``.
    """
    final, grad_sum = unroll(
        apply_fn,
        prefix.params,
        images,
        labels,
        syn_lr,
        batches.slice(num_prefix_steps, batches.num_steps),
        augment_fn=augment_fn,
        remat=remat,
        grad_sum=otu.tree_zeros_like(prefix.grad_sum) if window_grad_sum else prefix.grad_sum,
        second_order=second_order,
    )
    loss = normalized_distance(final, start, target)
    return loss, SuffixAux(final, grad_sum)


# SATM's default share of differentiated inner steps: K = ceil(N / DEFAULT_TRUNCATION_DIVISOR)
# (our choice: the description gives no value).
DEFAULT_TRUNCATION_DIVISOR = 3


def default_truncation(syn_steps: int) -> int:
    """SATM's default ``K`` for ``N = syn_steps`` inner steps: ``max(1, ceil(N / 3))``."""
    return max(1, -(-syn_steps // DEFAULT_TRUNCATION_DIVISOR))


def num_prefix_steps(num_steps: int, truncate: int | None) -> int:
    """``N - K`` for truncation ``K`` (``None`` means exact, ``K = N``).

    Raises:
      ValueError: ``K`` outside ``1..N``.
    """
    if truncate is None:
        return 0
    if not 1 <= truncate <= num_steps:
        raise ValueError(f"truncate must be in 1..{num_steps} (the inner steps), got {truncate}")
    return num_steps - truncate


def matching_loss(
    apply_fn: ApplyFn,
    images: Array,
    labels: Array,
    syn_lr: Array,
    start: Params,
    target: Params,
    batches: StudentBatches,
    *,
    truncate: int | None = None,
    augment_fn: AugmentFn = _identity_augment,
    remat: bool = True,
    second_order: str = "reverse",
) -> Array:
    """The matching loss ``L(X, alpha)``, differentiable with the chosen hypergradient.

    Its value does not depend on ``truncate``; its gradient does: only the last ``truncate``
    inner steps are differentiated (``None``: all of them, the exact hypergradient).
    ``second_order`` (``SECOND_ORDER``) chooses how, not what: see ``unroll``.
    """
    n_pre = num_prefix_steps(batches.num_steps, truncate)
    prefix = run_prefix(
        apply_fn, start, images, labels, syn_lr, batches, n_pre, augment_fn=augment_fn
    )
    loss, _ = suffix_loss(
        apply_fn,
        images,
        labels,
        syn_lr,
        prefix,
        start,
        target,
        batches,
        n_pre,
        augment_fn=augment_fn,
        remat=remat,
        second_order=second_order,
    )
    return loss


def first_order_lr_grad(final: Params, grad_sum: Params, start: Params, target: Params) -> Array:
    """SATM's closed-form step-size gradient.

    With plain SGD inner steps ``theta_N = theta_0 - alpha * G``, ``G = sum_n g_n``; treating the
    ``g_n`` as constants in ``alpha``:

        dL/dalpha = -2 <theta_N - target, G> / ||theta_0 - target||^2.

    Given the window sum ``G_K`` instead (``suffix_loss(..., window_grad_sum=True)``), the same
    formula is the first-order step-size gradient of the truncated graph, where ``theta_{N-K}``
    is a constant: ``theta_N = theta_{N-K} - alpha * G_K`` (our variant, ``first_order_window``).
    """
    sg = jax.lax.stop_gradient
    diff = jax.tree.map(lambda a, b: sg(a) - sg(b), final, target)
    return -2.0 * otu.tree_vdot(diff, sg(grad_sum)) / tree_sq_dist(sg(start), sg(target))

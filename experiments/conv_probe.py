"""Probe: the exact hypergradient's time under other convolution formulations or XLA flags.

Times ``jax.grad`` of ``satm_jax.matching.matching_loss`` (CIFAR-10 shape: 10 images of
32x32x3, ConvNet-3 width 128, instance norm, N inner steps, no DSA) for each formulation, all
compiled in one process and timed interleaved (median of 4 calls after compilation):

* ``patches``: the patches-then-matmul convolution (``satm_jax.models.conv2d``);
* ``winograd``: the library's CPU convolution since 2026-12-05 (``satm_jax.winograd``,
  F(2x2, 3x3) for the layers with at least 8 input channels, patches for the first);
* ``shifted``: nine matmuls of the shifted views, summed (no patches materialised);
* ``rows``: the three horizontal shifts concatenated, three matmuls summed;
* ``lax``: ``jax.lax.conv_general_dilated``.

XLA options are compared by running it once per ``XLA_FLAGS`` value (docs/PERFORMANCE.md)::

    python -m experiments.conv_probe --steps=10 --impls=patches,shifted,rows
    python -m experiments.conv_probe --steps=10 --impls=patches,winograd --calls=6
    XLA_FLAGS=--xla_cpu_use_xnnpack=false python -m experiments.conv_probe --impls=patches
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from satm_jax import matching, models

orig = models.conv2d


def shifted(x, kernel, *, stride=1, padding, impl):
    if impl != "shifted":
        return orig(x, kernel, stride=stride, padding=padding, impl=impl)
    kh, kw, cin, cout = kernel.shape
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            out = out + xp[:, i : i + ho, j : j + wo, :] @ kernel[i, j]
    return out


def rowpatches(x, kernel, *, stride=1, padding, impl):
    # concatenate only the 3 horizontal shifts, then 3 matmuls over vertical offsets
    if impl != "rows":
        return orig(x, kernel, stride=stride, padding=padding, impl=impl)
    kh, kw, cin, cout = kernel.shape
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    rows = jnp.concatenate(
        [xp[:, :, j : j + wo, :] for j in range(kw)], axis=-1
    )  # (b, hp, wo, kw*cin)
    out = 0.0
    for i in range(kh):
        out = out + rows[:, i : i + ho] @ kernel[i].reshape(kw * cin, cout)
    return out


def dispatch(x, kernel, *, stride=1, padding, impl):
    if impl == "shifted":
        return shifted(x, kernel, stride=stride, padding=padding, impl=impl)
    if impl == "rows":
        return rowpatches(x, kernel, stride=stride, padding=padding, impl=impl)
    return orig(x, kernel, stride=stride, padding=padding, impl=impl)


def build(impl: str, n: int):
    net = models.ConvNet(num_classes=10, width=128, depth=3, conv_impl="patches")
    key = jax.random.PRNGKey(0)
    params = net.init(key, jnp.zeros((1, 32, 32, 3)))["params"]
    target = jax.tree.map(lambda p: p + 0.01, params)
    images = jax.random.normal(key, (10, 32, 32, 3))
    labels = jnp.arange(10)
    batches = matching.sample_student_batches(jax.random.PRNGKey(1), 10, None, n)

    def apply_fn(p, x):
        # the chosen formulation in place of the library's, for this trace only
        models.conv2d = lambda x, k, *, stride=1, padding, impl_=impl, **_: dispatch(
            x, k, stride=stride, padding=padding, impl=impl_
        )
        try:
            return net.apply({"params": p}, x)
        finally:
            models.conv2d = orig

    def loss(x, a):
        return matching.matching_loss(apply_fn, x, labels, a, params, target, batches)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--impls", default="patches,shifted,rows")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args()
    impls = args.impls.split(",")
    lr = jnp.asarray(0.01)
    fns = {}
    for impl in impls:
        f, x = build(impl, args.steps)
        t = time.perf_counter()
        jax.block_until_ready(f(x, lr))
        fns[impl] = (f, x)
        print(f"{impl}: compile and first call {time.perf_counter() - t:.1f} s", flush=True)
    times = {i: [] for i in impls}
    for _ in range(args.calls):
        for impl in impls:
            f, x = fns[impl]
            t = time.perf_counter()
            jax.block_until_ready(f(x, lr))
            times[impl].append(time.perf_counter() - t)
    for impl in impls:
        ms = [round(1000 * t) for t in times[impl]]
        print(f"{impl}: ms {ms} median {round(1000 * float(np.median(times[impl])))}", flush=True)


if __name__ == "__main__":
    main()

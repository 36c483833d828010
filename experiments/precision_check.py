r"""Hypergradient accuracy of fast matmul precisions (TF32/bf16 passes) against ``highest``.

On GPUs, XLA may run float32 matmuls and convolutions with TF32 ("default" precision). This
script computes the exact MTT hypergradient of one outer iteration at ``highest`` precision and
at the others, and prints one JSON line per precision with the relative error of dL/dX and the
time per iteration, so the precision can be chosen on evidence::

    python -m experiments.precision_check --config=c10-ipc10

On the CPU all precisions compute the same thing (the errors are 0).
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from experiments.bench import CONFIGS, resolve_shape

# The shape flags (--config, --num_classes, --res, --width, --iters...) are experiments.bench's.
FLAGS = flags.FLAGS
flags.DEFINE_list(
    "precisions", ["highest", "high", "default"], "jax.default_matmul_precision values."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config and FLAGS.config not in CONFIGS:
        raise app.UsageError(f"unknown --config {FLAGS.config!r}; choose from {list(CONFIGS)}")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from satm_jax import augment, matching, models

    shape = resolve_shape()
    c, ipc, res, ch = shape["num_classes"], shape["ipc"], shape["res"], shape["channels"]
    net = models.ConvNet(num_classes=c, width=shape["width"], depth=shape["depth"])
    apply_fn = models.make_apply_fn(net)
    key = jax.random.PRNGKey(0)
    start = net.init(key, jnp.zeros((1, res, res, ch)))["params"]
    target = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(key, p.shape), start)
    x = jax.random.normal(key, (c * ipc, res, res, ch))
    y = jnp.repeat(jnp.arange(c, dtype=jnp.int32), ipc)
    batches = matching.sample_student_batches(key, c * ipc, shape["batch_syn"], shape["syn_steps"])
    aug = augment.make_augment("color_crop_cutout_flip_scale_rotate")

    def grad(prec):
        with jax.default_matmul_precision(prec):
            f = jax.jit(
                jax.grad(
                    lambda xx: matching.matching_loss(
                        apply_fn, xx, y, 0.01, start, target, batches, augment_fn=aug
                    )
                )
            )
            g = jax.block_until_ready(f(x))
            t0 = time.perf_counter()
            for _ in range(FLAGS.iters):
                g = jax.block_until_ready(f(x))
        return np.asarray(g), (time.perf_counter() - t0) / FLAGS.iters

    ref, t_ref = grad("highest")
    for prec in FLAGS.precisions:
        g, t = (ref, t_ref) if prec == "highest" else grad(prec)
        rel = float(np.linalg.norm(g - ref) / np.linalg.norm(ref))
        cos = float(np.vdot(g, ref) / (np.linalg.norm(g) * np.linalg.norm(ref)))
        print(
            json.dumps(
                {
                    "config": FLAGS.config or "custom",
                    "precision": prec,
                    "rel_error": rel,
                    "cosine": cos,
                    "ms_per_iter": round(1000 * t, 2),
                    "backend": jax.default_backend(),
                    "device": jax.devices()[0].device_kind,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

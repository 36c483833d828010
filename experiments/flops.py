r"""FLOP and memory-traffic counts of one outer iteration, from XLA's cost analysis.

For each named shape of ``experiments.bench`` and each mode, the outer step is traced with the
student unrolled (``matching.unrolled_scans``: XLA's cost analysis counts a loop body once,
whatever its trip count) and lowered, not run; XLA's count of floating point operations and
bytes accessed in that (unoptimised) program is printed as one JSON line, with what it implies
on an H100 SXM (494 TFLOP/s dense TF32, 67 TFLOP/s FP32 without tensor cores, 3.35 TB/s HBM3)::

    python -m experiments.flops --config=c10-ipc10,c100-ipc50 --mode=exact,satm

* ``h100_floor_ms_tf32`` / ``h100_floor_ms_fp32``: FLOPs / peak rate, a hard lower bound on
  the time at that precision.
* ``gbyte_unfused`` and ``h100_ms_unfused_bytes``: every HLO operation's operands and result
  read/written once from memory, i.e. before XLA's fusion; an upper estimate of the memory
  traffic, not a floor.

The convolution is ``lax.conv_general_dilated`` (what runs on a GPU) whatever the local
backend. ``--config`` and ``--mode`` are experiments.bench's flags.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from experiments.bench import CONFIGS, distill_config

# ``--config`` (comma-separated named shapes) and ``--mode`` are experiments.bench's flags.
FLAGS = flags.FLAGS

H100 = {"tf32_flops": 494e12, "fp32_flops": 67e12, "hbm_bytes": 3.35e12}


def count(name: str, mode: str) -> dict:
    import jax
    import jax.numpy as jnp

    from satm_jax import augment, distill, expert_store, matching, models

    shape = dict(CONFIGS[name], channels=3, width=128)
    c, ipc, res = shape["num_classes"], shape["ipc"], shape["res"]
    cfg = distill_config(shape, mode, None, True, 1, "color_crop_cutout_flip_scale_rotate")
    net = models.ConvNet(num_classes=c, width=128, depth=shape["depth"], conv_impl="lax")
    params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3))))
    params = params["params"]
    bank = expert_store.ExpertBank(
        jax.tree.map(lambda p: jax.ShapeDtypeStruct((1, 2, *p.shape), p.dtype), params)
    )
    images = jax.ShapeDtypeStruct((c * ipc, res, res, 3), jnp.float32)
    labels = jnp.repeat(jnp.arange(c, dtype=jnp.int32), ipc)
    state = jax.eval_shape(lambda x: distill.init_state(cfg, x, labels), images)
    step = distill.make_outer_step(
        models.make_apply_fn(net), augment.make_augment(cfg.dsa_strategy), cfg
    )
    # Lowered (not compiled) with the student unrolled: XLA counts a loop body only once, and
    # compiling hundreds of unrolled network steps would take minutes per shape.
    with matching.unrolled_scans():
        ca = jax.jit(step).lower(state, bank).cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    flops = float(ca.get("flops", 0.0))
    nbytes = float(ca.get("bytes accessed", 0.0))
    return {
        "config": name,
        "mode": mode,
        "gflop": round(flops / 1e9, 2),
        "gbyte_unfused": round(nbytes / 1e9, 2),
        "h100_floor_ms_tf32": round(1e3 * flops / H100["tf32_flops"], 2),
        "h100_floor_ms_fp32": round(1e3 * flops / H100["fp32_flops"], 2),
        "h100_ms_unfused_bytes": round(1e3 * nbytes / H100["hbm_bytes"], 2),
        "backend_counted_on": jax.default_backend(),
    }


def main(argv):
    del argv
    if not FLAGS.config:
        raise app.UsageError(f"--config: one or more of {', '.join(CONFIGS)}")
    names = FLAGS.config.split(",")
    bad = [n for n in names if n not in CONFIGS] + [
        m for m in FLAGS.mode if m not in ("exact", "truncated", "satm")
    ]
    if bad:
        raise app.UsageError(f"unknown {bad}: configs {list(CONFIGS)}, modes exact/truncated/satm")
    for name in names:
        for mode in FLAGS.mode:
            print(json.dumps(count(name, mode)), flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

r"""FLOP and memory-traffic counts of one outer iteration, from XLA's cost analysis.

For each named shape of ``experiments.bench`` and each mode, the jit-compiled outer step is
lowered and compiled for the local backend (no step is run) and XLA's own count of floating
point operations and bytes accessed is printed as one JSON line, with the time floors these
imply on an H100 SXM (989 TFLOP/s dense bf16, 494 TFLOP/s dense TF32, 67 TFLOP/s FP32
non-tensor, 3.35 TB/s HBM3)::

    python -m experiments.flops --config=c10-ipc10,c100-ipc50 --mode=exact,satm

The convolution is forced to ``lax.conv_general_dilated`` (what runs on a GPU) whatever the
local backend; the byte count reflects the local backend's fusion decisions and is therefore
only indicative of a GPU's.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from experiments.bench import CONFIGS, distill_config

FLAGS = flags.FLAGS
flags.DEFINE_list("config", ["c10-ipc10"], f"Named shapes: {', '.join(CONFIGS)}.")
flags.DEFINE_list("mode", ["exact", "satm"], "exact, truncated, satm.")

H100 = {"tf32_flops": 494e12, "fp32_flops": 67e12, "hbm_bytes": 3.35e12}


def count(name: str, mode: str) -> dict:
    import jax
    import jax.numpy as jnp

    from satm_jax import augment, distill, experts, models

    shape = dict(CONFIGS[name], channels=3, width=128)
    c, ipc, res = shape["num_classes"], shape["ipc"], shape["res"]
    cfg = distill_config(shape, mode, None, True, 1, "color_crop_cutout_flip_scale_rotate")
    net = models.ConvNet(num_classes=c, width=128, depth=shape["depth"], conv_impl="lax")
    params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3))))
    params = params["params"]
    bank = experts.ExpertBank(
        jax.tree.map(lambda p: jax.ShapeDtypeStruct((1, 2, *p.shape), p.dtype), params)
    )
    images = jax.ShapeDtypeStruct((c * ipc, res, res, 3), jnp.float32)
    labels = jnp.repeat(jnp.arange(c, dtype=jnp.int32), ipc)
    state = jax.eval_shape(lambda x: distill.init_state(cfg, x, labels), images)
    step = distill.make_outer_step(
        models.make_apply_fn(net), augment.make_augment(cfg.dsa_strategy), cfg
    )
    compiled = jax.jit(step).lower(state, bank).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    flops = float(ca.get("flops", 0.0))
    nbytes = float(ca.get("bytes accessed", 0.0))
    return {
        "config": name,
        "mode": mode,
        "gflop": round(flops / 1e9, 2),
        "gbyte_accessed": round(nbytes / 1e9, 2),
        "h100_floor_ms_tf32": round(
            1e3 * max(flops / H100["tf32_flops"], nbytes / H100["hbm_bytes"]), 2
        ),
        "h100_floor_ms_fp32": round(
            1e3 * max(flops / H100["fp32_flops"], nbytes / H100["hbm_bytes"]), 2
        ),
        "backend_counted_on": jax.default_backend(),
    }


def main(argv):
    del argv
    for name in FLAGS.config:
        for mode in FLAGS.mode:
            print(json.dumps(count(name, mode)), flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

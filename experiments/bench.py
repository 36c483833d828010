r"""Benchmark one outer iteration (or one evaluation) on random data of the right shapes.

Speed does not depend on the pixels, so random images, a random ConvNet and random expert
checkpoints stand in for real ones. Prints one JSON line per run::

    {"config": ..., "mode": ..., "ms_per_iter": median after compilation, "compile_s": ...,
     "peak_mem_gib": device peak bytes in use (CPU: process peak RSS), "backend": ...,
     "device": ..., ...}

Named configs (``--config``), as in the performance issue / anchors.md:

=============  =========================================================
c10-ipc10      10 x 10 images, 32 px, depth 3, N = 30, full batch
c100-ipc50     100 x 50, 32 px, depth 3, N = 80, batch_syn 125
tiny-ipc10     200 x 10, 64 px, depth 4, N = 20, batch_syn 200
tiny-ipc50     200 x 50, 64 px, depth 4, N = 20, batch_syn 300
in1k-ipc1      1000 x 1, 64 px, depth 4, N = 10, batch_syn 100
cpu-n2         10 x 1, 32 px, depth 3, N = 2, full batch (MTT's CPU anchor)
cpu-n50        10 x 1, 32 px, depth 3, N = 50, full batch (MTT's CPU anchor)
=============  =========================================================

Modes: ``exact`` (MTT's hypergradient through all N steps), ``truncated`` (last K steps,
``--truncate``, default ceil(N/3)), ``satm`` (the ``satm`` method's outer loop: SAM +
trajectory reusing + truncation to K = ceil(N/3) + ``configs.SATM_LR_UPDATE``), ``eval``
(``--num_eval`` ConvNets trained ``--eval_epochs`` epochs on the synthetic set;
``ms_per_iter`` is then the whole evaluation), ``expert`` (``--num_experts`` experts trained together, as ``satm_jax.experts`` does, for
``--expert_epochs`` epochs on ``--expert_images`` images at MTT's expert settings: SGD lr 0.01,
no momentum or weight decay, minibatches of 256; ``ms_per_iter`` is then the whole training,
after one warm-up epoch).

Examples::

    python -m experiments.bench --config=cpu-n2 --mode=exact
    python -m experiments.bench --config=c10-ipc10 --mode=exact,satm --iters=5
    python -m experiments.bench --config=c10-ipc10 --mode=eval --eval_epochs=1000
    python -m experiments.bench --config=c10-ipc10 --mode=expert --expert_images=5000
    python -m experiments.bench --config=cpu-n2 --syn_steps=10 --dsa_strategy=none --profile
"""

from __future__ import annotations

import json
import resource
import sys
import time

from absl import app, flags

from satm_jax.matching import SECOND_ORDER, resolve_second_order
from satm_jax.models import CONV_IMPLS, resolve_conv_impl
from satm_jax.train import MODEL_AXES

CONFIGS: dict[str, dict] = {
    "c10-ipc10": dict(num_classes=10, ipc=10, res=32, depth=3, syn_steps=30, batch_syn=None),
    "c100-ipc50": dict(num_classes=100, ipc=50, res=32, depth=3, syn_steps=80, batch_syn=125),
    "tiny-ipc10": dict(num_classes=200, ipc=10, res=64, depth=4, syn_steps=20, batch_syn=200),
    "tiny-ipc50": dict(num_classes=200, ipc=50, res=64, depth=4, syn_steps=20, batch_syn=300),
    "in1k-ipc1": dict(num_classes=1000, ipc=1, res=64, depth=4, syn_steps=10, batch_syn=100),
    "cpu-n2": dict(num_classes=10, ipc=1, res=32, depth=3, syn_steps=2, batch_syn=None),
    "cpu-n50": dict(num_classes=10, ipc=1, res=32, depth=3, syn_steps=50, batch_syn=None),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, f"Named config: {', '.join(CONFIGS)} (flags below override).")
flags.DEFINE_list("mode", ["exact"], "exact, truncated, satm, eval, expert (comma-separated).")
flags.DEFINE_integer("num_classes", None, "Classes.")
flags.DEFINE_integer("ipc", None, "Images per class.")
flags.DEFINE_integer("res", None, "Image side in pixels.")
flags.DEFINE_integer("channels", 3, "Image channels.")
flags.DEFINE_integer("width", 128, "ConvNet width.")
flags.DEFINE_integer("depth", None, "ConvNet depth.")
flags.DEFINE_integer("syn_steps", None, "Inner steps N.")
flags.DEFINE_integer("batch_syn", None, "Synthetic minibatch (default: the whole set).")
flags.DEFINE_integer("truncate", None, "K for --mode=truncated (default ceil(N/3)).")
flags.DEFINE_integer("iters", 5, "Timed iterations after compilation.")
flags.DEFINE_integer("steps_per_call", 1, "Outer iterations per jit call.")
flags.DEFINE_bool("remat", True, "jax.checkpoint every differentiated inner step.")
flags.DEFINE_enum(
    "second_order",
    "auto",
    list(SECOND_ORDER),
    "How the hypergradient differentiates the inner steps' gradients "
    "(satm_jax.matching.SECOND_ORDER).",
)
flags.DEFINE_enum("conv_impl", "auto", list(CONV_IMPLS), "Convolution implementation.")
flags.DEFINE_string("dsa_strategy", "color_crop_cutout_flip_scale_rotate", "DSA families.")
flags.DEFINE_integer("eval_epochs", 1000, "Epochs for --mode=eval.")
flags.DEFINE_integer("num_eval", 5, "Networks for --mode=eval.")
flags.DEFINE_integer("expert_images", 5000, "Training images for --mode=expert.")
flags.DEFINE_integer("expert_epochs", 1, "Timed epochs for --mode=expert.")
flags.DEFINE_integer("num_experts", 1, "Experts trained together (vmap) for --mode=expert.")
flags.DEFINE_bool("data_parallel", False, "Split inner minibatches across all devices.")
flags.DEFINE_enum(
    "model_axis",
    "auto",
    list(MODEL_AXES),
    "How --mode=eval's networks and --mode=expert's experts share one program "
    "(satm_jax.train.over_models).",
)
flags.DEFINE_bool(
    "profile",
    False,
    "Also trace the timed iterations with jax.profiler and add op_ms: time per iteration by "
    "operation kind (experiments.op_profile); for eval and expert, per whole evaluation or "
    "training epoch.",
)


def _peak_mem_gib() -> float:
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def distill_config(
    shape: dict,
    mode: str,
    truncate: int | None,
    remat: bool,
    spc: int,
    dsa: str,
    second_order: str = "auto",
):
    from satm_jax import matching
    from satm_jax.distill import DistillConfig
    from satm_jax.experiment import configs

    n = shape["syn_steps"]
    k = truncate or matching.default_truncation(n)
    common = dict(
        ipc=shape["ipc"],
        syn_steps=n,
        expert_epochs=1,
        max_start_epoch=1,
        lr_img=100.0,
        batch_syn=shape["batch_syn"],
        remat=remat,
        second_order=second_order,
        steps_per_call=spc,
        dsa_strategy=dsa,
    )
    if mode == "exact":
        return DistillConfig(**common, hypergrad="exact", lr_update="backprop")
    if mode == "truncated":
        return DistillConfig(**common, hypergrad="truncated", truncate=k, lr_update="backprop")
    if mode == "satm":
        return DistillConfig(**common, **configs.method_settings("satm", n, rho=0.05))
    raise ValueError(f"unknown mode {mode!r}")


def bench_distill(shape: dict, mode: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from satm_jax import augment, distill, expert_store, models, parallel

    c, ipc, res, ch = shape["num_classes"], shape["ipc"], shape["res"], shape["channels"]
    cfg = distill_config(
        shape,
        mode,
        FLAGS.truncate,
        FLAGS.remat,
        FLAGS.steps_per_call,
        FLAGS.dsa_strategy,
        FLAGS.second_order,
    )
    net = models.ConvNet(
        num_classes=c, width=shape["width"], depth=shape["depth"], conv_impl=FLAGS.conv_impl
    )
    key = jax.random.PRNGKey(0)
    params = net.init(key, jnp.zeros((1, res, res, ch)))["params"]
    target = jax.tree.map(lambda p: p + 0.01, params)
    bank = expert_store.ExpertBank(
        jax.tree.map(lambda a, b: jnp.stack([a, b])[None], params, target)
    )
    images = jax.random.normal(key, (c * ipc, res, res, ch))
    labels = jnp.repeat(jnp.arange(c, dtype=jnp.int32), ipc)
    mesh = parallel.make_mesh() if FLAGS.data_parallel else None
    step = distill.make_outer_step(
        models.make_apply_fn(net), augment.make_augment(cfg.dsa_strategy), cfg, mesh=mesh
    )
    run = distill.make_multi_step(step, cfg.steps_per_call)
    state = distill.init_state(cfg, images, labels)
    if mesh is not None:
        state, bank = parallel.replicate((state, bank), mesh)
    t0 = time.perf_counter()
    state, m = run(state, bank)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(FLAGS.iters):
        t0 = time.perf_counter()
        state, m = run(state, bank)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / cfg.steps_per_call)
    out = {
        "ms_per_iter": round(1000 * float(np.median(times)), 2),
        "compile_s": round(compile_s, 2),
        "truncate": cfg.truncation,
        "loss_finite": bool(np.all(np.isfinite(np.asarray(m["loss"])))),
    }
    if FLAGS.profile:
        from experiments import op_profile

        def once():
            nonlocal state
            state, metrics = run(state, bank)
            jax.block_until_ready(metrics)

        op_ms = op_profile.traced(FLAGS.iters, once)
        out["op_ms"] = {k: round(v / cfg.steps_per_call, 2) for k, v in op_ms.items()}
    return out


def bench_eval(shape: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from satm_jax import evaluate, models
    from satm_jax import train as train_lib

    c, ipc, res, ch = shape["num_classes"], shape["ipc"], shape["res"], shape["channels"]
    net = models.ConvNet(
        num_classes=c, width=shape["width"], depth=shape["depth"], conv_impl=FLAGS.conv_impl
    )
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (c * ipc, res, res, ch))
    y = jnp.repeat(jnp.arange(c, dtype=jnp.int32), ipc)
    xt, yt = x[:256], y[:256]
    cfg = evaluate.EvalConfig(
        epochs=FLAGS.eval_epochs,
        num_models=FLAGS.num_eval,
        dsa_strategy=FLAGS.dsa_strategy,
        epochs_per_call=min(100, FLAGS.eval_epochs),
    )
    t0 = time.perf_counter()
    ev = lambda: evaluate.evaluate_set(  # noqa: E731
        net, x, y, 0.01, xt, yt, cfg, progress=False, model_axis=FLAGS.model_axis
    )
    ev()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev()
    second = time.perf_counter() - t0
    out = {
        "ms_per_iter": round(1000 * second, 1),
        "compile_s": round(max(first - second, 0.0), 2),
        "eval_epochs": FLAGS.eval_epochs,
        "num_eval": FLAGS.num_eval,
        "model_axis": train_lib.resolve_model_axis(FLAGS.model_axis),
    }
    if FLAGS.profile:
        out["op_ms"] = _profile(ev)
    return out


def bench_expert(shape: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from satm_jax import augment, experts, models
    from satm_jax import train as train_lib

    c, res, ch = shape["num_classes"], shape["res"], shape["channels"]
    net = models.ConvNet(
        num_classes=c, width=shape["width"], depth=shape["depth"], conv_impl=FLAGS.conv_impl
    )
    cfg = experts.ExpertConfig(dsa_strategy=FLAGS.dsa_strategy)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (FLAGS.expert_images, res, res, ch))
    y = jnp.arange(FLAGS.expert_images, dtype=jnp.int32) % c
    init, epoch = experts.make_expert_trainer(
        net, x.shape[1:], cfg, augment.make_augment(cfg.dsa_strategy), FLAGS.model_axis
    )
    keys = jax.random.split(key, FLAGS.num_experts)
    states = init(keys)
    t0 = time.perf_counter()
    states, m = epoch(states, keys, x, y)  # warm-up: compilation and the first epoch
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for e in range(FLAGS.expert_epochs):
        states, m = epoch(states, jax.vmap(lambda k: jax.random.fold_in(k, e))(keys), x, y)
    jax.block_until_ready(m)
    total = time.perf_counter() - t0
    out = {
        "ms_per_iter": round(1000 * total, 1),
        "compile_s": round(max(first - total / FLAGS.expert_epochs, 0.0), 2),
        "expert_images": FLAGS.expert_images,
        "expert_epochs": FLAGS.expert_epochs,
        "num_experts": FLAGS.num_experts,
        "model_axis": train_lib.resolve_model_axis(FLAGS.model_axis),
    }
    if FLAGS.profile:

        def once():
            _, metrics = epoch(states, keys, x, y)
            jax.block_until_ready(metrics)

        out["op_ms"] = _profile(once, calls=FLAGS.expert_epochs)
    return out


def _profile(fn, calls: int = 1) -> dict[str, float]:
    """``op_ms`` of ``calls`` calls of ``fn`` (which blocks): ms per call by operation kind."""
    from experiments import op_profile

    return op_profile.traced(calls, fn)


def resolve_shape() -> dict:
    shape = dict(CONFIGS[FLAGS.config]) if FLAGS.config else {}
    for k in ("num_classes", "ipc", "res", "depth", "syn_steps", "batch_syn"):
        if FLAGS[k].value is not None:
            shape[k] = FLAGS[k].value
    missing = [k for k in ("num_classes", "ipc", "res", "syn_steps") if k not in shape]
    if missing:
        raise app.UsageError(f"give --config or {', '.join('--' + m for m in missing)}")
    shape.setdefault("depth", None)
    shape.setdefault("batch_syn", None)
    shape["channels"] = FLAGS.channels
    shape["width"] = FLAGS.width
    return shape


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config and FLAGS.config not in CONFIGS:
        raise app.UsageError(f"unknown --config {FLAGS.config!r}; choose from {list(CONFIGS)}")
    import jax

    shape = resolve_shape()
    for mode in FLAGS.mode:
        if mode == "eval":
            out = bench_eval(shape)
        elif mode == "expert":
            out = bench_expert(shape)
        else:
            out = bench_distill(shape, mode)
        rec = {
            "config": FLAGS.config or "custom",
            "mode": mode,
            **out,
            "peak_mem_gib": round(_peak_mem_gib(), 3),
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind),
            "num_devices": len(jax.devices()),
            "shape": shape,
            "remat": FLAGS.remat,
            "second_order": resolve_second_order(FLAGS.second_order),
            "conv_impl": resolve_conv_impl(FLAGS.conv_impl),
            "steps_per_call": FLAGS.steps_per_call,
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

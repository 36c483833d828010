r"""What ``--eval_ood`` adds to an evaluation's time, measured side by side.

Trains the evaluation networks on random real images (``--ipc`` per class) with a preset's
evaluation protocol, once without and once with the corrupted test sets of ``--eval_ood``
(alternating, ``--repeats`` times each), and prints the median wall times and the overhead
(building the corrupted sets counted once per request, as the pipeline does)::

    python -m experiments.ood_overhead --dataset=fashion_mnist --ipc=1 --preset=cpu \
        --eval_ood=all --ood_samples=1000

Prints one JSON line with the timings.
"""

from __future__ import annotations

import json
import platform
import sys
import time

from absl import app, flags

from experiments import ood_flags

flags.DEFINE_string("dataset", "fashion_mnist", "Dataset name.")
flags.DEFINE_integer("ipc", 1, "Images per class of the evaluated (random real) set.")
flags.DEFINE_string("preset", "cpu", "Preset whose evaluation protocol is timed.")
flags.DEFINE_string("data_dir", None, "Dataset folder.")
flags.DEFINE_integer("repeats", 1, "Timed evaluations with and without OOD, alternating.")
flags.DEFINE_integer("epochs", None, "Override the protocol's epochs (default: the preset's).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import dataclasses

    import jax
    import numpy as np

    from satm_jax import datasets
    from satm_jax.experiment import configs, pipeline

    if not FLAGS.eval_ood:
        raise app.UsageError("--eval_ood is required (e.g. --eval_ood=all)")
    cfg = configs.make_run_config(FLAGS.dataset, FLAGS.ipc, "mtt", FLAGS.preset, {}, FLAGS.data_dir)
    if FLAGS.epochs:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, epochs=FLAGS.epochs))
    prepared = pipeline.prepare_data(
        datasets.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir), cfg.preprocessing
    )
    request = ood_flags.ood_from_flags(FLAGS.dataset, FLAGS.data_dir)
    t = time.perf_counter()
    sets = pipeline.ood_test_sets(prepared, request)
    build_s = time.perf_counter() - t
    plain, with_ood = [], []
    for _ in range(FLAGS.repeats):
        for extra, out in ((None, plain), (request, with_ood)):
            t = time.perf_counter()
            res = pipeline.random_baseline(cfg, prepared, progress=False, ood=extra)
            jax.block_until_ready(res.accs)
            out.append(time.perf_counter() - t)
    p, w = float(np.median(plain)), float(np.median(with_ood))
    print(
        json.dumps(
            {
                "dataset": FLAGS.dataset,
                "ipc": FLAGS.ipc,
                "preset": FLAGS.preset,
                "eval": dataclasses.asdict(cfg.eval),
                "ood": request.identity(),
                "test_sets": len(sets),
                "build_s": round(build_s, 2),
                "eval_s": [round(x, 2) for x in plain],
                "eval_ood_s": [round(x, 2) for x in with_ood],
                "overhead": round((w + build_s - p) / p, 4),
                "overhead_without_build": round((w - p) / p, 4),
                "host": platform.processor() or platform.machine(),
                "backend": jax.default_backend(),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

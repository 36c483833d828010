"""Evaluate saved condensed sets (``distilled.npz``) again: other step sizes, other networks.

    python -m experiments.evaluate --distilled=/tmp/satm_demo/runs/digits_ipc10_satm/distilled.npz
    python -m experiments.evaluate --distilled=a.npz,b.npz --lr=0.025,0.04 --out=swap.json
    python -m experiments.evaluate --distilled=a.npz --eval_models=convnet,resnet18
    python -m experiments.evaluate --distilled=a.npz --eval_ood=all --out=ood.json

Each set is evaluated with the protocol of the run that made it (its config is stored in the
file): with no other flags the accuracies are the ones that run reported. ``--lr`` evaluates
every set with each listed step size instead of its own learned one (``own`` names the set's
own); ``--eval_models`` adds architectures. Prints one JSON line per (set, step size,
network) and, with ``--out``, writes them all to a JSON file (with ``--eval_ood``, also
``<out stem>_ood.md`` and ``<out stem>_ood.png``). Runs in seconds to minutes on a
CPU for small sets (5 networks x 500 epochs on Fashion-MNIST IPC 10: about 4 minutes on 2
cores).
"""

import json
import os
import sys

from absl import app, flags, logging

from experiments import eval_models_flags, ood_flags  # noqa: F401 (ood_flags: --eval_ood)

flags.DEFINE_list("distilled", None, "distilled.npz files to evaluate.", required=True)
flags.DEFINE_list("lr", ["own"], "Step sizes to evaluate with; 'own' = the set's learned one.")
flags.DEFINE_integer("num_eval", None, "Evaluation networks per set (default: the run's).")
flags.DEFINE_integer("eval_epochs", None, "Training epochs (default: the run's).")
flags.DEFINE_integer(
    "eval_width", None, "Width of the evaluation ConvNet (default: the run's; published: 128)."
)
flags.DEFINE_string("data_dir", None, "Dataset folder (default: the run's).")
flags.DEFINE_string("out", None, "Write all rows to this JSON file.")
flags.DEFINE_bool("progress", True, "Progress bars.")
FLAGS = flags.FLAGS


def parse_lrs(values: list[str]) -> list[float | None]:
    """``['own', '0.02']`` -> ``[None, 0.02]``; raises ValueError on anything else."""
    out: list[float | None] = []
    for v in values:
        if v == "own":
            out.append(None)
            continue
        try:
            x = float(v)
        except ValueError:
            raise ValueError(f"--lr takes numbers or 'own', got {v!r}") from None
        if not x > 0:
            raise ValueError(f"--lr must be positive, got {v!r}")
        out.append(x)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from satm_jax import datasets
    from satm_jax import ood as ood_lib
    from satm_jax.experiment import configs, pipeline

    rows = []
    try:
        lrs = parse_lrs(FLAGS.lr)
        eval_models = eval_models_flags.eval_models_from_flags()
        for path in FLAGS.distilled:
            for lr in lrs:
                for row in pipeline.evaluate_distilled(
                    path,
                    lr=lr,
                    eval_models=eval_models,
                    num_models=FLAGS.num_eval,
                    epochs=FLAGS.eval_epochs,
                    width=FLAGS.eval_width,
                    data_dir=FLAGS.data_dir,
                    progress=FLAGS.progress,
                    eval_ood=FLAGS.eval_ood,
                    ood_source=FLAGS.ood_source,
                    ood_samples=FLAGS.ood_samples,
                ):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    except (
        ValueError,
        OSError,
        configs.ConfigError,
        datasets.DatasetError,
        ood_lib.corruptions_lib.CorruptionDataError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if FLAGS.out and rows:
            with open(FLAGS.out, "w") as f:
                json.dump(rows, f, indent=1)
            stem = os.path.splitext(os.path.basename(FLAGS.out))[0] + "_ood"
            ood_lib.write_report(os.path.dirname(os.path.abspath(FLAGS.out)), rows, stem=stem)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

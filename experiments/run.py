r"""Condense a dataset with MTT and SATM, evaluate, and print one table.

With no flags it runs the whole pipeline on scikit-learn's digits (embedded, no download):
experts, then MTT and SATM at IPC 1 and 10, then evaluation against random real images and the
full training set (about 5 minutes on 2 CPU cores)::

    python -m experiments.run

Other datasets read their official files from ``--data_dir`` (see ``satm_jax.datasets``)::

    python -m experiments.run --dataset=fashion_mnist --ipc=1 --preset=cpu
    python -m experiments.run --dataset=cifar10 --ipc=10 --method=satm --data_dir=~/data

Any preset field can be overridden by a flag (``--lr_img=1000 --syn_steps=30 ...``); results go
to ``<workdir>/results.json``, ``results.md`` and ``runs/*/``. ``--eval_ood=all`` also tests
every evaluated set on corrupted test data (``results_ood.md``, ``results_ood.png``, and an
``"ood"`` object per row; see ``satm_jax.ood``)::

    python -m experiments.run --dataset=fashion_mnist --ipc=1 --preset=cpu --eval_ood=all
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from experiments import errors, eval_models_flags, flatness_flags, knobs, ood_flags
from satm_jax.experiment import configs as configs_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("dataset", "digits", "Dataset name (satm_jax.datasets.DATASETS).")
flags.DEFINE_list(
    "ipc", None, "Images per class, comma-separated (default: 1,10 on digits, else 1)."
)
flags.DEFINE_list("method", ["mtt", "satm"], "Methods to run: mtt, satm (comma-separated).")
flags.DEFINE_string("workdir", "./workdir", "Output folder (experts, runs, results).")
flags.DEFINE_string("data_dir", None, "Folder holding the dataset's official files.")
flags.DEFINE_enum(
    "preset",
    "auto",
    list(configs_lib.PRESETS),
    "Hyperparameter preset: default (digits), paper (published), cpu (reduced).",
)
flags.DEFINE_bool("baselines", True, "Also evaluate random real images and the full training set.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_string(
    "dsa_strategy",
    None,
    "DSA families everywhere, e.g. color_crop_cutout_flip_scale_rotate or none.",
)

# Every preset field with a flag: name, type, help and choices come from satm_jax.experiment.configs
# (OVERRIDES, SECTIONS, CHOICES) and the fields' docstrings; nothing is listed twice here.
OVERRIDE_FLAGS = knobs.define_override_flags(
    configs_lib.OVERRIDES, configs_lib.SECTIONS, configs_lib.CHOICES, skip=("eval_models",)
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0; calls jax.distributed.initialize before any work.",
)
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def overrides_from_flags() -> dict:
    names = [*OVERRIDE_FLAGS, "dsa_strategy"]
    out = {n: FLAGS[n].value for n in names if FLAGS[n].value is not None}
    models = eval_models_flags.eval_models_from_flags()
    if models is not None:
        out["eval_models"] = models
    return out


def build_configs(
    dataset: str,
    ipcs: list[int],
    methods: list[str],
    preset: str,
    overrides: dict,
    data_dir: str | None,
) -> list[configs_lib.RunConfig]:
    """One RunConfig per (ipc, method); raises ConfigError/DatasetError on bad names."""
    from satm_jax import datasets as data_lib

    data_lib.check_dataset_name(dataset)
    return configs_lib.make_run_configs(dataset, ipcs, methods, preset, overrides, data_dir)


def parse_ipcs(values: list[str] | None, dataset: str) -> list[int]:
    if values is None:
        return [1, 10] if dataset == "digits" else [1]
    out = []
    for v in values:
        try:
            out.append(int(v))
        except ValueError:
            raise configs_lib.ConfigError(f"--ipc takes integers, got {v!r}") from None
    bad = [i for i in out if i < 1]
    if bad:
        raise configs_lib.ConfigError(f"--ipc must be >= 1, got {bad}")
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from satm_jax.experiment import pipeline

    if FLAGS.coordinator_address:
        from satm_jax import parallel

        parallel.initialize_distributed(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
        )
    try:
        ipcs = parse_ipcs(FLAGS.ipc, FLAGS.dataset)
        cfgs = build_configs(
            FLAGS.dataset, ipcs, FLAGS.method, FLAGS.preset, overrides_from_flags(), FLAGS.data_dir
        )
        ood_cfg = ood_flags.ood_from_flags(FLAGS.dataset, FLAGS.data_dir)
        flat_cfg = flatness_flags.flatness_from_flags()
        pipeline.train_and_evaluate(
            cfgs,
            FLAGS.workdir,
            baselines=FLAGS.baselines,
            progress=FLAGS.progress,
            ood=ood_cfg,
            flatness=flat_cfg,
        )
    except errors.user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

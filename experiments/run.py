r"""Condense a dataset with MTT and SATM, evaluate, and print one table.

With no flags it runs the whole pipeline on scikit-learn's digits (embedded, no download):
experts, then MTT and SATM at IPC 1 and 10, then evaluation against random real images and the
full training set (about 5 minutes on 2 CPU cores)::

    python -m experiments.run

Other datasets read their official files from ``--data_dir`` (see ``satm_jax.data``)::

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

from experiments import flatness_flags, ood_flags
from satm_jax import configs as configs_lib
from satm_jax import sharpness as sharpness_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("dataset", "digits", "Dataset name (satm_jax.data.DATASETS).")
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

_INT = [
    "width",
    "depth",
    "num_experts",
    "expert_train_epochs",
    "expert_batch_size",
    "expert_parallel",
    "expert_seed",
    "iterations",
    "syn_steps",
    "expert_epochs",
    "min_start_epoch",
    "max_start_epoch",
    "max_start_epoch_final",
    "batch_syn",
    "truncate",
    "lr_init_samples",
    "steps_per_call",
    "seed",
    "eval_epochs",
    "num_eval",
    "eval_batch_size",
    "eval_width",
    "eval_every",
    "checkpoint_every",
    "full_epochs",
]
_FLOAT = [
    "expert_rho",
    "expert_lr",
    "lr_img",
    "lr_img_rel",
    "lr_lr",
    "lr_log_lr",
    "lr_teacher",
    "rho",
    "sigma",
    "gsam_alpha",
    "asam_eta",
    "lr_label",
    "ema_decay",
]
_BOOL = ["zca", "reuse_trajectory", "soft_labels", "remat", "data_parallel"]
_STR = {
    "model": None,
    "norm": ["instancenorm", "batchnorm", "none"],
    "conv_impl": ["auto", "patches", "lax"],
    "lr_update": ["backprop", "first_order", "fixed"],
    "img_optimizer": ["sgd", "adam"],
    "lr_space": ["linear", "log"],
    "lr_init": ["teacher", "closed_form"],
    "hypergrad": ["exact", "truncated"],
    "sharpness": list(sharpness_lib.SHARPNESS),
    "rho_ball": list(sharpness_lib.BALLS),
    "rho_scale": list(sharpness_lib.RADII),
    "expert_sharpness": ["none", "sam", "asam", "gsam"],
}

for _n in _INT:
    flags.DEFINE_integer(
        _n,
        None,
        f"Override the preset's {configs_lib.OVERRIDES[_n][0]}.{configs_lib.OVERRIDES[_n][1]}.",
    )
for _n in _FLOAT:
    flags.DEFINE_float(
        _n,
        None,
        f"Override the preset's {configs_lib.OVERRIDES[_n][0]}.{configs_lib.OVERRIDES[_n][1]}.",
    )
for _n in _BOOL:
    flags.DEFINE_bool(
        _n,
        None,
        f"Override the preset's {configs_lib.OVERRIDES[_n][0]}.{configs_lib.OVERRIDES[_n][1]}.",
    )
for _n, _choices in _STR.items():
    if _choices:
        flags.DEFINE_enum(
            _n,
            None,
            _choices,
            f"Override the preset's {configs_lib.OVERRIDES[_n][0]}.{configs_lib.OVERRIDES[_n][1]}.",
        )
    else:
        flags.DEFINE_string(
            _n,
            None,
            f"Override the preset's {configs_lib.OVERRIDES[_n][0]}.{configs_lib.OVERRIDES[_n][1]}.",
        )
flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0; calls jax.distributed.initialize before any work.",
)
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_list(
    "eval_models",
    None,
    "Networks the final set is evaluated on, e.g. convnet,resnet18,vgg11,alexnet.",
)


def overrides_from_flags() -> dict:
    names = _INT + _FLOAT + _BOOL + list(_STR) + ["dsa_strategy", "eval_models"]
    return {n: FLAGS[n].value for n in names if FLAGS[n].value is not None}


def build_configs(
    dataset: str,
    ipcs: list[int],
    methods: list[str],
    preset: str,
    overrides: dict,
    data_dir: str | None,
) -> list[configs_lib.RunConfig]:
    """One RunConfig per (ipc, method); raises ConfigError/DatasetError on bad names."""
    from satm_jax import data as data_lib

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
    from satm_jax import corruptions, ood, pipeline
    from satm_jax import data as data_lib
    from satm_jax.checkpoint import CheckpointError
    from satm_jax.distill import DistillError
    from satm_jax.experts import ExpertError

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
    except (
        configs_lib.ConfigError,
        ood.OodError,
        corruptions.CorruptionDataError,
        data_lib.DatasetError,
        ExpertError,
        CheckpointError,
        DistillError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

r"""Class-incremental continual learning with a condensed memory (DM's protocol).

The classes are shuffled by each class-order seed, cut into ``--stages`` stages, and at every
stage a memory method (``random``, ``herding``, ``mtt``, ``satm``) adds ``--ipc`` images per
class of the stage, made from that stage's training images only; a fresh ConvNet is trained
from scratch on the memory and tested on every class seen so far (``satm_jax.experiment.continual`` has
the protocol and our choices). Results: ``<workdir>/continual.json``, ``continual.md``,
``continual.png``; per stage, ``<workdir>/order_<s>/stage_<k>_<hash>/``. A rerun with the same
flags reuses every finished stage (a killed run resumes where it stopped).

Smoke run on scikit-learn's digits (embedded, no download): all 4 methods, 5 stages, 1 class
order, with the smoke budget (``satm_jax.experiment.continual.SMOKE_BUDGET``: 2 experts x 4 epochs per
stage, 20 outer iterations of N = 10 with the calibrated outer loop starting from herding's
picks, 2 evaluation networks x 100 epochs, herding features after 4 epochs)::

    python -m experiments.continual --dataset=digits --preset=default --budget=smoke \
      --stages=5 --ipc=1 --class_orders=0 --workdir=/tmp/continual_digits

Measured on 2026-12-02 on the 2-core development machine while other jobs shared it (load
average 7-9): 12 min 48 s wall, 496 s of CPU, most of it XLA compilation (each stage's
memory has its own shape); with ``--stages=2`` 6 min 1 s (load average 3-6).

Fashion-MNIST, 5 stages of 2 classes, IPC 10, 3 class orders, the 4 methods, with the reduced
budget ``--budget=continual`` (``satm_jax.experiment.continual.CONTINUAL_BUDGET`` on top of the ``cpu``
preset: 2 experts x 5 epochs per stage, 80 outer iterations of N = 10 inner steps starting
from herding's picks, 2 evaluation networks of width 32 for 250 epochs, herding features after
2 epochs)::

    python -m experiments.continual --dataset=fashion_mnist --preset=cpu --budget=continual \
      --stages=5 --ipc=10 --class_orders=0,1,2 --workdir=/tmp/continual_fmnist

Measured (2026-12-04, docs/APPLICATIONS.md, code 9a1f0c3): the three orders in one invocation
took 1 h 58 min wall on the 2-core development CPU, of which 35 min paused by hand, so about
84 min of running (within the 2.5-hour target; its networks were still vmapped: the CPU now
trains them one after another, which docs/PERFORMANCE.md measured 1.3x faster on the
evaluation; the continual run itself was not re-timed).

Any flag of ``experiments.run`` (``--iterations``, ``--eval_epochs``, ``--rho``...) overrides
the preset (and the budget) for every method.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from experiments import errors
from experiments import run as run_lib
from satm_jax.experiment import configs as configs_lib

FLAGS = flags.FLAGS

flags.DEFINE_integer("stages", 5, "Number of stages (must divide the number of classes).")
flags.DEFINE_list("class_orders", ["0", "1", "2", "3", "4"], "Seeds of the class orders.")
flags.DEFINE_integer(
    "herding_epochs", None, "Epochs of herding's feature network (default: the experts' epochs)."
)
flags.DEFINE_float("eval_lr", 0.01, "Learning rate of the evaluation networks (DM: 0.01).")
flags.DEFINE_integer("selection_seed", 0, "Seed of random memories and herding networks.")
flags.DEFINE_enum(
    "budget",
    "preset",
    ["preset", "continual", "smoke"],
    "preset: the preset as it is; continual / smoke: satm_jax.experiment.continual.CONTINUAL_BUDGET / "
    "SMOKE_BUDGET on top of it (explicit flags still win).",
)
flags.DEFINE_bool(
    "compilation_cache",
    True,
    "Keep compiled XLA programs in <workdir>/jax_cache (stages of equal shapes compile once).",
)

DEFAULT_IPC = 10


def parse_ipc(values: list[str] | None) -> int:
    """The single ``--ipc`` value (default ``DEFAULT_IPC``)."""
    if values is None:
        return DEFAULT_IPC
    ipcs = run_lib.parse_ipcs(values, "")
    if len(ipcs) != 1:
        raise configs_lib.ConfigError(f"the continual protocol takes one --ipc, got {ipcs}")
    return ipcs[0]


def parse_orders(values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise configs_lib.ConfigError(f"--class_orders takes integers, got {values}") from None


def build_config():
    """The ``ContinualConfig`` the flags describe (``--method`` defaults to all four)."""
    from satm_jax.experiment import continual

    methods = FLAGS.method if FLAGS["method"].present else list(continual.METHODS)
    overrides = run_lib.overrides_from_flags()
    herding_epochs = FLAGS.herding_epochs
    if FLAGS.budget != "preset":
        overrides, budget_herding = continual.budget_overrides(FLAGS.budget, overrides)
        herding_epochs = budget_herding if herding_epochs is None else herding_epochs
    return continual.ContinualConfig(
        dataset=FLAGS.dataset,
        ipc=parse_ipc(FLAGS.ipc),
        stages=FLAGS.stages,
        methods=tuple(methods),
        class_orders=parse_orders(FLAGS.class_orders),
        preset=FLAGS.preset,
        overrides=overrides,
        lr=FLAGS.eval_lr,
        herding_epochs=herding_epochs,
        seed=FLAGS.selection_seed,
        data_dir=FLAGS.data_dir,
    ).validate()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    import jax

    from satm_jax import datasets as data_lib
    from satm_jax.experiment import continual

    try:
        data_lib.check_dataset_name(FLAGS.dataset)
        ccfg = build_config()
        if FLAGS.compilation_cache:
            jax.config.update(
                "jax_compilation_cache_dir",
                os.path.abspath(os.path.join(FLAGS.workdir, "jax_cache")),
            )
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        continual.run_continual(ccfg, FLAGS.workdir, progress=FLAGS.progress)
    except errors.user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

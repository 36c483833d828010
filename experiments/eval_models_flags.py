"""``--eval_models``, shared by ``experiments.run`` and ``experiments.evaluate``: one
definition; the names are checked by ``satm_jax.experiment.configs.check_eval_models``, the
check the pipeline makes too, here so that a bad name ends the command before any work."""

from __future__ import annotations

from absl import flags

from satm_jax.experiment import configs

flags.DEFINE_list(
    "eval_models",
    None,
    "Networks the final set is evaluated on (default: the run's, convnet), e.g. "
    "convnet,resnet18,vgg11,alexnet (satm_jax.model_registry.MODELS).",
)

FLAGS = flags.FLAGS


def eval_models_from_flags() -> tuple[str, ...] | None:
    """The requested networks (``None`` when the flag is not given).

    Raises:
      satm_jax.experiment.configs.ConfigError: an unknown network name.
    """
    names = FLAGS.eval_models
    if not names:
        return None
    return configs.check_eval_models(names)

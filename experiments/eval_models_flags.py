"""``--eval_models``, shared by ``experiments.run`` and ``experiments.evaluate``: one
definition and one check of the names against ``satm_jax.model_registry.MODELS``."""

from __future__ import annotations

from absl import flags

from satm_jax import model_registry
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
    unknown = [n for n in names if n not in model_registry.MODELS]
    if unknown:
        raise configs.ConfigError(
            f"--eval_models: unknown network(s) {unknown}; choose from {sorted(model_registry.MODELS)}"
        )
    return tuple(names)

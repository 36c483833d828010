"""The ``--flatness`` flags of ``experiments.run``: measure each condensed set's flatness.

``--flatness`` turns the measurement on; every ``--flatness_<field>`` flag is a field of
``satm_jax.flatness.FlatnessConfig`` (its default and help come from there).
"""

from __future__ import annotations

from absl import flags

from experiments import knobs
from satm_jax import flatness
from satm_jax import sharpness as sharpness_lib
from satm_jax.experiment import configs

PREFIX = "flatness_"

flags.DEFINE_bool(
    "flatness",
    False,
    "Also measure each condensed set's flatness on held-out experts (trained for it): "
    "worst-case loss increase in a ball, top Hessian eigenvalue, held-out loss gap; written "
    "to runs/*/flatness.json and a 'flatness' object per row (satm_jax.flatness).",
)
knobs.define_dataclass_flags(
    flatness.FlatnessConfig,
    PREFIX,
    choices={"ball": sharpness_lib.BALLS, "radius_scale": sharpness_lib.RADII},
)

FLAGS = flags.FLAGS


def flatness_from_flags() -> flatness.FlatnessConfig | None:
    """The request (``None`` without ``--flatness``).

    Raises:
      satm_jax.experiment.configs.ConfigError: settings that cannot be measured.
    """
    return config_from_flags() if FLAGS.flatness else None


def config_from_flags() -> flatness.FlatnessConfig:
    """The ``--flatness_*`` settings, whether or not ``--flatness`` is given.

    Raises:
      satm_jax.experiment.configs.ConfigError: settings that cannot be measured.
    """
    try:
        return knobs.dataclass_from_flags(flatness.FlatnessConfig, PREFIX).validate()
    except ValueError as e:
        raise configs.ConfigError(f"--flatness: {e}") from None

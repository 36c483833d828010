"""``--seeds``, shared by the entry points that repeat runs over distillation seeds
(``experiments.ablate``, ``experiments.sharpness_study``): one definition, so that both can be
imported in one process, and one parser."""

from absl import flags

from satm_jax.experiment import configs as configs_lib

flags.DEFINE_list("seeds", ["0"], "Distillation seeds; every variant or point runs once per seed.")


def numbers(flag: str, values: list[str], kind: type = int) -> list:
    """``values`` (a list flag's items) as numbers of ``kind``.

    Raises:
      ConfigError: an item that is not such a number, naming ``--flag``.
    """
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise configs_lib.ConfigError(
            f"--{flag} takes a comma-separated list of {kind.__name__}s, got {','.join(values)!r}"
        ) from None


def seeds() -> list[int]:
    """``--seeds`` as integers (``ConfigError`` naming the flag otherwise)."""
    return numbers("seeds", flags.FLAGS.seeds, int)

"""``--seeds``, shared by the entry points that repeat runs over distillation seeds
(``experiments.ablate``, ``experiments.sharpness_study``): one definition, so that both can be
imported in one process."""

from absl import flags

flags.DEFINE_list("seeds", ["0"], "Distillation seeds; every variant or point runs once per seed.")

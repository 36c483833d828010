"""The ``--eval_ood`` flags, shared by ``experiments.run`` and ``experiments.evaluate``.

Importing this module defines the flags; :func:`ood_from_flags` turns them into the
``satm_jax.ood.OodConfig`` of a dataset.
"""

from __future__ import annotations

from absl import flags

from satm_jax import corruptions, ood

flags.DEFINE_string(
    "eval_ood",
    None,
    "Also test every evaluated set's networks on corrupted test data: 'all' or "
    f"comma-separated corruptions ({', '.join(sorted(corruptions.CORRUPTIONS))} for the "
    "synthetic source; the file names of the official set otherwise). Rows get an 'ood' "
    "object; <stem>_ood.md and <stem>_ood.png are written.",
)
flags.DEFINE_enum(
    "ood_source",
    "auto",
    list(ood.SOURCES),
    "Corrupted data: 'synthetic' (satm_jax.corruptions on the test split), 'official' "
    f"(under --data_dir: {', '.join(f'{k}: {v}' for k, v in ood.OFFICIAL_FOLDERS.items())}), "
    "'auto' (official when its folder exists).",
)
flags.DEFINE_integer(
    "ood_samples",
    ood.DEFAULT_SAMPLES,
    "Test images per corruption and severity (0: the whole test split).",
)

FLAGS = flags.FLAGS


def ood_from_flags(dataset: str, data_dir: str | None) -> ood.OodConfig | None:
    """The request the flags make for ``dataset`` (``None`` without ``--eval_ood``).

    Raises:
      satm_jax.ood.OodError: unknown corruption or source.
      satm_jax.corruptions.CorruptionDataError: official data requested but missing.
    """
    return ood.parse_eval_ood(
        FLAGS.eval_ood,
        dataset=dataset,
        data_dir=data_dir,
        source=FLAGS.ood_source,
        samples=FLAGS.ood_samples,
    )

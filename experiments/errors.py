"""The errors an entry point reports as ``error: <message>`` (exit status 2) instead of a
traceback: bad input, missing or corrupt files, runs that cannot continue. One list for every
entry point."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes (imported on call, so that ``--help`` stays fast)."""
    from satm_jax import corruptions, datasets, ood
    from satm_jax.checkpoint import CheckpointError
    from satm_jax.distill import DistillError
    from satm_jax.experiment import configs
    from satm_jax.expert_store import ExpertError

    return (
        configs.ConfigError,
        ood.OodError,
        corruptions.CorruptionDataError,
        datasets.DatasetError,
        ExpertError,
        CheckpointError,
        DistillError,
    )

"""Checkpoints of the distillation state with orbax-checkpoint: atomic, last two kept.

The state (a ``DistillState`` NamedTuple with Optax states inside) is saved as a flat dict of
arrays keyed by its pytree paths, and restored into the structure of a freshly initialised
state, so any field layout round-trips exactly. orbax writes each step to a temporary folder
and renames it when complete, so a process killed mid-save leaves the previous checkpoints
intact. If the newest checkpoint cannot be read, the previous one is used and the fallback is
reported.

Each checkpoint folder also records the run's configuration; resuming under a different
configuration is refused with the list of differences, except for the keys the caller names as
resumable (the pipeline passes ``satm_jax.experiment.configs.RESUMABLE_CHANGES``: the number of
iterations, the evaluation/checkpoint cadence and labels). This module knows no field names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from satm_jax.jsonio import json_diff, write_json


@contextlib.contextmanager
def quiet_orbax():
    """Silences orbax's per-save INFO lines (it logs through absl) for the block."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(old)


class CheckpointError(Exception):
    """No usable checkpoint although some exist."""


class ConfigMismatchError(CheckpointError, ValueError):
    """The folder holds checkpoints of a run with another configuration."""


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _unflatten(flat: dict[str, Any], like: Any) -> Any:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    out = []
    for path, leaf in paths_leaves:
        k = jax.tree_util.keystr(path)
        if k not in flat:
            raise CheckpointError(f"checkpoint lacks {k}")
        v = np.asarray(flat[k])
        if v.shape != np.shape(leaf) or v.dtype != np.asarray(leaf).dtype:
            raise CheckpointError(
                f"checkpoint field {k} has {v.dtype}{v.shape}, expected "
                f"{np.asarray(leaf).dtype}{np.shape(leaf)}"
            )
        out.append(jax.numpy.asarray(v))
    return jax.tree_util.tree_unflatten(treedef, out)


def _comparable(cfg: dict[str, Any], resumable: tuple[str, ...]) -> dict[str, Any]:
    """``cfg`` without the ``resumable`` keys, at its top level or one section down."""
    c = json.loads(json.dumps(cfg))
    for k in resumable:
        c.pop(k, None)
        for v in c.values():
            if isinstance(v, dict):
                v.pop(k, None)
    return c


class DistillCheckpointer:
    """Saves and restores a run's ``DistillState`` under ``directory``.

    Args:
      directory: checkpoint folder (created).
      config: the run's configuration (JSON-like), stored alongside and checked on resume.
      max_to_keep: checkpoints kept (oldest deleted first).
      resumable: keys of ``config`` (top level or one section down) that may differ on resume.

    Raises:
      ConfigMismatchError: the folder's checkpoints were made under another configuration.
    """

    def __init__(
        self,
        directory: str,
        config: dict[str, Any],
        max_to_keep: int = 2,
        resumable: tuple[str, ...] = (),
    ):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        self.config = config
        self.resumable = tuple(resumable)
        os.makedirs(self.directory, exist_ok=True)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
            ),
        )
        self._check_config()

    def _config_path(self) -> str:
        return os.path.join(self.directory, "run_config.json")

    def _check_config(self) -> None:
        path = self._config_path()
        if os.path.exists(path) and self.manager.all_steps():
            try:
                with open(path) as f:
                    stored = json.load(f)
            except (OSError, json.JSONDecodeError):
                stored = None
            if stored is not None:
                diffs = json_diff(
                    _comparable(stored, self.resumable),
                    _comparable(self.config, self.resumable),
                    "checkpoint",
                    "now",
                )
                if diffs:
                    raise ConfigMismatchError(
                        f"{self.directory} holds checkpoints of a run with another "
                        "configuration:\n  " + "\n  ".join(diffs[:20]) + "\nUse another "
                        "--workdir, or delete that run folder to start over."
                    )
        write_json(path, self.config)  # process 0 only

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: Any) -> None:
        """Checkpoints ``state`` at ``state.iteration`` (no-op if that step exists)."""
        step = int(state.iteration)
        if step in self.manager.all_steps():
            return
        with quiet_orbax():
            self.manager.save(step, args=self._ocp.args.PyTreeSave(_flatten(state)))
            self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        flat_like = _flatten(like)
        item = {k: np.zeros(v.shape, v.dtype) for k, v in flat_like.items()}
        with quiet_orbax():
            restored = self.manager.restore(step, args=self._ocp.args.PyTreeRestore(item=item))
        return _unflatten(restored, like)

    def restore_latest(self, like: Any, log: Callable[[str], None] = print) -> Any:
        """The newest readable checkpoint restored into ``like``'s structure, else ``like``.

        Raises:
          CheckpointError: checkpoints exist but none can be read.
        """
        steps = self.steps()
        if not steps:
            return like
        errors = []
        for i, step in enumerate(reversed(steps)):
            try:
                state = self.restore(step, like)
            except Exception as e:  # orbax raises many types for damaged files
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                log(
                    f"checkpoint at iteration {step} in {self.directory} is unreadable "
                    f"({type(e).__name__}); falling back to the previous one"
                )
                continue
            if i > 0:
                log(f"resuming from iteration {step} (the newer checkpoint was corrupt)")
            else:
                log(f"resuming from iteration {step} ({self.directory})")
            return state
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}:\n  "
            + "\n  ".join(errors)
            + "\nDelete that folder to start the run over."
        )

"""The expert store: a directory of expert trajectories with a manifest, stored with
orbax-checkpoint.

Each expert is one orbax checkpoint holding ``{"epoch_000": params, "epoch_001": ..., ...}``,
next to a ``manifest.json`` that records what they were trained on (dataset, model config,
preprocessing), how (seed, lr, epochs, ...), and the list of finished experts. Reading is
partial: ``load_pair`` restores exactly the two epochs a matching step needs, ``load_bank`` only
the epochs up to ``T+ + M``. ``find_compatible`` looks for a finished store that can serve a
request. Training the experts is ``satm_jax.experts``.

Stored experts that do not match the requested dataset, model or preprocessing are refused
with an ``ExpertMismatchError`` that lists every field that differs; parameter files whose
shapes do not match the model are refused likewise. In a multi-process run only process 0
writes the manifest (``satm_jax.jsonio.write_json``); every process takes part in orbax's
saves.

Example:
  >>> import tempfile
  >>> from satm_jax import expert_store
  >>> spec = {"dataset": "digits", "model": {"name": "convnet"}, "preprocessing": {"zca": False}}
  >>> store = expert_store.ExpertStore.create(tempfile.mkdtemp(), spec, num_experts=2, epochs=3)
  >>> store.completed()
  []
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from satm_jax import parallel
from satm_jax.checkpoint import quiet_orbax
from satm_jax.jsonio import json_diff, read_json, to_jsonable, write_json

Params = Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ExpertError(Exception):
    """Missing, corrupt or unusable expert files."""


class ExpertMismatchError(ExpertError):
    """Stored experts were trained for a different dataset, model or preprocessing."""


class ExpertBank(NamedTuple):
    """Expert windows on the device: leaves ``(num_experts, num_epochs, ...)``."""

    params: Params

    @property
    def num_experts(self) -> int:
        return jax.tree.leaves(self.params)[0].shape[0]

    @property
    def num_epochs(self) -> int:
        return jax.tree.leaves(self.params)[0].shape[1]


def _epoch_key(e: int) -> str:
    return f"epoch_{e:03d}"


def _expert_dir(i: int) -> str:
    return f"expert_{i:04d}"


class ExpertStore:
    """A directory of expert trajectories with a manifest.

    ``spec`` is what an expert must agree on to be usable (dataset, model identity,
    preprocessing, ...); ``open`` refuses a store whose spec differs from the requested one.
    """

    def __init__(self, directory: str, manifest: dict[str, Any]):
        self.directory = os.path.abspath(directory)
        self.manifest = manifest

    # ---- creation and opening ---------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str,
        spec: dict[str, Any],
        *,
        num_experts: int,
        epochs: int,
        training: dict[str, Any] | None = None,
    ) -> ExpertStore:
        """Creates an empty store (the directory may exist but must have no manifest)."""
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(os.path.join(directory, MANIFEST)):
            raise ExpertError(f"{directory} already holds an expert store; open it instead")
        manifest = {
            "format_version": FORMAT_VERSION,
            "spec": to_jsonable(spec),
            "num_experts": int(num_experts),
            "epochs": int(epochs),
            "training": to_jsonable(training or {}),
            "completed": [],
            "test_acc": {},
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        store = cls(directory, manifest)
        store._write_manifest()
        return store

    @classmethod
    def open(
        cls,
        directory: str,
        spec: dict[str, Any] | None = None,
        *,
        min_epochs: int | None = None,
    ) -> ExpertStore:
        """Opens an existing store and checks it against the requested ``spec``.

        Raises:
          ExpertError: no manifest, or an unreadable one, or too few epochs.
          ExpertMismatchError: the stored spec differs from ``spec``; the message lists every
            differing field.
        """
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise ExpertError(
                f"no expert store at {directory} (expected {path}); train experts first, e.g. "
                "python -m experiments.run with --workdir pointing at that folder's parent"
            )
        try:
            with open(path) as f:
                manifest = json.load(f)
            manifest["spec"]
            manifest["epochs"]
            manifest["completed"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ExpertError(f"corrupt expert manifest {path}: {e}") from e
        store = cls(directory, manifest)
        if spec is not None:
            store.check_spec(spec)
        if min_epochs is not None and manifest["epochs"] < min_epochs:
            raise ExpertError(
                f"experts in {directory} were trained for {manifest['epochs']} epochs, but "
                f"matching needs epoch {min_epochs} (max_start_epoch + expert_epochs)"
            )
        return store

    @classmethod
    def open_or_create(
        cls,
        directory: str,
        spec: dict[str, Any],
        *,
        num_experts: int,
        epochs: int,
        training: dict[str, Any] | None = None,
    ) -> ExpertStore:
        """Opens the store if it exists (checking ``spec`` and the training settings), else
        creates it."""
        if os.path.exists(os.path.join(directory, MANIFEST)):
            store = cls.open(directory, spec)
            if training is not None:
                diffs = json_diff(
                    store.manifest["training"], to_jsonable(training), prefix="training."
                )
                if store.manifest["epochs"] != epochs:
                    diffs.append(f"epochs: stored {store.manifest['epochs']}, requested {epochs}")
                if diffs:
                    raise ExpertMismatchError(
                        f"experts in {directory} were trained differently:\n  "
                        + "\n  ".join(diffs)
                        + "\nUse another --workdir or delete that folder to retrain."
                    )
            if store.manifest["num_experts"] < num_experts:
                store.manifest["num_experts"] = int(num_experts)
                store._write_manifest()
            return store
        return cls.create(
            directory, spec, num_experts=num_experts, epochs=epochs, training=training
        )

    def check_spec(self, spec: dict[str, Any]) -> None:
        """Raises ``ExpertMismatchError`` listing fields where the stored spec differs."""
        diffs = json_diff(self.manifest["spec"], to_jsonable(spec))
        if diffs:
            raise ExpertMismatchError(
                f"the experts in {self.directory} do not match this run:\n  "
                + "\n  ".join(diffs)
                + "\nTrain experts for this configuration (another --workdir), or request the "
                "stored configuration."
            )

    # ---- bookkeeping -------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        write_json(os.path.join(self.directory, MANIFEST), self.manifest)  # process 0 only

    @property
    def epochs(self) -> int:
        return int(self.manifest["epochs"])

    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest["spec"]

    def completed(self) -> list[int]:
        return sorted(int(i) for i in self.manifest["completed"])

    def missing(self, num_experts: int | None = None) -> list[int]:
        n = self.manifest["num_experts"] if num_experts is None else num_experts
        done = set(self.completed())
        return [i for i in range(n) if i not in done]

    # ---- saving and loading ------------------------------------------------------------------

    def save_expert(
        self, index: int, trajectory: list[Params], test_acc: float | None = None
    ) -> None:
        """Writes expert ``index`` (``epochs + 1`` parameter trees) and marks it finished."""
        import orbax.checkpoint as ocp

        if len(trajectory) != self.epochs + 1:
            raise ExpertError(
                f"expert trajectory has {len(trajectory)} checkpoints, expected {self.epochs + 1}"
            )
        tree = {_epoch_key(e): jax.tree.map(np.asarray, p) for e, p in enumerate(trajectory)}
        path = os.path.join(self.directory, _expert_dir(index))
        if os.path.exists(path) and parallel.is_main_process():
            shutil.rmtree(path)  # an unfinished earlier attempt
        parallel.sync(f"experts.save_expert.{index}")
        with quiet_orbax():
            ocp.PyTreeCheckpointer().save(path, tree)
        self.manifest["completed"] = sorted(set(self.completed()) | {int(index)})
        if test_acc is not None:
            self.manifest["test_acc"][str(index)] = float(test_acc)
        self._write_manifest()

    def _restore(self, index: int, epochs: list[int], like: Params | None) -> dict[str, Params]:
        import orbax.checkpoint as ocp

        if index not in self.completed():
            raise ExpertError(f"expert {index} is not finished in {self.directory}")
        for e in epochs:
            if not 0 <= e <= self.epochs:
                raise ExpertError(f"epoch {e} outside the stored 0..{self.epochs}")
        path = os.path.join(self.directory, _expert_dir(index))
        try:
            ck = ocp.PyTreeCheckpointer()
            meta = ck.metadata(path)
            structure = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
            item = {_epoch_key(e): structure[_epoch_key(e)] for e in epochs}
            item = jax.tree.map(lambda _: 0, item)
            with quiet_orbax():
                out = ck.restore(path, args=ocp.args.PyTreeRestore(item=item, partial_restore=True))
        except Exception as e:  # orbax raises many types for damaged files
            raise ExpertError(
                f"cannot read expert {index} at {path}: {type(e).__name__}: {e}. "
                "The files are missing or corrupt; delete that folder and rerun to retrain it."
            ) from e
        if like is not None:
            for k, tree in out.items():
                check_params_match(tree, like, f"expert {index} {k} in {self.directory}")
        return out

    def load_pair(
        self, index: int, start_epoch: int, expert_epochs: int, like: Params | None = None
    ) -> tuple[Params, Params]:
        """Restores only ``theta*_{index, start}`` and ``theta*_{index, start + M}``."""
        e0, e1 = start_epoch, start_epoch + expert_epochs
        out = self._restore(index, [e0, e1], like)
        return out[_epoch_key(e0)], out[_epoch_key(e1)]

    def load_window(self, index: int, max_epoch: int, like: Params | None = None) -> Params:
        """Epochs ``0..max_epoch`` of one expert, stacked on a leading axis."""
        out = self._restore(index, list(range(max_epoch + 1)), like)
        trees = [out[_epoch_key(e)] for e in range(max_epoch + 1)]
        return jax.tree.map(lambda *xs: np.stack(xs), *trees)

    def load_bank(
        self, max_epoch: int, like: Params | None = None, indices: list[int] | None = None
    ) -> ExpertBank:
        """Epochs ``0..max_epoch`` of the given (default: all finished) experts, stacked
        ``(E, max_epoch + 1, ...)``: what the jit-compiled distillation step samples from."""
        indices = self.completed() if indices is None else indices
        if not indices:
            raise ExpertError(f"no finished experts in {self.directory}")
        if max_epoch > self.epochs:
            raise ExpertError(
                f"matching needs epoch {max_epoch}, experts in {self.directory} stop at "
                f"{self.epochs}"
            )
        windows = [self.load_window(i, max_epoch, like) for i in indices]
        params = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *windows)
        return ExpertBank(params=params)


def check_params_match(tree: Params, like: Params, what: str) -> None:
    """Raises ``ExpertMismatchError`` unless ``tree`` has ``like``'s structure and shapes."""
    t_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    l_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(like)}
    problems = []
    for k in sorted(set(t_flat) | set(l_flat)):
        if k not in t_flat:
            problems.append(f"{k}: missing in the stored parameters")
        elif k not in l_flat:
            problems.append(f"{k}: not a parameter of the model")
        elif tuple(np.shape(t_flat[k])) != tuple(np.shape(l_flat[k])):
            problems.append(
                f"{k}: stored shape {tuple(np.shape(t_flat[k]))}, model expects "
                f"{tuple(np.shape(l_flat[k]))}"
            )
    if problems:
        raise ExpertMismatchError(
            f"{what} does not match the model:\n  " + "\n  ".join(problems[:10])
        )


def read_manifest(directory: str) -> dict[str, Any] | None:
    """The manifest of the store at ``directory`` as stored, or ``None`` when there is none (or
    it cannot be read); ``ExpertStore.open`` is the checked way in."""
    return read_json(os.path.join(directory, MANIFEST))


def find_compatible(
    root: str, spec: dict[str, Any], training: dict[str, Any], *, epochs: int, num_experts: int
) -> str | None:
    """A store under ``root`` that can serve a request for ``num_experts`` experts of ``epochs``
    epochs: the same ``spec`` and ``training`` settings, trained for more epochs, with at least
    ``num_experts`` finished (the first such folder in name order); ``None`` if there is none."""
    if not os.path.isdir(root):
        return None
    spec, training = to_jsonable(spec), to_jsonable(training)
    for name in sorted(os.listdir(root)):
        m = read_manifest(os.path.join(root, name))
        if (
            m is not None
            and m.get("spec") == spec
            and m.get("training") == training
            and m.get("epochs", 0) > epochs
            and len(m.get("completed", [])) >= num_experts
        ):
            return os.path.join(root, name)
    return None

"""Several devices (and hosts) with JAX's own sharding.

Two kinds of parallelism, both expressed as shardings on a one-axis ``jax.sharding.Mesh``
and left to XLA's SPMD partitioner (no hand-written collectives):

* **experts in parallel**: the leading (expert) axis of a vmapped group of experts is split
  across devices (``shard_leading``); each device trains its experts, the training data are
  replicated.
* **data parallel inner steps**: in every student step the synthetic minibatch is split across
  devices (``constrain_batch``) while the parameters stay replicated; the gradient's mean over
  the batch becomes an all-reduce. Instance norm is per sample, so nothing else crosses
  devices. Results equal the single-device ones within float tolerance (reduction order).

Several processes (hosts): call ``initialize_distributed`` (``jax.distributed.initialize``) at
start-up on every process with the same coordinator. Our choice: every mesh spans the
process's **own** devices (``jax.local_devices()``), so each process computes the whole run on
its devices, with the same keys and therefore the same synthetic sets, and no array ever spans
another process (nothing is fetched from a non-addressable device). Process 0 alone writes
files (``is_main_process``, ``satm_jax.parallel.main_process_only``); ``sync`` is the barrier
after each of its writes, so that every process reads the same files next; orbax checkpoints
are saved by every process together (orbax's multi-process protocol: process 0 writes the
host arrays, the others wait at its barriers). The work directory must be one shared file
system. Several hosts therefore give a correct run, not a faster one. See
``docs/PERFORMANCE.md`` for a launch example.

Example:
  >>> import jax
  >>> from satm_jax import parallel
  >>> mesh = parallel.make_mesh()
  >>> mesh.axis_names
  ('data',)
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def make_mesh(devices: list[Any] | None = None, axis: str = AXIS) -> Mesh:
    """A one-axis mesh over ``devices`` (default: this process's devices; see the module
    docstring for why a mesh never spans processes)."""
    devs = np.asarray(jax.local_devices() if devices is None else devices)
    return Mesh(devs, (axis,))


def num_devices(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.devices.size)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def leading(mesh: Mesh) -> NamedSharding:
    """Sharding that splits axis 0 across the mesh."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def shard_leading(tree: Any, mesh: Mesh | None) -> Any:
    """Places every array of ``tree`` with its leading axis split across ``mesh``.

    Raises:
      ValueError: a leading axis is not divisible by the number of devices.
    """
    if mesh is None:
        return tree
    n = num_devices(mesh)
    for x in jax.tree.leaves(tree):
        if x.shape[0] % n:
            raise ValueError(f"leading axis {x.shape[0]} is not divisible by {n} devices")
    return jax.device_put(tree, leading(mesh))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Places a full copy of ``tree`` on every device of ``mesh``."""
    return tree if mesh is None else jax.device_put(tree, replicated(mesh))


def constrain_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inside ``jit``: asks XLA to split ``x``'s batch axis across ``mesh`` (if divisible)."""
    if mesh is None or x.shape[0] % num_devices(mesh):
        return x
    return jax.lax.with_sharding_constraint(x, leading(mesh))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` for multi-host runs (arguments may come from the
    cluster environment, e.g. SLURM, when ``None``)."""
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def is_main_process() -> bool:
    """Whether this process writes outputs (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier of all processes (``multihost_utils.sync_global_devices``); nothing in a
    single-process run. Every process must reach the same barriers in the same order."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


_WRITING = contextvars.ContextVar("satm_jax_parallel_writing", default=False)


def main_process_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` on process 0; ``None`` (nothing written) on every other process.

    In a multi-process run every process meets process 0 at a barrier (``parallel.sync``)
    before it writes and again after: a file of ours changes only while all processes stand at
    the same write, so between two writes every process reads the same files and takes the
    same branch (e.g. "open the store" against "create it"). A writer called inside another
    (on process 0) adds no barrier of its own: the other processes never enter the outer one.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _WRITING.get():
            return fn(*args, **kwargs)
        name = f"{fn.__module__}.{fn.__qualname__}"
        sync(name + ":before")
        out = None
        if is_main_process():
            token = _WRITING.set(True)
            try:
                out = fn(*args, **kwargs)
            finally:
                _WRITING.reset(token)
        sync(name + ":after")
        return out

    return wrapper

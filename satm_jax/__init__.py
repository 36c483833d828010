"""satm-jax: dataset condensation by Sharpness-Aware Trajectory Matching, in JAX.

The modules, one idea each:

* ``models``: MTT's ConvNet and its layers, convolution chosen per backend;
* ``model_pool``: the cross-architecture evaluation pool (ResNet-18, VGG-11, AlexNet);
* ``model_registry``: networks by name (``ModelConfig``, ``build_model``);
* ``augment``: differentiable siamese augmentation (DSA);
* ``zca``: ZCA whitening as the reference computes it;
* ``datasets``: datasets by name (``registry``, ``loaders``, the file ``readers``, ``archives``,
  ``images``, ``cache``), preprocessing and per-class sampling;
* ``experts``: training expert trajectories and sampling them for matching;
* ``expert_store``: their orbax storage with a manifest, and finding a compatible store;
* ``jsonio``: JSON files (atomic, process 0 only) and config-tree comparison; ``outputs``:
  what a run leaves behind (metrics, images, plots, tables, exports);
* ``matching``: the student unroll (``lax.scan``), the matching loss, exact and truncated
  hypergradients;
* ``sharpness``: SAM, ASAM, GSAM and smoothed SAM as Optax transforms (global or per-example
  balls, absolute or relative radii);
* ``flatness``: the flatness of a finished set (worst-case increase, top Hessian eigenvalue,
  held-out generalisation gap);
* ``initial_set``: where a synthetic set starts (real images; DATM's soft-label start);
* ``distill``: the jit-compiled outer step and loop;
* ``evaluate``: training fresh networks on a synthetic set; ``baselines``: random real
  images and the full training set under the same protocol;
* ``corruptions``: keyed image corruptions (MNIST-C / CIFAR-10-C families) and the loaders of
  the official corrupted sets; ``ood``: out-of-domain evaluation on them;
* ``herding``: herding selection in a network's penultimate features;
* ``experiment``: the layer above the library (nothing here imports it): presets and run
  configs (``experiment.configs``), the end-to-end pipeline (``experiment.pipeline``) and the
  class-incremental protocol (``experiment.continual``).
"""

from satm_jax import (
    augment,
    datasets,
    distill,
    evaluate,
    experts,
    flatness,
    matching,
    models,
    sharpness,
    zca,
)
from satm_jax.augment import make_augment
from satm_jax.datasets import load_dataset
from satm_jax.distill import DistillConfig, DistillState, init_state, make_outer_step
from satm_jax.matching import (
    StudentBatches,
    first_order_lr_grad,
    matching_loss,
    sample_student_batches,
    unroll,
)
from satm_jax.models import ConvNet
from satm_jax.outputs import load_distilled
from satm_jax.sharpness import asam, gsam, make_sharpness, sam, smooth_sam

__version__ = "0.1.0"

__all__ = [
    "ConvNet",
    "DistillConfig",
    "DistillState",
    "StudentBatches",
    "asam",
    "augment",
    "datasets",
    "distill",
    "evaluate",
    "experts",
    "first_order_lr_grad",
    "flatness",
    "gsam",
    "init_state",
    "load_dataset",
    "load_distilled",
    "make_augment",
    "make_outer_step",
    "make_sharpness",
    "matching",
    "matching_loss",
    "models",
    "sam",
    "sample_student_batches",
    "sharpness",
    "smooth_sam",
    "unroll",
    "zca",
]

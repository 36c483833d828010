"""Datasets by name, and the preprocessing trajectory matching applies to them.

``load_dataset(name, data_dir=...)`` returns a :class:`Dataset` of uint8 ``(N, H, W, C)`` images
and integer labels, read from the dataset's official distribution (nothing is downloaded; a
missing or corrupt file stops with a :class:`DatasetError` that says what to get and where to
put it). The modules, one idea each:

* ``registry``: the :class:`Dataset` class, ``register_dataset``, ``check_dataset_name`` and
  ``load_dataset``;
* ``loaders``: the built-in datasets (``digits``, ``mnist``, ``fashion_mnist``, ``svhn``,
  ``cifar10``, ``cifar100``, ``tiny_imagenet``, ``imagenette``, ``imagewoof``), their URLs and
  expected files;
* ``readers``: one reader per official file format (idx, CIFAR pickles, SVHN ``.mat``, the Tiny
  ImageNet index);
* ``archives``: ``FileTree`` and its ``DirTree``/``ZipTree``/``TarTree``, one view of a folder
  or an archive; file identities and checksums;
* ``images``: image decoding, resizing and centre-cropping;
* ``cache``: the ``.npz`` cache of decoded arrays;
* ``tfds_reader``: TFDS datasets prepared as ``array_record``, read without TensorFlow;
* ``tfds_tiny_imagenet``: a TFDS builder that prepares Tiny ImageNet without TensorFlow;
* ``preprocessing``: ``Preprocessing``/``fit_preprocessing`` (ZCA or per-channel
  standardisation) and the fitted ``Preprocessor``;
* ``sampling``: per-class sampling of real images (``check_ipc``, ``sample_per_class``,
  ``class_sorted_labels``);
* ``errors``: ``DatasetError``.

Importing the package registers the built-in loaders.
"""

from satm_jax.datasets import loaders
from satm_jax.datasets.errors import DatasetError
from satm_jax.datasets.preprocessing import Preprocessing, Preprocessor, fit_preprocessing
from satm_jax.datasets.registry import (
    DATASETS,
    Dataset,
    Loader,
    check_dataset_name,
    load_dataset,
    register_dataset,
)
from satm_jax.datasets.sampling import check_ipc, class_sorted_labels, sample_per_class

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "Loader",
    "Preprocessing",
    "Preprocessor",
    "check_dataset_name",
    "check_ipc",
    "class_sorted_labels",
    "fit_preprocessing",
    "load_dataset",
    "loaders",
    "register_dataset",
    "sample_per_class",
]

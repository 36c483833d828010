"""A TFDS builder for Tiny ImageNet that prepares without TensorFlow.

Importing this module registers ``tiny_imagenet`` with TFDS. Preparing it::

    import tensorflow_datasets as tfds
    from satm_jax.datasets import tfds_tiny_imagenet

    builder = tfds_tiny_imagenet.TinyImagenet(data_dir="/data/tfds", file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/downloads")
    )
    train = tfds.data_source("tiny_imagenet", split="train", data_dir="/data/tfds")

where ``/data/downloads`` holds ``tiny-imagenet-200.zip`` (or its extracted
``tiny-imagenet-200/``).
``satm_jax.datasets.load_dataset("tiny_imagenet", data_dir="/data/tfds")`` then reads the
prepared dataset.

Why no TensorFlow is needed: ``tfds.features.Image`` encodes NumPy arrays with
``tf.image.encode_png``, but passes encoded bytes through untouched and encodes
``PIL.Image`` objects with PIL. The builder therefore yields each RGB JPEG's bytes exactly as
stored in the zip, and the few non-RGB (grayscale) ones as PIL images converted to RGB, which
TFDS stores as PNG (lossless, so the stored pixels equal PIL's decoding of the original).
With ``file_format='array_record'`` the writer, the shuffler and ``tfds.data_source``
(which decodes with PIL or OpenCV) are TensorFlow-free too.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from satm_jax.datasets.archives import DirTree, FileTree, ZipTree
from satm_jax.datasets.errors import DatasetError
from satm_jax.datasets.readers import tiny_imagenet_index

NUM_CLASSES = 200
ZIP_NAME = "tiny-imagenet-200.zip"
DIR_NAME = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _open_tree(manual_dir: Path) -> FileTree:
    """The zip in ``manual_dir``, else the extracted folder."""
    if (manual_dir / ZIP_NAME).is_file():
        return ZipTree(manual_dir / ZIP_NAME, marker="wnids.txt")
    if (manual_dir / DIR_NAME).is_dir():
        return DirTree(manual_dir / DIR_NAME)
    raise FileNotFoundError(
        f"no {ZIP_NAME} (or extracted {DIR_NAME}/) in the manual dir {manual_dir}. "
        + TinyImagenet.MANUAL_DOWNLOAD_INSTRUCTIONS
    )


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny ImageNet (200 classes, 64x64): ``train`` and the labelled ``validation`` split."""

    name = "tiny_imagenet"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release, prepared without TensorFlow."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {ZIP_NAME} from {URL} and place it (unextracted) in the manual dir: "
        "`manual_dir` of tfds.download.DownloadConfig, by default "
        "<data_dir>/downloads/manual/. An extracted tiny-imagenet-200/ folder there works too."
    )

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        # array_record by default: TFDS's default tfrecord writer needs TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. (TFDS 4.9.10's own ``code_path`` imports ``importlib_resources``, a
        backport it only installs for Python < 3.9, for any builder defined in a package.)"""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Tiny ImageNet: 100,000 training and 10,000 validation 64x64 images of 200 "
                "ImageNet classes (CS231n). Labels follow wnids.txt; the label feature's names "
                "are the wnids, metadata['class_names'] the first words.txt synonyms."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(64, 64, 3)),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, Any]]]:
        manual_dir = Path(dl_manager.manual_dir)
        with _open_tree(manual_dir) as tree:
            index = tiny_imagenet_index(tree)
        if len(index.wnids) != NUM_CLASSES:
            raise DatasetError(
                f"{manual_dir}: wnids.txt lists {len(index.wnids)} classes, expected "
                f"{NUM_CLASSES}: not the official {ZIP_NAME}"
            )
        self.info.features["label"].names = list(index.wnids)
        self.info.metadata["class_names"] = list(index.class_names)
        return {
            "train": self._generate_examples(manual_dir, index.train),
            "validation": self._generate_examples(manual_dir, index.val),
        }

    def _generate_examples(
        self, manual_dir: Path, items: tuple[tuple[str, int], ...]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        from PIL import Image

        with _open_tree(manual_dir) as tree:
            for rel, label in items:
                data = tree.read(rel)
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        size, mode = img.size, img.mode
                        image: Any = data if mode == "RGB" else img.convert("RGB")
                except Exception as e:  # PIL raises many types on bad data
                    raise DatasetError(
                        f"{tree.describe(rel)} is corrupt: cannot decode the image ({e})"
                    ) from e
                if size != (64, 64):
                    raise DatasetError(f"{tree.describe(rel)} is {size}, expected 64x64")
                name = rel.rsplit("/", 1)[-1]
                yield name, {"image": image, "label": label, "file_name": name}

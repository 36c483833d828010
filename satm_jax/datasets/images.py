"""Image decoding: bytes to uint8 arrays.

* ``decode_rgb``: PIL decoding of one image into RGB;
* ``resize_center_crop``: MTT's ``Resize`` + ``CenterCrop``;
* ``decode_images``: parallel decoding of a ``FileTree``'s files into one uint8 array,
  optionally resized and centre-cropped; ``labelled_arrays``: the arrays of a dataset from
  ``(file, label)`` lists.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from satm_jax.datasets.archives import FileTree
from satm_jax.datasets.errors import DatasetError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def decode_rgb(data: bytes) -> Any:
    """Decodes image bytes with PIL into an RGB ``PIL.Image`` (grayscale/CMYK converted)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def resize_center_crop(img: Any, size: int) -> Any:
    """torchvision's ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image.

    The shorter side becomes ``size`` and the longer ``int(size * long / short)`` (bilinear,
    PIL's antialiased filter, as torchvision's PIL backend); the crop's offsets are
    ``int(round((side - size) / 2))``.
    """
    from PIL import Image

    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def decode_images(
    tree: FileTree,
    rels: Sequence[str],
    *,
    crop_size: int | None = None,
    expect_size: int | None = None,
    chunk: int = 2048,
) -> np.ndarray:
    """Decodes ``rels`` of ``tree`` to uint8 ``(N, S, S, 3)``, on a thread pool.

    Args:
      tree: where the files are.
      rels: the image files.
      crop_size: resize the shorter side to this and centre-crop a square (MTT's ImageNet).
      expect_size: otherwise, every image must already be ``expect_size`` square.
      chunk: files read into memory at a time.

    Raises:
      DatasetError: a missing or undecodable file, or one of the wrong size.
    """
    side = crop_size or expect_size
    if side is None:
        raise ValueError("give crop_size or expect_size")
    out = np.empty((len(rels), side, side, 3), np.uint8)

    def work(i: int, data: bytes) -> None:
        try:
            img = decode_rgb(data)
        except DatasetError:
            raise
        except Exception as e:  # PIL raises many types on bad data
            raise DatasetError(
                f"{tree.describe(rels[i])} is corrupt: cannot decode the image "
                f"({type(e).__name__}: {e})"
            ) from e
        if crop_size is not None:
            img = resize_center_crop(img, crop_size)
        elif img.size != (side, side):
            raise DatasetError(
                f"{tree.describe(rels[i])} is {img.size[0]}x{img.size[1]}, expected {side}x{side}"
            )
        out[i] = np.asarray(img, np.uint8)

    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(rels), chunk):
            datas = [tree.read(r) for r in rels[start : start + chunk]]
            list(pool.map(work, range(start, start + len(datas)), datas))
    return out


def labelled_arrays(
    tree: FileTree,
    train: Sequence[tuple[str, int]],
    test: Sequence[tuple[str, int]],
    class_names: Sequence[str],
    **decode_kw: Any,
) -> dict[str, Any]:
    """Decodes ``(file, label)`` lists into the arrays of a dataset (``decode_images``)."""
    return {
        "train_images": decode_images(tree, [r for r, _ in train], **decode_kw),
        "train_labels": np.array([y for _, y in train], np.int32),
        "test_images": decode_images(tree, [r for r, _ in test], **decode_kw),
        "test_labels": np.array([y for _, y in test], np.int32),
        "class_names": np.array(list(class_names)),
    }

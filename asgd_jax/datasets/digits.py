"""The 8×8 handwritten digits that scikit-learn ships, as a TFDS ``array_record`` builder.

``sklearn.datasets.load_digits()`` is real data bundled in the scikit-learn wheel: the 1,797
test-set images of the UCI "Optical Recognition of Handwritten Digits" collection (Alpaydin &
Kaynak, 1998), 32×32 NIST bitmaps reduced to 8×8 blocks of on-pixel counts in ``0..16``. Nothing
is downloaded, ever, so this is the dataset that works on an offline machine.

Exposing it as a :class:`tfds.core.GeneratorBasedBuilder` lets it travel the same
``tfds.data_source`` path (``array_record`` files, random access, no TensorFlow) as ``mnist``.
Its features are :class:`tfds.features.Tensor` and ``ClassLabel`` (not ``Image``), which
serialize without TensorFlow; the class lives in a package module so that tfds registers it
(as ``sklearn_digits``) on import.

Split (fixed, by position in the scikit-learn array, never shuffled: record ``i`` of a split is
scikit-learn example ``start + i``): ``train`` holds examples ``[0, 1440)`` and ``test`` the last
357, ``[1440, 1797)``. Both are class-balanced to within a few images (train 141–147 per digit,
test 33–37), and 1,440 = 45 × 32 splits evenly into common batch sizes.

References:
  Alpaydin & Kaynak, *Optical Recognition of Handwritten Digits*, UCI Machine Learning
  Repository, 1998. doi:10.24432/C50P49.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["SklearnDigits", "NUM_TRAIN", "NUM_TEST", "PIXEL_MAX"]

NUM_TRAIN = 1440
NUM_TEST = 357
PIXEL_MAX = 16  # a pixel counts the on-pixels of a 4×4 block: an integer in 0..16


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8×8 handwritten digits (UCI optdigits test set): 1,440 train, 357 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First 1,440 images form the train split, the last 357 the test."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "8x8 handwritten digits shipped with scikit-learn (UCI optdigits test set); "
                f"pixels are integers in 0..{PIXEL_MAX}."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # nothing to download: the data ship inside scikit-learn
        return {
            "train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(NUM_TRAIN, NUM_TRAIN + NUM_TEST),
        }

    def _generate_examples(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images.astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        for index in range(start, stop):
            yield index, {"image": images[index], "label": labels[index]}

"""A TFDS builder for MNIST from IDX files in a manual_dir (`tfds` name `lwc_mnist`).

The stock `mnist` builder verifies the upstream .gz checksums, so it rejects re-compressed copies
such as `../shared/data/mnist`; this one reads whatever IDX files `manual_dir` holds and stores the
example's position in the IDX file as `index`, so readers can restore the upstream order.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

# TF only feeds data: keep it off every accelerator so JAX owns their memory.
tf.config.set_visible_devices([], "GPU")

import tensorflow_datasets as tfds  # noqa: E402


class LwcMnist(tfds.core.GeneratorBasedBuilder):
  """MNIST read from the classic IDX files found in `manual_dir`."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
      "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in manual_dir.")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(str(dl_manager.manual_dir), split)
            for split in ("train", "test")}

  def _generate_examples(self, manual_dir, split):
    from lwc.data import mnist
    data = mnist.load_idx(manual_dir)
    part = getattr(data, split)
    images = np.rint(part.images * 255.0).astype("uint8")
    for i in range(len(part)):
      yield i, {"image": images[i], "label": int(part.labels[i]), "index": i}


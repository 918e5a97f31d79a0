"""Iterative pruning of any network on any image dataset: the generic entry point.

  python -m lwc.experiments.prune --model=mypkg.nets:ResNet --model_kwargs='{"depth": 3}' \
      --dataset=fashion_mnist --flagfile=my.flags --workdir=DIR

`--model` is a built-in name (lwc.models.MODELS) or `package.module:factory` (a Flax Linen or NNX
module class, or a callable returning one); `--dataset` a TFDS image-classification name, a
folder of MNIST-format IDX files (`--data_dir`, reported under `--dataset`'s name) or a `.npz`
file of x_train, y_train, x_test, y_test. Every other flag is the pipeline's (lwc.config).
"""

from absl import app
from absl import flags

from lwc import errors
from lwc.experiments import common

common.define_flags("lenet_300_100", None)
flags.adopt_module_key_flags(common)

if __name__ == "__main__":
  app.run(common.main, flags_parser=errors.parse_flags)

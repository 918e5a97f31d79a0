"""Iterative pruning of VGG-16 on ImageNet: Table 5 of Han et al.

  python -m lwc.experiments.vgg16 --flagfile=experiments/vgg16.flags \
      --workdir=gs://bucket/vgg16 --data_dir=/data/tfds \
      --init_checkpoint=/data/vgg16_torchvision.safetensors

Data parallel over every device of every process (see lwc/experiments/alexnet.py).
"""

from absl import app
from absl import flags

from lwc import errors
from lwc.experiments import common

common.define_flags("vgg16", ["vgg16", "alexnet"], dataset_default="imagenet2012")
flags.adopt_module_key_flags(common)

if __name__ == "__main__":
  app.run(common.main, flags_parser=errors.parse_flags)

"""Iterative pruning of LeNet-300-100 or LeNet-5 on MNIST.

  python -m lwc.experiments.lenet --flagfile=experiments/lenet_300_100.flags \
      --workdir=/tmp/lenet --data_dir=../shared/data/mnist
"""

from absl import app
from absl import flags

from lwc import errors
from lwc.experiments import common

common.define_flags("lenet_300_100", ["lenet_300_100", "lenet5"])
flags.adopt_module_key_flags(common)

if __name__ == "__main__":
  app.run(common.main, flags_parser=errors.parse_flags)

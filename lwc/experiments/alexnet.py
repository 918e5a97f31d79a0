"""Iterative pruning of AlexNet (Caffe's bvlc_alexnet) on ImageNet: Table 4 of Han et al.

  python -m lwc.experiments.alexnet --flagfile=experiments/alexnet.flags \
      --workdir=/gcs/bucket/alexnet --data_dir=/data/tfds \
      --init_checkpoint=/data/bvlc_alexnet.npz

Data parallel over every device of every process (launch/ starts one process per host or GPU;
`lwc.distributed.initialize` joins them from the flags or the TPU/SLURM environment).
"""

from absl import app
from absl import flags

from lwc import errors
from lwc.experiments import common

common.define_flags("alexnet", ["alexnet", "vgg16"], dataset_default="imagenet2012")
flags.adopt_module_key_flags(common)

if __name__ == "__main__":
  app.run(common.main, flags_parser=errors.parse_flags)

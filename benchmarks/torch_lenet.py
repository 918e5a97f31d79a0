"""PyTorch (CPU) reference: seconds per epoch of LeNet-300-100 and LeNet-5 on MNIST.

The same networks as lwc.models.lenet (LeNet-5 in its Caffe form: no ReLU after the convs), SGD
with momentum 0.9 and L2 weight decay 5e-4, batch 100 drawn by index from the whole training set
held in memory (a fresh permutation per epoch), `loss.item()` after every step as the lwc
pipeline reads its loss after every call. Imports no JAX; epoch_time.py runs it in a subprocess.

  python -m benchmarks.torch_lenet --data_dir=../shared/data/mnist --models=lenet5 --epochs=3
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from absl import app, flags
from torch import nn

from benchmarks import common
from lwc.data import mnist

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "../shared/data/mnist", "Folder of the MNIST IDX files.")
flags.DEFINE_list("models", ["lenet_300_100", "lenet5"], "Models to time.")
flags.DEFINE_integer("epochs", 3, "Epochs per model; the first is warm-up and not reported "
                     "in the median.")
flags.DEFINE_integer("batch_size", 100, "Batch size.")
flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0 = number of CPUs).")
flags.DEFINE_string("json_out", "", "Also write the results here as JSON.")


def lenet_300_100() -> nn.Module:
  return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                       nn.ReLU(), nn.Linear(100, 10))


def lenet5() -> nn.Module:
  return nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5),
                       nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(),
                       nn.Linear(500, 10))


MODELS = {"lenet_300_100": lenet_300_100, "lenet5": lenet5}


def time_model(name: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
  torch.manual_seed(0)
  model = MODELS[name]()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  loss_fn = nn.CrossEntropyLoss()
  n = len(labels)
  steps = n // FLAGS.batch_size
  seconds, foreign, losses = [], [], []
  for epoch in range(FLAGS.epochs):
    gen = torch.Generator().manual_seed(epoch)
    with common.Watch() as w:
      perm = torch.randperm(n, generator=gen)[:steps * FLAGS.batch_size]
      for idx in perm.view(steps, FLAGS.batch_size):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
        last = loss.item()
    seconds.append(w.seconds)
    foreign.append(w.foreign)
    losses.append(last)
  timed = seconds[1:] or seconds
  return {"framework": "torch", "model": name, "epoch_seconds": seconds,
          "median_seconds": float(np.median(timed)), "foreign_cpu": foreign,
          "last_loss": losses, "steps_per_epoch": steps}


def main(argv):
  del argv
  torch.set_num_threads(FLAGS.threads or os.cpu_count())
  train = mnist.load(FLAGS.data_dir).train
  images = torch.from_numpy(np.ascontiguousarray(train.images.transpose(0, 3, 1, 2)))  # NCHW
  labels = torch.from_numpy(train.labels.astype(np.int64))
  results = []
  for name in FLAGS.models:
    r = time_model(name, images, labels)
    r["threads"] = torch.get_num_threads()
    results.append(r)
    print(json.dumps(r), flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)

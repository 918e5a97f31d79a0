"""lwc.pretrained: torchvision / Keras / Caffe weight files load to the same function; bad files."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwc import models, pretrained
from lwc.errors import UserError

# Small widths keep the tests fast; names, layouts and the fc6 permutation do not depend on them.
VGG_KW = {"widths": (4, 4, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32), "num_classes": 10}
VGG_SIZE = 64  # last conv output 2 x 2 x 16: fc6's row order matters
ALEX_KW = {"widths": (16, 32, 48, 48, 32, 64, 64), "num_classes": 10}
ALEX_SIZE = 99  # last conv output 2 x 2 x 32


def _template(name, size, **kw):
  model = models.get_model(name, **kw)
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  return model, jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _random_params(template, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1
                                                         else 10.0)).astype(np.float32), template)


def _images(size, n=2, seed=1):
  return np.random.default_rng(seed).random((n, size, size, 3), np.float32)


def _write(path, arrays):
  if path.endswith(".npz"):
    np.savez(path, **arrays)
  else:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)
  return path


def _logits(model, params, images):
  return np.asarray(jax.jit(model.apply)({"params": params}, images))


# --- torch references (the layouts' own frameworks) ------------------------------------------


def _torch_vgg(torch, widths, num_classes):
  """torchvision's vgg16 module layout (same state-dict names), without its avgpool."""
  nn = torch.nn
  layers, c_in, convs = [], 3, iter(widths[:13])
  for block in (2, 2, 3, 3, 3):
    for _ in range(block):
      c_out = next(convs)
      layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
      c_in = c_out
    layers.append(nn.MaxPool2d(2, 2))
  model = nn.Module()
  model.features = nn.Sequential(*layers)
  f6, f7 = widths[13:]
  model.classifier = nn.Sequential(nn.Linear(c_in * 4, f6), nn.ReLU(), nn.Dropout(),
                                   nn.Linear(f6, f7), nn.ReLU(), nn.Dropout(),
                                   nn.Linear(f7, num_classes))
  model.forward = lambda x: model.classifier(torch.flatten(model.features(x), 1))
  return model.eval()


def _torch_caffe_alexnet(torch, widths, num_classes):
  """bvlc_alexnet in torch: two-group conv2/4/5, Caffe's LRN; returns (module, {caffe name: m})."""
  nn = torch.nn
  c1, c2, c3, c4, c5, f6, f7 = widths
  layers = {"conv1": nn.Conv2d(3, c1, 11, stride=4), "conv2": nn.Conv2d(c1, c2, 5, padding=2,
                                                                         groups=2),
            "conv3": nn.Conv2d(c2, c3, 3, padding=1), "conv4": nn.Conv2d(c3, c4, 3, padding=1,
                                                                         groups=2),
            "conv5": nn.Conv2d(c4, c5, 3, padding=1, groups=2), "fc6": nn.Linear(c5 * 4, f6),
            "fc7": nn.Linear(f6, f7), "fc8": nn.Linear(f7, num_classes)}
  relu, lrn, pool = nn.ReLU(), nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0), \
      nn.MaxPool2d(3, 2)
  model = nn.Sequential(layers["conv1"], relu, lrn, pool, layers["conv2"], relu, lrn, pool,
                        layers["conv3"], relu, layers["conv4"], relu, layers["conv5"], relu, pool,
                        nn.Flatten(), layers["fc6"], relu, layers["fc7"], relu, layers["fc8"])
  return model.eval(), layers


def _torch_logits(torch, module, images_nhwc):
  with torch.no_grad():
    return module(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_torchvision_vgg16_gives_torch_logits(tmp_path, suffix):
  torch = pytest.importorskip("torch")
  if suffix == ".safetensors":
    pytest.importorskip("safetensors")
  torch.manual_seed(0)
  reference = _torch_vgg(torch, VGG_KW["widths"], VGG_KW["num_classes"])
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  assert set(state) == set(pretrained.name_mapping("vgg16", "torchvision"))
  path = _write(str(tmp_path / f"vgg{suffix}"), state)
  model, template = _template("vgg16", VGG_SIZE, **VGG_KW)
  params = pretrained.load_pretrained(path, "vgg16", template)
  jax.tree.map(lambda p, t: np.testing.assert_equal((p.shape, p.dtype), (t.shape, t.dtype)),
               params, template)
  images = _images(VGG_SIZE)
  expected = _torch_logits(torch, reference, images)
  np.testing.assert_allclose(_logits(model, params, images), expected, rtol=1e-4, atol=1e-5)


def test_caffe_alexnet_gives_torch_logits(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  reference, layers = _torch_caffe_alexnet(torch, ALEX_KW["widths"], ALEX_KW["num_classes"])
  arrays = {}
  for name, module in layers.items():  # pycaffe's net.params[name][0 / 1].data: same shapes
    arrays[f"{name}/weights"] = module.weight.detach().numpy()
    arrays[f"{name}/biases"] = module.bias.detach().numpy()
  path = _write(str(tmp_path / "alexnet.npz"), arrays)
  model, template = _template("alexnet", ALEX_SIZE, **ALEX_KW)
  params = pretrained.load_pretrained(path, "alexnet", template)
  assert params["conv2"]["kernel"].shape == (5, 5, 8, 32)  # two groups of 8 input channels
  images = 255 * _images(ALEX_SIZE)  # pixel scale, where the LRN is far from the identity
  expected = _torch_logits(torch, reference, images)
  np.testing.assert_allclose(_logits(model, params, images), expected, rtol=1e-4, atol=1e-4)


def _torchvision_by_loops(params):
  """torchvision-layout arrays of our `params`, entry by entry (independent of the module)."""
  out = {}
  for name, (layer, param) in pretrained.name_mapping("vgg16", "torchvision").items():
    w = np.asarray(params[layer][param])
    if w.ndim == 4:
      out[name] = np.einsum("hwio->oihw", w)
    elif w.ndim == 2 and layer == "fc6":
      channels = params["conv5_3"]["kernel"].shape[-1]
      positions = w.shape[0] // channels
      t = np.empty(w.shape[::-1], w.dtype)
      for c in range(channels):
        for p in range(positions):
          t[:, c * positions + p] = w[p * channels + c, :]
      out[name] = t
    else:
      out[name] = w.T if w.ndim == 2 else w
  return out


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_keras_and_torchvision_layouts_load_the_same_params(tmp_path, suffix):
  if suffix == ".safetensors":
    pytest.importorskip("safetensors")
  model, template = _template("vgg16", VGG_SIZE, **VGG_KW)
  ours = _random_params(template)
  keras = {name: ours[layer][param]
           for name, (layer, param) in pretrained.name_mapping("vgg16", "keras").items()}
  assert "block5_conv3/kernel" in keras and "predictions/bias" in keras
  from_keras = pretrained.load_pretrained(_write(str(tmp_path / f"k{suffix}"), keras), "vgg16",
                                          template)
  from_torch = pretrained.load_pretrained(
      _write(str(tmp_path / f"t{suffix}"), _torchvision_by_loops(ours)), "vgg16", template)
  jax.tree.map(np.testing.assert_array_equal, from_keras, ours)
  jax.tree.map(np.testing.assert_array_equal, from_torch, ours)
  images = _images(VGG_SIZE)
  np.testing.assert_array_equal(_logits(model, from_keras, images), _logits(model, ours, images))


def test_name_mapping_tables():
  tv = pretrained.name_mapping("vgg16", "torchvision")
  assert len(tv) == 32
  assert tv["features.0.weight"] == ("conv1_1", "kernel")
  assert tv["features.28.bias"] == ("conv5_3", "bias")
  assert tv["classifier.0.weight"] == ("fc6", "kernel")
  assert tv["classifier.6.bias"] == ("fc8", "bias")
  keras = pretrained.name_mapping("vgg16", "keras")
  assert keras["block3_conv2/kernel"] == ("conv3_2", "kernel")
  assert keras["fc2/bias"] == ("fc7", "bias") and keras["predictions/kernel"] == ("fc8", "kernel")
  caffe = pretrained.name_mapping("alexnet", "caffe")
  assert list(caffe)[:3] == ["conv1/weights", "conv1/biases", "conv2/weights"] and len(caffe) == 16
  assert pretrained.name_mapping("vgg16", "caffe")["conv5_3/biases"] == ("conv5_3", "bias")


def test_chw_to_hwc_rows():
  # 2 channels x 3 positions, one output: row c * 3 + p holds 10 * c + p.
  kernel = np.array([[0], [1], [2], [10], [11], [12]])
  np.testing.assert_array_equal(pretrained.chw_to_hwc_rows(kernel, 2)[:, 0],
                                [0, 10, 1, 11, 2, 12])


# --- bad files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg_template():
  return _template("vgg16", VGG_SIZE, **VGG_KW)[1]


@pytest.fixture()
def torchvision_arrays(vgg_template):
  return _torchvision_by_loops(_random_params(vgg_template))


def _error(path, template, model="vgg16", **kw):
  with pytest.raises(UserError) as info:
    pretrained.load_pretrained(path, model, template, **kw)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_missing_and_unexpected_names(tmp_path, vgg_template, torchvision_arrays):
  arrays = dict(torchvision_arrays)
  del arrays["features.0.bias"], arrays["classifier.6.weight"]
  path = _write(str(tmp_path / "w.npz"), arrays)
  assert _error(path, vgg_template) == (
      f"{path}: tensor names do not fit vgg16 (torchvision layout): missing features.0.bias, "
      "classifier.6.weight")
  arrays["features.1.weight"] = arrays["features.2.weight"]
  arrays.update({f"extra.{i}": np.zeros(1, np.float32) for i in range(7)})
  path = _write(str(tmp_path / "w.npz"), arrays)
  assert _error(path, vgg_template) == (
      f"{path}: tensor names do not fit vgg16 (torchvision layout): missing features.0.bias, "
      "classifier.6.weight; unexpected extra.0, extra.1, extra.2, extra.3, extra.4, extra.5 "
      "(+2 more)")


def test_shape_mismatch(tmp_path, vgg_template, torchvision_arrays):
  arrays = dict(torchvision_arrays, **{"features.2.weight": np.zeros((4, 4, 5, 3), np.float32)})
  path = _write(str(tmp_path / "w.npz"), arrays)
  assert _error(path, vgg_template) == (
      f"{path}: tensor 'features.2.weight' has shape (4, 4, 5, 3), expected (4, 4, 3, 3) for "
      "conv1_2/kernel")
  arrays = dict(torchvision_arrays, **{"classifier.0.weight": np.zeros((32, 25088), np.float32)})
  path = _write(str(tmp_path / "w.npz"), arrays)
  assert _error(path, vgg_template) == (
      f"{path}: tensor 'classifier.0.weight' has shape (32, 25088), expected (32, 64) for "
      "fc6/kernel (fc6's input size follows the image size of the template)")


def test_layout_errors(tmp_path, vgg_template):
  path = _write(str(tmp_path / "w.npz"), {"weights": np.zeros(1, np.float32)})
  assert _error(path, vgg_template) == (
      f"{path}: cannot tell the layout from its tensor names (weights); expected torchvision "
      "(features.0.weight), keras (block1_conv1/kernel) or caffe (conv1/weights) names")
  path = _write(str(tmp_path / "a.npz"), {"features.0.weight": np.zeros(1, np.float32)})
  alex_template = _template("alexnet", ALEX_SIZE, **ALEX_KW)[1]
  assert _error(path, alex_template, model="alexnet") == (
      "torchvision's AlexNet (64-192-384-256-256 channels, no groups, no LRN) is not the paper's "
      "Caffe AlexNet; convert bvlc_alexnet to the caffe layout (docs/pretrained.md)")
  assert _error(path, vgg_template, model="lenet5") == (
      "no pretrained weights for model 'lenet5', expected one of: alexnet, vgg16")
  caffe = {n: np.zeros(1, np.float32) for n in pretrained.name_mapping("alexnet", "caffe")}
  path = _write(str(tmp_path / "c.npz"), caffe)
  assert _error(path, vgg_template, model="alexnet") == (
      "the params template is not alexnet's: it holds conv1_1/bias, conv1_1/kernel, conv1_2/bias, "
      "conv1_2/kernel, conv2_1/bias, conv2_1/kernel (+26 more)")


def test_unreadable_files(tmp_path, vgg_template):
  missing = str(tmp_path / "none.npz")
  assert _error(missing, vgg_template) == f"no weights file {missing}"
  other = str(tmp_path / "w.pt")
  open(other, "wb").close()
  assert _error(other, vgg_template) == f"{other}: expected a .npz or .safetensors weights file"
  not_zip = str(tmp_path / "w.npz")
  np.save(not_zip + ".npy", np.zeros(3, np.float32))
  os.replace(not_zip + ".npy", not_zip)
  assert _error(not_zip, vgg_template) == f"{not_zip}: not a .npz (zip) archive"
  ints = _write(str(tmp_path / "i.npz"), {"features.0.weight": np.zeros(3, np.int64)})
  assert _error(ints, vgg_template) == (
      f"{ints}: tensor 'features.0.weight' has dtype int64, expected floating point")
  pytest.importorskip("safetensors")
  bad = str(tmp_path / "w.safetensors")
  with open(bad, "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  assert _error(bad, vgg_template).startswith(f"{bad}: not a readable .safetensors file: ")


class _MakesMarker:
  """Unpickling this runs os.mkdir(path): what a malicious pickle could do."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


def test_pickled_arrays_are_refused_and_never_unpickled(tmp_path, vgg_template):
  marker = str(tmp_path / "marker")
  armed = np.empty(1, dtype=object)
  armed[0] = _MakesMarker(marker)
  path = str(tmp_path / "evil.npz")
  np.savez(path, **{"features.0.weight": np.zeros(3, np.float32), "features.0.bias": armed})
  assert _error(path, vgg_template) == (
      f"{path}: tensor 'features.0.bias' is a pickled object array; refused (unpickling can run "
      "code)")
  assert not os.path.exists(marker)
  # A whole-file pickle named .npz is refused as well.
  whole = str(tmp_path / "evil2.npz")
  with open(whole, "wb") as f:
    pickle.dump({"features.0.weight": _MakesMarker(marker)}, f)
  assert _error(whole, vgg_template) == f"{whole}: not a .npz (zip) archive"
  assert not os.path.exists(marker)
  # The file was armed: loading it with pickles allowed runs the payload.
  with np.load(path, allow_pickle=True) as npz:
    npz["features.0.bias"]
  assert os.path.isdir(marker)


def test_save_npz_round_trip_and_refuses_objects(tmp_path):
  path = str(tmp_path / "w.npz")
  pretrained.save_npz(path, {"conv1/weights": np.ones((2, 3), np.float32)})
  np.testing.assert_array_equal(pretrained.read_arrays(path)["conv1/weights"], np.ones((2, 3)))
  with pytest.raises(UserError, match="object array"):
    pretrained.save_npz(path, {"x": np.array([None])})

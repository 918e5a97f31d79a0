"""Random translations and mirror images of training batches, drawn on device (beyond the paper).

The paper trains on MNIST without augmentation, and so do lwc's recipes (the published rows they
are compared with used none). A network of one's own on CIFAR-10 or similar needs it, and
in-memory datasets (`lwc.data.resident`) have no input pipeline to do it in, so it is done here,
inside the jitted training step, on the batch gathered by index. ImageNet's streamed pipeline has
Caffe's crops and mirrors of its own (`lwc.data.imagenet`).

Every draw comes from a key folded from the phase's key and the step number, so a run resumed
mid-phase sees the same augmented batches as one never interrupted. Validation and test images,
sensitivity sweeps and BatchNorm recalibration are never augmented.

  >>> import jax, jax.numpy as jnp
  >>> images = jnp.zeros((2, 5, 5, 1)).at[:, 2, 2, 0].set(1.0)
  >>> shifted = random_shift(images, jax.random.PRNGKey(0), max_shift=1)
  >>> [float(x) for x in shifted.sum(axis=(1, 2, 3))]  # the centre pixel moves; nothing is lost
  [1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lwc.errors import UserError

# Folded into the phase's key so that augmentation draws apart from dropout's (which folds in the
# step number alone): the same run with and without dropout draws the same shifts.
_SALT = 0x5EED


def random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Each image (B, H, W, C) moved by (dy, dx), each uniform over the integers in
  [-max_shift, max_shift] and drawn per image; what moves out is dropped, what it uncovers is 0.

  Invariant: the output has the input's shape and dtype, and every output pixel is either an input
  pixel of the same image or 0. max_shift=0 returns `images` itself.
  """
  if max_shift == 0:
    return images
  b, h, w, _ = images.shape
  check_shift(max_shift, (h, w), "max_shift")
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


def check_shift(max_shift: int, image_shape: tuple[int, ...], name: str = "augment_shift") -> None:
  """UserError (a ValueError) unless a shift of `max_shift` leaves part of an image of
  `image_shape` (H, W, ...) in place."""
  h, w = image_shape[:2]
  if max_shift >= min(h, w):
    raise UserError(f"{name} {max_shift} must be smaller than the images' height and width "
                    f"({h} x {w})")


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
  """Each image (B, H, W, C) mirrored left to right with probability 1/2, drawn per image."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def augmenter(max_shift: int, flip: bool) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
  """`augment(images, key) -> images`: a random shift of up to `max_shift` pixels, then a
  mirror image with probability 1/2 when `flip`; None when neither is asked for."""
  if not max_shift and not flip:
    return None

  def augment(images: jax.Array, key: jax.Array) -> jax.Array:
    shift_key, flip_key = jax.random.split(key)
    images = random_shift(images, shift_key, max_shift)
    return random_flip(images, flip_key) if flip else images

  return augment


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The key of one training step's augmentation: a function of the phase's key and the step."""
  return jax.random.fold_in(jax.random.fold_in(rng, _SALT), step)


def from_config(config) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
  """The augmentation --augment_shift and --augment_flip ask for (None: none)."""
  return augmenter(config.augment_shift, config.augment_flip)

"""A digit classifier trained here on the embedded MNIST digits' labels: the judge of pixel samples.

A model of the MNIST digits is judged by the share of its samples this classifier assigns to one
digit with probability >= CONFIDENCE, printed beside the same share for the 500 held-out real digits
(which no model and no classifier trains on): a sample that is a recognisable digit is classified
with confidence, a scribble mostly is not.

The classifier is a one-hidden-layer MLP on the pixels as levels / (L - 1), trained with AdamW on
the 4,500 training digits in the model's own image format (md4.data.pixels: size, channels, levels),
so binarised samples meet a classifier of binarised digits; each training digit is shifted by a
random few pixels every epoch, which makes the classifier far less sure of images that are not
digits (on binarised digits, pixel noise of the digits' ink density reached the threshold in 1% of
500 images with the shifts and in 25% without; tests/test_digits.py bounds it at 5%). It trains in
seconds, once per format: the parameters are cached in $XDG_CACHE_HOME/md4/digit_classifier (default ~/.cache/md4/...) under a
key of the format, the digits file's sha256 and the training settings, and reused from there; a
cache that cannot be written is skipped (the classifier is then trained again next time).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from md4.data import demo, pixels
from md4.data.base import DatasetSpec

CONFIDENCE = 0.9


@dataclasses.dataclass(frozen=True)
class Training:
  """How the classifier is trained (part of its cache key)."""
  hidden: int = 256
  epochs: int = 30
  batch_size: int = 100
  lr: float = 1e-3
  weight_decay: float = 1e-4
  shift: int = 2  # Largest random shift, in pixels of a 28x28 digit (scaled with the size, >= 1).
  seed: int = 0


TRAINING = Training()
_CACHE_VERSION = 1  # Bump when the network or its training changes in a way Training does not say.


def _intensities(levels: np.ndarray, num_levels: int) -> np.ndarray:
  """int[N, s, s, c] levels -> float32[N, s, s, c] in [0, 1]."""
  return np.asarray(levels, np.float32) / (num_levels - 1)


def _logits(params, x):
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def _init(key: jax.Array, inputs: int, hidden: int) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (inputs, hidden)) * np.sqrt(2.0 / inputs),
          "b1": jnp.zeros(hidden),
          "w2": jax.random.normal(k2, (hidden, demo.MNIST_NUM_CLASSES)) * np.sqrt(1.0 / hidden),
          "b2": jnp.zeros(demo.MNIST_NUM_CLASSES)}


def random_shifts(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """[N, H, W, C] with each image moved by its own (dy, dx), both uniform in [-max_shift,
  max_shift]; what moves past an edge is dropped and zeros (background) come in."""
  n, h, w, _ = images.shape
  m = max_shift
  padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
  dy, dx = rng.integers(0, 2 * m + 1, (2, n))
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_classifier(images: np.ndarray, labels: np.ndarray, training: Training = TRAINING
                     ) -> dict[str, np.ndarray]:
  """An MLP classifier of images: float32[N, s, s, c] in [0, 1] with labels int[N] in [0, 10),
  trained with AdamW over shuffled minibatches for training.epochs epochs, each image shifted at
  random (random_shifts) each time it is seen."""
  tx = optax.adamw(training.lr, weight_decay=training.weight_decay)
  key = jax.random.key(training.seed)
  params = _init(key, int(np.prod(images.shape[1:])), training.hidden)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(_logits(p, xb), yb).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(training.seed)
  max_shift = max(1, round(training.shift * images.shape[1] / 28))
  n = len(images) - len(images) % training.batch_size
  for _ in range(training.epochs):
    shifted = random_shifts(images, max_shift, rng).reshape(len(images), -1)
    order = rng.permutation(len(images))[:n].reshape(-1, training.batch_size)
    for rows in order:
      params, opt_state = step(params, opt_state, shifted[rows], labels[rows].astype(np.int32))
  return {k: np.asarray(v) for k, v in params.items()}


class DigitClassifier:
  """The classifier of digits in one image format."""

  def __init__(self, params: dict[str, np.ndarray], fmt: pixels.ImageFormat):
    self.params = params
    self.format = fmt
    self._probabilities = jax.jit(lambda p, x: jax.nn.softmax(_logits(p, x)))

  def probabilities(self, levels: np.ndarray) -> np.ndarray:
    """int[N, s, s, c] levels in the classifier's format -> float32[N, 10] class probabilities."""
    levels = np.asarray(levels)
    if levels.shape[1:] != self.format.shape:
      raise ValueError(f"the digit classifier reads images {self.format.shape}, got "
                       f"{levels.shape[1:]}")
    x = _intensities(levels, self.format.levels).reshape(len(levels), -1)
    return np.asarray(self._probabilities(self.params, x))


def _cache_path(fmt: pixels.ImageFormat, training: Training) -> str:
  digest = hashlib.sha256(demo.mnist_file_bytes())
  digest.update(json.dumps([_CACHE_VERSION, dataclasses.asdict(fmt),
                            dataclasses.asdict(training)]).encode())
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "md4", "digit_classifier", f"{digest.hexdigest()[:24]}.npz")


def _save(path: str, params: dict[str, np.ndarray]) -> None:
  """Writes the cache file whole (a temporary file renamed), or not at all."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".npz",
                                     delete=False) as f:
      np.savez(f, **params)
    os.replace(f.name, path)
  except OSError:
    pass  # An unwritable cache costs a retraining next time, nothing else.


def training_digits(fmt: pixels.ImageFormat) -> tuple[np.ndarray, np.ndarray]:
  """The 4,500 training digits in format fmt (levels int32[N, s, s, c]) and their labels."""
  train = demo.load_mnist_splits().train
  return pixels.reformat(train.images[..., None], fmt), np.asarray(train.labels, np.int32)


def held_out_digits(fmt: pixels.ImageFormat) -> tuple[np.ndarray, np.ndarray]:
  """The 500 held-out digits (the demo's evaluation split) in format fmt, and their labels."""
  test = demo.load_mnist_splits().test
  return pixels.reformat(test.images[..., None], fmt), np.asarray(test.labels, np.int32)


@functools.cache
def classifier(fmt: pixels.ImageFormat, training: Training = TRAINING) -> DigitClassifier:
  """The classifier of digits in format fmt: from the cache, else trained and cached."""
  path = _cache_path(fmt, training)
  try:
    with np.load(path) as cached:
      return DigitClassifier({k: cached[k] for k in cached.files}, fmt)
  except (OSError, ValueError, KeyError):
    pass  # Absent or unreadable: train it.
  x, labels = training_digits(fmt)
  params = train_classifier(_intensities(x, fmt.levels), labels, training)
  _save(path, params)
  return DigitClassifier(params, fmt)


def confident_share(probabilities: np.ndarray, threshold: float = CONFIDENCE) -> float:
  """The share of rows whose largest probability is >= threshold."""
  return float(np.mean(np.max(probabilities, axis=-1) >= threshold))


class Judgement(NamedTuple):
  samples_share: float  # Share of the samples classified with confidence >= CONFIDENCE.
  num_samples: int
  real_share: float  # The same share for the held-out real digits.
  num_real: int
  real_accuracy: float  # The classifier's accuracy on the held-out real digits.
  # Share of the samples classified with that confidence as the digit asked for (None: no labels).
  asked_share: float | None = None

  def line(self) -> str:
    asked = ("" if self.asked_share is None else
             f", {100 * self.asked_share:.0f}% as the digit asked for")
    return (f"{100 * self.samples_share:.0f}% of {self.num_samples} classified as a digit with "
            f"confidence >= {CONFIDENCE} by a digit classifier{asked} (held-out real digits: "
            f"{100 * self.real_share:.0f}% of {self.num_real}; its accuracy on them "
            f"{100 * self.real_accuracy:.1f}%)")


def format_of(spec: DatasetSpec) -> pixels.ImageFormat:
  """The image format of a model of the digits, from its spec."""
  size, width, channels = spec.example_shape
  if size != width:
    raise ValueError(f"digit images are square; this model's are {spec.example_shape}")
  return pixels.ImageFormat(size, channels, spec.vocab_size)


def judge(samples: np.ndarray, spec: DatasetSpec, asked: np.ndarray | None = None) -> Judgement:
  """samples: int[N, s, s, c] levels of a model of the digits with data spec `spec`; asked:
  int[N], the digits a class-conditional model was asked for."""
  fmt = format_of(spec)
  clf = classifier(fmt)
  real, labels = held_out_digits(fmt)
  real_probabilities = clf.probabilities(real)
  probabilities = clf.probabilities(samples)
  asked_share = None
  if asked is not None:
    confident = np.max(probabilities, axis=-1) >= CONFIDENCE
    asked_share = float(np.mean(confident & (probabilities.argmax(-1) == np.asarray(asked))))
  return Judgement(confident_share(probabilities), len(samples),
                   confident_share(real_probabilities), len(real),
                   float(np.mean(real_probabilities.argmax(-1) == labels)), asked_share)

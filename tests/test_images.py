"""Tests of CIFAR-10 and ImageNet 64x64 through their tfds builders, array_record and data_source.

Offline: the fixture writes small fake downloads (CIFAR's binary batches; downsampled ImageNet
64x64's tar files of PNGs and imagenet_resized's zipped npz files, each in a manual_dir) and runs
the real builders on them with `prepare_images`. tfds needs
TensorFlow for three calls while preparing (`tf.io.gfile.GFile` to read the downloads and
`tf.image.encode_png`); this environment has none, so the fixture stands in for exactly those with
`open` and PIL. Everything else (the builders, the array_record writer, `tfds.data_source` and PNG
decoding) is the code users run. No test may open a socket.
"""

import collections
import contextlib
import io
import os
import pickle
import re
import socket
import subprocess
import tarfile
import sys
import types
import zipfile

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.core.download import extractor as tfds_extractor
from tensorflow_datasets.core.features import image_feature as tfds_image_feature
from tensorflow_datasets.image_classification import cifar as tfds_cifar

from md4.data import images, pipeline

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CIFAR_PER_FILE = 4  # 5 training files: 20 training images; 7 test images.
_CIFAR_TEST = 7
_IMAGENET_TRAIN = (5, 4)  # imagenet_resized: images in train part 1 and part 2.
_IMAGENET_VAL = 6
_DOWNSAMPLED_TRAIN = 7  # downsampled_imagenet (the paper's ImageNet 64x64).
_DOWNSAMPLED_VAL = 5


@contextlib.contextmanager
def _no_network(monkeypatch):
  """Any socket opened inside fails, and is recorded: a swallowed failure still fails the test."""
  attempts = []

  class Refused(socket.socket):  # A class, so that modules subclassing socket.socket still import.

    def __init__(self, *args, **kwargs):
      attempts.append(args)
      raise OSError("tests/test_images.py: no network access allowed")

  monkeypatch.setattr(socket, "socket", Refused)
  yield
  assert not attempts, f"something tried to open a socket: {attempts}"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  with _no_network(monkeypatch):
    yield


def _identity(x, label):
  return x.astype(np.uint8).tobytes(), int(label)


def _png(image):
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _encode_png_with_pil(self, image):
  del self
  return _png(image)


def _without_tensorflow(monkeypatch):
  """Stands in for the TensorFlow calls tfds makes while preparing (see the module docstring)."""
  tf = types.SimpleNamespace(io=types.SimpleNamespace(gfile=types.SimpleNamespace(GFile=open)),
                             compat=types.SimpleNamespace(as_text=str))
  monkeypatch.setattr(tfds_cifar, "tf", tf)
  monkeypatch.setattr(tfds_extractor, "tf", tf)
  monkeypatch.setattr(tfds_image_feature._ImageEncoder, "_encode_image", _encode_png_with_pil)
  monkeypatch.setattr(images, "_tensorflow_available", lambda: True)


def _fake_cifar_download(root, rng):
  """CIFAR-10's binary format: per image one label byte then 3072 bytes of CHW pixels."""
  folder = root / "cifar-10-batches-bin"
  folder.mkdir(parents=True)
  (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
  written = {"train": collections.Counter(), "test": collections.Counter()}
  files = [(f"data_batch_{i}.bin", "train", _CIFAR_PER_FILE) for i in range(1, 6)]
  for filename, split, count in files + [("test_batch.bin", "test", _CIFAR_TEST)]:
    hwc = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    hwc[0, 0, 0] = [0, 255, 7]  # The extreme values occur.
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    records = np.concatenate([labels[:, None], hwc.transpose(0, 3, 1, 2).reshape(count, -1)], 1)
    (folder / filename).write_bytes(records.tobytes())
    written[split].update(_identity(x, y) for x, y in zip(hwc, labels))
  return written


def _fake_downsampled_imagenet_manual_dir(folder, rng):
  """van den Oord et al.'s downsampled ImageNet: tar files of 64x64 RGB PNGs, no labels."""
  folder.mkdir(parents=True)
  written = {}
  for tar_name, split, count in (("train_64x64.tar", "train", _DOWNSAMPLED_TRAIN),
                                 ("valid_64x64.tar", "validation", _DOWNSAMPLED_VAL)):
    hwc = rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    hwc[0, 0, 0] = [0, 255, 7]  # The extreme values occur.
    with tarfile.open(folder / tar_name, "w") as tar:
      for i, image in enumerate(hwc):
        data = _png(image)
        info = tarfile.TarInfo(f"{tar_name[:-4]}/{i:08d}.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    written[split] = collections.Counter(x.tobytes() for x in hwc)
  return written


def _fake_imagenet64_resized_manual_dir(folder, rng):
  """Downsampled ImageNet: zips of npz files, data uint8[N, 3*64*64] (CHW) and labels from 1."""
  folder.mkdir(parents=True)
  written = {"train": collections.Counter(), "validation": collections.Counter()}
  parts = [
      ("Imagenet64_train_part1_npz.zip", "train_data_batch_1.npz", "train", _IMAGENET_TRAIN[0]),
      ("Imagenet64_train_part2_npz.zip", "train_data_batch_6.npz", "train", _IMAGENET_TRAIN[1]),
      ("Imagenet64_val_npz.zip", "val_data.npz", "validation", _IMAGENET_VAL)]
  for zip_name, member, split, count in parts:
    hwc = rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(1, 1001, count)
    labels[0] = 1000
    npz = io.BytesIO()
    np.savez(npz, data=hwc.transpose(0, 3, 1, 2).reshape(count, -1), labels=labels)
    with zipfile.ZipFile(folder / zip_name, "w") as z:
      z.writestr(member, npz.getvalue())
    written[split].update(_identity(x, y - 1) for x, y in zip(hwc, labels))
  return written


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Both datasets prepared by `prepare_images` into one data_dir, with what was written."""
  root = tmp_path_factory.mktemp("images")
  data_dir = str(root / "tfds")
  rng = np.random.default_rng(0)
  with pytest.MonkeyPatch.context() as mp, _no_network(mp):
    _without_tensorflow(mp)
    cifar_download = root / "cifar_download"
    cifar_written = _fake_cifar_download(cifar_download, rng)
    mp.setattr(tfds.download.DownloadManager, "download_and_extract",
               lambda self, url: cifar_download)
    cifar_summary = images.prepare_images("cifar10", data_dir)

    # The fake archives cannot have the registered sha256; everything else of tfds' manual_dir
    # path (finding the files by name, validating, iterating the archives) runs as for real files.
    registered = {info.filename: info
                  for builder in ("imagenet_resized", "downsampled_imagenet")
                  for info in tfds.builder_cls(builder).url_infos.values()}
    mp.setattr(tfds_checksums, "compute_url_info",
               lambda path, *args, **kwargs: registered[os.path.basename(path)])
    downsampled_written = _fake_downsampled_imagenet_manual_dir(root / "manual_ds", rng)
    imagenet_summary = images.prepare_images("imagenet64", data_dir,
                                             manual_dir=str(root / "manual_ds"))
    resized_written = _fake_imagenet64_resized_manual_dir(root / "manual_resized", rng)
    resized_summary = images.prepare_images("imagenet64_resized", data_dir,
                                            manual_dir=str(root / "manual_resized"))
  return types.SimpleNamespace(data_dir=data_dir, cifar_summary=cifar_summary,
                               cifar_written=cifar_written, imagenet_summary=imagenet_summary,
                               imagenet_written=downsampled_written,
                               resized_summary=resized_summary, resized_written=resized_written)


@pytest.fixture(scope="module")
def cifar(prepared):
  return images.TfdsImages("cifar10", prepared.data_dir)


def _identities(batch):
  return collections.Counter(_identity(x, y) for x, y in zip(batch["x"], batch["label"]))


# --- preparing -------------------------------------------------------------------------------


def test_prepare_returns_the_split_counts(prepared):
  assert prepared.cifar_summary["splits"] == {"train": 5 * _CIFAR_PER_FILE, "test": _CIFAR_TEST}
  assert prepared.imagenet_summary["splits"] == {"train": _DOWNSAMPLED_TRAIN,
                                                 "validation": _DOWNSAMPLED_VAL}
  assert prepared.imagenet_summary["tfds_name"] == "downsampled_imagenet/64x64"
  assert prepared.resized_summary["splits"] == {"train": sum(_IMAGENET_TRAIN),
                                                "validation": _IMAGENET_VAL}
  assert prepared.resized_summary["tfds_name"] == "imagenet_resized/64x64"
  assert os.listdir(prepared.cifar_summary["data_dir"])  # tfds' layout: data_dir/cifar10/3.0.2.


def test_prepare_writes_array_record(prepared):
  files = os.listdir(prepared.cifar_summary["data_dir"])
  assert any(".array_record-" in f for f in files), files


def test_prepare_without_tensorflow_says_how_to_install_it(monkeypatch, tmp_path):
  monkeypatch.setattr(images, "_tensorflow_available", lambda: False)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[tf\]'"):
    images.prepare_images("cifar10", str(tmp_path))


def test_imagenet64_without_its_tar_files_names_both(tmp_path):
  with pytest.raises(ValueError, match="train_64x64.tar.*valid_64x64.tar.*pass it as manual_dir"):
    images.prepare_images("imagenet64", str(tmp_path))
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "valid_64x64.tar").write_bytes(b"")
  with pytest.raises(ValueError, match="lacks train_64x64.tar:"):
    images.prepare_images("imagenet64", str(tmp_path), manual_dir=str(tmp_path / "manual"))


def test_imagenet64_resized_without_manual_dir_names_the_files(tmp_path):
  with pytest.raises(ValueError, match="Imagenet64_val_npz.zip.*pass it as manual_dir"):
    images.prepare_images("imagenet64_resized", str(tmp_path))
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "Imagenet64_val_npz.zip").write_bytes(b"")
  with pytest.raises(ValueError, match="lacks Imagenet64_train_part1_npz.zip, "
                     "Imagenet64_train_part2_npz.zip:"):
    images.prepare_images("imagenet64_resized", str(tmp_path),
                          manual_dir=str(tmp_path / "manual"))


@pytest.mark.parametrize("make", [lambda d: images.prepare_images("mnist", d),
                                  lambda d: images.TfdsImages("mnist", d)])
def test_unknown_name_lists_the_valid_ones(make, tmp_path):
  with pytest.raises(ValueError, match="unknown image dataset 'mnist'; valid: cifar10, imagenet32, "
                     "imagenet64, imagenet64_resized"):
    make(str(tmp_path))


def test_unprepared_dataset_names_the_command_and_downloads_nothing(tmp_path):
  data_dir = str(tmp_path / "empty")
  with pytest.raises(ValueError, match=re.escape(
      f"dataset imagenet64 is not prepared in {data_dir}: run "
      f"`md4 prepare imagenet64 --data_dir={data_dir}`")):
    images.TfdsImages("imagenet64", data_dir)
  assert not os.path.exists(data_dir)


# --- reading ---------------------------------------------------------------------------------


def test_spec_matches_the_dataset(cifar, prepared):
  assert cifar.spec == pipeline.DatasetSpec(256, (32, 32, 3), "image", "dim", 10)
  imagenet = images.TfdsImages("imagenet64", prepared.data_dir)
  assert imagenet.spec == pipeline.DatasetSpec(256, (64, 64, 3), "image", "dim", 0)
  resized = images.TfdsImages("imagenet64_resized", prepared.data_dir)
  assert resized.spec == pipeline.DatasetSpec(256, (64, 64, 3), "image", "dim", 1000)
  for name in ("cifar10", "imagenet64", "imagenet64_resized"):  # The specs known without data.
    spec = pipeline.get_spec(pipeline.DataConfig(dataset=name))
    assert spec == images.TfdsImages(name, prepared.data_dir).spec


def test_train_batches_have_the_spec_shape_dtype_and_range(cifar):
  batch = next(cifar.train_iterator(6, seed=3))
  assert batch["x"].shape == (6, 32, 32, 3) and batch["x"].dtype == np.int32
  assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
  assert batch["x"].min() >= 0 and batch["x"].max() < 256
  assert batch["label"].min() >= 0 and batch["label"].max() < 10
  rows = cifar.read_train(batch["source_index"])  # Each row is the image its source_index names.
  np.testing.assert_array_equal(rows["x"], batch["x"])
  np.testing.assert_array_equal(rows["label"], batch["label"])


def test_train_stream_is_deterministic_in_seed(cifar, prepared):
  first = next(cifar.train_iterator(5, seed=5))
  fresh = images.TfdsImages("cifar10", prepared.data_dir)
  for batch in (next(cifar.train_iterator(5, seed=5)), next(fresh.train_iterator(5, seed=5))):
    np.testing.assert_array_equal(batch["x"], first["x"])
    np.testing.assert_array_equal(batch["label"], first["label"])
  other_seed = next(cifar.train_iterator(20, seed=6))
  assert not np.array_equal(other_seed["x"], next(cifar.train_iterator(20, seed=5))["x"])


def test_each_epoch_visits_every_training_example_once_in_a_new_order(cifar, prepared):
  n = cifar.num_train_examples
  assert n == 5 * _CIFAR_PER_FILE
  it = cifar.train_iterator(n, seed=1)
  orders = []
  for _ in range(3):
    batch = next(it)
    assert _identities(batch) == prepared.cifar_written["train"]
    orders.append(batch["x"])
  assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


def test_describe_example_names_the_array_record_shard_and_record(cifar):
  text = cifar.describe_example("train", 5)
  match = re.fullmatch(r"cifar10 train image 5 \(array_record shard (\S+), record 5\)", text)
  assert match and os.path.isfile(match.group(1)), text
  assert "cifar10-train.array_record-" in match.group(1)
  assert "cifar10-test.array_record-" in cifar.describe_example("valid", 2)
  with pytest.raises(ValueError, match="past the end"):
    cifar.describe_example("train", cifar.num_train_examples)


def test_two_processes_draw_disjoint_examples_that_cover_the_epoch(cifar, prepared):
  n = cifar.num_train_examples
  drawn = []
  for process in range(2):
    it = cifar.train_iterator(global_batch=n // 2, seed=9, process_index=process, process_count=2)
    drawn.append(_identities(next(it)) + _identities(next(it)))
  assert not set(drawn[0]) & set(drawn[1])
  assert drawn[0] + drawn[1] == prepared.cifar_written["train"]


@pytest.mark.parametrize("split", ["test", "valid"])
def test_eval_covers_every_test_example_once(cifar, prepared, split):
  assert cifar.num_eval_examples(split) == _CIFAR_TEST
  seen, indices = collections.Counter(), []
  for batch in cifar.eval_iterator(split, global_batch=4):
    real = batch["weight"] > 0
    seen += _identities({"x": batch["x"][real], "label": batch["label"][real]})
    indices += list(batch["index"][real])
  assert seen == prepared.cifar_written["test"]
  assert sorted(indices) == list(range(_CIFAR_TEST))


def test_unknown_eval_split_lists_the_valid_ones(cifar):
  with pytest.raises(ValueError, match="unknown evaluation split 'train'.*valid: test, valid"):
    cifar.num_eval_examples("train")


def test_imagenet64_is_downsampled_imagenet_read_pixel_exact_without_labels(prepared):
  imagenet = images.TfdsImages("imagenet64", prepared.data_dir)
  n = imagenet.num_train_examples
  assert n == _DOWNSAMPLED_TRAIN
  train = imagenet.read_train(np.arange(n))
  assert set(train) == {"x"}
  assert collections.Counter(x.astype(np.uint8).tobytes() for x in train["x"]) == (
      prepared.imagenet_written["train"])
  for split in ("test", "valid"):  # Both read the validation images: the paper's test set.
    assert imagenet.num_eval_examples(split) == _DOWNSAMPLED_VAL
    batch = imagenet.eval_example(split, np.arange(_DOWNSAMPLED_VAL))
    assert collections.Counter(x.astype(np.uint8).tobytes() for x in batch["x"]) == (
        prepared.imagenet_written["validation"])


def test_imagenet64_resized_reads_the_images_and_zero_based_labels_of_the_npz_files(prepared):
  imagenet = images.TfdsImages("imagenet64_resized", prepared.data_dir)
  n = imagenet.num_train_examples
  assert n == sum(_IMAGENET_TRAIN)
  assert _identities(imagenet.read_train(np.arange(n))) == prepared.resized_written["train"]
  assert imagenet.num_eval_examples("test") == _IMAGENET_VAL
  assert (_identities(imagenet.eval_example("test", np.arange(_IMAGENET_VAL)))
          == prepared.resized_written["validation"])
  labels = imagenet.eval_example("valid", np.arange(_IMAGENET_VAL))["label"]
  assert labels.max() < 1000 and 999 in labels


def test_pickled_dataset_reopens_and_reads_the_same(cifar):
  index = np.arange(7, dtype=np.int64)
  clone = pickle.loads(pickle.dumps(cifar))
  assert clone._sources is None  # No open data source travels.
  np.testing.assert_array_equal(clone.read_train(index)["x"], cifar.read_train(index)["x"])
  np.testing.assert_array_equal(clone.eval_example("test", index)["label"],
                                cifar.eval_example("test", index)["label"])


def test_reading_works_with_tensorflow_unimportable(prepared, monkeypatch):
  """In a fresh interpreter where `import tensorflow` fails, a prepared dataset reads fully."""
  # Every import finder is wrapped to find no tensorflow: `import tensorflow` fails and
  # importlib.util.find_spec("tensorflow") is None, as when it is not installed.
  script = ("import sys\n"
            "class HideTensorflow:\n"
            "  def __init__(self, finder): self.finder = finder\n"
            "  def __getattr__(self, name): return getattr(self.finder, name)\n"
            "  def find_spec(self, name, path=None, target=None):\n"
            "    if name.split('.')[0] == 'tensorflow': return None\n"
            "    return self.finder.find_spec(name, path, target)\n"
            "sys.meta_path[:] = [HideTensorflow(f) for f in sys.meta_path]\n"
            "import socket\n"
            "class Refused(socket.socket):\n"
            "  def __init__(self, *a, **k): raise SystemExit('tried to open a socket')\n"
            "socket.socket = Refused\n"
            "import numpy as np\n"
            "from md4.data import images\n"
            f"ds = images.TfdsImages('cifar10', {prepared.data_dir!r})\n"
            "b = ds.read_train(np.arange(ds.num_train_examples))\n"
            "e = ds.eval_example('test', np.arange(ds.num_eval_examples('test')))\n"
            "assert b['x'].shape == (20, 32, 32, 3) and e['x'].shape == (7, 32, 32, 3)\n"
            "assert 'tensorflow' not in sys.modules\n"
            "print('ok')\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=_ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_grain_worker_processes_draw_the_same_batches(cifar):
  """A grain worker process gets the dataset pickled and reopens it: the batches do not change."""
  it = cifar.train_iterator(global_batch=4, seed=1, num_workers=1)
  in_process = cifar.train_iterator(global_batch=4, seed=1)
  for _ in range(6):
    expected, batch = next(in_process), next(it)
    for key in ("x", "label", "source_index"):
      np.testing.assert_array_equal(batch[key], expected[key])
  it.close()

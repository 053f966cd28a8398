"""text8 through `md4 prepare` and the loaders, on a synthetic text8.zip; the data stream's mechanics
(per-epoch shuffles, per-process slices, exact eval coverage, iterator state, worker processes).
Offline."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from md4.config import DataConfig
from md4.data import pipeline, text8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 32


def _synthetic_text(num_chars: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(1, 9)))
           for _ in range(num_chars // 3)]
  return " ".join(words)[:num_chars]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("text8")
  text = _synthetic_text(20_011)
  zip_path = root / "text8.zip"
  with zipfile.ZipFile(zip_path, "w") as zf:
    zf.writestr("text8", text)
  data_dir = str(root / "data")
  out = subprocess.run([sys.executable, "-m", "md4.main", "prepare", "text8",
                        f"--data_dir={data_dir}", f"--source={zip_path}"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "prepared text8" in out.stdout
  return text, data_dir


def test_prepare_splits_90_5_5_and_round_trips(prepared):
  text, data_dir = prepared
  splits = text8.read_prepared(data_dir)
  assert [len(s) for s in splits] == [18009, 1000, 1002]  # N*9//10, N//20, the rest.
  assert text8.decode(np.concatenate(splits)) == text
  assert not os.path.exists(os.path.join(data_dir, f"text8.tmp-{os.getpid()}"))


def _load(data_dir):
  return pipeline.load(DataConfig(dataset="text8", data_dir=data_dir, seq_length=SEQ))


def test_training_rows_are_the_windows_their_source_index_names(prepared):
  _, data_dir = prepared
  ds = _load(data_dir)
  train = text8.read_prepared(data_dir).train
  assert ds.num_train_records() == len(train) - SEQ + 1  # Every window start.
  batch = next(ds.train_iterator(200, seed=3))
  assert batch["x"].shape == (200, SEQ) and batch["x"].dtype == np.int32
  assert batch["source_index"].dtype == np.int64
  for x, start in zip(batch["x"], batch["source_index"]):
    np.testing.assert_array_equal(x, train[start:start + SEQ])
  assert len(set(batch["source_index"].tolist())) == 200  # No window twice within an epoch.
  again = next(ds.train_iterator(200, seed=3))
  np.testing.assert_array_equal(again["x"], batch["x"])  # Seeded.
  assert not np.array_equal(next(ds.train_iterator(200, seed=4))["x"], batch["x"])


def test_describe_example_names_the_split_file_and_position(prepared):
  _, data_dir = prepared
  ds = _load(data_dir)
  train_file = os.path.abspath(os.path.join(data_dir, "text8", "train.npy"))
  assert ds.name == "text8"
  assert ds.describe_example("train", 1234) == (
      f"text8 train window starting at character 1234 of {train_file}")
  valid_file = os.path.abspath(os.path.join(data_dir, "text8", "valid.npy"))
  assert ds.describe_example("valid", 2) == (
      f"text8 valid chunk 2 (characters [64, 96)) of {valid_file}")
  shakespeare = pipeline.load(DataConfig(dataset="shakespeare", seq_length=SEQ))
  assert "embedded demo data" in shakespeare.describe_example("train", 7)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_scores_every_character_exactly_once(prepared, process_count):
  _, data_dir = prepared
  ds = pipeline.load(DataConfig(dataset="text8", data_dir=data_dir, seq_length=SEQ))
  valid = text8.read_prepared(data_dir).valid
  pieces = {}
  for p in range(process_count):
    for batch in ds.eval_iterator("valid", 8, p, process_count):
      for x, w, i in zip(batch["x"], batch["weight"], batch["index"]):
        if w:
          assert i not in pieces
          pieces[int(i)] = x
  scored = np.concatenate([pieces[i] for i in sorted(pieces)])
  np.testing.assert_array_equal(scored, valid)  # 31 full chunks and a tail of 8, once each.
  assert len(pieces) == len(valid) // SEQ + 1


def test_unprepared_dataset_names_the_command(tmp_path):
  with pytest.raises(ValueError, match=r"not prepared.*md4 prepare text8 --data_dir="):
    pipeline.load(DataConfig(dataset="text8", data_dir=str(tmp_path), seq_length=SEQ))
  with pytest.raises(ValueError, match="needs data.data_dir"):
    pipeline.load(DataConfig(dataset="text8", seq_length=SEQ))
  out = subprocess.run([sys.executable, "-m", "md4.main", "prepare", "text8",
                        f"--data_dir={tmp_path}", f"--source={tmp_path}/missing.zip"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode != 0 and "does not exist" in out.stderr


def _small_image_set(n: int = 10) -> pipeline.ImageSet:
  """n 1x1 images whose pixel value is their index, so a batch names the records it holds."""
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  labels = np.zeros(n, np.uint8)
  return pipeline.ImageSet((images, labels), (images, labels), 1, "tiny", "a test array")


def test_each_epoch_is_a_new_permutation_of_all_records():
  ds = _small_image_set(10)
  it = ds.train_iterator(5, seed=1)
  stream = np.concatenate([next(it)["source_index"] for _ in range(8)])  # 4 epochs.
  epochs = stream.reshape(4, 10)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
  assert len({tuple(e) for e in epochs}) == 4  # Each epoch in another order.
  first = next(ds.train_iterator(5, seed=1))
  np.testing.assert_array_equal(first["source_index"], stream[:5])
  np.testing.assert_array_equal(first["x"].reshape(-1), first["source_index"])  # The records named.


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_local_batches_concatenate_to_the_one_process_batch(prepared, process_count):
  _, data_dir = prepared
  ds = _load(data_dir)
  single = ds.train_iterator(12, seed=2)
  parts = [ds.train_iterator(12, seed=2, process_index=p, process_count=process_count)
           for p in range(process_count)]
  for _ in range(4):
    expected = next(single)
    local = [next(it) for it in parts]
    assert all(b["x"].shape == (12 // process_count, SEQ) for b in local)
    for key in ("x", "source_index"):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), expected[key])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_restored_iterator_yields_the_same_next_batches(prepared, num_workers):
  _, data_dir = prepared
  ds = _load(data_dir)
  it = ds.train_iterator(16, seed=5, num_workers=num_workers)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # Saved as JSON with the checkpoint.
  expected = [next(it) for _ in range(2)]
  fresh = ds.train_iterator(16, seed=5, num_workers=num_workers)
  fresh.set_state(state)
  for batch in expected:
    got = next(fresh)
    for key in ("x", "source_index"):
      np.testing.assert_array_equal(got[key], batch[key])
  it.close()
  fresh.close()


def test_a_state_is_refused_by_another_stream(prepared):
  _, data_dir = prepared
  ds = _load(data_dir)
  it = ds.train_iterator(16, seed=5)
  next(it)
  state = it.get_state()
  with pytest.raises(ValueError, match="global batch 16, this run uses 8"):
    ds.train_iterator(8, seed=5).set_state(state)
  with pytest.raises(ValueError, match="seed 5, this run uses 6"):
    ds.train_iterator(16, seed=6).set_state(state)
  with pytest.raises(ValueError, match="process count 1, this run uses 2"):
    ds.train_iterator(16, seed=5, process_index=1, process_count=2).set_state(state)
  with pytest.raises(ValueError, match=r"data.num_workers\) 0, this run uses 1"):
    ds.train_iterator(16, seed=5, num_workers=1).set_state(state)

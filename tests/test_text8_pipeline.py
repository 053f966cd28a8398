"""text8 through `md4 prepare` and the loaders, on a synthetic text8.zip; the data stream's mechanics
(per-process shards, exact eval coverage, iterator state, worker processes). Offline."""

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


def test_training_windows_are_random_slices_of_train_only(prepared):
  text, data_dir = prepared
  ds = pipeline.load(DataConfig(dataset="text8", data_dir=data_dir, seq_length=SEQ))
  train = text8.decode(text8.read_prepared(data_dir).train)
  batch = ds.train_example(3, np.arange(200))["x"]
  assert batch.shape == (200, SEQ) and batch.dtype == np.int32
  starts = [train.find(text8.decode(row)) for row in batch]
  assert all(s >= 0 for s in starts)  # Each window lies inside the training split.
  assert len(set(starts)) > 190  # Random starts, not a fixed tiling.
  np.testing.assert_array_equal(batch, ds.train_example(3, np.arange(200))["x"])  # Seeded.
  assert not np.array_equal(batch, ds.train_example(4, np.arange(200))["x"])


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


def _index_fn(index):
  return {"x": index[:, None]}


def test_processes_read_disjoint_shards_that_together_complete_each_batch():
  iters = [pipeline.TrainIterator(_index_fn, 12, p, 3) for p in range(3)]
  for step in range(4):
    parts = [next(it)["x"][:, 0] for it in iters]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)),
                                  np.arange(step * 12, (step + 1) * 12))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_iterator_yields_the_same_next_batch(prepared, num_workers):
  _, data_dir = prepared
  ds = pipeline.load(DataConfig(dataset="text8", data_dir=data_dir, seq_length=SEQ))
  it = ds.train_iterator(16, seed=5, num_workers=num_workers)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)["x"]
  fresh = ds.train_iterator(16, seed=5)
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)["x"], expected)
  np.testing.assert_array_equal(expected, ds.train_example(5, np.arange(48, 64))["x"])
  with pytest.raises(ValueError, match="global batch 16, this run uses 8"):
    ds.train_iterator(8, seed=5).set_state(state)

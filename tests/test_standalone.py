"""A checkpoint stands alone: it records its config, its data's spec and how its ids decode (a copy
of its tokenizer), so `md4 sample`, `md4 info --workdir` and `md4 eval --zero_shot` run from the
workdir alone, in a fresh working directory, with the dataset and the tokenizer's own files gone;
`md4 eval` on a split needs the data and says so. Checkpoints written before descriptions were
recorded still load, from the config's dataset.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tiny_bpe
from configs import tiny
from configs.md4 import openwebtext
from md4 import checkpoint, generate, inference, train
from md4 import config as config_lib
from md4.commands import evaluate, models
from md4.data import documents, pipeline
from md4.state import inference_params, stream_key

PTB = " the cat \n tin \n"  # 10 tokens of the tiny BPE (tests/tiny_bpe.py), as test_zero_shot.py.


def _md4(*args, cwd, env=None):
  return subprocess.run([sys.executable, "-m", "md4.main", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
  """A tiny MD4 over a byte-level BPE of 261 tokens, trained 2 steps on a corpus prepared with it;
  its expected samples are decoded with the corpus's own tokenizer, then the corpus and the
  tokenizer's directory are deleted. Returns (directory holding the run, expected sample texts)."""
  root = tmp_path_factory.mktemp("standalone")
  bpe = tiny_bpe.write(str(root / "bpe"))
  words = ["the", "cat", "sat", "in", "tin", "then", "thin", "end"]
  for i in range(8):
    (root / f"doc{i}.txt").write_text(" ".join(words[(i + j) % 8] for j in range(20)))
  documents.prepare_documents("openwebtext", [str(root / "doc*.txt")], str(root / "data"),
                              tokenizer=bpe, seq_length=8, heldout_fraction=0.5, progress=False)
  config = openwebtext.get_config("tiny")
  config.data.data_dir = str(root / "data")
  config.data.seq_length = 8
  config.model.vocab_size = tiny_bpe.VOCAB_SIZE
  config.train.num_steps = 2
  config.eval.batch_size = 2
  cfg = config_lib.from_configdict(config)
  train.train(cfg, str(root / "run"))

  dataset = pipeline.load(cfg.data)
  loaded = inference.load(cfg, inference.open_model(str(root / "run")))
  init = generate.unconditional_init(dataset.spec, cfg.sample.num_samples, cfg.model.vocab_size)
  samples = generate.Sampler(loaded.network, cfg)(
      inference_params(loaded.state, cfg, "sample"), stream_key(cfg.train.seed, "sample"),
      init).samples
  expected = [dataset.decode(s) for s in np.asarray(samples)]
  shutil.rmtree(root / "data")
  shutil.rmtree(root / "bpe")
  return root, expected


def test_samples_decode_with_the_tokenizer_copy_the_workdir_keeps(token_run, tmp_path):
  root, expected = token_run
  assert sorted(os.listdir(root / "run" / "tokenizer")) == ["merges.txt", "vocab.json"]
  done = _md4("sample", f"--workdir={os.path.relpath(root / 'run', tmp_path)}", cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines()[1:] == [repr(text) for text in expected]


def test_info_and_zero_shot_read_only_the_workdir(token_run, tmp_path):
  root, _ = token_run
  info = _md4("info", f"--workdir={root / 'run'}", cwd=tmp_path)
  assert info.returncode == 0, info.stderr[-3000:]
  assert ("recorded data: openwebtext, text: 8 tokens per example, vocabulary 261; decoding: "
          "tokenizer bpe (tokenizer/vocab.json, tokenizer/merges.txt)") in info.stdout
  assert "tokens per example: 8 (tokens)" in info.stdout

  (tmp_path / "ptb.test.txt").write_text(PTB)
  zero_shot = _md4("eval", f"--workdir={root / 'run'}", "--zero_shot=ptb",
                   "--source=ptb.test.txt", cwd=tmp_path)
  assert zero_shot.returncode == 0, zero_shot.stderr[-3000:]
  assert f"tokenizer bpe:{root / 'run' / 'tokenizer'}" in zero_shot.stdout
  assert any(line.startswith("| PTB | 2 | 2 | 10 |") for line in zero_shot.stdout.splitlines())

  # A split is the one thing that needs the data.
  model_dir = inference.open_model(str(root / "run"))
  with pytest.raises(ValueError, match=f"dataset openwebtext is not prepared in {root / 'data'}"):
    evaluate.run(inference.recorded_config(model_dir), model_dir, None)


def test_a_checkpoint_without_a_description_reads_the_config_s_dataset(tmp_path, monkeypatch,
                                                                      capsys):
  cfg = config_lib.from_configdict(tiny.get_config())
  with monkeypatch.context() as patch:  # As md4 wrote checkpoints before they recorded their data.
    patch.setattr(train.standalone, "describe_dataset", lambda *args, **kwargs: None)
    train.train(cfg, str(tmp_path / "run"))
  assert checkpoint.read_record(str(tmp_path / "run")).description is None
  env = dict(os.environ, HOME=str(tmp_path))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  done = _md4("sample", "--workdir=~/run", "--output=~/out/s", cwd=elsewhere, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = (tmp_path / "out" / "s.txt").read_text().splitlines()
  assert len(lines) == 2 and all(len(line) == 16 for line in lines)
  models.info(cfg, "tiny", inference.open_model(str(tmp_path / "run")))
  assert ("recorded data: none (a checkpoint written before models recorded their data; readers "
          "load the config's dataset, 'shakespeare')") in capsys.readouterr().out

"""`md4 export`: a model as a directory to share, read back by every command that reads a model.

The round trip runs the commands as a user would, in fresh working directories: samples drawn from
the workdir and from the exported directory, moved elsewhere after the workdir is deleted, must be
the same, character for character (same seed, same parameters).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from md4 import config as config_lib
from md4 import export, inference, metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _md4(*args, cwd):
  return subprocess.run([sys.executable, "-m", "md4.main", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny demo model trained by `md4 train` in a directory of its own, with a relative workdir."""
  home = tmp_path_factory.mktemp("export_home")
  done = _md4("train", "--config=configs/tiny.py", "--workdir=runs/tiny",
              "--config.train.num_steps=4", "--config.train.checkpoint_every=2", cwd=home)
  assert done.returncode == 0, done.stderr[-3000:]
  return home, home / "runs" / "tiny"


def test_samples_from_the_exported_directory_moved_elsewhere_are_the_workdir_s(trained, tmp_path):
  home, workdir = trained
  sampled = _md4("sample", "--workdir=runs/tiny", "--output=before", cwd=home)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  before = (home / "before.txt").read_text()

  exported = _md4("export", "--workdir=runs/tiny", "--to=shared/tiny_model", cwd=home)
  assert exported.returncode == 0, exported.stderr[-3000:]
  elsewhere = tmp_path / "downloads" / "tiny_model"
  elsewhere.parent.mkdir()
  shutil.move(str(home / "shared" / "tiny_model"), str(elsewhere))
  saved_workdir = tmp_path / "workdir_copy"
  shutil.move(str(workdir), str(saved_workdir))  # Gone from where it was.

  fresh = tmp_path / "somewhere_else"
  fresh.mkdir()
  again = _md4("sample", "--workdir=../downloads/tiny_model", "--output=after", cwd=fresh)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (fresh / "after.txt").read_text() == before
  assert before.count("\n") == 2 and len(before.splitlines()[0]) == 16  # tiny: 2 samples of 16.
  shutil.move(str(saved_workdir), str(workdir))


def _state(workdir, cfg, step):
  return inference.load(cfg, inference.open_model(str(workdir), step)).state


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """`md4 export` of the trained workdir (EMA parameters, the latest step), by absolute paths."""
  _, workdir = trained
  to = tmp_path_factory.mktemp("exports") / "model"
  done = _md4("export", f"--workdir={workdir}", f"--to={to}", cwd=to.parent)
  assert done.returncode == 0, done.stderr[-3000:]
  return to


def test_the_export_holds_the_config_the_ema_parameters_and_a_model_card(trained, exported,
                                                                         tmp_path):
  _, workdir = trained
  to = exported
  assert sorted(os.listdir(to)) == ["README.md", "config.json", "model.safetensors"]
  record = json.loads((to / "config.json").read_text())
  assert record["format"] == "md4" and record["step"] == 4 and record["params"] == "ema"
  assert record["description"]["spec"]["vocab_size"] == 27
  assert record["description"]["decode"] == {"alphabet": "abcdefghijklmnopqrstuvwxyz "}
  cfg = config_lib.from_configdict(record["config"])
  ema = export.flatten(_state(workdir, cfg, 4).ema_params)
  tensors = load_file(str(to / "model.safetensors"))
  assert sorted(tensors) == sorted(ema)
  for name, value in ema.items():
    np.testing.assert_array_equal(tensors[name], value)

  card = (to / "README.md").read_text()
  final = [r for r in metric_writer.read_metrics(str(workdir)) if "eval/bits_per_char" in r][-1]
  assert (f"- step 4: {final['eval/bits_per_char']:.4f} ± {final['eval/bits_per_char_se']:.4f} "
          "bits/char") in card
  assert "md4 sample --workdir=model" in card and "EMA parameters" in card

  raw = tmp_path / "raw"
  done = _md4("export", f"--workdir={workdir}", f"--to={raw}", "--params=raw",
              "--checkpoint_step=2", cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  params = export.flatten(_state(workdir, cfg, 2).params)
  tensors = load_file(str(raw / "model.safetensors"))
  for name, value in params.items():
    np.testing.assert_array_equal(tensors[name], value)
  assert json.loads((raw / "config.json").read_text())["step"] == 2

  source = export.Source(str(workdir), 4, cfg, inference.open_model(str(workdir)).description,
                         None, [])
  with pytest.raises(ValueError, match=f"--to={to} exists; export into a new directory"):
    export.write(str(to), source, _state(workdir, cfg, 4).ema_params, "ema")


def test_an_exported_model_is_read_by_info_and_eval(trained, exported):
  _, workdir = trained
  to = exported
  info = _md4("info", "--workdir=model", cwd=to.parent)
  assert info.returncode == 0, info.stderr[-3000:]
  assert f"model: {to}, exported by md4 export (ema parameters), step 4" in info.stdout
  assert ("recorded data: shakespeare, text: 16 chars per example, vocabulary 27; decoding: "
          "text8's characters (a-z and space)") in info.stdout
  evaluated = _md4("eval", "--workdir=model", cwd=to.parent)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  # The export holds the EMA parameters, which the run's final evaluation read too, with the same
  # config (the tiny config's 16 examples) and the same random stream: the same bound.
  final = [r for r in metric_writer.read_metrics(str(workdir)) if "eval/bits_per_char" in r][-1]
  assert (f"{final['eval/bits_per_char']:.4f} ± {final['eval/bits_per_char_se']:.4f} bits/char"
          in evaluated.stdout)
  with pytest.raises(ValueError, match="--checkpoint_step=2 applies to workdirs"):
    inference.open_model(str(to), step=2)

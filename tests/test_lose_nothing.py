"""Long jobs lose nothing: the whole config is checked before the first step, errors are one clear
line, a failing hook leaves its step saved, nothing non-finite is saved, bad ids are caught at the
door, checkpoints refuse another model and survive a SIGKILL in the middle of a save."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from md4 import checkpoint, checks, generate, train
from md4 import config as config_lib
from md4.data import pipeline, text8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MD4 = [sys.executable, "-m", "md4.main"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def tiny_cfg(**changes) -> config_lib.Config:
  """The tiny config with changes given as {"group.key": value}."""
  cd = tiny.get_config()
  for key, value in changes.items():
    group, name = key.split(".", 1)
    if "." in name:
      name, field = name.split(".")
      cd[group][name] = dict(cd[group][name], **{field: value})
    else:
      cd[group][name] = value
  return config_lib.from_configdict(cd)


def _check(**changes):
  checks.check_config(tiny_cfg(**changes))


# Each bad setting, and a piece of the message that must name it (the key and the valid values).
BAD_SETTINGS = [
    ({"sample.method": "ancestrl"}, r"sample.method='ancestrl' is invalid; valid: ancestral"),
    ({"sample.time_grid": "cosin"}, r"sample.time_grid='cosin' is invalid; valid: uniform, cosine"),
    ({"sample.num_steps": 0}, r"sample.num_steps=0 is invalid; valid: >= 1"),
    ({"sample.top_p": 0.0}, r"sample.top_p=0.0 is invalid; valid: in \(0, 1\]"),
    ({"sample.reuse_unchanged": True}, r"sample.reuse_unchanged=True .* conditions on time"),
    ({"model.state_dependent": True, "sample.method": "first_hitting"},
     r"first_hitting.*GenMD4.*valid methods for GenMD4: ancestral, euler, mean$"),
    ({"model.power_init": 0.0}, r"model.power_init=0.0 is invalid; valid: > 0"),
    ({"model.power_init": -1.0}, r"model.power_init=-1.0 is invalid; valid: > 0"),
    ({"model.schedule": "cosin"}, r"unknown schedule.*cosin"),
    ({"model.eps": 0.7}, r"model.eps=0.7 is invalid; valid: in \[0, 0.5\)"),
    ({"model.net.num_layerz": 2}, r"unknown field\(s\) \['num_layerz'\]"),
    ({"optimizer.lr": -1e-3}, r"optimizer.lr=-0.001 is invalid; valid: >= 0"),
    ({"optimizer.weight_decay": -0.1}, r"optimizer.weight_decay=-0.1 is invalid; valid: >= 0"),
    ({"optimizer.ema_decay": 1.5}, r"optimizer.ema_decay=1.5 is invalid; valid: in \[0, 1\]"),
    ({"optimizer.ema_decay": -0.1}, r"optimizer.ema_decay=-0.1 is invalid; valid: in \[0, 1\]"),
    ({"optimizer.b2": 1.0}, r"optimizer.b2=1.0 is invalid; valid: in \[0, 1\)"),
    ({"optimizer.decay": "linear"}, r"optimizer.decay='linear' is invalid; valid: 'cosine', "),
    ({"eval.split": "validation"}, r"eval.split='validation' is not a split of dataset "
                                   r"'shakespeare'; valid: valid, test, train"),
    ({"eval.num_time_samples": 0}, r"eval.num_time_samples=0 is invalid; valid: >= 1"),
    ({"eval.timesteps": -1}, r"eval.timesteps=-1 is invalid"),
    ({"eval.batch_size": 0}, r"eval.batch_size=0 is invalid; valid: >= 1"),
    ({"train.eval_every": -5}, r"train.eval_every=-5 is invalid"),
    ({"train.checkpoint_every": 0}, r"train.checkpoint_every=0 is invalid; valid: >= 1"),
    ({"train.batch_size": 6, "train.grad_accum_steps": 4},
     r"train.batch_size=6 must be a multiple of train.grad_accum_steps=4"),
    ({"train.compute_dtype": "float16"}, r"train.compute_dtype='float16' is invalid"),
    ({"data.dataset": "shakespear"}, r"unknown dataset 'shakespear'; valid: shakespeare"),
    ({"train.label_drop": 1.0}, r"train.label_drop=1.0 is invalid; valid: in \[0, 1\)"),
    ({"train.label_drop": 0.1}, r"train.label_drop=0.1 .* needs a class-conditional network with "
                                r"a null class"),
    ({"sample.guidance_scale": -1.0}, r"sample.guidance_scale=-1.0 is invalid; valid: >= 0"),
    ({"sample.guidance_scale": 2.0}, r"sample.guidance_scale=2.0 .* needs a class-conditional "
                                     r"network with a null class"),
    ({"model.net.null_class": True}, r"null_class=True needs num_classes > 0"),
    ({"sample.method": "first_hitting", "sample.remask_eta": 0.1},
     r"in config.sample: remask_eta=0.1 applies to method='remdm' only"),
    ({"sample.method": "remdm", "sample.remask_strategy": "loops"},
     r"in config.sample: unknown remask_strategy 'loops'; valid: cap, loop"),
    ({"sample.method": "remdm", "sample.remask_t_on": 0.1, "sample.remask_t_off": 0.2},
     r"remask_t_on and remask_t_off must satisfy 1 >= remask_t_on > remask_t_off >= 0"),
    ({"sample.temperature": 0.5}, r"temperature=0.5 applies to method='maskgit' only"),
    ({"sample.method": "maskgit", "sample.temperature": -1.0},
     r"temperature must be a finite float >= 0, got -1.0"),
    ({"model.state_dependent": True, "sample.method": "remdm"},
     r"sample.method='remdm' needs a state-independent schedule.*GenMD4: ancestral, euler, mean$"),
]


@pytest.mark.parametrize("changes,message", BAD_SETTINGS,
                         ids=[",".join(c) for c, _ in BAD_SETTINGS])
def test_every_bad_setting_is_refused_before_anything_runs(changes, message):
  with pytest.raises(ValueError, match=message):
    _check(**changes)


def test_batches_are_checked_against_devices_and_processes():
  cfg = tiny_cfg(**{"train.batch_size": 6, "eval.batch_size": 6})
  with pytest.raises(ValueError, match=r"train.batch_size / train.grad_accum_steps=6 must be a "
                                       r"multiple of the number of device\(s\) \(4\)"):
    checks.check_config(cfg, num_devices=4)
  with pytest.raises(ValueError, match=r"train.batch_size=6 must be a multiple of the number of "
                                       r"process\(es\) \(4\)"):
    checks.check_config(cfg, num_devices=4, num_processes=4)
  with pytest.raises(ValueError, match=r"eval.batch_size=6 .* device\(s\) \(4\)"):
    checks.check_config(tiny_cfg(**{"eval.batch_size": 6}), num_devices=4)
  with pytest.raises(ValueError, match=r"train.mesh_fsdp=3 must divide the number of devices \(4\)"):
    checks.check_config(tiny_cfg(**{"train.mesh_fsdp": 3}), num_devices=4)
  checks.check_config(tiny_cfg(), num_devices=4, num_processes=2)


def _run(*args, cwd=ROOT, timeout=300):
  return subprocess.run(MD4 + list(args), capture_output=True, text=True, env=ENV, cwd=cwd,
                        timeout=timeout)


def _checkpoint_files(workdir):
  root = pathlib.Path(workdir, "checkpoints")
  return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 3 steps through the CLI (checkpoint at step 3)."""
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  out = _run("train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
             "--config.train.num_steps=3")
  assert out.returncode == 0, out.stderr
  return workdir


CLI_CASES = [
    (["train", "--config.sample.method=ancestrl", "--config.train.sample_every=2"],
     "md4 train: error: sample.method='ancestrl' is invalid; valid: ancestral, euler, mean, "
     "first_hitting, maskgit, remdm"),
    (["train", "--config.optimizer.lr=-0.1"],
     "md4 train: error: optimizer.lr=-0.1 is invalid; valid: >= 0"),
    (["train", "--config.eval.split=nope"],
     "md4 train: error: eval.split='nope' is not a split of dataset 'shakespeare'"),
    (["eval", "--config.eval.num_time_samples=0"],
     "md4 eval: error: eval.num_time_samples=0 is invalid; valid: >= 1"),
    (["eval", "--split=nope"],
     "md4 eval: error: --split='nope' is not a split of dataset 'shakespeare'; valid: valid, "
     "test, train"),
    (["sample", "--config.model.power_init=0.0", "--config.model.state_dependent=True"],
     "md4 sample: error: model.power_init=0.0 is invalid; valid: > 0"),
    (["train", "--config.train.nonsense=1"], "unknown config key 'nonsense'"),
    (["sample", "--length=40", "--window=16"],
     "md4 sample: error: --window=16 must be in [0, 15]"),
    (["sample", "--window=4"], "md4 sample: error: --window goes with --length"),
    (["sample", "--config.sample.guidance_scale=2.0"],
     "md4 sample: error: sample.guidance_scale=2.0 combines the conditional and the null-class"),
]


@pytest.mark.parametrize("args,message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_errors_are_one_line_without_usage_and_lose_nothing(trained, args, message):
  before = _checkpoint_files(trained)
  out = _run(*args[:1], f"--config={ROOT}/configs/tiny.py", f"--workdir={trained}", *args[1:])
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert message in last, out.stderr
  assert "USAGE" not in out.stderr and "Traceback" not in out.stderr, out.stderr
  assert _checkpoint_files(trained) == before


def test_eval_of_a_missing_workdir_is_one_line(tmp_path):
  out = _run("eval", f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path}/nonexistent")
  assert out.returncode == 1
  assert out.stderr.strip() == (f"md4 eval: error: no checkpoint in {tmp_path}/nonexistent/"
                                f"checkpoints: {tmp_path}/nonexistent holds no run (train first: "
                                f"md4 train --workdir={tmp_path}/nonexistent) and no exported "
                                "model (md4 export writes config.json and model.safetensors)"
                                ), out.stderr


def test_a_failing_hook_leaves_its_step_saved_and_a_rerun_resumes(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  cfg = tiny_cfg(**{"train.sample_every": 2, "train.checkpoint_every": 5, "train.num_steps": 4})

  def broken(*args, **kwargs):
    raise RuntimeError("the sampler broke")

  with monkeypatch.context() as patch:
    patch.setattr(generate.Sampler, "__call__", broken)
    with pytest.raises(train.HookError, match=r"the sample hook failed after step 2 \(RuntimeError: "
                                              r"the sampler broke\); the checkpoint of step 2 is "
                                              r"saved in .*checkpoints"):
      train.train(cfg, workdir)
  assert checkpoint.Checkpointer(workdir, cfg, read_only=True).latest_step() == 2
  resumed = train.train(cfg, workdir)
  assert int(resumed.state.step) == 4


def test_non_finite_state_is_never_saved(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = tiny_cfg(**{"optimizer.lr": 1e38, "optimizer.grad_clip_norm": 0.0,
                    "optimizer.warmup_steps": 0, "train.checkpoint_every": 1,
                    "train.log_every": 100})
  with pytest.raises(FloatingPointError, match=r"at step (\d+); not saving .*(no checkpoint was "
                                               r"written|the last checkpoint is step \d+)"):
    train.train(cfg, workdir)
  checkpointer = checkpoint.Checkpointer(workdir, cfg)
  setup = train.make_setup(cfg, pipeline.get_spec(cfg.data))
  for step in checkpointer.manager.all_steps():
    restored = checkpointer.restore(train.abstract_state(setup), setup.tx.init, step)
    for leaf in jax.tree.leaves((restored.state.params, restored.state.ema_params)):
      assert np.isfinite(np.asarray(leaf)).all(), step


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params,
                                                  state.rng))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """6 tiny steps in one go, checkpoints every 2."""
  cfg = tiny_cfg(**{"train.checkpoint_every": 2})
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  return cfg, workdir, train.train(cfg, workdir)


# Trains like `straight` but dies by SIGKILL while writing the checkpoint of step 4: after the state
# is written and before the save completes (orbax's JSON writer is the last thing a save calls).
KILLED_MID_SAVE = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from tests import test_lose_nothing as t
from md4 import train

original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

async def save_then_die(self, x, directory):
  await original(self, x, directory)
  if directory.parent.name.split(".")[0] == "4":
    print("killing myself mid-save at", directory, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

json_checkpoint_handler.JsonCheckpointHandler._save_fn = save_then_die
train.train(t.tiny_cfg(**{{"train.checkpoint_every": 2}}), {workdir!r})
"""


def test_sigkill_mid_save_keeps_the_previous_checkpoint_and_resume_is_exact(straight, tmp_path):
  cfg, _, uninterrupted = straight
  workdir = str(tmp_path / "run")
  script = KILLED_MID_SAVE.format(root=ROOT, workdir=workdir)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=300)
  assert out.returncode == -9, out.stdout + out.stderr
  assert "killing myself mid-save" in out.stdout
  leftovers = os.listdir(os.path.join(workdir, "checkpoints"))
  assert any(name.startswith("4.") for name in leftovers), leftovers  # The half-written save.
  assert checkpoint.Checkpointer(workdir, cfg).latest_step() == 2
  resumed = train.train(cfg, workdir)
  assert int(resumed.state.step) == 6
  for a, b in zip(_leaves(uninterrupted.state), _leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("changes,message", [
    ({"model.schedule": "cosine"}, r"model.schedule: checkpoint has 'linear', config has 'cosine'"),
    ({"model.eps": 1e-3}, r"model.eps: checkpoint has 0.0001, config has 0.001"),
    ({"model.state_dependent": True}, r"model.state_dependent: checkpoint has False"),
    ({"model.net.cond_dim": 4}, r"model.net: checkpoint has"),
])
def test_a_checkpoint_of_another_model_is_refused_naming_the_key(straight, tmp_path, changes,
                                                                 message):
  _, workdir, _ = straight
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  before = _checkpoint_files(copy)
  with pytest.raises(ValueError, match=r"belongs to another model config; refusing to restore "
                                       r"it:\n  .*" + message):
    train.train(tiny_cfg(**changes, **{"train.checkpoint_every": 2}), copy)
  assert _checkpoint_files(copy) == before


def test_runtime_network_options_may_change_on_resume(straight, tmp_path):
  cfg, workdir, _ = straight
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  changed = tiny_cfg(**{"train.checkpoint_every": 2, "train.num_steps": 7,
                        "model.net.remat": "full", "model.net.dropout_rate": 0.1})
  assert int(train.train(changed, copy).state.step) == 7


def test_a_changed_optimizer_restores_the_parameters_and_says_what_was_reset(straight, tmp_path,
                                                                              capsys):
  cfg, workdir, _ = straight
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "6"))
  checkpointer = checkpoint.Checkpointer(copy, cfg)
  setup = train.make_setup(cfg, pipeline.get_spec(cfg.data))
  saved = checkpointer.restore(train.abstract_state(setup), setup.tx.init).state
  # No clipping: the optimizer state loses a level, so the saved moments cannot be restored.
  changed = tiny_cfg(**{"train.checkpoint_every": 2, "optimizer.grad_clip_norm": 0.0,
                        "train.num_steps": 5})
  result = train.train(changed, copy)
  log = capsys.readouterr()
  text = log.out + log.err
  assert "optimizer.grad_clip_norm changed since the checkpoint: 1.0 -> 0.0" in text
  assert "train.num_steps changed since the checkpoint: 6 -> 5" in text
  assert "the optimizer state (Adam moments) starts fresh" in text
  assert "resumed from step 4" in text
  assert int(result.state.step) == 5
  # The restored parameters were those saved: one step from them, with fresh moments, moves each
  # parameter by at most lr (Adam's first step is lr * sign-like).
  lr = float(train.learning_rate_schedule(changed)(4))
  for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(result.state.params)):
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= lr * 1.001 + 1e-7


# Loads every shipped config by the name a user types, from the installed copy, as main.py does.
LOAD_SHIPPED = r"""
import importlib.util, pathlib, sys
sys.path.insert(0, {site!r})
from md4 import main, checks
from md4 import config as config_lib
assert main.CONFIG_ROOT == pathlib.Path({site!r}, "md4", "configs"), main.CONFIG_ROOT
for name in {names!r}:
  path = main._shipped_config("configs/" + name)
  assert path.startswith({site!r}), path
  spec = importlib.util.spec_from_file_location("config_" + name.replace("/", "_")[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.from_configdict(module.get_config())
  checks.check_config(cfg)
print("loaded", len({names!r}))
"""


def test_a_regular_install_finds_the_configs_from_any_directory(tmp_path):
  """What `pip install .` (not editable) puts in site-packages, built by setup.py's build_py, runs
  the default demo and finds every paper config from a directory without configs/."""
  site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
  elsewhere.mkdir()
  build = subprocess.run([sys.executable, "setup.py", "-q", "build_py", f"--build-lib={site}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert build.returncode == 0, build.stderr
  assert (site / "md4" / "configs" / "md4" / "text8.py").exists()
  assert (site / "md4" / "data" / "demo").is_dir()
  names = sorted(str(p.relative_to(pathlib.Path(ROOT, "configs")))
                 for p in pathlib.Path(ROOT, "configs").rglob("*.py")
                 if p.name not in ("__init__.py", "presets.py"))
  out = subprocess.run([sys.executable, "-c", LOAD_SHIPPED.format(site=str(site), names=names)],
                       capture_output=True, text=True, env=ENV, cwd=elsewhere, timeout=300)
  assert out.returncode == 0 and f"loaded {len(names)}" in out.stdout, out.stderr
  run = f"import sys; sys.path.insert(0, {str(site)!r}); from md4 import main; main.run()"
  out = subprocess.run([sys.executable, "-c", run, "train", "--workdir=run",
                        "--config.train.num_steps=2", "--config.train.sample_every=2",
                        "--config.eval.max_examples=8", "--config.train.progress_bar=False"],
                       capture_output=True, text=True, env=ENV, cwd=elsewhere, timeout=300)
  assert out.returncode == 0, out.stderr
  assert (elsewhere / "run" / "checkpoints" / "2").is_dir()
  assert (elsewhere / "run" / "samples" / "step_2.txt").exists()
  out = subprocess.run([sys.executable, "-c", run, "info",
                        "--config=configs/md4/text8.py:tiny"],
                       capture_output=True, text=True, env=ENV, cwd=elsewhere, timeout=300)
  assert out.returncode == 0 and "parameters:" in out.stdout, out.stderr


def test_a_bad_id_in_a_prepared_dataset_is_caught_at_the_door_naming_file_example_and_value(
    tmp_path):
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / "text8")
  for split, n in (("train", 40), ("valid", 32), ("test", 32)):
    ids = rng.integers(0, text8.VOCAB_SIZE, n).astype(np.uint8)
    if split == "train":
      # In 16 of the 25 windows of 16 characters: a batch of 8 misses it with probability
      # C(9, 8) / C(25, 8) < 1e-5 (and the seed is fixed).
      ids[20] = 99
    np.save(text8.prepared_file(str(tmp_path), split), ids)
  (tmp_path / "text8" / "meta.json").write_text("{}")
  workdir = tmp_path / "run"
  out = _run("train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
             "--config.data.dataset=text8", f"--config.data.data_dir={tmp_path}")
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  train_file = text8.prepared_file(str(tmp_path), "train")
  pattern = (r"md4 train: error: bad token id 99 in text8 train window starting at character "
             r"(\d+) of " + train_file + r" \(training batch of step 1\): valid x values are 0..26$")
  match = re.match(pattern, last)
  assert match, out.stderr
  assert 5 <= int(match.group(1)) <= 20  # The window holds character 20.
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def test_evaluation_and_sampling_from_a_checkpoint_do_not_import_the_trainer():
  code = ("import sys; from md4 import checkpoint, evaluate, generate, judge, sweep, state; "
          "from md4.data import pipeline; assert 'md4.train' not in sys.modules, 'train imported'")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr

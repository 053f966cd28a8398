"""The trainer on the tiny config: resume exactness, accumulation, checkpoints, eval, the CLI."""

import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from md4 import config as config_lib
from md4 import elbo, generate, model, sampling, sharding, train
from md4.data import pipeline
from md4.evaluate import Evaluator
from md4.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MD4 = [sys.executable, "-m", "md4.main"]


def tiny_cfg(**changes) -> config_lib.Config:
  """The tiny config with changes given as {"group.key": value}."""
  cd = tiny.get_config()
  for key, value in changes.items():
    group, name = key.split(".", 1)
    cd[group][name] = value
  return config_lib.from_configdict(cd)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """6 steps in one go, with checkpoints at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = train.train(tiny_cfg(), workdir)
  return workdir, result


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state,
                                                  state.ema_params, state.rng))]


def test_resume_from_a_checkpoint_is_bitwise_identical(straight_run, tmp_path):
  workdir, straight = straight_run
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "6"))  # Stopped after step 3.
  resumed = train.train(tiny_cfg(), resumed_dir)
  assert int(resumed.state.step) == 6
  for a, b in zip(_leaves(straight.state), _leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert resumed.eval.bits_per_token == straight.eval.bits_per_token


def test_metrics_are_namespaced_jsonl(straight_run):
  records = read_metrics(straight_run[0])
  train_steps = [r["step"] for r in records if "train/loss_bits" in r]
  assert train_steps == [2, 4, 6]
  assert all(math.isfinite(r["train/loss_bits"]) for r in records if "train/loss_bits" in r)
  assert any("eval/bits_per_char" in r for r in records)


def test_checkpoint_from_another_config_is_refused(straight_run):
  other = tiny_cfg(**{"model.net": dict(num_layers=2, num_heads=2, d_model=16, mlp_ratio=2.0)})
  with pytest.raises(ValueError, match=r"belongs to another model config.*\n.*model.net"):
    train.train(other, straight_run[0])
  with pytest.raises(ValueError, match="vocabulary of 27"):
    train.train(tiny_cfg(**{"model.vocab_size": 30}), straight_run[0])


def _one_step(cfg, batch_np, mesh=None):
  setup = train.make_setup(cfg, pipeline.get_spec(cfg.data), mesh)
  state = train.create_state(setup)
  step = train.compile_train_step(setup, train.abstract_state(setup))
  return step(state, sharding.global_batch(batch_np, setup.mesh))


def test_gradient_accumulation_equals_the_large_batch():
  cfg1 = tiny_cfg(**{"train.log_grad_norm": True})
  cfg4 = tiny_cfg(**{"train.grad_accum_steps": 4, "train.log_grad_norm": True})
  batch, _ = train.model_batch(next(pipeline.load(cfg1.data).train_iterator(
      cfg1.train.batch_size, 0)))
  (s1, m1), (s4, m4) = _one_step(cfg1, batch), _one_step(cfg4, batch)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  assert float(m1["grad_norm"]) > 0
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_genmd4_trains_its_exponents():
  cfg = tiny_cfg(**{"model.state_dependent": True, "model.power_init": 1.0,
                    "optimizer.warmup_steps": 0})
  batch, _ = train.model_batch(next(pipeline.load(cfg.data).train_iterator(
      cfg.train.batch_size, 0)))
  state, metrics = _one_step(cfg, batch)
  raw = np.asarray(state.params["schedule"]["raw_power"])
  assert raw.shape == (27,) and math.isfinite(float(metrics["loss"]))
  assert np.all(raw != math.log(math.expm1(1.0)))  # Every exponent got a gradient step.


def test_eval_agrees_with_nelbo_and_covers_each_example_once():
  cfg = tiny_cfg(**{"eval.batch_size": 8, "eval.max_examples": 0, "eval.num_time_samples": 2})
  dataset = pipeline.load(cfg.data)
  setup = train.make_setup(cfg, dataset.spec)
  params = train.create_state(setup).params
  rng = jax.random.key(7)
  n = dataset.num_eval_examples("valid")
  max_examples = 21  # Not a multiple of the batch: the last batch is padded.
  result = Evaluator(setup.network, cfg, setup.mesh)(params, dataset, max_examples=max_examples,
                                                     rng=rng)
  assert result.num_examples == max_examples < n
  x = jnp.asarray(dataset.eval_example("valid", np.arange(max_examples))["x"])
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(max_examples))
  direct = elbo.nelbo(model.denoiser(setup.network, params), x, keys,
                      model.make_schedule(cfg.model, params), vocab_size=27, num_samples=2)
  expected_bits = float(direct.mean()) / (cfg.data.seq_length * math.log(2))
  np.testing.assert_allclose(result.bits_per_token, expected_bits, rtol=1e-5)
  se = float(direct.std(ddof=1)) / math.sqrt(max_examples) / (cfg.data.seq_length * math.log(2))
  np.testing.assert_allclose(result.bits_se, se, rtol=1e-3)


def test_non_finite_loss_stops_training_and_names_the_step(tmp_path):
  cfg = tiny_cfg(**{"optimizer.lr": 1e38, "optimizer.grad_clip_norm": 0.0,
                    "optimizer.warmup_steps": 0})
  with pytest.raises(FloatingPointError, match=r"training loss is nan at step \d"):
    train.train(cfg, str(tmp_path))


def test_cli_train_sample_and_eval(tmp_path):
  workdir = str(tmp_path / "run")
  common = [f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(MD4 + ["train"] + common, capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "reference: 4.08" in out.stdout + out.stderr
  template = "to be or not to_"
  out = subprocess.run(MD4 + ["sample"] + common + [f"--infill={template}",
                                                    f"--output={tmp_path}/filled"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = open(f"{tmp_path}/filled.txt").read().splitlines()
  assert len(lines) == 2
  for line in lines:
    assert len(line) == 16
    assert all(c == t for c, t in zip(line, template) if t != "_")
    assert "_" not in line
  # Longer than the model's 16 characters: blocks of 16, each seeing the 8 before it, from a prompt.
  out = subprocess.run(MD4 + ["sample"] + common + [
      "--prompt=to be", "--length=40", "--window=8", "--config.sample.method=remdm",
      "--config.sample.remask_eta=0.1", "--config.sample.num_steps=5",
      f"--output={tmp_path}/long"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr
  # 40 = 16 + 3 blocks of 8 new characters; 5 steps each.
  assert "(remdm, blocks of 16 with a window of 8, 20 network calls)" in out.stdout
  lines = open(f"{tmp_path}/long.txt").read().splitlines()
  assert len(lines) == 2 and all(len(line) == 40 and line.startswith("to be") for line in lines)
  out = subprocess.run(MD4 + ["eval"] + common + ["--checkpoint_step=3"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("step 3, split valid, continuous-time bound, 1 time sample(s) per "
                                "example: ")
  out = subprocess.run(MD4 + ["train"] + common + ["--config.train.nonsense=1"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode != 0 and "unknown config key 'nonsense'" in out.stderr


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  workdir = str(tmp_path / "run")
  args = MD4 + ["train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
                "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
                "--config.train.log_every=1"]
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while not (os.path.exists(metrics) and len(read_metrics(workdir)) >= 3):
    assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output
  assert "SIGTERM: saved the checkpoint at step" in output
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3


MULTIDEVICE = r"""
import sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from configs import tiny
from md4 import config as config_lib, sharding, train
from md4.data import pipeline
cfg = config_lib.from_configdict(tiny.get_config())
assert jax.device_count() == 2
local = next(pipeline.load(cfg.data).train_iterator(cfg.train.batch_size, 0))
batch, _ = train.model_batch(local)
def one_step(mesh):
  setup = train.make_setup(cfg, pipeline.get_spec(cfg.data), mesh)
  state = train.create_state(setup)
  step = train.compile_train_step(setup, train.abstract_state(setup))
  for _ in range(2):
    state, metrics = step(state, sharding.global_batch(batch, setup.mesh))
  return float(metrics["loss"]), [np.asarray(x) for x in jax.tree.leaves(state.params)], state
one = one_step(sharding.make_mesh(1, jax.devices()[:1]))
two = one_step(sharding.make_mesh(1))
fsdp = one_step(sharding.make_mesh(2))
assert len(two[2].params["net"]["embed"]["embedding"].sharding.device_set) == 2
assert not fsdp[2].params["net"]["embed"]["embedding"].sharding.is_fully_replicated
for other in (two, fsdp):
  np.testing.assert_allclose(one[0], other[0], rtol=1e-6)
  for a, b in zip(one[1], other[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print("losses", one[0], two[0], fsdp[0])
"""


def test_two_device_mesh_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", MULTIDEVICE.format(root=ROOT)], capture_output=True,
                       text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("losses")


def test_extra_tokens_must_be_declared_and_are_never_sampled():
  """A model vocabulary beyond the data's (the released GenMD4 on OpenWebText: 50257 + 2)."""
  spec = pipeline.get_spec(tiny_cfg().data)  # 27 characters.
  with pytest.raises(ValueError, match="model.vocab_size=29 but dataset 'shakespeare' has a "
                                       "vocabulary of 27$"):
    model.check_compatible(tiny_cfg(**{"model.vocab_size": 29}), spec)
  with pytest.raises(ValueError, match=r"vocabulary of 27 \(\+ model.extra_tokens=1\)"):
    model.check_compatible(tiny_cfg(**{"model.vocab_size": 29, "model.extra_tokens": 1}), spec)
  cfg = tiny_cfg(**{"model.vocab_size": 29, "model.extra_tokens": 2, "sample.num_samples": 16,
                    "model.net": dict(tiny.get_config().model.net, output_bias=True)})
  network = model.build_network(cfg, spec)
  params = model.init_params(jax.random.key(0), network, cfg.model, spec)
  # Output biases that favour the two extra ids by far: drawn freely, they would win everywhere.
  bias = params["net"]["final"]["proj"]["bias"]
  params["net"]["final"]["proj"]["bias"] = bias.at[27:].set(20.0)
  init = generate.unconditional_init(spec, 16, cfg.model.vocab_size)
  assert np.all(init == 29)  # The model's mask id, not the dataset's vocabulary size.
  free = sampling.sample(model.denoiser(network, params), jax.random.key(1), jnp.asarray(init),
                         model.make_schedule(cfg.model, params), vocab_size=29, num_steps=4)
  assert np.mean(np.asarray(free) >= 27) > 0.9
  samples = np.asarray(generate.Sampler(network, cfg)(params, jax.random.key(1), init).samples)
  assert samples.shape == (16, spec.example_shape[0])
  assert samples.min() >= 0 and samples.max() < 27

"""Checkpoints of the released code (google-deepmind/md4) become checkpoints of this project.

Released parameter trees are built from tests/released_reference.py (module names and shapes as the
released code creates them, written down from reading it), filled with random values, converted,
and run through this project's network: the logits must be the released network's, computed in
NumPy by the same file, to float32 round-off. Then the whole path: an Orbax checkpoint in the
released layout, `md4 convert`, `md4 eval`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest

import released_reference as ref
import tiny_bpe
from md4 import config as config_lib
from md4 import checkpoint, convert, model, train
from md4.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 against float64: relative to the largest logit, the networks here differ by ~1e-6.
RTOL = 1e-4


def make_cfg(dataset, network, net, vocab, *, seq_length=None, state_dependent=False):
  config = config_lib.base_config()
  config.data.dataset = dataset
  if seq_length:
    config.data.seq_length = seq_length
  config.model.vocab_size = vocab
  config.model.network = network
  config.model.net = net
  config.model.state_dependent = state_dependent
  return config_lib.from_configdict(config)


# name: (config, released tree, released logits (params, z, t) -> float64, labels)
CASES = {
    "text8": (  # The text8 path: characters embedded to 8, then projected.
        make_cfg("text8", "transformer", dict(num_layers=2, num_heads=2, d_model=16, cond_dim=8,
                                               embed_dim=8), 27, seq_length=32),
        ref.transformer_tree(27, 8, 2, 2, outside_embed=True),
        lambda p, z, t: ref.transformer_logits(p, z, t, 27, 8, 2, 2, outside_embed=True), None),
    "genmd4": (
        make_cfg("text8", "transformer", dict(num_layers=1, num_heads=2, d_model=16, cond_dim=8,
                                               embed_dim=8), 27, seq_length=32,
                 state_dependent=True),
        ref.transformer_tree(27, 8, 2, 1, outside_embed=True, genmd4=True),
        lambda p, z, t: ref.transformer_logits(p, z, t, 27, 8, 2, 1, outside_embed=True), None),
    "openwebtext": (  # Tokens embedded straight to the width; an MLP whose width is rounded up.
        make_cfg("shakespeare", "transformer", dict(num_layers=2, num_heads=5, d_model=40,
                                                     cond_dim=8), 27, seq_length=32),
        ref.transformer_tree(27, 8, 5, 2, outside_embed=False),
        lambda p, z, t: ref.transformer_logits(p, z, t, 27, 8, 5, 2, outside_embed=False), None),
    "cifar10": (
        make_cfg("cifar10", "unet", dict(features=64, num_res_blocks=1), 256),
        ref.unet_tree(64, 1),
        lambda p, z, t: ref.unet_logits(p, z, t, 64, 1), None),
    "cifar10_class_conditional": (
        make_cfg("cifar10", "unet", dict(features=32, num_res_blocks=1, num_classes=10), 256),
        ref.unet_tree(32, 1, classes=10),
        lambda p, z, t: ref.unet_logits(p, z, t, 32, 1, labels=np.array([3, 7])),
        np.array([3, 7], np.int32)),
    "imagenet64": (
        make_cfg("imagenet64", "uvit", dict(features=32, num_res_blocks=1, num_layers=2,
                                             num_heads=2, d_model=32), 256),
        ref.uvit_tree(32, 1, 2, 32, image=64),
        lambda p, z, t: ref.uvit_logits(p, z, t, 32, 1, 2, 32, 2), None),
}


def _inputs(spec, seed=1):
  rng = np.random.default_rng(seed)
  z = rng.integers(0, spec.vocab_size + 1, (2,) + spec.example_shape).astype(np.int32)
  return z, np.array([0.13, 0.71], np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_parameters_give_the_released_logits(name):
  cfg, shapes, logits_fn, labels = CASES[name]
  spec = pipeline.get_spec(cfg.data)
  released = ref.random_tree(shapes, seed=0)
  params = convert.convert_params(ref.nest(released), cfg, spec)
  z, t = _inputs(spec)
  ours = model.build_network(cfg, spec).apply({"params": params["net"]}, jnp.asarray(z),
                                              jnp.asarray(t), cond=labels)
  expected = logits_fn(released, z, t)
  assert ours.shape == expected.shape == z.shape + (spec.vocab_size,)
  scale = np.abs(expected).max()
  assert scale > 1.0  # Random parameters, no zero-initialised layer: the logits are not trivial.
  np.testing.assert_allclose(np.asarray(ours), expected, atol=RTOL * scale, rtol=0)
  if cfg.model.state_dependent:
    np.testing.assert_array_equal(params["schedule"]["raw_power"], released["noise_schedule/w"])


def test_each_released_tensor_lands_where_it_belongs():
  cfg, shapes, _, _ = CASES["text8"]
  released = ref.random_tree(shapes, seed=3)
  net = convert.convert_params(ref.nest(released), cfg, pipeline.get_spec(cfg.data))["net"]
  block = f"{ref.T}/TransformerBlock_1"
  pairs = {
      ("embed", "embedding"): f"{ref.C}/Embed_0/embedding",
      ("embed_proj", "kernel"): f"{ref.T}/Dense_0/kernel",
      ("cond_embed", "time_hidden", "kernel"): f"{ref.C}/CondEmbedding_0/dense0/kernel",
      ("cond_embed", "time_out", "bias"): f"{ref.C}/CondEmbedding_0/Dense_0/bias",
      ("block_1", "adaln", "kernel"): f"{block}/Dense_0/kernel",
      ("block_1", "mlp", "gate", "kernel"): f"{block}/feed_forward/w1/kernel",
      ("block_1", "mlp", "down", "kernel"): f"{block}/feed_forward/w2/kernel",
      ("block_1", "mlp", "up", "kernel"): f"{block}/feed_forward/w3/kernel",
      ("final", "adaln", "kernel"): f"{ref.T}/Dense_1/kernel",
      ("final", "proj", "kernel"): f"{ref.T}/Dense_2/kernel",
  }
  for path, theirs in pairs.items():
    np.testing.assert_array_equal(flax.traverse_util.flatten_dict(net)[path], released[theirs])
  # Attention kernels keep heads apart: [d, d] -> [d, heads, head_dim] (query) and back (out).
  np.testing.assert_array_equal(net["block_1"]["attn"]["query"]["kernel"],
                                released[f"{block}/attention/wq/kernel"].reshape(16, 2, 8))
  np.testing.assert_array_equal(net["block_1"]["attn"]["out"]["kernel"],
                                released[f"{block}/attention/wo/kernel"].reshape(2, 8, 16))


def _convert(name, mutate):
  cfg, shapes, _, _ = CASES[name]
  released = ref.random_tree(shapes, seed=0)
  mutate(released)
  return convert.convert_params(ref.nest(released), cfg, pipeline.get_spec(cfg.data))


def test_a_missing_tensor_is_named():
  gone = f"{ref.T}/TransformerBlock_1/feed_forward/w3/kernel"
  with pytest.raises(ValueError, match=f"lacks 1 tensor.*{gone}"):
    _convert("text8", lambda p: p.pop(gone))


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes():
  bad = f"{ref.U}/ResBlock_2/Conv_0/kernel"
  with pytest.raises(ValueError, match=rf"{bad} has shape \(3, 3, 64, 32\), but this config's "
                                       rf"net/mid_1/conv_0/kernel needs \(3, 3, 64, 64\)"):
    _convert("cifar10", lambda p: p.update({bad: np.zeros((3, 3, 64, 32), np.float32)}))


def test_a_tensor_no_rule_uses_is_named():
  extra = f"{ref.T}/TransformerBlock_2/Dense_0/kernel"
  with pytest.raises(ValueError, match=f"1 tensor.*does not: {extra}.*another config"):
    _convert("text8", lambda p: p.update({extra: np.zeros((8, 96), np.float32)}))


def test_md4_and_genmd4_checkpoints_are_told_apart():
  with pytest.raises(ValueError, match="noise_schedule/w.*a GenMD4 checkpoint, while the config "
                                       "is MD4's"):
    _convert("text8", lambda p: p.update({"noise_schedule/w": np.zeros(27, np.float32)}))
  with pytest.raises(ValueError, match="noise_schedule/w.*a checkpoint of MD4, while the config is "
                                       "GenMD4's"):
    _convert("genmd4", lambda p: p.pop("noise_schedule/w"))


@pytest.mark.parametrize("option,named", [(dict(norm="rmsnorm"), "norm='rmsnorm'"),
                                          (dict(rope="halves"), "rope='halves'"),
                                          (dict(cond_activation="silu"), "cond_activation='silu'")])
def test_a_network_the_released_code_cannot_have_is_refused(option, named):
  cfg, shapes, _, _ = CASES["text8"]
  other = make_cfg("text8", "transformer", dict(cfg.model.net, **option), 27, seq_length=32)
  with pytest.raises(ValueError, match=f"{named}.*released code has no such network"):
    convert.convert_params(ref.nest(ref.random_tree(shapes, 0)), other,
                           pipeline.get_spec(other.data))


# ---------------------------------------------------------------------- checkpoints, CLI

# configs/tiny.py's network, with the MLP width the released rule gives a 16-wide model (64).
TINY_OVERRIDES = ["--config=configs/tiny.py", "--config.model.net.mlp_ratio=4.0"]
TINY_TREE = ref.transformer_tree(27, 8, 2, 1, outside_embed=False)


def _write_released_checkpoint(directory, step, params, ema):
  """What the released trainer's CheckpointManager writes: checkpoints/STEP/train_state."""
  state = {"rng": np.array([0, step], np.uint32), "step": step, "params": ref.nest(params),
           "ema_params": ref.nest(ema),
           "opt_state": [{"count": np.int32(step), "mu": ref.nest(params)}], "state": {}}
  ocp.PyTreeCheckpointer().save(os.path.join(directory, "checkpoints", str(step), "train_state"),
                                state)


@pytest.fixture(scope="module")
def released_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("released_run")
  trees = {}
  for step, seed in ((100, 1), (200, 2)):
    trees[step] = (ref.random_tree(TINY_TREE, seed), ref.random_tree(TINY_TREE, seed + 10))
    _write_released_checkpoint(str(root), step, *trees[step])
  return root, trees


def test_the_latest_step_or_a_named_one_is_read_from_any_level_of_the_layout(released_run):
  root, trees = released_run
  for path in (root, root / "checkpoints", root / "checkpoints" / "200",
               root / "checkpoints" / "200" / "train_state"):
    got = convert.read_reference_checkpoint(str(path))
    assert got.step == 200
    np.testing.assert_array_equal(got.ema_params["classifier"]["Transformer_0"]["Embed_0"][
        "embedding"], trees[200][1][f"{ref.T}/Embed_0/embedding"])
  assert convert.read_reference_checkpoint(str(root), step=100).step == 100
  with pytest.raises(ValueError, match=r"no step 150 .*steps there: \[100, 200\]"):
    convert.read_reference_checkpoint(str(root), step=150)
  with pytest.raises(ValueError, match="holds no checkpoint of the released code"):
    convert.read_reference_checkpoint(str(root / "checkpoints" / "200" / "train_state" / "d"))


def _md4(*args, cwd):
  return subprocess.run([sys.executable, "-m", "md4.main", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300)


def test_md4_convert_writes_a_checkpoint_that_md4_eval_reads(released_run, tmp_path):
  root, trees = released_run
  workdir = str(tmp_path / "converted")
  done = _md4("convert", f"--from_reference={root}", f"--workdir={workdir}", *TINY_OVERRIDES,
              cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "step 200" in done.stdout and "params and EMA params" in done.stdout

  cfg = config_lib.from_configdict(_tiny_config())
  spec = pipeline.get_spec(cfg.data)
  setup = train.make_setup(cfg, spec)
  state = checkpoint.Checkpointer(workdir, cfg, read_only=True).restore(
      train.abstract_state(setup), setup.tx.init).state
  assert int(state.step) == 200
  z, t = _inputs(spec)
  for params, released in ((state.params, trees[200][0]), (state.ema_params, trees[200][1])):
    ours = setup.network.apply({"params": params["net"]}, jnp.asarray(z), jnp.asarray(t))
    expected = ref.transformer_logits(released, z, t, 27, 8, 2, 1, outside_embed=False)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=RTOL * np.abs(expected).max())

  evaluated = _md4("eval", f"--workdir={workdir}", *TINY_OVERRIDES,
                   "--config.eval.max_examples=16", cwd=ROOT)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "step 200" in evaluated.stdout and "bits/char" in evaluated.stdout

  again = _md4("convert", f"--from_reference={root}", f"--workdir={workdir}", *TINY_OVERRIDES,
               cwd=ROOT)
  assert again.returncode != 0 and "already holds checkpoints" in again.stderr


def _tiny_config():
  from configs import tiny
  config = tiny.get_config()
  config.model.net.mlp_ratio = 4.0
  return config


def test_convert_checkpoint_names_a_config_that_does_not_fit(released_run, tmp_path):
  root, _ = released_run
  config = _tiny_config()
  config.model.net.num_layers = 2
  cfg = config_lib.from_configdict(config)
  with pytest.raises(ValueError, match="TransformerBlock_1.*lacks|lacks.*TransformerBlock_1"):
    convert.convert_checkpoint(str(root), cfg, pipeline.get_spec(cfg.data), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "200")


# ------------------------------------------------------------- the sharded trainer, relative paths

def _sharded_layout(flat):
  """The released tree as md4/sharded_train.py's model boxes it: the kernels and embeddings its
  sharded transformer makes with nn.with_logical_partitioning (attention, feed-forward, token
  embedding, output projection) wrapped in flax's LogicallyPartitioned; the rest plain."""
  import flax.linen as nn
  names = {"wq": ("embed", "qkv"), "wk": ("embed", "qkv"), "wv": ("embed", "qkv"),
           "wo": ("qkv", "embed"), "w1": ("embed", "mlp"), "w2": ("mlp", "embed"),
           "w3": ("embed", "mlp")}
  last_dense = max(p for p in flat if p.startswith(f"{ref.T}/Dense_")).rsplit("/", 1)[0]
  boxed = {}
  for path, value in flat.items():
    module = path.split("/")[-2]
    if path.endswith("/kernel") and module in names:
      value = nn.LogicallyPartitioned(value, names[module])
    elif path == f"{ref.T}/Embed_0/embedding":
      value = nn.LogicallyPartitioned(value, ("embed_vocab", "embed"))
    elif path == f"{last_dense}/kernel":
      value = nn.LogicallyPartitioned(value, ("embed", "output_vocab"))
    boxed[path] = value
  return ref.nest(boxed)


def test_a_sharded_trainer_checkpoint_converts_from_a_relative_path(tmp_path):
  params, ema = ref.random_tree(TINY_TREE, 5), ref.random_tree(TINY_TREE, 6)
  state = {"rng": np.array([0, 7], np.uint32), "step": 7, "params": _sharded_layout(params),
           "ema_params": _sharded_layout(ema), "state": {},
           "opt_state": [{"count": np.int32(7), "mu": _sharded_layout(params)}]}
  ocp.PyTreeCheckpointer().save(str(tmp_path / "sharded_run" / "checkpoints" / "7" / "train_state"),
                                state)
  saved = ocp.PyTreeCheckpointer().metadata(
      str(tmp_path / "sharded_run/checkpoints/7/train_state")).item_metadata.tree
  wq = saved["params"]["classifier"]["Transformer_0"]["TransformerBlock_0"]["attention"]["wq"]
  assert list(wq["kernel"]) == ["value"]  # The layout this test is about: boxes saved as "value".

  done = _md4("convert", "--from_reference=sharded_run", "--workdir=converted", *TINY_OVERRIDES,
              cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  cfg = config_lib.from_configdict(_tiny_config())
  spec = pipeline.get_spec(cfg.data)
  restored = checkpoint.read_record(str(tmp_path / "converted"))
  assert restored.step == 7 and restored.description.spec == spec
  from md4 import inference
  state = inference.load(cfg, inference.open_model(str(tmp_path / "converted"))).state
  for ours, released in ((state.params, params), (state.ema_params, ema)):
    expected = convert.convert_params(ref.nest(released), cfg, spec)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ours), expected)


# -------------------------------------------- each released network, a new size, no dataset at all

# name: (config file, overrides, released tree, sampled file's checker)
NEW_SIZES = {
    "text8": ("configs/md4/text8.py",
              ["--config.model.net.num_layers=2", "--config.model.net.num_heads=2",
               "--config.model.net.d_model=16", "--config.model.net.cond_dim=8",
               "--config.model.net.embed_dim=8", "--config.data.seq_length=32"],
              ref.transformer_tree(27, 8, 2, 2, outside_embed=True)),
    "openwebtext": ("configs/md4/openwebtext.py",  # A vocabulary of the tokenizer's, not GPT-2's.
                    ["--config.model.net.num_layers=1", "--config.model.net.num_heads=5",
                     "--config.model.net.d_model=40", "--config.model.net.cond_dim=8",
                     "--config.model.vocab_size=261", "--config.data.seq_length=16"],
                    ref.transformer_tree(261, 8, 5, 1, outside_embed=False)),
    "cifar10": ("configs/md4/cifar10.py",  # 8 x 8 x 3 pixels of 16 levels.
                ["--config.model.net.features=32", "--config.model.net.num_res_blocks=1",
                 "--config.data.image_size=8", "--config.data.levels=16",
                 "--config.model.vocab_size=16"],
                ref.unet_tree(32, 1, vocab=16)),
    "imagenet64": ("configs/md4/imagenet64.py",  # The U-ViT on 16 x 16 images.
                   ["--config.model.net.features=32", "--config.model.net.num_res_blocks=1",
                    "--config.model.net.num_layers=1", "--config.model.net.num_heads=2",
                    "--config.model.net.d_model=32", "--config.data.image_size=16"],
                   ref.uvit_tree(32, 1, 1, 32, image=16)),
}
# The OpenWebText case (a vocabulary from the config, a tokenizer kept by the workdir) runs by
# default; the others, ~10-20 s each on 2 CPU cores, run with -m slow (their conversions at other
# shapes are checked in-process by test_image_shapes.py and the tests above).
NEW_SIZE_CASES = [pytest.param(n, marks=[] if n == "openwebtext" else [pytest.mark.slow])
                  for n in NEW_SIZES]


@pytest.mark.parametrize("name", NEW_SIZE_CASES)
def test_a_released_network_of_another_size_converts_with_overrides_and_samples_without_data(
    name, tmp_path):
  config, overrides, shapes = NEW_SIZES[name]
  _write_released_checkpoint(str(tmp_path / "released"), 50, ref.random_tree(shapes, 1),
                             ref.random_tree(shapes, 2))
  extra = []
  if name == "openwebtext":
    extra = [f"--tokenizer={tiny_bpe.write(str(tmp_path / 'bpe'))}"]
  done = _md4("convert", "--from_reference=released", "--workdir=converted", f"--config={config}",
              *overrides, *extra, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  if name == "openwebtext":
    shutil.rmtree(tmp_path / "bpe")  # The converted workdir keeps its own copy.
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  sampled = _md4("sample", "--workdir=../converted", "--output=s", "--config.sample.num_steps=4",
                 "--config.sample.num_samples=2", cwd=elsewhere)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  if name == "text8":
    lines = (elsewhere / "s.txt").read_text().splitlines()
    alphabet = set("abcdefghijklmnopqrstuvwxyz ")
    assert len(lines) == 2 and all(len(line) == 32 and set(line) <= alphabet for line in lines)
  elif name == "openwebtext":  # Each sample printed as the repr of its text, decoded by the copy.
    assert len(sampled.stdout.splitlines()) == 3
  else:
    side = 8 if name == "cifar10" else 16
    grid = np.asarray(PIL.Image.open(elsewhere / "s.png"))
    # Two images side by side with 1-pixel gaps, scaled up to at least 448 pixels high.
    k = -(-448 // (side + 2))
    assert grid.shape == (k * (side + 2), k * (2 * side + 3), 3)

"""Every shipped config file loads, converts strictly, builds its network and schedule, and trains.

Config files are found by walking configs/ (every .py but the helpers), so a new config is tested
without being listed here; each is loaded by path, as `md4 --config=PATH` does.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import config as config_lib
from md4 import model, sharding, train
from md4.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
HELPERS = {"__init__.py", "presets.py"}  # Modules under configs/ that are not configs.


def _defines_get_config(path: pathlib.Path) -> bool:
  tree = ast.parse(path.read_text(), filename=str(path))
  return any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body)


def _non_helper_files() -> list[pathlib.Path]:
  return sorted(p for p in CONFIG_DIR.rglob("*.py") if p.name not in HELPERS)


CONFIG_FILES = [p for p in _non_helper_files() if _defines_get_config(p)]
IDS = [str(p.relative_to(CONFIG_DIR)) for p in CONFIG_FILES]


@functools.cache
def load(path: pathlib.Path):
  """The config module at `path`, imported by file location under a private name."""
  name = "_md4_test_config_" + "_".join(path.relative_to(CONFIG_DIR).with_suffix("").parts)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _schedule_params(cfg: config_lib.Config) -> dict:
  """The schedule's parameters as md4.model.init_params makes them (without the network)."""
  if not cfg.model.state_dependent:
    return {}
  raw = math.log(math.expm1(cfg.model.power_init))  # softplus^-1
  return {"schedule": {"raw_power": jnp.full((cfg.model.vocab_size,), raw, jnp.float32)}}


def test_config_files_are_discovered():
  names = set(IDS)
  assert {"demo.py", "tiny.py", "md4/text8.py", "md4/openwebtext.py", "md4/fineweb_edu.py",
          "md4/cifar10.py", "md4/imagenet64.py", "genmd4/text8.py",
          "genmd4/openwebtext.py"} <= names, names


def test_every_file_under_configs_is_a_config_or_a_helper():
  strays = [str(p.relative_to(CONFIG_DIR)) for p in _non_helper_files() if p not in CONFIG_FILES]
  assert not strays, f"files under configs/ without get_config (add to HELPERS if meant): {strays}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=IDS)
def test_docstring_opens_with_the_command_that_runs_it(path):
  doc = load(path).__doc__ or ""
  rel = path.relative_to(ROOT).as_posix()
  assert f"md4 train --config={rel}" in doc.split("\n\n")[1], doc[:300]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=IDS)
def test_default_config_converts_and_builds_network_and_schedule(path):
  cfg = config_lib.from_configdict(load(path).get_config())
  spec = pipeline.get_spec(cfg.data)
  network = model.build_network(cfg, spec)
  # Shapes only: the paper-sized parameters are never allocated.
  z = jax.ShapeDtypeStruct((1,) + spec.example_shape, jnp.int32)
  cond = jax.ShapeDtypeStruct((1,), jnp.int32) if cfg.model.net.get("num_classes", 0) else None
  shapes = jax.eval_shape(lambda z, c: network.init(jax.random.key(0), z, jnp.zeros((1,)), cond=c),
                          z, cond)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) > 0
  schedule = model.make_schedule(cfg.model, _schedule_params(cfg))
  alpha = np.asarray(schedule.alpha(jnp.array([0.0, 0.5, 1.0])))
  assert np.all(np.isfinite(alpha))
  np.testing.assert_allclose(alpha[0], 1.0, atol=2 * cfg.model.eps)
  np.testing.assert_allclose(alpha[-1], 0.0, atol=2 * cfg.model.eps)
  assert np.all(alpha[0] > alpha[1]) and np.all(alpha[1] > alpha[2])


class StepResult(NamedTuple):
  losses: list[float]
  lr: float
  params_changed: bool
  power_changed: bool | None  # GenMD4's exponents; None for MD4.


_STEP_RESULTS: dict[str, StepResult] = {}


def _two_training_steps(cfg: config_lib.Config) -> StepResult:
  """Two real steps of the trainer's compiled step on synthetic data of the config's shape.

  Warm up starts from lr 0, so the first step moves nothing; both use the same batch. Configs whose
  tiny forms differ only in the dataset's name (demo and tiny, OpenWebText and FineWeb-Edu) train
  the same model on the same synthetic data: they share one run, which saves its compilation.
  """
  spec = _tiny_spec(cfg)
  key = json.dumps([config_lib.to_dict(dataclasses.replace(
      cfg, data=dataclasses.replace(cfg.data, dataset=""))), dataclasses.asdict(spec)],
                   sort_keys=True)
  if key in _STEP_RESULTS:
    return _STEP_RESULTS[key]
  setup, batch = _setup_and_batch(cfg, spec)
  state = train.create_state(setup)
  before = [np.array(x) for x in jax.tree.leaves(state.params)]
  step = train.compile_train_step(setup, train.abstract_state(setup))
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  after = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  power_changed = None
  if cfg.model.state_dependent:
    raw_init = np.float32(math.log(math.expm1(cfg.model.power_init)))
    power_changed = bool(np.any(np.asarray(state.params["schedule"]["raw_power"]) != raw_init))
  result = StepResult(losses, float(metrics["lr"]),
                      any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)),
                      power_changed)
  _STEP_RESULTS[key] = result
  return result


def _tiny_spec(cfg: config_lib.Config) -> pipeline.DatasetSpec:
  """The dataset's spec, images cut to 16x16: the config cannot shrink an image dataset, and
  64x64x3 pixels of 256-way logits cost seconds per step on a CPU. The network's code path is the
  same; the full-size shapes are checked (abstractly) by the default-config test above."""
  spec = pipeline.get_spec(cfg.data)
  if spec.kind == "image":
    spec = dataclasses.replace(spec, example_shape=(16, 16) + spec.example_shape[2:])
  return spec


def _setup_and_batch(cfg: config_lib.Config, spec: pipeline.DatasetSpec):
  setup = train.make_setup(cfg, spec)
  local, _ = train.model_batch(next(pipeline.SyntheticDataset(spec).train_iterator(
      cfg.train.batch_size, 0)))
  return setup, sharding.global_batch(local, setup.mesh)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=IDS)
def test_tiny_preset_takes_a_finite_training_step_that_changes_params(path):
  module = load(path)
  default = config_lib.from_configdict(module.get_config())
  cfg = config_lib.from_configdict(module.get_config("tiny"))
  # Tiny shrinks sizes only: the dataset, the network kind and the model family stay the file's.
  assert (cfg.data.dataset, cfg.model.network, cfg.model.state_dependent, cfg.model.schedule) == (
      default.data.dataset, default.model.network, default.model.state_dependent,
      default.model.schedule)
  assert cfg.train.batch_size == 8 and not cfg.train.progress_bar

  result = _two_training_steps(cfg)
  assert np.all(np.isfinite(result.losses)), result
  assert result.lr > 0 and result.params_changed, result
  if cfg.model.state_dependent:  # GenMD4's exponents learn too.
    assert result.power_changed, result


def test_unconditional_model_trains_on_a_labelled_dataset():
  """CIFAR-10 carries labels; the paper's model is unconditional and must ignore them."""
  cfg = config_lib.from_configdict(load(CONFIG_DIR / "md4" / "cifar10.py").get_config("tiny"))
  spec = _tiny_spec(cfg)
  assert not cfg.model.net["num_classes"] and spec.num_classes
  setup, batch = _setup_and_batch(cfg, spec)
  abstract = train.abstract_state(setup)
  # Tracing the step is enough to meet a refusal; nothing is compiled or allocated.
  train.compile_train_step(setup, abstract).lower(abstract, batch)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=IDS)
def test_unknown_key_is_refused_naming_it(path):
  config = load(path).get_config()
  with config.unlocked():
    config.model.foo = 1
  with pytest.raises(ValueError, match="foo"):
    config_lib.from_configdict(config)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=IDS)
def test_unknown_preset_is_refused_listing_the_valid_ones(path):
  with pytest.raises(ValueError, match=r"no_such_preset.*tiny"):
    load(path).get_config("no_such_preset")


def test_openwebtext_medium_is_md4_m_and_combines_with_tiny():
  owt = load(CONFIG_DIR / "md4" / "openwebtext.py")
  small = config_lib.from_configdict(owt.get_config())
  medium = config_lib.from_configdict(owt.get_config("medium"))
  assert (small.model.net["num_layers"], small.model.net["d_model"]) == (12, 768)
  assert (medium.model.net["num_layers"], medium.model.net["num_heads"],
          medium.model.net["d_model"]) == (24, 16, 1024)
  both = config_lib.from_configdict(owt.get_config("medium,tiny"))
  assert both.model.schedule == medium.model.schedule and both.model.net["d_model"] == 16
  fineweb = config_lib.from_configdict(load(CONFIG_DIR / "md4" / "fineweb_edu.py").get_config(
      "medium"))
  assert fineweb.model.net == medium.model.net and fineweb.data.dataset == "fineweb_edu"


def test_genmd4_variants_differ_from_md4_only_in_the_schedule():
  # And, on OpenWebText, in the released GenMD4 vocabulary: 50259 = GPT-2's 50257 + 2 unused.
  for name, vocab in (("text8.py", set()), ("openwebtext.py", {"vocab_size", "extra_tokens"})):
    md4_cfg = config_lib.to_dict(config_lib.from_configdict(
        load(CONFIG_DIR / "md4" / name).get_config()))
    gen_cfg = config_lib.to_dict(config_lib.from_configdict(
        load(CONFIG_DIR / "genmd4" / name).get_config()))
    assert gen_cfg["model"]["state_dependent"] and gen_cfg["model"]["network_masks"] == 2
    for group in md4_cfg:
      if group != "model":
        assert md4_cfg[group] == gen_cfg[group], (name, group)
    differing = {k for k in md4_cfg["model"] if md4_cfg["model"][k] != gen_cfg["model"][k]}
    assert differing <= {"state_dependent", "power_init", "network_masks"} | vocab, differing


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # Inside ml_collections.
def test_the_command_line_passes_what_follows_the_colon_as_the_preset():
  from absl import flags
  from ml_collections import config_flags

  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  flag_values(["md4", f"--config={CONFIG_DIR / 'md4' / 'openwebtext.py'}:medium,tiny"])
  cfg = config_lib.from_configdict(flag_values.config)
  assert (cfg.model.schedule, cfg.model.net["num_heads"], cfg.model.net["d_model"]) == (
      "cosine", 2, 16)


# ------------------------------------------------------------------ the paper's networks

# Parameters of the released code's models (google-deepmind/md4), measured with its own model
# classes and configs under jax.eval_shape. The GenMD4 rows include the exponents w.
RELEASED_PARAMETERS = {
    "md4/text8.py": 88_734_272,
    "md4/openwebtext.py": 165_857_344,
    "md4/openwebtext.py:medium": 416_240_960,
    "md4/fineweb_edu.py": 165_857_344,
    "md4/cifar10.py": 28_427_520,
    "md4/imagenet64.py": 198_279_680,
    "genmd4/text8.py": 88_734_299,
    "genmd4/openwebtext.py": 165_910_675,
    "genmd4/openwebtext.py:medium": 416_295_315,
}

# Every field of the released networks, written out here rather than taken from the defaults.
_RELEASED_TEXT = dict(mlp_ratio=8 / 3, mlp_multiple=32, mlp_type="glu", norm="layernorm",
                      norm_eps=1e-5, cond_dim=64, cond_activation="sigmoid", rope="interleaved",
                      depth_scaled_init=True, qkv_bias=False, output_bias=False, dropout="channel",
                      attention_dropout=True, time_conditioning=True, num_classes=0,
                      rope_base=10_000.0)
_RELEASED_SMALL = dict(_RELEASED_TEXT, num_layers=12, num_heads=12, d_model=768, embed_dim=0,
                       embed_dropout=True, dropout_rate=0.02)
_RELEASED_NETWORKS = {
    "md4/text8.py": dict(_RELEASED_TEXT, num_layers=12, num_heads=12, d_model=768, embed_dim=64,
                         embed_dropout=False, dropout_rate=0.05),
    "md4/openwebtext.py": _RELEASED_SMALL,
    "md4/openwebtext.py:medium": dict(_RELEASED_SMALL, num_layers=24, num_heads=16, d_model=1024,
                                      dropout_rate=0.0),
    "md4/fineweb_edu.py": _RELEASED_SMALL,
    "md4/cifar10.py": dict(features=128, num_res_blocks=32, attention=True, num_heads=1,
                           norm_groups=32, dropout_rate=0.1, time_conditioning=True,
                           num_classes=0),
    "md4/imagenet64.py": dict(features=256, num_res_blocks=24, norm_groups=32, patch_size=2,
                              num_layers=12, num_heads=12, d_model=768, mlp_ratio=4.0,
                              dropout_rate=0.1, time_conditioning=True, num_classes=0),
}
_RELEASED_NETWORKS["genmd4/text8.py"] = _RELEASED_NETWORKS["md4/text8.py"]
_RELEASED_NETWORKS["genmd4/openwebtext.py"] = _RELEASED_NETWORKS["md4/openwebtext.py"]
_RELEASED_NETWORKS["genmd4/openwebtext.py:medium"] = _RELEASED_NETWORKS["md4/openwebtext.py:medium"]


def _paper_cfg(name: str) -> config_lib.Config:
  rel, _, preset = name.partition(":")
  return config_lib.from_configdict(load(CONFIG_DIR / rel).get_config(preset or None))


def test_every_paper_config_is_in_the_table():
  paper = {i for i in IDS if i.startswith(("md4/", "genmd4/"))}
  assert paper == {n.split(":")[0] for n in RELEASED_PARAMETERS}


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMETERS))
def test_paper_config_has_the_released_parameter_count(name):
  from md4 import info
  assert info.describe(_paper_cfg(name)).num_params == RELEASED_PARAMETERS[name]


@pytest.mark.parametrize("name", sorted(_RELEASED_NETWORKS))
def test_paper_config_builds_the_released_network_options(name):
  cfg = _paper_cfg(name)
  network = model.build_network(cfg, pipeline.get_spec(cfg.data))
  built = {k: getattr(network.config, k) for k in _RELEASED_NETWORKS[name]}
  assert built == _RELEASED_NETWORKS[name]
  assert network.config.dtype == jnp.float32  # The released code computes in float32 only.
  if cfg.model.network == "transformer":  # The released width is heads of 64.
    assert network.config.d_model == 64 * network.config.num_heads


def test_md4_info_prints_the_exact_count_and_the_modules():
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-m", "md4.main", "info",
                         "--config=configs/genmd4/text8.py"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  assert "parameters: 88734299" in lines
  assert any(line.split()[:2] == ["block_0..11", "88,528,896"] for line in lines), lines
  assert any(line.split()[:2] == ["schedule", "27"] for line in lines), lines
  assert "tokens per example: 256 (chars)" in lines
  flops = [line for line in lines if line.startswith("model FLOPs per training token:")]
  assert len(flops) == 1 and float(flops[0].split()[5]) > 5e8  # ~6 x 85M weights per token.

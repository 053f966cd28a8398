"""The typed configuration: frozen dataclasses, the one schema and the one place for defaults.

Config files (configs/) are ml_collections ConfigDicts built from these defaults (`base_config()`),
changed where a setting differs. The entry point reads the ConfigDict once and converts it with
`from_configdict`, which fails on an unknown key, naming it; nothing below main.py sees a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Mapping

import flax.core
import ml_collections


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "shakespeare"  # A name in md4.data.pipeline.DATASETS.
  data_dir: str = ""  # Where `md4 prepare` wrote a real dataset; unused by the embedded ones.
  seq_length: int = 256  # Tokens per example, for text.
  num_workers: int = 0  # Loader worker processes (0: load in the main process).


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  network: str = "transformer"  # A name in md4.networks.NETWORKS.
  # The network's own fields (md4.networks.*Config), less vocab_size and dtype, which are set from
  # model.vocab_size and train.compute_dtype.
  net: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  vocab_size: int = 27  # The dataset's plus extra_tokens; the mask id is vocab_size.
  # Vocabulary entries beyond the dataset's, which never occur in the data (the released GenMD4
  # OpenWebText model has 2: 50259 = GPT-2's 50257 + 2). Samples never contain them.
  extra_tokens: int = 0
  schedule: str = "linear"  # md4.schedules.get_schedule name (MD4).
  eps: float = 1e-4
  state_dependent: bool = False  # GenMD4: learnable per-token exponents, alpha_v = 1 - t^{w_v}.
  power_init: float = 1.0  # GenMD4's initial w_v (held as softplus(raw) > 0).
  network_masks: int = 2  # GenMD4: masks per example in the network's gradient (1 or 2).
  # "diffusion" (MD4, GenMD4) or "autoregressive": a causal transformer (model.net.causal=True,
  # time_conditioning=False) with its exact likelihood, such as a judge of sample quality.
  objective: str = "diffusion"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  lr: float = 3e-4  # Peak learning rate.
  warmup_steps: int = 2000  # Linear warmup from 0.
  decay: str = "cosine"  # "cosine" (to min_lr_ratio * lr at train.num_steps) or "constant".
  min_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-8
  weight_decay: float = 0.0  # AdamW decoupled decay, on matrices only (not norms, biases, w_v).
  grad_clip_norm: float = 1.0  # Global-norm clipping; 0 turns it off.
  ema_decay: float = 0.9999  # 0 turns the EMA off (then EMA params = params).


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  batch_size: int = 64  # Global, over all devices and processes.
  num_steps: int = 100_000
  grad_accum_steps: int = 1  # Microbatches per step; gradients are averaged.
  compute_dtype: str = "float32"  # "float32" or "bfloat16"; parameters stay float32.
  mesh_fsdp: int = 1  # Devices along the fsdp axis (parameters sharded); the rest form "data".
  log_every: int = 100
  eval_every: int = 5000  # 0: no periodic evaluation.
  eval_batches: int = 8  # Batches in a periodic evaluation (md4 eval covers the whole split).
  sample_every: int = 5000  # 0: no periodic samples.
  checkpoint_every: int = 5000
  keep_checkpoints: int = 3
  progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  split: str = "valid"
  batch_size: int = 64
  num_time_samples: int = 1  # Draws of (t, z_t) per example (K).
  timesteps: int = 0  # 0: the continuous-time bound; T: the T-step discrete-time bound.
  max_examples: int = 0  # 0: the whole split.
  use_ema: bool = True


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  num_samples: int = 8
  num_steps: int = 256
  method: str = "ancestral"
  top_p: float = 1.0  # 1.0: no nucleus filtering.
  time_grid: str = "uniform"
  reuse_unchanged: bool = False  # Skip network calls on unchanged steps (time-free networks only).
  use_ema: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  sample: SampleConfig = SampleConfig()


def base_config() -> ml_collections.ConfigDict:
  """The defaults as a ConfigDict, for config files to start from."""
  return ml_collections.ConfigDict(dataclasses.asdict(Config()))


def _convert(cls: type, values: Mapping[str, Any], path: str):
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = [k for k in values if k not in names]
  if unknown:
    where = f"{path}." if path else ""
    raise ValueError(f"unknown config key {where}{unknown[0]!r}; valid keys{' in ' + path if path else ''}: "
                     f"{', '.join(names)}")
  kwargs = {}
  for name, value in values.items():
    hint, key = hints[name], f"{path}.{name}" if path else name
    if dataclasses.is_dataclass(hint):
      if not isinstance(value, Mapping):
        raise ValueError(f"config key {key} must be a group of keys, got {value!r}")
      kwargs[name] = _convert(hint, value, key)
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
      kwargs[name] = float(value)
    elif hint in (int, float, str, bool) and not isinstance(value, hint):
      raise ValueError(f"config key {key} must be {hint.__name__}, got {value!r}")
    elif isinstance(value, Mapping):
      kwargs[name] = flax.core.FrozenDict(value)
    else:
      kwargs[name] = value
  return cls(**kwargs)


def from_configdict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Config:
  """The typed Config; raises ValueError naming an unknown key or a value of the wrong type."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  cfg = _convert(Config, config, "")
  validate(cfg)
  return cfg


def validate(cfg: Config) -> None:
  """Checks the values that the dataclasses' types cannot."""
  checks = [
      (cfg.train.batch_size > 0, f"train.batch_size must be positive, got {cfg.train.batch_size}"),
      (cfg.train.grad_accum_steps > 0 and cfg.train.batch_size % cfg.train.grad_accum_steps == 0,
       f"train.batch_size ({cfg.train.batch_size}) must be a multiple of train.grad_accum_steps "
       f"({cfg.train.grad_accum_steps})"),
      (cfg.train.compute_dtype in ("float32", "bfloat16"),
       f"train.compute_dtype must be 'float32' or 'bfloat16', got {cfg.train.compute_dtype!r}"),
      (cfg.model.extra_tokens >= 0,
       f"model.extra_tokens must be >= 0, got {cfg.model.extra_tokens}"),
      (cfg.model.network_masks in (1, 2),
       f"model.network_masks must be 1 or 2, got {cfg.model.network_masks}"),
      (cfg.optimizer.decay in ("cosine", "constant"),
       f"optimizer.decay must be 'cosine' or 'constant', got {cfg.optimizer.decay!r}"),
      (0.0 < cfg.sample.top_p <= 1.0, f"sample.top_p must be in (0, 1], got {cfg.sample.top_p}"),
      (not {"vocab_size", "dtype"} & set(cfg.model.net),
       "model.net must not set vocab_size or dtype: they come from model.vocab_size and "
       "train.compute_dtype"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  _validate_objective(cfg)


def _validate_objective(cfg: Config) -> None:
  m = cfg.model
  if m.objective not in ("diffusion", "autoregressive"):
    raise ValueError(f"model.objective must be 'diffusion' or 'autoregressive', got {m.objective!r}")
  causal = bool(m.net.get("causal", False))
  if m.objective == "diffusion" and causal:
    raise ValueError("model.net.causal=True: a causal network cannot denoise; it needs "
                     "model.objective='autoregressive'")
  if m.objective == "autoregressive":
    problems = [
        (m.network == "transformer" and causal,
         "model.network='transformer' with model.net.causal=True"),
        (not m.net.get("time_conditioning", True), "model.net.time_conditioning=False"),
        (not m.state_dependent, "model.state_dependent=False"),
        (cfg.train.sample_every == 0, "train.sample_every=0 (the samplers are diffusion samplers)"),
    ]
    missing = [what for ok, what in problems if not ok]
    if missing:
      raise ValueError("model.objective='autoregressive' needs " + ", ".join(missing))


def to_dict(cfg: Config) -> dict[str, Any]:
  """Plain JSON-ready dict (for checkpoints and logs)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=dict))


# The keys that fix the shapes and meaning of a checkpoint's parameters: a checkpoint whose values
# differ here belongs to another model and is refused.
STATE_DEFINING_KEYS = ("model.network", "model.net", "model.vocab_size", "model.state_dependent",
                       "model.objective")


def state_fingerprint(cfg: Config) -> dict[str, Any]:
  flat = to_dict(cfg)
  out = {}
  for key in STATE_DEFINING_KEYS:
    group, name = key.split(".")
    out[key] = flat[group][name]
  return out
